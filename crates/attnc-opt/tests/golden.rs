//! Golden derivations (insta snapshots; re-bless with `INSTA_UPDATE=always`): the rewrites
//! the optimizer takes on two LANGUAGE.md examples, rule by rule.

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
