//! Cranelift code of the fused attention kernel (see [`define_attention`]).
//!
//! Layout of the generated function, per call (one batch entry, a range of query rows):
//!
//! ```text
//! entry:     clamp rows, batch multi-index → base pointers of Q, K, V, biases, output
//! row_head:  load q_i (widened) into registers, per-row mask bounds, m = -inf, l = 0, acc = 0
//! run_head:  for each run of key tiles listed for row i in the compile-time tile table
//!   full:      loop over the run's tiles, no element mask
//!   partial:   loop over the run's tiles, element mask from the pattern
//!   tail_*:    the last, short key tile (n mod 4 keys), full or partial
//! row_fin:   out_i = acc / l (0 where l = 0), then the next row
//! ```
//!
//! A key tile is [`KEY_TILE`] = 4 keys: its scores form one f32x4. Each row is computed the same
//! way whichever row range a call covers, so results are bit-identical under any split.

use super::{run_code, AttentionSpec, ScoreExpr, TensorRef};
use crate::error::{JitError, Result};
use crate::simd::{
    as_float, emit_elu, emit_exp, emit_log, emit_sigmoid, emit_tanh, select_f32, splat_f32,
    splat_i32,
};
use attnc_ir::{BinaryOp, DType, MaskPattern, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    AbiParam, Block, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, UserFuncName, Value,
};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{DataDescription, FuncId, Linkage, Module};
use std::collections::{BTreeSet, HashMap};

/// Keys per key tile (one f32x4 of scores).
pub const KEY_TILE: usize = 4;

/// Memory flags of buffer accesses: the runtime checked every buffer before the call.
fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn codegen_err(name: &str, detail: impl ToString) -> JitError {
    JitError::Codegen {
        kernel: name.to_string(),
        detail: detail.to_string(),
    }
}

fn elem_size(dtype: DType) -> i64 {
    match dtype {
        DType::F32 => 4,
        DType::F16 | DType::Bf16 => 2,
    }
}

/// The compile-time tile table: per row `(first run, run count)` as u32 pairs, then the runs
/// as `(first tile, end tile, kind code)` u32 triples. Rows with equal run lists share runs.
struct TileTable {
    bytes: Vec<u8>,
    kinds: BTreeSet<u32>,
}

