//! The backward of one attention call on AVX-512 (see [`crate::backward`] for the math).
//!
//! Keys lie in the lanes: a key tile of 64 keys is four vectors, so per query row the
//! scores, probabilities and their gradients of one key tile are four vectors and every
//! per-row quantity (log-sum-exp, `D`) is one broadcast. The loop runs over key tiles, and
//! for each over the query tiles that visit it (the call's tile table, transposed): `dKᵀ` and
//! `dVᵀ` of the key tile (keys in the lanes) stay in a small accumulator until its last query
//! tile, `dQ` rows accumulate in the output. Per (query tile, key tile) pair:
//!
//! 1. `S = Q Kᵀ` and `dP = dO Vᵀ` (4 rows × 4 key vectors of accumulators, one element of Q or
//!    dO broadcast per 4 FMAs, `Kᵀ`/`Vᵀ` packed once per key tile, `Kᵀ` times the scale in
//!    base 2 so that `S` is the score `x` the exponentials take);
//! 2. per row: `x` (bias, ALiBi, softcap), `P = 2^(x − lse₂)`, `dY = P (dP − D)` (times the
//!    softcap's derivative), zero where masked (element masks on partial tiles only); bias and
//!    slope gradients accumulated. On a full tile without score options or bias and slope
//!    gradients, steps 1 and 2 run per block of 4 rows in one kernel, each block's `P`
//!    computed between its `dP` products;
//! 3. `dVᵀ += dOᵀ P` and `dKᵀ += Qᵀ dY` (4 columns × 4 key vectors, one element of dO or Q
//!    broadcast per 4 FMAs), `dQ += dY K` (4 rows × 4 column vectors, one element of dY
//!    broadcast per 4 FMAs). On partial tiles these products skip masked positions (masked
//!    FMAs), so a NaN or infinity there reaches no gradient. `dS = dY · scale`: dK and dQ take
//!    the scale once, when a key tile's `dKᵀ` is written back and when the pass ends.
//!
//! A masked tile's kept positions are known before its products, so the products skip what no
//! row keeps: `S` and `dP` run per block of 4 rows over the key vectors one of them keeps,
//! `dVᵀ` and `dKᵀ` per band of 16 rows likewise (a causal diagonal tile, or a window's edge,
//! does about 6/16 less), with the sums in the same order as over the whole tile.
//!
//! Every sum runs in a fixed order per batch entry.

// Register arrays indexed by constant loop bounds.
#![allow(clippy::needless_range_loop)]

mod micro;

use std::arch::x86_64::*;
use std::borrow::Cow;

use super::mask::{LaneAxis, MaskProgram, VECTORS};
use super::math::exp2;
use super::score::{Distances, ScoreForm, LOG2_E};
use super::tile::prefetch_rows;
use super::transpose::transpose_piece;
use super::widen::first_lanes;
use super::{KEY_TILE, QUERY_TILE};
use crate::backward::{Gradients, KeyPart, RowStats};
use crate::problem::{Call, Elements, Operand};
use micro::{
    accumulate_dq, accumulate_t, accumulate_t_kept, products, products_kept, scores_and_grads,
    Epilogue,
};

const LANES: usize = 16;
const KT: usize = KEY_TILE;
const QT: usize = QUERY_TILE;

const _: () = assert!(KT == LANES * VECTORS);

/// An operand's rows as f32: in place (with its row stride) or widened into a contiguous copy.
fn rows_f32<'a>(op: &Operand<'a>) -> (Cow<'a, [f32]>, usize) {
    if let Elements::F32(x) = op.data {
        return (Cow::Borrowed(x), op.row_stride);
    }
    let mut out = Vec::with_capacity(op.rows * op.cols);
    for r in 0..op.rows {
        out.extend((0..op.cols).map(|c| op.data.get(r * op.row_stride + c)));
    }
    (Cow::Owned(out), op.cols)
}

/// Per key tile, the query tiles that visit it and whether the visit is partial.
fn by_key_tile(call: &Call<'_>) -> Vec<Vec<(usize, bool)>> {
    let tiles = call.tiles;
    let mut out = vec![Vec::new(); call.n().div_ceil(KT)];
    for t in 0..tiles.query_tiles() {
        for run in tiles.runs(t) {
            for k in run.first as usize..run.end as usize {
                if let Some(list) = out.get_mut(k) {
                    list.push((t, run.partial));
                }
            }
        }
    }
    out
}

