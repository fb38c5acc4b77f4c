//! The register-blocked FMA micro-kernels of the backward (see [`super`]): each keeps 16
//! accumulators (4 rows or columns × 4 vectors of 16 keys or columns), broadcasts one element
//! per 4 FMAs and loads each vector of the other operand once per step.
//!
//! On a full tile without score options the probabilities `P` and the score gradients `dY`
//! come out of the products themselves ([`scores_and_grads`], or [`Epilogue::Probabilities`]
//! where no `dY` is needed): no tile of `dP` is stored and read back, and raw scores only
//! until their exponentials, a few steps later.

// Register arrays indexed by constant loop bounds.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::super::mask::{kept_band, VECTORS};
use super::super::math::exp2;
use super::super::widen::first_lanes;
use super::super::KEY_TILE;

const LANES: usize = 16;
const KT: usize = KEY_TILE;

/// What [`products`] stores of each finished accumulator `x` of row `r` (rows counted from
/// the first row given).
#[derive(Clone, Copy, Debug)]
pub(super) enum Epilogue<'a> {
    /// `x` itself.
    Raw,
    /// The probability `P = 2^(x − lse₂[r])` (scores without options, `Kᵀ` packed times the
    /// scale in base 2).
    Probabilities {
        /// Each row's log-sum-exp in base 2.
        lse2: &'a [f32],
    },
}

/// `out[r·64 + key] = Σ_c a[r·stride + c] · bt[c·64 + key]` for `r < rows` (as `epilogue`
/// transforms it), four rows at a time.
///
/// # Safety
/// AVX-512 is present; `a` has `rows` rows of `depth` readable f32, `stride` apart; `bt` holds
/// `depth·64` and `out` `rows·64`; the epilogue's slices hold `rows` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn products(
    a: *const f32,
    stride: usize,
    bt: &[f32],
    depth: usize,
    rows: usize,
    out: &mut [f32],
    epilogue: Epilogue<'_>,
) {
    assert!(
        bt.len() >= depth * KT && out.len() >= rows * KT,
        "invariant: tile sizes"
    );
    assert!(
        match epilogue {
            Epilogue::Raw => true,
            Epilogue::Probabilities { lse2 } => lse2.len() >= rows,
        },
        "invariant: a statistic per row"
    );
    let mut r = 0;
    while r < rows {
        let (a, o) = (a.wrapping_add(r * stride), out[r * KT..].as_mut_ptr());
        let from = epilogue.rows_from(r);
        // SAFETY (all four): rows r.. exist in `a`; `o` holds (rows − r)·64; the epilogue's
        // rows from r exist (checked above).
        unsafe {
            match rows - r {
                1 => rows_by_keys::<1, VECTORS>(a, stride, bt.as_ptr(), depth, o, from),
                2 => rows_by_keys::<2, VECTORS>(a, stride, bt.as_ptr(), depth, o, from),
                3 => rows_by_keys::<3, VECTORS>(a, stride, bt.as_ptr(), depth, o, from),
                _ => rows_by_keys::<4, VECTORS>(a, stride, bt.as_ptr(), depth, o, from),
            }
        }
        r += 4;
    }
}

impl Epilogue<'_> {
    /// The epilogue of the rows from `r` on.
    fn rows_from(self, r: usize) -> Self {
        match self {
            Epilogue::Raw => Epilogue::Raw,
            Epilogue::Probabilities { lse2 } => Epilogue::Probabilities { lse2: &lse2[r..] },
        }
    }
}

