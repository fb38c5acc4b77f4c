//! The operations of the IR.

use crate::backward::BackwardOp;
use crate::dim::Dim;
use crate::fused::{Attention, LinearAttention};
use crate::pattern::SymbolicPattern;
pub use crate::random::RandomKind;
use serde::Serialize;
use std::fmt;

/// Element types. Computation is f32 (f64 in the interpreter); f16/bf16 are storage types.
pub use attnc_syntax::ast::ElemType as DType;

/// Elementwise functions of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `exp(x)`
    Exp,
    /// `log(x)`
    Log,
    /// `sqrt(x)`
    Sqrt,
    /// `1 / sqrt(x)`
    Rsqrt,
    /// `tanh(x)`
    Tanh,
    /// `1 / (1 + exp(-x))`
    Sigmoid,
    /// `max(x, 0)`
    Relu,
    /// `x` for x > 0, else `exp(x) - 1` (alpha 1)
    Elu,
    /// `|x|`
    Abs,
}

/// Elementwise functions of two operands, with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `maximum(a, b)` (NaN propagates)
    Max,
    /// `minimum(a, b)` (NaN propagates)
    Min,
}

/// Reductions over one axis that keep the axis with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ReduceOp {
    /// `sum(x, axis)`
    Sum,
    /// `max(x, axis)` (NaN propagates; empty axis gives -inf)
    Max,
    /// `mean(x, axis)`
    Mean,
    /// `logsumexp(x, axis)`: `log(sum(exp(x)))` computed from the maximum (`-inf` for an
    /// all `-inf` or empty axis, `+inf` when an entry is `+inf`, NaN when one is NaN).
    LogSumExp,
}

/// Pooling of blocks of consecutive rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PoolOp {
    /// `mean_pool(x, b)`: the mean of each block (the last one over its own rows).
    Mean,
    /// `max_pool(x, b)`: the maximum of each block (NaN propagates).
    Max,
}

/// One IR operation. Operands are the node's incoming edges, ordered by slot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Op {
    /// Kernel parameter number `index` (no operands).
    Input {
        /// Position in the parameter list.
        index: usize,
        /// The parameter's name.
        name: String,
    },
    /// A scalar constant (shape `[]`, no operands).
    Const(f64),
    /// The value of a dimension symbol used as a number (shape `[]`, no operands).
    DimValue(Dim),
    /// A constant array filled with `value` (no operands): `ones(..)`, `zeros(..)`.
    Fill {
        /// The fill value.
        value: f64,
    },
    /// `relpos(m, n)`: `[m, n]` with entry `j - (i + n - m)` (no operands).
    RelPos,
    /// Elementwise unary (one operand).
    Unary(UnaryOp),
    /// Elementwise binary with broadcasting (two operands).
    Binary(BinaryOp),
    /// Matrix product over the last two axes, leading axes broadcast (two operands).
    MatMul,
    /// Swap the last two axes (one operand).
    Transpose,
    /// Reduce `axis` (non-negative, already normalized) and keep it with size 1 (one operand).
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// The reduced axis.
        axis: usize,
    },
    /// Numerically stable softmax along `axis`; an all `-inf` row gives zeros (one operand).
    Softmax {
        /// The normalized axis.
        axis: usize,
    },
    /// `softmax_sink(x, s)`: softmax over the last axis with one extra logit `s` (operand 1,
    /// broadcast to `[.., 1]`) in the denominator, `exp(x_j) / (exp(s) + Σ_k exp(x_k))`,
    /// computed from `max(s, max_k x_k)`; a row and sink all `-inf` give zeros (two operands).
    SoftmaxSink,
    /// `mean_pool(x, b)` / `max_pool(x, b)` over the second-to-last axis: `[.., n, d]` to
    /// `[.., ceil(n / b), d]` (one operand).
    Pool {
        /// Mean or maximum.
        op: PoolOp,
        /// Rows per block (≥ 1 once bound).
        size: Dim,
    },
    /// `cumsum(x, axis)`: the inclusive running sum along `axis`, in index order (one operand).
    Cumsum {
        /// The summed axis.
        axis: usize,
    },
    /// Entries (i, j) of the last two axes outside `pattern` become `fill` (one operand).
    Mask {
        /// The kept positions (sizes may be dimension symbols).
        pattern: SymbolicPattern,
        /// The value of masked-out entries.
        fill: f64,
    },
    /// Round to a storage type and widen back (one operand): f16/bf16 return types, and the
    /// bf16/f16 precision lowering of attention inputs.
    Cast {
        /// The storage type rounded to.
        to: DType,
    },
    /// A seeded random `[rows, cols]` matrix (no operands) that an approximation introduced
    /// (Performer features, Linformer projections); see [`crate::random::random_matrix`].
    Random {
        /// What the matrix holds.
        kind: RandomKind,
        /// Its seed.
        seed: u64,
    },
    /// Fused softmax attention over `[q, k, v, biases..]` (see [`crate::fused`]).
    Attention(Box<Attention>),
    /// Linear attention through its key-value state over `[q, k, v]` (see [`crate::fused`]).
    LinearAttention(LinearAttention),
    /// An op of gradient graphs (see [`crate::backward`]).
    Backward(BackwardOp),
}

