//! The VJP rule of every op: given `g`, the gradient of a node `y = op(x..)`, the gradient
//! each operand receives through it, summed down to the operand's shape where the op
//! broadcast it. The rules read the forward values (`x`, `y`) as nodes of the same graph, so
//! the gradient graph recomputes what it needs.
//!
//! One line of math above each rule names what it builds; the interpreter's scalar
//! derivatives (`interp/backward.rs`) state the same facts, and both are tested against
//! central finite differences.

use super::emit::Emitter;
use super::GradError;
use crate::backward::{AttentionGrad, BackwardOp, LinearGrad};
use crate::fused::{Decay, Precision};
use crate::graph::NodeId;
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};

/// What one rule added: its name and each operand's gradient contribution.
pub(super) struct Applied {
    /// The rule's name (`vjp-matmul`).
    pub(super) rule: &'static str,
    /// `(operand, contribution)` for every operand that needs a gradient, in slot order.
    pub(super) contributions: Vec<(NodeId, NodeId)>,
}

/// Applies the rule of node `id` (whose gradient is `g`); `needs[o]` says whether operand `o`
/// needs a gradient at all.
pub(super) fn apply(
    e: &mut Emitter,
    id: NodeId,
    g: NodeId,
    needs: &[bool],
) -> Result<Applied, GradError> {
    e.at = Some(id);
    let op = e.b.graph.node(id).op.clone();
    let args = e.b.graph.operands(id);
    let want = |slot: usize| args.get(slot).is_some_and(|o| needs[o.index()]);
    let mut out = Vec::new();
    let rule = match &op {
        Op::Input { .. } => "vjp-input",
        Op::Const(_) | Op::DimValue(_) | Op::Fill { .. } | Op::RelPos | Op::Random { .. } => {
            "vjp-constant"
        }
        Op::Unary(u) => {
            let x = args[0];
            out.push((x, unary(e, *u, x, id, g)?));
            unary_rule(*u)
        }
        Op::Binary(b) => {
            let (a, bb) = (args[0], args[1]);
            let (ga, gb) = binary(e, *b, [a, bb], id, g, [want(0), want(1)])?;
            if let Some(ga) = ga {
                let shape = e.shape(a);
                out.push((a, e.sum_to(ga, &shape)?));
            }
            if let Some(gb) = gb {
                let shape = e.shape(bb);
                out.push((bb, e.sum_to(gb, &shape)?));
            }
            binary_rule(*b)
        }
        // da = sum-to(g @ bᵀ), db = sum-to(aᵀ @ g)
        Op::MatMul => {
            let (a, b) = (args[0], args[1]);
            if want(0) {
                let bt = e.transpose(b)?;
                let full = e.matmul(g, bt)?;
                let shape = e.shape(a);
                out.push((a, e.sum_to(full, &shape)?));
            }
            if want(1) {
                let at = e.transpose(a)?;
                let full = e.matmul(at, g)?;
                let shape = e.shape(b);
                out.push((b, e.sum_to(full, &shape)?));
            }
            "vjp-matmul"
        }
        // dx = gᵀ
        Op::Transpose => {
            out.push((args[0], e.transpose(g)?));
            "vjp-transpose"
        }
        Op::Reduce { op, axis } => {
            let x = args[0];
            out.push((x, reduce(e, *op, *axis, x, id, g)?));
            match op {
                ReduceOp::Sum => "vjp-sum",
                ReduceOp::Mean => "vjp-mean",
                ReduceOp::Max => "vjp-max",
                ReduceOp::LogSumExp => "vjp-logsumexp",
            }
        }
        // dx = y ∘ (g − sum(g ∘ y)); ds = sum-to(−sum(g ∘ y) ∘ (1 − sum(y))): the sink's own
        // probability is what the row leaves over, so no exponential is recomputed
        Op::SoftmaxSink => {
            let (x, s) = (args[0], args[1]);
            let last = e.shape(x).len().saturating_sub(1);
            let gy = e.mul(g, id)?;
            let total = e.sum(gy, last)?;
            if want(0) {
                let centered = e.sub(g, total)?;
                out.push((x, e.mul(id, centered)?));
            }
            if want(1) {
                let kept = e.sum(id, last)?;
                let sink = e.one_minus(kept)?;
                let weighted = e.mul(total, sink)?;
                let full = e.scale(weighted, -1.0)?;
                let shape = e.shape(s);
                out.push((s, e.sum_to(full, &shape)?));
            }
            "vjp-softmax-sink"
        }
        // dx_i = Σ_{k ≥ i} g_k = sum(g) − cumsum(g)_i + g_i
        Op::Cumsum { axis } => {
            let total = e.sum(g, *axis)?;
            let running = e.op(Op::Cumsum { axis: *axis }, &[g], None)?;
            let after = e.sub(total, running)?;
            out.push((args[0], e.add(after, g)?));
            "vjp-cumsum"
        }
        // dx: each block's gradient spread over its rows (mean: divided by its row count;
        // max: to the first row attaining the maximum)
        Op::Pool { op: pool, size } => {
            let unpool = BackwardOp::Unpool {
                op: *pool,
                size: size.clone(),
            };
            out.push((args[0], e.op(Op::Backward(unpool), &[args[0], g], None)?));
            "vjp-pool"
        }
        // dx = y ∘ (g − sum(g ∘ y, axis)): zero for a row of zeros (fully masked)
        Op::Softmax { axis } => {
            let gy = e.mul(g, id)?;
            let total = e.sum(gy, *axis)?;
            let centered = e.sub(g, total)?;
            out.push((args[0], e.mul(id, centered)?));
            "vjp-softmax"
        }
        // dx = mask(g, pattern, 0): masked entries get no gradient
        Op::Mask { pattern, .. } => {
            let op = Op::Mask {
                pattern: pattern.clone(),
                fill: 0.0,
            };
            // The segment ids (operands 1..) are read again; they get no gradient.
            let mut operands = vec![g];
            operands.extend_from_slice(&args[1..]);
            out.push((args[0], e.op(op, &operands, None)?));
            "vjp-mask"
        }
        // dx = g: rounding to a storage type passes gradients straight through
        Op::Cast { .. } => {
            out.push((args[0], g));
            "vjp-cast"
        }
        // ∂lse_i/∂x_ij = P_ij, so dX = P ∘ g: FlashAttention-2's dX = P ∘ (dP − D) with
        // dP = 0 and D = −g. Built as attention-grad with a log-sum-exp cotangent over
        // (q, k, 0 ∈ [.., n, 1], biases.., o = 0, dO = 0, dlse = g): the attention of a zero
        // column is that zero column, and no m × n value exists. v (an operand for the
        // pairing only) gets no gradient.
        Op::Attention(a) if a.lse => {
            let v = args[2];
            let mut column = e.shape(v);
            if let Some(last) = column.last_mut() {
                *last = crate::dim::Dim::Const(1);
            }
            let mut operands = args.clone();
            operands[2] = e.fill(0.0, &column)?;
            let rows = e.shape(id);
            let zeros = e.fill(0.0, &rows)?;
            operands.extend([zeros, zeros, g]);
            let slots = |s: usize| s != 2 && want(s);
            out = attention_grads(e, a, &args, &operands, slots, true)?;
            "vjp-attention-lse"
        }
        // dslot = attention-grad(q, k, v, b.., y, g) for each operand that needs one
        Op::Attention(a) => {
            let mut operands = args.clone();
            operands.extend([id, g]);
            out = attention_grads(e, a, &args, &operands, want, false)?;
            "vjp-attention"
        }
        // dslot = vjp of the plain form mask((q kᵀ) ∘ decay weights, causal, 0) v (/ sum)
        Op::LinearAttention(l) if l.decay != Decay::None => {
            let slots: Vec<usize> = (0..args.len()).filter(|&s| want(s)).collect();
            out = through_plain_form(e, (id, &op), &args, &slots, g, |b, operands| {
                crate::fused::expand::linear(b, l, operands)
            })?;
            "vjp-decayed-linear-attention"
        }
        // dslot = linear-attention-grad(q, k, v, g)
        Op::LinearAttention(l) => {
            let mut operands = args.clone();
            operands.push(g);
            for (slot, &x) in args.iter().enumerate().filter(|(s, _)| want(*s)) {
                let grad = LinearGrad {
                    linear: *l,
                    wrt: slot,
                };
                let op = Op::Backward(BackwardOp::Linear(grad));
                out.push((x, e.op(op, &operands, None)?));
            }
            "vjp-linear-attention"
        }
        // dx = broadcast(g)
        Op::Backward(BackwardOp::SumTo) => {
            let shape = e.shape(args[0]);
            out.push((args[0], e.broadcast_to(g, &shape)?));
            "vjp-sum-to"
        }
        // piecewise constant: no gradient
        Op::Backward(BackwardOp::Greater) => "vjp-greater",
        Op::Backward(b) => {
            return Err(GradError::Unsupported {
                op: b.to_string(),
                why: "gradients of fused gradients (second order) are not derived".to_string(),
            })
        }
    };
    Ok(Applied {
        rule,
        contributions: out,
    })
}

