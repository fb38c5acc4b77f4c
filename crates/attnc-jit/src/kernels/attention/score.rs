//! The score and mask emitter of the exact fused kernel: the score expression over `S = Q Kᵀ`
//! on a key tile (constants, relative positions, bias rows, every elementwise op) and the
//! element mask of partial tiles.

use super::skeleton::{elem_size, BiasRow, Emitter, Row};
use super::spec::ScoreExpr;
use crate::simd::{emit_elu, emit_exp, emit_log, emit_sigmoid, emit_tanh, select_f32, splat_f32};
use attnc_ir::{BinaryOp, UnaryOp};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::F32X4;
use cranelift_codegen::ir::{BlockArg, InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// How a tile step applies the element mask.
#[derive(Clone, Copy)]
pub(super) enum Masking {
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

    /// The element mask on the row-layout scores: masked keys become `-inf`. Under
    /// [`Masking::Flag`] the masked scores are computed on a side path and joined back.
    pub(super) fn apply_mask(
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
