//! Cranelift code of the fused attention kernel (see [`define_attention`]).
//!
//! Layout of the generated function, per call (one batch entry, a range of query rows):
//!
//! ```text
//! entry:       clamp rows, batch multi-index → base pointers of Q, K, V, biases, output
//! group_head:  a query tile of QUERY_TILE rows: Q row pointers, per-row mask bounds and
//!              bias rows; m = -inf, l = 0 (one lane per row), O = 0 (stack slot)
//! run_head:    for each run of key tiles listed for this query tile in the compile-time table
//!   body:        loop over the run's key tiles; the element mask from the pattern applies
//!                only in partial runs (a runtime flag when the table has both kinds, so the
//!                tile code is generated once)
//!   tail:        the last, short key tile (n mod 8 keys), full or partial
//! group_fin:   out_i = O_i / l_i (0 where l_i = 0) for the rows inside [row_begin, row_end)
//! ```
//!
//! A key tile is [`KEY_TILE`] = 8 keys; a query tile is [`QUERY_TILE`] = 4 rows, which share
//! every K and V load. One tile step (see `Emitter::tile`) is register-blocked for the 16 xmm
//! registers: Q·Kᵀ as 2 rows × 4 keys of f32x4 partial dot products (8 accumulators, 6 loads
//! per 8 FMAs) reduced by [`hsum4`]; score expression and mask on row vectors; a 4 × 4
//! transpose to one vector per key with a lane per row, so the online softmax (maximum, sum,
//! rescale test, one `exp` per key) works on all 4 rows at once; P·V over chunks of 12 output
//! lanes (4 rows × 3 f32x4 accumulators, loaded from and stored to the `O` stack slot) with
//! one broadcast load of `p` per FMA. The function is compiled without Cranelift's e-graph
//! pass so that this schedule survives (see [`define_in_order`]): at d = dv = 64 a tile step
//! is about 1,000 FMAs in roughly 3,000 instructions, with a few dozen spill moves at most.
//!
//! Query tiles are aligned to absolute row indices (tile `g` is rows `4g .. 4g + 4`) and
//! always compute all their rows (rows past `m - 1` duplicate row `m - 1`; with `m < 4` only
//! `m` rows are computed), storing only the rows of the call's range: every row is computed
//! by the same instructions whatever range a call covers, so results are bit-identical under
//! any split. Code size is bounded: O(tile bodies × (d + dv)), independent of m and n; the
//! sparsity lives in the data table.

use super::mask::RowMask;
use super::{run_code, AttentionSpec, ScoreExpr, TensorRef};
use crate::error::{JitError, Result};
use crate::simd::{
    as_float, const_i32x4, emit_elu, emit_exp, emit_exp_nonpos, emit_log, emit_sigmoid, emit_tanh,
    hsum4, select_f32, shuffle_f32x4, splat_f32, splat_i32, transpose4, widen_f16,
};
use crate::tiles::classify;
use attnc_ir::{BinaryOp, DType, UnaryOp};
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    AbiParam, Block, BlockArg, GlobalValue, InstBuilder, MemFlagsData, StackSlot, StackSlotData,
    StackSlotKind, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{DataDescription, FuncId, Linkage, Module, ModuleReloc};
use std::collections::{BTreeSet, HashMap};

/// f32x4 score vectors per key tile.
const KEY_VECS: usize = 2;

/// Keys per key tile (`KEY_VECS` f32x4 of scores).
pub const KEY_TILE: usize = 4 * KEY_VECS;

/// Query rows per query tile: they share every K and V load.
pub const QUERY_TILE: usize = 4;

/// f32x4 of the value width per P·V chunk (`QUERY_TILE × PV_VECS` accumulators in registers).
const PV_VECS: usize = 3;

/// Memory flags of buffer accesses: the runtime checked every buffer before the call.
pub(super) fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub(super) fn codegen_err(name: &str, detail: impl ToString) -> JitError {
    JitError::Codegen {
        kernel: name.to_string(),
        detail: detail.to_string(),
    }
}

pub(super) fn elem_size(dtype: DType) -> i64 {
    match dtype {
        DType::F32 => 4,
        DType::F16 | DType::Bf16 => 2,
    }
}

/// The compile-time tile table, embedded as a read-only data object `{name}.tiles`: per query
/// tile a `(first run, run count)` pair of u32, then the runs as `(first key tile, end key
/// tile, kind)` u32 triples (kind 0 full, 1 partial, 2 tail full, 3 tail partial). Query tiles
/// with equal run lists share their runs, so dense attention stores one run.
pub(super) struct TileTable {
    pub(super) bytes: Vec<u8>,
    pub(super) kinds: BTreeSet<u32>,
}

