//! Compile-time tile classification for block-sparse attention.
//!
//! For a mask pattern, the `m × n` score matrix and a tile of query rows `[i0, i1)`, this module
//! says which key tiles (of `tk` keys each) the rows must visit, and whether each visited tile is
//! [`TileKind::Full`] (every (i, j) kept: no element mask needed) or [`TileKind::Partial`]
//! (element masks needed). Tiles with no kept element are not listed: the kernel never touches
//! them.
//!
//! The classification is derived from the pattern algebra, not from enumerating elements. Each
//! row `i` (aligned `i' = i + n - m`) gets two interval sets over the keys:
//! `sure` ⊆ kept ⊆ `maybe`. Primitives give intervals (`causal`: `j ≤ i'`; `window(w)`:
//! `[i'-w, i'+w]`; `global(g)`: all keys if `i' < g`, else `[0, g)`; `block(b)`:
//! `[b⌊i'/b⌋, b⌊i'/b⌋ + b)`), exact so `sure = maybe`; `dilated(w, r)` has
//! `maybe = [i'-wr, i'+wr]` and `sure = {i'}` (the stride thins the window). `&` intersects and
//! `|` unites both sets. Over a query tile, a key tile is visited when it meets some row's
//! `maybe`, and it is full when it lies inside every row's `sure`.

use attnc_ir::pattern::MaskPattern;

/// A half-open set of keys `[lo, hi)` (empty when `lo >= hi`).
type Interval = (i64, i64);

/// A sorted list of disjoint, non-empty, non-adjacent intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntervalSet {
    spans: Vec<Interval>,
}

impl IntervalSet {
    /// The empty set.
    pub fn empty() -> IntervalSet {
        IntervalSet { spans: Vec::new() }
    }

    /// `[lo, hi)` clipped to `[0, n)`.
    pub fn span(lo: i64, hi: i64, n: i64) -> IntervalSet {
        let (lo, hi) = (lo.max(0), hi.min(n));
        if lo < hi {
            IntervalSet {
                spans: vec![(lo, hi)],
            }
        } else {
            IntervalSet::empty()
        }
    }

    /// The intervals, sorted and disjoint.
    pub fn spans(&self) -> &[(i64, i64)] {
        &self.spans
    }

    /// Whether the set contains `j`.
    pub fn contains(&self, j: i64) -> bool {
        self.spans.iter().any(|&(lo, hi)| lo <= j && j < hi)
    }

    /// Whether `[lo, hi)` lies inside one interval of the set.
    pub fn covers(&self, lo: i64, hi: i64) -> bool {
        lo >= hi || self.spans.iter().any(|&(a, b)| a <= lo && hi <= b)
    }

    /// Whether `[lo, hi)` meets the set.
    pub fn meets(&self, lo: i64, hi: i64) -> bool {
        self.spans.iter().any(|&(a, b)| a < hi && lo < b)
    }

    /// The union with `other`.
    pub fn union(&self, other: &IntervalSet) -> IntervalSet {
        let mut all: Vec<Interval> = self.spans.iter().chain(&other.spans).copied().collect();
        all.sort_unstable();
        let mut spans: Vec<Interval> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match spans.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => spans.push((lo, hi)),
            }
        }
        IntervalSet { spans }
    }

    /// The intersection with `other`.
    pub fn intersect(&self, other: &IntervalSet) -> IntervalSet {
        let mut spans = Vec::new();
        let (mut a, mut b) = (0, 0);
        while a < self.spans.len() && b < other.spans.len() {
            let (al, ah) = self.spans[a];
            let (bl, bh) = other.spans[b];
            let (lo, hi) = (al.max(bl), ah.min(bh));
            if lo < hi {
                spans.push((lo, hi));
            }
            if ah < bh {
                a += 1;
            } else {
                b += 1;
            }
        }
        IntervalSet { spans }
    }
}

/// Lower and upper bounds of the keys one query row keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKeys {
    /// Keys certainly kept.
    pub sure: IntervalSet,
    /// Keys possibly kept (every kept key is here).
    pub maybe: IntervalSet,
}

/// Saturating conversion of a pattern parameter.
fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX / 4).min(i64::MAX / 4)
}

