//! Decayed causal linear attention (RetNet's retention) against the f64 interpreter: the
//! optimizer fuses the plain quadratic form into the decayed prefix state and the kernel
//! matches at odd lengths (1, 3, 113), around vector and tile edges (63, 64, 65, 127, 128, 129),
//! m ≠ n both ways, slopes from strongly decaying to ≈ 0, per head or one scalar, with and
//! without the normalizer, recurrent and (from 128 keys, on the full-width tier) in chunks; threads 1 and 2 bit-identical (`common::check` on every case), and
//! no `n × n` buffer is planned; gated (data-dependent) decay at the same edges, gates from
//! strongly decaying to ≈ 1, always in chunks.
mod common;

use attnc_jit::plan::{plan, StepKind};
use attnc_jit::{CompileOptions, CompiledKernel};
use common::{bindings, check, inputs, kernel, optimized, reference, rel_l2, run_jit, REL_L2};
use proptest::prelude::*;

/// The decayed op written directly in IR text over positive features (so normalizers stay
/// away from 0), with the slope `|s|` per head or one for all.
fn direct(normalizer: &str, slope: &str) -> attnc_ir::Kernel {
    let text = format!(
        "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], s: f32[{slope}]) -> f32[h, m, e]
  %0 = input q #0 : f32[h, m, d]
  %1 = input k #1 : f32[h, n, d]
  %2 = input v #2 : f32[h, n, e]
  %3 = input s #3 : f32[{slope}]
  %4 = abs %3 : f32[{slope}]
  %5 = exp %0 : f32[h, m, d]
  %6 = sigmoid %1 : f32[h, n, d]
  %7 = linear-attention %5, %6, %2, %4, causal, decay{normalizer} : f32[h, m, e]
  return %7"
    );
    attnc_ir::text::parse_kernel(&text).expect("parses")
}

#[test]
fn the_op_runs_at_every_length() {
    for (normalizer, slope) in [
        (", unnormalized", "h, 1, 1"),
        ("", "1, 1"),
        (", eps=0.5", "h, 1, 1"),
    ] {
        let k = direct(normalizer, slope);
        for &(m, n) in &[
            (1, 1),
            (2, 2),
            (3, 3),
            (1, 3),
            (3, 1),
            (113, 113),
            (4, 129),
            (64, 64),
            (128, 128),
            (193, 193),
            (1, 300),
            (300, 130),
        ] {
            let dims = [("h", 2), ("m", m), ("n", n), ("d", 5), ("e", 6)];
            let b = bindings(&dims);
            let options = CompileOptions {
                parallel_threshold: 0,
                ..CompileOptions::default()
            };
            let compiled = CompiledKernel::compile(&k, &b, &options).expect("compiles");
            assert!(compiled
                .plan()
                .steps
                .iter()
                .any(|s| matches!(&s.kind, StepKind::Prefix(p) | StepKind::Chunked(p) if p.slope_strides.is_some())));
            let ins = inputs(&k, &b, m * 7 + n);
            let want = reference(&k, &b, &ins);
            let one = run_jit(&compiled, &k, &ins, 1);
            let two = run_jit(&compiled, &k, &ins, 2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one.data), bits(&two.data));
            let err = rel_l2(&one.data, &want);
            assert!(err <= REL_L2, "{err:e} at {dims:?} {normalizer} {slope}");
        }
    }
}

/// Retention with one slope per head, `a = c · sigmoid(s)` in `(0, c)`.
fn retention(c: f64) -> String {
    format!(
        "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], s: f32[h, 1, 1]) -> f32[h, m, e] {{
    let a = sigmoid(s) * {c:?};
    return mask((q @ k.T) * exp(a * relpos(m, n)), causal, 0) @ v;
}}"
    )
}

/// The normalized form over positive features, with `eps`.
const NORMALIZED: &str =
    "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], s: f32[h, 1, 1]) -> f32[h, m, e] {
    let a = sigmoid(s) * 0.2;
    let w = mask((elu(q) + 1) @ (elu(k) + 1).T * exp(a * relpos(m, n)), causal, 0);
    return (w @ v) / (sum(w, -1) + 0.000001);
}";

