//! The tile kernel: the query rows of a tile in the lanes.
//!
//! A query tile's 64 rows are four vectors of 16 lanes, so every per-row quantity (scores of
//! one key, running maximum, sum, rescale factor) is one vector per 16 rows and the whole
//! online softmax is vertical: no horizontal reduction anywhere.
//!
//! Per query tile, Q is packed transposed (`Qᵀ[c][row]`, scaled by `scale·log2 e`); per key
//! tile of 64 keys:
//!
//! 1. `Sᵀ[key][row] = Σ_c Qᵀ[c][row]·K[key][c]`: 4 keys × 4 row vectors of accumulators, one
//!    key element broadcast per 4 FMAs, the tile maximum folded into the stores;
//! 2. bias, ALiBi, softcap and element masks (partial tiles only) in one pass over `Sᵀ`;
//! 3. online softmax: new maximum, rescale factor (O is rescaled only when some row's maximum
//!    grew), `Pᵀ = exp2(Sᵀ − max)` in place, row sums;
//! 4. `Oᵀ[c][row] += Σ_key Pᵀ[key][row]·V[key][c]`: 4 columns × 4 row vectors, one value
//!    broadcast per 4 FMAs.
//!
//! K and V are read as rows of f32 with a stride, broadcast one element at a time, so f32
//! operands are read in place whatever their stride; f16/bf16 operands are widened once per
//! call and key tile (lazily, only tiles the table visits) into call scratch. Each row's
//! arithmetic is the same sequence whatever the other lanes hold, so any split of rows gives
//! bit-identical results.

// The micro-kernels index 2-D register arrays by constant loop bounds; iterator forms would
// hide which accumulator meets which operand.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::mask::{LaneAxis, MaskBuffers, MaskProgram, VECTORS};
use super::math::{exp2, exp2_below, exp2_below_constants, EXP2_BELOW_LIMIT};
use super::score::ScoreForm;
use super::widen::{first_lanes, widen_row};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, Operand, Output};

const LANES: usize = 16;

/// Keys per QK micro-kernel step (4 keys × 4 row vectors = 16 accumulators).
const QK_KEYS: usize = 4;

/// Value columns per PV micro-kernel step (4 columns × 4 row vectors = 16 accumulators).
const PV_COLUMNS: usize = 4;

const _: () = assert!(QUERY_TILE == LANES * VECTORS);
const _: () = assert!(KEY_TILE <= LANES * VECTORS);

