//! The abstract syntax tree of a `.attn` file.
//!
//! Every node carries the byte [`Span`] it was parsed from. Equality of trees that should
//! ignore spans (the printer round trip) goes through [`File::without_spans`].

use crate::span::Span;
use serde::Serialize;

/// A whole source file: zero or more kernels.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    /// The kernels, in source order.
    pub kernels: Vec<Kernel>,
}

/// An identifier with its place in the source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Ident {
    /// The name as written.
    pub name: String,
    /// Where it was written.
    pub span: Span,
}

/// `attr* kernel NAME(params) -> type { stmts return expr; }`; a kernel with several outputs
/// writes `-> (type, type)` and `return (a, b);`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Kernel {
    /// Every `@approx(...)` item of every attribute, in source order.
    pub approx: Vec<Approx>,
    /// The kernel's name.
    pub name: Ident,
    /// The parameters, in order.
    pub params: Vec<Param>,
    /// The declared return type, if any (the first one of a tuple `-> (T, U)`).
    pub ret_type: Option<TypeExpr>,
    /// The types after the first of a tuple return type (empty for one type).
    pub extra_ret_types: Vec<TypeExpr>,
    /// The `let` statements before the `return`.
    pub stmts: Vec<Let>,
    /// The returned expression (the first one of `return (a, b);`).
    pub ret: Expr,
    /// The returned expressions after the first of `return (a, b);` (empty for one output).
    pub extra_rets: Vec<Expr>,
    /// From the first attribute (or `kernel`) to the closing brace.
    pub span: Span,
}

/// One item of an `@approx(...)` attribute.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Approx {
    /// Which approximation, with its arguments.
    pub kind: ApproxKind,
    /// Where it was written.
    pub span: Span,
}

/// The approximations a kernel may allow (LANGUAGE.md §2 `approx`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ApproxKind {
    /// `bf16`: bfloat16 storage of Q/K/V.
    Bf16,
    /// `f16`: half-precision storage of Q/K/V.
    F16,
    /// `int8`: quantized score and value products.
    Int8,
    /// `bf16_products`: score and value products of bfloat16 operands (AMX tiles) with f32
    /// accumulation and an f32 softmax.
    Bf16Products,
    /// `lowrank(r = R)`: Linformer projections of rank R.
    Lowrank {
        /// The rank.
        r: u64,
    },
    /// `random_features(m = M, seed = S)`: Performer FAVOR+.
    RandomFeatures {
        /// Number of random features.
        m: u64,
        /// Seed of the feature matrix, if given.
        seed: Option<u64>,
    },
    /// `nystrom(m = M)`: Nyström factoring of a softmax attention matrix with M landmarks.
    Nystrom {
        /// The number of landmarks (mean-pooled segments of queries and keys).
        m: u64,
    },
    /// `tol = X`: the largest accepted relative L2 error.
    Tol(f64),
}

/// `name: type`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    /// The parameter's name.
    pub name: Ident,
    /// Its declared type.
    pub ty: TypeExpr,
}

/// Element types of the language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ElemType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 32-bit signed integer: segment ids read by `document(...)` patterns, never arithmetic.
    I32,
}

impl ElemType {
    /// The keyword that spells this type.
    pub fn keyword(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::Bf16 => "bf16",
            ElemType::I32 => "i32",
        }
    }
}

/// `f32[h, n, d]`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TypeExpr {
    /// The element type.
    pub elem: ElemType,
    /// The dimensions (at least one).
    pub dims: Vec<DimExpr>,
    /// From the element type to the closing bracket.
    pub span: Span,
}

/// One dimension of a type: a symbol bound at run time or a literal size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum DimExpr {
    /// A dimension symbol such as `n`.
    Sym(Ident),
    /// A literal size such as `1`.
    Lit {
        /// The size.
        value: u64,
        /// Where it was written.
        span: Span,
    },
}

impl DimExpr {
    /// Where this dimension was written.
    pub fn span(&self) -> Span {
        match self {
            DimExpr::Sym(id) => id.span,
            DimExpr::Lit { span, .. } => *span,
        }
    }
}

/// `let name = value;`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Let {
    /// The bound name.
    pub name: Ident,
    /// The bound expression.
    pub value: Expr,
    /// From `let` to the semicolon.
    pub span: Span,
}

/// An expression with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expr {
    /// What kind of expression.
    pub kind: ExprKind,
    /// Where it was written (parentheses included when present).
    pub span: Span,
}

/// Binary operators, in the language's precedence classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `@` (matrix product over the last two axes)
    MatMul,
}

impl BinOp {
    /// The operator's symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::MatMul => "@",
        }
    }

    /// Binding strength: additive operators bind less tightly than multiplicative ones.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Add | BinOp::Sub => 1,
            BinOp::Mul | BinOp::Div | BinOp::MatMul => 2,
        }
    }
}

/// The forms an expression takes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ExprKind {
    /// A numeric literal (non-negative as written; `inf` is the only non-finite one).
    Number(f64),
    /// A variable, parameter or dimension symbol.
    Name(String),
    /// `lhs op rhs`
    Binary {
        /// The operator.
        op: BinOp,
        /// Left operand.
        lhs: Box<Expr>,
        /// Right operand.
        rhs: Box<Expr>,
    },
    /// `-operand`
    Neg(Box<Expr>),
    /// `operand.T`
    Transpose(Box<Expr>),
    /// `callee(args)`
    Call {
        /// The called function's name.
        callee: Ident,
        /// The arguments: expressions or mask patterns.
        args: Vec<Arg>,
    },
}

/// A call argument.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Arg {
    /// An ordinary expression.
    Expr(Expr),
    /// A mask pattern (`causal & window(256)`).
    Pattern(Pattern),
}

impl Arg {
    /// Where this argument was written.
    pub fn span(&self) -> Span {
        match self {
            Arg::Expr(e) => e.span,
            Arg::Pattern(p) => p.span,
        }
    }
}

/// A mask pattern with its span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pattern {
    /// Which pattern.
    pub kind: PatternKind,
    /// Where it was written.
    pub span: Span,
}

/// The mask patterns of LANGUAGE.md §3. Sizes are literals or dimension symbols
/// (`window(w)` with `w` bound when the kernel runs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum PatternKind {
    /// `causal`
    Causal,
    /// `window(w)`
    Window(DimExpr),
    /// `dilated(w, r)`
    Dilated(DimExpr, DimExpr),
    /// `global(g)`
    Global(DimExpr),
    /// `block(b)`
    Block(DimExpr),
    /// `document(seg)` (one name: key segment ids, queries end-aligned) or
    /// `document(qseg, kseg)`: names of i32 parameters holding segment ids.
    Document(Ident, Option<Ident>),
    /// `topk_blocks(g, k, b)`: the name of a gate (a float parameter or `let`) of shape
    /// `[.., ceil(m/b), ceil(n/b)]`, how many key blocks each row block keeps, the block size.
    TopkBlocks {
        /// The gate.
        gate: Ident,
        /// Key blocks kept per row block.
        k: u64,
        /// The block size.
        b: u64,
        /// Where `b` was written.
        b_span: Span,
    },
    /// `p & q & …`: two or more operands, in order. A chain of `&` is one node, so its
    /// length is not nesting; an operand that is itself an `And` was written in parentheses.
    And(Vec<Pattern>),
    /// `p | q | …`: two or more operands, in order, as [`PatternKind::And`].
    Or(Vec<Pattern>),
}
