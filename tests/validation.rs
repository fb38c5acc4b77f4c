//! Validation of approximations through the library: the calibration sample measures what a
//! full run would on the same rows, and a plan above the tolerance falls back to exact code.

use attnc::approx::relative_l2;
use attnc::calibration::{calibration_inputs, sample_rows, DrawnInputs, Fill};
use attnc::engine::input_view;
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::{Bindings, Kernel};
use attnc::policy::Policy;
use attnc::syntax::ast::ApproxKind;
use attnc_jit::{CompileOptions, CompiledKernel, Input};

const DENSE: &str =
    "kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

/// The compile options of every test here: int8 must be the cheaper plan for these tests to
/// validate it. On an AVX-512 CPU without AMX int8 beats the exact AVX-512 kernel only on long
/// sequences (its products on VNNI vectors, 1.45×; the optimizer leaves it out at these
/// shapes), so there the full-width tiers are off and the exact plan is the 128-bit one, which
/// int8's `vpdpbusd` kernel beats.
fn options() -> CompileOptions {
    use attnc_wide::amx::{self, Products, Unit};
    let tiers = attnc_jit::wide::Tiers::available(attnc_jit::wide::Tiers::ALL);
    let int8_on_tiles = tiers.amx && amx::unit(Products::Int8) == Some(Unit::Tiles);
    match tiers.avx512 && !int8_on_tiles {
        true => CompileOptions {
            tiers: attnc_jit::wide::Tiers::NONE,
            ..CompileOptions::default()
        },
        false => CompileOptions::default(),
    }
}

fn compiler() -> attnc::Compiler {
    attnc::Compiler::new().with_options(options())
}

fn kernel(src: &str) -> Kernel {
    let module = attnc::source::compile_text(src).expect("the program checks");
    module.kernels[0].clone()
}

fn bindings(pairs: &[(&str, u64)]) -> Bindings {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

/// Compiles `kernel` under `policy`, validating on `calibration` (else the policy's seed).
fn compile_with_policy(
    kernel: &Kernel,
    bindings: &Bindings,
    policy: &Policy,
    calibration: &[(String, Tensor)],
    threads: usize,
) -> Result<attnc::Compiled, attnc::engine::RunError> {
    let calibration = attnc::Calibration {
        tensors: calibration,
        ..Default::default()
    };
    compiler()
        .with_policy(policy.clone())
        .with_threads(threads)
        .compile_calibrated(kernel, bindings, calibration)
}

/// The exact plan's machine code.
fn compile(
    kernel: &Kernel,
    bindings: &Bindings,
) -> Result<CompiledKernel, attnc::engine::RunError> {
    Ok(compiler().compile(kernel, bindings)?.code)
}

/// The calibration inputs of `seed` at `bindings`, each input's first block repeated over its
/// leading axes.
fn repeated_inputs(kernel: &Kernel, bindings: &Bindings, seed: u64) -> Vec<Tensor> {
    let none = DrawnInputs::default();
    calibration_inputs(kernel, bindings, seed, &[], none, Fill::Repeat, 2).unwrap()
}

fn int8_policy(tol: f64) -> Policy {
    Policy {
        allowed: vec![ApproxKind::Int8],
        tol,
    }
}

/// The rows `rows` of batch entry 0 of a `[.., m, width]` output.
fn gather(data: &[f32], width: usize, rows: &[std::ops::Range<usize>]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| data[r.start * width..r.end * width].iter().copied())
        .collect()
}

