//! The tile kernel: the query rows of a tile in the lanes.
//!
//! A query tile's 64 rows are four vectors of 16 lanes, so every per-row quantity (scores of
//! one key, running maximum, sum, rescale factor) is one vector per 16 rows and the whole
//! online softmax is vertical: no horizontal reduction anywhere.
//!
//! Per query tile, Q is packed transposed (`Qᵀ[c][row]`, scaled by `scale·log2 e`); per key
//! tile of 64 keys:
//!
//! 1. `Sᵀ[key][row] = Σ_c Qᵀ[c][row]·K[key][c]` ([`micro::qk`]: 4 keys × 4 row vectors of
//!    accumulators, one key element broadcast per 4 FMAs), the tile maximum folded in;
//! 2. bias, ALiBi, softcap and element masks (partial tiles only) in one pass over `Sᵀ`;
//! 3. online softmax with an integer running maximum (base 2): `Pᵀ = 2^(Sᵀ − max + B)` in place
//!    (`B` from [`headroom`]: no subnormal products),
//!    row sums, a power-of-two rescale of O when some row's maximum grew;
//! 4. `Oᵀ[c][row] += Σ_key Pᵀ[key][row]·V[key][c]` ([`micro::pv`]: 4 columns × 4 row
//!    vectors, one value broadcast per 4 FMAs; masked FMAs on partial tiles).
//!
//! K and V are only ever broadcast one element at a time, so f32 operands are read in place
//! whatever their row stride; f16/bf16 key tiles are widened into an L1-sized buffer right
//! before use. While a key tile computes, the next one's rows are hinted towards L2 a few at a
//! time (the operands stream from L3 once per query tile; the hardware prefetchers miss the
//! strided column passes of P·V). Each row's arithmetic is the same sequence whatever the
//! other lanes hold, so any split of rows gives bit-identical results.

// Register arrays indexed by constant loop bounds.
#![allow(clippy::needless_range_loop)]

mod headroom;
mod layout;
mod partial;

pub(super) use headroom::value_magnitude_bits;
mod micro;

use std::arch::x86_64::*;
use std::cell::Cell;
use std::ops::Range;

use half::{bf16, f16};

use super::mask::{kept_band, LaneAxis, MaskProgram, VECTORS};
use super::math::{exp2, exp2_below, exp2_below_constants, EXP2_BELOW_LIMIT};
use super::score::{Distances, ScoreForm};
use super::widen::{first_lanes, widen_rows};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, Elements, Operand, Output};

const LANES: usize = 16;

/// Keys per QK micro-kernel step (4 keys × 4 row vectors = 16 accumulators; 24-accumulator
/// shapes measured no faster).
const QK_KEYS: usize = 4;

/// The fall of a row's maximum (base 2) beyond which the earlier weights are dropped rather
/// than rescaled: `2^-126` is the smallest normal f32.
const FADED_BELOW: f32 = -126.0;

/// Value columns per PV micro-kernel step (4 columns × 4 row vectors = 16 accumulators).
const PV_COLUMNS: usize = 4;

const _: () = assert!(QUERY_TILE == LANES * VECTORS);
const _: () = assert!(KEY_TILE <= LANES * VECTORS);

/// An f32 buffer whose start is 64-byte aligned (loads are unaligned anyway; alignment only
/// keeps them from splitting cache lines).
#[derive(Default)]
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// Makes room for `len` elements (contents unspecified).
    fn reserve(&mut self, len: usize) {
        if self.buf.len() < len + LANES {
            self.buf = vec![0.0f32; len + LANES];
            self.start = self.buf.as_ptr().align_offset(64).min(LANES);
        }
        self.len = len;
    }

    fn get(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Scratch reused by every call on one thread: `Qᵀ` (`d × 64`), `Sᵀ`/`Pᵀ` (`64 × 64`), `Oᵀ`
/// (`dv × 64`) and widened K and V tiles (`64 × d`, `64 × dv`, f16/bf16 operands only).
#[derive(Default)]
struct Buffers {
    qt: Aligned,
    s: Aligned,
    o: Aligned,
    k: Aligned,
    v: Aligned,
}

thread_local! {
    static BUFFERS: Cell<Option<Box<Buffers>>> = const { Cell::new(None) };
}

/// Rows of f32 the micro-kernels read.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

/// Key tile `tile` of an operand as f32 rows: in place (row `j` at `j·stride`), or widened
/// into `buffer` (row `j0 + r` at `r·stride`).
///
/// # Safety
/// AVX-512 is present and the operand passed `problem::check`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn tile_rows<'a>(operand: &Operand<'a>, tile: usize, buffer: &'a mut Aligned) -> Rows<'a> {
    let (j0, cols) = (tile * KEY_TILE, operand.cols);
    if let Elements::F32(data) = operand.data {
        return Rows {
            data,
            stride: operand.row_stride,
        };
    }
    let end = (j0 + KEY_TILE).min(operand.rows);
    let (out, stride) = (buffer.get_mut(), operand.row_stride);
    // SAFETY (both): AVX-512 is present; rows j0..end < rows lie inside the checked operand
    // and the buffer holds KEY_TILE rows of `cols`.
    match operand.data {
        Elements::F16(x) => unsafe { widen_rows(x.as_ptr(), stride, j0..end, cols, out) },
        Elements::Bf16(x) => unsafe { widen_rows(x.as_ptr(), stride, j0..end, cols, out) },
        Elements::F32(_) => {}
    }
    // Row j0 + r of the operand is row r of the buffer.
    Rows {
        data: &buffer.get()[..(end - j0) * cols],
        stride: cols,
    }
}