fn tile_table(spec: &AttentionSpec) -> Result<TileTable> {
    let tiles = spec.n.div_ceil(KEY_TILE);
    let tail = spec.n % KEY_TILE != 0;
    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(spec.m);
    let mut runs: Vec<[u32; 3]> = Vec::new();
    let mut seen: HashMap<Vec<[u32; 3]>, u32> = HashMap::new();
    let mut kinds = BTreeSet::new();
    let too_big = || JitError::Shape("attention tile table exceeds u32 indices".to_string());
    for i in 0..spec.m {
        let mut list: Vec<[u32; 3]> = Vec::new();
        for r in spec.row_runs(i) {
            let first = u32::try_from(r.first).map_err(|_| too_big())?;
            let end = u32::try_from(r.end).map_err(|_| too_big())?;
            if tail && r.end == tiles {
                if r.first < r.end - 1 {
                    list.push([first, end - 1, run_code(r.kind, false)]);
                }
                list.push([end - 1, end, run_code(r.kind, true)]);
            } else {
                list.push([first, end, run_code(r.kind, false)]);
            }
        }
        for e in &list {
            kinds.insert(e[2]);
        }
        let count = u32::try_from(list.len()).map_err(|_| too_big())?;
        let offset = match seen.get(&list) {
            Some(&o) => o,
            None => {
                let o = u32::try_from(runs.len()).map_err(|_| too_big())?;
                runs.extend_from_slice(&list);
                seen.insert(list, o);
                o
            }
        };
        rows.push((offset, count));
    }
    let mut bytes = Vec::with_capacity(8 * rows.len() + 12 * runs.len() + 8);
    for (o, c) in rows {
        bytes.extend_from_slice(&o.to_le_bytes());
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    for run in runs {
        for w in run {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
    }
    bytes.resize(bytes.len() + 8, 0);
    Ok(TileTable { bytes, kinds })
}

/// Per-row values of the mask pattern, splatted to i32x4 in the row header.
enum RowMask {
    /// keeps `j <= hi`
    Upto(Value),
    /// keeps `lo <= j <= hi`
    Between(Value, Value),
    /// keeps `lo <= j <= hi` and `(ia - j) mod r == 0` (ia: i32x4, r: f32x4)
    Strided {
        lo: Value,
        hi: Value,
        ia: Value,
        r: Value,
    },
    /// keeps everything where `all` is set, else `j < g`
    Global {
        all: Value,
        g: Value,
    },
    And(Box<RowMask>, Box<RowMask>),
    Or(Box<RowMask>, Box<RowMask>),
}

/// Tensor base pointers and per-row pointers.
struct Bases {
    q: Value,
    k: Value,
    v: Value,
    biases: Vec<Value>,
}

/// Per-row state visible to the tile bodies.
struct Row {
    q: Vec<Value>,
    /// The aligned row index `i + n - m` as i32x4.
    ia_v: Value,
    mask: Option<RowMask>,
    /// Per bias: the pointer to its row `i` (or the splatted value when it is constant along j).
    bias_rows: Vec<BiasRow>,
}

#[derive(Clone, Copy)]
enum BiasRow {
    Ptr(Value),
    Splat(Value),
}

struct Emitter<'s> {
    spec: &'s AttentionSpec,
    d4: usize,
    dv4: usize,
    m_var: Variable,
    l_var: Variable,
    acc_vars: Vec<Variable>,
}

impl Emitter<'_> {
    fn iconst(&self, b: &mut FunctionBuilder, v: i64) -> Value {
        b.ins().iconst(I64, v)
    }

    /// `ptr + index * scale` (bytes), i64 arithmetic.
    fn offset(&self, b: &mut FunctionBuilder, ptr: Value, index: Value, scale: i64) -> Value {
        if scale == 0 {
            return ptr;
        }
        let s = self.iconst(b, scale);
        let o = b.ins().imul(index, s);
        b.ins().iadd(ptr, o)
    }

    /// Loads `count` (1..=4) consecutive elements of `dtype` at `p` into the low lanes of an
    /// f32x4 (other lanes 0), widening f16/bf16.
    fn load_lanes(&self, b: &mut FunctionBuilder, p: Value, count: usize, dtype: DType) -> Value {
        let zero = splat_f32(b, 0.0);
        if count == 0 {
            return zero;
        }
        match dtype {
            DType::F32 if count == 4 => b.ins().load(F32X4, mem(), p, 0),
            DType::F32 => {
                let mut v = zero;
                for l in 0..count {
                    let x = b.ins().load(F32, mem(), p, (4 * l) as i32);
                    v = b.ins().insertlane(v, x, l as u8);
                }
                v
            }
            DType::F16 | DType::Bf16 => {
                let bits = if count == 4 {
                    b.ins().uload16x4(mem(), p, 0)
                } else {
                    let mut v = splat_i32(b, 0);
                    for l in 0..count {
                        let x = b.ins().uload16(I32, mem(), p, (2 * l) as i32);
                        v = b.ins().insertlane(v, x, l as u8);
                    }
                    v
                };
                if dtype == DType::Bf16 {
                    let w = b.ins().ishl_imm_u(bits, 16);
                    as_float(b, w)
                } else {
                    f16_to_f32(b, bits)
                }
            }
        }
    }

    /// Loads one element as f32.
    fn load_scalar(&self, b: &mut FunctionBuilder, p: Value, dtype: DType) -> Value {
        match dtype {
            DType::F32 => b.ins().load(F32, mem(), p, 0),
            _ => {
                let v = self.load_lanes(b, p, 1, dtype);
                b.ins().extractlane(v, 0)
            }
        }
    }

    /// Pointer to row `row` (i64) of tensor `t` at base `base`.
    fn row_ptr(&self, b: &mut FunctionBuilder, t: &TensorRef, base: Value, row: Value) -> Value {
        let stride = t.row_stride as i64 * elem_size(t.dtype);
        self.offset(b, base, row, stride)
    }

    fn row_mask(&self, b: &mut FunctionBuilder, p: &MaskPattern, ia: Value) -> RowMask {
        // Parameters are clamped to `cap`: |ia - j| < m + n + 1 always, so larger values act
        // the same (ia in [-m, n), j in [0, n)).
        let cap = (self.spec.m + self.spec.n + 1) as u64;
        let c = |v: u64| v.min(cap) as i64;
        let splat32 = |b: &mut FunctionBuilder, v: Value| {
            let v32 = b.ins().ireduce(I32, v);
            b.ins().splat(I32X4, v32)
        };
        match p {
            MaskPattern::Causal => RowMask::Upto(splat32(b, ia)),
            MaskPattern::Window(w) => {
                let w = c(*w);
                let lo = b.ins().iadd_imm_s(ia, -w);
                let hi = b.ins().iadd_imm_s(ia, w);
                RowMask::Between(splat32(b, lo), splat32(b, hi))
            }
            MaskPattern::Dilated { w, r } => {
                let r = c((*r).max(1));
                let reach = c(w.saturating_mul(r as u64));
                let lo = b.ins().iadd_imm_s(ia, -reach);
                let hi = b.ins().iadd_imm_s(ia, reach);
                let rf = splat_f32(b, r as f32);
                RowMask::Strided {
                    lo: splat32(b, lo),
                    hi: splat32(b, hi),
                    ia: splat32(b, ia),
                    r: rf,
                }
            }
            MaskPattern::Global(g) => {
                let g = c(*g);
                let row_all = b.ins().icmp_imm_s(IntCC::SignedLessThan, ia, g);
                let ones = b.ins().iconst(I32, -1);
                let zero = b.ins().iconst(I32, 0);
                let all = b.ins().select(row_all, ones, zero);
                let all = b.ins().splat(I32X4, all);
                let gv = b.ins().iconst(I32, g);
                let gv = b.ins().splat(I32X4, gv);
                RowMask::Global { all, g: gv }
            }
            MaskPattern::Block(bs) => {
                let bs = c((*bs).max(1));
                let bv = self.iconst(b, bs);
                let q = b.ins().sdiv(ia, bv);
                let rem = b.ins().srem(ia, bv);
                let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, rem, 0);
                let neg = b.ins().uextend(I64, neg);
                let q = b.ins().isub(q, neg);
                let lo = b.ins().imul(q, bv);
                let hi = b.ins().iadd_imm_s(lo, bs - 1);
                RowMask::Between(splat32(b, lo), splat32(b, hi))
            }
            MaskPattern::And(x, y) => {
                let x = self.row_mask(b, x, ia);
                let y = self.row_mask(b, y, ia);
                RowMask::And(Box::new(x), Box::new(y))
            }
            MaskPattern::Or(x, y) => {
                let x = self.row_mask(b, x, ia);
                let y = self.row_mask(b, y, ia);
                RowMask::Or(Box::new(x), Box::new(y))
            }
        }
    }

    /// The i32x4 keep-mask of keys `jv` (i32x4) under the row's pattern values.
    fn keep(b: &mut FunctionBuilder, rm: &RowMask, jv: Value) -> Value {
        match rm {
            RowMask::Upto(hi) => b.ins().icmp(IntCC::SignedLessThanOrEqual, jv, *hi),
            RowMask::Between(lo, hi) => {
                let a = b.ins().icmp(IntCC::SignedGreaterThanOrEqual, jv, *lo);
                let c = b.ins().icmp(IntCC::SignedLessThanOrEqual, jv, *hi);
                b.ins().band(a, c)
            }
            RowMask::Strided { lo, hi, ia, r } => {
                let a = b.ins().icmp(IntCC::SignedGreaterThanOrEqual, jv, *lo);
                let c = b.ins().icmp(IntCC::SignedLessThanOrEqual, jv, *hi);
                let win = b.ins().band(a, c);
                // (ia - j) mod r == 0  ⇔  r * round((ia - j) / r) == ia - j, exact in f32 for
                // |ia - j| < 2^24 (checked by the matcher).
                let delta = b.ins().isub(*ia, jv);
                let df = b.ins().fcvt_from_sint(F32X4, delta);
                let qf = b.ins().fdiv(df, *r);
                let qf = b.ins().nearest(qf);
                let back = b.ins().fmul(qf, *r);
                let on = b.ins().fcmp(FloatCC::Equal, back, df);
                b.ins().band(win, on)
            }
            RowMask::Global { all, g } => {
                let c = b.ins().icmp(IntCC::SignedLessThan, jv, *g);
                b.ins().bor(c, *all)
            }
            RowMask::And(x, y) => {
                let x = Self::keep(b, x, jv);
                let y = Self::keep(b, y, jv);
                b.ins().band(x, y)
            }
            RowMask::Or(x, y) => {
                let x = Self::keep(b, x, jv);
                let y = Self::keep(b, y, jv);
                b.ins().bor(x, y)
            }
        }
    }

    /// Evaluates the score expression on one key tile.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        b: &mut FunctionBuilder,
        e: &ScoreExpr,
        s: Value,
        row: &Row,
        j0: Value,
        jv: Value,
        count: usize,
    ) -> Value {
        match e {
            ScoreExpr::Scores => s,
            ScoreExpr::Const(c) => splat_f32(b, *c as f32),
            ScoreExpr::RelPos => {
                let d = b.ins().isub(jv, row.ia_v);
                b.ins().fcvt_from_sint(F32X4, d)
            }
            ScoreExpr::Bias(k) => {
                let t = &self.spec.biases[*k];
                match row.bias_rows[*k] {
                    BiasRow::Splat(v) => v,
                    BiasRow::Ptr(p) => {
                        let es = elem_size(t.dtype);
                        let p0 = self.offset(b, p, j0, t.col_stride as i64 * es);
                        if t.col_stride == 1 {
                            self.load_lanes(b, p0, count, t.dtype)
                        } else {
                            let mut v = splat_f32(b, 0.0);
                            for l in 0..count {
                                let pl =
                                    b.ins().iadd_imm_s(p0, l as i64 * t.col_stride as i64 * es);
                                let x = self.load_scalar(b, pl, t.dtype);
                                v = b.ins().insertlane(v, x, l as u8);
                            }
                            v
                        }
                    }
                }
            }
            ScoreExpr::Unary(op, a) => {
                let x = self.score(b, a, s, row, j0, jv, count);
                match op {
                    UnaryOp::Neg => b.ins().fneg(x),
                    UnaryOp::Exp => emit_exp(b, x),
                    UnaryOp::Log => emit_log(b, x),
                    UnaryOp::Sqrt => b.ins().sqrt(x),
                    UnaryOp::Rsqrt => {
                        let r = b.ins().sqrt(x);
                        let one = splat_f32(b, 1.0);
                        b.ins().fdiv(one, r)
                    }
                    UnaryOp::Tanh => emit_tanh(b, x),
                    UnaryOp::Sigmoid => emit_sigmoid(b, x),
                    UnaryOp::Relu => {
                        // x < 0 ? 0 : x (NaN passes through).
                        let zero = splat_f32(b, 0.0);
                        let neg = b.ins().fcmp(FloatCC::LessThan, x, zero);
                        select_f32(b, neg, zero, x)
                    }
                    UnaryOp::Elu => emit_elu(b, x),
                    UnaryOp::Abs => b.ins().fabs(x),
                }
            }
            ScoreExpr::Binary(op, x, y) => {
                let x = self.score(b, x, s, row, j0, jv, count);
                let y = self.score(b, y, s, row, j0, jv, count);
                match op {
                    BinaryOp::Add => b.ins().fadd(x, y),
                    BinaryOp::Sub => b.ins().fsub(x, y),
                    BinaryOp::Mul => b.ins().fmul(x, y),
                    BinaryOp::Div => b.ins().fdiv(x, y),
                    BinaryOp::Max => b.ins().fmax(x, y),
                    BinaryOp::Min => b.ins().fmin(x, y),
                }
            }
        }
    }

    /// One key tile `t` (i64) with `count` valid keys; `masked` applies the element mask.
    fn tile(
        &self,
        b: &mut FunctionBuilder,
        bases: &Bases,
        row: &Row,
        t: Value,
        masked: bool,
        count: usize,
    ) {
        let spec = self.spec;
        let j0 = b.ins().imul_imm_s(t, KEY_TILE as i64);
        // Scores: one f32x4 accumulator per key over the depth, then a transposing sum.
        let mut dots = Vec::with_capacity(KEY_TILE);
        let mut v_rows = Vec::with_capacity(KEY_TILE);
        let kes = elem_size(spec.k.dtype);
        let ves = elem_size(spec.v.dtype);
        for lane in 0..KEY_TILE {
            if lane >= count {
                dots.push(splat_f32(b, 0.0));
                continue;
            }
            let j = b.ins().iadd_imm_s(j0, lane as i64);
            let kp = self.row_ptr(b, &spec.k, bases.k, j);
            v_rows.push(self.row_ptr(b, &spec.v, bases.v, j));
            let mut acc = splat_f32(b, 0.0);
            for (c, &qc) in row.q.iter().enumerate() {
                let cnt = (spec.d - 4 * c).min(4);
                let p = b.ins().iadd_imm_s(kp, 4 * c as i64 * kes);
                let kv = self.load_lanes(b, p, cnt, spec.k.dtype);
                acc = b.ins().fma(qc, kv, acc);
            }
            dots.push(acc);
        }
        let s = hsum4(b, dots[0], dots[1], dots[2], dots[3]);
        let j32 = b.ins().ireduce(I32, j0);
        let jv = b.ins().splat(I32X4, j32);
        let lanes = i32x4_const(b, [0, 1, 2, 3]);
        let jv = b.ins().iadd(jv, lanes);
        let mut s = self.score(b, &spec.score, s, row, j0, jv, count);
        // Element mask: pattern on partial tiles, and the lanes past n on the tail tile.
        let mut keep: Option<Value> = None;
        if masked {
            if let Some(rm) = &row.mask {
                keep = Some(Self::keep(b, rm, jv));
            }
        }
        if count < KEY_TILE {
            let valid: [i32; 4] = std::array::from_fn(|l| if l < count { -1 } else { 0 });
            let valid = i32x4_const(b, valid);
            keep = Some(match keep {
                Some(k) => b.ins().band(k, valid),
                None => valid,
            });
        }
        if let Some(k) = keep {
            let ninf = splat_f32(b, f32::NEG_INFINITY);
            s = select_f32(b, k, s, ninf);
        }
        // Online softmax update.
        let m_old = b.use_var(self.m_var);
        let tmax = hmax(b, s);
        let m_new = b.ins().fmax(m_old, tmax);
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let zero = splat_f32(b, 0.0);
        let none = b.ins().fcmp(FloatCC::Equal, m_new, ninf);
        let m_use = select_f32(b, none, zero, m_new);
        let da = b.ins().fsub(m_old, m_use);
        let alpha = emit_exp(b, da);
        let ds = b.ins().fsub(s, m_use);
        let p = emit_exp(b, ds);
        let l = b.use_var(self.l_var);
        let l = b.ins().fmul(l, alpha);
        let l = b.ins().fadd(l, p);
        b.def_var(self.l_var, l);
        b.def_var(self.m_var, m_new);
        let probs: Vec<Value> = (0..count)
            .map(|lane| {
                let x = b.ins().extractlane(p, lane as u8);
                b.ins().splat(F32X4, x)
            })
            .collect();
        for c in 0..self.dv4 {
            let cnt = (spec.dv - 4 * c).min(4);
            let acc = b.use_var(self.acc_vars[c]);
            let mut acc = b.ins().fmul(acc, alpha);
            for (lane, &pl) in probs.iter().enumerate() {
                let vp = b.ins().iadd_imm_s(v_rows[lane], 4 * c as i64 * ves);
                let vv = self.load_lanes(b, vp, cnt, spec.v.dtype);
                acc = b.ins().fma(pl, vv, acc);
            }
            b.def_var(self.acc_vars[c], acc);
        }
    }
}

