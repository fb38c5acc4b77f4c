//! What a fused attention kernel is specialized to: its operands ([`TensorRef`]), shapes,
//! score expression, mask and precision ([`AttentionSpec`]), and the tile sizes of the exact
//! kernel, in which the compile-time tile table is counted.

use crate::tiles::{classify, TileKind, TileRun};
use attnc_ir::{DType, MaskPattern};
pub use attnc_ir::{Precision, ScoreExpr};

/// f32x4 score vectors per key tile.
pub(super) const KEY_VECS: usize = 2;

/// Keys per key tile (`KEY_VECS` f32x4 of scores).
pub const KEY_TILE: usize = 4 * KEY_VECS;

/// Query rows per query tile: they share every K and V load.
pub const QUERY_TILE: usize = 4;

/// A tensor the kernel reads: where its pointer is and how its elements are laid out.
///
/// Element `(b, r, c)` (batch multi-index `b` over the output's leading axes, row `r`, column
/// `c`) lives at element offset `Σ b[a] * batch_strides[a] + r * row_stride + c * col_stride`
/// from the tensor's base pointer. A stride of 0 broadcasts.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// Index into the kernel's pointer array (the IR parameter index).
    pub slot: usize,
    /// The parameter's name (for messages).
    pub name: String,
    /// Storage type; f16/bf16 are widened to f32 on load.
    pub dtype: DType,
    /// `Some(to)` when the operand is `cast(param, to)`: the kernel must read the parameter
    /// rounded to `to` (the plan converts it once and clears this).
    pub convert: Option<DType>,
    /// Element stride per leading output axis (0 where the tensor broadcasts).
    pub batch_strides: Vec<usize>,
    /// Element stride between rows (0 where broadcast).
    pub row_stride: usize,
    /// Element stride between columns (0 where broadcast).
    pub col_stride: usize,
}

/// Everything the fused attention kernel is specialized to (all shapes bound).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    /// The leading (batch) axes of the output `[..., m, dv]`.
    pub batch: Vec<usize>,
    /// Query rows.
    pub m: usize,
    /// Keys.
    pub n: usize,
    /// Depth of queries and keys.
    pub d: usize,
    /// Width of values (and of the output rows).
    pub dv: usize,
    /// `Q: [..., m, d]` (rows are queries, columns depth).
    pub q: TensorRef,
    /// `K: [..., n, d]` (rows are keys, columns depth).
    pub k: TensorRef,
    /// `V: [..., n, dv]` (rows are keys, columns value width).
    pub v: TensorRef,
    /// Bias tensors read by the score expression (rows queries, columns keys).
    pub biases: Vec<TensorRef>,
    /// The segment ids a document mask reads, in the order its `Document` parts index them:
    /// i32 ids in f32-sized buffers, one row of `col_stride`-spaced ids per batch entry
    /// (batch strides matched to the batch axes from the left; see `attnc_ir::segments`).
    /// Only the full-width tier reads them.
    pub segments: Vec<TensorRef>,
    /// The score expression over `S`, folded at the bound shapes (no dimension symbols).
    pub score: ScoreExpr,
    /// The kept positions (`None`: dense). Masked scores are `-inf` (the only fill matched).
    pub mask: Option<MaskPattern>,
    /// The arithmetic.
    pub precision: Precision,
    /// Which kernels compute it.
    pub tier: crate::wide::Tier,
    /// Whether the kernel also writes each row's softmax statistics for the log-sum-exp:
    /// after the `[batch.., m, dv]` output rows, one `(running max, running sum)` f32 pair
    /// per row (`[batch.., m, 2]`), from which the host forms `max + ln(sum)` (exact f32
    /// Cranelift kernel only; see [`AttentionSpec::stats_offset`]).
    pub lse: bool,
}

impl AttentionSpec {
    /// Where the row statistics of [`AttentionSpec::lse`] start in the output buffer, in
    /// f32 elements: right after the output rows.
    pub fn stats_offset(&self) -> usize {
        self.batch_count() * self.m * self.dv
    }

    /// The output buffer's length in f32 elements: the rows, and the row statistics when
    /// [`AttentionSpec::lse`] asks for them.
    pub fn output_len(&self) -> usize {
        self.stats_offset()
            + if self.lse {
                2 * self.batch_count() * self.m
            } else {
                0
            }
    }

    /// The number of batch entries (product of [`AttentionSpec::batch`]).
    pub fn batch_count(&self) -> usize {
        self.batch.iter().product()
    }

    /// The rows `[i0, i1)` of query tile `tile` ([`QUERY_TILE`] rows each, the last one
    /// shorter).
    pub fn query_tile_rows(&self, tile: usize) -> (usize, usize) {
        let i0 = (tile * QUERY_TILE).min(self.m);
        (i0, (i0 + QUERY_TILE).min(self.m))
    }

    /// The compile-time tile table of query tile `tile`: the runs of key tiles (of
    /// [`KEY_TILE`] keys) its rows visit.
    pub fn query_tile_runs(&self, tile: usize) -> Vec<TileRun> {
        let (i0, i1) = self.query_tile_rows(tile);
        classify(self.mask.as_ref(), self.m, self.n, i0, i1, KEY_TILE)
    }

    /// `(visited, total)`: the key tiles the kernel visits over all query tiles of one batch
    /// entry, and all there are.
    pub fn key_tiles(&self) -> (usize, usize) {
        let tiles = self.m.div_ceil(QUERY_TILE);
        let visited = (0..tiles)
            .map(|g| {
                self.query_tile_runs(g)
                    .iter()
                    .map(|r| r.end - r.first)
                    .sum::<usize>()
            })
            .sum();
        (visited, tiles * self.n.div_ceil(KEY_TILE))
    }

    /// The fraction of the `m × n` score matrix the kernel visits (1 for dense attention).
    pub fn density(&self) -> f64 {
        if self.m == 0 || self.n == 0 {
            return 0.0;
        }
        let visited: usize = (0..self.m.div_ceil(QUERY_TILE))
            .map(|g| {
                let (i0, i1) = self.query_tile_rows(g);
                let keys: usize = self
                    .query_tile_runs(g)
                    .iter()
                    .map(|r| (r.end * KEY_TILE).min(self.n) - r.first * KEY_TILE)
                    .sum();
                keys * (i1 - i0)
            })
            .sum();
        visited as f64 / (self.m as f64 * self.n as f64)
    }
}

/// Whether a pattern uses `dilated` (whose stride test runs in f32 and needs sizes < 2^24).
pub fn contains_dilated(p: &MaskPattern) -> bool {
    match p {
        MaskPattern::Dilated { .. } => true,
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
            contains_dilated(a) || contains_dilated(b)
        }
        _ => false,
    }
}

/// How a run of key tiles is processed by the generated code (the `kind` word of the table).
pub(crate) fn run_code(kind: TileKind, tail: bool) -> u32 {
    match (kind, tail) {
        (TileKind::Full, false) => 0,
        (TileKind::Partial, false) => 1,
        (TileKind::Full, true) => 2,
        (TileKind::Partial, true) => 3,
    }
}
