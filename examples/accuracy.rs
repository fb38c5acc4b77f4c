//! The accuracy table of docs/PERFORMANCE.md: the relative L2 error of each approximation
//! against the exact plan, over sequence lengths, input scales and feature counts / ranks.
//!
//! ```text
//! cargo run --release --example accuracy            # the full table (n = 1024, 4096)
//! cargo run --release --example accuracy -- 256     # a quick one at n = 256
//! cargo run --release --example accuracy -- 4096 0.25,0.5   # other input scales
//! ```
//!
//! Each row compiles the dense attention kernel below twice — exact, and with one
//! approximation allowed under an unbounded tolerance so that it is always applied — runs
//! both on the same standard-normal inputs times the scale (one head, d = 64), and compares
//! the whole outputs. bf16 and f16 storage of f32 inputs is rarely cheaper under the cost
//! model (the rounding pass costs more than the narrower loads save), so for them the table
//! also has a "declared" row: the same kernel with `bf16`/`f16` parameters, run on the rounded
//! inputs — the error that storing Q, K and V in that type costs.

use attnc::approx::relative_l2;
use attnc::engine::input_view;
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::{Bindings, Kernel};
use attnc::policy::Policy;
use attnc::syntax::ast::ApproxKind;
use attnc_jit::CompiledKernel;
use half::{bf16, f16};

const SOURCE: &str =
    "kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

/// The dense kernel with its parameters stored in `dtype` (f32 accumulation).
fn declared(dtype: &str) -> String {
    SOURCE
        .replace("q: f32", &format!("q: {dtype}"))
        .replace("k: f32", &format!("k: {dtype}"))
        .replace("v: f32", &format!("v: {dtype}"))
}

/// `inputs` rounded to `dtype`.
fn rounded(inputs: &[Tensor], dtype: &str) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|t| {
            let TensorData::F32(values) = &t.data else {
                unreachable!("the inputs are f32")
            };
            let data = match dtype {
                "bf16" => TensorData::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
                _ => TensorData::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            };
            Tensor {
                shape: t.shape.clone(),
                data,
            }
        })
        .collect()
}

/// Compiles `kernel` under `policy`, validating on `calibration` (else the policy's seed).
fn compile_with_policy(
    kernel: &Kernel,
    bindings: &Bindings,
    policy: &Policy,
    calibration: &[(String, Tensor)],
    threads: usize,
) -> Result<attnc::Compiled, attnc::engine::RunError> {
    let calibration = attnc::Calibration {
        tensors: calibration,
        ..Default::default()
    };
    attnc::Compiler::new()
        .with_policy(policy.clone())
        .with_threads(threads)
        .compile_calibrated(kernel, bindings, calibration)
}

/// The exact plan's machine code.
fn compile(
    kernel: &Kernel,
    bindings: &Bindings,
) -> Result<CompiledKernel, attnc::engine::RunError> {
    Ok(attnc::Compiler::new().compile(kernel, bindings)?.code)
}

fn main() {
    let lengths: Vec<usize> = match std::env::args().nth(1) {
        Some(n) => vec![n.parse().expect("a sequence length")],
        None => vec![1024, 4096],
    };
    let scales: Vec<f32> = match std::env::args().nth(2) {
        Some(list) => list
            .split(',')
            .map(|s| s.parse().expect("a scale"))
            .collect(),
        None => vec![0.5, 1.0],
    };
    let module = attnc::source::compile_text(SOURCE).expect("the kernel checks");
    let kernel = &module.kernels[0];
    let approximations = |size: u64| {
        vec![
            ("bf16".to_string(), ApproxKind::Bf16),
            ("f16".to_string(), ApproxKind::F16),
            ("int8".to_string(), ApproxKind::Int8),
            (
                format!("random_features(m={size})"),
                ApproxKind::RandomFeatures {
                    m: size,
                    seed: Some(7),
                },
            ),
            (
                format!("lowrank(r={size})"),
                ApproxKind::Lowrank { r: size },
            ),
        ]
    };
    println!("| approximation | n | scale | relative L2 error | applied |");
    println!("|---|---|---|---|---|");
    let mut seen = std::collections::HashSet::new();
    for &n in &lengths {
        let bindings = [("h", 1u64), ("n", n as u64), ("d", 64)]
            .into_iter()
            .map(|(s, v)| (s.to_string(), v))
            .collect();
        for &scale in &scales {
            let inputs: Vec<Tensor> = (0..3)
                .map(|stream| {
                    let values = standard_normal(11, stream, n * 64)
                        .into_iter()
                        .map(|x| x * scale)
                        .collect();
                    Tensor {
                        shape: vec![1, n, 64],
                        data: TensorData::F32(values),
                    }
                })
                .collect();
            let views: Vec<_> = inputs.iter().map(input_view).collect();
            let exact = compile(kernel, &bindings).expect("compiles");
            let reference = exact.run(&views, 2).expect("runs").data;
            for dtype in ["bf16", "f16"] {
                let module = attnc::source::compile_text(&declared(dtype)).expect("checks");
                let code = compile(&module.kernels[0], &bindings).expect("compiles");
                let narrow = rounded(&inputs, dtype);
                let narrow_views: Vec<_> = narrow.iter().map(input_view).collect();
                let output = code.run(&narrow_views, 2).expect("runs").data;
                let error = relative_l2(&output, &reference);
                println!("| {dtype} (declared parameters) | {n} | {scale} | {error:.2e} | yes |");
            }
            for size in [64u64, 256, 1024] {
                for (name, kind) in approximations(size) {
                    if !seen.insert((name.clone(), n, scale.to_bits())) {
                        continue;
                    }
                    let policy = Policy {
                        allowed: vec![kind],
                        tol: f64::INFINITY,
                    };
                    let result =
                        compile_with_policy(kernel, &bindings, &policy, &[], 2).expect("compiles");
                    let applied = result.trace.approximations.iter().any(|o| o.applied);
                    let output = result.code.run(&views, 2).expect("runs").data;
                    let error = relative_l2(&output, &reference);
                    let applied = if applied { "yes" } else { "no (not cheaper)" };
                    println!("| {name} | {n} | {scale} | {error:.2e} | {applied} |");
                }
            }
        }
    }
}
