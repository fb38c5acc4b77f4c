//! Writing the fused gradient ops out as plain IR: the gradient graph of the fused op's plain
//! form (`crate::fused::expand`), for engines without a fused backward kernel at some shape
//! or score form. The operand differentiated is read through an identity (`sum-to` to its
//! own shape), so the result is the partial derivative for that operand slot even when the
//! same value fills several slots (self-attention `attention(x, x, x)`).

use super::{AttentionGrad, BackwardOp, LinearGrad};
use crate::build::GraphBuilder;
use crate::graph::NodeId;
use crate::op::Op;

/// The plain gradient graph of `op` over `args`, or `None` for the ops that are plain
/// already (`sum-to`, `greater`).
pub fn expand(
    b: &mut GraphBuilder,
    op: &BackwardOp,
    args: &[NodeId],
) -> Result<Option<NodeId>, String> {
    match op {
        BackwardOp::SumTo | BackwardOp::Greater | BackwardOp::Unpool { .. } => Ok(None),
        BackwardOp::Attention(a) => attention(b, a, args).map(Some),
        BackwardOp::Linear(l) => linear(b, l, args).map(Some),
    }
}

/// `args` with slot `wrt` replaced by an identity of it: `(operands, the identity)`.
fn isolate(
    b: &mut GraphBuilder,
    args: &[NodeId],
    wrt: usize,
) -> Result<(Vec<NodeId>, NodeId), String> {
    let x = *args.get(wrt).ok_or("no such operand")?;
    let shape = b.graph.node(x).shape.clone();
    let own = b.add(Op::Backward(BackwardOp::SumTo), &[x], Some(&shape))?;
    let mut operands = args.to_vec();
    operands[wrt] = own;
    Ok((operands, own))
}

/// The gradient of a fused attention over `[q, k, v, biases.., o, dO]` through its plain
/// form (`o` is not read: the plain form recomputes it).
fn attention(b: &mut GraphBuilder, a: &AttentionGrad, args: &[NodeId]) -> Result<NodeId, String> {
    let forward = a.attention.arity();
    if args.len() != a.arity() {
        return Err(format!("attention-grad takes {} operands", a.arity()));
    }
    let (operands, own) = isolate(b, &args[..forward], a.wrt)?;
    let y = crate::fused::expand::attention(b, &a.attention, &operands)?;
    let through_o =
        crate::grad::gradient_of(b, y, args[forward + 1], own).map_err(|e| e.to_string())?;
    if !a.lse_cotangent {
        return Ok(through_o);
    }
    let lse = crate::fused::Attention {
        lse: true,
        ..a.attention.clone()
    };
    let y = crate::fused::expand::attention(b, &lse, &operands)?;
    let through_lse =
        crate::grad::gradient_of(b, y, args[forward + 2], own).map_err(|e| e.to_string())?;
    b.add(
        crate::op::Op::Binary(crate::op::BinaryOp::Add),
        &[through_o, through_lse],
        None,
    )
    .map_err(|e| e.to_string())
}

/// The gradient of a linear attention over `[q, k, v, dO]` through its plain form.
fn linear(b: &mut GraphBuilder, l: &LinearGrad, args: &[NodeId]) -> Result<NodeId, String> {
    let [q, k, v, d_o] = args else {
        return Err("linear-attention-grad takes 4 operands".to_string());
    };
    let (operands, own) = isolate(b, &[*q, *k, *v], l.wrt)?;
    let y = crate::fused::expand::linear(b, &l.linear, &operands)?;
    crate::grad::gradient_of(b, y, *d_o, own).map_err(|e| e.to_string())
}
