//! The gradients of linear attention through its key-value state, O(n): for row `i` over
//! keys `j < e_i` (all keys, or the prefix `j ≤ i'` when causal),
//!
//! ```text
//! num_i = q_i S_i     den_i = q_i · z_i + eps      S_i = Σ_{j<e_i} k_j ⊗ v_j,  z_i = Σ_{j<e_i} k_j
//! gn_i = dO_i / den_i     gd_i = −(dO_i · num_i) / den_i²      (gn = dO, gd = 0 unnormalized)
//! dq_i = S_i gn_i + gd_i z_i
//! dk_j = R_j v_j + r_j    dv_j = R_jᵀ k_j           R_j = Σ_{i: j<e_i} q_i ⊗ gn_i,  r_j = Σ gd_i q_i
//! ```
//!
//! The causal form keeps `S, z` as a running prefix state over rows and `R, r` as a running
//! state over keys in reverse. States are f64 (they sum up to n outer products). Per batch
//! entry, one thread, a fixed order: bit-identical for any thread count.

use super::{batch_index, buffer_err, GradLayout};
use crate::buffer::BufferView;
use crate::error::Result;
use attnc_ir::Normalizer;

/// The gradient step of one linear attention.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearBackward {
    /// The output's batch axes.
    pub batch: Vec<usize>,
    /// Element strides per batch axis of φQ, φK, V and dO (contiguous rows).
    pub batch_strides: [Vec<usize>; 4],
    /// Queries, keys, depth, value width.
    pub m: usize,
    /// Keys.
    pub n: usize,
    /// Depth.
    pub d: usize,
    /// Value width.
    pub dv: usize,
    /// Whether each row sees only its prefix of keys.
    pub causal: bool,
    /// The row normalization.
    pub normalizer: Normalizer,
    /// The gradients computed (slots 0, 1, 2), in output order.
    pub grads: Vec<GradLayout>,
}

/// One batch entry's operands, contiguous rows.
struct Entry<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
}

