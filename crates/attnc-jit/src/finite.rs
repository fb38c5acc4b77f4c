//! Keeping finite attention results finite where the fused kernels' accumulator overflows.
//!
//! The fused attention kernels (Cranelift's and the full-width ones) accumulate
//! `Σ_j e^(s_j − m) v_j` and divide by the row sum `l` at the end. Every weight `e^(s_j − m)`
//! is at most 1, so the accumulator of a row is at most `n · max|v|`: with values near the f32
//! limit it overflows (q = k = 0, v = 1e38 gives `n · 1e38`) although the result, a weighted
//! mean of V's rows, is finite — as it is in the interpreter, where the weights are normalized
//! first (docs/language.md, "Values beyond the f32 range").
//!
//! Scaling the accumulator per tile would cost every tile a test. Instead, after the step its
//! output is scanned once ([`any_non_finite`], O(m · dv) per batch entry), and only the batch
//! entries holding a non-finite value that V's magnitude can explain (`n · max|v|` near the
//! f32 limit) are computed again from a copy of V scaled by an exact power of two `2^-k`; the
//! second result times `2^k` replaces the non-finite values where it is finite. Genuine infinities and NaNs (from the inputs, or from scores beyond the f32
//! range) come out of the second computation the same, so they stay.
//!
//! The full-width kernels keep their scores in base 2 (`x · log2 e`, the scale folded into Q),
//! so a score, bias or ALiBi term within the f32 range but beyond `f32::MAX / log2 e` overflows
//! there and makes its row NaN. Their batch entries with a non-finite value whose Q, K and
//! bias magnitudes reach that far ([`beyond_base_two`]) are computed again by the portable
//! kernel (compiled on first need) and take its values where theirs are not finite.
//!
//! Only exact attention is rescued: the int8 kernel's V is quantized by an earlier step (its
//! error is measured on the data, so an overflow there fails validation and the exact plan
//! runs), and linear attention's numerator `A @ V` is a value of its plain form that leaves
//! the f32 range in every engine alike.

use crate::buffer::{BufferView, Storage};
use crate::error::Result;
use crate::kernels::attention::{AttentionSpec, Precision, TensorRef};
use crate::wide::WideScore;

/// Whether `x` holds an infinity or a NaN. Branch-free within blocks of 1024 (so the scan
/// runs at full vector width, not an element-wise early exit): every output is scanned on the
/// calling thread after its step, where a scalar scan cost a multi-threaded step a few per
/// cent of its time.
pub(crate) fn any_non_finite(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    x.chunks(1024).any(|block| {
        block
            .iter()
            .fold(false, |seen, v| seen | (v.to_bits() & EXPONENT == EXPONENT))
    })
}

/// The most `n · max|v|` may be before an accumulator can overflow: a quarter of `f32::MAX`
/// leaves room for the rounding of the sums and the rescaling by `e^(m_old − m_new)`.
const HEADROOM: f64 = f32::MAX as f64 / 4.0;

