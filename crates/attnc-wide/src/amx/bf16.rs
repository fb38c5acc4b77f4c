//! bf16 products: `Sᵀ = K·Qᵀ` and `Oᵀ += Vᵀ·Pᵀ` on `tdpbf16ps` (f32 sums), the score form and
//! the online softmax in f32 on AVX-512, 16 query rows per vector.
//!
//! Precision: Q and P are rounded to bf16; K and V enter as bf16 pairs `hi + lo` (16
//! significant bits) when their inputs have more than bf16's 8 (f32, f16): a second product
//! with the same resident Qᵀ or Pᵀ tiles, into the same accumulators. With every operand
//! rounded the error on standard-normal data at d = 64 is about 3.5e-3 (the bf16 rounding of
//! the scores dominates); this keeps it near 2.4e-3 at the cost of tile products, which have
//! room to spare.
//!
//! Per query tile (32 rows, two groups of 16 lanes) and visited key tile (64 keys):
//! 1. Sᵀ (AMX): Qᵀ resident in 4 B tiles (two 32-dim chunks × two row groups), K streaming
//!    through 2 A tiles, 2 accumulators of 16 keys × 16 rows.
//! 2. softmax (AVX-512), per row group and 16 keys: `t = x₂ − m`, `P = 2^t` rounded to bf16 and
//!    interleaved in pairs of keys (the B layout of `tdpbf16ps`), sums in f32. The running
//!    maximum `m` moves only when a score exceeds it by more than [`SLACK`] (so `P ≤ 2^SLACK`;
//!    bf16 and f32 have the range), which makes rescaling rare.
//! 3. Oᵀ += Vᵀ·Pᵀ (AMX): Pᵀ resident in 4 B tiles, Vᵀ streaming, Oᵀ loaded and stored per
//!    group of 16 value columns.
//!
//! The tile work of step 1 (next key tile) and step 3 (previous key tile) is issued in small
//! steps between the vectors of step 2, so the tile unit and the vector units overlap.

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{Data, Lines};
use super::score::{finalize, Form, RowState};
use super::simd::{finite_or_zero, from_bf16, join, load, nan_max_v, to_bf16, Exp2, Weights};
use super::tile::{self, Session, TILE_BYTES};
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
}

