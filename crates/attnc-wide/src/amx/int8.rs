//! int8 products: `S = Q·Kᵀ` on `tdpbssd`, `P·V` on `tdpbusd` (i32 sums), the score form,
//! softmax and quantization of P in f32 on AVX-512.
//!
//! Per query tile (32 rows) and visited key tile (64 keys):
//! 1. S (AMX): Q in two signed digits per row (`q ≈ s_q·(hi + lo/254)`, `s_q = max|q|/127`),
//!    K smoothed and in two digits per key (see [`super::pack`]); two i32 accumulators per
//!    16 × 16 block: `Qhi·Khi` and `Qhi·Klo + Qlo·Khi` (the `lo·lo` term is below the
//!    rounding). The scaled score is `x = s_q·scale·s_k·(hh + cross/254) + scale·q·μ` — the
//!    smoothing's `q·μ` added back, so it is exact under any mask, bias or softcap.
//! 2. softmax (AVX-512), per row: pass 1 forms `x` (stored over S) and the tile maximum `b`;
//!    pass 2 quantizes `P = round(255·2^(x₂ − b))` to u8 — its block maximum maps to 255 —
//!    and sums `2^(x₂ − b)` in f32 (NaN-propagating).
//! 3. P·V (AMX): `P (u8) · V (i8 digits)` into i32 tiles, then per row
//!    `O ← α·O + β·(s_v·PVhi + s_v/254·PVlo)` with `α = 2^(m_old − m)`,
//!    `β = 2^(b − m)/255`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::pack::{digits, Data, Lines};
use super::score::{finalize_row, Form, RowState};
use super::simd::{first, hmax, load, nan_max, non_finite, rebase, Exp2};
use super::tile::{self, Session, TILE_BYTES};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, CallError, Output};

/// One call's scratch.
struct Scratch {
    q_hi: Lines,
    q_lo: Lines,
    /// Per row: `s_q·scale` and `scale·q·μ`.
    q_factor: [f32; 32],
    q_shift: [f32; 32],
    /// `[32][64]` i32 `Qhi·Khi`, overwritten by the f32 scores of pass 1.
    s_hh: Lines,
    /// `[32][64]` i32 `Qhi·Klo + Qlo·Khi`.
    s_x: Lines,
    /// `[32][64]` u8.
    p: Lines,
    /// `[32][dv_pad]` i32 `P·Vhi` and `P·Vlo`.
    pv_hi: Lines,
    pv_lo: Lines,
    /// `[32][dv_pad]` f32.
    o: Lines,
    /// `[32][16]` f32 partial row sums.
    l: Lines,
    /// Per row of the current key tile: `α` and `β`.
    alpha: [f32; 32],
    beta: [f32; 32],
    q_stride: usize,
    dv_pad: usize,
}

