//! Where the kernels measure ALiBi distances from.
//!
//! The score adds `slope·(j − i')`. Softmax ignores a shift of a whole row, so a kernel may
//! add `slope·(j − r)` for any key `r` of its choice instead, and the output is the same. The
//! choice decides the precision: scores are rounded to f32 at their own size, and over long
//! rows `slope·(j − i')` reaches `|slope|·n` exactly where the weight lies (the first keys for
//! a negative slope, the last ones of a dense row for a positive one). At `|slope|·n = 300`
//! one rounding is already 1e-5 of a weight, and so is the rounding of the saved f32
//! log-sum-exp the backward reads.
//!
//! So each row measures from the kept key whose term is largest, or near it: the last kept
//! key for a positive slope, the first for a negative one. The kernels find it without
//! reading the mask's data: the hull of the row's kept keys by the pattern algebra (a causal
//! row ends at `i'`, a window at `i' + w`, a block at its block's end, a union at the later
//! end), clipped to the key tiles the row's query tile visits (which bounds document and
//! top-k masks too). Every kept term is then `≤ 0`, and those near the row's maximum are
//! small. A softcap bends the score after the term is added (`cap·tanh(x / cap)` does not
//! commute with the shift), so with one every row keeps its own `i'`, as without a slope.
//!
//! The log-sum-exp of the shifted scores differs from the natural one by the row's shift
//! ([`Call::natural_lse`]); the backward reads the shifted one (`crate::backward::Saved`).

use super::{Call, KeyMask};

/// The hull `[lo, hi]` of the keys `mask` may keep in the row aligned to key `ia` (unbounded
/// ends as `i64::MIN`, `i64::MAX`; data-dependent parts unbounded).
fn hull(mask: &KeyMask, ia: i64) -> (i64, i64) {
    const ALL: (i64, i64) = (i64::MIN, i64::MAX);
    let reach = |w: u64| i64::try_from(w).unwrap_or(i64::MAX);
    match mask {
        KeyMask::Causal => (i64::MIN, ia),
        KeyMask::Window(w) => (ia.saturating_sub(reach(*w)), ia.saturating_add(reach(*w))),
        KeyMask::Dilated { w, r } => {
            let span = reach(*w).saturating_mul(reach((*r).max(1)));
            (ia.saturating_sub(span), ia.saturating_add(span))
        }
        KeyMask::Global(g) => match ia < reach(*g) {
            true => ALL,
            false => (i64::MIN, reach(*g) - 1),
        },
        KeyMask::Block(b) => {
            let b = reach((*b).max(1));
            let first = ia.div_euclid(b).saturating_mul(b);
            (first, first.saturating_add(b - 1))
        }
        KeyMask::Document | KeyMask::TopkBlocks => ALL,
        KeyMask::And(a, b) => {
            let (a, b) = (hull(a, ia), hull(b, ia));
            (a.0.max(b.0), a.1.min(b.1))
        }
        KeyMask::Or(a, b) => {
            let (a, b) = (hull(a, ia), hull(b, ia));
            (a.0.min(b.0), a.1.max(b.1))
        }
    }
}

