//! The table of builtin functions: names, arities and which arguments are array values.

use crate::op::{BinaryOp, PoolOp, ReduceOp, UnaryOp};

/// A builtin function of the language (LANGUAGE.md §3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Builtin {
    /// `exp(x)`, `sqrt(x)`, …: elementwise of one array.
    Unary(UnaryOp),
    /// `maximum(a, b)`, `minimum(a, b)`: elementwise of two arrays.
    Binary(BinaryOp),
    /// `sum(x, axis)`, `max(x, axis)`, `mean(x, axis)`.
    Reduce(ReduceOp),
    /// `softmax(x)` / `softmax(x, axis)`.
    Softmax,
    /// `softmax_sink(x, s)`.
    SoftmaxSink,
    /// `mean_pool(x, b)`, `max_pool(x, b)`.
    Pool(PoolOp),
    /// `cumsum(x, axis)`.
    Cumsum,
    /// `mask(x, pattern)` / `mask(x, pattern, fill)`.
    Mask,
    /// `ones(dims..)` (1.0) and `zeros(dims..)` (0.0).
    Fill(f64),
    /// `relpos(m, n)`.
    RelPos,
}

/// Every builtin, by name, in the order suggestions are tried.
const TABLE: &[(&str, Builtin)] = &[
    ("exp", Builtin::Unary(UnaryOp::Exp)),
    ("log", Builtin::Unary(UnaryOp::Log)),
    ("sqrt", Builtin::Unary(UnaryOp::Sqrt)),
    ("rsqrt", Builtin::Unary(UnaryOp::Rsqrt)),
    ("tanh", Builtin::Unary(UnaryOp::Tanh)),
    ("sigmoid", Builtin::Unary(UnaryOp::Sigmoid)),
    ("relu", Builtin::Unary(UnaryOp::Relu)),
    ("elu", Builtin::Unary(UnaryOp::Elu)),
    ("abs", Builtin::Unary(UnaryOp::Abs)),
    ("maximum", Builtin::Binary(BinaryOp::Max)),
    ("minimum", Builtin::Binary(BinaryOp::Min)),
    ("sum", Builtin::Reduce(ReduceOp::Sum)),
    ("max", Builtin::Reduce(ReduceOp::Max)),
    ("mean", Builtin::Reduce(ReduceOp::Mean)),
    ("logsumexp", Builtin::Reduce(ReduceOp::LogSumExp)),
    ("softmax", Builtin::Softmax),
    ("softmax_sink", Builtin::SoftmaxSink),
    ("mean_pool", Builtin::Pool(PoolOp::Mean)),
    ("max_pool", Builtin::Pool(PoolOp::Max)),
    ("cumsum", Builtin::Cumsum),
    ("mask", Builtin::Mask),
    ("ones", Builtin::Fill(1.0)),
    ("zeros", Builtin::Fill(0.0)),
    ("relpos", Builtin::RelPos),
];

/// Names of the mask patterns, which are not functions.
pub(crate) const PATTERN_NAMES: &[&str] =
    &["causal", "window", "dilated", "global", "block", "document"];

/// How many arguments a builtin accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arity {
    /// The fewest.
    pub min: usize,
    /// The most (`None`: no upper bound).
    pub max: Option<usize>,
}

impl Arity {
    /// Whether `n` arguments are accepted.
    pub fn accepts(self, n: usize) -> bool {
        n >= self.min && self.max.is_none_or(|max| n <= max)
    }

    /// The expected count in words: `1`, `1 or 2`, `at least 1`.
    pub fn describe(self) -> String {
        match self.max {
            Some(max) if max == self.min => format!("{max}"),
            Some(max) if max == self.min + 1 => format!("{} or {max}", self.min),
            Some(max) => format!("{} to {max}", self.min),
            None => format!("at least {}", self.min),
        }
    }
}

impl Builtin {
    /// The builtin called `name`.
    pub fn lookup(name: &str) -> Option<Builtin> {
        TABLE.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    /// Every builtin name.
    pub fn names() -> impl Iterator<Item = &'static str> {
        TABLE.iter().map(|(n, _)| *n)
    }

    /// The accepted argument counts.
    pub fn arity(self) -> Arity {
        let (min, max) = match self {
            Builtin::Unary(_) => (1, Some(1)),
            Builtin::Binary(_)
            | Builtin::Reduce(_)
            | Builtin::RelPos
            | Builtin::SoftmaxSink
            | Builtin::Pool(_)
            | Builtin::Cumsum => (2, Some(2)),
            Builtin::Softmax => (1, Some(2)),
            Builtin::Mask => (2, Some(3)),
            Builtin::Fill(_) => (1, None),
        };
        Arity { min, max }
    }

    /// How many leading arguments are array values lowered into the graph; the rest are
    /// compile-time arguments (axes, patterns, fill values, dimensions).
    pub fn value_args(self) -> usize {
        match self {
            Builtin::Unary(_)
            | Builtin::Reduce(_)
            | Builtin::Softmax
            | Builtin::Mask
            | Builtin::Pool(_)
            | Builtin::Cumsum => 1,
            Builtin::Binary(_) | Builtin::SoftmaxSink => 2,
            Builtin::Fill(_) | Builtin::RelPos => 0,
        }
    }

    /// The argument position that must be a mask pattern, if any.
    pub fn pattern_slot(self) -> Option<usize> {
        match self {
            Builtin::Mask => Some(1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_looks_up_to_itself() {
        for name in Builtin::names() {
            assert!(Builtin::lookup(name).is_some(), "{name}");
        }
        assert_eq!(Builtin::lookup("softmx"), None);
    }

    #[test]
    fn arity_describes_its_range() {
        assert_eq!(Builtin::Softmax.arity().describe(), "1 or 2");
        assert_eq!(Builtin::RelPos.arity().describe(), "2");
        assert_eq!(Builtin::Fill(1.0).arity().describe(), "at least 1");
        assert!(!Builtin::Mask.arity().accepts(4));
        assert!(Builtin::Fill(0.0).arity().accepts(7));
    }
}
