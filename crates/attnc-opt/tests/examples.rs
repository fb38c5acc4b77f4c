//! `optimize` on every LANGUAGE.md example (examples/*.attn): semantics preserved, the
//! expected kernel forms extracted, the derivation named and checked, timings printed.

mod common;

use attnc_ir::{Bindings, Kernel};
use attnc_opt::analysis::ShapeAnalysis;
use attnc_opt::convert::to_recexpr;
use attnc_opt::cost::CycleCost;
use attnc_opt::rules::all_rules;
use attnc_opt::saturate::saturate;
use attnc_opt::{optimize, Decision, Limits, OptimizeOptions};
use std::time::Instant;

/// Small odd bindings for every symbol the examples use (m ≤ n for chunked prefill).
fn small() -> Bindings {
    common::bindings(&[
        ("h", 2),
        ("n", 13),
        ("m", 5),
        ("d", 3),
        ("e", 7),
        ("r", 4),
        ("w", 2),
        ("p", 3),
    ])
}

#[test]
fn optimize_preserves_semantics_on_every_example() {
    let bindings = small();
    for (name, kernel) in common::examples() {
        let start = Instant::now();
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let err = common::compare(&kernel, &result.kernel, &bindings, 7);
        println!(
            "{name:>16}: {ms:7.2} ms total, saturation {:6.2} ms, extraction {:5.2} ms, {} iterations, stop: {}, cost {:.0} -> {:.0}, rel err {err:.1e}",
            result.trace.saturate_seconds * 1e3,
            result.trace.extract_seconds * 1e3,
            result.trace.iterations.len(),
            result.trace.stop_reason,
            result.trace.cost_before,
            result.trace.cost_after,
        );
        assert!(
            err <= 1e-9,
            "{name}: relative L2 {err}\n{}",
            result.trace.render_text()
        );
        assert!(result.trace.cost_after <= result.trace.cost_before);
    }
}

/// Runs per example for the timing table (the median is printed).
const TIMING_RUNS: usize = 5;

#[test]
fn saturation_time_at_realistic_shapes_is_printed() {
    // The table in docs/PERFORMANCE.md: `cargo test --release -p attnc-opt --test examples
    // saturation_time -- --nocapture` (target: ≤ 50 ms saturation + extraction each).
    let bindings = common::bindings(&[
        ("h", 8),
        ("n", 4096),
        ("m", 512),
        ("d", 64),
        ("e", 512),
        ("r", 256),
        ("w", 256),
        ("p", 32),
    ]);
    println!("h=8, n=4096, d=64, m=512, r=256, e=512, w=256, p=32; median of {TIMING_RUNS} runs\n");
    println!("| example | saturation (ms) | extraction (ms) | explanation (ms) | e-nodes | iterations | stop | rules on the derivation |");
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2] * 1e3
    };
    for (name, kernel) in common::examples() {
        let runs: Vec<_> = (0..TIMING_RUNS)
            .map(|_| optimize(&kernel, &bindings, &OptimizeOptions::default()).trace)
            .collect();
        let t = &runs[0];
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            median(runs.iter().map(|t| t.saturate_seconds).collect()),
            median(runs.iter().map(|t| t.extract_seconds).collect()),
            median(runs.iter().map(|t| t.explain_seconds).collect()),
            t.final_nodes,
            t.iterations.len(),
            t.stop_reason,
            t.derivation_rules().join(", "),
        );
        assert_eq!(t.decision, Decision::Rewritten, "{name}");
    }
}

/// The node shapes of `kernel` at `bindings`.
fn node_shapes(kernel: &Kernel, bindings: &Bindings) -> Vec<Vec<usize>> {
    attnc_ir::bind::resolve_node_shapes(kernel, bindings).expect("shapes resolve")
}

