//! Feature maps of linear attention on 16 f32 lanes, applied to a block of features just
//! before the products read it: `elu(x) + 1`, the map of `examples/linear.attn`, which the
//! 128-bit portable code evaluates through `expm1` four lanes at a time, and any other map
//! written as a [`program::Program`].
//!
//! `elu(x) + 1` is `x + 1` for `x > 0` and `eˣ` otherwise (the same value as `eˣ − 1 + 1`
//! without its rounding near 0). A NaN lane stays NaN; `−∞` gives 0.

use crate::problem::CallError;

pub mod program;

#[cfg(target_arch = "x86_64")]
pub(crate) use wide::{exp_lanes, expm1_lanes};

/// `dst[i] = elu(src[i]) + 1` for every element; errors before writing when the lengths
/// differ.
pub fn elu_plus_one(src: &[f32], dst: &mut [f32]) -> Result<(), CallError> {
    if src.len() != dst.len() {
        return Err(CallError::Shape(format!(
            "{} features into {} elements",
            src.len(),
            dst.len()
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::Features::detect().avx512 {
        // SAFETY: the CPU has AVX-512 F/BW/DQ/VL (detected above); the slices have one
        // length (checked above).
        unsafe { wide::elu_plus_one(src, dst) };
        return Ok(());
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = scalar(x);
    }
    Ok(())
}

/// `elu(x) + 1` of one value (the reference, and the path without AVX-512).
pub fn scalar(x: f32) -> f32 {
    if x > 0.0 {
        x + 1.0
    } else {
        x.exp()
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use crate::attention::first_lanes;

    /// `ln 2` split so that `k · LN2_HI` is exact for the `|k| ≤ 151` used here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;

    /// Below this, `eˣ` is 0 in f32 (after the smallest subnormal); clamping keeps `−∞`
    /// out of the reduction.
    const LOW: f32 = -104.0;

    /// Above this, `eˣ` is `∞` in f32; clamping keeps `+∞` out of the reduction.
    const HIGH: f32 = 100.0;

    /// `eʳ` on `|r| ≤ ln2 / 2` by its Taylor polynomial of degree 6 (relative error ≤ 1.3e-7),
    /// highest power first.
    const EXP_POLY: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];

    /// The polynomial with `coefficients` (highest power first, at least one) at `x`, by
    /// Horner's rule with one FMA per coefficient.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    fn horner(coefficients: &[f32], x: __m512) -> __m512 {
        let mut p = _mm512_set1_ps(coefficients[0]);
        for &c in &coefficients[1..] {
            p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c));
        }
        p
    }

    /// `eˣ` on 16 lanes: 0 below the subnormals, `∞` above the range, NaN for NaN.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    pub(crate) fn exp_lanes(x: __m512) -> __m512 {
        // `max` and `min` return their second operand when either is NaN: a NaN lane
        // survives both clamps.
        let xc = _mm512_min_ps(_mm512_set1_ps(HIGH), _mm512_max_ps(_mm512_set1_ps(LOW), x));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
        let p = horner(&EXP_POLY, r);
        // p · 2ᵏ, with the underflow to subnormals and 0 and the overflow to ∞ done by the
        // instruction.
        _mm512_scalef_ps(p, k)
    }

    /// `eˣ − 1` on `|x| ≤ EXPM1_SMALL` by its Taylor polynomial of degree 8 (relative error
    /// ≤ 1e-8 there), highest power first, without the constant term.
    const EXPM1_POLY: [f32; 8] = [
        1.0 / 40320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
    ];

    /// Below this magnitude `eˣ − 1` takes its polynomial (`eˣ` minus 1 would cancel);
    /// above, `eˣ ≤ e^−0.35` or `≥ e^0.35` leaves the subtraction at most 2 ulp off.
    const EXPM1_SMALL: f32 = 0.35;

    /// `eˣ − 1` on 16 lanes: accurate near 0, `−1` below the range, `∞` above, NaN for NaN.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    pub(crate) fn expm1_lanes(x: __m512) -> __m512 {
        let small = _mm512_mul_ps(horner(&EXPM1_POLY, x), x);
        let large = _mm512_sub_ps(exp_lanes(x), _mm512_set1_ps(1.0));
        let near = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(
            _mm512_andnot_ps(_mm512_set1_ps(-0.0), x),
            _mm512_set1_ps(EXPM1_SMALL),
        );
        _mm512_mask_mov_ps(large, near, small)
    }

    /// `elu(x) + 1` on 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    fn lanes(x: __m512) -> __m512 {
        let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
        _mm512_mask_add_ps(exp_lanes(x), positive, x, _mm512_set1_ps(1.0))
    }

    /// [`super::elu_plus_one`] on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, DQ and VL, and `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn elu_plus_one(src: &[f32], dst: &mut [f32]) {
        let len = src.len().min(dst.len());
        let mut i = 0;
        while i < len {
            let count = (len - i).min(16);
            let mask = first_lanes(count);
            // SAFETY: lanes i..i + count of both slices exist (count ≤ len − i); the masked
            // load and store touch no other lane.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, lanes(x));
            }
            i += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_f64_map_and_keeps_specials() {
        let mut src: Vec<f32> = (-2000..2000).map(|i| i as f32 / 37.0).collect();
        src.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            -87.5,
            -103.9,
            -110.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
        ]);
        // An odd length: the last vector is partial.
        src.push(-0.3);
        let mut dst = vec![0.0f32; src.len()];
        elu_plus_one(&src, &mut dst).expect("same lengths");
        for (&x, &y) in src.iter().zip(&dst) {
            if x.is_nan() {
                assert!(y.is_nan(), "{x}: {y}");
            } else if x > 0.0 {
                assert_eq!(y, x + 1.0, "{x}");
            } else {
                let want = f64::from(x).exp();
                let err = (f64::from(y) - want).abs();
                assert!(err <= 3e-7 * want + 1e-44, "{x}: {y} vs {want}");
            }
        }
    }

    #[test]
    fn lengths_must_agree() {
        assert!(elu_plus_one(&[1.0, 2.0], &mut [0.0]).is_err());
        assert!(elu_plus_one(&[], &mut []).is_ok());
    }
}
