//! The int8 fused attention kernel ([`super::Precision::Int8`]): integer Q·Kᵀ and P·V with
//! `vpdpbusd`, online softmax in f32.
//!
//! It reads the packed buffer of [`super::quant`] (`inputs[0]`; biases follow at their slots)
//! and has the ABI of [`super::define_attention`]. Per query tile of [`QUERY_TILE`] rows and per
//! block of [`KEY_BLOCK`] keys (only the blocks the mask pattern reaches, from the same kind of
//! compile-time table as the exact kernel):
//!
//! 1. **Scores.** Per step of `SCORE_GROUPS` groups of 4 keys (two in masked blocks), per
//!    4 depths: one 16-byte K operand
//!    `[key][depth]` and, per row, a pre-broadcast Q operand (the 4 depths' bytes in every
//!    lane); `dot_u8i8` adds the four exact u8·i8 dot products into an i32x4 with one lane
//!    per key. Q has 16 bits in two bytes: the sums start at the keys' correction, the high
//!    bytes are summed over all depths, the sum shifted left by 8, then the low bytes added,
//!    which gives `q̂·k̂` exactly for two `vpdpbusd` per operand of K. When the score is
//!    `c · S` (`linear_scale`) the kernel stores `(q̂·k̂) s_k` and leaves `s_q c` to the
//!    exponential; otherwise it stores the score expression of `(q̂·k̂) s_q s_k`. Then the
//!    element mask (partial blocks) and `-inf` past the last key. The rows' block maxima are
//!    kept in memory, not in registers: the 12 accumulators, 3 K operands and a Q operand then
//!    fit the 16 vector registers with no spills.
//! 2. **Softmax.** For the 4 rows at once (one lane each): block maximum `b`, new running
//!    maximum `m`, `α = e^(m_old − m)` (O and `l` are rescaled only when some row's maximum
//!    moved, a few blocks per row) and `c = e^(b − m)`. Then, in one loop over the block's
//!    groups for all rows, `e = e^(s − b)` as `2^((s − b) · gain)` with
//!    `exp2_nonpos_fast`, and `P = round(255 e)` as u8, written pre-broadcast (16 bytes per
//!    4 keys) for stage 3; `l += c Σ e` in f32. P's scale is the block's exact maximum (255
//!    is reached), which per-column V scales make possible: no V factor is folded into P.
//! 3. **P·V.** Per group of 4 keys, per 4 value columns: the 16-byte V operand
//!    `[column][key]` against the row's P operand, into i32x4 accumulators (4 rows × 3 column
//!    vectors); at the end of the block `O += f32(A) (s_v e^(b − m) / 255)` with `s_v` the
//!    column vector's V scales of the block.
//!
//! At the end `out = O / l` (zeros where `l = 0`). Every integer is exact and every float
//! operation runs in a fixed order per row, whatever row range a call covers, so results are
//! bit-identical across thread counts and between the `vpdpbusd` and the plain-SIMD lowering
//! of `dot_u8i8`.
//!
//! Error sources (all relative to the element scale of the operand): K rounded to 255 levels
//! of its row's maximum, V to 255 levels of its (block, column) maximum, P to 256 levels of
//! its (row, block) maximum (about 0.5 % each for standard-normal inputs at d = 64, with
//! 32-key blocks), Q to 65535 levels (negligible); nothing else: the i32 sums are exact and
//! the softmax runs in f32. Together about 0.9 % relative L2 on standard-normal inputs.

use super::int8_ops::{
    dot_u8i8, exp2_nonpos_fast, hsum, lane_max, low_bytes_broadcast, shift_lanes_left_8,
    small_int_to_f32, ExpConsts, Group,
};
use super::quant::{QuantLayout, KEY_BLOCK};
use super::skeleton::{
    define_with_table, max_shift, mem, Bases, CallParams, Codegen, DefinedAttention, Emitter,
    QueryTile, Row, Skeleton,
};
use super::spec::{AttentionSpec, ScoreExpr, QUERY_TILE};
use crate::error::Result;
use crate::kernels::counted_loop;
use crate::simd::{
    const_f32x4, const_i32x4, select_f32, shuffle_f32x4, splat_f32, splat_i32, transpose4,
};
use attnc_ir::{BinaryOp, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    Block, GlobalValue, InstBuilder, StackSlot, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use cranelift_jit::JITModule;
use std::collections::BTreeSet;

/// i32x4 column vectors per P·V chunk (`QUERY_TILE × PV_VECS` accumulators).
const PV_VECS: usize = 3;

/// Groups of 4 keys per step of stage 1: `QUERY_TILE × SCORE_GROUPS` = 12 independent
/// accumulator chains. `vpdpbusd` has a latency of 5 cycles and issues 2 per cycle, so
/// fewer than 10 chains leave it waiting on its own results (8 chains ran stage 1 at
/// 80 % of the instruction's throughput); 12 accumulators, 3 K operands and a Q operand
/// fill the 16 vector registers.
const SCORE_GROUPS: usize = 3;

/// Whether [`Int8Emitter::for_each_group`] unrolls a whole block. The softmax loop is
/// unrolled (its body is short, and its loop overhead was a large share of it); the P·V loop
/// is not: unrolled, each of its chunks is 96 `vpdpbusd` trees, which made masked kernels
/// (two kinds of whole blocks) take about 50 ms to compile for a few percent of run time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unroll {
    WholeBlock,
    No,
}

