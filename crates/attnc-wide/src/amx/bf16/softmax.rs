//! The bf16 kernel's softmax on 16 rows × 16 keys: weights in the Pᵀ layout, lazy maximum.

use std::arch::x86_64::*;

use super::{Scratch, P_SLOT, SLACK, S_SLOT};
use crate::amx::score::{Form, RowState};
use crate::amx::simd::{finite_or_zero, from_bf16, nan_max_v, Exp2, Weights};
use crate::amx::tile::TILE_BYTES;
use crate::amx::KEY_TILE;

/// `t = x₂ − μ` of keys `16sb..16sb + 16` of row group `rg` (rows `i0..`), from the Sᵀ slot.
///
/// # Safety
/// `i0 < m`; the Sᵀ slot holds this tile's scores; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn scores<const PLAIN: bool>(
    form: &Form<'_>,
    sc: &Scratch,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
    mu: __m512,
) -> [__m512; 16] {
    // SAFETY: keys 16sb.. of row group rg in the slot.
    let src = unsafe {
        sc.s.ptr()
            .add(slot * S_SLOT + (rg * KEY_TILE + sb * 16) * 64)
    }
    .cast::<f32>();
    let c = _mm512_set1_ps(form.scale * std::f32::consts::LOG2_E);
    let scale = _mm512_set1_ps(form.scale);
    std::array::from_fn(|e| {
        // SAFETY: vector (rg, 16sb + e) of the slot; i0 < m by the caller.
        unsafe {
            let s = _mm512_load_ps(src.add(16 * e));
            if PLAIN {
                _mm512_fmsub_ps(s, c, mu)
            } else {
                let x = form.finish(_mm512_mul_ps(s, scale), i0, j0 + 16 * sb + e, partial);
                _mm512_sub_ps(x, mu)
            }
        }
    })
}

/// `2^t` of [`scores`] for the 8 keys from `16sb + 8half`, without keeping `t`.
///
/// # Safety
/// As [`scores`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn exponents<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Weights,
    sc: &Scratch,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    (sb, half): (usize, usize),
    partial: bool,
    mu: __m512,
) -> [__m512; 8] {
    // SAFETY: keys 16sb.. of row group rg in the slot.
    let src = unsafe {
        sc.s.ptr()
            .add(slot * S_SLOT + (rg * KEY_TILE + sb * 16) * 64)
    }
    .cast::<f32>();
    let c = _mm512_set1_ps(form.scale * std::f32::consts::LOG2_E);
    let scale = _mm512_set1_ps(form.scale);
    std::array::from_fn(|e| {
        let e = 8 * half + e;
        // SAFETY: as in `scores`.
        let t = unsafe {
            let s = _mm512_load_ps(src.add(16 * e));
            if PLAIN {
                _mm512_fmsub_ps(s, c, mu)
            } else {
                let x = form.finish(_mm512_mul_ps(s, scale), i0, j0 + 16 * sb + e, partial);
                _mm512_sub_ps(x, mu)
            }
        };
        exp2.eval(t)
    })
}

/// The lane-wise sum of 16 vectors (a fixed tree).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn sum16(p: &[__m512; 16]) -> __m512 {
    let s8: [__m512; 8] = std::array::from_fn(|e| _mm512_add_ps(p[e], p[e + 8]));
    let s4: [__m512; 4] = std::array::from_fn(|e| _mm512_add_ps(s8[e], s8[e + 4]));
    _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]))
}

/// Moves the maxima of the lanes in `over` to `max(m, mx + μ)` (to the block maximum in
/// `first` lanes, which had none), rescales `l` and the pending O factors. Returns the new
/// `(m, l)`, the factor `α` per row and the shift that moves `t = x₂ − μ` to the new
/// reference.
///
/// # Safety
/// `pending` points at the row group's 16 pending factors.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn rebase(
    m: __m512,
    l: __m512,
    mu: __m512,
    mx: __m512,
    over: __mmask16,
    first: __mmask16,
    pending: *mut f32,
) -> (__m512, __m512, __m512, __m512) {
    let new = _mm512_mask_mov_ps(m, over, nan_max_v(m, _mm512_add_ps(mx, mu)));
    let shift = _mm512_sub_ps(mu, finite_or_zero(new));
    // α = 2^(m − m_new) where the maximum moved (0 from −∞), 1 elsewhere.
    let a = Exp2::accurate().eval(_mm512_sub_ps(m, new));
    let a = _mm512_mask_mov_ps(_mm512_set1_ps(1.0), over & !first, a);
    let a = _mm512_mask_mov_ps(a, first, _mm512_setzero_ps());
    // SAFETY: by the caller.
    unsafe { _mm512_storeu_ps(pending, _mm512_mul_ps(_mm512_loadu_ps(pending), a)) };
    (new, _mm512_mul_ps(l, a), a, shift)
}

