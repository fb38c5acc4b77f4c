//! `document(...)` masks on the interpreter against an independently written loop: segment
//! layouts with empty and single-token documents, unsorted ids, m ≠ n (queries end-aligned,
//! and a query before the first key keeps nothing), broadcast segment ids, and the checker's
//! messages for misuse of i32 parameters.

use attnc_ir::bind::bind_shapes;
use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, Kernel};
use ndarray::{ArrayD, IxDyn};

fn lower(src: &str) -> Result<Kernel, String> {
    let (file, diagnostics) = attnc_syntax::parse(src);
    if !diagnostics.is_empty() {
        return Err(format!("{diagnostics:?}"));
    }
    attnc_ir::lower::lower_file(&file)
        .map(|mut m| m.kernels.remove(0))
        .map_err(|e| format!("{e:?}"))
}

fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let bindings = bind_shapes(kernel, &shapes, &Bindings::new()).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

/// Deterministic values in [-1, 1).
fn values(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 1.0
    })
}

fn ids(v: &[i32]) -> ArrayD<f64> {
    ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.iter().map(|&x| f64::from(x)).collect())
        .expect("shape")
}

/// `mask(x, keep, fill)` written out: the kept set decided by `keep(i, j)`.
fn reference_mask(x: &ArrayD<f64>, keep: impl Fn(usize, usize) -> bool) -> ArrayD<f64> {
    let rank = x.ndim();
    let n = x.shape()[rank - 1];
    let m = x.shape()[rank - 2];
    let mut out = x.clone();
    for (e, v) in out.iter_mut().enumerate() {
        let (i, j) = ((e / n) % m, e % n);
        if !keep(i, j) {
            *v = -7.0;
        }
    }
    out
}

const SINGLE: &str = "kernel k(x: f32[h, m, n], seg: i32[n]) -> f32[h, m, n] {
    return mask(x, document(seg), -7);
}";

#[test]
fn document_keeps_equal_ids_with_end_alignment() {
    let kernel = lower(SINGLE).expect("lower");
    let layouts: [&[i32]; 5] = [
        &[0, 0, 0, 1, 1, 2, 3, 3, 3],
        &[5],
        &[2, 1, 2, 1, 7, 7, 2],
        &[0, 1, 2, 3, 4, 5],
        &[9, 9, 9, 9],
    ];
    for seg in layouts {
        let n = seg.len();
        for m in [n, 1, n.saturating_sub(2).max(1), n + 3] {
            let x = values(&[2, m, n], 7);
            let got = run(&kernel, &[x.clone(), ids(seg)]);
            let want = reference_mask(&x, |i, j| {
                let ia = i as i64 + n as i64 - m as i64;
                ia >= 0 && seg[ia as usize] == seg[j]
            });
            assert_eq!(got, want, "seg {seg:?} m {m}");
        }
    }
}

#[test]
fn two_operand_document_and_combinations() {
    let kernel = lower(
        "kernel k(x: f32[m, n], qs: i32[m], ks: i32[n]) -> f32[m, n] {
            return mask(x, causal & document(qs, ks) | global(1), -7);
        }",
    )
    .expect("lower");
    let qs = [3, 1, 1, 4];
    let ks = [1, 1, 3, 4, 4, 1];
    let (m, n) = (4, 6);
    let x = values(&[m, n], 3);
    let got = run(&kernel, &[x.clone(), ids(&qs), ids(&ks)]);
    let want = reference_mask(&x, |i, j| {
        let ia = i + n - m;
        (j <= ia && qs[i] == ks[j]) || ia < 1 || j < 1
    });
    assert_eq!(got, want);
}

#[test]
fn batched_segment_ids_match_leading_axes_from_the_left() {
    let kernel = lower(
        "kernel k(x: f32[b, h, n, n], seg: i32[b, n]) -> f32[b, h, n, n] {
            return mask(x, document(seg), -7);
        }",
    )
    .expect("lower");
    let seg = [[0, 0, 1], [4, 5, 5]];
    let x = values(&[2, 3, 3, 3], 11);
    let flat: Vec<f64> = seg.iter().flatten().map(|&v| f64::from(v)).collect();
    let s = ArrayD::from_shape_vec(IxDyn(&[2, 3]), flat).expect("shape");
    let got = run(&kernel, &[x.clone(), s]);
    let mut want = x.clone();
    for (e, v) in want.iter_mut().enumerate() {
        let (b, i, j) = (e / 27, (e / 3) % 3, e % 3);
        if seg[b][i] != seg[b][j] {
            *v = -7.0;
        }
    }
    assert_eq!(got, want);
}

#[test]
fn document_attention_matches_per_document_softmax() {
    let kernel = lower(
        "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) -> f32[h, n, d] {
            return softmax(mask(q @ k.T / sqrt(d), causal & document(seg))) @ v;
        }",
    )
    .expect("lower");
    let seg = [0, 0, 1, 2, 2, 2, 0];
    let (h, n, d) = (2, seg.len(), 3);
    let (q, k, v) = (
        values(&[h, n, d], 1),
        values(&[h, n, d], 2),
        values(&[h, n, d], 3),
    );
    let got = run(&kernel, &[q.clone(), k.clone(), v.clone(), ids(&seg)]);
    for b in 0..h {
        for i in 0..n {
            let keys: Vec<usize> = (0..=i).filter(|&j| seg[j] == seg[i]).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..d).map(|c| q[[b, i, c]] * k[[b, j, c]]).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                let want: f64 = keys
                    .iter()
                    .zip(&scores)
                    .map(|(&j, s)| (s - max).exp() / total * v[[b, j, c]])
                    .sum();
                assert!((got[[b, i, c]] - want).abs() < 1e-6, "{b} {i} {c}");
            }
        }
    }
}

#[test]
fn misuse_of_segment_ids_is_a_located_error() {
    let cases = [
        // arithmetic on i32
        (
            "kernel k(x: f32[n, n], seg: i32[n]) -> f32[n, n] { return x + seg; }",
            "i32 array of segment ids",
        ),
        // not an i32 parameter
        (
            "kernel k(x: f32[n, n], seg: f32[n]) -> f32[n, n] { return mask(x, document(seg)); }",
            "needs an i32 parameter",
        ),
        // unknown name
        (
            "kernel k(x: f32[n, n]) -> f32[n, n] { return mask(x, document(seg)); }",
            "not a parameter",
        ),
        // wrong length: names the input and the dimension
        (
            "kernel k(x: f32[m, n], seg: i32[m]) -> f32[m, n] { return mask(x, document(seg)); }",
            "last dimension of segment ids `seg` is `m`",
        ),
        (
            "kernel k(x: f32[m, n], a: i32[n], b: i32[n]) -> f32[m, n] { return mask(x, document(a, b)); }",
            "segment ids `a` is `n`",
        ),
        // an i32 return
        (
            "kernel k(seg: i32[n]) -> i32[n] { return seg; }",
            "i32",
        ),
    ];
    for (src, want) in cases {
        let err = lower(src).expect_err(src);
        assert!(err.contains(want), "{src}: {err}");
    }
}
