//! Sparsity masking: mask algebra and fusion of masked `softmax(·) @ V` into the attention
//! node carrying the pattern, so the kernel visits only the tiles the pattern keeps.
//!
//! Scores that are more than a scaled `q @ kᵀ` (an ALiBi bias, a tanh softcap) fuse into
//! `(attention-scored q k v score pattern)`, whose `score` child is the score's own e-class:
//! the rule's right side repeats the score pattern, so it adds only the fused node. The
//! extractor takes that node only when the chosen score term is one the IR's fused attention
//! takes (`score::score_form`, checked by `attnc_ir::fused::Fused::check`: an elementwise tree
//! over the one product `q @ kᵀ`, never `(q c) @ kᵀ`), and the cost model charges its bias
//! leaves but not the rest of the score (computed in registers).

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

/// The guard of the biased fusion: scaled, and the bias broadcasts into the score.
const BIASED_SCORE: Guard = Guard::BiasedScore {
    a: "?q",
    b: "?k",
    axis: "?ax",
    scale: "?c",
    bias: "?b",
};

/// The guard of the softcap fusion: scaled, and the cap is a scalar.
const CAPPED_SCORE: Guard = Guard::CappedScore {
    a: "?q",
    b: "?k",
    axis: "?ax",
    scale: "?c",
    cap: "?t",
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
        // softmax(mask((q kᵀ) / c + b, p)) v = attention-scored(q, k, v, (q kᵀ) / c + b, p)
        // for fill -inf, scalar c, b broadcast into [.., m, n] (ALiBi: b = slope relpos)
        RuleSpec::guarded(
            "mask-attention-fuse-bias",
            "(matmul (softmax (mask (add (div (matmul ?q (transpose ?k)) ?c) ?b) ?p -inf) ?ax) ?v)",
            "(attention-scored ?q ?k ?v (add (div (matmul ?q (transpose ?k)) ?c) ?b) ?p)",
            BIASED_SCORE,
        ),
        // softmax(mask((q kᵀ) c + b, p)) v = attention-scored(q, k, v, (q kᵀ) c + b, p)
        // for fill -inf, scalar c, b broadcast into [.., m, n]
        RuleSpec::guarded(
            "mask-attention-fuse-bias-scaled",
            "(matmul (softmax (mask (add (mul (matmul ?q (transpose ?k)) ?c) ?b) ?p -inf) ?ax) ?v)",
            "(attention-scored ?q ?k ?v (add (mul (matmul ?q (transpose ?k)) ?c) ?b) ?p)",
            BIASED_SCORE,
        ),
        // softmax(mask(t tanh(((q kᵀ) / c) / t), p)) v
        //   = attention-scored(q, k, v, t tanh(((q kᵀ) / c) / t), p) for fill -inf, scalar c, t
        RuleSpec::guarded(
            "mask-attention-fuse-softcap",
            "(matmul (softmax (mask (mul ?t (tanh (div (div (matmul ?q (transpose ?k)) ?c) ?t))) ?p -inf) ?ax) ?v)",
            "(attention-scored ?q ?k ?v (mul ?t (tanh (div (div (matmul ?q (transpose ?k)) ?c) ?t))) ?p)",
            CAPPED_SCORE,
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
                "mask-attention-fuse-bias",
                "mask-attention-fuse-bias-scaled",
                "mask-attention-fuse-softcap",
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

        #[test]
        fn mask_attention_fuse_bias(b in dim(), m in dim(), n in dim(), d in dim(),
                                    p in 0..PATTERNS.len(), bias in 0..3usize, seed in any::<u64>()) {
            let bias = ["(mul (input slope) (relpos m n))", "(input full)", "(input slope)"][bias];
            check(&rule(&specs(), "mask-attention-fuse-bias"),
                  "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d], slope: f32[b, 1, 1], full: f32[b, m, n]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(sqrt (dim d))"), ("?b", bias),
                    ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_attention_fuse_bias_scaled(b in dim(), m in dim(), n in dim(), d in dim(),
                                           p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-attention-fuse-bias-scaled"),
                  "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d], full: f32[m, n]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(const 0.125)"), ("?b", "(add (input full) (relpos m n))"),
                    ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_attention_fuse_softcap(b in dim(), m in dim(), n in dim(), d in dim(),
                                       p in 0..PATTERNS.len(), cap in 0..3usize, seed in any::<u64>()) {
            let cap = ["(const 30)", "(const 0.5)", "(const 2)"][cap];
            check(&rule(&specs(), "mask-attention-fuse-softcap"),
                  "q: f32[b, m, d], k: f32[1, n, d], v: f32[1, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(sqrt (dim d))"), ("?t", cap), ("?p", PATTERNS[p]), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }
    }
}