/// Per-row state of a query tile.
struct RowState {
    row: Row,
    /// The row's pre-broadcast Q operands (high bytes, then low bytes 16·d4 further).
    q: Value,
    /// Address of the row's Q scale (f32).
    q_scale: Value,
}

/// `c` when the score expression is `c · S` with `c` a positive finite constant (the plain
/// `q·kᵀ / sqrt(d)`): then the kernel keeps scores in units of `1 / (c s_q log2 e)` and
/// applies that factor inside the exponential, where the softmax multiplies by `log2 e`
/// anyway (a positive factor changes no maximum).
fn linear_scale(e: &ScoreExpr) -> Option<f64> {
    fn scale(e: &ScoreExpr) -> Option<f64> {
        match e {
            ScoreExpr::Scores => Some(1.0),
            ScoreExpr::Unary(UnaryOp::Neg, a) => scale(a).map(|c| -c),
            ScoreExpr::Binary(BinaryOp::Mul, a, b) => match (&**a, &**b) {
                (x, ScoreExpr::Const(c)) | (ScoreExpr::Const(c), x) => scale(x).map(|s| s * c),
                _ => None,
            },
            ScoreExpr::Binary(BinaryOp::Div, a, b) => match &**b {
                ScoreExpr::Const(c) => scale(a).map(|s| s / c),
                _ => None,
            },
            _ => None,
        }
    }
    scale(e).filter(|&c| c > 0.0 && (c * std::f64::consts::LOG2_E) as f32 > f32::MIN_POSITIVE)
}

struct Int8Emitter<'s> {
    em: Emitter<'s>,
    layout: &'s QuantLayout,
    /// `c log2 e` when the score expression is `c · S` ([`linear_scale`]): stage 1 then
    /// stores `(q̂·k̂) s_k` and stage 2 multiplies by `s_q c log2 e`. `None`: stage 1 stores
    /// the scores themselves and stage 2 multiplies by `log2 e`.
    linear_gain: Option<f32>,
    /// Scores of the block: `[QUERY_TILE][KEY_BLOCK]` f32.
    s_slot: StackSlot,
    /// Quantized probabilities, each group of 4 keys pre-broadcast to 16 bytes:
    /// `[QUERY_TILE][KEY_BLOCK / 4][16]` u8.
    p_slot: StackSlot,
    /// Per row, `e^(block max − m) / 255` (the unit of P) of the block: `[QUERY_TILE]` f32.
    unit_slot: StackSlot,
    /// Per row, the factor from stored scores to log2 units (`[QUERY_TILE]` f32, one
    /// query tile): `s_q c log2 e` or `log2 e`, see [`Int8Emitter::linear_gain`].
    gain_slot: StackSlot,
    /// The same factors, each broadcast: `[QUERY_TILE]` f32x4.
    gain_bcast_slot: StackSlot,
    /// Per row, the block maximum (0 for an all `-inf` block), broadcast: `[QUERY_TILE]` f32x4.
    bmax_bcast_slot: StackSlot,
    /// Per row, the lane-wise maximum of the block's scores: `[QUERY_TILE]` f32x4. In memory
    /// rather than in variables so that stage 1 keeps all 16 vector registers.
    bmax_slot: StackSlot,
    /// Per row, the partial sums of `e^(s − m)`: `[QUERY_TILE]` f32x4 (also in memory).
    l_slot: StackSlot,
    /// Running maxima, lane `r` for row `r` (f32x4).
    m_var: Variable,
    /// P·V accumulators `[row][vec]`, reused by every chunk.
    a_vars: Vec<Vec<Variable>>,
}

