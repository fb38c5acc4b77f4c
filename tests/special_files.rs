//! Special files wherever attnc reads (QUALITY.md item 16): a source, input or ceilings cache
//! that is `/dev/zero`, a FIFO with no writer or a directory is refused, or for the cache
//! ignored and measured over, promptly — never a hang or an exhausted memory.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs attnc with `args` and `env`, killing it after 10 s (a hang fails the test instead of
/// stalling the suite).
fn attnc_within_10s(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("attnc starts");
    while child.try_wait().expect("waitable").is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("attnc {args:?} still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("output"), start.elapsed())
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
}

#[test]
fn a_source_that_is_dev_zero_a_fifo_or_a_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.attn");
    mkfifo(&fifo);
    let fifo = fifo.to_str().expect("utf-8").to_string();
    let folder = dir.path().to_str().expect("utf-8").to_string();
    for source in ["/dev/zero", fifo.as_str(), folder.as_str()] {
        let (out, _) = attnc_within_10s(&["check", source], &[]);
        assert_eq!(out.status.code(), Some(1), "{source}");
        let message = String::from_utf8_lossy(&out.stderr);
        assert!(message.contains(source), "{source}: {message}");
    }
}

#[test]
fn an_input_that_is_dev_zero_or_a_fifo_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("q.npy");
    mkfifo(&fifo);
    let file = common::examples_dir().join("local.attn");
    let file = file.to_str().expect("utf-8");
    for input in ["q=/dev/zero".to_string(), format!("q={}", fifo.display())] {
        for flag in ["--input", "--calibrate"] {
            let (out, _) = attnc_within_10s(
                &[
                    "run",
                    file,
                    "--random",
                    "0",
                    "--shape",
                    "h=1,n=4,d=4",
                    flag,
                    &input,
                ],
                &[("ATTNC_CEILINGS", "default")],
            );
            assert_eq!(out.status.code(), Some(1), "{flag} {input}");
            let message = String::from_utf8_lossy(&out.stderr);
            assert!(message.contains("not a regular file"), "{message}");
        }
    }
}

#[test]
fn a_ceilings_cache_that_is_a_fifo_or_dev_zero_is_measured_over() {
    let cache = tempfile::tempdir().expect("tempdir");
    let home = cache.path().to_str().expect("utf-8").to_string();
    let file = common::examples_dir().join("local.attn");
    let args = [
        "explain",
        file.to_str().expect("utf-8"),
        "--shape",
        "h=1,n=8,d=4",
    ];
    let env = [("XDG_CACHE_HOME", home.as_str()), ("ATTNC_CEILINGS", "")];
    let (first, _) = attnc_within_10s(&args, &env);
    assert_eq!(first.status.code(), Some(0));
    let entries: Vec<_> = std::fs::read_dir(cache.path().join("attnc"))
        .expect("the cache directory exists")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let cache_file = &entries[0];
    for replace in ["fifo", "dev-zero"] {
        std::fs::remove_file(cache_file).expect("removes");
        match replace {
            "fifo" => mkfifo(cache_file),
            _ => std::os::unix::fs::symlink("/dev/zero", cache_file).expect("links"),
        }
        let (out, took) = attnc_within_10s(&args, &env);
        assert_eq!(out.status.code(), Some(0), "{replace}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("measured on this machine now"),
            "{replace}"
        );
        assert!(took < Duration::from_secs(5), "{replace}: {took:?}");
    }
}