/// Multiplies the weights of sub-blocks `0..sb` of the slot's key tile (row group `rg`, 16
/// rows in lanes) by `alpha` per row, after their row maximum moved mid-tile (a rare path:
/// one more bf16 rounding for those weights).
///
/// # Safety
/// `slot < 2`, `rg < 2`, `sb ≤ 4`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn rescale_written(sc: &mut Scratch, slot: usize, rg: usize, sb: usize, alpha: __m512) {
    // A Pᵀ row holds (key 2k, key 2k + 1) for rows 0..16: word w belongs to row w / 2.
    let lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    let hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    let (a_lo, a_hi) = (
        _mm512_permutexvar_ps(lo, alpha),
        _mm512_permutexvar_ps(hi, alpha),
    );
    for s in 0..sb {
        for e in 0..8 {
            let at = slot * P_SLOT + (2 * (s / 2) + rg) * TILE_BYTES + ((s % 2) * 8 + e) * 64;
            // SAFETY: row (s % 2)·8 + e of tile (s / 2, rg) in the slot; the vector types are
            // plain bytes of the same size.
            unsafe {
                let row = sc.p.ptr_mut().add(at).cast::<__m512i>();
                let v = _mm512_load_si512(row.cast());
                let f_lo = _mm512_mul_ps(from_bf16(_mm512_castsi512_si256(v)), a_lo);
                let f_hi = _mm512_mul_ps(from_bf16(_mm512_extracti64x4_epi64::<1>(v)), a_hi);
                let back: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f_hi, f_lo));
                _mm512_store_si512(row.cast(), back);
            }
        }
    }
}

/// The softmax of keys `16sb..16sb + 16` of key tile `j0` for row group `rg` (rows `i0..`):
/// weights into the Pᵀ slot, sums and maxima into `st`, O's rescale into `sc.alpha[slot]`.
///
/// # Safety
/// `i0 < m`; the Sᵀ slot holds this tile's scores; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(super) unsafe fn softmax<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Weights,
    sc: &mut Scratch,
    st: &mut RowState,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
    mut between: impl FnMut(&mut Scratch),
) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = st.max_v(rg);
    let mut l = st.sum_v(rg);
    let mu = finite_or_zero(m);
    // SAFETY (all calls): the caller's contract. The tile unit gets its next step between the
    // two halves.
    let lo = unsafe { exponents::<PLAIN>(form, exp2, sc, slot, rg, i0, j0, (sb, 0), partial, mu) };
    between(sc);
    let hi = unsafe { exponents::<PLAIN>(form, exp2, sc, slot, rg, i0, j0, (sb, 1), partial, mu) };
    let mut p: [__m512; 16] = std::array::from_fn(|e| if e < 8 { lo[e] } else { hi[e - 8] });
    let mut sum = sum16(&p);
    // Every weight is at most the sum, so a sum within 2^SLACK needs no new maximum; a row
    // without one yet (m = −∞) takes it from its first kept score. Otherwise the scores are
    // formed again (a rare path) for their maximum.
    let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m, ninf);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sum, _mm512_set1_ps(SLACK.exp2()));
    let some = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sum, _mm512_setzero_ps());
    if big | (none & some) != 0 {
        // SAFETY: the caller's contract, as for `exponents`.
        let t = unsafe { scores::<PLAIN>(form, sc, slot, rg, i0, j0, sb, partial, mu) };
        let m8: [__m512; 8] = std::array::from_fn(|e| _mm512_max_ps(t[e], t[e + 8]));
        let m4: [__m512; 4] = std::array::from_fn(|e| _mm512_max_ps(m8[e], m8[e + 4]));
        let mx = _mm512_max_ps(_mm512_max_ps(m4[0], m4[2]), _mm512_max_ps(m4[1], m4[3]));
        let first = none & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, ninf);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, _mm512_set1_ps(SLACK)) | first;
        if over != 0 {
            // SAFETY: 16 of the 32 pending factors.
            let pending = unsafe { sc.alpha[slot].as_mut_ptr().add(16 * rg) };
            let (new, alpha, shift);
            (new, l, alpha, shift) = unsafe { rebase(m, l, mu, mx, over, first, pending) };
            m = new;
            // Weights of this key tile already written are relative to the old maximum.
            // SAFETY: sub-blocks 0..sb of the slot's Pᵀ tiles for row group rg.
            unsafe { rescale_written(sc, slot, rg, sb, alpha) };
            p = std::array::from_fn(|e| exp2.eval(_mm512_add_ps(t[e], shift)));
            sum = sum16(&p);
        }
    }
    st.set(rg, m, _mm512_add_ps(l, sum));
    // Pairs of keys interleaved per row: the B layout [keys/2][rows][2].
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let h = sb / 2;
    // SAFETY: rows 8(sb % 2).. of tile (h, rg) of the slot.
    let dst = unsafe {
        sc.p.ptr_mut()
            .add(slot * P_SLOT + (2 * h + rg) * TILE_BYTES + (sb % 2) * 8 * 64)
    };
    for e in 0..8 {
        // SAFETY: __m512bh and __m512i are the same 64 plain bytes; row 8(sb % 2) + e of
        // tile (h, rg) of the slot.
        unsafe {
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(p[2 * e + 1], p[2 * e]));
            _mm512_store_si512(dst.add(e * 64).cast(), _mm512_permutexvar_epi16(idx, v));
        }
    }
}
