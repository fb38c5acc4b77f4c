//! Dead-node removal for kernels built from extracted expressions.
//!
//! The lowering invariants hold afterwards: nodes `0..params.len()` are the inputs, every
//! other node feeds the output, and index order is topological.

use attnc_ir::{Graph, Kernel, NodeId};

/// Removes the nodes of `kernel` that the output does not use (parameters always stay).
pub fn prune(kernel: &mut Kernel) {
    let graph = &kernel.graph;
    let count = graph.len();
    let mut live = vec![false; count];
    if kernel.output.index() < count {
        live[kernel.output.index()] = true;
    }
    live.iter_mut().take(kernel.params.len()).for_each(|l| *l = true);
    let operands: Vec<Vec<NodeId>> = graph.topo_order().into_iter().map(|id| graph.operands(id)).collect();
    for index in (0..count).rev() {
        if live[index] {
            for o in &operands[index] {
                live[o.index()] = true;
            }
        }
    }
    let mut fresh = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; count];
    for index in (0..count).filter(|&i| live[i]) {
        let args: Vec<NodeId> = operands[index].iter().filter_map(|o| map[o.index()]).collect();
        map[index] = Some(fresh.add(graph.node(NodeId::new(index)).clone(), &args));
    }
    if let Some(out) = map.get(kernel.output.index()).copied().flatten() {
        kernel.output = out;
    }
    kernel.graph = fresh;
}
