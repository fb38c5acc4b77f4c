//! The int8 fused attention kernel ([`super::Precision::Int8`]): integer Q·Kᵀ and P·V with
//! `vpdpbusd`, online softmax in f32.
//!
//! It reads the packed buffer of [`super::quant`] (`inputs[0]`; biases follow at their slots)
//! and has the ABI of [`super::define_attention`]. Per query tile of [`QUERY_TILE`] rows and per
//! block of [`KEY_BLOCK`] keys (only the blocks the mask pattern reaches, from the same kind of
//! compile-time table as the exact kernel):
//!
//! 1. **Scores.** Per pair of groups of 4 keys, per 4 depths: one 16-byte K operand
//!    `[key][depth]` and, per row, a pre-broadcast Q operand (the 4 depths' bytes in every
//!    lane); [`dot_u8i8`] adds the four exact u8·i8 dot products into an i32x4 with one lane
//!    per key. Q has 16 bits in two bytes: the high bytes are summed over all depths, the sum
//!    shifted left by 8, then the low bytes added, so Q costs two `vpdpbusd` per operand of
//!    K. Adding the per-key correction gives `q̂·k̂` exactly; `s = (q̂·k̂) s_q s_k` in f32,
//!    then the score expression, the element mask (partial blocks) and `-inf` past the last
//!    key. The rows' block maxima are kept in memory, not in registers: the 8 accumulators,
//!    2 K operands and a Q operand then fit the 16 vector registers with no spills.
//! 2. **Softmax.** Per row: block maximum `b`, new running maximum `m`, `α = e^(m_old − m)`
//!    (O and `l` are rescaled only when `α ≠ 1`, a few blocks per row), `e = e^(s − b)` and
//!    `P = round(255 e)` as u8, written pre-broadcast (16 bytes per 4 keys) for stage 3;
//!    `l += e^(b − m) Σ e` in f32. P's scale is the block's exact maximum (255 is reached),
//!    which per-column V scales make possible: no V factor is folded into P.
//! 3. **P·V.** Per group of 4 keys, per 4 value columns: the 16-byte V operand
//!    `[column][key]` against the row's P operand, into i32x4 accumulators (4 rows × 3 column
//!    vectors); at the end of the block `O += f32(A) (s_v e^(b − m) / 255)` with `s_v` the
//!    column vector's V scales of the block.
//!
//! At the end `out = O / l` (zeros where `l = 0`). Every integer is exact and every float
//! operation runs in a fixed order per row, whatever row range a call covers, so results are
//! bit-identical across thread counts and between the `vpdpbusd` and the plain-SIMD lowering
//! of [`dot_u8i8`].
//!
//! Error sources (all relative to the element scale of the operand): K rounded to 255 levels
//! of its row's maximum, V to 255 levels of its (block, column) maximum, P to 256 levels of
//! its (row, block) maximum (about 0.5 % each for standard-normal inputs at d = 64, with
//! 32-key blocks), Q to 65535 levels (negligible); nothing else: the i32 sums are exact and
//! the softmax runs in f32. Together about 0.9 % relative L2 on standard-normal inputs.

use super::codegen::{
    define_with_table, max_shift, mem, Bases, CallParams, DefinedAttention, Emitter, QueryTile,
    Row, Skeleton,
};
use super::quant::{QuantLayout, KEY_BLOCK};
use super::{AttentionSpec, QUERY_TILE};
use crate::error::Result;
use crate::kernels::counted_loop;
use crate::simd::{
    as_float, as_int, const_f32x4, const_i32x4, select_f32, shuffle_f32x4, splat_f32, splat_i32,
};
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

/// `acc + dot4(a, u)`: lane `l` adds `Σ_t a[4l+t] · u[4l+t]` with `a` signed and `u` unsigned
/// bytes (i8x16 both), exactly (products fit i16, sums wrap like the instruction's).
///
/// This is the tree Cranelift's x64 backend folds into one `vpdpbusd` when the ISA has
/// AVX-VNNI (or AVX512-VNNI); instruction selection matches it, so it folds with the mid-end
/// optimizer off too. Without VNNI it lowers to widening multiplies and pairwise adds.
pub fn dot_u8i8(b: &mut FunctionBuilder, a: Value, u: Value, acc: Value) -> Value {
    let al = b.ins().swiden_low(a);
    let ul = b.ins().uwiden_low(u);
    let lo = b.ins().imul(al, ul);
    let ah = b.ins().swiden_high(a);
    let uh = b.ins().uwiden_high(u);
    let hi = b.ins().imul(ah, uh);
    let lo0 = b.ins().swiden_low(lo);
    let lo1 = b.ins().swiden_high(lo);
    let x = b.ins().iadd_pairwise(lo0, lo1);
    let hi0 = b.ins().swiden_low(hi);
    let hi1 = b.ins().swiden_high(hi);
    let y = b.ins().iadd_pairwise(hi0, hi1);
    let s = b.ins().iadd_pairwise(x, y);
    b.ins().iadd(s, acc)
}

