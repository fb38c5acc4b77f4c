//! The memory bandwidth of this machine, measured with Cranelift code: one JIT-compiled
//! function sums a buffer far larger than any cache with four independent f32x4 accumulators
//! (so the loop is bound by memory, not by add latency), like the kernels that stream their
//! operands. Being generated code, the figure does not depend on how the caller was built.
//!
//! ```no_run
//! let gbs = attnc_jit::bandwidth::measure_bandwidth(64 << 20).expect("the host compiles");
//! println!("{gbs:.1} GB/s");
//! ```

use crate::buffer::{BufferView, Elem};
use crate::error::Result;
use crate::jit::{Jit, KernelHandle};
use crate::kernels::{counted_loop, elem_addr, mem, KernelArgs};
use cranelift_codegen::ir::{types, InstBuilder};
use std::time::Instant;

/// Floats per loop iteration: four f32x4 loads (one 64-byte cache line).
pub const ROW_FLOATS: usize = 16;

/// Timed passes; the fastest is reported (the first pass also faults the pages in).
pub const PASSES: usize = 3;

/// Compiles the sum over `rows` rows of [`ROW_FLOATS`] floats: the kernel reads operand 0 and
/// writes the folded accumulator (4 floats) to the output; one call sums rows `[begin, end)`.
fn compile_sum(rows: usize) -> Result<KernelHandle> {
    let mut jit = Jit::new()?;
    let id = jit.define_kernel("bandwidth_sum", |b, _, p| {
        let args = KernelArgs::new(p);
        let base = args.input_ptr(b, 0);
        let zero_f = b.ins().f32const(0.0);
        let zero_v = b.ins().splat(types::F32X4, zero_f);
        let accs: Vec<_> = (0..4)
            .map(|_| {
                let var = b.declare_var(types::F32X4);
                b.def_var(var, zero_v);
                var
            })
            .collect();
        counted_loop(b, args.begin, args.end, 1, |b, row| {
            let offset = b.ins().imul_imm_s(row, ROW_FLOATS as i64);
            let addr = elem_addr(b, base, offset);
            for (k, var) in accs.iter().enumerate() {
                let x = b.ins().load(types::F32X4, mem(), addr, (16 * k) as i32);
                let old = b.use_var(*var);
                let new = b.ins().fadd(old, x);
                b.def_var(*var, new);
            }
            Ok(())
        })?;
        let mut sum = b.use_var(accs[0]);
        for var in &accs[1..] {
            let x = b.use_var(*var);
            sum = b.ins().fadd(sum, x);
        }
        b.ins().store(mem(), sum, args.output, 0);
        b.ins().return_(&[]);
        Ok(())
    })?;
    let code = jit.finish()?;
    code.handle(
        id,
        "bandwidth_sum",
        vec![(rows * ROW_FLOATS, Elem::F32)],
        4,
        1,
        rows,
    )
}

/// GB/s (10⁹ bytes per second) of one thread summing about `bytes` bytes of f32 (rounded
/// down to whole rows, at least one): the fastest of [`PASSES`] passes.
pub fn measure_bandwidth(bytes: usize) -> Result<f64> {
    let rows = (bytes / (4 * ROW_FLOATS)).max(1);
    let handle = compile_sum(rows)?;
    let data: Vec<f32> = (0..rows * ROW_FLOATS).map(|i| (i % 7) as f32).collect();
    let mut out = [0.0f32; 4];
    let mut best = f64::INFINITY;
    for _ in 0..PASSES {
        let start = Instant::now();
        handle.run(&[BufferView::F32(&data)], &mut out, 1)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((data.len() * 4) as f64 / best.max(f64::MIN_POSITIVE) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_sums_what_it_reads() {
        let rows = 37;
        let handle = compile_sum(rows).expect("compiles");
        let data: Vec<f32> = (0..rows * ROW_FLOATS).map(|i| (i % 5) as f32).collect();
        let mut out = [0.0f32; 4];
        handle
            .run(&[BufferView::F32(&data)], &mut out, 1)
            .expect("runs");
        let total: f32 = out.iter().sum();
        assert_eq!(total, data.iter().sum::<f32>());
    }

    #[test]
    fn the_probe_gives_a_positive_figure() {
        let gbs = measure_bandwidth(1 << 20).expect("measured");
        assert!(gbs.is_finite() && gbs > 0.0);
    }
}
