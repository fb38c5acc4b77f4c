//! The semantics of the gradient graphs' ops (see [`crate::backward`]).
//!
//! The fused attention gradient is written out with whole arrays, as the forward's
//! `interp/fused.rs` is: the scores `S = q kᵀ`, the score expression `X` and its partials by
//! reverse mode over the expression tree, `P = softmax(mask(X))`, `dP = dO vᵀ`,
//! `D = rowsum(dO ∘ o)`, `dX = P ∘ (dP − D)` — then `dS` and each bias gradient are REPLACED by 0
//! at masked positions (so nothing at a masked position, not even a NaN partial, reaches a
//! gradient) — and `dq = dS k`, `dk = dSᵀ q`, `dv = Pᵀ dO`, each summed down to its operand's
//! shape. The linear attention gradient differentiates the quadratic form row by row over each
//! row's keys (the prefix `j ≤ i'` when causal), without storing the `m × n` products.

use super::{binary, broadcast_shapes, mask, matmul, reduce, relpos, softmax, transpose};
use crate::backward::{AttentionGrad, BackwardOp, LinearGrad};
use crate::dim::Bindings;
use crate::fused::{Normalizer, ScoreExpr, MAX_SCORE_DEPTH};
use crate::op::{BinaryOp, ReduceOp, UnaryOp};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

/// Evaluates one backward op over its operand values; `shape` is the node's bound shape.
pub(super) fn evaluate(
    op: &BackwardOp,
    args: &[&ArrayD<f64>],
    shape: &[usize],
    bindings: &Bindings,
) -> Result<ArrayD<f64>, String> {
    match op {
        BackwardOp::SumTo => sum_to(args[0], shape),
        BackwardOp::Greater => greater(args[0], args[1]),
        BackwardOp::Unpool { op, size } => {
            let size = size
                .resolve(bindings)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s > 0)
                .ok_or_else(|| format!("the pool size `{size}` is not a bound size"))?;
            unpool(*op, size, args[0], args[1])
        }
        BackwardOp::Attention(a) => attention_grad(a, args, bindings),
        BackwardOp::Linear(l) => linear_grad(l, args),
    }
}

