//! The segment ids of a document mask for one batch entry, and the tile table they leave.
//!
//! Refining a table needs each tile's smallest and largest id. When the key tiles' id ranges
//! come in order (sorted ids, the packed-documents layout), the key tiles a query tile's range
//! meets form one interval, and those holding nothing but the query tile's one id a
//! sub-interval of it: both are found by binary search, so a query tile costs a few searches
//! and its runs, not a comparison per tile pair of the table. Other ids take that comparison.

use std::ops::Range;

use super::{TileRun, TileTable};

/// The segment ids of one batch entry's [`KeyMask::Document`](super::KeyMask::Document):
/// query row `i` has id `queries[i + shift]` (no id, and so no kept key, outside the slice),
/// key `j` has `keys[j]`. `document(seg)` is `queries = keys = seg` with `shift = n − m`
/// (queries end-aligned).
#[derive(Clone, Copy, Debug)]
pub struct Segments<'a> {
    /// Ids read by the query rows.
    pub queries: &'a [i32],
    /// Ids of the keys (`n` of them).
    pub keys: &'a [i32],
    /// Row `i` reads `queries[i + shift]`.
    pub shift: i64,
}

/// The smallest and largest of `ids` (`None` when there are none).
fn id_range(ids: impl Iterator<Item = i32>) -> Option<(i32, i32)> {
    ids.fold(None, |r, x| {
        Some(r.map_or((x, x), |(lo, hi): (i32, i32)| (lo.min(x), hi.max(x))))
    })
}

/// One query tile's ids: their range, and whether every row of the tile has one.
struct QueryIds {
    lo: i32,
    hi: i32,
    every_row: bool,
}

impl QueryIds {
    /// Whether every row of the tile has the id `lo` and nothing else.
    fn one_id(&self) -> bool {
        self.every_row && self.lo == self.hi
    }
}

impl Segments<'_> {
    /// The id of query row `i`, if it has one.
    pub fn query(&self, i: usize) -> Option<i32> {
        let at = usize::try_from(i as i64 + self.shift).ok()?;
        self.queries.get(at).copied()
    }

    /// Whether query row `i` and key `j` have the same id.
    pub fn same(&self, i: usize, j: usize) -> bool {
        match (self.query(i), self.keys.get(j)) {
            (Some(a), Some(&b)) => a == b,
            _ => false,
        }
    }

    /// `table` (classified with the documents taken as kept) with the key tiles whose id range
    /// cannot meet the query tile's dropped (valid for a mask that
    /// [requires](super::KeyMask::requires_document) equal ids), and a visited tile partial
    /// unless every row and key of the pair has one and the same id (then the table's kind
    /// holds). Collecting the tiles' ranges reads every id once; sorted ids then cost a few
    /// binary searches per query tile (see the module's notes) and leave the tiles along the
    /// documents' diagonal blocks; unsorted ids stay exact, since visited tiles compare ids
    /// per element.
    pub fn refine(&self, table: &TileTable, m: usize, n: usize) -> TileTable {
        let kt = table.key_tile;
        let keys: Vec<Option<(i32, i32)>> = (0..n.div_ceil(kt))
            .map(|u| id_range(self.keys[u * kt..((u + 1) * kt).min(n)].iter().copied()))
            .collect();
        match in_order(&keys) {
            Some(ranges) => self.refine_with(table, m, n, |ids, runs, out| {
                sorted_tiles(&ranges, ids, runs, out)
            }),
            None => self.refine_with(table, m, n, |ids, runs, out| {
                compared_tiles(&keys, ids, runs, out)
            }),
        }
    }

    /// The table whose query tile visits, of its runs in `table`, the tiles `tiles` appends.
    fn refine_with(
        &self,
        table: &TileTable,
        m: usize,
        n: usize,
        tiles: impl Fn(&QueryIds, &[TileRun], &mut Vec<TileRun>),
    ) -> TileTable {
        let qt = table.query_tile;
        TileTable::from_fn(m, n, qt, table.key_tile, |t| {
            let rows = t * qt..((t + 1) * qt).min(m);
            let every_row = rows.clone().all(|i| self.query(i).is_some());
            let Some((lo, hi)) = id_range(rows.filter_map(|i| self.query(i))) else {
                return Vec::new();
            };
            let ids = QueryIds { lo, hi, every_row };
            let mut runs = Vec::new();
            tiles(&ids, table.runs(t), &mut runs);
            runs
        })
    }
}

/// The key tiles' ranges when each tile's ids all lie at or below the next tile's.
fn in_order(keys: &[Option<(i32, i32)>]) -> Option<Vec<(i32, i32)>> {
    let ranges: Vec<(i32, i32)> = keys.iter().copied().collect::<Option<_>>()?;
    ranges
        .windows(2)
        .all(|w| w[0].1 <= w[1].0)
        .then_some(ranges)
}

/// Appends the tiles of `runs` that meet the query tile's ids, by comparing each tile's range.
fn compared_tiles(
    keys: &[Option<(i32, i32)>],
    ids: &QueryIds,
    runs: &[TileRun],
    out: &mut Vec<TileRun>,
) {
    for run in runs {
        for u in run.first..run.end {
            let Some((a, b)) = keys.get(u as usize).copied().flatten() else {
                continue;
            };
            if a > ids.hi || ids.lo > b {
                continue;
            }
            let one_id = ids.one_id() && a == b && a == ids.lo;
            TileRun::append(out, u, run.partial || !one_id);
        }
    }
}

