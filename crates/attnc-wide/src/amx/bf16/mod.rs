//! bf16 products: `Sᵀ = K·Qᵀ` and `Oᵀ += Vᵀ·Pᵀ` on `tdpbf16ps` (f32 sums), the score form and
//! the online softmax in f32 on AVX-512, 16 query rows per vector.
//!
//! Precision: Q and P are rounded to bf16; K and V enter as bf16 pairs `hi + lo` (16
//! significant bits) when their inputs have more than bf16's 8 (f32, f16): a second product
//! with the same resident Qᵀ or Pᵀ tiles, into the same accumulators. With every operand
//! rounded the error on standard-normal data at d = 64 is about 3.5e-3 (the bf16 rounding of
//! the scores dominates); the pairs keep it near 2.45e-3 at the cost of twice the K and V tile
//! loads. (Q cannot be split the same way: its pairs would need 8 resident tiles.) On vectors
//! the pairs would double the products themselves, so K and V are rounded once there.
//!
//! Per query tile (32 rows, two groups of 16 lanes) and visited key tile (64 keys):
//! 1. Sᵀ (AMX): Qᵀ resident in 4 B tiles (two 32-dim chunks × two row groups), K streaming
//!    through 2 A tiles, 2 accumulators of 16 keys × 16 rows.
//! 2. softmax (AVX-512), per row group and 16 keys: `t = x₂ − m`, `P = 2^t` rounded to bf16 and
//!    interleaved in pairs of keys (the B layout of `tdpbf16ps`), sums in f32. The running
//!    maximum `m` moves only when a score exceeds it by more than [`SLACK`] (so `P ≤ 2^SLACK`;
//!    bf16 and f32 have the range), which makes rescaling rare; a sum of 16 weights within
//!    `2^SLACK` proves no score did, so the maximum itself is formed only then. When it moves
//!    mid-tile, the weights already written for that tile are rescaled too.
//! 3. Oᵀ += Vᵀ·Pᵀ (AMX): Pᵀ resident in 4 B tiles, Vᵀ streaming, Oᵀ loaded and stored per
//!    group of 16 value columns.
//!
//! The tile work of step 1 (next key tile) and step 3 (previous key tile) is issued in half
//! steps (a key or column group's `hi` products; its `lo` products and stores) between every
//! 8 vectors of step 2, so the tile unit and the vector units overlap.
//!
//! On a CPU without AMX but with AVX-512 BF16, steps 1 and 3 run on `vdpbf16ps` instead
//! ([`vectors`]), over the same packed operands and buffers, in the same steps.

use std::arch::x86_64::*;
use std::ops::Range;

mod softmax;
mod tiles;
mod vectors;

use softmax::softmax;
use tiles::Work;

use super::pack::{Data, Lines};
use super::score::{finalize, poison, Form, RowState};
use super::simd::{join, load, to_bf16, Weights};
use super::tile::{Session, TILE_BYTES};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, CallError, Output};

/// How far (base 2) a score may exceed the row's maximum before the maximum moves.
const SLACK: f32 = 8.0;
/// Bytes of one Sᵀ slot (`[2 row groups][64 keys][16 rows]` f32) and one Pᵀ slot (4 tiles).
const S_SLOT: usize = 2 * KEY_TILE * 64;
const P_SLOT: usize = 4 * TILE_BYTES;

/// One call's scratch.
struct Scratch {
    /// Qᵀ tiles `(c, rg)` at `(2c + rg)·1024`.
    qt: Lines,
    /// Two Sᵀ slots.
    s: Lines,
    /// Two Pᵀ slots of tiles `(h, rg)` at `(2h + rg)·1024`.
    p: Lines,
    /// Oᵀ: `[rg][dv_pad][16]` f32.
    o: Lines,
    /// Per slot and row: the rescale of O recorded by that slot's softmax (1 when the maximum
    /// did not move), applied before the slot's P·V.
    alpha: [[f32; 32]; 2],
    dv_pad: usize,
    /// The products run on AVX-512 BF16 ([`vectors`]), not on the tile unit.
    on_vectors: bool,
}