#[test]
fn linear_attention_extracts_without_an_n_by_n_node() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "linear")
        .expect("linear");
    let bindings = common::bindings(&[("h", 2), ("n", 64), ("d", 4)]);
    let before = node_shapes(&kernel, &bindings);
    assert!(
        before.iter().any(|s| s.ends_with(&[64, 64])),
        "the input has the n×n form"
    );
    let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
    println!("{}", result.trace.render_text());
    assert_eq!(result.trace.decision, Decision::Rewritten);
    for shape in node_shapes(&result.kernel, &bindings) {
        assert!(
            !shape.ends_with(&[64, 64]),
            "an n×n node remains: {shape:?}"
        );
    }
    let rules = result.trace.derivation_rules();
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("linear-") || r.starts_with("matmul-assoc")),
        "{rules:?}"
    );
    assert!(common::compare(&kernel, &result.kernel, &bindings, 3) <= 1e-9);
}

#[test]
fn masked_softmax_examples_extract_to_fused_attention() {
    let bindings = small();
    for name in [
        "local",
        "chunked_prefill",
        "decode_causal",
        "bigbird",
        "blocksparse",
    ] {
        let (_, kernel) = common::examples()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("example");
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        let trace = &result.trace;
        assert_eq!(trace.decision, Decision::Rewritten, "{name}");
        assert!(
            trace.output_term.contains("(attention "),
            "{name}: {}",
            trace.output_term
        );
        let rules = trace.derivation_rules();
        assert!(
            rules.iter().any(|r| r.starts_with("mask-attention-fuse")),
            "{name}: {rules:?}"
        );
        assert!(trace.render_text().contains("mask-attention-fuse"));
        // The fused node comes back as the IR's fused attention op, with its mask.
        let graph = &result.kernel.graph;
        assert!(
            graph.topo_order().iter().any(
                |&id| matches!(&graph.node(id).op, attnc_ir::Op::Attention(a) if a.mask.is_some())
            ),
            "{name}: {}",
            trace.output
        );
        assert!(
            !trace.output.contains("softmax"),
            "{name}: {}",
            trace.output
        );
    }
}

#[test]
fn scored_masked_softmax_examples_extract_to_fused_attention() {
    // ALiBi's additive bias and the tanh softcap stay in the fused node's score child; the
    // node comes back as softmax(mask(score(q @ transpose(k)))) @ v with q, k, v parameters.
    for bindings in [
        small(),
        common::bindings(&[("h", 8), ("n", 4096), ("d", 64)]),
    ] {
        for (name, rule) in [
            ("alibi", "mask-attention-fuse-bias"),
            ("gqa_softcap", "mask-attention-fuse-softcap"),
        ] {
            let (_, kernel) = common::examples()
                .into_iter()
                .find(|(n, _)| n == name)
                .expect("example");
            let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
            let trace = &result.trace;
            assert_eq!(trace.decision, Decision::Rewritten, "{name}");
            assert!(
                trace
                    .output_term
                    .starts_with("(attention-scored (input q) (input k) (input v) "),
                "{name}: {}",
                trace.output_term
            );
            assert!(
                trace
                    .output_term
                    .contains("(matmul (input q) (transpose (input k)))"),
                "{name}: {}",
                trace.output_term
            );
            assert!(
                trace.derivation_rules().contains(&rule),
                "{name}: {:?}",
                trace.derivation_rules()
            );
            assert!(trace.render_text().contains(rule));
            assert!(trace.cost_after < trace.cost_before, "{name}");
        }
    }
}

#[test]
fn computed_operands_and_biases_stay_in_the_fused_attention() {
    // A bias computed by its own product, a computed query, a parameter bias: each becomes one
    // fused attention op whose operands are computed before it.
    let bindings = small();
    for (src, operands) in [
        ("kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], a: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(mask(q @ k.T / sqrt(d) + a @ a.T, causal)) @ v; }", 4),
        ("kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], b: f32[h, n, n]) -> f32[h, n, d] {
            return softmax(mask((q + 1) @ k.T / sqrt(d) + b, causal)) @ v; }", 4),
        ("kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(mask(q @ k.T / sqrt(d), causal)) @ (v * 0.5 + 1); }", 3),
    ] {
        let kernel = common::kernel(src);
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        let out = &result.kernel;
        assert!(
            matches!(out.graph.node(out.output).op, attnc_ir::Op::Attention(_)),
            "{}",
            result.trace.render_text()
        );
        assert_eq!(out.graph.operands(out.output).len(), operands);
        assert!(common::compare(&kernel, &result.kernel, &bindings, 11) <= 1e-9);
    }
}

