//! Helpers shared by the end-to-end tests: run the `attnc` binary, write temporary sources.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the built `attnc` binary with `args`, no standard input and the default ceilings.
pub fn attnc(args: &[&str]) -> Output {
    attnc_with_env(args, &[])
}

/// [`attnc`] with extra environment variables.
pub fn attnc_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attnc"))
        .args(args)
        // Deterministic cost model: the documented ceilings, not this machine's.
        .env("ATTNC_CEILINGS", "default")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the attnc binary runs")
}

/// The exit status, stdout and stderr of one run.
pub fn status(out: &Output) -> i32 {
    out.status
        .code()
        .expect("attnc exited normally, not by a signal")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Parses stdout as one JSON document.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

/// Writes `text` to `name` inside `dir` and returns the path.
pub fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temporary file written");
    path
}

/// The repository's `examples/` directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Every `.attn` example, sorted by name.
pub fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    files
}

/// The examples `--random` can fill: every one but those with `i32` segment-id parameters
/// (which `--random` refuses to draw; `tests/cli_document.rs` runs them with their ids) and
/// those with `topk_blocks` (compiled on the AVX-512 tier only, and piecewise constant in
/// their gate: `tests/cli_topk.rs` runs them).
pub fn random_example_files() -> Vec<PathBuf> {
    example_files()
        .into_iter()
        .filter(|p| {
            !std::fs::read_to_string(p)
                .is_ok_and(|s| s.contains("i32[") || s.contains("topk_blocks("))
        })
        .collect()
}

/// A directory this process cannot create files in: a read-only one, or, for root (who
/// ignores permissions), `/sys` when it refuses new files.
#[cfg(unix)]
pub fn unwritable_dir(scratch: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let ro = scratch.join("ro");
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let refuses = |dir: &Path| std::fs::write(dir.join("probe.svg"), b"").is_err();
    if refuses(&ro) {
        return Some(ro);
    }
    let _ = std::fs::remove_file(ro.join("probe.svg"));
    let sys = Path::new("/sys");
    (sys.is_dir() && refuses(sys)).then(|| sys.to_path_buf())
}