/// The gradient of pooling `x` by blocks of `size` rows, from the pooled gradient `dy`.
fn unpool(
    op: crate::op::PoolOp,
    size: usize,
    x: &ArrayD<f64>,
    dy: &ArrayD<f64>,
) -> Result<ArrayD<f64>, String> {
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let (n, d) = (shape[rank - 2], shape[rank - 1]);
    let blocks = n.div_ceil(size);
    let outer: usize = shape[..rank - 2].iter().product();
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (x, dy) = (
        x.as_slice()
            .ok_or("a standard-layout array is contiguous")?,
        dy.as_slice()
            .ok_or("a standard-layout array is contiguous")?,
    );
    if dy.len() != outer * blocks * d {
        return Err("unpool: the gradient is not the pooled shape".to_string());
    }
    let mut out = vec![0.0; outer * n * d];
    for o in 0..outer {
        for t in 0..blocks {
            let (r0, r1) = (t * size, ((t + 1) * size).min(n));
            for c in 0..d {
                let g = dy[(o * blocks + t) * d + c];
                let at = |r: usize| (o * n + r) * d + c;
                match op {
                    crate::op::PoolOp::Mean => {
                        for r in r0..r1 {
                            out[at(r)] = g / (r1 - r0) as f64;
                        }
                    }
                    crate::op::PoolOp::Max => {
                        let top = (r0..r1).map(|r| x[at(r)]).fold(f64::NEG_INFINITY, |a, b| {
                            if a.is_nan() || b.is_nan() {
                                f64::NAN
                            } else {
                                a.max(b)
                            }
                        });
                        let first = (r0..r1).find(|&r| {
                            let v = x[at(r)];
                            v == top || (v.is_nan() && top.is_nan())
                        });
                        if let Some(r) = first {
                            out[at(r)] = g;
                        }
                    }
                }
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// `a > b` as 1 or 0; NaN where either side is NaN.
pub fn gt(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a > b {
        1.0
    } else {
        0.0
    }
}

/// `d unary(x) / dx` at `x`, where `y = unary(x)`.
pub fn unary_derivative(op: UnaryOp, x: f64, y: f64) -> f64 {
    match op {
        UnaryOp::Neg => -1.0,
        UnaryOp::Exp => y,
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sqrt => 0.5 / y,
        UnaryOp::Rsqrt => -0.5 * y / x,
        UnaryOp::Tanh => 1.0 - y * y,
        UnaryOp::Sigmoid => y * (1.0 - y),
        UnaryOp::Relu => gt(x, 0.0),
        UnaryOp::Elu => 1.0 + gt(0.0, x) * y,
        UnaryOp::Abs => gt(x, 0.0) - gt(0.0, x),
    }
}

/// `(d y / da, d y / db)` of `y = binary(a, b)`. `maximum` and `minimum` split a tie evenly.
pub fn binary_partials(op: BinaryOp, a: f64, b: f64, y: f64) -> (f64, f64) {
    match op {
        BinaryOp::Add => (1.0, 1.0),
        BinaryOp::Sub => (1.0, -1.0),
        BinaryOp::Mul => (b, a),
        BinaryOp::Div => (1.0 / b, -y / b),
        BinaryOp::Max => {
            let w = 0.5 * (1.0 + gt(a, b) - gt(b, a));
            (w, 1.0 - w)
        }
        BinaryOp::Min => {
            let w = 0.5 * (1.0 + gt(b, a) - gt(a, b));
            (w, 1.0 - w)
        }
    }
}

/// `x` summed down to shape `to` (leading axes dropped, axes of size 1 in `to` summed), every
/// sum in index order.
pub fn sum_to(x: &ArrayD<f64>, to: &[usize]) -> Result<ArrayD<f64>, String> {
    let rank = x.ndim();
    if to.len() > rank {
        return Err(format!("sum-to: {:?} does not sum to {to:?}", x.shape()));
    }
    let mut out = x.clone();
    for _ in 0..rank - to.len() {
        out = reduce(ReduceOp::Sum, 0, &out)?.index_axis_move(Axis(0), 0);
    }
    for (axis, &size) in to.iter().enumerate() {
        if out.shape()[axis] == size {
            continue;
        }
        if size != 1 {
            return Err(format!("sum-to: {:?} does not sum to {to:?}", x.shape()));
        }
        out = reduce(ReduceOp::Sum, axis, &out)?;
    }
    Ok(out)
}

fn greater(a: &ArrayD<f64>, b: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let shape = broadcast_shapes(a.shape(), b.shape())
        .ok_or_else(|| format!("{:?} and {:?} do not broadcast", a.shape(), b.shape()))?;
    let (av, bv) = (widened(a, &shape)?, widened(b, &shape)?);
    let mut out = ArrayD::zeros(IxDyn(&shape));
    Zip::from(&mut out)
        .and(&av)
        .and(&bv)
        .for_each(|o, &x, &y| *o = gt(x, y));
    Ok(out)
}

/// `x` broadcast to `shape`, as a view.
fn widened<'a>(x: &'a ArrayD<f64>, shape: &[usize]) -> Result<ArrayViewD<'a, f64>, String> {
    x.broadcast(IxDyn(shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))
}

/// The value of every node of a score expression tree (children in order).
struct Evaluated {
    value: ArrayD<f64>,
    children: Vec<Evaluated>,
}

/// What the score expression's leaves read: `S`, the biases, and the shape every array leaf
/// is broadcast to (the broadcast of `S` and the biases).
struct Leaves<'a> {
    s: &'a ArrayD<f64>,
    biases: &'a [&'a ArrayD<f64>],
    full: Vec<usize>,
}

impl Leaves<'_> {
    fn wide(&self, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
        Ok(x.broadcast(IxDyn(&self.full))
            .ok_or_else(|| format!("cannot broadcast {:?} to {:?}", x.shape(), self.full))?
            .to_owned())
    }
}