/// An i32x4 vector constant.
fn i32x4_const(b: &mut FunctionBuilder, lanes: [i32; 4]) -> Value {
    let bytes: Vec<u8> = lanes.iter().flat_map(|l| l.to_le_bytes()).collect();
    let c = b.func.dfg.constants.insert(ConstantData::from(bytes));
    b.ins().vconst(I32X4, c)
}

/// Lane shuffle of two f32x4: result lane `k` is lane `sel[k]` of `x ++ y`.
fn shuf(b: &mut FunctionBuilder, x: Value, y: Value, sel: [u8; 4]) -> Value {
    let flags = MemFlagsData::new().with_endianness(Endianness::Little);
    let xb = b.ins().bitcast(I8X16, flags, x);
    let yb = b.ins().bitcast(I8X16, flags, y);
    let bytes: Vec<u8> = sel
        .iter()
        .flat_map(|&l| (0..4).map(move |k| l * 4 + k))
        .collect();
    let imm = b.func.dfg.immediates.push(ConstantData::from(bytes));
    let r = b.ins().shuffle(xb, yb, imm);
    b.ins().bitcast(F32X4, flags, r)
}

/// `[Σa0, Σa1, Σa2, Σa3]`, each sum taken as `(x0 + x2) + (x1 + x3)`.
fn hsum4(b: &mut FunctionBuilder, a0: Value, a1: Value, a2: Value, a3: Value) -> Value {
    let t0 = shuf(b, a0, a1, [0, 4, 1, 5]);
    let t1 = shuf(b, a0, a1, [2, 6, 3, 7]);
    let u0 = b.ins().fadd(t0, t1);
    let t2 = shuf(b, a2, a3, [0, 4, 1, 5]);
    let t3 = shuf(b, a2, a3, [2, 6, 3, 7]);
    let u1 = b.ins().fadd(t2, t3);
    let v0 = shuf(b, u0, u1, [0, 1, 4, 5]);
    let v1 = shuf(b, u0, u1, [2, 3, 6, 7]);
    b.ins().fadd(v0, v1)
}

