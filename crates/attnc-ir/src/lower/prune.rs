//! Dropping nodes the output does not depend on (unused `let`s), keeping every `Input`.

use crate::graph::{Graph, NodeId};
use crate::op::Op;

/// Returns `graph` without the nodes that neither feed `output` nor are inputs, and the id of
/// `output` in the result. Index order (and so topological order) is preserved.
#[cfg(test)]
pub(crate) fn prune(graph: Graph, output: NodeId) -> (Graph, NodeId) {
    let (graph, outputs) = prune_all(graph, &[output]);
    (graph, outputs.first().copied().unwrap_or(output))
}

/// [`prune`] for several outputs: the nodes none of `outputs` depends on go, and the result
/// holds the new id of each output, in order.
pub(crate) fn prune_all(graph: Graph, outputs: &[NodeId]) -> (Graph, Vec<NodeId>) {
    let len = graph.len();
    let mut live = vec![false; len];
    let mut stack = outputs.to_vec();
    while let Some(id) = stack.pop() {
        let Some(seen) = live.get_mut(id.index()) else {
            continue;
        };
        if *seen {
            continue;
        }
        *seen = true;
        stack.extend(graph.operands(id));
    }
    for (id, flag) in graph.dag.node_indices().zip(live.iter_mut()) {
        if matches!(graph.node(id).op, Op::Input { .. }) {
            *flag = true;
        }
    }
    if live.iter().all(|&l| l) {
        return (graph, outputs.to_vec());
    }
    let mut pruned = Graph::new();
    let mut remap: Vec<Option<NodeId>> = vec![None; len];
    for id in graph.topo_order() {
        if !live[id.index()] {
            continue;
        }
        let operands: Vec<NodeId> = graph
            .operands(id)
            .into_iter()
            .filter_map(|o| remap[o.index()])
            .collect();
        remap[id.index()] = Some(pruned.add(graph.node(id).clone(), &operands));
    }
    let new_outputs = outputs
        .iter()
        .map(|o| remap[o.index()].unwrap_or(*o))
        .collect();
    (pruned, new_outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Node;
    use crate::op::{BinaryOp, DType, UnaryOp};
    use attnc_syntax::Span;

    fn node(op: Op) -> Node {
        Node {
            op,
            shape: vec![],
            dtype: DType::F32,
            span: Span::default(),
        }
    }

    #[test]
    fn drops_dead_nodes_and_keeps_inputs() {
        let mut g = Graph::new();
        let x = g.add(
            node(Op::Input {
                index: 0,
                name: "x".into(),
            }),
            &[],
        );
        let unused = g.add(
            node(Op::Input {
                index: 1,
                name: "y".into(),
            }),
            &[],
        );
        let dead = g.add(node(Op::Unary(UnaryOp::Exp)), &[unused]);
        let c = g.add(node(Op::Const(2.0)), &[]);
        let out = g.add(node(Op::Binary(BinaryOp::Mul)), &[x, c]);
        let _ = dead;
        let (p, out) = prune(g, out);
        assert_eq!(p.len(), 4);
        assert_eq!(p.node(out).op, Op::Binary(BinaryOp::Mul));
        let ops: Vec<NodeId> = p.operands(out);
        assert_eq!(
            p.node(ops[0]).op,
            Op::Input {
                index: 0,
                name: "x".into()
            }
        );
        assert_eq!(p.node(ops[1]).op, Op::Const(2.0));
    }
}
