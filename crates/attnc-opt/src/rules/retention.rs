//! Decayed causal linear attention (RetNet's retention) in kernel form. The quadratic form
//!
//! ```text
//! A = mask((q kᵀ) * exp(a * relpos(m, n)), causal, 0);   out = A v   (or A v / (sum(A, -1) + eps))
//! ```
//!
//! weighs key `j` in row `i` by `exp(a (j − i')) = γ^(i' − j)` with `γ = exp(-a)`, so
//! `out_i = q_i S_i` with the prefix state `S_i = γ S_{i−1} + k_{i'} v_{i'}ᵀ`: O(n·d·dv) instead
//! of O(n²·d), and no `m × n` buffer. The rules fuse it into `retention` /
//! `retention-normalized`, the IR's causal `linear-attention` with [`attnc_ir::Decay::Slope`].
//!
//! Side conditions ([`Guard::CausalDecay`]): `relpos(m, n)` spans exactly the scores (a
//! `relpos` that broadcasts along an axis would give every row the same distances), and the
//! slope `a` is one number per batch entry — a scalar or size 1 in its last two axes — that
//! does not enlarge the scores. Queries are end-aligned to the keys as everywhere
//! (`i' = i + n − m`, `relpos` and `causal` agree), so the rules hold for `m ≠ n`. Only fill 0
//! is matched, as for the undecayed prefix rules.
//!
//! Gated (data-dependent) decay, `A = mask((q kᵀ) * exp(c - cᵀ), causal, 0)` with `c`
//! `[.., n, 1]` (the running sum of log gates: gated linear attention, Mamba-2's scalar decay),
//! weighs key `j` in row `i` by `exp(c_i − c_j)`: the rules `gated-retention-fuse*` make it
//! [`attnc_ir::Decay::Gate`], a prefix state decaying by `exp(c_j − c_{j−1})` at key `j`.
//! Written `exp(cq − ckᵀ)` with the queries' and the keys' log decays apart (`cq` `[.., m, 1]`,
//! e.g. the last `m` entries of `ck` when decoding), the same holds for `m ≠ n`: row `i`
//! weighs key `j ≤ i'` by `exp(cq_i − ck_j)`.

use super::{broadcasts_into, var, AttnRewrite, DecayForm, Guard, RuleSpec};
use crate::analysis::{matmul_shape, transposed, AttnGraph, ShapeAnalysis};
use crate::lang::Attn;
use egg::{Condition, Id, Subst, Var};

/// The decayed causal scores the rules match.
macro_rules! decayed {
    () => {
        "(mask (mul (matmul ?q (transpose ?k)) (exp (mul ?a (relpos ?m ?n)))) causal 0)"
    };
}

/// The gated (data-dependent) decayed scores the rules match.
macro_rules! gated {
    () => {
        "(mask (mul (matmul ?q (transpose ?k)) (exp (sub ?cq (transpose ?ck)))) causal 0)"
    };
}