impl Call<'_> {
    /// Whether the kernels measure ALiBi distances from a key of their choice: a finite,
    /// non-zero slope without a softcap.
    fn alibi_shifts(&self) -> Option<f32> {
        match self.score.alibi_slope {
            Some(s) if self.score.softcap.is_none() && s != 0.0 && s.is_finite() => Some(s),
            _ => None,
        }
    }

    /// Row `i`'s aligned position `i' = i + n − m`.
    #[inline]
    fn aligned(&self, i: usize) -> i64 {
        i as i64 + self.n() as i64 - self.m() as i64
    }

    /// The key row `i` measures its ALiBi distances from (see the module docs): `i'` itself
    /// without a slope, with a softcap, or for a row that keeps nothing.
    pub fn alibi_origin(&self, i: usize) -> i64 {
        let ia = self.aligned(i);
        let Some(slope) = self.alibi_shifts() else {
            return ia;
        };
        let runs = self.tiles.runs(i / self.tiles.query_tile.max(1));
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
            return ia;
        };
        let kt = self.tiles.key_tile.max(1);
        let visited = (
            (first.first as usize * kt) as i64,
            (last.end as usize * kt).min(self.n()) as i64 - 1,
        );
        let (lo, hi) = self.mask.map_or((i64::MIN, i64::MAX), |m| hull(m, ia));
        let (lo, hi) = (lo.max(visited.0), hi.min(visited.1));
        match (lo <= hi, slope > 0.0) {
            (false, _) => ia,
            (true, true) => hi,
            (true, false) => lo,
        }
    }

    /// The natural log-sum-exp of row `i` from `shifted`, that of its scores with distances
    /// measured from key `origin` (its [`Call::alibi_origin`], as the kernel used it): adds
    /// back `slope·(origin − i')`, rounded once.
    pub fn natural_lse(&self, i: usize, origin: i64, shifted: f64) -> f32 {
        match self.alibi_shifts() {
            Some(slope) if shifted.is_finite() => {
                let shift = (origin - self.aligned(i)) as f64;
                (shifted + f64::from(slope) * shift) as f32
            }
            _ => shifted as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{Elements, KeyMask, Operand, Score, TileTable};

    fn call<'a>(
        data: &'a [f32],
        tiles: &'a TileTable,
        mask: Option<&'a KeyMask>,
        m: usize,
        n: usize,
        score: Score<'a>,
    ) -> Call<'a> {
        let op = |rows| Operand {
            data: Elements::F32(data),
            rows,
            cols: 1,
            row_stride: 1,
        };
        Call {
            q: op(m),
            k: op(n),
            v: op(n),
            score,
            mask,
            tiles,
            segments: None,
            blocks: None,
        }
    }

    fn slope(s: f32) -> Score<'static> {
        Score {
            alibi_slope: Some(s),
            ..Score::scaled(1.0)
        }
    }

    #[test]
    fn origins_are_the_kept_keys_with_the_largest_term() {
        let data = vec![0.0f32; 200];
        let (m, n) = (150, 200);
        let window = KeyMask::And(Box::new(KeyMask::Causal), Box::new(KeyMask::Window(5)));
        let block = KeyMask::Block(64);
        let masks = [None, Some(KeyMask::Causal), Some(window), Some(block)];
        for mask in &masks {
            let tiles = match mask {
                Some(p) => TileTable::enumerate(p, m, n, 16, 16),
                None => TileTable::dense(m, n, 16, 16),
            };
            for s in [0.5f32, -0.5] {
                let c = call(&data, &tiles, mask.as_ref(), m, n, slope(s));
                for i in 0..m {
                    // The kept key with the largest term, by enumeration.
                    let kept = (0..n).filter(|&j| c.keeps(i, j));
                    let want = match s > 0.0 {
                        true => kept.max(),
                        false => kept.min(),
                    };
                    assert_eq!(
                        Some(c.alibi_origin(i)),
                        want.map(|j| j as i64),
                        "row {i}, slope {s}, {mask:?}"
                    );
                }
            }
        }
        // No slope, a zero one, or a softcap: every row from its own i'.
        let tiles = TileTable::dense(m, n, 16, 16);
        for score in [
            Score::scaled(1.0),
            slope(0.0),
            Score {
                softcap: Some(5.0),
                ..slope(0.5)
            },
        ] {
            let c = call(&data, &tiles, None, m, n, score);
            assert_eq!(c.alibi_origin(70), 120);
        }
    }

    #[test]
    fn the_natural_lse_adds_back_the_shift() {
        let data = vec![0.0f32; 10];
        let tiles = TileTable::dense(4, 10, 4, 4);
        let c = call(&data, &tiles, None, 4, 10, slope(0.25));
        // Row 1 is aligned to key 7 and, keeping every key, measured from key 9: its scores
        // were lowered by 0.25·(9 − 7).
        assert_eq!(c.alibi_origin(1), 9);
        assert_eq!(c.natural_lse(1, 9, 3.0), 3.5);
        assert_eq!(c.natural_lse(1, 9, f64::NEG_INFINITY), f32::NEG_INFINITY);
    }
}
