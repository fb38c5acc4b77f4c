//! QUALITY.md item 8 for `run --output`: a full disk and an unwritable directory end in exit
//! status 1 naming the path, a JSON error with `--format json`, and no file left behind.

mod common;

use common::*;
use std::path::Path;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `attnc run` of a tiny kernel writing `output`, as JSON.
fn run_to(output: &Path) -> std::process::Output {
    let file = examples_dir().join("local.attn");
    attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        "h=1,n=3,d=2",
        "--output",
        p(output),
        "--format",
        "json",
    ])
}

#[test]
fn output_to_dev_full_is_a_json_output_error() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        eprintln!("note: no /dev/full on this system; skipped");
        return;
    }
    let out = run_to(full);
    assert_eq!(status(&out), 1, "{}", stdout(&out));
    let doc = json(&out);
    assert_eq!(doc["error"]["kind"], "output", "{doc}");
    assert!(doc["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("/dev/full")));
}

#[cfg(unix)]
#[test]
fn output_into_an_unwritable_directory_is_exit_1_and_leaves_nothing() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let Some(dir) = unwritable_dir(scratch.path()) else {
        eprintln!("note: no unwritable directory available; skipped");
        return;
    };
    let before = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let target = dir.join("out.npy");
    let out = run_to(&target);
    assert_eq!(status(&out), 1, "{}", stdout(&out));
    let doc = json(&out);
    assert_eq!(doc["error"]["kind"], "output", "{doc}");
    assert!(doc["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains(p(&target))));
    assert!(!target.exists());
    let after = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(before, after, "nothing left behind");
}