#[test]
fn unmasked_softmax_examples_extract_to_fused_attention() {
    let bindings = small();
    for name in ["decode", "gated", "linformer", "performer"] {
        let (_, kernel) = common::examples()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("example");
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        assert!(result.trace.output_term.contains("(attention "), "{name}");
        assert!(result
            .trace
            .derivation_rules()
            .iter()
            .any(|r| r.starts_with("attention-fuse")));
    }
}

#[test]
fn explanations_pass_check_proof() {
    let bindings = small();
    let rules = all_rules();
    for (name, kernel) in common::examples() {
        let expr = to_recexpr(&kernel).expect("converts");
        let mut analysis = ShapeAnalysis {
            bindings: bindings.clone(),
            ..ShapeAnalysis::default()
        };
        for p in &kernel.params {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &bindings).expect("bound");
            analysis.params.insert(p.name.as_str().into(), shape);
        }
        let mut sat = saturate(&expr, analysis, &rules, &Limits::default(), true);
        let best = {
            let egraph = sat.egraph();
            let mut model = CycleCost::new(egraph);
            attnc_opt::extract::extract(egraph, sat.root, &mut model)
                .expect("extracts")
                .expr
        };
        let mut explanation = sat.runner.explain_equivalence(&expr, &best);
        explanation.check_proof(&rules);
        println!(
            "{name}: {} steps",
            explanation.make_flat_explanation().len() - 1
        );
    }
}

#[test]
fn trace_is_deterministic_apart_from_timings() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "local")
        .expect("local");
    let options = OptimizeOptions::default();
    let a = optimize(&kernel, &small(), &options).trace;
    let b = optimize(&kernel, &small(), &options).trace;
    assert_eq!(a.output, b.output);
    assert_eq!(a.derivation, b.derivation);
    assert_eq!(a.applied, b.applied);
    let nodes = |t: &attnc_opt::Trace| {
        t.iterations
            .iter()
            .map(|i| i.egraph_nodes)
            .collect::<Vec<_>>()
    };
    assert_eq!(nodes(&a), nodes(&b));
}

#[test]
fn score_forms_the_jit_fuses_are_left_in_place() {
    // alibi and the tanh softcap have scores the optimizer cannot fuse but the JIT can, as
    // long as the score stays `q @ kᵀ` of the parameters: no scale folding into q.
    let bindings = small();
    for name in ["alibi", "gqa_softcap"] {
        let (_, kernel) = common::examples()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("example");
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        assert!(
            result
                .trace
                .output_term
                .contains("(matmul (input q) (transpose (input k)))"),
            "{name}: {}",
            result.trace.output_term
        );
    }
}

#[test]
fn trace_serializes_to_json() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "local")
        .expect("local");
    let result = optimize(&kernel, &small(), &OptimizeOptions::default());
    let json = serde_json::to_value(&result.trace).expect("serializes");
    assert_eq!(json["kernel"], "local");
    assert_eq!(json["stop_reason"], "Saturated");
    assert!(json["derivation"][0]["rule"].is_string());
}

#[test]
fn every_example_round_trips_through_the_egraph_language() {
    let bindings = small();
    for (name, kernel) in common::examples() {
        let expr = to_recexpr(&kernel).expect("converts");
        let back = attnc_opt::convert::to_kernel(&expr, &kernel, &bindings).expect("converts back");
        assert_eq!(
            attnc_ir::print::print_kernel(&back),
            attnc_ir::print::print_kernel(&kernel),
            "{name}"
        );
        assert_eq!(common::compare(&kernel, &back, &bindings, 5), 0.0, "{name}");
    }
}

#[test]
fn odd_programs_convert_and_stay_correct() {
    let src = "kernel odd(x: f32[4, n], y: f32[n, 4], s: f32[4, 1]) -> f32[4, 1] {
        let a = maximum(abs(x) - relpos(4, n), minimum(sigmoid(x), tanh(x)));
        let b = exp(-relu(a)) * rsqrt(1 + log(1 + abs(x))) + zeros(4, n);
        let c = softmax(mask(b @ y @ x, block(2) | dilated(1, 2), 0.5), 0) @ y;
        return max(mean(c, -1) + s, 1) / n;
    }";
    let kernel = common::kernel(src);
    let bindings = common::bindings(&[("n", 6)]);
    let expr = to_recexpr(&kernel).expect("converts");
    let back = attnc_opt::convert::to_kernel(&expr, &kernel, &bindings).expect("converts back");
    assert_eq!(
        attnc_ir::print::print_kernel(&back),
        attnc_ir::print::print_kernel(&kernel)
    );
    let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
    assert!(common::compare(&kernel, &result.kernel, &bindings, 9) <= 1e-9);
}

