//! Transposes of f32 blocks in 16 × 16 pieces on AVX-512: the backward packs each key tile's
//! K and V rows as `Kᵀ`, `Vᵀ` (keys in the lanes) and writes its `dKᵀ`, `dVᵀ` back as rows.
//!
//! Element by element, each of those moves 4,096 values of a 64 × 64 tile through strided
//! scalar loads and stores: a fifth of a causal window's backward, whose key tiles see only a
//! handful of query tiles each to spread it over. A 16 × 16 piece instead takes 16 row loads,
//! 64 shuffles and 16 row stores.

// Register arrays indexed by constant loop bounds.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::widen::first_lanes;

const LANES: usize = 16;

/// `dst[c·dst_stride + r] = src[r·src_stride + c]` for `r < rows`, `c < cols`.
///
/// Lanes `rows..16` of each written row of `dst` hold zeros when `pad` is set (a packed tile
/// whose keys end early); without it, only lanes `0..rows` of `dst`'s rows are written.
///
/// # Safety
/// AVX-512 is present; `src` has `rows` rows of `cols` readable f32, `src_stride` apart; `dst`
/// has `cols` rows `dst_stride` apart with 16 (with `pad`) or `rows` writable f32 each;
/// `rows, cols ≤ 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn transpose16(
    src: *const f32,
    src_stride: usize,
    (rows, cols): (usize, usize),
    dst: *mut f32,
    dst_stride: usize,
    pad: bool,
) {
    debug_assert!(rows <= LANES && cols <= LANES);
    let lanes = first_lanes(cols);
    let mut r = [_mm512_setzero_ps(); LANES];
    for i in 0..rows {
        // SAFETY: row i < rows holds cols readable f32 (the mask).
        r[i] = unsafe { _mm512_maskz_loadu_ps(lanes, src.add(i * src_stride)) };
    }
    // Pairs of rows interleaved by element, then by pairs of elements: `u[4g + j]` holds, in
    // its 128-bit lane k, column 4k + j of rows 4g..4g + 4.
    let mut t = [_mm512_setzero_ps(); LANES];
    for p in 0..LANES / 2 {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    let mut u = [_mm512_setzero_ps(); LANES];
    for g in 0..LANES / 4 {
        let pd = |x: __m512| _mm512_castps_pd(x);
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // 128-bit lanes of row groups 0–1 and 2–3 combined: `v[8h + j]` holds columns j and j + 8,
    // `v[8h + j + 4]` columns j + 4 and j + 12, each for rows 8h..8h + 8 in two lanes.
    let mut v = [_mm512_setzero_ps(); LANES];
    for h in 0..2 {
        for j in 0..4 {
            let (a, b) = (u[8 * h + j], u[8 * h + j + 4]);
            v[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            v[8 * h + j + 4] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    let mut out = [_mm512_setzero_ps(); LANES];
    for j in 0..8 {
        // Lanes 0 and 2 of each give column j, lanes 1 and 3 column j + 8.
        out[j] = _mm512_shuffle_f32x4::<0x88>(v[j], v[j + 8]);
        out[j + 8] = _mm512_shuffle_f32x4::<0xdd>(v[j], v[j + 8]);
    }
    let store = if pad { 0xffff } else { first_lanes(rows) };
    for c in 0..cols {
        // SAFETY: row c < cols of dst holds the stored lanes.
        unsafe { _mm512_mask_storeu_ps(dst.add(c * dst_stride), store, out[c]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    #[test]
    fn every_piece_is_the_elementwise_transpose() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let (src_stride, dst_stride) = (19, 21);
        let src: Vec<f32> = (0..16 * src_stride).map(|i| i as f32 + 0.5).collect();
        for rows in 0..=16 {
            for cols in 0..=16 {
                for pad in [false, true] {
                    let mut dst = vec![-1.0f32; 16 * dst_stride];
                    // SAFETY: AVX-512 was detected; 16 rows of each stride, both ≥ 16.
                    unsafe {
                        transpose16(
                            src.as_ptr(),
                            src_stride,
                            (rows, cols),
                            dst.as_mut_ptr(),
                            dst_stride,
                            pad,
                        )
                    };
                    for c in 0..16 {
                        for r in 0..dst_stride {
                            let got = dst[c * dst_stride + r];
                            let want = if c >= cols || r >= 16 || (r >= rows && !pad) {
                                -1.0
                            } else if r >= rows {
                                0.0
                            } else {
                                src[r * src_stride + c]
                            };
                            assert_eq!(got, want, "rows {rows} cols {cols} pad {pad} at {c},{r}");
                        }
                    }
                }
            }
        }
    }
}