/// What every tile pair of one call shares.
struct Env<'a> {
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
    q: (Cow<'a, [f32]>, usize),
    k: (Cow<'a, [f32]>, usize),
    d_o: &'a [f32],
    form: ScoreForm<'a>,
    scale: f32,
    /// `(cap₂, 1/cap₂)` of the softcap in base 2.
    cap: Option<(f32, f32)>,
    /// Row log-sum-exps in base 2.
    lse2: &'a [f32],
    /// `D_i = dO_i · O_i`.
    dd: &'a [f32],
    /// The row of the call that `dQ`'s first row is.
    dq_row0: usize,
    program: Option<MaskProgram<'a>>,
    /// Per row, the key its ALiBi distances are measured from (as the forward measured them
    /// for the saved log-sum-exp).
    origins: Vec<i64>,
}

/// Scratch of one call: packed `Kᵀ`, `Vᵀ` of a key tile, the key tile's `dKᵀ`, `dVᵀ`, and the
/// score-sized tiles of one pair.
struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    dy: Vec<f32>,
    kept: Vec<u16>,
    /// The slope gradient's lanes over the current pair.
    slope: __m512,
    /// The slope gradient of the pairs done, summed in f64: a call sums `m·n` terms.
    slope_sum: f64,
}

/// The gradients of `call` for the cotangent `dO` (`dlse`, where given, is inside `stats`)
/// over the key tiles of `part`: dK and dV of those keys, and their share of dQ.
///
/// # Safety
/// AVX-512 is present, `crate::backward::check_part` passed for `part` (the whole call where
/// it spans every key tile) and the tile table has 64 × 64 tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn run(
    call: &Call<'_>,
    stats: &RowStats,
    d_o: &[f32],
    grads: &mut Gradients<'_>,
    part: &KeyPart,
) {
    let (m, n, d, dv) = (call.m(), call.n(), call.q.cols, call.v.cols);
    let env = Env {
        m,
        n,
        d,
        dv,
        q: rows_f32(&call.q),
        k: rows_f32(&call.k),
        d_o,
        form: ScoreForm::new(&call.score),
        scale: call.score.scale,
        cap: call.score.softcap.map(|c| (c * LOG2_E, 1.0 / (c * LOG2_E))),
        lse2: &stats.lse2,
        dd: &stats.dd,
        dq_row0: part.dq_rows.start,
        program: call.mask.map(|m| MaskProgram::for_call(m, call)),
        origins: match call.score.alibi_slope {
            Some(_) => (0..m).map(|i| call.alibi_origin(i)).collect(),
            None => Vec::new(),
        },
    };
    let (v, v_stride) = rows_f32(&call.v);
    // dQ accumulates over key tiles; dK and dV are written whole per key tile (below).
    if let Some(dq) = grads.dq.as_deref_mut() {
        dq.fill(0.0);
    }
    let mut masks = env.program.as_ref().map(|p| p.buffers(QT * VECTORS));
    let mut scratch = Scratch {
        kt: vec![0.0; d.max(1) * KT],
        vt: vec![0.0; dv.max(1) * KT],
        dkt: vec![0.0; d.max(1) * KT],
        dvt: vec![0.0; dv.max(1) * KT],
        s: vec![0.0; QT * KT],
        dp: vec![0.0; QT * KT],
        dy: vec![0.0; QT * KT],
        kept: vec![0; QT * VECTORS],
        slope: _mm512_setzero_ps(),
        slope_sum: 0.0,
    };
    // K's and V's rows as the packing reads them (in place, or their f32 copies), for the
    // hints below.
    let [k_rows, v_rows] =
        [(&env.k.0, env.k.1, d), (&v, v_stride, dv)].map(|(x, row_stride, cols)| Operand {
            data: Elements::F32(x),
            rows: n,
            cols,
            row_stride,
        });
    // dK and dV hold the part's keys only.
    let key_row0 = part.tiles.start * KT;
    for (t, visits) in by_key_tile(call).into_iter().enumerate() {
        if !part.tiles.contains(&t) {
            continue;
        }
        let j0 = t * KT;
        let kn = KT.min(n - j0);
        // The tile's keys in dK or dV (`cols` per key).
        let tile_rows = |cols: usize| (j0 - key_row0) * cols..(j0 - key_row0 + kn) * cols;
        if visits.is_empty() {
            // No query reaches these keys: their gradients are zero.
            for (g, cols) in [(grads.dk.as_deref_mut(), d), (grads.dv.as_deref_mut(), dv)] {
                if let Some(g) = g {
                    g[tile_rows(cols)].fill(0.0);
                }
            }
            continue;
        }
        // Kᵀ and Vᵀ of the tile, keys past n zero. Kᵀ carries the scale in base 2, so that the
        // products are the scores `x` the exponentials take.
        // SAFETY: AVX-512 is present (the caller's contract).
        unsafe {
            pack_t(&env.k.0, env.k.1, j0, kn, d, &mut scratch.kt);
            pack_t(&v, v_stride, j0, kn, dv, &mut scratch.vt);
        }
        scratch.kt.iter_mut().for_each(|x| *x *= env.form.q_scale);
        scratch.dkt.fill(0.0);
        scratch.dvt.fill(0.0);
        // The next key tile's K and V rows are hinted towards L2 a share per pair, so that its
        // packing does not wait on L3 (a window's key tile has only a few pairs to hide it).
        let next_keys = (j0 + KT).min(n)..(j0 + 2 * KT).min(n);
        let share = next_keys.len().div_ceil(visits.len());
        for (p, (qtile, partial)) in visits.into_iter().enumerate() {
            let ahead = next_keys.start + p * share..(next_keys.start + (p + 1) * share).min(n);
            prefetch_rows(&k_rows, ahead.clone());
            prefetch_rows(&v_rows, ahead);
            // SAFETY: the caller's contract; the table lists tiles inside m and n.
            unsafe {
                pair(
                    &env,
                    &mut scratch,
                    masks.as_mut(),
                    grads,
                    (qtile * QT, j0, kn),
                    partial,
                )
            };
        }
        // The tile's dK and dV rows, transposed back; dK takes the score scale its products
        // left out.
        scratch.dkt.iter_mut().for_each(|x| *x *= env.scale);
        for (g, acc, cols) in [
            (grads.dk.as_deref_mut(), &scratch.dkt, d),
            (grads.dv.as_deref_mut(), &scratch.dvt, dv),
        ] {
            if let Some(g) = g {
                // SAFETY: AVX-512 is present (the caller's contract).
                unsafe { unpack_t(acc, kn, cols, &mut g[tile_rows(cols)]) };
            }
        }
    }
    // dQ takes the score scale its products left out.
    if let Some(dq) = grads.dq.as_deref_mut() {
        dq.iter_mut().for_each(|x| *x *= env.scale);
    }
    if let Some(s) = grads.dslope.as_deref_mut() {
        *s += scratch.slope_sum as f32;
    }
}

