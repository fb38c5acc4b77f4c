//! Host steps: operations the plan runs as Rust code over its buffers instead of generated
//! code — pooling of row blocks and running sums. They are memory-bound passes over their
//! input (`O(elements)`), in index order, so results are the same for every thread count.

use crate::buffer::BufferView;
use crate::error::{JitError, Result};
use crate::kernels::reduce::AxisSpec;
use attnc_ir::PoolOp;

/// A pooling of blocks of rows over a contiguous `[outer, n, width]` input, written as
/// `[outer, ceil(n / size), width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// Mean or maximum.
    pub op: PoolOp,
    /// Product of the axes before the rows.
    pub outer: usize,
    /// Rows of the input.
    pub n: usize,
    /// Elements per row.
    pub width: usize,
    /// Rows per block (≥ 1).
    pub size: usize,
}

impl PoolSpec {
    /// Blocks per batch entry.
    pub fn blocks(&self) -> usize {
        self.n.div_ceil(self.size.max(1))
    }
}

fn f32_input<'a>(views: &[BufferView<'a>], k: usize, what: &str) -> Result<&'a [f32]> {
    match views.get(k) {
        Some(BufferView::F32(x)) => Ok(x),
        _ => Err(JitError::Buffer {
            input: what.to_string(),
            detail: format!("operand {k} is not an f32 buffer"),
        }),
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(JitError::Buffer {
            input: what.to_string(),
            detail: format!("holds {got} elements, the step needs {want}"),
        })
    }
}

/// Pools `views[0]` into `out` (the mean over each block's own rows; the maximum propagates
/// NaN, as the interpreter's does).
pub fn pool(spec: &PoolSpec, views: &[BufferView<'_>], out: &mut [f32]) -> Result<()> {
    let x = f32_input(views, 0, spec.op.name())?;
    let (n, w, blocks) = (spec.n, spec.width, spec.blocks());
    check_len(spec.op.name(), x.len(), spec.outer * n * w)?;
    check_len("output", out.len(), spec.outer * blocks * w)?;
    if w == 0 {
        return Ok(());
    }
    for (o, dst) in out.chunks_mut((blocks * w).max(1)).enumerate() {
        for (t, row) in dst.chunks_mut(w).enumerate() {
            let (r0, r1) = (t * spec.size, ((t + 1) * spec.size).min(n));
            let init = match spec.op {
                PoolOp::Mean => 0.0,
                PoolOp::Max => f32::NEG_INFINITY,
            };
            row.fill(init);
            for r in r0..r1 {
                let src = &x[(o * n + r) * w..][..w];
                for (acc, &v) in row.iter_mut().zip(src) {
                    *acc = match spec.op {
                        PoolOp::Mean => *acc + v,
                        // IEEE maximum: NaN wins.
                        PoolOp::Max if v.is_nan() || acc.is_nan() => f32::NAN,
                        PoolOp::Max => acc.max(v),
                    };
                }
            }
            if spec.op == PoolOp::Mean {
                let count = (r1 - r0) as f32;
                row.iter_mut().for_each(|v| *v /= count);
            }
        }
    }
    Ok(())
}

/// The gradient of [`pool`]: `views[0]` the pooled input `x` (`[outer, n, width]`),
/// `views[1]` the gradient of the pooled value (`[outer, blocks, width]`); writes `x`'s shape.
/// A mean's block gradient is divided over its rows; a maximum's goes to the first row of the
/// block that attains it in each column (the first NaN when the maximum is NaN).
pub fn unpool(spec: &PoolSpec, views: &[BufferView<'_>], out: &mut [f32]) -> Result<()> {
    let what = spec.op.name();
    let x = f32_input(views, 0, what)?;
    let dy = f32_input(views, 1, what)?;
    let (n, w, blocks) = (spec.n, spec.width, spec.blocks());
    check_len(what, x.len(), spec.outer * n * w)?;
    check_len(what, dy.len(), spec.outer * blocks * w)?;
    check_len("output", out.len(), spec.outer * n * w)?;
    out.fill(0.0);
    for o in 0..spec.outer {
        for t in 0..blocks {
            let (r0, r1) = (t * spec.size, ((t + 1) * spec.size).min(n));
            let g = &dy[(o * blocks + t) * w..][..w];
            let at = |r: usize, c: usize| (o * n + r) * w + c;
            for c in 0..w {
                match spec.op {
                    PoolOp::Mean => {
                        let share = g[c] / (r1 - r0) as f32;
                        for r in r0..r1 {
                            out[at(r, c)] = share;
                        }
                    }
                    PoolOp::Max => {
                        let top = (r0..r1)
                            .map(|r| x[at(r, c)])
                            .fold(f32::NEG_INFINITY, |a, v| {
                                if a.is_nan() || v.is_nan() {
                                    f32::NAN
                                } else {
                                    a.max(v)
                                }
                            });
                        let first = (r0..r1).find(|&r| {
                            let v = x[at(r, c)];
                            v == top || (v.is_nan() && top.is_nan())
                        });
                        if let Some(r) = first {
                            out[at(r, c)] = g[c];
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The inclusive running sum of `views[0]` (`[outer, len, inner]`) along its middle axis.
pub fn cumsum(spec: &AxisSpec, views: &[BufferView<'_>], out: &mut [f32]) -> Result<()> {
    let x = f32_input(views, 0, "cumsum")?;
    let total = spec.outer * spec.len * spec.inner;
    check_len("cumsum", x.len(), total)?;
    check_len("output", out.len(), total)?;
    let (len, inner) = (spec.len, spec.inner);
    for o in 0..spec.outer {
        for i in 0..inner {
            let mut acc = 0.0f32;
            for k in 0..len {
                let at = (o * len + k) * inner + i;
                acc += x[at];
                out[at] = acc;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_blocks_with_a_short_last_block() {
        let x: Vec<f32> = (0..10).map(|v| v as f32).collect(); // [5, 2]
        let spec = PoolSpec {
            op: PoolOp::Mean,
            outer: 1,
            n: 5,
            width: 2,
            size: 2,
        };
        let mut out = vec![0.0; 6];
        pool(&spec, &[BufferView::F32(&x)], &mut out).expect("pools");
        assert_eq!(out, [1.0, 2.0, 5.0, 6.0, 8.0, 9.0]);
        let max = PoolSpec {
            op: PoolOp::Max,
            ..spec
        };
        pool(&max, &[BufferView::F32(&x)], &mut out).expect("pools");
        assert_eq!(out, [2.0, 3.0, 6.0, 7.0, 8.0, 9.0]);
        let err = pool(&max, &[BufferView::F32(&x[..4])], &mut out).unwrap_err();
        assert!(err.to_string().contains("needs 10"), "{err}");
    }

    #[test]
    fn running_sums_follow_the_middle_axis() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [1, 3, 2]
        let spec = AxisSpec {
            outer: 1,
            len: 3,
            inner: 2,
        };
        let mut out = [0.0f32; 6];
        cumsum(&spec, &[BufferView::F32(&x)], &mut out).expect("sums");
        assert_eq!(out, [1.0, 2.0, 4.0, 6.0, 9.0, 12.0]);
    }
}
