//! How the measured error of a plan depends on the calibration sample size: the relative L2
//! error of the int8 plan of dense attention over `R` runs of 64 query rows (the validation
//! sample is 4 runs), against the error over every row of the batch entry, for a few seeds.
//!
//! ```text
//! cargo run --release --example validation_sample              # n = 4096, d = 64, seeds 0..5
//! cargo run --release --example validation_sample -- 1024 3    # n = 1024, seeds 0..3
//! ```
//!
//! Timing shows what the sampled run of the int8 plan costs at each size (one thread).

use attnc::approx::relative_l2;
use attnc::calibration::{calibration_inputs, sample_rows_with, DrawnInputs, Fill, SAMPLE_RUN};
use attnc::engine::input_view;
use attnc::policy::Policy;
use attnc::syntax::ast::ApproxKind;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use std::time::Instant;

const SOURCE: &str =
    "kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(4096, |s| s.parse().expect("a sequence length"));
    let seeds: u64 = std::env::args()
        .nth(2)
        .map_or(5, |s| s.parse().expect("a seed count"));
    let module = attnc::source::compile_text(SOURCE).expect("the kernel checks");
    let kernel = &module.kernels[0];
    let bindings = [("h", 1), ("n", n), ("d", 64)]
        .iter()
        .map(|&(k, v)| (k.to_string(), v))
        .collect();
    let policy = Policy {
        allowed: vec![ApproxKind::Int8],
        tol: 1.0,
    };
    let compiler = attnc::Compiler::new().with_policy(policy);
    let plan = compiler.optimize(kernel, &bindings).kernel;
    let int8 = CompiledKernel::compile(&plan, &bindings, &CompileOptions::default())
        .expect("the int8 plan compiles");
    let exact = attnc::Compiler::new()
        .compile(kernel, &bindings)
        .expect("the exact plan compiles")
        .code;
    let runs: Vec<usize> = [1, 2, 4, 8, 16, 64]
        .into_iter()
        .filter(|&r| r * SAMPLE_RUN <= n as usize)
        .collect();
    println!(
        "| seed | all {n} rows | {} |",
        runs.iter()
            .map(|r| format!("{} rows", r * SAMPLE_RUN))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---:|---:|{}", "---:|".repeat(runs.len()));
    let mut millis = vec![0.0; runs.len()];
    for seed in 0..seeds {
        let inputs = calibration_inputs(
            kernel,
            &bindings,
            seed,
            &[],
            DrawnInputs::default(),
            Fill::Repeat,
            2,
        )
        .expect("inputs");
        let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
        let whole = relative_l2(
            &int8.run(&views, 2).expect("runs").data,
            &exact.run(&views, 2).expect("runs").data,
        );
        let mut cells = Vec::new();
        for (slot, &r) in runs.iter().enumerate() {
            let rows = sample_rows_with(int8.output_shape(), r, SAMPLE_RUN);
            let start = Instant::now();
            let approximate = int8.run_sample(&views, 1, &rows).expect("runs");
            millis[slot] += start.elapsed().as_secs_f64() * 1e3 / seeds as f64;
            let reference = exact.run_sample(&views, 1, &rows).expect("runs");
            cells.push(format!("{:.3e}", relative_l2(&approximate, &reference)));
        }
        println!("| {seed} | {whole:.3e} | {} |", cells.join(" | "));
    }
    let times: Vec<String> = millis.iter().map(|ms| format!("{ms:.1} ms")).collect();
    println!("| int8 sampled run, mean | | {} |", times.join(" | "));
}