/// `out[c·64 + jj] = x[(j0 + jj)·stride + c]` for `jj < kn`, 0 for `kn ≤ jj < 64`.
///
/// # Safety
/// AVX-512 is present.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pack_t(x: &[f32], stride: usize, j0: usize, kn: usize, cols: usize, out: &mut [f32]) {
    assert!(
        out.len() >= cols * KT && kn <= KT && (kn == 0 || (j0 + kn - 1) * stride + cols <= x.len()),
        "invariant: a key tile inside its operand"
    );
    for jb in (0..KT).step_by(LANES) {
        let rows = kn.saturating_sub(jb).min(LANES);
        for cb in (0..cols).step_by(LANES) {
            let at = ((j0 + jb) * stride + cb).min(x.len());
            // SAFETY: rows jb..jb + rows < kn of the tile, columns cb.. (at most 16, < cols)
            // are inside x (checked above); out's rows cb.. hold 64 from lane jb. Without rows,
            // nothing is read.
            unsafe {
                transpose_piece(
                    x.as_ptr().add(at),
                    stride,
                    (rows, (cols - cb).min(LANES)),
                    out.as_mut_ptr().add(cb * KT + jb),
                    KT,
                    true,
                )
            };
        }
    }
}

/// `rows[jj·cols + c] = acc[c·64 + jj]` for `jj < kn`, `c < cols`: a key tile's accumulated
/// `dKᵀ` or `dVᵀ` back as rows.
///
/// # Safety
/// AVX-512 is present.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn unpack_t(acc: &[f32], kn: usize, cols: usize, rows: &mut [f32]) {
    assert!(
        acc.len() >= cols * KT && kn <= KT && rows.len() >= kn * cols,
        "invariant: a key tile's accumulators"
    );
    for cb in (0..cols).step_by(LANES) {
        for jb in (0..kn).step_by(LANES) {
            // SAFETY: accumulator rows cb.. (at most 16, < cols), lanes jb.. (< kn); output
            // rows jb.. (< kn), columns cb.. of the same counts.
            unsafe {
                transpose_piece(
                    acc.as_ptr().add(cb * KT + jb),
                    KT,
                    ((cols - cb).min(LANES), (kn - jb).min(LANES)),
                    rows.as_mut_ptr().add(jb * cols + cb),
                    cols,
                    false,
                )
            };
        }
    }
}