/// The key sets of aligned row `ia` under `pattern` over `n` keys.
pub fn row_keys(pattern: &MaskPattern, ia: i64, n: i64) -> RowKeys {
    let exact = |s: IntervalSet| RowKeys {
        sure: s.clone(),
        maybe: s,
    };
    match pattern {
        MaskPattern::Causal => exact(IntervalSet::span(0, ia.saturating_add(1), n)),
        MaskPattern::Window(w) => {
            let w = sat(*w);
            exact(IntervalSet::span(
                ia.saturating_sub(w),
                ia.saturating_add(w).saturating_add(1),
                n,
            ))
        }
        MaskPattern::Dilated { w, r } => {
            let reach = sat(*w).saturating_mul(sat((*r).max(1)));
            let maybe = IntervalSet::span(
                ia.saturating_sub(reach),
                ia.saturating_add(reach).saturating_add(1),
                n,
            );
            let sure = if *r <= 1 {
                maybe.clone()
            } else {
                IntervalSet::span(ia, ia.saturating_add(1), n)
            };
            RowKeys { sure, maybe }
        }
        MaskPattern::Global(g) => {
            let g = sat(*g);
            if ia < g {
                exact(IntervalSet::span(0, n, n))
            } else {
                exact(IntervalSet::span(0, g, n))
            }
        }
        MaskPattern::Block(b) => {
            let b = sat((*b).max(1));
            let lo = ia.div_euclid(b).saturating_mul(b);
            exact(IntervalSet::span(lo, lo.saturating_add(b), n))
        }
        // Without the segment ids (or the gate), a document (or a block selection) may keep
        // any key and surely keeps none.
        MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => RowKeys {
            sure: IntervalSet::empty(),
            maybe: IntervalSet::span(0, n, n),
        },
        MaskPattern::And(a, b) => {
            let (a, b) = (row_keys(a, ia, n), row_keys(b, ia, n));
            RowKeys {
                sure: a.sure.intersect(&b.sure),
                maybe: a.maybe.intersect(&b.maybe),
            }
        }
        MaskPattern::Or(a, b) => {
            let (a, b) = (row_keys(a, ia, n), row_keys(b, ia, n));
            RowKeys {
                sure: a.sure.union(&b.sure),
                maybe: a.maybe.union(&b.maybe),
            }
        }
    }
}

/// How a visited key tile is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileKind {
    /// Every (i, j) of the tile is kept: no element mask.
    Full,
    /// Some elements are masked: evaluate the pattern per element.
    Partial,
}

/// A run of consecutive key tiles `[first, end)` (tile indices) of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileRun {
    /// The first tile index.
    pub first: usize,
    /// One past the last tile index.
    pub end: usize,
    /// How the tiles are processed.
    pub kind: TileKind,
}

