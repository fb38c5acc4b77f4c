//! The approximate rule families. They are not equalities: each one is added to the e-graph
//! only when the policy allows its approximation (see [`crate::approx`]), and each is tested
//! by the error it measures against the exact form, not by equality.
//!
//! - precision: `attention(q, k, v, s, p) ≈ attention(bf16(q), bf16(k), bf16(v), s, p)`;
//! - int8: `attention(q, k, v, s, p) ≈ attention-int8(q, k, v, s, p)`;
//! - Performer FAVOR+: `attention(q, k, v, s, all) ≈ linear-attention(φ(q√s), φ(k√s), v)`
//!   with `φ(x) = exp(x wᵀ - |x|²/2)` for `m` orthogonal Gaussian features `w`, since
//!   `exp(q·k) = E_w[exp(w·q - |q|²/2) exp(w·k - |k|²/2)]`; with a causal mask, the same
//!   features feed `linear-attention-causal` (a running prefix state);
//! - Linformer: `attention(q, k, v, s, all) ≈ attention(q, e k, e v, s, all)` with `e` a seeded
//!   `[r, n]` Gaussian projection along the sequence (one matrix for keys and values).

use super::AttnRewrite;
use crate::analysis::{AttnGraph, ShapeAnalysis};
use crate::approx::Approx;
use crate::lang::Attn;
use egg::{Condition, ConditionalApplier, Id, Pattern, Rewrite, Subst, Var};

/// The rules of one approximation.
pub fn rules(approx: &Approx) -> Vec<AttnRewrite> {
    match *approx {
        Approx::Bf16 => vec![precision("approx-bf16-storage", "bf16")],
        Approx::F16 => vec![precision("approx-f16-storage", "f16")],
        Approx::Int8 => vec![rewrite(
            "approx-int8-products",
            "(attention ?q ?k ?v ?s ?p)",
            "(attention-int8 ?q ?k ?v ?s ?p)",
            Check::Always,
        )],
        Approx::Bf16Products => vec![rewrite(
            "approx-bf16-products",
            "(attention ?q ?k ?v ?s ?p)",
            "(attention-bf16 ?q ?k ?v ?s ?p)",
            Check::Always,
        )],
        Approx::RandomFeatures { m, seed } => {
            let features = format!(
                "(favor-query (mul ?q (sqrt ?s)) {seed} {m}) (favor-key (mul ?k (sqrt ?s)) {seed} {m})"
            );
            vec![
                rewrite(
                    "approx-favor",
                    "(attention ?q ?k ?v ?s all)",
                    &format!("(linear-attention {features} ?v (const 0))"),
                    Check::PositiveScale,
                ),
                // The causal form runs as a prefix state (FAVOR+'s unidirectional variant).
                rewrite(
                    "approx-favor-causal",
                    "(attention ?q ?k ?v ?s causal)",
                    &format!("(linear-attention-causal {features} ?v (const 0))"),
                    Check::PositiveScale,
                ),
            ]
        }
        Approx::LowRank { r, seed } => vec![rewrite(
            "approx-linformer",
            "(attention ?q ?k ?v ?s all)",
            &format!(
                "(attention ?q (project-rows ?k {seed} {r}) (project-rows ?v {seed} {r}) ?s all)"
            ),
            Check::MoreRowsThan(r),
        )],
    }
}

/// Rounds the three operands of a fused attention to a storage type.
fn precision(name: &'static str, dtype: &str) -> AttnRewrite {
    rewrite(
        name,
        "(attention ?q ?k ?v ?s ?p)",
        &format!("(attention (cast ?q {dtype}) (cast ?k {dtype}) (cast ?v {dtype}) ?s ?p)"),
        Check::NotCast,
    )
}

/// Side conditions of the approximate rules.
#[derive(Clone, Copy, Debug)]
enum Check {
    Always,
    /// `?s` is a known positive scalar (its square root scales q and k).
    PositiveScale,
    /// `?k` has more than this many rows (a projection to fewer rows is a reduction, and the
    /// rule cannot apply to its own result).
    MoreRowsThan(u64),
    /// None of `?q`, `?k`, `?v` is already rounded (the rule cannot apply to its own result).
    NotCast,
}

#[derive(Clone, Debug)]
struct CheckVars {
    check: Check,
    q: Var,
    k: Var,
    v: Var,
    s: Var,
}

impl Condition<Attn, ShapeAnalysis> for CheckVars {
    fn check(&self, egraph: &mut AttnGraph, _eclass: Id, subst: &Subst) -> bool {
        let class = |var: Var| subst.get(var).map(|&id| &egraph[id]);
        match self.check {
            Check::Always => true,
            Check::PositiveScale => class(self.s)
                .and_then(|c| c.data.konst)
                .is_some_and(|s| s > 0.0),
            Check::MoreRowsThan(r) => class(self.k)
                .and_then(|c| c.data.shape.as_ref())
                .and_then(|s| s.iter().rev().nth(1).copied())
                .is_some_and(|rows| rows as u64 > r),
            Check::NotCast => [self.q, self.k, self.v].into_iter().all(|var| {
                class(var).is_some_and(|c| !c.nodes.iter().any(|n| matches!(n, Attn::Cast(_))))
            }),
        }
    }
}

fn var(name: &str) -> Var {
    name.parse().expect("invariant: variable names are valid")
}

fn rewrite(name: &'static str, lhs: &str, rhs: &str, check: Check) -> AttnRewrite {
    let lhs: Pattern<Attn> = lhs
        .parse()
        .expect("invariant: approximate patterns are valid");
    let rhs: Pattern<Attn> = rhs
        .parse()
        .expect("invariant: approximate patterns are valid");
    let condition = CheckVars {
        check,
        q: var("?q"),
        k: var("?k"),
        v: var("?v"),
        s: var("?s"),
    };
    let applier = ConditionalApplier {
        condition,
        applier: rhs,
    };
    Rewrite::new(name, lhs, applier).expect("invariant: approximate rule variables are bound")
}
