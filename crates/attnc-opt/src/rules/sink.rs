//! An attention sink as a rescaling of the attention. With `l = logsumexp(x, -1)`,
//!
//! ```text
//! softmax_sink(x, s) = exp(x) / (exp(s) + Σ exp(x)) = softmax(x) · sigmoid(l − s)
//! ```
//!
//! so `softmax_sink(x, s) @ v = (softmax(x) @ v) * sigmoid(l − s' + (s' − s'))` with
//! `s' = max(s, −F)`, `F` the largest f32: the attention and its log-sum-exp fuse (the `lse`
//! family pairs them into one pass of the online softmax) and the sink costs one elementwise
//! pass over `[.., m, 1]`. The two guards change nothing for a finite sink and keep the edge
//! values of the written form: a row whose scores are all −∞ gives 0 for any sink but `+∞`
//! (its softmax is 0 and the scale 0, not the NaN of `−∞ − −∞`); `s = −∞` gives the plain
//! softmax (scale 1); `s = +∞` gives NaN, as the written form's `exp(s − max)` does
//! (`s' − s'` is NaN exactly there); NaN propagates.
//!
//! The axis is the last one, so there is one rule per rank (a pattern names its axis); the
//! guard ([`Guard::SinkRows`]) checks the rank and that `s` does not enlarge the rows.

use super::{broadcasts_into, var, AttnRewrite, Guard, RuleSpec};
use crate::analysis::ShapeAnalysis;
use crate::lang::Attn;
use egg::{Condition, Id, Subst, Var};

/// The sink family.
pub fn specs() -> Vec<RuleSpec> {
    let rows = |rank| Guard::SinkRows {
        x: "?x",
        s: "?s",
        rank,
    };
    vec![
        // softmax_sink(x, s) @ v = (softmax(x) @ v) * sigmoid(l - s' + (s' - s')),
        // l = logsumexp(x), s' = max(s, -F), x of rank 2
        RuleSpec::guarded(
            "sink-split-rank-two",
            "(matmul (softmax-sink ?x ?s) ?v)",
            "(mul (matmul (softmax ?x 1) ?v) (sigmoid (add (sub (logsumexp ?x 1) (maximum ?s (const -3.4028234663852886e38))) (sub (maximum ?s (const -3.4028234663852886e38)) (maximum ?s (const -3.4028234663852886e38))))))",
            rows(2),
        ),
        // the same for x of rank 3
        RuleSpec::guarded(
            "sink-split-rank-three",
            "(matmul (softmax-sink ?x ?s) ?v)",
            "(mul (matmul (softmax ?x 2) ?v) (sigmoid (add (sub (logsumexp ?x 2) (maximum ?s (const -3.4028234663852886e38))) (sub (maximum ?s (const -3.4028234663852886e38)) (maximum ?s (const -3.4028234663852886e38))))))",
            rows(3),
        ),
        // the same for x of rank 4
        RuleSpec::guarded(
            "sink-split-rank-four",
            "(matmul (softmax-sink ?x ?s) ?v)",
            "(mul (matmul (softmax ?x 3) ?v) (sigmoid (add (sub (logsumexp ?x 3) (maximum ?s (const -3.4028234663852886e38))) (sub (maximum ?s (const -3.4028234663852886e38)) (maximum ?s (const -3.4028234663852886e38))))))",
            rows(4),
        ),
    ]
}

/// The rewrite of a rule guarded by [`Guard::SinkRows`].
pub(super) fn rewrite(spec: &RuleSpec) -> AttnRewrite {
    let Guard::SinkRows { x, s, rank } = spec.guard else {
        unreachable!("invariant: only SinkRows rules are built here")
    };
    spec.guarded_by(SinkCheck {
        x: var(x),
        s: var(s),
        rank,
    })
}

/// [`Guard::SinkRows`] as an egg [`Condition`].
#[derive(Clone, Debug)]
struct SinkCheck {
    x: Var,
    s: Var,
    rank: usize,
}

impl Condition<Attn, ShapeAnalysis> for SinkCheck {
    fn check(&self, egraph: &mut egg::EGraph<Attn, ShapeAnalysis>, _: Id, subst: &Subst) -> bool {
        let shape = |v: Var| subst.get(v).and_then(|&id| egraph[id].data.shape.clone());
        let (Some(x), Some(s)) = (shape(self.x), shape(self.s)) else {
            return false;
        };
        if x.len() != self.rank {
            return false;
        }
        let mut rows = x;
        rows[self.rank - 1] = 1;
        broadcasts_into(&rows, &s)
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.x, self.s]
    }
}

