//! The block selection of a `topk_blocks(g, k, b)` mask for one batch entry, and the tile
//! table it leaves: tiles whose row and key blocks are never selected are dropped, so the
//! kernel visits only what the selection (or the rest of the mask) reaches.

use super::{TileRun, TileTable};

/// Which key blocks each row block keeps: query row `i` (not end-aligned) keeps key `j` when
/// `keep[⌊i/b⌋ · cols + ⌊j/b⌋]`.
#[derive(Clone, Copy, Debug)]
pub struct Blocks<'a> {
    /// `rows × cols` flags, row-major.
    pub keep: &'a [bool],
    /// Row blocks (`ceil(m / b)`).
    pub rows: usize,
    /// Key blocks (`ceil(n / b)`).
    pub cols: usize,
    /// The block size (≥ 1).
    pub b: usize,
}

impl Blocks<'_> {
    /// Whether the selection covers `m` queries and `n` keys.
    pub fn fits(&self, m: usize, n: usize) -> bool {
        self.b >= 1
            && self.rows == m.div_ceil(self.b)
            && self.cols == n.div_ceil(self.b)
            && self.rows.checked_mul(self.cols) == Some(self.keep.len())
    }

    /// Whether query row `i` keeps key `j`.
    pub fn selected(&self, i: usize, j: usize) -> bool {
        let (r, c) = (i / self.b.max(1), j / self.b.max(1));
        c < self.cols && self.keep.get(r * self.cols + c).copied().unwrap_or(false)
    }

    /// The table of one call: `all` classifies the mask with the selection taken as keeping
    /// every pair, `none` with it keeping none (the mask is monotone in the selection, so the
    /// two bound it). A tile pair whose blocks are all selected takes `all`'s kind, one with
    /// none selected takes `none`'s (usually: not visited), a mixed one is visited as partial
    /// when `all` visits it. O(rows · cols) for the block counts, then O(1) per tile pair.
    pub fn refine(&self, all: &TileTable, none: &TileTable, m: usize, n: usize) -> TileTable {
        let counts = Counts::of(self);
        let (qt, kt) = (all.query_tile, all.key_tile);
        let b = self.b.max(1);
        let mut unselected: Vec<Option<bool>> = vec![None; all.key_tiles];
        TileTable::from_fn(m, n, qt, kt, |t| {
            unselected.fill(None);
            for run in none.runs(t) {
                for u in run.first..run.end {
                    unselected[u as usize] = Some(run.partial);
                }
            }
            let (i0, i1) = (t * qt, ((t + 1) * qt).min(m));
            let (r0, r1) = (i0 / b, (i1.max(i0 + 1) - 1) / b + 1);
            let mut runs: Vec<TileRun> = Vec::new();
            for run in all.runs(t) {
                for u in run.first..run.end {
                    let (j0, j1) = (u as usize * kt, ((u as usize + 1) * kt).min(n));
                    let (c0, c1) = (j0 / b, (j1.max(j0 + 1) - 1) / b + 1);
                    let selected = counts.sum(r0, r1, c0, c1);
                    let partial = if selected == 0 {
                        match unselected.get(u as usize).copied().flatten() {
                            Some(partial) => partial,
                            None => continue,
                        }
                    } else if selected == (r1 - r0) * (c1 - c0) {
                        run.partial
                    } else {
                        true
                    };
                    TileRun::append(&mut runs, u, partial);
                }
            }
            runs
        })
    }
}

/// Two-dimensional prefix sums of the selection: how many blocks of a rectangle are kept.
struct Counts {
    cols: usize,
    sums: Vec<usize>,
}

impl Counts {
    fn of(s: &Blocks<'_>) -> Counts {
        let cols = s.cols + 1;
        let mut sums = vec![0usize; (s.rows + 1) * cols];
        for r in 0..s.rows {
            let mut row = 0;
            for c in 0..s.cols {
                row += usize::from(s.keep[r * s.cols + c]);
                sums[(r + 1) * cols + c + 1] = sums[r * cols + c + 1] + row;
            }
        }
        Counts { cols, sums }
    }