/// The gradients of fused node `id` (op `op`) with respect to operand `slots`, by reverse mode
/// through its plain form `expand(operands)`: each slot is read through an identity of its
/// own, so operands that alias (the same node in two slots) get their own partial derivative.
fn through_plain_form(
    e: &mut Emitter,
    (id, op): (NodeId, &Op),
    args: &[NodeId],
    slots: &[usize],
    g: NodeId,
    expand: impl Fn(&mut crate::build::GraphBuilder, &[NodeId]) -> Result<NodeId, String>,
) -> Result<Vec<(NodeId, NodeId)>, GradError> {
    let mut out = Vec::with_capacity(slots.len());
    for &slot in slots {
        let x = args[slot];
        let shape = e.shape(x);
        let own = e.op(Op::Backward(BackwardOp::SumTo), &[x], Some(&shape))?;
        let mut operands = args.to_vec();
        operands[slot] = own;
        let y = expand(&mut e.b, &operands).map_err(|detail| GradError::Build {
            node: id.index(),
            op: op.to_string(),
            detail,
        })?;
        out.push((x, crate::grad::gradient_of(&mut e.b, y, g, own)?));
    }
    Ok(out)
}

/// The fused attention that pairs with node `id`: its log-sum-exp over the same operands
/// (or, for a log-sum-exp, the attention), `None` for any other node.
pub(super) fn lse_partner(graph: &crate::graph::Graph, id: NodeId) -> Option<NodeId> {
    let Op::Attention(a) = &graph.node(id).op else {
        return None;
    };
    let args = graph.operands(id);
    let partner = crate::fused::Attention {
        lse: !a.lse,
        ..(**a).clone()
    };
    // Any node of the graph may be the partner, before or after `id`.
    (0..graph.len()).map(NodeId::new).find(|&other| {
        matches!(&graph.node(other).op, Op::Attention(b) if **b == partner)
            && graph.operands(other) == args
    })
}