/// One call's constants.
struct Env<'a, 'c> {
    call: &'c Call<'a>,
    form: ScoreForm<'a>,
    program: Option<&'c MaskProgram<'a>>,
    /// The largest `|v|` bit pattern of the whole call.
    value_bound: u32,
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
}

/// Per 16 rows of a query tile: running maximum (an integer, base 2) and sum; the weights
/// (and with them the sum and O) are `2^(s − max + offset)`, see [`headroom`].
struct Softmax<const RV: usize> {
    max: [__m512; RV],
    sum: [__m512; RV],
    offset: i32,
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
    value_bound: u32,
) {
    let env = Env {
        call,
        form,
        program,
        value_bound,
        m: call.m(),
        n: call.n(),
        d: call.q.cols,
        dv: call.v.cols,
    };
    let mut buffers = BUFFERS.with(|b| b.take()).unwrap_or_default();
    buffers.qt.reserve(env.d * QUERY_TILE);
    buffers.s.reserve(KEY_TILE * QUERY_TILE);
    buffers.o.reserve(env.dv * QUERY_TILE);
    buffers.k.reserve(KEY_TILE * env.d);
    buffers.v.reserve(KEY_TILE * env.dv);
    let mut masks = program.map(|p| p.buffers(KEY_TILE * VECTORS));
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + QUERY_TILE).min(rows.end);
        let tile = Tile::new(call, r0..r1, rows.start);
        let b = &mut buffers;
        let mk = masks.as_mut();
        // SAFETY (all four): the caller's contract, passed on; r0 starts a query tile.
        match (r1 - r0).div_ceil(LANES) {
            1 => unsafe { query_tile::<1>(&env, b, mk, &tile, out) },
            2 => unsafe { query_tile::<2>(&env, b, mk, &tile, out) },
            3 => unsafe { query_tile::<3>(&env, b, mk, &tile, out) },
            _ => unsafe { query_tile::<4>(&env, b, mk, &tile, out) },
        }
        r0 = r1;
    }
    BUFFERS.with(|b| b.set(Some(buffers)));
}

/// The rows of one query tile a call computes.
struct Tile {
    rows: Range<usize>,
    /// The call's first row (row `out_start` is row 0 of the output).
    out_start: usize,
    /// Per row, the key its ALiBi distances are measured from ([`Call::alibi_origin`]), as
    /// f32 (exact below 2²⁴ keys); zeros without a slope.
    origins: [f32; QUERY_TILE],
}

impl Tile {
    fn new(call: &Call<'_>, rows: Range<usize>, out_start: usize) -> Tile {
        let mut origins = [0.0f32; QUERY_TILE];
        if call.score.alibi_slope.is_some() {
            for (o, i) in origins.iter_mut().zip(rows.clone()) {
                *o = call.alibi_origin(i) as f32;
            }
        }
        Tile {
            rows,
            out_start,
            origins,
        }
    }
}

