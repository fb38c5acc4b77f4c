//! Gated attention: a fused attention multiplied by a gate constant along its rows (per head
//! `[h, 1, 1]`, per query `[h, m, 1]` or `[m, 1]`, `relu(g)` or a 0/1 input, on either side)
//! skips the query tiles where the gate is zero, and matches the interpreter on every tier:
//! all-zero, all-one and half-zero gates, m ≠ n, sizes off the tiles, and NaN or infinite
//! inputs of a gated-off head (the product is then NaN, as written, so nothing is skipped).

mod common;

use attnc_jit::{CompileOptions, CompiledKernel};
use common::tiers::{check, tiers};
use common::{bindings, data, kernel, optimized, run_jit};
use proptest::prelude::*;

/// A program gating `softmax(q kᵀ / √d) v` by `gate` (an expression of `g`) on `side`.
fn source(gate_shape: &str, gate: &str, gate_first: bool, causal: bool) -> String {
    let s = if causal {
        "mask(q @ k.T / sqrt(d), causal)"
    } else {
        "q @ k.T / sqrt(d)"
    };
    let a = format!("(softmax({s}) @ v)");
    let product = if gate_first {
        format!("{gate} * {a}")
    } else {
        format!("{a} * {gate}")
    };
    format!(
        "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], g: f32{gate_shape}) -> f32[h, m, e] {{
            return {product};
        }}"
    )
}

/// How the gate values are drawn.
#[derive(Clone, Copy, Debug)]
enum Gates {
    Zero,
    One,
    /// Zero on every other gate value, random elsewhere (negative ones zeroed by `relu`).
    Half,
}

fn gate_values(len: usize, gates: Gates, seed: u64) -> Vec<f32> {
    let random = data(len, seed);
    (0..len)
        .map(|i| match gates {
            Gates::Zero => 0.0,
            Gates::One => 1.0,
            Gates::Half if i % 2 == 0 => 0.0,
            Gates::Half => random[i].abs() + 0.25,
        })
        .collect()
}

/// The input values of `src` at `dims`: random Q, K, V and the gate drawn by `gates`.
fn values(src: &str, dims: &[(&str, u64)], gates: Gates, seed: u64) -> Vec<Vec<f32>> {
    let k = kernel(src);
    let b = bindings(dims);
    common::inputs(&k, &b, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (shape, v))| match i {
            3 => gate_values(shape.iter().product(), gates, seed),
            _ => v,
        })
        .collect()
}

/// The fraction of the attention work skipped by the optimized program on `values`, on
/// every tier (the same on each), after checking that its attention step is gated.
fn skipped(src: &str, dims: &[(&str, u64)], values: &[Vec<f32>]) -> f64 {
    let fractions = skipped_per_tier(src, dims, values);
    assert!(fractions.windows(2).all(|w| w[0] == w[1]), "{fractions:?}");
    fractions[0]
}

/// The fraction of the attention work skipped on each tier. Tiers skip whole query tiles of
/// their own size, so a per-query gate can skip more rows on a tier with smaller tiles.
fn skipped_per_tier(src: &str, dims: &[(&str, u64)], values: &[Vec<f32>]) -> Vec<f64> {
    let k = kernel(src);
    let b = bindings(dims);
    let fused = optimized(&k, &b);
    let ins: Vec<(Vec<usize>, Vec<f32>)> = fused
        .params
        .iter()
        .zip(values)
        .map(|(p, v)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
            (shape, v.clone())
        })
        .collect();
    let mut fractions = Vec::new();
    for tiers in tiers() {
        let options = CompileOptions {
            tiers,
            parallel_threshold: 0,
            ..CompileOptions::default()
        };
        let compiled = CompiledKernel::compile(&fused, &b, &options).expect("compiles");
        assert!(
            compiled.plan().steps.iter().any(|s| s.gate.is_some()),
            "no gated attention step in\n{}",
            compiled.plan()
        );
        run_jit(&compiled, &fused, &ins, 3);
        fractions.push(compiled.skipped_fraction());
    }
    fractions
}

const DIMS: [(&str, u64); 5] = [("h", 4), ("m", 70), ("n", 45), ("d", 8), ("e", 5)];

#[test]
fn a_zero_gate_on_every_head_skips_all_the_work() {
    for gate_first in [true, false] {
        let src = source("[h, 1, 1]", "relu(g)", gate_first, false);
        let v = values(&src, &DIMS, Gates::Zero, 1);
        check(&src, &DIMS, &v);
        assert_eq!(skipped(&src, &DIMS, &v), 1.0);
    }
}

#[test]
fn open_gates_skip_nothing() {
    let src = source("[h, 1, 1]", "g", true, true);
    let v = values(&src, &DIMS, Gates::One, 2);
    check(&src, &DIMS, &v);
    assert_eq!(skipped(&src, &DIMS, &v), 0.0);
}