/// Rows `rows` of `call` on packed K/V.
///
/// # Safety
/// AVX-512 F/BW/DQ/VL/BF16 and, unless `on_vectors`, AMX-BF16 are usable;
/// `problem::check(call, rows, out)` passed;
/// `data` was packed by [`super::pack::pack`] for bf16 from a call with the same K and V shape;
/// the tile table uses [`QUERY_TILE`] × [`KEY_TILE`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(crate) unsafe fn run(
    call: &Call<'_>,
    data: &Data,
    rows: Range<usize>,
    out: &mut Output<'_>,
    on_vectors: bool,
) -> Result<(), CallError> {
    let form = Form::new(call)?;
    let dv_pad = data.dv_groups * 16;
    // Every buffer is written before it is read (Q and O per query tile, S and P per key tile;
    // the lanes of rows past m hold stale but finite values that reach no output).
    let mut sc = Scratch {
        qt: Lines::overwritten(data.d_chunks * 2 * TILE_BYTES)?,
        // With no head dimension no product writes S: scores of 0.
        s: if data.d_chunks == 0 {
            Lines::zeroed(2 * S_SLOT)?
        } else {
            Lines::overwritten(2 * S_SLOT)?
        },
        p: Lines::overwritten(2 * P_SLOT)?,
        o: Lines::overwritten(2 * dv_pad * 64)?,
        alpha: [[1.0; 32]; 2],
        dv_pad,
        on_vectors,
    };
    let exp2 = Weights::weights(1.0);
    // SAFETY: AMX is usable by the caller's contract when the products run on tiles.
    let _tiles = (!on_vectors).then(|| unsafe { Session::start() });
    for qt in rows.start / QUERY_TILE..rows.end.div_ceil(QUERY_TILE) {
        // SAFETY: the caller's contract; qt is a query tile of rows.
        unsafe { query_tile(call, data, &form, &exp2, qt, &mut sc, &rows, out) };
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn query_tile(
    call: &Call<'_>,
    data: &Data,
    form: &Form<'_>,
    exp2: &Weights,
    qt: usize,
    sc: &mut Scratch,
    rows: &Range<usize>,
    out: &mut Output<'_>,
) {
    let r0 = qt * QUERY_TILE;
    let valid = (call.m() - r0).min(QUERY_TILE);
    let groups = valid.div_ceil(16);
    debug_assert!(call
        .tiles
        .runs(qt)
        .iter()
        .all(|r| r.end as usize <= data.key_tiles));
    // SAFETY: rows r0..r0 + valid exist; the buffers were sized for the call.
    unsafe {
        convert_q(call, r0, valid, sc);
        std::ptr::write_bytes(sc.o.ptr_mut(), 0, sc.o.bytes());
    }
    let mut st = RowState::new();
    let masked = form.masked();
    let mut tiles = call.tiles.runs(qt).iter().flat_map(|run| {
        (run.first as usize..run.end as usize).map(move |kt| (kt, run.partial && masked))
    });
    let mut cur = tiles.next();
    if let Some((kt, _)) = cur {
        // SAFETY: the tile state is live; kt < key_tiles (the table is clipped to n).
        unsafe { Work::new(data, None, Some((kt, 0))).finish(0, data, sc) };
    }
    let mut slot = 0;
    let mut prev: Option<(usize, bool, usize)> = None;
    while let Some((kt, partial)) = cur {
        let following = tiles.next();
        let work = Work::new(
            data,
            prev.map(|(k, _, s)| (k, s)),
            following.map(|(k, _)| (k, slot ^ 1)),
        );
        let j0 = kt * KEY_TILE;
        let plain = form.plain_tile(j0, partial);
        sc.alpha[slot] = [1.0; 32];
        let mut done = 0;
        for rg in 0..groups {
            let i0 = r0 + 16 * rg;
            for sb in 0..4 {
                // SAFETY: rows i0.. < m, keys of tile kt; the tile state is live and every
                // tile index lies below key_tiles.
                unsafe {
                    // Two steps of tile work per 16 keys: one between the halves, one after.
                    let at = |h: usize| (rg * 8 + 2 * sb + h) * work.steps / (8 * groups);
                    let mid = |sc: &mut Scratch| done = work.until(at(1), done, data, sc);
                    if plain {
                        softmax::<true>(form, exp2, sc, &mut st, slot, rg, i0, j0, sb, false, mid);
                    } else {
                        softmax::<false>(
                            form, exp2, sc, &mut st, slot, rg, i0, j0, sb, partial, mid,
                        );
                    }
                    done = work.until(at(2), done, data, sc);
                }
            }
        }
        // SAFETY: as above.
        unsafe { work.finish(done, data, sc) };
        if let Some((k, p, _)) = prev {
            poison(form, data, &mut sc.o, sc.dv_pad, k, p, r0, valid);
        }
        rescale(sc, slot, groups);
        prev = Some((kt, partial, slot));
        slot ^= 1;
        cur = following;
    }
    if let Some((k, p, s)) = prev {
        // SAFETY: as above.
        unsafe { Work::new(data, Some((k, s)), None).finish(0, data, sc) };
        poison(form, data, &mut sc.o, sc.dv_pad, k, p, r0, valid);
    }
    for rg in 0..groups {
        let i0 = r0 + 16 * rg;
        if i0 < rows.end {
            let count = (rows.end.min(r0 + valid) - i0).min(16);
            // SAFETY: Oᵀ of row group rg; output rows i0 − rows.start.. exist (check).
            unsafe {
                let ot = sc.o.ptr().cast::<f32>().add(rg * sc.dv_pad * 16);
                finalize(ot, call.v.cols, &st, rg, count, i0 - rows.start, out);
            }
        }
    }
}

/// Qᵀ of rows `r0..r0 + valid` rounded to bf16, in the B layout `[16 dim pairs][16 rows][2]`
/// per (32-dim chunk, row group); rows past `valid` are zero.
///
/// # Safety
/// `r0 + valid ≤ m`, `valid ≤ 32`; Q passed `problem::check`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn convert_q(call: &Call<'_>, r0: usize, valid: usize, sc: &mut Scratch) {
    let q = &call.q;
    let d = q.cols;
    if valid < QUERY_TILE {
        // SAFETY: the whole buffer.
        unsafe { std::ptr::write_bytes(sc.qt.ptr_mut(), 0, sc.qt.bytes()) };
    }
    // Lane p (dims 2p, 2p + 1 of the chunk) goes to tile row p.
    let pairs = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16),
    );
    for r in 0..valid {
        let at = (r0 + r) * q.row_stride;
        for c in 0..sc.qt.bytes() / (2 * TILE_BYTES) {
            let c0 = 32 * c;
            // SAFETY: columns c0.. of row r0 + r, masked to d.
            let (a, b) = unsafe {
                (
                    load(&q.data, at + c0, (d - c0).min(16)),
                    load(
                        &q.data,
                        at + (c0 + 16).min(d),
                        d.saturating_sub(c0 + 16).min(16),
                    ),
                )
            };
            let v = join(to_bf16(a), to_bf16(b));
            let tile = (2 * c + r / 16) * TILE_BYTES + (r % 16) * 4;
            // SAFETY: column r % 16 of tile (c, r / 16): rows 0..16 at stride 64.
            unsafe { _mm512_i32scatter_epi32::<4>(sc.qt.ptr_mut().add(tile).cast(), pairs, v) };
        }
    }
}

/// Applies the rescales of O recorded by the softmax of slot `slot` (rows whose maximum
/// moved), after the previous key tile's P·V and before this one's.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn rescale(sc: &mut Scratch, slot: usize, groups: usize) {
    let dv_pad = sc.dv_pad;
    for rg in 0..groups {
        // SAFETY: 16 of the 32 factors.
        let a = unsafe { _mm512_loadu_ps(sc.alpha[slot].as_ptr().add(16 * rg)) };
        if _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, _mm512_set1_ps(1.0)) == 0 {
            continue;
        }
        for c in 0..dv_pad {
            // SAFETY: vector (rg, c) of Oᵀ.
            unsafe {
                let o = sc.o.ptr_mut().cast::<f32>().add((rg * dv_pad + c) * 16);
                _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), a));
            }
        }
    }
}
