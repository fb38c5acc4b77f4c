//! Property: printing any tree and parsing the text gives the same tree (spans aside).

use attnc_syntax::ast::{
    Approx, ApproxKind, Arg, BinOp, DimExpr, ElemType, Expr, ExprKind, File, Ident, Kernel, Let,
    Param, Pattern, PatternKind, TypeExpr,
};
use attnc_syntax::token::is_keyword;
use attnc_syntax::{parse, print_file, Span};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,6}".prop_filter("not a keyword", |s| !is_keyword(s))
}

fn ident() -> impl Strategy<Value = Ident> {
    name().prop_map(|name| Ident {
        name,
        span: Span::default(),
    })
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        (prop::num::f64::POSITIVE | prop::num::f64::ZERO | prop::num::f64::SUBNORMAL)
            .prop_map(f64::abs)
            .prop_filter("finite", |x| x.is_finite()),
        (0u64..1000).prop_map(|x| x as f64),
        Just(1e-7),
        Just(1e20),
        Just(0.1),
        Just(f64::MAX),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..300, any::<u64>()]
}

fn pattern_size() -> impl Strategy<Value = DimExpr> {
    prop_oneof![
        size().prop_map(|value| DimExpr::Lit {
            value,
            span: Span::default()
        }),
        ident().prop_map(DimExpr::Sym),
    ]
}

fn pattern() -> impl Strategy<Value = Pattern> {
    let leaf = prop_oneof![
        Just(PatternKind::Causal),
        pattern_size().prop_map(PatternKind::Window),
        (pattern_size(), pattern_size()).prop_map(|(w, r)| PatternKind::Dilated(w, r)),
        pattern_size().prop_map(PatternKind::Global),
        pattern_size().prop_map(PatternKind::Block),
    ]
    .prop_map(pat);
    // Chains of two to four operands, any of which may be a chain of the same operator
    // (printed in parentheses).
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..5).prop_map(|v| pat(PatternKind::And(v))),
            prop::collection::vec(inner, 2..5).prop_map(|v| pat(PatternKind::Or(v))),
        ]
    })
}

fn pat(kind: PatternKind) -> Pattern {
    Pattern {
        kind,
        span: Span::default(),
    }
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        number().prop_map(ExprKind::Number),
        Just(ExprKind::Number(f64::INFINITY)),
        name().prop_map(ExprKind::Name)
    ]
    .prop_map(ex);
    leaf.prop_recursive(6, 48, 4, |inner| {
        let op = prop_oneof![
            Just(BinOp::Add),
            Just(BinOp::Sub),
            Just(BinOp::Mul),
            Just(BinOp::Div),
            Just(BinOp::MatMul)
        ];
        // Patterns are read only as the second argument of `mask`; other calls take
        // expressions (whose names may be pattern words).
        let callee = ident().prop_filter("not mask", |c| c.name != "mask");
        let mask =
            (inner.clone(), pattern(), prop::option::of(inner.clone())).prop_map(|(x, p, fill)| {
                let mut args = vec![Arg::Expr(x), Arg::Pattern(p)];
                args.extend(fill.map(Arg::Expr));
                let callee = Ident {
                    name: "mask".to_string(),
                    span: Span::default(),
                };
                ex(ExprKind::Call { callee, args })
            });
        prop_oneof![
            (op, inner.clone(), inner.clone()).prop_map(|(op, lhs, rhs)| ex(ExprKind::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs)
            })),
            inner.clone().prop_map(|e| ex(ExprKind::Neg(Box::new(e)))),
            inner
                .clone()
                .prop_map(|e| ex(ExprKind::Transpose(Box::new(e)))),
            (
                callee,
                prop::collection::vec(inner.prop_map(Arg::Expr), 1..4)
            )
                .prop_map(|(callee, args)| ex(ExprKind::Call { callee, args })),
            mask,
        ]
    })
}

fn ex(kind: ExprKind) -> Expr {
    Expr {
        kind,
        span: Span::default(),
    }
}

fn type_expr() -> impl Strategy<Value = TypeExpr> {
    let elem = prop_oneof![
        Just(ElemType::F32),
        Just(ElemType::F16),
        Just(ElemType::Bf16)
    ];
    let dim = prop_oneof![
        ident().prop_map(DimExpr::Sym),
        size().prop_map(|value| DimExpr::Lit {
            value,
            span: Span::default()
        }),
    ];
    (elem, prop::collection::vec(dim, 0..4)).prop_map(|(elem, dims)| TypeExpr {
        elem,
        dims,
        span: Span::default(),
    })
}

fn approx() -> impl Strategy<Value = Approx> {
    prop_oneof![
        Just(ApproxKind::Bf16),
        Just(ApproxKind::F16),
        Just(ApproxKind::Int8),
        size().prop_map(|r| ApproxKind::Lowrank { r }),
        (size(), prop::option::of(size()))
            .prop_map(|(m, seed)| ApproxKind::RandomFeatures { m, seed }),
        size().prop_map(|m| ApproxKind::Nystrom { m }),
        number().prop_map(ApproxKind::Tol),
    ]
    .prop_map(|kind| Approx {
        kind,
        span: Span::default(),
    })
}

fn kernel() -> impl Strategy<Value = Kernel> {
    let param = (ident(), type_expr()).prop_map(|(name, ty)| Param { name, ty });
    let stmt = (ident(), expr()).prop_map(|(name, value)| Let {
        name,
        value,
        span: Span::default(),
    });
    (
        prop::collection::vec(approx(), 0..4),
        ident(),
        prop::collection::vec(param, 1..4),
        prop::option::of(type_expr()),
        prop::collection::vec(stmt, 0..4),
        expr(),
    )
        .prop_map(|(approx, name, params, ret_type, stmts, ret)| Kernel {
            approx,
            name,
            params,
            ret_type,
            extra_ret_types: Vec::new(),
            stmts,
            ret,
            extra_rets: Vec::new(),
            span: Span::default(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_of_print_is_identity(kernels in prop::collection::vec(kernel(), 0..3)) {
        let file = File { kernels };
        let text = print_file(&file);
        let (parsed, diagnostics) = parse(&text);
        prop_assert!(diagnostics.is_empty(), "{}\n{:#?}", text, diagnostics);
        prop_assert_eq!(parsed.without_spans(), file.without_spans(), "{}", text);
        // Printing is canonical: a second round prints the same text.
        prop_assert_eq!(print_file(&parsed), text);
    }
}
