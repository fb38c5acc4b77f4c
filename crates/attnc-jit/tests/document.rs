//! Document masks compiled (fused attention with tile tables built per call from the segment
//! ids, on the AVX-512 tier where the CPU has it and always on the portable tier) against the
//! f64 interpreter: random segment layouts with empty and single-token documents, sorted and
//! unsorted ids, m ≠ n, n not a multiple of the tile, batched ids, and the two-operand form.

mod common;

use attnc_ir::{Bindings, Kernel};
use attnc_jit::Input;
use common::{bindings, data, kernel, on_every_tier, optimized};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

const SINGLE: &str =
    "kernel k(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) -> f32[h, m, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal & document(seg))) @ v;
}";

const PAIR: &str = "kernel k(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], qs: i32[m], ks: i32[n]) -> f32[h, m, d] {
    return softmax(mask(q @ k.T * 0.25, document(qs, ks) | window(2))) @ v;
}";

const BATCHED: &str = "kernel k(q: f32[b, h, n, d], k: f32[b, h, n, d], v: f32[b, h, n, d], seg: i32[b, n]) -> f32[b, h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), document(seg))) @ v;
}";

/// Runs `src` optimized (the fused attention must carry the document) on the JIT and on the
/// interpreter; float inputs are random, `ids` the i32 inputs in parameter order.
fn check(src: &str, dims: &[(&str, u64)], ids: &[Vec<i32>], seed: u64) -> Option<f64> {
    check_scaled(src, dims, ids, seed, |_, x| x)
}

/// [`check`] with each random float `x` of parameter `p` replaced by `scale(p, x)`.
fn check_scaled(
    src: &str,
    dims: &[(&str, u64)],
    ids: &[Vec<i32>],
    seed: u64,
    scale: fn(usize, f32) -> f32,
) -> Option<f64> {
    let k = kernel(src);
    let b = bindings(dims);
    let fused = optimized(&k, &b);
    let (mut floats, mut arrays) = inputs(&k, &b, ids, seed);
    for (p, (f, a)) in floats.iter_mut().zip(&mut arrays).enumerate() {
        if f.is_empty() {
            continue;
        }
        f.iter_mut().for_each(|x| *x = scale(p, *x));
        a.iter_mut()
            .zip(f.iter())
            .for_each(|(y, &x)| *y = f64::from(x));
    }
    let want = attnc_ir::interp::evaluate(&k, &b, &arrays).expect("interpreter");
    let mut views = Vec::new();
    let mut next_ids = ids.iter();
    for (p, f) in k.params.iter().zip(&floats) {
        views.push(match p.dtype {
            attnc_ir::DType::I32 => Input::I32(next_ids.next().expect("ids")),
            _ => Input::F32(f),
        });
    }
    Some(on_every_tier(
        &fused,
        &b,
        &views,
        &want,
        &format!("{src} at {dims:?}"),
    ))
}

fn inputs(
    k: &Kernel,
    b: &Bindings,
    ids: &[Vec<i32>],
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<ArrayD<f64>>) {
    let mut next_ids = ids.iter();
    let mut floats = Vec::new();
    let mut arrays = Vec::new();
    for (index, p) in k.params.iter().enumerate() {
        let shape = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
        let len: usize = shape.iter().product();
        let values: Vec<f64> = if p.dtype == attnc_ir::DType::I32 {
            let v = next_ids.next().expect("ids");
            assert_eq!(v.len(), len, "{}", p.name);
            floats.push(Vec::new());
            v.iter().map(|&x| f64::from(x)).collect()
        } else {
            let v = data(len, seed * 7 + index as u64);
            let out = v.iter().map(|&x| f64::from(x)).collect();
            floats.push(v);
            out
        };
        arrays.push(ArrayD::from_shape_vec(IxDyn(&shape), values).expect("shape"));
    }
    (floats, arrays)
}

/// A packed layout: `docs` documents with the given lengths (0 allowed), ids in order, or
/// permuted when `shuffle`.
fn layout(lengths: &[usize], shuffle: u64) -> Vec<i32> {
    let mut ids: Vec<i32> = lengths
        .iter()
        .enumerate()
        .flat_map(|(doc, &len)| std::iter::repeat_n(doc as i32 * 3 - 5, len))
        .collect();
    if shuffle > 0 {
        let mut s = shuffle | 1;
        for i in (1..ids.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ids.swap(i, (s % (i as u64 + 1)) as usize);
        }
    }
    ids
}

#[test]
fn sixteen_sorted_documents_over_several_tiles() {
    let lengths = [64, 1, 0, 130, 7, 200, 1, 33, 0, 65, 64, 2, 90, 1, 40, 3];
    let seg = layout(&lengths, 0);
    let n = seg.len() as u64;
    for m in [n, 1, 70, n - 17] {
        check(
            SINGLE,
            &[("h", 2), ("m", m), ("n", n), ("d", 16)],
            std::slice::from_ref(&seg),
            m,
        );
    }
}

