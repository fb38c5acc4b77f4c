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
            "(linear-attention ?q ?k ?v)",
            Guard::SumThroughProduct {
                a: "?q",
                b: "?k",
                axis: "?ax",
            },
        ),
    ]
}