/// The tile table of `spec` for key tiles of `key_tile` keys.
pub(super) fn tile_table(spec: &AttentionSpec, key_tile: usize) -> Result<TileTable> {
    let tiles = spec.n.div_ceil(key_tile);
    let tail = !spec.n.is_multiple_of(key_tile);
    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(spec.m);
    let mut runs: Vec<[u32; 3]> = Vec::new();
    let mut seen: HashMap<Vec<[u32; 3]>, u32> = HashMap::new();
    let mut kinds = BTreeSet::new();
    let too_big = || JitError::Shape("attention tile table exceeds u32 indices".to_string());
    for g in 0..spec.m.div_ceil(QUERY_TILE) {
        let mut list: Vec<[u32; 3]> = Vec::new();
        let (i0, i1) = spec.query_tile_rows(g);
        for r in classify(spec.mask.as_ref(), spec.m, spec.n, i0, i1, key_tile) {
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

/// Tensor base pointers of the call's batch entry.
/// The parameters of one call of a fused attention function (the kernel ABI of `jit.rs`),
/// read in its entry block: the row range clamped to `m`, and the batch multi-index of the
/// call's batch entry (last axis fastest) for [`CallParams::base_of`].
pub(super) struct CallParams {
    pub(super) inputs: Value,
    pub(super) out: Value,
    pub(super) bidx: Value,
    pub(super) rb: Value,
    pub(super) re: Value,
    idx: Vec<Option<Value>>,
}

impl CallParams {
    pub(super) fn read(b: &mut FunctionBuilder, spec: &AttentionSpec, entry: Block) -> CallParams {
        let params = b.block_params(entry).to_vec();
        let (inputs, out, bidx, rb, re) = (params[0], params[1], params[2], params[3], params[4]);
        let m_c = b.ins().iconst(I64, spec.m as i64);
        let re = b.ins().umin(re, m_c);
        let mut idx = vec![None; spec.batch.len()];
        let mut rest = bidx;
        for a in (0..spec.batch.len()).rev() {
            let size = spec.batch[a] as i64;
            if size > 1 {
                let s = b.ins().iconst(I64, size);
                idx[a] = Some(b.ins().urem(rest, s));
                rest = b.ins().udiv(rest, s);
            }
        }
        CallParams {
            inputs,
            out,
            bidx,
            rb,
            re,
            idx,
        }
    }

    /// The address of operand `t` (buffer slot, batch strides) for this call's batch entry.
    pub(super) fn base_of(&self, b: &mut FunctionBuilder, ptr: Type, t: &TensorRef) -> Value {
        let mut p = b.ins().load(ptr, mem(), self.inputs, (t.slot * 8) as i32);
        let es = elem_size(t.dtype);
        for (a, &stride) in t.batch_strides.iter().enumerate() {
            if let (Some(i), true) = (self.idx.get(a).copied().flatten(), stride > 0) {
                let s = b.ins().iconst(I64, stride as i64 * es);
                let o = b.ins().imul(i, s);
                p = b.ins().iadd(p, o);
            }
        }
        p
    }
}

pub(super) struct Bases {
    pub(super) q: Value,
    pub(super) k: Value,
    pub(super) v: Value,
    pub(super) biases: Vec<Value>,
}

/// Per-row state visible to the tile bodies.
pub(super) struct Row {
    /// Pointer to the row of Q (its chunks are loaded in every key tile).
    q: Value,
    /// The aligned row index `i + n - m` as i32x4.
    ia_v: Value,
    pub(super) mask: Option<RowMask>,
    /// Per bias: the pointer to its row `i` (or the splatted value when it is constant along j).
    bias_rows: Vec<BiasRow>,
}

#[derive(Clone, Copy)]
enum BiasRow {
    Ptr(Value),
    Splat(Value),
}

pub(super) struct Emitter<'s> {
    pub(super) spec: &'s AttentionSpec,
    pub(super) d4: usize,
    pub(super) dv4: usize,
    /// Rows computed per query tile: `min(QUERY_TILE, m)` (lanes past it repeat the last).
    pub(super) qrows: usize,
    /// Running maximum and running sum, one lane per row of the query tile.
    pub(super) m_var: Variable,
    pub(super) l_var: Variable,
    /// The output accumulators: `QUERY_TILE × dv4` f32x4, row-major.
    pub(super) o_slot: StackSlot,
    /// The probabilities of the current key tile: `KEY_TILE` f32x4, one per key (lane = row).
    pub(super) p_slot: StackSlot,
}

/// How a tile step applies the element mask.
#[derive(Clone, Copy)]
enum Masking {
    /// Never: the body serves only full tiles.
    Off,
    /// Always: the body serves only partial tiles.
    On,
    /// When the i32 flag is nonzero: one body serves both full and partial runs, so the
    /// tile code is generated once instead of twice (half the compile time for masked
    /// kernels) at the price of one predictable branch per tile.
    Flag(Value),
}

impl Emitter<'_> {
    pub(super) fn iconst(&self, b: &mut FunctionBuilder, v: i64) -> Value {
        b.ins().iconst(I64, v)
    }

    /// `ptr + index * scale` (bytes), i64 arithmetic.
    pub(super) fn offset(
        &self,
        b: &mut FunctionBuilder,
        ptr: Value,
        index: Value,
        scale: i64,
    ) -> Value {
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
                    widen_f16(b, bits)
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

    /// Evaluates the score expression on one key tile.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn score(
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
            ScoreExpr::Dim(d) => {
                unreachable!("invariant: the planner folds dimension `{d}` into a constant")
            }
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
                    BinaryOp::Div => match exact_reciprocal(e) {
                        // x / 2^k = x · 2^-k exactly (both round the same real number once).
                        Some(r) => {
                            let r = splat_f32(b, r);
                            b.ins().fmul(x, r)
                        }
                        None => b.ins().fdiv(x, y),
                    },
                    BinaryOp::Max => b.ins().fmax(x, y),
                    BinaryOp::Min => b.ins().fmin(x, y),
                }
            }
        }
    }

    /// One key tile `t` (i64) with `count` valid keys for every row of the query tile;
    /// `masking` says whether the element mask applies.
    ///
    /// Scores: rows in pairs, keys in fours; per depth chunk two q chunks and four K chunks
    /// are loaded into registers and feed eight f32x4 accumulators (each a partial dot
    /// product, summed horizontally at the end: [`hsum4`] gives a row's four scores). The
    /// score expression and the element mask run on these row vectors; a 4 × 4 transpose then
    /// gives one vector per key with a lane per query row, the layout of the online softmax
    /// (running maximum and sum are one vector each for the whole query tile). The
    /// probabilities go to the `P` stack slot, and P·V runs over the value width in chunks of
    /// `4 · PV_VECS` lanes: the rows' accumulators are loaded from the `O` stack slot, every
    /// key adds `p[r, j] · V[j, chunk]` (V chunks shared by the rows, one broadcast load of
    /// `p` per FMA), and they are stored back.
    fn tile(
        &self,
        b: &mut FunctionBuilder,
        bases: &Bases,
        rows: &[Row],
        t: Value,
        masking: Masking,
        count: usize,
    ) {
        let spec = self.spec;
        let qrows = self.qrows;
        let j0 = b.ins().imul_imm_s(t, KEY_TILE as i64);
        let kes = elem_size(spec.k.dtype);
        let qes = elem_size(spec.q.dtype);
        let ves = elem_size(spec.v.dtype);
        // The tile's first K and V rows; key `l` of the tile is at a constant offset from them.
        let k_tile = self.row_ptr(b, &spec.k, bases.k, j0);
        let v_tile = self.row_ptr(b, &spec.v, bases.v, j0);
        let k_row = spec.k.row_stride as i64 * kes;
        let v_row = spec.v.row_stride as i64 * ves;
        let zero = splat_f32(b, 0.0);
        // Raw scores, row layout: dots[r][h] holds keys 4h..4h+4 of row r.
        let mut dots: Vec<Vec<Value>> = vec![Vec::with_capacity(KEY_VECS); qrows];
        for h in 0..KEY_VECS {
            let keys: Vec<usize> = ((4 * h).min(count)..(4 * h + 4).min(count)).collect();
            for pair in (0..qrows).collect::<Vec<_>>().chunks(2) {
                let mut acc: Vec<Vec<Value>> = vec![Vec::new(); pair.len()];
                for c in 0..self.d4 {
                    let cnt = (spec.d - 4 * c).min(4);
                    let kv: Vec<Value> = keys
                        .iter()
                        .map(|&l| {
                            let p = b
                                .ins()
                                .iadd_imm_s(k_tile, l as i64 * k_row + 4 * c as i64 * kes);
                            self.load_lanes(b, p, cnt, spec.k.dtype)
                        })
                        .collect();
                    for (pi, (a, &r)) in acc.iter_mut().zip(pair).enumerate() {
                        let p = b.ins().iadd_imm_s(rows[r].q, 4 * c as i64 * qes);
                        let q = self.load_lanes(b, p, cnt, spec.q.dtype);
                        let last_row = pi + 1 == pair.len();
                        for (l, &k) in kv.iter().enumerate() {
                            if c == 0 {
                                // AVX multiplies are non-destructive: no copies.
                                a.push(b.ins().fmul(q, k));
                            } else if last_row {
                                // x64 FMA overwrites its first operand: make it the value
                                // whose last use this is, so no copy is needed.
                                a[l] = b.ins().fma(k, q, a[l]);
                            } else {
                                a[l] = b.ins().fma(q, k, a[l]);
                            }
                        }
                    }
                }
                for (a, &r) in acc.iter().zip(pair) {
                    let s = if keys.is_empty() || a.is_empty() {
                        zero
                    } else {
                        let at = |l: usize| a.get(l).copied().unwrap_or(zero);
                        hsum4(b, at(0), at(1), at(2), at(3))
                    };
                    dots[r].push(s);
                }
            }
        }
        let j32 = b.ins().ireduce(I32, j0);
        let jv = b.ins().splat(I32X4, j32);
        // Score expression, row layout; `keys[r][h]` are the key indices of `scores[r][h]`.
        let mut scores: Vec<Vec<Value>> = Vec::with_capacity(QUERY_TILE);
        let mut keys: Vec<Vec<Value>> = Vec::with_capacity(QUERY_TILE);
        for (r, row) in rows.iter().enumerate().take(qrows) {
            let mut list = Vec::with_capacity(KEY_VECS);
            let mut js = Vec::with_capacity(KEY_VECS);
            for (h, &raw) in dots[r].iter().enumerate() {
                let cnt = count.saturating_sub(4 * h).min(4);
                if cnt == 0 {
                    break;
                }
                let lanes = const_i32x4(b, std::array::from_fn(|l| (4 * h + l) as i32));
                let jh = b.ins().iadd(jv, lanes);
                let j0h = b.ins().iadd_imm_s(j0, 4 * h as i64);
                list.push(self.score(b, &spec.score, raw, row, j0h, jh, cnt));
                js.push(jh);
            }
            scores.push(list);
            keys.push(js);
        }
        self.apply_mask(b, rows, &keys, &mut scores, masking);
        // Rows past the tile's real rows (m < QUERY_TILE) repeat the last one.
        while scores.len() < QUERY_TILE {
            let last = scores[qrows - 1].clone();
            scores.push(last);
        }
        // Transpose: cols[k] = scores of key k for the QUERY_TILE rows (lane = row).
        let mut cols: Vec<Value> = Vec::with_capacity(count);
        for (h, &first) in scores[0].iter().enumerate() {
            let cnt = count.saturating_sub(4 * h).min(4);
            let t = transpose4(b, first, scores[1][h], scores[2][h], scores[3][h]);
            cols.extend_from_slice(&t[..cnt]);
        }
        self.online_update(b, &cols);
        // P·V.
        let p_ptr = b.ins().stack_addr(I64, self.p_slot, 0);
        let chunks = self.dv4.div_ceil(PV_VECS);
        for ch in 0..chunks {
            let vecs: Vec<usize> = (PV_VECS * ch..(PV_VECS * ch + PV_VECS).min(self.dv4)).collect();
            let mut acc: Vec<Vec<Value>> = (0..qrows)
                .map(|r| {
                    vecs.iter()
                        .map(|&c| {
                            b.ins()
                                .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c))
                        })
                        .collect()
                })
                .collect();
            for k in 0..count {
                let vv: Vec<Value> = vecs
                    .iter()
                    .map(|&c| {
                        let cnt = (spec.dv - 4 * c).min(4);
                        let p = b
                            .ins()
                            .iadd_imm_s(v_tile, k as i64 * v_row + 4 * c as i64 * ves);
                        self.load_lanes(b, p, cnt, spec.v.dtype)
                    })
                    .collect();
                for (r, a) in acc.iter_mut().enumerate() {
                    for (slot, &v) in a.iter_mut().zip(&vv) {
                        // One broadcast load per FMA: used once, it folds into a
                        // `vbroadcastss` from memory, and the FMA may overwrite it (x64 FMA
                        // overwrites its first operand).
                        let x = b.ins().load(F32, mem(), p_ptr, (16 * k + 4 * r) as i32);
                        let pb = b.ins().splat(F32X4, x);
                        *slot = b.ins().fma(pb, v, *slot);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (&c, &v) in vecs.iter().zip(a) {
                    b.ins().stack_store(I64, v, self.o_slot, self.o_off(r, c));
                }
            }
        }
    }

    /// The element mask on the row-layout scores: masked keys become `-inf`. Under
    /// [`Masking::Flag`] the masked scores are computed on a side path and joined back.
    fn apply_mask(
        &self,
        b: &mut FunctionBuilder,
        rows: &[Row],
        keys: &[Vec<Value>],
        scores: &mut [Vec<Value>],
        masking: Masking,
    ) {
        let has_mask = rows.iter().take(self.qrows).any(|row| row.mask.is_some());
        let masked = |b: &mut FunctionBuilder, scores: &mut [Vec<Value>]| {
            for ((row, js), list) in rows.iter().zip(keys).zip(scores.iter_mut()) {
                if let Some(rm) = &row.mask {
                    for (s, &jh) in list.iter_mut().zip(js) {
                        let keep = rm.keep(b, jh);
                        let ninf = splat_f32(b, f32::NEG_INFINITY);
                        *s = select_f32(b, keep, *s, ninf);
                    }
                }
            }
        };
        match masking {
            Masking::Off => {}
            Masking::On => masked(b, scores),
            Masking::Flag(_) if !has_mask => {}
            Masking::Flag(flag) => {
                let apply = b.create_block();
                let join = b.create_block();
                let flat: Vec<Value> = scores.iter().flatten().copied().collect();
                for _ in &flat {
                    b.append_block_param(join, F32X4);
                }
                let plain: Vec<BlockArg> = flat.iter().map(|&v| v.into()).collect();
                b.ins().brif(flag, apply, &[], join, &plain);
                b.switch_to_block(apply);
                masked(b, scores);
                let with_mask: Vec<BlockArg> = scores.iter().flatten().map(|&v| v.into()).collect();
                b.ins().jump(join, &with_mask);
                b.switch_to_block(join);
                let joined = b.block_params(join).to_vec();
                let mut it = joined.into_iter();
                for list in scores.iter_mut() {
                    for s in list.iter_mut() {
                        *s = it.next().unwrap_or(*s);
                    }
                }
            }
        }
    }

    /// Byte offset of accumulator chunk `c` of row `r` in the `O` stack slot.
    fn o_off(&self, r: usize, c: usize) -> i32 {
        (16 * (r * self.dv4 + c)) as i32
    }

    /// The online-softmax step of the query tile for key columns `cols` (lane = row, masked
    /// entries `-inf`): updates the running maximum and sum, rescales the accumulators when
    /// some row's maximum changed, and stores `p = e^(s - m)` of key `k` at `16 k` in the `P`
    /// slot.
    fn online_update(&self, b: &mut FunctionBuilder, cols: &[Value]) {
        let m_old = b.use_var(self.m_var);
        // A tree of maxima (short dependency chains; any order gives the same maximum, up to
        // the sign of a zero, which no result depends on).
        let tile_max = tree(b, cols, max_shift);
        let m_new = match tile_max {
            Some(t) => max_shift(b, t, m_old),
            None => m_old,
        };
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let zero = splat_f32(b, 0.0);
        // While every score so far is -inf, subtract 0 instead (e^(-inf - 0) = 0, no NaN).
        let none = b.ins().fcmp(FloatCC::Equal, m_new, ninf);
        let m_use = select_f32(b, none, zero, m_new);
        b.def_var(self.m_var, m_new);
        // Rescale l and acc by alpha = e^(m_old - m_new) only when some row's maximum changed
        // (or is NaN): alpha is exactly 1 in the other rows, so this changes no bit there.
        let same = b.ins().fcmp(FloatCC::Equal, m_old, m_new);
        let all_same = b.ins().vall_true(same);
        let rescale = b.create_block();
        let update = b.create_block();
        b.ins().brif(all_same, update, &[], rescale, &[]);
        b.switch_to_block(rescale);
        let da = b.ins().fsub(m_old, m_use);
        let alpha = emit_exp_nonpos(b, da);
        let l = b.use_var(self.l_var);
        let l = b.ins().fmul(l, alpha);
        b.def_var(self.l_var, l);
        for r in 0..self.qrows {
            let lane = r as u8;
            let a = shuffle_f32x4(b, alpha, alpha, [lane; 4]);
            for c in 0..self.dv4 {
                let x = b
                    .ins()
                    .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c));
                let x = b.ins().fmul(x, a);
                b.ins().stack_store(I64, x, self.o_slot, self.o_off(r, c));
            }
        }
        b.ins().jump(update, &[]);
        b.switch_to_block(update);
        let mut probs = Vec::with_capacity(cols.len());
        for (k, &x) in cols.iter().enumerate() {
            let ds = b.ins().fsub(x, m_use);
            let e = emit_exp_nonpos(b, ds);
            b.ins().stack_store(I64, e, self.p_slot, (16 * k) as i32);
            probs.push(e);
        }
        if let Some(sum) = tree(b, &probs, |b, x, y| b.ins().fadd(x, y)) {
            let l = b.use_var(self.l_var);
            let l = b.ins().fadd(l, sum);
            b.def_var(self.l_var, l);
        }
    }
}