/// A zeroed f32 buffer whose start is 64-byte aligned (unaligned vector loads are used
/// anyway; alignment only keeps them from splitting cache lines).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Aligned {
        let buf = vec![0.0f32; len + LANES];
        let start = buf.as_ptr().align_offset(64).min(LANES);
        Aligned { buf, start, len }
    }

    fn get(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Rows of f32 the micro-kernels read.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

/// K or V as f32 rows: the operand itself, or a copy widened tile by tile on first use.
enum Source<'a> {
    InPlace(Rows<'a>),
    Widened {
        operand: Operand<'a>,
        data: Vec<f32>,
        done: Vec<bool>,
    },
}

impl<'a> Source<'a> {
    fn new(operand: Operand<'a>) -> Source<'a> {
        match operand.data {
            crate::problem::Elements::F32(data) => Source::InPlace(Rows {
                data,
                stride: operand.row_stride,
            }),
            _ => Source::Widened {
                operand,
                data: vec![0.0; operand.rows * operand.cols],
                done: vec![false; operand.rows.div_ceil(KEY_TILE)],
            },
        }
    }

    /// The rows, with key tile `tile` readable.
    ///
    /// # Safety
    /// AVX-512 is present and the operand passed `problem::check`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn rows(&mut self, tile: usize) -> Rows<'_> {
        match self {
            Source::InPlace(rows) => *rows,
            Source::Widened {
                operand,
                data,
                done,
            } => {
                let cols = operand.cols;
                if !done[tile] && cols > 0 {
                    let end = ((tile + 1) * KEY_TILE).min(operand.rows);
                    for j in tile * KEY_TILE..end {
                        let dst = &mut data[j * cols..(j + 1) * cols];
                        // SAFETY: AVX-512 is present; row j < rows lies inside the operand.
                        unsafe { widen_row(operand.data, j, operand.row_stride, dst, 1.0) };
                    }
                }
                done[tile] = true;
                Rows { data, stride: cols }
            }
        }
    }
}

/// Whether key tile `tile` of V holds only finite values (asked for partial tiles only, where
/// a masked key's `0 · ∞` must not reach the output); cached per call.
struct Finite {
    known: Vec<Option<bool>>,
}

impl Finite {
    fn of(&mut self, v: Rows<'_>, tile: usize, keys: Range<usize>, dv: usize) -> bool {
        *self.known[tile].get_or_insert_with(|| {
            keys.clone().all(|j| {
                v.data[j * v.stride..j * v.stride + dv]
                    .iter()
                    .all(|x| x.is_finite())
            })
        })
    }
}

/// One call's constants.
struct Env<'a, 'c> {
    call: &'c Call<'a>,
    form: ScoreForm<'a>,
    program: Option<&'c MaskProgram>,
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
}

/// One call's scratch.
struct Scratch<'a> {
    /// `Qᵀ[c][row]`, `d × QUERY_TILE`.
    qt: Aligned,
    /// `Sᵀ`, then `Pᵀ`, `[key][row]`, `KEY_TILE × QUERY_TILE`.
    s: Aligned,
    /// `Oᵀ[c][row]`, `dv × QUERY_TILE`.
    o: Aligned,
    /// One widened Q row.
    row: Vec<f32>,
    k: Source<'a>,
    v: Source<'a>,
    finite: Finite,
    masks: Option<MaskBuffers>,
}

/// Per 16 rows of a query tile: running maximum (base 2) and sum.
struct Softmax<const RV: usize> {
    max: [__m512; RV],
    sum: [__m512; RV],
}

/// Computes rows `rows` of `call` into `out`.
///
/// # Safety
/// AVX-512 is present, `problem::check(call, &rows, out)` passed and the tile table has this
/// kernel's tile sizes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn run(
    call: &Call<'_>,
    rows: Range<usize>,
    out: &mut Output<'_>,
    form: ScoreForm<'_>,
    program: Option<&MaskProgram>,
) {
    let env = Env {
        call,
        form,
        program,
        m: call.m(),
        n: call.n(),
        d: call.q.cols,
        dv: call.v.cols,
    };
    let mut scratch = Scratch {
        qt: Aligned::zeros(env.d * QUERY_TILE),
        s: Aligned::zeros(KEY_TILE * QUERY_TILE),
        o: Aligned::zeros(env.dv * QUERY_TILE),
        row: vec![0.0; env.d],
        k: Source::new(call.k),
        v: Source::new(call.v),
        finite: Finite {
            known: vec![None; env.n.div_ceil(KEY_TILE)],
        },
        masks: program.map(|p| p.buffers(KEY_TILE * VECTORS)),
    };
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + QUERY_TILE).min(rows.end);
        let vectors = (r1 - r0).div_ceil(LANES);
        // SAFETY (all four): the caller's contract, passed on; r0 starts a query tile.
        match vectors {
            1 => unsafe { query_tile::<1>(&env, &mut scratch, r0..r1, rows.start, out) },
            2 => unsafe { query_tile::<2>(&env, &mut scratch, r0..r1, rows.start, out) },
            3 => unsafe { query_tile::<3>(&env, &mut scratch, r0..r1, rows.start, out) },
            _ => unsafe { query_tile::<4>(&env, &mut scratch, r0..r1, rows.start, out) },
        }
        r0 = r1;
    }
}

