//! int8 products: `Sᵀ = K·Qᵀ` on `tdpbssd`, `Oᵀ = Vᵀ·Pᵀ` on `tdpbsud` (signed V, unsigned P;
//! i32 sums), the score form, softmax and quantization of P in f32 on AVX-512, 16 query rows
//! per vector.
//!
//! Per query tile (32 rows, two groups of 16 lanes) and visited key tile (64 keys):
//! 1. Sᵀ (AMX): Q in two signed digits per row (`q ≈ s_q·(hi + lo/254)`, `s_q = max|q|/127`),
//!    K smoothed and in two digits per key (see [`super::pack`]); two i32 accumulators per
//!    16 × 16 block: `Khi·Qhiᵀ` and `Klo·Qhiᵀ + Khi·Qloᵀ` (the `lo·lo` term is below the
//!    rounding). The scaled score is `x = s_q·scale·s_k·(hh + cross/254) + scale·q·μ` — the
//!    smoothing's `q·μ` added back, so it is exact under any mask, bias or softcap.
//! 2. softmax (AVX-512), per row group: pass 1 forms `x` for the 64 keys (stored over S) and
//!    the tile maximum `b` of each row; pass 2 quantizes `P = round(255·2^(x₂ − b))` to u8 —
//!    each row's tile maximum maps to 255 — in the B layout `[keys/4][rows][4]`, and sums
//!    `255·2^(x₂ − b)` in f32 (NaN-propagating).
//! 3. Oᵀ (AMX): `Vᵀ (i8 digits) · Pᵀ (u8)` into fresh i32 tiles, then on AVX-512
//!    `Oᵀ ← α·Oᵀ + β·(s_v·PVhi + s_v/254·PVlo)` with `α = 2^(m_old − m)`, `β = 2^(b − m)/255`.
//!
//! The tile work of step 1 (next key tile) and step 3 (previous key tile) is issued in small
//! steps between the vectors of step 2; the combination of step 3 runs after its products.
//!
//! On a CPU without AMX, steps 1 and 3 run on AVX-512 VNNI instead ([`vectors`]): step 1 over
//! 16-bit words of Q and K ([`convert_q_words`], the packed words and their scales), step 3
//! over the same P and V digits as the tile unit, into the same buffers.

use std::arch::x86_64::*;
use std::ops::Range;

mod softmax;
mod tiles;
mod vectors;

use softmax::{scores, weights, SUB};
use tiles::Work;

use super::pack::{digits, Data, Lines};
use super::score::{finalize, poison, Form, RowState};
use super::simd::{finite_or_zero, first, hsum, load, nan_max_v, non_finite, Exp2, Weights};
use super::tile::{Session, TILE_BYTES};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, CallError, Operand, Output};

/// Bytes of one S slot (`hh` then `cross`, each `[2 row groups][64 keys][16 rows]`) and one
/// Pᵀ slot (2 tiles).
const S_PART: usize = 2 * KEY_TILE * 64;
const S_SLOT: usize = 2 * S_PART;
const P_SLOT: usize = 2 * TILE_BYTES;

/// One call's scratch.
struct Scratch {
    /// Qᵀ digit tiles `(c, rg)` at `(2c + rg)·1024`.
    q_hi: Lines,
    q_lo: Lines,
    /// On vectors: Qᵀ in 16-bit words, `[rg][d_words / 2 pairs][16 rows][2]`.
    q_words: Lines,
    /// Per row: `s_q·scale` and `scale·q·μ`.
    q_factor: [f32; 32],
    q_shift: [f32; 32],
    /// Two S slots.
    s: Lines,
    /// Two Pᵀ slots.
    p: Lines,
    /// `[part][rg][dv_pad][16]` i32 products of the previous key tile.
    pv: Lines,
    /// Oᵀ: `[rg][dv_pad][16]` f32.
    o: Lines,
    /// Per slot and row: `α`, `β` of that slot's key tile.
    alpha: [[f32; 32]; 2],
    beta: [[f32; 32]; 2],
    dv_pad: usize,
    /// The products run on AVX-512 VNNI ([`vectors`]), not on the tile unit.
    on_vectors: bool,
}