/// For `x / c` with `c` a constant power of two whose reciprocal is a normal f32: `1 / c`.
fn exact_reciprocal(e: &ScoreExpr) -> Option<f32> {
    let ScoreExpr::Binary(BinaryOp::Div, _, y) = e else {
        return None;
    };
    let ScoreExpr::Const(c) = **y else {
        return None;
    };
    let c = c as f32;
    let r = 1.0 / c;
    let pow2 = |v: f32| v.is_normal() && v.to_bits() & 0x007f_ffff == 0;
    (pow2(c) && pow2(r)).then_some(r)
}

/// Combines `xs` pairwise in a balanced tree (`None` when empty).
fn tree(
    b: &mut FunctionBuilder,
    xs: &[Value],
    f: impl Fn(&mut FunctionBuilder, Value, Value) -> Value + Copy,
) -> Option<Value> {
    match xs.len() {
        0 => None,
        1 => Some(xs[0]),
        n => {
            let (lo, hi) = xs.split_at(n.div_ceil(2));
            let x = tree(b, lo, f)?;
            match tree(b, hi, f) {
                Some(y) => Some(f(b, x, y)),
                None => Some(x),
            }
        }
    }
}

/// `a > b ? a : b`, lane-wise: two instructions instead of the eight of a NaN-propagating
/// `fmax`. The online softmax only needs a shift near the row maximum: a NaN score makes its
/// own `p = e^(NaN - m)` NaN, so the row still comes out NaN (QUALITY.md's max policy holds
/// for the output) whether or not the shift saw the NaN.
pub(super) fn max_shift(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    let gt = b.ins().fcmp(FloatCC::GreaterThan, x, y);
    select_f32(b, gt, x, y)
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
/// - Shapes are constants in the code; the caller has checked every buffer (the kernel reads
///   only inside them). Calls on disjoint row ranges may run concurrently; each row's result
///   is independent of the range it was computed in (bit-identical under any split). A range
///   that starts or ends inside a [`QUERY_TILE`]-row tile recomputes, but does not write, the
///   tile's other rows. An empty range writes nothing.
///
/// Besides the function, this declares and defines a read-only data object `{name}.tiles`
/// (the compile-time tile table), so `name` must be unique in the module; both are usable
/// after `module.finalize_definitions()`.
///
/// # Errors
///
/// [`JitError::Shape`] past 2^29 rows or keys; [`JitError::Codegen`] when Cranelift rejects the
/// function (verifier, or an instruction this CPU cannot lower).
pub fn define_attention(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
) -> Result<(FuncId, String)> {
    let defined = define_attention_with(module, spec, name, true)?;
    Ok((defined.id, defined.clif))
}

/// A fused attention function defined in a module.
#[derive(Clone, Debug)]
pub struct DefinedAttention {
    /// The function.
    pub id: FuncId,
    /// Its CLIF before compilation.
    pub clif: String,
    /// Cranelift's VCode listing of the machine code, when available.
    pub vcode: Option<String>,
}

/// [`define_attention`] with a choice: `dot_product` lets the int8 kernel use the CPU's u8·i8
/// dot-product instruction (`vpdpbusd`) where the ISA has it; without it the same integer
/// tree is lowered to plain SIMD (identical results).
///
/// For [`super::Precision::Int8`] the ABI differs: `inputs[0]` is the packed buffer of
/// [`super::quant::pack`] and the spec's bias slots index the same array (see
/// [`super::int8`]).
pub fn define_attention_with(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    dot_product: bool,
) -> Result<DefinedAttention> {
    if spec.m >= 1 << 29 || spec.n >= 1 << 29 {
        return Err(JitError::Shape(format!(
            "attention of {} × {} exceeds the fused kernel's 2^29 limit",
            spec.m, spec.n
        )));
    }
    if let Some(t) = [&spec.q, &spec.k, &spec.v]
        .into_iter()
        .find(|t| t.convert.is_some())
    {
        return Err(codegen_err(
            name,
            format!(
                "operand `{}` must be converted before the kernel reads it",
                t.name
            ),
        ));
    }
    if spec.precision == super::Precision::Int8 {
        return super::int8::define_int8(module, spec, name, dot_product);
    }
    define_with_table(
        module,
        spec,
        name,
        (KEY_TILE, dot_product),
        |b, ptr, table_gv, kinds| {
            emit_body(b, spec, ptr, table_gv, kinds);
            Ok(())
        },
    )
}

/// Declares function `name` with the kernel signature and the read-only data object
/// `{name}.tiles` holding `table`; returns the function id, a context whose function has the
/// signature and name set, and the table's global value in it.
pub(super) fn declare(
    module: &mut JITModule,
    name: &str,
    table: &TileTable,
) -> Result<(FuncId, Context, cranelift_codegen::ir::GlobalValue)> {
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
    Ok((func_id, ctx, table_gv))
}

/// The module's ISA with the same flags except `opt_level = none`.
fn in_order_isa(module: &JITModule, name: &str, dot_product: bool) -> Result<OwnedTargetIsa> {
    let host = module.isa();
    let mut shared = settings::builder();
    for v in host.flags().iter() {
        if v.name != "opt_level" {
            shared
                .set(v.name, &v.value_string())
                .map_err(|e| codegen_err(name, e))?;
        }
    }
    shared
        .set("opt_level", "none")
        .map_err(|e| codegen_err(name, e))?;
    let mut isa = isa::lookup(host.triple().clone()).map_err(|e| codegen_err(name, e))?;
    for v in host.isa_flags() {
        isa.set(v.name, &v.value_string())
            .map_err(|e| codegen_err(name, e))?;
    }
    if !dot_product {
        // Same integer tree, lowered without the `vpdpbusd` fold.
        for flag in ["has_avx_vnni", "has_avx512vnni"] {
            isa.set(flag, "false").map_err(|e| codegen_err(name, e))?;
        }
    }
    isa.finish(settings::Flags::new(shared))
        .map_err(|e| codegen_err(name, e))
}

/// Compiles `ctx` without Cranelift's mid-end optimizer and defines it as `func_id`; returns
/// the VCode listing.
///
/// The tile bodies are emitted in the order they should run: per step a few loads and the
/// FMAs that consume them, with at most 16 vector values live. The e-graph pass would place
/// every pure instruction (the FMAs) at its first use and keep loads in program order, so
/// an unrolled tile would load everything first and spill most of it. Constants are shared
/// by construction, so the optimizer has little else to do here.
pub(super) fn define_in_order(
    module: &mut JITModule,
    func_id: FuncId,
    ctx: &mut Context,
    name: &str,
    dot_product: bool,
) -> Result<Option<String>> {
    let isa = in_order_isa(module, name, dot_product)?;
    ctx.set_disasm(true);
    ctx.compile(&*isa, &mut ControlPlane::default())
        .map_err(|e| codegen_err(name, format!("{:?}", e.inner)))?;
    let code = ctx
        .compiled_code()
        .ok_or_else(|| codegen_err(name, "no compiled code"))?;
    let align = u64::from(code.buffer.alignment)
        .max(u64::from(isa.function_alignment().minimum))
        .max(isa.symbol_alignment());
    let relocs: Vec<ModuleReloc> = code
        .buffer
        .relocs()
        .iter()
        .map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, func_id))
        .collect();
    let bytes = code.code_buffer().to_vec();
    let vcode = code.vcode.clone();
    module
        .define_function_bytes(func_id, align, &bytes, &relocs)
        .map_err(|e| codegen_err(name, e))?;
    Ok(vcode)
}