/// The rule of a fused attention and its log-sum-exp partner ([`lse_partner`]) together,
/// `(node, gradient)` each: one `attention-grad` per operand over
/// `(args.., o, dO, dlse)`, so the backward computes `D = rowsum(dO ∘ o) − dlse` once.
pub(super) fn apply_paired(
    e: &mut Emitter,
    first: (NodeId, NodeId),
    second: (NodeId, NodeId),
    needs: &[bool],
) -> Result<Applied, GradError> {
    let is_lse =
        |e: &Emitter, id: NodeId| matches!(&e.b.graph.node(id).op, Op::Attention(a) if a.lse);
    let ((o, d_o), (_, d_lse)) = match is_lse(e, first.0) {
        true => (second, first),
        false => (first, second),
    };
    e.at = Some(o);
    let Op::Attention(a) = e.b.graph.node(o).op.clone() else {
        unreachable!("lse_partner pairs attentions")
    };
    let args = e.b.graph.operands(o);
    let want = |slot: usize| args.get(slot).is_some_and(|x| needs[x.index()]);
    let mut operands = args.clone();
    operands.extend([o, d_o, d_lse]);
    let contributions = attention_grads(e, &a, &args, &operands, want, true)?;
    Ok(Applied {
        rule: "vjp-attention-and-lse",
        contributions,
    })
}

