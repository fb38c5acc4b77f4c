//! Causal linear attention, decayed or not, in chunks of rows on the `gemm` crate's full-width
//! products: the prefill form of the prefix-state op ([`crate::plan::StepKind::Chunked`]).
//!
//! The recurrent kernel ([`crate::kernels::prefix`]) reads and writes the whole `[d, dv]` state
//! for every key, so it runs at the speed of that traffic, a few GFLOP/s. Here the keys go in
//! chunks of [`CHUNK`]: inside a chunk the decayed quadratic form, across chunks the state,
//! each a small matrix product (the form flash-linear-attention writes for GPUs). With `γ =
//! exp(-a)` and queries end-aligned (`i' = i + n − m`), for the rows `i'` of the chunk that
//! starts at key `c`:
//!
//! ```text
//! A = Q Kcᵀ;  A[i, j] ← γ^(i'−j) A[i, j] for j ≤ i', 0 beyond;   O = A Vc + γ^(i'−c+1) (Q S)
//! S ← γ^L S + (γ^(L−1−j) Kc)ᵀ Vc                     (L keys in the chunk)
//! ```
//!
//! with a column of ones beside `V` when rows are normalized (its products are the sums the
//! row divides by). The powers of `γ` are computed from `a` in f64, not multiplied up, so a
//! weight is `γ^t` rounded once. A product of a masked score with a NaN or infinite value
//! would reach rows the op's semantics keep it from (`0 · NaN`), so a batch entry with any
//! non-finite input runs the exact recurrence instead ([`recurrence`]).

use crate::buffer::BufferView;
use crate::error::Result;
use crate::kernels::prefix::PrefixSpec;
use crate::wide::{batch_index, buffer_err, deal, wide_err};
use attnc_ir::Normalizer;
use attnc_wide::gemm::{sgemm, Matrix};

/// Keys per chunk: large enough that each product runs at the micro-kernels' speed, small
/// enough that the `[C, C]` score block and the chunk's rows stay in the L2 cache.
pub const CHUNK: usize = 64;

/// Whether the chunked form is worth its set-up: at least two chunks of keys.
pub fn worth_chunking(spec: &PrefixSpec) -> bool {
    spec.n >= 2 * CHUNK && spec.d > 0 && spec.dv > 0
}

/// One batch entry's operands: `φQ` `[m, d]`, `φK` `[n, d]`, `V` `[n, dv]` (contiguous rows)
/// and the decay's `a` (0 without decay).
struct Entry<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    a: f32,
}

/// Runs the prefix-state op `spec` on `inputs` (`φQ`, `φK`, `V`, and the slope when it
/// decays) into `out` (`[batch.., m, dv]`), batch entries dealt to up to `threads` threads.
pub fn run(
    spec: &PrefixSpec,
    inputs: &[BufferView<'_>],
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
    if out.len() != spec.batch_count() * m * dv {
        return Err(buffer_err(
            "output",
            "does not hold the prefix state's rows",
        ));
    }
    let f32s = |k: usize| match inputs.get(k) {
        Some(BufferView::F32(x)) => Ok(*x),
        _ => Err(buffer_err("causal linear attention", "takes f32 buffers")),
    };
    let (q, k, v) = (f32s(0)?, f32s(1)?, f32s(2)?);
    let slope = match spec.slope_strides {
        Some(_) => Some(f32s(3)?),
        None => None,
    };
    if m == 0 || dv == 0 {
        return Ok(());
    }
    let entry = |e: usize| -> Entry<'_> {
        let index = batch_index(&spec.batch, e);
        let at =
            |strides: &[usize]| -> usize { strides.iter().zip(&index).map(|(s, i)| s * i).sum() };
        let [qs, ks, vs] = &spec.batch_strides;
        Entry {
            q: part(q, at(qs), m * d),
            k: part(k, at(ks), n * d),
            v: part(v, at(vs), n * dv),
            a: match (slope, &spec.slope_strides) {
                (Some(s), Some(strides)) => s.get(at(strides)).copied().unwrap_or(f32::NAN),
                _ => 0.0,
            },
        }
    };
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(m * dv).enumerate().collect();
    deal(items, threads, |(e, rows)| {
        let x = entry(e);
        if x.q.len() != m * d || x.k.len() != n * d || x.v.len() != n * dv {
            return Err(buffer_err("causal linear attention", "an operand is short"));
        }
        let finite = |s: &[f32]| s.iter().all(|t| t.is_finite());
        if x.a.is_finite() && finite(x.q) && finite(x.k) && finite(x.v) {
            chunked(spec, &x, rows)
        } else {
            recurrence(spec, &x, rows);
            Ok(())
        }
    })
}