/// `R` rows of [`products`].
///
/// # Safety
/// As [`products`] for `R` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn rows_by_keys<const R: usize, const KV: usize>(
    a: *const f32,
    stride: usize,
    bt: *const f32,
    depth: usize,
    out: *mut f32,
    epilogue: Epilogue<'_>,
) {
    // SAFETY: as the caller's.
    let mut acc = unsafe { products_block::<R, KV>(a, stride, bt, depth, |_| {}) };
    // The same operations, in the same order, as the per-element pass of partial tiles.
    if let Epilogue::Probabilities { lse2 } = epilogue {
        for r in 0..R {
            let lse = _mm512_set1_ps(lse2[r]);
            for v in 0..KV {
                acc[r][v] = exp2(_mm512_sub_ps(acc[r][v], lse));
            }
        }
    }
    for r in 0..R {
        for v in 0..KV {
            // SAFETY: r < R, v < KV ≤ 4: inside the R·64 of `out`.
            unsafe { _mm512_storeu_ps(out.add(r * KT + v * LANES), acc[r][v]) };
        }
    }
}

/// `acc_t[c·64 + key] += Σ_r a[r·stride + c] · p[r·64 + key]` for `c < cols`, `r < rows`;
/// with `kept`, only kept positions (`kept[r·4 + v]`) are added.
///
/// # Safety
/// AVX-512 is present; `a` has `rows` rows of `cols` readable f32, `stride` apart; `acc_t`
/// holds `cols·64`, `p` `rows·64`, `kept` (when given) `rows·4`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn accumulate_t(
    acc_t: &mut [f32],
    a: *const f32,
    stride: usize,
    cols: usize,
    p: &[f32],
    rows: usize,
    kept: Option<&[u16]>,
) {
    assert!(
        acc_t.len() >= cols * KT && p.len() >= rows * KT,
        "invariant: tile sizes"
    );
    assert!(
        kept.is_none_or(|k| k.len() >= rows * VECTORS),
        "invariant: masks"
    );
    let mut c = 0;
    while c < cols {
        let (a, out) = (a.wrapping_add(c), acc_t[c * KT..].as_mut_ptr());
        // SAFETY (all): columns c.. exist; `out` holds (cols − c)·64.
        unsafe {
            match (cols - c, kept) {
                (1, None) => columns::<1, VECTORS, false>(out, a, stride, p.as_ptr(), rows, &[]),
                (2, None) => columns::<2, VECTORS, false>(out, a, stride, p.as_ptr(), rows, &[]),
                (3, None) => columns::<3, VECTORS, false>(out, a, stride, p.as_ptr(), rows, &[]),
                (_, None) => columns::<4, VECTORS, false>(out, a, stride, p.as_ptr(), rows, &[]),
                (1, Some(k)) => columns::<1, VECTORS, true>(out, a, stride, p.as_ptr(), rows, k),
                (2, Some(k)) => columns::<2, VECTORS, true>(out, a, stride, p.as_ptr(), rows, k),
                (3, Some(k)) => columns::<3, VECTORS, true>(out, a, stride, p.as_ptr(), rows, k),
                (_, Some(k)) => columns::<4, VECTORS, true>(out, a, stride, p.as_ptr(), rows, k),
            }
        }
        c += 4;
    }
}

/// `C` columns of [`accumulate_t`].
///
/// # Safety
/// As [`accumulate_t`] for `C` columns.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn columns<const C: usize, const KV: usize, const KEPT: bool>(
    out: *mut f32,
    a: *const f32,
    stride: usize,
    p: *const f32,
    rows: usize,
    kept: &[u16],
) {
    let mut acc = [[_mm512_setzero_ps(); KV]; C];
    for cc in 0..C {
        for v in 0..KV {
            // SAFETY: cc < C, v < 4: inside `out`.
            acc[cc][v] = unsafe { _mm512_loadu_ps(out.add(cc * KT + v * LANES)) };
        }
    }
    for r in 0..rows {
        // SAFETY: r < rows: row r of P and of `a` (C columns) exist.
        unsafe {
            let pv: [__m512; KV] =
                std::array::from_fn(|v| _mm512_loadu_ps(p.add(r * KT + v * LANES)));
            for cc in 0..C {
                let x = _mm512_set1_ps(*a.add(r * stride + cc));
                for v in 0..KV {
                    acc[cc][v] = if KEPT {
                        _mm512_mask3_fmadd_ps(x, pv[v], acc[cc][v], kept[r * VECTORS + v])
                    } else {
                        _mm512_fmadd_ps(x, pv[v], acc[cc][v])
                    };
                }
            }
        }
    }
    for cc in 0..C {
        for v in 0..KV {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(out.add(cc * KT + v * LANES), acc[cc][v]) };
        }
    }
}

