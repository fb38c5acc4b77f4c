//! Lowering from the AST to the IR, with name, arity, shape and type checking.
//!
//! [`lower_file`] checks every kernel of a file and either returns the whole [`Module`] or
//! every error found. After an error in one statement, lowering goes on with the next one
//! (a `let` that failed is *poisoned*: its uses fail silently instead of cascading), and after
//! a failed kernel with the next kernel, up to [`MAX_ERRORS`] errors.
//!
//! Invariants of the lowered [`Kernel`]:
//! - node `i` for `i < params.len()` is `Op::Input { index: i }` (every parameter has its input
//!   node, used or not); every other node feeds the output;
//! - nodes are added operands-first, so index order is topological;
//! - every node but an input has dtype f32; an f16/bf16 return type ends in `Op::Cast`;
//! - every node's span is the source expression it came from (for a cast, the return type);
//! - a kernel returning `(a, b, ..)` keeps one node per value, in order ([`Kernel::outputs`]).
//!
//! Expressions are lowered with an explicit task stack (no recursion); statements are a loop,
//! so 100,000 `let`s cost no native stack. Only mask patterns recurse, once per `&`/`|`.

mod builtin;
mod call;
mod consts;
mod expr;
mod mask;
mod prune;
mod scope;
mod segment;
mod shape;
mod signature;
mod suggest;

use crate::graph::{Kernel, KernelOutput, Module, Node};
use crate::op::{DType, Op};
use attnc_syntax::ast::{self, File};
use attnc_syntax::{Diagnostic, Span};
use scope::{Binding, Failure, Scope};
use std::collections::HashMap;

/// Lowering stops collecting errors after this many.
pub const MAX_ERRORS: usize = 100;

/// Lowers and checks every kernel of `file`.
///
/// ```
/// use attnc_syntax::ast::{Expr, ExprKind, File, Ident, Kernel, Param, DimExpr, ElemType, TypeExpr};
/// use attnc_syntax::Span;
/// let id = |s: &str| Ident { name: s.into(), span: Span::default() };
/// let ty = TypeExpr { elem: ElemType::F32, dims: vec![DimExpr::Sym(id("n"))], span: Span::default() };
/// let kernel = Kernel {
///     approx: vec![],
///     name: id("f"),
///     params: vec![Param { name: id("x"), ty: ty.clone() }],
///     ret_type: Some(ty),
///     extra_ret_types: vec![],
///     stmts: vec![],
///     ret: Expr { kind: ExprKind::Name("x".into()), span: Span::default() },
///     extra_rets: vec![],
///     span: Span::default(),
/// };
/// let module = attnc_ir::lower::lower_file(&File { kernels: vec![kernel] }).expect("valid");
/// assert_eq!(module.kernels[0].graph.len(), 1);
/// ```
pub fn lower_file(file: &File) -> Result<Module, Vec<Diagnostic>> {
    let mut errors = Errors::default();
    let mut first_seen: HashMap<&str, Span> = HashMap::new();
    let mut kernels = Vec::with_capacity(file.kernels.len());
    for k in &file.kernels {
        if errors.is_full() {
            break;
        }
        let name = k.name.name.as_str();
        if let Some(first) = first_seen.get(name) {
            errors.push(
                Diagnostic::error(format!("duplicate kernel `{name}`"), k.name.span)
                    .with_primary_message("defined again here")
                    .with_label(*first, "first defined here"),
            );
        } else {
            first_seen.insert(name, k.name.span);
        }
        if let Some(kernel) = lower_kernel(k, &mut errors) {
            kernels.push(kernel);
        }
    }
    if errors.list.is_empty() {
        Ok(Module { kernels })
    } else {
        Err(errors.list)
    }
}

