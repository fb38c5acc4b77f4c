//! Gates of `topk_blocks(g, k, b)` checked against the bound shapes: a gate whose sizes are
//! symbols of their own (`g: f32[h, r, c]`) is only known to fit once the inputs are bound.

use super::BindError;
use crate::fused::Extent;
use crate::graph::{Kernel, NodeId};
use crate::op::Op;
use crate::pattern::MaskPattern;

/// Checks every gate read by a mask or fused attention of `kernel`; `shapes[id.index()]` is
/// node `id`'s bound shape.
pub(super) fn check(kernel: &Kernel, shapes: &[Vec<usize>]) -> Result<(), BindError> {
    let graph = &kernel.graph;
    for id in graph.topo_order() {
        let node = graph.node(id);
        let (pattern, first, keys_of) = match &node.op {
            Op::Mask { pattern, .. } => (pattern, 1, None),
            Op::Attention(a) => match &a.mask {
                Some(p) => (p, 3 + a.score.biases(), Some(1)),
                None => continue,
            },
            _ => continue,
        };
        let operands = graph.operands(id);
        let shape_of = |n: NodeId| shapes.get(n.index()).map(Vec::as_slice).unwrap_or(&[]);
        let out = shape_of(id);
        let rank = out.len();
        if rank < 2 {
            continue;
        }
        let m = out[rank - 2];
        let n = match keys_of {
            // The keys' rows (the attention's output has the values' columns last).
            Some(k) => operands
                .get(k)
                .map(|&k| shape_of(k))
                .and_then(|s| s.len().checked_sub(2).map(|r| s[r]))
                .unwrap_or(0),
            None => out[rank - 1],
        };
        let mut result = Ok(());
        crate::segments::visit(pattern, &mut |p| {
            if let (Ok(()), MaskPattern::TopkBlocks { g, k, b }) = (&result, p) {
                if let Some(&gate) = operands.get(first + g) {
                    result = fits(kernel, gate, shape_of(gate), (m, n), (*k, *b));
                }
            }
        });
        result?;
    }
    Ok(())
}

/// The gate `gate` of shape `shape` has `ceil(m/b)` rows and `ceil(n/b)` columns last.
fn fits(
    kernel: &Kernel,
    gate: NodeId,
    shape: &[usize],
    (m, n): (usize, usize),
    (k, b): (u64, u64),
) -> Result<(), BindError> {
    let Some(rows_axis) = shape.len().checked_sub(2) else {
        return Ok(());
    };
    let want = [(m.blocks(b), m, "queries"), (n.blocks(b), n, "keys")];
    for (offset, (expected, count, what)) in want.into_iter().enumerate() {
        let axis = rows_axis + offset;
        if shape[axis] != expected {
            let gate = match &kernel.graph.node(gate).op {
                Op::Input { name, .. } => format!("input `{name}`"),
                other => format!("the gate (node %{}, {other})", gate.index()),
            };
            return Err(BindError::Gate {
                gate,
                axis,
                got: shape[axis],
                expected,
                pattern: format!("topk_blocks(g, {k}, {b})"),
                count,
                what,
                b,
            });
        }
    }
    Ok(())
}
