//! Values near and beyond the f32 range (QUALITY.md item 21, docs/language.md "Values beyond
//! the f32 range"): fused attention keeps a finite result finite however close V is to the
//! f32 limit, and scores beyond the range give the interpreter's NaN (or zero) rows — on every
//! tier this machine has, fused and by the plain form, at odd shapes.
mod common;

use attnc_ir::DType;
use common::kernel;
use common::tiers::{check, on_every_tier};

const ATTENTION: &str =
    "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
    { return softmax(q @ k.T / sqrt(d)) @ v; }";

/// Odd shapes (h, m, n, d, e): tile edges, a long decode row, a head width past any tile.
const SHAPES: [(usize, usize, usize, usize, usize); 4] = [
    (2, 5, 113, 3, 3),
    (1, 1, 1023, 8, 5),
    (3, 17, 9, 59, 40),
    (1, 33, 65, 1, 1),
];

fn dims(h: usize, m: usize, n: usize, d: usize, e: usize) -> Vec<(&'static str, u64)> {
    [("h", h), ("m", m), ("n", n), ("d", d), ("e", e)]
        .map(|(k, v)| (k, v as u64))
        .to_vec()
}

#[test]
fn attention_over_values_near_the_f32_limit_stays_finite() {
    // Issue row 6: q = k = 0 weighs every key 1/n; the mean of v = 1e38 is 1e38, while the
    // kernel's running sum Σ p·v reaches n · 1e38.
    for (h, m, n, d, e) in SHAPES {
        let values = [
            vec![0.0; h * m * d],
            vec![0.0; h * n * d],
            (0..h * n * e)
                .map(|i| 1e38 + (i % 7) as f32 * 3e37)
                .collect(),
        ];
        for out in on_every_tier(check(ATTENTION, &dims(h, m, n, d, e), &values)) {
            assert!(out.iter().all(|x| x.is_finite() && *x >= 1e38), "{out:?}");
        }
    }
}

#[test]
fn masked_attention_over_values_of_both_signs_near_the_limit_stays_finite() {
    let src = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
        { return softmax(mask(q @ k.T * 0.5, causal | global(3))) @ v; }";
    let (h, m, n, d, e) = (2, 37, 113, 5, 7);
    let q = common::data(h * m * d, 1);
    let k = common::data(h * n * d, 2);
    // Each column keeps one sign (no cancellation) but the columns alternate.
    let v: Vec<f32> = (0..h * n * e)
        .map(|i| if i % 2 == 0 { 3.3e38 } else { -2.9e38 } * (1.0 - (i % 5) as f32 * 0.01))
        .collect();
    for out in on_every_tier(check(src, &dims(h, m, n, d, e), &[q, k, v])) {
        assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    }
}

#[test]
fn attention_over_a_value_buffer_shared_with_the_keys_stays_finite() {
    // V is K's buffer: the rerun scales V alone (V has a slot of its own in the step).
    let src = "kernel f(q: f32[h, m, d], k: f32[h, n, d]) -> f32[h, m, d] \
        { return softmax(q @ k.T) @ k; }";
    let (h, m, n, d) = (2, 7, 64, 4);
    let values = [vec![0.0; h * m * d], vec![2e38; h * n * d]];
    for out in on_every_tier(check(
        src,
        &[("h", 2), ("m", 7), ("n", 64), ("d", 4)],
        &values,
    )) {
        assert!(
            out.iter().all(|&x| (x - 2e38).abs() <= 2e38 * 1e-6),
            "{out:?}"
        );
    }
}

#[test]
fn bf16_values_at_the_bf16_limit_stay_finite() {
    let src = "kernel f(q: bf16[h, m, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, m, d] \
        { return softmax(mask(q @ k.T / sqrt(d), causal)) @ v; }";
    let (h, m, n, d) = (3, 9, 41, 6);
    let big = half::bf16::MAX.to_f32();
    let values = [
        common::data(h * m * d, 5).into_iter().map(bf16).collect(),
        common::data(h * n * d, 6).into_iter().map(bf16).collect(),
        vec![big; h * n * d],
    ];
    let k = kernel(src);
    assert!(k.params.iter().all(|p| p.dtype == DType::Bf16));
    for out in on_every_tier(check(
        src,
        &[("h", 3), ("m", 9), ("n", 41), ("d", 6)],
        &values,
    )) {
        assert!(out.iter().all(|&x| x.is_finite()), "{out:?}");
    }
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[test]
fn infinities_and_nans_from_the_inputs_stay_after_the_rerun() {
    // Row 0 of q is NaN (its output row is NaN); key 3 of v is +inf in column 1 (every row
    // that weighs it gets +inf there). The other values are large enough to need the rerun.
    let (h, m, n, d, e) = (1, 6, 40, 2, 3);
    let mut q = vec![0.0; h * m * d];
    q[0] = f32::NAN;
    let mut v = vec![2e38; h * n * e];
    v[3 * e + 1] = f32::INFINITY;
    let values = [q, vec![0.0; h * n * d], v];
    let outs = on_every_tier(check(ATTENTION, &dims(h, m, n, d, e), &values));
    for out in outs {
        assert!(out[..e].iter().all(|x| x.is_nan()), "{out:?}");
        for row in out[e..].chunks(e) {
            assert_eq!(row[1], f32::INFINITY);
            assert!(row[0].is_finite() && row[2].is_finite(), "{row:?}");
        }
    }
}

#[test]
fn scores_beyond_the_f32_range_give_the_interpreters_rows() {
    // Issue row 8: q·k ≈ ±3e40 is ±inf in f32, in both engines. Rows whose scores are +inf
    // are NaN (inf − inf); rows whose every score is −inf are zeros, as a fully masked row.
    for (h, m, n, d, e) in SHAPES {
        let q: Vec<f32> = (0..h * m * d)
            .map(|i| if (i / d) % 2 == 0 { 1e20 } else { -1e20 })
            .collect();
        let values = [q, vec![1e20; h * n * d], common::data(h * n * e, 3)];
        for out in on_every_tier(check(ATTENTION, &dims(h, m, n, d, e), &values)) {
            for (r, row) in out.chunks(e).enumerate() {
                if r % 2 == 0 {
                    assert!(row.iter().all(|x| x.is_nan()), "row {r}: {row:?}");
                } else {
                    assert!(row.iter().all(|&x| x == 0.0), "row {r}: {row:?}");
                }
            }
        }
    }
}
