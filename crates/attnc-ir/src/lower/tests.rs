//! Checks on hand-built trees the parser would reject: lowering must still report them, not
//! panic.

use super::lower_file;
use attnc_syntax::ast::{
    Arg, DimExpr, ElemType, Expr, ExprKind, File, Ident, Kernel, Param, TypeExpr,
};
use attnc_syntax::{Diagnostic, Span};

fn ident(name: &str) -> Ident {
    Ident {
        name: name.to_string(),
        span: Span::new(1, 2),
    }
}

fn name(n: &str) -> Expr {
    Expr {
        kind: ExprKind::Name(n.to_string()),
        span: Span::new(5, 6),
    }
}

fn call(callee: &str, args: Vec<Expr>) -> Expr {
    Expr {
        kind: ExprKind::Call {
            callee: ident(callee),
            args: args.into_iter().map(Arg::Expr).collect(),
        },
        span: Span::new(3, 9),
    }
}

/// `kernel f(x: f32[n, n]) { return ret; }`
fn kernel_returning(ret: Expr) -> File {
    let ty = TypeExpr {
        elem: ElemType::F32,
        dims: vec![DimExpr::Sym(ident("n")), DimExpr::Sym(ident("n"))],
        span: Span::new(0, 1),
    };
    File {
        kernels: vec![Kernel {
            approx: vec![],
            name: ident("f"),
            params: vec![Param {
                name: ident("x"),
                ty,
            }],
            ret_type: None,
            extra_ret_types: vec![],
            stmts: vec![],
            ret,
            extra_rets: vec![],
            span: Span::new(0, 10),
        }],
    }
}

fn only_error(file: &File) -> Diagnostic {
    match lower_file(file) {
        Ok(_) => panic!("expected an error"),
        Err(mut errors) => {
            assert_eq!(errors.len(), 1, "{errors:#?}");
            errors.remove(0)
        }
    }
}

#[test]
fn pattern_names_are_not_values_or_functions() {
    let d = only_error(&kernel_returning(name("causal")));
    assert_eq!(d.message, "unknown name `causal`");
    assert!(d.notes.iter().any(|n| n.contains("mask pattern")));
    let d = only_error(&kernel_returning(call("window", vec![name("x")])));
    assert_eq!(d.message, "`window` is a mask pattern, not a function");
}

#[test]
fn values_are_not_functions() {
    let d = only_error(&kernel_returning(call("x", vec![name("x")])));
    assert_eq!(d.message, "`x` is not a function");
    let d = only_error(&kernel_returning(name("exp")));
    assert!(d.notes.iter().any(|n| n.contains("call it")));
}

#[test]
fn fills_need_at_least_one_dimension() {
    let d = only_error(&kernel_returning(call("ones", vec![])));
    assert_eq!(d.message, "`ones` takes at least 1 argument but got 0");
}

#[test]
fn dimension_symbols_are_scalars() {
    let module = lower_file(&kernel_returning(name("n"))).expect("valid");
    let k = &module.kernels[0];
    assert!(k.graph.node(k.output).shape.is_empty());
}