/// One (query tile, key tile) pair: rows from `i0`, keys `j0..j0 + kn`.
///
/// # Safety
/// AVX-512 is present; the rows and keys lie inside the call.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pair(
    env: &Env<'_>,
    scratch: &mut Scratch,
    masks: Option<&mut super::mask::MaskBuffers>,
    grads: &mut Gradients<'_>,
    (i0, j0, kn): (usize, usize, usize),
    partial: bool,
) {
    let (m, d, dv) = (env.m, env.d, env.dv);
    let qn = QT.min(m - i0);
    let (q, qs) = (&env.q.0, env.q.1);
    let (k, ks) = (&env.k.0, env.k.1);
    // dQ's first rows, read last (the others are fetched block by block in `accumulate_dq`).
    if let Some(dq) = grads.dq.as_deref() {
        let at = (i0 - env.dq_row0) * d;
        micro::hint_rows(dq.get(at..).unwrap_or_default(), 4, d);
    }
    let need_dy =
        grads.dq.is_some() || grads.dk.is_some() || grads.dbias.is_some() || grads.dslope.is_some();
    // Element masks: the table's (partial tiles) and rows that keep nothing.
    let empty_rows = (0..qn).any(|r| env.lse2[i0 + r] == f32::NEG_INFINITY);
    let masked = partial || empty_rows;
    // A full tile without score options or bias and slope gradients computes P and dY with
    // the products (steps 1 and 2 in one kernel).
    let fused = !masked
        && kn == KT
        && !env.form.has_options()
        && grads.dbias.is_none()
        && grads.dslope.is_none();
    // 1. S and dP (or P and dY). The kept positions of a pair not fused come first: a masked
    // tile's products skip the key vectors its rows do not reach. SAFETY (all): rows i0.. of
    // Q (d each) and dO (dv each) lie inside them; the packed tiles hold d·64 and dv·64; the
    // output tiles 64·64; the statistics' rows are qn; the masks qn·4.
    unsafe {
        if !fused {
            kept_positions(env, scratch, masks, (i0, j0, kn), partial);
        }
        if masked {
            let kept = &scratch.kept[..qn * VECTORS];
            let (q, d_o) = (q.as_ptr().add(i0 * qs), env.d_o.as_ptr().add(i0 * dv));
            products_kept(q, qs, &scratch.kt, d, qn, &mut scratch.s, kept);
            if need_dy {
                products_kept(d_o, dv, &scratch.vt, dv, qn, &mut scratch.dp, kept);
            }
        } else if fused && need_dy {
            scores_and_grads(
                (q.as_ptr().add(i0 * qs), qs, &scratch.kt, d),
                (env.d_o.as_ptr().add(i0 * dv), dv, &scratch.vt, dv),
                qn,
                (&env.lse2[i0..i0 + qn], &env.dd[i0..i0 + qn]),
                &mut scratch.s,
                &mut scratch.dy,
            );
        } else {
            let end = match fused {
                true => Epilogue::Probabilities {
                    lse2: &env.lse2[i0..i0 + qn],
                },
                false => Epilogue::Raw,
            };
            products(
                q.as_ptr().add(i0 * qs),
                qs,
                &scratch.kt,
                d,
                qn,
                &mut scratch.s,
                end,
            );
            if need_dy {
                let d_o = env.d_o.as_ptr().add(i0 * dv);
                products(d_o, dv, &scratch.vt, dv, qn, &mut scratch.dp, Epilogue::Raw);
            }
        }
    }
    if !fused {
        // SAFETY: the caller's contract.
        unsafe { elementwise(env, scratch, grads, (i0, j0, kn), need_dy) };
    }
    // 3. The three accumulating products.
    let kept = &scratch.kept[..qn * VECTORS];
    if grads.dv.is_some() {
        // SAFETY: dO rows i0..i0+qn (dv each); dVᵀ holds dv·64; P holds qn·64.
        unsafe {
            let d_o = env.d_o.as_ptr().add(i0 * dv);
            match masked {
                true => accumulate_t_kept(&mut scratch.dvt, d_o, dv, dv, &scratch.s, qn, kept),
                false => accumulate_t(&mut scratch.dvt, d_o, dv, dv, &scratch.s, qn, None),
            }
        };
    }
    if grads.dk.is_some() {
        // SAFETY: Q rows i0..i0+qn (d each); dKᵀ holds d·64; dY holds qn·64.
        unsafe {
            let q = q.as_ptr().add(i0 * qs);
            match masked {
                true => accumulate_t_kept(&mut scratch.dkt, q, qs, d, &scratch.dy, qn, kept),
                false => accumulate_t(&mut scratch.dkt, q, qs, d, &scratch.dy, qn, None),
            }
        };
    }
    if let Some(dq) = grads.dq.as_deref_mut() {
        // SAFETY: dQ rows i0..i0+qn lie inside dq (its rows from `dq_row0`, which cover
        // every query tile visiting the part's keys: checked by `run_part`); K rows
        // j0..j0+kn inside K.
        let at = i0 - env.dq_row0;
        unsafe {
            accumulate_dq(
                &mut dq[at * d..(at + qn) * d],
                d,
                &scratch.dy,
                k.as_ptr().add(j0 * ks),
                ks,
                kn,
                masked.then_some(kept),
            )
        };
    }
}