impl LinearBackward {
    /// Every gradient, in output order, over `[φQ, φK, V, dO]`.
    pub fn run(&self, inputs: &[BufferView<'_>], threads: usize) -> Result<Vec<Vec<f32>>> {
        let (m, n, d, dv) = (self.m, self.n, self.d, self.dv);
        let entries: usize = self.batch.iter().product();
        let f32s = |k: usize| match inputs.get(k) {
            Some(BufferView::F32(x)) => Ok(*x),
            _ => Err(buffer_err("linear attention", "takes four f32 buffers")),
        };
        let buffers = [f32s(0)?, f32s(1)?, f32s(2)?, f32s(3)?];
        let dims = |slot: usize| match slot {
            0 => (m, d),
            1 => (n, d),
            _ => (n, dv),
        };
        // Every entry's gradients, then summed into the operands' shapes in entry order.
        let mut per_entry: Vec<Vec<Vec<f32>>> = vec![Vec::new(); entries];
        let items: Vec<(usize, &mut Vec<Vec<f32>>)> = per_entry.iter_mut().enumerate().collect();
        crate::wide::deal(items, threads, |(e, out)| {
            let index = batch_index(&self.batch, e);
            let at = |w: usize, len: usize| -> Result<&[f32]> {
                let off: usize = self.batch_strides[w]
                    .iter()
                    .zip(&index)
                    .map(|(s, i)| s * i)
                    .sum();
                buffers[w]
                    .get(off..off + len)
                    .ok_or_else(|| buffer_err("linear attention", "operand is too short"))
            };
            let entry = Entry {
                q: at(0, m * d)?,
                k: at(1, n * d)?,
                v: at(2, n * dv)?,
                g: at(3, m * dv)?,
            };
            *out = self.entry(&entry);
            Ok(())
        })?;
        let mut outputs: Vec<Vec<f32>> = self.grads.iter().map(|g| vec![0.0; g.len()]).collect();
        for (e, grads) in per_entry.iter().enumerate() {
            let index = batch_index(&self.batch, e);
            for (k, layout) in self.grads.iter().enumerate() {
                let block = &grads[layout.slot];
                let (rows, cols) = dims(layout.slot);
                let base: usize = layout
                    .batch_strides
                    .iter()
                    .zip(&index)
                    .map(|(s, i)| s * i)
                    .sum();
                for r in 0..rows {
                    for c in 0..cols {
                        outputs[k][base + r * layout.row_stride + c * layout.col_stride] +=
                            block[r * cols + c];
                    }
                }
            }
        }
        Ok(outputs)
    }

    /// `[dq, dk, dv]` of one entry (row-major `m × d`, `n × d`, `n × dv`).
    fn entry(&self, x: &Entry<'_>) -> Vec<Vec<f32>> {
        let (m, n, d, dv) = (self.m, self.n, self.d, self.dv);
        // Keys reaching row i: j < end(i).
        let end = |i: usize| -> usize {
            if self.causal {
                (i as i128 + n as i128 - m as i128 + 1).clamp(0, n as i128) as usize
            } else {
                n
            }
        };
        let (mut s, mut z) = (vec![0.0f64; d * dv], vec![0.0f64; d]);
        let mut added = 0;
        let mut gn = vec![0.0f64; m * dv];
        let mut gd = vec![0.0f64; m];
        let mut dq = vec![0.0f32; m * d];
        let add_key = |j: usize, s: &mut [f64], z: &mut [f64]| {
            for a in 0..d {
                let ka = f64::from(x.k[j * d + a]);
                z[a] += ka;
                for c in 0..dv {
                    s[a * dv + c] += ka * f64::from(x.v[j * dv + c]);
                }
            }
        };
        for i in 0..m {
            while added < end(i) {
                add_key(added, &mut s, &mut z);
                added += 1;
            }
            let qi = &x.q[i * d..(i + 1) * d];
            let mut num = vec![0.0f64; dv];
            let mut den = 0.0f64;
            for a in 0..d {
                let qa = f64::from(qi[a]);
                den += qa * z[a];
                for c in 0..dv {
                    num[c] += qa * s[a * dv + c];
                }
            }
            let gi = &x.g[i * dv..(i + 1) * dv];
            match self.normalizer {
                Normalizer::None => {
                    for c in 0..dv {
                        gn[i * dv + c] = f64::from(gi[c]);
                    }
                }
                Normalizer::Sum { eps } => {
                    let den = den + eps;
                    let mut dot = 0.0f64;
                    for c in 0..dv {
                        gn[i * dv + c] = f64::from(gi[c]) / den;
                        dot += f64::from(gi[c]) * num[c];
                    }
                    gd[i] = -dot / (den * den);
                }
            }
            for a in 0..d {
                let mut t = gd[i] * z[a];
                for c in 0..dv {
                    t += s[a * dv + c] * gn[i * dv + c];
                }
                dq[i * d + a] = t as f32;
            }
        }
        // Keys in reverse: rows i with end(i) > j join the reverse state as j decreases.
        let (mut r, mut rz) = (vec![0.0f64; d * dv], vec![0.0f64; d]);
        let mut dk = vec![0.0f32; n * d];
        let mut dvv = vec![0.0f32; n * dv];
        // Rows sorted by end, last first (end is non-decreasing in i).
        let mut next_row = m;
        for j in (0..n).rev() {
            while next_row > 0 && end(next_row - 1) > j {
                let i = next_row - 1;
                for a in 0..d {
                    let qa = f64::from(x.q[i * d + a]);
                    rz[a] += gd[i] * qa;
                    for c in 0..dv {
                        r[a * dv + c] += qa * gn[i * dv + c];
                    }
                }
                next_row -= 1;
            }
            for a in 0..d {
                let mut t = rz[a];
                for c in 0..dv {
                    t += r[a * dv + c] * f64::from(x.v[j * dv + c]);
                }
                dk[j * d + a] = t as f32;
            }
            for c in 0..dv {
                let mut t = 0.0f64;
                for a in 0..d {
                    t += r[a * dv + c] * f64::from(x.k[j * d + a]);
                }
                dvv[j * dv + c] = t as f32;
            }
        }
        vec![dq, dk, dvv]
    }
}
