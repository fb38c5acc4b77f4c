//! Criterion benchmarks of the compiled attention kernel: dense, causal, causal window(256) and
//! decode (m = 1), each compiled once outside the timed loop, next to the naive Rust baseline
//! on the dense shape (one run compares both). Throughput is in useful FLOPs (`4·d` per kept
//! (query, key) pair), so criterion's "elem/s" reads as FLOP/s.
//!
//! `cargo bench --bench attention` (about two minutes on 2 cores).

use attnc::baseline::{naive_attention, plain_attention, useful_flops};
use attnc::engine::run_compiled;
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::Bindings;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const DENSE: &str = include_str!("kernels/dense.attn");
const CAUSAL: &str = include_str!("kernels/causal.attn");
const DECODE: &str = include_str!("kernels/decode.attn");
const LOCAL: &str = include_str!("../examples/local.attn");

/// One benchmark case: a program, its bound shapes and the inputs.
struct Case {
    name: &'static str,
    kernel: attnc::ir::Kernel,
    bindings: Bindings,
    inputs: Vec<Tensor>,
}

fn case(name: &'static str, text: &str, h: usize, m: usize, n: usize, d: usize) -> Case {
    let module = attnc::source::compile_text(text).expect("benchmark program checks");
    let kernel = module.kernels.into_iter().next().expect("one kernel");
    let bindings: Bindings = [("h", h), ("n", n), ("d", d)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect();
    let shapes = [[h, m, d], [h, n, d], [h, n, d]];
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let data = standard_normal(0, i as u64, s.iter().product());
            Tensor::new(s.to_vec(), TensorData::F32(data)).expect("valid tensor")
        })
        .collect();
    Case {
        name,
        kernel,
        bindings,
        inputs,
    }
}

fn attention(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (h, n, d) = (2, 1024, 64);
    let cases = [
        case("dense", DENSE, h, n, n, d),
        case("causal", CAUSAL, h, n, n, d),
        case("causal_window256", LOCAL, h, n, n, d),
        case("decode", DECODE, h, 1, 8192, d),
    ];
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        let compiled = attnc::Compiler::new()
            .compile(&case.kernel, &case.bindings)
            .expect("compiles")
            .code;
        let flops = useful_flops(compiled.plan()).flops;
        group.throughput(Throughput::Elements(flops as u64));
        let shape = format!("h{h}_n{}_d{d}", case.inputs[1].shape[1]);
        for t in [threads, 1] {
            group.bench_with_input(
                BenchmarkId::new(format!("{}/jit_t{t}", case.name), &shape),
                &t,
                |b, &t| {
                    b.iter(|| {
                        run_compiled(&compiled, case.kernel.ret_dtype, black_box(&case.inputs), t)
                            .expect("runs")
                    })
                },
            );
            if threads == 1 {
                break;
            }
        }
        if case.name == "dense" {
            let plain = plain_attention(compiled.plan()).expect("dense is plain attention");
            let values: Vec<Vec<f32>> = case.inputs.iter().map(Tensor::to_f32_vec).collect();
            let [q, k, v] = plain.gather(&values).expect("gathers");
            group.bench_function(BenchmarkId::new("dense/naive_t1", &shape), |b| {
                b.iter(|| {
                    naive_attention(
                        black_box(&q),
                        &k,
                        &v,
                        plain.shape,
                        plain.scale,
                        plain.mask.as_ref(),
                    )
                    .expect("runs")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
