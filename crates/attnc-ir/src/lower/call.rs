//! Builtin calls: their compile-time arguments (axes, patterns, fills, dimensions) and the
//! node each call becomes. Argument counts and kinds are already checked.

use crate::dim::{Dim, Shape};
use crate::graph::NodeId;
use crate::lower::builtin::Builtin;
use crate::lower::consts::{as_integer, const_value, dim_arg, DimArg};
use crate::lower::expr::has_shape;
use crate::lower::mask::mask_pattern;
use crate::lower::scope::Scope;
use crate::lower::segment::Segments;
use crate::lower::shape::{self, Operand};
use crate::op::{Op, ReduceOp};
use attnc_syntax::ast::{Arg, Expr, Ident};
use attnc_syntax::Diagnostic;

/// Builds the node of the call `e` to `builtin`, whose array arguments are `operands`.
pub(crate) fn finish_call(
    scope: &mut Scope,
    builtin: Builtin,
    e: &Expr,
    callee: &Ident,
    args: &[Arg],
    operands: &[NodeId],
) -> Result<NodeId, Diagnostic> {
    let name = callee.name.as_str();
    let first = || {
        operands
            .first()
            .copied()
            .ok_or_else(|| Diagnostic::error("internal error: missing call operand", e.span))
    };
    match builtin {
        Builtin::Unary(op) => {
            let x = first()?;
            let shape = scope.shape(x).clone();
            Ok(scope.add(Op::Unary(op), shape, e.span, &[x]))
        }
        Builtin::Binary(op) => {
            let (&[a, b], [Arg::Expr(ea), Arg::Expr(eb)]) = (operands, args) else {
                return Err(Diagnostic::error(
                    "internal error: binary call out of step",
                    e.span,
                ));
            };
            let shape = shape::broadcast(
                Operand {
                    shape: scope.shape(a),
                    span: ea.span,
                    role: "first argument",
                },
                Operand {
                    shape: scope.shape(b),
                    span: eb.span,
                    role: "second argument",
                },
            )?;
            Ok(scope.add(Op::Binary(op), shape, e.span, &[a, b]))
        }
        Builtin::Reduce(op) => {
            let x = first()?;
            let axis = axis_arg(scope, name, args, x, Some(op))?;
            let shape = shape::reduce(scope.shape(x), axis);
            Ok(scope.add(Op::Reduce { op, axis }, shape, e.span, &[x]))
        }
        Builtin::Softmax => {
            let x = first()?;
            let axis = axis_arg(scope, name, args, x, None)?;
            let shape = scope.shape(x).clone();
            Ok(scope.add(Op::Softmax { axis }, shape, e.span, &[x]))
        }
        Builtin::Cumsum => {
            let x = first()?;
            let axis = axis_arg(scope, name, args, x, None)?;
            let shape = scope.shape(x).clone();
            Ok(scope.add(Op::Cumsum { axis }, shape, e.span, &[x]))
        }
        Builtin::SoftmaxSink => {
            let (&[x, s], [Arg::Expr(ex), Arg::Expr(es)]) = (operands, args) else {
                return Err(Diagnostic::error(
                    "internal error: softmax_sink call out of step",
                    e.span,
                ));
            };
            let (xs, ss) = (scope.shape(x).clone(), scope.shape(s).clone());
            if xs.is_empty() {
                return Err(Diagnostic::error(
                    "`softmax_sink` needs an array of rank at least 1, but it has rank 0",
                    ex.span,
                )
                .with_primary_message(has_shape(&xs)));
            }
            let Some(shape) = crate::build::sink_shape(&xs, &ss) else {
                let mut rows = xs.clone();
                if let Some(last) = rows.last_mut() {
                    *last = Dim::Const(1);
                }
                return Err(Diagnostic::error(
                    format!(
                        "the sink of `softmax_sink` must broadcast to the rows {} of its first argument",
                        crate::dim::format_shape(&rows)
                    ),
                    es.span,
                )
                .with_primary_message(has_shape(&ss))
                .with_label(ex.span, has_shape(&xs))
                .with_note("one sink logit per row: a scalar, or a shape like [h, 1, 1] or [h, n, 1]"));
            };
            Ok(scope.add(Op::SoftmaxSink, shape, e.span, &[x, s]))
        }
        Builtin::Pool(op) => {
            let x = first()?;
            let xs = scope.shape(x).clone();
            if xs.len() < 2 {
                return Err(Diagnostic::error(
                    format!(
                        "`{name}` needs an array of rank at least 2 (rows, columns), but it has rank {}",
                        xs.len()
                    ),
                    args[0].span(),
                )
                .with_primary_message(has_shape(&xs))
                .with_note("blocks of consecutive rows (the second-to-last axis) are pooled"));
            }
            let size = pool_size(scope, name, &args[1])?;
            let shape = crate::build::pooled(&xs, &size).unwrap_or(xs);
            Ok(scope.add(Op::Pool { op, size }, shape, e.span, &[x]))
        }
        Builtin::Mask => {
            let x = first()?;
            let shape = scope.shape(x).clone();
            if shape.len() < 2 {
                return Err(Diagnostic::error(
                    format!(
                        "`mask` needs an array of rank at least 2, but it has rank {}",
                        shape.len()
                    ),
                    args[0].span(),
                )
                .with_primary_message(has_shape(&shape))
                .with_note("the pattern applies to the last two axes (query i, key j)"));
            }
            let mut segments = Segments::new(x, &shape);
            let pattern = match &args[1] {
                Arg::Pattern(p) => {
                    let names: Vec<String> = scope.names.keys().cloned().collect();
                    let is_value = |name: &str| names.iter().any(|n| n == name);
                    mask_pattern(p, &is_value, &mut |id, role| {
                        segments.resolve(scope, id, role)
                    })?
                }
                Arg::Expr(x) => {
                    return Err(Diagnostic::error("expected a mask pattern", x.span));
                }
            };
            let fill = match args.get(2) {
                Some(arg) => fill_arg(arg)?,
                None => f64::NEG_INFINITY,
            };
            let operands = segments.operands();
            Ok(scope.add(Op::Mask { pattern, fill }, shape, e.span, &operands))
        }
        Builtin::Fill(value) => {
            let shape = dim_args(scope, name, args)?;
            Ok(scope.add(Op::Fill { value }, shape, e.span, &[]))
        }
        Builtin::RelPos => {
            let shape = dim_args(scope, name, args)?;
            Ok(scope.add(Op::RelPos, shape, e.span, &[]))
        }
    }
}

