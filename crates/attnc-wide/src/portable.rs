//! The portable forward: one attention call in plain Rust on any CPU, f32 arithmetic, exactly
//! the semantics of [`problem::reference`](crate::problem::reference), visiting only the key
//! tiles the call's tile table lists (with any tile sizes).
//!
//! It serves the attentions the 128-bit generated kernels cannot compile — masks whose kept
//! pairs come from data read at run time (`document(...)`, `topk_blocks(...)`), whose tile
//! tables are built per call — on CPUs without AVX-512. Per query tile and visited key tile,
//! the key and value rows are widened once into contiguous f32 (so f16/bf16 operands and
//! strided rows cost one copy per tile pair, not a whole-operand copy), then each row runs an
//! online softmax over the tile: scores by 8-lane dot products the compiler vectorizes, one
//! rescale of the row's accumulator when its maximum grows. Every row is computed in a fixed
//! order, so any split of rows at query-tile boundaries gives bit-identical results.

use std::ops::Range;

use crate::backward::portable::{axpy, dot, score};
use crate::problem::{check, Call, CallError, Operand, Output};

/// Computes rows `rows` (starting at a query-tile boundary of `call.tiles`) of `call` into
/// `out`. Errors (before any memory is touched) when [`check`] fails.
pub fn run(call: &Call<'_>, rows: Range<usize>, out: &mut Output<'_>) -> Result<(), CallError> {
    check(call, &rows, out)?;
    let (qt, kt) = (call.tiles.query_tile.max(1), call.tiles.key_tile.max(1));
    let (d, dv) = (call.q.cols, call.v.cols);
    let mut tile = TileState::new(qt, kt, d, dv);
    let mut t0 = rows.start;
    while t0 < rows.end {
        let t1 = (t0 / qt * qt + qt).min(rows.end);
        tile.compute(call, t0..t1);
        tile.write(call, t0..t1, rows.start, out);
        t0 = t1;
    }
    Ok(())
}

/// Scratch and running softmax state of one query tile.
struct TileState {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Scores of one row against the current key tile, and whether each is kept.
    x: Vec<f32>,
    kept: Vec<bool>,
    /// Per row: running maximum, sum of weights, weighted sum of values (`dv` each).
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    /// Per row, the key its ALiBi distances are measured from ([`Call::alibi_origin`]).
    origins: Vec<i64>,
}

impl TileState {
    fn new(qt: usize, kt: usize, d: usize, dv: usize) -> TileState {
        TileState {
            q: vec![0.0; qt * d],
            k: vec![0.0; kt * d],
            v: vec![0.0; kt * dv],
            x: vec![0.0; kt],
            kept: vec![false; kt],
            max: vec![0.0; qt],
            sum: vec![0.0; qt],
            origins: vec![0; qt],
            acc: vec![0.0; qt * dv],
        }
    }

    /// Runs rows `rows` (one query tile) over every key tile the table lists for them.
    fn compute(&mut self, call: &Call<'_>, rows: Range<usize>) {
        let (n, d, dv) = (call.n(), call.q.cols, call.v.cols);
        let (qt, kt) = (call.tiles.query_tile.max(1), call.tiles.key_tile.max(1));
        widen(&call.q, rows.clone(), &mut self.q);
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.acc.fill(0.0);
        for (o, i) in self.origins.iter_mut().zip(rows.clone()) {
            *o = call.alibi_origin(i);
        }
        for run in call.tiles.runs(rows.start / qt) {
            for t in run.first as usize..run.end as usize {
                let keys = (t * kt).min(n)..((t + 1) * kt).min(n);
                widen(&call.k, keys.clone(), &mut self.k);
                widen(&call.v, keys.clone(), &mut self.v);
                for (r, i) in rows.clone().enumerate() {
                    let from = self.origins[r];
                    let qi = &self.q[r * d..(r + 1) * d];
                    for (c, j) in keys.clone().enumerate() {
                        // Masked keys are skipped, never read into the sums (0·∞ stays out).
                        self.kept[c] = !run.partial || call.keeps(i, j);
                        if self.kept[c] {
                            let s = dot(qi, &self.k[c * d..(c + 1) * d]);
                            self.x[c] = score(call, s, i, j, from).0;
                        }
                    }
                    self.update(r, keys.len(), dv);
                }
            }
        }
    }

    /// Folds the kept scores of the current key tile into row `r`'s online softmax.
    fn update(&mut self, r: usize, keys: usize, dv: usize) {
        let mut tile_max = f32::NEG_INFINITY;
        let mut any = false;
        for c in (0..keys).filter(|&c| self.kept[c]) {
            any = true;
            // A NaN score makes the row NaN, as in the reference.
            tile_max = if tile_max.is_nan() || self.x[c].is_nan() {
                f32::NAN
            } else {
                tile_max.max(self.x[c])
            };
        }
        let old = self.max[r];
        let new = if old.is_nan() || tile_max.is_nan() {
            f32::NAN
        } else {
            old.max(tile_max)
        };
        // Kept scores of −∞ alone weigh nothing (the reference skips a row that has only those).
        if !any || new == f32::NEG_INFINITY {
            return;
        }
        let acc = &mut self.acc[r * dv..(r + 1) * dv];
        if old != new && old != f32::NEG_INFINITY {
            let alpha = (old - new).exp();
            self.sum[r] *= alpha;
            acc.iter_mut().for_each(|a| *a *= alpha);
        }
        for c in (0..keys).filter(|&c| self.kept[c]) {
            let p = (self.x[c] - new).exp();
            self.sum[r] += p;
            axpy(acc, p, &self.v[c * dv..(c + 1) * dv]);
        }
        self.max[r] = new;
    }

