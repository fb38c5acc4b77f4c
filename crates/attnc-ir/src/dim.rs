//! Symbolic dimensions and their bindings.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// One dimension of a shape: a symbol bound when the kernel runs, a known size, or the number
/// of blocks of a pooled axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Dim {
    /// A dimension symbol (`n`), bound at run time.
    Sym(String),
    /// A size known at compile time.
    Const(u64),
    /// `ceil(n / b)`: the blocks of `b` rows that `mean_pool(x, b)` and `max_pool(x, b)` make
    /// of `n` rows (`b ≥ 1`).
    CeilDiv(Box<Dim>, Box<Dim>),
}

/// A symbolic shape: one [`Dim`] per axis, row-major.
pub type Shape = Vec<Dim>;

/// Values of dimension symbols, as bound from inputs and `--shape`.
pub type Bindings = BTreeMap<String, u64>;

impl Dim {
    /// The dimension's size under `bindings`, or `None` for an unbound symbol.
    pub fn resolve(&self, bindings: &Bindings) -> Option<u64> {
        match self {
            Dim::Sym(name) => bindings.get(name).copied(),
            Dim::Const(v) => Some(*v),
            Dim::CeilDiv(n, b) => {
                let b = b.resolve(bindings)?;
                (b > 0).then_some(n.resolve(bindings)?.div_ceil(b))
            }
        }
    }

    /// The dimension symbols it reads, in order.
    pub fn symbols(&self) -> Vec<&str> {
        match self {
            Dim::Sym(name) => vec![name.as_str()],
            Dim::Const(_) => Vec::new(),
            Dim::CeilDiv(n, b) => {
                let mut out = n.symbols();
                out.extend(b.symbols());
                out
            }
        }
    }

    /// True for the constant 1 (which broadcasts).
    pub fn is_one(&self) -> bool {
        matches!(self, Dim::Const(1))
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Sym(name) => f.write_str(name),
            Dim::Const(v) => write!(f, "{v}"),
            Dim::CeilDiv(n, b) => write!(f, "ceil({n}/{b})"),
        }
    }
}

/// Writes a shape as `[h, n, d]`.
pub fn format_shape(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Resolves every dimension of `shape`; `None` when a symbol is unbound.
pub fn resolve_shape(shape: &[Dim], bindings: &Bindings) -> Option<Vec<usize>> {
    shape
        .iter()
        .map(|d| d.resolve(bindings).and_then(|v| usize::try_from(v).ok()))
        .collect()
}
