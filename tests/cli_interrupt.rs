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
