//! QUALITY.md item 15: Ctrl-C during a long run exits promptly and leaves no partial file.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ctrl_c_during_a_long_run_exits_130_without_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("out.npy");
    let file = common::examples_dir().join("local.attn");
    // The interpreter on this shape runs for many seconds: long enough to be interrupted.
    let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .env("ATTNC_CEILINGS", "default")
        .args([
            "run",
            file.to_str().expect("utf-8 path"),
            "--engine",
            "interp",
        ])
        .args(["--random", "0", "--shape", "h=8,n=2048,d=64", "--output"])
        .arg(&out_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("attnc starts");
    std::thread::sleep(Duration::from_millis(400));
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = child.wait().expect("attnc exits");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!out_path.exists(), "no output file after an interrupt");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("tempdir readable")
        .collect();
    assert!(leftovers.is_empty(), "no temporary files: {leftovers:?}");
}

/// Sends SIGINT to `child` after `delay` and returns its exit status and how long it took to
/// exit after the signal.
fn interrupt_after(child: &mut std::process::Child, delay: Duration) -> (Option<i32>, Duration) {
    std::thread::sleep(delay);
    assert!(
        child.try_wait().expect("attnc is waitable").is_none(),
        "attnc finished before the interrupt: the workload is too small"
    );
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = child.wait().expect("attnc exits");
    (status.code(), sent.elapsed())
}

#[test]
fn ctrl_c_during_a_long_compile_exits_130_without_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Thousands of dependent statements: parsing takes milliseconds, optimizing and generating
    // code for them takes seconds. Each has its own constant, so no two steps share their
    // generated function.
    let mut src = String::from("kernel big(x: f32[n, d], w: f32[d, d]) -> f32[n, d] {\n");
    for i in 0..4000 {
        let c = 0.5 + f64::from(i) / 8192.0;
        src.push_str(&format!("    let x = tanh(x @ w) + x * {c};\n"));
    }
    src.push_str("    return x;\n}\n");
    let file = common::write(dir.path(), "big.attn", src);
    let out_path = dir.path().join("out.npy");
    let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .arg("run")
        .arg(&file)
        .args(["--random", "0", "--shape", "n=4,d=4", "--output"])
        .arg(&out_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("attnc starts");
    let (code, took) = interrupt_after(&mut child, Duration::from_millis(300));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(code, Some(130));
    assert!(!out_path.exists(), "no output file after an interrupt");
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("tempdir readable")
        .map(|e| e.expect("entry").file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["big.attn"], "no temporary files");
}

#[test]
fn ctrl_c_during_a_long_benchmark_exits_130_without_a_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join("plot.svg");
    let file = common::examples_dir().join("local.attn");
    // The naive baseline and the interpreter at these sizes run for many seconds.
    let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .arg("bench")
        .arg(&file)
        .args([
            "--shape",
            "h=8,d=64",
            "--sweep",
            "n=1024,2048,4096",
            "--plot",
        ])
        .arg(&plot)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("attnc starts");
    let (code, took) = interrupt_after(&mut child, Duration::from_millis(500));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(code, Some(130));
    assert!(!plot.exists(), "no plot after an interrupt");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("tempdir readable")
        .collect();
    assert!(left.is_empty(), "no temporary files: {left:?}");
}

#[test]
fn sigterm_under_json_prints_one_error_document_and_exits_130() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("out.npy");
    let file = common::examples_dir().join("local.attn");
    let child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .env("ATTNC_CEILINGS", "default")
        .args([
            "run",
            file.to_str().expect("utf-8 path"),
            "--engine",
            "interp",
            "--format",
            "json",
        ])
        .args(["--random", "0", "--shape", "h=8,n=2048,d=64", "--output"])
        .arg(&out_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("attnc starts");
    std::thread::sleep(Duration::from_millis(400));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let out = child.wait_with_output().expect("attnc exits");
    assert_eq!(out.status.code(), Some(130), "{:?}", out.status);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["error"]["kind"], "interrupted");
    assert!(!out_path.exists(), "no output file after SIGTERM");
}

#[test]
fn sigterm_or_sighup_at_any_moment_leaves_the_complete_output_or_none() {
    // A 64 MiB output: the signal lands before, during or after its write depending on the
    // delay. Whatever the moment, exit 0 comes with the complete file, exit 130 with none, and
    // no temporary file is ever left.
    let file = common::examples_dir().join("local.attn");
    let expected_len = 8 * 32768 * 64 * 4;
    for (round, delay_ms) in [200u64, 500, 800, 1100, 1400, 1700, 2000, 2600]
        .into_iter()
        .enumerate()
    {
        let signal = if round % 2 == 0 { "-TERM" } else { "-HUP" };
        let dir = tempfile::tempdir().expect("tempdir");
        let out_path = dir.path().join("out.npy");
        let child = Command::new(env!("CARGO_BIN_EXE_attnc"))
            .env("ATTNC_CEILINGS", "default")
            .arg("run")
            .arg(&file)
            .args(["--random", "0", "--shape", "h=8,n=32768,d=64", "--output"])
            .arg(&out_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("attnc starts");
        std::thread::sleep(Duration::from_millis(delay_ms));
        // The process may have finished: then `kill` fails and the run must be complete.
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let status = child.wait_with_output().expect("attnc exits").status;
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("tempdir readable")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        match status.code() {
            Some(0) => {
                assert_eq!(names, ["out.npy"], "{signal} at {delay_ms} ms");
                let len = std::fs::metadata(&out_path).expect("output").len();
                assert!(len > expected_len, "{signal} at {delay_ms} ms: {len} bytes");
            }
            Some(130) => assert!(names.is_empty(), "{signal} at {delay_ms} ms: {names:?}"),
            other => panic!("{signal} at {delay_ms} ms: exit {other:?}"),
        }
    }
}
