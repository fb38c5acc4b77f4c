//! The portable backward (and forward with log-sum-exp): plain Rust on any CPU, f32
//! arithmetic, the tile table's key tiles only. Dot products and row updates run over
//! contiguous f32 rows (operands stored as f16/bf16 or with gaps between rows are widened
//! into one contiguous copy first), written so the compiler vectorizes them; every sum runs
//! in a fixed order, so results do not depend on how batch entries are dealt to threads.

use std::borrow::Cow;

use super::{Gradients, Saved};
use crate::problem::{Call, Elements, Operand};

/// An operand's rows as contiguous f32 (`rows × cols`).
fn rows_f32<'a>(op: &Operand<'a>) -> Cow<'a, [f32]> {
    let (rows, cols) = (op.rows, op.cols);
    if let Elements::F32(x) = op.data {
        if op.row_stride == cols || rows <= 1 {
            return Cow::Borrowed(&x[..(rows * cols).min(x.len())]);
        }
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        out.extend((0..cols).map(|c| op.data.get(r * op.row_stride + c)));
    }
    Cow::Owned(out)
}

/// `a · b` in 8 interleaved partial sums (a fixed order the compiler can vectorize).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        total += x * y;
    }
    total
}

/// `y += a · x`.
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The score of position `(i, j)` from `s = q_i · k_j`, ALiBi distances measured from key
/// `origin` (the row's [`Call::alibi_origin`]): `(x, dx/dy)` with the softcap's
/// derivative (1 without one).
#[inline]
pub(crate) fn score(call: &Call<'_>, s: f32, i: usize, j: usize, origin: i64) -> (f32, f32) {
    let sc = &call.score;
    let mut y = s * sc.scale;
    if let Some(b) = sc.bias {
        y += b.data[i * b.row_stride + j * b.col_stride];
    }
    if let Some(slope) = sc.alibi_slope {
        y += slope * (j as i64 - origin) as f32;
    }
    match sc.softcap {
        Some(cap) => {
            let t = (y / cap).tanh();
            (cap * t, 1.0 - t * t)
        }
        None => (y, 1.0),
    }
}

/// The keys row `i` visits: `(key range, partial)` per key tile listed for its query tile.
fn visits<'c>(
    call: &'c Call<'_>,
    i: usize,
) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + 'c {
    let (n, kt) = (call.n(), call.tiles.key_tile);
    call.tiles
        .runs(i / call.tiles.query_tile)
        .iter()
        .flat_map(move |run| {
            (run.first as usize..run.end as usize)
                .map(move |t| ((t * kt).min(n)..((t + 1) * kt).min(n), run.partial))
        })
}

/// Every row's `O` (`m × dv`) and log-sum-exp (as [`Saved`] holds it) of `call` (checked by
/// the caller).
pub fn forward(call: &Call<'_>, o: &mut [f32], lse: &mut [f32]) {
    let (m, d, dv) = (call.m(), call.q.cols, call.v.cols);
    let (q, k, v) = (rows_f32(&call.q), rows_f32(&call.k), rows_f32(&call.v));
    let mut kept: Vec<(usize, f32)> = Vec::new();
    for i in 0..m {
        let origin = call.alibi_origin(i);
        kept.clear();
        for (keys, partial) in visits(call, i) {
            for j in keys {
                if partial && !call.keeps(i, j) {
                    continue;
                }
                let s = dot(&q[i * d..(i + 1) * d], &k[j * d..(j + 1) * d]);
                kept.push((j, score(call, s, i, j, origin).0));
            }
        }
        let row = &mut o[i * dv..(i + 1) * dv];
        row.fill(0.0);
        // NaN-propagating maximum, as the kernels and the reference take it.
        let max = kept.iter().fold(f32::NEG_INFINITY, |a, &(_, x)| {
            if a.is_nan() || x.is_nan() {
                f32::NAN
            } else {
                a.max(x)
            }
        });
        if max == f32::NEG_INFINITY {
            lse[i] = f32::NEG_INFINITY;
            continue;
        }
        let mut sum = 0.0f32;
        for &(j, x) in &kept {
            let p = (x - max).exp();
            sum += p;
            axpy(row, p, &v[j * dv..(j + 1) * dv]);
        }
        row.iter_mut().for_each(|x| *x /= sum);
        lse[i] = max + sum.ln();
    }
}

/// The gradients of `call` (checked by the caller; see the module docs of the parent).
pub fn backward(
    call: &Call<'_>,
    saved: &Saved<'_>,
    (d_o, d_lse): (&[f32], Option<&[f32]>),
    grads: &mut Gradients<'_>,
) {
    let (m, n, d, dv) = (call.m(), call.n(), call.q.cols, call.v.cols);
    let (q, k, v) = (rows_f32(&call.q), rows_f32(&call.k), rows_f32(&call.v));
    let mut dq = vec![0.0f32; if grads.dq.is_some() { m * d } else { 0 }];
    let mut dk = vec![0.0f32; if grads.dk.is_some() { n * d } else { 0 }];
    let mut dvv = vec![0.0f32; if grads.dv.is_some() { n * dv } else { 0 }];
    // Per row in f32, over the rows in f64: a call sums `m·n` terms.
    let mut dslope = 0.0f64;
    let scale = call.score.scale;
    let need_ds = grads.dq.is_some() || grads.dk.is_some();
    let need_dx = need_ds || grads.dbias.is_some() || grads.dslope.is_some();
    for i in 0..m {
        let lse = saved.lse[i];
        if lse == f32::NEG_INFINITY {
            continue;
        }
        let origin = call.alibi_origin(i);
        let g = &d_o[i * dv..(i + 1) * dv];
        let big_d = dot(g, &saved.o[i * dv..(i + 1) * dv]) - d_lse.map_or(0.0, |l| l[i]);
        let qi = &q[i * d..(i + 1) * d];
        let mut row_dslope = 0.0f32;
        for (keys, partial) in visits(call, i) {
            for j in keys {
                if partial && !call.keeps(i, j) {
                    continue;
                }
                let kj = &k[j * d..(j + 1) * d];
                let (x, cap_slope) = score(call, dot(qi, kj), i, j, origin);
                let p = (x - lse).exp();
                if !dvv.is_empty() {
                    axpy(&mut dvv[j * dv..(j + 1) * dv], p, g);
                }
                if !need_dx {
                    continue;
                }
                let dp = dot(g, &v[j * dv..(j + 1) * dv]);
                let dy = p * (dp - big_d) * cap_slope;
                if let Some(b) = grads.dbias.as_mut() {
                    b.data[i * b.row_stride + j * b.col_stride] += dy;
                }
                row_dslope += dy * (j as i64 - origin) as f32;
                if need_ds {
                    let ds = dy * scale;
                    if !dq.is_empty() {
                        axpy(&mut dq[i * d..(i + 1) * d], ds, kj);
                    }
                    if !dk.is_empty() {
                        axpy(&mut dk[j * d..(j + 1) * d], ds, qi);
                    }
                }
            }
        }
        dslope += f64::from(row_dslope);
    }
    for (out, got) in [
        (grads.dq.as_deref_mut(), dq),
        (grads.dk.as_deref_mut(), dk),
        (grads.dv.as_deref_mut(), dvv),
    ] {
        if let Some(out) = out {
            out.copy_from_slice(&got);
        }
    }
    if let Some(s) = grads.dslope.as_deref_mut() {
        *s += dslope as f32;
    }
}
