//! The interpreter on the hierarchical forms of LANGUAGE.md §5 — `logsumexp`, `softmax_sink`,
//! `mean_pool`, `max_pool`, `cumsum` — against loops written here from the table, on odd
//! shapes (0, 1, blocks that do not divide the rows) and non-finite values.

use attnc_ir::bind::{bind_shapes, BindError};
use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, Kernel};
use ndarray::{ArrayD, IxDyn};

mod interp_support;
use interp_support::{arr, assert_close, random};

fn only(src: &str) -> Kernel {
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "parse: {diagnostics:?}");
    match attnc_ir::lower::lower_file(&file) {
        Ok(mut module) => module.kernels.remove(0),
        Err(errors) => panic!("lower: {errors:?}"),
    }
}

fn lower_error(src: &str) -> String {
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "parse: {diagnostics:?}");
    match attnc_ir::lower::lower_file(&file) {
        Ok(_) => panic!("expected an error: {src}"),
        Err(errors) => errors[0].message.clone(),
    }
}

fn run_with(kernel: &Kernel, inputs: &[ArrayD<f64>], given: &[(&str, u64)]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let given: Bindings = given.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let bindings = bind_shapes(kernel, &shapes, &given).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    run_with(kernel, inputs, &[])
}

/// `log(sum(exp(x)))` along the last axis of `[rows, n]`, written out with its corner cases.
fn ref_logsumexp(x: &ArrayD<f64>) -> ArrayD<f64> {
    let (rows, n) = (x.shape()[0], x.shape()[1]);
    let mut out = Vec::new();
    for r in 0..rows {
        let row: Vec<f64> = (0..n).map(|j| x[[r, j]]).collect();
        let v = if row.iter().any(|v| v.is_nan()) {
            f64::NAN
        } else if row.contains(&f64::INFINITY) {
            f64::INFINITY
        } else if row.iter().all(|&v| v == f64::NEG_INFINITY) {
            f64::NEG_INFINITY
        } else {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        };
        out.push(v);
    }
    arr(&[rows, 1], out)
}

#[test]
fn logsumexp_matches_the_formula_with_its_corner_cases() {
    let kernel = only("kernel f(x: f32[r, n]) -> f32[r, 1] { return logsumexp(x, -1); }");
    for (rows, n, seed) in [(3, 5, 1), (1, 1, 2), (4, 0, 3), (0, 3, 4), (2, 113, 5)] {
        let x = random(&[rows, n], seed).mapv(|v| v * 30.0);
        assert_close(
            &run(&kernel, std::slice::from_ref(&x)),
            &ref_logsumexp(&x),
            1e-12,
        );
    }
    let ninf = f64::NEG_INFINITY;
    let x = arr(
        &[4, 3],
        vec![
            ninf,
            ninf,
            ninf, // all -inf: -inf
            1.0,
            ninf,
            2.0, // masked entries ignored
            1.0,
            f64::INFINITY,
            0.0, // +inf wins
            f64::NAN,
            0.0,
            1.0, // NaN propagates
        ],
    );
    assert_close(
        &run(&kernel, std::slice::from_ref(&x)),
        &ref_logsumexp(&x),
        1e-12,
    );
    // Huge logits stay finite (the maximum is subtracted first; exp(1e30) alone overflows).
    let big = arr(&[1, 2], vec![1e30, 1e30]);
    let got = run(&kernel, &[big]);
    assert_eq!(got[[0, 0]], 1e30 + 2f64.ln());
    // Along another axis, keeping it.
    let kernel = only("kernel f(x: f32[r, n]) -> f32[1, n] { return logsumexp(x, 0); }");
    let x = random(&[3, 4], 9);
    let got = run(&kernel, std::slice::from_ref(&x));
    let want = ref_logsumexp(&x.t().to_owned().into_dyn());
    for j in 0..4 {
        assert!((got[[0, j]] - want[[j, 0]]).abs() < 1e-12);
    }
}