/// `len` elements of `data` from `start`, or none when it is short (the caller checks).
fn part(data: &[f32], start: usize, len: usize) -> &[f32] {
    data.get(start..start.saturating_add(len))
        .unwrap_or_default()
}

/// `γ^t = exp(-a t)`, rounded once to f32.
fn power(a: f32, t: usize) -> f32 {
    (-(a as f64) * t as f64).exp() as f32
}

/// One batch entry in chunks (all inputs finite).
fn chunked(spec: &PrefixSpec, x: &Entry<'_>, out: &mut [f32]) -> Result<()> {
    let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
    let normalized = matches!(spec.normalizer, Normalizer::Sum { .. });
    let w = dv + usize::from(normalized);
    let off = n as isize - m as isize;
    // Rows that keep no key (i' < 0): the empty numerator over 0 + eps.
    let empty_rows = usize::try_from(-off).unwrap_or(0).min(m);
    out[..empty_rows * dv].fill(empty_row_value(spec.normalizer));
    let mut state = vec![0.0f32; d * w];
    let mut values = vec![0.0f32; CHUNK * w];
    let mut scores = vec![0.0f32; CHUNK * CHUNK];
    let mut rows_out = vec![0.0f32; CHUNK * w];
    let mut carried = vec![0.0f32; CHUNK * w];
    let mut keys = vec![0.0f32; CHUNK * d];
    let mut update = vec![0.0f32; d * w];
    let decays = x.a != 0.0;
    for c in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - c);
        // V of the chunk, beside a column of ones when rows are normalized.
        for j in 0..len {
            let row = &mut values[j * w..(j + 1) * w];
            row[..dv].copy_from_slice(&x.v[(c + j) * dv..(c + j + 1) * dv]);
            if normalized {
                row[dv] = 1.0;
            }
        }
        let vc = Matrix {
            data: &values[..len * w],
            rows: len,
            cols: w,
            row_stride: w,
            col_stride: 1,
        };
        // The rows whose i' lies in this chunk.
        let first = (c as isize - off).max(0) as usize;
        let end = ((c + len) as isize - off).clamp(0, m as isize) as usize;
        if first < end {
            let count = end - first;
            let qm = Matrix {
                data: &x.q[first * d..end * d],
                rows: count,
                cols: d,
                row_stride: d,
                col_stride: 1,
            };
            let kt = Matrix {
                data: &x.k[c * d..(c + len) * d],
                rows: d,
                cols: len,
                row_stride: 1,
                col_stride: d,
            };
            let a = &mut scores[..count * len];
            sgemm(&qm, &kt, a).map_err(wide_err)?;
            for i in 0..count {
                let back = (first + i) as isize + off - c as isize; // i' − c
                for (j, s) in a[i * len..(i + 1) * len].iter_mut().enumerate() {
                    let t = back - j as isize;
                    *s = match t {
                        t if t < 0 => 0.0,
                        _ if !decays => *s,
                        t => *s * power(x.a, t as usize),
                    };
                }
            }
            let am = Matrix {
                data: a,
                rows: count,
                cols: len,
                row_stride: len,
                col_stride: 1,
            };
            let o = &mut rows_out[..count * w];
            sgemm(&am, &vc, o).map_err(wide_err)?;
            let sm = Matrix {
                data: &state,
                rows: d,
                cols: w,
                row_stride: w,
                col_stride: 1,
            };
            let t = &mut carried[..count * w];
            sgemm(&qm, &sm, t).map_err(wide_err)?;
            for i in 0..count {
                let back = (first + i) as isize + off - c as isize;
                let g = if decays {
                    power(x.a, back as usize + 1)
                } else {
                    1.0
                };
                let row = &mut o[i * w..(i + 1) * w];
                for (y, s) in row.iter_mut().zip(&t[i * w..(i + 1) * w]) {
                    *y += g * s;
                }
                finish_row(spec.normalizer, row, &mut out[(first + i) * dv..][..dv]);
            }
        }
        // S ← γ^L S + (γ^(L−1−j) k_j)ᵀ V.
        let kd = &mut keys[..len * d];
        kd.copy_from_slice(&x.k[c * d..(c + len) * d]);
        if decays {
            for (j, row) in kd.chunks_mut(d).enumerate() {
                let g = power(x.a, len - 1 - j);
                row.iter_mut().for_each(|t| *t *= g);
            }
        }
        let kdt = Matrix {
            data: kd,
            rows: d,
            cols: len,
            row_stride: 1,
            col_stride: d,
        };
        sgemm(&kdt, &vc, &mut update).map_err(wide_err)?;
        let g = if decays { power(x.a, len) } else { 1.0 };
        for (s, u) in state.iter_mut().zip(&update) {
            *s = g * *s + u;
        }
    }
    Ok(())
}

