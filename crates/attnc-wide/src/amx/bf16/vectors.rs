//! The bf16 kernel's two products on AVX-512 BF16, for CPUs without AMX: K and V packed in the
//! tile unit's layouts (rounded once: packed for vectors they have no `lo` plane) and the same
//! Sᵀ, Pᵀ and Oᵀ buffers, so the softmax and every rule of the kernel stay as they are.
//!
//! The lanes are the 16 query rows of a row group, as in the tile layouts: a row of a resident
//! B tile (Qᵀ or Pᵀ: one pair of dimensions or keys for 16 rows) is one `__m512bh`, and the
//! matching pair of the streaming A tile (one key's dimensions, one value column's keys) is
//! broadcast to every lane. `vdpbf16ps` then adds both products of the pair to the f32 sum
//! exactly as `tdpbf16ps` does, so the two units differ only in the order of f32 additions.

use std::arch::x86_64::*;

use super::{Scratch, P_SLOT, S_SLOT};
use crate::amx::pack::Data;
use crate::amx::tile::TILE_BYTES;
use crate::amx::KEY_TILE;

/// The bf16 pair at `p` broadcast to every lane (one `{1to16}` operand).
///
/// # Safety
/// 4 bytes at `p` are readable.
#[inline(always)]
unsafe fn broadcast_pair(p: *const u8) -> __m512bh {
    // SAFETY: by the caller; __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
            p.cast::<i32>().read_unaligned(),
        ))
    }
}

/// 16 accumulators `acc[e] += Σ_pairs b[pair] · a[e][pair]` over the 16 pairs of one tile:
/// `b` a B tile (row `pair`: that pair for 16 lanes), `a` an A tile (row `e`: 16 pairs).
///
/// # Safety
/// AVX-512 F and BF16 are usable; both tiles (1 KiB each) are readable, `b` 64-byte aligned.
#[inline(always)]
unsafe fn tile_product(acc: &mut [__m512; 16], b: *const u8, a: *const u8) {
    for pair in 0..16 {
        // SAFETY: row `pair` of `b`, pair `pair` of every row of `a` (the caller's bounds).
        unsafe {
            let lanes = std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(
                b.add(64 * pair).cast(),
            ));
            for (e, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_dpbf16_ps(*acc, lanes, broadcast_pair(a.add(64 * e + 4 * pair)));
            }
        }
    }
}

/// `Sᵀ` of row group `rg`, key group `g` (16 keys) of key tile `kt` over dimension chunks
/// `chunks`, into S slot `slot`: from 0 when `chunks` starts at 0, else added to the partial
/// sums stored by the previous chunks.
///
/// # Safety
/// AVX-512 F/BW and BF16 are usable; `data` was packed for vectors; `kt < data.key_tiles`,
/// `g < 4`, `rg < 2`, `chunks` lies in `0..data.d_chunks`; `sc` was sized for `data`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(super) unsafe fn scores(
    data: &Data,
    sc: &mut Scratch,
    (kt, slot, g, rg): (usize, usize, usize, usize),
    chunks: std::ops::Range<usize>,
) {
    let ch = data.d_chunks;
    debug_assert!(data.k_lo.is_none(), "packed for vectors: K rounded once");
    // SAFETY (whole body): the slot's 16 lines of (g, rg), the Qᵀ tiles (c, rg) and the K
    // tiles (4kt + g, c) lie inside their buffers by the caller's bounds.
    unsafe {
        let s =
            sc.s.ptr_mut()
                .add(slot * S_SLOT + g * TILE_BYTES + rg * KEY_TILE * 64);
        let mut acc = [_mm512_setzero_ps(); 16];
        if chunks.start > 0 {
            for (e, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_load_ps(s.add(64 * e).cast());
            }
        }
        for c in chunks {
            let q = sc.qt.ptr().add((2 * c + rg) * TILE_BYTES);
            let k = ((4 * kt + g) * ch + c) * TILE_BYTES;
            tile_product(&mut acc, q, data.k_hi.ptr().add(k));
        }
        for (e, acc) in acc.iter().enumerate() {
            _mm512_store_ps(s.add(64 * e).cast(), *acc);
        }
    }
}

/// `Oᵀ += Vᵀ·Pᵀ` of row group `rg` and value-column group `g` of key tile `kt`, from P slot
/// `slot`.
///
/// # Safety
/// AVX-512 F/BW and BF16 are usable; `data` was packed for vectors; `kt < data.key_tiles`,
/// `g < data.dv_groups`, `rg < 2`; `sc` was sized for `data`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(super) unsafe fn values(
    data: &Data,
    sc: &mut Scratch,
    (kt, slot, g, rg): (usize, usize, usize, usize),
) {
    let groups = data.dv_groups;
    debug_assert!(data.v_lo.is_none(), "packed for vectors: V rounded once");
    // SAFETY (whole body): the Oᵀ lines of (g, rg), the slot's Pᵀ tiles (h, rg) and the Vᵀ
    // tiles (2kt + h, g) lie inside their buffers by the caller's bounds.
    unsafe {
        let o = sc.o.ptr_mut().add(g * TILE_BYTES + rg * sc.dv_pad * 64);
        let mut acc = [_mm512_setzero_ps(); 16];
        for (col, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_load_ps(o.add(64 * col).cast());
        }
        for h in 0..2 {
            let p = sc.p.ptr().add(slot * P_SLOT + (2 * h + rg) * TILE_BYTES);
            let v = ((2 * kt + h) * groups + g) * TILE_BYTES;
            tile_product(&mut acc, p, data.v_hi.ptr().add(v));
        }
        for (col, acc) in acc.iter().enumerate() {
            _mm512_store_ps(o.add(64 * col).cast(), *acc);
        }
    }
}