/// The maximum of the four lanes (`max_shift` order), as a scalar.
fn hmax(b: &mut FunctionBuilder, v: Value) -> Value {
    let s = shuffle_f32x4(b, v, v, [2, 3, 0, 1]);
    let m = max_shift(b, v, s);
    let s = shuffle_f32x4(b, m, m, [1, 0, 3, 2]);
    let m = max_shift(b, m, s);
    b.ins().extractlane(m, 0)
}

/// The sum of the four lanes `(x0 + x1) + (x2 + x3)`, as a scalar.
fn hsum(b: &mut FunctionBuilder, v: Value) -> Value {
    let x: Vec<Value> = (0..4).map(|l| b.ins().extractlane(v, l as u8)).collect();
    let s01 = b.ins().fadd(x[0], x[1]);
    let s23 = b.ins().fadd(x[2], x[3]);
    b.ins().fadd(s01, s23)
}

/// Per-row state of a query tile.
struct RowState {
    row: Row,
    /// The row's pre-broadcast Q operands (high bytes, then low bytes 16·d4 further).
    q: Value,
    /// Address of the row's Q scale (f32).
    q_scale: Value,
}

/// Constants of [`exp_nonpos_fast`] and of P's rounding, materialized once per block so that
/// the softmax loop does not reload them.
struct ExpConsts {
    log2e: Value,
    low: Value,
    magic: Value,
    poly: [Value; 5],
    bias: Value,
    magic_bits: Value,
    c255: Value,
}

impl ExpConsts {
    fn new(b: &mut FunctionBuilder) -> ExpConsts {
        const MAGIC: f32 = 12_582_912.0;
        let ln2 = std::f32::consts::LN_2;
        let poly = [
            ln2.powi(4) / 24.0,
            ln2.powi(3) / 6.0,
            ln2 * ln2 / 2.0,
            ln2,
            1.0,
        ];
        ExpConsts {
            log2e: const_f32x4(b, std::f32::consts::LOG2_E),
            low: const_f32x4(b, -127.0),
            magic: const_f32x4(b, MAGIC),
            poly: poly.map(|c| const_f32x4(b, c)),
            bias: const_i32x4(b, [(MAGIC.to_bits() as i32).wrapping_sub(127); 4]),
            magic_bits: const_i32x4(b, [MAGIC.to_bits() as i32; 4]),
            c255: const_f32x4(b, 255.0),
        }
    }
}

/// `e^x` for f32x4 `x ≤ 0` (or `-inf`) to about 4e-5 relative, in 13 instructions: plenty for
/// weights that are rounded to 8 bits next. `2^t` with `t = x log2 e` split as `k + f`
/// (`|f| ≤ 1/2`, `k` by the `1.5 · 2^23` rounding trick), `2^f` by its degree-4 Taylor
/// polynomial, `2^k` from exponent bits. `t` is clamped to `-127` first, where `k = -127`
/// gives the exponent field 0 and so exactly 0 (also for `-inf`), with no select.
fn exp_nonpos_fast(b: &mut FunctionBuilder, c: &ExpConsts, x: Value) -> Value {
    let t = b.ins().fmul(x, c.log2e);
    let under = b.ins().fcmp(FloatCC::LessThan, t, c.low);
    let tc = select_f32(b, under, c.low, t);
    let tm = b.ins().fadd(tc, c.magic);
    let kf = b.ins().fsub(tm, c.magic);
    let f = b.ins().fsub(tc, kf);
    let mut p = c.poly[0];
    for &cv in &c.poly[1..] {
        p = b.ins().fma(p, f, cv);
    }
    // bits(tm) - bits(MAGIC) = k; (k + 127) << 23 = 2^k.
    let tb = as_int(b, tm);
    let e = b.ins().isub(tb, c.bias);
    let e = b.ins().ishl_imm_u(e, 23);
    let scale = as_float(b, e);
    b.ins().fmul(p, scale)
}