/// The retention family.
pub fn specs() -> Vec<RuleSpec> {
    let guard = |axis, eps| Guard::CausalDecay {
        q: "?q",
        k: "?k",
        slope: "?a",
        form: DecayForm::Relpos {
            rows: "?m",
            cols: "?n",
        },
        axis,
        eps,
    };
    let gated = |axis, eps| Guard::CausalDecay {
        q: "?q",
        k: "?k",
        slope: "?cq",
        form: DecayForm::Gate { keys: "?ck" },
        axis,
        eps,
    };
    vec![
        // A v = retention(q, k, v, a), A = mask((q kᵀ) ∘ exp(a relpos(m, n)), causal, 0),
        // a one number per batch entry
        RuleSpec::guarded(
            "retention-fuse",
            concat!("(matmul ", decayed!(), " ?v)"),
            "(retention ?q ?k ?v ?a)",
            guard(None, None),
        ),
        // (A v) / sum(A, -1) = retention-normalized(q, k, v, a, 0), A as above
        RuleSpec::guarded(
            "retention-fuse-normalized",
            concat!(
                "(div (matmul ",
                decayed!(),
                " ?v) (sum ",
                decayed!(),
                " ?ax))"
            ),
            "(retention-normalized ?q ?k ?v ?a (const 0))",
            guard(Some("?ax"), None),
        ),
        // (A v) / (sum(A, -1) + eps) = retention-normalized(q, k, v, a, eps) for a finite
        // scalar eps, A as above
        RuleSpec::guarded(
            "retention-fuse-eps",
            concat!(
                "(div (matmul ",
                decayed!(),
                " ?v) (add (sum ",
                decayed!(),
                " ?ax) ?e))"
            ),
            "(retention-normalized ?q ?k ?v ?a ?e)",
            guard(Some("?ax"), Some("?e")),
        ),
        // A v = gated-retention(q, k, v, cq, ck), A = mask((q kᵀ) ∘ exp(cq − ckᵀ), causal, 0),
        // cq [.., m, 1] and ck [.., n, 1] per position (running sums of log gates)
        RuleSpec::guarded(
            "gated-retention-fuse",
            concat!("(matmul ", gated!(), " ?v)"),
            "(gated-retention ?q ?k ?v ?cq ?ck)",
            gated(None, None),
        ),
        // (A v) / sum(A, -1) = gated-retention-normalized(q, k, v, cq, ck, 0), A as above
        RuleSpec::guarded(
            "gated-retention-fuse-normalized",
            concat!("(div (matmul ", gated!(), " ?v) (sum ", gated!(), " ?ax))"),
            "(gated-retention-normalized ?q ?k ?v ?cq ?ck (const 0))",
            gated(Some("?ax"), None),
        ),
        // (A v) / (sum(A, -1) + eps) = gated-retention-normalized(q, k, v, cq, ck, eps) for a
        // finite scalar eps, A as above
        RuleSpec::guarded(
            "gated-retention-fuse-eps",
            concat!(
                "(div (matmul ",
                gated!(),
                " ?v) (add (sum ",
                gated!(),
                " ?ax) ?e))"
            ),
            "(gated-retention-normalized ?q ?k ?v ?cq ?ck ?e)",
            gated(Some("?ax"), Some("?e")),
        ),
    ]
}

/// The rewrite of a rule guarded by [`Guard::CausalDecay`].
pub(super) fn rewrite(spec: &RuleSpec) -> AttnRewrite {
    let Guard::CausalDecay {
        q,
        k,
        slope,
        form,
        axis,
        eps,
    } = spec.guard
    else {
        unreachable!("invariant: only CausalDecay rules are built here")
    };
    spec.guarded_by(DecayCheck {
        q: var(q),
        k: var(k),
        slope: var(slope),
        form: match form {
            DecayForm::Relpos { rows, cols } => CheckForm::Relpos {
                rows: var(rows),
                cols: var(cols),
            },
            DecayForm::Gate { keys } => CheckForm::Gate { keys: var(keys) },
        },
        axis: axis.map(var),
        eps: eps.map(var),
    })
}

/// [`Guard::CausalDecay`] as an egg [`Condition`]: the scores `q kᵀ` are `[.., m, n]`, the
/// `relpos` dimensions are `m` and `n` and the slope is one number per batch entry, or the
/// log decays are `[.., m, 1]` and `[.., n, 1]`; either fits in the scores; the sum (if any)
/// runs along the keys and `eps` (if any) is a finite scalar.
#[derive(Clone, Debug)]
pub struct DecayCheck {
    q: Var,
    k: Var,
    slope: Var,
    form: CheckForm,
    axis: Option<Var>,
    eps: Option<Var>,
}

/// [`DecayForm`] with its variables parsed.
#[derive(Clone, Copy, Debug)]
enum CheckForm {
    Relpos { rows: Var, cols: Var },
    Gate { keys: Var },
}