/// One scalar slope for every head, normalized without `eps`.
const SCALAR: &str = "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
    let w = mask(exp(q) @ exp(k).T * exp(0.05 * relpos(m, n)), causal, 0);
    return (w @ v) / sum(w, -1);
}";

/// Whether the plan of `src` as the optimizer rewrites it at `dims` has a decayed prefix
/// step, and its largest buffer.
fn planned(src: &str, dims: &[(&str, u64)]) -> (bool, usize) {
    let b = bindings(dims);
    let p = plan(&optimized(&kernel(src), &b), &b, true).expect("plans");
    let decayed = p
        .steps
        .iter()
        .any(|s| matches!(&s.kind, StepKind::Prefix(spec) if spec.slope_strides.is_some()));
    let largest = p.buffers.iter().map(|b| b.len).max().unwrap_or(0);
    (decayed, largest)
}

#[test]
fn odd_lengths_and_edges_match_the_interpreter() {
    for n in [1u64, 3, 63, 64, 65, 113, 127, 128, 129] {
        for (src, d, e) in [
            (retention(0.5), 5, 7),
            (NORMALIZED.to_string(), 64, 64),
            (SCALAR.to_string(), 3, 9),
        ] {
            let dims = [("h", 2), ("m", n), ("n", n), ("d", d), ("e", e)];
            // Below a few rows the quadratic form costs less and is kept (the kernel itself is
            // checked there by `the_op_runs_at_every_length`).
            assert!(
                planned(&src, &dims).0 || n <= 3,
                "the decayed prefix kernel is not used at {dims:?}"
            );
            let err = check(&src, &dims, n + 3);
            assert!(err <= REL_L2, "{err:e} at {dims:?}");
        }
    }
}

#[test]
fn chunked_shapes_are_end_aligned() {
    // m < n (chunked prefill, decoding with m = 1) and m > n (leading rows keep no key).
    for &(m, n) in &[(1, 113), (5, 113), (64, 129), (113, 5), (3, 1)] {
        for src in [retention(0.5), NORMALIZED.to_string()] {
            let dims = [("h", 3), ("m", m), ("n", n), ("d", 6), ("e", 9)];
            assert!(
                planned(&src, &dims).0 || m * n <= 3,
                "the decayed prefix kernel is not used at {dims:?}"
            );
            check(&src, &dims, 11);
        }
    }
}

#[test]
fn long_sequences_in_chunks_match_the_interpreter() {
    // From 128 keys on, the full-width tier runs the op in chunks (of 32 to 256 keys, as the
    // cost model chooses): lengths at and
    // around chunk edges, m ≠ n both ways, strong and weak decays.
    for &(m, n) in &[
        (128, 128),
        (129, 129),
        (191, 191),
        (257, 257),
        (1, 200),
        (70, 200),
        (200, 130),
    ] {
        for src in [
            retention(0.5),
            retention(16.0),
            retention(2e-4),
            NORMALIZED.to_string(),
        ] {
            let dims = [("h", 2), ("m", m), ("n", n), ("d", 8), ("e", 5)];
            let err = check(&src, &dims, m + n);
            assert!(err <= REL_L2, "{err:e} at {dims:?}");
        }
    }
}

#[test]
fn strong_and_weak_decays() {
    // a up to 8 (γ ≈ 3e-4: a row sees its own key only) and down to about 1e-4 (γ ≈ 1).
    for c in [16.0, 1.0, 2e-4] {
        let dims = [("h", 2), ("m", 113), ("n", 113), ("d", 16), ("e", 16)];
        assert!(planned(&retention(c), &dims).0);
        let err = check(&retention(c), &dims, 5);
        println!("a < {c}: rel L2 {err:.2e}");
    }
}