/// The maximum of the four lanes in every lane (NaN propagates).
fn hmax(b: &mut FunctionBuilder, s: Value) -> Value {
    let sw = shuf(b, s, s, [2, 3, 0, 1]);
    let m = b.ins().fmax(s, sw);
    let sw = shuf(b, m, m, [1, 0, 3, 2]);
    b.ins().fmax(m, sw)
}

/// Widens f16 bit patterns (zero-extended in i32x4 lanes) to f32x4, exactly (subnormals, inf
/// and NaN included).
fn f16_to_f32(b: &mut FunctionBuilder, h: Value) -> Value {
    let sign_mask = splat_i32(b, 0x8000);
    let sign = b.ins().band(h, sign_mask);
    let sign = b.ins().ishl_imm_u(sign, 16);
    let em_mask = splat_i32(b, 0x7fff);
    let em = b.ins().band(h, em_mask);
    let o = b.ins().ishl_imm_u(em, 13);
    // Rebias the exponent by a multiply: normals and subnormals alike are exact.
    let of = as_float(b, o);
    let scale = splat_f32(b, f32::from_bits(0x7780_0000)); // 2^112
    let f = b.ins().fmul(of, scale);
    let fbits = b.ins().bitcast(
        I32X4,
        MemFlagsData::new().with_endianness(Endianness::Little),
        f,
    );
    let inf_bits = splat_i32(b, 0x7f80_0000);
    let special_bits = b.ins().bor(o, inf_bits);
    let lim = splat_i32(b, 0x7c00);
    let special = b.ins().icmp(IntCC::SignedGreaterThanOrEqual, em, lim);
    let bits = b.ins().bitselect(special, special_bits, fbits);
    let bits = b.ins().bor(bits, sign);
    as_float(b, bits)
}

