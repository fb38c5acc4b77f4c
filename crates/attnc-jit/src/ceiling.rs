//! The f32x4 FMA ceiling of this machine, measured with Cranelift: the denominator of every
//! "% of ceiling" figure that `attnc bench` reports.
//!
//! One JIT-compiled function (the shared kernel ABI of [`crate::jit::KERNEL_ABI`]) runs a
//! fixed number of iterations of [`ACCUMULATORS`] independent `fma` chains on f32x4 values
//! held in registers: no loads, one store of the folded accumulators at the end (so the loop
//! is not dead code). Each iteration is `ACCUMULATORS × 4 lanes × 2` FLOPs. With `threads`
//! threads each thread runs the function once; the wall time of the slowest covers all.
//!
//! ```no_run
//! let c = attnc_jit::ceiling::measure_f32x4_ceiling(1).expect("the host compiles");
//! println!("{:.1} GFLOP/s per thread", c.gflops_per_thread);
//! ```

use crate::error::Result;
use crate::jit::{Jit, KernelHandle};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Value};
use std::time::Instant;

/// Independent accumulator chains (FMA latency 4 cycles × 2 ports needs at least 8).
pub const ACCUMULATORS: usize = 12;

/// Loop iterations per run: `ACCUMULATORS × 8 × ITERATIONS` ≈ 1.9 GFLOP, about 40 ms at the
/// expected 50 GFLOP/s.
pub const ITERATIONS: u64 = 20_000_000;

/// Timed repeats; the median is reported.
pub const REPEATS: usize = 5;

/// A measured ceiling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceiling {
    /// Threads that ran the loop at once.
    pub threads: usize,
    /// Median GFLOP/s of one thread (total / threads).
    pub gflops_per_thread: f64,
    /// Median GFLOP/s of all threads together.
    pub gflops_total: f64,
}

/// FLOPs of one run of the loop on one thread.
pub fn flops_per_run() -> f64 {
    (ACCUMULATORS as f64) * 8.0 * ITERATIONS as f64
}

/// Compiles the FMA loop for `batches` threads: `fn(_, out, batch, _, _)` runs `iterations`
/// iterations and writes 4 floats at `out + 16 * batch`.
fn compile_loop_with(iterations: u64, batches: usize) -> Result<KernelHandle> {
    let mut jit = Jit::new()?;
    let id = jit.define_kernel("f32x4_fma_ceiling", |b, _, p| {
        let output = p[1];
        let batch = p[2];
        let splat = |b: &mut cranelift_frontend::FunctionBuilder<'_>, c: f32| {
            let s = b.ins().f32const(c);
            b.ins().splat(types::F32X4, s)
        };
        // acc ← acc · a + c converges to c / (1 - a): no overflow, no subnormals.
        let a = splat(b, 0.999_9);
        let c = splat(b, 1.0e-3);
        let mut init: Vec<BlockArg> = vec![BlockArg::Value(b.ins().iconst(types::I64, 0))];
        for k in 0..ACCUMULATORS {
            init.push(BlockArg::Value(splat(b, k as f32 * 0.01)));
        }
        let body = b.create_block();
        b.append_block_param(body, types::I64);
        for _ in 0..ACCUMULATORS {
            b.append_block_param(body, types::F32X4);
        }
        let exit = b.create_block();
        for _ in 0..ACCUMULATORS {
            b.append_block_param(exit, types::F32X4);
        }
        b.ins().jump(body, &init);

        b.switch_to_block(body);
        let params: Vec<Value> = b.block_params(body).to_vec();
        let counter = params[0];
        let mut next: Vec<BlockArg> = Vec::with_capacity(ACCUMULATORS + 1);
        let bumped = b.ins().iadd_imm_s(counter, 1);
        next.push(BlockArg::Value(bumped));
        let mut accs = Vec::with_capacity(ACCUMULATORS);
        for &acc in &params[1..] {
            let v = b.ins().fma(acc, a, c);
            accs.push(v);
            next.push(BlockArg::Value(v));
        }
        let more = b
            .ins()
            .icmp_imm_u(IntCC::UnsignedLessThan, bumped, iterations as i64);
        let done: Vec<BlockArg> = accs.iter().map(|&v| BlockArg::Value(v)).collect();
        b.ins().brif(more, body, &next, exit, &done);

        b.switch_to_block(exit);
        let finals: Vec<Value> = b.block_params(exit).to_vec();
        let mut sum = finals[0];
        for &v in &finals[1..] {
            sum = b.ins().fadd(sum, v);
        }
        let offset = b.ins().imul_imm_s(batch, 16);
        let addr = b.ins().iadd(output, offset);
        b.ins()
            .store(MemFlagsData::new().with_notrap(), sum, addr, 0);
        b.ins().return_(&[]);
        Ok(())
    })?;
    let code = jit.finish()?;
    code.handle(id, "f32x4_fma_ceiling", Vec::new(), 4 * batches, batches, 1)
}

/// Runs the loop once on each of `threads` threads; returns the wall seconds.
fn time_once(handle: &KernelHandle, out: &mut [f32], threads: usize) -> Result<f64> {
    let start = Instant::now();
    handle.run(&[], out, threads)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Measures the register-resident f32x4 FMA throughput with `threads` threads (at least 1):
/// one warm-up run, then the median of [`REPEATS`] timed runs.
pub fn measure_f32x4_ceiling(threads: usize) -> Result<Ceiling> {
    let threads = threads.max(1);
    let handle = compile_loop_with(ITERATIONS, threads)?;
    let mut out = vec![0.0f32; 4 * threads];
    time_once(&handle, &mut out, threads)?;
    let mut seconds = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        seconds.push(time_once(&handle, &mut out, threads)?);
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2].max(f64::MIN_POSITIVE);
    let total = flops_per_run() * threads as f64 / median / 1e9;
    Ok(Ceiling {
        threads,
        gflops_per_thread: total / threads as f64,
        gflops_total: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop computes what it says: each lane follows acc ← acc · a + c.
    #[test]
    fn loop_result_matches_the_recurrence() {
        let iterations = 1000;
        let handle = compile_loop_with(iterations, 2).expect("compiles");
        let mut out = vec![0.0f32; 8];
        handle.run(&[], &mut out, 2).expect("runs");
        let mut want = 0.0f32;
        for k in 0..ACCUMULATORS {
            let mut acc = k as f32 * 0.01;
            for _ in 0..iterations {
                acc = acc.mul_add(0.999_9, 1.0e-3);
            }
            want += acc;
        }
        for &x in &out {
            assert!((x - want).abs() <= 1e-3 * want.abs(), "{x} vs {want}");
        }
    }
}
