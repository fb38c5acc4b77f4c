//! The approximate rule families: each enters only when the policy allows it, and the form it
//! produces, evaluated by the interpreter, stays within the error its approximation admits.

mod common;

use attnc_ir::interp::evaluate;
use attnc_opt::{optimize, Approx, ApproxPolicy, OptimizeOptions};
use ndarray::ArrayD;

const DENSE: &str = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v; }";

fn relative_l2(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    attnc_ir::compare::compare(a.iter().copied(), b.iter().copied()).error()
}

/// The optimized kernel under `allowed`, and its relative error against the exact result on
/// inputs in [-scale, scale).
fn approximate(allowed: Approx, n: u64, scale: f64) -> (Vec<String>, f64) {
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 2), ("n", n), ("d", 16)]);
    let options = OptimizeOptions {
        approx: ApproxPolicy {
            allowed: vec![allowed],
            tol: 1.0,
        },
        ..OptimizeOptions::default()
    };
    let result = optimize(&kernel, &bindings, &options);
    let inputs: Vec<_> = common::inputs(&kernel, &bindings, 5)
        .into_iter()
        .map(|a| a * scale)
        .collect();
    let exact = evaluate(&kernel, &bindings, &inputs).expect("exact");
    let approx = evaluate(&result.kernel, &bindings, &inputs).expect("approximate");
    let applied = result
        .trace
        .approximations
        .iter()
        .filter(|o| o.applied)
        .map(|o| o.name.clone())
        .collect();
    (applied, relative_l2(&approx, &exact))
}

#[test]
fn exact_policy_adds_no_approximate_rule() {
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 2), ("n", 512), ("d", 16)]);
    let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
    assert!(result.trace.approximations.is_empty());
    assert!(result
        .trace
        .applied
        .iter()
        .all(|r| !r.rule.starts_with("approx-")));
}

#[test]
fn favor_features_approximate_softmax_attention_at_small_scale() {
    let (applied, error) = approximate(Approx::RandomFeatures { m: 128, seed: 3 }, 512, 0.2);
    assert_eq!(applied, ["random_features(m = 128, seed = 3)"]);
    // Monte Carlo: about 1/sqrt(m) at small scales.
    assert!(error < 0.15, "{error}");
}

#[test]
fn favor_error_grows_with_the_input_scale() {
    let (_, small) = approximate(Approx::RandomFeatures { m: 64, seed: 3 }, 512, 0.2);
    let (_, large) = approximate(Approx::RandomFeatures { m: 64, seed: 3 }, 512, 2.0);
    assert!(large > 2.0 * small, "{small} vs {large}");
}

#[test]
fn int8_marks_the_fused_attention_and_is_exact_in_the_interpreter() {
    let (applied, error) = approximate(Approx::Int8, 512, 1.0);
    assert_eq!(applied, ["int8"]);
    assert!(error < 1e-12, "{error}");
    // With few queries per key the quantization pre-pass costs more than the products save.
    let (applied, _) = approximate(Approx::Int8, 32, 1.0);
    assert!(applied.is_empty());
}

#[test]
fn linformer_projects_long_sequences_only() {
    let (applied, error) = approximate(Approx::LowRank { r: 32, seed: 1 }, 512, 1.0);
    assert_eq!(applied, ["lowrank(r = 32)"]);
    assert!(error.is_finite());
    // A projection to at least as many rows as there are keys is not a reduction.
    let (applied, _) = approximate(Approx::LowRank { r: 512, seed: 1 }, 512, 1.0);
    assert!(applied.is_empty());
}

#[test]
fn an_estimate_above_the_tolerance_keeps_the_rule_out() {
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 1), ("n", 512), ("d", 16)]);
    let options = OptimizeOptions {
        approx: ApproxPolicy {
            allowed: vec![Approx::RandomFeatures { m: 16, seed: 0 }],
            tol: 0.1,
        },
        ..OptimizeOptions::default()
    };
    let result = optimize(&kernel, &bindings, &options);
    let outcome = &result.trace.approximations[0];
    assert!(!outcome.applied);
    assert!(outcome
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("exceeds the tolerance"));
    assert!(result.trace.render_text().contains("approximations:"));
}

