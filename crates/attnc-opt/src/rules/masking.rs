//! Sparsity masking: mask algebra and fusion of masked `softmax(·) @ V` into the attention
//! node carrying the pattern, so the kernel visits only the tiles the pattern keeps.

use super::{Guard, RuleSpec};

/// The guard of the scaled fusion rules: as [`LAST_AXIS`], and the scale is a scalar.
const SCALED_LAST_AXIS: Guard = Guard::ScaledLastAxis {
    a: "?q",
    b: "?k",
    axis: "?ax",
    scale: "?c",
};

/// The guard of the fusion rules: the softmax runs over the last axis of `q @ kᵀ`.
const LAST_AXIS: Guard = Guard::LastAxisOfProduct {
    a: "?q",
    b: "?k",
    axis: "?ax",
};

/// The masking family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // mask(mask(x, a, f), b, f) = mask(x, a & b, f)
        RuleSpec::plain(
            "mask-intersect",
            "(mask (mask ?x ?a ?f) ?b ?f)",
            "(mask ?x (and ?a ?b) ?f)",
        ),
        // softmax(mask(q kᵀ, p)) v = attention(q, k, v, 1, p) for fill -inf
        RuleSpec::guarded(
            "mask-attention-fuse",
            "(matmul (softmax (mask (matmul ?q (transpose ?k)) ?p -inf) ?ax) ?v)",
            "(attention ?q ?k ?v (const 1) ?p)",
            LAST_AXIS,
        ),
        // softmax(mask((q kᵀ) c, p)) v = attention(q, k, v, c, p) for fill -inf, scalar c
        RuleSpec::guarded(
            "mask-attention-fuse-scaled",
            "(matmul (softmax (mask (mul (matmul ?q (transpose ?k)) ?c) ?p -inf) ?ax) ?v)",
            "(attention ?q ?k ?v ?c ?p)",
            SCALED_LAST_AXIS,
        ),
        // softmax(mask((q kᵀ) / c, p)) v = attention(q, k, v, 1/c, p) for fill -inf, scalar c
        RuleSpec::guarded(
            "mask-attention-fuse-div",
            "(matmul (softmax (mask (div (matmul ?q (transpose ?k)) ?c) ?p -inf) ?ax) ?v)",
            "(attention ?q ?k ?v (div (const 1) ?c) ?p)",
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
                "mask-intersect",
                "mask-attention-fuse",
                "mask-attention-fuse-scaled",
                "mask-attention-fuse-div",
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn mask_intersect(b in dim(), m in dim(), n in dim(), pa in 0..PATTERNS.len(),
                          pb in 0..PATTERNS.len(), finite in any::<bool>(), seed in any::<u64>()) {
            let fill = if finite { "0.5" } else { "-inf" };
            check(&rule(&specs(), "mask-intersect"), "x: f32[b, m, n]",
                  &[("?x", "(input x)"), ("?a", PATTERNS[pa]), ("?b", PATTERNS[pb]), ("?f", fill)],
                  &[("b", b), ("m", m), ("n", n)], seed);
        }

        #[test]
        fn mask_attention_fuse(b in dim(), m in dim(), n in dim(), d in dim(),
                               p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-attention-fuse"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_attention_fuse_scaled(b in dim(), m in dim(), n in dim(), d in dim(),
                                      p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-attention-fuse-scaled"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(const 0.25)"), ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_attention_fuse_div(b in dim(), m in dim(), n in dim(), d in dim(),
                                   p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-attention-fuse-div"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(sqrt (dim d))"), ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }
    }
}
