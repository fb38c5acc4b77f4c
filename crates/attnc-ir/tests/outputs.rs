//! Kernels with several outputs: `-> (T, U)` and `return (a, b);` lowered, checked,
//! evaluated, printed and read back.

use attnc_ir::interp::evaluate_all;
use attnc_ir::lower::lower_file;
use attnc_ir::print::print_kernel;
use attnc_ir::{Bindings, DType, Module};
use attnc_syntax::{parse, Diagnostic};
use ndarray::ArrayD;

const LSE: &str = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> (f32[n, d], f32[n, 1]) {
    let s = mask(q @ k.T / sqrt(d), causal);
    return (softmax(s, -1) @ v, logsumexp(s, -1));
}";

fn lower(src: &str) -> Result<Module, Vec<Diagnostic>> {
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "syntax errors: {diagnostics:#?}");
    lower_file(&file)
}

fn bindings(pairs: &[(&str, usize)]) -> Bindings {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), *v as u64))
        .collect()
}

fn array(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let len = shape.iter().product::<usize>();
    let data = (0..len)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64) / 500.0 - 1.0)
        .collect();
    ArrayD::from_shape_vec(shape.to_vec(), data).expect("shape")
}

#[test]
fn a_tuple_return_lowers_to_two_outputs_in_order() {
    let module = lower(LSE).expect("valid");
    let k = &module.kernels[0];
    let outputs = k.outputs();
    assert_eq!(outputs.len(), 2);
    assert!(k.has_several_outputs());
    assert_eq!(outputs[0].node, k.output);
    assert_eq!(k.graph.node(outputs[1].node).shape.len(), 2);
    assert!(outputs.iter().all(|o| o.dtype == DType::F32));
}

#[test]
fn the_interpreter_returns_every_output_and_lse_matches_its_definition() {
    let module = lower(LSE).expect("valid");
    let k = &module.kernels[0];
    let (n, d) = (5, 3);
    let inputs = [array(&[n, d], 1), array(&[n, d], 2), array(&[n, d], 3)];
    let values = evaluate_all(k, &bindings(&[("n", n), ("d", d)]), &inputs).expect("runs");
    assert_eq!(values.len(), 2);
    assert_eq!(values[0].shape(), &[n, d]);
    assert_eq!(values[1].shape(), &[n, 1]);
    let (q, kk) = (&inputs[0], &inputs[1]);
    for i in 0..n {
        let scores: Vec<f64> = (0..=i)
            .map(|j| (0..d).map(|c| q[[i, c]] * kk[[j, c]]).sum::<f64>() / (d as f64).sqrt())
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = top + scores.iter().map(|s| (s - top).exp()).sum::<f64>().ln();
        assert!((values[1][[i, 0]] - lse).abs() < 1e-12, "row {i}");
    }
}

#[test]
fn a_single_output_kernel_still_evaluates_to_one_value() {
    let src = "kernel g(x: f32[n]) -> f32[n] { return x * 2; }";
    let module = lower(src).expect("valid");
    let values = evaluate_all(
        &module.kernels[0],
        &bindings(&[("n", 2)]),
        &[array(&[2], 0)],
    );
    assert_eq!(values.expect("runs").len(), 1);
}

#[test]
fn a_count_mismatch_is_an_error_naming_both_counts() {
    let src = "kernel f(x: f32[n]) -> (f32[n], f32[n]) { return x; }";
    let errors = lower(src).expect_err("count mismatch");
    assert!(
        errors[0]
            .message
            .contains("returns 1 value but its return type lists 2"),
        "{errors:#?}"
    );
    let src = "kernel f(x: f32[n]) -> f32[n] { return (x, x); }";
    let errors = lower(src).expect_err("count mismatch");
    assert!(
        errors[0].message.contains("returns 2 values"),
        "{errors:#?}"
    );
}

#[test]
fn a_shape_mismatch_names_the_output() {
    let src = "kernel f(x: f32[n, d]) -> (f32[n, d], f32[n, d]) { return (x, sum(x, -1)); }";
    let errors = lower(src).expect_err("shape mismatch");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].message.starts_with("output 1: "), "{errors:#?}");
    let rendered = errors[0].render("f.attn", src);
    assert!(rendered.contains("f.attn:1:"), "{rendered}");
}

#[test]
fn a_bf16_second_output_ends_in_a_cast() {
    let src = "kernel f(x: f32[n]) -> (f32[n], bf16[n]) { return (x + 1, x * 2); }";
    let module = lower(src).expect("valid");
    let k = &module.kernels[0];
    assert_eq!(k.extra_outputs[0].dtype, DType::Bf16);
    assert!(matches!(
        k.graph.node(k.extra_outputs[0].node).op,
        attnc_ir::Op::Cast { to: DType::Bf16 }
    ));
}

#[test]
fn ir_text_of_several_outputs_reads_back() {
    let module = lower(LSE).expect("valid");
    let text = print_kernel(&module.kernels[0]);
    assert!(text.contains("-> (f32[n, d], f32[n, 1])"), "{text}");
    assert!(text.contains("  return %"), "{text}");
    let back = attnc_ir::text::parse_kernel(&text).expect("reads back");
    assert_eq!(back.output_nodes(), module.kernels[0].output_nodes());
    assert_eq!(print_kernel(&back), text);
}