#[test]
fn favor_features_also_approximate_causal_attention_through_a_prefix_state() {
    let kernel = common::kernel(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(mask(q @ k.T / sqrt(d), causal)) @ v; }",
    );
    let bindings = common::bindings(&[("h", 1), ("n", 2048), ("d", 16)]);
    let options = OptimizeOptions {
        approx: ApproxPolicy {
            allowed: vec![Approx::RandomFeatures { m: 64, seed: 3 }],
            tol: 1.0,
        },
        ..OptimizeOptions::default()
    };
    let result = optimize(&kernel, &bindings, &options);
    assert!(result.trace.approximations[0].applied);
    assert!(
        result.trace.output_term.contains("linear-attention-causal")
            || result.trace.output.contains("mask")
    );
    let inputs: Vec<_> = common::inputs(&kernel, &bindings, 5)
        .into_iter()
        .map(|a| a * 0.2)
        .collect();
    let exact = evaluate(&kernel, &bindings, &inputs).expect("exact");
    let approx = evaluate(&result.kernel, &bindings, &inputs).expect("approximate");
    let error = relative_l2(&approx, &exact);
    assert!(error < 0.2, "{error}");
}

#[test]
fn an_approximation_that_fits_nowhere_says_why() {
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 1), ("n", 256), ("d", 16)]);
    // A rank at least the sequence length, and features for a masked (windowed) softmax.
    let cases = [
        (
            DENSE,
            Approx::LowRank { r: 256, seed: 0 },
            "more than r = 256 keys",
        ),
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
                return softmax(mask(q @ k.T / sqrt(d), window(8))) @ v; }",
            Approx::RandomFeatures { m: 64, seed: 0 },
            "unmasked or causal",
        ),
        // Nyström: as many landmarks as keys, a causal mask, a score with a bias.
        (DENSE, Approx::Nystrom { m: 256 }, "more than m = 256"),
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
                return softmax(mask(q @ k.T / sqrt(d), causal)) @ v; }",
            Approx::Nystrom { m: 16 },
            "unmasked softmax attention",
        ),
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
                return softmax(q @ k.T / sqrt(d) + relpos(n, n)) @ v; }",
            Approx::Nystrom { m: 16 },
            "no mask, pattern or bias",
        ),
    ];
    for (source, approx, expected) in cases {
        let kernel = if source == DENSE {
            kernel.clone()
        } else {
            common::kernel(source)
        };
        let options = OptimizeOptions {
            approx: ApproxPolicy {
                allowed: vec![approx],
                tol: 1.0,
            },
            ..OptimizeOptions::default()
        };
        let result = optimize(&kernel, &bindings, &options);
        let outcome = &result.trace.approximations[0];
        assert!(!outcome.applied, "{approx} must not apply");
        let reason = outcome.reason.as_deref().unwrap_or("");
        assert!(
            reason.contains("nothing in this program fits it") && reason.contains(expected),
            "{approx}: {reason}"
        );
    }
}

#[test]
fn bf16_products_apply_only_where_amx_bf16_tiles_run() {
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 2), ("n", 512), ("d", 16)]);
    let policy = ApproxPolicy {
        allowed: vec![Approx::Bf16Products],
        tol: 1e-2,
    };
    let without = optimize(
        &kernel,
        &bindings,
        &OptimizeOptions {
            approx: policy.clone(),
            ..OptimizeOptions::default()
        },
    );
    let outcome = &without.trace.approximations[0];
    assert!(!outcome.applied);
    assert!(
        outcome.reason.as_deref().is_some_and(|r| r.contains("AMX")),
        "{outcome:?}"
    );
    let with = optimize(
        &kernel,
        &bindings,
        &OptimizeOptions {
            approx: policy,
            tiers: attnc_opt::TierSpeeds::measured_kernels(true, true, true),
            ..OptimizeOptions::default()
        },
    );
    assert!(with.trace.approximations[0].applied, "{:?}", with.trace);
    let printed = attnc_ir::print::print_kernel(&with.kernel);
    assert!(printed.contains("precision=bf16"), "{printed}");
    // The interpreter evaluates the precision exactly: the plan's value is the exact one.
    let inputs = common::inputs(&kernel, &bindings, 3);
    let exact = evaluate(&kernel, &bindings, &inputs).expect("exact");
    let marked = evaluate(&with.kernel, &bindings, &inputs).expect("bf16 plan");
    assert!(relative_l2(&marked, &exact) < 1e-12);
}