    /// Writes rows `rows` (one query tile; the call's rows start at `first`): `acc / sum`,
    /// zeros and `lse = −∞` for a row that kept nothing.
    fn write(&self, call: &Call<'_>, rows: Range<usize>, first: usize, out: &mut Output<'_>) {
        let dv = self.acc.len() / self.max.len().max(1);
        for (r, i) in rows.enumerate() {
            let at = (i - first) * out.row_stride;
            let row = &mut out.o[at..at + dv];
            let (max, sum) = (self.max[r], self.sum[r]);
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
            } else {
                for (o, a) in row.iter_mut().zip(&self.acc[r * dv..(r + 1) * dv]) {
                    *o = a / sum;
                }
            }
            if let Some(lse) = out.lse.as_deref_mut() {
                lse[i - first] = if max == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else if out.lse_from_origin {
                    max + sum.ln()
                } else {
                    call.natural_lse(i, self.origins[r], f64::from(max) + f64::from(sum.ln()))
                };
            }
        }
    }
}

/// Rows `rows` of `op` into `out` as contiguous f32 (`rows.len() × cols`).
fn widen(op: &Operand<'_>, rows: Range<usize>, out: &mut [f32]) {
    let cols = op.cols;
    for (r, row) in rows.enumerate() {
        let to = &mut out[r * cols..(r + 1) * cols];
        for (c, x) in to.iter_mut().enumerate() {
            *x = op.data.get(row * op.row_stride + c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{reference, Elements, KeyMask, Score, Segments, TileTable};

    fn op(x: &[f32], rows: usize, cols: usize) -> Operand<'_> {
        Operand {
            data: Elements::F32(x),
            rows,
            cols,
            row_stride: cols,
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 500.0 - 2.0
            })
            .collect()
    }

    fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Document masks (sorted and unsorted ids, rows that keep nothing), odd tile sizes and
    /// m ≠ n against the f64 reference; split calls give the same bits as one call.
    #[test]
    fn matches_the_reference_with_document_masks() {
        for (m, n, d, dv, qt, kt) in [
            (37usize, 37usize, 5usize, 3usize, 8usize, 4usize),
            (5, 70, 16, 8, 4, 16),
            (64, 64, 64, 64, 64, 64),
            (1, 1, 1, 1, 64, 64),
        ] {
            let (q, k, v) = (values(m * d, 1), values(n * d, 2), values(n * dv, 3));
            for ids in [
                (0..n).map(|j| (j / 9) as i32).collect::<Vec<_>>(),
                (0..n).map(|j| (j * 7 % 4) as i32).collect(),
            ] {
                // A query row whose id no key has keeps nothing.
                let mut queries = ids.clone();
                if let Some(first) = queries.get_mut(n - m) {
                    *first = -1;
                }
                let mask = KeyMask::And(Box::new(KeyMask::Causal), Box::new(KeyMask::Document));
                let segments = Segments {
                    queries: &queries,
                    keys: &ids,
                    shift: (n - m) as i64,
                };
                let tiles = segments.refine(&TileTable::enumerate(&mask, m, n, qt, kt), m, n);
                let call = Call {
                    q: op(&q, m, d),
                    k: op(&k, n, d),
                    v: op(&v, n, dv),
                    score: Score::scaled(0.4),
                    mask: Some(&mask),
                    tiles: &tiles,
                    segments: Some(segments),
                    blocks: None,
                };
                let (want, want_lse) = reference(&call);
                let mut o = vec![f32::NAN; m * dv];
                let mut lse = vec![f32::NAN; m];
                let mut out = Output {
                    o: &mut o,
                    row_stride: dv,
                    lse: Some(&mut lse),
                    lse_from_origin: false,
                };
                run(&call, 0..m, &mut out).expect("runs");
                assert!(relative_l2(&o, &want) < 1e-5, "{m} {n}");
                for (a, b) in lse.iter().zip(&want_lse) {
                    assert!(a == b || (a - b).abs() < 1e-4, "{a} {b}");
                }
                // The first row of the tile after the first, alone.
                if m > qt {
                    let mut part = vec![0.0f32; (m - qt) * dv];
                    let mut out = Output {
                        o: &mut part,
                        row_stride: dv,
                        lse: None,
                        lse_from_origin: false,
                    };
                    run(&call, qt..m, &mut out).expect("runs");
                    assert_eq!(part, o[qt * dv..]);
                }
            }
        }
    }

    #[test]
    fn nan_and_infinite_scores_follow_the_reference() {
        let (m, n, d) = (3usize, 4usize, 2usize);
        let q = vec![1.0f32, 0.0, 0.0, 1.0, f32::NAN, 0.0];
        let k = vec![1.0f32, 1.0, 2.0, 0.0, f32::INFINITY, 0.0, 0.0, 1.0];
        let v = values(n * 2, 9);
        let tiles = TileTable::dense(m, n, 2, 2);
        let call = Call {
            q: op(&q, m, d),
            k: op(&k, n, d),
            v: op(&v, n, 2),
            score: Score::scaled(1.0),
            mask: None,
            tiles: &tiles,
            segments: None,
            blocks: None,
        };
        let (want, _) = reference(&call);
        let mut o = vec![0.0f32; m * 2];
        let mut out = Output {
            o: &mut o,
            row_stride: 2,
            lse: None,
            lse_from_origin: false,
        };
        run(&call, 0..m, &mut out).expect("runs");
        for (a, b) in o.iter().zip(&want) {
            assert!(a.is_nan() == b.is_nan(), "{a} {b}");
        }
    }
}
