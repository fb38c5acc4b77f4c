//! `mask(x, pattern, fill)` over the last two axes, reading segment ids for `document`.
//!
//! A static pattern is one `m × n` keep table shared by every batch entry. A pattern with
//! segment operands is evaluated per batch entry through
//! [`MaskPattern::contains_with`], each operand's row of ids found by its leading axes
//! (matched from the left against the batch axes: [`crate::segments`]).

use crate::pattern::MaskPattern;
use crate::segments::{row_offset, unflatten};
use ndarray::ArrayD;

/// Replaces entries (i, j) of the last two axes of `x` outside `pattern` by `fill`;
/// `segments` are the pattern's segment operands (ids held exactly as f64).
pub(crate) fn mask(
    pattern: &MaskPattern,
    fill: f64,
    x: &ArrayD<f64>,
    segments: &[&ArrayD<f64>],
) -> Result<ArrayD<f64>, String> {
    let rank = x.ndim();
    if rank < 2 {
        return Err(format!("mask of shape {:?} (rank < 2)", x.shape()));
    }
    if segments.len() != pattern.segments() {
        return Err(format!(
            "the pattern reads {} segment operands, the node has {}",
            pattern.segments(),
            segments.len()
        ));
    }
    if x.is_empty() {
        return Ok(x.clone());
    }
    let (m, n) = (x.shape()[rank - 2], x.shape()[rank - 1]);
    let batch = &x.shape()[..rank - 2];
    let mut out = x.as_standard_layout().into_owned();
    let shift = n as i64 - m as i64;
    let flat: Vec<Vec<f64>> = segments
        .iter()
        .map(|s| s.as_standard_layout().iter().copied().collect())
        .collect();
    let static_keep: Option<Vec<bool>> = pattern.is_static().then(|| {
        (0..m * n)
            .map(|e| pattern.keeps(e / n, e % n, m, n))
            .collect()
    });
    let data = out
        .as_slice_mut()
        .ok_or("the masked array is not contiguous")?;
    for (entry, tile) in data.chunks_exact_mut(m * n).enumerate() {
        // Each operand's row of ids for this batch entry.
        let at = unflatten(batch, entry);
        let rows: Vec<&[f64]> = segments
            .iter()
            .zip(&flat)
            .map(|(s, ids)| {
                let (len, lead) = s.shape().split_last().unwrap_or((&0, &[]));
                let start = row_offset(lead, *len, &at);
                ids.get(start..start + len).unwrap_or(&[])
            })
            .collect();
        let lookup = |operand: usize, index: i64| -> Option<i64> {
            let row = rows.get(operand)?;
            let value = row.get(usize::try_from(index).ok()?)?;
            Some(*value as i64)
        };
        for (e, v) in tile.iter_mut().enumerate() {
            let (i, j) = (e / n, e % n);
            let kept = match &static_keep {
                Some(keep) => keep[e],
                None => pattern.contains_with(i as i64, i as i64 + shift, j as i64, &lookup),
            };
            if !kept {
                *v = fill;
            }
        }
    }
    Ok(out)
}