/// One query tile (`RV` vectors of lanes).
///
/// # Safety
/// As [`run`]; the tile's rows lie in one query tile and in the checked range.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn query_tile<const RV: usize>(
    env: &Env<'_, '_>,
    buffers: &mut Buffers,
    mut masks: Option<&mut super::mask::MaskBuffers>,
    tile: &Tile,
    out: &mut Output<'_>,
) {
    let (q, d) = (env.call.q, env.d);
    let qt = buffers.qt.get_mut();
    let (scale, rows) = (env.form.q_scale, tile.rows.clone());
    // SAFETY (all three): AVX-512 is present; the rows lie inside the checked Q.
    match q.data {
        Elements::F32(x) => unsafe { layout::pack_q(x.as_ptr(), q.row_stride, rows, d, scale, qt) },
        Elements::F16(x) => unsafe {
            layout::pack_q::<f16>(x.as_ptr(), q.row_stride, rows, d, scale, qt)
        },
        Elements::Bf16(x) => unsafe {
            layout::pack_q::<bf16>(x.as_ptr(), q.row_stride, rows, d, scale, qt)
        },
    }
    buffers.o.get_mut().fill(0.0);
    let mut softmax = Softmax::<RV> {
        max: [_mm512_set1_ps(f32::NEG_INFINITY); RV],
        sum: [_mm512_setzero_ps(); RV],
        offset: headroom::weight_offset(env.call, env.value_bound),
    };
    let mut visits = env
        .call
        .tiles
        .runs(tile.rows.start / QUERY_TILE)
        .iter()
        .flat_map(|run| (run.first as usize..run.end as usize).map(move |t| (t, run.partial)))
        .peekable();
    let mut visit = 0;
    while let Some((key_tile, partial)) = visits.next() {
        let next = visits.peek().map(|&(t, _)| t);
        // During the first four visits, 16 output rows each are claimed for writing.
        let claim = (visit < VECTORS).then(|| {
            let first = tile.rows.start + visit * LANES;
            first.min(tile.rows.end)..(first + LANES).min(tile.rows.end)
        });
        visit += 1;
        let step = Step {
            key_tile,
            partial,
            next,
            claim: claim.map(|r| (r, tile.out_start)),
        };
        // SAFETY: the caller's contract; the table lists only key tiles inside n.
        unsafe {
            key_step::<RV>(
                env,
                buffers,
                masks.as_deref_mut(),
                &mut softmax,
                tile,
                &step,
                out,
            )
        };
    }
    // O = Oᵀ / sum, zeros for rows that kept nothing (maximum −∞ and no NaN in the sum).
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut empty = [0 as __mmask16; RV];
    for r in 0..RV {
        let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(softmax.max[r], neg_inf);
        empty[r] = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(none, softmax.sum[r], _mm512_setzero_ps());
    }
    if env.dv > 0 {
        let (o, row_stride) = (&mut *out.o, out.row_stride);
        // SAFETY: AVX-512 is present; check() sized the output for every row and dv columns.
        unsafe {
            layout::write_rows(
                buffers.o.get(),
                env.dv,
                &softmax.sum,
                &empty,
                tile.rows.clone(),
                tile.out_start,
                o,
                row_stride,
            )
        };
    }
    let from_origin = out.lse_from_origin;
    if let Some(lse) = out.lse.as_deref_mut() {
        let mut max = [0.0f32; QUERY_TILE];
        let mut sum = [0.0f32; QUERY_TILE];
        for r in 0..RV {
            // SAFETY: r < 4: inside the 64-lane arrays.
            unsafe {
                _mm512_storeu_ps(max.as_mut_ptr().add(r * LANES), softmax.max[r]);
                _mm512_storeu_ps(sum.as_mut_ptr().add(r * LANES), softmax.sum[r]);
            }
        }
        for (lane, i) in tile.rows.clone().enumerate() {
            let kept_none = empty[lane / LANES] >> (lane % LANES) & 1 == 1;
            lse[i - tile.out_start] = if kept_none {
                f32::NEG_INFINITY
            } else {
                let offset = f64::from(softmax.offset);
                let shifted = (max[lane] as f64 + (sum[lane] as f64).log2() - offset)
                    * std::f64::consts::LN_2;
                match from_origin {
                    true => shifted as f32,
                    // The origin the scores used (exact below 2²⁴ keys).
                    false => env.call.natural_lse(i, tile.origins[lane] as i64, shifted),
                }
            };
        }
    }
}

/// One visit of a key tile: which, whether element masks apply, and the tile visited next
/// (whose rows are prefetched meanwhile).
struct Step {
    key_tile: usize,
    partial: bool,
    next: Option<usize>,
    /// Output rows (and the call's first row) to prefetch for writing meanwhile: the output
    /// lines are usually cold, and their read-for-ownership would otherwise stall the stores
    /// at the end of the query tile.
    claim: Option<(Range<usize>, usize)>,
}

