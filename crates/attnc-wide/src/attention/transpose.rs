//! Transposes of f32 in 16 × 16 pieces on AVX-512: 16 vectors in registers ([`transpose16`]:
//! the forward packs Q and writes O back through it, `tile/layout.rs`), and pieces of strided
//! blocks ([`transpose_piece`]): the backward packs each key tile's K and V rows as `Kᵀ`, `Vᵀ`
//! (keys in the lanes) and writes its `dKᵀ`, `dVᵀ` back as rows.
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

/// Transposes 16 vectors (rows) of 16 lanes in place: lane `c` of vector `r` goes to lane `r`
/// of vector `c`. Four rounds of 16 shuffles.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn transpose16(x: &mut [__m512; 16]) {
    // Pairs of rows interleaved within 128-bit lanes.
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(x[2 * k], x[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(x[2 * k], x[2 * k + 1]);
    }
    // u[4k + e], 128-bit lane q: rows 4k..4k+4 at column 4q + e.
    let mut u = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        u[4 * k] = _mm512_shuffle_ps::<0x44>(t[4 * k], t[4 * k + 2]);
        u[4 * k + 1] = _mm512_shuffle_ps::<0xee>(t[4 * k], t[4 * k + 2]);
        u[4 * k + 2] = _mm512_shuffle_ps::<0x44>(t[4 * k + 1], t[4 * k + 3]);
        u[4 * k + 3] = _mm512_shuffle_ps::<0xee>(t[4 * k + 1], t[4 * k + 3]);
    }
    // Gather the four 128-bit lanes of each column.
    for e in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[e], u[4 + e]);
        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + e], u[12 + e]);
        x[e] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
        x[8 + e] = _mm512_shuffle_f32x4::<0xdd>(v0, w0);
        x[4 + e] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
        x[12 + e] = _mm512_shuffle_f32x4::<0xdd>(v1, w1);
    }
}

/// `dst[c·dst_stride + r] = src[r·src_stride + c]` for `r < rows`, `c < cols`: one piece of a
/// strided block, through [`transpose16`].
///
/// Lanes `rows..16` of each written row of `dst` hold zeros when `pad` is set (a packed tile
/// whose keys end early); without it, only lanes `0..rows` of `dst`'s rows are written.
///
/// # Safety
/// AVX-512 is present; `src` has `rows` rows of `cols` readable f32, `src_stride` apart; `dst`
/// has `cols` rows `dst_stride` apart with 16 (with `pad`) or `rows` writable f32 each;
/// `rows, cols ≤ 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn transpose_piece(
    src: *const f32,
    src_stride: usize,
    (rows, cols): (usize, usize),
    dst: *mut f32,
    dst_stride: usize,
    pad: bool,
) {
    debug_assert!(rows <= LANES && cols <= LANES);
    let lanes = first_lanes(cols);
    let mut x = [_mm512_setzero_ps(); LANES];
    for i in 0..rows {
        // SAFETY: row i < rows holds cols readable f32 (the mask).
        x[i] = unsafe { _mm512_maskz_loadu_ps(lanes, src.add(i * src_stride)) };
    }
    transpose16(&mut x);
    let store = if pad { 0xffff } else { first_lanes(rows) };
    for c in 0..cols {
        // SAFETY: row c < cols of dst holds the stored lanes.
        unsafe { _mm512_mask_storeu_ps(dst.add(c * dst_stride), store, x[c]) };
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
                        transpose_piece(
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

    #[test]
    fn transpose16_transposes() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut m = [[0.0f32; 16]; 16];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = (r * 16 + c) as f32;
            }
        }
        let mut out = [[0.0f32; 16]; 16];
        // SAFETY: AVX-512 was detected; every array holds 16 f32.
        unsafe {
            let mut x = [_mm512_setzero_ps(); 16];
            for (r, v) in x.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(m[r].as_ptr());
            }
            transpose16(&mut x);
            for (r, v) in x.iter().enumerate() {
                _mm512_storeu_ps(out[r].as_mut_ptr(), *v);
            }
        }
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(out[c][r], m[r][c]);
            }
        }
    }
}