/// Rows `rows` of `call` on packed K/V.
///
/// # Safety
/// AVX-512 F/BW/DQ/VL and AMX-INT8 (`on_vectors`: AVX-512 VNNI) are usable;
/// `problem::check(call, rows, out)` passed;
/// `data` was packed by [`super::pack::pack`] for int8 from a call with the same K and V shape;
/// the tile table uses [`QUERY_TILE`] × [`KEY_TILE`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn run(
    call: &Call<'_>,
    data: &Data,
    rows: Range<usize>,
    out: &mut Output<'_>,
    on_vectors: bool,
) -> Result<(), CallError> {
    let form = Form::new(call)?;
    let dv_pad = data.dv_groups * 16;
    let q_bytes = data.d_chunks * 2 * TILE_BYTES;
    // Every buffer is written before it is read (Q and O per query tile, S, P and PV per key
    // tile; the lanes of rows past m hold stale but finite values that reach no output).
    let mut sc = Scratch {
        q_hi: Lines::overwritten(if on_vectors { 0 } else { q_bytes })?,
        q_lo: Lines::overwritten(if on_vectors { 0 } else { q_bytes })?,
        q_words: Lines::overwritten(if on_vectors {
            2 * data.d_words * 2 * 16
        } else {
            0
        })?,
        q_factor: [0.0; 32],
        q_shift: [0.0; 32],
        // With no head dimension no product writes S: scores of 0. On vectors the `cross`
        // plane is never written: it stays 0.
        s: if data.d_chunks == 0 || on_vectors {
            Lines::zeroed(2 * S_SLOT)?
        } else {
            Lines::overwritten(2 * S_SLOT)?
        },
        p: Lines::overwritten(2 * P_SLOT)?,
        pv: Lines::overwritten(2 * 2 * dv_pad * 64)?,
        o: Lines::overwritten(2 * dv_pad * 64)?,
        alpha: [[1.0; 32]; 2],
        beta: [[0.0; 32]; 2],
        dv_pad,
        on_vectors,
    };
    let exp2 = Weights::weights(255.0);
    // SAFETY: AMX is usable by the caller's contract when the products run on tiles.
    let _tiles = (!on_vectors).then(|| {
        // SAFETY: as above.
        unsafe { Session::start() }
    });
    for qt in rows.start / QUERY_TILE..rows.end.div_ceil(QUERY_TILE) {
        // SAFETY: the caller's contract; qt is a query tile of rows.
        unsafe { query_tile(call, data, &form, &exp2, qt, &mut sc, &rows, out) };
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
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
        match sc.on_vectors {
            true => convert_q_words(call, data, form.scale, r0, valid, sc),
            false => convert_q(call, data, form.scale, r0, valid, sc),
        }
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
        let mut done = 0;
        let ks = match sc.on_vectors {
            true => data.k_word_scale.as_ptr(),
            false => data.k_scale.as_ptr(),
        }
        .wrapping_add(j0);
        for rg in 0..groups {
            let i0 = r0 + 16 * rg;
            const SUBS: usize = KEY_TILE / SUB;
            let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); SUBS];
            for (sb, mx) in mx.iter_mut().enumerate() {
                // SAFETY: rows i0.. < m, keys of tile kt (scales padded to whole tiles); the
                // tile state is live and every tile index lies below key_tiles.
                unsafe {
                    *mx = if plain {
                        scores::<true>(form, sc, ks, slot, rg, i0, j0, sb, false)
                    } else {
                        scores::<false>(form, sc, ks, slot, rg, i0, j0, sb, partial)
                    };
                    let step = (rg * 2 * SUBS + sb + 1) * work.steps / (2 * SUBS * groups);
                    done = work.until(step, done, data, sc);
                }
            }
            let mx = mx.iter().fold(mx[0], |a, b| _mm512_max_ps(a, *b));
            let (block, (f2, s2)) = if plain {
                let (f2, s2) = row_factors(sc, rg);
                (_mm512_fmadd_ps(mx, f2, s2), (f2, s2))
            } else {
                (mx, (_mm512_setzero_ps(), _mm512_setzero_ps()))
            };
            let bu = finite_or_zero(block);
            let mut sum = _mm512_setzero_ps();
            for sb in 0..SUBS {
                // SAFETY: pass 1 stored these keys' scores; as above for the tile steps.
                unsafe {
                    let s = weights(exp2, sc, slot, rg, sb, plain, f2, _mm512_sub_ps(s2, bu), bu);
                    sum = _mm512_add_ps(sum, s);
                    let step = (rg * 2 * SUBS + SUBS + sb + 1) * work.steps / (2 * SUBS * groups);
                    done = work.until(step, done, data, sc);
                }
            }
            update(sc, &mut st, slot, rg, block, sum);
        }
        // SAFETY: as above.
        unsafe { work.finish(done, data, sc) };
        if let Some((k, p, s)) = prev {
            combine(data, sc, k, s, groups);
            poison(form, data, &mut sc.o, sc.dv_pad, k, p, r0, valid);
        }
        prev = Some((kt, partial, slot));
        slot ^= 1;
        cur = following;
    }
    if let Some((k, p, s)) = prev {
        // SAFETY: as above.
        unsafe { Work::new(data, Some((k, s)), None).finish(0, data, sc) };
        combine(data, sc, k, s, groups);
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

/// The plain path's per-row factors of row group `rg` in base 2: `s_q·scale·log₂e` and
/// `scale·q·μ·log₂e`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn row_factors(sc: &Scratch, rg: usize) -> (__m512, __m512) {
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    // SAFETY: 16 of the 32 factors each.
    unsafe {
        (
            _mm512_mul_ps(_mm512_loadu_ps(sc.q_factor.as_ptr().add(16 * rg)), log2e),
            _mm512_mul_ps(_mm512_loadu_ps(sc.q_shift.as_ptr().add(16 * rg)), log2e),
        )
    }
}

