//! Writing fused ops out as their plain IR form: the subgraph each one stands for.
//!
//! [`expand`] is the definition of the fused ops in terms of the others (tests evaluate both
//! with the interpreter) and the form engines without a fused kernel can run. The plain form
//! of causal linear attention multiplies masked keys by 0, so a NaN or infinite key or value
//! after a row's prefix reaches that row there but not in the fused op (which sums the prefix
//! only); for finite inputs the two agree.

use super::{Attention, Decay, LinearAttention, Normalizer, ScoreExpr};
use crate::build::GraphBuilder;
use crate::dim::Dim;
use crate::graph::{Kernel, NodeId};
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::pattern::MaskPattern;

/// `kernel` with every fused op replaced by its plain form (other nodes copied as they are).
pub fn expand(kernel: &Kernel) -> Result<Kernel, String> {
    expand_where(kernel, |_| true)
}

/// `kernel` with the fused ops for which `which` holds replaced by their plain form.
pub fn expand_where(kernel: &Kernel, which: impl Fn(NodeId) -> bool) -> Result<Kernel, String> {
    Ok(expand_map(kernel, which)?.0)
}

/// [`expand_where`], with the new node of every old node (a node's value is the same in
/// both graphs). The fused gradient ops of [`crate::backward`] expand too, to the gradient
/// graph of their plain form.
pub fn expand_map(
    kernel: &Kernel,
    which: impl Fn(NodeId) -> bool,
) -> Result<(Kernel, Vec<NodeId>), String> {
    let old = &kernel.graph;
    let mut b = GraphBuilder::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(old.len());
    for id in old.topo_order() {
        let node = old.node(id);
        let args: Vec<NodeId> = old.operands(id).iter().map(|o| map[o.index()]).collect();
        let new = match &node.op {
            Op::Attention(a) if which(id) => attention(&mut b, a, &args)?,
            Op::LinearAttention(l) if which(id) => linear(&mut b, l, &args)?,
            Op::Backward(op) if which(id) => {
                match crate::backward::expand::expand(&mut b, op, &args)? {
                    Some(new) => new,
                    None => b.graph.add(node.clone(), &args),
                }
            }
            _ => b.graph.add(node.clone(), &args),
        };
        map.push(new);
    }
    let kernel = Kernel {
        graph: b.graph,
        output: map[kernel.output.index()],
        ..kernel.clone()
    };
    Ok((kernel, map))
}

/// `softmax(mask(score(q kᵀ), pattern, -inf)) @ v` over operands `[q, k, v, biases..]`.
pub fn attention(b: &mut GraphBuilder, a: &Attention, args: &[NodeId]) -> Result<NodeId, String> {
    let [q, k, v] = [args[0], args[1], args[2]];
    let kt = b.add(Op::Transpose, &[k], None)?;
    let s = b.add(Op::MatMul, &[q, kt], None)?;
    let row = |id: NodeId, b: &GraphBuilder| -> Dim {
        let shape = &b.graph.node(id).shape;
        shape[shape.len() - 2].clone()
    };
    let relpos = vec![row(q, b), row(k, b)];
    let mut score = score_node(b, &a.score, s, &args[3..], &relpos, 0)?;
    if let Some(pattern) = &a.mask {
        let mask = Op::Mask {
            pattern: pattern.clone(),
            fill: f64::NEG_INFINITY,
        };
        score = b.add(mask, &[score], None)?;
    }
    let axis = b.rank(score) - 1;
    if a.lse {
        let op = Op::Reduce {
            op: ReduceOp::LogSumExp,
            axis,
        };
        return b.add(op, &[score], None);
    }
    let p = b.add(Op::Softmax { axis }, &[score], None)?;
    b.add(Op::MatMul, &[p, v], None)
}

/// The plain nodes of a score expression.
fn score_node(
    b: &mut GraphBuilder,
    e: &ScoreExpr,
    s: NodeId,
    biases: &[NodeId],
    relpos: &[Dim],
    depth: usize,
) -> Result<NodeId, String> {
    if depth > super::MAX_SCORE_DEPTH {
        return Err("the score is too deep".to_string());
    }
    match e {
        ScoreExpr::Scores => Ok(s),
        ScoreExpr::Const(c) => b.add(Op::Const(*c), &[], None),
        ScoreExpr::Dim(d) => b.add(Op::DimValue(d.clone()), &[], None),
        ScoreExpr::RelPos => b.add(Op::RelPos, &[], Some(&relpos.to_vec())),
        ScoreExpr::Bias(i) => biases
            .get(*i)
            .copied()
            .ok_or_else(|| format!("bias b{i} is not an operand")),
        ScoreExpr::Unary(u, x) => {
            let x = score_node(b, x, s, biases, relpos, depth + 1)?;
            b.add(Op::Unary(*u), &[x], None)
        }
        ScoreExpr::Binary(op, x, y) => {
            let x = score_node(b, x, s, biases, relpos, depth + 1)?;
            let y = score_node(b, y, s, biases, relpos, depth + 1)?;
            b.add(Op::Binary(*op), &[x, y], None)
        }
    }
}

