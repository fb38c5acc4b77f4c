//! Reductions and softmax along one axis.
//!
//! The input is contiguous and viewed as `[outer, len, inner]` (the reduced axis in the
//! middle). The work space is (1, outer). Sums run sequentially along the axis, so results
//! do not depend on threads. `max` propagates NaN (Cranelift `fmax`), as the interpreter does.
//! Softmax subtracts the row max; a row whose max is `-inf` (every entry `-inf`, or no
//! entries) gives zeros; NaN propagates. A softmax with a sink (`softmax_sink`) reads one sink
//! logit per lane from its second input and starts the maximum and the sum from it. The
//! log-sum-exp is `m + log Σ exp(x - m)` for a finite maximum `m`, else `m` itself (`-inf`,
//! `+inf` or NaN), as the interpreter defines it.

use super::{counted_loop, elem_addr, iconst, mem, KernelArgs};
use crate::error::Result;
use crate::simd;
use attnc_ir::ReduceOp;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// The `[outer, len, inner]` view of a reduction or softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisSpec {
    /// Product of the axes before the reduced one.
    pub outer: usize,
    /// The reduced axis.
    pub len: usize,
    /// Product of the axes after it.
    pub inner: usize,
}

impl AxisSpec {
    /// Splits `shape` around `axis`.
    pub fn new(shape: &[usize], axis: usize) -> AxisSpec {
        AxisSpec {
            outer: shape[..axis].iter().product(),
            len: shape.get(axis).copied().unwrap_or(1),
            inner: shape.get(axis + 1..).map_or(1, |s| s.iter().product()),
        }
    }

    /// The work space: (1, outer).
    pub fn work(&self) -> (usize, usize) {
        (1, self.outer)
    }
}

/// Emits `for o in begin..end, for i in 0..inner { body(base offset of (o, 0, i)) }`, where
/// the offset is in elements of the input and `out_row` the row of the `[outer, inner]`
/// index.
fn each_lane(
    b: &mut FunctionBuilder,
    args: KernelArgs,
    spec: AxisSpec,
    mut body: impl FnMut(&mut FunctionBuilder, Value, Value) -> Result<()>,
) -> Result<()> {
    counted_loop(b, args.begin, args.end, 1, |b, o| {
        let zero = iconst(b, 0);
        let inner = iconst(b, spec.inner as i64);
        counted_loop(b, zero, inner, 1, |b, i| {
            let base = b.ins().imul_imm_s(o, (spec.len * spec.inner) as i64);
            let base = b.ins().iadd(base, i);
            let flat = b.ins().imul_imm_s(o, spec.inner as i64);
            let flat = b.ins().iadd(flat, i);
            body(b, base, flat)
        })
    })
}

/// Emits a loop over the axis: `f(acc, x)` folded from `init`; returns the final value.
fn fold(
    b: &mut FunctionBuilder,
    ptr: Value,
    base: Value,
    spec: AxisSpec,
    init: Value,
    mut f: impl FnMut(&mut FunctionBuilder, Value, Value) -> Value,
) -> Result<Value> {
    let acc = b.declare_var(types::F32);
    b.def_var(acc, init);
    let zero = iconst(b, 0);
    let len = iconst(b, spec.len as i64);
    counted_loop(b, zero, len, 1, |b, k| {
        let off = b.ins().imul_imm_s(k, spec.inner as i64);
        let off = b.ins().iadd(off, base);
        let addr = elem_addr(b, ptr, off);
        let x = b.ins().load(types::F32, mem(), addr, 0);
        let old = b.use_var(acc);
        let new = f(b, old, x);
        b.def_var(acc, new);
        Ok(())
    })?;
    Ok(b.use_var(acc))
}