impl Op {
    /// How many operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. }
            | Op::Const(_)
            | Op::DimValue(_)
            | Op::Fill { .. }
            | Op::RelPos
            | Op::Random { .. } => 0,
            Op::Binary(_) | Op::MatMul | Op::SoftmaxSink => 2,
            Op::Mask { pattern, .. } => 1 + pattern.segments(),
            Op::Attention(a) => a.arity(),
            Op::LinearAttention(l) => l.arity(),
            Op::Backward(b) => b.arity(),
            _ => 1,
        }
    }
}

impl PoolOp {
    /// The op's name in IR text: `mean-pool`, `max-pool`.
    pub fn name(self) -> &'static str {
        match self {
            PoolOp::Mean => "mean-pool",
            PoolOp::Max => "max-pool",
        }
    }
}

impl fmt::Display for UnaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Elu => "elu",
            UnaryOp::Abs => "abs",
        };
        f.write_str(s)
    }
}

impl fmt::Display for BinaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "maximum",
            BinaryOp::Min => "minimum",
        };
        f.write_str(s)
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Mean => "mean",
            ReduceOp::LogSumExp => "logsumexp",
        };
        f.write_str(s)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Input { index, name } => write!(f, "input {name} #{index}"),
            Op::Const(v) => write!(f, "const {v:?}"),
            Op::DimValue(d) => write!(f, "dim {d}"),
            Op::Fill { value } => write!(f, "fill {value:?}"),
            Op::RelPos => f.write_str("relpos"),
            Op::Unary(u) => write!(f, "{u}"),
            Op::Binary(b) => write!(f, "{b}"),
            Op::MatMul => f.write_str("matmul"),
            Op::Transpose => f.write_str("transpose"),
            Op::Reduce { op, axis } => write!(f, "{op} axis={axis}"),
            Op::Softmax { axis } => write!(f, "softmax axis={axis}"),
            Op::SoftmaxSink => f.write_str("softmax-sink"),
            Op::Pool { op, size } => write!(f, "{} size={size}", op.name()),
            Op::Cumsum { axis } => write!(f, "cumsum axis={axis}"),
            Op::Mask { pattern, fill } => write!(f, "mask {pattern} fill={fill:?}"),
            Op::Cast { to } => write!(f, "cast {}", to.keyword()),
            Op::Random { kind, seed } => write!(f, "random {} seed={seed}", kind.name()),
            Op::Attention(a) => write!(f, "attention {a}"),
            Op::LinearAttention(l) => write!(f, "linear-attention {l}"),
            Op::Backward(b) => write!(f, "{b}"),
        }
    }
}