/// Defines (does not finalize) the fused attention function `name` in `module` and returns its
/// id and CLIF text.
///
/// # ABI
///
/// ```text
/// extern "C" fn(inputs: *const *const u8, output: *mut f32,
///               batch_index: u64, row_begin: u64, row_end: u64)
/// ```
///
/// - `inputs[k]` is the raw data pointer of the IR kernel's parameter `k` (the
///   [`TensorRef::slot`]s of the spec index this array), each a row-major contiguous buffer of
///   its parameter's bound shape and storage dtype (f32, f16 or bf16). The same array can be
///   passed to every kernel of a plan.
/// - `output` is the start of the whole f32 output `[batch..., m, dv]`, row-major; the call
///   writes rows `row_begin..min(row_end, m)` of batch entry `batch_index`, i.e. the f32 at
///   `((batch_index * m) + i) * dv + c`, and nothing else.
/// - `batch_index < spec.batch_count()` (flattened row-major over [`AttentionSpec::batch`]).
/// - Shapes are constants in the code; the caller has checked every buffer. Calls on disjoint
///   row ranges may run concurrently; each row's result is independent of the range it was
///   computed in (bit-identical under any split).
pub fn define_attention(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
) -> Result<(FuncId, String)> {
    if spec.m >= 1 << 29 || spec.n >= 1 << 29 {
        return Err(JitError::Shape(format!(
            "attention of {} × {} exceeds the fused kernel's 2^29 limit",
            spec.m, spec.n
        )));
    }
    let table = tile_table(spec)?;
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    let func_id = module
        .declare_function(name, Linkage::Export, &sig)
        .map_err(|e| codegen_err(name, e))?;
    let data_id = module
        .declare_data(&format!("{name}.tiles"), Linkage::Local, false, false)
        .map_err(|e| codegen_err(name, e))?;
    let mut desc = DataDescription::new();
    desc.define(table.bytes.clone().into_boxed_slice());
    desc.set_align(8);
    module
        .define_data(data_id, &desc)
        .map_err(|e| codegen_err(name, e))?;

    let mut ctx = Context::new();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, func_id.as_u32());
    let table_gv = module.declare_data_in_func(data_id, &mut ctx.func);
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        emit_body(&mut b, spec, ptr, table_gv, &table.kinds);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let clif = ctx.func.display().to_string();
    module
        .define_function(func_id, &mut ctx)
        .map_err(|e| codegen_err(name, format!("{e:?}")))?;
    Ok((func_id, clif))
}

