//! The semantics of the fused ops, in terms of the plain ones (see [`crate::fused`]).
//!
//! Fused attention is evaluated exactly as its plain form: the scores `q kᵀ`, the score
//! expression with its biases broadcast, the `-inf` mask, the softmax over the last axis and
//! the product with `v`. Its precision is ignored: int8 products are an approximation whose
//! error is measured against this exact value. Causal linear attention sums each row's prefix
//! only (keys `j ≤ i'`): keys after the prefix never reach the row, even when they are NaN.
//! A decayed one weighs the scores by `exp(slope · relpos(m, n))` first, as its plain form.
//!
//! Each plain-form step is rounded to the f32 range as a node would be (`range.rs`): the
//! scores, every step of the score expression, the weights, the state and the sums.

use super::range::{round_range, to_f32_range};
use super::{binary, broadcast_shapes, mask, matmul, relpos, softmax, transpose, unary};
use crate::dim::Bindings;
use crate::fused::{Attention, Decay, LinearAttention, Normalizer, ScoreExpr, MAX_SCORE_DEPTH};
use crate::op::{BinaryOp, UnaryOp};
use ndarray::{ArrayD, IxDyn};

/// `softmax(mask(score(q kᵀ))) @ v` over `args = [q, k, v, biases..]`.
pub(super) fn attention(
    a: &Attention,
    args: &[&ArrayD<f64>],
    bindings: &Bindings,
) -> Result<ArrayD<f64>, String> {
    if args.len() != a.arity() {
        return Err(format!("attention takes {} operands", a.arity()));
    }
    let (q, k, v) = (args[0], args[1], args[2]);
    let s = round_range(matmul(q, &transpose(k)?)?);
    let (m, n) = (s.shape()[s.ndim() - 2], s.shape()[s.ndim() - 1]);
    let biases = 3 + a.score.biases();
    let mut x = score(&a.score, &s, &args[3..biases], (m, n), bindings, 0)?;
    if let Some(pattern) = &a.mask {
        let pattern = pattern.resolve(bindings).map_err(|e| e.to_string())?;
        x = mask(&pattern, f64::NEG_INFINITY, &x, &args[biases..])?;
    }
    if a.lse {
        // The log-sum-exp of the masked scores (its own plain form: `logsumexp(x, -1)`).
        return super::reduce(crate::op::ReduceOp::LogSumExp, x.ndim() - 1, &x);
    }
    let p = round_range(softmax(x.ndim() - 1, &x)?);
    matmul(&p, v)
}

/// The score expression evaluated with NumPy broadcasting.
fn score(
    e: &ScoreExpr,
    s: &ArrayD<f64>,
    biases: &[&ArrayD<f64>],
    (m, n): (usize, usize),
    bindings: &Bindings,
    depth: usize,
) -> Result<ArrayD<f64>, String> {
    if depth > MAX_SCORE_DEPTH {
        return Err("the score is too deep".to_string());
    }
    let scalar = |v: f64| ArrayD::from_elem(IxDyn(&[]), v);
    Ok(match e {
        ScoreExpr::Scores => s.clone(),
        ScoreExpr::Const(c) => round_range(scalar(*c)),
        ScoreExpr::Dim(d) => scalar(
            d.resolve(bindings)
                .ok_or_else(|| format!("dimension `{d}` is not bound"))? as f64,
        ),
        ScoreExpr::RelPos => relpos(&[m, n])?,
        ScoreExpr::Bias(i) => (*biases
            .get(*i)
            .ok_or_else(|| format!("bias b{i} is not an operand"))?)
        .clone(),
        ScoreExpr::Unary(u, x) => {
            round_range(score(x, s, biases, (m, n), bindings, depth + 1)?.mapv(|x| unary(*u, x)))
        }
        ScoreExpr::Binary(op, x, y) => {
            let x = score(x, s, biases, (m, n), bindings, depth + 1)?;
            let y = score(y, s, biases, (m, n), bindings, depth + 1)?;
            round_range(binary(*op, &x, &y)?)
        }
    })
}