/// One `attention-grad` node over `operands` per operand of `a` (its `args`) that `wanted`
/// accepts; segment ids (the last operands) are labels and get none.
fn attention_grads(
    e: &mut Emitter,
    a: &crate::fused::Attention,
    args: &[NodeId],
    operands: &[NodeId],
    wanted: impl Fn(usize) -> bool,
    lse_cotangent: bool,
) -> Result<Vec<(NodeId, NodeId)>, GradError> {
    let attention = crate::fused::Attention {
        lse: false,
        precision: Precision::Exact,
        ..a.clone()
    };
    let values = args.len() - a.segments();
    let mut out = Vec::new();
    for (slot, &x) in args.iter().enumerate().take(values) {
        if !wanted(slot) {
            continue;
        }
        let grad = AttentionGrad {
            attention: attention.clone(),
            wrt: slot,
            lse_cotangent,
        };
        let op = Op::Backward(BackwardOp::Attention(Box::new(grad)));
        out.push((x, e.op(op, operands, None)?));
    }
    Ok(out)
}

fn unary_rule(u: UnaryOp) -> &'static str {
    match u {
        UnaryOp::Neg => "vjp-neg",
        UnaryOp::Exp => "vjp-exp",
        UnaryOp::Log => "vjp-log",
        UnaryOp::Sqrt => "vjp-sqrt",
        UnaryOp::Rsqrt => "vjp-rsqrt",
        UnaryOp::Tanh => "vjp-tanh",
        UnaryOp::Sigmoid => "vjp-sigmoid",
        UnaryOp::Relu => "vjp-relu",
        UnaryOp::Elu => "vjp-elu",
        UnaryOp::Abs => "vjp-abs",
    }
}

fn binary_rule(b: BinaryOp) -> &'static str {
    match b {
        BinaryOp::Add => "vjp-add",
        BinaryOp::Sub => "vjp-sub",
        BinaryOp::Mul => "vjp-mul",
        BinaryOp::Div => "vjp-div",
        BinaryOp::Max => "vjp-maximum",
        BinaryOp::Min => "vjp-minimum",
    }
}

/// The gradient of `x` through `y = u(x)`.
fn unary(
    e: &mut Emitter,
    u: UnaryOp,
    x: NodeId,
    y: NodeId,
    g: NodeId,
) -> Result<NodeId, GradError> {
    Ok(match u {
        // dx = −g
        UnaryOp::Neg => e.unary(UnaryOp::Neg, g)?,
        // dx = g ∘ y
        UnaryOp::Exp => e.mul(g, y)?,
        // dx = g / x
        UnaryOp::Log => e.div(g, x)?,
        // dx = ½ g / y
        UnaryOp::Sqrt => {
            let half = e.scale(g, 0.5)?;
            e.div(half, y)?
        }
        // dx = −½ g ∘ y / x
        UnaryOp::Rsqrt => {
            let gy = e.mul(g, y)?;
            let over = e.div(gy, x)?;
            e.scale(over, -0.5)?
        }
        // dx = g ∘ (1 − y²)
        UnaryOp::Tanh => {
            let yy = e.mul(y, y)?;
            let d = e.one_minus(yy)?;
            e.mul(g, d)?
        }
        // dx = g ∘ y ∘ (1 − y)
        UnaryOp::Sigmoid => {
            let rest = e.one_minus(y)?;
            let d = e.mul(y, rest)?;
            e.mul(g, d)?
        }
        // dx = g ∘ [x > 0]
        UnaryOp::Relu => {
            let zero = e.constant(0.0)?;
            let step = e.greater(x, zero)?;
            e.mul(g, step)?
        }
        // dx = g ∘ (1 + [0 > x] ∘ y): e^x = y + 1 left of 0, 1 right of it
        UnaryOp::Elu => {
            let zero = e.constant(0.0)?;
            let left = e.greater(zero, x)?;
            let ly = e.mul(left, y)?;
            let one = e.constant(1.0)?;
            let d = e.add(one, ly)?;
            e.mul(g, d)?
        }
        // dx = g ∘ ([x > 0] − [0 > x])
        UnaryOp::Abs => {
            let zero = e.constant(0.0)?;
            let pos = e.greater(x, zero)?;
            let neg = e.greater(zero, x)?;
            let sign = e.sub(pos, neg)?;
            e.mul(g, sign)?
        }
    })
}

