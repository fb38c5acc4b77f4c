//! The int8 kernel's two products on AVX-512 VNNI, for CPUs without AMX: the same buffers and
//! layouts of S and PV, so the softmax, the combination and every rule of the kernel stay as
//! they are.
//!
//! The lanes are the 16 query rows of a row group, as in the tile layouts; the other operand,
//! one key's (or one value column's) few elements, is broadcast to every lane.
//!
//! - `Sᵀ = K·Qᵀ` on `vpdpwssd` (pairs of signed 16-bit words, i32 sums): the smoothed keys and
//!   Q in words of up to [`word_level`](crate::amx::pack::word_level) (5792 at d = 64, where
//!   the tile unit's two signed digits reach 127·254), two depths per instruction where the
//!   digits take three `vpdpbusd` per four. The sum goes to the `hh` plane with the words'
//!   scales; `cross` stays 0. The score's rounding error is then about 1e-4 of a standard
//!   normal score, below the tile unit's, so results differ from the tile unit's but not in
//!   their bound.
//! - `Vᵀ·Pᵀ` on `vpdpbusd`: unsigned P (4 keys per lane) times signed V digits, exactly
//!   `tdpbsud`.

use std::arch::x86_64::*;

use super::{Scratch, P_SLOT, S_SLOT};
use crate::amx::pack::Data;
use crate::amx::tile::TILE_BYTES;
use crate::amx::KEY_TILE;

/// The 4 bytes at `p` broadcast to every lane (one `{1to16}` operand).
///
/// # Safety
/// 4 bytes at `p` are readable.
#[inline(always)]
unsafe fn broadcast4(p: *const u8) -> __m512i {
    // SAFETY: by the caller.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// `Sᵀ` of row group `rg`, key group `g` (16 keys) of key tile `kt` over the whole head
/// dimension, into the `hh` plane of S slot `slot`.
///
/// # Safety
/// AVX-512 F/BW and VNNI are usable; `kt < data.key_tiles`, `g < 4`, `rg < 2`; `data` has
/// words, `k_words`; `sc` was sized for `data` on vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn scores(
    data: &Data,
    k_words: *const u8,
    sc: &mut Scratch,
    (kt, slot, g, rg): (usize, usize, usize, usize),
) {
    let pairs = data.d_words / 2;
    // SAFETY (whole body): the row group's Qᵀ pairs, the 16 keys' word blocks and the slot's
    // 16 `hh` lines lie inside their buffers by the caller's bounds.
    unsafe {
        let q = sc.q_words.ptr().add(rg * pairs * 64);
        let mut acc = [_mm512_setzero_si512(); 16];
        for c in 0..data.d_chunks {
            // 16 keys × 64 words: key e's pair p at a constant offset from one base.
            let keys = k_words.add(((4 * kt + g) * data.d_chunks + c) * 16 * 128);
            let q = q.add(c * 32 * 64);
            for p in 0..32 {
                let qv = _mm512_load_si512(q.add(64 * p).cast());
                for (e, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_dpwssd_epi32(*acc, qv, broadcast4(keys.add(128 * e + 4 * p)));
                }
            }
        }
        let hh =
            sc.s.ptr_mut()
                .add(slot * S_SLOT + g * TILE_BYTES + rg * KEY_TILE * 64);
        for (e, acc) in acc.iter().enumerate() {
            _mm512_store_si512(hh.add(64 * e).cast(), *acc);
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