/// The value of every element of a row that keeps no key: `0 / (0 + eps)` (NaN for `eps = 0`,
/// as the plain form's `0 / sum(∅)`), or 0 unnormalized.
fn empty_row_value(normalizer: Normalizer) -> f32 {
    match normalizer {
        Normalizer::None => 0.0,
        Normalizer::Sum { eps } => 0.0 / (0.0 + eps as f32),
    }
}

/// Writes an output row from its numerators (and, normalized, the sum after them).
fn finish_row(normalizer: Normalizer, got: &[f32], row: &mut [f32]) {
    let dv = row.len();
    match normalizer {
        Normalizer::None => row.copy_from_slice(&got[..dv]),
        Normalizer::Sum { eps } => {
            let den = got[dv] + eps as f32;
            for (o, y) in row.iter_mut().zip(&got[..dv]) {
                *o = y / den;
            }
        }
    }
}

/// One batch entry by the exact recurrence `S ← γ S + k_j v_jᵀ`, row by row as the prefix
/// kernel computes it: the form whose non-finite values follow the op's semantics (a key or
/// value after a row's prefix never reaches it).
fn recurrence(spec: &PrefixSpec, x: &Entry<'_>, out: &mut [f32]) {
    let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
    let normalized = matches!(spec.normalizer, Normalizer::Sum { .. });
    let w = dv + usize::from(normalized);
    let gamma = power(x.a, 1);
    let decays = spec.slope_strides.is_some();
    let off = n as isize - m as isize;
    let mut state = vec![0.0f32; d * w];
    let mut got = vec![0.0f32; w];
    let mut next = 0usize; // keys 0..next are in the state
    for i in 0..m {
        let last = i as isize + off; // i'
        let row = &mut out[i * dv..(i + 1) * dv];
        if last < 0 {
            row.fill(empty_row_value(spec.normalizer));
            continue;
        }
        while next as isize <= last {
            let (k, v) = (&x.k[next * d..][..d], &x.v[next * dv..][..dv]);
            for (a, s) in state.chunks_mut(w).enumerate() {
                if decays {
                    s.iter_mut().for_each(|t| *t *= gamma);
                }
                for (t, y) in s[..dv].iter_mut().zip(v) {
                    *t += k[a] * y;
                }
                if normalized {
                    s[dv] += k[a];
                }
            }
            next += 1;
        }
        got.fill(0.0);
        for (qa, s) in x.q[i * d..][..d].iter().zip(state.chunks(w)) {
            for (g, t) in got.iter_mut().zip(s) {
                *g += qa * t;
            }
        }
        finish_row(spec.normalizer, &got, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op's plain form in f64: `Σ_{j ≤ i'} exp(-a (i' − j)) (q_i · k_j) v_j`, normalized.
    fn plain(spec: &PrefixSpec, q: &[f32], k: &[f32], v: &[f32], a: f32) -> Vec<f64> {
        let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
        let mut out = vec![0.0f64; m * dv];
        for i in 0..m {
            let last = i as isize + n as isize - m as isize;
            let mut sum = 0.0f64;
            for j in 0..n {
                if j as isize > last {
                    break;
                }
                let dot: f64 = (0..d)
                    .map(|t| q[i * d + t] as f64 * k[j * d + t] as f64)
                    .sum();
                let w = dot * (-(a as f64) * (last - j as isize) as f64).exp();
                sum += w;
                for c in 0..dv {
                    out[i * dv + c] += w * v[j * dv + c] as f64;
                }
            }
            if let Normalizer::Sum { eps } = spec.normalizer {
                for c in 0..dv {
                    out[i * dv + c] /= sum + eps;
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn chunks_agree_with_the_plain_form_at_chunk_edges() {
        for (m, n) in [
            (1, 200),
            (3, 3),
            (64, 64),
            (65, 129),
            (200, 128),
            (130, 257),
            (300, 130),
        ] {
            for normalizer in [Normalizer::None, Normalizer::Sum { eps: 1e-3 }] {
                for a in [0.0f32, 0.05, 3.0] {
                    let (d, dv) = (5, 7);
                    let spec = PrefixSpec {
                        batch: vec![],
                        batch_strides: Default::default(),
                        m,
                        n,
                        d,
                        dv,
                        normalizer,
                        slope_strides: Some(vec![]),
                    };
                    let (q, k, v) = (values(m * d, 1), values(n * d, 2), values(n * dv, 3));
                    // Positive scores keep the normalized sums away from 0.
                    let k: Vec<f32> = k.iter().map(|t| t.abs()).collect();
                    let q: Vec<f32> = q.iter().map(|t| t.abs()).collect();
                    let x = Entry {
                        q: &q,
                        k: &k,
                        v: &v,
                        a,
                    };
                    let want = plain(&spec, &q, &k, &v, a);
                    for form in 0..2 {
                        let mut got = vec![0.0f32; m * dv];
                        if form == 0 {
                            chunked(&spec, &x, &mut got).expect("runs");
                        } else {
                            recurrence(&spec, &x, &mut got);
                        }
                        let num: f64 = got
                            .iter()
                            .zip(&want)
                            .map(|(g, w)| (*g as f64 - w).powi(2))
                            .sum();
                        let den: f64 = want.iter().map(|w| w * w).sum();
                        let err = (num / den.max(1e-300)).sqrt();
                        assert!(err < 2e-6, "form {form} m={m} n={n} a={a}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_nan_value_after_a_rows_prefix_does_not_reach_it() {
        let (n, d, dv) = (200, 3, 2);
        let spec = PrefixSpec {
            batch: vec![],
            batch_strides: [vec![], vec![], vec![]],
            m: n,
            n,
            d,
            dv,
            normalizer: Normalizer::None,
            slope_strides: None,
        };
        let q = values(n * d, 4);
        let k = values(n * d, 5);
        let mut v = values(n * dv, 6);
        v[150 * dv] = f32::NAN;
        let mut out = vec![0.0f32; n * dv];
        let inputs = [
            BufferView::F32(&q),
            BufferView::F32(&k),
            BufferView::F32(&v),
        ];
        run(&spec, &inputs, &mut out, 2).expect("runs");
        assert!(out[..150 * dv].iter().all(|t| t.is_finite()));
        assert!(out[150 * dv].is_nan());
    }
}
