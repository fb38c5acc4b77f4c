//! Low-precision fused attention: native f16/bf16 operands, `cast` operands rounded once by
//! the plan, the int8 kernel selected by the fused op's int8 precision and bf16 products on the
//! full-width tier. Each is compared with the f64 interpreter under its named bound, across
//! thread counts, and (int8) between the `vpdpbusd` and the plain-SIMD lowering.

mod common;

use attnc_ir::fused::expand::with_precision;
use attnc_ir::{Bindings, DType, Kernel, Precision};
use attnc_jit::plan::StepKind;
use attnc_jit::{CompileOptions, CompiledKernel};
use common::{bindings, inputs, kernel, reference, rel_l2, run_jit, REL_L2};

/// The bound the int8 kernel holds (relative L2 against f64): three roundings of about 0.5 %
/// each (K to 8 bits of its row's maximum, V of its (block, column) maximum, P of its (row,
/// block) maximum; Q has 16 bits) add in quadrature to about 0.9 % on standard-normal inputs
/// at d = 64 (see docs/PERFORMANCE.md).
const INT8_REL_L2: f64 = 1e-2;

/// `src`'s kernel as the optimizer fuses it at `b`, with `casts` and int8 products as asked.
fn with_low_precision(src: &str, b: &Bindings, casts: &[(usize, DType)], int8: bool) -> Kernel {
    let fused = common::optimized(&kernel(src), b);
    let precision = if int8 {
        Precision::Int8
    } else {
        Precision::Exact
    };
    with_precision(&fused, casts, precision)
}

const DENSE: &str = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
                     { return softmax(q @ k.T / sqrt(d)) @ v; }";