fn emit_body(
    b: &mut FunctionBuilder,
    spec: &AttentionSpec,
    ptr: Type,
    table_gv: GlobalValue,
    kinds: &BTreeSet<u32>,
) {
    let dv4 = spec.dv.div_ceil(4);
    let slot = |b: &mut FunctionBuilder, bytes: usize| {
        let size = u32::try_from(bytes.max(16)).unwrap_or(u32::MAX);
        b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4))
    };
    let em = Emitter {
        spec,
        d4: spec.d.div_ceil(4),
        dv4,
        qrows: QUERY_TILE.min(spec.m).max(1),
        m_var: b.declare_var(F32X4),
        l_var: b.declare_var(F32X4),
        o_slot: slot(b, 16 * QUERY_TILE * dv4),
        p_slot: slot(b, 16 * KEY_TILE),
    };
    let k = Skeleton::new(b);
    let (group_head, run_head, run_body, run_next, group_fin, exit) = (
        k.group_head,
        k.run_head,
        k.run_body,
        k.run_next,
        k.group_fin,
        k.exit,
    );

    // entry: bases and row range.
    b.switch_to_block(k.entry);
    let call = CallParams::read(b, spec, k.entry);
    let (out, bidx, rb, re) = (call.out, call.bidx, call.rb, call.re);
    let bases = Bases {
        q: call.base_of(b, ptr, &spec.q),
        k: call.base_of(b, ptr, &spec.k),
        v: call.base_of(b, ptr, &spec.v),
        biases: spec
            .biases
            .iter()
            .map(|t| call.base_of(b, ptr, t))
            .collect(),
    };
    let out_row0 = em.offset(b, out, bidx, (spec.m * spec.dv * 4) as i64);
    let (table, runs_base) = k.enter_groups(b, spec, (ptr, table_gv), (rb, re));

    // group_head(g): rows i0 .. i0 + QUERY_TILE, clamped to m - 1 (a duplicate row is
    // computed but not stored), so every row is computed the same way whatever the range.
    let (g, i0, last) = k.group_head(b, spec);
    let rows: Vec<Row> = (0..em.qrows)
        .map(|k| {
            let i = b.ins().iadd_imm_s(i0, k as i64);
            let i = b.ins().umin(i, last);
            em.row(b, &bases, i)
        })
        .collect();
    let ninf = splat_f32(b, f32::NEG_INFINITY);
    let zero = splat_f32(b, 0.0);
    b.def_var(em.m_var, ninf);
    b.def_var(em.l_var, zero);
    for r in 0..em.qrows {
        for c in 0..dv4 {
            b.ins().stack_store(I64, zero, em.o_slot, em.o_off(r, c));
        }
    }
    // run_head(r): while r < r_end; run_body: dispatch on the kind of run r.
    let run = em.iterate_runs(b, (table, runs_base), g, (run_head, run_body, group_fin));
    let (r, first, end, kind) = (run.index, run.first, run.end, run.kind);
    // One tile body per key-tile length (full tiles, the short last tile); a body serves
    // both its full and its partial runs through a runtime flag when the table has both.
    let tail_count = spec.n % KEY_TILE;
    let bodies: Vec<(bool, Masking, Block)> = [false, true]
        .into_iter()
        .filter_map(|tail| {
            let kind = |masked: bool| u32::from(masked) + 2 * u32::from(tail);
            let (full, partial) = (kinds.contains(&kind(false)), kinds.contains(&kind(true)));
            let blk = b.create_block();
            b.append_block_param(blk, I64);
            b.append_block_param(blk, I32);
            let masking = match (full, partial) {
                (false, false) => return None,
                (true, false) => Masking::Off,
                (false, true) => Masking::On,
                (true, true) => Masking::Flag(b.block_params(blk)[1]),
            };
            Some((tail, masking, blk))
        })
        .collect();
    // Kinds: bit 0 = partial (the mask applies), bit 1 = the short last tile.
    let flag = b.ins().band_imm_s(kind, 1);
    match bodies.as_slice() {
        [] => {
            b.ins().jump(run_next, &[]);
        }
        [(_, _, only)] => {
            b.ins().jump(*only, &[first.into(), flag.into()]);
        }
        [(_, _, full), (_, _, tail), ..] => {
            let is_tail = b
                .ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, kind, 2);
            b.ins().brif(
                is_tail,
                *tail,
                &[first.into(), flag.into()],
                *full,
                &[first.into(), flag.into()],
            );
        }
    }
    for &(tail, masking, blk) in &bodies {
        b.switch_to_block(blk);
        let t = b.block_params(blk)[0];
        let flag = b.block_params(blk)[1];
        let count = if tail { tail_count } else { KEY_TILE };
        em.tile(b, &bases, &rows, t, masking, count);
        if tail {
            b.ins().jump(run_next, &[]);
        } else {
            let t1 = b.ins().iadd_imm_s(t, 1);
            let again = b.ins().icmp(IntCC::UnsignedLessThan, t1, end);
            let cont = b.create_block();
            b.ins().brif(again, cont, &[], run_next, &[]);
            b.switch_to_block(cont);
            b.ins().jump(blk, &[t1.into(), flag.into()]);
        }
    }

    // run_next
    b.switch_to_block(run_next);
    let r1 = b.ins().iadd_imm_s(r, 1);
    b.ins().jump(run_head, &[r1.into()]);

    // group_fin: out_i = acc / l (zeros where l = 0) for the rows in [row_begin, row_end).
    b.switch_to_block(group_fin);
    let tile = QueryTile {
        g,
        i0,
        rows: em.qrows,
    };
    tile.finish(b, (rb, re), (group_head, exit), |b, r, i| {
        em.store_row(b, r, out_row0, i)
    });
}