/// Scores within the f32 range but beyond it in base 2 (|q|, |k| up to 1.8e19, d = 1): the
/// AVX-512 kernel's rows overflow, and the plain-Rust kernel, which reads the ids in base e,
/// computes those entries again.
#[test]
fn scores_beyond_the_base_two_range_are_computed_again_in_base_e() {
    let seg = layout(&[40, 1, 60, 29], 0);
    let n = seg.len() as u64;
    check_scaled(
        SINGLE,
        &[("h", 2), ("m", n), ("n", n), ("d", 1)],
        &[seg],
        3,
        |p, x| if p < 2 { 0.45e19 * (x + 2.0) } else { x },
    );
}

/// The same scores with the log-sum-exp returned beside O (one attention step writes both):
/// the rescued entries take the plain-Rust kernel's rows and statistics, on every tier.
#[test]
fn the_log_sum_exp_beyond_the_base_two_range_is_computed_again_in_base_e() {
    let src = "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) \
        -> (f32[h, n, d], f32[h, n, 1]) {
        let s = mask(q @ k.T / sqrt(d), causal & document(seg));
        return (softmax(s) @ v, logsumexp(s, -1));
    }";
    let seg = layout(&[40, 1, 60, 29], 0);
    let n = seg.len() as u64;
    let k = kernel(src);
    let b = bindings(&[("h", 2), ("n", n), ("d", 1)]);
    let fused = optimized(&k, &b);
    let (mut floats, mut arrays) = inputs(&k, &b, std::slice::from_ref(&seg), 4);
    for (f, a) in floats.iter_mut().zip(&mut arrays).take(2) {
        f.iter_mut().for_each(|x| *x = 0.45e19 * (*x + 2.0));
        a.iter_mut()
            .zip(f.iter())
            .for_each(|(y, &x)| *y = f64::from(x));
    }
    let want = attnc_ir::interp::evaluate_all(&k, &b, &arrays).expect("interpreter");
    let views = [
        Input::F32(&floats[0]),
        Input::F32(&floats[1]),
        Input::F32(&floats[2]),
        Input::I32(&seg),
    ];
    for tiers in [
        attnc_jit::CompileOptions::default().tiers,
        attnc_jit::wide::Tiers::NONE,
    ] {
        let options = attnc_jit::CompileOptions {
            tiers,
            ..attnc_jit::CompileOptions::default()
        };
        let nodes = fused.output_nodes();
        let compiled = attnc_jit::CompiledKernel::compile_outputs(&fused, &nodes, &b, &options)
            .expect("compiles");
        let attention = compiled
            .plan()
            .steps
            .iter()
            .filter(|s| matches!(&s.kind, attnc_jit::plan::StepKind::Attention(a) if a.lse));
        assert_eq!(attention.count(), 1, "{}", compiled.plan());
        let got = compiled.run_outputs(&views, 2).expect("runs");
        for (got, want) in got.iter().zip(&want) {
            let err = common::rel_l2(&got.data, want);
            assert!(err <= common::REL_L2, "{tiers:?}: relative L2 {err:e}");
        }
    }
}

#[test]
fn more_queries_than_keys_keep_nothing_before_the_first_key() {
    let seg = layout(&[3, 5, 2], 0);
    check(
        SINGLE,
        &[("h", 1), ("m", 14), ("n", 10), ("d", 8)],
        &[seg],
        1,
    );
}

#[test]
fn batched_ids_and_the_two_operand_form() {
    let (b, n) = (2usize, 77usize);
    let mut seg = layout(&[20, 0, 40, 17], 0);
    seg.extend(layout(&[1, 70, 6], 9));
    check(
        BATCHED,
        &[("b", b as u64), ("h", 3), ("n", n as u64), ("d", 8)],
        &[seg],
        2,
    );
    let qs = layout(&[10, 20, 3], 4);
    let ks = layout(&[40, 1, 30], 5);
    check(
        PAIR,
        &[("h", 2), ("m", 33), ("n", 71), ("d", 8)],
        &[qs, ks],
        3,
    );
}

/// A union with a document keeps pairs whose ids differ: no tile may be dropped by its ids
/// (the window here reaches across documents, and across 64-key tiles).
#[test]
fn a_union_with_a_document_keeps_tiles_of_other_documents() {
    let src =
        "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) -> f32[h, n, d] {
        return softmax(mask(q @ k.T, document(seg) | window(70))) @ v;
    }";
    let seg = layout(&[100, 100, 60], 0);
    check(src, &[("h", 1), ("n", 260), ("d", 4)], &[seg], 6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_layouts_match_the_interpreter(
        lengths in prop::collection::vec(prop_oneof![Just(0usize), Just(1), 0usize..90], 1..8),
        shuffle in prop_oneof![Just(0u64), 1u64..1000],
        fewer in 0usize..40,
        d in 1u64..20,
        seed in 0u64..1000,
    ) {
        let seg = layout(&lengths, shuffle);
        let n = seg.len();
        prop_assume!(n > 0);
        let m = n.saturating_sub(fewer).max(1) as u64;
        check(SINGLE, &[("h", 2), ("m", m), ("n", n as u64), ("d", d)], &[seg], seed);
    }
}
