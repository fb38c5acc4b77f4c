//! Mask patterns: sets of (query i, key j) positions over an `m × n` score tile.
//!
//! Queries are aligned to the END of the keys when `m != n`: `i' = i + (n - m)`
//! (LANGUAGE.md §3). Every engine decides membership through [`MaskPattern::contains`] or an
//! equivalent derived from it, so the semantics live in one place.

use serde::Serialize;
use std::fmt;

/// A mask pattern, as in LANGUAGE.md §3.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum MaskPattern {
    /// keeps `j <= i'`
    Causal,
    /// keeps `|i' - j| <= w`
    Window(u64),
    /// keeps `|i' - j| <= w*r` and `(i' - j) mod r == 0`
    Dilated {
        /// Window in units of the stride.
        w: u64,
        /// The stride (≥ 1).
        r: u64,
    },
    /// keeps `i' < g` or `j < g`
    Global(u64),
    /// keeps `floor(i'/b) == floor(j/b)` (b ≥ 1)
    Block(u64),
    /// intersection
    And(Box<MaskPattern>, Box<MaskPattern>),
    /// union
    Or(Box<MaskPattern>, Box<MaskPattern>),
}

impl MaskPattern {
    /// Whether position (`i_aligned`, `j`) is kept, where `i_aligned = i + (n - m)`.
    ///
    /// `i_aligned` may be negative when there are more queries than keys.
    pub fn contains(&self, i_aligned: i64, j: i64) -> bool {
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
            MaskPattern::And(a, b) => a.contains(i_aligned, j) && b.contains(i_aligned, j),
            MaskPattern::Or(a, b) => a.contains(i_aligned, j) || b.contains(i_aligned, j),
        }
    }

    /// Whether query row `i` of an `m × n` tile keeps key `j` (applies end alignment).
    pub fn keeps(&self, i: usize, j: usize, m: usize, n: usize) -> bool {
        let i_aligned = i as i64 + n as i64 - m as i64;
        self.contains(i_aligned, j as i64)
    }
}

impl fmt::Display for MaskPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskPattern::Causal => f.write_str("causal"),
            MaskPattern::Window(w) => write!(f, "window({w})"),
            MaskPattern::Dilated { w, r } => write!(f, "dilated({w}, {r})"),
            MaskPattern::Global(g) => write!(f, "global({g})"),
            MaskPattern::Block(b) => write!(f, "block({b})"),
            MaskPattern::And(a, b) => write!(f, "({a} & {b})"),
            MaskPattern::Or(a, b) => write!(f, "({a} | {b})"),
        }
    }
}
