//! The row kernel: one query row at a time, keys and value columns in the lanes.
//!
//! For calls with very few queries (decode: `m = 1`) the tile kernel would leave most lanes
//! empty and widen f16/bf16 operands into scratch first. Here K and V are read once, straight
//! from the operand, widened in registers: `q·K[j]` accumulates 16 partial sums per key over
//! `d` (16 keys at a time), one transposing reduction tree turns the 16 keys' partial sums into
//! one vector of 16 scores, and `P·V` accumulates a row of O (up to 128 columns) in registers.
//! This is the memory-bound path: per key, K and V are each read exactly once.

use std::arch::x86_64::*;
use std::ops::Range;

use super::mask::{LaneAxis, MaskProgram, VECTORS};
use super::math::exp2;
use super::score::{Distances, ScoreForm};
use super::widen::{first_lanes, first_lanes32, natural_order, pair_order, widen_row, Widen};
use super::{KEY_TILE, QUERY_TILE};
use crate::problem::{Call, Elements, Output};

const LANES: usize = 16;

/// Elements one [`Widen::load_pair`] reads.
const PAIR: usize = 2 * LANES;

/// Value columns held in registers per pass over a key tile (4 pairs of vectors).
const O_BLOCK: usize = 4 * PAIR;

/// Computes rows `rows` of `call` into `out`, each row on its own.
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
    // SAFETY (all nine): the caller's contract, passed on with the operands' element types.
    unsafe {
        match (call.k.data, call.v.data) {
            (Elements::F32(k), Elements::F32(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::F32(k), Elements::F16(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::F32(k), Elements::Bf16(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::F16(k), Elements::F32(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::F16(k), Elements::F16(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::F16(k), Elements::Bf16(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::Bf16(k), Elements::F32(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::Bf16(k), Elements::F16(v)) => typed(call, k, v, rows, out, form, program),
            (Elements::Bf16(k), Elements::Bf16(v)) => typed(call, k, v, rows, out, form, program),
        }
    }
}

/// One row's running state.
struct State {
    /// `q · scale · log2 e`, padded with zeros to whole pairs of vectors, in K's pair order.
    q: Vec<f32>,
    /// O's row (not yet divided by the sum), padded to whole pairs of vectors, in V's pair
    /// order.
    o: Vec<f32>,
    /// Scores, then weights, of one key tile.
    p: [f32; KEY_TILE],
    max: f32,
    /// Per-lane partial sums of the weights.
    sum: __m512,
}

/// The operands in their element types.
struct Typed<'a, K, V> {
    k: &'a [K],
    k_stride: usize,
    v: &'a [V],
    v_stride: usize,
    d: usize,
    dv: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn typed<K: Widen, V: Widen>(
    call: &Call<'_>,
    k: &[K],
    v: &[V],
    rows: Range<usize>,
    out: &mut Output<'_>,
    form: ScoreForm<'_>,
    program: Option<&MaskProgram>,
) {
    let (m, n) = (call.m(), call.n());
    let (d, dv) = (call.q.cols, call.v.cols);
    let ops = Typed {
        k,
        k_stride: call.k.row_stride,
        v,
        v_stride: call.v.row_stride,
        d,
        dv,
    };
    let mut masks = program.map(|p| p.buffers(VECTORS));
    let mut st = State {
        q: vec![0.0; d.div_ceil(PAIR) * PAIR],
        o: vec![0.0; dv.div_ceil(PAIR) * PAIR],
        p: [0.0; KEY_TILE],
        max: f32::NEG_INFINITY,
        sum: _mm512_setzero_ps(),
    };
    let shift = n as i64 - m as i64;
    for i in rows.clone() {
        // SAFETY: AVX-512 is present; row i < m lies inside Q.
        unsafe {
            widen_row(
                call.q.data,
                i,
                call.q.row_stride,
                &mut st.q[..d],
                form.q_scale,
            )
        };
        pair_order::<K>(&mut st.q);
        st.o.fill(0.0);
        st.max = f32::NEG_INFINITY;
        st.sum = _mm512_setzero_ps();
        let ia = i as i64 + shift;
        let from = call.alibi_origin(i);
        for run in call.tiles.runs(i / QUERY_TILE) {
            for tile in run.first as usize..run.end as usize {
                let j0 = tile * KEY_TILE;
                let kn = KEY_TILE.min(n - j0);
                let groups = kn.div_ceil(LANES);
                let keep = match (run.partial, program, masks.as_mut()) {
                    (true, Some(program), Some(buffers)) => {
                        // SAFETY: AVX-512 is present; one row of ≤ 4 masks fits.
                        let k = unsafe {
                            program.eval(buffers, LaneAxis::Keys, |_| ia, 1, j0 as i64, groups)
                        };
                        let mut keep = [0u16; VECTORS];
                        keep.copy_from_slice(k);
                        Some(keep)
                    }
                    _ => None,
                };
                // SAFETY: the caller's contract; tile lies inside n.
                unsafe {
                    key_tile(&ops, &mut st, &form, i, from, j0, kn, keep);
                }
            }
        }
        // Finish the row.
        let sum = _mm512_reduce_add_ps(st.sum);
        let empty = st.max == f32::NEG_INFINITY && sum == 0.0;
        if dv > 0 {
            let row = (i - rows.start) * out.row_stride;
            let dst = &mut out.o[row..row + dv];
            for (block, dst) in st.o.chunks_exact(PAIR).zip(dst.chunks_mut(PAIR)) {
                natural_order::<V>(block, dst);
            }
            for x in dst.iter_mut() {
                *x = if empty { 0.0 } else { *x / sum };
            }
        }
        if let Some(lse) = out.lse.as_deref_mut() {
            lse[i - rows.start] = if empty {
                f32::NEG_INFINITY
            } else {
                let shifted = (st.max as f64 + (sum as f64).log2()) * std::f64::consts::LN_2;
                match out.lse_from_origin {
                    true => shifted as f32,
                    false => call.natural_lse(i, from, shifted),
                }
            };
        }
    }
}

/// One key tile of one row: scores (ALiBi distances from key `origin`), online softmax,
/// `o += p · V`.
///
/// # Safety
/// AVX-512 is present; the operands passed `problem::check`; keys `j0..j0 + kn` lie inside n.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_tile<K: Widen, V: Widen>(
    ops: &Typed<'_, K, V>,
    st: &mut State,
    form: &ScoreForm<'_>,
    i: usize,
    origin: i64,
    j0: usize,
    kn: usize,
    keep: Option<[u16; VECTORS]>,
) {
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let (row_stride, col_stride) = form.bias_strides();
    let mut tmax = neg_inf;
    let mut scores = [neg_inf; VECTORS];
    for (g, score) in scores.iter_mut().enumerate().take(kn.div_ceil(LANES)) {
        let jg = j0 + g * LANES;
        let count = LANES.min(kn - g * LANES);
        // SAFETY: keys jg..jg + count are rows < n of K.
        let mut s = unsafe { dots(ops, &st.q, jg, count) };
        let valid = first_lanes(count);
        if form.has_options() {
            // SAFETY: valid lanes are keys < n of row i < m: inside the checked bias.
            s = unsafe {
                form.apply(
                    s,
                    i * row_stride + jg * col_stride,
                    col_stride,
                    valid,
                    Distances::Along {
                        start: jg as i64 - origin,
                        step: 1,
                    },
                )
            };
        }
        let kept = keep.map_or(valid, |k| k[g] & valid);
        s = _mm512_mask_blend_ps(kept, neg_inf, s);
        tmax = _mm512_max_ps(tmax, s);
        *score = s;
    }
    // Online softmax on one row: every lane holds the row's values.
    let old = _mm512_set1_ps(st.max);
    let new = _mm512_max_ps(old, _mm512_set1_ps(_mm512_reduce_max_ps(tmax)));
    let same = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, old) != 0;
    let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, neg_inf);
    let shift = _mm512_mask_blend_ps(empty, new, _mm512_setzero_ps());
    let alpha = if same {
        None
    } else {
        Some(exp2(_mm512_sub_ps(old, shift)))
    };
    if let Some(a) = alpha {
        st.sum = _mm512_mul_ps(st.sum, a);
    }
    st.max = _mm512_cvtss_f32(new);
    for (g, &s) in scores.iter().enumerate().take(kn.div_ceil(LANES)) {
        let p = exp2(_mm512_sub_ps(s, shift));
        st.sum = _mm512_add_ps(st.sum, p);
        // SAFETY: g < 4: inside the 64 weights.
        unsafe { _mm512_storeu_ps(st.p.as_mut_ptr().add(g * LANES), p) };
    }
    // o = o·alpha + Σ p_j V[j]; masked keys are skipped: their weight is 0, but 0·∞ or 0·NaN
    // from their value row must not reach the output.
    let skip = keep;
    let mut c0 = 0;
    while c0 < ops.dv {
        let width = (ops.dv - c0).min(O_BLOCK);
        // SAFETY: columns c0..c0 + width of keys j0..j0 + kn lie inside V; `o` is padded.
        unsafe {
            match width.div_ceil(PAIR) {
                1 => pv_row::<V, 1>(ops, st, j0, kn, c0, width, alpha, skip),
                2 => pv_row::<V, 2>(ops, st, j0, kn, c0, width, alpha, skip),
                3 => pv_row::<V, 3>(ops, st, j0, kn, c0, width, alpha, skip),
                _ => pv_row::<V, 4>(ops, st, j0, kn, c0, width, alpha, skip),
            }
        }
        c0 += O_BLOCK;
    }
}

/// Scores `q·K[jg + l]` for lanes `l < count` (other lanes repeat the last key).
///
/// # Safety
/// AVX-512 is present; keys `jg..jg + count` (count ≥ 1) lie inside K; `q` holds `d` rounded
/// up to whole vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn dots<K: Widen, V>(ops: &Typed<'_, K, V>, q: &[f32], jg: usize, count: usize) -> __m512 {
    let d = ops.d;
    let mut acc = [_mm512_setzero_ps(); LANES];
    // The next 16 keys' rows, towards L1, while these compute (beyond K the hint is dropped).
    let row_bytes = d * std::mem::size_of::<K>();
    for key in 0..LANES {
        let next = ops
            .k
            .as_ptr()
            .wrapping_add((jg + LANES + key) * ops.k_stride)
            .cast::<u8>();
        let mut at = 0;
        while at < row_bytes {
            // A prefetch reads nothing and cannot fault.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
            at += 64;
        }
    }
    for lane in 0..LANES {
        // Keys in address order (what the hardware prefetchers follow); the reduction tree
        // leaves slot s's sum in lane 4·(s mod 4) + s/4, so key `lane` goes to the slot that
        // lands in lane `lane` (the map is its own inverse).
        let a = &mut acc[4 * (lane % 4) + lane / 4];
        let key = lane.min(count - 1);
        let row = ops.k.as_ptr().wrapping_add((jg + key) * ops.k_stride);
        // Two chains (the two halves of each pair) halve the FMA latency per key.
        let (mut x, mut y) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut c = 0;
        while c < d {
            // SAFETY: the lanes read are columns c.. of the row (< d), inside K; q holds
            // the pair (padded with zeros).
            unsafe {
                let (first, second) = K::load_pair(row.add(c), first_lanes32(d - c));
                x = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c)), first, x);
                y = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c + LANES)), second, y);
            }
            c += PAIR;
        }
        *a = _mm512_add_ps(x, y);
    }
    reduce16(&acc)
}

