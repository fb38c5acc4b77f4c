//! Element masks of partial key tiles: the mask pattern evaluated on a vector of key indices.
//!
//! Every primitive except `dilated` keeps an interval of keys per query row, so the row header
//! computes the interval bounds once (scalar i64, clamped and splatted to i32x4) and a tile
//! only compares its key indices against them; `dilated` adds a stride test done exactly in
//! f32. The semantics are [`MaskPattern::contains`] with `i' = i + n - m`.

use crate::simd::splat_f32;
use attnc_ir::MaskPattern;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// Per-row values of the mask pattern, splatted to i32x4 in the row header.
pub(super) enum RowMask {
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
    Global { all: Value, g: Value },
    /// both
    And(Box<RowMask>, Box<RowMask>),
    /// either
    Or(Box<RowMask>, Box<RowMask>),
}

impl RowMask {
    /// Emits the per-row values of pattern `p` for aligned row index `ia` (i64) over an
    /// `m × n` score matrix.
    pub(super) fn new(
        b: &mut FunctionBuilder,
        p: &MaskPattern,
        ia: Value,
        m: usize,
        n: usize,
    ) -> RowMask {
        // Parameters are clamped to `cap`: |ia - j| < m + n + 1 always, so larger values act
        // the same (ia in [-m, n), j in [0, n)).
        let cap = (m + n + 1) as u64;
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
                let bv = b.ins().iconst(I64, bs);
                let q = b.ins().sdiv(ia, bv);
                let rem = b.ins().srem(ia, bv);
                let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, rem, 0);
                let neg = b.ins().uextend(I64, neg);
                let q = b.ins().isub(q, neg);
                let lo = b.ins().imul(q, bv);
                let hi = b.ins().iadd_imm_s(lo, bs - 1);
                RowMask::Between(splat32(b, lo), splat32(b, hi))
            }
            MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => {
                unreachable!("invariant: document masks are planned with their segment ids")
            }
            MaskPattern::And(x, y) => {
                let x = RowMask::new(b, x, ia, m, n);
                let y = RowMask::new(b, y, ia, m, n);
                RowMask::And(Box::new(x), Box::new(y))
            }
            MaskPattern::Or(x, y) => {
                let x = RowMask::new(b, x, ia, m, n);
                let y = RowMask::new(b, y, ia, m, n);
                RowMask::Or(Box::new(x), Box::new(y))
            }
        }
    }

    /// The i32x4 keep-mask of keys `jv` (i32x4) under the row's pattern values.
    pub(super) fn keep(&self, b: &mut FunctionBuilder, jv: Value) -> Value {
        match self {
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
                let x = x.keep(b, jv);
                let y = y.keep(b, jv);
                b.ins().band(x, y)
            }
            RowMask::Or(x, y) => {
                let x = x.keep(b, jv);
                let y = y.keep(b, jv);
                b.ins().bor(x, y)
            }
        }
    }
}