/// The blocks of a fused attention function (the layout in the module docs), shared by the
/// exact and the int8 kernel.
pub(super) struct Skeleton {
    pub(super) entry: Block,
    pub(super) group_head: Block,
    pub(super) run_head: Block,
    pub(super) run_body: Block,
    pub(super) run_next: Block,
    pub(super) group_fin: Block,
    pub(super) exit: Block,
}

impl Skeleton {
    /// Creates the blocks: `entry` takes the function's parameters, `group_head` the query
    /// tile and `run_head` the run index (i64).
    pub(super) fn new(b: &mut FunctionBuilder) -> Skeleton {
        let k = Skeleton {
            entry: b.create_block(),
            group_head: b.create_block(),
            run_head: b.create_block(),
            run_body: b.create_block(),
            run_next: b.create_block(),
            group_fin: b.create_block(),
            exit: b.create_block(),
        };
        b.append_block_params_for_function_params(k.entry);
        b.append_block_param(k.group_head, I64);
        b.append_block_param(k.run_head, I64);
        k
    }

    /// Ends the entry block: jumps to the query tile holding row `rb` (or exits when
    /// `[rb, re)` is empty). Returns the table's address and that of its runs.
    pub(super) fn enter_groups(
        &self,
        b: &mut FunctionBuilder,
        spec: &AttentionSpec,
        (ptr, table_gv): (Type, GlobalValue),
        (rb, re): (Value, Value),
    ) -> (Value, Value) {
        let table = b.ins().symbol_value(ptr, table_gv);
        let groups = spec.m.div_ceil(QUERY_TILE) as i64;
        let runs_base = b.ins().iadd_imm_s(table, 8 * groups);
        let any = b.ins().icmp(IntCC::UnsignedLessThan, rb, re);
        let qt = b.ins().iconst(I64, QUERY_TILE as i64);
        let g0 = b.ins().udiv(rb, qt);
        b.ins()
            .brif(any, self.group_head, &[g0.into()], self.exit, &[]);
        (table, runs_base)
    }