#[test]
fn the_sampled_error_equals_the_error_of_full_runs_on_the_same_rows() {
    let kernel = kernel(DENSE);
    let (m, d) = (1023, 40);
    let bindings = bindings(&[("h", 3), ("n", m), ("d", d)]);
    let int8 = compiler()
        .with_policy(int8_policy(1.0))
        .optimize(&kernel, &bindings);
    assert!(
        int8.trace.approximations.iter().any(|o| o.applied),
        "the int8 plan is chosen: {:?}",
        int8.trace.approximations
    );
    let approximate = CompiledKernel::compile(&int8.kernel, &bindings, &options()).unwrap();
    let exact = compile(&kernel, &bindings).unwrap();
    let inputs = repeated_inputs(&kernel, &bindings, 0);
    let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
    let rows = sample_rows(approximate.output_shape());
    assert!(rows.len() > 1, "{rows:?}");

    for threads in [1, 2] {
        let sampled_approx = approximate.run_sample(&views, threads, &rows).unwrap();
        let sampled_exact = exact.run_sample(&views, threads, &rows).unwrap();
        let full_approx = approximate.run(&views, threads).unwrap().data;
        let full_exact = exact.run(&views, threads).unwrap().data;
        // The sampled rows are the rows of a full run, bit for bit (the int8 pre-pass of
        // batch entry 0 alone packs the same bytes), so the errors are equal.
        assert_eq!(sampled_approx, gather(&full_approx, d as usize, &rows));
        assert_eq!(sampled_exact, gather(&full_exact, d as usize, &rows));
        let sampled = relative_l2(&sampled_approx, &sampled_exact);
        assert!(sampled > 0.0 && sampled < 0.05, "{sampled}");
        let whole = relative_l2(&full_approx, &full_exact);
        // Three identical heads: the whole-output error is that of entry 0, which the
        // sample estimates within a factor of two.
        assert!(
            sampled < 2.0 * whole && whole < 2.0 * sampled,
            "{sampled} vs {whole}"
        );
    }
}

#[test]
fn random_calibration_inputs_repeat_the_first_entry_of_the_seeded_stream() {
    let kernel = kernel(
        "kernel gqa(q: f32[h, n, d], k: f32[1, n, d], v: f32[1, n, d]) -> f32[h, n, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
    );
    let bindings = bindings(&[("h", 3), ("n", 5), ("d", 7)]);
    let given = Tensor {
        shape: vec![1, 5, 7],
        data: TensorData::F32((0..35).map(|x| x as f32).collect()),
    };
    let inputs = calibration_inputs(
        &kernel,
        &bindings,
        9,
        &[("v".to_string(), given.clone())],
        DrawnInputs::default(),
        Fill::Repeat,
        2,
    )
    .unwrap();
    let q = inputs[0].to_f32_vec();
    assert_eq!(inputs[0].shape, [3, 5, 7]);
    let block = standard_normal(9, 0, 35);
    for entry in q.chunks(35) {
        assert_eq!(entry, &block[..]);
    }
    assert_eq!(inputs[1].to_f32_vec(), standard_normal(9, 1, 35));
    assert_eq!(inputs[2], given);
    // Filling only the first block leaves the other entries zero.
    let first = calibration_inputs(
        &kernel,
        &bindings,
        9,
        &[("v".to_string(), given.clone())],
        DrawnInputs::default(),
        Fill::FirstBlock,
        2,
    )
    .unwrap();
    let q = first[0].to_f32_vec();
    assert_eq!(&q[..35], &block[..]);
    assert!(q[35..].iter().all(|&x| x == 0.0));
    assert_eq!(first[1], inputs[1]);
    assert_eq!(first[2], given);

    let wrong = Tensor {
        shape: vec![5, 7],
        data: TensorData::F32(vec![0.0; 35]),
    };
    let err = calibration_inputs(
        &kernel,
        &bindings,
        9,
        &[("v".to_string(), wrong)],
        DrawnInputs::default(),
        Fill::Repeat,
        1,
    );
    assert!(err.is_err());
}

