//! bf16 products: `S = Q·Kᵀ` and `O += P·V` on `tdpbf16ps` (f32 sums), the score form and the
//! online softmax in f32 on AVX-512.
//!
//! Per query tile (32 rows) and visited key tile (64 keys):
//! 1. S (AMX): 2 × 2 accumulators of 16 × 16 per half tile; Q and K enter as bf16 pairs
//!    `hi + lo` when their inputs have more than 8 significant bits (f32, f16), as three
//!    products `Qlo·Khi + Qhi·Khi + Qhi·Klo` into the same f32 accumulator: Q·Kᵀ with about 16
//!    significant bits per operand, which keeps the score error (the largest share of the total
//!    with plain bf16) near f32's. bf16 inputs have no `lo` part and take one product.
//! 2. softmax (AVX-512), per row: `t = x₂ − m` for the 64 keys, `P = 2^t` rounded to bf16, sums
//!    in f32. The running maximum `m` moves only when a score exceeds it by more than
//!    [`SLACK`] (so `P ≤ 2^SLACK`; bf16 and f32 have the range), which skips the
//!    horizontal maximum and the rescale of `O` on almost every tile after the first.
//! 3. P·V (AMX): `O` is loaded into the accumulators, `P·V` (V as `hi` and, when packed, `lo`)
//!    added, and stored back.

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{Data, Lines};
use super::score::{finalize_row, Form, RowState};
use super::simd::{hmax, join, load, nan_max, rebase, split_bf16, Exp2};
use super::tile::{self, Session, TILE_BYTES};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, CallError, Output};

/// How far (base 2) a score may exceed the row's maximum before the maximum moves.
const SLACK: f32 = 8.0;

/// One call's scratch: Q of the tile, S, P, O and the row sums.
struct Scratch {
    q_hi: Lines,
    q_lo: Lines,
    /// Two slots of `[32][64]` f32.
    s: Lines,
    /// Two slots of `[32][64]` bf16.
    p: Lines,
    /// `[32][dv_pad]` f32.
    o: Lines,
    /// `[32][16]` f32 partial row sums.
    l: Lines,
    /// Pending rescales of O rows (1 when none).
    alpha: [f32; 32],
    /// Bytes between rows of `q_hi`/`q_lo`.
    q_stride: usize,
    /// f32 between rows of `o`.
    dv_pad: usize,
}

const S_STRIDE: usize = KEY_TILE * 4;
const P_STRIDE: usize = KEY_TILE * 2;
/// Bytes of one S and one P buffer (two of each alternate between key tiles).
const S_SLOT: usize = QUERY_TILE * S_STRIDE;
const P_SLOT: usize = QUERY_TILE * P_STRIDE;

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
    let q_stride = data.d_chunks * 64;
    let dv_pad = data.dv_groups * 16;
    let mut sc = Scratch {
        q_hi: Lines::zeroed(QUERY_TILE * q_stride)?,
        q_lo: Lines::zeroed(QUERY_TILE * q_stride)?,
        s: Lines::zeroed(2 * S_SLOT)?,
        p: Lines::zeroed(2 * P_SLOT)?,
        o: Lines::zeroed(QUERY_TILE * dv_pad * 4)?,
        l: Lines::zeroed(QUERY_TILE * 64)?,
        alpha: [1.0; 32],
        q_stride,
        dv_pad,
    };
    let exp2 = Exp2::weights(1.0);
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
    exp2: &Exp2,
    qt: usize,
    sc: &mut Scratch,
    rows: &Range<usize>,
    out: &mut Output<'_>,
) {
    let r0 = qt * QUERY_TILE;
    let valid = (call.m() - r0).min(QUERY_TILE);
    debug_assert!(call.tiles.runs(qt).iter().all(|r| r.end as usize <= data.key_tiles));
    // SAFETY: rows r0..r0 + valid exist; the buffers hold 32 rows.
    let q_lo = unsafe { convert_q(call, r0, valid, sc) };
    // SAFETY: both buffers are at least as long as written.
    unsafe {
        std::ptr::write_bytes(sc.o.ptr_mut(), 0, sc.o.bytes());
        std::ptr::write_bytes(sc.l.ptr_mut(), 0, sc.l.bytes());
    }
    let mut st = RowState::new();
    let masked = form.masked();
    let mut tiles = call.tiles.runs(qt).iter().flat_map(|run| {
        (run.first as usize..run.end as usize).map(move |kt| (kt, run.partial && masked))
    });
    let mut cur = tiles.next();
    let k_lo = data.k_lo.is_some();
    if let Some((kt, _)) = cur {
        let fill = Work::new(data, None, Some((kt, 0)), q_lo, k_lo);
        // SAFETY: the tile state is live; kt < key_tiles (the table is clipped to n).
        unsafe { fill.finish(0, data, sc) };
    }
    // Pipeline: while the vector units run the softmax of tile `kt`, the tile unit runs, step
    // by step between rows, P·V of the previous tile and S of the next (fine interleaving keeps
    // both busy; a long run of either stalls the other).
    let mut slot = 0;
    let mut prev: Option<(usize, bool, usize)> = None;
    while let Some((kt, partial)) = cur {
        let following = tiles.next();
        let work = Work::new(
            data,
            prev.map(|(k, _, s)| (k, s)),
            following.map(|(k, _)| (k, slot ^ 1)),
            q_lo,
            k_lo,
        );
        let j0 = kt * KEY_TILE;
        let plain = form.plain && !partial && j0 + KEY_TILE <= form.n;
        let mut done = 0;
        for r in 0..valid {
            // SAFETY: r < valid ≤ 32 rows of the tile; the tile state is live and every tile
            // index lies below key_tiles.
            unsafe {
                if plain {
                    softmax_row::<true>(form, exp2, sc, slot, &mut st.max[r], r, r0 + r, j0, false);
                } else {
                    softmax_row::<false>(form, exp2, sc, slot, &mut st.max[r], r, r0 + r, j0, partial);
                }
                done = work.until((r + 1) * work.steps / valid, done, data, sc);
            }
        }
        // SAFETY: as above.
        unsafe { work.finish(done, data, sc) };
        if let Some((k, p, _)) = prev {
            poison(form, data, sc, k, p, r0, valid);
        }
        rescale(sc, valid);
        prev = Some((kt, partial, slot));
        slot ^= 1;
        cur = following;
    }
    if let Some((k, p, s)) = prev {
        let drain = Work::new(data, Some((k, s)), None, q_lo, k_lo);
        // SAFETY: as above.
        unsafe { drain.finish(0, data, sc) };
        poison(form, data, sc, k, p, r0, valid);
    }
    for r in 0..valid.min(rows.end - r0) {
        // SAFETY: row r of O and l; output row r0 + r − rows.start exists (check).
        unsafe {
            finalize_row(
                sc.o.ptr().cast::<f32>().add(r * sc.dv_pad),
                sc.l.ptr().cast::<f32>().add(r * 16),
                st.max[r],
                call.v.cols,
                r0 + r - rows.start,
                out,
            )
        };
    }
}

