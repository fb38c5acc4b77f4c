//! The one error metric of the project: relative L2 error `‖got − want‖₂ / ‖want‖₂`, with one
//! policy for NaN, infinities and zero references, and the named tolerances it is held to.
//!
//! Validation of approximations (the user's `tol`), `attnc run --verify` and every test compare
//! results through [`compare`], so "error" means the same everywhere:
//!
//! - positions where both sides are NaN, or both the same infinity, agree and are skipped;
//! - a NaN or an infinity on one side only is a mismatch: the error is infinite (a plan that
//!   loses or invents a NaN is never accepted, whatever its other values);
//! - the norm is over the remaining positions; when the reference's norm there is 0, the error
//!   is the absolute norm of the difference;
//! - sides of different lengths are infinitely far apart.

/// Named tolerances on the relative L2 error.
pub mod tol {
    /// Exact f32 plans against the f64 interpreter, as the tests hold them (documented in
    /// QUALITY.md: the bound actually held).
    pub const EXACT_F32: f64 = 1e-5;
    /// Exact plans, as the language promises (LANGUAGE.md §3) and `--verify` enforces.
    pub const EXACT_CONTRACT: f64 = 1e-4;
    /// Both sides of an exact rewrite rule, evaluated in f64.
    pub const REWRITE: f64 = 1e-9;
    /// The default tolerance of an allowed approximation (LANGUAGE.md §3).
    pub const DEFAULT_APPROX: f64 = 1e-2;
}

/// The comparison of a result with its reference.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Comparison {
    /// `‖got − want‖₂ / ‖want‖₂` over the positions compared (see the module docs).
    pub relative_l2: f64,
    /// The largest absolute difference over the positions compared.
    pub max_abs: f64,
    /// Positions where exactly one side is NaN.
    pub nan_mismatches: usize,
    /// Positions where one side is infinite and the other is not the same infinity.
    pub inf_mismatches: usize,
    /// Whether the two sides have different lengths.
    pub length_mismatch: bool,
}

impl Comparison {
    /// The error the policy judges by: the relative L2 error, infinite when any NaN,
    /// infinity or length disagrees.
    pub fn error(&self) -> f64 {
        if self.length_mismatch || self.nan_mismatches > 0 || self.inf_mismatches > 0 {
            f64::INFINITY
        } else {
            self.relative_l2
        }
    }

    /// Whether the error is within `tolerance`.
    pub fn within(&self, tolerance: f64) -> bool {
        self.error() <= tolerance
    }
}

/// Compares `got` with the reference `want`, position by position.
pub fn compare(
    got: impl IntoIterator<Item = f64>,
    want: impl IntoIterator<Item = f64>,
) -> Comparison {
    let mut c = Comparison::default();
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    let (mut got, mut want) = (got.into_iter(), want.into_iter());
    loop {
        let (g, w) = match (got.next(), want.next()) {
            (Some(g), Some(w)) => (g, w),
            (None, None) => break,
            _ => {
                c.length_mismatch = true;
                break;
            }
        };
        if g.is_nan() || w.is_nan() {
            c.nan_mismatches += usize::from(g.is_nan() != w.is_nan());
            continue;
        }
        if g.is_infinite() || w.is_infinite() {
            c.inf_mismatches += usize::from(g != w);
            continue;
        }
        let d = g - w;
        diff += d * d;
        norm += w * w;
        c.max_abs = c.max_abs.max(d.abs());
    }
    c.relative_l2 = if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    };
    c
}

/// [`compare`] of two f32 slices.
pub fn compare_f32(got: &[f32], want: &[f32]) -> Comparison {
    compare(
        got.iter().map(|&x| f64::from(x)),
        want.iter().map(|&x| f64::from(x)),
    )
}

/// The judged error ([`Comparison::error`]) of two f32 slices.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    compare_f32(got, want).error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreeing_specials_are_skipped_and_disagreeing_ones_are_infinite() {
        assert_eq!(relative_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_l2(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
        assert_eq!(relative_l2(&[f32::NAN, 1.0], &[f32::NAN, 1.0]), 0.0);
        assert_eq!(
            relative_l2(&[f32::INFINITY, 1.0], &[f32::INFINITY, 1.0]),
            0.0
        );
        assert_eq!(relative_l2(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(relative_l2(&[1.0], &[f32::NAN]), f64::INFINITY);
        assert_eq!(
            relative_l2(&[f32::INFINITY], &[f32::NEG_INFINITY]),
            f64::INFINITY
        );
        assert_eq!(relative_l2(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        let c = compare_f32(&[f32::NAN, 3.0], &[0.0, 0.0]);
        assert_eq!((c.nan_mismatches, c.max_abs, c.relative_l2), (1, 3.0, 3.0));
        assert!(!c.within(tol::DEFAULT_APPROX));
    }

    #[test]
    fn a_zero_reference_gives_the_absolute_error() {
        assert_eq!(relative_l2(&[3.0, 4.0], &[0.0, 0.0]), 5.0);
        assert_eq!(relative_l2(&[], &[]), 0.0);
    }
}