/// Evaluates the score expression with its array leaves broadcast to the full shape, keeping
/// every subtree's value for reverse mode (array nodes all have the full shape).
fn eval_tree(
    e: &ScoreExpr,
    leaves: &Leaves<'_>,
    bindings: &Bindings,
    depth: usize,
) -> Result<Evaluated, String> {
    if depth > MAX_SCORE_DEPTH {
        return Err("the score is too deep".to_string());
    }
    let leaf = |value: ArrayD<f64>| Evaluated {
        value,
        children: Vec::new(),
    };
    let scalar = |v: f64| ArrayD::from_elem(IxDyn(&[]), v);
    let rank = leaves.full.len();
    Ok(match e {
        ScoreExpr::Scores => leaf(leaves.wide(leaves.s)?),
        ScoreExpr::Const(c) => leaf(scalar(*c)),
        ScoreExpr::Dim(d) => leaf(scalar(
            d.resolve(bindings)
                .ok_or_else(|| format!("dimension `{d}` is not bound"))? as f64,
        )),
        ScoreExpr::RelPos => leaf(leaves.wide(&relpos(&leaves.full[rank - 2..])?)?),
        ScoreExpr::Bias(i) => leaf(
            leaves.wide(
                leaves
                    .biases
                    .get(*i)
                    .ok_or_else(|| format!("bias b{i} is not an operand"))?,
            )?,
        ),
        ScoreExpr::Unary(u, x) => {
            let x = eval_tree(x, leaves, bindings, depth + 1)?;
            Evaluated {
                value: x.value.mapv(|v| super::unary(*u, v)),
                children: vec![x],
            }
        }
        ScoreExpr::Binary(op, x, y) => {
            let x = eval_tree(x, leaves, bindings, depth + 1)?;
            let y = eval_tree(y, leaves, bindings, depth + 1)?;
            Evaluated {
                value: binary(*op, &x.value, &y.value)?,
                children: vec![x, y],
            }
        }
    })
}

/// Gradients of the score expression's array leaves, `S` and each bias, at the full shape.
struct LeafGradients {
    scores: Option<ArrayD<f64>>,
    biases: Vec<Option<ArrayD<f64>>>,
}

impl LeafGradients {
    fn add(slot: &mut Option<ArrayD<f64>>, g: ArrayD<f64>) {
        *slot = Some(match slot.take() {
            Some(acc) => acc + g,
            None => g,
        });
    }
}

/// Pushes the adjoint `adj` (the node's shape) down the tree to its leaves.
fn backprop(
    e: &ScoreExpr,
    ev: &Evaluated,
    adj: ArrayD<f64>,
    out: &mut LeafGradients,
) -> Result<(), String> {
    match (e, ev.children.as_slice()) {
        (ScoreExpr::Scores, _) => LeafGradients::add(&mut out.scores, adj),
        (ScoreExpr::Bias(i), _) => {
            let slot = out.biases.get_mut(*i).ok_or("no such bias")?;
            LeafGradients::add(slot, adj);
        }
        (ScoreExpr::Const(_) | ScoreExpr::Dim(_) | ScoreExpr::RelPos, _) => {}
        (ScoreExpr::Unary(u, x), [cx]) => {
            let mut g = adj;
            Zip::from(&mut g)
                .and(&cx.value)
                .and(&ev.value)
                .for_each(|g, &x, &y| *g *= unary_derivative(*u, x, y));
            backprop(x, cx, g, out)?;
        }
        (ScoreExpr::Binary(op, x, y), [cx, cy]) => {
            let shape = ev.value.shape().to_vec();
            let (a, b) = (widened(&cx.value, &shape)?, widened(&cy.value, &shape)?);
            let mut ga = ArrayD::zeros(IxDyn(&shape));
            let mut gb = ArrayD::zeros(IxDyn(&shape));
            Zip::from(&mut ga)
                .and(&mut gb)
                .and(&adj)
                .and(&a)
                .and(&b)
                .and(&ev.value)
                .for_each(|ga, gb, &g, &a, &b, &y| {
                    let (da, db) = binary_partials(*op, a, b, y);
                    *ga = g * da;
                    *gb = g * db;
                });
            backprop(x, cx, sum_to(&ga, cx.value.shape())?, out)?;
            backprop(y, cy, sum_to(&gb, cy.value.shape())?, out)?;
        }
        _ => return Err("the score tree does not match its values".to_string()),
    }
    Ok(())
}