/// Q rows `r0..r0 + valid` as bf16 `hi` and `lo`; whether any `lo` is nonzero.
///
/// # Safety
/// `r0 + valid ≤ m`, `valid ≤ 32`; Q passed `problem::check`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn convert_q(call: &Call<'_>, r0: usize, valid: usize, sc: &mut Scratch) -> bool {
    let q = &call.q;
    let d = q.cols;
    let mut any = _mm512_setzero_si512();
    for r in 0..valid {
        let at = (r0 + r) * q.row_stride;
        for c in 0..sc.q_stride / 64 {
            let c0 = 32 * c;
            // SAFETY: columns c0.. of row r0 + r, masked to d.
            let (a, b) = unsafe {
                (
                    load(&q.data, at + c0, (d - c0).min(16)),
                    load(&q.data, at + (c0 + 16).min(d), d.saturating_sub(c0 + 16).min(16)),
                )
            };
            let (ah, al) = split_bf16(a);
            let (bh, bl) = split_bf16(b);
            let lo = join(al, bl);
            any = _mm512_or_si512(any, lo);
            let dst = r * sc.q_stride + c * 64;
            // SAFETY: row r < 32 of the Q buffers, 64 bytes at chunk c.
            unsafe {
                _mm512_store_si512(sc.q_hi.ptr_mut().add(dst).cast(), join(ah, bh));
                _mm512_store_si512(sc.q_lo.ptr_mut().add(dst).cast(), lo);
            }
        }
    }
    _mm512_test_epi32_mask(any, any) != 0
}

/// The tile-unit work issued between the softmax rows of one key tile: P·V of the previous
/// tile (`prev`: key tile, P slot), then S of the next (`next`: key tile, S slot), as a linear
/// program of steps of 2–4 products. Tiles 0–3 accumulate (2 × 2 blocks of 16 × 16), 4–5 hold
/// the A rows (Q or P), 6–7 the B columns (K or V); each block runs whole before the next
/// reuses the tiles.
struct Work {
    prev: Option<(usize, usize)>,
    next: Option<(usize, usize)>,
    q_lo: bool,
    k_lo: bool,
    /// Products per S chunk: `Qlo·Khi`, `Qhi·Khi`, `Qhi·Klo` as present.
    terms: usize,
    pv_steps: usize,
    /// All steps.
    steps: usize,
}

