//! `topk_blocks(g, k, b)` masks compiled (fused attention with tile tables built per call
//! from the selection, on the AVX-512 tier where the CPU has it and always on the portable
//! tier) against the f64 interpreter: k = 0, k ≥ blocks, m ≠ n, n not a multiple of the block
//! or the tile, tied, NaN and all-equal gates, combinations with `causal` and `block(b)`, and
//! a gate computed from pooled queries and keys.

mod common;

use attnc_ir::{Bindings, Kernel, Op};
use attnc_jit::Input;
use common::{bindings, data, kernel, on_every_tier, optimized};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// The pattern of the benchmark: the selected blocks up to the diagonal, and the own block.
fn with_gate(k: u64, b: u64, pattern: &str) -> String {
    format!(
        "kernel k(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], g: f32[h, r, c]) -> f32[h, m, d] {{
    return softmax(mask(q @ k.T / sqrt(d), {})) @ v;
}}",
        pattern
            .replace("K", &k.to_string())
            .replace("B", &b.to_string())
    )
}

/// How the gate's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Gate {
    Random,
    AllEqual,
    /// Few distinct values: many ties.
    Ties,
    /// Every third entry NaN.
    Nan,
}

fn gate_values(len: usize, kind: Gate, seed: u64) -> Vec<f32> {
    let base = data(len, seed);
    base.iter()
        .enumerate()
        .map(|(e, &x)| match kind {
            Gate::Random => x,
            Gate::AllEqual => 0.5,
            Gate::Ties => (x * 2.0).round(),
            Gate::Nan if e % 3 == 0 => f32::NAN,
            Gate::Nan => x,
        })
        .collect()
}

/// Runs `src` optimized (the fused attention must carry the selection) on the JIT and on the
/// interpreter; `g` is the gate (the last parameter when `gate` is given), the rest random.
fn check(src: &str, dims: &[(&str, u64)], gate: Option<Gate>, seed: u64) -> Option<f64> {
    let k = kernel(src);
    let b = bindings(dims);
    let fused = optimized(&k, &b);
    let carried = fused
        .graph
        .topo_order()
        .into_iter()
        .any(|id| matches!(&fused.graph.node(id).op, Op::Attention(a) if a.segments() > 0));
    assert!(
        carried,
        "the optimized kernel has no fused attention reading the gate"
    );
    let (floats, arrays) = inputs(&k, &b, gate, seed);
    let want = attnc_ir::interp::evaluate(&k, &b, &arrays).expect("interpreter");
    let views: Vec<Input<'_>> = floats.iter().map(|f| Input::F32(f)).collect();
    let what = format!("{src} at {dims:?}, {gate:?}");
    Some(on_every_tier(&fused, &b, &views, &want, &what))
}

fn inputs(
    k: &Kernel,
    b: &Bindings,
    gate: Option<Gate>,
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<ArrayD<f64>>) {
    let mut floats = Vec::new();
    let mut arrays = Vec::new();
    for (index, p) in k.params.iter().enumerate() {
        let shape = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
        let len: usize = shape.iter().product();
        let seed = seed * 7 + index as u64;
        let v = match gate {
            Some(kind) if p.name == "g" => gate_values(len, kind, seed),
            _ => data(len, seed),
        };
        arrays.push(
            ArrayD::from_shape_vec(IxDyn(&shape), v.iter().map(|&x| f64::from(x)).collect())
                .expect("shape"),
        );
        floats.push(v);
    }
    (floats, arrays)
}

fn dims(h: u64, m: u64, n: u64, d: u64, b: u64) -> Vec<(&'static str, u64)> {
    vec![
        ("h", h),
        ("m", m),
        ("n", n),
        ("d", d),
        ("r", m.div_ceil(b)),
        ("c", n.div_ceil(b)),
    ]
}

const PATTERNS: [&str; 4] = [
    "topk_blocks(g, K, B)",
    "topk_blocks(g, K, B) & causal",
    "topk_blocks(g, K, B) & causal | block(B)",
    "(topk_blocks(g, K, B) | block(B)) & causal",
];

#[test]
fn the_benchmark_pattern_over_many_tiles() {
    // b = 64 meets the tiles; 8 of 20 key blocks plus the own one, causal.
    let (n, b) = (1250u64, 64u64);
    for kind in [Gate::Random, Gate::Ties] {
        check(
            &with_gate(8, b, PATTERNS[2]),
            &dims(2, n, n, 16, b),
            Some(kind),
            1,
        );
    }
}

#[test]
fn k_zero_and_k_past_the_blocks() {
    let b = 16;
    for k in [0u64, 1, 7, 8, 100] {
        for pattern in PATTERNS {
            check(
                &with_gate(k, b, pattern),
                &dims(1, 120, 120, 8, b),
                Some(Gate::Random),
                k,
            );
        }
    }
}

#[test]
fn a_gate_of_pooled_queries_and_keys() {
    let src = "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
        let g = mean_pool(q, 32) @ mean_pool(k, 32).T;
        return softmax(mask(q @ k.T / sqrt(d), topk_blocks(g, 3, 32) & causal | block(32))) @ v;
    }";
    check(src, &[("h", 2), ("n", 301), ("d", 12)], None, 4);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_selections_match_the_interpreter(
        pattern in 0usize..4,
        kind in prop_oneof![Just(Gate::Random), Just(Gate::AllEqual), Just(Gate::Ties), Just(Gate::Nan)],
        b in prop_oneof![Just(1u64), Just(3), Just(16), Just(64), Just(70)],
        k in prop_oneof![Just(0u64), Just(1), Just(2), Just(5), Just(1000)],
        n in 1u64..300,
        fewer in 0u64..80,
        more in prop::bool::ANY,
        d in 1u64..20,
        seed in 0u64..1000,
    ) {
        // m < n, m = n, or more queries than keys.
        let m = if more { n + fewer } else { n.saturating_sub(fewer).max(1) };
        check(&with_gate(k, b, PATTERNS[pattern]), &dims(2, m, n, d, b), Some(kind), seed);
    }
}