/// Rows `rows` of `call` on packed K/V.
///
/// # Safety
/// AMX-BF16 and AVX-512 F/BW/DQ/VL/BF16 are usable; `problem::check(call, rows, out)` passed;
/// `data` was packed by [`super::pack::pack`] for bf16 from a call with the same K and V shape;
/// the tile table uses [`QUERY_TILE`] × [`KEY_TILE`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(crate) unsafe fn run(
    call: &Call<'_>,
    data: &Data,
    rows: Range<usize>,
    out: &mut Output<'_>,
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
    };
    let exp2 = Weights::weights(1.0);
    // SAFETY: AMX is usable by the caller's contract.
    let _tiles = unsafe { Session::start() };
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
                    if plain {
                        softmax::<true>(form, exp2, sc, &mut st, slot, rg, i0, j0, sb, false);
                    } else {
                        softmax::<false>(form, exp2, sc, &mut st, slot, rg, i0, j0, sb, partial);
                    }
                    let step = (rg * 4 + sb + 1) * work.steps / (4 * groups);
                    done = work.until(step, done, data, sc);
                }
            }
        }
        // SAFETY: as above.
        unsafe { work.finish(done, data, sc) };
        if let Some((k, p, _)) = prev {
            poison(form, data, sc, k, p, r0, valid);
        }
        rescale(sc, slot, groups);
        prev = Some((kt, partial, slot));
        slot ^= 1;
        cur = following;
    }
    if let Some((k, p, s)) = prev {
        // SAFETY: as above.
        unsafe { Work::new(data, Some((k, s)), None).finish(0, data, sc) };
        poison(form, data, sc, k, p, r0, valid);
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

/// The tile-unit work issued between the softmax vectors of one key tile: `Oᵀ += Vᵀ·Pᵀ` of the
/// previous tile (`prev`: key tile, P slot), then `Sᵀ` of the next (`next`: key tile, S slot),
/// as a linear program of steps. Tiles 0–1 accumulate (row groups 0, 1), 2–3 stream the A
/// operand (K or Vᵀ), 4–7 hold the resident B operand (Qᵀ or Pᵀ).
struct Work {
    prev: Option<(usize, usize)>,
    next: Option<(usize, usize)>,
    pv_steps: usize,
    /// All steps.
    steps: usize,
}

impl Work {
    fn new(data: &Data, prev: Option<(usize, usize)>, next: Option<(usize, usize)>) -> Work {
        let pv_steps = if prev.is_some() { data.dv_groups } else { 0 };
        let s_steps = if next.is_some() {
            data.d_chunks.div_ceil(2) * 4
        } else {
            0
        };
        Work {
            prev,
            next,
            pv_steps,
            steps: pv_steps + s_steps,
        }
    }

    /// Runs steps `done..want`; returns how many are done.
    ///
    /// # Safety
    /// A tile session is live; the key tiles lie below `data.key_tiles`; `sc` was sized for
    /// `data`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn until(&self, want: usize, done: usize, data: &Data, sc: &mut Scratch) -> usize {
        for k in done..want {
            // SAFETY: the caller's contract.
            unsafe {
                if k < self.pv_steps {
                    self.pv_step(k, data, sc);
                } else {
                    self.s_step(k - self.pv_steps, data, sc);
                }
            }
        }
        want.max(done)
    }

    /// Runs the remaining steps.
    ///
    /// # Safety
    /// As [`Work::until`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn finish(&self, done: usize, data: &Data, sc: &mut Scratch) {
        // SAFETY: the caller's contract.
        unsafe { self.until(self.steps, done, data, sc) };
    }

    /// Value-column group `g` of `Oᵀ += Vᵀ·Pᵀ` (Pᵀ loaded at the first group).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn pv_step(&self, g: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let groups = data.dv_groups;
        // SAFETY: Pᵀ tiles of the slot, Oᵀ tiles (g, rg) and Vᵀ tiles (2kt + h, g) lie inside
        // their buffers.
        unsafe {
            if g == 0 {
                let p = sc.p.ptr().add(slot * P_SLOT);
                tile::load::<4>(p, 64);
                tile::load::<5>(p.add(TILE_BYTES), 64);
                tile::load::<6>(p.add(2 * TILE_BYTES), 64);
                tile::load::<7>(p.add(3 * TILE_BYTES), 64);
            }
            let o0 = sc.o.ptr_mut().add(g * TILE_BYTES);
            let o1 = o0.add(sc.dv_pad * 64);
            tile::load::<0>(o0, 64);
            tile::load::<1>(o1, 64);
            let v0 = (2 * kt * groups + g) * TILE_BYTES;
            let v1 = v0 + groups * TILE_BYTES;
            for part in [Some(&data.v_hi), data.v_lo.as_ref()].into_iter().flatten() {
                tile::load::<2>(part.ptr().add(v0), 64);
                tile::dp_bf16::<0, 2, 4>();
                tile::dp_bf16::<1, 2, 5>();
                tile::load::<3>(part.ptr().add(v1), 64);
                tile::dp_bf16::<0, 3, 6>();
                tile::dp_bf16::<1, 3, 7>();
            }
            tile::store::<0>(o0, 64);
            tile::store::<1>(o1, 64);
        }
    }

    /// Step `k` of `Sᵀ = K·Qᵀ`: dimension chunks `2p, 2p + 1` (Qᵀ loaded at the pair's first
    /// step) for key group `g`; the accumulators start at 0 for the first pair and continue
    /// from the stored partial sums after it (heads wider than 64).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let ch = data.d_chunks;
        let (pair, g) = (k / 4, k % 4);
        let c0 = 2 * pair;
        let two = c0 + 1 < ch;
        // SAFETY: Qᵀ tiles (c0, c0 + 1), K tiles (4kt + g, c0..), Sᵀ tiles of the slot lie
        // inside their buffers.
        unsafe {
            if g == 0 {
                let q = sc.qt.ptr().add(2 * c0 * TILE_BYTES);
                tile::load::<4>(q, 64);
                tile::load::<5>(q.add(TILE_BYTES), 64);
                if two {
                    tile::load::<6>(q.add(2 * TILE_BYTES), 64);
                    tile::load::<7>(q.add(3 * TILE_BYTES), 64);
                }
            }
            let s0 = sc.s.ptr_mut().add(slot * S_SLOT + g * TILE_BYTES);
            let s1 = s0.add(KEY_TILE * 64);
            if pair == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(s0, 64);
                tile::load::<1>(s1, 64);
            }
            let k0 = ((4 * kt + g) * ch + c0) * TILE_BYTES;
            for part in [Some(&data.k_hi), data.k_lo.as_ref()].into_iter().flatten() {
                tile::load::<2>(part.ptr().add(k0), 64);
                tile::dp_bf16::<0, 2, 4>();
                tile::dp_bf16::<1, 2, 5>();
                if two {
                    tile::load::<3>(part.ptr().add(k0 + TILE_BYTES), 64);
                    tile::dp_bf16::<0, 3, 6>();
                    tile::dp_bf16::<1, 3, 7>();
                }
            }
            tile::store::<0>(s0, 64);
            tile::store::<1>(s1, 64);
        }
    }
}