/// `exp(x_j) / (exp(s) + Σ exp(x_k))` over the last axis of `[h, n, c]`, one sink per row.
fn ref_softmax_sink(x: &ArrayD<f64>, sink: impl Fn(usize, usize) -> f64) -> ArrayD<f64> {
    let (h, n, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let mut out = ArrayD::zeros(IxDyn(&[h, n, c]));
    for a in 0..h {
        for i in 0..n {
            let s = sink(a, i);
            let row: Vec<f64> = (0..c).map(|j| x[[a, i, j]]).collect();
            let all_ninf = s == f64::NEG_INFINITY && row.iter().all(|&v| v == f64::NEG_INFINITY);
            if all_ninf {
                continue;
            }
            let m = row.iter().copied().fold(s, f64::max);
            let den: f64 = (s - m).exp() + row.iter().map(|v| (v - m).exp()).sum::<f64>();
            for j in 0..c {
                out[[a, i, j]] = (row[j] - m).exp() / den;
            }
        }
    }
    out
}

#[test]
fn softmax_sink_adds_one_logit_to_every_denominator() {
    let per_head = only(
        "kernel f(x: f32[h, n, c], s: f32[h, 1, 1]) -> f32[h, n, c] { return softmax_sink(x, s); }",
    );
    let per_row = only(
        "kernel f(x: f32[h, n, c], s: f32[h, n, 1]) -> f32[h, n, c] { return softmax_sink(x, s); }",
    );
    let scalar =
        only("kernel f(x: f32[h, n, c], s: f32[]) -> f32[h, n, c] { return softmax_sink(x, s); }");
    for (h, n, c, seed) in [
        (2, 3, 5, 1),
        (1, 1, 1, 2),
        (3, 4, 0, 3),
        (2, 0, 3, 4),
        (1, 5, 17, 5),
    ] {
        let x = random(&[h, n, c], seed).mapv(|v| v * 4.0);
        let s = random(&[h, 1, 1], seed + 10);
        let want = ref_softmax_sink(&x, |a, _| s[[a, 0, 0]]);
        assert_close(&run(&per_head, &[x.clone(), s]), &want, 1e-12);
        let s = random(&[h, n, 1], seed + 20);
        let want = ref_softmax_sink(&x, |a, i| s[[a, i, 0]]);
        assert_close(&run(&per_row, &[x.clone(), s]), &want, 1e-12);
        let s = arr(&[], vec![0.5]);
        let want = ref_softmax_sink(&x, |_, _| 0.5);
        assert_close(&run(&scalar, &[x, s]), &want, 1e-12);
    }
    // A -inf sink is a plain softmax; a fully masked row with a finite sink gives zeros; a
    // fully masked row with a -inf sink gives zeros too, never NaN.
    let ninf = f64::NEG_INFINITY;
    let x = arr(&[1, 3, 2], vec![1.0, 2.0, ninf, ninf, ninf, ninf]);
    let s = arr(&[1, 3, 1], vec![ninf, 0.0, ninf]);
    let got = run(&per_row, &[x.clone(), s]);
    let e = (1f64).exp() + (2f64).exp();
    assert!((got[[0, 0, 0]] - 1f64.exp() / e).abs() < 1e-15);
    assert_eq!(&got.iter().skip(2).copied().collect::<Vec<_>>(), &[0.0; 4]);
    // The sink's NaN reaches its row only.
    let x = arr(&[1, 2, 2], vec![0.0, 1.0, 0.0, 1.0]);
    let s = arr(&[1, 2, 1], vec![f64::NAN, 0.0]);
    let got = run(&per_row, &[x, s]);
    assert!(got[[0, 0, 0]].is_nan() && got[[0, 0, 1]].is_nan());
    assert!(got[[0, 1, 0]].is_finite());
}

/// Blocks of `b` rows of `[h, n, d]`: mean or max of each (the last block over its own rows).
fn ref_pool(x: &ArrayD<f64>, b: usize, max: bool) -> ArrayD<f64> {
    let (h, n, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let blocks = n.div_ceil(b);
    let mut out = ArrayD::zeros(IxDyn(&[h, blocks, d]));
    for a in 0..h {
        for t in 0..blocks {
            let rows: Vec<usize> = (t * b..n.min(t * b + b)).collect();
            for c in 0..d {
                let vals: Vec<f64> = rows.iter().map(|&r| x[[a, r, c]]).collect();
                out[[a, t, c]] = if max {
                    if vals.iter().any(|v| v.is_nan()) {
                        f64::NAN
                    } else {
                        vals.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    }
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                };
            }
        }
    }
    out
}

#[test]
fn pooling_covers_every_row_once_and_the_last_block_is_shorter() {
    for b in [1usize, 2, 3, 7, 64] {
        let src = |op: &str| format!("kernel f(x: f32[h, n, d]) {{ return {op}(x, {b}); }}");
        let (mean, max) = (only(&src("mean_pool")), only(&src("max_pool")));
        for (h, n, d, seed) in [(2, 7, 3, 1), (1, 1, 1, 2), (1, 0, 4, 3), (3, 13, 2, 4)] {
            let x = random(&[h, n, d], seed);
            assert_close(
                &run(&mean, std::slice::from_ref(&x)),
                &ref_pool(&x, b, false),
                1e-12,
            );
            assert_close(
                &run(&max, std::slice::from_ref(&x)),
                &ref_pool(&x, b, true),
                0.0,
            );
        }
    }
    // A block size from `--shape`, the pooled rows as `ceil(n/b)` in the type.
    let kernel = only("kernel f(x: f32[n, d]) { return max_pool(x, b); }");
    assert_eq!(
        kernel.graph.node(kernel.output).shape[0].to_string(),
        "ceil(n/b)"
    );
    let x = arr(&[5, 1], vec![1.0, f64::NAN, 3.0, -1.0, 2.0]);
    let got = run_with(&kernel, &[x], &[("b", 2)]);
    assert_eq!(got.shape(), &[3, 1]);
    assert!(got[[0, 0]].is_nan());
    assert_eq!((got[[1, 0]], got[[2, 0]]), (3.0, 2.0));
    // Pooled keys and values of one size multiply: global attention over block summaries.
    let global = only(
        "kernel g(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
            return softmax(q @ mean_pool(k, 4).T) @ mean_pool(v, 4);
        }",
    );
    let (q, k, v) = (random(&[9, 3], 1), random(&[9, 3], 2), random(&[9, 3], 3));
    let got = run(&global, &[q.clone(), k.clone(), v.clone()]);
    let (pk, pv) = (
        ref_pool(&k.clone().insert_axis(ndarray::Axis(0)), 4, false),
        ref_pool(&v.clone().insert_axis(ndarray::Axis(0)), 4, false),
    );
    for i in 0..9 {
        let s: Vec<f64> = (0..3)
            .map(|t| (0..3).map(|c| q[[i, c]] * pk[[0, t, c]]).sum())
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..3 {
            let want: f64 = (0..3).map(|t| e[t] / z * pv[[0, t, c]]).sum();
            assert!((got[[i, c]] - want).abs() < 1e-12);
        }
    }
}

#[test]
fn bad_pool_sizes_and_sinks_are_errors_naming_them() {
    let msg = lower_error("kernel f(x: f32[n, d]) { return mean_pool(x, 0); }");
    assert!(msg.contains("block size of `mean_pool` is 0"), "{msg}");
    let msg = lower_error("kernel f(x: f32[n]) { return max_pool(x, 2); }");
    assert!(msg.contains("rank at least 2"), "{msg}");
    let msg =
        lower_error("kernel f(x: f32[h, n, c], s: f32[h, n, c]) { return softmax_sink(x, s); }");
    assert!(
        msg.contains("must broadcast to the rows [h, n, 1]"),
        "{msg}"
    );
    let msg = lower_error("kernel f(x: f32[n, d]) { return mean_pool(x, x); }");
    assert!(
        msg.contains("positive integer or a dimension symbol"),
        "{msg}"
    );
    let kernel = only("kernel f(x: f32[n, d]) { return mean_pool(x, b); }");
    let err =
        bind_shapes(&kernel, &[Some(vec![4, 2])], &[("b".to_string(), 0)].into()).unwrap_err();
    assert!(matches!(err, BindError::ZeroPool { .. }), "{err}");
    assert!(err.to_string().contains("`b` of `mean-pool` is 0"), "{err}");
}

#[test]
fn cumsum_is_the_inclusive_running_sum() {
    let last = only("kernel f(x: f32[a, b, c]) -> f32[a, b, c] { return cumsum(x, -1); }");
    let middle = only("kernel f(x: f32[a, b, c]) -> f32[a, b, c] { return cumsum(x, 1); }");
    for (a, b, c, seed) in [(2, 3, 4, 1), (1, 1, 1, 2), (2, 0, 3, 3), (1, 5, 0, 4)] {
        let x = random(&[a, b, c], seed);
        let mut want_last = x.clone();
        let mut want_mid = x.clone();
        for i in 0..a {
            for j in 0..b {
                for k in 1..c {
                    want_last[[i, j, k]] = want_last[[i, j, k - 1]] + x[[i, j, k]];
                }
            }
            for k in 0..c {
                for j in 1..b {
                    want_mid[[i, j, k]] = want_mid[[i, j - 1, k]] + x[[i, j, k]];
                }
            }
        }
        assert_close(&run(&last, std::slice::from_ref(&x)), &want_last, 1e-12);
        assert_close(&run(&middle, &[x]), &want_mid, 1e-12);
    }
}
