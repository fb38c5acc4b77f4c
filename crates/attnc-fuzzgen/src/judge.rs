//! The comparison rule: a JIT result against the interpreter's value and the bound of
//! [`crate::bound`], element by element.
//!
//! - bound `+inf`: the rules leave the element unspecified; it is counted, not compared;
//! - the interpreter's value is NaN: the JIT's must be NaN; ±inf: the same infinity;
//! - finite: the JIT's must be finite and within [`SLACK`] times the bound;
//! - over the compared finite elements of a well-conditioned result (bounds below 10⁻⁶ of the
//!   values in L2), the relative L2 error must also be within 10⁻⁵ (the bound the project's
//!   exact plans hold, `attnc_ir::compare::tol::EXACT_F32`).

use ndarray::ArrayD;

/// How far past its bound an element may be (the bound is first order, and the constants of
/// the inline functions are measured, not proven).
pub const SLACK: f64 = 2.0;

/// Results whose bound, in L2, is at most this fraction of their values are well-conditioned.
const WELL_CONDITIONED: f64 = 1e-6;

/// One element that breaks the rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Its flat index.
    pub index: usize,
    /// The JIT's value.
    pub got: f32,
    /// The interpreter's value.
    pub want: f64,
    /// Its bound.
    pub bound: f64,
}

/// The comparison of one result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Elements compared.
    pub compared: usize,
    /// Elements the rules leave unspecified.
    pub unspecified: usize,
    /// Elements that break the rule (the first few).
    pub mismatches: Vec<Mismatch>,
    /// How many break it.
    pub mismatch_count: usize,
    /// The relative L2 error over the compared finite elements, when well-conditioned.
    pub relative_l2: Option<f64>,
    /// The largest `|got − want| / bound` over the compared finite elements (0 when none):
    /// how much of its bound the worst element uses; the rule allows up to [`SLACK`].
    pub worst: f64,
}

impl Verdict {
    /// Whether the result follows the rule.
    pub fn passed(&self) -> bool {
        self.mismatch_count == 0
            && self
                .relative_l2
                .is_none_or(|e| e <= attnc_ir::compare::tol::EXACT_F32)
    }
}

/// Judges `got` against the interpreter's `want` with the bounds `bound` (same shape).
pub fn judge(got: &[f32], want: &ArrayD<f64>, bound: &ArrayD<f64>) -> Verdict {
    let mut v = Verdict::default();
    if got.len() != want.len() || want.len() != bound.len() {
        v.mismatch_count = 1;
        return v;
    }
    let (mut pairs_got, mut pairs_want) = (Vec::new(), Vec::new());
    let mut bound_norm = 0.0f64;
    for (index, ((&g, &w), &b)) in got.iter().zip(want.iter()).zip(bound.iter()).enumerate() {
        if b.is_nan() || b == f64::INFINITY {
            v.unspecified += 1;
            continue;
        }
        v.compared += 1;
        let g64 = f64::from(g);
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g64 == w
        } else {
            g.is_finite() && (g64 - w).abs() <= SLACK * b
        };
        if !ok {
            v.mismatch_count += 1;
            if v.mismatches.len() < 8 {
                v.mismatches.push(Mismatch {
                    index,
                    got: g,
                    want: w,
                    bound: b,
                });
            }
        } else if w.is_finite() {
            let used = (g64 - w).abs() / b;
            if used.is_finite() {
                v.worst = v.worst.max(used);
            }
            pairs_got.push(g64);
            pairs_want.push(w);
            bound_norm += b * b;
        }
    }
    let want_norm: f64 = pairs_want.iter().map(|w| w * w).sum();
    if !pairs_want.is_empty() && bound_norm.sqrt() <= WELL_CONDITIONED * want_norm.sqrt() {
        v.relative_l2 = Some(attnc_ir::compare::compare(pairs_got, pairs_want).relative_l2);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(v: &[f64]) -> ArrayD<f64> {
        ndarray::arr1(v).into_dyn()
    }

    #[test]
    fn classes_must_match_and_values_stay_within_the_bound() {
        let want = arr(&[f64::NAN, f64::INFINITY, 1.0, 5.0]);
        let bound = arr(&[0.0, 0.0, 1e-6, f64::INFINITY]);
        let ok = judge(&[f32::NAN, f32::INFINITY, 1.000_001, 0.0], &want, &bound);
        assert!(ok.passed(), "{ok:?}");
        assert_eq!((ok.compared, ok.unspecified), (3, 1));
        for bad in [
            [1.0, f32::INFINITY, 1.0, 0.0],
            [f32::NAN, f32::NEG_INFINITY, 1.0, 0.0],
            [f32::NAN, f32::INFINITY, 1.01, 0.0],
            [f32::NAN, f32::INFINITY, f32::INFINITY, 0.0],
        ] {
            let v = judge(&bad, &want, &bound);
            assert!(!v.passed(), "{bad:?}");
            assert_eq!(v.mismatch_count, 1);
        }
    }

    #[test]
    fn well_conditioned_results_hold_the_relative_l2_bound() {
        let want = arr(&[1.0, 2.0]);
        let bound = arr(&[1e-7, 1e-7]);
        let v = judge(&[1.0, 2.0], &want, &bound);
        assert_eq!(v.relative_l2, Some(0.0));
        let loose = judge(&[1.0, 2.0], &want, &arr(&[1.0, 1.0]));
        assert_eq!(loose.relative_l2, None, "not well-conditioned");
    }
}
