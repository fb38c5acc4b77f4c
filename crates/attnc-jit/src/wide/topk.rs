//! `topk_blocks(g, k, b)` masks on the full-width tier: the gate of one batch entry, read from
//! the step's buffers, selected per row block ([`attnc_ir::topk::select`], the rule every
//! engine shares), and the two static tables that bound the mask from above and below.
//!
//! A fused attention reads one `topk_blocks(...)` part at most (the kernel's mask program
//! holds one selection); a pattern with several different ones is refused by [`one_leaf`].

use super::{buffer_err, offset_of};
use crate::buffer::BufferView;
use crate::error::Result;
use crate::kernels::attention::AttentionSpec;
use attnc_ir::MaskPattern;

/// A `topk_blocks(g{gate}, k, b)` part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Leaf {
    /// The gate's segment operand.
    pub gate: usize,
    /// Key blocks kept per row block.
    pub k: u64,
    /// The block size.
    pub b: u64,
}

/// The one `topk_blocks` part of `pattern` (`None` without one, or with two different ones).
pub(super) fn one_leaf(pattern: &MaskPattern) -> Option<Leaf> {
    let mut leaves = Vec::new();
    attnc_ir::segments::visit(pattern, &mut |p| {
        if let MaskPattern::TopkBlocks { g, k, b } = p {
            leaves.push(Leaf {
                gate: *g,
                k: *k,
                b: *b,
            });
        }
    });
    match leaves.as_slice() {
        [first, rest @ ..] if rest.iter().all(|l| l == first) => Some(*first),
        _ => None,
    }
}

/// Whether `pattern` has a `topk_blocks` part.
pub(super) fn has_leaf(pattern: &MaskPattern) -> bool {
    let mut found = false;
    attnc_ir::segments::visit(pattern, &mut |p| {
        found |= matches!(p, MaskPattern::TopkBlocks { .. });
    });
    found
}

/// `pattern` with its `topk_blocks` parts taken as keeping every pair (`kept`) or none,
/// simplified; `None` when it then keeps nothing. The pattern is monotone in those parts, so
/// the two results bound what it keeps.
pub(super) fn substituted(pattern: &MaskPattern, kept: bool) -> Option<MaskPattern> {
    let all = MaskPattern::Global(u64::MAX);
    match pattern {
        MaskPattern::TopkBlocks { .. } => kept.then_some(all),
        MaskPattern::And(a, b) => match (substituted(a, kept)?, substituted(b, kept)?) {
            (x, y) if x == all => Some(y),
            (x, y) if y == all => Some(x),
            (x, y) => Some(MaskPattern::And(Box::new(x), Box::new(y))),
        },
        MaskPattern::Or(a, b) => match (substituted(a, kept), substituted(b, kept)) {
            (None, x) | (x, None) => x,
            (Some(x), Some(y)) => Some(MaskPattern::Or(Box::new(x), Box::new(y))),
        },
        other => Some(other.clone()),
    }
}

/// The selection of batch entry `index` (its multi-index over the spec's batch axes):
/// `ceil(m/b) × ceil(n/b)` flags, row-major.
pub(super) fn selection(
    spec: &AttentionSpec,
    inputs: &[BufferView<'_>],
    index: &[usize],
    leaf: Leaf,
) -> Result<Vec<bool>> {
    let t = spec
        .segments
        .get(leaf.gate)
        .ok_or_else(|| buffer_err("gate", "the step has no such operand"))?;
    let b = usize::try_from(leaf.b.max(1)).unwrap_or(usize::MAX);
    let (rows, cols) = (spec.m.div_ceil(b), spec.n.div_ceil(b));
    let start = offset_of(t, index);
    let last = rows
        .checked_sub(1)
        .zip(cols.checked_sub(1))
        .map(|(r, c)| start + r * t.row_stride + c * t.col_stride);
    let get: Box<dyn Fn(usize) -> f32 + '_> = match inputs.get(t.slot) {
        Some(BufferView::F32(x)) if last.is_none_or(|l| l < x.len()) => Box::new(|e| x[e]),
        Some(BufferView::F16(x)) if last.is_none_or(|l| l < x.len()) => Box::new(|e| x[e].to_f32()),
        Some(BufferView::Bf16(x)) if last.is_none_or(|l| l < x.len()) => {
            Box::new(|e| x[e].to_f32())
        }
        _ => {
            return Err(buffer_err(
                &t.name,
                "is not a float gate of the expected size",
            ))
        }
    };
    let mut keep = vec![false; rows * cols];
    let mut row = vec![0f32; cols];
    for (r, out) in keep.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
        for (c, x) in row.iter_mut().enumerate() {
            *x = get(start + r * t.row_stride + c * t.col_stride);
        }
        attnc_ir::topk::select(&row, leaf.k, out);
    }
    Ok(keep)
}
