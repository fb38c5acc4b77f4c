//! AVX-512 helpers of the AMX kernels: operand loads in every storage type, bf16 rounding and
//! splitting, `2^t` by polynomial, `tanh`, horizontal reductions.
//!
//! Every function is compiled for AVX-512 F/BW/DQ/VL (the bf16 ones also for AVX-512 BF16) and
//! only reached from kernels behind [`super::available`].

use std::arch::x86_64::*;

use crate::problem::Elements;

/// `2^t` on 16 lanes by a polynomial of degree `D` in `t − ⌊t⌋` scaled by `2^⌊t⌋`
/// (`vreduceps`, `vscalefps`), times a constant folded into the coefficients. `−∞ ↦ 0`,
/// `+∞ ↦ +∞`, NaN ↦ NaN.
#[derive(Clone, Copy)]
pub(crate) struct Exp2<const D: usize> {
    c: [__m512; 6],
}

// Fitted coefficients, printed to more digits than f32 keeps.
#[allow(clippy::excessive_precision)]
/// Minimax coefficients of `2^f` on `[0, 1)` with `p(0) = 1` (so a row's maximum weighs
/// exactly 1), relative error 8.6e-5: plenty for weights that are then rounded to bf16 (2⁻⁹) or
/// u8.
const EXP2_DEGREE3: [f32; 4] = [1.0, 0.695116786, 0.227644991, 0.077067042];
#[allow(clippy::excessive_precision)]
/// Degree 5 with `p(0) = 1`, relative error 8.3e-8 (about one f32 ulp): for score transforms
/// and rescales.
const EXP2_DEGREE5: [f32; 6] = [
    1.0,
    0.693151312,
    0.24016445,
    0.0557999131,
    0.00901703032,
    0.00186713007,
];

/// `factor · 2^t` for weights (degree 3).
pub(crate) type Weights = Exp2<3>;
/// `2^t` to about one ulp (degree 5).
pub(crate) type Accurate = Exp2<5>;

impl Exp2<3> {
    /// `factor · 2^t` with the degree-3 polynomial.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn weights(factor: f32) -> Exp2<3> {
        let mut c = [_mm512_setzero_ps(); 6];
        for (i, k) in EXP2_DEGREE3.iter().enumerate() {
            c[i] = _mm512_set1_ps(k * factor);
        }
        Exp2 { c }
    }
}

impl Exp2<5> {
    /// `2^t` with the degree-5 polynomial.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn accurate() -> Exp2<5> {
        let mut c = [_mm512_setzero_ps(); 6];
        for (i, k) in EXP2_DEGREE5.iter().enumerate() {
            c[i] = _mm512_set1_ps(*k);
        }
        Exp2 { c }
    }
}

impl<const D: usize> Exp2<D> {
    /// `factor · 2^t`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn eval(&self, t: __m512) -> __m512 {
        // f = t − ⌊t⌋ ∈ [0, 1) (0 for ±∞, NaN for NaN).
        let f = _mm512_reduce_ps::<0x01>(t);
        let mut p = self.c[D];
        for k in (0..D).rev() {
            p = _mm512_fmadd_ps(p, f, self.c[k]);
        }
        // p · 2^⌊t⌋, exact (0 below the subnormals, ∞ above the range).
        _mm512_scalef_ps(p, t)
    }
}

/// `tanh(x)` as `1 − 2 / (e^{2x} + 1)`: absolute error about 1e-7, ±1 in the tails, NaN kept.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn tanh(x: __m512, exp2: &Accurate) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let e = exp2.eval(_mm512_mul_ps(
        x,
        _mm512_set1_ps(2.0 * std::f32::consts::LOG2_E),
    ));
    _mm512_sub_ps(
        one,
        _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
    )
}

/// The lanes `0..count` set (`count ≤ 16`).
#[inline]
pub(crate) fn first(count: usize) -> __mmask16 {
    if count >= 16 {
        0xFFFF
    } else {
        ((1u32 << count) - 1) as __mmask16
    }
}