/// The kept positions of a pair into `scratch.kept` (`kept[r·4 + v]`, one bit per key of key
/// vector `v` of row `r`): keys inside the call, rows that keep some key, and the element
/// masks on partial tiles.
///
/// # Safety
/// AVX-512 is present; the rows and keys lie inside the call.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn kept_positions(
    env: &Env<'_>,
    scratch: &mut Scratch,
    masks: Option<&mut super::mask::MaskBuffers>,
    (i0, j0, kn): (usize, usize, usize),
    partial: bool,
) {
    let (m, n) = (env.m, env.n);
    let qn = QT.min(m - i0);
    let element = match (partial, env.program.as_ref(), masks) {
        (true, Some(p), Some(buffers)) => {
            let at = |f: usize| (i0 + f) as i64 + n as i64 - m as i64;
            // SAFETY: qn ≤ 64 rows fit the buffers of 64·4 masks.
            Some(unsafe { p.eval(buffers, LaneAxis::Keys, at, qn, j0 as i64, VECTORS) })
        }
        _ => None,
    };
    let valid: [__mmask16; VECTORS] =
        std::array::from_fn(|v| first_lanes(kn.saturating_sub(v * LANES)));
    for r in 0..qn {
        let row_ok: __mmask16 = if env.lse2[i0 + r] == f32::NEG_INFINITY {
            0
        } else {
            0xffff
        };
        for v in 0..VECTORS {
            let mut kept = valid[v] & row_ok;
            if let Some(e) = element {
                kept &= e[r * VECTORS + v];
            }
            scratch.kept[r * VECTORS + v] = kept;
        }
    }
}