/// The normalized axis argument (slot 1) of a reduction or softmax; softmax defaults to the
/// last axis.
fn axis_arg(
    scope: &Scope,
    name: &str,
    args: &[Arg],
    x: NodeId,
    reduce: Option<ReduceOp>,
) -> Result<usize, Diagnostic> {
    let shape = scope.shape(x);
    let rank = shape.len();
    let operand_span = args[0].span();
    let Some(arg) = args.get(1) else {
        return shape::normalize_axis(-1, rank).ok_or_else(|| {
            Diagnostic::error(
                format!("`{name}` needs an array of rank at least 1, but it has rank 0"),
                operand_span,
            )
            .with_primary_message(has_shape(shape))
        });
    };
    let Some(axis) = arg_expr(arg).and_then(const_value).and_then(as_integer) else {
        let d = Diagnostic::error(
            format!("the axis of `{name}` must be an integer literal"),
            arg.span(),
        )
        .with_primary_message("not an integer literal");
        return Err(if reduce == Some(ReduceOp::Max) {
            d.with_note("use `maximum(a, b)` for the elementwise maximum of two arrays")
        } else {
            d
        });
    };
    shape::normalize_axis(axis, rank).ok_or_else(|| {
        let valid = match rank {
            0 => "an array of rank 0 has no axes".to_string(),
            r => format!("valid axes are -{r} to {}", r - 1),
        };
        Diagnostic::error(
            format!("axis {axis} of `{name}` is out of range for an array of rank {rank}"),
            arg.span(),
        )
        .with_primary_message("axis out of range")
        .with_label(operand_span, has_shape(shape))
        .with_note(valid)
    })
}

/// The block size of `mean_pool` / `max_pool`: a positive integer literal or a dimension
/// symbol (bound by an input's shape or `--shape`).
fn pool_size(scope: &Scope, name: &str, arg: &Arg) -> Result<Dim, Diagnostic> {
    let expr = arg_expr(arg);
    if let Some(Expr {
        kind: attnc_syntax::ast::ExprKind::Name(n),
        ..
    }) = expr
    {
        if !scope.names.contains_key(n) {
            return Ok(Dim::Sym(n.clone()));
        }
    }
    match expr.map(|x| dim_arg(x, |s| scope.is_dim(s))) {
        Some(DimArg::Dim(Dim::Const(0))) => Err(Diagnostic::error(
            format!("the block size of `{name}` is 0"),
            arg.span(),
        )
        .with_primary_message("pool size 0")
        .with_note("blocks hold at least one row")),
        Some(DimArg::Dim(d)) => Ok(d),
        _ => Err(Diagnostic::error(
            format!("the block size of `{name}` must be a positive integer or a dimension symbol"),
            arg.span(),
        )
        .with_primary_message("not a size")),
    }
}

/// The constant fill value of `mask`.
fn fill_arg(arg: &Arg) -> Result<f64, Diagnostic> {
    let value = arg_expr(arg).and_then(const_value).ok_or_else(|| {
        Diagnostic::error(
            "the fill value of `mask` must be a constant number",
            arg.span(),
        )
        .with_primary_message("not a constant")
        .with_note("write a number such as `0` or `-1e9`")
    })?;
    if value.is_nan() {
        return Err(
            Diagnostic::error("the fill value of `mask` is not a number", arg.span())
                .with_primary_message("this evaluates to nan"),
        );
    }
    Ok(value)
}

/// The dimension arguments of `ones`, `zeros` and `relpos`.
fn dim_args(scope: &Scope, name: &str, args: &[Arg]) -> Result<Shape, Diagnostic> {
    let mut shape: Vec<Dim> = Vec::with_capacity(args.len());
    for arg in args {
        let parsed = match arg_expr(arg) {
            Some(x) => dim_arg(x, |s| scope.is_dim(s)),
            None => DimArg::Invalid,
        };
        match parsed {
            DimArg::Dim(d) => shape.push(d),
            DimArg::NotADimension(n) => {
                let d = Diagnostic::error(
                    format!("the arguments of `{name}` must be dimensions, but `{n}` is not a dimension symbol"),
                    arg.span(),
                )
                .with_primary_message("not a dimension");
                return Err(if scope.names.contains_key(n) {
                    d.with_note(format!(
                        "`{n}` is an array; `{name}` takes sizes such as `n` or `64`"
                    ))
                } else {
                    d
                });
            }
            DimArg::Invalid => {
                return Err(Diagnostic::error(
                    format!("the arguments of `{name}` must be dimension symbols or non-negative integers"),
                    arg.span(),
                )
                .with_primary_message("not a dimension"));
            }
        }
    }
    Ok(shape)
}

/// The expression of an argument (patterns were rejected by the arity check).
fn arg_expr(arg: &Arg) -> Option<&Expr> {
    match arg {
        Arg::Expr(x) => Some(x),
        Arg::Pattern(_) => None,
    }
}
