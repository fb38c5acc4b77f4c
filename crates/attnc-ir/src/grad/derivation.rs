//! The record of how a gradient graph was derived: one step per forward node the sweep
//! visited, naming the rule, its math and the nodes it added (what `attnc explain --grad`
//! prints).

use super::Vjp;
use crate::graph::NodeId;
use serde::Serialize;
use std::fmt::Write;

/// One rule applied to one forward node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DerivationStep {
    /// The forward node.
    #[serde(serialize_with = "index")]
    pub node: NodeId,
    /// Its op, printed.
    pub op: String,
    /// The rule (`vjp-matmul`).
    pub rule: &'static str,
    /// The node holding the forward node's gradient when the rule ran.
    #[serde(serialize_with = "index")]
    pub gradient: NodeId,
    /// `(operand, contribution)` per operand that received a gradient.
    #[serde(serialize_with = "pairs")]
    pub contributions: Vec<(NodeId, NodeId)>,
}

fn index<S: serde::Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(id.index() as u64)
}

fn pairs<S: serde::Serializer>(list: &[(NodeId, NodeId)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(list.len()))?;
    for (a, b) in list {
        seq.serialize_element(&[a.index(), b.index()])?;
    }
    seq.end()
}

/// The math of a rule (`g` is the node's gradient, `y` its value, `x`, `a`, `b` its operands).
pub fn rule_math(rule: &str) -> &'static str {
    match rule {
        "vjp-input" => "the parameter's gradient: the sum of its contributions",
        "vjp-constant" => "no gradient",
        "vjp-neg" => "dx = −g",
        "vjp-exp" => "dx = g ∘ y",
        "vjp-log" => "dx = g / x",
        "vjp-sqrt" => "dx = ½ g / y",
        "vjp-rsqrt" => "dx = −½ g ∘ y / x",
        "vjp-tanh" => "dx = g ∘ (1 − y²)",
        "vjp-sigmoid" => "dx = g ∘ y ∘ (1 − y)",
        "vjp-relu" => "dx = g ∘ [x > 0]",
        "vjp-elu" => "dx = g ∘ (1 + [0 > x] ∘ y)",
        "vjp-abs" => "dx = g ∘ ([x > 0] − [0 > x])",
        "vjp-add" => "da = sum-to(g), db = sum-to(g)",
        "vjp-sub" => "da = sum-to(g), db = sum-to(−g)",
        "vjp-mul" => "da = sum-to(g ∘ b), db = sum-to(g ∘ a)",
        "vjp-div" => "da = sum-to(g / b), db = sum-to(−(g / b) ∘ y)",
        "vjp-maximum" => "da = sum-to(g ∘ w), db = sum-to(g ∘ (1 − w)), w = ½(1 + [a > b] − [b > a])",
        "vjp-minimum" => "da = sum-to(g ∘ w), db = sum-to(g ∘ (1 − w)), w = ½(1 + [b > a] − [a > b])",
        "vjp-matmul" => "da = sum-to(g @ bᵀ), db = sum-to(aᵀ @ g)",
        "vjp-transpose" => "dx = gᵀ",
        "vjp-sum" => "dx = broadcast(g)",
        "vjp-mean" => "dx = broadcast(g / count)",
        "vjp-max" => "dx = g ∘ t / sum(t), t = [x = y] (ties share)",
        "vjp-softmax" => "dx = y ∘ (g − sum(g ∘ y, axis))",
        "vjp-mask" => "dx = mask(g, pattern, 0)",
        "vjp-cast" => "dx = g (straight through)",
        "vjp-attention" => {
            "FlashAttention-2 from the output o: P = softmax(mask(score(q kᵀ))), D = rowsum(dO ∘ o), \
             dX = P ∘ (dO vᵀ − D), dS = dX ∘ ∂score/∂s, dq = dS k, dk = dSᵀ q, dv = Pᵀ dO, \
             dbias = sum-to(dX ∘ ∂score/∂bias)"
        }
        "vjp-linear-attention" => {
            "through the key-value state: dq from the prefix state, dk and dv from the reverse \
             prefix of q ⊗ (dO / den) (O(n))"
        }
        "vjp-sum-to" => "dx = broadcast(g)",
        "vjp-greater" => "piecewise constant: no gradient",
        "vjp-attention-and-lse" => "FlashAttention-2 for the attention and its log-sum-exp at once: D = rowsum(dO ∘ o) − dlse, dX = P ∘ (dO vᵀ − D), dq = dS k, dk = dSᵀ q, dv = Pᵀ dO",
        "vjp-attention-lse" => "FlashAttention-2 with dP = 0, D = −g: dX = P ∘ g (as attention-grad over v = 0 with the log-sum-exp cotangent g), dq = dS k, dk = dSᵀ q",
        "vjp-pool" => {
            "dx = each block's g over its rows: / rows (mean), to the first row at the maximum (max)"
        }
        _ => "",
    }
}

impl Vjp {
    /// The derivation as text, one step a line: `%7 softmax axis=2  vjp-softmax  dx = … →
    /// d%6 += %21`.
    pub fn render_derivation(&self) -> String {
        let mut out = String::new();
        for step in &self.derivation {
            let _ = write!(
                out,
                "%{} {}: {} with g = %{}",
                step.node.index(),
                step.op,
                step.rule,
                step.gradient.index()
            );
            let adds: Vec<String> = step
                .contributions
                .iter()
                .map(|(o, c)| format!("d%{} += %{}", o.index(), c.index()))
                .collect();
            if !adds.is_empty() {
                let _ = write!(out, "  →  {}", adds.join(", "));
            }
            out.push('\n');
            let math = rule_math(step.rule);
            if !math.is_empty() {
                let _ = writeln!(out, "    {math}");
            }
        }
        for g in &self.gradients {
            let _ = writeln!(out, "d{} = %{}", g.name, g.node.index());
        }
        out
    }
}