/// Linear attention over `args = [q, k, v]` (and the decay slope or log decay).
pub(super) fn linear(l: &LinearAttention, args: &[&ArrayD<f64>]) -> Result<ArrayD<f64>, String> {
    if args.len() != l.arity() {
        return Err(format!("linear attention takes {} operands", l.arity()));
    }
    let (q, k, v) = (args[0], args[1], args[2]);
    let kt = transpose(k)?;
    if !l.causal {
        let state = round_range(matmul(&kt, v)?);
        let num = round_range(matmul(q, &state)?);
        let Normalizer::Sum { eps } = l.normalizer else {
            return Ok(num);
        };
        let rank = kt.ndim();
        let ksum = round_range(super::reduce(crate::op::ReduceOp::Sum, rank - 1, &kt)?);
        let mut den = round_range(matmul(q, &ksum)?);
        if eps != 0.0 {
            // As the plain form: the sum of `eps` is a node of its own (absent when eps = 0).
            den = round_range(den.mapv(|x| x + eps));
        }
        return binary(BinaryOp::Div, &num, &den);
    }
    let mut a = round_range(matmul(q, &kt)?);
    if l.decay == Decay::Slope {
        // A ∘ exp(slope · relpos(m, n)), each step rounded as its plain-form node.
        let (m, n) = (a.shape()[a.ndim() - 2], a.shape()[a.ndim() - 1]);
        let w = round_range(binary(BinaryOp::Mul, args[3], &relpos(&[m, n])?)?);
        let w = round_range(w.mapv(|x| unary(UnaryOp::Exp, x)));
        a = round_range(binary(BinaryOp::Mul, &a, &w)?);
    }
    if l.decay == Decay::Gate {
        // A ∘ exp(cq − ckᵀ), each step rounded as its plain-form node.
        let ct = transpose(args[4])?;
        let w = round_range(binary(BinaryOp::Sub, args[3], &ct)?);
        let w = round_range(w.mapv(|x| unary(UnaryOp::Exp, x)));
        a = round_range(binary(BinaryOp::Mul, &a, &w)?);
    }
    causal_prefix(l.normalizer, &a, v)
}

/// Row `i` of `(A V) / (Σ_j A + eps)` over the prefix `j ≤ i'` of the scores `a`.
fn causal_prefix(
    normalizer: Normalizer,
    a: &ArrayD<f64>,
    v: &ArrayD<f64>,
) -> Result<ArrayD<f64>, String> {
    let (ra, rv) = (a.ndim(), v.ndim());
    let (m, n) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let dv = v.shape()[rv - 1];
    let batch = broadcast_shapes(&a.shape()[..ra - 2], &v.shape()[..rv - 2])
        .ok_or("the batch axes of the scores and v do not broadcast")?;
    let full = |x: &ArrayD<f64>, rows: usize, cols: usize| -> Result<Vec<f64>, String> {
        let mut shape = batch.clone();
        shape.extend([rows, cols]);
        let view = x
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))?;
        Ok(view.iter().copied().collect())
    };
    let (a, v) = (full(a, m, n)?, full(v, n, dv)?);
    let batches: usize = batch.iter().product();
    let mut out = vec![0.0; batches * m * dv];
    for b in 0..batches {
        for i in 0..m {
            // Keys j ≤ i' = i + n − m.
            let end = (i as i128 + n as i128 - m as i128 + 1).clamp(0, n as i128) as usize;
            let row = &a[(b * m + i) * n..][..n];
            let o = &mut out[(b * m + i) * dv..][..dv];
            let mut sum = 0.0;
            for j in 0..end {
                sum += row[j];
                let vj = &v[(b * n + j) * dv..][..dv];
                for (o, x) in o.iter_mut().zip(vj) {
                    *o += row[j] * x;
                }
            }
            // The numerator `A @ V` and the denominator `sum(A) (+ eps)` are plain-form nodes.
            o.iter_mut().for_each(|x| *x = to_f32_range(*x));
            if let Normalizer::Sum { eps } = normalizer {
                let mut den = to_f32_range(sum);
                if eps != 0.0 {
                    den = to_f32_range(den + eps);
                }
                o.iter_mut().for_each(|x| *x /= den);
            }
        }
    }
    let mut shape = batch;
    shape.extend([m, dv]);
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}