/// Adds V's non-finite values of key tile `kt` to the rows that keep their key (after that
/// tile's P·V).
fn poison(
    form: &Form<'_>,
    data: &Data,
    sc: &mut Scratch,
    kt: usize,
    partial: bool,
    r0: usize,
    valid: usize,
) {
    for &(j, c, v) in data.bad_v.of_tile(kt) {
        for r in 0..valid {
            if form.keeps(r0 + r, j, partial) {
                let at = ((r / 16) * sc.dv_pad + c) * 16 + r % 16;
                // SAFETY: row group r / 16, column c < dv ≤ dv_pad, lane r % 16: inside Oᵀ.
                unsafe { *sc.o.ptr_mut().cast::<f32>().add(at) += v };
            }
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

/// `t = x₂ − μ` of keys `16sb..16sb + 16` of row group `rg` (rows `i0..`), from the Sᵀ slot.
///
/// # Safety
/// `i0 < m`; the Sᵀ slot holds this tile's scores; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn scores<const PLAIN: bool>(
    form: &Form<'_>,
    sc: &Scratch,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
    mu: __m512,
) -> [__m512; 16] {
    // SAFETY: keys 16sb.. of row group rg in the slot.
    let src = unsafe {
        sc.s.ptr()
            .add(slot * S_SLOT + (rg * KEY_TILE + sb * 16) * 64)
    }
    .cast::<f32>();
    let c = _mm512_set1_ps(form.scale * std::f32::consts::LOG2_E);
    let scale = _mm512_set1_ps(form.scale);
    std::array::from_fn(|e| {
        // SAFETY: vector (rg, 16sb + e) of the slot; i0 < m by the caller.
        unsafe {
            let s = _mm512_load_ps(src.add(16 * e));
            if PLAIN {
                _mm512_fmsub_ps(s, c, mu)
            } else {
                let x = form.finish(_mm512_mul_ps(s, scale), i0, j0 + 16 * sb + e, partial);
                _mm512_sub_ps(x, mu)
            }
        }
    })
}

/// `2^t` of [`scores`], without keeping `t`.
///
/// # Safety
/// As [`scores`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn exponents<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Weights,
    sc: &Scratch,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
    mu: __m512,
) -> [__m512; 16] {
    // SAFETY: keys 16sb.. of row group rg in the slot.
    let src = unsafe {
        sc.s.ptr()
            .add(slot * S_SLOT + (rg * KEY_TILE + sb * 16) * 64)
    }
    .cast::<f32>();
    let c = _mm512_set1_ps(form.scale * std::f32::consts::LOG2_E);
    let scale = _mm512_set1_ps(form.scale);
    std::array::from_fn(|e| {
        // SAFETY: as in `scores`.
        let t = unsafe {
            let s = _mm512_load_ps(src.add(16 * e));
            if PLAIN {
                _mm512_fmsub_ps(s, c, mu)
            } else {
                let x = form.finish(_mm512_mul_ps(s, scale), i0, j0 + 16 * sb + e, partial);
                _mm512_sub_ps(x, mu)
            }
        };
        exp2.eval(t)
    })
}

/// The lane-wise sum of 16 vectors (a fixed tree).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn sum16(p: &[__m512; 16]) -> __m512 {
    let s8: [__m512; 8] = std::array::from_fn(|e| _mm512_add_ps(p[e], p[e + 8]));
    let s4: [__m512; 4] = std::array::from_fn(|e| _mm512_add_ps(s8[e], s8[e + 4]));
    _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]))
}

/// Moves the maxima of the lanes in `over` to `max(m, mx + μ)` (to the block maximum in
/// `first` lanes, which had none), rescales `l` and the pending O factors. Returns the new
/// `(m, l)`, the factor `α` per row and the shift that moves `t = x₂ − μ` to the new
/// reference.
///
/// # Safety
/// `pending` points at the row group's 16 pending factors.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn rebase(
    m: __m512,
    l: __m512,
    mu: __m512,
    mx: __m512,
    over: __mmask16,
    first: __mmask16,
    pending: *mut f32,
) -> (__m512, __m512, __m512, __m512) {
    let new = _mm512_mask_mov_ps(m, over, nan_max_v(m, _mm512_add_ps(mx, mu)));
    let shift = _mm512_sub_ps(mu, finite_or_zero(new));
    // α = 2^(m − m_new) where the maximum moved (0 from −∞), 1 elsewhere.
    let a = Exp2::accurate().eval(_mm512_sub_ps(m, new));
    let a = _mm512_mask_mov_ps(_mm512_set1_ps(1.0), over & !first, a);
    let a = _mm512_mask_mov_ps(a, first, _mm512_setzero_ps());
    // SAFETY: by the caller.
    unsafe { _mm512_storeu_ps(pending, _mm512_mul_ps(_mm512_loadu_ps(pending), a)) };
    (new, _mm512_mul_ps(l, a), a, shift)
}