/// Linear attention over `[q, k, v]` (and the decay slope) in its plain (quadratic or state)
/// form.
pub fn linear(
    b: &mut GraphBuilder,
    l: &LinearAttention,
    args: &[NodeId],
) -> Result<NodeId, String> {
    if args.len() != l.arity() {
        return Err(format!("linear attention takes {} operands", l.arity()));
    }
    let [q, k, v] = [args[0], args[1], args[2]];
    let kt = b.add(Op::Transpose, &[k], None)?;
    let (num, den) = if l.causal {
        let mut s = b.add(Op::MatMul, &[q, kt], None)?;
        // s ∘ exp(mask(log w, causal, 0)) with the log weight a · relpos(m, n) (slope) or
        // cq − ckᵀ (gate): the inner mask changes only entries the outer one replaces, and keeps
        // exp from overflowing there (an infinite weight would make their zero gradient NaN)
        let log_weight = match l.decay {
            Decay::None => None,
            Decay::Slope => {
                let shape = &b.graph.node(s).shape;
                let relpos = shape[shape.len() - 2..].to_vec();
                let r = b.add(Op::RelPos, &[], Some(&relpos))?;
                Some(b.add(Op::Binary(BinaryOp::Mul), &[args[3], r], None)?)
            }
            Decay::Gate => {
                let ct = b.add(Op::Transpose, &[args[4]], None)?;
                Some(b.add(Op::Binary(BinaryOp::Sub), &[args[3], ct], None)?)
            }
        };
        if let Some(w) = log_weight {
            let inner = Op::Mask {
                pattern: MaskPattern::Causal,
                fill: 0.0,
            };
            let w = b.add(inner, &[w], None)?;
            let w = b.add(Op::Unary(UnaryOp::Exp), &[w], None)?;
            s = b.add(Op::Binary(BinaryOp::Mul), &[s, w], None)?;
        }
        let mask = Op::Mask {
            pattern: MaskPattern::Causal,
            fill: 0.0,
        };
        let a = b.add(mask, &[s], None)?;
        let num = b.add(Op::MatMul, &[a, v], None)?;
        let sum = Op::Reduce {
            op: ReduceOp::Sum,
            axis: b.rank(a) - 1,
        };
        (num, (a, sum))
    } else {
        let state = b.add(Op::MatMul, &[kt, v], None)?;
        let num = b.add(Op::MatMul, &[q, state], None)?;
        let sum = Op::Reduce {
            op: ReduceOp::Sum,
            axis: b.rank(kt) - 1,
        };
        (num, (kt, sum))
    };
    let Normalizer::Sum { eps } = l.normalizer else {
        return Ok(num);
    };
    let (summed, sum) = den;
    let mut den = b.add(sum, &[summed], None)?;
    if !l.causal {
        den = b.add(Op::MatMul, &[q, den], None)?;
    }
    if eps != 0.0 {
        let e = b.add(Op::Const(eps), &[], None)?;
        den = b.add(Op::Binary(BinaryOp::Add), &[den, e], None)?;
    }
    b.add(Op::Binary(BinaryOp::Div), &[num, den], None)
}

/// A copy of `kernel` whose fused attentions compute with `precision` and whose parameters in
/// `casts` are read as `cast(param, to)` — the IR forms the optimizer emits for
/// `@approx(int8)`, `@approx(bf16)` and `@approx(f16)`, for tests and benchmarks that exercise
/// the kernels without it.
pub fn with_precision(
    kernel: &Kernel,
    casts: &[(usize, crate::op::DType)],
    precision: super::Precision,
) -> Kernel {
    let old = &kernel.graph;
    let mut b = GraphBuilder::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(old.len());
    for id in old.topo_order() {
        let mut node = old.node(id).clone();
        let args: Vec<NodeId> = old.operands(id).iter().map(|o| map[o.index()]).collect();
        if let Op::Attention(a) = &mut node.op {
            a.precision = precision;
        }
        let cast = match node.op {
            Op::Input { index, .. } => casts.iter().find(|c| c.0 == index).map(|c| c.1),
            _ => None,
        };
        let shape = node.shape.clone();
        let mut new = b.graph.add(node, &args);
        if let Some(to) = cast {
            new = b.add_node(Op::Cast { to }, shape, to, &[new]);
        }
        map.push(new);
    }
    Kernel {
        graph: b.graph,
        output: map[kernel.output.index()],
        ..kernel.clone()
    }
}