/// One key tile of one query tile.
///
/// # Safety
/// As [`query_tile`]; the key tile lies inside n.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn key_step<const RV: usize>(
    env: &Env<'_, '_>,
    buffers: &mut Buffers,
    masks: Option<&mut super::mask::MaskBuffers>,
    softmax: &mut Softmax<RV>,
    tile: &Tile,
    step: &Step,
    out: &Output<'_>,
) {
    let rows = &tile.rows;
    let (d, dv, n) = (env.d, env.dv, env.n);
    let j0 = step.key_tile * KEY_TILE;
    let kn = KEY_TILE.min(n - j0);
    let s = buffers.s.get_mut().as_mut_ptr();
    let qt = buffers.qt.get().as_ptr();
    let next = step.next.map(|t| t * KEY_TILE);

    // Element masks (partial tiles only), first: the products skip the row vectors a key
    // group does not reach.
    let keep = match (step.partial, env.program, masks) {
        (true, Some(program), Some(buffers)) => {
            let ibase = rows.start as i64 + n as i64 - env.m as i64;
            // SAFETY: AVX-512 is present; kn ≤ KEY_TILE masks fit the buffers.
            Some(unsafe {
                program.eval(buffers, LaneAxis::Rows, |f| (j0 + f) as i64, kn, ibase, RV)
            })
        }
        _ => None,
    };

    // 1. Sᵀ and its maximum.
    let mut tmax = [_mm512_set1_ps(f32::NEG_INFINITY); RV];
    if d > 0 {
        // SAFETY: AVX-512 is present; K passed check().
        let k = unsafe { tile_rows(&env.call.k, step.key_tile, &mut buffers.k) };
        let base = if matches!(env.call.k.data, Elements::F32(_)) {
            j0
        } else {
            0
        };
        let mut jc = 0;
        while jc < kn {
            if let Some(next) = next {
                prefetch_rows(&env.call.k, next + jc..next + jc + QK_KEYS);
            }
            if let Some((claim, out_start)) = &step.claim {
                let row = claim.start + jc / QK_KEYS;
                if row < claim.end {
                    claim_row(out, (row - out_start) * out.row_stride, dv);
                }
            }
            let at = k.data.as_ptr().wrapping_add((base + jc) * k.stride);
            let st = s.wrapping_add(jc * QUERY_TILE);
            // SAFETY: keys j0 + jc.. (at most kn − jc of them) are rows of K (or of its
            // widened tile), each with d readable f32 `k.stride` apart; Qᵀ holds d·64 f32,
            // Sᵀ 64·64 from row jc on.
            unsafe {
                match (keep, kn - jc) {
                    (Some(keep), keys) => {
                        let group = jc..jc + keys.min(QK_KEYS);
                        let (band, _) = kept_band(keep, group, RV);
                        if !band.is_empty() {
                            partial::qk_rows(keys, band, d, qt, at, k.stride, st);
                        }
                    }
                    (None, 1) => micro::qk::<1, RV>(d, qt, at, k.stride, st, &mut tmax),
                    (None, 2) => micro::qk::<2, RV>(d, qt, at, k.stride, st, &mut tmax),
                    (None, 3) => micro::qk::<3, RV>(d, qt, at, k.stride, st, &mut tmax),
                    (None, _) => micro::qk::<QK_KEYS, RV>(d, qt, at, k.stride, st, &mut tmax),
                }
            }
            jc += QK_KEYS;
        }
    } else {
        buffers.s.get_mut()[..kn * QUERY_TILE].fill(0.0);
        tmax = [_mm512_setzero_ps(); RV];
    }

    // 2. Score options and element masks.
    if keep.is_some() || env.form.has_options() {
        // SAFETY: the caller's contract; Sᵀ holds kn·64 f32.
        tmax = unsafe { score_pass::<RV>(env, s, tile, j0, kn, keep) };
    }

    // 3. Online softmax. The running maximum is kept as an integer (the ceiling of the true
    // one, base 2): weights stay in (½, 1] at the top, the rescale factor 2^(old − new) is an
    // exact power of two, it changes only when the maximum crosses an integer, and the
    // exponential folds the subtraction into its rounding constant (`exp2_below`).
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let one = _mm512_set1_ps(1.0);
    let mut magic = [_mm512_setzero_ps(); RV];
    let mut shift = [_mm512_setzero_ps(); RV];
    let mut cut = [_mm512_setzero_ps(); RV];
    let mut alpha = [one; RV];
    let mut grew = 0u32;
    let mut general = 0u32;
    let offset = _mm512_set1_ps(softmax.offset as f32);
    for r in 0..RV {
        let old = softmax.max[r];
        let top = _mm512_roundscale_ps::<{ _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC }>(tmax[r]);
        // `max` returns its second operand if either is NaN: a NaN tile maximum sticks.
        let new = _mm512_max_ps(old, top);
        let same = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, old);
        let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, neg_inf);
        // A row whose maximum is still −∞ has only zero weights: subtract 0, not −∞.
        shift[r] = _mm512_mask_blend_ps(empty, new, _mm512_setzero_ps());
        // An old maximum more than 126 below the new one leaves every earlier weight under
        // the cut below, and 2^(old − new) would be subnormal (a microcode assist on each of
        // O's rescale products, several-fold slower where logits spread widely): drop them.
        let fall = _mm512_sub_ps(old, shift[r]);
        let faded = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(fall, _mm512_set1_ps(FADED_BELOW));
        alpha[r] = _mm512_mask_blend_ps(same, _mm512_maskz_scalef_ps(!faded, one, fall), one);
        grew |= u32::from(!same);
        // The weights are 2^(s − shift + offset), 0 where s − shift < −127.
        (cut[r], magic[r]) = exp2_below_constants(shift[r], offset);
        // Beyond ±2²¹ (finite) the rounding-constant form does not hold: take `exp2`.
        let size = _mm512_abs_ps(shift[r]);
        let huge = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(size, _mm512_set1_ps(EXP2_BELOW_LIMIT))
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(size, _mm512_set1_ps(f32::INFINITY));
        general |= u32::from(huge);
        softmax.sum[r] = _mm512_mul_ps(softmax.sum[r], alpha[r]);
        softmax.max[r] = new;
    }
    let mut sum = softmax.sum;
    for jj in 0..kn {
        for r in 0..RV {
            let at = s.wrapping_add(jj * QUERY_TILE + r * LANES);
            // SAFETY: jj < kn ≤ 64 and r < 4: inside Sᵀ.
            unsafe {
                let x = _mm512_loadu_ps(at);
                let p = if general == 0 {
                    exp2_below(x, cut[r], magic[r])
                } else {
                    // `not less than` holds for NaN: a NaN weight stays.
                    let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, cut[r]);
                    _mm512_maskz_mov_ps(
                        kept,
                        exp2(_mm512_add_ps(_mm512_sub_ps(x, shift[r]), offset)),
                    )
                };
                sum[r] = _mm512_add_ps(sum[r], p);
                _mm512_storeu_ps(at, p);
            }
        }
    }
    softmax.sum = sum;

    // 4. Oᵀ += Pᵀ·V.
    if dv == 0 {
        return;
    }
    let rescale = (grew != 0).then_some(&alpha);
    // SAFETY: AVX-512 is present; V passed check().
    let v = unsafe { tile_rows(&env.call.v, step.key_tile, &mut buffers.v) };
    let base = if matches!(env.call.v.data, Elements::F32(_)) {
        j0
    } else {
        0
    };
    let o = buffers.o.get_mut().as_mut_ptr();
    if let Some(keep) = keep {
        // SAFETY: as below, for the masked tile's segments.
        unsafe { pv_partial::<RV>(env, s, &v, base, o, rescale, keep, kn) };
        if let Some(next) = next {
            prefetch_rows(&env.call.v, next..next + KEY_TILE);
        }
        return;
    }
    let per_step = KEY_TILE.div_ceil(dv.div_ceil(PV_COLUMNS));
    let mut c0 = 0;
    while c0 < dv {
        if let Some(next) = next {
            let first = next + c0 / PV_COLUMNS * per_step;
            prefetch_rows(&env.call.v, first..first + per_step);
        }
        let at = v.data.as_ptr().wrapping_add(base * v.stride + c0);
        let ot = o.wrapping_add(c0 * QUERY_TILE);
        let vs = v.stride;
        // SAFETY: keys j0..j0 + kn are rows of V (or of its widened tile), columns c0..
        // (at most dv − c0 of them) readable; Pᵀ holds kn·64 f32, Oᵀ dv·64 from column c0
        // on.
        unsafe {
            match dv - c0 {
                1 => micro::pv::<1, RV, false>(kn, s, at, vs, ot, rescale, &[]),
                2 => micro::pv::<2, RV, false>(kn, s, at, vs, ot, rescale, &[]),
                3 => micro::pv::<3, RV, false>(kn, s, at, vs, ot, rescale, &[]),
                _ => micro::pv::<PV_COLUMNS, RV, false>(kn, s, at, vs, ot, rescale, &[]),
            }
        }
        c0 += PV_COLUMNS;
    }
}

