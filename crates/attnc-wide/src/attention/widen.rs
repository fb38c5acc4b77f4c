//! Operand elements widened to f32 on load: f32 as is, bf16 by a 16-bit shift, f16 by
//! `vcvtph2ps`.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::problem::Elements;

/// An element type the kernels read as f32.
pub(super) trait Widen: Copy {
    /// 16 consecutive elements from `p` as f32.
    ///
    /// # Safety
    /// AVX-512 is present and `p` points at 16 readable elements.
    unsafe fn load(p: *const Self) -> __m512;

    /// The elements of the lanes set in `lanes` (lane `l` at `p + l`), 0 elsewhere; only those
    /// elements are read.
    ///
    /// # Safety
    /// AVX-512 is present and every element of a set lane is readable.
    unsafe fn load_masked(p: *const Self, lanes: __mmask16) -> __m512;

    /// Whether [`Widen::load_pair`] returns even and odd elements (else first and last 16).
    const INTERLEAVED: bool;

    /// 32 consecutive elements from `p` as two f32 vectors, the elements of `lanes` (the
    /// others 0, not read): even and odd elements for bf16 (one load, a shift and a mask: half
    /// the work of two widening loads), first and last 16 otherwise.
    ///
    /// # Safety
    /// AVX-512 is present and every element of a set lane is readable.
    unsafe fn load_pair(p: *const Self, lanes: __mmask32) -> (__m512, __m512);
}

impl Widen for f32 {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_masked(p: *const f32, lanes: __mmask16) -> __m512 {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        unsafe { _mm512_maskz_loadu_ps(lanes, p) }
    }

    const INTERLEAVED: bool = false;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_pair(p: *const f32, lanes: __mmask32) -> (__m512, __m512) {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        unsafe {
            (
                _mm512_maskz_loadu_ps(lanes as __mmask16, p),
                _mm512_maskz_loadu_ps((lanes >> 16) as __mmask16, p.add(16)),
            )
        }
    }
}

impl Widen for bf16 {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load(p: *const bf16) -> __m512 {
        // SAFETY: bf16 is a transparent u16; the caller guarantees 16 readable elements.
        let raw = unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_masked(p: *const bf16, lanes: __mmask16) -> __m512 {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        let raw = unsafe { _mm256_maskz_loadu_epi16(lanes, p.cast::<i16>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }

    const INTERLEAVED: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_pair(p: *const bf16, lanes: __mmask32) -> (__m512, __m512) {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        let raw = unsafe { _mm512_maskz_loadu_epi16(lanes, p.cast::<i16>()) };
        // 32-bit lane l holds elements 2l (low half) and 2l + 1 (high half).
        let even = _mm512_slli_epi32::<16>(raw);
        let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }
}

impl Widen for f16 {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load(p: *const f16) -> __m512 {
        // SAFETY: f16 is a transparent u16; the caller guarantees 16 readable elements.
        let raw = unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) };
        _mm512_cvtph_ps(raw)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_masked(p: *const f16, lanes: __mmask16) -> __m512 {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        let raw = unsafe { _mm256_maskz_loadu_epi16(lanes, p.cast::<i16>()) };
        _mm512_cvtph_ps(raw)
    }

    const INTERLEAVED: bool = false;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_pair(p: *const f16, lanes: __mmask32) -> (__m512, __m512) {
        // SAFETY: masked lanes are not accessed; the caller guarantees the others.
        unsafe {
            (
                Self::load_masked(p, lanes as __mmask16),
                Self::load_masked(p.add(16), (lanes >> 16) as __mmask16),
            )
        }
    }
}

/// The 16-bit lanes `0..count` of a 32-lane mask (all for `count ≥ 32`).
#[inline]
pub(super) fn first_lanes32(count: usize) -> __mmask32 {
    if count >= 32 {
        u32::MAX
    } else {
        (1u32 << count) - 1
    }
}

/// Reorders 32-element blocks of `x` (the last one padded with zeros) into the pair order of
/// [`Widen::load_pair`] for `E`: for interleaved types, even elements then odd ones.
pub(super) fn pair_order<E: Widen>(x: &mut [f32]) {
    if !E::INTERLEAVED {
        return;
    }
    for block in x.chunks_exact_mut(32) {
        let mut y = [0.0f32; 32];
        for l in 0..16 {
            y[l] = block[2 * l];
            y[16 + l] = block[2 * l + 1];
        }
        block.copy_from_slice(&y);
    }
}

/// Undoes [`pair_order`] on one 32-element block into `out` (`out.len() ≤ 32`).
pub(super) fn natural_order<E: Widen>(block: &[f32], out: &mut [f32]) {
    for (c, x) in out.iter_mut().enumerate() {
        *x = if E::INTERLEAVED {
            block[(c % 2) * 16 + c / 2]
        } else {
            block[c]
        };
    }
}

/// The lanes `0..count` (all 16 for `count ≥ 16`).
#[inline]
pub(crate) fn first_lanes(count: usize) -> __mmask16 {
    if count >= 16 {
        0xffff
    } else {
        ((1u32 << count) - 1) as __mmask16
    }
}

/// `dst[c] = src[c] · scale` for `c < dst.len()`, widened.
///
/// # Safety
/// AVX-512 is present.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn widen_scaled<E: Widen>(src: &[E], dst: &mut [f32], scale: f32) {
    let len = dst.len().min(src.len());
    let s = _mm512_set1_ps(scale);
    let mut c = 0;
    while c < len {
        let lanes = first_lanes(len - c);
        // SAFETY: lanes cover `c..min(c + 16, len)`, inside both slices.
        unsafe {
            let x = E::load_masked(src.as_ptr().add(c), lanes);
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(c), lanes, _mm512_mul_ps(x, s));
        }
        c += 16;
    }
}

