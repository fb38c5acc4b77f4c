//! Golden derivations and text traces (insta snapshots; re-bless with
//! `INSTA_UPDATE=always cargo test -p attnc-opt --test golden`, then review the diff): the
//! rewrites the optimizer takes on LANGUAGE.md examples, rule by rule, and the whole text
//! trace less its timings (`Trace::render_text_without_timings`).

mod common;

use attnc_opt::{optimize, OptimizeOptions};

const LOCAL: &str =
    "kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = mask(s, causal & window(256));
    return softmax(s) @ v;
}";

const LINEAR: &str =
    "kernel linear(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let qf = elu(q) + 1;
    let kf = elu(k) + 1;
    return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);
}";

const LINEAR_CAUSAL: &str =
    "kernel linear_causal(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let qf = elu(q) + 1;
    let kf = elu(k) + 1;
    let a = mask(qf @ kf.T, causal, 0);
    return (a @ v) / sum(a, -1);
}";

const ALIBI: &str = "kernel alibi(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
    return softmax(mask(s, causal)) @ v;
}";

const GQA_SOFTCAP: &str =
    "kernel gqa_softcap(q: f32[h, n, d], k: f32[1, n, d], v: f32[1, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = 30 * tanh(s / 30);
    return softmax(mask(s, causal)) @ v;
}";

/// The optimizer's trace of `src` at h = 8, n = 4096, d = 64.
fn trace(src: &str) -> attnc_opt::Trace {
    let bindings = common::bindings(&[("h", 8), ("n", 4096), ("d", 64)]);
    optimize(&common::kernel(src), &bindings, &OptimizeOptions::default()).trace
}

#[test]
fn local_text_trace() {
    insta::assert_snapshot!("local_text", trace(LOCAL).render_text_without_timings());
}

#[test]
fn linear_text_trace() {
    insta::assert_snapshot!("linear_text", trace(LINEAR).render_text_without_timings());
}

#[test]
fn alibi_text_trace() {
    let trace = trace(ALIBI);
    insta::assert_snapshot!("alibi", trace.render_derivation());
    insta::assert_snapshot!("alibi_text", trace.render_text_without_timings());
}

#[test]
fn gqa_softcap_derivation() {
    insta::assert_snapshot!("gqa_softcap", trace(GQA_SOFTCAP).render_derivation());
}

#[test]
fn text_trace_without_timings_is_deterministic() {
    assert_eq!(
        trace(ALIBI).render_text_without_timings(),
        trace(ALIBI).render_text_without_timings()
    );
}

#[test]
fn local_derivation() {
    let bindings = common::bindings(&[("h", 8), ("n", 4096), ("d", 64)]);
    let result = optimize(
        &common::kernel(LOCAL),
        &bindings,
        &OptimizeOptions::default(),
    );
    insta::assert_snapshot!("local", result.trace.render_derivation());
    insta::assert_snapshot!("local_output", result.trace.output);
}

#[test]
fn linear_derivation() {
    let bindings = common::bindings(&[("h", 8), ("n", 4096), ("d", 64)]);
    let result = optimize(
        &common::kernel(LINEAR),
        &bindings,
        &OptimizeOptions::default(),
    );
    insta::assert_snapshot!("linear", result.trace.render_derivation());
    insta::assert_snapshot!("linear_output", result.trace.output);
}

#[test]
fn linear_causal_trace() {
    let trace = trace(LINEAR_CAUSAL);
    insta::assert_snapshot!("linear_causal", trace.render_derivation());
    insta::assert_snapshot!("linear_causal_text", trace.render_text_without_timings());
}

#[test]
fn per_rule_times_are_in_the_text_and_json_but_not_in_the_golden_text() {
    let trace = trace(LINEAR_CAUSAL);
    let first = &trace.iterations[0];
    let fuse = first
        .rule_times
        .iter()
        .find(|t| t.rule == "linear-causal-fuse")
        .expect("timed");
    assert_eq!(fuse.count, 1);
    assert!(first.rule_times.len() > 10, "every rule searched is timed");
    let text = trace.render_text();
    assert!(text.contains("slowest: "), "{text}");
    assert!(text.contains("(search "), "{text}");
    assert!(!trace.render_text_without_timings().contains("slowest: "));
    let json = serde_json::to_value(&trace).expect("serializes");
    let times = &json["iterations"][0]["rule_times"];
    assert!(times
        .as_array()
        .expect("array")
        .iter()
        .any(|t| t["rule"] == "linear-causal-fuse"
            && t["count"] == 1
            && t["search_seconds"].is_f64()));
}