impl DecayCheck {
    fn holds(&self, egraph: &AttnGraph, subst: &Subst) -> Option<bool> {
        let data = |v: Var| subst.get(v).map(|&id: &Id| &egraph[id].data);
        let shape = |v: Var| data(v).and_then(|d| d.shape.clone());
        let scores = matmul_shape(&shape(self.q)?, &transposed(&shape(self.k)?)?)?;
        let rank = scores.len();
        let (m, n) = (scores[rank - 2] as u64, scores[rank - 1] as u64);
        let an: &ShapeAnalysis = &egraph.analysis;
        let slope = shape(self.slope)?;
        let mut ok = match self.form {
            CheckForm::Relpos { rows, cols } => {
                let rows = an.resolve(data(rows)?.atom)?;
                let cols = an.resolve(data(cols)?.atom)?;
                let per_entry = slope[slope.len().saturating_sub(2)..]
                    .iter()
                    .all(|&s| s == 1);
                rows == m && cols == n && per_entry && broadcasts_into(&scores, &slope)
            }
            // Gated: cq is [.., m, 1] and ck [.., n, 1] (its transpose spans the keys).
            CheckForm::Gate { keys } => {
                let column = |c: &[usize], len: u64| {
                    let r = c.len();
                    r >= 2 && c[r - 1] == 1 && c[r - 2] as u64 == len
                };
                let ck = shape(keys)?;
                column(&slope, m)
                    && column(&ck, n)
                    && broadcasts_into(&scores, &slope)
                    && broadcasts_into(&scores, &transposed(&ck)?)
            }
        };
        if let Some(axis) = self.axis {
            let axis = data(axis)?.atom?.as_index()?;
            ok &= axis as usize + 1 == rank;
        }
        if let Some(eps) = self.eps {
            let e = data(eps)?;
            ok &= e.shape.as_deref() == Some(&[]) && e.konst.is_some_and(f64::is_finite);
        }
        Some(ok)
    }
}