/// The gradients of `a` and `b` through `y = op(a, b)` at the output's (broadcast) shape,
/// for the sides `want` asks for.
fn binary(
    e: &mut Emitter,
    op: BinaryOp,
    [a, b]: [NodeId; 2],
    y: NodeId,
    g: NodeId,
    want: [bool; 2],
) -> Result<(Option<NodeId>, Option<NodeId>), GradError> {
    let (mut ga, mut gb) = (None, None);
    match op {
        // da = g, db = ±g
        BinaryOp::Add | BinaryOp::Sub => {
            ga = want[0].then_some(g);
            if want[1] {
                gb = Some(if op == BinaryOp::Add {
                    g
                } else {
                    e.unary(UnaryOp::Neg, g)?
                });
            }
        }
        // da = g ∘ b, db = g ∘ a
        BinaryOp::Mul => {
            if want[0] {
                ga = Some(e.mul(g, b)?);
            }
            if want[1] {
                gb = Some(e.mul(g, a)?);
            }
        }
        // da = g / b, db = −(g / b) ∘ y
        BinaryOp::Div => {
            let over = e.div(g, b)?;
            ga = want[0].then_some(over);
            if want[1] {
                let t = e.mul(over, y)?;
                gb = Some(e.unary(UnaryOp::Neg, t)?);
            }
        }
        // da = g ∘ w, db = g ∘ (1 − w), w = ½ (1 + [a > b] − [b > a]) (minimum: a, b swapped
        // inside w): a tie splits the gradient evenly
        BinaryOp::Max | BinaryOp::Min => {
            let (hi, lo) = if op == BinaryOp::Max { (a, b) } else { (b, a) };
            let above = e.greater(hi, lo)?;
            let below = e.greater(lo, hi)?;
            let diff = e.sub(above, below)?;
            let one = e.constant(1.0)?;
            let sum = e.add(one, diff)?;
            let w = e.scale(sum, 0.5)?;
            if want[0] {
                ga = Some(e.mul(g, w)?);
            }
            if want[1] {
                let rest = e.one_minus(w)?;
                gb = Some(e.mul(g, rest)?);
            }
        }
    }
    Ok((ga, gb))
}

/// The gradient of `x` through `y = reduce(x, axis)` (the axis kept with size 1).
fn reduce(
    e: &mut Emitter,
    op: ReduceOp,
    axis: usize,
    x: NodeId,
    y: NodeId,
    g: NodeId,
) -> Result<NodeId, GradError> {
    let shape = e.shape(x);
    match op {
        // dx = broadcast(g)
        ReduceOp::Sum => e.broadcast_to(g, &shape),
        // dx = broadcast(g / count)
        ReduceOp::Mean => {
            let count = e.axis_size(x, axis)?;
            let each = e.div(g, count)?;
            e.broadcast_to(each, &shape)
        }
        // dx = g ∘ t / sum(t), t = 1 − [x > y] − [y > x]: ties share the gradient evenly
        ReduceOp::Max => {
            let above = e.greater(x, y)?;
            let below = e.greater(y, x)?;
            let off = e.add(above, below)?;
            let tie = e.one_minus(off)?;
            let ties = e.sum(tie, axis)?;
            let each = e.div(g, ties)?;
            e.mul(each, tie)
        }
        // dx = g ∘ softmax(x, axis): zero for an all −inf lane, where exp(x − y) would be NaN
        ReduceOp::LogSumExp => {
            let p = e.op(Op::Softmax { axis }, &[x], None)?;
            e.mul(g, p)
        }
    }
}
