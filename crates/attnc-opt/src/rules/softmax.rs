//! Softmax to kernel form: shift invariance, deferred normalization and fusion of `softmax(S) @ V` into the
//! online-softmax attention node.
//!
//! The fused node `(attention q k v scale pattern)` means `softmax(mask((q @ kᵀ) * scale,
//! pattern)) @ v` over the last axis, with `all` for no mask. Fusion needs the score to be a
//! product against an explicit transpose, optionally scaled by a scalar.

use super::{Guard, RuleSpec};

/// The guard of the scaled fusion rules: as [`LAST_AXIS`], and the scale is a scalar.
const SCALED_LAST_AXIS: Guard = Guard::ScaledLastAxis {
    a: "?q",
    b: "?k",
    axis: "?ax",
    scale: "?c",
};

/// The guard of the fusion rules: the softmax runs over the last axis of `q @ kᵀ`.
const LAST_AXIS: Guard = Guard::LastAxisOfProduct {
    a: "?q",
    b: "?k",
    axis: "?ax",
};

/// The softmax family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // softmax(x + c) = softmax(x) for c constant along the row: a finite constant or max(x)
        RuleSpec::guarded(
            "softmax-shift",
            "(softmax (add ?x ?c) ?ax)",
            "(softmax ?x ?ax)",
            Guard::RowConstant {
                x: "?x",
                c: "?c",
                axis: "?ax",
            },
        ),
        // softmax(x - c) = softmax(x) for c constant along the row: a finite constant or max(x)
        RuleSpec::guarded(
            "softmax-shift-sub",
            "(softmax (sub ?x ?c) ?ax)",
            "(softmax ?x ?ax)",
            Guard::RowConstant {
                x: "?x",
                c: "?c",
                axis: "?ax",
            },
        ),
        // softmax(S) v = (exp(S - m) v) / max(rowsum(exp(S - m)), 1), m = max(rowmax(S), f32::MIN)
        // (the most negative finite f32: values are rounded to the f32 range, so -f64::MAX is -inf):
        // the clamps make an all -inf row give zeros (m finite, sum 0) exactly as softmax does,
        // and change nothing elsewhere (a row with a finite max has a sum of at least 1)
        RuleSpec::guarded(
            "softmax-defer",
            "(matmul (softmax ?s ?ax) ?v)",
            "(div (matmul (exp (sub ?s (maximum (max ?s ?ax) (const -3.4028234663852886e38)))) ?v) \
             (maximum (sum (exp (sub ?s (maximum (max ?s ?ax) (const -3.4028234663852886e38)))) ?ax) (const 1)))",
            Guard::LastAxisOfProduct {
                a: "?s",
                b: "?s",
                axis: "?ax",
            },
        ),
        // softmax(q kᵀ) v = attention(q, k, v, 1, all)
        RuleSpec::guarded(
            "attention-fuse",
            "(matmul (softmax (matmul ?q (transpose ?k)) ?ax) ?v)",
            "(attention ?q ?k ?v (const 1) all)",
            LAST_AXIS,
        ),
        // softmax((q kᵀ) c) v = attention(q, k, v, c, all) for a scalar c
        RuleSpec::guarded(
            "attention-fuse-scaled",
            "(matmul (softmax (mul (matmul ?q (transpose ?k)) ?c) ?ax) ?v)",
            "(attention ?q ?k ?v ?c all)",
            SCALED_LAST_AXIS,
        ),
        // softmax((q kᵀ) / c) v = attention(q, k, v, 1/c, all) for a scalar c
        RuleSpec::guarded(
            "attention-fuse-div",
            "(matmul (softmax (div (matmul ?q (transpose ?k)) ?c) ?ax) ?v)",
            "(attention ?q ?k ?v (div (const 1) ?c) all)",
            SCALED_LAST_AXIS,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::specs;
    use crate::rules::testkit::{assert_covered, check, dim, refuses, rule, PATTERNS};
    use proptest::prelude::*;

    #[test]
    fn every_rule_has_a_property_test() {
        assert_covered(
            &specs(),
            &[
                "softmax-defer",
                "softmax-shift",
                "softmax-shift-sub",
                "attention-fuse",
                "attention-fuse-scaled",
                "attention-fuse-div",
            ],
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn softmax_shift(b in dim(), m in dim(), n in dim(), scalar in any::<bool>(), seed in any::<u64>()) {
            let c = if scalar { "(const 3.5)" } else { "(max (input x) 2)" };
            check(&rule(&specs(), "softmax-shift"), "x: f32[b, m, n]",
                  &[("?x", "(input x)"), ("?c", c), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n)], seed);
        }

        #[test]
        fn softmax_shift_sub(b in dim(), m in dim(), n in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "softmax-shift-sub"), "x: f32[b, m, n]",
                  &[("?x", "(input x)"), ("?c", "(max (input x) 2)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n)], seed);
        }

        #[test]
        fn softmax_shift_keeps_an_input_shift(b in dim(), m in dim(), n in dim(), sub in any::<bool>()) {
            // An input shift may hold NaN or ±inf, which softmax(x + c) propagates (or turns
            // into a zero row) and softmax(x) would drop.
            let op = if sub { "sub" } else { "add" };
            let name = if sub { "softmax-shift-sub" } else { "softmax-shift" };
            refuses(&rule(&specs(), name), "x: f32[b, m, n], c: f32[b, m, 1]",
                    &format!("(softmax ({op} (input x) (input c)) 2)"),
                    &[("b", b), ("m", m), ("n", n)]);
        }

        #[test]
        fn softmax_defer(b in dim(), m in dim(), n in dim(), e in dim(), p in 0..PATTERNS.len(),
                         masked in any::<bool>(), seed in any::<u64>()) {
            let s = if masked { format!("(mask (input s) {} -inf)", PATTERNS[p]) } else { "(input s)".into() };
            check(&rule(&specs(), "softmax-defer"), "s: f32[b, m, n], v: f32[n, e]",
                  &[("?s", &s), ("?v", "(input v)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("e", e)], seed);
        }

        #[test]
        fn attention_fuse(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "attention-fuse"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[n, e]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn attention_fuse_scaled(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "attention-fuse-scaled"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(rsqrt (dim d))"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn attention_fuse_div(b in dim(), m in dim(), n in dim(), d in dim(), seed in any::<u64>()) {
            check(&rule(&specs(), "attention-fuse-div"), "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d]",
                  &[("?q", "(input q)"), ("?k", "(input k)"), ("?v", "(input v)"),
                    ("?c", "(sqrt (dim d))"), ("?ax", "2")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }
    }
}