#[test]
fn returning_a_parameter_is_fine() {
    let kernel = common::kernel("kernel id(a: f32[n], b: f32[n]) -> f32[n] { return a; }");
    let bindings = common::bindings(&[("n", 3)]);
    let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
    assert!(common::compare(&kernel, &result.kernel, &bindings, 1) == 0.0);
}

#[test]
fn causal_linear_attention_extracts_the_prefix_form() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "linear_causal")
        .expect("linear_causal");
    // m = n, and chunked shapes are covered by the rule's property test.
    let bindings = common::bindings(&[("h", 2), ("n", 64), ("d", 4)]);
    let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
    assert_eq!(result.trace.decision, Decision::Rewritten);
    assert!(
        result
            .trace
            .output_term
            .contains("(linear-attention-causal "),
        "{}",
        result.trace.render_text()
    );
    assert_eq!(result.trace.derivation_rules(), ["linear-causal-fuse"]);
    assert!(result.trace.cost_after < result.trace.cost_before / 4.0);
}

#[test]
fn the_cost_model_uses_the_ceilings_it_is_given() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "linear_causal")
        .expect("linear_causal");
    let bindings = common::bindings(&[("h", 2), ("n", 64), ("d", 4)]);
    let base = optimize(&kernel, &bindings, &OptimizeOptions::default()).trace;
    assert_eq!(base.ceilings, attnc_opt::Ceilings::default());
    // Twice the compute and twice the bandwidth: every cost halves, the choice stays.
    let fast = attnc_opt::Ceilings {
        gflops: 100.0,
        gbytes_per_second: 24.0,
        ghz: 3.0,
    };
    let options = OptimizeOptions {
        ceilings: fast,
        ..OptimizeOptions::default()
    };
    let trace = optimize(&kernel, &bindings, &options).trace;
    assert_eq!(trace.ceilings, fast);
    assert!((trace.cost_before * 2.0 - base.cost_before).abs() <= 1e-6 * base.cost_before);
    assert_eq!(trace.output_term, base.output_term);
}

/// MLA by phase: decoding attends over the latent cache itself (absorbed), prefill over
/// materialized keys, and the trace names the choice with both costs.
#[test]
fn latent_attention_is_absorbed_for_decoding_and_materialized_for_prefill() {
    let (_, kernel) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "mla")
        .expect("mla");
    for (m, n, want) in [(1, 65536, "absorbed"), (4096, 4096, "materialized")] {
        let bindings = common::bindings(&[("h", 16), ("m", m), ("n", n), ("r", 512), ("e", 128)]);
        let result = optimize(&kernel, &bindings, &OptimizeOptions::default());
        let latent = &result.trace.latent;
        assert_eq!(latent.len(), 2, "{}", result.trace.render_text());
        let chosen: Vec<_> = latent.iter().filter(|f| f.chosen).collect();
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].form, want, "m={m} n={n}");
        assert_eq!(latent[0].form, want, "the chosen form is the cheaper");
        let depth = if want == "absorbed" { 512 } else { 128 };
        assert_eq!(chosen[0].depth, depth);
        let text = result.trace.render_text();
        assert!(text.contains("latent attention"), "{text}");
        assert!(text.contains(&format!("{want}: depth {depth}")), "{text}");
    }
    // A program without latent keys has no such section.
    let (_, local) = common::examples()
        .into_iter()
        .find(|(n, _)| n == "local")
        .expect("local");
    let bindings = common::bindings(&[("h", 2), ("n", 256), ("d", 16)]);
    assert!(optimize(&local, &bindings, &OptimizeOptions::default())
        .trace
        .latent
        .is_empty());
}
