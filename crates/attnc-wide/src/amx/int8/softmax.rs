//! The int8 kernel's two softmax passes on 16 rows × 16 keys: scores and the tile maximum,
//! then u8 weights in the Pᵀ layout.

use std::arch::x86_64::*;

use super::{Scratch, P_SLOT, S_PART, S_SLOT};
use crate::amx::score::Form;
use crate::amx::simd::Weights;
use crate::amx::tile::TILE_BYTES;
use crate::amx::KEY_TILE;

/// Keys per sub-block of either pass: the tile unit gets a step after each.
pub(super) const SUB: usize = 16;

/// Pass 1 on keys `SUB·sb..SUB·(sb + 1)`: the scores of row group `rg` from the two i32 products,
/// stored over `hh` (plain: `y = s_k·(hh + cross/254)`; else `x₂` of the full form); returns
/// their lane-wise maximum.
///
/// # Safety
/// `i0 < m`; `ks` points at the key tile's 64 scales; the S slot holds this tile's products.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn scores<const PLAIN: bool>(
    form: &Form<'_>,
    sc: &mut Scratch,
    ks: *const f32,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
) -> __m512 {
    let inv254 = _mm512_set1_ps(1.0 / 254.0);
    // SAFETY: keys 16sb.. of row group rg in the slot's two parts.
    let hh = unsafe {
        sc.s.ptr_mut()
            .add(slot * S_SLOT + (rg * KEY_TILE + SUB * sb) * 64)
    };
    // SAFETY: the same keys in the cross part, S_PART bytes further.
    let xx = unsafe { hh.add(S_PART) };
    let (factor, shift) = if PLAIN {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        // SAFETY: 16 of the 32 factors each.
        unsafe {
            (
                _mm512_loadu_ps(sc.q_factor.as_ptr().add(16 * rg)),
                _mm512_loadu_ps(sc.q_shift.as_ptr().add(16 * rg)),
            )
        }
    };
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for e in 0..SUB {
        // SAFETY: vector e of both parts; the scale of key 16sb + e.
        unsafe {
            let h = _mm512_cvtepi32_ps(_mm512_load_si512(hh.add(64 * e).cast()));
            let c = _mm512_cvtepi32_ps(_mm512_load_si512(xx.add(64 * e).cast()));
            let y = _mm512_mul_ps(
                _mm512_fmadd_ps(c, inv254, h),
                _mm512_set1_ps(*ks.add(SUB * sb + e)),
            );
            let x = if PLAIN {
                y
            } else {
                let s = _mm512_fmadd_ps(y, factor, shift);
                form.finish(s, i0, j0 + SUB * sb + e, partial)
            };
            _mm512_store_ps(hh.add(64 * e).cast(), x);
            mx = _mm512_max_ps(mx, x);
        }
    }
    mx
}

/// Pass 2 on keys `SUB·sb..SUB·(sb + 1)` of row group `rg`: `e = 255·2^t` with
/// `t = y·f₂ + (s₂ − b)` (plain) or `x₂ − b`, quantized to u8 into the Pᵀ slot (4 keys per
/// row in a 32-bit lane); returns the lane-wise sum of `e`.
///
/// # Safety
/// The S slot holds pass 1's scores of these keys.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn weights(
    exp2: &Weights,
    sc: &mut Scratch,
    slot: usize,
    rg: usize,
    sb: usize,
    plain: bool,
    f2: __m512,
    offset: __m512,
    block: __m512,
) -> __m512 {
    // SAFETY: keys 16sb.. of row group rg in the slot; rows 4sb.. of Pᵀ tile rg.
    let (src, dst) = unsafe {
        (
            sc.s.ptr()
                .add(slot * S_SLOT + (rg * KEY_TILE + SUB * sb) * 64)
                .cast::<f32>(),
            sc.p.ptr_mut()
                .add(slot * P_SLOT + rg * TILE_BYTES + SUB / 4 * sb * 64),
        )
    };
    // Within each 128-bit block, bytes [k0 r0..r3, k1 r0..r3, k2 …, k3 …] → [r0 k0..k3, r1 …].
    let transpose4 = _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400);
    let mut sum = _mm512_setzero_ps();
    for quad in 0..SUB / 4 {
        let mut n = [_mm512_setzero_si512(); 4];
        for (k, n) in n.iter_mut().enumerate() {
            // SAFETY: vector 4·quad + k of the keys.
            let x = unsafe { _mm512_load_ps(src.add(16 * (4 * quad + k))) };
            let t = if plain {
                _mm512_fmadd_ps(x, f2, offset)
            } else {
                _mm512_sub_ps(x, block)
            };
            let e = exp2.eval(t);
            sum = _mm512_add_ps(sum, e);
            *n = _mm512_cvtps_epi32(e);
        }
        let bytes = _mm512_packus_epi16(
            _mm512_packus_epi32(n[0], n[1]),
            _mm512_packus_epi32(n[2], n[3]),
        );
        // SAFETY: row 4sb + quad of the Pᵀ tile.
        unsafe {
            _mm512_store_si512(
                dst.add(quad * 64).cast(),
                _mm512_shuffle_epi8(bytes, transpose4),
            );
        }
    }
    sum
}