const S_STRIDE: usize = KEY_TILE * 4;

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
    let q_stride = data.d_chunks * 64;
    let dv_pad = data.dv_groups * 16;
    let mut sc = Scratch {
        q_hi: Lines::zeroed(QUERY_TILE * q_stride)?,
        q_lo: Lines::zeroed(QUERY_TILE * q_stride)?,
        q_factor: [0.0; 32],
        q_shift: [0.0; 32],
        s_hh: Lines::zeroed(QUERY_TILE * S_STRIDE)?,
        s_x: Lines::zeroed(QUERY_TILE * S_STRIDE)?,
        p: Lines::zeroed(QUERY_TILE * KEY_TILE)?,
        pv_hi: Lines::zeroed(QUERY_TILE * dv_pad * 4)?,
        pv_lo: Lines::zeroed(QUERY_TILE * dv_pad * 4)?,
        o: Lines::zeroed(QUERY_TILE * dv_pad * 4)?,
        l: Lines::zeroed(QUERY_TILE * 64)?,
        alpha: [0.0; 32],
        beta: [0.0; 32],
        q_stride,
        dv_pad,
    };
    let exp2 = Exp2::weights(255.0);
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
    unsafe { convert_q(call, data, form.scale, r0, valid, sc) };
    // SAFETY: both buffers are at least as long as written.
    unsafe {
        std::ptr::write_bytes(sc.o.ptr_mut(), 0, sc.o.bytes());
        std::ptr::write_bytes(sc.l.ptr_mut(), 0, sc.l.bytes());
    }
    let mut st = RowState::new();
    for run in call.tiles.runs(qt) {
        let partial = run.partial && form.masked();
        for kt in run.first as usize..run.end as usize {
            let j0 = kt * KEY_TILE;
            let plain = form.plain && !partial && j0 + KEY_TILE <= form.n;
            // SAFETY: the tile state is live; kt < key_tiles (the table is clipped to n).
            unsafe {
                scores(data, kt, sc);
                let ks: [__m512; 4] = std::array::from_fn(|q| {
                    _mm512_loadu_ps(data.k_scale.as_ptr().add(j0 + 16 * q))
                });
                for r in 0..valid {
                    if plain {
                        softmax_row::<true>(form, exp2, sc, &ks, &mut st.max[r], r, r0 + r, j0, false);
                    } else {
                        softmax_row::<false>(form, exp2, sc, &ks, &mut st.max[r], r, r0 + r, j0, partial);
                    }
                }
                products(data, kt, sc);
                combine(data, kt, valid, sc);
            }
            for &(j, c, v) in data.bad_v.of_tile(kt) {
                for r in 0..valid {
                    if form.keeps(r0 + r, j, partial) {
                        // SAFETY: r < 32, c < dv ≤ dv_pad.
                        unsafe { *sc.o.ptr_mut().cast::<f32>().add(r * sc.dv_pad + c) += v };
                    }
                }
            }
        }
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

/// Q rows `r0..r0 + valid` as two signed digits with their row factors; a row with a NaN or
/// ∞ gets the factor NaN.
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
        let dst = r * sc.q_stride;
        let amax = hmax(amax);
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        for c in 0..data.d_chunks {
            for b in 0..4 {
                let c0 = 64 * c + 16 * b;
                // SAFETY: as above (zeros past d).
                let x = unsafe { load(&q.data, at + c0.min(d), d.saturating_sub(c0).min(16)) };
                let (h, l) = digits(x, inv);
                // SAFETY: 16 bytes at chunk c, block b of row r.
                unsafe {
                    let o = dst + c * 64 + b * 16;
                    _mm_store_si128(sc.q_hi.ptr_mut().add(o).cast(), _mm512_cvtepi32_epi8(h));
                    _mm_store_si128(sc.q_lo.ptr_mut().add(o).cast(), _mm512_cvtepi32_epi8(l));
                }
            }
        }
        let finite = bad == 0;
        sc.q_factor[r] = if finite { amax / 127.0 * scale } else { f32::NAN };
        sc.q_shift[r] = if finite {
            scale * super::simd::hsum(dot)
        } else {
            f32::NAN
        };
    }
}

/// `Qhi·Khi` and `Qhi·Klo + Qlo·Khi` of key tile `kt` (tiles 0–1 and 2–3 accumulate rows
/// 0–15 and 16–31, 4–5 hold Q, 6–7 K).
///
/// # Safety
/// A tile session is live; `kt < data.key_tiles`; `data` is int8.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn scores(data: &Data, kt: usize, sc: &mut Scratch) {
    let ch = data.d_chunks;
    let qs = sc.q_stride;
    let Some(k_lo) = &data.k_lo else { return };
    // SAFETY: K tiles (4kt + g, c), Q rows 0..32 of chunk c and S columns of group g lie
    // inside their buffers.
    unsafe {
        for g in 0..4 {
            tile::zero::<0>();
            tile::zero::<1>();
            tile::zero::<2>();
            tile::zero::<3>();
            for c in 0..ch {
                let k = ((4 * kt + g) * ch + c) * TILE_BYTES;
                tile::load::<4>(sc.q_hi.ptr().add(c * 64), qs);
                tile::load::<5>(sc.q_hi.ptr().add(c * 64 + 16 * qs), qs);
                tile::load::<6>(data.k_hi.ptr().add(k), 64);
                tile::load::<7>(k_lo.ptr().add(k), 64);
                tile::dp_i8i8::<0, 4, 6>();
                tile::dp_i8i8::<1, 5, 6>();
                tile::dp_i8i8::<2, 4, 7>();
                tile::dp_i8i8::<3, 5, 7>();
                tile::load::<4>(sc.q_lo.ptr().add(c * 64), qs);
                tile::load::<5>(sc.q_lo.ptr().add(c * 64 + 16 * qs), qs);
                tile::dp_i8i8::<2, 4, 6>();
                tile::dp_i8i8::<3, 5, 6>();
            }
            let hh = sc.s_hh.ptr_mut().add(g * 64);
            let x = sc.s_x.ptr_mut().add(g * 64);
            tile::store::<0>(hh, S_STRIDE);
            tile::store::<1>(hh.add(16 * S_STRIDE), S_STRIDE);
            tile::store::<2>(x, S_STRIDE);
            tile::store::<3>(x.add(16 * S_STRIDE), S_STRIDE);
        }
    }
}

