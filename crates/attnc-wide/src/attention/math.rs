//! `exp2` and `tanh` on 16 f32 lanes.
//!
//! Both keep NaN (a NaN lane stays NaN) and need no lookup table. `exp2` serves the softmax,
//! where its argument is `s − max ≤ 0`: arguments below −127 give exactly 0 (no denormal is
//! produced there), so masked scores (−∞) weigh nothing. `tanh` serves the softcap.

use std::arch::x86_64::*;

/// `1.5·2²³ + 127`: adding it rounds a value in `[−127, 128)` to an integer `k` held in the
/// low mantissa bits as `k + 127`, the biased exponent of `2ᵏ`.
const EXP2_MAGIC: f32 = 12_582_912.0 + 127.0;

/// `2ᶠ` on `[−½, ½]`, degree 5, relative minimax error 7.5e-8 (fitted by Remez exchange on
/// the relative error; c0 is not 1 because a constant relative error cancels in softmax).
const EXP2_POLY: [f32; 6] = [
    1.000_000_1,
    0.693_146_97,
    0.240_221_2,
    0.055_507_133,
    0.009_675_541,
    0.001_327_647_2,
];

/// `tanh(y)/y` as a polynomial in `y²` on `|y| ≤ 0.55`, relative minimax error 3.2e-8.
const TANH_POLY: [f32; 5] = [
    0.999_999_97,
    -0.333_327_95,
    0.133_188_77,
    -0.052_589_32,
    0.016_315_444,
];

/// Below this magnitude `tanh` takes its polynomial; above, `1 − 2/(e^{2|y|} + 1)`.
const TANH_SMALL: f32 = 0.55;

/// `tanh(10)` rounds to 1 in f32; larger magnitudes are clamped there so `e^{2|y|}` stays finite.
const TANH_CLAMP: f32 = 10.0;

/// `2ᵗ` per lane for `t < 128`: 0 below −127, NaN for NaN; relative error ≤ 2.5e-7.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn exp2(t: __m512) -> __m512 {
    // `max` returns its second operand when either is NaN: the NaN lane survives the clamp.
    let t = _mm512_max_ps(_mm512_set1_ps(-127.0), t);
    let y = _mm512_add_ps(t, _mm512_set1_ps(EXP2_MAGIC));
    let k = _mm512_sub_ps(y, _mm512_set1_ps(EXP2_MAGIC));
    let f = _mm512_sub_ps(t, k);
    let mut p = _mm512_set1_ps(EXP2_POLY[5]);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[4]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[3]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[0]));
    // The bits of y are those of 1.5·2²³ plus k + 127; shifting by 23 leaves exactly
    // (k + 127) << 23, the bits of 2ᵏ (0.0 for k = −127).
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(y)));
    _mm512_mul_ps(p, scale)
}

/// The largest integer maximum [`exp2_below`] takes (beyond it, `EXP2_MAGIC − max` would
/// leave the binade whose spacing is 1).
pub(super) const EXP2_BELOW_LIMIT: f32 = 2_097_152.0; // 2²¹

/// The per-row constants of [`exp2_below`] for an integer maximum `max` (`|max| ≤ 2²¹`, or
/// ±∞/NaN) and an integer `offset` in `0..=64`: `(max − 127, EXP2_MAGIC − (max − offset))`,
/// both exact.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn exp2_below_constants(max: __m512, offset: __m512) -> (__m512, __m512) {
    (
        _mm512_sub_ps(max, _mm512_set1_ps(127.0)),
        _mm512_sub_ps(_mm512_set1_ps(EXP2_MAGIC), _mm512_sub_ps(max, offset)),
    )
}