/// Rows `rows` (one query tile, `RV` vectors of lanes) into `out`, whose first row is
/// `out_start`.
///
/// # Safety
/// As [`run`]; `rows` lie in one query tile and in the checked range.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn query_tile<const RV: usize>(
    env: &Env<'_, '_>,
    scratch: &mut Scratch<'_>,
    rows: Range<usize>,
    out_start: usize,
    out: &mut Output<'_>,
) {
    // Qᵀ, scaled; lanes past the rows stay zero.
    let qt = scratch.qt.get_mut();
    qt.fill(0.0);
    for (lane, i) in rows.clone().enumerate() {
        let row = &mut scratch.row;
        // SAFETY: AVX-512 is present; row i < m lies inside Q.
        unsafe {
            widen_row(
                env.call.q.data,
                i,
                env.call.q.row_stride,
                row,
                env.form.q_scale,
            )
        };
        for (c, &x) in row.iter().enumerate() {
            qt[c * QUERY_TILE + lane] = x;
        }
    }
    scratch.o.get_mut().fill(0.0);
    let mut softmax = Softmax::<RV> {
        max: [_mm512_set1_ps(f32::NEG_INFINITY); RV],
        sum: [_mm512_setzero_ps(); RV],
    };
    let tile = rows.start / QUERY_TILE;
    let mut visits = env
        .call
        .tiles
        .runs(tile)
        .iter()
        .flat_map(|run| (run.first as usize..run.end as usize).map(move |t| (t, run.partial)))
        .peekable();
    while let Some((key_tile, partial)) = visits.next() {
        let next = visits.peek().map(|&(t, _)| t);
        // SAFETY: the caller's contract; the table lists only key tiles inside n.
        unsafe { key_step::<RV>(env, scratch, &mut softmax, &rows, key_tile, partial, next) };
    }
    // SAFETY: the caller's contract.
    unsafe { finish::<RV>(env, scratch, &softmax, rows, out_start, out) };
}

