//! The pretty-printer: canonical source text that parses back to the same tree.
//!
//! Parentheses are printed only where the tree needs them: around a lower-precedence operand,
//! around the right operand of an operator of the same precedence (`a - (b - c)`; operators are
//! left-associative), around a binary operand of unary `-` (`-(a + b)`) and around a binary or
//! negated operand of `.T` (`(a @ b).T`, `(-a).T`). Patterns likewise: `&` binds tighter than
//! `|`, and an operand of a chain that is a chain of the same operator (or of `|` under `&`)
//! is parenthesized. Numbers are printed with Rust's `{:?}` for `f64` (`1.0`, `0.1`, `1e-7`,
//! `1e20`), which the lexer reads back to the same value.
//!
//! Recursion follows the tree; trees from the parser are at most
//! [`MAX_DEPTH`](crate::MAX_DEPTH) deep.

use crate::ast::{
    Approx, ApproxKind, Arg, DimExpr, Expr, ExprKind, File, Kernel, Pattern, PatternKind, TypeExpr,
};
use std::fmt::Write;

/// Prints a whole file: kernels separated by one blank line, ending with a newline.
pub fn print_file(file: &File) -> String {
    let kernels: Vec<String> = file.kernels.iter().map(print_kernel).collect();
    kernels.join("\n")
}

/// Prints one kernel: its `@approx` attribute (all items in one), header, body; with a final
/// newline.
pub fn print_kernel(kernel: &Kernel) -> String {
    let mut out = String::new();
    if !kernel.approx.is_empty() {
        let items: Vec<String> = kernel.approx.iter().map(print_approx).collect();
        let _ = writeln!(out, "@approx({})", items.join(", "));
    }
    let params: Vec<String> = kernel
        .params
        .iter()
        .map(|p| format!("{}: {}", p.name.name, print_type(&p.ty)))
        .collect();
    let _ = write!(out, "kernel {}({})", kernel.name.name, params.join(", "));
    if let Some(ty) = &kernel.ret_type {
        if kernel.extra_ret_types.is_empty() {
            let _ = write!(out, " -> {}", print_type(ty));
        } else {
            let types: Vec<String> = std::iter::once(ty)
                .chain(&kernel.extra_ret_types)
                .map(print_type)
                .collect();
            let _ = write!(out, " -> ({})", types.join(", "));
        }
    }
    out.push_str(" {\n");
    for stmt in &kernel.stmts {
        let _ = writeln!(
            out,
            "    let {} = {};",
            stmt.name.name,
            print_expr(&stmt.value)
        );
    }
    if kernel.extra_rets.is_empty() {
        let _ = writeln!(out, "    return {};", print_expr(&kernel.ret));
    } else {
        let values: Vec<String> = std::iter::once(&kernel.ret)
            .chain(&kernel.extra_rets)
            .map(print_expr)
            .collect();
        let _ = writeln!(out, "    return ({});", values.join(", "));
    }
    out.push_str("}\n");
    out
}

/// Prints one item of an `@approx(...)` attribute.
pub fn print_approx(approx: &Approx) -> String {
    print_approx_kind(&approx.kind)
}

/// Prints one approximation as it is spelled in `@approx(...)` and `--approx`.
pub fn print_approx_kind(kind: &ApproxKind) -> String {
    match kind {
        ApproxKind::Bf16 => "bf16".to_string(),
        ApproxKind::F16 => "f16".to_string(),
        ApproxKind::Int8 => "int8".to_string(),
        ApproxKind::Bf16Products => "bf16_products".to_string(),
        ApproxKind::Lowrank { r } => format!("lowrank(r = {r})"),
        ApproxKind::RandomFeatures { m, seed: None } => format!("random_features(m = {m})"),
        ApproxKind::RandomFeatures { m, seed: Some(s) } => {
            format!("random_features(m = {m}, seed = {s})")
        }
        ApproxKind::Nystrom { m } => format!("nystrom(m = {m})"),
        ApproxKind::Tol(x) => format!("tol = {}", print_number(*x)),
    }
}

/// Prints a type: `f32[h, n, d]`.
pub fn print_type(ty: &TypeExpr) -> String {
    let dims: Vec<String> = ty.dims.iter().map(print_dim).collect();
    format!("{}[{}]", ty.elem.keyword(), dims.join(", "))
}