#[test]
fn an_approximation_above_tol_falls_back_to_the_exact_code() {
    let kernel = kernel(DENSE);
    let bindings = bindings(&[("h", 2), ("n", 300), ("d", 59)]);
    let inputs: Vec<Tensor> = (0..3)
        .map(|i| Tensor {
            shape: vec![2, 300, 59],
            data: TensorData::F32(standard_normal(4, i, 2 * 300 * 59)),
        })
        .collect();
    let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
    let exact = compile(&kernel, &bindings).unwrap().run(&views, 2).unwrap();

    // Calibration data int8 handles badly: every key has a large channel 0 that the queries
    // ignore (q[.., 0] = 0), so the exact scores do not see it, but it sets each key's int8
    // scale and leaves the other channels a few levels (or none, for two-digit schemes).
    let spiky: Vec<(String, Tensor)> = ["q", "k", "v"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut values = standard_normal(8, i as u64, 2 * 300 * 59);
            for row in values.chunks_mut(59) {
                row[0] = match *name {
                    "q" => 0.0,
                    "k" => 1.0e6 * row[0].signum(),
                    _ => row[0],
                };
            }
            let tensor = Tensor {
                shape: vec![2, 300, 59],
                data: TensorData::F32(values),
            };
            (name.to_string(), tensor)
        })
        .collect();
    let strict = compile_with_policy(&kernel, &bindings, &int8_policy(0.05), &spiky, 2).unwrap();
    assert_eq!(strict.validations.len(), 1);
    let v = &strict.validations[0];
    assert!(!v.accepted && v.measured_error > 0.05, "{v:?}");
    assert_eq!(v.sample_rows, 256);
    assert!(v.cost.exact_compile_ms > 0.0 && v.millis >= 0.0, "{v:?}");
    assert!(strict.trace.approximations.iter().all(|o| !o.applied));
    let outcome = &strict.trace.approximations[0];
    assert_eq!(outcome.measured_error, Some(v.measured_error));
    assert!(outcome.reason.as_deref().unwrap_or("").contains("exceeds"));
    // The fallback runs the exact plan: the same bits as compiling without a policy.
    assert_eq!(strict.code.run(&views, 2).unwrap().data, exact.data);

    // On standard-normal calibration data the same approximation is accepted.
    let loose = compile_with_policy(&kernel, &bindings, &int8_policy(0.05), &[], 2).unwrap();
    let v = &loose.validations[0];
    assert!(v.accepted && v.measured_error <= 0.05, "{v:?}");
    let approximate = loose.code.run(&views, 2).unwrap().data;
    assert_ne!(approximate, exact.data);
    assert!(relative_l2(&approximate, &exact.data) < 0.05);
}

#[test]
fn calibration_blocks_copied_from_a_random_run_equal_drawn_ones() {
    let kernel = kernel(
        "kernel mixed(q: f32[h, n, d], k: f16[h, n, d], v: bf16[h, n, d]) -> f32[h, n, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
    );
    let bindings = bindings(&[("h", 3), ("n", 6), ("d", 5)]);
    let drawn_fresh = calibration_inputs(
        &kernel,
        &bindings,
        2,
        &[],
        DrawnInputs::default(),
        Fill::Repeat,
        2,
    );
    let fresh = drawn_fresh.unwrap();
    // What `--random 2` draws: every entry of every parameter from the parameter's stream.
    let run: Vec<Tensor> = kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| Tensor {
            shape: vec![3, 6, 5],
            data: TensorData::from_f32_as(standard_normal(2, i as u64, 90), p.dtype),
        })
        .collect();
    let slots: Vec<Option<&Tensor>> = vec![Some(&run[0]), None, Some(&run[2])];
    let drawn = DrawnInputs {
        seed: 2,
        tensors: &slots,
    };
    let copied = calibration_inputs(&kernel, &bindings, 2, &[], drawn, Fill::Repeat, 2).unwrap();
    assert_eq!(copied, fresh);
    assert_ne!(run[0], fresh[0], "the run's later heads are not repeats");
    // A policy with another seed does not reuse them.
    let seed5 = calibration_inputs(&kernel, &bindings, 5, &[], drawn, Fill::Repeat, 1).unwrap();
    let fresh5 = calibration_inputs(
        &kernel,
        &bindings,
        5,
        &[],
        DrawnInputs::default(),
        Fill::Repeat,
        1,
    );
    assert_eq!(seed5, fresh5.unwrap());
    assert_ne!(seed5, fresh);
    // A one-entry sample copies the first block of the run's three entries.
    let mut one = bindings.clone();
    one.insert("h".to_string(), 1);
    let entry = calibration_inputs(&kernel, &one, 2, &[], drawn, Fill::Repeat, 2).unwrap();
    let entry_fresh = calibration_inputs(
        &kernel,
        &one,
        2,
        &[],
        DrawnInputs::default(),
        Fill::Repeat,
        1,
    );
    assert_eq!(entry, entry_fresh.unwrap());
    assert_eq!(entry[0].shape, vec![1, 6, 5]);
}