/// One key tile of one query tile; `next` is the key tile visited after it, whose K and V
/// rows are hinted towards L2 a few at a time while this one computes (in-place operands are
/// streamed from L3 once per query tile; the hardware prefetchers miss the strided column
/// passes of P·V).
///
/// # Safety
/// As [`query_tile`]; `key_tile` lies inside n.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn key_step<const RV: usize>(
    env: &Env<'_, '_>,
    scratch: &mut Scratch<'_>,
    softmax: &mut Softmax<RV>,
    rows: &Range<usize>,
    key_tile: usize,
    partial: bool,
    next: Option<usize>,
) {
    let (d, dv, n) = (env.d, env.dv, env.n);
    let j0 = key_tile * KEY_TILE;
    let kn = KEY_TILE.min(n - j0);
    let s = scratch.s.get_mut().as_mut_ptr();
    let qt = scratch.qt.get().as_ptr();

    // 1. Sᵀ and its maximum.
    let mut tmax = [_mm512_set1_ps(f32::NEG_INFINITY); RV];
    if d > 0 {
        // SAFETY: AVX-512 is present.
        let k = unsafe { scratch.k.rows(key_tile) };
        let mut jc = 0;
        while jc < kn {
            if let Some(next) = next {
                prefetch_rows(
                    k,
                    n,
                    next * KEY_TILE + jc..next * KEY_TILE + jc + QK_KEYS,
                    d,
                );
            }
            let at = k.data.as_ptr().wrapping_add((j0 + jc) * k.stride);
            let st = s.wrapping_add(jc * QUERY_TILE);
            // SAFETY: keys j0 + jc.. (at most kn − jc of them) are rows < n of K, each with d
            // readable f32 `k.stride` apart; Qᵀ holds d·64 f32, Sᵀ 64·64 from row jc on.
            unsafe {
                match kn - jc {
                    1 => qk::<1, RV>(d, qt, at, k.stride, st, &mut tmax),
                    2 => qk::<2, RV>(d, qt, at, k.stride, st, &mut tmax),
                    3 => qk::<3, RV>(d, qt, at, k.stride, st, &mut tmax),
                    _ => qk::<QK_KEYS, RV>(d, qt, at, k.stride, st, &mut tmax),
                }
            }
            jc += QK_KEYS;
        }
    } else {
        scratch.s.get_mut()[..kn * QUERY_TILE].fill(0.0);
        tmax = [_mm512_setzero_ps(); RV];
    }

    // 2. Score options and element masks.
    let masks = match (partial, env.program, scratch.masks.as_mut()) {
        (true, Some(program), Some(buffers)) => {
            let ibase = rows.start as i64 + n as i64 - env.m as i64;
            // SAFETY: AVX-512 is present; kn ≤ KEY_TILE masks fit the buffers.
            Some(unsafe {
                program.eval(buffers, LaneAxis::Rows, |f| (j0 + f) as i64, kn, ibase, RV)
            })
        }
        _ => None,
    };
    if masks.is_some() || env.form.has_options() {
        // SAFETY: the caller's contract; Sᵀ holds kn·64 f32.
        tmax = unsafe { score_pass::<RV>(env, s, rows, j0, kn, masks) };
    }

    // 3. Online softmax. The running maximum is kept as an integer (the ceiling of the true
    // one, base 2): weights stay in (½, 1] at the top, the rescale factor 2^(old − new) is an
    // exact power of two, it changes only when the maximum crosses an integer, and the
    // exponential folds the subtraction into its rounding constant (`exp2_below`).
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let one = _mm512_set1_ps(1.0);
    let mut low = [_mm512_setzero_ps(); RV];
    let mut magic = [_mm512_setzero_ps(); RV];
    let mut shift = [_mm512_setzero_ps(); RV];
    let mut alpha = [one; RV];
    let mut grew = 0u32;
    let mut general = 0u32;
    for r in 0..RV {
        let old = softmax.max[r];
        let top = _mm512_roundscale_ps::<{ _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC }>(tmax[r]);
        // `max` returns its second operand if either is NaN: a NaN tile maximum sticks.
        let new = _mm512_max_ps(old, top);
        let same = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, old);
        let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, neg_inf);
        // A row whose maximum is still −∞ has only zero weights: subtract 0, not −∞.
        shift[r] = _mm512_mask_blend_ps(empty, new, _mm512_setzero_ps());
        alpha[r] = _mm512_mask_blend_ps(
            same,
            _mm512_scalef_ps(one, _mm512_sub_ps(old, shift[r])),
            one,
        );
        grew |= u32::from(!same);
        (low[r], magic[r]) = exp2_below_constants(shift[r]);
        // Beyond ±2²¹ (finite) the rounding-constant form does not hold: take `exp2`.
        let huge = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
            _mm512_abs_ps(shift[r]),
            _mm512_set1_ps(EXP2_BELOW_LIMIT),
        ) & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(
            _mm512_abs_ps(shift[r]),
            _mm512_set1_ps(f32::INFINITY),
        );
        general |= u32::from(huge);
        softmax.sum[r] = _mm512_mul_ps(softmax.sum[r], alpha[r]);
        softmax.max[r] = new;
    }
    let mut sum = softmax.sum;
    if general == 0 {
        for jj in 0..kn {
            for r in 0..RV {
                let at = s.wrapping_add(jj * QUERY_TILE + r * LANES);
                // SAFETY: jj < kn ≤ 64 and r < 4: inside Sᵀ.
                unsafe {
                    let p = exp2_below(_mm512_loadu_ps(at), low[r], magic[r]);
                    sum[r] = _mm512_add_ps(sum[r], p);
                    _mm512_storeu_ps(at, p);
                }
            }
        }
    } else {
        for jj in 0..kn {
            for r in 0..RV {
                let at = s.wrapping_add(jj * QUERY_TILE + r * LANES);
                // SAFETY: as above.
                unsafe {
                    let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(at), shift[r]));
                    sum[r] = _mm512_add_ps(sum[r], p);
                    _mm512_storeu_ps(at, p);
                }
            }
        }
    }
    softmax.sum = sum;

    // 4. Oᵀ += Pᵀ·V.
    if dv == 0 {
        return;
    }
    let rescale = (grew != 0).then_some(&alpha);
    // SAFETY: AVX-512 is present.
    let v = unsafe { scratch.v.rows(key_tile) };
    let keep = match masks {
        Some(masks) if !scratch.finite.of(v, key_tile, j0..j0 + kn, dv) => Some(masks),
        _ => None,
    };
    let o = scratch.o.get_mut().as_mut_ptr();
    let steps = dv.div_ceil(PV_COLUMNS);
    let per_step = KEY_TILE.div_ceil(steps);
    let mut c0 = 0;
    while c0 < dv {
        if let Some(next) = next {
            let first = next * KEY_TILE + c0 / PV_COLUMNS * per_step;
            prefetch_rows(v, n, first..first + per_step, dv);
        }
        let at = v.data.as_ptr().wrapping_add(j0 * v.stride + c0);
        let ot = o.wrapping_add(c0 * QUERY_TILE);
        // SAFETY: keys j0..j0 + kn are rows < n of V, columns c0.. (at most dv − c0 of them)
        // readable; Pᵀ holds kn·64 f32, Oᵀ dv·64 from column c0 on.
        unsafe {
            match (dv - c0, keep) {
                (1, None) => pv::<1, RV>(kn, s, at, v.stride, ot, rescale),
                (2, None) => pv::<2, RV>(kn, s, at, v.stride, ot, rescale),
                (3, None) => pv::<3, RV>(kn, s, at, v.stride, ot, rescale),
                (_, None) => pv::<PV_COLUMNS, RV>(kn, s, at, v.stride, ot, rescale),
                (1, Some(k)) => pv_kept::<1, RV>(kn, s, at, v.stride, ot, rescale, k),
                (2, Some(k)) => pv_kept::<2, RV>(kn, s, at, v.stride, ot, rescale, k),
                (3, Some(k)) => pv_kept::<3, RV>(kn, s, at, v.stride, ot, rescale, k),
                (_, Some(k)) => pv_kept::<PV_COLUMNS, RV>(kn, s, at, v.stride, ot, rescale, k),
            }
        }
        c0 += PV_COLUMNS;
    }
}

