//! End-to-end tests of the `attnc` command line: every example checks and runs, results and
//! errors in text and JSON, exit statuses 0 / 1 / 2, outputs written whole or not at all.

mod common;

use common::*;

/// Small shapes binding every symbol any example uses.
const SMALL: &str = "h=2,n=7,d=5,m=3,r=4,e=6,w=2,p=3";

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn every_example_checks() {
    let files = example_files();
    assert!(
        files.len() >= 12,
        "expected the LANGUAGE.md examples and our own"
    );
    for file in files {
        let out = attnc(&["check", p(&file)]);
        assert_eq!(status(&out), 0, "{}: {}", file.display(), stderr(&out));
        assert!(
            stdout(&out).contains('('),
            "prints a signature: {}",
            stdout(&out)
        );
    }
}

#[test]
fn every_example_runs_on_the_interpreter() {
    for file in random_example_files() {
        let out = attnc(&[
            "run",
            p(&file),
            "--engine",
            "interp",
            "--random",
            "1",
            "--shape",
            SMALL,
            "--format",
            "json",
        ]);
        assert_eq!(status(&out), 0, "{}: {}", file.display(), stderr(&out));
        let doc = json(&out);
        assert_eq!(doc["ok"], true);
        let values = doc["values"]
            .as_array()
            .expect("small outputs carry values");
        let count: u64 = doc["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dims are integers"))
            .product();
        assert_eq!(values.len() as u64, count, "{}", file.display());
        assert!(
            values
                .iter()
                .all(|v| v.as_f64().is_some_and(f64::is_finite)),
            "{}: finite outputs on normal inputs",
            file.display()
        );
    }
}

#[test]
fn run_text_output_names_kernel_shape_and_engine() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "3",
        "--shape",
        "h=2,n=9,d=4",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("kernel local"), "{text}");
    assert!(text.contains("[2, 9, 4]"), "{text}");
    assert!(text.contains("interp"), "{text}");
}

#[test]
fn same_seed_gives_same_result_and_other_seed_differs() {
    let file = examples_dir().join("alibi.attn");
    let run = |seed: &str| {
        let out = attnc(&[
            "run",
            p(&file),
            "--engine",
            "interp",
            "--random",
            seed,
            "--shape",
            "h=2,n=6,d=3",
            "--format",
            "json",
        ]);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        json(&out)["values"].clone()
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn output_npy_round_trips_through_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("local.attn");
    let q = dir.path().join("q.npy");
    // Write q from one run's output (shape [h, n, d]) and feed it back as an input.
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "1",
        "--shape",
        "h=1,n=4,d=3",
        "--output",
        p(&q),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let tensor = attnc::io::read_npy(&q).expect("output is a valid .npy");
    assert_eq!(tensor.shape, vec![1, 4, 3]);
    let spec = format!("q={}", p(&q));
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "2",
        "--input",
        &spec,
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["bindings"]["n"], 4);
}

#[test]
fn f16_return_type_writes_float16_npy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("blocksparse.attn");
    let out_path = dir.path().join("o.npy");
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "1",
        "--shape",
        "h=1,n=5,d=2",
        "--output",
        p(&out_path),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let tensor = attnc::io::read_npy(&out_path).expect("valid npy");
    assert_eq!(tensor.dtype_name(), "f16");
}

#[test]
fn missing_file_is_exit_1_naming_it() {
    let out = attnc(&["check", "no/such/file.attn"]);
    assert_eq!(status(&out), 1);
    assert!(
        stderr(&out).contains("no/such/file.attn"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn directory_as_source_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = attnc(&["check", p(dir.path())]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("directory"), "{}", stderr(&out));
}

#[test]
fn syntax_error_reports_file_line_column_and_caret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "bad.attn",
        "kernel f(q: f32[n, d]) -> f32[n, d] {\n    return q @ ;\n}\n",
    );
    let out = attnc(&["check", p(&src)]);
    assert_eq!(status(&out), 1);
    let err = stderr(&out);
    assert!(err.contains("bad.attn:2:"), "{err}");
    assert!(err.contains('^'), "{err}");
}