/// Generates the body of a reduction kernel: output `[outer, inner]`.
pub fn emit_reduce(
    b: &mut FunctionBuilder,
    args: KernelArgs,
    op: ReduceOp,
    spec: AxisSpec,
) -> Result<()> {
    let ptr = args.input_ptr(b, 0);
    each_lane(b, args, spec, |b, base, flat| {
        let init = match op {
            ReduceOp::Max | ReduceOp::LogSumExp => b.ins().f32const(f32::NEG_INFINITY),
            ReduceOp::Sum | ReduceOp::Mean => b.ins().f32const(0.0),
        };
        let r = fold(b, ptr, base, spec, init, |b, acc, x| match op {
            ReduceOp::Max | ReduceOp::LogSumExp => b.ins().fmax(acc, x),
            ReduceOp::Sum | ReduceOp::Mean => b.ins().fadd(acc, x),
        })?;
        let r = if op == ReduceOp::LogSumExp {
            logsumexp_from_max(b, ptr, base, spec, r)?
        } else {
            r
        };
        let r = if op == ReduceOp::Mean {
            let n = b.ins().f32const(spec.len as f32);
            b.ins().fdiv(r, n)
        } else {
            r
        };
        let addr = elem_addr(b, args.output, flat);
        b.ins().store(mem(), r, addr, 0);
        Ok(())
    })?;
    b.ins().return_(&[]);
    Ok(())
}

/// `m + log Σ exp(x - m)` of the lane at `base` with maximum `m`, or `m` when it is not finite.
fn logsumexp_from_max(
    b: &mut FunctionBuilder,
    ptr: Value,
    base: Value,
    spec: AxisSpec,
    m: Value,
) -> Result<Value> {
    let inf = b.ins().f32const(f32::INFINITY);
    let abs = b.ins().fabs(m);
    let finite = b.ins().fcmp(FloatCC::LessThan, abs, inf);
    let zero = b.ins().f32const(0.0);
    let shift = b.ins().select(finite, m, zero);
    let sum = fold(b, ptr, base, spec, zero, |b, acc, x| {
        let d = b.ins().fsub(x, shift);
        let e = scalar_exp(b, d);
        b.ins().fadd(acc, e)
    })?;
    let sv = b.ins().splat(types::F32X4, sum);
    let lv = simd::emit_log(b, sv);
    let l = b.ins().extractlane(lv, 0);
    let r = b.ins().fadd(shift, l);
    Ok(b.ins().select(finite, r, m))
}

/// `exp(x)` of one f32 through the vector routine.
fn scalar_exp(b: &mut FunctionBuilder, x: Value) -> Value {
    let v = b.ins().splat(types::F32X4, x);
    let e = simd::emit_exp(b, v);
    b.ins().extractlane(e, 0)
}