/// The gradient of a fused attention with respect to operand `a.wrt`, over
/// `args = [q, k, v, biases.., o, dO]`.
fn attention_grad(
    a: &AttentionGrad,
    args: &[&ArrayD<f64>],
    bindings: &Bindings,
) -> Result<ArrayD<f64>, String> {
    let forward = a.attention.arity();
    if args.len() != a.arity() {
        return Err(format!("attention-grad takes {} operands", a.arity()));
    }
    let (q, k, v) = (args[0], args[1], args[2]);
    let segment_start = forward - a.attention.segments();
    let biases = &args[3..segment_start];
    let segments = &args[segment_start..forward];
    let (o, d_o) = (args[forward], args[forward + 1]);
    let s = matmul(q, &transpose(k)?)?;
    let mut full = s.shape().to_vec();
    for b in biases {
        full = broadcast_shapes(&full, b.shape())
            .ok_or("the biases do not broadcast into the scores")?;
    }
    let leaves = Leaves {
        s: &s,
        biases,
        full,
    };
    let tree = eval_tree(&a.attention.score, &leaves, bindings, 0)?;
    let x = &tree.value;
    let pattern = match &a.attention.mask {
        Some(p) => Some(p.resolve(bindings).map_err(|e| e.to_string())?),
        None => None,
    };
    let masked = |x: &ArrayD<f64>, fill: f64| match &pattern {
        Some(pattern) => mask(pattern, fill, x, segments),
        None => Ok(x.clone()),
    };
    let p = softmax(x.ndim() - 1, &masked(x, f64::NEG_INFINITY)?)?;
    if a.wrt == 2 {
        return sum_to(&matmul(&transpose(&p)?, d_o)?, v.shape());
    }
    let dp = matmul(d_o, &transpose(v)?)?;
    let mut rows = reduce(ReduceOp::Sum, o.ndim() - 1, &binary(BinaryOp::Mul, d_o, o)?)?;
    if a.lse_cotangent {
        // D − dlse: the log-sum-exp's gradient is P ∘ dlse.
        rows = binary(BinaryOp::Sub, &rows, args[forward + 2])?;
    }
    let dx = binary(BinaryOp::Mul, &p, &binary(BinaryOp::Sub, &dp, &rows)?)?;
    // dX has the output's batch; the score may not depend on every axis of it.
    let root = sum_to(&masked(&dx, 0.0)?, x.shape())?;
    let mut grads = LeafGradients {
        scores: None,
        biases: vec![None; biases.len()],
    };
    backprop(&a.attention.score, &tree, root, &mut grads)?;
    // Replaced at masked positions before summing: nothing there reaches a gradient.
    let leaf = |g: Option<ArrayD<f64>>, to: &[usize]| -> Result<ArrayD<f64>, String> {
        match g {
            Some(g) => sum_to(&masked(&g, 0.0)?, to),
            None => Ok(ArrayD::zeros(IxDyn(to))),
        }
    };
    match a.wrt {
        0 => sum_to(&matmul(&leaf(grads.scores, s.shape())?, k)?, q.shape()),
        1 => {
            let ds = leaf(grads.scores, s.shape())?;
            sum_to(&matmul(&transpose(&ds)?, q)?, k.shape())
        }
        slot => {
            let index = slot - 3;
            let bias = biases.get(index).ok_or("no such bias")?;
            leaf(
                grads.biases.get_mut(index).and_then(Option::take),
                bias.shape(),
            )
        }
    }
}

