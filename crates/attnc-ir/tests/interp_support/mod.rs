//! Test support shared by the interpreter tests: arrays, a deterministic generator, and the
//! independent reference (masks written from the LANGUAGE.md table, naive attention loops).
#![allow(dead_code)]

use attnc_ir::MaskPattern;
use ndarray::{ArrayD, IxDyn};

pub fn arr(shape: &[usize], data: Vec<f64>) -> ArrayD<f64> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("test array shape")
}

/// Deterministic pseudo-random values in [-2, 2) (xorshift).
pub fn random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
    })
}

pub fn assert_close(got: &ArrayD<f64>, want: &ArrayD<f64>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "shape");
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        let same = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(same, "at {idx:?}: got {g}, want {w}");
    }
}

/// LANGUAGE.md §3, written out: `i' = i + (n - m)`.
pub fn ref_keeps(p: &MaskPattern, i: usize, j: usize, m: usize, n: usize) -> bool {
    let ip = i as i64 + n as i64 - m as i64;
    let jj = j as i64;
    match p {
        MaskPattern::Causal => jj <= ip,
        MaskPattern::Window(w) => (ip - jj).abs() <= *w as i64,
        MaskPattern::Dilated { w, r } => {
            (ip - jj).abs() <= (*w * *r) as i64 && (ip - jj) % (*r as i64) == 0
        }
        MaskPattern::Global(g) => ip < *g as i64 || jj < *g as i64,
        MaskPattern::Block(b) => {
            ((ip as f64) / (*b as f64)).floor() == ((jj as f64) / (*b as f64)).floor()
        }
        MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => {
            panic!("a data-dependent pattern needs its data")
        }
        MaskPattern::And(a, b) => ref_keeps(a, i, j, m, n) && ref_keeps(b, i, j, m, n),
        MaskPattern::Or(a, b) => ref_keeps(a, i, j, m, n) || ref_keeps(b, i, j, m, n),
    }
}

/// `softmax(mask(q kᵀ / sqrt(d))) v` with plain loops; masked keys are skipped, and a row with
/// no kept key gives zeros.
pub fn ref_attention(
    q: &ArrayD<f64>,
    k: &ArrayD<f64>,
    v: &ArrayD<f64>,
    pattern: Option<&MaskPattern>,
) -> ArrayD<f64> {
    let (h, m, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let n = k.shape()[1];
    let dv = v.shape()[2];
    let mut out = ArrayD::zeros(IxDyn(&[h, m, dv]));
    for hh in 0..h {
        for i in 0..m {
            let mut scores = Vec::new();
            for j in 0..n {
                if pattern.is_none_or(|p| ref_keeps(p, i, j, m, n)) {
                    let mut s = 0.0;
                    for c in 0..d {
                        s += q[[hh, i, c]] * k[[hh, j, c]];
                    }
                    scores.push((j, s / (d as f64).sqrt()));
                }
            }
            if scores.is_empty() {
                continue;
            }
            let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
            for &(j, s) in &scores {
                let weight = (s - max).exp() / total;
                for c in 0..dv {
                    out[[hh, i, c]] += weight * v[[hh, j, c]];
                }
            }
        }
    }
    out
}