/// Recomputes, from a scaled copy of V, the batch entries of the exact attention `spec` whose
/// output (`out`, `[batch.., m, dv]`, computed from `views`) holds a non-finite value that V's
/// magnitude explains. `rows(views, out, entry)` computes every row of batch entry `entry`
/// into `out` (the whole output's layout), as the step's kernel does.
pub(crate) fn keep_finite(
    spec: &AttentionSpec,
    views: &[BufferView<'_>],
    out: &mut [f32],
    rows: &impl Fn(&[BufferView<'_>], &mut [f32], usize) -> Result<()>,
) -> Result<()> {
    let per = spec.m * spec.dv;
    if spec.precision != Precision::Exact || per == 0 || out.len() != per * spec.batch_count() {
        return Ok(());
    }
    let bad: Vec<usize> = out
        .chunks(per)
        .enumerate()
        .filter(|(_, entry)| any_non_finite(entry))
        .map(|(e, _)| e)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let Some(&v) = views.get(spec.v.slot) else {
        return Ok(());
    };
    // One power of two for every entry that needs one (a larger shift than an entry needs
    // only rounds V's smallest values, far below the entry's largest).
    let mut shift = 0i32;
    let mut entries = Vec::new();
    for e in bad {
        let reach = spec.n as f64 * max_abs(v, &spec.v, spec, e, (spec.n, spec.dv));
        if reach > HEADROOM {
            entries.push(e);
            shift = shift.max((reach / HEADROOM).log2().ceil() as i32);
        }
    }
    let Some(scaled) = (!entries.is_empty()).then(|| scale(v, shift)).flatten() else {
        return Ok(());
    };
    let mut views = views.to_vec();
    views[spec.v.slot] = scaled.view();
    let mut again = vec![0.0f32; out.len()];
    let back = 2f64.powi(shift);
    for e in entries {
        rows(&views, &mut again, e)?;
        let span = e * per..(e + 1) * per;
        for (o, &a) in out[span.clone()].iter_mut().zip(&again[span]) {
            let y = (f64::from(a) * back) as f32;
            if !o.is_finite() && y.is_finite() {
                *o = y;
            }
        }
    }
    Ok(())
}

/// A full-width step's output after its finite values are kept ([`keep_finite`], with `rows`
/// the step's own kernel): the batch entries its base-2 scores leave non-finite
/// ([`beyond_base_two`]), for the caller to compute again on another kernel. `non_finite`:
/// whether the step saw a non-finite value as it wrote `out`; `None` scans `out` for one.
pub(crate) fn rescue_wide(
    spec: &AttentionSpec,
    score: WideScore,
    views: &[BufferView<'_>],
    (out, non_finite): (&mut [f32], Option<bool>),
    rows: &impl Fn(&[BufferView<'_>], &mut [f32], usize) -> Result<()>,
) -> Result<Vec<usize>> {
    if !non_finite.unwrap_or_else(|| any_non_finite(out)) {
        return Ok(Vec::new());
    }
    keep_finite(spec, views, out, rows)?;
    Ok(beyond_base_two(spec, score, views, out))
}

/// The batch entries of a full-width step's output `out` holding a non-finite value that its
/// base-2 scores can explain: `d · max|q| · max|k| · |scale|` (times the entry's scale
/// operand), `max|bias|` or
/// `|slope| · (m + n)`, times `log2 e`, reaches a quarter of `f32::MAX`.
pub(crate) fn beyond_base_two(
    spec: &AttentionSpec,
    score: WideScore,
    views: &[BufferView<'_>],
    out: &[f32],
) -> Vec<usize> {
    let per = spec.m * spec.dv;
    // The portable tier exponentiates in base e: nothing to explain.
    if spec.precision != Precision::Exact
        || spec.tier == crate::wide::Tier::Portable
        || per == 0
        || out.len() != per * spec.batch_count()
    {
        return Vec::new();
    }
    let magnitude = |t: &TensorRef, rows: usize, cols: usize, e: usize| -> f64 {
        views
            .get(t.slot)
            .map_or(0.0, |&v| max_abs(v, t, spec, e, (rows, cols)))
    };
    out.chunks(per)
        .enumerate()
        .filter(|(_, entry)| any_non_finite(entry))
        .map(|(e, _)| e)
        .filter(|&e| {
            let by = score
                .scale_by
                .map_or(1.0, |b| magnitude(&spec.biases[b], 1, 1, e));
            let scores = spec.d as f64
                * magnitude(&spec.q, spec.m, spec.d, e)
                * magnitude(&spec.k, spec.n, spec.d, e)
                * f64::from(score.scale).abs()
                * by;
            let bias = score
                .bias
                .map_or(0.0, |b| magnitude(&spec.biases[b], spec.m, spec.n, e));
            let slope = score.slope.map_or(0.0, |b| {
                magnitude(&spec.biases[b], 1, 1, e) * (spec.m + spec.n) as f64
            });
            let reach = scores.max(bias).max(slope) * std::f64::consts::LOG2_E;
            reach > HEADROOM
        })
        .collect()
}

/// Replaces the non-finite values of batch entries `entries` of `out` by those of a second
/// computation, `rows(views, out, entry)` (every row of one entry, as the step's layout),
/// rescued by [`keep_finite`] in turn.
pub(crate) fn recompute(
    spec: &AttentionSpec,
    views: &[BufferView<'_>],
    out: &mut [f32],
    entries: &[usize],
    rows: impl Fn(&[BufferView<'_>], &mut [f32], usize) -> Result<()>,
) -> Result<()> {
    let per = spec.m * spec.dv;
    let mut again = vec![0.0f32; out.len()];
    for &e in entries {
        rows(views, &mut again, e)?;
    }
    keep_finite(spec, views, &mut again, &rows)?;
    for &e in entries {
        let span = e * per..(e + 1) * per;
        for (o, &a) in out[span.clone()].iter_mut().zip(&again[span]) {
            if !o.is_finite() {
                *o = a;
            }
        }
    }
    Ok(())
}

/// The largest finite magnitude of the `rows × cols` matrix of `t` in batch entry `entry`
/// (0 when none).
fn max_abs(
    v: BufferView<'_>,
    t: &TensorRef,
    spec: &AttentionSpec,
    entry: usize,
    (rows, cols): (usize, usize),
) -> f64 {
    let mut offset = 0;
    let mut rest = entry;
    for (&size, &stride) in spec.batch.iter().zip(&t.batch_strides).rev() {
        if size > 0 {
            offset += (rest % size) * stride;
            rest /= size;
        }
    }
    let mut max = 0.0f32;
    for j in 0..rows {
        for c in 0..cols {
            let i = offset + j * t.row_stride + c * t.col_stride;
            if i < v.len() {
                let x = v.get_f32(i).abs();
                if x.is_finite() {
                    max = max.max(x);
                }
            }
        }
    }
    f64::from(max)
}

/// `v · 2^-shift` in v's own element type (exact, but for values that become subnormal);
/// `None` for element types whose range cannot overflow an accumulator (f16) or that are not
/// values.
fn scale(v: BufferView<'_>, shift: i32) -> Option<Storage> {
    // shift ≤ log2(4 · n) < 40, so the factor is a normal f32.
    let factor = 2f32.powi(-shift);
    match v {
        BufferView::F32(x) => Some(Storage::F32(x.iter().map(|&a| a * factor).collect())),
        BufferView::Bf16(x) => Some(Storage::Bf16(
            x.iter()
                .map(|&a| half::bf16::from_f32(a.to_f32() * factor))
                .collect(),
        )),
        BufferView::F16(_) | BufferView::U8(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_is_exact_by_a_power_of_two() {
        let s = scale(BufferView::F32(&[3e38, -1.5, 0.0]), 3).expect("f32 scales");
        assert_eq!(s, Storage::F32(vec![3e38 / 8.0, -1.5 / 8.0, 0.0]));
        let big = half::bf16::from_f32(3.3e38);
        let s = scale(BufferView::Bf16(&[big]), 1).expect("bf16 scales");
        assert_eq!(
            s,
            Storage::Bf16(vec![half::bf16::from_f32(big.to_f32() / 2.0)])
        );
        assert!(scale(BufferView::F16(&[half::f16::ONE]), 1).is_none());
    }
}