/// A query row's largest magnitude, its product with the mean key `q·μ`, and whether every
/// value of it is finite.
///
/// # Safety
/// `q` holds `q.cols` values from `at`; `data` is int8 (μ has `q.cols` rounded up to 16).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn row_stats(q: &Operand<'_>, data: &Data, at: usize) -> (f32, f32, bool) {
    let d = q.cols;
    let mut amax = _mm512_setzero_ps();
    let mut dot = _mm512_setzero_ps();
    let mut bad = 0;
    for c0 in (0..d).step_by(16) {
        // SAFETY: columns c0.. of the row masked to d; μ has d rounded up to 16 entries.
        let (x, mu) = unsafe {
            (
                load(&q.data, at + c0, (d - c0).min(16)),
                _mm512_maskz_loadu_ps(first(d - c0), data.k_mean.as_ptr().add(c0)),
            )
        };
        bad |= non_finite(x);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(x));
        dot = _mm512_fmadd_ps(x, mu, dot);
    }
    (_mm512_reduce_max_ps(amax), hsum(dot), bad == 0)
}

/// Qᵀ of rows `r0..r0 + valid` in two signed digits, in the B layout `[16 dim quads][16
/// rows][4]` per (64-dim chunk, row group), with the row factors; a row with a NaN or ∞ gets
/// the factor NaN; rows past `valid` are zero.
///
/// # Safety
/// `r0 + valid ≤ m`, `valid ≤ 32`; Q passed `problem::check`; `data` is int8.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn convert_q(
    call: &Call<'_>,
    data: &Data,
    scale: f32,
    r0: usize,
    valid: usize,
    sc: &mut Scratch,
) {
    let q = &call.q;
    let d = q.cols;
    if valid < QUERY_TILE {
        // SAFETY: the whole buffers.
        unsafe {
            std::ptr::write_bytes(sc.q_hi.ptr_mut(), 0, sc.q_hi.bytes());
            std::ptr::write_bytes(sc.q_lo.ptr_mut(), 0, sc.q_lo.bytes());
        }
        sc.q_factor = [0.0; 32];
        sc.q_shift = [0.0; 32];
    }
    // Lane p (dims 4p..4p + 4 of the chunk) goes to tile row p.
    let quads = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16),
    );
    for r in 0..valid {
        let at = (r0 + r) * q.row_stride;
        // SAFETY: row r0 + r < m of Q, which passed `problem::check`.
        let (amax, dot, finite) = unsafe { row_stats(q, data, at) };
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        for c in 0..data.d_chunks {
            let mut hi = [0u8; 64];
            let mut lo = [0u8; 64];
            for b in 0..4 {
                let c0 = 64 * c + 16 * b;
                // SAFETY: as above (zeros past d); 16 bytes at 16b of the arrays.
                unsafe {
                    let x = load(&q.data, at + c0.min(d), d.saturating_sub(c0).min(16));
                    let (h, l) = digits(x, inv);
                    _mm_storeu_si128(hi.as_mut_ptr().add(16 * b).cast(), _mm512_cvtepi32_epi8(h));
                    _mm_storeu_si128(lo.as_mut_ptr().add(16 * b).cast(), _mm512_cvtepi32_epi8(l));
                }
            }
            let tile = (2 * c + r / 16) * TILE_BYTES + (r % 16) * 4;
            // SAFETY: column r % 16 of tile (c, r / 16): rows 0..16 at stride 64.
            unsafe {
                let h = _mm512_loadu_si512(hi.as_ptr().cast());
                let l = _mm512_loadu_si512(lo.as_ptr().cast());
                _mm512_i32scatter_epi32::<4>(sc.q_hi.ptr_mut().add(tile).cast(), quads, h);
                _mm512_i32scatter_epi32::<4>(sc.q_lo.ptr_mut().add(tile).cast(), quads, l);
            }
        }
        (sc.q_factor[r], sc.q_shift[r]) = match finite {
            true => (amax / 127.0 * scale, scale * dot),
            false => (f32::NAN, f32::NAN),
        };
    }
}