/// Generates the body of a softmax kernel: output `[outer, len, inner]`. With `sink`, input 1
/// holds one sink logit per lane (`[outer, inner]`), counted in the maximum and the sum.
pub fn emit_softmax(
    b: &mut FunctionBuilder,
    args: KernelArgs,
    spec: AxisSpec,
    sink: bool,
) -> Result<()> {
    if spec.inner == 1 && spec.len >= 4 {
        return emit_softmax_rows(b, args, spec, sink);
    }
    let ptr = args.input_ptr(b, 0);
    let sinks = sink.then(|| args.input_ptr(b, 1));
    each_lane(b, args, spec, |b, base, flat| {
        let ninf = b.ins().f32const(f32::NEG_INFINITY);
        let s = sinks.map(|p| {
            let addr = elem_addr(b, p, flat);
            b.ins().load(types::F32, mem(), addr, 0)
        });
        let m = fold(b, ptr, base, spec, s.unwrap_or(ninf), |b, acc, x| {
            b.ins().fmax(acc, x)
        })?;
        // A max of -inf means every entry is -inf: shift by 0 so exp gives exact zeros.
        let all_masked = b.ins().fcmp(FloatCC::Equal, m, ninf);
        let zero_f = b.ins().f32const(0.0);
        let shift = b.ins().select(all_masked, zero_f, m);
        let sum = b.declare_var(types::F32);
        let start = match s {
            Some(s) => {
                let d = b.ins().fsub(s, shift);
                scalar_exp(b, d)
            }
            None => zero_f,
        };
        b.def_var(sum, start);
        let zero = iconst(b, 0);
        let len = iconst(b, spec.len as i64);
        counted_loop(b, zero, len, 1, |b, k| {
            let off = b.ins().imul_imm_s(k, spec.inner as i64);
            let off = b.ins().iadd(off, base);
            let src = elem_addr(b, ptr, off);
            let x = b.ins().load(types::F32, mem(), src, 0);
            let d = b.ins().fsub(x, shift);
            let dv = b.ins().splat(types::F32X4, d);
            let ev = simd::emit_exp(b, dv);
            let e = b.ins().extractlane(ev, 0);
            let dst = elem_addr(b, args.output, off);
            b.ins().store(mem(), e, dst, 0);
            let old = b.use_var(sum);
            let new = b.ins().fadd(old, e);
            b.def_var(sum, new);
            Ok(())
        })?;
        // Sum 0 happens only for an all -inf row; divide by 1 there to give zeros.
        let s = b.use_var(sum);
        let empty = b.ins().fcmp(FloatCC::Equal, s, zero_f);
        let one = b.ins().f32const(1.0);
        let den = b.ins().select(empty, one, s);
        counted_loop(b, zero, len, 1, |b, k| {
            let off = b.ins().imul_imm_s(k, spec.inner as i64);
            let off = b.ins().iadd(off, base);
            let dst = elem_addr(b, args.output, off);
            let e = b.ins().load(types::F32, mem(), dst, 0);
            let y = b.ins().fdiv(e, den);
            b.ins().store(mem(), y, dst, 0);
            Ok(())
        })
    })?;
    b.ins().return_(&[]);
    Ok(())
}

