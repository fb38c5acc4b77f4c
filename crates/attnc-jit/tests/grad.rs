//! Gradient graphs compiled to machine code against the f64 interpreter: every example (its
//! optimized form differentiated, so fused attentions get the fused backward step), and
//! fused attention gradients over masks with fully masked rows, m ≠ n, grouped-query
//! broadcasting, biases, softcaps and ALiBi slopes; on the full-width tier, on the portable
//! tier, with fused ops planned by their plain form, and at one and two threads (bit-identical).

mod common;

use attnc_ir::grad::{vjp, Vjp};
use attnc_ir::interp::evaluate_outputs;
use attnc_ir::{Bindings, DType, Kernel};
use attnc_jit::wide::Tiers;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use common::{bindings, inputs, kernel, optimized, REL_L2};
use ndarray::ArrayD;

/// Every gradient of `g` compiled with `options`, run on `ins` with `threads`.
fn run(
    g: &Vjp,
    b: &Bindings,
    ins: &[(Vec<usize>, Vec<f32>)],
    options: &CompileOptions,
    threads: usize,
) -> Vec<Vec<f32>> {
    let k = g.kernel(0);
    let compiled = CompiledKernel::compile_outputs(&k, &g.outputs(), b, options)
        .unwrap_or_else(|e| panic!("compile: {e}"));
    let f16: Vec<Vec<half::f16>> = ins
        .iter()
        .map(|(_, v)| v.iter().map(|&x| half::f16::from_f32(x)).collect())
        .collect();
    let bf16: Vec<Vec<half::bf16>> = ins
        .iter()
        .map(|(_, v)| v.iter().map(|&x| half::bf16::from_f32(x)).collect())
        .collect();
    let views: Vec<Input<'_>> = k
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| match p.dtype {
            DType::F32 => Input::F32(&ins[i].1),
            DType::F16 => Input::F16(&f16[i]),
            DType::Bf16 => Input::Bf16(&bf16[i]),
            DType::I32 => unreachable!("no i32 parameters here"),
        })
        .collect();
    compiled
        .run_outputs(&views, threads)
        .unwrap_or_else(|e| panic!("run: {e}"))
        .into_iter()
        .map(|o| o.data)
        .collect()
}

/// Every gradient of `g` by the f64 interpreter on `ins`.
fn interpreted(g: &Vjp, b: &Bindings, ins: &[(Vec<usize>, Vec<f32>)]) -> Vec<ArrayD<f64>> {
    evaluate_outputs(&g.kernel(0), b, &common::arrays(ins), &g.outputs()).expect("interp")
}