    /// Kept blocks in rows `r0..r1`, columns `c0..c1` (clamped to the selection).
    fn sum(&self, r0: usize, r1: usize, c0: usize, c1: usize) -> usize {
        let rows = self.sums.len() / self.cols - 1;
        let (r1, c1) = (r1.min(rows), c1.min(self.cols - 1));
        let (r0, c0) = (r0.min(r1), c0.min(c1));
        let at = |r: usize, c: usize| self.sums[r * self.cols + c];
        at(r1, c1) + at(r0, c0) - at(r0, c1) - at(r1, c0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::KeyMask;
    use super::*;

    /// The refined table against every position of the mask with the selection.
    #[test]
    fn refined_tables_visit_exactly_the_reached_tiles() {
        let (m, n, b) = (37usize, 53usize, 5usize);
        let (rows, cols) = (m.div_ceil(b), n.div_ceil(b));
        // A fixed pseudo-random selection.
        let keep: Vec<bool> = (0..rows * cols).map(|x| (x * 7 + 3) % 5 < 2).collect();
        let blocks = Blocks {
            keep: &keep,
            rows,
            cols,
            b,
        };
        assert!(blocks.fits(m, n) && !blocks.fits(m + b, n));
        let bx = Box::new;
        let masks = [
            KeyMask::TopkBlocks,
            KeyMask::And(bx(KeyMask::TopkBlocks), bx(KeyMask::Causal)),
            KeyMask::Or(
                bx(KeyMask::And(bx(KeyMask::TopkBlocks), bx(KeyMask::Causal))),
                bx(KeyMask::Block(8)),
            ),
        ];
        let substituted = [
            (KeyMask::Global(u64::MAX), None),
            (KeyMask::Causal, None),
            (
                KeyMask::Or(bx(KeyMask::Causal), bx(KeyMask::Block(8))),
                Some(KeyMask::Block(8)),
            ),
        ];
        for (qt, kt) in [(4, 8), (16, 16), (5, 5)] {
            for (mask, (all, none)) in masks.iter().zip(&substituted) {
                let all = TileTable::enumerate(all, m, n, qt, kt);
                let none = match none {
                    Some(p) => TileTable::enumerate(p, m, n, qt, kt),
                    None => TileTable::from_fn(m, n, qt, kt, |_| Vec::new()),
                };
                let got = blocks.refine(&all, &none, m, n);
                // Exact visits; a tile marked full keeps every position.
                for t in 0..m.div_ceil(qt) {
                    let rows = t * qt..((t + 1) * qt).min(m);
                    for u in 0..n.div_ceil(kt) {
                        let keys = u * kt..((u + 1) * kt).min(n);
                        let kept: Vec<bool> = rows
                            .clone()
                            .flat_map(|i| keys.clone().map(move |j| (i, j)))
                            .map(|(i, j)| mask.keeps_with(i, j, m, n, None, Some(&blocks)))
                            .collect();
                        let run = got
                            .runs(t)
                            .iter()
                            .find(|r| (r.first as usize..r.end as usize).contains(&u));
                        // Tiles inside one block each are exact; a tile over several blocks,
                        // some selected, may be visited for nothing.
                        let any = kept.iter().any(|&k| k);
                        if b % qt == 0 && b % kt == 0 {
                            assert_eq!(run.is_some(), any, "{mask:?} tile ({t}, {u}) {qt}×{kt}");
                        } else {
                            assert!(run.is_some() || !any, "{mask:?} tile ({t}, {u}) {qt}×{kt}");
                        }
                        if run.is_some_and(|r| !r.partial) {
                            assert!(kept.iter().all(|&k| k), "{mask:?} full tile ({t}, {u})");
                        }
                    }
                }
            }
        }
    }
}
