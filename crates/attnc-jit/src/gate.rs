//! Skipping the query tiles of a gated attention whose gate is zero.
//!
//! The planner hands an attention step the gate multiplying its output
//! ([`crate::plan::StepGate`]). The written product is `gate · O`; where the gate is ±0 that is
//! ±0 when `O` is finite and NaN when it is not. So a query tile of a batch entry is skipped
//! (its rows left at 0) only when:
//!
//! - the gate is zero (`+0` or `-0`) on every row of the tile, and
//! - every value the tile's rows would read is finite — Q in that entry, K and V of the
//!   entry, and the bias operands in that entry — and the score expression, bounded from
//!   those magnitudes (`|q · k| ≤ d · max|q| · max|k|`, `|relpos| ≤ m + n`), stays below a
//!   quarter of `f32::MAX`: then every kept score is finite, the softmax weights are a
//!   convex combination, `O` is finite (a fully masked row is zeros), and the product is 0.
//!
//! Otherwise the tile is computed and the product is what the written program gives, NaN
//! included. The one difference a skip makes is the sign of a zero product (`0 · O` is −0
//! where `O < 0`), which docs/language.md leaves open between engines. A score expression
//! whose magnitude has no bound from its operands' (a division, `log`, `sqrt`, `rsqrt`) never
//! skips.
//!
//! The scans cost O((m + n) · d) per batch entry, next to the O(m · n · d) of the attention,
//! and run only for entries with a zero gate.

use crate::buffer::BufferView;
use crate::error::Result;
use crate::kernels::attention::{AttentionSpec, TensorRef};
use crate::plan::StepGate;
use attnc_ir::{BinaryOp, ScoreExpr, UnaryOp};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest score magnitude bound under which a skip is exact.
const SCORE_LIMIT: f64 = f32::MAX as f64 / 4.0;

/// A fused attention kernel that computes the query tiles a predicate keeps.
pub(crate) trait TileKernel {
    /// Rows per query tile (the unit of skipping).
    fn tile(&self) -> usize;

    /// Computes into `out` (`[batch.., m, dv]`) the query tiles `(entry, rows)` that `keep`
    /// accepts, on up to `threads` threads; the others are left as they are.
    fn run_kept(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        keep: &(dyn Fn(usize, Range<usize>) -> bool + Sync),
        threads: usize,
    ) -> Result<()>;
}

impl TileKernel for crate::jit::KernelHandle {
    fn tile(&self) -> usize {
        crate::kernels::attention::QUERY_TILE
    }

    fn run_kept(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        keep: &(dyn Fn(usize, Range<usize>) -> bool + Sync),
        threads: usize,
    ) -> Result<()> {
        let (batches, rows) = self.work();
        let tile = self.tile();
        let units: Vec<(usize, Range<usize>)> = (0..batches)
            .flat_map(|b| {
                (0..rows.div_ceil(tile)).map(move |t| (b, t * tile..((t + 1) * tile).min(rows)))
            })
            .filter(|(b, r)| keep(*b, r.clone()))
            .collect();
        self.run_units(inputs, out, &units, threads)
    }
}

impl TileKernel for crate::wide::WideAttention {
    fn tile(&self) -> usize {
        self.query_tile()
    }

    fn run_kept(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        keep: &(dyn Fn(usize, Range<usize>) -> bool + Sync),
        threads: usize,
    ) -> Result<()> {
        self.run_tiles(inputs, (out, None), keep, threads)?;
        Ok(())
    }
}

/// The query-key pairs gates let the attention steps skip in the last run.
#[derive(Debug, Default)]
pub(crate) struct Skipped(AtomicU64);

impl Skipped {
    /// Starts a run.
    pub(crate) fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// The pairs skipped since [`Skipped::reset`].
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, pairs: u64) {
        self.0.fetch_add(pairs, Ordering::Relaxed);
    }
}