/// Options of the portable tier (these tests check Cranelift's kernels; the full-width tiers
/// have their own test below).
fn options(dot_product_instructions: bool) -> CompileOptions {
    CompileOptions {
        parallel_threshold: 0,
        dot_product_instructions,
        tiers: attnc_jit::wide::Tiers::NONE,
        keep_text: true,
        ..CompileOptions::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn attention_steps(c: &CompiledKernel) -> usize {
    c.plan()
        .steps
        .iter()
        .filter(|s| matches!(s.kind, StepKind::Attention(_)))
        .count()
}

/// Compiles `k`, runs 1 and 2 threads (bit-identical) and returns (error, 1-thread data).
fn run_checked(
    k: &Kernel,
    dims: &[(&str, u64)],
    seed: u64,
    opts: &CompileOptions,
) -> (f64, Vec<f32>) {
    let b = bindings(dims);
    let ins = inputs(k, &b, seed);
    let want = reference(k, &b, &ins);
    let c = CompiledKernel::compile(k, &b, opts).unwrap_or_else(|e| panic!("compile: {e}"));
    assert_eq!(attention_steps(&c), 1, "not fused:\n{}", c.plan());
    let one = run_jit(&c, k, &ins, 1);
    let two = run_jit(&c, k, &ins, 2);
    assert_eq!(bits(&one.data), bits(&two.data), "threads 1 vs 2 differ");
    (rel_l2(&one.data, &want), one.data)
}

#[test]
fn half_precision_parameters_are_read_natively_or_widened_once() {
    for dt in ["bf16", "f16"] {
        let src = format!(
            "kernel a(q: {dt}[h, m, d], k: {dt}[h, n, d], v: {dt}[h, n, e], bias: {dt}[m, n]) \
             -> f32[h, m, e] {{ return softmax(mask(q @ k.T / sqrt(d) + bias, causal)) @ v; }}"
        );
        for (m, n, d, e) in [(1, 1, 1, 1), (3, 113, 40, 59), (17, 9, 3, 8)] {
            let dims = [("h", 2), ("m", m), ("n", n), ("d", d), ("e", e)];
            let k = common::optimized(&kernel(&src), &bindings(&dims));
            let c = CompiledKernel::compile(&k, &bindings(&dims), &options(true)).expect("compile");
            // The kernel loads bf16 lanes itself, and f16 lanes while few queries share a key
            // (m < 16); with more, f16 operands are widened once on the host.
            let converts = c
                .plan()
                .steps
                .iter()
                .any(|s| matches!(s.kind, StepKind::Convert(_)));
            assert_eq!(converts, dt == "f16" && m >= 16, "{}", c.plan());
            let (err, _) = run_checked(&k, &dims, m + n, &options(true));
            assert!(err <= REL_L2, "{dt} {dims:?}: {err}");
        }
    }
}

#[test]
fn half_precision_inputs_of_unfused_steps_are_widened_once() {
    let k = kernel("kernel a(x: bf16[n, d], y: f16[n, d]) -> f32[n, d] { return x * y + exp(x); }");
    let dims = [("n", 5), ("d", 7)];
    let b = bindings(&dims);
    let c = CompiledKernel::compile(&k, &b, &options(true)).expect("compile");
    let converts = c
        .plan()
        .steps
        .iter()
        .filter(|s| matches!(s.kind, StepKind::Convert(_)))
        .count();
    assert_eq!(converts, 2, "{}", c.plan());
    let ins = inputs(&k, &b, 1);
    let err = rel_l2(&run_jit(&c, &k, &ins, 1).data, &reference(&k, &b, &ins));
    assert!(err <= REL_L2, "{err}");
}

#[test]
fn cast_operands_are_rounded_once_like_the_interpreter() {
    for to in [DType::Bf16, DType::F16] {
        // Q, K and V rounded; K and V share nothing, Q alone, all three.
        for casts in [vec![0, 1, 2], vec![1, 2], vec![0]] {
            let list: Vec<(usize, DType)> = casts.iter().map(|&p| (p, to)).collect();
            for (m, n, d, e) in [(1, 1, 1, 1), (7, 113, 40, 59), (33, 3, 64, 64)] {
                let dims = [("h", 2), ("m", m), ("n", n), ("d", d), ("e", e)];
                let k = with_low_precision(DENSE, &bindings(&dims), &list, false);
                let (err, _) = run_checked(&k, &dims, 5, &options(true));
                assert!(err <= REL_L2, "{to:?} {casts:?} {dims:?}: {err}");
            }
        }
    }
}

fn int8_case(src: &str, dims: &[(&str, u64)], seed: u64) -> f64 {
    let k = with_low_precision(src, &bindings(dims), &[], true);
    let (err, vnni) = run_checked(&k, dims, seed, &options(true));
    let (_, plain) = run_checked(&k, dims, seed, &options(false));
    assert_eq!(
        bits(&vnni),
        bits(&plain),
        "vpdpbusd and plain lowering differ"
    );
    assert!(err <= INT8_REL_L2, "{src} {dims:?}: {err}");
    err
}

#[test]
fn int8_dense_odd_shapes() {
    for (m, n, d, e) in [
        (1, 1, 1, 1),
        (3, 3, 3, 3),
        (113, 113, 64, 64),
        (5, 203, 40, 59),
        (64, 130, 111, 7),
    ] {
        int8_case(
            DENSE,
            &[("h", 2), ("m", m), ("n", n), ("d", d), ("e", e)],
            m + n,
        );
    }
}

#[test]
fn int8_empty_dimensions_give_empty_or_zero_results() {
    for (m, n) in [(0, 5), (5, 0)] {
        let dims = [("h", 2), ("m", m), ("n", n), ("d", 8), ("e", 4)];
        let k = with_low_precision(DENSE, &bindings(&dims), &[], true);
        let (err, data) = run_checked(&k, &dims, 1, &options(true));
        assert!(data.iter().all(|&x| x == 0.0));
        assert!(err == 0.0, "{err}");
    }
}

#[test]
fn int8_masks_and_grouped_queries() {
    let causal = "kernel a(q: f32[h, m, d], k: f32[n, d], v: f32[n, e]) -> f32[h, m, e] \
                  { return softmax(mask(q @ k.T * 0.125, causal)) @ v; }";
    int8_case(
        causal,
        &[("h", 3), ("m", 113), ("n", 203), ("d", 64), ("e", 64)],
        3,
    );
    let window = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
                  { return softmax(mask(q @ k.T / sqrt(d), window(17) | global(2))) @ v; }";
    int8_case(
        window,
        &[("h", 2), ("m", 150), ("n", 150), ("d", 32), ("e", 40)],
        4,
    );
    // A fully masked row gives zeros.
    let block = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
                 { return softmax(mask(q @ k.T, causal)) @ v; }";
    int8_case(
        block,
        &[("h", 1), ("m", 9), ("n", 4), ("d", 16), ("e", 16)],
        6,
    );
}

#[test]
fn int8_scored_forms() {
    let bias = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], b: f32[m, n]) \
                -> f32[h, m, e] { return softmax(q @ k.T / sqrt(d) + b) @ v; }";
    int8_case(
        bias,
        &[("h", 2), ("m", 37), ("n", 71), ("d", 48), ("e", 24)],
        8,
    );
    let softcap = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
                   { return softmax(tanh(q @ k.T / sqrt(d) / 4) * 4) @ v; }";
    int8_case(
        softcap,
        &[("h", 2), ("m", 20), ("n", 90), ("d", 64), ("e", 32)],
        9,
    );
}