impl Condition<Attn, ShapeAnalysis> for DecayCheck {
    fn check(&self, egraph: &mut AttnGraph, _eclass: Id, subst: &Subst) -> bool {
        // An unknown shape or dimension means "don't rewrite".
        self.holds(egraph, subst).unwrap_or(false)
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars = vec![self.q, self.k, self.slope];
        match self.form {
            CheckForm::Relpos { rows, cols } => vars.extend([rows, cols]),
            CheckForm::Gate { keys } => vars.push(keys),
        }
        vars.extend(self.axis);
        vars.extend(self.eps);
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::specs;
    use crate::rules::testkit::{assert_covered, check, dim, rule};
    use proptest::prelude::*;

    #[test]
    fn every_rule_has_a_property_test() {
        assert_covered(
            &specs(),
            &[
                "retention-fuse",
                "retention-fuse-normalized",
                "retention-fuse-eps",
                "gated-retention-fuse",
                "gated-retention-fuse-normalized",
                "gated-retention-fuse-eps",
            ],
        );
    }

    const GATED: &str = "q: f32[b, n, d], k: f32[b, n, d], v: f32[b, n, e], g: f32[b, n, 1]";

    const GATED_APART: &str =
        "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e], cq: f32[b, m, 1], ck: f32[b, n, 1]";

    const PARAMS: &str = "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e], a: f32[b, 1, 1]";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        // m and n drawn independently: end alignment, and rows keeping no key when m > n;
        // slopes of either sign (decay and growth), one per batch entry.
        #[test]
        fn retention_fuse(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "retention-fuse"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?a", "(input a)"), ("?m", "m"), ("?n", "n")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        // Without batch axes, a scalar slope and computed queries.
        #[test]
        fn retention_fuse_scalar_slope(m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "retention-fuse"), "q: f32[m, d], k: f32[n, d], v: f32[n, e]",
                  &[("?q", "(tanh (input q))"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?a", "(const 0.3)"), ("?m", "m"), ("?n", "n")],
                  &[("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn retention_fuse_normalized(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "retention-fuse-normalized"), PARAMS,
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?a", "(input a)"), ("?m", "m"), ("?n", "n"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn retention_fuse_eps(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "retention-fuse-eps"), PARAMS,
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?a", "(input a)"), ("?m", "m"), ("?n", "n"), ("?ax", "2"),
                    ("?e", "(const 0.001)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        // c the running sum of log gates in (0, 1): strongly decaying to ≈ 1.
        #[test]
        fn gated_retention_fuse(b in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "gated-retention-fuse"), GATED,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?cq", "(cumsum (log (sigmoid (input g))) 1)"),
                    ("?ck", "(cumsum (log (sigmoid (input g))) 1)")],
                  &[("b", b), ("n", n), ("d", d), ("e", e)], seed);
        }

        // The queries' and the keys' log decays apart, m and n drawn independently (decoding:
        // m < n; rows keeping no key: m > n).
        #[test]
        fn gated_retention_fuse_rows_apart(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "gated-retention-fuse"), GATED_APART,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?cq", "(input cq)"), ("?ck", "(input ck)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn gated_retention_fuse_normalized(b in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "gated-retention-fuse-normalized"), GATED,
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?cq", "(cumsum (log (sigmoid (input g))) 1)"),
                    ("?ck", "(cumsum (log (sigmoid (input g))) 1)"), ("?ax", "2")],
                  &[("b", b), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn gated_retention_fuse_eps(b in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "gated-retention-fuse-eps"), GATED,
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?cq", "(input g)"), ("?ck", "(input g)"), ("?ax", "2"),
                    ("?e", "(const 0.001)")],
                  &[("b", b), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn gated_retention_fuse_eps_rows_apart(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "gated-retention-fuse-eps"), GATED_APART,
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?cq", "(input cq)"), ("?ck", "(input ck)"), ("?ax", "2"),
                    ("?e", "(const 0.001)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }
    }

    /// A `relpos` that broadcasts along the rows, or a slope per position, is not a decay.
    #[test]
    fn the_guard_refuses_broadcast_distances_and_per_position_slopes() {
        use crate::analysis::ShapeAnalysis;
        use crate::lang::Attn;
        use egg::{RecExpr, Runner};
        let cases = [
            ("(const 0.5)", "1", "n", vec![("m", 3u64), ("n", 4u64)]),
            ("(input a)", "m", "n", vec![("m", 3), ("n", 4)]),
        ];
        for (slope, rows, cols, dims) in cases {
            let lhs = crate::rules::testkit::instantiate(
                rule(&specs(), "retention-fuse").lhs,
                &[
                    ("?q", "(input q)"),
                    ("?k", "(input k)"),
                    ("?v", "(input v)"),
                    ("?a", slope),
                    ("?m", rows),
                    ("?n", cols),
                ],
            );
            let expr: RecExpr<Attn> = lhs.parse().expect("parses");
            let mut analysis = ShapeAnalysis::default();
            for (k, v) in &dims {
                analysis.bindings.insert(k.to_string(), *v);
            }
            analysis.params.insert("q".into(), vec![3, 2]);
            analysis.params.insert("k".into(), vec![4, 2]);
            analysis.params.insert("v".into(), vec![4, 2]);
            analysis.params.insert("a".into(), vec![3, 1]);
            let runner: Runner<Attn, crate::analysis::ShapeAnalysis> = Runner::new(analysis)
                .with_iter_limit(1)
                .with_expr(&expr)
                .run(&[rule(&specs(), "retention-fuse").to_rewrite()]);
            let fused = runner
                .egraph
                .classes()
                .any(|c| c.nodes.iter().any(|n| matches!(n, Attn::Retention(_))));
            assert!(!fused, "fused {lhs} at {dims:?}");
        }
    }
}