    /// Starts `group_head`: the query tile `g`, its first row `i0` and the last row `m - 1`
    /// (rows past it are clamped to it: computed, not stored).
    pub(super) fn group_head(
        &self,
        b: &mut FunctionBuilder,
        spec: &AttentionSpec,
    ) -> (Value, Value, Value) {
        b.switch_to_block(self.group_head);
        let g = b.block_params(self.group_head)[0];
        let i0 = b.ins().imul_imm_s(g, QUERY_TILE as i64);
        let last = b.ins().iconst(I64, spec.m as i64 - 1);
        (g, i0, last)
    }
}

/// Declares a fused attention function over the tile table of `key_tile` keys, builds its
/// body with `emit(b, pointer type, table)` and defines it in source order.
pub(super) fn define_with_table(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    (key_tile, dot_product): (usize, bool),
    emit: impl FnOnce(&mut FunctionBuilder, Type, GlobalValue, &BTreeSet<u32>) -> Result<()>,
) -> Result<DefinedAttention> {
    let table = tile_table(spec, key_tile)?;
    let (func_id, mut ctx, table_gv) = declare(module, name, &table)?;
    let ptr = module.target_config().pointer_type();
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        emit(&mut b, ptr, table_gv, &table.kinds)?;
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let clif = ctx.func.display().to_string();
    let vcode = define_in_order(module, func_id, &mut ctx, name, dot_product)?;
    Ok(DefinedAttention {
        id: func_id,
        clif,
        vcode,
    })
}

