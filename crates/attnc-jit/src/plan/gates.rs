//! Gated attentions: a fused attention whose only use is a product with a gate that is
//! constant along each output row (`relu(g) * attention(..)` with `g: [h, 1, 1]` per head or
//! `[h, m, 1]` per query). The gate is planned before the attention step and handed to it
//! ([`StepGate`]), so at run time the step skips the query tiles whose gate is zero
//! (`crate::gate` says when that is exact). The product itself stays the plain elementwise
//! step it was: a skipped tile holds zeros, and `0 · 0` is the product's zero.

use super::fused::{attention_spec, attention_step};
use super::{operand, Planner, Val};
use crate::buffer::Elem;
use crate::error::Result;
use crate::kernels::attention::Precision;
use attnc_ir::{Attention, BinaryOp, Kernel, NodeId, Op};
use std::collections::HashMap;

/// Where an attention step reads its gate: step input `input`, an f32 buffer holding one
/// value per output row, `batch_strides` and `row_stride` apart (0 on broadcast axes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepGate {
    /// The index of the gate buffer in the step's inputs.
    pub input: usize,
    /// Element strides per batch axis of the attention's output.
    pub batch_strides: Vec<usize>,
    /// Element stride between query rows.
    pub row_stride: usize,
}

impl StepGate {
    /// The step's note in plans, for a step reading `inputs`.
    pub fn describe(&self, inputs: &[usize]) -> String {
        match inputs.get(self.input) {
            Some(b) => format!("skips query tiles where its gate buf{b} is zero"),
            None => "skips query tiles where its gate is zero".to_string(),
        }
    }
}

/// The gated attentions of a plan: attention node → its gate node.
#[derive(Default)]
pub(super) struct Gates {
    gate: HashMap<NodeId, NodeId>,
}

impl Gates {
    /// Finds every live attention (not paired with a log-sum-exp, not int8, not a result)
    /// used only by a product with a gate of its shape's rows: the gate's last axis has size
    /// 1, the product has the attention's shape, and the gate does not depend on the
    /// attention.
    pub(super) fn find(
        kernel: &Kernel,
        (live, users): (&[bool], &[usize]),
        shapes: &[Vec<usize>],
        excluded: &dyn Fn(NodeId) -> bool,
    ) -> Gates {
        let mut gate = HashMap::new();
        for id in kernel.graph.topo_order() {
            if !live[id.index()] || kernel.graph.node(id).op != Op::Binary(BinaryOp::Mul) {
                continue;
            }
            let ops = kernel.graph.operands(id);
            let [x, y] = ops[..] else { continue };
            for (a, g) in [(x, y), (y, x)] {
                let Op::Attention(att) = &kernel.graph.node(a).op else {
                    continue;
                };
                let (sa, sg) = (&shapes[a.index()], &shapes[g.index()]);
                let rows_constant = sg.last().is_none_or(|&w| w == 1) && sg.len() <= sa.len();
                if a != g
                    && !att.lse
                    && att.precision != Precision::Int8
                    && users[a.index()] == 1
                    && !excluded(a)
                    && rows_constant
                    && shapes[id.index()] == *sa
                    && !depends_on(kernel, g, a)
                {
                    gate.insert(a, g);
                    break;
                }
            }
        }
        Gates { gate }
    }

    /// The gate of attention `id`, if it is gated.
    pub(super) fn of(&self, id: NodeId) -> Option<NodeId> {
        self.gate.get(&id).copied()
    }

    /// `order` (operands before users) with each gated attention's gate, and what the gate
    /// reads, moved before the attention.
    pub(super) fn order(&self, kernel: &Kernel, order: Vec<NodeId>) -> Vec<NodeId> {
        if self.gate.is_empty() {
            return order;
        }
        let mut done = vec![false; kernel.graph.len()];
        let mut started = vec![false; kernel.graph.len()];
        let mut out = Vec::with_capacity(order.len());
        for &root in &order {
            // Depth first, without recursion: (node, its dependencies already pushed). A
            // node met again while its dependencies are pending would close a cycle, which
            // `find` rules out; it is not expanded twice.
            let mut stack = vec![(root, false)];
            while let Some((id, expanded)) = stack.pop() {
                if done[id.index()] {
                    continue;
                }
                if expanded {
                    done[id.index()] = true;
                    out.push(id);
                    continue;
                }
                if std::mem::replace(&mut started[id.index()], true) {
                    continue;
                }
                stack.push((id, true));
                let mut deps = kernel.graph.operands(id);
                deps.extend(self.of(id));
                stack.extend(
                    deps.into_iter()
                        .rev()
                        .filter(|d| !done[d.index()])
                        .map(|d| (d, false)),
                );
            }
        }
        out
    }
}

/// Whether `node` reads `target`, directly or through other nodes.
fn depends_on(kernel: &Kernel, node: NodeId, target: NodeId) -> bool {
    let mut seen = vec![false; kernel.graph.len()];
    let mut stack = vec![node];
    while let Some(id) = stack.pop() {
        if id == target {
            return true;
        }
        if !std::mem::replace(&mut seen[id.index()], true) {
            stack.extend(kernel.graph.operands(id));
        }
    }
    false
}

/// Plans gated attention `id`: the gate as an f32 buffer (its value replaced by that
/// buffer, so the product reads it rather than computing it again), then the attention step
/// reading it. `None` when the gate is not an f32 buffer the step can read (then the
/// attention is planned as usual).
pub(super) fn plan_gated(
    p: &mut Planner<'_>,
    (id, gate): (NodeId, NodeId),
    a: &Attention,
    vals: &mut [Option<Val>],
) -> Result<Option<Val>> {
    let g = operand(vals, gate)?;
    let (buf, strides) = p.strided(&g);
    if p.buffers[buf].elem != Elem::F32 {
        return Ok(None);
    }
    vals[gate.index()] = Some(Val {
        expr: crate::kernels::elementwise::Expr::Leaf {
            buf,
            strides: strides.clone(),
        },
        shape: g.shape.clone(),
    });
    let spec = attention_spec(p, id, a, vals)?;
    // Per axis of the output `[batch.., m, dv]`: the gate's stride, 0 where it broadcasts.
    let rank = spec.batch.len() + 2;
    let pad = rank - g.shape.len().min(rank);
    let mut out_strides = vec![0usize; rank];
    for (axis, (&size, &stride)) in g.shape.iter().zip(&strides).enumerate() {
        if size != 1 {
            out_strides[axis + pad] = stride;
        }
    }
    let (out, shape) = attention_step(p, spec)?;
    let Some(step) = p.steps.last_mut() else {
        return Ok(None);
    };
    step.inputs.push(buf);
    step.gate = Some(StepGate {
        input: step.inputs.len() - 1,
        batch_strides: out_strides[..rank - 2].to_vec(),
        row_stride: out_strides[rank - 2],
    });
    Ok(Some(Planner::leaf(out, &shape)))
}
