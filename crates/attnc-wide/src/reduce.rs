//! Reductions of contiguous rows on 16 f32 lanes: the `sum`, `mean` and `max` of each row of
//! a `[rows, len]` matrix — a plan's reductions over the last axis (Performer's maxima over
//! 256 features per row, sums of squares), which the portable code folds one element at a
//! time through a dependent chain.
//!
//! Each row is folded into four vectors of partial results (independent chains), those into
//! one vector, and its 16 lanes in a fixed order: every row gets the same sequence of
//! operations whatever the split of rows across threads, so results are bit-identical at any
//! thread count. `max` follows IEEE 754-2019 `maximum` (NaN if any element is NaN, `+0` above
//! `−0`) and is `−∞` for an empty row; `mean` is the sum divided by the length (NaN for an
//! empty row, as `0 / 0`).

use crate::problem::CallError;

/// The reduction of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduce {
    /// `Σ x`
    Sum,
    /// `Σ x / len`
    Mean,
    /// IEEE `maximum` of the row
    Max,
}

/// `out[r]` = the reduction of `src[r·len .. (r + 1)·len]` for every row `r < out.len()`.
/// Errors, before anything is written, when `src` does not hold exactly those rows.
pub fn rows(op: RowReduce, src: &[f32], len: usize, out: &mut [f32]) -> Result<(), CallError> {
    if out.len().checked_mul(len) != Some(src.len()) {
        return Err(CallError::Shape(format!(
            "{} elements are not {} rows of {len}",
            src.len(),
            out.len()
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::Features::detect().avx512 {
        for (r, o) in out.iter_mut().enumerate() {
            let row = &src[r * len..(r + 1) * len];
            // SAFETY: AVX-512 F/BW/DQ/VL were detected.
            *o = unsafe { wide::row(op, row) };
        }
        return Ok(());
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = scalar(op, &src[r * len..(r + 1) * len]);
    }
    Ok(())
}

/// One row, an element at a time (the path without AVX-512, and the tests' reference).
pub fn scalar(op: RowReduce, row: &[f32]) -> f32 {
    match op {
        // From +0, as the portable kernels start (`Iterator::sum` starts from −0).
        RowReduce::Sum => row.iter().fold(0.0, |s, &x| s + x),
        RowReduce::Mean => row.iter().fold(0.0, |s, &x| s + x) / row.len() as f32,
        RowReduce::Max => row.iter().fold(f32::NEG_INFINITY, |m, &x| maximum(m, x)),
    }
}

/// IEEE 754-2019 `maximum` of two values.
fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a == b {
        // ±0: +0 unless both are −0.
        f32::from_bits(a.to_bits() & b.to_bits())
    } else {
        a.max(b)
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{maximum, RowReduce};
    use crate::attention::first_lanes;
    use crate::ieee;

    const LANES: usize = 16;
    const CHAINS: usize = 4;

    /// One row.
    ///
    /// # Safety
    /// AVX-512 F/BW/DQ/VL are present.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn row(op: RowReduce, row: &[f32]) -> f32 {
        let max = op == RowReduce::Max;
        let fill = if max { f32::NEG_INFINITY } else { 0.0 };
        let combine = |a: __m512, b: __m512| {
            if max {
                ieee::maximum(a, b)
            } else {
                _mm512_add_ps(a, b)
            }
        };
        let mut acc = [_mm512_set1_ps(fill); CHAINS];
        let p = row.as_ptr();
        let mut c = 0;
        while c + CHAINS * LANES <= row.len() {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: c + (k + 1)·16 ≤ len: inside the row.
                let x = unsafe { _mm512_loadu_ps(p.add(c + k * LANES)) };
                *a = combine(*a, x);
            }
            c += CHAINS * LANES;
        }
        let mut k = 0;
        while c < row.len() {
            let count = (row.len() - c).min(LANES);
            let lanes = first_lanes(count);
            // SAFETY: lanes c..c + count are inside the row; the others are not read.
            let x = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes, p.add(c)) };
            acc[k] = combine(acc[k], x);
            k = (k + 1) % CHAINS;
            c += count;
        }
        let v = combine(combine(acc[0], acc[1]), combine(acc[2], acc[3]));
        let mut lanes = [0.0f32; LANES];
        // SAFETY: 16 f32 into a 16-element array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
        let folded = if max {
            lanes.iter().fold(f32::NEG_INFINITY, |m, &x| maximum(m, x))
        } else {
            lanes.iter().fold(0.0, |s, &x| s + x)
        };
        match op {
            RowReduce::Mean => folded / row.len() as f32,
            _ => folded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of every length around the vector and chain widths, with NaN, ±0 and −∞ placed.
    #[test]
    fn rows_match_the_elementwise_fold() {
        for len in [0usize, 1, 5, 16, 17, 63, 64, 65, 200, 256] {
            let rows_count = 6;
            let mut src: Vec<f32> = (0..rows_count * len)
                .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0)
                .collect();
            if len > 0 {
                src[len - 1] = f32::NAN; // row 0
                src[len..2 * len].fill(-0.0); // row 1
                src[len + len / 2] = 0.0;
                src[2 * len..3 * len].fill(f32::NEG_INFINITY); // row 2
            }
            for op in [RowReduce::Sum, RowReduce::Mean, RowReduce::Max] {
                let mut out = vec![0.0f32; rows_count];
                rows(op, &src, len, &mut out).expect("whole rows");
                for (r, &got) in out.iter().enumerate() {
                    let row = &src[r * len..(r + 1) * len];
                    let want = scalar(op, row);
                    if want.is_nan() {
                        assert!(got.is_nan(), "{op:?} len {len} row {r}: {got}");
                    } else if op == RowReduce::Max || want.is_infinite() || len == 0 {
                        assert_eq!(got.to_bits(), want.to_bits(), "{op:?} len {len} row {r}");
                    } else {
                        let scale: f32 = row.iter().map(|x| x.abs()).sum::<f32>().max(1.0);
                        assert!(
                            (got - want).abs() <= 1e-6 * scale,
                            "{op:?} len {len} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_source_of_the_wrong_size_is_refused() {
        assert!(rows(RowReduce::Sum, &[1.0; 7], 2, &mut [0.0; 3]).is_err());
        assert!(rows(RowReduce::Max, &[], 0, &mut [0.0; 3]).is_ok());
    }
}