#[test]
fn half_the_heads_gated_off_skip_half_the_work() {
    let src = source("[h, 1, 1]", "relu(g)", false, false);
    let v = values(&src, &DIMS, Gates::Half, 3);
    check(&src, &DIMS, &v);
    assert_eq!(skipped(&src, &DIMS, &v), 0.5);
}

#[test]
fn a_per_query_gate_skips_whole_query_tiles_only() {
    // Zero on the first 64 rows of every head: the 64-row tiles of both tiers are skipped,
    // the last 6 rows are computed.
    let dims = [("h", 2), ("m", 70), ("n", 33), ("d", 4), ("e", 3)];
    let src = source("[h, m, 1]", "relu(g)", true, true);
    let mut v = values(&src, &dims, Gates::One, 4);
    for head in 0..2 {
        v[3][head * 70..head * 70 + 64].fill(0.0);
    }
    check(&src, &dims, &v);
    let fraction = skipped(&src, &dims, &v);
    assert!(fraction > 0.0 && fraction <= 64.0 / 70.0, "{fraction}");
    // A gate broadcast over the heads ([m, 1]) skips the same tiles.
    let shared = source("[m, 1]", "relu(g)", false, true);
    let mut w = values(&shared, &dims, Gates::One, 4);
    w[3][..64].fill(0.0);
    check(&shared, &dims, &w);
    assert_eq!(skipped(&shared, &dims, &w), fraction);
}

#[test]
fn a_nan_or_inf_read_by_a_gated_off_head_is_computed() {
    let src = source("[h, 1, 1]", "relu(g)", true, false);
    for (operand, bad) in [(2, f32::NAN), (1, f32::INFINITY), (0, f32::NEG_INFINITY)] {
        let mut v = values(&src, &DIMS, Gates::Zero, 5);
        // Head 1 reads a non-finite value: its product is NaN (0 · NaN) as written.
        let per = v[operand].len() / 4;
        v[operand][per + 3] = bad;
        check(&src, &DIMS, &v);
        assert_eq!(skipped(&src, &DIMS, &v), 0.75, "operand {operand}");
    }
}

#[test]
fn scores_beyond_the_f32_range_are_computed() {
    // q · k overflows: the interpreter's softmax row is NaN, and so is 0 · NaN.
    let src = source("[h, 1, 1]", "g", true, false);
    let mut v = values(&src, &DIMS, Gates::Zero, 6);
    // Every score is +inf however it is summed or scaled.
    v[0].fill(1e20);
    v[1].fill(1e20);
    check(&src, &DIMS, &v);
    assert_eq!(skipped(&src, &DIMS, &v), 0.0);
}

#[test]
fn a_gate_that_reads_the_attention_is_not_a_gate() {
    // relu(a) * a: the gate needs the attention first, so nothing is skipped or reordered.
    let src = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        let a = softmax(q @ k.T / sqrt(d)) @ v;
        return relu(a) * a;
    }";
    let dims = [("h", 2), ("m", 5), ("n", 7), ("d", 3), ("e", 1)];
    let k = kernel(src);
    let b = bindings(&dims);
    let fused = optimized(&k, &b);
    let compiled = CompiledKernel::compile(&fused, &b, &CompileOptions::default()).expect("ok");
    assert!(compiled.plan().steps.iter().all(|s| s.gate.is_none()));
    check(
        src,
        &dims,
        &common::inputs(&k, &b, 7)
            .into_iter()
            .map(|(_, v)| v)
            .collect::<Vec<_>>(),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn gated_attention_matches_the_interpreter(
        h in 1u64..4,
        m in prop::sample::select(vec![0u64, 1, 5, 64, 65, 130]),
        n in prop::sample::select(vec![1u64, 3, 17, 64, 97]),
        d in prop::sample::select(vec![1u64, 4, 9]),
        e in prop::sample::select(vec![1u64, 3, 16]),
        per_query in any::<bool>(),
        relu in any::<bool>(),
        gate_first in any::<bool>(),
        causal in any::<bool>(),
        gates in prop::sample::select(vec![Gates::Zero, Gates::One, Gates::Half]),
        seed in 0u64..1000,
    ) {
        let shape = if per_query { "[h, m, 1]" } else { "[h, 1, 1]" };
        let gate = if relu { "relu(g)" } else { "g" };
        let src = source(shape, gate, gate_first, causal);
        let dims = [("h", h), ("m", m), ("n", n), ("d", d), ("e", e)];
        let v = values(&src, &dims, gates, seed);
        check(&src, &dims, &v);
        let fractions = skipped_per_tier(&src, &dims, &v);
        for &fraction in &fractions {
            match gates {
                Gates::Zero if m > 0 => prop_assert_eq!(fraction, 1.0),
                Gates::One => prop_assert_eq!(fraction, 0.0),
                _ => prop_assert!((0.0..=1.0).contains(&fraction)),
            }
        }
        // A gate per head skips whole heads, whatever the tile size.
        if !per_query {
            prop_assert!(fractions.windows(2).all(|w| w[0] == w[1]), "{:?}", fractions);
        }
    }
}
