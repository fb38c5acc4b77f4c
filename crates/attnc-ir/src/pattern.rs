//! Mask patterns: sets of (query i, key j) positions over an `m × n` score tile.
//!
//! Queries are aligned to the END of the keys when `m != n`: `i' = i + (n - m)`
//! (LANGUAGE.md §3). Every engine decides membership through [`MaskPattern::contains`] (or
//! [`MaskPattern::contains_with`] for document patterns, which read segment ids) or an
//! equivalent derived from it, so the semantics live in one place.
//!
//! A pattern's sizes are generic: the IR's ops hold [`SymbolicPattern`]s whose sizes may be
//! dimension symbols (`window(w)`), resolved to numbers by [`SymbolicPattern::resolve`] once the
//! symbols are bound; engines work on the resolved [`MaskPattern`] (sizes `u64`).

use crate::dim::{Bindings, Dim};
use serde::Serialize;
use std::fmt;

/// A mask pattern, as in LANGUAGE.md §3 and §5; `S` is the type of its sizes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum MaskPattern<S = u64> {
    /// keeps `j <= i'`
    Causal,
    /// keeps `|i' - j| <= w`
    Window(S),
    /// keeps `|i' - j| <= w*r` and `(i' - j) mod r == 0`
    Dilated {
        /// Window in units of the stride.
        w: S,
        /// The stride (≥ 1).
        r: S,
    },
    /// keeps `i' < g` or `j < g`
    Global(S),
    /// keeps `floor(i'/b) == floor(j/b)` (b ≥ 1)
    Block(S),
    /// keeps `(i, j)` when the query's segment id equals the key's. `q` and `k` index the
    /// segment operands of the node that holds the pattern (i32 tensors `[.., m]` and `[.., n]`
    /// read at `i` and `j`); `q == k` is `document(seg)`: one tensor `[.., n]` of key segment
    /// ids, read at `i'` for the queries (a query with `i' < 0` keeps no key).
    Document {
        /// The segment operand of the queries.
        q: usize,
        /// The segment operand of the keys.
        k: usize,
    },
    /// keeps `(i, j)` when key block `floor(j / b)` is among the `k` largest entries of row
    /// `floor(i / b)` of the gate, segment operand `g` (a float tensor
    /// `[.., ceil(m/b), ceil(n/b)]`): ties go to the lower index, NaN is never selected.
    TopkBlocks {
        /// The gate's segment operand.
        g: usize,
        /// Key blocks kept per row block.
        k: u64,
        /// The block size (≥ 1).
        b: u64,
    },
    /// intersection
    And(Box<MaskPattern<S>>, Box<MaskPattern<S>>),
    /// union
    Or(Box<MaskPattern<S>>, Box<MaskPattern<S>>),
}

/// What the data-dependent parts of a pattern read, for [`MaskPattern::contains_with`].
pub trait PatternData {
    /// The segment id at `index` of segment operand `operand` (`None` outside it).
    fn segment(&self, operand: usize, index: i64) -> Option<i64>;
    /// Whether row block `row` of gate operand `operand`, keeping its `k` largest, selects key
    /// block `col`.
    fn selected(&self, operand: usize, k: u64, row: i64, col: i64) -> bool;
}

/// No data: a static pattern reads none.
struct NoData;

impl PatternData for NoData {
    fn segment(&self, _: usize, _: i64) -> Option<i64> {
        None
    }
    fn selected(&self, _: usize, _: u64, _: i64, _: i64) -> bool {
        false
    }
}

/// A pattern whose sizes may be dimension symbols, as the IR's ops hold it.
pub type SymbolicPattern = MaskPattern<Dim>;

