//! Property tests: the JIT against the f64 interpreter on random shapes and programs.
//!
//! Bound: relative L2 error ≤ [`common::REL_L2`] (1e-5) for exact f32 plans. It holds because
//! every kernel accumulates in f32 with FMA (error ≈ k·2⁻²⁴ relative for a length-k dot
//! product of well-scaled inputs, k ≤ 203 here) and the inline exp/log/tanh are within
//! 3e-7 relative. Threads 1 and 2 must give bit-identical results on every case.
mod common;

use common::check;
use proptest::prelude::*;

/// Odd sizes: 0, 1, 3, 113 and non-multiples of every tile size (4, 8, 4 rows).
fn dim() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![0u64, 1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 33, 113])
}

fn small_dim() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![1u64, 2, 3, 5, 8, 9, 12])
}

/// A random elementwise expression over `a: [n, d]`, `b: [d]`, `c: [n, 1]`, `s: [1, 1]`,
/// kept in safe domains so f32 and f64 agree within the bound.
fn elementwise_expr() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(vec![
        "a".to_string(),
        "b".to_string(),
        "c".to_string(),
        "s".to_string(),
        "0.5".to_string(),
        "d".to_string(),
    ]);
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone(), 0..7usize).prop_map(|(x, y, op)| match op {
                0 => format!("({x} + {y})"),
                1 => format!("({x} - {y})"),
                2 => format!("({x} * {y})"),
                3 => format!("({x} / (abs({y}) + 1))"),
                4 => format!("maximum({x}, {y})"),
                5 => format!("minimum({x}, {y})"),
                _ => format!("({x} * 0.25 + {y})"),
            }),
            (inner, 0..11usize).prop_map(|(x, op)| match op {
                0 => format!("(-{x})"),
                1 => format!("exp(tanh({x}))"),
                2 => format!("log(abs({x}) + 1)"),
                3 => format!("sqrt(abs({x}))"),
                4 => format!("rsqrt(abs({x}) + 1)"),
                5 => format!("tanh({x})"),
                6 => format!("sigmoid({x})"),
                7 => format!("relu({x})"),
                8 => format!("elu(tanh({x}))"),
                9 => format!("abs({x})"),
                _ => format!("tanh({x}) * 3"),
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn elementwise_programs(expr in elementwise_expr(), n in dim(), d in dim(), seed in 0u64..1000) {
        let src = format!(
            "kernel f(a: f32[n, d], b: f32[d], c: f32[n, 1], s: f32[1, 1]) -> f32[n, d] {{ return {expr} + a * 0; }}"
        );
        // `d` used as a number must not be 0.
        let uses_d = expr.split(|c: char| !c.is_alphanumeric()).any(|t| t == "d");
        let d = if uses_d { d.max(1) } else { d };
        check(&src, &[("n", n), ("d", d)], seed);
    }

    #[test]
    fn matmul_layouts(m in dim(), k in dim(), n in dim(), layout in 0..4usize, seed in 0u64..1000) {
        let (a, at) = if layout & 1 == 0 { ("f32[m, k]", "a") } else { ("f32[k, m]", "a.T") };
        let (b, bt) = if layout & 2 == 0 { ("f32[k, n]", "b") } else { ("f32[n, k]", "b.T") };
        let src = format!("kernel f(a: {a}, b: {b}) -> f32[m, n] {{ return {at} @ {bt}; }}");
        check(&src, &[("m", m), ("k", k), ("n", n)], seed);
    }

    #[test]
    fn matmul_batched_broadcast(h in small_dim(), m in dim(), k in small_dim(), n in dim(), form in 0..4usize, seed in 0u64..1000) {
        let src = match form {
            0 => "kernel f(a: f32[h, m, k], b: f32[h, k, n]) -> f32[h, m, n] { return a @ b; }",
            1 => "kernel f(a: f32[m, k], b: f32[h, k, n]) -> f32[h, m, n] { return a @ b; }",
            2 => "kernel f(a: f32[h, m, k], b: f32[n, k]) -> f32[h, m, n] { return a @ b.T; }",
            _ => "kernel f(a: f32[h, 1, m, k], b: f32[2, k, n]) -> f32[h, 2, m, n] { return a @ b; }",
        };
        check(src, &[("h", h), ("m", m), ("k", k), ("n", n)], seed);
    }

    #[test]
    fn reductions(n in dim(), d in dim(), op in 0..4usize, axis in 0..3usize, seed in 0u64..1000) {
        let axis = axis as i64 - 1; // -1, 0, 1
        let f = ["sum", "max", "mean", "softmax"][op];
        let (ret, body) = if op == 3 {
            ("f32[h, n, d]".to_string(), format!("softmax(x, {axis})"))
        } else {
            let ret = match axis { 0 => "f32[1, n, d]", 1 => "f32[h, 1, d]", _ => "f32[h, n, 1]" };
            (ret.to_string(), format!("{f}(x, {axis})"))
        };
        let src = format!("kernel f(x: f32[h, n, d]) -> {ret} {{ return {body}; }}");
        check(&src, &[("h", 2), ("n", n), ("d", d)], seed);
    }

    #[test]
    fn masks_and_relpos(m in dim(), n in dim(), pat in 0..8usize, seed in 0u64..1000) {
        let pattern = ["causal", "window(2)", "dilated(2, 3)", "global(2)", "block(4)",
            "causal & window(3)", "block(3) | global(1)", "window(0)"][pat];
        let src = format!(
            "kernel f(x: f32[m, n]) -> f32[m, n] {{ return softmax(mask(x + relpos(m, n) * 0.1, {pattern})) + mask(x, {pattern}, 7); }}"
        );
        check(&src, &[("m", m), ("n", n)], seed);
    }

    #[test]
    fn attention_programs(h in small_dim(), m in dim(), n in dim(), d in small_dim(), pat in 0..4usize, seed in 0u64..1000) {
        let body = match pat {
            0 => "softmax(q @ k.T / sqrt(d)) @ v",
            1 => "softmax(mask(q @ k.T / sqrt(d), causal)) @ v",
            2 => "softmax(mask(q @ k.T * 0.3, window(2) | global(1))) @ v",
            _ => "softmax(q @ k.T + relpos(m, n) * 0.5) @ v",
        };
        let src = format!(
            "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] {{ return {body}; }}"
        );
        check(&src, &[("h", h), ("m", m), ("n", n), ("d", d)], seed);
    }
}
