//! Element masks of partial tiles: 16 rows (the lanes of a score vector) for one key.
//!
//! A [`KeyMask`] is compiled once per call into a tree whose leaves are intervals of the aligned
//! row index `i'` for the key `j` (`causal: i' ≥ j`, `window: j − w ≤ i' ≤ j + w`, `block`,
//! `global`), plus a residue class for dilated patterns. A leaf becomes a lane mask by two
//! AVX-512 compares of the lane index against the interval's ends relative to the first row
//! (clamped, so any `i'`, `j` and width work without overflow); dilation compares `lane mod r`
//! (precomputed) with `(j − i'₀) mod r`.

use std::arch::x86_64::*;

use crate::problem::{CallError, KeyMask};

/// Deepest `And`/`Or` nesting compiled (the compiler's patterns are a few levels deep).
const MAX_DEPTH: usize = 64;

/// A compiled [`KeyMask`].
pub(crate) enum Mask {
    /// `lo ≤ i' − j ≤ hi`: causal (`0..∞`), window (`−w..w`) and their intersections, the
    /// common patterns, evaluated without recursion.
    Band {
        lo: i128,
        hi: i128,
    },
    Dilated {
        reach: i128,
        stride: i128,
        /// `lane mod stride` for lanes 0..16.
        lane_mod: [i32; 16],
    },
    Global(i128),
    Block(i128),
    And(Box<Mask>, Box<Mask>),
    Or(Box<Mask>, Box<Mask>),
}

impl Mask {
    /// Compiles `mask`; refuses nesting deeper than [`MAX_DEPTH`].
    pub(crate) fn compile(mask: &KeyMask) -> Result<Mask, CallError> {
        compile_at(mask, 0)
    }

    /// The rows `i'₀ .. i'₀ + 16` (aligned to the keys) that keep key `j`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(crate) fn keeps(&self, ia0: i128, j: i128) -> __mmask16 {
        const FAR: i128 = i128::MAX / 4;
        match self {
            Mask::Band { lo, hi } => interval(j + lo, j + hi, ia0),
            Mask::Dilated {
                reach,
                stride,
                lane_mod,
            } => {
                let near = interval(j - reach, j + reach, ia0);
                // i' ≡ j (mod r) ⟺ lane mod r = (j − i'₀) mod r.
                let class = (j - ia0).rem_euclid(*stride) as i32;
                // SAFETY: `lane_mod` is 16 readable i32.
                let lanes = unsafe { _mm512_loadu_si512(lane_mod.as_ptr().cast()) };
                near & _mm512_cmpeq_epi32_mask(lanes, _mm512_set1_epi32(class))
            }
            Mask::Global(g) => {
                if j < *g {
                    0xFFFF
                } else {
                    interval(-FAR, g - 1, ia0)
                }
            }
            Mask::Block(b) => {
                let lo = j.div_euclid(*b) * b;
                interval(lo, lo + b - 1, ia0)
            }
            Mask::And(a, b) => a.keeps(ia0, j) & b.keeps(ia0, j),
            Mask::Or(a, b) => a.keeps(ia0, j) | b.keeps(ia0, j),
        }
    }
}

fn compile_at(mask: &KeyMask, depth: usize) -> Result<Mask, CallError> {
    if depth > MAX_DEPTH {
        return Err(CallError::Shape(format!(
            "the key mask nests deeper than {MAX_DEPTH}"
        )));
    }
    // Keys lie within ±2^64 of any row: wider offsets change nothing.
    const FAR: i128 = 1 << 100;
    Ok(match mask {
        // The planner runs document masks on the AVX-512 tier only.
        KeyMask::Document | KeyMask::TopkBlocks => {
            return Err(CallError::Shape(
                "document and topk_blocks masks run on the avx-512 tier, not amx".to_string(),
            ))
        }
        KeyMask::Causal => Mask::Band { lo: 0, hi: FAR },
        KeyMask::Window(w) => Mask::Band {
            lo: -(*w as i128),
            hi: *w as i128,
        },
        KeyMask::Dilated { w, r } => {
            let stride = (*r).max(1) as i128;
            let mut lane_mod = [0i32; 16];
            for (l, m) in lane_mod.iter_mut().enumerate() {
                *m = (l as i128 % stride) as i32;
            }
            Mask::Dilated {
                // Keys lie within ±2^64 of any row: a longer reach changes nothing.
                reach: (*w as i128).saturating_mul(stride).min(1 << 100),
                stride,
                lane_mod,
            }
        }
        KeyMask::Global(g) => Mask::Global(*g as i128),
        KeyMask::Block(b) => Mask::Block((*b).max(1) as i128),
        KeyMask::And(a, b) => match (compile_at(a, depth + 1)?, compile_at(b, depth + 1)?) {
            (Mask::Band { lo: a0, hi: a1 }, Mask::Band { lo: b0, hi: b1 }) => Mask::Band {
                lo: a0.max(b0),
                hi: a1.min(b1),
            },
            (a, b) => Mask::And(Box::new(a), Box::new(b)),
        },
        KeyMask::Or(a, b) => Mask::Or(
            Box::new(compile_at(a, depth + 1)?),
            Box::new(compile_at(b, depth + 1)?),
        ),
    })
}

/// The lanes `l` with `lo ≤ i'₀ + l ≤ hi`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn interval(lo: i128, hi: i128, ia0: i128) -> __mmask16 {
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let lo = (lo - ia0).clamp(-1, 16) as i32;
    let hi = (hi - ia0).clamp(-1, 16) as i32;
    _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(lo))
        & _mm512_cmple_epi32_mask(lanes, _mm512_set1_epi32(hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    #[test]
    fn compiled_masks_agree_with_the_reference_predicate() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let masks = [
            KeyMask::Causal,
            KeyMask::Window(3),
            KeyMask::Window(0),
            KeyMask::Dilated { w: 2, r: 3 },
            KeyMask::Dilated { w: 40, r: 20 },
            KeyMask::Dilated { w: 5, r: 0 },
            KeyMask::Global(5),
            KeyMask::Block(7),
            KeyMask::Block(0),
            KeyMask::Window(u64::MAX),
            KeyMask::And(Box::new(KeyMask::Causal), Box::new(KeyMask::Window(9))),
            KeyMask::Or(
                Box::new(KeyMask::Global(2)),
                Box::new(KeyMask::And(
                    Box::new(KeyMask::Causal),
                    Box::new(KeyMask::Block(16)),
                )),
            ),
        ];
        for (m, n) in [(50usize, 70usize), (70, 50), (3, 3)] {
            for mask in &masks {
                let compiled = Mask::compile(mask).expect("shallow mask");
                for j in 0..n {
                    for i0 in (0..m).step_by(16) {
                        let ia0 = i0 as i128 + n as i128 - m as i128;
                        // SAFETY: AVX-512 checked above.
                        let got = unsafe { compiled.keeps(ia0, j as i128) };
                        for l in 0..16.min(m - i0) {
                            let want = mask.keeps(i0 + l, j, m, n);
                            assert_eq!(got >> l & 1 == 1, want, "{mask:?} ({}, {j})", i0 + l);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn deep_masks_are_refused() {
        let mut mask = KeyMask::Causal;
        for _ in 0..100 {
            mask = KeyMask::And(Box::new(mask), Box::new(KeyMask::Causal));
        }
        assert!(Mask::compile(&mask).is_err());
        // Dropping a 100-deep mask is fine; a deeper one is the caller's concern.
    }
}