/// Multiplies the weights of sub-blocks `0..sb` of the slot's key tile (row group `rg`, 16
/// rows in lanes) by `alpha` per row, after their row maximum moved mid-tile (a rare path:
/// one more bf16 rounding for those weights).
///
/// # Safety
/// `slot < 2`, `rg < 2`, `sb ≤ 4`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn rescale_written(sc: &mut Scratch, slot: usize, rg: usize, sb: usize, alpha: __m512) {
    // A Pᵀ row holds (key 2k, key 2k + 1) for rows 0..16: word w belongs to row w / 2.
    let lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    let hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    let (a_lo, a_hi) = (
        _mm512_permutexvar_ps(lo, alpha),
        _mm512_permutexvar_ps(hi, alpha),
    );
    for s in 0..sb {
        for e in 0..8 {
            let at = slot * P_SLOT + (2 * (s / 2) + rg) * TILE_BYTES + ((s % 2) * 8 + e) * 64;
            // SAFETY: row (s % 2)·8 + e of tile (s / 2, rg) in the slot; the vector types are
            // plain bytes of the same size.
            unsafe {
                let row = sc.p.ptr_mut().add(at).cast::<__m512i>();
                let v = _mm512_load_si512(row.cast());
                let f_lo = _mm512_mul_ps(from_bf16(_mm512_castsi512_si256(v)), a_lo);
                let f_hi = _mm512_mul_ps(from_bf16(_mm512_extracti64x4_epi64::<1>(v)), a_hi);
                let back: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(f_hi, f_lo));
                _mm512_store_si512(row.cast(), back);
            }
        }
    }
}

/// The softmax of keys `16sb..16sb + 16` of key tile `j0` for row group `rg` (rows `i0..`):
/// weights into the Pᵀ slot, sums and maxima into `st`, O's rescale into `sc.alpha[slot]`.
///
/// # Safety
/// `i0 < m`; the Sᵀ slot holds this tile's scores; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn softmax<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Weights,
    sc: &mut Scratch,
    st: &mut RowState,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = st.max_v(rg);
    let mut l = st.sum_v(rg);
    let mu = finite_or_zero(m);
    // SAFETY (both calls): the caller's contract.
    let mut p = unsafe { exponents::<PLAIN>(form, exp2, sc, slot, rg, i0, j0, sb, partial, mu) };
    let mut sum = sum16(&p);
    // Every weight is at most the sum, so a sum within 2^SLACK needs no new maximum; a row
    // without one yet (m = −∞) takes it from its first kept score. Otherwise the scores are
    // formed again (a rare path) for their maximum.
    let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m, ninf);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sum, _mm512_set1_ps(SLACK.exp2()));
    let some = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sum, _mm512_setzero_ps());
    if big | (none & some) != 0 {
        let t = unsafe { scores::<PLAIN>(form, sc, slot, rg, i0, j0, sb, partial, mu) };
        let m8: [__m512; 8] = std::array::from_fn(|e| _mm512_max_ps(t[e], t[e + 8]));
        let m4: [__m512; 4] = std::array::from_fn(|e| _mm512_max_ps(m8[e], m8[e + 4]));
        let mx = _mm512_max_ps(_mm512_max_ps(m4[0], m4[2]), _mm512_max_ps(m4[1], m4[3]));
        let first = none & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, ninf);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, _mm512_set1_ps(SLACK)) | first;
        if over != 0 {
            // SAFETY: 16 of the 32 pending factors.
            let pending = unsafe { sc.alpha[slot].as_mut_ptr().add(16 * rg) };
            let (new, alpha, shift);
            (new, l, alpha, shift) = unsafe { rebase(m, l, mu, mx, over, first, pending) };
            m = new;
            // Weights of this key tile already written are relative to the old maximum.
            // SAFETY: sub-blocks 0..sb of the slot's Pᵀ tiles for row group rg.
            unsafe { rescale_written(sc, slot, rg, sb, alpha) };
            p = std::array::from_fn(|e| exp2.eval(_mm512_add_ps(t[e], shift)));
            sum = sum16(&p);
        }
    }
    st.set(rg, m, _mm512_add_ps(l, sum));
    // Pairs of keys interleaved per row: the B layout [keys/2][rows][2].
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let h = sb / 2;
    // SAFETY: rows 8(sb % 2).. of tile (h, rg) of the slot.
    let dst = unsafe {
        sc.p.ptr_mut()
            .add(slot * P_SLOT + (2 * h + rg) * TILE_BYTES + (sb % 2) * 8 * 64)
    };
    for e in 0..8 {
        // SAFETY: __m512bh and __m512i are the same 64 plain bytes; row 8(sb % 2) + e of
        // tile (h, rg) of the slot.
        unsafe {
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(p[2 * e + 1], p[2 * e]));
            _mm512_store_si512(dst.add(e * 64).cast(), _mm512_permutexvar_epi16(idx, v));
        }
    }
}
