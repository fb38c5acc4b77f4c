//! f32 flash attention on AVX-512, block-sparse by the caller's tile table.
//!
//! [`run`] computes rows of one batch entry's `O = softmax(mask(score(Q Kᵀ))) V` as
//! [`problem::reference`] defines it, in f32 arithmetic: relative L2 error ≤ 1e-5 against the
//! f64 reference on standard-normal data (measured 3e-7 to 1.2e-6, see `tests/attention.rs`).
//! Q, K and V may be f32, f16 or bf16, widened on load; rows of every operand may have any
//! stride. Masked positions are replaced, never added to (a masked key's value row is not
//! read into the sum either: `0·∞` stays out); a row that keeps no key gives zeros and
//! `lse = −∞`; NaN in a kept score makes the row NaN; a kept `+∞` score gives NaN as in the
//! reference (`∞ − ∞`). Scores are carried in base 2 (`× log2 e`): like any f32 evaluation
//! of the score, each exponent carries an error of about `|score|·2⁻²⁴` (the fold adds one
//! rounding of that size); measured on standard-normal Q, K, V with scores of standard
//! deviation 1, 8, 32, 128, 512: relative L2 error 6e-7, 9e-7, 1.7e-6, 3.4e-6, 2.2e-6. A
//! score beyond `±f32::MAX / log2 e` (about 2.4e38) becomes infinite where the f64 reference
//! stays finite.
//!
//! Two kernels, chosen by the call's shape only (never by which rows a call asks for, so any
//! split of rows gives bit-identical results):
//!
//! - the tile kernel (`m > ROW_KERNEL_MAX_M`): [`QUERY_TILE`] = 64 query rows in the lanes of
//!   four vectors, [`KEY_TILE`] = 64 keys per tile; 4 × 4-vector register-blocked FMA
//!   micro-kernels for `Q Kᵀ` and `P V` and an online softmax without horizontal reductions.
//!   64 rows make every K and V element broadcast once feed 4 FMAs and keep `Qᵀ`, `Sᵀ` and `Oᵀ`
//!   at 16 KiB each (d = 64) next to the key tile in L1/L2; 64 keys keep the per-tile
//!   softmax bookkeeping under 1% and the diagonal tiles of causal masks small;
//! - the row kernel (decode, `m ≤ ROW_KERNEL_MAX_M`): one row at a time, keys and value columns
//!   in the lanes, K and V read once, in their storage type, with prefetching: memory-bound.
//!
//! Both visit exactly the key tiles the table lists, evaluate element masks (AVX-512 integer
//! compares, 16 positions each) on partial tiles only, and exponentiate in base 2 with a
//! polynomial `exp2` (relative error ≤ 2.5e-7); the softcap uses a vector `tanh` (≤ 3e-7).
//! Measured speeds are in `examples/attention_bench.rs` and the commit history.
//!
//! ```
//! use attnc_wide::attention::{self, KEY_TILE, QUERY_TILE};
//! use attnc_wide::problem::{Call, Elements, Operand, Output, Score, TileTable};
//!
//! let (m, n, d) = (3, 5, 4);
//! let q = vec![0.5f32; m * d];
//! let kv = vec![1.0f32; n * d];
//! fn op(x: &[f32], rows: usize, d: usize) -> Operand<'_> {
//!     Operand { data: Elements::F32(x), rows, cols: d, row_stride: d }
//! }
//! let tiles = TileTable::dense(m, n, QUERY_TILE, KEY_TILE);
//! let call = Call {
//!     q: op(&q, m, d),
//!     k: op(&kv, n, d),
//!     v: op(&kv, n, d),
//!     score: Score::scaled(0.5),
//!     mask: None,
//!     tiles: &tiles,
//!  segments: None, blocks: None, };
//! let mut o = vec![0.0f32; m * d];
//! let mut out = Output { o: &mut o, row_stride: d, lse: None, lse_from_origin: false };
//! if attention::available() {
//!     attention::run(&call, 0..m, &mut out)?;
//!     assert!(o.iter().all(|&x| (x - 1.0).abs() < 1e-6));
//! }
//! # Ok::<(), attnc_wide::problem::CallError>(())
//! ```
//!
//! [`problem::reference`]: crate::problem::reference

use std::ops::Range;

use crate::cpu::Features;
use crate::problem::{check, Call, CallError, Output};

