//! QUALITY.md item 14: one compiled kernel (`attnc_jit::CompiledKernel::run(&self, ..)`) called
//! from 8 threads at once gives results bit-identical to a call from one thread.

use attnc::ir::Bindings;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use std::sync::Barrier;

/// Callers running at once.
const CALLERS: usize = 8;
/// Calls per caller, so that the calls overlap for a while.
const CALLS: usize = 20;

/// Deterministic values in [-2, 2) (xorshift), so that the test needs no data files.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn bits(data: &[f32]) -> Vec<u32> {
    data.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn one_kernel_from_eight_threads_is_bit_identical_to_one_thread() {
    // Odd sizes: the fused attention kernel, a matmul and an elementwise tail all run.
    let module = attnc::source::compile_text(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
             let s = mask(q @ k.T / sqrt(d), causal & window(17));
             return softmax(s) @ v + tanh(q @ k.T @ v);
         }",
    )
    .expect("the program checks");
    let kernel = &module.kernels[0];
    let bindings: Bindings = [("h", 3), ("n", 113), ("d", 40)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let options = CompileOptions {
        // Split work across worker threads even at this small size.
        parallel_threshold: 0,
        ..CompileOptions::default()
    };
    let compiled = CompiledKernel::compile(kernel, &bindings, &options).expect("compiles");
    let len = 3 * 113 * 40;
    let (q, k, v) = (values(len, 1), values(len, 2), values(len, 3));
    let inputs = [Input::F32(&q), Input::F32(&k), Input::F32(&v)];
    let reference = bits(&compiled.run(&inputs, 1).expect("runs").data);
    assert!(reference.iter().any(|&b| b != 0), "a non-trivial result");

    let start = Barrier::new(CALLERS);
    std::thread::scope(|scope| {
        for caller in 0..CALLERS {
            let (compiled, inputs, reference, start) = (&compiled, &inputs, &reference, &start);
            scope.spawn(move || {
                start.wait();
                for call in 0..CALLS {
                    // Callers use 1 to 3 worker threads each: row splits must not change bits.
                    let threads = 1 + (caller + call) % 3;
                    let got = compiled.run(inputs, threads).expect("runs");
                    assert!(
                        bits(&got.data) == *reference,
                        "caller {caller}, call {call}, {threads} threads: bits differ"
                    );
                }
            });
        }
    });
}