/// Elements `start..start + count` of `e` as f32 (`count ≤ 16`), zeros in the other lanes.
///
/// # Safety
/// `start + count ≤ e.len()`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn load(e: &Elements<'_>, start: usize, count: usize) -> __m512 {
    let k = first(count);
    // SAFETY: lanes past `count` are masked off (masked loads never fault there); the rest lie
    // inside the slice by the caller's guarantee.
    unsafe {
        match e {
            Elements::F32(x) => _mm512_maskz_loadu_ps(k, x.as_ptr().add(start)),
            Elements::F16(x) => {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, x.as_ptr().add(start).cast()))
            }
            Elements::Bf16(x) => {
                let h = _mm256_maskz_loadu_epi16(k, x.as_ptr().add(start).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// The lanes of `x` that are NaN or infinite.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn non_finite(x: __m512) -> __mmask16 {
    // QNaN | +∞ | −∞ | SNaN.
    _mm512_fpclass_ps_mask::<0x99>(x)
}

/// `x` rounded to bf16 (nearest even, NaN kept), as 16 `u16` bit patterns.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(crate) fn to_bf16(x: __m512) -> __m256i {
    // SAFETY: __m256bh and __m256i are both 32 plain bytes.
    unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) }
}

/// 16 bf16 bit patterns widened to f32 (exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn from_bf16(h: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// `x ≈ hi + lo` with both in bf16: `hi` is `x` rounded, `lo` the rounded remainder (0 where
/// `x` is not finite, so a NaN or ∞ stays in `hi` alone). 16 significant bits in all.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(crate) fn split_bf16(x: __m512) -> (__m256i, __m256i) {
    let hi = to_bf16(x);
    let rest = _mm512_sub_ps(x, from_bf16(hi));
    let rest = _mm512_mask_mov_ps(rest, non_finite(x), _mm512_setzero_ps());
    (hi, to_bf16(rest))
}

/// Two halves of 16 bf16 each as 32 consecutive bf16 (one 64-byte tile row).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Transposes 16 vectors of 16 lanes in place: lane `c` of vector `r` moves to lane `r` of
/// vector `c` (64 shuffles).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn transpose16(r: &mut [__m512; 16]) {
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + k], 128-bit lane L: column 4L + k of rows 4i..4i + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let pd = |x: __m512| _mm512_castps_pd(x);
        let ps = |x: __m512d| _mm512_castpd_ps(x);
        b[4 * i] = ps(_mm512_unpacklo_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
        b[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
    }
    for k in 0..4 {
        let even = |x, y| _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y);
        let odd = |x, y| _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y);
        let (c1, c2) = (even(b[k], b[4 + k]), even(b[8 + k], b[12 + k]));
        let (d1, d2) = (odd(b[k], b[4 + k]), odd(b[8 + k], b[12 + k]));
        r[k] = even(c1, c2);
        r[8 + k] = odd(c1, c2);
        r[4 + k] = even(d1, d2);
        r[12 + k] = odd(d1, d2);
    }
}

/// `max(a, b)` per lane, NaN when either lane is NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn nan_max_v(a: __m512, b: __m512) -> __m512 {
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
    _mm512_mask_mov_ps(_mm512_max_ps(a, b), nan, _mm512_set1_ps(f32::NAN))
}

/// `0` where `x = −∞`, else `x` (the reference point of sums against a maximum that is not
/// there yet).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn finite_or_zero(x: __m512) -> __m512 {
    let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, _mm512_set1_ps(f32::NEG_INFINITY));
    _mm512_mask_mov_ps(x, none, _mm512_setzero_ps())
}