/// Qᵀ of rows `r0..r0 + valid` in 16-bit words for [`vectors`] (`q ≈ s_q·w`, `s_q =
/// max|q| / level`), in the layout `[rg][d_words / 2 pairs][16 rows][2]`, with the row factors
/// as [`convert_q`] sets them; rows past `valid` are zero.
///
/// # Safety
/// As [`convert_q`]; `data` has words.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn convert_q_words(
    call: &Call<'_>,
    data: &Data,
    scale: f32,
    r0: usize,
    valid: usize,
    sc: &mut Scratch,
) {
    let q = &call.q;
    let d = q.cols;
    let pairs = data.d_words / 2;
    if valid < QUERY_TILE {
        // SAFETY: the whole buffer.
        unsafe { std::ptr::write_bytes(sc.q_words.ptr_mut(), 0, sc.q_words.bytes()) };
        sc.q_factor = [0.0; 32];
        sc.q_shift = [0.0; 32];
    }
    // Lane p of a vector of 16 pairs goes to line p.
    let lines = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(64),
    );
    let level = data.word_level;
    for r in 0..valid {
        let at = (r0 + r) * q.row_stride;
        // SAFETY: row r0 + r < m of Q, which passed `problem::check`.
        let (amax, dot, finite) = unsafe { row_stats(q, data, at) };
        let inv = _mm512_set1_ps(if amax > 0.0 { level / amax } else { 0.0 });
        let base = (r / 16) * pairs * 64 + (r % 16) * 4;
        // 32 dimensions (16 pairs) at a time.
        for p0 in (0..pairs).step_by(16) {
            let c0 = 2 * p0;
            let mut words = [_mm256_setzero_si256(); 2];
            for (h, w) in words.iter_mut().enumerate() {
                let c = c0 + 16 * h;
                // SAFETY: as above (zeros past d).
                let x = unsafe { load(&q.data, at + c.min(d), d.saturating_sub(c).min(16)) };
                let y = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(x, inv));
                *w = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(y));
            }
            let pairs16 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(words[0]), words[1]);
            // SAFETY: lines p0..p0 + 16 of the row group lie inside q_words (pairs is a
            // multiple of 32), column r % 16 of each.
            unsafe {
                let to = sc.q_words.ptr_mut().add(base + p0 * 64);
                _mm512_i32scatter_epi32::<1>(to.cast(), lines, pairs16);
            }
        }
        (sc.q_factor[r], sc.q_shift[r]) = match finite {
            true => (amax / level * scale, scale * dot),
            false => (f32::NAN, f32::NAN),
        };
    }
}

