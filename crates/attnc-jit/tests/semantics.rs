//! Corner cases of the semantics (QUALITY.md), each JIT result against the interpreter on
//! hand-made inputs: NaN, infinities, fully masked rows, empty dimensions, f16/bf16.
mod common;

use attnc_jit::plan::StepKind;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use common::{bindings, check, kernel, reference, rel_l2};

/// Runs `src` on explicit f32 inputs as written and as optimized (fused ops run fused and by
/// their plain form) and compares with the interpreter (NaN positions must agree).
fn check_values(src: &str, dims: &[(&str, u64)], values: &[Vec<f32>]) -> Vec<f32> {
    let k = kernel(src);
    let b = bindings(dims);
    let ins: Vec<(Vec<usize>, Vec<f32>)> = k
        .params
        .iter()
        .zip(values)
        .map(|(p, v)| {
            (
                attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound"),
                v.clone(),
            )
        })
        .collect();
    let want = reference(&k, &b, &ins);
    let fused = common::optimized(&k, &b);
    let mut last = Vec::new();
    for (program, fuse_attention) in [(&k, true), (&fused, false), (&fused, true)] {
        let options = CompileOptions {
            fuse_attention,
            ..CompileOptions::default()
        };
        let compiled = CompiledKernel::compile(program, &b, &options).expect("compile");
        let inputs: Vec<Input<'_>> = ins.iter().map(|(_, v)| Input::F32(v)).collect();
        let got = compiled.run(&inputs, 2).expect("run");
        let err = rel_l2(&got.data, &want);
        assert!(
            err <= common::REL_L2,
            "error {err} (fused: {fuse_attention})"
        );
        last = got.data;
    }
    last
}

const ATTN: &str = "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] \
    { return softmax(mask(q @ k.T, causal)) @ v; }";

#[test]
fn nan_in_masked_position_does_not_propagate() {
    // m = n = 2, d = 1: row 0 sees key 0 only; key 1 is NaN.
    let out = check_values(
        ATTN,
        &[("m", 2), ("n", 2), ("d", 1)],
        &[vec![1.0, 1.0], vec![1.0, f32::NAN], vec![3.0, 4.0]],
    );
    assert_eq!(out[0], 3.0);
    assert!(out[1].is_nan(), "row 1 sees the NaN key");
}

#[test]
fn fully_masked_rows_give_zeros() {
    // m = 3 > n = 1: rows 0 and 1 are aligned before the first key and see nothing.
    let out = check_values(
        ATTN,
        &[("m", 3), ("n", 1), ("d", 2)],
        &[vec![1.0; 6], vec![1.0, 2.0], vec![5.0, 6.0]],
    );
    assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 5.0, 6.0]);
}

#[test]
fn softmax_of_infinities_and_huge_logits() {
    let src = "kernel f(x: f32[r, n]) -> f32[r, n] { return softmax(x); }";
    let ninf = f32::NEG_INFINITY;
    let out = check_values(
        src,
        &[("r", 4), ("n", 3)],
        &[vec![
            ninf,
            ninf,
            ninf,
            1e30,
            1e30,
            0.0,
            1.0,
            f32::NAN,
            2.0,
            f32::INFINITY,
            0.0,
            1.0,
        ]],
    );
    assert_eq!(&out[0..3], &[0.0, 0.0, 0.0]);
    assert_eq!(&out[3..6], &[0.5, 0.5, 0.0]);
    assert!(out[6..9].iter().all(|x| x.is_nan()));
    assert!(out[9].is_nan());
}

#[test]
fn maximum_and_max_propagate_nan() {
    let src = "kernel f(x: f32[r, n], y: f32[r, n]) -> f32[r, 1] \
        { return max(maximum(x, y), -1) + sum(minimum(x, y), -1) + mean(relu(x), -1); }";
    let out = check_values(
        src,
        &[("r", 2), ("n", 2)],
        &[vec![1.0, f32::NAN, 2.0, 3.0], vec![0.0, 1.0, -5.0, -1.0]],
    );
    assert!(out[0].is_nan());
    assert!(!out[1].is_nan());
}