impl Work {
    fn new(
        data: &Data,
        prev: Option<(usize, usize)>,
        next: Option<(usize, usize)>,
        q_lo: bool,
        k_lo: bool,
    ) -> Work {
        let terms = 1 + q_lo as usize + k_lo as usize;
        let pv_steps = if prev.is_some() { data.dv_groups.div_ceil(2) * 2 } else { 0 };
        let s_steps = if next.is_some() { 2 * data.d_chunks * terms } else { 0 };
        Work {
            prev,
            next,
            q_lo,
            k_lo,
            terms,
            pv_steps,
            steps: pv_steps + s_steps,
        }
    }

    /// Runs steps `done..want`; returns `want`.
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

    /// Step `k` of `O += P·V`: column groups `g, g + 1` (loaded from O at the first key chunk,
    /// stored after the second), key chunk `h` of 32 keys.
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn pv_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let groups = data.dv_groups;
        let os = sc.dv_pad * 4;
        let (g, h) = (k / 2 * 2, k % 2);
        let two = g + 1 < groups;
        // SAFETY: O tiles (rows 0..32, groups g, g + 1 < groups), P rows 0..32 of key chunk
        // h in slot `slot`, and V tiles (2kt + h, g) lie inside their buffers.
        unsafe {
            let o0 = sc.o.ptr_mut().add(g * 64);
            if h == 0 {
                tile::load::<0>(o0, os);
                tile::load::<1>(o0.add(16 * os), os);
                if two {
                    tile::load::<2>(o0.add(64), os);
                    tile::load::<3>(o0.add(64 + 16 * os), os);
                }
            }
            let p = sc.p.ptr().add(slot * P_SLOT + h * 64);
            tile::load::<4>(p, P_STRIDE);
            tile::load::<5>(p.add(16 * P_STRIDE), P_STRIDE);
            let v = ((2 * kt + h) * groups + g) * TILE_BYTES;
            for part in [Some(&data.v_hi), data.v_lo.as_ref()].into_iter().flatten() {
                tile::load::<6>(part.ptr().add(v), 64);
                tile::dp_bf16::<0, 4, 6>();
                tile::dp_bf16::<1, 5, 6>();
                if two {
                    tile::load::<7>(part.ptr().add(v + TILE_BYTES), 64);
                    tile::dp_bf16::<2, 4, 7>();
                    tile::dp_bf16::<3, 5, 7>();
                }
            }
            if h == 1 {
                tile::store::<0>(o0, os);
                tile::store::<1>(o0.add(16 * os), os);
                if two {
                    tile::store::<2>(o0.add(64), os);
                    tile::store::<3>(o0.add(64 + 16 * os), os);
                }
            }
        }
    }

    /// Step `k` of `S = Q·Kᵀ`: half `h` of the key tile (key groups 2h, 2h + 1; zeroed at its
    /// first step, stored at its last), head-dimension chunk `c`, one product term.
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let ch = data.d_chunks;
        let qs = sc.q_stride;
        let per_half = ch * self.terms;
        let (half, rest) = (k / per_half, k % per_half);
        let (c, term) = (rest / self.terms, rest % self.terms);
        // 0: Qlo·Khi, 1: Qhi·Khi, 2: Qhi·Klo (A and B carried over between terms).
        let kind = term + !self.q_lo as usize;
        // SAFETY: K tiles (4kt + 2half + {0, 1}, c), Q rows 0..32 of chunk c and S rows 0..32
        // of key groups 2half, 2half + 1 in slot `slot` lie inside their buffers.
        unsafe {
            if rest == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
                tile::zero::<2>();
                tile::zero::<3>();
            }
            let k0 = ((4 * kt + 2 * half) * ch + c) * TILE_BYTES;
            let k1 = k0 + ch * TILE_BYTES;
            let (q0, q1) = (c * 64, c * 64 + 16 * qs);
            match kind {
                0 => {
                    tile::load::<4>(sc.q_lo.ptr().add(q0), qs);
                    tile::load::<5>(sc.q_lo.ptr().add(q1), qs);
                    tile::load::<6>(data.k_hi.ptr().add(k0), 64);
                    tile::load::<7>(data.k_hi.ptr().add(k1), 64);
                }
                1 => {
                    tile::load::<4>(sc.q_hi.ptr().add(q0), qs);
                    tile::load::<5>(sc.q_hi.ptr().add(q1), qs);
                    if !self.q_lo {
                        tile::load::<6>(data.k_hi.ptr().add(k0), 64);
                        tile::load::<7>(data.k_hi.ptr().add(k1), 64);
                    }
                }
                _ => {
                    if let (true, Some(k_lo)) = (self.k_lo, &data.k_lo) {
                        tile::load::<6>(k_lo.ptr().add(k0), 64);
                        tile::load::<7>(k_lo.ptr().add(k1), 64);
                    }
                }
            }
            tile::dp_bf16::<0, 4, 6>();
            tile::dp_bf16::<1, 5, 6>();
            tile::dp_bf16::<2, 4, 7>();
            tile::dp_bf16::<3, 5, 7>();
            if rest + 1 == per_half {
                let s = sc.s.ptr_mut().add(slot * S_SLOT + half * 2 * 64);
                tile::store::<0>(s, S_STRIDE);
                tile::store::<1>(s.add(16 * S_STRIDE), S_STRIDE);
                tile::store::<2>(s.add(64), S_STRIDE);
                tile::store::<3>(s.add(64 + 16 * S_STRIDE), S_STRIDE);
            }
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
                // SAFETY: r < 32, c < dv ≤ dv_pad: inside O.
                unsafe { *sc.o.ptr_mut().cast::<f32>().add(r * sc.dv_pad + c) += v };
            }
        }
    }
}

