//! The semantics of the axis operations beyond `sum`, `max` and `mean`: the log-sum-exp, the
//! softmax with a sink logit, pooling of row blocks and the running sum (LANGUAGE.md §5).
//!
//! - `logsumexp(x, axis)` is `m + ln Σ exp(x - m)` with `m` the NaN-propagating maximum of
//!   the lane: `-inf` for an all `-inf` (or empty) lane, `+inf` when an entry is `+inf`, NaN
//!   when one is NaN. Sums run in index order.
//! - `softmax_sink(x, s)` over the last axis: with `m = max(s, max_k x_k)` (NaN propagates),
//!   `p_j = exp(x_j - m) / (exp(s - m) + Σ_k exp(x_k - m))`; a row whose entries and sink are
//!   all `-inf` gives zeros, like `softmax`. The sink takes no value: the row sums to less
//!   than 1.
//! - `mean_pool(x, b)` and `max_pool(x, b)` turn `[.., n, d]` into `[.., ceil(n/b), d]`: block
//!   `t` covers rows `t·b .. min((t+1)·b, n)`; the mean is over the block's own rows, the
//!   maximum propagates NaN.
//! - `cumsum(x, axis)` is the inclusive running sum along `axis`, in index order.

use super::{broadcast_shapes, max_nan};
use crate::op::PoolOp;
use ndarray::{ArrayD, ArrayView1, Axis, IxDyn};

/// The log-sum-exp of one lane.
pub(super) fn logsumexp_lane(lane: ArrayView1<'_, f64>) -> f64 {
    let m = lane.iter().fold(f64::NEG_INFINITY, |m, &v| max_nan(m, v));
    if m.is_nan() || m.is_infinite() {
        // NaN, or every entry -inf (or none), or some entry +inf.
        return m;
    }
    m + lane.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

/// `softmax_sink(x, s)` over the last axis; `s` broadcasts into `x`'s rows `[.., 1]`.
pub(super) fn softmax_sink(x: &ArrayD<f64>, s: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let rank = x.ndim();
    if rank == 0 {
        return Err("softmax_sink of a scalar".to_string());
    }
    let mut rows_shape = x.shape().to_vec();
    rows_shape[rank - 1] = 1;
    if broadcast_shapes(&rows_shape, s.shape()).as_deref() != Some(rows_shape.as_slice()) {
        return Err(format!(
            "the sink of shape {:?} does not broadcast to {rows_shape:?}",
            s.shape()
        ));
    }
    let sinks = s
        .broadcast(IxDyn(&rows_shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {rows_shape:?}", s.shape()))?;
    let sinks: Vec<f64> = sinks.iter().copied().collect();
    let mut out = x.as_standard_layout().into_owned();
    let n = x.shape()[rank - 1];
    if out.is_empty() || n == 0 {
        return Ok(out);
    }
    let data = out
        .as_slice_mut()
        .ok_or("a standard-layout array is contiguous")?;
    for (row, &sink) in data.chunks_mut(n).zip(&sinks) {
        let m = row.iter().fold(sink, |m, &v| max_nan(m, v));
        if m == f64::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        row.iter_mut().for_each(|v| *v = (*v - m).exp());
        let total = (sink - m).exp() + row.iter().sum::<f64>();
        row.iter_mut().for_each(|v| *v /= total);
    }
    Ok(out)
}

/// Pools blocks of `size` rows (the second-to-last axis).
pub(super) fn pool(op: PoolOp, size: usize, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let rank = x.ndim();
    if rank < 2 {
        return Err(format!("pooling of shape {:?} (rank < 2)", x.shape()));
    }
    if size == 0 {
        return Err("pooling blocks of 0 rows".to_string());
    }
    let (n, d) = (x.shape()[rank - 2], x.shape()[rank - 1]);
    let blocks = n.div_ceil(size);
    let mut shape = x.shape().to_vec();
    shape[rank - 2] = blocks;
    let outer: usize = x.shape()[..rank - 2].iter().product();
    let src = x.as_standard_layout();
    let src = src
        .as_slice()
        .ok_or("a standard-layout array is contiguous")?;
    let mut out = vec![0.0; outer * blocks * d];
    for o in 0..outer {
        for t in 0..blocks {
            let (r0, r1) = (t * size, ((t + 1) * size).min(n));
            for c in 0..d {
                let column = (r0..r1).map(|r| src[(o * n + r) * d + c]);
                out[(o * blocks + t) * d + c] = match op {
                    PoolOp::Mean => column.sum::<f64>() / (r1 - r0) as f64,
                    PoolOp::Max => column.fold(f64::NEG_INFINITY, max_nan),
                };
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// The inclusive running sum along `axis`.
pub(super) fn cumsum(axis: usize, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    if axis >= x.ndim() {
        return Err(format!(
            "axis {axis} of shape {:?} is out of range",
            x.shape()
        ));
    }
    let mut out = x.as_standard_layout().into_owned();
    for mut lane in out.lanes_mut(Axis(axis)) {
        let mut total = 0.0;
        for v in lane.iter_mut() {
            total += *v;
            *v = total;
        }
    }
    Ok(out)
}