/// Differentiates `k` with respect to every parameter: the interpreter on the plain form's
/// gradient graph is the reference; the JIT runs the optimized form's gradient graph on
/// every tier, fused and plain, at 1 and 2 threads. Returns the largest error.
fn check(k: &Kernel, b: &Bindings, seed: u64) -> f64 {
    let all: Vec<usize> = (0..k.params.len()).collect();
    let plain = vjp(k, &all).expect("differentiates");
    let fused = vjp(&optimized(k, b), &all).expect("differentiates");
    let mut ins = inputs(&plain.kernel(0), b, seed);
    // ALiBi slopes as models use them (2^-1, 2^-2, …): random ones up to ±2 over distances of
    // a hundred keys make scores of hundreds, whose f32 rounding alone moves the slope's
    // gradient (a cancelling sum over every score) by 1e-3 in any f32 evaluation.
    for (p, (_, values)) in k.params.iter().zip(ins.iter_mut()) {
        if p.name == "slope" {
            for (h, x) in values.iter_mut().enumerate() {
                *x = 0.5f32.powi(h as i32 + 1);
            }
        }
    }
    let want = interpreted(&plain, b, &ins);
    let mut worst = 0.0f64;
    let cases = [
        (&fused, true, Tiers::ALL),
        (&fused, true, Tiers::NONE),
        (&fused, false, Tiers::ALL),
        (&plain, true, Tiers::ALL),
    ];
    for (g, fuse_attention, tiers) in cases {
        let options = CompileOptions {
            parallel_threshold: 0,
            fuse_attention,
            tiers,
            ..CompileOptions::default()
        };
        let one = run(g, b, &ins, &options, 1);
        let two = run(g, b, &ins, &options, 2);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (((a, c), w), grad) in one.iter().zip(&two).zip(&want).zip(&g.gradients) {
            assert_eq!(bits(a), bits(c), "d{}: threads 1 and 2 differ", grad.name);
            let err = common::rel_l2(a, w);
            assert!(
                err <= REL_L2,
                "d{}: relative L2 error {err:e} (fused {fuse_attention}, tiers {tiers:?})\n{}",
                grad.name,
                attnc_ir::print::print_kernel(k)
            );
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn every_example_matches_the_interpreter() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    for path in files {
        let src = std::fs::read_to_string(&path).expect("readable");
        let k = kernel(&src);
        let data_dependent_mask = k.params.iter().any(|p| p.dtype == attnc_ir::DType::I32)
            || src.contains("topk_blocks(");
        if data_dependent_mask {
            // Document and top-k block masks need ids and a gate, not random inputs: their
            // gradients are checked against the interpreter in `tests/cli_document.rs`.
            continue;
        }
        let symbols = attnc_ir::bind::kernel_symbols(&k);
        let dims = [
            ("h", 2),
            ("n", 70),
            ("m", 23),
            ("d", 9),
            ("r", 5),
            ("e", 7),
            ("w", 3),
            ("p", 4),
        ];
        let dims: Bindings = dims
            .into_iter()
            .filter(|(s, _)| symbols.iter().any(|x| x == s))
            .map(|(s, v)| (s.to_string(), v))
            .collect();
        let shapes = vec![None; k.params.len()];
        let b = attnc_ir::bind::bind_shapes(&k, &shapes, &dims).expect("binds");
        let err = check(&k, &b, 3);
        eprintln!("{}: worst relative L2 error {err:e}", path.display());
    }
}

#[test]
fn fused_attention_gradients_over_masks_biases_and_broadcasts() {
    let cases: &[(&str, &[(&str, u64)])] = &[
        // Sliding window with rows past the window, m ≠ n (queries aligned to the end).
        (
            "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
                return softmax(mask(q @ k.T / sqrt(d), causal & window(37))) @ v;
            }",
            &[("h", 2), ("m", 150), ("n", 131), ("d", 19), ("e", 7)],
        ),
        // More queries than keys under a causal mask: the first rows keep nothing.
        (
            "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] {
                return softmax(mask(q @ k.T * 0.3, causal)) @ v;
            }",
            &[("m", 97), ("n", 40), ("d", 16)],
        ),
        // Grouped-query keys and values, a softcap.
        (
            "kernel f(q: f32[g, r, n, d], k: f32[g, 1, n, d], v: f32[g, 1, n, d]) -> f32[g, r, n, d] {
                let s = q @ k.T / sqrt(d);
                return softmax(mask(20 * tanh(s / 20), causal)) @ v;
            }",
            &[("g", 2), ("r", 3), ("n", 77), ("d", 12)],
        ),
        // ALiBi slopes and a causal mask with a global band.
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
                let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
                return softmax(mask(s, causal & (window(20) | global(3)))) @ v;
            }",
            &[("h", 3), ("n", 140), ("d", 8)],
        ),
        // A bias over keys, broadcast over heads and queries.
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], b: f32[1, n]) -> f32[h, n, d] {
                return softmax(mask(q @ k.T / sqrt(d) + b, block(32) | dilated(4, 9))) @ v;
            }",
            &[("h", 2), ("n", 100), ("d", 10)],
        ),
        // A temperature per head read as the scale (its own gradient by the plain form).
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], t: f32[h, 1, 1]) -> f32[h, n, d] {
                return softmax(mask(q @ k.T * t / sqrt(d), causal & window(30))) @ v;
            }",
            &[("h", 3), ("n", 101), ("d", 8)],
        ),
        // Causal linear attention: the reverse prefix state.
        (
            "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, n, e] {
                let a = mask((elu(q) + 1) @ (elu(k) + 1).T, causal, 0);
                return (a @ v) / (sum(a, -1) + 0.5);
            }",
            &[("h", 2), ("n", 90), ("d", 6), ("e", 5)],
        ),
    ];
    for (i, (src, dims)) in cases.iter().enumerate() {
        let k = kernel(src);
        let b = bindings(dims);
        let err = check(&k, &b, 10 + i as u64);
        eprintln!("case {i}: worst relative L2 error {err:e}");
    }
}