/// One run of key tiles of the compile-time table (see [`Emitter::iterate_runs`]).
pub(super) struct Run {
    /// The run's index in the table (the `run_head` block parameter).
    pub(super) index: Value,
    /// Its first key tile and one past its last (i64).
    pub(super) first: Value,
    pub(super) end: Value,
    /// Its kind (i32): bit 0 partial, bit 1 the short last tile.
    pub(super) kind: Value,
}

impl Emitter<'_> {
    /// Loops over the runs the table lists for query tile `g`: jumps from the current block
    /// to `run_head`, which goes on to `run_body` while runs remain and to `group_fin` after
    /// the last; returns with the builder in `run_body`, where the run has been read. (The
    /// table is `[groups] (first run, run count)` u32 pairs, then `(first, end, kind)` runs.)
    pub(super) fn iterate_runs(
        &self,
        b: &mut FunctionBuilder,
        (table, runs_base): (Value, Value),
        g: Value,
        (run_head, run_body, group_fin): (Block, Block, Block),
    ) -> Run {
        let entry_p = self.offset(b, table, g, 8);
        let r0 = b.ins().uload32(mem().with_readonly(), entry_p, 0);
        let rc = b.ins().uload32(mem().with_readonly(), entry_p, 4);
        let r_end = b.ins().iadd(r0, rc);
        b.ins().jump(run_head, &[r0.into()]);
        b.switch_to_block(run_head);
        let r = b.block_params(run_head)[0];
        let more = b.ins().icmp(IntCC::UnsignedLessThan, r, r_end);
        b.ins().brif(more, run_body, &[], group_fin, &[]);
        b.switch_to_block(run_body);
        let rp = self.offset(b, runs_base, r, 12);
        Run {
            index: r,
            first: b.ins().uload32(mem().with_readonly(), rp, 0),
            end: b.ins().uload32(mem().with_readonly(), rp, 4),
            kind: b.ins().load(I32, mem().with_readonly(), rp, 8),
        }
    }
}