/// Fetches the cache lines of the first `rows` rows of `cols` values of `x` (those inside it)
/// into L1.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn hint_rows(x: &[f32], rows: usize, cols: usize) {
    let end = (rows * cols).min(x.len());
    let mut at = 0;
    while at < end {
        // A prefetch reads nothing and cannot fault.
        _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().wrapping_add(at).cast());
        at += LANES;
    }
    if end > 0 {
        _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().wrapping_add(end - 1).cast());
    }
}

/// `dq[r·cols + c] += Σ_key ds[r·64 + key] · k[key·stride + c]` for the rows of `dq`
/// (`cols` each) and `key < keys`; with `kept`, only kept positions are added.
///
/// # Safety
/// AVX-512 is present; `k` has `keys` rows of `cols` readable f32, `stride` apart; `ds` holds
/// `rows·64` and `kept` (when given) `rows·4`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn accumulate_dq(
    dq: &mut [f32],
    cols: usize,
    ds: &[f32],
    k: *const f32,
    stride: usize,
    keys: usize,
    kept: Option<&[u16]>,
) {
    let rows = dq.len() / cols.max(1);
    assert!(ds.len() >= rows * KT, "invariant: tile sizes");
    assert!(
        kept.is_none_or(|m| m.len() >= rows * VECTORS),
        "invariant: masks"
    );
    let mut r = 0;
    while r < rows {
        // dQ's rows come from L3 (a key tile's pairs pass every query tile): the next block's
        // are fetched while this one computes.
        hint_rows(&dq[((r + 4) * cols).min(dq.len())..], 4, cols);
        let n = (rows - r).min(4);
        let (out, d) = (dq[r * cols..].as_mut_ptr(), ds[r * KT..].as_ptr());
        let kept = kept.map(|m| &m[r * VECTORS..]);
        let mut c = 0;
        while c < cols {
            let lanes: [__mmask16; VECTORS] =
                std::array::from_fn(|v| first_lanes((cols - c).saturating_sub(v * LANES)));
            let (o, kc) = (out.wrapping_add(c), k.wrapping_add(c));
            // SAFETY (all): n rows of dq from `out`; columns c.. under `lanes`; keys < keys.
            unsafe {
                match (n, kept) {
                    (1, None) => dq_block::<1, false>(o, cols, d, kc, stride, keys, lanes, &[]),
                    (2, None) => dq_block::<2, false>(o, cols, d, kc, stride, keys, lanes, &[]),
                    (3, None) => dq_block::<3, false>(o, cols, d, kc, stride, keys, lanes, &[]),
                    (_, None) => dq_block::<4, false>(o, cols, d, kc, stride, keys, lanes, &[]),
                    (1, Some(m)) => dq_block::<1, true>(o, cols, d, kc, stride, keys, lanes, m),
                    (2, Some(m)) => dq_block::<2, true>(o, cols, d, kc, stride, keys, lanes, m),
                    (3, Some(m)) => dq_block::<3, true>(o, cols, d, kc, stride, keys, lanes, m),
                    (_, Some(m)) => dq_block::<4, true>(o, cols, d, kc, stride, keys, lanes, m),
                }
            }
            c += KT;
        }
        r += 4;
    }
}

