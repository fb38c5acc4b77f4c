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

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{digits, Data, Lines};
use super::score::{finalize, Form, RowState};
use super::simd::{finite_or_zero, first, hsum, load, nan_max_v, non_finite, Exp2, Weights};
use super::tile::{self, Session, TILE_BYTES};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, CallError, Output};

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
}

/// Rows `rows` of `call` on packed K/V.
///
/// # Safety
/// AMX-INT8 and AVX-512 F/BW/DQ/VL are usable; `problem::check(call, rows, out)` passed;
/// `data` was packed by [`super::pack::pack`] for int8 from a call with the same K and V shape;
/// the tile table uses [`QUERY_TILE`] × [`KEY_TILE`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn run(
    call: &Call<'_>,
    data: &Data,
    rows: Range<usize>,
    out: &mut Output<'_>,
) -> Result<(), CallError> {
    let form = Form::new(call)?;
    let dv_pad = data.dv_groups * 16;
    let q_bytes = data.d_chunks * 2 * TILE_BYTES;
    // Every buffer is written before it is read (Q and O per query tile, S, P and PV per key
    // tile; the lanes of rows past m hold stale but finite values that reach no output).
    let mut sc = Scratch {
        q_hi: Lines::overwritten(q_bytes)?,
        q_lo: Lines::overwritten(q_bytes)?,
        q_factor: [0.0; 32],
        q_shift: [0.0; 32],
        // With no head dimension no product writes S: scores of 0.
        s: if data.d_chunks == 0 {
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
    };
    let exp2 = Weights::weights(255.0);
    // SAFETY: AMX is usable by the caller's contract.
    let _tiles = unsafe { Session::start() };
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
        convert_q(call, data, form.scale, r0, valid, sc);
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
        // SAFETY (both passes): rows i0.. < m, keys of tile kt (scales padded to whole
        // tiles); the tile state is live and every tile index lies below key_tiles.
        let mut done = 0;
        let ks = data.k_scale.as_ptr().wrapping_add(j0);
        for rg in 0..groups {
            let i0 = r0 + 16 * rg;
            let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
            for (sb, mx) in mx.iter_mut().enumerate() {
                unsafe {
                    *mx = if plain {
                        scores::<true>(form, sc, ks, slot, rg, i0, j0, sb, false)
                    } else {
                        scores::<false>(form, sc, ks, slot, rg, i0, j0, sb, partial)
                    };
                    let step = (rg * 8 + sb + 1) * work.steps / (8 * groups);
                    done = work.until(step, done, data, sc);
                }
            }
            let mx = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
            let (block, (f2, s2)) = if plain {
                let (f2, s2) = row_factors(sc, rg);
                (_mm512_fmadd_ps(mx, f2, s2), (f2, s2))
            } else {
                (mx, (_mm512_setzero_ps(), _mm512_setzero_ps()))
            };
            let bu = finite_or_zero(block);
            let mut sum = _mm512_setzero_ps();
            for sb in 0..4 {
                unsafe {
                    let s = weights(exp2, sc, slot, rg, sb, plain, f2, _mm512_sub_ps(s2, bu), bu);
                    sum = _mm512_add_ps(sum, s);
                    let step = (rg * 8 + 4 + sb + 1) * work.steps / (8 * groups);
                    done = work.until(step, done, data, sc);
                }
            }
            update(sc, &mut st, slot, rg, block, sum);
        }
        // SAFETY: as above.
        unsafe { work.finish(done, data, sc) };
        if let Some((k, p, s)) = prev {
            combine(data, sc, k, s, groups);
            poison(form, data, sc, k, p, r0, valid);
        }
        prev = Some((kt, partial, slot));
        slot ^= 1;
        cur = following;
    }
    if let Some((k, p, s)) = prev {
        // SAFETY: as above.
        unsafe { Work::new(data, Some((k, s)), None).finish(0, data, sc) };
        combine(data, sc, k, s, groups);
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
        let mut amax = _mm512_setzero_ps();
        let mut dot = _mm512_setzero_ps();
        let mut bad = 0;
        for c0 in (0..d).step_by(16) {
            // SAFETY: columns c0.. of row r0 + r masked to d; μ has d rounded up to 16 entries.
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
        let amax = _mm512_reduce_max_ps(amax);
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
        let finite = bad == 0;
        sc.q_factor[r] = if finite {
            amax / 127.0 * scale
        } else {
            f32::NAN
        };
        sc.q_shift[r] = if finite { scale * hsum(dot) } else { f32::NAN };
    }
}

/// Pass 1 on keys `16sb..16sb + 16`: the scores of row group `rg` from the two i32 products,
/// stored over `hh` (plain: `y = s_k·(hh + cross/254)`; else `x₂` of the full form); returns
/// their lane-wise maximum.
///
/// # Safety
/// `i0 < m`; `ks` points at the key tile's 64 scales; the S slot holds this tile's products.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn scores<const PLAIN: bool>(
    form: &Form<'_>,
    sc: &mut Scratch,
    ks: *const f32,
    slot: usize,
    rg: usize,
    i0: usize,
    j0: usize,
    sb: usize,
    partial: bool,
) -> __m512 {
    let inv254 = _mm512_set1_ps(1.0 / 254.0);
    // SAFETY: keys 16sb.. of row group rg in the slot's two parts.
    let hh = unsafe {
        sc.s.ptr_mut()
            .add(slot * S_SLOT + (rg * KEY_TILE + 16 * sb) * 64)
    };
    let xx = unsafe { hh.add(S_PART) };
    let (factor, shift) = if PLAIN {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        // SAFETY: 16 of the 32 factors each.
        unsafe {
            (
                _mm512_loadu_ps(sc.q_factor.as_ptr().add(16 * rg)),
                _mm512_loadu_ps(sc.q_shift.as_ptr().add(16 * rg)),
            )
        }
    };
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for e in 0..16 {
        // SAFETY: vector e of both parts; the scale of key 16sb + e.
        unsafe {
            let h = _mm512_cvtepi32_ps(_mm512_load_si512(hh.add(64 * e).cast()));
            let c = _mm512_cvtepi32_ps(_mm512_load_si512(xx.add(64 * e).cast()));
            let y = _mm512_mul_ps(
                _mm512_fmadd_ps(c, inv254, h),
                _mm512_set1_ps(*ks.add(16 * sb + e)),
            );
            let x = if PLAIN {
                y
            } else {
                let s = _mm512_fmadd_ps(y, factor, shift);
                form.finish(s, i0, j0 + 16 * sb + e, partial)
            };
            _mm512_store_ps(hh.add(64 * e).cast(), x);
            mx = _mm512_max_ps(mx, x);
        }
    }
    mx
}

