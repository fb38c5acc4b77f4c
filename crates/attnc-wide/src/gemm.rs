//! Plain f32 matrix products on the widest vectors the CPU has, through the `gemm` crate
//! (packing and register-blocked AVX-512 micro-kernels, chosen at run time): the generic
//! product steps of a plan (Linformer's projections, linear attention's key-value state,
//! projections computed inside a kernel).
//!
//! [`sgemm`] is a bounds-checked front to it: every element either operand may read is
//! inside its slice before anything runs.

use crate::problem::CallError;

/// A `rows × cols` f32 matrix: element `(r, c)` at `r * row_stride + c * col_stride` of `data`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements between rows (0 repeats a row).
    pub row_stride: usize,
    /// Elements between columns (0 repeats a column).
    pub col_stride: usize,
}

impl Matrix<'_> {
    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|l| l < self.data.len())
            && isize::try_from(self.row_stride).is_ok()
            && isize::try_from(self.col_stride).is_ok()
    }
}

/// Starts, once per process and on a thread of its own, the `gemm` crate's one-time setup:
/// its first product of more than 64 × 64 reads the caches' sizes from sysfs (a directory
/// walk, about 1.5 ms on this kind of machine). Called when a plan compiles (and when a front
/// end starts), the setup runs beside code generation instead of inside the first step; a
/// product that starts before it ends waits for it rather than repeating it.
pub fn prepare_in_background() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("attnc-gemm-setup".into())
            .spawn(|| {
                let caches: &[gemm_common::cache::CacheInfo; 3] = &gemm_common::cache::CACHE_INFO;
                std::hint::black_box(caches);
            });
        // Without a thread the first product does the setup itself.
        drop(spawned);
    });
}

/// `out = a · b` with `out` row-major `a.rows × b.cols` (contiguous), on the calling thread.
/// Errors, before anything is computed, when the shapes do not multiply or an operand reaches
/// past its slice.
pub fn sgemm(a: &Matrix<'_>, b: &Matrix<'_>, out: &mut [f32]) -> Result<(), CallError> {
    product(a, b, out, false)
}

/// `out += a · b` (as [`sgemm`], adding to `out`'s values instead of replacing them): sums
/// of products over blocks of the inner dimension, one block at a time.
pub fn sgemm_add(a: &Matrix<'_>, b: &Matrix<'_>, out: &mut [f32]) -> Result<(), CallError> {
    product(a, b, out, true)
}

/// `out = a · b`, or `out += a · b` when `accumulate`.
fn product(
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    out: &mut [f32],
    accumulate: bool,
) -> Result<(), CallError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(CallError::Shape(format!(
            "a {m} × {k} matrix does not multiply a {} × {n} one",
            b.rows
        )));
    }
    if !a.in_bounds() || !b.in_bounds() {
        return Err(CallError::Shape(
            "a matrix operand reaches past its elements".to_string(),
        ));
    }
    if m.checked_mul(n) != Some(out.len()) {
        return Err(CallError::Shape(format!(
            "the output holds {} elements, not {m} × {n}",
            out.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: every element `gemm` reads — (r, c) of `a` for r < m, c < k and of `b` for
    // r < k, c < n — lies inside its slice (checked above, strides fit isize), and it reads
    // (when `accumulate`) and writes exactly the m × n elements of `out` (row stride n,
    // column stride 1), which is borrowed mutably and aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(a: &Matrix<'_>, b: &Matrix<'_>) -> Vec<f64> {
        let mut out = vec![0.0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] += f64::from(a.data[i * a.row_stride + p * a.col_stride])
                        * f64::from(b.data[p * b.row_stride + j * b.col_stride]);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn products_match_a_naive_loop(m in 0usize..40, k in 0usize..40, n in 0usize..40,
                                       transposed_a in any::<bool>(), transposed_b in any::<bool>(),
                                       seed in any::<u32>()) {
            let data = |len: usize, salt: u32| -> Vec<f32> {
                (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed ^ salt) % 1000) as f32 / 500.0 - 1.0).collect()
            };
            let (ad, bd) = (data(m * k, 1), data(k * n, 2));
            let a = if transposed_a {
                Matrix { data: &ad, rows: m, cols: k, row_stride: 1, col_stride: m }
            } else {
                Matrix { data: &ad, rows: m, cols: k, row_stride: k, col_stride: 1 }
            };
            let b = if transposed_b {
                Matrix { data: &bd, rows: k, cols: n, row_stride: 1, col_stride: k }
            } else {
                Matrix { data: &bd, rows: k, cols: n, row_stride: n, col_stride: 1 }
            };
            let mut out = vec![f32::NAN; m * n];
            sgemm(&a, &b, &mut out).expect("multiplies");
            let want = naive(&a, &b);
            for (g, w) in out.iter().zip(&want) {
                prop_assert!((f64::from(*g) - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn sgemm_add_accumulates_blocks_of_the_inner_dimension() {
        // [1 2 3] · [4 5 6]ᵀ in two blocks of the inner dimension: 1·4 + (2·5 + 3·6).
        let (a, b) = ([1.0f32, 2.0, 3.0], [4.0f32, 5.0, 6.0]);
        fn row(data: &[f32]) -> Matrix<'_> {
            Matrix {
                data,
                rows: 1,
                cols: data.len(),
                row_stride: data.len(),
                col_stride: 1,
            }
        }
        fn col(data: &[f32]) -> Matrix<'_> {
            Matrix {
                data,
                rows: data.len(),
                cols: 1,
                row_stride: 1,
                col_stride: 1,
            }
        }
        let mut out = [0.0f32];
        sgemm(&row(&a[..1]), &col(&b[..1]), &mut out).expect("multiplies");
        sgemm_add(&row(&a[1..]), &col(&b[1..]), &mut out).expect("multiplies");
        assert_eq!(out, [32.0]);
        // An empty inner dimension adds nothing (and `sgemm` would write zeros).
        sgemm_add(&row(&[]), &col(&[]), &mut out).expect("multiplies");
        assert_eq!(out, [32.0]);
    }

    #[test]
    fn out_of_bounds_operands_are_refused() {
        let x = [1.0f32; 4];
        let a = Matrix {
            data: &x,
            rows: 2,
            cols: 3,
            row_stride: 3,
            col_stride: 1,
        };
        let b = Matrix {
            data: &x,
            rows: 3,
            cols: 1,
            row_stride: 1,
            col_stride: 0,
        };
        let mut out = [0.0f32; 2];
        assert!(sgemm(&a, &b, &mut out).is_err());
        let b2 = Matrix {
            data: &x,
            rows: 2,
            cols: 1,
            row_stride: 1,
            col_stride: 0,
        };
        let a2 = Matrix {
            data: &x,
            rows: 2,
            cols: 2,
            row_stride: 2,
            col_stride: 1,
        };
        assert!(sgemm(&a2, &b2, &mut out).is_ok());
        assert_eq!(out, [2.0, 2.0]);
    }
}
