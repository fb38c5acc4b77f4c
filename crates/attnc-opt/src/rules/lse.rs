//! The log-sum-exp of attention scores as a fused node: `logsumexp(mask((q kᵀ) c, p), -1)`
//! becomes `(attention-lse q k c p)`, which means exactly that (`[.., m, 1]`, `-inf` for a row
//! whose keys are all masked).
//!
//! Beside an `attention` over the same `q`, `k`, scale and pattern (a kernel returning
//! `(softmax(S) @ v, logsumexp(S, -1))`), the planner runs both from one pass of the fused
//! kernel: its online softmax already keeps each row's maximum and sum. The scale and pattern
//! children are the same e-classes the attention fusion rules build, so the pair is found by
//! comparing children. Scores beyond a scale (biases, ALiBi, softcaps) take the scored form,
//! `attention-lse-scored` (`rules/scored.rs`), paired the same way with `attention-scored`.

use super::{Guard, RuleSpec};

/// The log-sum-exp runs over the last axis of `q @ kᵀ`.
const LAST_AXIS: Guard = Guard::LastAxisOfProduct {
    a: "?q",
    b: "?k",
    axis: "?ax",
};

/// As [`LAST_AXIS`], and the scale is a scalar.
const SCALED_LAST_AXIS: Guard = Guard::ScaledLastAxis {
    a: "?q",
    b: "?k",
    axis: "?ax",
    scale: "?c",
};

/// The log-sum-exp family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // logsumexp(q kᵀ) = attention-lse(q, k, 1, all)
        RuleSpec::guarded(
            "lse-fuse",
            "(logsumexp (matmul ?q (transpose ?k)) ?ax)",
            "(attention-lse ?q ?k (const 1) all)",
            LAST_AXIS,
        ),
        // logsumexp((q kᵀ) c) = attention-lse(q, k, c, all) for a scalar c
        RuleSpec::guarded(
            "lse-fuse-scaled",
            "(logsumexp (mul (matmul ?q (transpose ?k)) ?c) ?ax)",
            "(attention-lse ?q ?k ?c all)",
            SCALED_LAST_AXIS,
        ),
        // logsumexp((q kᵀ) / c) = attention-lse(q, k, 1/c, all) for a scalar c
        RuleSpec::guarded(
            "lse-fuse-div",
            "(logsumexp (div (matmul ?q (transpose ?k)) ?c) ?ax)",
            "(attention-lse ?q ?k (div (const 1) ?c) all)",
            SCALED_LAST_AXIS,
        ),
        // logsumexp(mask(q kᵀ, p)) = attention-lse(q, k, 1, p) for fill -inf
        RuleSpec::guarded(
            "mask-lse-fuse",
            "(logsumexp (mask (matmul ?q (transpose ?k)) ?p -inf) ?ax)",
            "(attention-lse ?q ?k (const 1) ?p)",
            LAST_AXIS,
        ),
        // logsumexp(mask((q kᵀ) c, p)) = attention-lse(q, k, c, p) for fill -inf, scalar c
        RuleSpec::guarded(
            "mask-lse-fuse-scaled",
            "(logsumexp (mask (mul (matmul ?q (transpose ?k)) ?c) ?p -inf) ?ax)",
            "(attention-lse ?q ?k ?c ?p)",
            SCALED_LAST_AXIS,
        ),
        // logsumexp(mask((q kᵀ) / c, p)) = attention-lse(q, k, 1/c, p) for fill -inf, scalar c
        RuleSpec::guarded(
            "mask-lse-fuse-div",
            "(logsumexp (mask (div (matmul ?q (transpose ?k)) ?c) ?p -inf) ?ax)",
            "(attention-lse ?q ?k (div (const 1) ?c) ?p)",
            SCALED_LAST_AXIS,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::specs;
    use crate::rules::testkit::{assert_covered, check, dim, rule, PATTERNS};
    use proptest::prelude::*;

    #[test]
    fn every_rule_has_a_property_test() {
        assert_covered(
            &specs(),
            &[
                "lse-fuse",
                "lse-fuse-scaled",
                "lse-fuse-div",
                "mask-lse-fuse",
                "mask-lse-fuse-scaled",
                "mask-lse-fuse-div",
            ],
        );
    }

    const PARAMS: &str = "q: f32[b, m, d], k: f32[b, n, d]";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn lse_fuse(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "lse-fuse"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn lse_fuse_scaled(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "lse-fuse-scaled"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?c", "(rsqrt (dim d))"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn lse_fuse_div(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "lse-fuse-div"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?c", "(sqrt (dim d))"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_lse_fuse(b in dim(), m in dim(), n in dim(), d in dim(),
                         p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-lse-fuse"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_lse_fuse_scaled(b in dim(), m in dim(), n in dim(), d in dim(),
                                p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-lse-fuse-scaled"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?c", "(rsqrt (dim d))"),
                    ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_lse_fuse_div(b in dim(), m in dim(), n in dim(), d in dim(),
                             p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-lse-fuse-div"), PARAMS,
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?c", "(sqrt (dim d))"),
                    ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }
    }
}