/// Why a symbolic pattern does not resolve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A size is a symbol without a value.
    #[error(
        "dimension `{symbol}` of pattern `{pattern}` is not bound: pass --shape {symbol}=<size>"
    )]
    Unbound {
        /// The symbol.
        symbol: String,
        /// The pattern, printed.
        pattern: String,
    },
    /// A stride or block size is 0.
    #[error("{what} of `{pattern}` is 0 (`{symbol}` = 0); it must be at least 1")]
    Zero {
        /// "the stride", "the block size".
        what: &'static str,
        /// The symbol that gave it.
        symbol: String,
        /// The pattern, printed.
        pattern: String,
    },
}

impl<S> MaskPattern<S> {
    /// The number of segment operands the pattern reads (one more than its largest index).
    pub fn segments(&self) -> usize {
        match self {
            MaskPattern::Document { q, k } => 1 + (*q).max(*k),
            MaskPattern::TopkBlocks { g, .. } => 1 + *g,
            MaskPattern::And(a, b) | MaskPattern::Or(a, b) => a.segments().max(b.segments()),
            _ => 0,
        }
    }

    /// Whether membership depends only on positions (no document part).
    pub fn is_static(&self) -> bool {
        self.segments() == 0
    }

    /// The pattern with every size mapped by `f` (which may fail).
    pub fn try_map<T, E>(
        &self,
        f: &mut impl FnMut(&S) -> Result<T, E>,
    ) -> Result<MaskPattern<T>, E> {
        Ok(match self {
            MaskPattern::Causal => MaskPattern::Causal,
            MaskPattern::Window(w) => MaskPattern::Window(f(w)?),
            MaskPattern::Dilated { w, r } => MaskPattern::Dilated { w: f(w)?, r: f(r)? },
            MaskPattern::Global(g) => MaskPattern::Global(f(g)?),
            MaskPattern::Block(b) => MaskPattern::Block(f(b)?),
            MaskPattern::Document { q, k } => MaskPattern::Document { q: *q, k: *k },
            MaskPattern::TopkBlocks { g, k, b } => MaskPattern::TopkBlocks {
                g: *g,
                k: *k,
                b: *b,
            },
            MaskPattern::And(a, b) => {
                MaskPattern::And(Box::new(a.try_map(f)?), Box::new(b.try_map(f)?))
            }
            MaskPattern::Or(a, b) => {
                MaskPattern::Or(Box::new(a.try_map(f)?), Box::new(b.try_map(f)?))
            }
        })
    }

    /// The pattern with its segment operand indices mapped by `f`.
    pub fn map_segments(&self, f: &mut impl FnMut(usize) -> usize) -> MaskPattern<S>
    where
        S: Clone,
    {
        match self {
            MaskPattern::Document { q, k } => MaskPattern::Document { q: f(*q), k: f(*k) },
            MaskPattern::TopkBlocks { g, k, b } => MaskPattern::TopkBlocks {
                g: f(*g),
                k: *k,
                b: *b,
            },
            MaskPattern::And(a, b) => {
                MaskPattern::And(Box::new(a.map_segments(f)), Box::new(b.map_segments(f)))
            }
            MaskPattern::Or(a, b) => {
                MaskPattern::Or(Box::new(a.map_segments(f)), Box::new(b.map_segments(f)))
            }
            other => other.clone(),
        }
    }
}

impl SymbolicPattern {
    /// The pattern with every size resolved under `bindings`: an error names an unbound
    /// symbol, or a stride or block size that is 0.
    pub fn resolve(&self, bindings: &Bindings) -> Result<MaskPattern, PatternError> {
        let pattern = || self.to_string();
        let resolved = self.try_map(&mut |d: &Dim| {
            d.resolve(bindings).ok_or_else(|| PatternError::Unbound {
                symbol: d.to_string(),
                pattern: pattern(),
            })
        })?;
        // Literal zeros are rejected when the program is checked; symbols only now.
        let mut zero = None;
        self.visit_sizes(&mut |what, d| {
            if zero.is_none() && d.resolve(bindings) == Some(0) {
                if let (Some(what), Dim::Sym(s)) = (what, d) {
                    zero = Some((what, s.clone()));
                }
            }
        });
        match zero {
            Some((what, symbol)) => Err(PatternError::Zero {
                what,
                symbol,
                pattern: pattern(),
            }),
            None => Ok(resolved),
        }
    }