#[test]
fn int8_scores_far_from_zero_keep_the_largest_weight() {
    // Scores near 6e4 round to 1/128 in f32. Had the exponent's argument come out slightly
    // positive at a block's maximum, P would round to 256 there and wrap to 0 as a byte,
    // dropping the heaviest key of every block: an error of order 1, not of 1 %.
    let far = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] \
               { return softmax(q @ k.T / sqrt(d) + 60000) @ v; }";
    let dims = [("h", 2), ("m", 40), ("n", 256), ("d", 64), ("e", 32)];
    let k = with_low_precision(far, &bindings(&dims), &[], true);
    let (err, _) = run_checked(&k, &dims, 12, &options(true));
    // The f32 scores themselves are off by up to 1/256 here, on top of int8's rounding.
    assert!(err <= 2.0 * INT8_REL_L2, "{err}");
}

#[test]
fn int8_precision_applies_to_fused_attention_only() {
    // Int8 precision asked of a program without a fused attention changes nothing.
    let k = with_precision(
        &kernel("kernel a(x: f32[n, d], y: f32[d, n]) -> f32[n, n] { return x @ y; }"),
        &[],
        Precision::Int8,
    );
    let b = bindings(&[("n", 9), ("d", 5)]);
    let c = CompiledKernel::compile(&k, &b, &options(true)).expect("compile");
    let ins = inputs(&k, &b, 2);
    let err = rel_l2(&run_jit(&c, &k, &ins, 1).data, &reference(&k, &b, &ins));
    assert!(err <= REL_L2, "{err}");
}

#[test]
fn int8_uses_the_dot_product_instruction_when_allowed() {
    let b = bindings(&[("h", 1), ("m", 4), ("n", 64), ("d", 16), ("e", 16)]);
    let k = with_low_precision(DENSE, &b, &[], true);
    let on = CompiledKernel::compile(&k, &b, &options(true)).expect("compile");
    let off = CompiledKernel::compile(&k, &b, &options(false)).expect("compile");
    let vnni =
        std::is_x86_feature_detected!("avxvnni") || std::is_x86_feature_detected!("avx512vnni");
    let asm = |c: &CompiledKernel| {
        c.texts()
            .iter()
            .filter_map(|t| t.vcode.clone())
            .collect::<String>()
    };
    assert!(!asm(&off).contains("vpdpbusd"));
    if vnni {
        assert!(
            asm(&on).contains("vpdpbusd"),
            "no vpdpbusd in:\n{}",
            asm(&on)
        );
    } else {
        eprintln!("skipped: this CPU has no VNNI, only the plain lowering was checked");
    }
}