#[cfg(target_arch = "x86_64")]
pub(crate) mod backward;
#[cfg(target_arch = "x86_64")]
mod mask;
#[cfg(target_arch = "x86_64")]
mod math;
#[cfg(target_arch = "x86_64")]
mod row;
#[cfg(target_arch = "x86_64")]
mod score;
#[cfg(target_arch = "x86_64")]
mod tile;
#[cfg(target_arch = "x86_64")]
mod transpose;
#[cfg(target_arch = "x86_64")]
mod widen;

/// The lane mask of the first `count` of 16 lanes, for the other 16-lane code of the crate.
#[cfg(target_arch = "x86_64")]
pub(crate) use widen::first_lanes;

/// Query rows per query tile: four vectors of 16 lanes.
pub const QUERY_TILE: usize = 64;

/// Keys per key tile.
pub const KEY_TILE: usize = 64;

/// Calls with at most this many queries take the row kernel (decode), which streams K and V
/// once per row; with more, the tile kernel (whose cost for up to 16 rows is that of 16)
/// wins. Measured at n = 32768, d = 128, bf16 K/V: the row kernel is 1.8× faster at m = 2,
/// even at m = 3, 1.3× slower at m = 4.
pub const ROW_KERNEL_MAX_M: usize = 3;

/// Whether this CPU and process can run [`run`] (AVX-512 F, BW, DQ and VL).
pub fn available() -> bool {
    Features::detect().avx512
}

/// Computes rows `rows` (starting at a query-tile boundary) of `call` into `out`.
///
/// `call.tiles` must have [`QUERY_TILE`]-row query tiles and [`KEY_TILE`]-key key tiles.
/// Errors (before any memory is touched): [`CallError::Shape`] when [`check`] fails or the
/// tile sizes differ, [`CallError::Unsupported`] without AVX-512.
pub fn run(call: &Call<'_>, rows: Range<usize>, out: &mut Output<'_>) -> Result<(), CallError> {
    run_with_bound(call, rows, out, None)
}

/// The largest magnitude among a call's values (`V`), as [`run_with_bound`] takes it: the
/// tile kernel scales its weights by a power of two chosen from it (see
/// `attention/tile/headroom.rs`) so that no product is subnormal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueBound(u32);

impl ValueBound {
    /// Reads every value of `call` once (a caller running many query tiles of one call
    /// computes it once and passes it to each). `None` without AVX-512.
    pub fn of(call: &Call<'_>) -> Option<ValueBound> {
        if !available() || !call.v.in_bounds() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX-512 was detected; every row of V lies inside its elements.
            Some(ValueBound(unsafe { tile::value_magnitude_bits(&call.v) }))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// [`run`] with the values' magnitude computed beforehand ([`ValueBound::of`] of the same
/// call); without one, this call reads every value once for it.
pub fn run_with_bound(
    call: &Call<'_>,
    rows: Range<usize>,
    out: &mut Output<'_>,
    bound: Option<ValueBound>,
) -> Result<(), CallError> {
    check(call, &rows, out)?;
    let tiles = call.tiles;
    if tiles.query_tile != QUERY_TILE || tiles.key_tile != KEY_TILE {
        return Err(CallError::Shape(format!(
            "the tile table has {}×{} tiles, this kernel {QUERY_TILE}×{KEY_TILE}",
            tiles.query_tile, tiles.key_tile
        )));
    }
    if !available() {
        return Err(CallError::Unsupported("avx-512 (f, bw, dq, vl)"));
    }
    if rows.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let form = score::ScoreForm::new(&call.score);
        let program = call.mask.map(|m| mask::MaskProgram::for_call(m, call));
        if call.m() <= ROW_KERNEL_MAX_M {
            // SAFETY: AVX-512 was detected, `check` passed and the tile sizes match.
            unsafe { row::run(call, rows, out, form, program.as_ref()) };
        } else {
            // The values' magnitude, read once per call when the caller did not. SAFETY (both):
            // as above; `check` bounded V.
            let bound =
                bound.map_or_else(|| unsafe { tile::value_magnitude_bits(&call.v) }, |b| b.0);
            unsafe { tile::run(call, rows, out, form, program.as_ref(), bound) };
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(CallError::Unsupported("avx-512 (f, bw, dq, vl)"))
    }
}