/// Softmax of contiguous rows (`inner == 1`) with f32x4 passes: max (lanes, then pairwise, then
/// the tail: `fmax` gives the same result in any order), `exp` and sum (four lane sums added
/// pairwise, then the tail in order), and the division. With `sink`, the row's sink logit
/// joins the maximum and its exponential starts the sum.
fn emit_softmax_rows(
    b: &mut FunctionBuilder,
    args: KernelArgs,
    spec: AxisSpec,
    sink: bool,
) -> Result<()> {
    let ptr = args.input_ptr(b, 0);
    let sinks = sink.then(|| args.input_ptr(b, 1));
    let len = spec.len as i64;
    let len4 = (spec.len / 4 * 4) as i64;
    counted_loop(b, args.begin, args.end, 1, |b, o| {
        let base = b.ins().imul_imm_s(o, len);
        let src = elem_addr(b, ptr, base);
        let dst = elem_addr(b, args.output, base);
        let zero = iconst(b, 0);
        let end4 = iconst(b, len4);
        let end = iconst(b, len);
        let ninf = b.ins().f32const(f32::NEG_INFINITY);
        let ninf4 = b.ins().splat(types::F32X4, ninf);
        let mv = b.declare_var(types::F32X4);
        b.def_var(mv, ninf4);
        counted_loop(b, zero, end4, 4, |b, k| {
            let p = elem_addr(b, src, k);
            let x = b.ins().load(types::F32X4, mem(), p, 0);
            let old = b.use_var(mv);
            let new = b.ins().fmax(old, x);
            b.def_var(mv, new);
            Ok(())
        })?;
        let v = b.use_var(mv);
        let l: Vec<Value> = (0..4u8).map(|l| b.ins().extractlane(v, l)).collect();
        let m01 = b.ins().fmax(l[0], l[1]);
        let m23 = b.ins().fmax(l[2], l[3]);
        let m = b.ins().fmax(m01, m23);
        let ms = b.declare_var(types::F32);
        b.def_var(ms, m);
        counted_loop(b, end4, end, 1, |b, k| {
            let p = elem_addr(b, src, k);
            let x = b.ins().load(types::F32, mem(), p, 0);
            let old = b.use_var(ms);
            let new = b.ins().fmax(old, x);
            b.def_var(ms, new);
            Ok(())
        })?;
        let m = b.use_var(ms);
        let s = sinks.map(|p| {
            let addr = elem_addr(b, p, o);
            b.ins().load(types::F32, mem(), addr, 0)
        });
        let m = match s {
            Some(s) => b.ins().fmax(m, s),
            None => m,
        };
        // A max of -inf means every entry is -inf: shift by 0 so exp gives exact zeros.
        let all_masked = b.ins().fcmp(FloatCC::Equal, m, ninf);
        let zero_f = b.ins().f32const(0.0);
        let shift = b.ins().select(all_masked, zero_f, m);
        let shift4 = b.ins().splat(types::F32X4, shift);
        let zero4 = b.ins().splat(types::F32X4, zero_f);
        let sv = b.declare_var(types::F32X4);
        b.def_var(sv, zero4);
        counted_loop(b, zero, end4, 4, |b, k| {
            let p = elem_addr(b, src, k);
            let x = b.ins().load(types::F32X4, mem(), p, 0);
            let d = b.ins().fsub(x, shift4);
            let e = simd::emit_exp(b, d);
            let q = elem_addr(b, dst, k);
            b.ins().store(mem(), e, q, 0);
            let old = b.use_var(sv);
            let new = b.ins().fadd(old, e);
            b.def_var(sv, new);
            Ok(())
        })?;
        let v = b.use_var(sv);
        let l: Vec<Value> = (0..4u8).map(|l| b.ins().extractlane(v, l)).collect();
        let s01 = b.ins().fadd(l[0], l[1]);
        let s23 = b.ins().fadd(l[2], l[3]);
        let total = b.ins().fadd(s01, s23);
        let total = match s {
            Some(s) => {
                let d = b.ins().fsub(s, shift);
                let e = scalar_exp(b, d);
                b.ins().fadd(e, total)
            }
            None => total,
        };
        let ss = b.declare_var(types::F32);
        b.def_var(ss, total);
        counted_loop(b, end4, end, 1, |b, k| {
            let p = elem_addr(b, src, k);
            let x = b.ins().load(types::F32, mem(), p, 0);
            let d = b.ins().fsub(x, shift);
            let dv = b.ins().splat(types::F32X4, d);
            let ev = simd::emit_exp(b, dv);
            let e = b.ins().extractlane(ev, 0);
            let q = elem_addr(b, dst, k);
            b.ins().store(mem(), e, q, 0);
            let old = b.use_var(ss);
            let new = b.ins().fadd(old, e);
            b.def_var(ss, new);
            Ok(())
        })?;
        // Sum 0 happens only for an all -inf row; divide by 1 there to give zeros.
        let s = b.use_var(ss);
        let empty = b.ins().fcmp(FloatCC::Equal, s, zero_f);
        let one = b.ins().f32const(1.0);
        let den = b.ins().select(empty, one, s);
        let den4 = b.ins().splat(types::F32X4, den);
        counted_loop(b, zero, end4, 4, |b, k| {
            let q = elem_addr(b, dst, k);
            let e = b.ins().load(types::F32X4, mem(), q, 0);
            let y = b.ins().fdiv(e, den4);
            b.ins().store(mem(), y, q, 0);
            Ok(())
        })?;
        counted_loop(b, end4, end, 1, |b, k| {
            let q = elem_addr(b, dst, k);
            let e = b.ins().load(types::F32, mem(), q, 0);
            let y = b.ins().fdiv(e, den);
            b.ins().store(mem(), y, q, 0);
            Ok(())
        })
    })?;
    b.ins().return_(&[]);
    Ok(())
}
