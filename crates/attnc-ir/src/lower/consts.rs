//! Compile-time arguments: constant scalar expressions (mask fill values, axes) and dimension
//! arguments (`ones(n, 1)`, `relpos(m, n)`).

use crate::dim::Dim;
use attnc_syntax::ast::{BinOp, Expr, ExprKind};

/// The value of `expr` when it is literal arithmetic (`-1e9`, `-(2 * 3)`, `1 / 4`) built from
/// numbers, unary minus and `+ - * /`; `None` for anything else (names, calls, `@`, `.T`).
///
/// Iterative, so it never recurses however deep the expression is.
pub(crate) fn const_value(expr: &Expr) -> Option<f64> {
    enum Task<'a> {
        Visit(&'a Expr),
        Negate,
        Apply(BinOp),
    }
    let mut tasks = vec![Task::Visit(expr)];
    let mut values: Vec<f64> = Vec::new();
    while let Some(task) = tasks.pop() {
        match task {
            Task::Visit(e) => match &e.kind {
                ExprKind::Number(v) => values.push(*v),
                ExprKind::Neg(inner) => {
                    tasks.push(Task::Negate);
                    tasks.push(Task::Visit(inner));
                }
                ExprKind::Binary { op, lhs, rhs } if *op != BinOp::MatMul => {
                    tasks.push(Task::Apply(*op));
                    tasks.push(Task::Visit(rhs));
                    tasks.push(Task::Visit(lhs));
                }
                _ => return None,
            },
            Task::Negate => {
                let v = values.pop()?;
                values.push(-v);
            }
            Task::Apply(op) => {
                let rhs = values.pop()?;
                let lhs = values.pop()?;
                values.push(match op {
                    BinOp::Add => lhs + rhs,
                    BinOp::Sub => lhs - rhs,
                    BinOp::Mul => lhs * rhs,
                    BinOp::Div => lhs / rhs,
                    BinOp::MatMul => return None,
                });
            }
        }
    }
    values.pop()
}

/// `value` as an integer when it is one exactly and fits in an `i64`.
pub(crate) fn as_integer(value: f64) -> Option<i64> {
    // 2^63 is exactly representable; every f64 in [-2^63, 2^63) with no fraction fits.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (value.fract() == 0.0 && (-LIMIT..LIMIT).contains(&value)).then_some(value as i64)
}

/// What a dimension argument turned out to be.
pub(crate) enum DimArg<'a> {
    /// A usable dimension.
    Dim(Dim),
    /// A name that is not a dimension symbol.
    NotADimension(&'a str),
    /// Anything else (a negative or fractional number, an expression).
    Invalid,
}

/// Reads a dimension argument: a dimension symbol (as `is_dim` decides) or a non-negative
/// integer literal.
pub(crate) fn dim_arg<'a>(expr: &'a Expr, is_dim: impl Fn(&str) -> bool) -> DimArg<'a> {
    match &expr.kind {
        ExprKind::Name(name) if is_dim(name) => DimArg::Dim(Dim::Sym(name.clone())),
        ExprKind::Name(name) => DimArg::NotADimension(name),
        ExprKind::Number(v) => match as_integer(*v).and_then(|i| u64::try_from(i).ok()) {
            Some(n) => DimArg::Dim(Dim::Const(n)),
            None => DimArg::Invalid,
        },
        _ => DimArg::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_syntax::Span;

    fn e(kind: ExprKind) -> Expr {
        Expr {
            kind,
            span: Span::default(),
        }
    }

    fn num(v: f64) -> Expr {
        e(ExprKind::Number(v))
    }

    fn neg(x: Expr) -> Expr {
        e(ExprKind::Neg(Box::new(x)))
    }

    fn bin(op: BinOp, lhs: Expr, rhs: Expr) -> Expr {
        e(ExprKind::Binary {
            op,
            lhs: Box::new(lhs),
            rhs: Box::new(rhs),
        })
    }

    #[test]
    fn folds_literal_arithmetic() {
        assert_eq!(const_value(&neg(num(1e9))), Some(-1e9));
        let x = bin(BinOp::Sub, num(1.0), bin(BinOp::Mul, num(2.0), num(3.0)));
        assert_eq!(const_value(&x), Some(-5.0));
        assert_eq!(
            const_value(&bin(BinOp::Div, num(1.0), num(0.0))),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn names_and_matmuls_are_not_constant() {
        assert_eq!(const_value(&e(ExprKind::Name("d".into()))), None);
        assert_eq!(const_value(&bin(BinOp::MatMul, num(1.0), num(2.0))), None);
        assert_eq!(
            const_value(&bin(BinOp::Add, num(1.0), e(ExprKind::Name("d".into())))),
            None
        );
    }

    #[test]
    fn deep_negation_does_not_recurse() {
        let mut x = num(2.0);
        for _ in 0..10_001 {
            x = neg(x);
        }
        let v = std::thread::Builder::new()
            .stack_size(1 << 21)
            .spawn(move || {
                let v = const_value(&x);
                // Dropping a deep box chain recurses; unwind it by hand.
                let mut cur = x;
                while let ExprKind::Neg(inner) = cur.kind {
                    cur = *inner;
                }
                v
            })
            .expect("spawn")
            .join()
            .expect("join");
        assert_eq!(v, Some(-2.0));
    }

    #[test]
    fn integers_and_dimensions() {
        assert_eq!(as_integer(-1.0), Some(-1));
        assert_eq!(as_integer(1.5), None);
        assert_eq!(as_integer(1e300), None);
        assert!(matches!(
            dim_arg(&num(4.0), |_| false),
            DimArg::Dim(Dim::Const(4))
        ));
        assert!(matches!(dim_arg(&num(0.5), |_| false), DimArg::Invalid));
        let n = e(ExprKind::Name("n".into()));
        assert!(matches!(
            dim_arg(&n, |s| s == "n"),
            DimArg::Dim(Dim::Sym(_))
        ));
        assert!(matches!(dim_arg(&n, |_| false), DimArg::NotADimension("n")));
    }
}