#[test]
fn errors_are_json_with_format_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "bad.attn",
        "kernel f(q: f32[n, d], k: f32[m, d]) -> f32[n, d] {\n    return q + k;\n}\n",
    );
    let out = attnc(&["check", p(&src), "--format", "json"]);
    assert_eq!(status(&out), 1);
    let doc = json(&out);
    assert_eq!(doc["ok"], false);
    let diag = &doc["error"]["diagnostics"][0];
    assert_eq!(diag["line"], 2, "{doc}");
    assert!(diag["column"].as_u64().is_some(), "{doc}");

    let out = attnc(&["run", p(&src), "--format", "json", "--shape", "bogus"]);
    assert_eq!(status(&out), 2);
    assert_eq!(json(&out)["error"]["kind"], "usage");

    let out = attnc(&["run", "--format", "json", "--no-such-flag", "x.attn"]);
    assert_eq!(status(&out), 2);
    assert_eq!(json(&out)["error"]["kind"], "usage");
}

#[test]
fn usage_errors_exit_2() {
    let file = examples_dir().join("local.attn");
    for args in [
        vec!["frobnicate"],
        vec!["run"],
        vec!["run", p(&file), "--shape", "n"],
        vec!["run", p(&file), "--shape", "n=-3"],
        vec!["run", p(&file), "--threads", "0"],
        vec!["run", p(&file), "--random", "abc"],
        vec!["run", p(&file), "--engine", "gpu"],
        vec!["run", p(&file), "--approx", "fp8"],
        vec!["run", p(&file), "--tol", "-1"],
        vec!["run", p(&file), "--input", "q"],
        vec!["run", p(&file), "--exact", "--approx", "int8"],
    ] {
        let out = attnc(&args);
        assert_eq!(status(&out), 2, "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn several_kernels_need_kernel_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "two.attn",
        "kernel a(x: f32[n, n]) -> f32[n, n] { return x; }\n\
         kernel b(x: f32[n, n]) -> f32[n, n] { return x * 2; }\n",
    );
    let out = attnc(&[
        "run",
        p(&src),
        "--random",
        "1",
        "--shape",
        "n=2",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 2);
    assert!(stderr(&out).contains("--kernel"), "{}", stderr(&out));
    let out = attnc(&[
        "run",
        p(&src),
        "--kernel",
        "b",
        "--random",
        "1",
        "--shape",
        "n=2",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let out = attnc(&[
        "run",
        p(&src),
        "--kernel",
        "c",
        "--random",
        "1",
        "--shape",
        "n=2",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 1);
    assert!(
        stderr(&out).contains("no kernel named `c`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unbound_inputs_and_symbols_are_exit_1() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--shape",
        "h=1,n=2,d=2",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("--random"), "{}", stderr(&out));
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        "h=1,n=2",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains('d'), "{}", stderr(&out));
}

#[test]
fn unused_shape_symbol_is_a_note() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        "h=1,n=2,d=2,zz=5",
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("zz"), "{}", stderr(&out));
}

#[test]
fn shape_contradicting_an_input_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("local.attn");
    let q = dir.path().join("q.npy");
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "1",
        "--shape",
        "h=1,n=4,d=3",
        "--output",
        p(&q),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let spec = format!("q={}", p(&q));
    let out = attnc(&[
        "run",
        p(&file),
        "--engine",
        "interp",
        "--random",
        "1",
        "--input",
        &spec,
        "--shape",
        "n=5",
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains('n'), "{}", stderr(&out));
}

#[test]
fn input_for_unknown_parameter_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("local.attn");
    let spec = format!("zz={}", p(&dir.path().join("x.npy")));
    let out = attnc(&["run", p(&file), "--input", &spec]);
    assert_eq!(status(&out), 1);
    assert!(
        stderr(&out).contains("no parameter `zz`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn malformed_npy_input_is_exit_1_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(dir.path(), "bad.npy", b"\x93NUMPY garbage");
    let file = examples_dir().join("local.attn");
    let spec = format!("q={}", p(&bad));
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--input",
        &spec,
        "--engine",
        "interp",
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("bad.npy"), "{}", stderr(&out));
}

#[test]
fn failed_run_leaves_existing_output_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = write(dir.path(), "out.npy", b"precious");
    let file = examples_dir().join("local.attn");
    // Unbound input: the run fails before anything is written.
    let out = attnc(&[
        "run",
        p(&file),
        "--shape",
        "h=1,n=2,d=2",
        "--output",
        p(&target),
    ]);
    assert_eq!(status(&out), 1);
    assert_eq!(std::fs::read(&target).expect("still there"), b"precious");
}

#[test]
fn unwritable_output_is_exit_1_and_leaves_no_file() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        "h=1,n=2,d=2",
        "--engine",
        "interp",
        "--output",
        "/no/such/dir/out.npy",
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("/no/such/dir"), "{}", stderr(&out));
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        "h=1,n=2,d=2",
        "--engine",
        "interp",
        "--output",
        "/dev/full",
    ]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
}

