//! Fused elementwise chains with broadcasting, masks, relpos and fills.
//!
//! One step evaluates an [`Expr`] tree at every element of a row-major output shape. The
//! work space is `1 × rows` where a row is the last axis; each leaf reads its buffer through
//! strides over the OUTPUT axes (0 on broadcast axes, swapped on transposes), so no
//! intermediate of the chain is stored. Rows whose leaves are all contiguous or broadcast on
//! the last axis run an f32x4 main loop and a scalar tail; others run scalar.

use super::{counted_loop, elem_addr, iconst, mem, KernelArgs};
use crate::error::Result;
use crate::simd;
use attnc_ir::{BinaryOp, MaskPattern, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// Where an index of a sub-expression comes from: an axis of the step's output, or 0 (an
/// axis of size 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coord {
    /// The coordinate of this output axis.
    Axis(usize),
    /// Always 0.
    Zero,
}

/// A fused elementwise expression, indexed by the coordinates of the step's output.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Element `Σ coord[a] · strides[a]` of buffer `buf`.
    Leaf {
        /// The buffer read.
        buf: usize,
        /// One stride per output axis (elements).
        strides: Vec<usize>,
    },
    /// A constant.
    Const(f32),
    /// An elementwise function.
    Unary(UnaryOp, Box<Expr>),
    /// An elementwise function of two operands.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `x` where `pattern` keeps (i, j) of an `m × n` tile, else `fill`.
    Mask {
        /// Kept positions.
        pattern: MaskPattern,
        /// Value of dropped positions.
        fill: f32,
        /// Query coordinate.
        i: Coord,
        /// Key coordinate.
        j: Coord,
        /// Queries of the tile.
        m: usize,
        /// Keys of the tile.
        n: usize,
        /// The masked value.
        x: Box<Expr>,
    },
    /// `1` where `x > y`, `0` where not, NaN where either is NaN (gradient graphs'
    /// comparisons).
    Greater(Box<Expr>, Box<Expr>),
    /// `j - (i + n - m)` as f32.
    RelPos {
        /// Query coordinate.
        i: Coord,
        /// Key coordinate.
        j: Coord,
        /// Queries.
        m: usize,
        /// Keys.
        n: usize,
    },
}

impl Expr {
    /// Rewrites the expression from its own axes to a consumer's: own axis `k` becomes
    /// `map[k]` (`None`: the axis has size 1 and its coordinate is 0).
    pub fn remap(&self, map: &[Option<usize>], rank: usize) -> Expr {
        let leaf = |buf: usize, strides: &[usize]| {
            let mut out = vec![0; rank];
            for (k, &s) in strides.iter().enumerate() {
                if let Some(a) = map[k] {
                    out[a] += s;
                }
            }
            Expr::Leaf { buf, strides: out }
        };
        let coord = |c: &Coord| match c {
            Coord::Axis(a) => map[*a].map_or(Coord::Zero, Coord::Axis),
            Coord::Zero => Coord::Zero,
        };
        self.rebuild(&leaf, &coord)
    }

    /// The expression with every leaf's buffer `buf` renamed `rename(buf)`.
    pub fn relabel(&self, rename: &impl Fn(usize) -> usize) -> Expr {
        let leaf = |buf: usize, strides: &[usize]| Expr::Leaf {
            buf: rename(buf),
            strides: strides.to_vec(),
        };
        self.rebuild(&leaf, &|c: &Coord| *c)
    }

    /// The same tree with each leaf made by `leaf(buf, strides)` and each coordinate (of masks
    /// and relative positions) by `coord`.
    fn rebuild(
        &self,
        leaf: &impl Fn(usize, &[usize]) -> Expr,
        coord: &impl Fn(&Coord) -> Coord,
    ) -> Expr {
        let again = |x: &Expr| Box::new(x.rebuild(leaf, coord));
        match self {
            Expr::Leaf { buf, strides } => leaf(*buf, strides),
            Expr::Const(v) => Expr::Const(*v),
            Expr::Unary(op, x) => Expr::Unary(*op, again(x)),
            Expr::Binary(op, x, y) => Expr::Binary(*op, again(x), again(y)),
            Expr::Greater(x, y) => Expr::Greater(again(x), again(y)),
            Expr::Mask {
                pattern,
                fill,
                i,
                j,
                m,
                n,
                x,
            } => Expr::Mask {
                pattern: pattern.clone(),
                fill: *fill,
                i: coord(i),
                j: coord(j),
                m: *m,
                n: *n,
                x: again(x),
            },
            Expr::RelPos { i, j, m, n } => Expr::RelPos {
                i: coord(i),
                j: coord(j),
                m: *m,
                n: *n,
            },
        }
    }