/// Hints the cache lines of rows `keys` (those below `n`, `cols` f32 each) towards L2.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn prefetch_rows(rows: Rows<'_>, n: usize, keys: Range<usize>, cols: usize) {
    if cols == 0 {
        return;
    }
    for j in keys.start..keys.end.min(n) {
        let row = rows.data[j * rows.stride..j * rows.stride + cols].as_ptr();
        let mut c = 0;
        while c < cols {
            // A prefetch reads nothing and cannot fault.
            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(c).cast());
            c += 16;
        }
        _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(cols - 1).cast());
    }
}

/// `Sᵀ[jj][rows] = Qᵀ·K[jj]` for `J` keys, and `tmax = max(tmax, Sᵀ)`.
///
/// # Safety
/// AVX-512 is present; `qt` holds `d·QUERY_TILE` f32; `k` points at `J` rows `stride` apart
/// with `d` readable f32 each; `s` holds `J·QUERY_TILE` writable f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn qk<const J: usize, const RV: usize>(
    d: usize,
    qt: *const f32,
    k: *const f32,
    stride: usize,
    s: *mut f32,
    tmax: &mut [__m512; RV],
) {
    let mut acc = [[_mm512_setzero_ps(); RV]; J];
    let mut key = [k; J];
    for (jj, p) in key.iter_mut().enumerate() {
        *p = k.wrapping_add(jj * stride);
    }
    let mut q = qt;
    for c in 0..d {
        // SAFETY: c < d: Qᵀ row c and element c of each key row are readable.
        unsafe {
            let mut qv = [_mm512_setzero_ps(); RV];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(q.add(r * LANES));
            }
            for jj in 0..J {
                let b = _mm512_set1_ps(*key[jj].add(c));
                for r in 0..RV {
                    acc[jj][r] = _mm512_fmadd_ps(qv[r], b, acc[jj][r]);
                }
            }
            q = q.add(QUERY_TILE);
        }
    }
    for jj in 0..J {
        for r in 0..RV {
            tmax[r] = _mm512_max_ps(tmax[r], acc[jj][r]);
            // SAFETY: jj < J, r < RV ≤ 4: inside the J·64 f32 of `s`.
            unsafe { _mm512_storeu_ps(s.add(jj * QUERY_TILE + r * LANES), acc[jj][r]) };
        }
    }
}