#[test]
fn empty_dimensions() {
    for (m, n, d) in [(0, 3, 2), (3, 0, 2), (3, 2, 0), (0, 0, 0)] {
        let d_num = if d == 0 { "" } else { " / sqrt(d)" };
        let src = format!(
            "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] \
             {{ return softmax(q @ k.T{d_num}) @ v; }}"
        );
        check(&src, &[("m", m), ("n", n), ("d", d)], 5);
        check(
            "kernel f(x: f32[m, n]) -> f32[m, 1] { return sum(x, -1) + max(x, 1) * 0 + mean(x, -1); }",
            &[("m", m), ("n", n)],
            6,
        );
    }
}

#[test]
fn half_precision_inputs_and_outputs() {
    for (ret, ulp) in [("f16", 1e-3), ("bf16", 8e-3)] {
        let src = format!(
            "kernel f(q: f16[h, m, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> {ret}[h, m, d] \
             {{ return softmax(q @ k.T / sqrt(d)) @ v + relu(q); }}"
        );
        let k = kernel(&src);
        let b = bindings(&[("h", 2), ("m", 5), ("n", 7), ("d", 3)]);
        let ins = common::inputs(&k, &b, 9);
        let want = reference(&k, &b, &ins);
        let compiled =
            CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compile");
        let got = common::run_jit(&compiled, &k, &ins, 1);
        // Both round an f32-accurate value once: at most one ulp of the storage type apart.
        for (g, w) in got.data.iter().zip(want.iter()) {
            let stored = if ret == "f16" {
                half::f16::from_f32(*g).to_f32()
            } else {
                half::bf16::from_f32(*g).to_f32()
            };
            assert_eq!(stored, *g, "output is {ret}-rounded");
            assert!((*g as f64 - w).abs() <= w.abs() * ulp + 1e-6, "{g} vs {w}");
        }
    }
}

#[test]
fn attention_is_fused_and_score_matrix_not_materialized() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] \
        { return softmax(mask(q @ k.T / sqrt(d), causal)) @ v; }";
    let b = bindings(&[("h", 2), ("n", 64), ("d", 8)]);
    let k = common::optimized(&kernel(src), &b);
    let compiled = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compile");
    let plan = compiled.plan();
    assert_eq!(plan.steps.len(), 1, "{:?}", plan.steps);
    assert!(matches!(plan.steps[0].kind, StepKind::Attention(_)));
    assert!(plan.buffers.iter().all(|b| b.len <= 2 * 64 * 8));
    assert!(plan.to_string().contains("fused attention"), "{plan}");
}

#[test]
fn transposed_operand_is_not_copied() {
    let k = kernel("kernel f(a: f32[m, k], b: f32[n, k]) -> f32[m, n] { return a @ b.T; }");
    let b = bindings(&[("m", 4), ("k", 5), ("n", 6)]);
    let compiled = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compile");
    assert_eq!(compiled.plan().steps.len(), 1);
}

#[test]
fn elementwise_chain_is_one_step() {
    let k = kernel(
        "kernel f(x: f32[n, d], b: f32[d]) -> f32[n, d] { return tanh(exp(x) * 2 + b) - relu(x); }",
    );
    let b = bindings(&[("n", 4), ("d", 5)]);
    let compiled = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compile");
    assert_eq!(compiled.plan().steps.len(), 1);
}

#[test]
fn oracle_comparison_detects_a_wrong_result() {
    // Guards the test harness itself: a different program must exceed the bound.
    let a = kernel("kernel f(x: f32[n]) -> f32[n] { return exp(x); }");
    let c = kernel("kernel f(x: f32[n]) -> f32[n] { return exp(x) * 1.001; }");
    let b = bindings(&[("n", 9)]);
    let ins = common::inputs(&a, &b, 1);
    let compiled = CompiledKernel::compile(&c, &b, &CompileOptions::default()).expect("compile");
    let got = common::run_jit(&compiled, &c, &ins, 1);
    assert!(rel_l2(&got.data, &reference(&a, &b, &ins)) > common::REL_L2);
}