/// The gradient of a linear attention with respect to operand `l.wrt`, over
/// `args = [q, k, v, dO]`.
fn linear_grad(l: &LinearGrad, args: &[&ArrayD<f64>]) -> Result<ArrayD<f64>, String> {
    let [q, k, v, d_o] = args else {
        return Err("linear-attention-grad takes 4 operands".to_string());
    };
    let rank = d_o.ndim();
    if rank < 2 || q.ndim() < 2 || k.ndim() < 2 || v.ndim() < 2 {
        return Err("linear-attention-grad operands need two axes".to_string());
    }
    let batch = d_o.shape()[..rank - 2].to_vec();
    let (m, dv) = (d_o.shape()[rank - 2], d_o.shape()[rank - 1]);
    let (n, d) = (k.shape()[k.ndim() - 2], k.shape()[k.ndim() - 1]);
    let full = |x: &ArrayD<f64>, rows: usize, cols: usize| -> Result<Vec<f64>, String> {
        let mut shape = batch.clone();
        shape.extend([rows, cols]);
        let view = x
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))?;
        Ok(view.iter().copied().collect())
    };
    let (qf, kf, vf, gf) = (
        full(q, m, d)?,
        full(k, n, d)?,
        full(v, n, dv)?,
        full(d_o, m, dv)?,
    );
    let (rows, cols) = match l.wrt {
        0 => (m, d),
        1 => (n, d),
        2 => (n, dv),
        _ => return Err("linear-attention-grad: no such operand".to_string()),
    };
    let entries: usize = batch.iter().product();
    let mut out = vec![0.0; entries * rows * cols];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for b in 0..entries {
        let (qb, kb) = (&qf[b * m * d..][..m * d], &kf[b * n * d..][..n * d]);
        let (vb, gb) = (&vf[b * n * dv..][..n * dv], &gf[b * m * dv..][..m * dv]);
        let ob = &mut out[b * rows * cols..][..rows * cols];
        for i in 0..m {
            // Keys j < end reach row i (j ≤ i' when causal).
            let end = if l.linear.causal {
                (i as i128 + n as i128 - m as i128 + 1).clamp(0, n as i128) as usize
            } else {
                n
            };
            let qi = &qb[i * d..][..d];
            let gi = &gb[i * dv..][..dv];
            // The row's numerator and denominator, then the gradients of A_ij = q_i · k_j.
            let mut num = vec![0.0; dv];
            let mut den = 0.0;
            for j in 0..end {
                let a = dot(qi, &kb[j * d..][..d]);
                den += a;
                for (o, x) in num.iter_mut().zip(&vb[j * dv..][..dv]) {
                    *o += a * x;
                }
            }
            let (gn, gd): (Vec<f64>, f64) = match l.linear.normalizer {
                Normalizer::None => (gi.to_vec(), 0.0),
                Normalizer::Sum { eps } => {
                    let den = den + eps;
                    (
                        gi.iter().map(|g| g / den).collect(),
                        -dot(gi, &num) / (den * den),
                    )
                }
            };
            for j in 0..end {
                let (kj, vj) = (&kb[j * d..][..d], &vb[j * dv..][..dv]);
                let ga = dot(&gn, vj) + gd;
                match l.wrt {
                    0 => ob[i * d..][..d]
                        .iter_mut()
                        .zip(kj)
                        .for_each(|(o, x)| *o += ga * x),
                    1 => ob[j * d..][..d]
                        .iter_mut()
                        .zip(qi)
                        .for_each(|(o, x)| *o += ga * x),
                    _ => {
                        let a = dot(qi, kj);
                        ob[j * dv..][..dv]
                            .iter_mut()
                            .zip(&gn)
                            .for_each(|(o, g)| *o += a * g);
                    }
                }
            }
        }
    }
    let mut shape = batch;
    shape.extend([rows, cols]);
    let full = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())?;
    sum_to(&full, args[l.wrt].shape())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_to_sums_broadcast_axes_in_order() {
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 2, 3]), (0..12).map(f64::from).collect())
            .expect("shape");
        let to = sum_to(&x, &[2, 1]).expect("sums");
        assert_eq!(to.shape(), &[2, 1]);
        // Column sums over both leading blocks: rows 0 (0+1+2 + 6+7+8) and 1 (3+4+5 + 9+10+11).
        assert_eq!(to.iter().copied().collect::<Vec<_>>(), vec![24.0, 42.0]);
        assert_eq!(sum_to(&x, &[]).expect("sums")[[]], 66.0);
        assert_eq!(sum_to(&x, &[3]).expect("sums").shape(), &[3]);
        assert!(sum_to(&x, &[2]).is_err());
    }

    #[test]
    fn comparisons_and_derivatives_keep_nan() {
        assert_eq!(gt(1.0, 0.0), 1.0);
        assert_eq!(gt(0.0, 0.0), 0.0);
        assert!(gt(f64::NAN, 0.0).is_nan());
        assert_eq!(unary_derivative(UnaryOp::Relu, -1.0, 0.0), 0.0);
        assert!(unary_derivative(UnaryOp::Relu, f64::NAN, f64::NAN).is_nan());
        assert_eq!(unary_derivative(UnaryOp::Elu, 0.0, 0.0), 1.0);
        assert_eq!(binary_partials(BinaryOp::Max, 2.0, 2.0, 2.0), (0.5, 0.5));
        let inf = f64::INFINITY;
        assert_eq!(binary_partials(BinaryOp::Min, inf, inf, inf), (0.5, 0.5));
        assert_eq!(binary_partials(BinaryOp::Max, 3.0, 1.0, 3.0), (1.0, 0.0));
    }
}