#[test]
fn empty_and_comment_only_files_check_with_no_kernels() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in [("empty.attn", ""), ("comments.attn", "# nothing\n# here\n")] {
        let src = write(dir.path(), name, text);
        let out = attnc(&["check", p(&src)]);
        assert_eq!(status(&out), 0, "{name}: {}", stderr(&out));
        let out = attnc(&["run", p(&src), "--random", "1"]);
        assert_eq!(status(&out), 1, "{name}: running a file without kernels");
    }
}

#[test]
fn invalid_utf8_is_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "bin.attn", b"kernel f\xff\xfe(");
    let out = attnc(&["check", p(&src)]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("bin.attn:1:"), "{}", stderr(&out));
}

#[test]
fn explain_prints_ir_and_dot() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "explain",
        p(&file),
        "--shape",
        "h=2,n=8,d=4",
        "--emit",
        "ir",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("softmax"), "{}", stdout(&out));
    let out = attnc(&[
        "explain",
        p(&file),
        "--shape",
        "h=2,n=8,d=4",
        "--emit",
        "dot",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.matches("digraph").count(),
        2,
        "before and after: {text}"
    );
    assert!(text.starts_with("// local as written\ndigraph"), "{text}");
}

#[test]
fn explain_emits_clif_for_bound_shapes_and_explains_why_not_otherwise() {
    let file = examples_dir().join("local.attn");
    let args = [
        "explain",
        p(&file),
        "--shape",
        "h=2,n=8,d=4",
        "--emit",
        "clif",
    ];
    // On the portable tier the fused attention is Cranelift code...
    let out = common::attnc_with_env(&args, &[("ATTNC_TIERS", "cranelift")]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("function"), "{}", stdout(&out));
    // ...on a full-width tier, ahead-of-time code the listing names.
    let out = common::attnc_with_env(&args, &[("ATTNC_TIERS", "avx512")]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("function") || stdout(&out).contains("ahead-of-time"),
        "{}",
        stdout(&out)
    );
    let out = attnc(&["explain", p(&file), "--emit", "clif"]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("--shape"), "{}", stderr(&out));
}

#[test]
fn jit_is_the_default_engine_and_agrees_with_the_interpreter() {
    for file in random_example_files() {
        let run = |engine: &str| {
            let out = attnc(&[
                "run",
                p(&file),
                "--engine",
                engine,
                "--random",
                "4",
                "--shape",
                SMALL,
                "--format",
                "json",
            ]);
            assert_eq!(status(&out), 0, "{}: {}", file.display(), stderr(&out));
            json(&out)
        };
        let jit = run("jit");
        let interp = run("interp");
        assert_eq!(jit["engine"], "jit");
        let (x, y) = (
            jit["values"].as_array().unwrap(),
            interp["values"].as_array().unwrap(),
        );
        let (mut num, mut den) = (0.0, 0.0);
        for (a, b) in x.iter().zip(y) {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            num += (a - b) * (a - b);
            den += b * b;
        }
        // f16 outputs carry their own rounding; everything else is f32 against f64. An
        // all-zero reference (every gate of gated_heads.attn closed) must be met exactly.
        let tol = if jit["dtype"] == "f16" { 1e-3 } else { 1e-5 };
        let err = if den == 0.0 { num } else { (num / den).sqrt() };
        assert!(err <= tol, "{}: relative error {err}", file.display());
    }
}

