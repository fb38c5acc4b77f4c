//! Lowering one expression into the graph, checking shapes as it goes.
//!
//! The walk is iterative (an explicit task stack), so its native stack use does not grow
//! with the depth of the expression; nodes are added after their operands.

use crate::dim::format_shape;
use crate::graph::NodeId;
use crate::lower::builtin::{Builtin, PATTERN_NAMES};
use crate::lower::call;
use crate::lower::scope::{Failure, Scope};
use crate::lower::shape::{self, Operand};
use crate::lower::suggest::closest;
use crate::op::{BinaryOp, Op, UnaryOp};
use attnc_syntax::ast::{Arg, BinOp, Expr, ExprKind, Ident};
use attnc_syntax::Diagnostic;

/// One step of the walk.
enum Task<'a> {
    /// Lower the operands of this expression (or the expression itself when it has none).
    Visit(&'a Expr),
    /// The operands are on the value stack: build this expression's node.
    Finish(&'a Expr),
}

impl Scope {
    /// Lowers `root` and returns the node holding its value.
    pub(crate) fn lower_expr(&mut self, root: &Expr) -> Result<NodeId, Failure> {
        let mut tasks = vec![Task::Visit(root)];
        let mut values: Vec<NodeId> = Vec::new();
        while let Some(task) = tasks.pop() {
            match task {
                Task::Visit(e) => match &e.kind {
                    ExprKind::Number(v) => {
                        values.push(self.add(Op::Const(*v), vec![], e.span, &[]))
                    }
                    ExprKind::Name(name) => values.push(self.resolve(name, e.span)?),
                    ExprKind::Neg(inner) => {
                        if let ExprKind::Number(v) = inner.kind {
                            values.push(self.add(Op::Const(-v), vec![], e.span, &[]));
                        } else {
                            tasks.push(Task::Finish(e));
                            tasks.push(Task::Visit(inner));
                        }
                    }
                    ExprKind::Transpose(inner) => {
                        tasks.push(Task::Finish(e));
                        tasks.push(Task::Visit(inner));
                    }
                    ExprKind::Binary { lhs, rhs, .. } => {
                        tasks.push(Task::Finish(e));
                        tasks.push(Task::Visit(rhs));
                        tasks.push(Task::Visit(lhs));
                    }
                    ExprKind::Call { callee, args } => {
                        let builtin = self.check_call(callee, args)?;
                        tasks.push(Task::Finish(e));
                        for arg in args[..builtin.value_args()].iter().rev() {
                            if let Arg::Expr(x) = arg {
                                tasks.push(Task::Visit(x));
                            }
                        }
                    }
                },
                Task::Finish(e) => {
                    let id = self.finish(e, &mut values)?;
                    values.push(id);
                }
            }
        }
        values.pop().ok_or_else(|| {
            Failure::from(Diagnostic::error(
                "internal error: an expression produced no value",
                root.span,
            ))
        })
    }

    /// Builds the node of `e`, whose operands are the last values on `values`.
    fn finish(&mut self, e: &Expr, values: &mut Vec<NodeId>) -> Result<NodeId, Failure> {
        match &e.kind {
            ExprKind::Neg(_) => {
                let x = pop(values, e)?;
                let shape = self.shape(x).clone();
                Ok(self.add(Op::Unary(UnaryOp::Neg), shape, e.span, &[x]))
            }
            ExprKind::Transpose(_) => {
                let x = pop(values, e)?;
                let shape = shape::transpose(self.shape(x), e.span)?;
                Ok(self.add(Op::Transpose, shape, e.span, &[x]))
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let b = pop(values, e)?;
                let a = pop(values, e)?;
                let left = Operand {
                    shape: self.shape(a),
                    span: lhs.span,
                    role: "left operand",
                };
                let right = Operand {
                    shape: self.shape(b),
                    span: rhs.span,
                    role: "right operand",
                };
                let (op, shape) = match op {
                    BinOp::MatMul => (Op::MatMul, shape::matmul(left, right)?),
                    BinOp::Add => (Op::Binary(BinaryOp::Add), shape::broadcast(left, right)?),
                    BinOp::Sub => (Op::Binary(BinaryOp::Sub), shape::broadcast(left, right)?),
                    BinOp::Mul => (Op::Binary(BinaryOp::Mul), shape::broadcast(left, right)?),
                    BinOp::Div => (Op::Binary(BinaryOp::Div), shape::broadcast(left, right)?),
                };
                Ok(self.add(op, shape, e.span, &[a, b]))
            }
            ExprKind::Call { callee, args } => {
                let builtin = self.check_call(callee, args)?;
                let count = builtin.value_args();
                let start = values.len().checked_sub(count).ok_or_else(|| internal(e))?;
                let operands = values.split_off(start);
                Ok(call::finish_call(
                    self, builtin, e, callee, args, &operands,
                )?)
            }
            ExprKind::Number(_) | ExprKind::Name(_) => Err(internal(e).into()),
        }
    }

    /// Resolves `callee` to a builtin and checks the argument count and kinds.
    fn check_call(&self, callee: &Ident, args: &[Arg]) -> Result<Builtin, Diagnostic> {
        let name = callee.name.as_str();
        let Some(builtin) = Builtin::lookup(name) else {
            return Err(self.unknown_function(callee));
        };
        let arity = builtin.arity();
        if !arity.accepts(args.len()) {
            // "1 argument", "at least 1 argument", "1 or 2 arguments"
            let singular = arity.min == 1 && arity.max.is_none_or(|max| max == 1);
            let plural = if singular { "" } else { "s" };
            let mut d = Diagnostic::error(
                format!(
                    "`{name}` takes {} argument{plural} but got {}",
                    arity.describe(),
                    args.len()
                ),
                callee.span,
            )
            .with_primary_message(format!("expected {} argument{plural}", arity.describe()));
            if let Some(max) = arity.max {
                for extra in args.iter().skip(max) {
                    d = d.with_label(extra.span(), "unexpected argument");
                }
            }
            return Err(d);
        }
        for (slot, arg) in args.iter().enumerate() {
            let wants_pattern = builtin.pattern_slot() == Some(slot);
            match (arg, wants_pattern) {
                (Arg::Pattern(p), false) => {
                    return Err(Diagnostic::error(
                        format!(
                        "expected an expression as argument {} of `{name}`, found a mask pattern",
                        slot + 1
                    ),
                        p.span,
                    )
                    .with_primary_message("a mask pattern is not a value")
                    .with_label(callee.span, format!("in this call to `{name}`"))
                    .with_note("mask patterns can only be the second argument of `mask`"))
                }
                (Arg::Expr(x), true) => {
                    return Err(Diagnostic::error(
                        format!(
                        "expected a mask pattern as argument {} of `{name}`, found an expression",
                        slot + 1
                    ),
                        x.span,
                    )
                    .with_primary_message("not a mask pattern")
                    .with_label(callee.span, format!("in this call to `{name}`"))
                    .with_note(
                        "patterns are `causal`, `window(w)`, `dilated(w, r)`, `global(g)`, \
                         `block(b)` and their combinations with `&` and `|`",
                    ))
                }
                _ => {}
            }
        }
        Ok(builtin)
    }

    /// The error for a call of something that is not a builtin function.
    fn unknown_function(&self, callee: &Ident) -> Diagnostic {
        let name = callee.name.as_str();
        if PATTERN_NAMES.contains(&name) {
            return Diagnostic::error(
                format!("`{name}` is a mask pattern, not a function"),
                callee.span,
            )
            .with_note("mask patterns can only be the second argument of `mask`");
        }
        if self.names.contains_key(name) || self.is_dim(name) {
            return Diagnostic::error(format!("`{name}` is not a function"), callee.span)
                .with_primary_message("a value, not a function");
        }
        let d = Diagnostic::error(format!("unknown function `{name}`"), callee.span);
        match closest(name, Builtin::names()) {
            Some(close) => d.with_note(format!("did you mean `{close}`?")),
            None => d,
        }
    }
}

/// Pops the next operand of `e`.
fn pop(values: &mut Vec<NodeId>, e: &Expr) -> Result<NodeId, Failure> {
    values.pop().ok_or_else(|| internal(e).into())
}

/// An internal inconsistency of the walk, reported rather than panicking.
fn internal(e: &Expr) -> Diagnostic {
    Diagnostic::error("internal error: operand stack out of step", e.span)
}

/// "this has shape [h, n, d]"
pub(crate) fn has_shape(shape: &[crate::dim::Dim]) -> String {
    format!("this has shape {}", format_shape(shape))
}
