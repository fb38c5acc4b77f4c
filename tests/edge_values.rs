//! QUALITY.md checklist item 9 through the facade: NaN, ±inf, denormals and huge logits in
//! inputs, and fully masked rows, give the documented results (never a panic).

use attnc::engine::{bind, execute, Engine};
use attnc::io::{Tensor, TensorData};
use attnc::ir::Bindings;

const ATTENTION: &str = "kernel a(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
    return softmax(mask(q @ k.T, causal)) @ v;
}";

fn tensor(shape: &[usize], values: Vec<f32>) -> Tensor {
    Tensor {
        shape: shape.to_vec(),
        data: TensorData::F32(values),
    }
}

fn run(src: &str, inputs: Vec<Tensor>) -> Vec<f32> {
    run_on(Engine::Interp, src, inputs)
}

fn run_on(engine: Engine, src: &str, inputs: Vec<Tensor>) -> Vec<f32> {
    let module = attnc::source::compile_text(src).expect("program checks");
    let kernel = &module.kernels[0];
    let bindings = bind(kernel, &inputs, &Bindings::new()).expect("shapes bind");
    execute(kernel, &bindings, &inputs, engine, 1)
        .expect("runs")
        .to_f32_vec()
}

/// v rows are [1, 2], [3, 4], [5, 6]; the causal mean of v is a handy exact answer.
fn v() -> Tensor {
    tensor(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
}

const CAUSAL_MEAN: [f32; 6] = [1.0, 2.0, 2.0, 3.0, 3.0, 4.0];

#[test]
fn denormal_inputs_give_uniform_attention() {
    let tiny = f32::from_bits(1); // the smallest positive subnormal
    let q = tensor(&[3, 2], vec![tiny; 6]);
    let k = tensor(&[3, 2], vec![-tiny; 6]);
    let out = run(ATTENTION, vec![q, k, v()]);
    assert_eq!(out, CAUSAL_MEAN);
}

#[test]
fn huge_logits_stay_finite() {
    // Scores of ±1e30: softmax picks the largest key per row without overflow.
    let q = tensor(&[3, 2], vec![1e15, 0.0, 1e15, 0.0, 1e15, 0.0]);
    let k = tensor(&[3, 2], vec![1e15, 0.0, -1e15, 0.0, 0.5e15, 0.0]);
    let out = run(ATTENTION, vec![q, k, v()]);
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    assert_eq!(out, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
}

#[test]
fn infinite_scores_follow_ieee_rules() {
    // A -inf key is simply never chosen; a +inf score makes its row NaN (inf - inf).
    let q = tensor(&[3, 2], vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    let k = tensor(&[3, 2], vec![0.0, 0.0, f32::NEG_INFINITY, 0.0, 0.0, 0.0]);
    let out = run(ATTENTION, vec![q.clone(), k, v()]);
    assert_eq!(&out[..2], &[1.0, 2.0]);
    assert_eq!(&out[2..4], &[1.0, 2.0], "the -inf key gets no weight");
    let k = tensor(&[3, 2], vec![f32::INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let out = run(ATTENTION, vec![q, k, v()]);
    assert!(out.iter().all(|x| x.is_nan()), "{out:?}");
}

#[test]
fn nan_in_a_masked_score_never_reaches_the_output() {
    // Key 2 is NaN, so every score (i, 2) is NaN; causal masks it out of rows 0 and 1 only.
    let q = tensor(&[3, 2], vec![0.0; 6]);
    let k = tensor(&[3, 2], vec![0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0]);
    let out = run(ATTENTION, vec![q, k, v()]);
    assert_eq!(
        &out[..4],
        &CAUSAL_MEAN[..4],
        "rows that mask the NaN stay exact"
    );
    assert!(
        out[4].is_nan() && out[5].is_nan(),
        "an unmasked NaN propagates: {out:?}"
    );
}

#[test]
fn fully_masked_rows_are_zero() {
    // block(2) & global(0) keeps nothing: global(0) is empty, so every row is fully masked.
    let src = "kernel a(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] {
        return softmax(mask(q @ k.T, block(2) & global(0))) @ v;
    }";
    let q = tensor(&[2, 1], vec![1.0, 2.0]);
    let k = tensor(&[4, 1], vec![1.0, 1.0, 1.0, 1.0]);
    let v = tensor(&[4, 1], vec![5.0, 6.0, 7.0, 8.0]);
    assert_eq!(run(src, vec![q, k, v]), vec![0.0, 0.0]);
}

#[test]
fn a_non_finite_row_bias_reaches_its_row_after_optimization() {
    // softmax(x + c) = softmax(x) only for a finite c: the optimizer must keep an input shift,
    // so a NaN or +inf bias makes its row NaN and a -inf bias masks the whole row (zeros).
    let src = "kernel a(q: f32[m, d], k: f32[n, d], v: f32[n, d], c: f32[m, 1]) -> f32[m, d] {
        return softmax(q @ k.T + c) @ v;
    }";
    let q = tensor(&[4, 1], vec![1.0, 2.0, 3.0, 4.0]);
    let k = tensor(&[3, 1], vec![0.5, -0.5, 1.0]);
    let v = tensor(&[3, 1], vec![1.0, 2.0, 3.0]);
    let c = tensor(
        &[4, 1],
        vec![f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 1.0],
    );
    for engine in [Engine::Interp, Engine::Jit] {
        let out = run_on(
            engine,
            src,
            vec![q.clone(), k.clone(), v.clone(), c.clone()],
        );
        assert!(out[0].is_nan(), "{engine:?}: {out:?}");
        assert_eq!(out[1], 0.0, "{engine:?}: {out:?}");
        assert!(out[2].is_nan(), "{engine:?}: {out:?}");
        assert!(out[3].is_finite(), "{engine:?}: {out:?}");
    }
}
