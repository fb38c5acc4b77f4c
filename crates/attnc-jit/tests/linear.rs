//! Linear attention without a mask (the key-value-state step of the full-width tier) against
//! the f64 interpreter on every tier: feature maps fused into the step (elu+1 and feature
//! programs — relu, exp, sqrt, maximum, … — on 16 lanes; other chains and a transposed view
//! as row-block kernels) and features read from buffers (identity, a map shared with another
//! reader); odd shapes (0, 1, 3, 113, and lengths past and off the step's key and row
//! blocks and its state parts), m ≠ n both ways, broadcast values; threads 1 and 3 bit-identical (checked by
//! `common::tiers::check` on every case).
mod common;

use attnc_jit::linear::Features;
use attnc_jit::plan::{plan_with, PlanOptions, StepKind};
use attnc_jit::wide::Tiers;
use common::tiers::check;
use common::{bindings, data, kernel, optimized};

/// `(φ(q) φ(k)ᵀ v) / rowsum(φ(q) φ(k)ᵀ)` with feature map `phi` (a template over `X`).
fn source(phi: &str) -> String {
    let (fq, fk) = (phi.replace('X', "q"), phi.replace('X', "k"));
    format!(
        "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {{
            let qf = {fq};
            let kf = {fk};
            return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);
        }}"
    )
}

/// The linear attention step of `src` planned at `dims` with every full-width tier this CPU
/// has, and whether each feature was fused (`None`: no such step, or no full-width tier).
fn fused_features(src: &str, dims: &[(&str, u64)]) -> Option<[bool; 2]> {
    feature_kinds(src, dims).map(|kinds| kinds.map(|k| k != "buffer"))
}

/// Runs `src` at `dims` on every tier against the interpreter (inputs in [-2, 2)).
fn check_at(src: &str, dims: &[(&str, u64)], seed: u64) {
    check_with(src, dims, seed, |x| x);
}

/// [`check_at`] with inputs in (0.1, 2.1]: features read as written keep the normalizer away
/// from 0 (signed ones make it a difference of large sums, ill-conditioned in any f32 order).
fn check_positive(src: &str, dims: &[(&str, u64)], seed: u64) {
    check_with(src, dims, seed, |x| x.abs() + 0.1);
}

/// Runs `src` at `dims` on every tier against the interpreter, inputs drawn and mapped by
/// `value`.
fn check_with(src: &str, dims: &[(&str, u64)], seed: u64, value: fn(f32) -> f32) {
    let b = bindings(dims);
    let k = kernel(src);
    let values: Vec<Vec<f32>> = k
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
            let mut v = data(shape.iter().product(), seed * 7 + i as u64);
            v.iter_mut().for_each(|x| *x = value(*x));
            v
        })
        .collect();
    check(src, dims, &values);
}

/// Whether this CPU has the full-width tier (said when it has not).
fn wide() -> bool {
    let has = Tiers::available(Tiers::ALL).avx512;
    if !has {
        eprintln!("no AVX-512 on this CPU: the linear attention step is not planned, skipped");
    }
    has
}

#[test]
fn elu_features_are_fused_and_match_at_odd_shapes() {
    let src = source("elu(X) + 1");
    for &(h, m, n, d, e) in &[
        (1, 0, 0, 3, 3),
        (2, 1, 1, 1, 1),
        (2, 3, 3, 3, 3),
        (3, 113, 113, 5, 7),
        (2, 113, 700, 17, 9),
        (1, 700, 113, 64, 64),
        (2, 1100, 1100, 8, 3),
        // Keys in one state part, one more, and three parts (the last short) of one entry.
        (1, 3, 2048, 4, 3),
        (2, 5, 2049, 4, 3),
        (1, 37, 4300, 8, 5),
        (2, 17, 0, 4, 4),
        (2, 9, 9, 4, 0),
    ] {
        let dims = [("h", h), ("m", m), ("n", n), ("d", d), ("e", e)];
        if wide() && m * n > 1 {
            assert_eq!(
                fused_features(&src, &dims),
                Some([true, true]),
                "feature maps not fused at {dims:?}"
            );
        }
        check_at(&src, &dims, m + n);
    }
}