#[test]
fn verify_reports_the_error_against_the_interpreter() {
    let file = examples_dir().join("bigbird.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "2",
        "--shape",
        "h=2,n=77,d=9",
        "--verify",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let err = doc["verify"]["relative_l2_error"]
        .as_f64()
        .expect("error reported");
    assert!(err <= 1e-5, "relative error {err}");
    assert_eq!(doc["verify"]["nan_mismatches"], 0);
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "2",
        "--shape",
        "h=1,n=5,d=3",
        "--verify",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("verify: relative L2 error"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn explain_shows_the_optimizer_trace() {
    let file = examples_dir().join("linear.attn");
    let out = attnc(&["explain", p(&file), "--shape", "h=2,n=64,d=8"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    for expected in ["== optimizer ==", "matmul-assoc", "sum-matmul", "== plan"] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    let out = attnc(&[
        "explain",
        p(&file),
        "--shape",
        "h=2,n=64,d=8",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(json(&out)["trace"]["derivation"].is_array());
}

#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let file = examples_dir().join("gated.attn");
    // Far more than a pipe buffer of CLIF, read one byte of it and hang up.
    let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .env("ATTNC_CEILINGS", "default")
        .args([
            "explain",
            p(&file),
            "--shape",
            "n=64,e=32,d=16",
            "--emit",
            "clif",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("attnc starts");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("some output");
    drop(stdout);
    let out = child.wait_with_output().expect("attnc exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn full_stdout_is_exit_1_with_a_message() {
    let file = std::fs::File::create("/dev/full");
    let Ok(full) = file else {
        eprintln!("skipped: /dev/full is not available");
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attnc"))
        .env("ATTNC_CEILINGS", "default")
        .args(["check", p(&examples_dir().join("local.attn"))])
        .stdout(full)
        .output()
        .expect("attnc runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write to stdout"));
}

#[test]
fn pattern_sizes_come_from_shape_and_scalar_parameters_run() {
    let file = examples_dir().join("window_param.attn");
    let out = attnc(&["run", p(&file), "--random", "1", "--shape", "h=2,n=9,d=4"]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--shape w=<size>"),
        "{}",
        stderr(&out)
    );
    // A scalar parameter read from a 0-d .npy.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = "kernel f(x: f32[n], s: f32[]) -> f32[n] { return x * s; }\n";
    let kernel = write(dir.path(), "s.attn", src);
    let out = attnc(&["check", p(&kernel)]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("s: f32[]"), "{}", stdout(&out));
    let scalar = dir.path().join("s.npy");
    let xs = dir.path().join("x.npy");
    let tensor = attnc::io::Tensor::from_f32(vec![], vec![2.5]).expect("a scalar");
    attnc::io::write_npy(&scalar, &tensor).expect("written");
    let tensor = attnc::io::Tensor::from_f32(vec![3], vec![1.0, 2.0, -4.0]).expect("a vector");
    attnc::io::write_npy(&xs, &tensor).expect("written");
    let (s_arg, x_arg) = (format!("s={}", p(&scalar)), format!("x={}", p(&xs)));
    for engine in ["jit", "interp"] {
        let out = attnc(&[
            "run",
            p(&kernel),
            "--input",
            &s_arg,
            "--input",
            &x_arg,
            "--engine",
            engine,
            "--format",
            "json",
        ]);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        let doc = json(&out);
        assert_eq!(
            doc["values"],
            serde_json::json!([2.5, 5.0, -10.0]),
            "{engine}"
        );
    }
}
