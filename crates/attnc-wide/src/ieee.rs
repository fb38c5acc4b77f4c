//! IEEE 754-2019 `maximum` and `minimum` on 16 f32 lanes, as the reference interpreter
//! computes them: NaN when either operand is NaN, `+0` above `−0`. (`vmaxps`/`vminps` return
//! their second operand for NaN and for equal zeros, so both cases are patched.)

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `maximum(a, b)` per lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(crate) fn maximum(a: __m512, b: __m512) -> __m512 {
    // Equal operands (±0 among them) by their bits' AND: −0 only when both are.
    patched(a, b, _mm512_max_ps(a, b), _mm512_and_ps(a, b))
}

/// `minimum(a, b)` per lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(crate) fn minimum(a: __m512, b: __m512) -> __m512 {
    // Equal operands by their bits' OR: +0 only when both are.
    patched(a, b, _mm512_min_ps(a, b), _mm512_or_ps(a, b))
}

/// `pick` where `a ≠ b`, `same` where they are equal, NaN where either is NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn patched(a: __m512, b: __m512, pick: __m512, same: __m512) -> __m512 {
    let equal = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
    let x = _mm512_mask_blend_ps(equal, pick, same);
    _mm512_mask_blend_ps(nan, x, _mm512_add_ps(a, b))
}