/// `R` rows × up to 64 columns (the lanes in `lanes`) of [`accumulate_dq`].
///
/// # Safety
/// As [`accumulate_dq`] for `R` rows; the lanes of `lanes` are the readable columns.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dq_block<const R: usize, const KEPT: bool>(
    out: *mut f32,
    cols: usize,
    ds: *const f32,
    k: *const f32,
    stride: usize,
    keys: usize,
    lanes: [__mmask16; VECTORS],
    kept: &[u16],
) {
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
    for r in 0..R {
        for v in 0..VECTORS {
            // SAFETY: only the readable columns of row r load.
            acc[r][v] = unsafe { _mm512_maskz_loadu_ps(lanes[v], out.add(r * cols + v * LANES)) };
        }
    }
    for key in 0..keys {
        // SAFETY: key < keys: its row's columns under `lanes` are readable.
        unsafe {
            let kv: [__m512; VECTORS] = std::array::from_fn(|v| {
                _mm512_maskz_loadu_ps(lanes[v], k.add(key * stride + v * LANES))
            });
            for r in 0..R {
                if KEPT && kept[r * VECTORS + key / LANES] >> (key % LANES) & 1 == 0 {
                    continue;
                }
                let x = _mm512_set1_ps(*ds.add(r * KT + key));
                for v in 0..VECTORS {
                    acc[r][v] = _mm512_fmadd_ps(x, kv[v], acc[r][v]);
                }
            }
        }
    }
    for r in 0..R {
        for v in 0..VECTORS {
            // SAFETY: as for the loads.
            unsafe { _mm512_mask_storeu_ps(out.add(r * cols + v * LANES), lanes[v], acc[r][v]) };
        }
    }
}

/// Calls `$f::<$n, KV>` (then the arguments) for `KV` = `$kv` (1 to 4).
macro_rules! by_key_vectors {
    ($kv:expr, $f:ident::<$n:literal $(, $rest:tt)*>($($arg:expr),*)) => {
        match $kv {
            1 => $f::<$n, 1 $(, $rest)*>($($arg),*),
            2 => $f::<$n, 2 $(, $rest)*>($($arg),*),
            3 => $f::<$n, 3 $(, $rest)*>($($arg),*),
            _ => $f::<$n, 4 $(, $rest)*>($($arg),*),
        }
    };
}

/// The raw score products ([`products`] with [`Epilogue::Raw`]) of a masked tile: per block of
/// 4 rows, only the key vectors one of its rows keeps (`kept[r·4 + v]`, `rows·4` of them).
/// Scores outside are not written; the element pass masks them.
///
/// # Safety
/// As [`products`]; `kept` holds `rows·4` masks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn products_kept(
    a: *const f32,
    stride: usize,
    bt: &[f32],
    depth: usize,
    rows: usize,
    out: &mut [f32],
    kept: &[u16],
) {
    assert!(
        bt.len() >= depth * KT && out.len() >= rows * KT && kept.len() >= rows * VECTORS,
        "invariant: tile sizes"
    );
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(4);
        let (band, _) = kept_band(kept, r..r + n, VECTORS);
        if !band.is_empty() {
            let at = band.start * LANES;
            let (a, b) = (a.wrapping_add(r * stride), bt[at..].as_ptr());
            let o = out[r * KT + at..].as_mut_ptr();
            let (kv, raw) = (band.len(), Epilogue::Raw);
            // SAFETY (all): rows r..r + n of `a`; key vectors from band.start of each packed
            // row and of each output row, band.len() ≤ 4 − band.start of them.
            unsafe {
                match n {
                    1 => by_key_vectors!(kv, rows_by_keys::<1>(a, stride, b, depth, o, raw)),
                    2 => by_key_vectors!(kv, rows_by_keys::<2>(a, stride, b, depth, o, raw)),
                    3 => by_key_vectors!(kv, rows_by_keys::<3>(a, stride, b, depth, o, raw)),
                    _ => by_key_vectors!(kv, rows_by_keys::<4>(a, stride, b, depth, o, raw)),
                }
            }
        }
        r += 4;
    }
}