/// Row `row` of a row-major operand (`cols` elements, rows `stride` apart), widened and
/// scaled into `dst` (`cols` long).
///
/// # Safety
/// AVX-512 is present and the row lies inside `data`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn widen_row(
    data: Elements<'_>,
    row: usize,
    stride: usize,
    dst: &mut [f32],
    scale: f32,
) {
    let start = row * stride;
    let end = start + dst.len();
    // SAFETY (all three): AVX-512 is present (the caller's contract).
    match data {
        Elements::F32(x) => unsafe { widen_scaled(&x[start..end], dst, scale) },
        Elements::F16(x) => unsafe { widen_scaled(&x[start..end], dst, scale) },
        Elements::Bf16(x) => unsafe { widen_scaled(&x[start..end], dst, scale) },
    }
}

/// Rows `rows` of a row-major operand (`cols` elements, rows `stride` apart, from `src`)
/// widened into `dst`, row `rows.start + r` at `r · cols`: one typed loop for a whole key tile.
///
/// # Safety
/// AVX-512 is present, the rows lie inside the operand and `dst` holds `rows.len() · cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn widen_rows<E: Widen>(
    src: *const E,
    stride: usize,
    rows: std::ops::Range<usize>,
    cols: usize,
    dst: &mut [f32],
) {
    assert!(
        dst.len() >= rows.len() * cols,
        "invariant: the tile buffer holds the rows"
    );
    let (full, tail) = (cols / 16, first_lanes(cols % 16));
    let mut out = dst.as_mut_ptr();
    for j in rows {
        let row = src.wrapping_add(j * stride);
        // SAFETY: row j's `cols` elements are readable (the caller's contract); `out` stays
        // inside `dst` (checked above).
        unsafe {
            for c in 0..full {
                _mm512_storeu_ps(out.add(c * 16), E::load(row.add(c * 16)));
            }
            if tail != 0 {
                let x = E::load_masked(row.add(full * 16), tail);
                _mm512_mask_storeu_ps(out.add(full * 16), tail, x);
            }
            out = out.add(cols);
        }
    }
}