/// Query tile `g` (rows `i0 .. i0 + rows`) of a fused attention function, at its end.
pub(super) struct QueryTile {
    pub(super) g: Value,
    pub(super) i0: Value,
    pub(super) rows: usize,
}

impl QueryTile {
    /// Stores the tile's rows that lie in the call's row range `[rb, re)` with `store(b, r,
    /// i)` (row `r` of the tile is row `i`; the others were computed but belong to another
    /// call), then jumps to `group_head` with the next tile, or to `exit` past the range.
    pub(super) fn finish(
        &self,
        b: &mut FunctionBuilder,
        (rb, re): (Value, Value),
        (group_head, exit): (Block, Block),
        mut store: impl FnMut(&mut FunctionBuilder, usize, Value),
    ) {
        for r in 0..self.rows {
            let i = b.ins().iadd_imm_s(self.i0, r as i64);
            let lo = b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, rb);
            let hi = b.ins().icmp(IntCC::UnsignedLessThan, i, re);
            let mine = b.ins().band(lo, hi);
            let store_block = b.create_block();
            let next = b.create_block();
            b.ins().brif(mine, store_block, &[], next, &[]);
            b.switch_to_block(store_block);
            store(b, r, i);
            b.ins().jump(next, &[]);
            b.switch_to_block(next);
        }
        let g1 = b.ins().iadd_imm_s(self.g, 1);
        let next_i0 = b.ins().imul_imm_s(g1, QUERY_TILE as i64);
        let again = b.ins().icmp(IntCC::UnsignedLessThan, next_i0, re);
        b.ins().brif(again, group_head, &[g1.into()], exit, &[]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }
}

impl Emitter<'_> {
    /// The per-row state of query row `i` (i64): its q chunks (widened), aligned index, mask
    /// bounds and bias row pointers.
    pub(super) fn row(&self, b: &mut FunctionBuilder, bases: &Bases, i: Value) -> Row {
        let spec = self.spec;
        let q = self.row_ptr(b, &spec.q, bases.q, i);
        let ia = b.ins().iadd_imm_s(i, spec.n as i64 - spec.m as i64);
        let ia32 = b.ins().ireduce(I32, ia);
        let ia_v = b.ins().splat(I32X4, ia32);
        let mask = spec
            .mask
            .as_ref()
            .map(|p| RowMask::new(b, p, ia, spec.m, spec.n));
        let bias_rows = spec
            .biases
            .iter()
            .zip(&bases.biases)
            .map(|(t, &base)| {
                let p = self.row_ptr(b, t, base, i);
                if t.col_stride == 0 {
                    let x = self.load_scalar(b, p, t.dtype);
                    BiasRow::Splat(b.ins().splat(F32X4, x))
                } else {
                    BiasRow::Ptr(p)
                }
            })
            .collect();
        Row {
            q,
            ia_v,
            mask,
            bias_rows,
        }
    }

    /// Writes `acc / l` of query-tile row `r` to output row `i` (zeros where `l = 0`).
    fn store_row(&self, b: &mut FunctionBuilder, r: usize, out_row0: Value, i: Value) {
        let spec = self.spec;
        let l = b.use_var(self.l_var);
        let lsum = b.ins().extractlane(l, r as u8);
        let lv = b.ins().splat(F32X4, lsum);
        let zero = splat_f32(b, 0.0);
        let empty = b.ins().fcmp(FloatCC::Equal, lv, zero);
        let op = self.offset(b, out_row0, i, (spec.dv * 4) as i64);
        for c in 0..self.dv4 {
            let acc = b
                .ins()
                .stack_load(I64, F32X4, self.o_slot, self.o_off(r, c));
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
    }
}