/// Lowers one kernel; `None` when it has errors (pushed onto `errors`).
fn lower_kernel(k: &ast::Kernel, errors: &mut Errors) -> Option<Kernel> {
    let before = errors.list.len();
    let approx = signature::check_approx(&k.approx, errors);
    let mut scope = Scope::default();
    let params = signature::declare_params(&k.params, &mut scope, errors);
    let types: Vec<&ast::TypeExpr> = k.ret_type.iter().chain(&k.extra_ret_types).collect();
    let ret_shapes: Vec<Option<_>> = types
        .iter()
        .map(|ty| signature::return_shape(ty, &scope, errors))
        .collect();
    for stmt in &k.stmts {
        if errors.is_full() {
            return None;
        }
        let name = &stmt.name.name;
        if let Some(dim_span) = scope.dims.get(name) {
            errors.push(
                Diagnostic::error(
                    format!("`let` cannot bind `{name}`: it is a dimension symbol"),
                    stmt.name.span,
                )
                .with_primary_message("bound here")
                .with_label(*dim_span, format!("dimension `{name}` declared here")),
            );
            scope.names.insert(name.clone(), Binding::Poisoned);
            continue;
        }
        let binding = match scope.lower_expr(&stmt.value) {
            Ok(id) => Binding::Node(id),
            Err(failure) => {
                errors.report(failure);
                Binding::Poisoned
            }
        };
        scope.names.insert(name.clone(), binding);
    }
    let values: Vec<&ast::Expr> = std::iter::once(&k.ret).chain(&k.extra_rets).collect();
    if !types.is_empty() && types.len() != values.len() {
        let span = values
            .last()
            .map_or(k.ret.span, |last| k.ret.span.to(last.span));
        let declared = types
            .first()
            .zip(types.last())
            .map_or(span, |(a, b)| a.span.to(b.span));
        errors.push(
            Diagnostic::error(
                format!(
                    "the kernel returns {} value{} but its return type lists {}",
                    values.len(),
                    if values.len() == 1 { "" } else { "s" },
                    types.len()
                ),
                span,
            )
            .with_primary_message(format!("{} returned here", values.len()))
            .with_label(declared, format!("{} declared here", types.len())),
        );
        return None;
    }
    let several = values.len() > 1;
    let mut outputs = Vec::with_capacity(values.len());
    for (k_out, value) in values.iter().enumerate() {
        match scope.lower_expr(value) {
            Ok(id) => outputs.push(id),
            Err(failure) => errors.report(failure),
        }
        if let (Some(ty), Some(&id)) = (types.get(k_out), outputs.get(k_out)) {
            if let Some(Some(declared)) = ret_shapes.get(k_out) {
                let got = scope.shape(id);
                let which = several.then_some(k_out);
                if let Err(d) = signature::check_return(ty, declared, got, value.span, which) {
                    errors.push(d);
                }
            }
        }
    }
    if errors.list.len() > before || outputs.len() != values.len() {
        return None;
    }
    let mut dtypes = Vec::with_capacity(outputs.len());
    for (k_out, output) in outputs.iter_mut().enumerate() {
        let dtype = types.get(k_out).map_or(DType::F32, |t| t.elem);
        if let (Some(ty), DType::I32) = (types.get(k_out), dtype) {
            errors.push(
                Diagnostic::error("a kernel cannot return i32", ty.span)
                    .with_primary_message("i32 is for segment-id inputs")
                    .with_note("return f32, f16 or bf16"),
            );
            return None;
        }
        if let (Some(ty), DType::F16 | DType::Bf16) = (types.get(k_out), dtype) {
            let node = Node {
                op: Op::Cast { to: dtype },
                shape: scope.shape(*output).clone(),
                dtype,
                span: ty.span,
            };
            *output = scope.graph.add(node, &[*output]);
        }
        dtypes.push(dtype);
    }
    let (graph, outputs) = prune::prune_all(scope.graph, &outputs);
    let mut listed = outputs
        .into_iter()
        .zip(dtypes)
        .map(|(node, dtype)| KernelOutput { node, dtype });
    let first = listed.next()?;
    Some(Kernel {
        name: k.name.name.clone(),
        params,
        graph,
        output: first.node,
        ret_dtype: first.dtype,
        extra_outputs: listed.collect(),
        approx,
        span: k.span,
    })
}

/// The errors found so far, capped at [`MAX_ERRORS`].
#[derive(Debug, Default)]
pub(crate) struct Errors {
    list: Vec<Diagnostic>,
}

impl Errors {
    /// Records an error; the one that reaches the cap says that lowering stops there.
    pub fn push(&mut self, d: Diagnostic) {
        if self.is_full() {
            return;
        }
        self.list.push(d);
        if self.is_full() {
            if let Some(last) = self.list.last_mut() {
                last.notes
                    .push(format!("too many errors; stopping after {MAX_ERRORS}"));
            }
        }
    }

    /// Records the error of a failed expression, if it is a new one.
    fn report(&mut self, failure: Failure) {
        if let Failure::Error(d) = failure {
            self.push(*d);
        }
    }

    /// True once the cap is reached.
    pub fn is_full(&self) -> bool {
        self.list.len() >= MAX_ERRORS
    }
}

#[cfg(test)]
mod tests;
