//! Headroom for the softmax weights: the power of two `2^B` by which a query tile's weights
//! are scaled.
//!
//! Scaling every weight, hence O and the row sums alike, by `2^B` leaves `O / sum` exactly
//! as it was (a power of two rounds nothing), but moves the products `p·v` of tiny weights out
//! of the subnormal range. Rows whose scores spread over more than ~87 nats (peaked attention,
//! large logits) otherwise produce subnormal products in `P·V` on every key tile, and each
//! one costs a microcode assist: measured 5–7× slower at h=4, n=4096, d=128 with scores of
//! standard deviation 30. `B` is chosen from the largest `|v|` of the call so that
//! `n · 2^B · max|v|` stays below the f32 range: nothing that was finite overflows.

use std::arch::x86_64::*;

use crate::problem::{Call, Elements, Operand};

/// The largest offset: weights down to `2⁻¹²⁷` (the kernel's cut) become `2⁻⁶³` and more.
const MAX_OFFSET: i32 = 64;

/// Bit pattern of `|x|` above which `x` is not finite.
const INFINITY_BITS: u32 = 0x7f80_0000;

/// f16 holds nothing beyond 65504 < 2¹⁶ but ±∞, which leaves no finite value to overflow:
/// its bound needs no pass over the data.
const F16_LARGEST_BITS: u32 = 0x477f_e000; // 65504.0

/// The exponent `B` for `call` from `largest`, the [`value_magnitude_bits`] of its values; 0
/// when any of them is NaN or infinite (scaling cannot change a non-finite result, but keeps
/// no finite one from overflowing either). It depends on the values only, so every split of
/// the rows gets the same bits.
pub(super) fn weight_offset(call: &Call<'_>, largest: u32) -> i32 {
    if largest >= INFINITY_BITS {
        return 0;
    }
    // |v| < 2^(e + 1) and at most n terms: n · 2^B · |v| < 2^(⌈log2 n⌉ + B + e + 1) ≤ 2^125.
    let exponent = (largest >> 23) as i32 - 127;
    let terms = call.n().max(1).next_power_of_two().trailing_zeros() as i32;
    (125 - terms - exponent - 1).clamp(0, MAX_OFFSET)
}

/// The largest `|x|` bit pattern over every row of `v` (NaN above ∞ above every finite).
///
/// # Safety
/// AVX-512 is present; every row lies inside the operand's elements.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(in super::super) unsafe fn value_magnitude_bits(v: &Operand<'_>) -> u32 {
    if let Elements::F16(_) = v.data {
        return F16_LARGEST_BITS;
    }
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let mut acc = _mm512_setzero_si512();
    for r in 0..v.rows {
        let at = r * v.row_stride;
        let mut c = 0;
        while c < v.cols {
            let lanes = (v.cols - c).min(16);
            let mask = if lanes == 16 {
                0xffff
            } else {
                ((1u32 << lanes) - 1) as __mmask16
            };
            // SAFETY: columns c..c + lanes of row r lie inside the operand; masked lanes are
            // not read.
            let x = unsafe {
                match v.data {
                    Elements::F32(d) => {
                        _mm512_maskz_loadu_epi32(mask, d.as_ptr().add(at + c).cast())
                    }
                    Elements::Bf16(d) => _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_maskz_loadu_epi16(mask, d.as_ptr().add(at + c).cast()),
                    )),
                    Elements::F16(_) => _mm512_setzero_si512(),
                }
            };
            acc = _mm512_max_epu32(acc, _mm512_and_si512(x, magnitude));
            c += lanes;
        }
    }
    _mm512_reduce_max_epu32(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{Score, TileTable};

    fn offset_for(values: &[f32], n: usize) -> i32 {
        let zeros = vec![0.0f32; n];
        let operand = |data: &'static [f32], cols| Operand {
            data: Elements::F32(data),
            rows: n,
            cols,
            row_stride: cols,
        };
        let q: &'static [f32] = Box::leak(zeros.clone().into_boxed_slice());
        let v: &'static [f32] = Box::leak(values.to_vec().into_boxed_slice());
        let tiles = TileTable::dense(n, n, 64, 64);
        let call = Call {
            q: operand(q, 1),
            k: operand(q, 1),
            v: operand(v, values.len() / n),
            score: Score::scaled(1.0),
            mask: None,
            tiles: &tiles,
            segments: None,
            blocks: None,
        };
        weight_offset(&call, unsafe { value_magnitude_bits(&call.v) })
    }

    #[test]
    fn offsets_keep_the_largest_product_finite() {
        if !crate::attention::available() {
            return;
        }
        // Ordinary values get the whole offset.
        assert_eq!(offset_for(&[1.0, -3.0, 0.5, 2.0], 4), MAX_OFFSET);
        // Large values leave room for n of them: 4 · 2^B · 1e30 stays finite.
        let b = offset_for(&[1e30, 1.0, 1.0, 1.0], 4);
        assert!(b < MAX_OFFSET && (4.0 * 2f64.powi(b) * 1e30) < f32::MAX as f64);
        // Near the f32 limit, NaN or ∞: no offset.
        assert_eq!(offset_for(&[3e38, 1.0, 1.0, 1.0], 4), 0);
        assert_eq!(offset_for(&[f32::NAN, 1.0, 1.0, 1.0], 4), 0);
        assert_eq!(offset_for(&[f32::NEG_INFINITY, 1.0, 1.0, 1.0], 4), 0);
        // Zeros and subnormals only: the whole offset.
        assert_eq!(offset_for(&[0.0, 1e-42, -0.0, 0.0], 4), MAX_OFFSET);
        // A row of 17 columns reads its tail lane too.
        let mut wide = vec![1.0f32; 17];
        wide[16] = f32::INFINITY;
        assert_eq!(offset_for(&wide, 1), 0);
    }
}
