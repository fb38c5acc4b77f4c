//! What the interpreter will allocate, computed from the bound shapes before it runs: the
//! caller compares it with the memory available and refuses a run that cannot fit instead
//! of letting an allocation abort the process.
//!
//! The interpreter holds every input as f64, and each node's f64 value from the node that
//! computes it to its last user (the output to the end); a fused op also holds its `m × n`
//! scores while it runs.

use crate::bind::{resolve_node_shapes, BindError};
use crate::dim::Bindings;
use crate::graph::{Kernel, NodeId};
use crate::op::Op;

/// The interpreter's memory for one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpMemory {
    /// Bytes alive together at the fullest point, inputs included.
    pub peak_bytes: u64,
    /// The largest single value: its node and bytes.
    pub largest: Option<(NodeId, u64)>,
}

/// The memory [`super::evaluate`] needs for `kernel` at `bindings`.
pub fn interp_memory(kernel: &Kernel, bindings: &Bindings) -> Result<InterpMemory, BindError> {
    let shapes = resolve_node_shapes(kernel, bindings)?;
    let graph = &kernel.graph;
    let bytes = |elems: usize| (elems as u64).saturating_mul(8);
    let size = |id: NodeId| bytes(shapes[id.index()].iter().product::<usize>());
    let count = graph.len();
    let mut last_use = vec![0usize; count];
    for id in graph.topo_order() {
        for o in graph.operands(id) {
            last_use[o.index()] = id.index();
        }
    }
    let output = kernel.output.index();
    last_use[output.min(count.saturating_sub(1))] = usize::MAX;
    // The caller's f64 copies of the inputs live throughout.
    let inputs: u64 = graph
        .topo_order()
        .into_iter()
        .filter(|&id| matches!(graph.node(id).op, Op::Input { .. }))
        .map(size)
        .fold(0, u64::saturating_add);
    let mut live = inputs;
    let mut peak = inputs;
    let mut largest: Option<(NodeId, u64)> = None;
    for id in graph.topo_order() {
        let own = size(id);
        // Scratch a node needs besides its value while it runs.
        let scratch = match &graph.node(id).op {
            Op::Attention(_) | Op::LinearAttention(_) => {
                let ops = graph.operands(id);
                let rows = |o: &NodeId| {
                    let s = &shapes[o.index()];
                    s.get(s.len().wrapping_sub(2)).copied().unwrap_or(0)
                };
                let (m, n) = (ops.first().map_or(0, rows), ops.get(1).map_or(0, rows));
                let batch = own
                    / bytes(1).max(1)
                    / (m.max(1) as u64)
                    / (*shapes[id.index()].last().unwrap_or(&1)).max(1) as u64;
                bytes(m.saturating_mul(n)).saturating_mul(batch.max(1))
            }
            // The attention gradient holds six [batch.., m, n] arrays (scores, probabilities,
            // their gradients and partials) while it runs.
            Op::Backward(crate::backward::BackwardOp::Attention(_)) => {
                let ops = graph.operands(id);
                let dims = |o: Option<&NodeId>| o.map_or(&[][..], |o| &shapes[o.index()][..]);
                let (q, k, d_o) = (dims(ops.first()), dims(ops.get(1)), dims(ops.last()));
                let rows = |s: &[usize]| s.get(s.len().wrapping_sub(2)).copied().unwrap_or(0);
                let batch: usize = d_o[..d_o.len().saturating_sub(2)].iter().product();
                bytes(batch.saturating_mul(rows(q)).saturating_mul(rows(k))).saturating_mul(6)
            }
            _ => 0,
        };
        live = live.saturating_add(own);
        peak = peak.max(live.saturating_add(scratch));
        if largest.is_none_or(|(_, b)| own.max(scratch) > b) {
            largest = Some((id, own.max(scratch)));
        }
        for o in graph.operands(id) {
            if last_use[o.index()] == id.index() {
                live = live.saturating_sub(size(o));
            }
        }
    }
    Ok(InterpMemory {
        peak_bytes: peak,
        largest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scores_of_a_plain_attention_dominate() {
        let (file, _) = attnc_syntax::parse(
            "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] { \
             return softmax(q @ k.T) @ v; }",
        );
        let module = crate::lower::lower_file(&file).expect("valid");
        let bindings: Bindings = [("n".to_string(), 1000), ("d".to_string(), 8)]
            .into_iter()
            .collect();
        let m = interp_memory(&module.kernels[0], &bindings).expect("bound");
        // q k^T and its softmax (1000 × 1000 f64 each) are alive together.
        assert!(m.peak_bytes >= 2 * 8_000_000, "{m:?}");
        assert_eq!(m.largest.map(|l| l.1), Some(8_000_000));
    }
}