/// Step 4 on a masked tile: per segment of 16 keys, `Oᵀ += Pᵀ·V` over the row vectors the
/// segment's keys reach, with masked FMAs unless those rows keep every key of it.
///
/// # Safety
/// As [`key_step`]: `s` holds `kn·64` weights, `v` the key tile's rows (row `base + key`),
/// `o` the tile's `dv·64` outputs, `keep` `kn·4` masks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_partial<const RV: usize>(
    env: &Env<'_, '_>,
    s: *const f32,
    v: &Rows<'_>,
    base: usize,
    o: *mut f32,
    rescale: Option<&[__m512; RV]>,
    keep: &[u16],
    kn: usize,
) {
    let dv = env.dv;
    if let Some(alpha) = rescale {
        // SAFETY: Oᵀ holds dv·64.
        unsafe { partial::rescale::<RV>(o, dv, alpha) };
    }
    let mut k0 = 0;
    while k0 < kn {
        let keys = partial::PV_SEGMENT.min(kn - k0);
        let (band, full) = kept_band(keep, k0..k0 + keys, RV);
        if !band.is_empty() {
            let p = s.wrapping_add(k0 * QUERY_TILE);
            let mut c0 = 0;
            while c0 < dv {
                let at = v.data.as_ptr().wrapping_add((base + k0) * v.stride + c0);
                let ot = o.wrapping_add(c0 * QUERY_TILE);
                // SAFETY: keys k0..k0 + keys of the tile are rows of V, columns c0..
                // readable; Pᵀ from key k0 and Oᵀ from column c0 hold the band's rows; the
                // masks from key k0 cover the segment.
                unsafe {
                    partial::pv_rows(
                        dv - c0,
                        band.clone(),
                        full,
                        keys,
                        p,
                        at,
                        v.stride,
                        ot,
                        &keep[k0 * VECTORS..],
                    )
                };
                c0 += PV_COLUMNS;
            }
        }
        k0 += keys;
    }
}