/// Pass 1 and 2 of row `r`: P in u8, `α`, `β`, the row sums.
///
/// # Safety
/// `r < 32`, `i < m`; the call passed `problem::check`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn softmax_row<const PLAIN: bool>(
    form: &Form<'_>,
    exp2: &Exp2,
    sc: &mut Scratch,
    ks: &[__m512; 4],
    max: &mut f32,
    r: usize,
    i: usize,
    j0: usize,
    partial: bool,
) {
    let log2e = std::f32::consts::LOG2_E;
    let (factor, shift) = (sc.q_factor[r], sc.q_shift[r]);
    // SAFETY: row r of both S buffers (64 values each).
    let (hh, xx) = unsafe {
        (
            sc.s_hh.ptr_mut().cast::<f32>().add(r * KEY_TILE),
            sc.s_x.ptr().cast::<i32>().add(r * KEY_TILE),
        )
    };
    let inv254 = _mm512_set1_ps(1.0 / 254.0);
    let mut x = [_mm512_setzero_ps(); 4];
    for (q, x) in x.iter_mut().enumerate() {
        // SAFETY: 16 values at 16q of the rows.
        let (h, c) = unsafe {
            (
                _mm512_cvtepi32_ps(_mm512_load_si512(hh.add(16 * q).cast())),
                _mm512_cvtepi32_ps(_mm512_load_si512(xx.add(16 * q).cast())),
            )
        };
        // y = s_k·(hh + cross/254): the score over s_q.
        let y = _mm512_mul_ps(_mm512_fmadd_ps(c, inv254, h), ks[q]);
        *x = if PLAIN {
            y
        } else {
            let s = _mm512_fmadd_ps(y, _mm512_set1_ps(factor), _mm512_set1_ps(shift));
            // SAFETY: i < m, by the caller.
            unsafe { form.finish(s, i, j0 + 16 * q, partial) }
        };
    }
    let mx = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
    let (f2, s2) = (factor * log2e, shift * log2e);
    let block = if PLAIN { hmax(mx) * f2 + s2 } else { hmax(mx) };
    let old = *max;
    let new = nan_max(old, block);
    let mu = if new == f32::NEG_INFINITY { 0.0 } else { new };
    let bu = if block == f32::NEG_INFINITY { 0.0 } else { block };
    sc.alpha[r] = rebase(old, new);
    sc.beta[r] = if block == f32::NEG_INFINITY {
        0.0
    } else {
        (block - mu).exp2() / 255.0
    };
    *max = new;
    let mut e = [_mm512_setzero_ps(); 4];
    for q in 0..4 {
        let t = if PLAIN {
            _mm512_fmadd_ps(x[q], _mm512_set1_ps(f2), _mm512_set1_ps(s2 - bu))
        } else {
            _mm512_sub_ps(x[q], _mm512_set1_ps(bu))
        };
        e[q] = exp2.eval(t);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(e[0], e[1]), _mm512_add_ps(e[2], e[3]));
    let n: [__m512i; 4] = e.map(|e| _mm512_cvtps_epi32(e));
    let bytes = _mm512_packus_epi16(
        _mm512_packus_epi32(n[0], n[1]),
        _mm512_packus_epi32(n[2], n[3]),
    );
    // SAFETY: row r of l (16 f32) and P (64 bytes, aligned).
    unsafe {
        let l = sc.l.ptr_mut().cast::<f32>().add(r * 16);
        let b = _mm512_set1_ps(sc.beta[r]);
        let a = _mm512_set1_ps(sc.alpha[r]);
        let keep = _mm512_mul_ps(_mm512_loadu_ps(l), a);
        _mm512_storeu_ps(l, _mm512_fmadd_ps(sum, b, keep));
        _mm512_store_si512(sc.p.ptr_mut().add(r * KEY_TILE).cast(), bytes);
    }
}

