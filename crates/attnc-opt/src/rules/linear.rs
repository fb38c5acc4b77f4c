//! Linear attention in kernel form: with explicit feature maps φ, `(φQ φKᵀ) V` becomes
//! `φQ (φKᵀ V)` (a `[d, dv]` state instead of an `[n, n]` matrix) and the normalizer
//! `sum(φQ φKᵀ, -1)` becomes `φQ sum(φKᵀ, -1)`; the normalized pair fuses into the
//! `linear-attention` node. These are instances of the algebra family's reassociation, kept
//! here under their own names so traces of linear attention read as such.

use super::{Guard, RuleSpec};

/// The linear family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // (q kᵀ) v = q (kᵀ v)
        RuleSpec::guarded(
            "linear-state",
            "(matmul (matmul ?q (transpose ?k)) ?v)",
            "(matmul ?q (matmul (transpose ?k) ?v))",
            // well-formed whenever the left side is
            Guard::Always,
        ),
        // sum(q kᵀ, -1) = q sum(kᵀ, -1)
        RuleSpec::guarded(
            "linear-normalizer",
            "(sum (matmul ?q (transpose ?k)) ?ax)",
            "(matmul ?q (sum (transpose ?k) ?ax))",
            Guard::SumThroughProduct {
                a: "?q",
                b: "?k",
                axis: "?ax",
            },
        ),
        // (q (kᵀ v)) / (q sum(kᵀ, -1)) = linear-attention(q, k, v)
        RuleSpec::guarded(
            "linear-attention-fuse",
            "(div (matmul ?q (matmul (transpose ?k) ?v)) (matmul ?q (sum (transpose ?k) ?ax)))",
            "(linear-attention ?q ?k ?v (const 0))",
            Guard::SumThroughProduct {
                a: "?q",
                b: "?k",
                axis: "?ax",
            },
        ),
        // (q (kᵀ v)) / (q sum(kᵀ, -1) + eps) = linear-attention(q, k, v, eps), eps a finite
        // scalar
        RuleSpec::guarded(
            "linear-attention-fuse-eps",
            "(div (matmul ?q (matmul (transpose ?k) ?v)) (add (matmul ?q (sum (transpose ?k) ?ax)) ?e))",
            "(linear-attention ?q ?k ?v ?e)",
            Guard::EpsNormalizer {
                a: "?q",
                b: "?k",
                axis: "?ax",
                eps: "?e",
            },
        ),
    ]
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
                "linear-state",
                "linear-normalizer",
                "linear-attention-fuse",
                "linear-attention-fuse-eps",
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn linear_state(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-state"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn linear_normalizer(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-normalizer"), "q: f32[b, m, d], k: f32[b, n, d]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn linear_attention_fuse(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-attention-fuse"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn linear_attention_fuse_eps(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-attention-fuse-eps"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?ax", "2"), ("?e", "(const 0.01)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }
    }
}