/// How the linear attention step of `src` at `dims` gets `φQ` and `φK` on the full-width
/// tier: "buffer", "elu+1", "lanes" (a 16-lane feature program) or "kernel" (a row-block
/// kernel).
fn feature_kinds(src: &str, dims: &[(&str, u64)]) -> Option<[&'static str; 2]> {
    let b = bindings(dims);
    let options = PlanOptions {
        fuse: true,
        tiers: Tiers::available(Tiers::ALL),
    };
    let plan = plan_with(&optimized(&kernel(src), &b), &b, &options).expect("plans");
    plan.steps.iter().find_map(|s| match &s.kind {
        StepKind::Linear(l) => Some(l.features.clone().map(|f| match f {
            Features::Buffer(_) => "buffer",
            Features::EluPlusOne(_) => "elu+1",
            Features::Lanes(_) => "lanes",
            Features::Mapped(_) => "kernel",
        })),
        _ => None,
    })
}

#[test]
fn other_feature_maps() {
    let dims = [("h", 2), ("m", 130), ("n", 600), ("d", 6), ("e", 5)];
    for (phi, kind) in [
        ("relu(X)", "lanes"),
        ("exp(X / 4)", "lanes"),
        ("exp(X - maximum(X, 1.5) / 2) * 0.25", "lanes"),
        (
            "sqrt(abs(X)) + minimum(-X, 0.5) + rsqrt(X + 1) + 3",
            "lanes",
        ),
        ("elu(X * 2 - 1) + 1.5", "lanes"),
        ("tanh(X) + 1.5", "kernel"),
        ("X", "buffer"),
    ] {
        let src = source(phi);
        if wide() {
            assert_eq!(
                feature_kinds(&src, &dims),
                Some([kind, kind]),
                "feature map {phi}"
            );
        }
        check_positive(&src, &dims, 3);
    }
}

#[test]
fn transposed_and_shared_features() {
    // A transposed input is a view without contiguous rows: read on row blocks, not copied.
    let transposed = "kernel t(q: f32[h, d, m], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        let qf = q.T;
        return (qf @ k.T @ v) / sum(qf @ k.T, -1);
    }";
    let dims = [("h", 2), ("m", 131), ("n", 77), ("d", 5), ("e", 4)];
    if wide() {
        assert_eq!(fused_features(transposed, &dims), Some([true, false]));
    }
    check_positive(transposed, &dims, 5);
    // A feature map another step reads too is materialized once and read as a buffer.
    let shared = "kernel s(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
        let qf = elu(q) + 1;
        let kf = elu(k) + 1;
        return (qf @ kf.T @ v) / sum(qf @ kf.T, -1) + qf;
    }";
    let dims = [("h", 2), ("n", 140), ("d", 6)];
    if wide() {
        assert_eq!(fused_features(shared, &dims), Some([false, true]));
    }
    check_at(shared, &dims, 6);
}

#[test]
fn broadcast_values() {
    let src = "kernel b(q: f32[h, n, d], k: f32[h, n, d], v: f32[1, n, e]) -> f32[h, n, e] {
        let qf = relu(q) + 0.5;
        let kf = relu(k) + 0.5;
        return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);
    }";
    let dims = [("h", 3), ("n", 530), ("d", 5), ("e", 6)];
    if wide() {
        assert_eq!(fused_features(src, &dims), Some([true, true]));
    }
    check_at(src, &dims, 9);
}

#[test]
fn explain_names_the_fused_feature_maps() {
    if !wide() {
        return;
    }
    let src = source("elu(X) + 1");
    let dims = [("h", 2), ("m", 300), ("n", 300), ("d", 8), ("e", 8)];
    let b = bindings(&dims);
    let options = PlanOptions {
        fuse: true,
        tiers: Tiers::available(Tiers::ALL),
    };
    let plan = plan_with(&optimized(&kernel(&src), &b), &b, &options).expect("plans");
    let text = plan.to_string();
    let other = plan_with(&optimized(&kernel(&source("relu(X)")), &b), &b, &options)
        .expect("plans")
        .to_string();
    assert!(
        other.contains("feature maps of φQ (2 nodes on avx-512) and φK (2 nodes on avx-512) fused"),
        "{other}"
    );
    assert!(
        text.contains("feature maps of φQ (elu+1 on avx-512) and φK (elu+1 on avx-512) fused"),
        "{text}"
    );
    // φQ and φK are never buffers of the plan: only the inputs and the result.
    assert_eq!(plan.buffers.len(), 4, "{text}");
}
