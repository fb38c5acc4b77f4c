//! The score form and the per-row softmax state shared by both products.
//!
//! A score vector holds one key for 16 query rows (its lanes). Scores are kept in base 2:
//! `x₂ = log₂e · x` with `x = s·scale (+ bias) (+ slope·(j − i'))`, then `cap·tanh(x/cap)`;
//! masked positions are replaced by `−∞`. Each row carries its running maximum `m` (base 2),
//! its sum `l` and its output accumulator, all relative to `2^m`.

use std::arch::x86_64::*;

use super::mask::Mask;
use super::pack::{Data, Lines};
use super::simd::{first, tanh, transpose16, Accurate, Exp2};
use crate::problem::{Bias, Call, CallError, KeyMask, Output};

/// The score transform of one call, hoisted.
pub(crate) struct Form<'a> {
    pub(crate) scale: f32,
    bias: Option<Bias<'a>>,
    slope: Option<f32>,
    cap: Option<f32>,
    mask: Option<Mask>,
    source: Option<&'a KeyMask>,
    accurate: Accurate,
    /// `n − m`: row `i` is aligned to key `i + shift`.
    shift: i64,
    /// Queries.
    pub(crate) m: usize,
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
            shift: n as i64 - m as i64,
            m,
            n,
            plain,
        })
    }

    /// Whether tile runs marked partial need element masks (a call without a mask keeps all).
    pub(crate) fn masked(&self) -> bool {
        self.mask.is_some()
    }

    /// Whether the fused path (`x₂ = s·scale·log₂e`, no mask) serves key tile `j0..j0 + 64`.
    pub(crate) fn plain_tile(&self, j0: usize, partial: bool) -> bool {
        self.plain && !partial && j0 + super::KEY_TILE <= self.n
    }

    /// `x₂` of rows `i₀..i₀+16` (lanes) for key `j` from the scaled scores `x = s·scale`: the
    /// rest of the form, then `−∞` for a key past `n` and, when `partial`, at masked rows.
    ///
    /// # Safety
    /// `i₀ < m`; the call passed `problem::check` (the bias covers every `(i < m, j < n)`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) unsafe fn finish(&self, x: __m512, i0: usize, j: usize, partial: bool) -> __m512 {
        if j >= self.n {
            return _mm512_set1_ps(f32::NEG_INFINITY);
        }
        let rows = first(self.m - i0);
        let mut x = x;
        if let Some(b) = &self.bias {
            let col = j * b.col_stride;
            let add = match b.row_stride {
                0 => _mm512_set1_ps(b.data[col]),
                // SAFETY: the valid lanes are rows < m, inside the bias by `check`.
                1 => unsafe { _mm512_maskz_loadu_ps(rows, b.data.as_ptr().add(i0 + col)) },
                rs => {
                    let mut lanes = [0.0f32; 16];
                    for (l, v) in lanes.iter_mut().enumerate().take(self.m - i0) {
                        *v = b.data[(i0 + l) * rs + col];
                    }
                    // SAFETY: 16 readable f32.
                    unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
                }
            };
            x = _mm512_add_ps(x, add);
        }
        if let Some(slope) = self.slope {
            // j − i' for the 16 lanes; |j − i'| < 2^30 by the size check.
            let base = (j as i64 - i0 as i64 - self.shift) as i32;
            let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            let diff = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(base), lanes));
            x = _mm512_fmadd_ps(_mm512_set1_ps(slope), diff, x);
        }
        if let Some(cap) = self.cap {
            let t = tanh(_mm512_div_ps(x, _mm512_set1_ps(cap)), &self.accurate);
            x = _mm512_mul_ps(_mm512_set1_ps(cap), t);
        }
        let x = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        match (&self.mask, partial) {
            (Some(mask), true) => {
                let keep = mask.keeps(i0 as i128 + self.shift as i128, j as i128);
                _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), keep, x)
            }
            _ => x,
        }
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

/// The running state of one query tile's 32 rows.
pub(crate) struct RowState {
    /// Running maximum (base 2), `−∞` before any kept score.
    pub(crate) max: [f32; 32],
    /// Sum of the weights relative to `2^max`.
    pub(crate) sum: [f32; 32],
}

