//! `attnc run` under an approximation policy: validation on a calibration sample, fallback to
//! the exact plan with a clear message, and the report in `--format json`.

mod common;

use common::{attnc, json, status, stderr};

#[test]
fn an_approximation_above_tol_falls_back_to_the_exact_plan_with_a_message() {
    let out = attnc(&[
        "run",
        "examples/performer.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=2048,d=64",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("measured error"), "{err}");
    assert!(err.contains("rejected"), "{err}");
    assert!(err.contains("the plan is exact"), "{err}");
}

#[test]
fn json_reports_estimated_and_measured_errors() {
    let out = attnc(&[
        "run",
        "examples/performer.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=1024,d=64",
        "--approx",
        "random_features(m=64,seed=1)",
        "--tol",
        "100",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let validation = &doc["validations"][0];
    assert_eq!(validation["accepted"], true);
    assert!(validation["measured_error"]
        .as_f64()
        .is_some_and(|e| e > 0.0));
    // The report splits the compile step: `validation_ms` is what the measurements added.
    let millis = validation["millis"].as_f64().unwrap_or(-1.0);
    assert!(millis >= 0.0, "{validation}");
    assert_eq!(doc["validation_ms"].as_f64(), Some(millis));
    assert!(
        doc["compile_ms"].as_f64().is_some_and(|c| c >= millis),
        "{doc}"
    );
    assert!(
        doc["prepare_ms"].as_f64().is_some_and(|p| p >= 0.0),
        "{doc}"
    );
    for phase in [
        "exact_compile_ms",
        "inputs_ms",
        "exact_sample_ms",
        "approximate_sample_ms",
    ] {
        assert!(
            validation["cost"][phase].as_f64().is_some_and(|p| p >= 0.0),
            "{phase}"
        );
    }
    let outcome = &doc["approximations"][0];
    assert_eq!(outcome["applied"], true);
    assert!(outcome["estimated_error"].as_f64().is_some());
    assert!(outcome["measured_error"].as_f64().is_some());
}

#[test]
fn a_random_run_is_validated_on_its_own_inputs() {
    // `--random 3` draws parameter i from stream i of seed 3; handing the same values in as
    // files must give the same sample and the same measured error, bit for bit.
    let (h, n, d) = (2, 1024, 64);
    let common = [
        "--shape",
        "h=2,n=1024,d=64",
        "--approx",
        "random_features(m=64,seed=1)",
        "--tol",
        "100",
        "--format",
        "json",
    ];
    let mut drawn = vec!["run", "examples/performer.attn", "--random", "3"];
    drawn.extend(common);
    let out = attnc(&drawn);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let from_random = json(&out)["validations"][0].clone();
    assert_eq!(from_random["sample"], "random(seed = 3)", "{from_random}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut given: Vec<String> = ["run", "examples/performer.attn"]
        .map(String::from)
        .to_vec();
    for (index, name) in ["q", "k", "v"].into_iter().enumerate() {
        let values = attnc::io::standard_normal(3, index as u64, h * n * d);
        let tensor = attnc::io::Tensor::from_f32(vec![h, n, d], values).expect("shape");
        given.extend(["--input".into(), input_arg(dir.path(), name, &tensor)]);
    }
    given.extend(common.map(String::from));
    let given: Vec<&str> = given.iter().map(String::as_str).collect();
    let out = attnc(&given);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let from_files = &json(&out)["validations"][0];
    assert_eq!(
        from_files["measured_error"], from_random["measured_error"],
        "{from_files} against {from_random}"
    );
}

#[test]
fn exact_forbids_what_the_kernel_allows() {
    let out = attnc(&[
        "run",
        "examples/performer.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=512,d=64",
        "--exact",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["policy"], "exact");
    assert_eq!(doc["validations"], serde_json::json!([]));
}

#[test]
fn a_calibration_tensor_of_the_wrong_shape_is_an_input_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.npy");
    let tensor = attnc::io::Tensor::from_f32(vec![2, 2], vec![0.0; 4]).expect("tensor");
    attnc::io::write_npy(&path, &tensor).expect("write");
    let calibrate = format!("q={}", path.display());
    let out = attnc(&[
        "run",
        "examples/performer.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=2048,d=64",
        "--calibrate",
        &calibrate,
    ]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("calibration"), "{}", stderr(&out));
}

#[test]
fn explain_emits_the_code_of_the_validated_approximate_plan() {
    let listing_at = |shape: &str, policy: &[&str], tiers: &str| {
        let mut args = vec![
            "explain",
            "benches/kernels/dense.attn",
            "--shape",
            shape,
            "--emit",
            "clif",
        ];
        args.extend_from_slice(policy);
        let out = common::attnc_with_env(&args, &[("ATTNC_TIERS", tiers)]);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = |policy: &[&str], tiers: &str| listing_at("h=1,n=256,d=64", policy, tiers);
    // On the portable tier the int8 plan quantizes on the host first, so its kernel is step 1
    // and reads bytes.
    let exact = listing(&["--exact"], "cranelift");
    let int8 = listing(&["--approx", "int8", "--tol", "1"], "cranelift");
    assert!(exact.contains("; kernel dense_s0_attention"), "{exact}");
    assert!(int8.contains("; kernel dense_s1_attention"), "{int8}");
    assert!(int8.contains("load.i8x16"), "{int8}");
    assert!(!exact.contains("load.i8x16"), "{exact}");
    // With AMX, the validated int8 plan is the AMX kernel (packing its own operands); with its
    // products on AVX-512 VNNI (1.45× the f32 kernel, not 3×) only at a longer sequence.
    if let Some(unit) = attnc_wide::amx::unit(attnc_wide::amx::Products::Int8) {
        let shape = match unit {
            attnc_wide::amx::Unit::Tiles => "h=1,n=256,d=64",
            attnc_wide::amx::Unit::Vectors => "h=4,n=4096,d=64",
        };
        let amx = listing_at(shape, &["--approx", "int8", "--tol", "1"], "amx,avx512");
        let tier = attnc_jit::wide::Tier::Amx(attnc_wide::amx::Products::Int8).name();
        assert!(amx.contains(&format!("{tier} tier")), "{amx}");
    }
}

#[test]
fn tol_alone_keeps_the_kernels_own_approximations() {
    // performer.attn names `@approx random_features(...)`; `--tol` changes only how much
    // error it may have, so with a loose bound the approximation is applied.
    let out = attnc(&[
        "run",
        "examples/performer.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=2048,d=64",
        "--tol",
        "100",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(
        doc["validations"][0]["accepted"], true,
        "{}",
        doc["approximations"]
    );
}

/// `[1, n, d]` values drawn from a fixed generator and multiplied by `scale`.
fn tensor(seed: u64, n: usize, d: usize, scale: f32) -> attnc::io::Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values = (0..n * d)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.46 * scale
        })
        .collect();
    attnc::io::Tensor::from_f32(vec![1, n, d], values).expect("consistent shape")
}

#[test]
fn verify_fails_with_status_1_when_calibration_data_misrepresents_the_inputs() {
    // Random features are accurate where attention is nearly uniform (the small calibration
    // queries and keys) and poor where it is peaked (the inputs): validation accepts, the
    // result on the real inputs misses the bound, and `--verify` says so with exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    let (n, d) = (2048, 64);
    let mut args: Vec<String> = ["run", "examples/performer.attn"]
        .map(String::from)
        .to_vec();
    for (index, name) in ["q", "k", "v"].into_iter().enumerate() {
        let scale = if name == "v" { 1.0 } else { 2.5 };
        let input = dir.path().join(format!("{name}.npy"));
        attnc::io::write_npy(&input, &tensor(index as u64 + 1, n, d, scale)).expect("writes");
        let calibration = dir.path().join(format!("{name}_cal.npy"));
        let small = if name == "v" { 1.0 } else { 0.01 };
        attnc::io::write_npy(&calibration, &tensor(index as u64 + 11, n, d, small))
            .expect("writes");
        args.extend(["--input".into(), format!("{name}={}", input.display())]);
        args.extend([
            "--calibrate".into(),
            format!("{name}={}", calibration.display()),
        ]);
    }
    args.extend(["--verify", "--format", "json"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = attnc(&args);
    let doc = json(&out);
    let report = format!("{} {}", doc["validations"], doc["verify"]);
    assert_eq!(doc["validations"][0]["accepted"], true, "{report}");
    assert_eq!(doc["verify"]["passed"], false, "{report}");
    assert_eq!(doc["ok"], false, "{report}");
    assert_eq!(doc["error"]["kind"], "verify", "{report}");
    assert_eq!(status(&out), 1, "{}", stderr(&out));
}

/// Writes `tensor` as `name.npy` under `dir` and returns the `--input` argument naming it.
fn input_arg(dir: &std::path::Path, name: &str, tensor: &attnc::io::Tensor) -> String {
    let path = dir.join(format!("{name}.npy"));
    attnc::io::write_npy(&path, tensor).expect("writes");
    format!("{name}={}", path.display())
}

#[test]
fn int8_is_validated_on_the_users_inputs_not_on_random_data() {
    // Keys with one channel 40× the others: the portable tier's int8 scale per key row spends
    // its range on that channel, and the error on these inputs is about 9 % although random
    // data passes at 0.4 %. (AMX int8 keeps a second digit and passes both.)
    let dir = tempfile::tempdir().expect("tempdir");
    let (n, d) = (512, 64);
    let q = tensor(1, n, d, 1.0);
    let mut k = tensor(2, n, d, 1.0);
    if let attnc::io::TensorData::F32(values) = &mut k.data {
        for row in values.chunks_mut(d) {
            row[0] *= 40.0;
        }
    }
    let v = tensor(3, n, d, 1.0);
    let file = "examples/performer.attn";
    let mut args: Vec<String> = ["run", file, "--approx", "int8", "--tol", "0.01"]
        .map(String::from)
        .to_vec();
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        args.extend(["--input".to_string(), input_arg(dir.path(), name, t)]);
    }
    args.extend(["--format", "json"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::attnc_with_env(&args, &[("ATTNC_TIERS", "cranelift")]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let validation = &doc["validations"][0];
    assert_eq!(validation["sample"], "the inputs (q, k, v)", "{validation}");
    assert_eq!(validation["accepted"], false, "{validation}");
    assert!(
        validation["measured_error"]
            .as_f64()
            .is_some_and(|e| e > 0.01),
        "{validation}"
    );
}

#[test]
fn a_nan_in_the_inputs_forbids_approximations_and_stays_in_the_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (n, d) = (256, 64);
    let mut q = tensor(1, n, d, 1.0);
    if let attnc::io::TensorData::F32(values) = &mut q.data {
        values[5 * d + 3] = f32::NAN;
    }
    let mut args: Vec<String> = ["run", "examples/performer.attn", "--approx", "int8"]
        .map(String::from)
        .to_vec();
    for (index, name) in ["q", "k", "v"].into_iter().enumerate() {
        let t = if name == "q" {
            q.clone()
        } else {
            tensor(index as u64 + 1, n, d, 1.0)
        };
        args.extend(["--input".to_string(), input_arg(dir.path(), name, &t)]);
    }
    args.extend(["--format", "json"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = attnc(&args);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert!(
        doc["notes"].to_string().contains("NaN or infinite"),
        "{}",
        doc["notes"]
    );
    assert_eq!(
        doc["stats"]["nan"], 64,
        "row 5 of the output is NaN, and only it"
    );
}

/// Runs `program` at `h=2,n=300,d=64` under `--approx bf16_products --verify`: the report and
/// the plan's text.
fn bf16_products_on(program: &str) -> (serde_json::Value, String) {
    let shape = ["--shape", "h=2,n=300,d=64", "--approx", "bf16_products"];
    let mut run = vec![
        "run", program, "--random", "0", "--verify", "--format", "json",
    ];
    run.extend(shape);
    let out = attnc(&run);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let mut explain = vec!["explain", program, "--format", "json"];
    explain.extend(shape);
    let plan = json(&attnc(&explain))["plan"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (json(&out), plan)
}

/// The report applied bf16 products within `bound`, on the named tier.
fn assert_applied(doc: &serde_json::Value, plan: &str, tier: &str, bound: f64) {
    let outcome = &doc["approximations"][0];
    assert_eq!(outcome["applied"], true, "{outcome}");
    let measured = doc["validations"][0]["measured_error"]
        .as_f64()
        .unwrap_or(1.0);
    assert!(measured < bound, "{measured}");
    assert!(doc["verify"]["relative_l2_error"].as_f64().unwrap_or(1.0) < bound);
    assert!(plan.contains(tier), "{plan}");
}

#[test]
fn bf16_products_run_where_the_cpu_has_them_or_say_why_not() {
    use attnc_wide::amx::{self, Products, Unit};
    let allowed = attnc::jit::wide::Tiers::available(attnc::jit::wide::Tiers::ALL).amx_bf16;
    let unit = amx::unit(Products::Bf16).filter(|_| allowed);
    // Standard-normal data: Q and P rounded to bf16 and K, V as `hi + lo` pairs on AMX tiles
    // (about 2.5e-3); every operand rounded once on vectors (about 3.6e-3); bf16 inputs need no
    // rounding of Q, K, V (about 1.7e-3).
    for (program, bf16_inputs) in [
        ("benches/kernels/dense.attn", false),
        ("benches/kernels/dense_bf16.attn", true),
    ] {
        let (doc, plan) = bf16_products_on(program);
        match unit {
            Some(Unit::Tiles) => assert_applied(&doc, &plan, "amx bf16", 3e-3),
            Some(Unit::Vectors) => {
                let bound = if bf16_inputs { 3e-3 } else { 4.5e-3 };
                assert_applied(&doc, &plan, "avx-512 bf16", bound)
            }
            None => {
                let outcome = &doc["approximations"][0];
                assert_eq!(outcome["applied"], false, "{outcome}");
                let reason = outcome["reason"].as_str().unwrap_or_default();
                assert!(reason.contains("AMX"), "{reason}");
            }
        }
    }
}

/// `[1, n, d]` queries or keys around 4 centres in 8 contiguous runs (a low-rank attention
/// matrix), or standard-normal-like values when `clusters` is false.
fn runs_of_centres(seed: u64, n: usize, d: usize, clusters: bool) -> attnc::io::Tensor {
    let centres = tensor(seed, 4, d, 2.0);
    let noise = tensor(seed + 100, n, d, if clusters { 0.05 } else { 1.0 });
    let (attnc::io::TensorData::F32(c), attnc::io::TensorData::F32(e)) =
        (&centres.data, &noise.data)
    else {
        unreachable!("tensor() makes f32 data")
    };
    let values = (0..n * d)
        .map(|i| {
            let (row, col) = (i / d, i % d);
            let centre = (row * 8 / n * 3) % 4;
            let mean = if clusters { c[centre * d + col] } else { 0.0 };
            mean + e[i]
        })
        .collect();
    attnc::io::Tensor::from_f32(vec![1, n, d], values).expect("consistent shape")
}

#[test]
fn nystrom_is_validated_on_the_users_inputs() {
    // Accepted on inputs whose attention is of low rank; rejected (the plan exact) on
    // unstructured ones, where the landmarks summarise nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let (n, d) = (1024, 32);
    for clusters in [true, false] {
        let mut args: Vec<String> = ["run", "examples/nystrom.attn", "--format", "json"]
            .map(String::from)
            .to_vec();
        for (index, name) in ["q", "k", "v"].into_iter().enumerate() {
            let t = if name == "v" {
                tensor(7, n, d, 1.0)
            } else {
                // Queries and keys share the centres (seed 1) and differ in their noise.
                let mut t = runs_of_centres(1, n, d, clusters);
                let jitter = tensor(index as u64 + 20, n, d, 0.01);
                if let (attnc::io::TensorData::F32(a), attnc::io::TensorData::F32(b)) =
                    (&mut t.data, &jitter.data)
                {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
                t
            };
            args.extend(["--input".into(), input_arg(dir.path(), name, &t)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = attnc(&args);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        let doc = json(&out);
        let validation = &doc["validations"][0];
        assert_eq!(validation["approximations"][0], "nystrom(m = 64)", "{doc}");
        let measured = validation["measured_error"].as_f64().expect("a number");
        assert_eq!(validation["accepted"], clusters, "{validation}");
        if clusters {
            assert!(measured < 0.05, "{validation}");
        } else {
            assert!(measured > 0.05, "{validation}");
        }
    }
}
