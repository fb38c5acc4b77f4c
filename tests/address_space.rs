//! Under a 2 GiB address-space limit (`ulimit -v`) and a 10 s timeout, the commands that
//! once aborted on huge shapes (the `--random` draw, the interpreter's and `--verify`'s n × n
//! values, an n × n result) are refused with exit 1 and one JSON error document: the memory
//! budget counts the address space left, so no allocation can fail and abort the process.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `attnc args... --format json` under `ulimit -v 2 GiB`; returns its exit status (None
/// when killed by a signal) and stdout.
fn under_2g(args: &[&str]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
        .args(["--format", "json"])
        .env("ATTNC_CEILINGS", "default")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh starts");
    while child.try_wait().expect("waitable").is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("attnc {args:?} still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn huge_shapes_are_refused_under_a_2g_address_space_never_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scores = common::write(
        dir.path(),
        "scores.attn",
        "kernel s(q: f32[h, n, d], k: f32[h, n, d]) -> f32[h, n, n] {\n    return softmax(q @ k.T);\n}\n",
    );
    let scores = scores.to_str().expect("utf-8");
    let local = common::examples_dir().join("local.attn");
    let local = local.to_str().expect("utf-8");
    let cases: [&[&str]; 6] = [
        &[
            "run",
            local,
            "--random",
            "0",
            "--shape",
            "h=64,n=1000000,d=128",
        ],
        &[
            "run",
            local,
            "--random",
            "0",
            "--shape",
            "h=1,n=65536,d=64",
            "--engine",
            "interp",
        ],
        &[
            "run",
            local,
            "--random",
            "0",
            "--shape",
            "h=1,n=65536,d=64",
            "--verify",
        ],
        &[
            "run",
            scores,
            "--random",
            "0",
            "--shape",
            "h=1,n=200000,d=16",
        ],
        &["bench", scores, "--shape", "h=1,n=200000,d=16"],
        &[
            "run",
            local,
            "--random",
            "0",
            "--shape",
            "h=1,n=99999999999999,d=64",
        ],
    ];
    for args in cases {
        let (code, stdout, took) = under_2g(args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}");
        let doc: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON document ({e}): {stdout}"));
        assert_eq!(doc["ok"], false, "{args:?}");
        assert!(doc["error"]["message"].is_string(), "{args:?}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
    // A run that fits the limit still runs.
    let (code, stdout, _) =
        under_2g(&["run", local, "--random", "0", "--shape", "h=8,n=32768,d=64"]);
    assert_eq!(code, Some(0), "{stdout}");
}