#[test]
fn no_n_by_n_buffer_is_planned() {
    let dims = [("h", 2), ("m", 4096), ("n", 4096), ("d", 8), ("e", 8)];
    for src in [retention(0.5), NORMALIZED.to_string(), SCALAR.to_string()] {
        let (decayed, largest) = planned(&src, &dims);
        assert!(decayed);
        assert!(largest <= 2 * 4096 * 8, "largest buffer {largest}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn random_shapes_match(h in 1u64..3, m in 1u64..40, n in 1u64..40, d in 1u64..10, e in 1u64..11, seed in any::<u64>()) {
        let err = check(&retention(0.5), &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed % 1000);
        prop_assert!(err <= REL_L2);
    }
}

/// Gated decay: key `j` weighs `exp(c_i − c_j)` in row `i`, `c` the running sum of log gates
/// `sigmoid(g + bias)` (bias −8: gates ≈ 3e-4, each row sees about its own key; bias 12:
/// gates ≈ 1 − 6e-6, almost no decay).
fn gated(bias: f64, normalized: bool) -> String {
    let body = if normalized {
        "let w = mask((elu(q) + 1) @ (elu(k) + 1).T * exp(c - c.T), causal, 0);
    return (w @ v) / (sum(w, -1) + 0.000001);"
    } else {
        "return mask(q @ k.T * exp(c - c.T), causal, 0) @ v;"
    };
    format!(
        "kernel r(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, e], g: f32[h, n, 1]) -> f32[h, n, e] {{
    let c = cumsum(log(sigmoid(g + {bias:?})), 1);
    {body}
}}"
    )
}

#[test]
fn gated_decay_fuses_and_matches_the_interpreter() {
    for n in [1u64, 3, 63, 64, 65, 113, 128, 129, 193, 257] {
        for bias in [-8.0, 0.0, 12.0] {
            for normalized in [false, true] {
                let src = gated(bias, normalized);
                let dims = [("h", 2), ("n", n), ("d", 6), ("e", 5)];
                let b = bindings(&dims);
                let p = plan(&optimized(&kernel(&src), &b), &b, true).expect("plans");
                let chunked = p
                    .steps
                    .iter()
                    .any(|s| matches!(&s.kind, StepKind::Chunked(spec) if spec.is_gated()));
                // Below a few rows the quadratic form costs less and is kept.
                assert!(chunked || n <= 3, "not fused at {dims:?}: {p}");
                let err = check(&src, &dims, n + 7);
                assert!(
                    err <= REL_L2,
                    "{err:e} at {dims:?} bias {bias} {normalized}"
                );
            }
        }
    }
}

#[test]
fn gated_decay_plans_no_n_by_n_buffer() {
    let dims = [("h", 2), ("n", 4096), ("d", 8), ("e", 8)];
    let b = bindings(&dims);
    let p = plan(&optimized(&kernel(&gated(0.0, false)), &b), &b, true).expect("plans");
    let largest = p.buffers.iter().map(|b| b.len).max().unwrap_or(0);
    assert!(largest <= 2 * 4096 * 8, "largest buffer {largest}");
}

/// Gated decay with the queries' and the keys' log decays apart (`exp(cq − ckᵀ)`): decoding
/// (`m < n`, queries end-aligned), rows that keep no key (`m > n`), and `m = n` with `cq ≠ ck`.
fn gated_apart(normalized: bool) -> String {
    let body = if normalized {
        "let w = mask((elu(q) + 1) @ (elu(k) + 1).T * exp(cq - ck.T), causal, 0);
    return (w @ v) / (sum(w, -1) + 0.000001);"
    } else {
        "return mask(q @ k.T * exp(cq - ck.T), causal, 0) @ v;"
    };
    format!(
        "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], cq: f32[h, m, 1], ck: f32[h, n, 1]) -> f32[h, m, e] {{
    {body}
}}"
    )
}

#[test]
fn gated_decay_with_rows_apart_matches_the_interpreter() {
    for (m, n) in [
        (1u64, 1u64),
        (1, 300),
        (3, 129),
        (64, 200),
        (113, 113),
        (130, 70),
        (2, 0),
    ] {
        for normalized in [false, true] {
            let src = gated_apart(normalized);
            let dims = [("h", 2), ("m", m), ("n", n), ("d", 6), ("e", 5)];
            let b = bindings(&dims);
            let p = plan(&optimized(&kernel(&src), &b), &b, true).expect("plans");
            let chunked = p
                .steps
                .iter()
                .any(|s| matches!(&s.kind, StepKind::Chunked(spec) if spec.is_gated()));
            assert!(chunked || m.max(n) <= 3, "not fused at {dims:?}: {p}");
            let err = check(&src, &dims, m * 31 + n);
            assert!(err <= REL_L2, "{err:e} at {dims:?} {normalized}");
        }
    }
}
