//! The Nyström pseudo-inverse written out as plain IR: Newton–Schulz iterations of matrix
//! products, which the interpreter and the JIT run like any other products.
//!
//! For `x: [.., a, c]`, Nyströmformer's iteration starts from `v₀ = xᵀ / (‖x‖₁ ‖x‖_∞)` (largest
//! column and row sums of `|x|`, per batch entry), from which it converges to `pinv(x)` for any
//! `x`, and repeats `v ← ¼ v (13 I − x v (15 I − x v (7 I − x v)))`. The identity is never
//! built: with `p = x v`, that product is `¼ (13 v − 15 v p + 7 v p² − v p³)`, the same four
//! products per iteration.

use crate::rules::approx::PINV_ITERATIONS;
use attnc_ir::build::GraphBuilder;
use attnc_ir::{BinaryOp, NodeId, Op, ReduceOp, UnaryOp};

/// Adds `pinv(x)` for `x: [.., a, c]` (result `[.., c, a]`) to `b`.
pub(super) fn build(b: &mut GraphBuilder, x: NodeId) -> Result<NodeId, String> {
    let rank = b.rank(x);
    let rows = rank.checked_sub(2).ok_or("a pseudo-inverse of a vector")?;
    let cols = rank - 1;
    let reduce = |op, axis| Op::Reduce { op, axis };
    let binary = |b: &mut GraphBuilder, op, l, r| b.add(Op::Binary(op), &[l, r], None);
    let abs = b.add(Op::Unary(UnaryOp::Abs), &[x], None)?;
    // ‖x‖₁: the largest column sum; ‖x‖_∞: the largest row sum (each [.., 1, 1]).
    let col_sums = b.add(reduce(ReduceOp::Sum, rows), &[abs], None)?;
    let norm_1 = b.add(reduce(ReduceOp::Max, cols), &[col_sums], None)?;
    let row_sums = b.add(reduce(ReduceOp::Sum, cols), &[abs], None)?;
    let norm_inf = b.add(reduce(ReduceOp::Max, rows), &[row_sums], None)?;
    let norms = binary(b, BinaryOp::Mul, norm_1, norm_inf)?;
    let xt = b.add(Op::Transpose, &[x], None)?;
    let mut v = binary(b, BinaryOp::Div, xt, norms)?;
    let constant = |b: &mut GraphBuilder, c: f64| b.add(Op::Const(c), &[], None);
    let (c13, c15, c7, quarter) = (
        constant(b, 13.0)?,
        constant(b, 15.0)?,
        constant(b, 7.0)?,
        constant(b, 0.25)?,
    );
    for _ in 0..PINV_ITERATIONS {
        let p = b.add(Op::MatMul, &[x, v], None)?;
        let vp = b.add(Op::MatMul, &[v, p], None)?;
        let vp2 = b.add(Op::MatMul, &[vp, p], None)?;
        let vp3 = b.add(Op::MatMul, &[vp2, p], None)?;
        let t13 = binary(b, BinaryOp::Mul, v, c13)?;
        let t15 = binary(b, BinaryOp::Mul, vp, c15)?;
        let t7 = binary(b, BinaryOp::Mul, vp2, c7)?;
        let sum = binary(b, BinaryOp::Sub, t13, t15)?;
        let sum = binary(b, BinaryOp::Add, sum, t7)?;
        let sum = binary(b, BinaryOp::Sub, sum, vp3)?;
        v = binary(b, BinaryOp::Mul, sum, quarter)?;
    }
    Ok(v)
}