/// Pass 2 on keys `16sb..16sb + 16` of row group `rg`: `e = 255·2^t` with
/// `t = y·f₂ + (s₂ − b)` (plain) or `x₂ − b`, quantized to u8 into the Pᵀ slot (4 keys per
/// row in a 32-bit lane); returns the lane-wise sum of `e`.
///
/// # Safety
/// The S slot holds pass 1's scores of these keys.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn weights(
    exp2: &Weights,
    sc: &mut Scratch,
    slot: usize,
    rg: usize,
    sb: usize,
    plain: bool,
    f2: __m512,
    offset: __m512,
    block: __m512,
) -> __m512 {
    // SAFETY: keys 16sb.. of row group rg in the slot; rows 4sb.. of Pᵀ tile rg.
    let (src, dst) = unsafe {
        (
            sc.s.ptr()
                .add(slot * S_SLOT + (rg * KEY_TILE + 16 * sb) * 64)
                .cast::<f32>(),
            sc.p.ptr_mut()
                .add(slot * P_SLOT + rg * TILE_BYTES + 4 * sb * 64),
        )
    };
    // Within each 128-bit block, bytes [k0 r0..r3, k1 r0..r3, k2 …, k3 …] → [r0 k0..k3, r1 …].
    let transpose4 = _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400);
    let mut sum = _mm512_setzero_ps();
    for quad in 0..4 {
        let mut n = [_mm512_setzero_si512(); 4];
        for (k, n) in n.iter_mut().enumerate() {
            // SAFETY: vector 4·quad + k of the keys.
            let x = unsafe { _mm512_load_ps(src.add(16 * (4 * quad + k))) };
            let t = if plain {
                _mm512_fmadd_ps(x, f2, offset)
            } else {
                _mm512_sub_ps(x, block)
            };
            let e = exp2.eval(t);
            sum = _mm512_add_ps(sum, e);
            *n = _mm512_cvtps_epi32(e);
        }
        let bytes = _mm512_packus_epi16(
            _mm512_packus_epi32(n[0], n[1]),
            _mm512_packus_epi32(n[2], n[3]),
        );
        // SAFETY: row 4sb + quad of the Pᵀ tile.
        unsafe {
            _mm512_store_si512(
                dst.add(quad * 64).cast(),
                _mm512_shuffle_epi8(bytes, transpose4),
            );
        }
    }
    sum
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

/// The tile-unit work issued between the softmax vectors of one key tile: `Vᵀ·Pᵀ` of the
/// previous tile (`prev`: key tile, P slot), then `Sᵀ` of the next (`next`: key tile, S slot).
/// S: tiles 0–1 accumulate, 2–3 stream K, 4–7 hold Qᵀ (hi and lo of both row groups). P·V:
/// tiles 0–3 accumulate (hi and lo of both row groups), 6–7 stream Vᵀ, 4–5 hold Pᵀ.
struct Work {
    prev: Option<(usize, usize)>,
    next: Option<(usize, usize)>,
    pv_steps: usize,
    steps: usize,
}

