//! The Rust side of the Python call-overhead measurement: one decoding step (m = 1,
//! n = 4096, h = 8, d = 64) called through the library as a Rust program would, timed per
//! call.
//!
//! ```sh
//! ATTNC_CEILINGS=default cargo run --release -p attnc-py --example decode_overhead -- 1 20000
//! ```
//!
//! Arguments: threads (default 1) and calls (default 20000). Two kernels: `examples/decode.attn`
//! (bf16 key/value cache) and the same program with an f32 cache. For each it prints one line
//! of JSON with the median and mean microseconds per call after a warm-up;
//! `python/bench/overhead.py` runs this and the same calls from Python on the same inputs and
//! reports the differences. Inputs are `0.001 * (i % 997) - 0.5` (rounded to bf16 for the bf16
//! cache), the values the Python script builds.

use attnc::io::{Tensor, TensorData};
use attnc_jit::Input;
use half::bf16;
use std::time::Instant;

/// The f32-cache variant of `examples/decode.attn`.
const DECODE_F32: &str = "kernel decode_f32(q: f32[h, 1, d], k: f32[h, n, d], \
    v: f32[h, n, d]) -> f32[h, 1, d] { return softmax(q @ k.T / sqrt(d)) @ v; }";

fn values(len: usize) -> Vec<f32> {
    (0..len).map(|i| 0.001 * (i % 997) as f32 - 0.5).collect()
}

fn time_calls(
    source: &str,
    cache: TensorData,
    threads: usize,
    calls: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let module = attnc::source::compile_text(source).map_err(|d| format!("{d:?}"))?;
    let kernel = &module.kernels[0];
    let (h, n, d) = (8usize, 4096usize, 64usize);
    let q = Tensor::from_f32(vec![h, 1, d], values(h * d))?;
    let kv = Tensor::new(vec![h, n, d], cache)?;
    let inputs = [q, kv.clone(), kv];
    let bindings = attnc::engine::bind(kernel, &inputs, &Default::default())?;
    let compiled = attnc::Compiler::new()
        .with_threads(threads)
        .compile(kernel, &bindings)?;
    let views: Vec<Input<'_>> = inputs.iter().map(attnc::engine::input_view).collect();
    for _ in 0..calls / 10 {
        std::hint::black_box(compiled.code.run(&views, threads)?);
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let out = compiled.code.run(&views, threads)?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(out);
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok((median, mean))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let calls: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/decode.attn");
    let decode = std::fs::read_to_string(path)?;
    let len = 8 * 4096 * 64;
    let runs = [
        (
            "decode_bf16",
            decode.as_str(),
            TensorData::Bf16(values(len).into_iter().map(bf16::from_f32).collect()),
        ),
        ("decode_f32", DECODE_F32, TensorData::F32(values(len))),
    ];
    for (name, source, cache) in runs {
        let (median, mean) = time_calls(source, cache, threads, calls)?;
        println!(
            "{{\"kernel\": \"{name}\", \"threads\": {threads}, \"calls\": {calls}, \
             \"median_us\": {median:.3}, \"mean_us\": {mean:.3}}}"
        );
    }
    Ok(())
}
