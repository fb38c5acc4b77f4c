//! Criterion benchmarks of the low-precision fused attention kernels, each next to its f32
//! counterpart in the same run:
//!
//! - `decode` (m = 1, h = 8, n = 32768, d = 128): f32 K/V against bf16 K/V (read natively);
//! - `int8` (dense, h = 8, n = 4096, d = 64): the exact f32 kernel against the int8 kernel
//!   (the fused attention op with int8 precision, the form the optimizer emits for
//!   `@approx(int8)`).
//!
//! `cargo bench --bench lowp` (about two minutes on 2 cores).

use attnc::io::standard_normal;
use attnc::ir::fused::expand::with_precision;
use attnc::ir::{Bindings, DType, Kernel, Precision};
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::Duration;

const DECODE_F32: &str = include_str!("kernels/decode.attn");
const DECODE_BF16: &str = include_str!("../examples/decode.attn");
const DENSE: &str = include_str!("kernels/dense.attn");

fn kernel(text: &str) -> Kernel {
    let module = attnc::source::compile_text(text).expect("benchmark program checks");
    module.kernels.into_iter().next().expect("one kernel")
}

/// Standard-normal inputs for every parameter, in its storage type.
struct Inputs {
    f32s: Vec<Vec<f32>>,
    bf16s: Vec<Vec<half::bf16>>,
    dtypes: Vec<DType>,
}

impl Inputs {
    fn new(kernel: &Kernel, bindings: &Bindings) -> Inputs {
        let mut f32s = Vec::new();
        let mut bf16s = Vec::new();
        for (i, p) in kernel.params.iter().enumerate() {
            let shape = attnc::ir::dim::resolve_shape(&p.shape, bindings).expect("bound");
            let data = standard_normal(0, i as u64, shape.iter().product());
            bf16s.push(data.iter().map(|&x| half::bf16::from_f32(x)).collect());
            f32s.push(data);
        }
        Inputs {
            f32s,
            bf16s,
            dtypes: kernel.params.iter().map(|p| p.dtype).collect(),
        }
    }

    fn views(&self) -> Vec<Input<'_>> {
        self.dtypes
            .iter()
            .enumerate()
            .map(|(i, dt)| match dt {
                DType::Bf16 => Input::Bf16(&self.bf16s[i]),
                _ => Input::F32(&self.f32s[i]),
            })
            .collect()
    }
}

fn bindings(h: usize, n: usize, d: usize) -> Bindings {
    [("h", h), ("n", n), ("d", d)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect()
}

fn bench_pair(c: &mut Criterion, group: &str, cases: [(&str, Kernel); 2], b: &Bindings) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for (name, k) in &cases {
        let compiled = CompiledKernel::compile(k, b, &CompileOptions::default()).expect("compiles");
        assert!(compiled.plan().to_string().contains("fused attention"));
        let inputs = Inputs::new(k, b);
        for t in [1, threads] {
            g.bench_with_input(BenchmarkId::new(*name, format!("t{t}")), &t, |bench, &t| {
                bench.iter(|| compiled.run(black_box(&inputs.views()), t).expect("runs"))
            });
            if threads == 1 {
                break;
            }
        }
    }
    g.finish();
}

fn lowp(c: &mut Criterion) {
    let decode = bindings(8, 32768, 128);
    let fused = |text: &str, b: &Bindings| {
        attnc::Compiler::new()
            .optimize_exact(&kernel(text), b)
            .kernel
    };
    bench_pair(
        c,
        "decode_h8_n32768_d128",
        [
            ("f32", fused(DECODE_F32, &decode)),
            ("bf16", fused(DECODE_BF16, &decode)),
        ],
        &decode,
    );
    let b = bindings(8, 4096, 64);
    let dense = fused(DENSE, &b);
    let int8 = with_precision(&dense, &[], Precision::Int8);
    bench_pair(
        c,
        "dense_h8_n4096_d64",
        [("exact", dense), ("int8", int8)],
        &b,
    );
}

criterion_group!(benches, lowp);
criterion_main!(benches);
