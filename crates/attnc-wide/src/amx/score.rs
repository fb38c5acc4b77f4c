//! The score form and the per-row softmax state shared by both products.
//!
//! Scores are kept in base 2: `x₂ = log₂e · x` with `x = s·scale (+ bias) (+ slope·(j − i'))`,
//! then `cap·tanh(x/cap)`; masked positions are replaced by `−∞`. Each row carries its running
//! maximum `m` (base 2), a 16-lane vector of partial sums `l` and its output accumulator `O`,
//! all relative to `2^m`.

use std::arch::x86_64::*;

use super::mask::Mask;
use super::simd::{first, hsum, tanh, Exp2};
use crate::problem::{Bias, Call, CallError, KeyMask, Output};

/// The score transform of one call, hoisted.
pub(crate) struct Form<'a> {
    pub(crate) scale: f32,
    bias: Option<Bias<'a>>,
    slope: Option<f32>,
    cap: Option<f32>,
    mask: Option<Mask>,
    source: Option<&'a KeyMask>,
    accurate: Exp2,
    m: usize,
    /// `n − m`: row `i` is aligned to key `i + shift`.
    shift: i64,
    /// Keys.
    pub(crate) n: usize,
    /// `x = s·scale` alone with `scale > 0`: full tiles take the fused path.
    pub(crate) plain: bool,
}

impl<'a> Form<'a> {
    /// The form of `call` (masks compiled; the caller checked the call).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn new(call: &Call<'a>) -> Result<Form<'a>, CallError> {
        let (m, n) = (call.m(), call.n());
        // Lane arithmetic on key and row indices is in i32.
        if m.checked_add(n).is_none_or(|s| s >= 1 << 30) {
            return Err(CallError::Shape(format!(
                "{m} queries and {n} keys exceed the AMX kernels' 2^30 positions"
            )));
        }
        let s = &call.score;
        let plain = s.bias.is_none()
            && s.alibi_slope.is_none()
            && s.softcap.is_none()
            && s.scale > 0.0
            && s.scale.is_finite();
        Ok(Form {
            scale: s.scale,
            bias: s.bias,
            slope: s.alibi_slope,
            cap: s.softcap,
            mask: call.mask.map(Mask::compile).transpose()?,
            source: call.mask,
            accurate: Exp2::accurate(),
            m,
            shift: n as i64 - m as i64,
            n,
            plain,
        })
    }

    /// Whether tile runs marked partial need element masks (a call without a mask keeps all).
    pub(crate) fn masked(&self) -> bool {
        self.mask.is_some()
    }

    /// `x₂` of row `i`, keys `j₀..j₀+16` from the scaled scores `x = s·scale`: the rest of the
    /// form, then `−∞` at keys past `n` and, when `partial`, at masked keys.
    ///
    /// # Safety
    /// `i < m` and the call passed `problem::check` (the bias covers every `(i, j < n)`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) unsafe fn finish(&self, x: __m512, i: usize, j0: usize, partial: bool) -> __m512 {
        let valid = first(self.n.saturating_sub(j0));
        if valid == 0 {
            return _mm512_set1_ps(f32::NEG_INFINITY);
        }
        let mut x = x;
        if let Some(b) = &self.bias {
            let row = i * b.row_stride;
            let add = match b.col_stride {
                // SAFETY: the valid lanes are keys < n, inside the bias by `check`.
                1 => unsafe { _mm512_maskz_loadu_ps(valid, b.data.as_ptr().add(row + j0)) },
                0 => _mm512_set1_ps(b.data[row]),
                cs => {
                    let mut lanes = [0.0f32; 16];
                    for (l, v) in lanes.iter_mut().enumerate() {
                        if valid >> l & 1 == 1 {
                            *v = b.data[row + (j0 + l) * cs];
                        }
                    }
                    // SAFETY: 16 readable f32.
                    unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
                }
            };
            x = _mm512_add_ps(x, add);
        }
        if let Some(slope) = self.slope {
            // j − i' for the 16 lanes; |j − i'| < 2^30 by the size check.
            let base = (j0 as i64 - i as i64 - self.shift) as i32;
            let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            let diff = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(base)));
            x = _mm512_fmadd_ps(_mm512_set1_ps(slope), diff, x);
        }
        if let Some(cap) = self.cap {
            let t = tanh(_mm512_div_ps(x, _mm512_set1_ps(cap)), &self.accurate);
            x = _mm512_mul_ps(_mm512_set1_ps(cap), t);
        }
        let x = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let keep = match (&self.mask, partial) {
            (Some(mask), true) => valid & mask.keeps(i as i128 + self.shift as i128, j0 as i128),
            _ => valid,
        };
        _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), keep, x)
    }

    /// Whether row `i` keeps key `j < n` on a tile run marked `partial` (the reference
    /// predicate: a rare path, for non-finite V values).
    pub(crate) fn keeps(&self, i: usize, j: usize, partial: bool) -> bool {
        match (self.source, partial) {
            (Some(mask), true) => mask.keeps(i, j, self.m, self.n),
            _ => true,
        }
    }
}

/// The running state of one query tile's rows.
pub(crate) struct RowState {
    /// Running maximum of each row (base 2), `−∞` before any kept score.
    pub(crate) max: [f32; 32],
}

impl RowState {
    pub(crate) fn new() -> RowState {
        RowState {
            max: [f32::NEG_INFINITY; 32],
        }
    }
}

/// Writes row `r` (of the tile starting at query row `r0`) to `out`: `O / l` and
/// `lse = ln 2 · (m + log₂ l)`; zeros and `−∞` for a row that kept nothing.
///
/// # Safety
/// `o` holds `dv` f32, `l` 16 f32; `r0 + r − rows_start` indexes a row of `out`, which passed
/// `problem::check`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn finalize_row(
    o: *const f32,
    l: *const f32,
    max: f32,
    dv: usize,
    at: usize,
    out: &mut Output<'_>,
) {
    // SAFETY: 16 readable f32 by the caller.
    let sum = hsum(unsafe { _mm512_loadu_ps(l) });
    let empty = (sum == 0.0 || max == f32::NEG_INFINITY) && !sum.is_nan();
    let inv = _mm512_set1_ps(1.0 / sum);
    let dst = &mut out.o[at * out.row_stride..][..dv];
    for c in (0..dv).step_by(16) {
        let k = first(dv - c);
        let v = if empty {
            _mm512_setzero_ps()
        } else {
            // SAFETY: columns c..c + 16 masked to dv inside `o`.
            _mm512_mul_ps(unsafe { _mm512_maskz_loadu_ps(k, o.add(c)) }, inv)
        };
        // SAFETY: `dst` holds dv values; lanes past dv are masked off.
        unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().add(c), k, v) };
    }
    if let Some(lse) = out.lse.as_deref_mut() {
        lse[at] = if empty {
            f32::NEG_INFINITY
        } else {
            ((max as f64) * std::f64::consts::LN_2 + (sum as f64).ln()) as f32
        };
    }
}