    /// The dimension symbols among its sizes, in order.
    pub fn symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_sizes(&mut |_, d| {
            if let Dim::Sym(s) = d {
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        });
        out
    }

    /// Calls `f(what, size)` on every size; `what` names the sizes that must be at least 1.
    fn visit_sizes(&self, f: &mut impl FnMut(Option<&'static str>, &Dim)) {
        match self {
            MaskPattern::Window(s) | MaskPattern::Global(s) => f(None, s),
            MaskPattern::Block(s) => f(Some("the block size"), s),
            MaskPattern::Dilated { w, r } => {
                f(None, w);
                f(Some("the stride"), r);
            }
            MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
                a.visit_sizes(f);
                b.visit_sizes(f);
            }
            MaskPattern::Causal | MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => {
            }
        }
    }
}

impl From<&MaskPattern> for SymbolicPattern {
    fn from(p: &MaskPattern) -> SymbolicPattern {
        let mapped: Result<SymbolicPattern, std::convert::Infallible> =
            p.try_map(&mut |&v| Ok(Dim::Const(v)));
        match mapped {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }
}

impl From<MaskPattern> for SymbolicPattern {
    fn from(p: MaskPattern) -> SymbolicPattern {
        SymbolicPattern::from(&p)
    }
}

impl MaskPattern {
    /// Whether position (`i_aligned`, `j`) is kept, where `i_aligned = i + (n - m)`, for a
    /// static pattern. A document part is not known from positions alone: it counts as
    /// keeping every pair here (the set of pairs the pattern *may* keep); engines evaluate
    /// it with [`MaskPattern::contains_with`].
    ///
    /// `i_aligned` may be negative when there are more queries than keys.
    pub fn contains(&self, i_aligned: i64, j: i64) -> bool {
        if self.is_static() {
            self.contains_with(i_aligned, i_aligned, j, &NoData)
        } else {
            self.maybe(i_aligned, j)
        }
    }

    /// The pairs a pattern may keep whatever its segment ids and gates (documents and
    /// block selections keep everything).
    fn maybe(&self, ia: i64, j: i64) -> bool {
        match self {
            MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => true,
            MaskPattern::And(a, b) => a.maybe(ia, j) && b.maybe(ia, j),
            MaskPattern::Or(a, b) => a.maybe(ia, j) || b.maybe(ia, j),
            other => other.contains(ia, j),
        }
    }

    /// Whether row `i` (aligned `i_aligned`) keeps key `j`, with `data` reading the segment
    /// operands: segment ids of `document` parts, block selections of `topk_blocks` parts.
    pub fn contains_with(&self, i: i64, i_aligned: i64, j: i64, data: &dyn PatternData) -> bool {
        match self {
            MaskPattern::Causal => j <= i_aligned,
            MaskPattern::Window(w) => (i_aligned - j).unsigned_abs() <= *w,
            MaskPattern::Dilated { w, r } => {
                let delta = i_aligned - j;
                let r = (*r).max(1);
                (delta.unsigned_abs() as u128) <= (*w as u128) * (r as u128)
                    && delta.rem_euclid(r as i64) == 0
            }
            MaskPattern::Global(g) => {
                let g = i64::try_from(*g).unwrap_or(i64::MAX);
                i_aligned < g || j < g
            }
            MaskPattern::Block(b) => {
                let b = i64::try_from((*b).max(1)).unwrap_or(i64::MAX);
                i_aligned.div_euclid(b) == j.div_euclid(b)
            }
            MaskPattern::Document { q, k } => {
                let qi = if q == k { i_aligned } else { i };
                match (data.segment(*q, qi), data.segment(*k, j)) {
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                }
            }
            MaskPattern::TopkBlocks { g, k, b } => {
                let b = i64::try_from((*b).max(1)).unwrap_or(i64::MAX);
                i >= 0 && j >= 0 && data.selected(*g, *k, i / b, j / b)
            }
            MaskPattern::And(a, b) => {
                a.contains_with(i, i_aligned, j, data) && b.contains_with(i, i_aligned, j, data)
            }
            MaskPattern::Or(a, b) => {
                a.contains_with(i, i_aligned, j, data) || b.contains_with(i, i_aligned, j, data)
            }
        }
    }

