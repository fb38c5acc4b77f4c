//! The prefix-state kernel for causal linear attention against the f64 interpreter: odd shapes
//! (0, 1, 3, 113), chunked shapes (m ≠ n, both ways), batch broadcasting, zero denominators;
//! threads 1 and 2 bit-identical (checked by `common::check` on every case), and the plan
//! never holds an `n × n` buffer when the kernel fires.
mod common;

use attnc_jit::plan::{plan, StepKind};
use common::{bindings, check, kernel, optimized, REL_L2};
use proptest::prelude::*;

/// Causal linear attention with the elu+1 feature map, queries `m` end-aligned to keys `n`.
const CAUSAL: &str = "kernel c(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
    let qf = elu(q) + 1;
    let kf = elu(k) + 1;
    let a = mask(qf @ kf.T, causal, 0);
    return (a @ v) / sum(a, -1);
}";

/// Whether the plan of `src` as the optimizer rewrites it at `dims` uses the prefix kernel,
/// and its largest buffer.
fn planned(src: &str, dims: &[(&str, u64)]) -> (bool, usize) {
    let b = bindings(dims);
    let p = plan(&optimized(&kernel(src), &b), &b, true).expect("plans");
    let prefix = p
        .steps
        .iter()
        .any(|s| matches!(s.kind, StepKind::Prefix(_) | StepKind::Chunked(_)));
    let largest = p.buffers.iter().map(|b| b.len).max().unwrap_or(0);
    (prefix, largest)
}

#[test]
fn odd_shapes_match_the_interpreter() {
    for &(h, m, n, d, e) in &[
        (1, 0, 0, 3, 3),
        (2, 1, 1, 1, 1),
        (2, 3, 3, 3, 3),
        (3, 113, 113, 5, 7),
        (1, 113, 113, 64, 64),
        (2, 17, 17, 0, 4),
        (2, 9, 9, 4, 0),
    ] {
        let dims = [("h", h), ("m", m), ("n", n), ("d", d), ("e", e)];
        assert!(
            planned(CAUSAL, &dims).0,
            "prefix kernel not used at {dims:?}"
        );
        let err = check(CAUSAL, &dims, 3);
        println!("{dims:?}: rel L2 {err:.2e}");
    }
}

#[test]
fn chunked_shapes_are_end_aligned() {
    // m < n (chunked prefill, decoding with m = 1) and m > n (leading rows keep no key: 0/0).
    // At m = n = 1 the quadratic form costs less and is kept.
    for &(m, n) in &[(1, 113), (5, 113), (113, 5), (3, 0), (1, 1)] {
        let dims = [("h", 2), ("m", m), ("n", n), ("d", 6), ("e", 9)];
        assert!(
            planned(CAUSAL, &dims).0 || m * n == 1,
            "prefix kernel not used at {dims:?}"
        );
        check(CAUSAL, &dims, 11);
    }
}

#[test]
fn no_n_by_n_buffer_is_planned() {
    let dims = [("h", 2), ("m", 4096), ("n", 4096), ("d", 8), ("e", 8)];
    let (prefix, largest) = planned(CAUSAL, &dims);
    assert!(prefix);
    assert!(largest <= 2 * 4096 * 8, "largest buffer {largest}");
}

#[test]
fn broadcast_values_and_rank_two() {
    let shared = "kernel s(q: f32[h, n, d], k: f32[h, n, d], v: f32[1, n, e]) -> f32[h, n, e] {
        let a = mask(relu(q) @ relu(k).T, causal, 0);
        return (a @ v) / sum(a, -1);
    }";
    let dims = [("h", 3), ("n", 13), ("d", 5), ("e", 6)];
    assert!(planned(shared, &dims).0);
    check(shared, &dims, 5);
    let flat = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
        let a = mask(exp(q) @ exp(k).T, causal, 0);
        return (a @ v) / sum(a, -1);
    }";
    let dims = [("n", 113), ("d", 3)];
    assert!(planned(flat, &dims).0);
    check(flat, &dims, 6);
}

#[test]
fn zero_denominators_give_the_interpreters_nan() {
    // relu features of negative keys are all zero: every row's normalizer is 0.
    let src = "kernel z(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
        let a = mask(relu(q) @ relu(-abs(k)).T, causal, 0);
        return (a @ v) / sum(a, -1);
    }";
    let dims = [("n", 7), ("d", 4)];
    assert!(planned(src, &dims).0);
    check(src, &dims, 8);
}

#[test]
fn other_fills_patterns_and_normalizers_are_not_fused() {
    let dims = [("h", 2), ("m", 5), ("n", 5), ("d", 3), ("e", 3)];
    for src in [
        CAUSAL.replace("causal, 0)", "causal, 1)"),
        CAUSAL.replace(
            "mask(qf @ kf.T, causal, 0)",
            "mask(qf @ kf.T, window(1), 0)",
        ),
        CAUSAL.replace("sum(a, -1)", "max(a, -1)"),
    ] {
        let (prefix, _) = planned(&src, &dims);
        assert!(!prefix, "fused: {src}");
        check(&src, &dims, 2);
    }
    // A product used twice is one unnormalized prefix product, shared.
    let shared = CAUSAL.replace(
        "return (a @ v) / sum(a, -1);",
        "return (a @ v) / sum(a, -1) + a @ v;",
    );
    check(&shared, &dims, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_shapes_match(h in 0u64..3, m in 0u64..40, n in 0u64..40, d in 1u64..10, e in 1u64..11, seed in any::<u64>()) {
        let err = check(CAUSAL, &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed % 1000);
        prop_assert!(err <= REL_L2);
    }
}
