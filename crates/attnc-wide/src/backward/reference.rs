//! The scalar f64 reference of one backward call, every position (for tests of the kernels).

use crate::problem::Call;

/// Every gradient of one call in f64: `dq` (`m × d`), `dk` (`n × d`), `dv` (`n × dv`), the
/// gradient of every score position's bias term (`m × n`, 0 where masked) and of the slope.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// `dQ`.
    pub dq: Vec<f64>,
    /// `dK`.
    pub dk: Vec<f64>,
    /// `dV`.
    pub dv: Vec<f64>,
    /// `dY` per position (the bias gradient before any broadcast sum).
    pub dbias: Vec<f64>,
    /// The slope gradient.
    pub dslope: f64,
    /// Per position, the size of `dY` before its terms cancel, `P (|dP| + |D|)`: rounding
    /// errors of f32 kernels scale with it (a row's `dY` sums to 0, so sums of it cancel).
    pub magnitude: Vec<f64>,
}

/// The gradients of `call` for the cotangent `d_o` (`m × dv`, row-major), computed from
/// scratch (the forward recomputed in f64, no saved values).
pub fn reference(call: &Call<'_>, d_o: &[f32]) -> Reference {
    let (m, n, d, dv) = (call.m(), call.n(), call.q.cols, call.v.cols);
    let q = |i: usize, c: usize| f64::from(call.q.data.get(i * call.q.row_stride + c));
    let k = |j: usize, c: usize| f64::from(call.k.data.get(j * call.k.row_stride + c));
    let v = |j: usize, c: usize| f64::from(call.v.data.get(j * call.v.row_stride + c));
    let mut r = Reference {
        dq: vec![0.0; m * d],
        dk: vec![0.0; n * d],
        dv: vec![0.0; n * dv],
        dbias: vec![0.0; m * n],
        dslope: 0.0,
        magnitude: vec![0.0; m * n],
    };
    let scale = f64::from(call.score.scale);
    for i in 0..m {
        let ia = i as f64 + n as f64 - m as f64;
        let kept: Vec<bool> = (0..n)
            .map(|j| call.mask.is_none_or(|p| p.keeps(i, j, m, n)))
            .collect();
        // x_ij and dx/dy per key.
        let mut x = vec![0.0f64; n];
        let mut slope_of = vec![1.0f64; n];
        for j in 0..n {
            let s: f64 = (0..d).map(|c| q(i, c) * k(j, c)).sum();
            let mut y = s * scale;
            if let Some(b) = call.score.bias {
                y += f64::from(b.data[i * b.row_stride + j * b.col_stride]);
            }
            if let Some(slope) = call.score.alibi_slope {
                y += f64::from(slope) * (j as f64 - ia);
            }
            x[j] = y;
            if let Some(cap) = call.score.softcap {
                let cap = f64::from(cap);
                let t = (y / cap).tanh();
                x[j] = cap * t;
                slope_of[j] = 1.0 - t * t;
            }
        }
        let max = (0..n).filter(|&j| kept[j]).fold(f64::NEG_INFINITY, |a, j| {
            if a.is_nan() || x[j].is_nan() {
                f64::NAN
            } else {
                a.max(x[j])
            }
        });
        if max == f64::NEG_INFINITY {
            continue;
        }
        let total: f64 = (0..n)
            .filter(|&j| kept[j])
            .map(|j| (x[j] - max).exp())
            .sum();
        let p: Vec<f64> = (0..n)
            .map(|j| {
                if kept[j] {
                    (x[j] - max).exp() / total
                } else {
                    0.0
                }
            })
            .collect();
        let g = |c: usize| f64::from(d_o[i * dv + c]);
        let dp: Vec<f64> = (0..n)
            .map(|j| (0..dv).map(|c| g(c) * v(j, c)).sum())
            .collect();
        let big_d: f64 = (0..n).filter(|&j| kept[j]).map(|j| p[j] * dp[j]).sum();
        for j in (0..n).filter(|&j| kept[j]) {
            let dy = p[j] * (dp[j] - big_d) * slope_of[j];
            r.dbias[i * n + j] = dy;
            r.magnitude[i * n + j] = p[j] * (dp[j].abs() + big_d.abs()) * slope_of[j];
            r.dslope += dy * (j as f64 - ia);
            let ds = dy * scale;
            for c in 0..d {
                r.dq[i * d + c] += ds * k(j, c);
                r.dk[j * d + c] += ds * q(i, c);
            }
            for c in 0..dv {
                r.dv[j * dv + c] += p[j] * g(c);
            }
        }
    }
    r
}