/// `P·Vhi` and `P·Vlo` of key tile `kt` into `pv_hi`, `pv_lo` (tiles 4–5 hold P, 6–7 V).
///
/// # Safety
/// A tile session is live; `kt < data.key_tiles`; `data` is int8.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn products(data: &Data, kt: usize, sc: &mut Scratch) {
    let os = sc.dv_pad * 4;
    // SAFETY: P rows 0..32, V tiles (kt, g) and PV column groups g < dv_groups lie inside
    // their buffers.
    unsafe {
        tile::load::<4>(sc.p.ptr(), KEY_TILE);
        tile::load::<5>(sc.p.ptr().add(16 * KEY_TILE), KEY_TILE);
        for g in 0..data.dv_groups {
            let v = (kt * data.dv_groups + g) * TILE_BYTES;
            tile::zero::<0>();
            tile::zero::<1>();
            tile::load::<6>(data.v_hi.ptr().add(v), 64);
            tile::dp_u8i8::<0, 4, 6>();
            tile::dp_u8i8::<1, 5, 6>();
            let hi = sc.pv_hi.ptr_mut().add(g * 64);
            tile::store::<0>(hi, os);
            tile::store::<1>(hi.add(16 * os), os);
            if let Some(v_lo) = &data.v_lo {
                tile::zero::<2>();
                tile::zero::<3>();
                tile::load::<7>(v_lo.ptr().add(v), 64);
                tile::dp_u8i8::<2, 4, 7>();
                tile::dp_u8i8::<3, 5, 7>();
                let lo = sc.pv_lo.ptr_mut().add(g * 64);
                tile::store::<2>(lo, os);
                tile::store::<3>(lo.add(16 * os), os);
            }
        }
    }
}

/// `O ← α·O + β·(s_v·PVhi + s_v/254·PVlo)` for the valid rows.
///
/// # Safety
/// `valid ≤ 32`; `kt < data.key_tiles`; `data` is int8.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn combine(data: &Data, kt: usize, valid: usize, sc: &mut Scratch) {
    let groups = data.dv_groups;
    let lo = data.v_lo.is_some();
    let inv254 = _mm512_set1_ps(1.0 / 254.0);
    for g in 0..groups {
        // SAFETY: 16 scales of (kt, g).
        let vs = unsafe { _mm512_loadu_ps(data.v_scale.as_ptr().add((kt * groups + g) * 16)) };
        let vs_lo = _mm512_mul_ps(vs, inv254);
        for r in 0..valid {
            let at = r * sc.dv_pad + g * 16;
            // SAFETY: 16 values at row r, group g of the PV and O buffers.
            unsafe {
                let h = _mm512_cvtepi32_ps(_mm512_load_si512(sc.pv_hi.ptr().cast::<i32>().add(at).cast()));
                let mut t = _mm512_mul_ps(h, vs);
                if lo {
                    let l = _mm512_cvtepi32_ps(_mm512_load_si512(
                        sc.pv_lo.ptr().cast::<i32>().add(at).cast(),
                    ));
                    t = _mm512_fmadd_ps(l, vs_lo, t);
                }
                let o = sc.o.ptr_mut().cast::<f32>().add(at);
                let a = sc.alpha[r];
                let prev = if a == 1.0 {
                    _mm512_load_ps(o)
                } else {
                    _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(a))
                };
                _mm512_store_ps(o, _mm512_fmadd_ps(t, _mm512_set1_ps(sc.beta[r]), prev));
            }
        }
    }
}
