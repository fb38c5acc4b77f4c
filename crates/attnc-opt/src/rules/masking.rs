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
