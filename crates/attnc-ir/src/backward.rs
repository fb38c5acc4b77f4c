//! The ops only gradient graphs contain ([`crate::grad`] builds them; the interpreter's
//! `interp/backward.rs` gives their semantics).
//!
//! - [`BackwardOp::SumTo`]: the adjoint of broadcasting — sums its operand over the axes a
//!   broadcast added (leading axes) or stretched (size 1 in this node's shape), down to this
//!   node's shape.
//! - [`BackwardOp::Greater`]: `1` where `a > b`, `0` where not, NaN where either is NaN — the
//!   derivatives of `relu`, `abs`, `maximum`, `minimum` and `max` are written with it.
//! - [`BackwardOp::Attention`]: one gradient of a fused attention, over operands
//!   `[q, k, v, bias₀.., o, dO]` where `o` is the attention's own output (the engines use it
//!   for FlashAttention-2's `D = rowsum(dO ∘ o)` instead of recomputing it) and `dO` the
//!   gradient of `o`; with `lse_cotangent`, one more operand `dlse` (`[batch.., m, 1]`), the
//!   gradient of the attention's row log-sum-exp, so that `D = rowsum(dO ∘ o) − dlse` (the
//!   log-sum-exp's own gradient is `dX = P ∘ dlse`). Its value is the gradient with respect to
//!   operand `wrt`, summed over the
//!   axes that operand was broadcast along (so grouped-query keys get the sum over the heads
//!   that share them, and a per-head ALiBi slope the sum over its scores).
//! - [`BackwardOp::Linear`]: one gradient of a linear attention, over `[q, k, v, dO]`, summed
//!   down to the operand's shape the same way.
//! - [`BackwardOp::Unpool`]: the gradient of `mean_pool` / `max_pool` over `[x, dy]`: each
//!   block's gradient spread back over its rows, divided by the block's row count (mean), or
//!   given whole to the block's first row that attains the maximum in each column (max; a NaN
//!   maximum goes to the first NaN), zeros elsewhere.
//!
//! The fused gradients share the forward's masking rules: a masked-out score gets a zero
//! gradient (by replacement, so a NaN there reaches no gradient), and a row that keeps no key
//! contributes nothing.

pub mod expand;

use crate::dim::{Dim, Shape};
use crate::fused::{Attention, Fused, LinearAttention};
use crate::op::PoolOp;
use serde::Serialize;
use std::fmt;

/// One op of a gradient graph (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum BackwardOp {
    /// Sums the operand down to this node's shape (one operand).
    SumTo,
    /// `a > b` as `1` or `0`, NaN where either is NaN, with broadcasting (two operands).
    Greater,
    /// One gradient of a fused attention over `[q, k, v, biases.., o, dO]` (and `dlse`).
    Attention(Box<AttentionGrad>),
    /// One gradient of a linear attention over `[q, k, v, dO]`.
    Linear(LinearGrad),
    /// The gradient of a pooling over `[x, dy]` (see the module docs).
    Unpool {
        /// The forward pooling.
        op: PoolOp,
        /// Its rows per block.
        size: Dim,
    },
}

/// The gradient of a fused attention with respect to one of its operands.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AttentionGrad {
    /// The forward attention (its precision is ignored: gradients are exact).
    pub attention: Attention,
    /// The operand slot differentiated: 0 q, 1 k, 2 v, `3 + k` bias `k`.
    pub wrt: usize,
    /// Whether a last operand `dlse`, the gradient of the row log-sum-exp, follows `dO`.
    pub lse_cotangent: bool,
}

impl AttentionGrad {
    /// Its operand count: the attention's, `o`, `dO` (and `dlse`).
    pub fn arity(&self) -> usize {
        self.attention.arity() + 2 + usize::from(self.lse_cotangent)
    }
}

/// The gradient of a linear attention with respect to one of its operands.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LinearGrad {
    /// The forward linear attention.
    pub linear: LinearAttention,
    /// The operand slot differentiated: 0 q, 1 k, 2 v.
    pub wrt: usize,
}

/// The name of operand slot `slot` of a fused attention: `q`, `k`, `v`, `b0`, `b1`, …
pub fn slot_name(slot: usize) -> String {
    match slot {
        0 => "q".to_string(),
        1 => "k".to_string(),
        2 => "v".to_string(),
        k => format!("b{}", k - 3),
    }
}