/// The sum of the lanes (a fixed tree, so the same on every call).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn hsum(x: __m512) -> f32 {
    _mm512_reduce_add_ps(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    fn avx512() -> bool {
        let f = Features::detect();
        if !(f.avx512 && f.avx512_bf16) {
            eprintln!("skipped: no AVX-512 BF16");
        }
        f.avx512 && f.avx512_bf16
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn exp2_lanes(t: [f32; 16], accurate: bool) -> [f32; 16] {
        // SAFETY: __m512 and [f32; 16] are the same 64 plain bytes.
        let t = unsafe { std::mem::transmute::<[f32; 16], __m512>(t) };
        let e = if accurate {
            Exp2::accurate().eval(t)
        } else {
            Exp2::weights(1.0).eval(t)
        };
        // SAFETY: as above.
        unsafe { std::mem::transmute(e) }
    }

    #[test]
    fn exp2_meets_its_error_bound_and_edge_values() {
        if !avx512() {
            return;
        }
        let mut worst = [0.0f64; 2];
        for i in 0..4000 {
            let mut t = [0.0f32; 16];
            for (l, x) in t.iter_mut().enumerate() {
                *x = -60.0 + (i * 16 + l) as f32 * (70.0 / 64000.0);
            }
            for (a, w) in [false, true].into_iter().zip(worst.iter_mut()) {
                // SAFETY: AVX-512 checked above.
                let got = unsafe { exp2_lanes(t, a) };
                for l in 0..16 {
                    let want = (t[l] as f64).exp2();
                    *w = w.max(((got[l] as f64 - want) / want).abs());
                }
            }
        }
        assert!(worst[0] < 9e-5, "degree 3: {}", worst[0]);
        assert!(worst[1] < 2e-7, "degree 5: {}", worst[1]);
        let mut t = [0.0f32; 16];
        t[0] = f32::NEG_INFINITY;
        t[1] = f32::NAN;
        t[2] = f32::INFINITY;
        t[3] = -1000.0;
        t[4] = 200.0;
        // SAFETY: AVX-512 checked above.
        let got = unsafe { exp2_lanes(t, false) };
        assert_eq!(got[0], 0.0);
        assert!(got[1].is_nan());
        assert_eq!(got[2], f32::INFINITY);
        assert_eq!(got[3], 0.0);
        assert_eq!(got[4], f32::INFINITY);
    }

    #[test]
    fn transpose16_transposes() {
        if !avx512() {
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        fn run(x: [[f32; 16]; 16]) -> [[f32; 16]; 16] {
            // SAFETY: the vector and array types are the same plain bytes.
            unsafe {
                let mut r: [__m512; 16] = std::mem::transmute(x);
                transpose16(&mut r);
                std::mem::transmute(r)
            }
        }
        let mut x = [[0.0f32; 16]; 16];
        for (i, row) in x.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (i * 16 + j) as f32;
            }
        }
        // SAFETY: AVX-512 checked above.
        let t = unsafe { run(x) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[i][j], x[j][i]);
            }
        }
    }

    #[test]
    fn split_bf16_keeps_16_bits_and_non_finite_values() {
        if !avx512() {
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
        fn split(x: [f32; 16]) -> ([u16; 16], [u16; 16]) {
            // SAFETY: the vector types are plain bytes of the same sizes as the arrays.
            unsafe {
                let (h, l) = split_bf16(std::mem::transmute::<[f32; 16], __m512>(x));
                (
                    std::mem::transmute::<__m256i, [u16; 16]>(h),
                    std::mem::transmute::<__m256i, [u16; 16]>(l),
                )
            }
        }
        let mut x = [0.0f32; 16];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 - 7.3) * 1.2345678;
        }
        x[14] = f32::NAN;
        x[15] = f32::NEG_INFINITY;
        // SAFETY: AVX-512 BF16 checked above.
        let (h, l) = unsafe { split(x) };
        for i in 0..14 {
            let back = half::bf16::from_bits(h[i]).to_f32() + half::bf16::from_bits(l[i]).to_f32();
            assert!(
                (back - x[i]).abs() <= x[i].abs() * 2f32.powi(-16),
                "{} vs {}",
                back,
                x[i]
            );
            assert_eq!(h[i], half::bf16::from_f32(x[i]).to_bits());
        }
        assert!(half::bf16::from_bits(h[14]).is_nan());
        assert_eq!(half::bf16::from_bits(h[15]).to_f32(), f32::NEG_INFINITY);
        assert_eq!((l[14], l[15]), (0, 0));
    }
}
