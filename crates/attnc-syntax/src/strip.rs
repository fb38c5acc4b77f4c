//! Span erasure, for comparing trees by structure only (the printer round trip).

use crate::ast::{
    Approx, Arg, DimExpr, Expr, ExprKind, File, Ident, Kernel, Let, Param, Pattern, PatternKind,
    TypeExpr,
};
use crate::span::Span;

impl File {
    /// A copy of the tree with every span set to `Span::default()`.
    pub fn without_spans(&self) -> File {
        File {
            kernels: self.kernels.iter().map(Kernel::without_spans).collect(),
        }
    }
}

impl Kernel {
    /// A copy of the kernel with every span set to `Span::default()`.
    pub fn without_spans(&self) -> Kernel {
        Kernel {
            approx: self
                .approx
                .iter()
                .map(|a| Approx {
                    kind: a.kind.clone(),
                    span: Span::default(),
                })
                .collect(),
            name: ident(&self.name),
            params: self
                .params
                .iter()
                .map(|p| Param {
                    name: ident(&p.name),
                    ty: p.ty.without_spans(),
                })
                .collect(),
            ret_type: self.ret_type.as_ref().map(TypeExpr::without_spans),
            extra_ret_types: self
                .extra_ret_types
                .iter()
                .map(TypeExpr::without_spans)
                .collect(),
            stmts: self
                .stmts
                .iter()
                .map(|s| Let {
                    name: ident(&s.name),
                    value: s.value.without_spans(),
                    span: Span::default(),
                })
                .collect(),
            ret: self.ret.without_spans(),
            extra_rets: self.extra_rets.iter().map(Expr::without_spans).collect(),
            span: Span::default(),
        }
    }
}

impl TypeExpr {
    /// A copy of the type with every span set to `Span::default()`.
    pub fn without_spans(&self) -> TypeExpr {
        TypeExpr {
            elem: self.elem,
            dims: self.dims.iter().map(dim).collect(),
            span: Span::default(),
        }
    }
}

impl Expr {
    /// A copy of the expression with every span set to `Span::default()`.
    pub fn without_spans(&self) -> Expr {
        let kind = match &self.kind {
            ExprKind::Number(x) => ExprKind::Number(*x),
            ExprKind::Name(n) => ExprKind::Name(n.clone()),
            ExprKind::Binary { op, lhs, rhs } => ExprKind::Binary {
                op: *op,
                lhs: Box::new(lhs.without_spans()),
                rhs: Box::new(rhs.without_spans()),
            },
            ExprKind::Neg(e) => ExprKind::Neg(Box::new(e.without_spans())),
            ExprKind::Transpose(e) => ExprKind::Transpose(Box::new(e.without_spans())),
            ExprKind::Call { callee, args } => ExprKind::Call {
                callee: ident(callee),
                args: args
                    .iter()
                    .map(|a| match a {
                        Arg::Expr(e) => Arg::Expr(e.without_spans()),
                        Arg::Pattern(p) => Arg::Pattern(p.without_spans()),
                    })
                    .collect(),
            },
        };
        Expr {
            kind,
            span: Span::default(),
        }
    }
}

impl Pattern {
    /// A copy of the pattern with every span set to `Span::default()`.
    pub fn without_spans(&self) -> Pattern {
        let kind = match &self.kind {
            PatternKind::And(operands) => {
                PatternKind::And(operands.iter().map(Pattern::without_spans).collect())
            }
            PatternKind::Or(operands) => {
                PatternKind::Or(operands.iter().map(Pattern::without_spans).collect())
            }
            PatternKind::Causal => PatternKind::Causal,
            PatternKind::Window(w) => PatternKind::Window(dim(w)),
            PatternKind::Dilated(w, r) => PatternKind::Dilated(dim(w), dim(r)),
            PatternKind::Global(g) => PatternKind::Global(dim(g)),
            PatternKind::Block(b) => PatternKind::Block(dim(b)),
            PatternKind::Document(q, k) => PatternKind::Document(ident(q), k.as_ref().map(ident)),
            PatternKind::TopkBlocks { gate, k, b, .. } => PatternKind::TopkBlocks {
                gate: ident(gate),
                k: *k,
                b: *b,
                b_span: Span::default(),
            },
        };
        Pattern {
            kind,
            span: Span::default(),
        }
    }
}

fn dim(d: &DimExpr) -> DimExpr {
    match d {
        DimExpr::Sym(id) => DimExpr::Sym(ident(id)),
        DimExpr::Lit { value, .. } => DimExpr::Lit {
            value: *value,
            span: Span::default(),
        },
    }
}

fn ident(id: &Ident) -> Ident {
    Ident {
        name: id.name.clone(),
        span: Span::default(),
    }
}