/// The row bookkeeping of row group `rg` after a key tile with maxima `block` and weight sums
/// `sum`: the running maximum and sum, and `α`, `β` of the tile's slot.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn update(sc: &mut Scratch, st: &mut RowState, slot: usize, rg: usize, block: __m512, sum: __m512) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let old = st.max_v(rg);
    let new = nan_max_v(old, block);
    let mu = finite_or_zero(new);
    let exp2 = Exp2::accurate();
    let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(old, ninf);
    let alpha = _mm512_mask_mov_ps(
        exp2.eval(_mm512_sub_ps(old, new)),
        none,
        _mm512_setzero_ps(),
    );
    let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(block, ninf);
    let beta = _mm512_mul_ps(
        exp2.eval(_mm512_sub_ps(block, mu)),
        _mm512_set1_ps(1.0 / 255.0),
    );
    let beta = _mm512_mask_mov_ps(beta, empty, _mm512_setzero_ps());
    let l = _mm512_fmadd_ps(sum, beta, _mm512_mul_ps(st.sum_v(rg), alpha));
    st.set(rg, new, l);
    // SAFETY: 16 of the 32 factors each.
    unsafe {
        _mm512_storeu_ps(sc.alpha[slot].as_mut_ptr().add(16 * rg), alpha);
        _mm512_storeu_ps(sc.beta[slot].as_mut_ptr().add(16 * rg), beta);
    }
}

/// `Oᵀ ← α·Oᵀ + β·(s_v·PVhi + s_v/254·PVlo)` for key tile `kt` of slot `slot`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn combine(data: &Data, sc: &mut Scratch, kt: usize, slot: usize, groups: usize) {
    let dv_pad = sc.dv_pad;
    let lo = data.v_lo.is_some();
    for rg in 0..groups {
        // SAFETY: 16 of the 32 factors each.
        let (a, b) = unsafe {
            (
                _mm512_loadu_ps(sc.alpha[slot].as_ptr().add(16 * rg)),
                _mm512_loadu_ps(sc.beta[slot].as_ptr().add(16 * rg)),
            )
        };
        let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, _mm512_set1_ps(1.0)) == 0;
        let inv254 = _mm512_set1_ps(1.0 / 254.0);
        for c in 0..dv_pad {
            let vs = _mm512_set1_ps(data.v_scale[kt * dv_pad + c]);
            // SAFETY: vector (part, rg, c) of PV and (rg, c) of Oᵀ.
            unsafe {
                let pv = sc.pv.ptr().cast::<i32>().add((rg * dv_pad + c) * 16);
                let mut t = _mm512_cvtepi32_ps(_mm512_load_si512(pv.cast()));
                if lo {
                    let l = _mm512_load_si512(pv.add(2 * dv_pad * 16).cast());
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), inv254, t);
                }
                let t = _mm512_mul_ps(t, vs);
                let o = sc.o.ptr_mut().cast::<f32>().add((rg * dv_pad + c) * 16);
                let prev = if keep {
                    _mm512_load_ps(o)
                } else {
                    _mm512_mul_ps(_mm512_load_ps(o), a)
                };
                _mm512_store_ps(o, _mm512_fmadd_ps(t, b, prev));
            }
        }
    }
}
