//! The int8 kernel's two products on AVX-512 VNNI (`vpdpbusd` on zmm), for CPUs without AMX:
//! the same operands in the same tile layouts, the same i32 sums in the same buffers, so the
//! softmax, the combination and every rule of the kernel stay as they are.
//!
//! `vpdpbusd` adds, per i32 lane, four products of an unsigned byte of its first operand and a
//! signed byte of its second. The lanes are the 16 query rows of a row group, as in the tile
//! layouts: the first operand is one line of a B tile (Qᵀ or Pᵀ: 4 bytes per row), the second
//! the 4 bytes of one key (K) or one value column (Vᵀ) broadcast to every lane.
//!
//! - `Vᵀ·Pᵀ` is unsigned P times signed V, exactly `tdpbsud`.
//! - `Sᵀ = K·Qᵀ` is signed times signed (`tdpbssd`). Q's digits enter offset by 128 (a flipped
//!   sign bit makes `q + 128` unsigned), and each key's accumulators start at `−128·Σk` of its
//!   digits ([`Data::k_digit_sums`]), which takes the offset back out. i32 sums wrap, so the
//!   result is the tile unit's exactly whenever the tile unit's fits in i32.

use std::arch::x86_64::*;

use super::{Scratch, P_SLOT, S_PART, S_SLOT};
use crate::amx::pack::Data;
use crate::amx::tile::TILE_BYTES;
use crate::amx::KEY_TILE;

/// Keys per pass of the score product: 8 keys × 2 planes = 16 accumulators, plus the two Q
/// lines, in the 32 vector registers.
const KEYS_PER_PASS: usize = 8;

/// The 4 bytes at `p` broadcast to every lane (one `{1to16}` operand).
///
/// # Safety
/// 4 bytes at `p` are readable.
#[inline(always)]
unsafe fn broadcast4(p: *const u8) -> __m512i {
    // SAFETY: by the caller.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// `Sᵀ` of row group `rg`, key group `g` (16 keys) of key tile `kt`, dimension chunk `c`, into
/// S slot `slot`: `hh = Khi·Qhiᵀ`, `cross = Klo·Qhiᵀ + Khi·Qloᵀ`, from the key digits' sums
/// at the first chunk and from the stored partial sums after it.
///
/// # Safety
/// AVX-512 F/BW and VNNI are usable; `kt < data.key_tiles`, `c < data.d_chunks`, `g < 4`,
/// `rg < 2`; `sc` was sized for `data`, whose `k_lo` is `k_lo`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn scores(
    data: &Data,
    k_lo: *const u8,
    sc: &mut Scratch,
    (kt, slot, c, g, rg): (usize, usize, usize, usize, usize),
) {
    let q_at = (2 * c + rg) * TILE_BYTES;
    let k_at = ((4 * kt + g) * data.d_chunks + c) * TILE_BYTES;
    let offset = _mm512_set1_epi8(-128);
    // SAFETY (whole body): the tiles named lie inside their buffers by the caller's bounds;
    // every pointer below stays inside one 1 KiB tile.
    unsafe {
        let q_hi = sc.q_hi.ptr().add(q_at);
        let q_lo = sc.q_lo.ptr().add(q_at);
        let k_hi = data.k_hi.ptr().add(k_at);
        let k_lo = k_lo.add(k_at);
        let hh_out =
            sc.s.ptr_mut()
                .add(slot * S_SLOT + g * TILE_BYTES + rg * KEY_TILE * 64);
        let cross_out = hh_out.add(S_PART);
        for pass in 0..16 / KEYS_PER_PASS {
            let e0 = pass * KEYS_PER_PASS;
            let mut hh = [_mm512_setzero_si512(); KEYS_PER_PASS];
            let mut cross = [_mm512_setzero_si512(); KEYS_PER_PASS];
            for e in 0..KEYS_PER_PASS {
                let key = e0 + e;
                if c == 0 {
                    let [sum_hi, sum_lo] = data.k_digit_sums[kt * KEY_TILE + 16 * g + key];
                    hh[e] = _mm512_set1_epi32(sum_hi.wrapping_mul(-128));
                    cross[e] = _mm512_set1_epi32(sum_hi.wrapping_add(sum_lo).wrapping_mul(-128));
                } else {
                    hh[e] = _mm512_load_si512(hh_out.add(64 * key).cast());
                    cross[e] = _mm512_load_si512(cross_out.add(64 * key).cast());
                }
            }
            for quad in 0..16 {
                let qh = _mm512_xor_si512(_mm512_load_si512(q_hi.add(64 * quad).cast()), offset);
                let ql = _mm512_xor_si512(_mm512_load_si512(q_lo.add(64 * quad).cast()), offset);
                for e in 0..KEYS_PER_PASS {
                    let row = 64 * (e0 + e) + 4 * quad;
                    let kh = broadcast4(k_hi.add(row));
                    let kl = broadcast4(k_lo.add(row));
                    hh[e] = _mm512_dpbusd_epi32(hh[e], qh, kh);
                    cross[e] = _mm512_dpbusd_epi32(cross[e], qh, kl);
                    cross[e] = _mm512_dpbusd_epi32(cross[e], ql, kh);
                }
            }
            for e in 0..KEYS_PER_PASS {
                _mm512_store_si512(hh_out.add(64 * (e0 + e)).cast(), hh[e]);
                _mm512_store_si512(cross_out.add(64 * (e0 + e)).cast(), cross[e]);
            }
        }
    }
}

/// `Vᵀ·Pᵀ` of value-column group `g` of key tile `kt` with digit plane `v` (`part` 0: `hi`,
/// 1: `lo`), for both row groups, from P slot `slot` into the PV buffer.
///
/// # Safety
/// AVX-512 F/BW and VNNI are usable; `kt < data.key_tiles`, `g < data.dv_groups`; `v` is the
/// plane `part` of `data`; `sc` was sized for `data`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn values(
    data: &Data,
    v: *const u8,
    sc: &mut Scratch,
    (kt, slot, g, part): (usize, usize, usize, usize),
) {
    let rg_stride = sc.dv_pad * 64;
    // SAFETY (whole body): tile (kt, g) of the plane, the slot's two Pᵀ tiles and the PV
    // tiles (part, rg, g) lie inside their buffers by the caller's bounds.
    unsafe {
        let v = v.add((kt * data.dv_groups + g) * TILE_BYTES);
        for rg in 0..2 {
            let p = sc.p.ptr().add(slot * P_SLOT + rg * TILE_BYTES);
            let mut acc = [_mm512_setzero_si512(); 16];
            for quad in 0..16 {
                let pq = _mm512_load_si512(p.add(64 * quad).cast());
                for (col, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_dpbusd_epi32(*acc, pq, broadcast4(v.add(64 * col + 4 * quad)));
                }
            }
            let out = sc
                .pv
                .ptr_mut()
                .add(g * TILE_BYTES + (2 * part + rg) * rg_stride);
            for (col, acc) in acc.iter().enumerate() {
                _mm512_store_si512(out.add(64 * col).cast(), *acc);
            }
        }
    }
}
