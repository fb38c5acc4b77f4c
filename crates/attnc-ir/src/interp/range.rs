//! The f32 range rule: "computation is f32" (LANGUAGE.md §3) for values the f64 interpreter
//! computes beyond what f32 can hold.
//!
//! Every node's value is its exact value (computed in f64, which holds every sum and product
//! of f32 values a program can form without overflow) rounded to the f32 *range*: a magnitude
//! that f32 rounds to infinity becomes ±inf, one that f32 rounds to zero becomes ±0, and any
//! other value keeps its f64 precision. A fused op's plain-form steps (its scores, each step
//! of its score expression, its softmax and its products) are nodes in this sense. So
//! `q @ k.T` with `q, k ≈ 1e20` is `+inf` in every engine (and the softmax over it NaN), while
//! `softmax(0) @ v` with `v ≈ 1e38` stays finite, as it is in f32.
//!
//! What is left order-dependent is documented in docs/language.md (values beyond f32 range):
//! a sum whose terms' magnitudes add up past the f32 range while its exact value stays inside
//! may overflow in an f32 engine, depending on the order it adds in.

use ndarray::ArrayD;

/// `x` rounded to the f32 range: ±inf where f32 rounds it to an infinity, ±0 where f32 rounds
/// it to zero, `x` itself otherwise (NaN stays NaN).
pub fn to_f32_range(x: f64) -> f64 {
    let single = x as f32;
    if single.is_infinite() || single == 0.0 {
        f64::from(single)
    } else {
        x
    }
}

/// Every element of `x` rounded to the f32 range ([`to_f32_range`]).
pub(super) fn round_range(mut x: ArrayD<f64>) -> ArrayD<f64> {
    x.mapv_inplace(to_f32_range);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_becomes_infinite_and_underflow_zero() {
        let max = f64::from(f32::MAX);
        assert_eq!(to_f32_range(max), max);
        assert_eq!(
            to_f32_range(3.4e38),
            3.4e38,
            "inside the range keeps f64 precision"
        );
        assert_eq!(to_f32_range(1e39), f64::INFINITY);
        assert_eq!(to_f32_range(-1e300), f64::NEG_INFINITY);
        // Half an ulp past f32::MAX rounds (to even) to infinity; just below it does not.
        let edge = 2f64.powi(128) - 2f64.powi(103);
        assert_eq!(to_f32_range(edge), f64::INFINITY);
        assert!(to_f32_range(edge * (1.0 - 1e-15)).is_finite());
        let tiny = f64::from(f32::from_bits(1));
        assert_eq!(to_f32_range(tiny), tiny);
        assert_eq!(to_f32_range(tiny * 0.3), 0.0);
        assert!(to_f32_range(-tiny * 0.3).is_sign_negative());
        assert_eq!(to_f32_range(1e-300), 0.0);
        assert!(to_f32_range(f64::NAN).is_nan());
        assert_eq!(to_f32_range(f64::NEG_INFINITY), f64::NEG_INFINITY);
        assert_eq!(to_f32_range(1.0 + 1e-12), 1.0 + 1e-12);
    }
}