#[test]
fn only_plans_that_read_the_first_block_leave_the_rest_zero() {
    let dense = kernel(
        "kernel a(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
    );
    let b = bindings(&[("h", 2), ("n", 512), ("d", 64)]);
    let exact = compile(&dense, &b).unwrap();
    assert_eq!(Fill::for_plan(exact.plan()), Fill::FirstBlock);
    let int8 = compile_with_policy(&dense, &b, &int8_policy(1.0), &[], 2).unwrap();
    assert!(
        int8.validations.iter().any(|v| v.accepted),
        "int8 not applied"
    );
    assert_eq!(Fill::for_plan(int8.code.plan()), Fill::FirstBlock);
    // The sampled rows read nothing past the first block: either fill gives the same rows.
    for code in [&exact, &int8.code] {
        let rows = sample_rows(code.output_shape());
        let sample = |fill| {
            let inputs =
                calibration_inputs(&dense, &b, 4, &[], DrawnInputs::default(), fill, 2).unwrap();
            let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
            code.run_sample(&views, 2, &rows).unwrap()
        };
        assert_eq!(sample(Fill::Repeat), sample(Fill::FirstBlock));
    }
    // A plan with steps before the attention keeps repeating the block.
    let projected = kernel(
        "kernel g(x: f32[n, e], w: f32[e, d]) -> f32[n, d] {
            let y = x @ w;
            return softmax(y @ y.T) @ y;
        }",
    );
    let pb = bindings(&[("n", 20), ("e", 8), ("d", 4)]);
    assert_eq!(
        Fill::for_plan(compile(&projected, &pb).unwrap().plan()),
        Fill::Repeat
    );
}

/// A plan that does not end in a fused attention (Performer's linear attention) is validated
/// on one batch entry, compiled with the leading dimension bound to 1: the measured error is
/// the one the run's shape gives on the same rows.
#[test]
fn one_entry_samples_measure_what_the_run_shape_measures() {
    let kernel = kernel(DENSE);
    let (n, d) = (300, 16);
    let bindings = bindings(&[("h", 3), ("n", n), ("d", d)]);
    let policy = Policy {
        allowed: vec![ApproxKind::RandomFeatures {
            m: 32,
            seed: Some(7),
        }],
        tol: 1000.0,
    };
    let compiled = compile_with_policy(&kernel, &bindings, &policy, &[], 2).unwrap();
    let [validation] = &compiled.validations[..] else {
        panic!("one measurement: {:?}", compiled.validations);
    };
    assert!(validation.accepted, "{validation:?}");
    // The same measurement at the run's shape, by hand.
    let seed = policy.seed();
    let performer = compiler().with_policy(policy).optimize(&kernel, &bindings);
    let approximate = CompiledKernel::compile(&performer.kernel, &bindings, &options()).unwrap();
    assert!(
        !approximate.plan().to_string().contains("fused attention"),
        "{}",
        approximate.plan()
    );
    let exact = compile(&kernel, &bindings).unwrap();
    let inputs = repeated_inputs(&kernel, &bindings, seed);
    let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
    let rows = sample_rows(approximate.output_shape());
    let by_hand = relative_l2(
        &approximate.run_sample(&views, 2, &rows).unwrap(),
        &exact.run_sample(&views, 2, &rows).unwrap(),
    );
    let measured = validation.measured_error;
    assert!(
        (measured - by_hand).abs() <= 1e-6 * by_hand,
        "{measured} vs {by_hand}"
    );
}
