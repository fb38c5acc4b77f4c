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
        // (A − B) V = A V − B V (linear in its left factor; broadcasting commutes with it)
        // when both products are well-formed (a scalar or vector term has no product)
        RuleSpec::guarded(
            "matmul-distribute-sub",
            "(matmul (sub ?a ?b) ?v)",
            "(sub (matmul ?a ?v) (matmul ?b ?v))",
            Guard::ProductsDefined {
                a: "?a",
                b: "?b",
                v: "?v",
            },
        ),
        // (A + B) V = A V + B V, when both products are well-formed
        RuleSpec::guarded(
            "matmul-distribute-add",
            "(matmul (add ?a ?b) ?v)",
            "(add (matmul ?a ?v) (matmul ?b ?v))",
            Guard::ProductsDefined {
                a: "?a",
                b: "?b",
                v: "?v",
            },
        ),
        // (c A) V = c (A V) for c constant along A's last axis (a per-row or scalar factor)
        RuleSpec::guarded(
            "matmul-row-scale",
            "(matmul (mul ?c ?a) ?v)",
            "(mul ?c (matmul ?a ?v))",
            Guard::RowScale { c: "?c", a: "?a" },
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
                "transpose-involution",
                "transpose-matmul",
                "qk-scale-fold",
                "qk-scale-fold-div",
                "matmul-assoc",
                "matmul-assoc-rev",
                "sum-matmul",
                "matmul-distribute-sub",
                "matmul-distribute-add",
                "matmul-row-scale",
            ],
        );
    }

    /// Guards reject what they must: a non-scalar scale is not folded into a product.
    #[test]
    fn scale_fold_rejects_non_scalars() {
        use crate::analysis::ShapeAnalysis;
        use crate::lang::Attn;
        use egg::{RecExpr, Runner};
        let lhs: RecExpr<Attn> = "(mul (matmul (input q) (input k)) (input c))"
            .parse()
            .expect("valid");
        let mut analysis = ShapeAnalysis::default();
        analysis.params.insert("q".into(), vec![3, 2]);
        analysis.params.insert("k".into(), vec![2, 3]);
        analysis.params.insert("c".into(), vec![3, 1]);
        let rules = [rule(&specs(), "qk-scale-fold").to_rewrite()];
        let runner: Runner<Attn, ShapeAnalysis> = Runner::new(analysis)
            .with_iter_limit(2)
            .with_expr(&lhs)
            .run(&rules);
        assert_eq!(runner.egraph.number_of_classes(), lhs.as_ref().len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn transpose_involution(b in dim(), m in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "transpose-involution"), "x: f32[b, m, n]", &[("?x", "(input x)")],
                  &[("b", b), ("m", m), ("n", n)], seed);
        }

        #[test]
        fn transpose_matmul(b in dim(), m in dim(), k in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "transpose-matmul"), "x: f32[b, m, k], y: f32[k, n]",
                  &[("?a", "(input x)"), ("?b", "(input y)")],
                  &[("b", b), ("m", m), ("k", k), ("n", n)], seed);
        }

        #[test]
        fn qk_scale_fold(b in dim(), m in dim(), k in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "qk-scale-fold"), "q: f32[b, m, k], y: f32[b, n, k]",
                  &[("?a", "(input q)"), ("?b", "(transpose (input y))"),
                    ("?c", "(rsqrt (dim k))")],
                  &[("b", b), ("m", m), ("k", k), ("n", n)], seed);
        }

        #[test]
        fn qk_scale_fold_div(b in dim(), m in dim(), k in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "qk-scale-fold-div"), "q: f32[b, m, k], y: f32[k, n]",
                  &[("?a", "(input q)"), ("?b", "(input y)"), ("?c", "(sqrt (dim k))")],
                  &[("b", b), ("m", m), ("k", k), ("n", n)], seed);
        }

        #[test]
        fn matmul_assoc(b in dim(), m in dim(), k in dim(), p in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "matmul-assoc"), "x: f32[m, k], y: f32[b, k, p], z: f32[b, p, n]",
                  &[("?a", "(input x)"), ("?b", "(input y)"), ("?c", "(input z)")],
                  &[("b", b), ("m", m), ("k", k), ("p", p), ("n", n)], seed);
        }

        #[test]
        fn matmul_assoc_rev(b in dim(), m in dim(), k in dim(), p in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "matmul-assoc-rev"), "x: f32[b, m, k], y: f32[k, p], z: f32[b, p, n]",
                  &[("?a", "(input x)"), ("?b", "(input y)"), ("?c", "(input z)")],
                  &[("b", b), ("m", m), ("k", k), ("p", p), ("n", n)], seed);
        }

        #[test]
        fn sum_matmul(b in dim(), m in dim(), k in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "sum-matmul"), "x: f32[m, k], y: f32[b, k, n]",
                  &[("?a", "(input x)"), ("?b", "(input y)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("k", k), ("n", n)], seed);
        }

        #[test]
        fn matmul_distribute_sub(b in dim(), m in dim(), n in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "matmul-distribute-sub"), "x: f32[b, m, n], y: f32[m, n], v: f32[b, n, e]",
                  &[("?a", "(softmax (input x) 2)"), ("?b", "(mul (input y) (const 0.3))"), ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("e", e)], seed);
        }

        #[test]
        fn matmul_distribute_add(b in dim(), m in dim(), n in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "matmul-distribute-add"), "x: f32[b, m, n], y: f32[b, 1, n], v: f32[n, e]",
                  &[("?a", "(input x)"), ("?b", "(input y)"), ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("e", e)], seed);
        }

        #[test]
        fn matmul_row_scale(b in dim(), m in dim(), n in dim(), e in dim(), row in any::<bool>(),
                            seed in any::<u64>()) {
            let c = if row { "f32[b, m, 1]" } else { "f32[b, 1, 1]" };
            check(&rule(&specs(), "matmul-row-scale"), &format!("c: {c}, x: f32[m, n], v: f32[n, e]"),
                  &[("?c", "(input c)"), ("?a", "(input x)"), ("?v", "(input v)")],
                  &[("b", b), ("m", m), ("n", n), ("e", e)], seed);
        }
    }
}
