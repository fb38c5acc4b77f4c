//! JIT ≡ interpreter on the hierarchical forms (`logsumexp`, `softmax_sink`, `mean_pool`,
//! `max_pool`, `cumsum`): property tests over random shapes with 0 and 1, block sizes that do
//! not divide the rows, and non-finite values where the forms define them.
mod common;

use attnc_jit::{CompileOptions, CompiledKernel};
use common::{bindings, check, kernel, reference, rel_l2, run_jit};
use proptest::prelude::*;

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), 2u64..9, Just(13), Just(33)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn logsumexp_any_axis(h in 1u64..3, n in dim(), d in dim(), axis in 0usize..3, seed in any::<u64>()) {
        let src = format!(
            "kernel f(x: f32[h, n, d]) {{ return logsumexp(x * 8, {axis}) + logsumexp(x, -1) * 0; }}"
        );
        check(&src, &[("h", h), ("n", n), ("d", d)], seed % 1000);
    }

    #[test]
    fn softmax_sink_per_head_row_and_scalar(h in 1u64..3, n in dim(), c in dim(), seed in any::<u64>()) {
        let dims = [("h", h), ("n", n), ("c", c)];
        for sink in ["f32[h, 1, 1]", "f32[h, n, 1]", "f32[]", "f32[n, 1]"] {
            let src = format!(
                "kernel f(x: f32[h, n, c], s: {sink}) -> f32[h, n, c] {{ return softmax_sink(x * 3, s); }}"
            );
            check(&src, &dims, seed % 1000);
        }
    }

    #[test]
    fn pools_of_any_block(h in 1u64..3, n in dim(), d in dim(), b in prop_oneof![Just(1u64), 2u64..6, Just(64)], seed in any::<u64>()) {
        let dims = [("h", h), ("n", n), ("d", d), ("b", b)];
        for op in ["mean_pool", "max_pool"] {
            check(&format!("kernel f(x: f32[h, n, d]) {{ return {op}(x, b); }}"), &dims, seed % 1000);
            check(&format!("kernel f(x: f32[h, n, d]) {{ return {op}(x.T, {b}) * 2; }}"), &dims, seed % 1000);
        }
    }

    #[test]
    fn cumsum_any_axis(h in 1u64..3, n in dim(), d in dim(), axis in 0usize..3, seed in any::<u64>()) {
        let src = format!("kernel f(x: f32[h, n, d]) -> f32[h, n, d] {{ return cumsum(x, {axis}); }}");
        check(&src, &[("h", h), ("n", n), ("d", d)], seed % 1000);
    }
}

/// Hierarchical attention: each query attends to the mean-pooled blocks of the keys.
#[test]
fn attention_over_pooled_summaries() {
    let src = "kernel g(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
        let kb = mean_pool(k, 4);
        let vb = max_pool(v, 4);
        let s = q @ kb.T / sqrt(d);
        return softmax_sink(s, logsumexp(s, -1) - 1) @ vb;
    }";
    for (h, n, d) in [(2, 13, 5), (1, 1, 3), (1, 8, 4), (3, 33, 2)] {
        check(src, &[("h", h), ("n", n), ("d", d)], 5);
    }
}

#[test]
fn non_finite_values_follow_the_interpreter() {
    let k = kernel(
        "kernel f(x: f32[r, n], s: f32[r, 1]) -> f32[r, n] {
            return softmax_sink(x, s) + logsumexp(x, -1) * 0 + cumsum(x, 1) * 0;
        }",
    );
    let b = bindings(&[("r", 4), ("n", 5)]);
    let ninf = f32::NEG_INFINITY;
    let x = vec![
        ninf, ninf, ninf, ninf, ninf, // all -inf
        1.0, ninf, 2.0, 3.0, 0.5, // masked entries
        1e30, 1e30, -1e30, 0.0, 1.0, // huge logits
        0.0, 1.0, 2.0, 3.0, 4.0,
    ];
    let s = vec![ninf, 0.0, 1e30, ninf];
    let ins = vec![(vec![4, 5], x), (vec![4, 1], s)];
    let want = reference(&k, &b, &ins);
    let compiled = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compiles");
    let got = run_jit(&compiled, &k, &ins, 1);
    // `logsumexp(x) * 0` is NaN on the all -inf row (−inf · 0): the same positions agree.
    let err = rel_l2(&got.data, &want);
    assert!(err <= common::REL_L2, "{err}");
}
