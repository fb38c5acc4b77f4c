//! Into and out of the rows-in-lanes layout: Q packed transposed, O written back by rows,
//! both through 16 × 16 register transposes ([`transpose16`]).

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::transpose::transpose16;
use super::super::widen::{first_lanes, Widen};
use super::super::QUERY_TILE;

const LANES: usize = 16;

/// `qt[c·64 + lane] = Q[rows.start + lane][c] · scale` for the rows (at most 64) and every
/// `c < d`; lanes past the rows become 0.
///
/// # Safety
/// AVX-512 is present; rows `rows` of Q (`d` elements each, `stride` apart from `q`) are
/// readable; `qt` holds `d·64` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(in super::super) unsafe fn pack_q<E: Widen>(
    q: *const E,
    stride: usize,
    rows: Range<usize>,
    d: usize,
    scale: f32,
    qt: &mut [f32],
) {
    let s = _mm512_set1_ps(scale);
    // Every line of the rows first, in address order: the transposes below read them in
    // column blocks, which the hardware prefetchers do not follow.
    let row_bytes = d * std::mem::size_of::<E>();
    for i in rows.clone() {
        let row = q.wrapping_add(i * stride).cast::<u8>();
        let mut at = 0;
        while at < row_bytes {
            // A prefetch reads nothing and cannot fault.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at).cast());
            at += 64;
        }
    }
    for block in 0..QUERY_TILE / LANES {
        let first = rows.start + block * LANES;
        let count = rows.end.saturating_sub(first).min(LANES);
        let mut c0 = 0;
        while c0 < d {
            let width = (d - c0).min(LANES);
            let mut x = [_mm512_setzero_ps(); 16];
            for (r, v) in x.iter_mut().enumerate().take(count) {
                let at = q.wrapping_add((first + r) * stride + c0);
                // SAFETY: row first + r is one of `rows`; its columns c0..c0 + width exist.
                *v = _mm512_mul_ps(unsafe { E::load_masked(at, first_lanes(width)) }, s);
            }
            transpose16(&mut x);
            for (c, v) in x.iter().enumerate().take(width) {
                let at = (c0 + c) * QUERY_TILE + block * LANES;
                // SAFETY: c0 + c < d: inside the d·64 f32 of `qt`.
                unsafe { _mm512_storeu_ps(qt[at..at + LANES].as_mut_ptr(), *v) };
            }
            c0 += LANES;
        }
    }
}

/// Writes `o[(i − out_start)·row_stride + c] = Oᵀ[c][i − rows.start] / sum` for the rows
/// (`vectors` row vectors) and `c < dv`; rows that kept nothing (`empty`) get zeros.
///
/// # Safety
/// AVX-512 is present; `ot` holds `dv·64` f32; `o` holds every written element.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn write_rows(
    ot: &[f32],
    dv: usize,
    sum: &[__m512],
    empty: &[__mmask16],
    rows: Range<usize>,
    out_start: usize,
    o: &mut [f32],
    row_stride: usize,
) {
    for (block, (&sum, &empty)) in sum.iter().zip(empty).enumerate() {
        // One division per row, then products: at most one more rounding than O/sum.
        let inverse = _mm512_div_ps(_mm512_set1_ps(1.0), sum);
        let first = rows.start + block * LANES;
        let count = rows.end.saturating_sub(first).min(LANES);
        let mut c0 = 0;
        while c0 < dv {
            let width = (dv - c0).min(LANES);
            let mut x = [_mm512_setzero_ps(); 16];
            for (c, v) in x.iter_mut().enumerate().take(width) {
                let at = (c0 + c) * QUERY_TILE + block * LANES;
                // SAFETY: c0 + c < dv: inside the dv·64 f32 of Oᵀ.
                let y = unsafe { _mm512_loadu_ps(ot[at..at + LANES].as_ptr()) };
                *v = _mm512_maskz_mul_ps(!empty, y, inverse);
            }
            transpose16(&mut x);
            for (r, v) in x.iter().enumerate().take(count) {
                let at = (first + r - out_start) * row_stride + c0;
                let dst = o[at..at + width].as_mut_ptr();
                // SAFETY: the `width` lanes stored are the slice just taken.
                unsafe { _mm512_mask_storeu_ps(dst, first_lanes(width), *v) };
            }
            c0 += LANES;
        }
    }
}