impl BackwardOp {
    /// How many operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            BackwardOp::SumTo => 1,
            BackwardOp::Greater | BackwardOp::Unpool { .. } => 2,
            BackwardOp::Attention(a) => a.arity(),
            BackwardOp::Linear(_) => 4,
        }
    }

    /// The symbolic shape of the op over operands of `shapes` (`given`: the shape a
    /// [`BackwardOp::SumTo`] sums down to).
    pub fn output_shape(&self, shapes: &[&Shape], given: Option<&Shape>) -> Result<Shape, String> {
        if shapes.len() != self.arity() {
            return Err(format!(
                "{self} takes {} operands, not {}",
                self.arity(),
                shapes.len()
            ));
        }
        match self {
            BackwardOp::SumTo => {
                let to = given.ok_or("sum-to needs the shape it sums to")?;
                if sums_to(shapes[0], to) {
                    Ok(to.clone())
                } else {
                    Err(format!(
                        "sum-to: {} does not sum to {}",
                        crate::dim::format_shape(shapes[0]),
                        crate::dim::format_shape(to)
                    ))
                }
            }
            BackwardOp::Greater => crate::build::broadcast(shapes[0], shapes[1])
                .ok_or_else(|| "greater: the shapes do not broadcast".to_string()),
            BackwardOp::Unpool { .. } => {
                let (x, dy) = (shapes[0], shapes[1]);
                let rank = x.len();
                if rank < 2
                    || dy.len() != rank
                    || x[..rank - 2] != dy[..rank - 2]
                    || x[rank - 1] != dy[rank - 1]
                {
                    return Err(format!(
                        "{}: the gradient {} is not a pooling of {}",
                        mnemonic(self),
                        crate::dim::format_shape(dy),
                        crate::dim::format_shape(x)
                    ));
                }
                Ok(x.clone())
            }
            BackwardOp::Attention(a) => {
                let forward = &shapes[..a.attention.arity()];
                let out = crate::fused::output_shape(Fused::Attention(&a.attention), forward)?;
                let [o, d_o] = [shapes[forward.len()], shapes[forward.len() + 1]];
                if *o != out || *d_o != out {
                    return Err(format!(
                        "attention-grad: o and dO must have the output's shape {}",
                        crate::dim::format_shape(&out)
                    ));
                }
                if a.lse_cotangent {
                    let mut rows = out.clone();
                    if let Some(last) = rows.last_mut() {
                        *last = Dim::Const(1);
                    }
                    if *shapes[forward.len() + 2] != rows {
                        return Err(format!(
                            "attention-grad: dlse must have the log-sum-exp's shape {}",
                            crate::dim::format_shape(&rows)
                        ));
                    }
                }
                forward
                    .get(a.wrt)
                    .map(|s| (*s).clone())
                    .ok_or_else(|| format!("attention-grad: no operand {}", slot_name(a.wrt)))
            }
            BackwardOp::Linear(l) => {
                let out = crate::fused::output_shape(Fused::Linear(&l.linear), &shapes[..3])?;
                if *shapes[3] != out {
                    return Err(format!(
                        "linear-attention-grad: dO must have the output's shape {}",
                        crate::dim::format_shape(&out)
                    ));
                }
                shapes
                    .get(l.wrt)
                    .filter(|_| l.wrt < 3)
                    .map(|s| (*s).clone())
                    .ok_or_else(|| "linear-attention-grad: no such operand".to_string())
            }
        }
    }
}

/// Whether a value of shape `from` sums to shape `to`: `to` has at most `from`'s rank and each
/// of its axes (aligned at the end) equals `from`'s or is 1.
pub fn sums_to(from: &[Dim], to: &[Dim]) -> bool {
    to.len() <= from.len()
        && to
            .iter()
            .zip(&from[from.len() - to.len()..])
            .all(|(t, f)| t == f || t.is_one())
}