#[test]
fn tier_speeds_move_the_choice_between_quadratic_and_linear_forms() {
    // Performer features at m = 64 replace an n = 512 attention only while the exact kernel
    // is the portable one: on the full-width tier the exact form is cheaper.
    let kernel = common::kernel(DENSE);
    let bindings = common::bindings(&[("h", 1), ("n", 512), ("d", 64)]);
    let approx = ApproxPolicy {
        allowed: vec![Approx::RandomFeatures { m: 64, seed: 1 }],
        tol: 100.0,
    };
    let applied = |tiers| {
        let options = OptimizeOptions {
            approx: approx.clone(),
            tiers,
            ..OptimizeOptions::default()
        };
        optimize(&kernel, &bindings, &options).trace.approximations[0].applied
    };
    assert!(applied(attnc_opt::TierSpeeds::default()));
    assert!(!applied(attnc_opt::TierSpeeds::measured_kernels(
        true, false, false
    )));
}

/// `[h, n, d]` rows drawn around `centres` in contiguous runs (queries and keys of a sequence
/// whose content comes in a few stretches: a softmax attention matrix of low rank), plus
/// `noise` times uniform values in [-1, 1).
fn clustered(h: u64, n: u64, d: u64, centres: usize, noise: f64, seed: u64) -> ArrayD<f64> {
    let mut rng = common::Rng(seed);
    let means: Vec<f64> = (0..centres * d as usize)
        .map(|_| 2.0 * rng.next())
        .collect();
    let run = (n as usize).div_ceil(2 * centres).max(1);
    let shape = [h, n, d].map(|s| s as usize);
    ArrayD::from_shape_fn(ndarray::IxDyn(&shape), |i| {
        // Runs visit the centres twice, in a shuffled order (7 is coprime to the counts used).
        let centre = (i[1] / run * 7 + i[0]) % centres;
        means[centre * d as usize + i[2]] + noise * rng.next()
    })
}

#[test]
fn nystrom_factors_unmasked_attention_with_a_small_error_on_clustered_rows() {
    let kernel = common::kernel(DENSE);
    // n a multiple of m, and not.
    for n in [256, 203] {
        let bindings = common::bindings(&[("h", 2), ("n", n), ("d", 16)]);
        let options = OptimizeOptions {
            approx: ApproxPolicy {
                allowed: vec![Approx::Nystrom { m: 16 }],
                tol: 0.1,
            },
            explain: true,
            ..OptimizeOptions::default()
        };
        let result = optimize(&kernel, &bindings, &options);
        let outcome = &result.trace.approximations[0];
        assert!(outcome.applied, "n = {n}: {outcome:?}");
        assert_eq!(outcome.name, "nystrom(m = 16)");
        assert!(result.trace.output_term.contains("nystrom-pinv"));
        assert!(result
            .trace
            .applied
            .iter()
            .any(|r| r.rule == "approx-nystrom" && r.count > 0));
        let text = result.trace.render_text();
        assert!(text.contains("approx-nystrom"), "{text}");
        let inputs = vec![
            clustered(2, n, 16, 4, 0.05, 1),
            clustered(2, n, 16, 4, 0.05, 2),
            common::inputs(&kernel, &bindings, 3).remove(2),
        ];
        let exact = evaluate(&kernel, &bindings, &inputs).expect("exact");
        let approx = evaluate(&result.kernel, &bindings, &inputs).expect("approximate");
        let error = relative_l2(&approx, &exact);
        assert!(error < 0.03, "n = {n}: {error}");
    }
}
