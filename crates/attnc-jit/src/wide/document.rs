//! Document masks on the full-width tier: one batch entry's segment ids, read from the step's
//! buffers (i32 ids carried in f32-sized buffers), for [`attnc_wide::problem::Segments`].
//!
//! A fused attention reads at most one `document(...)` pair (the kernel's mask program holds
//! one set of ids); a pattern comparing several pairs is refused by [`one_pair`].

use super::{buffer_err, offset_of};
use crate::buffer::BufferView;
use crate::error::Result;
use crate::kernels::attention::AttentionSpec;
use crate::runtime::f32_as_ids;
use attnc_ir::MaskPattern;
use attnc_wide::problem::Segments;

/// The one `(q, k)` segment-operand pair `pattern` compares (`None` without a document, or
/// with two different pairs).
pub(super) fn one_pair(pattern: &MaskPattern) -> Option<(usize, usize)> {
    let mut pairs = Vec::new();
    collect(pattern, &mut pairs);
    match pairs.as_slice() {
        [first, rest @ ..] if rest.iter().all(|p| p == first) => Some(*first),
        _ => None,
    }
}

fn collect(p: &MaskPattern, out: &mut Vec<(usize, usize)>) {
    match p {
        MaskPattern::Document { q, k } => out.push((*q, *k)),
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
            collect(a, out);
            collect(b, out);
        }
        _ => {}
    }
}

/// `pattern` with every document part taken as keeping every pair (`global(∞)`): where all
/// the ids of a tile pair are one and the same, the pattern keeps there exactly what this keeps.
pub(super) fn relaxed(pattern: &MaskPattern) -> MaskPattern {
    match pattern {
        MaskPattern::Document { .. } => MaskPattern::Global(u64::MAX),
        MaskPattern::And(a, b) => MaskPattern::And(Box::new(relaxed(a)), Box::new(relaxed(b))),
        MaskPattern::Or(a, b) => MaskPattern::Or(Box::new(relaxed(a)), Box::new(relaxed(b))),
        other => other.clone(),
    }
}

/// The segment ids of batch entry `index` (its multi-index over the spec's batch axes).
pub(super) fn segments<'a>(
    spec: &AttentionSpec,
    inputs: &[BufferView<'a>],
    index: &[usize],
) -> Result<Option<Segments<'a>>> {
    let Some((q, k)) = spec.mask.as_ref().and_then(one_pair) else {
        return Ok(None);
    };
    let ids = |operand: usize, len: usize| -> Result<&'a [i32]> {
        let t = spec
            .segments
            .get(operand)
            .ok_or_else(|| buffer_err("segment ids", "the step has no such operand"))?;
        if t.col_stride != 1 && len > 1 {
            return Err(buffer_err(&t.name, "segment ids are not contiguous"));
        }
        let Some(BufferView::F32(x)) = inputs.get(t.slot) else {
            return Err(buffer_err(&t.name, "is not a buffer of segment ids"));
        };
        let start = offset_of(t, index);
        f32_as_ids(x)
            .get(start..start + len)
            .ok_or_else(|| buffer_err(&t.name, &format!("holds fewer than {len} ids here")))
    };
    let (m, n) = (spec.m, spec.n);
    Ok(Some(if q == k {
        let seg = ids(q, n)?;
        Segments {
            queries: seg,
            keys: seg,
            shift: n as i64 - m as i64,
        }
    } else {
        Segments {
            queries: ids(q, m)?,
            keys: ids(k, n)?,
            shift: 0,
        }
    }))
}