/// ALiBi over rows of 1,000 keys, slopes of both signs up to 0.6: the terms reach hundreds,
/// where one f32 rounding is 1e-5 of a weight, unless distances are measured from each row's
/// kept key with the largest term (`attnc_wide::problem::Call::alibi_origin`). The fused backward on both tiers,
/// against the interpreter, every gradient within 1e-5 (the slope's too).
#[test]
fn alibi_over_long_rows_matches_the_interpreter() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
        let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
        return softmax(mask(s, causal)) @ v;
    }";
    let unmasked = src.replace("mask(s, causal)", "s");
    for src in [src, unmasked.as_str()] {
        let k = kernel(src);
        let b = bindings(&[("h", 4), ("n", 1000), ("d", 16)]);
        let all: Vec<usize> = (0..k.params.len()).collect();
        let g = vjp(&optimized(&k, &b), &all).expect("differentiates");
        let plain = vjp(&k, &all).expect("differentiates");
        let mut ins = inputs(&plain.kernel(0), &b, 21);
        ins[3].1 = vec![0.6, -0.6, 0.05, -0.3];
        let want = interpreted(&plain, &b, &ins);
        for tiers in [Tiers::ALL, Tiers::NONE] {
            let options = CompileOptions {
                parallel_threshold: 0,
                tiers,
                ..CompileOptions::default()
            };
            let got = run(&g, &b, &ins, &options, 2);
            for ((a, w), grad) in got.iter().zip(&want).zip(&g.gradients) {
                let err = common::rel_l2(a, w);
                assert!(
                    err <= 1e-5,
                    "d{}: relative L2 error {err:e} (tiers {tiers:?})",
                    grad.name
                );
            }
        }
    }
}

/// Rows of more than 1,024 keys: each batch entry's backward runs in parts of 1,024 keys on
/// the full-width tier, their shares of dQ added in part order, so the threads split one
/// entry's work and results stay bit-identical between 1 and 2 threads. Windows whose parts
/// reach only some query tiles, m ≠ n with rows that keep nothing, and keys shared by heads
/// (dK and dV of the parts summed over the heads afterwards).
#[test]
fn key_parts_match_the_interpreter() {
    let cases: &[(&str, &[(&str, u64)])] = &[
        (
            "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
                return softmax(mask(q @ k.T / sqrt(d), causal & window(300))) @ v;
            }",
            &[("h", 2), ("m", 1500), ("n", 2600), ("d", 8), ("e", 5)],
        ),
        (
            "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] {
                return softmax(mask(q @ k.T * 0.3, causal)) @ v;
            }",
            &[("m", 1400), ("n", 1100), ("d", 6)],
        ),
        (
            "kernel f(q: f32[g, r, n, d], k: f32[g, 1, n, d], v: f32[g, 1, n, d]) -> f32[g, r, n, d] {
                return softmax(q @ k.T / sqrt(d)) @ v;
            }",
            &[("g", 1), ("r", 2), ("n", 2100), ("d", 5)],
        ),
    ];
    for (i, (src, dims)) in cases.iter().enumerate() {
        let k = kernel(src);
        let b = bindings(dims);
        let err = check(&k, &b, 40 + i as u64);
        eprintln!("case {i}: worst relative L2 error {err:e}");
    }
}

/// The key parts' shares of dQ are kept between runs of a gradient kernel (a share is as
/// large as dQ on dense attention): a later run reuses them and gives the same bits, and
/// `release_buffers` frees them.
#[test]
fn key_part_shares_are_kept_between_runs() {
    let k = kernel(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
    );
    let b = bindings(&[("h", 1), ("n", 2600), ("d", 4)]);
    let all: Vec<usize> = (0..k.params.len()).collect();
    let g = vjp(&optimized(&k, &b), &all).expect("differentiates");
    let ins = inputs(&g.kernel(0), &b, 9);
    let views: Vec<Input<'_>> = ins.iter().map(|(_, v)| Input::F32(v)).collect();
    let options = CompileOptions {
        parallel_threshold: 0,
        ..CompileOptions::default()
    };
    let compiled = CompiledKernel::compile_outputs(&g.kernel(0), &g.outputs(), &b, &options)
        .expect("compiles");
    let run = |threads| -> Vec<Vec<u32>> {
        let outputs = compiled.run_outputs(&views, threads).expect("runs");
        outputs
            .iter()
            .map(|o| o.data.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let first = run(2);
    // The parts run on the AVX-512 backward only (not where the tiers are switched off).
    if compiled
        .plan()
        .to_string()
        .contains("attention backward [avx-512]")
    {
        // Three parts of keys: two shares, kept after the run.
        assert!(compiled.kept_buffer_bytes() >= 2 * 2600 * 4 * 4);
    }
    assert_eq!(run(2), first, "a run reusing kept shares");
    assert_eq!(run(1), first, "one thread");
    compiled.release_buffers();
    assert_eq!(compiled.kept_buffer_bytes(), 0);
    assert_eq!(run(2), first, "after release");
}