/// [`accumulate_t`] of a masked tile (`kept` given): rows in bands of 16, each over only the
/// key vectors one of its rows keeps. The sums are those of [`accumulate_t`], in the same
/// order.
///
/// # Safety
/// As [`accumulate_t`] with `kept` (`rows·4` masks).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn accumulate_t_kept(
    acc_t: &mut [f32],
    a: *const f32,
    stride: usize,
    cols: usize,
    p: &[f32],
    rows: usize,
    kept: &[u16],
) {
    assert!(
        acc_t.len() >= cols * KT && p.len() >= rows * KT && kept.len() >= rows * VECTORS,
        "invariant: tile sizes"
    );
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + LANES).min(rows);
        let (band, _) = kept_band(kept, r0..r1, VECTORS);
        if !band.is_empty() {
            let (at, kv) = (band.start * LANES, band.len());
            let (p, k) = (
                p[r0 * KT + at..].as_ptr(),
                &kept[r0 * VECTORS + band.start..],
            );
            let mut c = 0;
            while c < cols {
                let (out, a) = (
                    acc_t[c * KT + at..].as_mut_ptr(),
                    a.wrapping_add(r0 * stride + c),
                );
                let n = r1 - r0;
                // SAFETY (all): columns c.. (at most 4) of rows r0..r1; key vectors from
                // band.start of each accumulator, P and mask row.
                unsafe {
                    match cols - c {
                        1 => by_key_vectors!(kv, columns::<1, true>(out, a, stride, p, n, k)),
                        2 => by_key_vectors!(kv, columns::<2, true>(out, a, stride, p, n, k)),
                        3 => by_key_vectors!(kv, columns::<3, true>(out, a, stride, p, n, k)),
                        _ => by_key_vectors!(kv, columns::<4, true>(out, a, stride, p, n, k)),
                    }
                }
                c += 4;
            }
        }
        r0 = r1;
    }
}

/// The probabilities and score gradients of a full tile without score options, four rows
/// at a time: `P = 2^(S − lse₂[r])` for `S = Q Kᵀ` (`Kᵀ` packed times the scale in base 2)
/// into `p`, and `dY = P (dP − D[r])` for `dP = dO Vᵀ` into `dy` (both `rows·64`; the score
/// gradient is `dY` times the scale, which the gradients of Q and K take once at the end).
/// Each block's `P` is computed while its `dP` products run, a vector every 4 steps, so the
/// exponentials fill the FMA pipes between products instead of stalling them at the block's
/// end; and a block reads `Kᵀ` and `Vᵀ` together, which stay in L1 across the tile's blocks.
///
/// # Safety
/// AVX-512 is present; `q` has `rows` rows of `depth` readable f32 (`q_stride` apart), `d_o`
/// `rows` rows of `dv_depth` (`do_stride` apart); `kt` holds `depth·64`, `vt` `dv_depth·64`;
/// `lse2` and `dd` hold `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn scores_and_grads(
    (q, q_stride, kt, depth): (*const f32, usize, &[f32], usize),
    (d_o, do_stride, vt, dv_depth): (*const f32, usize, &[f32], usize),
    rows: usize,
    (lse2, dd): (&[f32], &[f32]),
    p: &mut [f32],
    dy: &mut [f32],
) {
    assert!(
        kt.len() >= depth * KT
            && vt.len() >= dv_depth * KT
            && p.len() >= rows * KT
            && dy.len() >= rows * KT
            && lse2.len() >= rows
            && dd.len() >= rows,
        "invariant: tile sizes"
    );
    let mut r = 0;
    while r < rows {
        let qa = (q.wrapping_add(r * q_stride), q_stride, kt.as_ptr(), depth);
        let da = (
            d_o.wrapping_add(r * do_stride),
            do_stride,
            vt.as_ptr(),
            dv_depth,
        );
        let stats = (&lse2[r..], &dd[r..]);
        let (pb, dyb) = (p[r * KT..].as_mut_ptr(), dy[r * KT..].as_mut_ptr());
        // SAFETY (all four): rows r.. exist in Q, dO and the statistics; `pb` and `dyb` hold
        // (rows − r)·64.
        unsafe {
            match rows - r {
                1 => score_block::<1>(qa, da, stats, pb, dyb),
                2 => score_block::<2>(qa, da, stats, pb, dyb),
                3 => score_block::<3>(qa, da, stats, pb, dyb),
                _ => score_block::<4>(qa, da, stats, pb, dyb),
            }
        }
        r += 4;
    }
}