#[cfg(test)]
mod tests {
    use super::specs;
    use crate::rules::testkit::{assert_covered, check, dim, refuses, rule};
    use proptest::prelude::*;

    #[test]
    fn every_rule_has_a_property_test() {
        assert_covered(
            &specs(),
            &[
                "sink-split-rank-two",
                "sink-split-rank-three",
                "sink-split-rank-four",
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        // A sink per row, over causal scores with m and n drawn independently (rows keeping
        // no key when m > n).
        #[test]
        fn sink_split_rank_three(b in dim(), m in dim(), n in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "sink-split-rank-three"),
                  "x: f32[b, m, n], s: f32[b, m, 1], v: f32[b, n, e]",
                  &[("?x", "(mask (input x) causal -inf)"), ("?s", "(input s)"), ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("e", e)], seed);
        }

        // One sink per head, broadcast over the rows.
        #[test]
        fn sink_split_rank_four(h in dim(), m in dim(), n in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "sink-split-rank-four"),
                  "x: f32[2, h, m, n], s: f32[h, 1, 1], v: f32[2, h, n, e]",
                  &[("?x", "(input x)"), ("?s", "(input s)"), ("?v", "(input v)")],
                  &[("h", h), ("m", m), ("n", n), ("e", e)], seed);
        }

        // A scalar sink, no batch axes.
        #[test]
        fn sink_split_rank_two(m in dim(), n in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "sink-split-rank-two"),
                  "x: f32[m, n], v: f32[n, e]",
                  &[("?x", "(mul (input x) (const 4))"), ("?s", "(const 1.5)"), ("?v", "(input v)")],
                  &[("m", m), ("n", n), ("e", e)], seed);
        }
    }

    /// Rows whose scores are all −∞ and sinks of ±∞: both sides agree value by value (the
    /// property tests draw finite values only).
    #[test]
    fn edge_values_agree_with_the_written_form() {
        use crate::rules::testkit::{evaluate_both, rel_l2};
        let spec = rule(&specs(), "sink-split-rank-two");
        // Row 0 keeps nothing (m = 3 > n = 2 under causal); sinks −∞, +∞ and finite.
        for sink in ["(const -inf)", "(const inf)", "(const 0.5)"] {
            let (a, b) = evaluate_both(
                &spec,
                "x: f32[m, n], v: f32[n, e]",
                &[
                    ("?x", "(mask (input x) causal -inf)"),
                    ("?s", sink),
                    ("?v", "(input v)"),
                ],
                &[("m", 3), ("n", 2), ("e", 2)],
                7,
            );
            assert!(rel_l2(&a, &b) <= 1e-12, "sink {sink}: {a} vs {b}");
            let row0: Vec<f64> = b.iter().take(2).copied().collect();
            if sink == "(const inf)" {
                assert!(b.iter().all(|y| y.is_nan()), "sink {sink}: {b}");
            } else {
                assert_eq!(row0, [0.0, 0.0], "sink {sink}: row 0");
            }
        }
    }

    /// A sink that varies along the keys, or enlarges the scores, is not one logit per row.
    #[test]
    fn the_guard_refuses_sinks_that_are_not_per_row() {
        let dims = [("m", 3u64), ("n", 4u64), ("e", 2u64)];
        refuses(
            &rule(&specs(), "sink-split-rank-two"),
            "x: f32[m, n], s: f32[m, n], v: f32[n, e]",
            "(matmul (softmax-sink (input x) (input s)) (input v))",
            &dims,
        );
        refuses(
            &rule(&specs(), "sink-split-rank-two"),
            "x: f32[m, n], s: f32[5, m, 1], v: f32[n, e]",
            "(matmul (softmax-sink (input x) (input s)) (input v))",
            &dims,
        );
        // The rank must be the rule's own.
        refuses(
            &rule(&specs(), "sink-split-rank-three"),
            "x: f32[m, n], s: f32[m, 1], v: f32[n, e]",
            "(matmul (softmax-sink (input x) (input s)) (input v))",
            &dims,
        );
    }
}
