//! Softmax to kernel form: shift invariance and fusion of `softmax(S) @ V` into the
//! online-softmax attention node.
//!
//! The fused node `(attention q k v scale pattern)` means `softmax(mask((q @ kᵀ) * scale,
//! pattern)) @ v` over the last axis, with `all` for no mask. Fusion needs the score to be a
//! product against an explicit transpose, optionally scaled by a scalar.

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

/// The softmax family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // softmax(x + c) = softmax(x) for c constant along the row (finite)
        RuleSpec::guarded(
            "softmax-shift",
            "(softmax (add ?x ?c) ?ax)",
            "(softmax ?x ?ax)",
            Guard::RowConstant {
                x: "?x",
                c: "?c",
                axis: "?ax",
            },
        ),
        // softmax(x - c) = softmax(x) for c constant along the row (finite)
        RuleSpec::guarded(
            "softmax-shift-sub",
            "(softmax (sub ?x ?c) ?ax)",
            "(softmax ?x ?ax)",
            Guard::RowConstant {
                x: "?x",
                c: "?c",
                axis: "?ax",
            },
        ),
        // softmax(q kᵀ) v = attention(q, k, v, 1, all)
        RuleSpec::guarded(
            "attention-fuse",
            "(matmul (softmax (matmul ?q (transpose ?k)) ?ax) ?v)",
            "(attention ?q ?k ?v (const 1) all)",
            LAST_AXIS,
        ),
        // softmax((q kᵀ) c) v = attention(q, k, v, c, all) for a scalar c
        RuleSpec::guarded(
            "attention-fuse-scaled",
            "(matmul (softmax (mul (matmul ?q (transpose ?k)) ?c) ?ax) ?v)",
            "(attention ?q ?k ?v ?c all)",
            SCALED_LAST_AXIS,
        ),
        // softmax((q kᵀ) / c) v = attention(q, k, v, 1/c, all) for a scalar c
        RuleSpec::guarded(
            "attention-fuse-div",
            "(matmul (softmax (div (matmul ?q (transpose ?k)) ?c) ?ax) ?v)",
            "(attention ?q ?k ?v (div (const 1) ?c) all)",
            SCALED_LAST_AXIS,
        ),
    ]
}