/// [`compared_tiles`] for ranges in order: the meeting tiles are one interval, and the tiles
/// holding only the query tile's one id a sub-interval of it (every range's two ends grow
/// from tile to tile): searched once per query tile, then cut to each run.
fn sorted_tiles(ranges: &[(i32, i32)], ids: &QueryIds, runs: &[TileRun], out: &mut Vec<TileRun>) {
    let meet = ranges.partition_point(|&(_, b)| b < ids.lo) as u32
        ..ranges.partition_point(|&(a, _)| a <= ids.hi) as u32;
    let only = if ids.one_id() {
        ranges.partition_point(|&(a, _)| a < ids.lo) as u32
            ..ranges.partition_point(|&(_, b)| b <= ids.lo) as u32
    } else {
        0..0
    };
    for run in runs {
        let visited = clip(run.first..run.end, &meet);
        let own = clip(visited.clone(), &only);
        if own.is_empty() {
            append_span(out, visited, true);
            continue;
        }
        append_span(out, visited.start..own.start, true);
        append_span(out, own.clone(), run.partial);
        append_span(out, own.end..visited.end, true);
    }
}

/// `a` cut to `b` (empty, at `a`'s start or end, where they do not meet).
fn clip(a: Range<u32>, b: &Range<u32>) -> Range<u32> {
    let start = a.start.max(b.start).min(a.end);
    start..a.end.min(b.end).max(start)
}

/// [`TileRun::append`] for every tile of `tiles`, in order.
fn append_span(out: &mut Vec<TileRun>, tiles: Range<u32>, partial: bool) {
    if tiles.is_empty() {
        return;
    }
    TileRun::append(out, tiles.start, partial);
    if let Some(last) = out.last_mut() {
        last.end = tiles.end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::KeyMask;

    /// Refined tables keep every tile holding a kept pair (any ids) and, for sorted ids, only
    /// the tiles along the documents' diagonal blocks.
    #[test]
    fn refined_tables_cover_every_kept_pair() {
        let (m, n, t) = (100usize, 130usize, 8usize);
        let sorted: Vec<i32> = (0..n).map(|j| (j / 40) as i32).collect();
        let unsorted: Vec<i32> = (0..n).map(|j| ((j * 31) % 7) as i32).collect();
        for ids in [&sorted, &unsorted] {
            let seg = Segments {
                queries: ids,
                keys: ids,
                shift: (n - m) as i64,
            };
            let dense = TileTable::dense(m, n, t, t);
            let table = seg.refine(&dense, m, n);
            for i in 0..m {
                for j in (0..n).filter(|&j| seg.same(i, j)) {
                    let tile = (j / t) as u32;
                    let runs = table.runs(i / t);
                    assert!(
                        runs.iter().any(|r| r.first <= tile && tile < r.end),
                        "{i} {j}"
                    );
                }
                // A full tile keeps every pair of its rows and keys.
                for run in table.runs(i / t).iter().filter(|r| !r.partial) {
                    for j in run.first as usize * t..(run.end as usize * t).min(n) {
                        assert!(seg.same(i, j), "full tile at {i} {j}");
                    }
                }
            }
        }
        let seg = Segments {
            queries: &sorted,
            keys: &sorted,
            shift: (n - m) as i64,
        };
        let (visited, total) = seg.refine(&TileTable::dense(m, n, t, t), m, n).counts();
        assert!(visited * 2 < total, "{visited} of {total}");
    }

    /// The searches for sorted ids give the table the tile-by-tile comparison gives, over
    /// static tables of every kind, documents of every length (empty ones and single tokens
    /// included), m ≠ n and sizes that are not multiples of the tile.
    #[test]
    fn sorted_ids_refine_as_compared_ones() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below.max(1) as u64) as usize
        };
        let masks = [
            KeyMask::Causal,
            KeyMask::Window(9),
            KeyMask::Global(5),
            KeyMask::Or(Box::new(KeyMask::Causal), Box::new(KeyMask::Global(3))),
        ];
        for case in 0..400 {
            let t = [1, 4, 8, 16][case % 4];
            let n = 1 + next(150);
            let m = 1 + next(n);
            // Sorted ids: a run of each id, some ids skipped, runs of every length.
            let mut ids = Vec::with_capacity(n);
            let mut id = next(3) as i32 - 1;
            while ids.len() < n {
                let longest = [1, 3, 20, 60][next(4)];
                let len = 1 + next(longest);
                ids.extend(std::iter::repeat_n(id, len.min(n - ids.len())));
                id += 1 + next(2) as i32;
            }
            let shift = (n - m) as i64 - next(3) as i64;
            let seg = Segments {
                queries: &ids,
                keys: &ids,
                shift,
            };
            let static_table = match case % 5 {
                4 => TileTable::dense(m, n, t, t),
                k => TileTable::enumerate(&masks[k], m, n, t, t),
            };
            let keys: Vec<Option<(i32, i32)>> = (0..n.div_ceil(t))
                .map(|u| id_range(ids[u * t..((u + 1) * t).min(n)].iter().copied()))
                .collect();
            assert!(in_order(&keys).is_some());
            let compared = seg.refine_with(&static_table, m, n, |q, runs, out| {
                compared_tiles(&keys, q, runs, out)
            });
            assert_eq!(
                seg.refine(&static_table, m, n),
                compared,
                "case {case}: m {m} n {n} tile {t} shift {shift} ids {ids:?}"
            );
        }
    }
}