fn emit_body(
    b: &mut FunctionBuilder,
    spec: &AttentionSpec,
    ptr: Type,
    table_gv: cranelift_codegen::ir::GlobalValue,
    kinds: &BTreeSet<u32>,
) {
    let em = Emitter {
        spec,
        d4: spec.d.div_ceil(4),
        dv4: spec.dv.div_ceil(4),
        m_var: b.declare_var(F32X4),
        l_var: b.declare_var(F32X4),
        acc_vars: (0..spec.dv.div_ceil(4))
            .map(|_| b.declare_var(F32X4))
            .collect(),
    };
    let entry = b.create_block();
    let row_head = b.create_block();
    let run_head = b.create_block();
    let run_body = b.create_block();
    let run_next = b.create_block();
    let row_fin = b.create_block();
    let exit = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.append_block_param(row_head, I64);
    b.append_block_param(run_head, I64);

    // entry: bases and row range.
    b.switch_to_block(entry);
    let params = b.block_params(entry).to_vec();
    let (inputs, out, bidx, rb, re) = (params[0], params[1], params[2], params[3], params[4]);
    let m_c = em.iconst(b, spec.m as i64);
    let re = b.ins().umin(re, m_c);
    // Batch multi-index, last axis fastest.
    let mut idx = vec![None; spec.batch.len()];
    let mut rest = bidx;
    for a in (0..spec.batch.len()).rev() {
        let size = spec.batch[a] as i64;
        if size > 1 {
            let s = em.iconst(b, size);
            idx[a] = Some(b.ins().urem(rest, s));
            rest = b.ins().udiv(rest, s);
        }
    }
    let base_of = |b: &mut FunctionBuilder, t: &TensorRef| {
        let p = b.ins().load(ptr, mem(), inputs, (t.slot * 8) as i32);
        let es = elem_size(t.dtype);
        let mut p = p;
        for (a, &stride) in t.batch_strides.iter().enumerate() {
            if let (Some(i), true) = (idx.get(a).copied().flatten(), stride > 0) {
                let s = b.ins().iconst(I64, stride as i64 * es);
                let o = b.ins().imul(i, s);
                p = b.ins().iadd(p, o);
            }
        }
        p
    };
    let bases = Bases {
        q: base_of(b, &spec.q),
        k: base_of(b, &spec.k),
        v: base_of(b, &spec.v),
        biases: spec.biases.iter().map(|t| base_of(b, t)).collect(),
    };
    let out_row0 = em.offset(b, out, bidx, (spec.m * spec.dv * 4) as i64);
    let table = b.ins().symbol_value(ptr, table_gv);
    let runs_base = b.ins().iadd_imm_s(table, 8 * spec.m as i64);
    let any = b.ins().icmp(IntCC::UnsignedLessThan, rb, re);
    b.ins().brif(any, row_head, &[rb.into()], exit, &[]);

    // row_head(i)
    b.switch_to_block(row_head);
    let i = b.block_params(row_head)[0];
    let qp = em.row_ptr(b, &spec.q, bases.q, i);
    let qes = elem_size(spec.q.dtype);
    let q: Vec<Value> = (0..em.d4)
        .map(|c| {
            let p = b.ins().iadd_imm_s(qp, 4 * c as i64 * qes);
            em.load_lanes(b, p, (spec.d - 4 * c).min(4), spec.q.dtype)
        })
        .collect();
    let ia = b.ins().iadd_imm_s(i, spec.n as i64 - spec.m as i64);
    let ia32 = b.ins().ireduce(I32, ia);
    let ia_v = b.ins().splat(I32X4, ia32);
    let mask = spec.mask.as_ref().map(|p| em.row_mask(b, p, ia));
    let bias_rows = spec
        .biases
        .iter()
        .zip(&bases.biases)
        .map(|(t, &base)| {
            let p = em.row_ptr(b, t, base, i);
            if t.col_stride == 0 {
                let x = em.load_scalar(b, p, t.dtype);
                BiasRow::Splat(b.ins().splat(F32X4, x))
            } else {
                BiasRow::Ptr(p)
            }
        })
        .collect();
    let row = Row {
        q,
        ia_v,
        mask,
        bias_rows,
    };
    let ninf = splat_f32(b, f32::NEG_INFINITY);
    let zero = splat_f32(b, 0.0);
    b.def_var(em.m_var, ninf);
    b.def_var(em.l_var, zero);
    for &v in &em.acc_vars {
        b.def_var(v, zero);
    }
    let entry_p = em.offset(b, table, i, 8);
    let r0 = b.ins().uload32(mem().with_readonly(), entry_p, 0);
    let rc = b.ins().uload32(mem().with_readonly(), entry_p, 4);
    let r_end = b.ins().iadd(r0, rc);
    b.ins().jump(run_head, &[r0.into()]);

    // run_head(r): while r < r_end
    b.switch_to_block(run_head);
    let r = b.block_params(run_head)[0];
    let more = b.ins().icmp(IntCC::UnsignedLessThan, r, r_end);
    b.ins().brif(more, run_body, &[], row_fin, &[]);

    // run_body: dispatch on the kind of run r.
    b.switch_to_block(run_body);
    let rp = em.offset(b, runs_base, r, 12);
    let first = b.ins().uload32(mem().with_readonly(), rp, 0);
    let end = b.ins().uload32(mem().with_readonly(), rp, 4);
    let kind = b.ins().load(I32, mem().with_readonly(), rp, 8);
    let kinds: Vec<u32> = kinds.iter().copied().collect();
    let mut targets: Vec<Block> = Vec::new();
    for _ in &kinds {
        let blk = b.create_block();
        b.append_block_param(blk, I64);
        targets.push(blk);
    }
    if kinds.is_empty() {
        b.ins().jump(run_next, &[]);
    } else {
        for (n, &k) in kinds.iter().enumerate() {
            if n + 1 == kinds.len() {
                b.ins().jump(targets[n], &[first.into()]);
            } else {
                let is_k = b.ins().icmp_imm_s(IntCC::Equal, kind, i64::from(k));
                let next = b.create_block();
                b.ins().brif(is_k, targets[n], &[first.into()], next, &[]);
                b.switch_to_block(next);
            }
        }
    }
    let tail_count = spec.n % KEY_TILE;
    for (n, &k) in kinds.iter().enumerate() {
        let blk = targets[n];
        b.switch_to_block(blk);
        let t = b.block_params(blk)[0];
        let (masked, tail) = match k {
            0 => (false, false),
            1 => (true, false),
            2 => (false, true),
            _ => (true, true),
        };
        let count = if tail { tail_count } else { KEY_TILE };
        em.tile(b, &bases, &row, t, masked, count);
        if tail {
            b.ins().jump(run_next, &[]);
        } else {
            let t1 = b.ins().iadd_imm_s(t, 1);
            let again = b.ins().icmp(IntCC::UnsignedLessThan, t1, end);
            b.ins().brif(again, blk, &[t1.into()], run_next, &[]);
        }
    }

    // run_next
    b.switch_to_block(run_next);
    let r1 = b.ins().iadd_imm_s(r, 1);
    b.ins().jump(run_head, &[r1.into()]);

    // row_fin: out_i = acc / l, zeros where l = 0.
    b.switch_to_block(row_fin);
    let l = b.use_var(em.l_var);
    let l0 = b.ins().extractlane(l, 0);
    let l1 = b.ins().extractlane(l, 1);
    let l2 = b.ins().extractlane(l, 2);
    let l3 = b.ins().extractlane(l, 3);
    let a = b.ins().fadd(l0, l2);
    let c = b.ins().fadd(l1, l3);
    let lsum = b.ins().fadd(a, c);
    let lv = b.ins().splat(F32X4, lsum);
    let zero = splat_f32(b, 0.0);
    let empty = b.ins().fcmp(FloatCC::Equal, lv, zero);
    let op = em.offset(b, out_row0, i, (spec.dv * 4) as i64);
    for (c, &var) in em.acc_vars.iter().enumerate() {
        let acc = b.use_var(var);
        let y = b.ins().fdiv(acc, lv);
        let y = select_f32(b, empty, zero, y);
        let cnt = (spec.dv - 4 * c).min(4);
        if cnt == 4 {
            b.ins().store(mem(), y, op, (16 * c) as i32);
        } else {
            for lane in 0..cnt {
                let x = b.ins().extractlane(y, lane as u8);
                b.ins().store(mem(), x, op, (16 * c + 4 * lane) as i32);
            }
        }
    }
    let i1 = b.ins().iadd_imm_s(i, 1);
    let again = b.ins().icmp(IntCC::UnsignedLessThan, i1, re);
    b.ins().brif(again, row_head, &[i1.into()], exit, &[]);

    b.switch_to_block(exit);
    b.ins().return_(&[]);
}