/// Applies the pending rescales of O (rows whose maximum moved), before their next P·V.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn rescale(sc: &mut Scratch, valid: usize) {
    for r in 0..valid {
        let a = sc.alpha[r];
        if a != 1.0 {
            sc.alpha[r] = 1.0;
            let a = _mm512_set1_ps(a);
            for c in (0..sc.dv_pad).step_by(16) {
                // SAFETY: row r of O, 16 f32 at column c < dv_pad.
                unsafe {
                    let o = sc.o.ptr_mut().cast::<f32>().add(r * sc.dv_pad + c);
                    _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), a));
                }
            }
        }
    }
}

/// The softmax of row `r` of S (query row `i`, keys from `j0`): P in bf16, the row sums, and
/// `O` rescaled when the maximum moves.
///
/// # Safety
/// `r < 32`; `i < m`; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn softmax_row<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Exp2,
    sc: &mut Scratch,
    slot: usize,
    max: &mut f32,
    r: usize,
    i: usize,
    j0: usize,
    partial: bool,
) {
    let old = *max;
    let mu = if old == f32::NEG_INFINITY { 0.0 } else { old };
    let muv = _mm512_set1_ps(mu);
    // SAFETY: row r of S (64 f32), P (64 bf16), l (16 f32).
    let (srow, prow, lrow) = unsafe {
        (
            sc.s.ptr().add(slot * S_SLOT).cast::<f32>().add(r * KEY_TILE),
            sc.p.ptr_mut().add(slot * P_SLOT + r * P_STRIDE),
            sc.l.ptr_mut().cast::<f32>().add(r * 16),
        )
    };
    let mut t = [_mm512_setzero_ps(); 4];
    for (q, t) in t.iter_mut().enumerate() {
        // SAFETY: 16 f32 at 16q of the row.
        let s = unsafe { _mm512_load_ps(srow.add(16 * q)) };
        *t = if PLAIN {
            let c = _mm512_set1_ps(form.scale * std::f32::consts::LOG2_E);
            _mm512_fmsub_ps(s, c, muv)
        } else {
            let x = _mm512_mul_ps(s, _mm512_set1_ps(form.scale));
            // SAFETY: i < m, by the caller.
            _mm512_sub_ps(unsafe { form.finish(x, i, j0 + 16 * q, partial) }, muv)
        };
    }
    let mx = _mm512_max_ps(_mm512_max_ps(t[0], t[1]), _mm512_max_ps(t[2], t[3]));
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, _mm512_set1_ps(SLACK));
    if old == f32::NEG_INFINITY || over != 0 {
        let new = nan_max(old, hmax(mx) + mu);
        if new != old {
            let mu2 = if new == f32::NEG_INFINITY { 0.0 } else { new };
            let shift = _mm512_set1_ps(mu - mu2);
            for t in t.iter_mut() {
                *t = _mm512_add_ps(*t, shift);
            }
            if old != f32::NEG_INFINITY {
                // O is rescaled after the previous tile's P·V (`rescale`); l now.
                let a = rebase(old, new);
                sc.alpha[r] = a;
                // SAFETY: the l row as above.
                unsafe { _mm512_storeu_ps(lrow, _mm512_mul_ps(_mm512_loadu_ps(lrow), _mm512_set1_ps(a))) };
            }
            *max = new;
        }
    }
    let mut p = t;
    for p in p.iter_mut() {
        *p = exp2.eval(*p);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3]));
    // SAFETY: l row (16 f32) and P row (128 bytes), 64-byte aligned.
    unsafe {
        _mm512_storeu_ps(lrow, _mm512_add_ps(_mm512_loadu_ps(lrow), sum));
        let lo: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(p[1], p[0]));
        let hi: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(p[3], p[2]));
        _mm512_store_si512(prow.cast(), lo);
        _mm512_store_si512(prow.add(64).cast(), hi);
    }
}
