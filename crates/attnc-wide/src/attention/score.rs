//! The score form in base-2 units.
//!
//! The kernels exponentiate with `exp2`, so every score is kept multiplied by `log2 e`: the
//! scale folds into Q when Q is packed (`q·scale·log2 e`), the bias is multiplied on the way in
//! (`fma(bias, log2 e, x)`), the ALiBi slope and the softcap are rescaled once
//! (`cap·tanh(x/cap)·log2 e = cap₂·tanh(x₂/cap₂)` with `cap₂ = cap·log2 e`). The maximum and the
//! log-sum-exp follow in base 2 (`lse = ln 2 · (max₂ + log2 l)`).

use std::arch::x86_64::*;

use super::math::tanh;
use crate::problem::{Bias, Score};

/// `log2 e` in f32.
pub(super) const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// The ALiBi distances `j − r` of 16 lanes, `r` the row's origin
/// ([`Call::alibi_origin`](crate::problem::Call::alibi_origin)).
#[derive(Clone, Copy)]
pub(super) enum Distances {
    /// Lane `l` at `start + l·step` (one row's keys in the lanes: step 1).
    Along { start: i64, step: i64 },
    /// Each lane's own (rows in the lanes).
    Lanes(__m512),
}

/// One call's score form, ready for the kernels.
#[derive(Clone, Copy, Debug)]
pub(super) struct ScoreForm<'a> {
    /// Multiplies Q on packing: `scale · log2 e`.
    pub(super) q_scale: f32,
    /// The bias tensor (natural units).
    bias: Option<Bias<'a>>,
    /// `slope · log2 e`.
    slope: Option<f32>,
    /// `(cap₂, 1/cap₂)` with `cap₂ = cap · log2 e`.
    cap: Option<(f32, f32)>,
}

impl<'a> ScoreForm<'a> {
    pub(super) fn new(score: &Score<'a>) -> ScoreForm<'a> {
        ScoreForm {
            q_scale: score.scale * LOG2_E,
            bias: score.bias,
            slope: score.alibi_slope.map(|s| s * LOG2_E),
            cap: score.softcap.map(|c| (c * LOG2_E, 1.0 / (c * LOG2_E))),
        }
    }

    /// Whether anything beyond `s · scale` applies.
    pub(super) fn has_options(&self) -> bool {
        self.bias.is_some() || self.slope.is_some() || self.cap.is_some()
    }

    /// The bias strides `(between rows, between keys)`, zeros without a bias.
    pub(super) fn bias_strides(&self) -> (usize, usize) {
        self.bias.map_or((0, 0), |b| (b.row_stride, b.col_stride))
    }

    /// Bias, ALiBi and softcap on 16 raw scores `x` (base 2) of one row or one key.
    ///
    /// Lane `l` reads bias element `bias_at + l · bias_step` and lies at ALiBi distance
    /// `distances` gives it; only lanes of `valid` read the bias.
    ///
    /// # Safety
    /// AVX-512 is present and the bias elements of the `valid` lanes lie inside the bias.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    pub(super) unsafe fn apply(
        &self,
        mut x: __m512,
        bias_at: usize,
        bias_step: usize,
        valid: __mmask16,
        distances: Distances,
    ) -> __m512 {
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        if let Some(bias) = self.bias {
            // SAFETY: the caller guarantees the elements of the valid lanes.
            let b = unsafe { strided(bias.data, bias_at, bias_step, valid, iota) };
            x = _mm512_fmadd_ps(b, _mm512_set1_ps(LOG2_E), x);
        }
        if let Some(slope) = self.slope {
            let dist = match distances {
                Distances::Lanes(d) => d,
                Distances::Along { start, step } if start.unsigned_abs() < 1 << 30 => {
                    let step = _mm512_mullo_epi32(iota, _mm512_set1_epi32(step as i32));
                    _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_set1_epi32(start as i32), step))
                }
                Distances::Along { start, step } => {
                    let step = _mm512_mul_ps(_mm512_cvtepi32_ps(iota), _mm512_set1_ps(step as f32));
                    _mm512_add_ps(_mm512_set1_ps(start as f32), step)
                }
            };
            x = _mm512_fmadd_ps(_mm512_set1_ps(slope), dist, x);
        }
        if let Some((cap, inv)) = self.cap {
            x = _mm512_mul_ps(
                _mm512_set1_ps(cap),
                tanh(_mm512_mul_ps(x, _mm512_set1_ps(inv))),
            );
        }
        x
    }
}

/// `data[at + l·step]` for the lanes of `valid`, 0 elsewhere.
///
/// # Safety
/// AVX-512 is present and the elements of the valid lanes lie inside `data`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn strided(data: &[f32], at: usize, step: usize, valid: __mmask16, iota: __m512i) -> __m512 {
    if valid == 0 {
        return _mm512_setzero_ps();
    }
    let base = data.as_ptr().wrapping_add(at);
    match step {
        // SAFETY: a valid lane exists and reads element `at`.
        0 => _mm512_set1_ps(unsafe { *base }),
        // SAFETY: only valid lanes load, each inside `data`.
        1 => unsafe { _mm512_maskz_loadu_ps(valid, base) },
        s if s <= (i32::MAX / 16) as usize => {
            let index = _mm512_mullo_epi32(iota, _mm512_set1_epi32(s as i32));
            // SAFETY: only valid lanes gather, each inside `data`; offsets fit i32.
            unsafe { _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), valid, index, base) }
        }
        s => {
            let mut lanes = [0.0f32; 16];
            for (l, v) in lanes.iter_mut().enumerate() {
                if valid >> l & 1 == 1 {
                    *v = data[at + l * s];
                }
            }
            // SAFETY: `lanes` holds 16 f32.
            unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
        }
    }
}