/// `Oᵀ[cc][rows] = Oᵀ[cc][rows]·alpha + Σ_key Pᵀ[key][rows]·V[key][cc]` for `C` columns.
///
/// # Safety
/// AVX-512 is present; `p` holds `keys·QUERY_TILE` f32; `v` points at `keys` rows `stride`
/// apart with `C` readable f32 each; `o` holds `C·QUERY_TILE` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn pv<const C: usize, const RV: usize>(
    keys: usize,
    p: *const f32,
    v: *const f32,
    stride: usize,
    o: *mut f32,
    alpha: Option<&[__m512; RV]>,
) {
    let mut acc = [[_mm512_setzero_ps(); RV]; C];
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: cc < C, r < RV: inside `o`.
            acc[cc][r] = unsafe { _mm512_loadu_ps(o.add(cc * QUERY_TILE + r * LANES)) };
            if let Some(alpha) = alpha {
                acc[cc][r] = _mm512_mul_ps(acc[cc][r], alpha[r]);
            }
        }
    }
    let (mut pp, mut vp) = (p, v);
    for _ in 0..keys {
        // SAFETY: fewer than `keys` rows of Pᵀ and V were passed.
        unsafe {
            let mut pv = [_mm512_setzero_ps(); RV];
            for (r, x) in pv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(pp.add(r * LANES));
            }
            for cc in 0..C {
                let b = _mm512_set1_ps(*vp.add(cc));
                for r in 0..RV {
                    acc[cc][r] = _mm512_fmadd_ps(pv[r], b, acc[cc][r]);
                }
            }
            pp = pp.add(QUERY_TILE);
        }
        vp = vp.wrapping_add(stride);
    }
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(o.add(cc * QUERY_TILE + r * LANES), acc[cc][r]) };
        }
    }
}

/// [`pv`] adding only the kept positions of a partial tile (`keep[key · 4 + r]`), for value
/// tiles with non-finite elements: a masked key's `0 · ∞` must not reach the output.
///
/// # Safety
/// As [`pv`]; `keep` holds `keys · 4` masks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pv_kept<const C: usize, const RV: usize>(
    keys: usize,
    p: *const f32,
    v: *const f32,
    stride: usize,
    o: *mut f32,
    alpha: Option<&[__m512; RV]>,
    keep: &[u16],
) {
    let mut acc = [[_mm512_setzero_ps(); RV]; C];
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: cc < C, r < RV: inside `o`.
            acc[cc][r] = unsafe { _mm512_loadu_ps(o.add(cc * QUERY_TILE + r * LANES)) };
            if let Some(alpha) = alpha {
                acc[cc][r] = _mm512_mul_ps(acc[cc][r], alpha[r]);
            }
        }
    }
    for key in 0..keys {
        for cc in 0..C {
            // SAFETY: key < keys, cc < C: inside the rows passed.
            let b = _mm512_set1_ps(unsafe { *v.wrapping_add(key * stride).add(cc) });
            for r in 0..RV {
                // SAFETY: key < keys, r < RV: inside Pᵀ.
                let pr = unsafe { _mm512_loadu_ps(p.add(key * QUERY_TILE + r * LANES)) };
                acc[cc][r] = _mm512_mask3_fmadd_ps(pr, b, acc[cc][r], keep[key * VECTORS + r]);
            }
        }
    }
    for cc in 0..C {
        for r in 0..RV {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(o.add(cc * QUERY_TILE + r * LANES), acc[cc][r]) };
        }
    }
}

