//! `mask(x, pattern, fill)` over the last two axes, reading segment ids for `document` and
//! gates for `topk_blocks`.
//!
//! A static pattern is one `m × n` keep table shared by every batch entry. A pattern with
//! segment operands is evaluated per batch entry through
//! [`MaskPattern::contains_with`], each operand's row of ids (or gate matrix) found by its
//! leading axes (matched from the left against the batch axes: [`crate::segments`]).

use crate::pattern::{MaskPattern, PatternData};
use crate::segments::{roles, row_offset, unflatten, Role};
use ndarray::ArrayD;

/// One batch entry's segment operands: rows of ids, and the block selections of its gates
/// (per gate operand and `k`: row-major over `ceil(m/b) × ceil(n/b)` blocks, and the column
/// count).
struct Entry<'a> {
    rows: Vec<&'a [f64]>,
    selections: Vec<((usize, u64), Vec<bool>, usize)>,
}

impl PatternData for Entry<'_> {
    fn segment(&self, operand: usize, index: i64) -> Option<i64> {
        let row = self.rows.get(operand)?;
        let value = row.get(usize::try_from(index).ok()?)?;
        Some(*value as i64)
    }

    fn selected(&self, operand: usize, k: u64, row: i64, col: i64) -> bool {
        let Some((_, keep, cols)) = self.selections.iter().find(|s| s.0 == (operand, k)) else {
            return false;
        };
        let (Ok(r), Ok(c)) = (usize::try_from(row), usize::try_from(col)) else {
            return false;
        };
        c < *cols && keep.get(r * cols + c).copied().unwrap_or(false)
    }
}

/// The selection of a gate matrix `gate` (`rows × cols`, row-major) keeping `k` per row.
fn selection(gate: &[f64], cols: usize, k: u64) -> Vec<bool> {
    let mut keep = vec![false; gate.len()];
    if cols > 0 {
        for (row, out) in gate.chunks_exact(cols).zip(keep.chunks_exact_mut(cols)) {
            crate::topk::select(row, k, out);
        }
    }
    keep
}

/// The (gate operand, k) of every `topk_blocks` part.
fn gate_ks(pattern: &MaskPattern) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    crate::segments::visit(pattern, &mut |p| {
        if let MaskPattern::TopkBlocks { g, k, .. } = p {
            if !out.contains(&(*g, *k)) {
                out.push((*g, *k));
            }
        }
    });
    out
}

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
    let roles = roles(pattern);
    let ks = gate_ks(pattern);
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
        let mut lookup = Entry {
            rows: Vec::new(),
            selections: Vec::new(),
        };
        for (index, (s, ids)) in segments.iter().zip(&flat).enumerate() {
            // A gate's "row" is its whole trailing matrix.
            let gate = matches!(roles.get(index), Some(Some(Role::Gate(_))));
            let tail = if gate { 2 } else { 1 };
            let (lead, last) = s.shape().split_at(s.ndim().saturating_sub(tail));
            let len: usize = last.iter().product();
            let start = row_offset(lead, len, &at);
            let row = ids.get(start..start + len).unwrap_or(&[]);
            lookup.rows.push(row);
            if gate {
                let cols = last.last().copied().unwrap_or(0);
                for &(_, k) in ks.iter().filter(|(g, _)| *g == index) {
                    let keep = selection(row, cols, k);
                    lookup.selections.push(((index, k), keep, cols));
                }
            }
        }
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