/// Step 2 of a pair where it is not fused into the products: per row, `x` (bias, ALiBi,
/// softcap) from `S`, `P` in place of `S`, `dY` from `dP`, zero where not kept
/// (`scratch.kept`, from [`kept_positions`]); bias and slope gradients accumulated.
///
/// # Safety
/// AVX-512 is present; the rows and keys lie inside the call; `scratch.kept` holds the pair's
/// kept positions.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn elementwise(
    env: &Env<'_>,
    scratch: &mut Scratch,
    grads: &mut Gradients<'_>,
    (i0, j0, kn): (usize, usize, usize),
    need_dy: bool,
) {
    let qn = QT.min(env.m - i0);
    let valid: [__mmask16; VECTORS] =
        std::array::from_fn(|v| first_lanes(kn.saturating_sub(v * LANES)));
    let (brs, bcs) = env.form.bias_strides();
    for r in 0..qn {
        let i = i0 + r;
        let from = env.origins.get(i).copied().unwrap_or(0);
        let (lse, dd) = (_mm512_set1_ps(env.lse2[i]), _mm512_set1_ps(env.dd[i]));
        for v in 0..VECTORS {
            let kept = scratch.kept[r * VECTORS + v];
            let at = r * KT + v * LANES;
            let j = j0 + v * LANES;
            // SAFETY: `at + 16 ≤ 64·64`; bias elements are read for valid keys only.
            unsafe {
                let mut x = _mm512_loadu_ps(scratch.s.as_ptr().add(at));
                if env.form.has_options() {
                    let distances = Distances::Along {
                        start: j as i64 - from,
                        step: 1,
                    };
                    x = env
                        .form
                        .apply(x, i * brs + j * bcs, bcs, valid[v], distances);
                }
                let p = _mm512_maskz_mov_ps(kept, exp2(_mm512_sub_ps(x, lse)));
                // P replaces S in place (dV reads it); dY goes to its own tile.
                _mm512_storeu_ps(scratch.s.as_mut_ptr().add(at), p);
                if !need_dy {
                    continue;
                }
                let dp = _mm512_loadu_ps(scratch.dp.as_ptr().add(at));
                let mut dy = _mm512_mul_ps(p, _mm512_sub_ps(dp, dd));
                if let Some((_, inv)) = env.cap {
                    let t = _mm512_mul_ps(x, _mm512_set1_ps(inv));
                    dy = _mm512_mul_ps(dy, _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.0)));
                }
                let dy = _mm512_maskz_mov_ps(kept, dy);
                if let Some(b) = grads.dbias.as_mut() {
                    add_bias(b, i, j, kept, dy);
                }
                if grads.dslope.is_some() {
                    let iota =
                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                    let dist = _mm512_add_ps(
                        _mm512_set1_ps((j as i64 - from) as f32),
                        _mm512_cvtepi32_ps(iota),
                    );
                    scratch.slope = _mm512_fmadd_ps(dy, dist, scratch.slope);
                }
                _mm512_storeu_ps(scratch.dy.as_mut_ptr().add(at), dy);
            }
        }
    }
    if grads.dslope.is_some() {
        scratch.slope_sum += f64::from(_mm512_reduce_add_ps(scratch.slope));
        scratch.slope = _mm512_setzero_ps();
    }
}

/// Adds `dy` (the kept lanes, keys `j..j + 16` of row `i`) into the bias gradient.
///
/// # Safety
/// AVX-512 is present; the kept lanes' elements lie inside the gradient (checked by
/// `crate::backward::check` for every position of the call).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn add_bias(
    b: &mut crate::backward::BiasGrad<'_>,
    i: usize,
    j: usize,
    kept: __mmask16,
    dy: __m512,
) {
    if kept == 0 {
        return;
    }
    let at = i * b.row_stride + j * b.col_stride;
    match b.col_stride {
        0 => b.data[at] += _mm512_reduce_add_ps(dy),
        1 => {
            // SAFETY: the kept lanes' elements lie inside the gradient.
            unsafe {
                let p = b.data.as_mut_ptr().add(at);
                let old = _mm512_maskz_loadu_ps(kept, p);
                _mm512_mask_storeu_ps(p, kept, _mm512_add_ps(old, dy));
            }
        }
        cs => {
            let mut lanes = [0.0f32; LANES];
            // SAFETY: 16 f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), dy) };
            for (l, x) in lanes.iter().enumerate() {
                if kept >> l & 1 == 1 {
                    b.data[at + l * cs] += x;
                }
            }
        }
    }
}
