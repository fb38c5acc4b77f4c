//! Causal linear attention in kernel form. With explicit feature maps φ, the causal quadratic
//! form `A = mask(φQ φKᵀ, causal, 0)`, `out = (A V) / sum(A, -1)` fuses into the
//! `linear-attention-causal` node, which the JIT runs with a running prefix state
//! `S_i = Σ_{j ≤ i'} φk_j v_jᵀ`, `z_i = Σ_{j ≤ i'} φk_j` (O(n·d·dv), no `n × n` buffer).
//!
//! Only fill exactly 0 is matched: any other fill adds `fill · Σ_{j > i'} v_j` to the numerator,
//! which a prefix state does not hold. Queries are end-aligned to the keys as everywhere
//! (`i' = i + n − m`), so the rule holds for `m ≠ n`; the fused node expands back to the
//! masked form, so a row that keeps no key gives `0 / 0` in both.

use super::{Guard, RuleSpec};

/// The prefix family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // (A v) / sum(A, -1) = linear-attention-causal(q, k, v), A = mask(q kᵀ, causal, 0)
        RuleSpec::guarded(
            "linear-causal-fuse",
            "(div (matmul (mask (matmul ?q (transpose ?k)) causal 0) ?v) \
                  (sum (mask (matmul ?q (transpose ?k)) causal 0) ?ax))",
            "(linear-attention-causal ?q ?k ?v (const 0))",
            // the sum runs along the key axis, the last axis of the scores
            Guard::LastAxisOfProduct {
                a: "?q",
                b: "?k",
                axis: "?ax",
            },
        ),
        // (A v) / (sum(A, -1) + eps) = linear-attention-causal(q, k, v, eps) for a finite
        // scalar eps, A = mask(q kᵀ, causal, 0)
        RuleSpec::guarded(
            "linear-causal-fuse-eps",
            "(div (matmul (mask (matmul ?q (transpose ?k)) causal 0) ?v) \
                  (add (sum (mask (matmul ?q (transpose ?k)) causal 0) ?ax) ?e))",
            "(linear-attention-causal ?q ?k ?v ?e)",
            Guard::EpsNormalizer {
                a: "?q",
                b: "?k",
                axis: "?ax",
                eps: "?e",
            },
        ),
        // A v = causal-prefix-product(q, k, v), A = mask(q kᵀ, causal, 0): the unnormalized
        // form through the same prefix state
        RuleSpec::plain(
            "linear-causal-unnormalized",
            "(matmul (mask (matmul ?q (transpose ?k)) causal 0) ?v)",
            "(causal-prefix-product ?q ?k ?v)",
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
                "linear-causal-fuse",
                "linear-causal-fuse-eps",
                "linear-causal-unnormalized",
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        // m and n drawn independently: end alignment, and rows keeping no key when m > n.
        #[test]
        fn linear_causal_fuse(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-causal-fuse"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        // Without batch axes, and with features that can be negative (cancelling sums).
        #[test]
        fn linear_causal_fuse_rank_two(m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-causal-fuse"), "q: f32[m, d], k: f32[n, d], v: f32[n, e]",
                  &[("?q", "(input q)"), ("?k", "(tanh (input k))"), ("?v", "(input v)"), ("?ax", "1")],
                  &[("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn linear_causal_fuse_eps(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-causal-fuse-eps"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, e]",
                  &[("?q", "(add (elu (input q)) (const 1))"), ("?k", "(add (elu (input k)) (const 1))"),
                    ("?v", "(input v)"), ("?ax", "2"), ("?e", "(const 0.001)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn linear_causal_unnormalized(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "linear-causal-unnormalized"), "q: f32[b, m, d], k: f32[n, d], v: f32[b, n, e]",
                  &[("?q", "(input q)"), ("?k", "(tanh (input k))"), ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }
    }
}