impl RowState {
    pub(crate) fn new() -> RowState {
        RowState {
            max: [f32::NEG_INFINITY; 32],
            sum: [0.0; 32],
        }
    }

    /// The 16 maxima of row group `rg`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn max_v(&self, rg: usize) -> __m512 {
        // SAFETY: 16 f32 of the 32.
        unsafe { _mm512_loadu_ps(self.max.as_ptr().add(16 * rg)) }
    }

    /// The 16 sums of row group `rg`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn sum_v(&self, rg: usize) -> __m512 {
        // SAFETY: 16 f32 of the 32.
        unsafe { _mm512_loadu_ps(self.sum.as_ptr().add(16 * rg)) }
    }

    /// Sets the maxima and sums of row group `rg`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn set(&mut self, rg: usize, max: __m512, sum: __m512) {
        // SAFETY: 16 f32 of the 32, each.
        unsafe {
            _mm512_storeu_ps(self.max.as_mut_ptr().add(16 * rg), max);
            _mm512_storeu_ps(self.sum.as_mut_ptr().add(16 * rg), sum);
        }
    }
}

/// Writes rows `i₀ + l` (`l < count`, lanes of row group `rg`) to `out` at output row
/// `at + l`: `O / l` from the transposed accumulator `ot` (`dv_pad` vectors of 16 rows) and
/// `lse = ln 2 · (m + log₂ l)`; zeros and `−∞` for a row that kept nothing.
///
/// # Safety
/// `ot` holds `dv_pad ≥ dv` (a multiple of 16) vectors; output rows `at..at + count` exist
/// (`problem::check`).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn finalize(
    ot: *const f32,
    dv: usize,
    st: &RowState,
    rg: usize,
    count: usize,
    at: usize,
    out: &mut Output<'_>,
) {
    let sum = st.sum_v(rg);
    let max = st.max_v(rg);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(sum, sum);
    let empty = (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(sum, _mm512_setzero_ps())
        | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(max, _mm512_set1_ps(f32::NEG_INFINITY)))
        & !nan;
    let inv = _mm512_maskz_div_ps(!empty, _mm512_set1_ps(1.0), sum);
    for g in 0..dv.div_ceil(16) {
        let mut block = [_mm512_setzero_ps(); 16];
        for (c, v) in block.iter_mut().enumerate() {
            // SAFETY: vector 16g + c < dv_pad of `ot`.
            *v = _mm512_mul_ps(unsafe { _mm512_loadu_ps(ot.add((16 * g + c) * 16)) }, inv);
        }
        transpose16(&mut block);
        let cols = first(dv - 16 * g);
        for (l, v) in block.iter().enumerate().take(count) {
            let dst = &mut out.o[(at + l) * out.row_stride + 16 * g..];
            // SAFETY: row at + l holds dv values from column 0; lanes past dv are masked.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), cols, *v) };
        }
    }
    if let Some(lse) = out.lse.as_deref_mut() {
        for l in 0..count {
            let (s, m) = (st.sum[16 * rg + l], st.max[16 * rg + l]);
            lse[at + l] = if empty >> l & 1 == 1 {
                f32::NEG_INFINITY
            } else {
                ((m as f64) * std::f64::consts::LN_2 + (s as f64).ln()) as f32
            };
        }
    }
}

/// Adds V's non-finite values of key tile `kt` to the rows `r0..r0 + valid` that keep their
/// key, in the transposed accumulator `o` (`[row group][dv_pad][16]` f32), after that tile's
/// products were added.
#[allow(clippy::too_many_arguments)]
pub(crate) fn poison(
    form: &Form<'_>,
    data: &Data,
    o: &mut Lines,
    dv_pad: usize,
    kt: usize,
    partial: bool,
    r0: usize,
    valid: usize,
) {
    for &(j, c, v) in data.bad_v.of_tile(kt) {
        for r in 0..valid {
            if form.keeps(r0 + r, j, partial) {
                let at = ((r / 16) * dv_pad + c) * 16 + r % 16;
                // SAFETY: row group r / 16 < 2, column c < dv ≤ dv_pad, lane r % 16: inside o,
                // which holds 2·dv_pad·16 f32.
                unsafe { *o.ptr_mut().cast::<f32>().add(at) += v };
            }
        }
    }
}
