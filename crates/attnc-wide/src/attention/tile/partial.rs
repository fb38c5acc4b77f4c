//! Partial tiles by row vectors: the products of a tile that element masks cut (the diagonal
//! tile of a causal pattern, a window's edges, a document boundary) run only over the row
//! vectors (16 query rows each) that some key of a group keeps.
//!
//! On a causal diagonal tile the keys `16s..16s + 16` are kept by row vectors `s..4` only
//! (the bands `mask.rs`'s `kept_band` finds), so 6 of the 16 (key group, row vector) blocks
//! of each product are skipped. What is skipped is
//! exactly what the masks drop: a skipped score is never written (the score pass replaces
//! every masked score by −∞ before the softmax reads it) and a skipped `P·V` term would have
//! been a masked FMA, so results are bit-identical to computing the whole tile.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::mask::VECTORS;
use super::micro;
use super::QUERY_TILE;

const LANES: usize = 16;

/// Keys per `P·V` segment: each segment runs over its own row vectors.
pub(super) const PV_SEGMENT: usize = 16;

/// `Sᵀ` of `keys` (1 to 4) keys for the row vectors `rows` only ([`micro::qk`] on a band of
/// rows); the tile maximum it folds is discarded (the score pass recomputes it for masked
/// tiles).
///
/// # Safety
/// As [`micro::qk`] for `keys` keys; `rows` lies inside the first 4 row vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) unsafe fn qk_rows(
    keys: usize,
    rows: Range<usize>,
    d: usize,
    qt: *const f32,
    k: *const f32,
    stride: usize,
    s: *mut f32,
) {
    let (qt, s) = (
        qt.wrapping_add(rows.start * LANES),
        s.wrapping_add(rows.start * LANES),
    );
    let mut tmax = [_mm512_setzero_ps(); VECTORS];
    // SAFETY (all): Qᵀ and Sᵀ rows from row vector `rows.start` hold `rows.len()` vectors
    // per key or column; the keys are the caller's.
    unsafe {
        match (keys.min(4), rows.len()) {
            (1, 1) => micro::qk::<1, 1>(d, qt, k, stride, s, first(&mut tmax)),
            (1, 2) => micro::qk::<1, 2>(d, qt, k, stride, s, first(&mut tmax)),
            (1, 3) => micro::qk::<1, 3>(d, qt, k, stride, s, first(&mut tmax)),
            (1, _) => micro::qk::<1, 4>(d, qt, k, stride, s, &mut tmax),
            (2, 1) => micro::qk::<2, 1>(d, qt, k, stride, s, first(&mut tmax)),
            (2, 2) => micro::qk::<2, 2>(d, qt, k, stride, s, first(&mut tmax)),
            (2, 3) => micro::qk::<2, 3>(d, qt, k, stride, s, first(&mut tmax)),
            (2, _) => micro::qk::<2, 4>(d, qt, k, stride, s, &mut tmax),
            (3, 1) => micro::qk::<3, 1>(d, qt, k, stride, s, first(&mut tmax)),
            (3, 2) => micro::qk::<3, 2>(d, qt, k, stride, s, first(&mut tmax)),
            (3, 3) => micro::qk::<3, 3>(d, qt, k, stride, s, first(&mut tmax)),
            (3, _) => micro::qk::<3, 4>(d, qt, k, stride, s, &mut tmax),
            (_, 1) => micro::qk::<4, 1>(d, qt, k, stride, s, first(&mut tmax)),
            (_, 2) => micro::qk::<4, 2>(d, qt, k, stride, s, first(&mut tmax)),
            (_, 3) => micro::qk::<4, 3>(d, qt, k, stride, s, first(&mut tmax)),
            (_, _) => micro::qk::<4, 4>(d, qt, k, stride, s, &mut tmax),
        }
    }
}

/// The first `N` of four vectors.
fn first<const N: usize>(x: &mut [__m512; VECTORS]) -> &mut [__m512; N] {
    (&mut x[..N]).try_into().expect("N ≤ 4")
}

/// `Oᵀ[c][rows] += Σ_key Pᵀ[key][rows]·V[key][c]` for `columns` (1 to 4) columns, the row
/// vectors `rows` only and `keys` keys, masked FMAs unless `full` ([`micro::pv`] on a band of
/// rows, without a rescale).
///
/// # Safety
/// As [`micro::pv`] for `keys` keys and `columns` columns; `p`, `o` and `keep` point at the
/// segment's first key, `rows` lies inside the first 4 row vectors and, unless `full`,
/// `keep` holds `keys·4` masks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pv_rows(
    columns: usize,
    rows: Range<usize>,
    full: bool,
    keys: usize,
    p: *const f32,
    v: *const f32,
    stride: usize,
    o: *mut f32,
    keep: &[u16],
) {
    let (p, o) = (
        p.wrapping_add(rows.start * LANES),
        o.wrapping_add(rows.start * LANES),
    );
    let keep = &keep[rows.start.min(keep.len())..];
    match columns.min(4) {
        // SAFETY (all four): the caller's contract.
        1 => unsafe { pv_band::<1>(rows.len(), full, keys, p, v, stride, o, keep) },
        2 => unsafe { pv_band::<2>(rows.len(), full, keys, p, v, stride, o, keep) },
        3 => unsafe { pv_band::<3>(rows.len(), full, keys, p, v, stride, o, keep) },
        _ => unsafe { pv_band::<4>(rows.len(), full, keys, p, v, stride, o, keep) },
    }
}

/// [`pv_rows`] for `C` columns and `band` row vectors from the pointers given.
///
/// # Safety
/// As [`pv_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_band<const C: usize>(
    band: usize,
    full: bool,
    keys: usize,
    p: *const f32,
    v: *const f32,
    stride: usize,
    o: *mut f32,
    keep: &[u16],
) {
    // SAFETY (all): the caller's contract.
    unsafe {
        match (band, full) {
            (1, true) => micro::pv::<C, 1, false>(keys, p, v, stride, o, None, keep),
            (2, true) => micro::pv::<C, 2, false>(keys, p, v, stride, o, None, keep),
            (3, true) => micro::pv::<C, 3, false>(keys, p, v, stride, o, None, keep),
            (_, true) => micro::pv::<C, 4, false>(keys, p, v, stride, o, None, keep),
            (1, false) => micro::pv::<C, 1, true>(keys, p, v, stride, o, None, keep),
            (2, false) => micro::pv::<C, 2, true>(keys, p, v, stride, o, None, keep),
            (3, false) => micro::pv::<C, 3, true>(keys, p, v, stride, o, None, keep),
            (_, false) => micro::pv::<C, 4, true>(keys, p, v, stride, o, None, keep),
        }
    }
}

/// `Oᵀ[c][row vector r] *= alpha[r]` for `columns` columns: the rescale [`micro::pv`] would
/// fold into its loads, applied once before a partial tile's segments.
///
/// # Safety
/// AVX-512 is present; `o` holds `columns·64` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn rescale<const RV: usize>(o: *mut f32, columns: usize, alpha: &[__m512; RV]) {
    for c in 0..columns {
        for (r, a) in alpha.iter().enumerate() {
            let at = o.wrapping_add(c * QUERY_TILE + r * LANES);
            // SAFETY: c < columns, r < RV ≤ 4: inside `o`.
            unsafe { _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), *a)) };
        }
    }
}