impl Work {
    fn new(data: &Data, prev: Option<(usize, usize)>, next: Option<(usize, usize)>) -> Work {
        let pv_steps = if prev.is_some() { data.dv_groups } else { 0 };
        let s_steps = if next.is_some() { data.d_chunks * 4 } else { 0 };
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
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
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
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn finish(&self, done: usize, data: &Data, sc: &mut Scratch) {
        // SAFETY: the caller's contract.
        unsafe { self.until(self.steps, done, data, sc) };
    }

    /// Value-column group `g` of `Vᵀ·Pᵀ` into the PV buffer (Pᵀ loaded at the first group).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn pv_step(&self, g: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let rg_stride = sc.dv_pad * 64;
        // SAFETY: Pᵀ tiles of the slot, Vᵀ tiles (kt, g) and PV tiles (part, rg, g) lie
        // inside their buffers.
        unsafe {
            if g == 0 {
                let p = sc.p.ptr().add(slot * P_SLOT);
                tile::load::<4>(p, 64);
                tile::load::<5>(p.add(TILE_BYTES), 64);
            }
            let v = (kt * data.dv_groups + g) * TILE_BYTES;
            let pv = sc.pv.ptr_mut().add(g * TILE_BYTES);
            tile::zero::<0>();
            tile::zero::<1>();
            tile::load::<6>(data.v_hi.ptr().add(v), 64);
            tile::dp_i8u8::<0, 6, 4>();
            tile::dp_i8u8::<1, 6, 5>();
            tile::store::<0>(pv, 64);
            tile::store::<1>(pv.add(rg_stride), 64);
            if let Some(v_lo) = &data.v_lo {
                tile::zero::<2>();
                tile::zero::<3>();
                tile::load::<7>(v_lo.ptr().add(v), 64);
                tile::dp_i8u8::<2, 7, 4>();
                tile::dp_i8u8::<3, 7, 5>();
                tile::store::<2>(pv.add(2 * rg_stride), 64);
                tile::store::<3>(pv.add(3 * rg_stride), 64);
            }
        }
    }

    /// Key group `g` of `Sᵀ` for dimension chunk `c` (Qᵀ loaded at the chunk's first group;
    /// accumulators from 0 at the first chunk, from the stored partial sums after it).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let Some(k_lo) = &data.k_lo else { return };
        let ch = data.d_chunks;
        let (c, g) = (k / 4, k % 4);
        // SAFETY: Qᵀ tiles (c, rg), K tiles (4kt + g, c) and the slot's S tiles (part, rg, g)
        // lie inside their buffers.
        unsafe {
            if g == 0 {
                let at = 2 * c * TILE_BYTES;
                tile::load::<4>(sc.q_hi.ptr().add(at), 64);
                tile::load::<5>(sc.q_lo.ptr().add(at), 64);
                tile::load::<6>(sc.q_hi.ptr().add(at + TILE_BYTES), 64);
                tile::load::<7>(sc.q_lo.ptr().add(at + TILE_BYTES), 64);
            }
            let kk = ((4 * kt + g) * ch + c) * TILE_BYTES;
            tile::load::<2>(data.k_hi.ptr().add(kk), 64);
            tile::load::<3>(k_lo.ptr().add(kk), 64);
            let hh = sc.s.ptr_mut().add(slot * S_SLOT + g * TILE_BYTES);
            let x = hh.add(S_PART);
            let rg1 = KEY_TILE * 64;
            if c == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(hh, 64);
                tile::load::<1>(x, 64);
            }
            tile::dp_i8i8::<0, 2, 4>();
            tile::dp_i8i8::<1, 3, 4>();
            tile::dp_i8i8::<1, 2, 5>();
            tile::store::<0>(hh, 64);
            tile::store::<1>(x, 64);
            if c == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(hh.add(rg1), 64);
                tile::load::<1>(x.add(rg1), 64);
            }
            tile::dp_i8i8::<0, 2, 6>();
            tile::dp_i8i8::<1, 3, 6>();
            tile::dp_i8i8::<1, 2, 7>();
            tile::store::<0>(hh.add(rg1), 64);
            tile::store::<1>(x.add(rg1), 64);
        }
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
        for c in 0..dv_pad {
            let vs = data.v_scale[kt * dv_pad + c];
            // SAFETY: vector (part, rg, c) of PV and (rg, c) of Oᵀ.
            unsafe {
                let pv = sc.pv.ptr().cast::<i32>().add((rg * dv_pad + c) * 16);
                let h = _mm512_cvtepi32_ps(_mm512_load_si512(pv.cast()));
                let mut t = _mm512_mul_ps(h, _mm512_set1_ps(vs));
                if lo {
                    let l = _mm512_cvtepi32_ps(_mm512_load_si512(pv.add(2 * dv_pad * 16).cast()));
                    t = _mm512_fmadd_ps(l, _mm512_set1_ps(vs / 254.0), t);
                }
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

/// Adds V's non-finite values of key tile `kt` to the rows that keep their key (after that
/// tile's combination).
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