/// Prints a dimension: its symbol or its size.
pub fn print_dim(d: &DimExpr) -> String {
    match d {
        DimExpr::Sym(id) => id.name.clone(),
        DimExpr::Lit { value, .. } => value.to_string(),
    }
}

/// Prints a number so that it lexes back to the same `f64`.
///
/// Infinity prints as `inf`, which parses back. NaN and negative values cannot be written as
/// literals; they are printed as `{:?}` anyway (the parser never produces them).
pub fn print_number(x: f64) -> String {
    format!("{x:?}")
}

/// Prints an expression with minimal parentheses.
pub fn print_expr(expr: &Expr) -> String {
    let mut out = String::new();
    write_expr(&mut out, expr);
    out
}

/// Prints a mask pattern with minimal parentheses.
pub fn print_pattern(pattern: &Pattern) -> String {
    let mut out = String::new();
    write_pattern(&mut out, pattern);
    out
}

fn write_expr(out: &mut String, expr: &Expr) {
    match &expr.kind {
        ExprKind::Number(x) => out.push_str(&print_number(*x)),
        ExprKind::Name(name) => out.push_str(name),
        ExprKind::Binary { op, lhs, rhs } => {
            let lhs_parens = matches!(&lhs.kind, ExprKind::Binary { op: l, .. } if l.precedence() < op.precedence());
            let rhs_parens = matches!(&rhs.kind, ExprKind::Binary { op: r, .. } if r.precedence() <= op.precedence());
            write_wrapped(out, lhs, lhs_parens);
            let _ = write!(out, " {} ", op.symbol());
            write_wrapped(out, rhs, rhs_parens);
        }
        ExprKind::Neg(operand) => {
            out.push('-');
            write_wrapped(
                out,
                operand,
                matches!(operand.kind, ExprKind::Binary { .. }),
            );
        }
        ExprKind::Transpose(operand) => {
            let parens = matches!(operand.kind, ExprKind::Binary { .. } | ExprKind::Neg(_));
            write_wrapped(out, operand, parens);
            out.push_str(".T");
        }
        ExprKind::Call { callee, args } => {
            out.push_str(&callee.name);
            out.push('(');
            for (i, arg) in args.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                match arg {
                    Arg::Expr(e) => write_expr(out, e),
                    Arg::Pattern(p) => write_pattern(out, p),
                }
            }
            out.push(')');
        }
    }
}

fn write_wrapped(out: &mut String, expr: &Expr, parens: bool) {
    if parens {
        out.push('(');
        write_expr(out, expr);
        out.push(')');
    } else {
        write_expr(out, expr);
    }
}

fn write_pattern(out: &mut String, pattern: &Pattern) {
    match &pattern.kind {
        PatternKind::Causal => out.push_str("causal"),
        PatternKind::Window(w) => {
            let _ = write!(out, "window({})", print_dim(w));
        }
        PatternKind::Dilated(w, r) => {
            let _ = write!(out, "dilated({}, {})", print_dim(w), print_dim(r));
        }
        PatternKind::Global(g) => {
            let _ = write!(out, "global({})", print_dim(g));
        }
        PatternKind::Block(b) => {
            let _ = write!(out, "block({})", print_dim(b));
        }
        PatternKind::Document(q, k) => {
            let _ = match k {
                Some(k) => write!(out, "document({}, {})", q.name, k.name),
                None => write!(out, "document({})", q.name),
            };
        }
        PatternKind::TopkBlocks { gate, k, b, .. } => {
            let _ = write!(out, "topk_blocks({}, {k}, {b})", gate.name);
        }
        PatternKind::Or(operands) => {
            for (i, operand) in operands.iter().enumerate() {
                if i > 0 {
                    out.push_str(" | ");
                }
                write_pattern_wrapped(out, operand, matches!(operand.kind, PatternKind::Or(..)));
            }
        }
        PatternKind::And(operands) => {
            for (i, operand) in operands.iter().enumerate() {
                if i > 0 {
                    out.push_str(" & ");
                }
                let parens = matches!(operand.kind, PatternKind::Or(..) | PatternKind::And(..));
                write_pattern_wrapped(out, operand, parens);
            }
        }
    }
}

fn write_pattern_wrapped(out: &mut String, pattern: &Pattern, parens: bool) {
    if parens {
        out.push('(');
        write_pattern(out, pattern);
        out.push(')');
    } else {
        write_pattern(out, pattern);
    }
}