    /// The buffers the expression reads, in first-use order.
    pub fn buffers(&self, out: &mut Vec<usize>) {
        match self {
            Expr::Leaf { buf, .. } => {
                if !out.contains(buf) {
                    out.push(*buf);
                }
            }
            Expr::Const(_) | Expr::RelPos { .. } => {}
            Expr::Unary(_, x) | Expr::Mask { x, .. } => x.buffers(out),
            Expr::Binary(_, x, y) | Expr::Greater(x, y) => {
                x.buffers(out);
                y.buffers(out);
            }
        }
    }

    /// The number of nodes (a size guard against runaway fusion).
    pub fn size(&self) -> usize {
        match self {
            Expr::Leaf { .. } | Expr::Const(_) | Expr::RelPos { .. } => 1,
            Expr::Unary(_, x) | Expr::Mask { x, .. } => 1 + x.size(),
            Expr::Binary(_, x, y) | Expr::Greater(x, y) => 1 + x.size() + y.size(),
        }
    }

    /// Whether every leaf is contiguous or broadcast along `axis` and no node needs
    /// coordinates or a host call, so four consecutive elements can be computed at once.
    fn vectorizes(&self, axis: usize) -> bool {
        match self {
            Expr::Leaf { strides, .. } => strides[axis] <= 1,
            Expr::Const(_) => true,
            Expr::Unary(_, x) => x.vectorizes(axis),
            Expr::Binary(_, x, y) | Expr::Greater(x, y) => x.vectorizes(axis) && y.vectorizes(axis),
            Expr::Mask { .. } | Expr::RelPos { .. } => false,
        }
    }
}

/// The inline f32x4 form of a transcendental op (from [`crate::simd`]); scalar positions
/// evaluate it on a splat and take lane 0, so every position uses the same approximation.
fn simd_fn(op: UnaryOp) -> Option<fn(&mut FunctionBuilder, Value) -> Value> {
    match op {
        UnaryOp::Exp => Some(simd::emit_exp),
        UnaryOp::Log => Some(simd::emit_log),
        UnaryOp::Tanh => Some(simd::emit_tanh),
        UnaryOp::Sigmoid => Some(simd::emit_sigmoid),
        UnaryOp::Elu => Some(simd::emit_elu),
        _ => None,
    }
}

/// Applies a [`simd_fn`] to an f32 (through lane 0) or an f32x4.
fn apply_simd(
    b: &mut FunctionBuilder,
    f: fn(&mut FunctionBuilder, Value) -> Value,
    x: Value,
    vector: bool,
) -> Value {
    if vector {
        f(b, x)
    } else {
        let v = b.ins().splat(types::F32X4, x);
        let y = f(b, v);
        b.ins().extractlane(y, 0)
    }
}

/// Vectors per iteration of the main loop.
const UNROLL: usize = 4;

/// One elementwise step, ready for code generation.
#[derive(Clone, Debug)]
pub struct ElementwiseSpec {
    /// The expression.
    pub expr: Expr,
    /// The output shape.
    pub shape: Vec<usize>,
    /// The buffers read, in operand-slot order.
    pub inputs: Vec<usize>,
}

impl ElementwiseSpec {
    /// The spec with its buffers named by their operand slots: two steps whose specs agree
    /// here compile to the same code (the kernel reads its operands by slot).
    pub fn by_slot(&self) -> ElementwiseSpec {
        let slot = |buf: usize| {
            self.inputs
                .iter()
                .position(|&x| x == buf)
                .unwrap_or_default()
        };
        ElementwiseSpec {
            expr: self.expr.relabel(&slot),
            shape: self.shape.clone(),
            inputs: (0..self.inputs.len()).collect(),
        }
    }

    /// The work space (batches, rows): one batch, one row per last-axis line.
    pub fn work(&self) -> (usize, usize) {
        let rank = self.shape.len();
        let rows = if rank == 0 {
            1
        } else {
            self.shape[..rank - 1].iter().product()
        };
        (1, rows)
    }

    fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// Per-row state for evaluating the expression.
struct RowCtx {
    /// Operand base pointers, by slot.
    ptrs: Vec<Value>,
    /// Coordinates of the leading axes of this row.
    coords: Vec<Value>,
}

/// Generates the body of an elementwise kernel: row `r` of a call is written at row `r` of
/// the output (which holds every row).
pub fn emit(b: &mut FunctionBuilder, args: KernelArgs, spec: &ElementwiseSpec) -> Result<()> {
    emit_rows(b, args, spec, false)
}

/// Generates the body of a row-block kernel ([`crate::jit::RowBlockKernel`]): row `r` of a
/// call over `begin..end` is written at row `r - begin` of the output, which holds only
/// that block. The values are those [`emit`]'s code computes, bit for bit.
pub fn emit_block(b: &mut FunctionBuilder, args: KernelArgs, spec: &ElementwiseSpec) -> Result<()> {
    emit_rows(b, args, spec, true)
}

/// [`emit`], or [`emit_block`] when `relative`.
fn emit_rows(
    b: &mut FunctionBuilder,
    args: KernelArgs,
    spec: &ElementwiseSpec,
    relative: bool,
) -> Result<()> {
    let rank = spec.shape.len();
    let len = spec.row_len();
    let lead: Vec<usize> = if rank == 0 {
        Vec::new()
    } else {
        spec.shape[..rank - 1].to_vec()
    };
    let ptrs: Vec<Value> = (0..spec.inputs.len())
        .map(|k| args.input_ptr(b, k))
        .collect();
    let vector = rank > 0 && len >= 4 && spec.expr.vectorizes(rank - 1);
    counted_loop(b, args.begin, args.end, 1, |b, row| {
        let mut coords = vec![row; lead.len()];
        let mut rest = row;
        for axis in (0..lead.len()).rev() {
            if axis == 0 {
                coords[axis] = rest;
            } else {
                coords[axis] = b.ins().urem_imm_s(rest, lead[axis].max(1) as i64);
                rest = b.ins().udiv_imm_s(rest, lead[axis].max(1) as i64);
            }
        }
        let ctx = RowCtx {
            ptrs: ptrs.clone(),
            coords,
        };
        let out_row = if relative {
            b.ins().isub(row, args.begin)
        } else {
            row
        };
        let row_base = b.ins().imul_imm_s(out_row, len as i64);
        let mut tail_start = iconst(b, 0);
        if vector && len >= 4 * UNROLL {
            // Independent vectors per iteration, so long chains (exp, tanh) overlap.
            let wide_end = iconst(b, (len / (4 * UNROLL) * 4 * UNROLL) as i64);
            counted_loop(b, tail_start, wide_end, (4 * UNROLL) as i64, |b, j| {
                let mut values = Vec::with_capacity(UNROLL);
                for u in 0..UNROLL {
                    let ju = b.ins().iadd_imm_s(j, (4 * u) as i64);
                    values.push((ju, eval(b, &spec.expr, &ctx, ju, spec, true)?));
                }
                for (ju, v) in values {
                    let at = b.ins().iadd(row_base, ju);
                    let addr = elem_addr(b, args.output, at);
                    b.ins().store(mem(), v, addr, 0);
                }
                Ok(())
            })?;
            tail_start = wide_end;
        }
        if vector {
            let vec_end = iconst(b, (len / 4 * 4) as i64);
            counted_loop(b, tail_start, vec_end, 4, |b, j| {
                let v = eval(b, &spec.expr, &ctx, j, spec, true)?;
                let at = b.ins().iadd(row_base, j);
                let addr = elem_addr(b, args.output, at);
                b.ins().store(mem(), v, addr, 0);
                Ok(())
            })?;
            tail_start = vec_end;
        }
        let end = iconst(b, len as i64);
        counted_loop(b, tail_start, end, 1, |b, j| {
            let v = eval(b, &spec.expr, &ctx, j, spec, false)?;
            let at = b.ins().iadd(row_base, j);
            let addr = elem_addr(b, args.output, at);
            b.ins().store(mem(), v, addr, 0);
            Ok(())
        })
    })?;
    b.ins().return_(&[]);
    Ok(())
}

/// The value of coordinate `c` at last-axis position `j`.
fn coord(b: &mut FunctionBuilder, c: Coord, ctx: &RowCtx, j: Value, rank: usize) -> Value {
    match c {
        Coord::Zero => iconst(b, 0),
        Coord::Axis(a) if a + 1 == rank => j,
        Coord::Axis(a) => ctx.coords[a],
    }
}

/// Evaluates `expr` at (row, j): an f32, or an f32x4 of positions j..j+4 when `vector`.
fn eval(
    b: &mut FunctionBuilder,
    expr: &Expr,
    ctx: &RowCtx,
    j: Value,
    spec: &ElementwiseSpec,
    vector: bool,
) -> Result<Value> {
    let rank = spec.shape.len();
    let splat = |b: &mut FunctionBuilder, v: Value| {
        if vector {
            b.ins().splat(types::F32X4, v)
        } else {
            v
        }
    };
    Ok(match expr {
        Expr::Leaf { buf, strides } => {
            let slot = spec
                .inputs
                .iter()
                .position(|x| x == buf)
                .unwrap_or_default();
            let mut off = iconst(b, 0);
            for (a, &s) in strides.iter().enumerate() {
                if s == 0 {
                    continue;
                }
                let c = if a + 1 == rank { j } else { ctx.coords[a] };
                let term = b.ins().imul_imm_s(c, s as i64);
                off = b.ins().iadd(off, term);
            }
            let addr = elem_addr(b, ctx.ptrs[slot], off);
            let inner = strides.last().copied().unwrap_or(0);
            if vector && inner == 1 {
                b.ins().load(types::F32X4, mem(), addr, 0)
            } else {
                let x = b.ins().load(types::F32, mem(), addr, 0);
                splat(b, x)
            }
        }
        Expr::Const(v) => {
            let x = b.ins().f32const(*v);
            splat(b, x)
        }
        Expr::Unary(op, x) => {
            let x = eval(b, x, ctx, j, spec, vector)?;
            match simd_fn(*op) {
                Some(f) => apply_simd(b, f, x, vector),
                None => unary_inline(b, *op, x, vector),
            }
        }
        Expr::Binary(op, x, y) => {
            let x = eval(b, x, ctx, j, spec, vector)?;
            let y = eval(b, y, ctx, j, spec, vector)?;
            match op {
                BinaryOp::Add => b.ins().fadd(x, y),
                BinaryOp::Sub => b.ins().fsub(x, y),
                BinaryOp::Mul => b.ins().fmul(x, y),
                BinaryOp::Div => b.ins().fdiv(x, y),
                BinaryOp::Max => b.ins().fmax(x, y),
                BinaryOp::Min => b.ins().fmin(x, y),
            }
        }
        Expr::Greater(x, y) => {
            let x = eval(b, x, ctx, j, spec, vector)?;
            let y = eval(b, y, ctx, j, spec, vector)?;
            let one = b.ins().f32const(1.0);
            let zero = b.ins().f32const(0.0);
            let nan = b.ins().f32const(f32::NAN);
            let (one, zero, nan) = (splat(b, one), splat(b, zero), splat(b, nan));
            let above = b.ins().fcmp(FloatCC::GreaterThan, x, y);
            let unordered = b.ins().fcmp(FloatCC::Unordered, x, y);
            if vector {
                let step = simd::select_f32(b, above, one, zero);
                simd::select_f32(b, unordered, nan, step)
            } else {
                let step = b.ins().select(above, one, zero);
                b.ins().select(unordered, nan, step)
            }
        }
        Expr::Mask {
            pattern,
            fill,
            i,
            j: jc,
            m,
            n,
            x,
        } => {
            let x = eval(b, x, ctx, j, spec, vector)?;
            let ic = coord(b, *i, ctx, j, rank);
            let jv = coord(b, *jc, ctx, j, rank);
            let ia = b.ins().iadd_imm_s(ic, *n as i64 - *m as i64);
            let keep = keeps(b, pattern, ia, jv);
            let f = b.ins().f32const(*fill);
            b.ins().select(keep, x, f)
        }
        Expr::RelPos { i, j: jc, m, n } => {
            let ic = coord(b, *i, ctx, j, rank);
            let jv = coord(b, *jc, ctx, j, rank);
            let ia = b.ins().iadd_imm_s(ic, *n as i64 - *m as i64);
            let d = b.ins().isub(jv, ia);
            b.ins().fcvt_from_sint(types::F32, d)
        }
    })
}

/// The inline (non-host) unary ops, on f32 or f32x4.
fn unary_inline(b: &mut FunctionBuilder, op: UnaryOp, x: Value, vector: bool) -> Value {
    let ty = if vector { types::F32X4 } else { types::F32 };
    let constant = |b: &mut FunctionBuilder, v: f32| {
        let c = b.ins().f32const(v);
        if vector {
            b.ins().splat(ty, c)
        } else {
            c
        }
    };
    match op {
        UnaryOp::Neg => b.ins().fneg(x),
        UnaryOp::Abs => b.ins().fabs(x),
        UnaryOp::Sqrt => b.ins().sqrt(x),
        UnaryOp::Rsqrt => {
            let s = b.ins().sqrt(x);
            let one = constant(b, 1.0);
            b.ins().fdiv(one, s)
        }
        UnaryOp::Relu => {
            let zero = constant(b, 0.0);
            let neg = b.ins().fcmp(FloatCC::LessThan, x, zero);
            if vector {
                simd::select_f32(b, neg, zero, x)
            } else {
                b.ins().select(neg, zero, x)
            }
        }
        // Transcendental ops never reach here (see `simd_fn`).
        UnaryOp::Exp | UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Elu => x,
    }
}

/// Emits the membership test of `pattern` for aligned query `ia` and key `j` (i64 values);
/// returns an i8 truth value. Mirrors [`MaskPattern::contains`].
pub fn keeps(b: &mut FunctionBuilder, pattern: &MaskPattern, ia: Value, j: Value) -> Value {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match pattern {
        MaskPattern::Causal => b.ins().icmp(IntCC::SignedLessThanOrEqual, j, ia),
        MaskPattern::Window(w) => {
            let d = b.ins().isub(ia, j);
            abs_le(b, d, clamp(*w))
        }
        MaskPattern::Dilated { w, r } => {
            let r = (*r).max(1);
            let bound = clamp(w.saturating_mul(r));
            let d = b.ins().isub(ia, j);
            let near = abs_le(b, d, bound);
            let rv = iconst(b, clamp(r));
            let rem = b.ins().srem(d, rv);
            let on = b.ins().icmp_imm_s(IntCC::Equal, rem, 0);
            b.ins().band(near, on)
        }
        MaskPattern::Global(g) => {
            let g = clamp(*g);
            let a = b.ins().icmp_imm_s(IntCC::SignedLessThan, ia, g);
            let c = b.ins().icmp_imm_s(IntCC::SignedLessThan, j, g);
            b.ins().bor(a, c)
        }
        MaskPattern::Block(size) => {
            let size = clamp((*size).max(1));
            let qi = floor_div(b, ia, size);
            let qj = floor_div(b, j, size);
            b.ins().icmp(IntCC::Equal, qi, qj)
        }
        MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => {
            unreachable!("invariant: the planner runs masks that read segment ids as host steps")
        }
        MaskPattern::And(p, q) => {
            let x = keeps(b, p, ia, j);
            let y = keeps(b, q, ia, j);
            b.ins().band(x, y)
        }
        MaskPattern::Or(p, q) => {
            let x = keeps(b, p, ia, j);
            let y = keeps(b, q, ia, j);
            b.ins().bor(x, y)
        }
    }
}

/// `|d| <= bound` for i64 `d` (`bound >= 0`), without overflow on `i64::MIN`.
fn abs_le(b: &mut FunctionBuilder, d: Value, bound: i64) -> Value {
    let hi = b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, d, bound);
    let lo = b
        .ins()
        .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, d, -bound);
    b.ins().band(hi, lo)
}

/// `floor(x / d)` for `d > 0`.
fn floor_div(b: &mut FunctionBuilder, x: Value, d: i64) -> Value {
    let dv = iconst(b, d);
    let q = b.ins().sdiv(x, dv);
    let r = b.ins().srem(x, dv);
    let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
    let q1 = b.ins().iadd_imm_s(q, -1);
    b.ins().select(neg, q1, q)
}