    /// Whether query row `i` of an `m × n` tile keeps key `j` (applies end alignment), for a
    /// static pattern (see [`MaskPattern::contains`]).
    pub fn keeps(&self, i: usize, j: usize, m: usize, n: usize) -> bool {
        let i_aligned = i as i64 + n as i64 - m as i64;
        self.contains(i_aligned, j as i64)
    }
}

impl<S: fmt::Display> fmt::Display for MaskPattern<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskPattern::Causal => f.write_str("causal"),
            MaskPattern::Window(w) => write!(f, "window({w})"),
            MaskPattern::Dilated { w, r } => write!(f, "dilated({w}, {r})"),
            MaskPattern::Global(g) => write!(f, "global({g})"),
            MaskPattern::Block(b) => write!(f, "block({b})"),
            MaskPattern::Document { q, k } if q == k => write!(f, "document(g{q})"),
            MaskPattern::Document { q, k } => write!(f, "document(g{q}, g{k})"),
            MaskPattern::TopkBlocks { g, k, b } => write!(f, "topk_blocks(g{g}, {k}, {b})"),
            MaskPattern::And(a, b) => write!(f, "({a} & {b})"),
            MaskPattern::Or(a, b) => write!(f, "({a} | {b})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> Dim {
        Dim::Sym(s.to_string())
    }

    #[test]
    fn symbolic_sizes_resolve_or_say_why_not() {
        let p: SymbolicPattern = MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(sym("w"))),
        );
        assert_eq!(p.symbols(), vec!["w".to_string()]);
        let b: Bindings = [("w".to_string(), 3)].into_iter().collect();
        assert_eq!(
            p.resolve(&b),
            Ok(MaskPattern::And(
                Box::new(MaskPattern::Causal),
                Box::new(MaskPattern::Window(3))
            ))
        );
        let err = p.resolve(&Bindings::new()).unwrap_err();
        assert!(err.to_string().contains("--shape w=<size>"), "{err}");
        let block: SymbolicPattern = MaskPattern::Block(sym("b"));
        let zero: Bindings = [("b".to_string(), 0)].into_iter().collect();
        let err = block.resolve(&zero).unwrap_err();
        assert!(err.to_string().contains("block size"), "{err}");
    }

    #[test]
    fn documents_compare_segment_ids() {
        // seg = [0, 0, 1, 1]; document(seg) & causal over 4 × 4.
        struct Ids([i64; 4]);
        impl PatternData for Ids {
            fn segment(&self, _: usize, i: i64) -> Option<i64> {
                usize::try_from(i).ok().and_then(|i| self.0.get(i).copied())
            }
            fn selected(&self, _: usize, _: u64, _: i64, _: i64) -> bool {
                false
            }
        }
        let lookup = Ids([0, 0, 1, 1]);
        let p = MaskPattern::And(
            Box::new(MaskPattern::Document { q: 0, k: 0 }),
            Box::new(MaskPattern::Causal),
        );
        let kept: Vec<(i64, i64)> = (0..4)
            .flat_map(|i| (0..4).map(move |j| (i, j)))
            .filter(|&(i, j)| p.contains_with(i, i, j, &lookup))
            .collect();
        assert_eq!(kept, vec![(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3)]);
        // Without data, a document keeps every pair the rest of the pattern allows.
        assert!(p.contains(3, 0) && !p.contains(0, 3));
        assert_eq!(p.segments(), 1);
        assert!(!p.is_static() && MaskPattern::<u64>::Causal.is_static());
    }
}
