//! Exact algebra: transposes, scale folding and matrix-product reassociation.
//!
//! Reassociation is guarded by shapes and has no commutativity partner (matrix products do
//! not commute), so the e-graph stays polynomial on a chain of products.

use super::{Guard, RuleSpec};

/// The algebra family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // (xᵀ)ᵀ = x
        RuleSpec::plain("transpose-involution", "(transpose (transpose ?x))", "?x"),
        // (A B)ᵀ = Bᵀ Aᵀ, both of rank ≥ 2 (guaranteed by the match)
        RuleSpec::plain(
            "transpose-matmul",
            "(transpose (matmul ?a ?b))",
            "(matmul (transpose ?b) (transpose ?a))",
        ),
        // (A B) c = (A c) B for a scalar c
        RuleSpec::guarded(
            "qk-scale-fold",
            "(mul (matmul ?a ?b) ?c)",
            "(matmul (mul ?a ?c) ?b)",
            Guard::Scalar("?c"),
        ),
        // (A B) / c = (A / c) B for a scalar c
        RuleSpec::guarded(
            "qk-scale-fold-div",
            "(div (matmul ?a ?b) ?c)",
            "(matmul (div ?a ?c) ?b)",
            Guard::Scalar("?c"),
        ),
        // (A B) C = A (B C) when B C is well-formed
        RuleSpec::guarded(
            "matmul-assoc",
            "(matmul (matmul ?a ?b) ?c)",
            "(matmul ?a (matmul ?b ?c))",
            Guard::ProductDefined { a: "?b", b: "?c" },
        ),
        // A (B C) = (A B) C when A B is well-formed
        RuleSpec::guarded(
            "matmul-assoc-rev",
            "(matmul ?a (matmul ?b ?c))",
            "(matmul (matmul ?a ?b) ?c)",
            Guard::ProductDefined { a: "?a", b: "?b" },
        ),
        // sum(A B, -1) = A sum(B, -1), the axis being the last of A B and of B
        RuleSpec::guarded(
            "sum-matmul",
            "(sum (matmul ?a ?b) ?ax)",
            "(matmul ?a (sum ?b ?ax))",
            Guard::SumThroughProduct {
                a: "?a",
                b: "?b",
                axis: "?ax",
            },
        ),
    ]
}
