//! `attention-lse` back to IR: a fused attention with `lse` set, over the operands of the
//! `attention` beside it when the extracted term has one (same `q`, `k`, scale and pattern),
//! so the planner runs both from one kernel pass.

use super::pattern_of;
use super::to_ir::same_term;
use crate::lang::Attn;
use crate::score::{scalar, TermView};
use attnc_ir::build::GraphBuilder;
use attnc_ir::{Attention, NodeId, Op, Precision, ScoreExpr};
use egg::{Id, RecExpr};

/// Builds `(attention-lse q k s p)` of `expr` over the already built operands `built`.
pub(super) fn build(
    b: &mut GraphBuilder,
    expr: &RecExpr<Attn>,
    [q, k, s, p]: [Id; 4],
    built: &[Option<NodeId>],
) -> Result<NodeId, String> {
    let value = |id: Id| {
        built
            .get(usize::from(id))
            .copied()
            .flatten()
            .ok_or_else(|| "an operand is not a value".to_string())
    };
    let same = |a: Id, c: Id| same_term(expr, a, c);
    let v = match partner_values(b, expr, [q, k, s, p], built, false) {
        Some(v) => v,
        None => value(k)?,
    };
    let view = TermView {
        node: |id: Id| Some(&expr[id]),
        same,
        relpos_fits: |_: Id| false,
    };
    let mut args = vec![value(q)?, value(k)?, v];
    // As `attention`: a scale known at compile time folds into the score, a run-time one is
    // a bias operand (the same in both, so the pair's operands stay equal).
    let score = match scalar(s, &view, 0) {
        Some(ScoreExpr::Const(1.0)) => ScoreExpr::Scores,
        Some(scale) => ScoreExpr::scaled(scale),
        None => {
            args.push(value(s)?);
            ScoreExpr::scaled(ScoreExpr::Bias(0))
        }
    };
    let mut segments = Vec::new();
    let op = Attention {
        score,
        mask: pattern_of(expr, p, &mut segments).map_err(|e| e.to_string())?,
        precision: Precision::Exact,
        lse: true,
    };
    // A document's ids follow, as for `attention` (so the pair's operands stay equal).
    for s in segments {
        args.push(value(s)?);
    }
    b.add(Op::Attention(Box::new(op)), &args, None)
}

/// The values of the attention beside a log-sum-exp `[q, k, s, p]` (an `attention`, or an
/// `attention-scored` when `scored`, over the same q, k, score and pattern), when they are a
/// parameter or built already: the log-sum-exp node then takes the same operands, so the
/// planner pairs the two. `None` without a partner (k then stands in for v, its shape fits,
/// and the kernel's rows are dropped).
pub(super) fn partner_values(
    b: &GraphBuilder,
    expr: &RecExpr<Attn>,
    [q, k, s, p]: [Id; 4],
    built: &[Option<NodeId>],
    scored: bool,
) -> Option<NodeId> {
    let same = |a: Id, c: Id| same_term(expr, a, c);
    let built_value = |id: Id| built.get(usize::from(id)).copied().flatten();
    // A parameter is a node of the graph from the start, whatever the term's order.
    let param = |id: Id| match &expr[id] {
        Attn::Input(name) => {
            let atom = expr[*name].atom()?;
            let name = atom.as_name()?;
            b.graph.topo_order().into_iter().find(
                |&n| matches!(&b.graph.node(n).op, Op::Input { name: p, .. } if p.as_str() == name),
            )
        }
        _ => None,
    };
    expr.as_ref().iter().find_map(|n| {
        let [q2, k2, v2, s2, p2] = match n {
            Attn::Attention(c) if !scored => *c,
            Attn::AttentionScored(c) if scored => *c,
            _ => return None,
        };
        (same(q2, q) && same(k2, k) && same(s2, s) && same(p2, p))
            .then(|| built_value(v2).or_else(|| param(v2)))
            .flatten()
    })
}