/// Classifies the key tiles of size `tk` (the last one may be shorter) for query rows
/// `[i0, i1)` of an `m × n` score matrix under `pattern` (`None`: dense). Returns the visited
/// tiles as runs in increasing order; tiles not listed hold no kept element.
///
/// A tile is [`TileKind::Full`] only when every (i, j) in it is kept. Dense attention gives one
/// full run over all tiles.
pub fn classify(
    pattern: Option<&MaskPattern>,
    m: usize,
    n: usize,
    i0: usize,
    i1: usize,
    tk: usize,
) -> Vec<TileRun> {
    let tk = tk.max(1);
    let tiles = n.div_ceil(tk);
    if i0 >= i1 || n == 0 {
        return Vec::new();
    }
    let Some(pattern) = pattern else {
        return vec![TileRun {
            first: 0,
            end: tiles,
            kind: TileKind::Full,
        }];
    };
    let ni = n as i64;
    let shift = n as i64 - m as i64;
    let mut maybe_any = IntervalSet::empty();
    let mut sure_all: Option<IntervalSet> = None;
    for i in i0..i1 {
        let keys = row_keys(pattern, i as i64 + shift, ni);
        maybe_any = maybe_any.union(&keys.maybe);
        sure_all = Some(match sure_all {
            None => keys.sure,
            Some(s) => s.intersect(&keys.sure),
        });
    }
    let sure_all = sure_all.unwrap_or_default();
    // Visited tiles: those meeting a `maybe` span (merged, as neighbouring spans can share a
    // boundary tile). Full tiles: those inside one `sure` span; the last tile is short, so it
    // is full when its span reaches n. O(spans), never O(tiles), so long rows stay cheap.
    let mut visited: Vec<(usize, usize)> = Vec::new();
    for &(lo, hi) in maybe_any.spans() {
        let (t0, t1) = ((lo as usize) / tk, (hi as usize).div_ceil(tk));
        match visited.last_mut() {
            Some(last) if t0 <= last.1 => last.1 = last.1.max(t1),
            _ => visited.push((t0, t1)),
        }
    }
    let full: Vec<(usize, usize)> = sure_all
        .spans()
        .iter()
        .filter_map(|&(a, b)| {
            let t0 = (a as usize).div_ceil(tk);
            let t1 = if b as usize == n {
                tiles
            } else {
                b as usize / tk
            };
            (t0 < t1).then_some((t0, t1))
        })
        .collect();
    let mut runs: Vec<TileRun> = Vec::new();
    let mut push = |first: usize, end: usize, kind: TileKind| {
        if first < end {
            runs.push(TileRun { first, end, kind });
        }
    };
    let mut f = 0;
    for &(v0, v1) in &visited {
        let mut t = v0;
        while t < v1 {
            while f < full.len() && full[f].1 <= t {
                f += 1;
            }
            match full.get(f) {
                Some(&(f0, f1)) if f0 <= t => {
                    let e = f1.min(v1);
                    push(t, e, TileKind::Full);
                    t = e;
                }
                Some(&(f0, _)) if f0 < v1 => {
                    push(t, f0, TileKind::Partial);
                    t = f0;
                }
                _ => {
                    push(t, v1, TileKind::Partial);
                    t = v1;
                }
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prim() -> impl Strategy<Value = MaskPattern> {
        prop_oneof![
            Just(MaskPattern::Causal),
            (0u64..12).prop_map(MaskPattern::Window),
            (0u64..5, 1u64..5).prop_map(|(w, r)| MaskPattern::Dilated { w, r }),
            (0u64..9).prop_map(MaskPattern::Global),
            (1u64..9).prop_map(MaskPattern::Block),
        ]
    }

    fn pattern() -> impl Strategy<Value = MaskPattern> {
        prim().prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| MaskPattern::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| MaskPattern::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    fn check(p: &MaskPattern, m: usize, n: usize, qt: usize, tk: usize) {
        for i0 in (0..m).step_by(qt) {
            let i1 = (i0 + qt).min(m);
            let runs = classify(Some(p), m, n, i0, i1, tk);
            let mut kind_of = vec![None; n.div_ceil(tk)];
            for r in &runs {
                assert!(
                    r.first < r.end && r.end <= kind_of.len(),
                    "{p} bad run {r:?}"
                );
                for (t, slot) in kind_of.iter_mut().enumerate().take(r.end).skip(r.first) {
                    assert!(slot.is_none(), "{p} tile {t} listed twice");
                    *slot = Some(r.kind);
                }
            }
            for (t, kind) in kind_of.iter().enumerate() {
                let (j0, j1) = (t * tk, ((t + 1) * tk).min(n));
                let kept = (i0..i1)
                    .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                    .filter(|&(i, j)| p.keeps(i, j, m, n))
                    .count();
                let total = (i1 - i0) * (j1 - j0);
                match kind {
                    None => assert_eq!(kept, 0, "{p} m={m} n={n} rows {i0}..{i1} tile {t} skipped"),
                    Some(TileKind::Full) => {
                        assert_eq!(kept, total, "{p} m={m} n={n} rows {i0}..{i1} tile {t} full")
                    }
                    Some(TileKind::Partial) => {}
                }
            }
        }
    }

    #[test]
    fn dense_is_one_full_run() {
        let runs = classify(None, 5, 10, 0, 4, 4);
        assert_eq!(
            runs,
            vec![TileRun {
                first: 0,
                end: 3,
                kind: TileKind::Full
            }]
        );
        assert!(classify(None, 5, 0, 0, 4, 4).is_empty());
    }

    #[test]
    fn causal_tiles() {
        // 8 × 8 causal, rows 4..8, tiles of 4: tile 0 full, tile 1 partial (diagonal).
        let runs = classify(Some(&MaskPattern::Causal), 8, 8, 4, 8, 4);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].kind, TileKind::Full);
        assert_eq!(runs[1].kind, TileKind::Partial);
        // Rows 0..4 never reach tile 1.
        let runs = classify(Some(&MaskPattern::Causal), 8, 8, 0, 4, 4);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first, runs[0].end), (0, 1));
    }

    #[test]
    fn window_skips_far_tiles() {
        let runs = classify(Some(&MaskPattern::Window(2)), 64, 64, 32, 36, 4);
        let visited: usize = runs.iter().map(|r| r.end - r.first).sum();
        assert!(visited <= 3, "{runs:?}");
    }

    #[test]
    fn long_rows_classify_by_spans() {
        // 65,536 keys: one full run and one partial diagonal tile per query tile, computed
        // from spans (this would take minutes tile by tile).
        let n = 65_536;
        for i0 in (0..n).step_by(997 * 2) {
            let runs = classify(Some(&MaskPattern::Causal), n, n, i0, i0 + 2, 4);
            assert!(runs.len() <= 2, "{runs:?}");
            assert_eq!(runs.last().map(|r| r.kind), Some(TileKind::Partial));
        }
        let p = MaskPattern::Or(
            Box::new(MaskPattern::Window(64)),
            Box::new(MaskPattern::Global(8)),
        );
        let runs = classify(Some(&p), n, n, 40_000, 40_002, 4);
        assert_eq!(runs.len(), 4, "{runs:?}");
    }

    #[test]
    fn more_queries_than_keys() {
        check(&MaskPattern::Causal, 9, 3, 4, 2);
        check(&MaskPattern::Block(2), 9, 3, 1, 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn classification_agrees_with_keeps(
            p in pattern(),
            m in 0usize..20,
            n in 0usize..20,
            qt in 1usize..6,
            tk in 1usize..9,
        ) {
            check(&p, m, n, qt, tk);
        }
    }
}