struct Int8Emitter<'s> {
    em: Emitter<'s>,
    layout: &'s QuantLayout,
    /// Scores of the block: `[QUERY_TILE][KEY_BLOCK]` f32.
    s_slot: StackSlot,
    /// Quantized probabilities, each group of 4 keys pre-broadcast to 16 bytes:
    /// `[QUERY_TILE][KEY_BLOCK / 4][16]` u8.
    p_slot: StackSlot,
    /// Per row, `e^(block max − m) / 255` (the unit of P) of the block: `[QUERY_TILE]` f32.
    unit_slot: StackSlot,
    /// Per row, the lane-wise maximum of the block's scores: `[QUERY_TILE]` f32x4. In memory
    /// rather than in variables so that stage 1 keeps all 16 vector registers.
    bmax_slot: StackSlot,
    /// Per row, the partial sums of `e^(s − m)`: `[QUERY_TILE]` f32x4 (also in memory).
    l_slot: StackSlot,
    /// Running maximum (f32) per row.
    m_vars: Vec<Variable>,
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

    /// Stage 1 for `valid.len()` (1 or 2) consecutive groups of 4 keys from key `j` (i64):
    /// raw scores, score expression, masks, stored to the `S` slot from group offset
    /// `gbytes` (i64), and the rows' block maxima. Group `k` has `valid[k]` real keys.
    /// The high bytes of Q are summed first, the accumulators shifted by 8 bits, then the
    /// low bytes added: two groups share every Q load (8 accumulators, 2 K operands and a
    /// Q operand in registers).
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
        let zero = splat_i32(b, 0);
        let mut accs = vec![vec![zero; qrows]; valid.len()];
        for half in 0..2 {
            if half == 1 {
                for acc in accs.iter_mut().flatten() {
                    *acc = b.ins().ishl_imm_u(*acc, 8);
                }
            }
            for c in 0..d4 {
                let kv: Vec<Value> = (0..valid.len())
                    .map(|k| b.ins().load(I8X16, mem(), kg, (16 * (k * d4 + c)) as i32))
                    .collect();
                for (r, state) in rows.iter().enumerate() {
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
                    Some(m) => max_shift(b, s, m),
                    None => s,
                });
            }
        }
        for (r, m) in smax.into_iter().enumerate() {
            let m = m.expect("invariant: at least one group");
            let old = b
                .ins()
                .stack_load(I64, F32X4, self.bmax_slot, (16 * r) as i32);
            let m = max_shift(b, m, old);
            b.ins().stack_store(I64, m, self.bmax_slot, (16 * r) as i32);
        }
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
        let at = |b: &mut FunctionBuilder, off: usize, ty: Type| {
            let p = b.ins().iadd_imm_s(entry, off as i64);
            let o = b.ins().ishl_imm_s(j, 2);
            let p = b.ins().iadd(p, o);
            b.ins().load(ty, mem(), p, 0)
        };
        let corr = at(b, self.layout.k_corr, I32X4);
        let k_scale = at(b, self.layout.k_scale, F32X4);
        let j32 = b.ins().ireduce(I32, j);
        let jv = b.ins().splat(I32X4, j32);
        let steps = const_i32x4(b, [0, 1, 2, 3]);
        let jv = b.ins().iadd(jv, steps);
        let s_base = b.ins().stack_addr(I64, self.s_slot, 0);
        let s_at = b.ins().iadd(s_base, gbytes);
        let ninf = splat_f32(b, f32::NEG_INFINITY);
        let mut out = Vec::with_capacity(rows.len());
        for (r, state) in rows.iter().enumerate() {
            let x = b.ins().iadd(acc[r], corr);
            let f = b.ins().fcvt_from_sint(F32X4, x);
            // Loaded where used so that it folds into one broadcast from memory.
            let qs = b.ins().load(F32, mem(), state.q_scale, 0);
            let qs = b.ins().splat(F32X4, qs);
            let scale = b.ins().fmul(k_scale, qs);
            let raw = b.ins().fmul(f, scale);
            let mut s = self
                .em
                .score(b, &self.spec().score, raw, &state.row, j, jv, valid);
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
        for r in 0..qrows {
            b.ins()
                .stack_store(I64, ninf, self.bmax_slot, (16 * r) as i32);
        }
        // Stage 1: pairs of full groups in a loop, then what is left (an odd full group, a
        // short last group of a tail block) unrolled.
        let pairs_c = self.em.iconst(b, (full / 2 * 2) as i64);
        counted_loop(b, zero, pairs_c, 2, |b, g| {
            let kg = self.em.offset(b, k_block, g, (d4 * 16) as i64);
            let j4 = b.ins().ishl_imm_s(g, 2);
            let j = b.ins().iadd(j0, j4);
            let gbytes = b.ins().ishl_imm_s(g, 4);
            self.score_group(b, rows, entry, kg, j, gbytes, masked, &[4, 4]);
            Ok(())
        })?;
        let groups = count.div_ceil(4);
        let mut rest: Vec<usize> = Vec::new();
        if full % 2 == 1 {
            rest.push(4);
        }
        if groups > full {
            rest.push(count % 4);
        }
        if !rest.is_empty() {
            let g = full / 2 * 2;
            let kg = b.ins().iadd_imm_s(k_block, (g * d4 * 16) as i64);
            let j = b.ins().iadd_imm_s(j0, 4 * g as i64);
            let gbytes = self.em.iconst(b, 16 * g as i64);
            self.score_group(b, rows, entry, kg, j, gbytes, masked, &rest);
        }
        let groups_c = self.em.iconst(b, groups as i64);
        // Stage 2: softmax and P quantization, per row, in one pass over the block.
        let s_base = b.ins().stack_addr(I64, self.s_slot, 0);
        let p_base = b.ins().stack_addr(I64, self.p_slot, 0);
        let ec = ExpConsts::new(b);
        for r in 0..qrows {
            let s_row = b.ins().iadd_imm_s(s_base, (4 * r * KEY_BLOCK) as i64);
            let mv = b
                .ins()
                .stack_load(I64, F32X4, self.bmax_slot, (16 * r) as i32);
            let block_max = hmax(b, mv);
            let m_old = b.use_var(self.m_vars[r]);
            let gt = b.ins().fcmp(FloatCC::GreaterThan, block_max, m_old);
            let m_new = b.ins().select(gt, block_max, m_old);
            b.def_var(self.m_vars[r], m_new);
            // While every score so far is -inf, subtract 0 instead (no NaN from -inf - -inf);
            // the same for a block whose scores are all -inf.
            let ninf_s = b.ins().f32const(f32::NEG_INFINITY);
            let zero_s = b.ins().f32const(0.0);
            let none = b.ins().fcmp(FloatCC::Equal, m_new, ninf_s);
            let m_use = b.ins().select(none, zero_s, m_new);
            let empty = b.ins().fcmp(FloatCC::Equal, block_max, ninf_s);
            let b_use = b.ins().select(empty, zero_s, block_max);
            // Lane 0: α = e^(m_old − m), lane 1: c = e^(block max − m), the factor from
            // the block's own scale (P relative to the block maximum) to the running one.
            let da = b.ins().fsub(m_old, m_use);
            let db = b.ins().fsub(block_max, m_use);
            let zero_v = splat_f32(b, 0.0);
            let ab = b.ins().insertlane(zero_v, da, 0);
            let ab = b.ins().insertlane(ab, db, 1);
            let e = exp_nonpos_fast(b, &ec, ab);
            let alpha = b.ins().extractlane(e, 0);
            let c = b.ins().extractlane(e, 1);
            let inv255 = b.ins().f32const(1.0 / 255.0);
            let unit = b.ins().fmul(c, inv255);
            b.ins()
                .stack_store(I64, unit, self.unit_slot, (4 * r) as i32);
            // O and l are rescaled only when the running maximum moved (α < 1): a few
            // blocks per row, so the other blocks skip 4·dv/4 + 1 multiplications.
            let one = b.ins().f32const(1.0);
            let moved = b.ins().fcmp(FloatCC::NotEqual, alpha, one);
            let rescale = b.create_block();
            let go_on = b.create_block();
            b.ins().brif(moved, rescale, &[], go_on, &[]);
            b.switch_to_block(rescale);
            let alpha_v = b.ins().splat(F32X4, alpha);
            let l = b.ins().stack_load(I64, F32X4, self.l_slot, (16 * r) as i32);
            let l = b.ins().fmul(l, alpha_v);
            b.ins().stack_store(I64, l, self.l_slot, (16 * r) as i32);
            for cv in 0..self.em.dv4 {
                let o = b
                    .ins()
                    .stack_load(I64, F32X4, self.em.o_slot, self.o_off(r, cv));
                let o = b.ins().fmul(o, alpha_v);
                b.ins()
                    .stack_store(I64, o, self.em.o_slot, self.o_off(r, cv));
            }
            b.ins().jump(go_on, &[]);
            b.switch_to_block(go_on);
            let bu = b.ins().splat(F32X4, b_use);
            let p_row = b.ins().iadd_imm_s(p_base, (r * KEY_BLOCK * 4) as i64);
            let sum = b.declare_var(F32X4);
            let zero_f = splat_f32(b, 0.0);
            b.def_var(sum, zero_f);
            counted_loop(b, zero, groups_c, 1, |b, g| {
                let p = self.em.offset(b, s_row, g, 16);
                let s = b.ins().load(F32X4, mem(), p, 0);
                let x = b.ins().fsub(s, bu);
                let e = exp_nonpos_fast(b, &ec, x);
                let acc = b.use_var(sum);
                let acc = b.ins().fadd(acc, e);
                b.def_var(sum, acc);
                // round(255 e) in [0, 255]: adding 1.5 · 2^23 rounds to nearest even and
                // leaves the integer in the low mantissa bits (cheaper than a saturating
                // conversion; NaN lanes give garbage bytes, never a fault). The packs leave
                // the 4 bytes in every 32-bit lane: the broadcast operand of stage 3.
                let x = b.ins().fma(e, ec.c255, ec.magic);
                let xb = as_int(b, x);
                let u = b.ins().isub(xb, ec.magic_bits);
                let h = b.ins().snarrow(u, u);
                let bytes = b.ins().unarrow(h, h);
                let dst = self.em.offset(b, p_row, g, 16);
                b.ins().store(mem(), bytes, dst, 0);
                Ok(())
            })?;
            // l += c Σ e^(s − block max), lane-wise.
            let acc = b.use_var(sum);
            let cv = b.ins().splat(F32X4, c);
            let l = b.ins().stack_load(I64, F32X4, self.l_slot, (16 * r) as i32);
            let l = b.ins().fma(acc, cv, l);
            b.ins().stack_store(I64, l, self.l_slot, (16 * r) as i32);
        }
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
            counted_loop(b, zero, groups_c, 1, |b, g| {
                let vg = self.em.offset(b, v_block, g, v_group);
                let vv: Vec<Value> = vecs
                    .iter()
                    .map(|&c| b.ins().load(I8X16, mem(), vg, (16 * c) as i32))
                    .collect();
                let pg = b.ins().ishl_imm_s(g, 4);
                let pg = b.ins().iadd(p_base, pg);
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
            for r in 0..qrows {
                let unit = b.ins().stack_load(I64, F32, self.unit_slot, (4 * r) as i32);
                let unit = b.ins().splat(F32X4, unit);
                for (k, &c) in vecs.iter().enumerate() {
                    let a = b.use_var(self.a_vars[r][k]);
                    let af = b.ins().fcvt_from_sint(F32X4, a);
                    let w = b.ins().fmul(scales[k], unit);
                    let o = b
                        .ins()
                        .stack_load(I64, F32X4, self.em.o_slot, self.o_off(r, c));
                    let o = b.ins().fma(af, w, o);
                    b.ins()
                        .stack_store(I64, o, self.em.o_slot, self.o_off(r, c));
                }
            }
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
    dot_product: bool,
) -> Result<DefinedAttention> {
    let layout = QuantLayout::new(spec);
    define_with_table(
        module,
        spec,
        name,
        (KEY_BLOCK, dot_product),
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
        s_slot: slot(b, 4 * QUERY_TILE * KEY_BLOCK),
        p_slot: slot(b, 4 * QUERY_TILE * KEY_BLOCK),
        unit_slot: slot(b, 4 * QUERY_TILE),
        bmax_slot: slot(b, 16 * QUERY_TILE),
        l_slot: slot(b, 16 * QUERY_TILE),
        m_vars: (0..qrows).map(|_| b.declare_var(F32)).collect(),
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
    let ninf = b.ins().f32const(f32::NEG_INFINITY);
    let zero = splat_f32(b, 0.0);
    for r in 0..qrows {
        b.def_var(ie.m_vars[r], ninf);
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