/// Score options and element masks over `Sᵀ` (keys `j0..j0 + kn`), returning the tile
/// maximum per row vector.
///
/// # Safety
/// As [`key_step`]; `s` holds `kn · QUERY_TILE` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn score_pass<const RV: usize>(
    env: &Env<'_, '_>,
    s: *mut f32,
    rows: &Range<usize>,
    j0: usize,
    kn: usize,
    masks: Option<&[u16]>,
) -> [__m512; RV] {
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut tmax = [neg_inf; RV];
    let (row_stride, col_stride) = env.form.bias_strides();
    let shift = env.n as i64 - env.m as i64;
    let mut valid = [0 as __mmask16; RV];
    for (r, v) in valid.iter_mut().enumerate() {
        *v = first_lanes(env.m.saturating_sub(rows.start + r * LANES));
    }
    let options = env.form.has_options();
    for jj in 0..kn {
        let j = j0 + jj;
        for r in 0..RV {
            let at = s.wrapping_add(jj * QUERY_TILE + r * LANES);
            // SAFETY: jj < kn, r < RV: inside Sᵀ.
            let mut x = unsafe { _mm512_loadu_ps(at) };
            if options {
                let i = rows.start + r * LANES;
                let distance = j as i64 - (i as i64 + shift);
                // SAFETY: valid lanes are rows < m of key j < n: inside the checked bias.
                x = unsafe {
                    env.form.apply(
                        x,
                        i * row_stride + j * col_stride,
                        row_stride,
                        valid[r],
                        distance,
                        -1,
                    )
                };
            }
            if let Some(masks) = masks {
                x = _mm512_mask_blend_ps(masks[jj * VECTORS + r], neg_inf, x);
            }
            tmax[r] = _mm512_max_ps(tmax[r], x);
            // SAFETY: as for the load.
            unsafe { _mm512_storeu_ps(at, x) };
        }
    }
    tmax
}

/// `O = Oᵀ / sum` and the log-sum-exp, written to the caller's rows.
///
/// # Safety
/// As [`query_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn finish<const RV: usize>(
    env: &Env<'_, '_>,
    scratch: &mut Scratch<'_>,
    softmax: &Softmax<RV>,
    rows: Range<usize>,
    out_start: usize,
    out: &mut Output<'_>,
) {
    let dv = env.dv;
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut max = [0.0f32; QUERY_TILE];
    let mut sum = [0.0f32; QUERY_TILE];
    let mut empty = [0 as __mmask16; RV];
    for r in 0..RV {
        // A row that kept no key (maximum −∞, no NaN in the sum) gives zeros.
        let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(softmax.max[r], neg_inf);
        empty[r] = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(none, softmax.sum[r], _mm512_setzero_ps());
        // SAFETY: r < 4: inside the 64-lane arrays.
        unsafe {
            _mm512_storeu_ps(max.as_mut_ptr().add(r * LANES), softmax.max[r]);
            _mm512_storeu_ps(sum.as_mut_ptr().add(r * LANES), softmax.sum[r]);
        }
    }
    let o = scratch.o.get_mut();
    for c in 0..dv {
        for r in 0..RV {
            let at = c * QUERY_TILE + r * LANES;
            // SAFETY: c < dv, r < 4: inside Oᵀ.
            unsafe {
                let x = _mm512_div_ps(_mm512_loadu_ps(o.as_ptr().add(at)), softmax.sum[r]);
                let x = _mm512_mask_blend_ps(empty[r], x, _mm512_setzero_ps());
                _mm512_storeu_ps(o.as_mut_ptr().add(at), x);
            }
        }
    }
    for (lane, i) in rows.enumerate() {
        if dv > 0 {
            let row = (i - out_start) * out.row_stride;
            let dst = &mut out.o[row..row + dv];
            for (c, x) in dst.iter_mut().enumerate() {
                *x = o[c * QUERY_TILE + lane];
            }
        }
        if let Some(lse) = out.lse.as_deref_mut() {
            let kept_none = empty[lane / LANES] >> (lane % LANES) & 1 == 1;
            lse[i - out_start] = if kept_none {
                f32::NEG_INFINITY
            } else {
                ((max[lane] as f64 + (sum[lane] as f64).log2()) * std::f64::consts::LN_2) as f32
            };
        }
    }
}