/// Runs gated attention `spec` on `views` into `out` (zeros), computing only the query
/// tiles the module's rule cannot skip; adds the skipped query-key pairs to `skipped`.
pub(crate) fn run(
    gate: &StepGate,
    spec: &AttentionSpec,
    kernel: &impl TileKernel,
    (views, out): (&[BufferView<'_>], &mut [f32]),
    threads: usize,
    skipped: &Skipped,
) -> Result<()> {
    let zeros = ZeroRows::new(gate, spec, views);
    let keep = |entry: usize, rows: Range<usize>| !zeros.covers(entry, rows);
    kernel.run_kept(views, out, &keep, threads)?;
    let tile = kernel.tile().max(1);
    let mut rows = 0u64;
    for entry in 0..zeros.prefix.len() {
        for t in 0..spec.m.div_ceil(tile) {
            let span = t * tile..((t + 1) * tile).min(spec.m);
            if zeros.covers(entry, span.clone()) {
                rows += span.len() as u64;
            }
        }
    }
    skipped.add(rows.saturating_mul(spec.n as u64));
    Ok(())
}

/// Per batch entry that may skip anything: the running count of zero gate rows (`None` for
/// entries the rule computes whole).
struct ZeroRows {
    prefix: Vec<Option<Vec<u32>>>,
}

impl ZeroRows {
    fn new(gate: &StepGate, spec: &AttentionSpec, views: &[BufferView<'_>]) -> ZeroRows {
        let entries = spec.batch_count();
        let Some(&BufferView::F32(g)) = views.get(gate.input) else {
            return ZeroRows {
                prefix: vec![None; entries],
            };
        };
        let prefix = (0..entries)
            .map(|e| {
                let base = offset(&spec.batch, &gate.batch_strides, e);
                let mut counts = Vec::with_capacity(spec.m + 1);
                counts.push(0u32);
                let mut zeros = 0u32;
                for r in 0..spec.m {
                    let x = g.get(base + r * gate.row_stride).copied();
                    zeros += u32::from(x == Some(0.0));
                    counts.push(zeros);
                }
                (zeros > 0 && finite_entry(spec, views, e)).then_some(counts)
            })
            .collect();
        ZeroRows { prefix }
    }

    /// Whether every row of `rows` in `entry` is gated off and may be skipped.
    fn covers(&self, entry: usize, rows: Range<usize>) -> bool {
        match self.prefix.get(entry) {
            Some(Some(c)) if rows.end < c.len() && rows.start < rows.end => {
                (c[rows.end] - c[rows.start]) as usize == rows.len()
            }
            _ => false,
        }
    }
}

/// The element offset of batch entry `entry` (row-major over `batch`) through `strides`.
fn offset(batch: &[usize], strides: &[usize], entry: usize) -> usize {
    let mut offset = 0;
    let mut rest = entry;
    for (&size, &stride) in batch.iter().zip(strides).rev() {
        if size > 0 {
            offset += (rest % size) * stride;
            rest /= size;
        }
    }
    offset
}

/// Whether batch entry `e` reads only finite values and its scores stay within
/// [`SCORE_LIMIT`].
fn finite_entry(spec: &AttentionSpec, views: &[BufferView<'_>], e: usize) -> bool {
    let magnitude = |t: &TensorRef, rows: usize, cols: usize| -> Option<f64> {
        max_abs(
            *views.get(t.slot)?,
            t,
            offset(&spec.batch, &t.batch_strides, e),
            (rows, cols),
        )
    };
    let (Some(q), Some(k), Some(_)) = (
        magnitude(&spec.q, spec.m, spec.d),
        magnitude(&spec.k, spec.n, spec.d),
        magnitude(&spec.v, spec.n, spec.dv),
    ) else {
        return false;
    };
    let Some(biases) = spec
        .biases
        .iter()
        .map(|b| magnitude(b, spec.m, spec.n))
        .collect::<Option<Vec<f64>>>()
    else {
        return false;
    };
    let terms = Terms {
        scores: spec.d as f64 * q * k,
        relpos: (spec.m + spec.n) as f64,
        biases,
    };
    bound(&spec.score, &terms).is_some_and(|b| b <= SCORE_LIMIT)
}

/// Magnitude bounds of a score expression's leaves.
struct Terms {
    scores: f64,
    relpos: f64,
    biases: Vec<f64>,
}

/// A bound on `|score|` over every position, or `None` when none follows from the leaves'
/// bounds.
fn bound(e: &ScoreExpr, t: &Terms) -> Option<f64> {
    let b = match e {
        ScoreExpr::Scores => t.scores,
        ScoreExpr::Const(c) => c.abs(),
        ScoreExpr::Dim(_) => return None,
        ScoreExpr::RelPos => t.relpos,
        ScoreExpr::Bias(k) => *t.biases.get(*k)?,
        ScoreExpr::Unary(op, x) => {
            let x = bound(x, t)?;
            match op {
                UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => x,
                UnaryOp::Tanh | UnaryOp::Sigmoid => 1.0,
                UnaryOp::Elu => x.max(1.0),
                UnaryOp::Exp => x.exp(),
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => return None,
            }
        }
        ScoreExpr::Binary(op, x, y) => {
            let (x, y) = (bound(x, t)?, bound(y, t)?);
            match op {
                BinaryOp::Add | BinaryOp::Sub => x + y,
                BinaryOp::Mul => x * y,
                BinaryOp::Max | BinaryOp::Min => x.max(y),
                BinaryOp::Div => return None,
            }
        }
    };
    b.is_finite().then_some(b)
}

/// The largest magnitude of the `rows × cols` matrix of `t` at element `offset` of `v`, or
/// `None` when one of its values is not finite (or lies outside the buffer).
fn max_abs(
    v: BufferView<'_>,
    t: &TensorRef,
    offset: usize,
    (rows, cols): (usize, usize),
) -> Option<f64> {
    if rows == 0 || cols == 0 {
        return Some(0.0);
    }
    let last = offset + (rows - 1) * t.row_stride + (cols - 1) * t.col_stride;
    if last >= v.len() {
        return None;
    }
    // Magnitudes compared as bits: for non-negative floats the order is the same, and every
    // non-finite value lies above the largest finite one.
    let mut top = 0u32;
    match v {
        BufferView::F32(x) if t.col_stride == 1 => {
            for r in 0..rows {
                let row = &x[offset + r * t.row_stride..][..cols];
                top = top.max(row.iter().fold(0, |m, a| m.max(a.to_bits() & 0x7fff_ffff)));
            }
        }
        _ => {
            for r in 0..rows {
                for c in 0..cols {
                    let a = v.get_f32(offset + r * t.row_stride + c * t.col_stride);
                    top = top.max(a.to_bits() & 0x7fff_ffff);
                }
            }
        }
    }
    let top = f32::from_bits(top);
    top.is_finite().then_some(f64::from(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms() -> Terms {
        Terms {
            scores: 10.0,
            relpos: 5.0,
            biases: vec![2.0],
        }
    }

    #[test]
    fn bounds_follow_the_score_form() {
        let scaled = ScoreExpr::scaled(ScoreExpr::Const(0.5));
        assert_eq!(bound(&scaled, &terms()), Some(5.0));
        let biased = ScoreExpr::Binary(
            BinaryOp::Add,
            Box::new(scaled),
            Box::new(ScoreExpr::Bias(0)),
        );
        assert_eq!(bound(&biased, &terms()), Some(7.0));
        let capped = ScoreExpr::Unary(UnaryOp::Tanh, Box::new(ScoreExpr::Scores));
        assert_eq!(bound(&capped, &terms()), Some(1.0));
        let divided = ScoreExpr::Binary(
            BinaryOp::Div,
            Box::new(ScoreExpr::Scores),
            Box::new(ScoreExpr::Const(2.0)),
        );
        assert_eq!(bound(&divided, &terms()), None);
        let huge = ScoreExpr::Unary(UnaryOp::Exp, Box::new(ScoreExpr::Const(1e3)));
        assert_eq!(bound(&huge, &terms()), None);
    }

    #[test]
    fn magnitudes_refuse_non_finite_values() {
        let t = TensorRef {
            slot: 0,
            name: "x".to_string(),
            dtype: attnc_ir::DType::F32,
            convert: None,
            batch_strides: vec![],
            row_stride: 2,
            col_stride: 1,
        };
        let x = [1.0, -3.0, 2.0, 0.5];
        assert_eq!(max_abs(BufferView::F32(&x), &t, 0, (2, 2)), Some(3.0));
        let nan = [1.0, f32::NAN, 2.0, 0.5];
        assert_eq!(max_abs(BufferView::F32(&nan), &t, 0, (2, 2)), None);
        let inf = [1.0, 0.0, f32::NEG_INFINITY, 0.5];
        assert_eq!(max_abs(BufferView::F32(&inf), &t, 0, (2, 2)), None);
        assert_eq!(max_abs(BufferView::F32(&x), &t, 0, (3, 2)), None);
    }
}
