//! The cost model's machine ceilings from the command line: measured on the first run, read
//! from the cache afterwards, forced to the defaults by `ATTNC_CEILINGS=default`, and a broken
//! cache is measured over, never an error.

mod common;

use common::{examples_dir, status, stderr, stdout};
use std::path::Path;
use std::process::{Command, Output};

/// `attnc explain local.attn` with the cache under `cache` and `ATTNC_CEILINGS` as given.
fn explain(cache: &Path, mode: Option<&str>, format: &str) -> Output {
    let file = examples_dir().join("local.attn");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attnc"));
    cmd.args(["explain", file.to_str().expect("utf-8 path")])
        .args(["--shape", "h=2,n=64,d=8", "--format", format])
        .env("XDG_CACHE_HOME", cache)
        .env_remove("ATTNC_CEILINGS")
        .stdin(std::process::Stdio::null());
    if let Some(mode) = mode {
        cmd.env("ATTNC_CEILINGS", mode);
    }
    cmd.output().expect("attnc runs")
}

/// The cache files written under `cache`.
fn cache_files(cache: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache.join("attnc"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[test]
fn ceilings_are_measured_once_then_cached() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = explain(dir.path(), None, "text");
    assert_eq!(status(&first), 0, "{}", stderr(&first));
    assert!(
        stdout(&first).contains("measured on this machine now"),
        "{}",
        stdout(&first)
    );
    let files = cache_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let second = explain(dir.path(), None, "json");
    assert_eq!(status(&second), 0, "{}", stderr(&second));
    let doc = common::json(&second);
    assert_eq!(doc["ceilings"]["source"], "cached");
    assert!(doc["ceilings"]["ceilings"]["gflops"]
        .as_f64()
        .is_some_and(|g| g > 0.0));
    assert_eq!(doc["trace"]["ceilings"], doc["ceilings"]["ceilings"]);
}

#[test]
fn the_environment_forces_the_defaults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = explain(dir.path(), Some("default"), "json");
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = common::json(&out);
    assert_eq!(doc["ceilings"]["source"], "default");
    assert_eq!(doc["ceilings"]["ceilings"]["gflops"], 50.0);
    assert!(cache_files(dir.path()).is_empty(), "nothing cached");
}

#[test]
fn a_broken_or_unwritable_cache_is_measured_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A corrupt file in place of the cache directory: reading and writing both fail.
    std::fs::write(dir.path().join("attnc"), "{ not json").expect("written");
    let out = explain(dir.path(), None, "text");
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("measured on this machine now"));
    assert!(!stderr(&out).contains("cache"), "{}", stderr(&out));
}