/// Standard-normal values (Box–Muller over the shared xorshift stream).
fn standard_normal(len: usize, seed: u64) -> Vec<f32> {
    let u = common::data(2 * len, seed);
    (0..len)
        .map(|i| {
            // data() is uniform in [-2, 2): map to (0, 1].
            let u1 = 1.0 - f64::from(u[2 * i] + 2.0) / 4.0;
            let u2 = f64::from(u[2 * i + 1] + 2.0) / 4.0;
            ((-2.0 * u1.max(1e-12).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

#[test]
fn int8_error_on_standard_normal_inputs_at_the_benchmark_depth() {
    let dims = [("h", 1), ("m", 64), ("n", 4096), ("d", 64), ("e", 64)];
    let b = bindings(&dims);
    let k = with_low_precision(DENSE, &b, &[], true);
    let ins: Vec<(Vec<usize>, Vec<f32>)> = inputs(&k, &b, 1)
        .into_iter()
        .enumerate()
        .map(|(i, (shape, v))| {
            let data = standard_normal(v.len(), 100 + i as u64);
            (shape, data)
        })
        .collect();
    let want = reference(&k, &b, &ins);
    let c = CompiledKernel::compile(&k, &b, &options(true)).expect("compile");
    let err = rel_l2(&run_jit(&c, &k, &ins, 2).data, &want);
    eprintln!("int8 relative L2 error on standard-normal inputs: {err:.5}");
    assert!(err <= INT8_REL_L2, "{err}");
}

#[test]
fn int8_on_the_wide_tier_holds_the_int8_bound() {
    if !attnc_wide::amx::available(attnc_wide::amx::Products::Int8) {
        eprintln!("skipped: this CPU has neither AMX-INT8 nor AVX-512 VNNI");
        return;
    }
    let amx = CompileOptions {
        parallel_threshold: 0,
        tiers: attnc_jit::wide::Tiers::ALL,
        ..CompileOptions::default()
    };
    for (src, dims) in [
        (
            DENSE,
            [("h", 2), ("m", 113), ("n", 203), ("d", 64), ("e", 40)],
        ),
        (DENSE, [("h", 1), ("m", 1), ("n", 3), ("d", 3), ("e", 1)]),
    ] {
        let k = with_low_precision(src, &bindings(&dims), &[], true);
        let c = CompiledKernel::compile(&k, &bindings(&dims), &amx).expect("compile");
        let tier = attnc_jit::wide::Tier::Amx(attnc_wide::amx::Products::Int8).name();
        assert!(c.plan().to_string().contains(tier), "{}", c.plan());
        let (err, _) = run_checked(&k, &dims, 3, &amx);
        assert!(err <= INT8_REL_L2, "{dims:?}: {err}");
    }
}

/// The bound bf16 products hold (relative L2 against f64): Q and P rounded to bf16, K and V as
/// `hi + lo` pairs on AMX tiles (about 2.5e-3 on standard-normal inputs) and rounded once on
/// vectors (about 3.6e-3).
fn bf16_products_bound() -> f64 {
    match attnc_wide::amx::unit(attnc_wide::amx::Products::Bf16) {
        Some(attnc_wide::amx::Unit::Vectors) => 4.5e-3,
        _ => 3e-3,
    }
}

#[test]
fn bf16_products_on_the_wide_tier_hold_their_bound() {
    if !attnc_wide::amx::available(attnc_wide::amx::Products::Bf16) {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX-512 BF16");
        return;
    }
    let wide = CompileOptions {
        parallel_threshold: 0,
        tiers: attnc_jit::wide::Tiers::ALL,
        ..CompileOptions::default()
    };
    let masked = |dt: &str, pattern: &str| {
        format!(
            "kernel a(q: {dt}[h, m, d], k: {dt}[h, n, d], v: {dt}[h, n, e]) -> f32[h, m, e] \
             {{ return softmax(mask(q @ k.T / sqrt(d), {pattern})) @ v; }}"
        )
    };
    // Keys and values shared by every head (broadcast over the batch).
    let shared = "kernel a(q: bf16[h, m, d], k: bf16[1, n, d], v: bf16[1, n, e]) -> f32[h, m, e] \
                  { return softmax(q @ k.T / sqrt(d)) @ v; }";
    let cases = [
        (
            DENSE.to_string(),
            [("h", 2), ("m", 113), ("n", 203), ("d", 64), ("e", 40)],
        ),
        (
            DENSE.to_string(),
            [("h", 1), ("m", 1), ("n", 3), ("d", 3), ("e", 1)],
        ),
        (
            masked("bf16", "causal"),
            [("h", 2), ("m", 130), ("n", 130), ("d", 17), ("e", 8)],
        ),
        (
            masked("f32", "window(40)"),
            [("h", 1), ("m", 65), ("n", 300), ("d", 96), ("e", 33)],
        ),
        (
            shared.to_string(),
            [("h", 3), ("m", 64), ("n", 129), ("d", 64), ("e", 64)],
        ),
    ];
    let tier = attnc_jit::wide::Tier::Amx(attnc_wide::amx::Products::Bf16).name();
    for (seed, (src, dims)) in cases.iter().enumerate() {
        let b = bindings(dims);
        let fused = common::optimized(&kernel(src), &b);
        let k = with_precision(&fused, &[], Precision::Bf16);
        let c = CompiledKernel::compile(&k, &b, &wide).expect("compile");
        assert!(c.plan().to_string().contains(tier), "{}", c.plan());
        let (err, _) = run_checked(&k, dims, 10 + seed as u64, &wide);
        assert!(err <= bf16_products_bound(), "{src} {dims:?}: {err}");
    }
}