/// Prefetches for writing the output elements `at..at + len` (those inside the output).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn claim_row(out: &Output<'_>, at: usize, len: usize) {
    let end = (at + len).min(out.o.len());
    let base = out.o.as_ptr().cast::<u8>();
    let mut byte = at * 4;
    while byte < end * 4 {
        // A prefetch reads nothing and cannot fault.
        _mm_prefetch::<_MM_HINT_ET0>(base.wrapping_add(byte).cast());
        byte += 64;
    }
    if end > at {
        _mm_prefetch::<_MM_HINT_ET0>(base.wrapping_add(end * 4 - 1).cast());
    }
}

/// Hints the cache lines of rows `keys` (those inside the operand) towards L2.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) fn prefetch_rows(operand: &Operand<'_>, keys: Range<usize>) {
    let (ptr, size): (*const u8, usize) = match operand.data {
        Elements::F32(x) => (x.as_ptr().cast(), 4),
        Elements::F16(x) => (x.as_ptr().cast(), 2),
        Elements::Bf16(x) => (x.as_ptr().cast(), 2),
    };
    let bytes = operand.cols * size;
    if bytes == 0 {
        return;
    }
    for j in keys.start..keys.end.min(operand.rows) {
        let row = ptr.wrapping_add(j * operand.row_stride * size);
        let mut at = 0;
        while at < bytes {
            // A prefetch reads nothing and cannot fault.
            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(at).cast());
            at += 64;
        }
        _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(bytes - 1).cast());
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
    tile: &Tile,
    j0: usize,
    kn: usize,
    masks: Option<&[u16]>,
) -> [__m512; RV] {
    let rows = &tile.rows;
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut tmax = [neg_inf; RV];
    let (row_stride, col_stride) = env.form.bias_strides();
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
                // SAFETY: r < 4: inside the 64 origins.
                let origins = unsafe { _mm512_loadu_ps(tile.origins.as_ptr().add(r * LANES)) };
                let distances = Distances::Lanes(_mm512_sub_ps(_mm512_set1_ps(j as f32), origins));
                // SAFETY: valid lanes are rows < m of key j < n: inside the checked bias.
                x = unsafe {
                    env.form.apply(
                        x,
                        i * row_stride + j * col_stride,
                        row_stride,
                        valid[r],
                        distances,
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