/// The 16 lane sums of `a`: lane `4q + e` holds the sum of `a[4e + q]`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn reduce16(a: &[__m512; 16]) -> __m512 {
    // Halves: lanes 0-7 of w[i] sum a[2i], lanes 8-15 sum a[2i + 1].
    let mut w = [_mm512_setzero_ps(); 8];
    for (i, w) in w.iter_mut().enumerate() {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        *w = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xee>(x, y),
        );
    }
    // Quarters: 128-bit lane q of u[i] sums a[4i + q].
    let mut u = [_mm512_setzero_ps(); 4];
    for (i, u) in u.iter_mut().enumerate() {
        let (x, y) = (w[2 * i], w[2 * i + 1]);
        *u = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xdd>(x, y),
        );
    }
    // Pairs within 128-bit lanes, then singles.
    let z0 = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(u[0], u[1]),
        _mm512_shuffle_ps::<0xee>(u[0], u[1]),
    );
    let z1 = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(u[2], u[3]),
        _mm512_shuffle_ps::<0xee>(u[2], u[3]),
    );
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(z0, z1),
        _mm512_shuffle_ps::<0xdd>(z0, z1),
    )
}

/// `o[c0..c0 + width] = o·alpha + Σ_j p_j V[j0 + j][c0..]` with `NP` pairs of vectors in
/// registers (V's pair order).
///
/// # Safety
/// AVX-512 is present; columns `c0..c0 + width` (`width ≤ 32·NP`, `> 32·(NP − 1)`) of keys
/// `j0..j0 + kn` lie inside V; `st.o` holds `c0 + 32·NP` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_row<V: Widen, const NP: usize>(
    ops: &Typed<'_, impl Sized, V>,
    st: &mut State,
    j0: usize,
    kn: usize,
    c0: usize,
    width: usize,
    alpha: Option<__m512>,
    skip: Option<[u16; VECTORS]>,
) {
    let tail = first_lanes32(width - (NP - 1) * PAIR);
    let o = st.o.as_mut_ptr().wrapping_add(c0);
    let mut acc = [[_mm512_setzero_ps(); 2]; NP];
    for (x, a) in acc.iter_mut().enumerate() {
        for (h, a) in a.iter_mut().enumerate() {
            // SAFETY: st.o holds c0 + 32·NP f32.
            *a = unsafe { _mm512_loadu_ps(o.add(x * PAIR + h * LANES)) };
            if let Some(alpha) = alpha {
                *a = _mm512_mul_ps(*a, alpha);
            }
        }
    }
    for j in 0..kn {
        if let Some(keep) = skip {
            if keep[j / LANES] >> (j % LANES) & 1 == 0 {
                continue;
            }
        }
        let p = _mm512_set1_ps(st.p[j]);
        let row = ops.v.as_ptr().wrapping_add((j0 + j) * ops.v_stride + c0);
        let ahead = row.wrapping_add(8 * ops.v_stride).cast::<u8>();
        let mut at = 0;
        while at < width * std::mem::size_of::<V>() {
            // A prefetch reads nothing and cannot fault.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(at).cast());
            at += 64;
        }
        for (x, a) in acc.iter_mut().enumerate() {
            let lanes = if x + 1 < NP { u32::MAX } else { tail };
            // SAFETY: the lanes read are columns c0 + 32x.. (< c0 + width) inside V.
            let (first, second) = unsafe { V::load_pair(row.add(x * PAIR), lanes) };
            a[0] = _mm512_fmadd_ps(p, first, a[0]);
            a[1] = _mm512_fmadd_ps(p, second, a[1]);
        }
    }
    for (x, a) in acc.iter().enumerate() {
        for (h, a) in a.iter().enumerate() {
            // SAFETY: as for the loads of `o`.
            unsafe { _mm512_storeu_ps(o.add(x * PAIR + h * LANES), *a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    #[test]
    fn reduction_tree_puts_each_sum_in_its_lane() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let mut a = [[0.0f32; 16]; 16];
        for (s, v) in a.iter_mut().enumerate() {
            for (l, x) in v.iter_mut().enumerate() {
                *x = (s * 1000 + l) as f32;
            }
        }
        let mut out = [0.0f32; 16];
        // SAFETY: AVX-512 was detected; the arrays hold 16·16 and 16 f32.
        unsafe {
            let mut v = [_mm512_setzero_ps(); 16];
            for (s, x) in v.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(a[s].as_ptr());
            }
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&v));
        }
        for (lane, &got) in out.iter().enumerate() {
            let (q, e) = (lane / 4, lane % 4);
            let slot = 4 * e + q;
            let want: f32 = a[slot].iter().sum();
            assert_eq!(got, want, "lane {lane}");
        }
    }
}