impl Int8Emitter<'_> {
    fn spec(&self) -> &AttentionSpec {
        self.em.spec
    }

    fn o_off(&self, r: usize, c: usize) -> i32 {
        (16 * (r * self.em.dv4 + c)) as i32
    }

    /// Stage 1 for `valid.len()` (1 to [`SCORE_GROUPS`]) consecutive groups of 4 keys from
    /// key `j` (i64): raw scores, score expression, masks, stored to the `S` slot from group
    /// offset `gbytes` (i64), and the rows' block maxima. Group `k` has `valid[k]` real keys.
    /// The high bytes of Q are summed first, the accumulators shifted by 8 bits, then the
    /// low bytes added: the groups share every Q load.
    #[allow(clippy::too_many_arguments)]
    fn score_group(
        &self,
        b: &mut FunctionBuilder,
        rows: &[RowState],
        entry: Value,
        kg: Value,
        j: Value,
        gbytes: Value,
        masked: bool,
        valid: &[usize],
    ) {
        let qrows = self.em.qrows;
        let d4 = self.layout.d4;
        // Each group's sums start at its keys' correction, which the shift by 8 turns into
        // the full `-Q_OFFSET Σ k̂`: no per-row addition later.
        let mut accs: Vec<Vec<Value>> = (0..valid.len())
            .map(|k| {
                let jk = b.ins().iadd_imm_s(j, 4 * k as i64);
                let corr = self.key_lanes(b, entry, self.layout.k_corr, jk, I32X4);
                vec![corr; qrows]
            })
            .collect();
        for half in 0..2 {
            if half == 1 {
                for acc in accs.iter_mut().flatten() {
                    *acc = shift_lanes_left_8(b, *acc);
                }
            }
            for c in 0..d4 {
                let kv: Vec<Value> = (0..valid.len())
                    .map(|k| b.ins().load(I8X16, mem(), kg, (16 * (k * d4 + c)) as i32))
                    .collect();
                for (r, state) in rows.iter().enumerate() {
                    // Pre-broadcast in memory: a broadcast here would take a load into a
                    // general register and two shuffles (Cranelift folds a load into a
                    // splat only when the splat has a single use).
                    let off = (16 * (half * d4 + c)) as i32;
                    let qb = b.ins().load(I8X16, mem(), state.q, off);
                    for (acc, &k) in accs.iter_mut().zip(&kv) {
                        acc[r] = dot_u8i8(b, k, qb, acc[r]);
                    }
                }
            }
        }
        let mut smax: Vec<Option<Value>> = vec![None; qrows];
        for (k, (acc, &valid)) in accs.iter().zip(valid).enumerate() {
            let j = b.ins().iadd_imm_s(j, 4 * k as i64);
            let gbytes = b.ins().iadd_imm_s(gbytes, 16 * k as i64);
            let s = self.score_epilogue(b, rows, entry, acc, j, gbytes, masked, valid);
            for (m, s) in smax.iter_mut().zip(s) {
                *m = Some(match *m {
                    Some(m) => lane_max(b, s, m),
                    None => s,
                });
            }
        }
        for (r, m) in smax.into_iter().enumerate() {
            let m = m.expect("invariant: at least one group");
            let old = b
                .ins()
                .stack_load(I64, F32X4, self.bmax_slot, (16 * r) as i32);
            let m = lane_max(b, m, old);
            b.ins().stack_store(I64, m, self.bmax_slot, (16 * r) as i32);
        }
    }

    /// The 4 lanes of type `ty` at byte offset `section + 4 j` of the entry (a per-key array).
    fn key_lanes(
        &self,
        b: &mut FunctionBuilder,
        entry: Value,
        section: usize,
        j: Value,
        ty: Type,
    ) -> Value {
        let p = b.ins().iadd_imm_s(entry, section as i64);
        let o = b.ins().ishl_imm_s(j, 2);
        let p = b.ins().iadd(p, o);
        b.ins().load(ty, mem(), p, 0)
    }

    /// The scores of one group from its integer dot products `acc` (one per row).
    #[allow(clippy::too_many_arguments)]
    fn score_epilogue(
        &self,
        b: &mut FunctionBuilder,
        rows: &[RowState],
        entry: Value,
        acc: &[Value],
        j: Value,
        gbytes: Value,
        masked: bool,
        valid: usize,
    ) -> Vec<Value> {
        let k_scale = self.key_lanes(b, entry, self.layout.k_scale, j, F32X4);
        let j32 = b.ins().ireduce(I32, j);
        let jv = b.ins().splat(I32X4, j32);
        let steps = const_i32x4(b, [0, 1, 2, 3]);
        let jv = b.ins().iadd(jv, steps);
        let s_base = b.ins().stack_addr(I64, self.s_slot, 0);
        let s_at = b.ins().iadd(s_base, gbytes);
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let mut out = Vec::with_capacity(rows.len());
        for (r, state) in rows.iter().enumerate() {
            let f = b.ins().fcvt_from_sint(F32X4, acc[r]);
            let mut s = if self.linear_gain.is_some() {
                b.ins().fmul(f, k_scale)
            } else {
                // Loaded where used so that it folds into one broadcast from memory.
                let qs = b.ins().load(F32, mem(), state.q_scale, 0);
                let qs = b.ins().splat(F32X4, qs);
                let scale = b.ins().fmul(k_scale, qs);
                let raw = b.ins().fmul(f, scale);
                self.em
                    .score(b, &self.spec().score, raw, &state.row, j, jv, valid)
            };
            if masked {
                if let Some(rm) = &state.row.mask {
                    let keep = rm.keep(b, jv);
                    s = select_f32(b, keep, s, ninf);
                }
            }
            if valid < 4 {
                let keep = const_i32x4(b, std::array::from_fn(|l| -i32::from(l < valid)));
                s = select_f32(b, keep, s, ninf);
            }
            b.ins().store(mem(), s, s_at, (4 * r * KEY_BLOCK) as i32);
            out.push(s);
        }
        out
    }

    /// One block `t` (i64) of `count` keys (`masked`: evaluate the element mask).
    fn block(
        &self,
        b: &mut FunctionBuilder,
        rows: &[RowState],
        entry: Value,
        t: Value,
        masked: bool,
        count: usize,
    ) -> Result<()> {
        let layout = self.layout;
        let d4 = layout.d4;
        let qrows = self.em.qrows;
        let j0 = b.ins().imul_imm_s(t, KEY_BLOCK as i64);
        let k_block = b.ins().imul_imm_s(t, (KEY_BLOCK / 4 * d4 * 16) as i64);
        let k_block = b.ins().iadd(entry, k_block);
        let k_block = b.ins().iadd_imm_s(k_block, layout.k as i64);
        let full = count / 4;
        let zero = self.em.iconst(b, 0);
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        // All QUERY_TILE rows: stage 2 reads them as one 4 × 4 block.
        for r in 0..QUERY_TILE {
            b.ins()
                .stack_store(I64, ninf, self.bmax_slot, (16 * r) as i32);
        }
        // Stage 1: SCORE_GROUPS full groups at a time in a loop, then what is left (full
        // groups, a short last group of a tail block) unrolled.
        // Masked blocks (the few a mask cuts through) take the smaller step: its loop needs
        // no remainder code for a whole block, which keeps masked kernels quick to compile.
        let step = if masked { 2 } else { SCORE_GROUPS };
        let looped = full / step * step;
        let looped_c = self.em.iconst(b, looped as i64);
        counted_loop(b, zero, looped_c, step as i64, |b, g| {
            let kg = self.em.offset(b, k_block, g, (d4 * 16) as i64);
            let j4 = b.ins().ishl_imm_s(g, 2);
            let j = b.ins().iadd(j0, j4);
            let gbytes = b.ins().ishl_imm_s(g, 4);
            self.score_group(b, rows, entry, kg, j, gbytes, masked, &vec![4; step]);
            Ok(())
        })?;
        let groups = count.div_ceil(4);
        let mut rest: Vec<usize> = vec![4; full - looped];
        if groups > full {
            rest.push(count % 4);
        }
        // At most step - 1 full groups and a short one: one more call.
        if !rest.is_empty() {
            let g = looped;
            let kg = b.ins().iadd_imm_s(k_block, (g * d4 * 16) as i64);
            let j = b.ins().iadd_imm_s(j0, 4 * g as i64);
            let gbytes = self.em.iconst(b, 16 * g as i64);
            self.score_group(b, rows, entry, kg, j, gbytes, masked, &rest);
        }
        // Stage 2: softmax and P quantization.
        let p_base = b.ins().stack_addr(I64, self.p_slot, 0);
        let unit = self.softmax_update(b);
        self.quantize_probabilities(b, groups, p_base, unit)?;
        // Stage 3: P·V in chunks of PV_VECS column vectors.
        let v_group = (layout.dv_pad * 4) as i64;
        let v_block = b.ins().imul_imm_s(t, KEY_BLOCK as i64 / 4 * v_group);
        let v_block = b.ins().iadd(entry, v_block);
        let v_block = b.ins().iadd_imm_s(v_block, layout.v as i64);
        let vs_block = b.ins().imul_imm_s(t, (4 * layout.dv_pad) as i64);
        let vs_block = b.ins().iadd(entry, vs_block);
        let vs_block = b.ins().iadd_imm_s(vs_block, layout.v_scale as i64);
        let dv4 = self.em.dv4;
        for ch in 0..dv4.div_ceil(PV_VECS) {
            let vecs: Vec<usize> = (PV_VECS * ch..(PV_VECS * ch + PV_VECS).min(dv4)).collect();
            let zero_i = splat_i32(b, 0);
            for r in 0..qrows {
                for k in 0..vecs.len() {
                    b.def_var(self.a_vars[r][k], zero_i);
                }
            }
            self.for_each_group(b, groups, Unroll::No, |b, g| {
                let vg = g.addr(b, v_block, v_group);
                let vv: Vec<Value> = vecs
                    .iter()
                    .map(|&c| b.ins().load(I8X16, mem(), vg, (16 * c) as i32))
                    .collect();
                let pg = g.addr(b, p_base, 16);
                for r in 0..qrows {
                    let pb = b.ins().load(I8X16, mem(), pg, (r * KEY_BLOCK * 4) as i32);
                    for (k, &v) in vv.iter().enumerate() {
                        let a = b.use_var(self.a_vars[r][k]);
                        let a = dot_u8i8(b, v, pb, a);
                        b.def_var(self.a_vars[r][k], a);
                    }
                }
                Ok(())
            })?;
            // O += f32(A) · (column scales · unit of the row).
            let scales: Vec<Value> = vecs
                .iter()
                .map(|&c| b.ins().load(F32X4, mem(), vs_block, (16 * c) as i32))
                .collect();
            // Through one base address: stack_load/stack_store would each recompute it.
            let o_base = b.ins().stack_addr(I64, self.em.o_slot, 0);
            let unit_base = b.ins().stack_addr(I64, self.unit_slot, 0);
            for r in 0..qrows {
                let unit = b.ins().load(F32, mem(), unit_base, (4 * r) as i32);
                let unit = b.ins().splat(F32X4, unit);
                for (k, &c) in vecs.iter().enumerate() {
                    let a = b.use_var(self.a_vars[r][k]);
                    let af = small_int_to_f32(b, a);
                    let w = b.ins().fmul(scales[k], unit);
                    let o = b.ins().load(F32X4, mem(), o_base, self.o_off(r, c));
                    let o = b.ins().fma(af, w, o);
                    b.ins().store(mem(), o, o_base, self.o_off(r, c));
                }
            }
        }
        Ok(())
    }

    /// `body(g)` for the groups `0..groups` of a block: straight-line code for a whole block
    /// when `unroll` says so (constant offsets, no loop counter), else a counted loop.
    fn for_each_group(
        &self,
        b: &mut FunctionBuilder,
        groups: usize,
        unroll: Unroll,
        mut body: impl FnMut(&mut FunctionBuilder, Group) -> Result<()>,
    ) -> Result<()> {
        if unroll == Unroll::WholeBlock && groups == KEY_BLOCK / 4 {
            for g in 0..groups {
                body(b, Group::Const(g))?;
            }
            Ok(())
        } else {
            let zero = self.em.iconst(b, 0);
            let end = self.em.iconst(b, groups as i64);
            counted_loop(b, zero, end, 1, |b, g| body(b, Group::Counter(g)))
        }
    }

    /// Stores the rows' gains (see `gain_slot`) for the query tile. A gain that is 0 (an
    /// all-zero Q row, all its scores 0) is raised to the least normal f32 so that -inf
    /// scores stay -inf.
    fn store_gains(&self, b: &mut FunctionBuilder, rows: &[RowState]) {
        let gain = match self.linear_gain {
            Some(g) => {
                let mut v = splat_f32(b, 0.0);
                for (r, state) in rows.iter().enumerate() {
                    let qs = b.ins().load(F32, mem(), state.q_scale, 0);
                    v = b.ins().insertlane(v, qs, r as u8);
                }
                let g = const_f32x4(b, g);
                let gain = b.ins().fmul(v, g);
                let tiny = const_f32x4(b, f32::MIN_POSITIVE);
                let ok = b.ins().fcmp(FloatCC::GreaterThan, gain, tiny);
                select_f32(b, ok, gain, tiny)
            }
            None => const_f32x4(b, std::f32::consts::LOG2_E),
        };
        b.ins().stack_store(I64, gain, self.gain_slot, 0);
        for r in 0..rows.len() {
            let lane = r as u8;
            let v = shuffle_f32x4(b, gain, gain, [lane; 4]);
            b.ins()
                .stack_store(I64, v, self.gain_bcast_slot, (16 * r) as i32);
        }
    }

    /// The per-block softmax bookkeeping of all rows at once (lane `r` is row `r`): the new
    /// running maxima, `O` and `l` rescaled where a row's maximum moved, the unit of P
    /// (`unit_slot`) and each row's block maximum (`bmax_bcast_slot`, pre-broadcast).
    /// Returns the unit `e^(block max − m) / 255` per row: the factor from P's block scale
    /// to the running one.
    fn softmax_update(&self, b: &mut FunctionBuilder) -> Value {
        let ec = ExpConsts::new(b, 1.0);
        let lane_max: Vec<Value> = (0..QUERY_TILE)
            .map(|r| {
                b.ins()
                    .stack_load(I64, F32X4, self.bmax_slot, (16 * r) as i32)
            })
            .collect();
        let [t0, t1, t2, t3] = transpose4(b, lane_max[0], lane_max[1], lane_max[2], lane_max[3]);
        let x = max_shift(b, t0, t1);
        let y = max_shift(b, t2, t3);
        let block_max = max_shift(b, x, y);
        let m_old = b.use_var(self.m_var);
        let m_new = max_shift(b, block_max, m_old);
        b.def_var(self.m_var, m_new);
        // While every score so far is -inf, subtract 0 instead (no NaN from -inf - -inf);
        // the same for a block whose scores are all -inf.
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let zero = splat_f32(b, 0.0);
        let none = b.ins().fcmp(FloatCC::Equal, m_new, ninf);
        let m_use = select_f32(b, none, zero, m_new);
        let empty = b.ins().fcmp(FloatCC::Equal, block_max, ninf);
        let b_use = select_f32(b, empty, zero, block_max);
        let gain = b.ins().stack_load(I64, F32X4, self.gain_slot, 0);
        // α = e^(m_old − m) and c = e^(block max − m), in log2 units.
        let da = b.ins().fsub(m_old, m_use);
        let da = b.ins().fmul(da, gain);
        let alpha = exp2_nonpos_fast(b, &ec, da);
        let db = b.ins().fsub(block_max, m_use);
        let db = b.ins().fmul(db, gain);
        let c = exp2_nonpos_fast(b, &ec, db);
        let inv255 = const_f32x4(b, 1.0 / 255.0);
        let unit = b.ins().fmul(c, inv255);
        b.ins().stack_store(I64, unit, self.unit_slot, 0);
        for r in 0..self.em.qrows {
            let lane = r as u8;
            let v = shuffle_f32x4(b, b_use, b_use, [lane; 4]);
            b.ins()
                .stack_store(I64, v, self.bmax_bcast_slot, (16 * r) as i32);
        }
        // O and l are rescaled only when some row's running maximum moved: a few blocks
        // per row. Rows whose maximum stayed are multiplied by exactly 1.
        let moved = b.ins().fcmp(FloatCC::NotEqual, m_old, m_new);
        let any = b.ins().vany_true(moved);
        let rescale = b.create_block();
        let go_on = b.create_block();
        b.ins().brif(any, rescale, &[], go_on, &[]);
        b.switch_to_block(rescale);
        let one = splat_f32(b, 1.0);
        let alpha = select_f32(b, moved, alpha, one);
        for r in 0..self.em.qrows {
            let lane = r as u8;
            let alpha_r = shuffle_f32x4(b, alpha, alpha, [lane; 4]);
            let l = b.ins().stack_load(I64, F32X4, self.l_slot, (16 * r) as i32);
            let l = b.ins().fmul(l, alpha_r);
            b.ins().stack_store(I64, l, self.l_slot, (16 * r) as i32);
            for cv in 0..self.em.dv4 {
                let o = b
                    .ins()
                    .stack_load(I64, F32X4, self.em.o_slot, self.o_off(r, cv));
                let o = b.ins().fmul(o, alpha_r);
                b.ins()
                    .stack_store(I64, o, self.em.o_slot, self.o_off(r, cv));
            }
        }
        b.ins().jump(go_on, &[]);
        b.switch_to_block(go_on);
        unit
    }

    /// `P = round(255 e^(s − block max))` for every row and group of the block (`groups`
    /// groups of 4 keys), written pre-broadcast to the P slot at `p_base`; `l += c Σ e`.
    /// The rows share one loop, so the constants are loaded once per group.
    fn quantize_probabilities(
        &self,
        b: &mut FunctionBuilder,
        groups: usize,
        p_base: Value,
        unit: Value,
    ) -> Result<()> {
        let qrows = self.em.qrows;
        // e is computed as 255 e^(s − block max) directly: P = round(e) needs no product.
        let ec = ExpConsts::new(b, 255.0);
        let s_base = b.ins().stack_addr(I64, self.s_slot, 0);
        let gb_base = b.ins().stack_addr(I64, self.gain_bcast_slot, 0);
        let bmax_base = b.ins().stack_addr(I64, self.bmax_bcast_slot, 0);
        let sums: Vec<Variable> = (0..qrows).map(|_| b.declare_var(F32X4)).collect();
        let zero_f = splat_f32(b, 0.0);
        for &sum in &sums {
            b.def_var(sum, zero_f);
        }
        self.for_each_group(b, groups, Unroll::WholeBlock, |b, g| {
            let s_at = g.addr(b, s_base, 16);
            let p_at = g.addr(b, p_base, 16);
            for (r, &sum) in sums.iter().enumerate() {
                let off = (4 * r * KEY_BLOCK) as i32;
                let s = b.ins().load(F32X4, mem(), s_at, off);
                let gain = b.ins().load(F32X4, mem(), gb_base, (16 * r) as i32);
                // e^(s − block max) = 2^((s − block max) gain). The difference is exactly
                // 0 at the maximum and never positive, so P never exceeds 255.
                let bmax = b.ins().load(F32X4, mem(), bmax_base, (16 * r) as i32);
                let d = b.ins().fsub(s, bmax);
                let t = b.ins().fmul(d, gain);
                let e = exp2_nonpos_fast(b, &ec, t);
                let acc = b.use_var(sum);
                let acc = b.ins().fadd(acc, e);
                b.def_var(sum, acc);
                // round(e) in [0, 255]: adding MAGIC rounds to nearest even and leaves the
                // integer in the low byte (cheaper than a saturating conversion; NaN lanes
                // give garbage bytes, never a fault). One byte shuffle gathers the 4 bytes
                // into every 32-bit lane: the broadcast operand of stage 3.
                let x = b.ins().fadd(e, ec.magic);
                let bytes = low_bytes_broadcast(b, x);
                b.ins().store(mem(), bytes, p_at, off);
            }
            Ok(())
        })?;
        // l += unit Σ 255 e^(s − block max), lane-wise.
        for (r, &sum) in sums.iter().enumerate() {
            let lane = r as u8;
            let acc = b.use_var(sum);
            let cv = shuffle_f32x4(b, unit, unit, [lane; 4]);
            let l = b.ins().stack_load(I64, F32X4, self.l_slot, (16 * r) as i32);
            let l = b.ins().fma(acc, cv, l);
            b.ins().stack_store(I64, l, self.l_slot, (16 * r) as i32);
        }
        Ok(())
    }

    /// Writes `O / l` of query-tile row `r` to output row `i` (zeros where `l = 0`).
    fn store_row(&self, b: &mut FunctionBuilder, r: usize, out_row0: Value, i: Value) {
        let spec = self.spec();
        let l = b.ins().stack_load(I64, F32X4, self.l_slot, (16 * r) as i32);
        let l = hsum(b, l);
        let lv = b.ins().splat(F32X4, l);
        let zero = splat_f32(b, 0.0);
        let empty = b.ins().fcmp(FloatCC::Equal, lv, zero);
        let op = self.em.offset(b, out_row0, i, (spec.dv * 4) as i64);
        for c in 0..self.em.dv4 {
            let acc = b
                .ins()
                .stack_load(I64, F32X4, self.em.o_slot, self.o_off(r, c));
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

/// Defines the int8 kernel of `spec` as function `name` (see the module docs and
/// [`super::define_attention_with`]).
pub(super) fn define_int8(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    codegen: Codegen,
) -> Result<DefinedAttention> {
    let layout = QuantLayout::new(spec);
    define_with_table(
        module,
        spec,
        name,
        (KEY_BLOCK, codegen),
        |b, ptr, table_gv, kinds| emit_body(b, spec, &layout, ptr, table_gv, kinds),
    )
}

fn emit_body(
    b: &mut FunctionBuilder,
    spec: &AttentionSpec,
    layout: &QuantLayout,
    ptr: Type,
    table_gv: GlobalValue,
    kinds: &BTreeSet<u32>,
) -> Result<()> {
    let dv4 = spec.dv.div_ceil(4);
    let slot = |b: &mut FunctionBuilder, bytes: usize| {
        let size = u32::try_from(bytes.max(16)).unwrap_or(u32::MAX);
        b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4))
    };
    let qrows = QUERY_TILE.min(spec.m).max(1);
    let em = Emitter {
        spec,
        d4: layout.d4,
        dv4,
        qrows,
        m_var: b.declare_var(F32X4),
        l_var: b.declare_var(F32X4),
        o_slot: slot(b, 16 * QUERY_TILE * dv4),
        p_slot: slot(b, 16),
    };
    let ie = Int8Emitter {
        linear_gain: linear_scale(&spec.score).map(|c| (c * std::f64::consts::LOG2_E) as f32),
        s_slot: slot(b, 4 * QUERY_TILE * KEY_BLOCK),
        p_slot: slot(b, 4 * QUERY_TILE * KEY_BLOCK),
        unit_slot: slot(b, 4 * QUERY_TILE),
        bmax_slot: slot(b, 16 * QUERY_TILE),
        l_slot: slot(b, 16 * QUERY_TILE),
        gain_slot: slot(b, 16),
        gain_bcast_slot: slot(b, 16 * QUERY_TILE),
        bmax_bcast_slot: slot(b, 16 * QUERY_TILE),
        m_var: b.declare_var(F32X4),
        a_vars: (0..qrows)
            .map(|_| (0..PV_VECS).map(|_| b.declare_var(I32X4)).collect())
            .collect(),
        em,
        layout,
    };
    let em = &ie.em;
    let k = Skeleton::new(b);
    let (group_head, run_head, run_body, run_next, group_fin, exit) = (
        k.group_head,
        k.run_head,
        k.run_body,
        k.run_next,
        k.group_fin,
        k.exit,
    );

    b.switch_to_block(k.entry);
    let call = CallParams::read(b, spec, k.entry);
    let (inputs, out, bidx, rb, re) = (call.inputs, call.out, call.bidx, call.rb, call.re);
    let packed = b.ins().load(ptr, mem(), inputs, 0);
    let entry = em.offset(b, packed, bidx, layout.entry as i64);
    let bases = Bases {
        q: entry,
        k: entry,
        v: entry,
        biases: spec
            .biases
            .iter()
            .map(|t| call.base_of(b, ptr, t))
            .collect(),
    };
    let out_row0 = em.offset(b, out, bidx, (spec.m * spec.dv * 4) as i64);
    let (table, runs_base) = k.enter_groups(b, spec, (ptr, table_gv), (rb, re));

    // group_head(g): the query tile's rows (clamped to m - 1, computed but not stored).
    let (g, i0, last) = k.group_head(b, spec);
    let q_rows = b.ins().iadd_imm_s(entry, layout.q as i64);
    let q_scales = b.ins().iadd_imm_s(entry, layout.q_scale as i64);
    let rows: Vec<RowState> = (0..qrows)
        .map(|k| {
            let i = b.ins().iadd_imm_s(i0, k as i64);
            let i = b.ins().umin(i, last);
            let row = em.row(b, &bases, i);
            let q = em.offset(b, q_rows, i, (2 * 16 * layout.d4) as i64);
            let q_scale = em.offset(b, q_scales, i, 4);
            RowState { row, q, q_scale }
        })
        .collect();
    let ninf = splat_f32(b, f32::NEG_INFINITY);
    b.def_var(ie.m_var, ninf);
    ie.store_gains(b, &rows);
    let zero = splat_f32(b, 0.0);
    for r in 0..qrows {
        b.ins().stack_store(I64, zero, ie.l_slot, (16 * r) as i32);
        for c in 0..dv4 {
            b.ins().stack_store(I64, zero, em.o_slot, ie.o_off(r, c));
        }
    }
    // run_body: dispatch on the kind of run r (0 full, 1 partial, 2/3 their tails).
    let run = em.iterate_runs(b, (table, runs_base), g, (run_head, run_body, group_fin));
    let (r, first, end, kind) = (run.index, run.first, run.end, run.kind);
    let kinds: Vec<u32> = kinds.iter().copied().collect();
    let targets: Vec<Block> = kinds
        .iter()
        .map(|_| {
            let blk = b.create_block();
            b.append_block_param(blk, I64);
            blk
        })
        .collect();
    if kinds.is_empty() {
        b.ins().jump(run_next, &[]);
    }
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
    let tail_count = spec.n % KEY_BLOCK;
    for (n, &k) in kinds.iter().enumerate() {
        let blk = targets[n];
        b.switch_to_block(blk);
        let t = b.block_params(blk)[0];
        let (masked, tail) = (k == 1 || k == 3, k >= 2);
        let count = if tail { tail_count } else { KEY_BLOCK };
        ie.block(b, &rows, entry, t, masked, count)?;
        if tail {
            b.ins().jump(run_next, &[]);
        } else {
            let t1 = b.ins().iadd_imm_s(t, 1);
            let again = b.ins().icmp(IntCC::UnsignedLessThan, t1, end);
            let cont = b.create_block();
            b.ins().brif(again, cont, &[], run_next, &[]);
            b.switch_to_block(cont);
            b.ins().jump(blk, &[t1.into()]);
        }
    }

    b.switch_to_block(run_next);
    let r1 = b.ins().iadd_imm_s(r, 1);
    b.ins().jump(run_head, &[r1.into()]);

    // group_fin: rows inside [row_begin, row_end) are stored.
    b.switch_to_block(group_fin);
    let tile = QueryTile { g, i0, rows: qrows };
    tile.finish(b, (rb, re), (group_head, exit), |b, r, i| {
        ie.store_row(b, r, out_row0, i)
    });
    Ok(())
}