/// `R` rows of [`scores_and_grads`].
///
/// # Safety
/// As [`scores_and_grads`] for `R` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn score_block<const R: usize>(
    (q, q_stride, kt, depth): (*const f32, usize, *const f32, usize),
    (d_o, do_stride, vt, dv_depth): (*const f32, usize, *const f32, usize),
    (lse2, dd): (&[f32], &[f32]),
    p: *mut f32,
    dy: *mut f32,
) {
    // S, stored raw; its probabilities follow during the dP products.
    let s = products_block::<R, VECTORS>(q, q_stride, kt, depth, |_| {});
    for r in 0..R {
        for v in 0..VECTORS {
            // SAFETY: r < R, v < 4: inside the R·64 of `p`.
            unsafe { _mm512_storeu_ps(p.add(r * KT + v * LANES), s[r][v]) };
        }
    }
    // Vector `e` of the block (row e / 4, key vector e % 4): S → P in place. The same
    // operations, in the same order, as the per-element pass of partial tiles.
    let probability = |e: usize| {
        let at = (e / VECTORS) * KT + (e % VECTORS) * LANES;
        let lse = _mm512_set1_ps(lse2[e / VECTORS]);
        // SAFETY: e < R·4: inside the R·64 of `p`.
        unsafe {
            let x = _mm512_sub_ps(_mm512_loadu_ps(p.add(at)), lse);
            _mm512_storeu_ps(p.add(at), exp2(x));
        }
    };
    let mut done = 0;
    let dp = products_block::<R, VECTORS>(d_o, do_stride, vt, dv_depth, |c| {
        if c % 4 == 3 && done < R * VECTORS {
            probability(done);
            done += 1;
        }
    });
    for e in done..R * VECTORS {
        probability(e);
    }
    for r in 0..R {
        let d = _mm512_set1_ps(dd[r]);
        for v in 0..VECTORS {
            let at = r * KT + v * LANES;
            // SAFETY: r < R, v < 4: inside the R·64 of `p` and `dy`.
            unsafe {
                let pv = _mm512_loadu_ps(p.add(at));
                _mm512_storeu_ps(dy.add(at), _mm512_mul_ps(pv, _mm512_sub_ps(dp[r][v], d)));
            }
        }
    }
}

/// `Σ_c a[r·stride + c] · bt[c·64 + key]` for `R` rows and `KV` vectors of keys, in registers;
/// `between(c)` runs after step `c`.
///
/// # Safety
/// AVX-512 is present; `a` has `R` rows of `depth` readable f32, `stride` apart; `bt` holds
/// `KV` vectors in each of `depth` rows of 64.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn products_block<const R: usize, const KV: usize>(
    a: *const f32,
    stride: usize,
    bt: *const f32,
    depth: usize,
    mut between: impl FnMut(usize),
) -> [[__m512; KV]; R] {
    let mut acc = [[_mm512_setzero_ps(); KV]; R];
    for c in 0..depth {
        // SAFETY: c < depth: row c of the packed tile and element c of each row exist.
        unsafe {
            let b: [__m512; KV] =
                std::array::from_fn(|v| _mm512_loadu_ps(bt.add(c * KT + v * LANES)));
            for r in 0..R {
                let x = _mm512_set1_ps(*a.add(r * stride + c));
                for v in 0..KV {
                    acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
                }
            }
        }
        between(c);
    }
    acc
}