/// `2^(s − max + offset)` for an integer `max ≥ s` given its [`exp2_below_constants`]
/// `(cut, magic)`: the same values as `exp2(s − max + offset)` up to rounding, one operation
/// fewer, because with an integer `max` the magic constant absorbs the subtraction exactly
/// (`s + (M − max + offset)` rounds `s − max + offset` to an integer in one step, and
/// `s − round(s)` is exact by Sterbenz' lemma). Exactly 0 when `s − max < −127` (masked
/// scores: −∞), whatever the offset, so with an offset no weight is subnormal; NaN for NaN in
/// `s` or `max`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn exp2_below(s: __m512, cut: __m512, magic: __m512) -> __m512 {
    // `not less than` holds for NaN: a NaN score survives. Lanes below the cut compute
    // garbage that the masked product discards.
    let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(s, cut);
    let y = _mm512_add_ps(s, magic);
    let k = _mm512_sub_ps(y, magic);
    let f = _mm512_sub_ps(s, k);
    let mut p = _mm512_set1_ps(EXP2_POLY[5]);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[4]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[3]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[0]));
    // y holds round(s − max + offset) + 127 in its low mantissa bits, as in `exp2`.
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(y)));
    _mm512_maskz_mul_ps(kept, p, scale)
}

/// `tanh(y)` per lane, relative error about 1.5e-7; ±1 for ±∞, NaN for NaN.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn tanh(y: __m512) -> __m512 {
    let a = _mm512_abs_ps(y);
    // Small |y|: y·P(y²), no cancellation.
    let z = _mm512_mul_ps(y, y);
    let mut p = _mm512_set1_ps(TANH_POLY[4]);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(TANH_POLY[3]));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(TANH_POLY[2]));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(TANH_POLY[1]));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(TANH_POLY[0]));
    let small = _mm512_mul_ps(p, y);
    // Large |y|: 1 − 2/(e + 1) with e = e^{2|y|} = 2^{2|y|·log2 e}; NaN survives `min`.
    let clamped = _mm512_min_ps(_mm512_set1_ps(TANH_CLAMP), a);
    let e = exp2(_mm512_mul_ps(
        clamped,
        _mm512_set1_ps(2.0 * std::f32::consts::LOG2_E),
    ));
    let den = _mm512_add_ps(e, _mm512_set1_ps(1.0));
    let r0 = _mm512_rcp14_ps(den);
    // One Newton step: r = r0·(2 − den·r0), relative error ~2⁻²⁸.
    let r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, _mm512_set1_ps(2.0)));
    let large = _mm512_fnmadd_ps(_mm512_set1_ps(2.0), r, _mm512_set1_ps(1.0));
    let sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN));
    let large = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(large), sign));
    let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(TANH_SMALL));
    _mm512_mask_blend_ps(is_small, large, small)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    fn lanes(f: impl Fn(__m512) -> __m512, x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0.0f32; 16];
        // SAFETY: the caller checked AVX-512; both arrays hold 16 f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), f(_mm512_loadu_ps(x.as_ptr()))) };
        out
    }

    #[test]
    fn exp2_is_accurate_and_keeps_specials() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut worst = 0.0f64;
        for step in 0..200_000 {
            let t = -126.0 + 127.0 * step as f64 / 200_000.0;
            let mut x = [t as f32; 16];
            x[1] = (t * 0.001) as f32;
            // SAFETY: AVX-512 was detected above.
            let y = lanes(|v| unsafe { exp2(v) }, &x);
            for l in 0..2 {
                let want = (x[l] as f64).exp2();
                worst = worst.max(((y[l] as f64) - want).abs() / want);
            }
        }
        assert!(worst < 2.5e-7, "exp2 relative error {worst:e}");
        let mut x = [0.0f32; 16];
        x[0] = f32::NEG_INFINITY;
        x[1] = f32::NAN;
        x[2] = -127.0;
        x[3] = -1e30;
        x[4] = 20.0;
        // SAFETY: AVX-512 was detected above.
        let y = lanes(|v| unsafe { exp2(v) }, &x);
        assert_eq!(y[0], 0.0);
        assert!(y[1].is_nan());
        assert_eq!(y[2], 0.0);
        assert_eq!(y[3], 0.0);
        assert!((y[4] as f64 / 1048576.0 - 1.0).abs() < 2.5e-7);
        eprintln!("exp2 worst relative error {worst:e}");
    }

    #[test]
    fn exp2_below_agrees_with_exp2() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut worst = 0.0f64;
        for offset in [0.0f32, 1.0, 64.0] {
            for max in [0.0f32, 1.0, -3.0, 117.0, -2_000_000.0, EXP2_BELOW_LIMIT] {
                for step in 0..20_000 {
                    let mut x = [0.0f32; 16];
                    for (l, v) in x.iter_mut().enumerate() {
                        *v = max
                            - (step * 16 + l) as f32
                                * (130.0 / 320_000.0)
                                * (1.0 + max.abs() / 1e6);
                    }
                    let mut got = [0.0f32; 16];
                    // SAFETY: AVX-512 was detected above; both arrays hold 16 f32.
                    unsafe {
                        let (cut, magic) =
                            exp2_below_constants(_mm512_set1_ps(max), _mm512_set1_ps(offset));
                        let p = exp2_below(_mm512_loadu_ps(x.as_ptr()), cut, magic);
                        _mm512_storeu_ps(got.as_mut_ptr(), p);
                    }
                    for l in 0..16 {
                        let t = x[l] as f64 - max as f64;
                        let want = (t + offset as f64).exp2();
                        if t < -127.0 {
                            assert_eq!(got[l], 0.0, "at t {t}, offset {offset}");
                        } else if t + (offset as f64) < -126.0 {
                            // Without an offset, 2^k·p for k = −127 is 0: off by < 2⁻¹²⁶.
                            assert!((got[l] as f64 - want).abs() < 2f64.powi(-126));
                        } else {
                            assert!(got[l] >= f32::MIN_POSITIVE, "{} at t {t}", got[l]);
                            worst = worst.max((got[l] as f64 - want).abs() / want);
                        }
                    }
                }
            }
        }
        assert!(worst < 2.5e-7, "relative error {worst:e}");
        let mut x = [0.0f32; 16];
        x[0] = f32::NEG_INFINITY;
        x[1] = f32::NAN;
        x[3] = -1e30;
        let mut got = [0.0f32; 16];
        // SAFETY: AVX-512 was detected above.
        unsafe {
            let (cut, magic) = exp2_below_constants(_mm512_set1_ps(3.0), _mm512_set1_ps(64.0));
            _mm512_storeu_ps(
                got.as_mut_ptr(),
                exp2_below(_mm512_loadu_ps(x.as_ptr()), cut, magic),
            );
        }
        assert_eq!(got[0], 0.0);
        assert!(got[1].is_nan());
        assert!((got[2] as f64 - 2f64.powi(61)).abs() < 2.5e-7 * 2f64.powi(61));
        assert_eq!(got[3], 0.0);
    }

    #[test]
    fn tanh_is_accurate_and_keeps_specials() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut worst = 0.0f64;
        for step in 0..200_000 {
            let t = -12.0 + 24.0 * step as f64 / 200_000.0;
            let mut x = [t as f32; 16];
            x[1] = (t * 1e-3) as f32;
            x[2] = (t * 1e-6) as f32;
            // SAFETY: AVX-512 was detected above.
            let y = lanes(|v| unsafe { tanh(v) }, &x);
            for l in 0..3 {
                let want = (x[l] as f64).tanh();
                if want != 0.0 {
                    worst = worst.max(((y[l] as f64) - want).abs() / want.abs());
                }
            }
        }
        assert!(worst < 3e-7, "tanh relative error {worst:e}");
        let mut x = [0.0f32; 16];
        x[0] = f32::INFINITY;
        x[1] = f32::NEG_INFINITY;
        x[2] = f32::NAN;
        x[3] = -0.0;
        // SAFETY: AVX-512 was detected above.
        let y = lanes(|v| unsafe { tanh(v) }, &x);
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1], -1.0);
        assert!(y[2].is_nan());
        assert_eq!(y[3].to_bits(), (-0.0f32).to_bits());
        eprintln!("tanh worst relative error {worst:e}");
    }
}
