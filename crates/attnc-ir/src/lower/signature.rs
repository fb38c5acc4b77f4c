//! A kernel's signature: `@approx` items, parameters and dimension symbols, and the declared
//! return type.

use crate::dim::{format_shape, Dim, Shape};
use crate::graph::{Node, Param};
use crate::lower::expr::has_shape;
use crate::lower::scope::{Binding, Scope};
use crate::lower::Errors;
use crate::op::Op;
use attnc_syntax::ast::{self, Approx, ApproxKind, DimExpr, TypeExpr};
use attnc_syntax::{Diagnostic, Span};
use std::collections::HashMap;
use std::mem::discriminant;

/// The largest accepted `tol`.
const MAX_TOL: f64 = 1e6;

/// Checks the `@approx` items and returns their kinds, in order.
pub(crate) fn check_approx(items: &[Approx], errors: &mut Errors) -> Vec<ApproxKind> {
    let mut first_seen: Vec<(std::mem::Discriminant<ApproxKind>, Span)> = Vec::new();
    for item in items {
        let name = approx_name(&item.kind);
        let key = discriminant(&item.kind);
        if let Some((_, first)) = first_seen.iter().find(|(k, _)| *k == key) {
            errors.push(
                Diagnostic::error(format!("`{name}` is listed twice in `@approx`"), item.span)
                    .with_primary_message("listed again here")
                    .with_label(*first, "first listed here"),
            );
        } else {
            first_seen.push((key, item.span));
        }
        let problem = match item.kind {
            ApproxKind::Lowrank { r: 0 } => Some("the rank of `lowrank(r)` must be at least 1"),
            ApproxKind::RandomFeatures { m: 0, .. } => {
                Some("the number of features of `random_features(m)` must be at least 1")
            }
            ApproxKind::Nystrom { m: 0 } => {
                Some("the number of landmarks of `nystrom(m)` must be at least 1")
            }
            ApproxKind::Tol(t) if !(t.is_finite() && t > 0.0 && t <= MAX_TOL) => {
                Some("`tol` must be a finite number greater than 0 and at most 1e6")
            }
            _ => None,
        };
        if let Some(message) = problem {
            errors.push(Diagnostic::error(message, item.span));
        }
    }
    items.iter().map(|item| item.kind.clone()).collect()
}

/// How `@approx` spells an approximation.
fn approx_name(kind: &ApproxKind) -> &'static str {
    match kind {
        ApproxKind::Bf16 => "bf16",
        ApproxKind::F16 => "f16",
        ApproxKind::Int8 => "int8",
        ApproxKind::Bf16Products => "bf16_products",
        ApproxKind::Lowrank { .. } => "lowrank",
        ApproxKind::RandomFeatures { .. } => "random_features",
        ApproxKind::Nystrom { .. } => "nystrom",
        ApproxKind::Tol(_) => "tol",
    }
}

/// Declares the dimension symbols of the parameter types, checks the parameter names, adds
/// one `Input` node per parameter (so node `i` is parameter `i`) and binds the names.
pub(crate) fn declare_params(
    params: &[ast::Param],
    scope: &mut Scope,
    errors: &mut Errors,
) -> Vec<Param> {
    for p in params {
        for dim in &p.ty.dims {
            if let DimExpr::Sym(id) = dim {
                scope.dims.entry(id.name.clone()).or_insert(id.span);
            }
        }
    }
    let mut first_seen: HashMap<&str, Span> = HashMap::new();
    let mut out = Vec::with_capacity(params.len());
    for (index, p) in params.iter().enumerate() {
        let name = p.name.name.as_str();
        if let Some(first) = first_seen.get(name) {
            errors.push(
                Diagnostic::error(format!("duplicate parameter `{name}`"), p.name.span)
                    .with_primary_message("declared again here")
                    .with_label(*first, "first declared here"),
            );
        } else {
            first_seen.insert(name, p.name.span);
        }
        if let Some(dim_span) = scope.dims.get(name) {
            errors.push(
                Diagnostic::error(
                    format!("parameter `{name}` has the same name as a dimension symbol"),
                    p.name.span,
                )
                .with_primary_message("parameter declared here")
                .with_label(*dim_span, format!("dimension `{name}` declared here"))
                .with_note("rename the parameter or the dimension"),
            );
        }
        let shape = type_shape(&p.ty);
        let span = p.name.span.to(p.ty.span);
        let node = Node {
            op: Op::Input {
                index,
                name: name.to_string(),
            },
            shape: shape.clone(),
            dtype: p.ty.elem,
            span,
        };
        let id = scope.graph.add(node, &[]);
        scope
            .names
            .entry(name.to_string())
            .or_insert(Binding::Node(id));
        out.push(Param {
            name: name.to_string(),
            dtype: p.ty.elem,
            shape,
            span,
        });
    }
    out
}

/// The symbolic shape a type declares.
fn type_shape(ty: &TypeExpr) -> Shape {
    ty.dims
        .iter()
        .map(|d| match d {
            DimExpr::Sym(id) => Dim::Sym(id.name.clone()),
            DimExpr::Lit { value, .. } => Dim::Const(*value),
        })
        .collect()
}

/// The declared return shape, when every symbol in it appears in a parameter type.
pub(crate) fn return_shape(ty: &TypeExpr, scope: &Scope, errors: &mut Errors) -> Option<Shape> {
    let mut ok = true;
    for dim in &ty.dims {
        if let DimExpr::Sym(id) = dim {
            if !scope.is_dim(&id.name) {
                ok = false;
                errors.push(
                    Diagnostic::error(
                        format!(
                            "dimension `{}` of the return type does not appear in any parameter",
                            id.name
                        ),
                        id.span,
                    )
                    .with_primary_message("unknown dimension")
                    .with_note("the return type may use only dimension symbols of the parameters, or literal sizes"),
                );
            }
        }
    }
    ok.then(|| type_shape(ty))
}

/// Checks that the returned value has exactly the declared shape; `which` names the output
/// of a kernel with several (`Some(k)`, counted from 0), so the message says which one.
pub(crate) fn check_return(
    ty: &TypeExpr,
    declared: &[Dim],
    got: &[Dim],
    ret_span: Span,
    which: Option<usize>,
) -> Result<(), Diagnostic> {
    check_return_one(ty, declared, got, ret_span).map_err(|mut d| {
        if let Some(k) = which {
            d.message = format!("output {k}: {}", d.message);
        }
        d
    })
}

fn check_return_one(
    ty: &TypeExpr,
    declared: &[Dim],
    got: &[Dim],
    ret_span: Span,
) -> Result<(), Diagnostic> {
    let declared_text = format!("{}{}", ty.elem.keyword(), format_shape(declared));
    if declared.len() != got.len() {
        return Err(Diagnostic::error(
            format!(
                "the kernel returns an array of rank {} but its return type has rank {}",
                got.len(),
                declared.len()
            ),
            ret_span,
        )
        .with_primary_message(has_shape(got))
        .with_label(ty.span, format!("declared as {declared_text}")));
    }
    for (axis, ((want, have), dim_expr)) in declared.iter().zip(got).zip(&ty.dims).enumerate() {
        if want != have {
            return Err(Diagnostic::error(
                format!(
                    "dimension {axis} of the returned value is `{have}` but the return type declares `{want}`"
                ),
                ret_span,
            )
            .with_primary_message(has_shape(got))
            .with_label(dim_expr.span(), format!("declared as `{want}` in {declared_text}")));
        }
    }
    Ok(())
}
