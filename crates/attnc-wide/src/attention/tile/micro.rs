//! The register-blocked FMA micro-kernels of the tile kernel.
//!
//! Both keep `RV` row vectors (16 query rows each) of accumulators for each of a few keys or
//! value columns, broadcast one element of K or V per `RV` FMAs and load each row vector of
//! `Qᵀ` or `Pᵀ` once per step: 16 accumulators, 8 loads per 16 FMAs at `RV = 4`. Measured in
//! isolation on L1-resident data both run at ~94% of this machine's FMA peak.

// 2-D register arrays indexed by constant loop bounds: iterator forms would hide which
// accumulator meets which operand.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::super::mask::VECTORS;
use super::super::QUERY_TILE;

const LANES: usize = 16;

/// `Sᵀ[jj][rows] = Σ_c Qᵀ[c][rows]·K[jj][c]` for `J` keys, and `tmax = max(tmax, Sᵀ)`.
///
/// # Safety
/// AVX-512 is present; `qt` holds `d·QUERY_TILE` f32; `k` points at `J` rows `stride` apart
/// with `d` readable f32 each; `s` holds `J·QUERY_TILE` writable f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) unsafe fn qk<const J: usize, const RV: usize>(
    d: usize,
    qt: *const f32,
    k: *const f32,
    stride: usize,
    s: *mut f32,
    tmax: &mut [__m512; RV],
) {
    let mut acc = [[_mm512_setzero_ps(); RV]; J];
    let mut key = [k; J];
    for (jj, p) in key.iter_mut().enumerate() {
        *p = k.wrapping_add(jj * stride);
    }
    let mut q = qt;
    for c in 0..d {
        // SAFETY: c < d: Qᵀ row c and element c of each key row are readable.
        unsafe {
            let mut qv = [_mm512_setzero_ps(); RV];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(q.add(r * LANES));
            }
            for jj in 0..J {
                let b = _mm512_set1_ps(*key[jj].add(c));
                for r in 0..RV {
                    acc[jj][r] = _mm512_fmadd_ps(qv[r], b, acc[jj][r]);
                }
            }
            q = q.add(QUERY_TILE);
        }
    }
    for jj in 0..J {
        for r in 0..RV {
            tmax[r] = _mm512_max_ps(tmax[r], acc[jj][r]);
            // SAFETY: jj < J, r < RV ≤ 4: inside the J·64 f32 of `s`.
            unsafe { _mm512_storeu_ps(s.add(jj * QUERY_TILE + r * LANES), acc[jj][r]) };
        }
    }
}

/// `Oᵀ[cc][rows] = Oᵀ[cc][rows]·alpha + Σ_key Pᵀ[key][rows]·V[key][cc]` for `C` columns.
///
/// With `KEPT`, only the kept positions of a partial tile are added (`keep[key·4 + r]`, a
/// masked FMA): a masked key's weight is 0, but `0·∞` or `0·NaN` from its value row must not
/// reach the output (the reference never reads masked positions).
///
/// # Safety
/// AVX-512 is present; `p` holds `keys·QUERY_TILE` f32; `v` points at `keys` rows `stride`
/// apart with `C` readable f32 each; `o` holds `C·QUERY_TILE` f32; with `KEPT`, `keep` holds
/// the masks of `RV` row vectors for each of `keys` keys (4 apart).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pv<const C: usize, const RV: usize, const KEPT: bool>(
    keys: usize,
    p: *const f32,
    v: *const f32,
    stride: usize,
    o: *mut f32,
    alpha: Option<&[__m512; RV]>,
    keep: &[u16],
) {
    let mut acc = [[_mm512_setzero_ps(); RV]; C];
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: cc < C, r < RV: inside `o`.
            acc[cc][r] = unsafe { _mm512_loadu_ps(o.add(cc * QUERY_TILE + r * LANES)) };
            if let Some(alpha) = alpha {
                acc[cc][r] = _mm512_mul_ps(acc[cc][r], alpha[r]);
            }
        }
    }
    if KEPT {
        assert!(
            keys == 0 || keep.len() >= (keys - 1) * VECTORS + RV,
            "invariant: a mask per key and row vector"
        );
    }
    let (mut pp, mut vp, mut kp) = (p, v, keep.as_ptr());
    for _ in 0..keys {
        // SAFETY: fewer than `keys` rows of Pᵀ, V (C elements each) and `keep` were passed.
        unsafe {
            let mut pv = [_mm512_setzero_ps(); RV];
            for (r, x) in pv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(pp.add(r * LANES));
            }
            let mut kept = [0xffff as __mmask16; RV];
            if KEPT {
                // Checked above: this key's masks lie inside `keep`.
                for (r, k) in kept.iter_mut().enumerate() {
                    *k = *kp.add(r);
                }
                kp = kp.add(VECTORS);
            }
            for cc in 0..C {
                let b = _mm512_set1_ps(*vp.add(cc));
                for r in 0..RV {
                    acc[cc][r] = if KEPT {
                        _mm512_mask3_fmadd_ps(pv[r], b, acc[cc][r], kept[r])
                    } else {
                        _mm512_fmadd_ps(pv[r], b, acc[cc][r])
                    };
                }
            }
            pp = pp.add(QUERY_TILE);
        }
        vp = vp.wrapping_add(stride);
    }
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(o.add(cc * QUERY_TILE + r * LANES), acc[cc][r]) };
        }
    }
}