/// The op's mnemonic in IR text: `sum-to`, `greater`, `attention-grad`,
/// `linear-attention-grad`.
pub fn mnemonic(op: &BackwardOp) -> &'static str {
    match op {
        BackwardOp::SumTo => "sum-to",
        BackwardOp::Greater => "greater",
        BackwardOp::Unpool {
            op: PoolOp::Mean, ..
        } => "mean-unpool",
        BackwardOp::Unpool {
            op: PoolOp::Max, ..
        } => "max-unpool",
        BackwardOp::Attention(_) => "attention-grad",
        BackwardOp::Linear(_) => "linear-attention-grad",
    }
}

/// The op's attributes in IR text (after its operands).
pub fn attributes(op: &BackwardOp) -> Vec<String> {
    match op {
        BackwardOp::SumTo | BackwardOp::Greater => Vec::new(),
        BackwardOp::Unpool { size, .. } => vec![format!("size={size}")],
        BackwardOp::Attention(a) => vec![a.to_string()],
        BackwardOp::Linear(l) => vec![l.to_string()],
    }
}

/// The operand slot named `name` (`q`, `k`, `v`, `b0`, …), the inverse of [`slot_name`].
pub fn parse_slot(name: &str) -> Option<usize> {
    match name {
        "q" => Some(0),
        "k" => Some(1),
        "v" => Some(2),
        b => b.strip_prefix('b')?.parse::<usize>().ok()?.checked_add(3),
    }
}

impl fmt::Display for BackwardOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackwardOp::SumTo => f.write_str("sum-to"),
            BackwardOp::Greater => f.write_str("greater"),
            BackwardOp::Unpool { size, .. } => write!(f, "{} size={size}", mnemonic(self)),
            BackwardOp::Attention(a) => write!(f, "attention-grad {a}"),
            BackwardOp::Linear(l) => write!(f, "linear-attention-grad {l}"),
        }
    }
}

impl fmt::Display for AttentionGrad {
    /// `wrt=k, score=(mul s 0.125), mask=causal` (`wrt=k, lse-cotangent, score=…` with a
    /// `dlse` operand).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wrt={}, ", slot_name(self.wrt))?;
        if self.lse_cotangent {
            f.write_str("lse-cotangent, ")?;
        }
        write!(f, "{}", self.attention)
    }
}

impl fmt::Display for LinearGrad {
    /// `wrt=q, causal, eps=1e-6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wrt={}, {}", slot_name(self.wrt), self.linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::ScoreExpr;

    fn dims(spec: &str) -> Shape {
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| match s.trim().parse::<u64>() {
                Ok(v) => Dim::Const(v),
                Err(_) => Dim::Sym(s.trim().to_string()),
            })
            .collect()
    }

    #[test]
    fn sum_to_drops_leading_axes_and_keeps_ones() {
        assert!(sums_to(&dims("h, n, d"), &dims("n, d")));
        assert!(sums_to(&dims("h, n, d"), &dims("1, n, 1")));
        assert!(sums_to(&dims("h, n, d"), &dims("")));
        assert!(!sums_to(&dims("h, n, d"), &dims("n, n")));
        assert!(!sums_to(&dims("n, d"), &dims("h, n, d")));
        let op = BackwardOp::SumTo;
        let out = op
            .output_shape(&[&dims("h, n, d")], Some(&dims("1, d")))
            .expect("sums");
        assert_eq!(out, dims("1, d"));
        assert!(op.output_shape(&[&dims("h, n, d")], None).is_err());
    }

    #[test]
    fn attention_gradients_take_their_operand_shape() {
        let a = Attention::scaled(ScoreExpr::Const(0.5), None);
        let grad = BackwardOp::Attention(Box::new(AttentionGrad {
            attention: a,
            wrt: 1,
            lse_cotangent: false,
        }));
        assert_eq!(grad.arity(), 5);
        let (q, k, v, o) = (
            dims("h, m, d"),
            dims("1, n, d"),
            dims("1, n, e"),
            dims("h, m, e"),
        );
        let out = grad
            .output_shape(&[&q, &k, &v, &o, &o], None)
            .expect("fits");
        assert_eq!(out, k);
        assert!(grad.output_shape(&[&q, &k, &v, &o, &q], None).is_err());
        assert_eq!(grad.to_string(), "attention-grad wrt=k, score=(mul s 0.5)");
    }
}
