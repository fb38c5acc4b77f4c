//! The memory budget: a plan whose buffers cannot fit is refused before anything is
//! allocated — exit 1, a message naming the largest buffer, well under a second — and the
//! fused forms' plans stay O(n·d) at lengths where the plain form needs gigabytes.

mod common;

use common::{attnc, json, status, stderr};
use std::time::Instant;

/// A program that must materialize its n × n result.
const SCORES: &str = "kernel scores(q: f32[n, d], k: f32[n, d]) -> f32[n, n] {
    return softmax(q @ k.T);
}";

fn source(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("p.attn");
    std::fs::write(&path, text).expect("writes the source");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn a_plan_past_the_memory_limit_is_refused_quickly_naming_its_largest_buffer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = source(&dir, SCORES);
    let args = [
        "run",
        file.as_str(),
        "--random",
        "0",
        "--shape",
        "n=65536,d=8",
        "--memory-limit",
        "1G",
    ];
    let start = Instant::now();
    let out = attnc(&args);
    let elapsed = start.elapsed();
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("16.0 GiB"), "{message}");
    assert!(message.contains("largest buffer"), "{message}");
    assert!(message.contains("--memory-limit"), "{message}");
    assert!(elapsed.as_secs_f64() < 1.0, "refused after {elapsed:?}");
    let mut with_json = args.to_vec();
    with_json.extend(["--format", "json"]);
    let out = attnc(&with_json);
    assert_eq!(status(&out), 1);
    let doc = json(&out);
    assert_eq!(doc["ok"], false);
    assert!(doc["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("largest buffer")));
}

#[test]
fn fused_forms_fit_a_small_budget_at_long_lengths() {
    // At n = 32,768 the plain forms need 4 GiB per head for the scores; the fused plans need
    // megabytes. The budget is checked at compile time, so `explain` shows the refusal or
    // the plan without running anything.
    for example in [
        "scaled_values",
        "rms_query",
        "latent_values",
        "linear_eps",
        "differential",
        "rope",
        "gated",
        "retention",
        "gated_decay",
    ] {
        let file = common::examples_dir().join(format!("{example}.attn"));
        let out = attnc(&[
            "explain",
            file.to_str().expect("utf-8 path"),
            "--shape",
            "h=2,n=32768,d=32,r=32,e=32",
            "--memory-limit",
            "64M",
            "--format",
            "json",
        ]);
        assert_eq!(status(&out), 0, "{example}: {}", stderr(&out));
        let plan = json(&out)["plan"].as_str().unwrap_or_default().to_string();
        assert!(
            ["fused attention", "prefix state", "chunks of "]
                .iter()
                .any(|form| plan.contains(form)),
            "{example} is not fused:\n{plan}"
        );
    }
}

#[test]
fn the_interpreter_is_refused_when_its_f64_values_cannot_fit() {
    let file = common::examples_dir().join("local.attn");
    let file = file.to_str().expect("utf-8 path");
    let shape = ["--random", "0", "--shape", "h=2,n=4096,d=16"];
    for extra in [&["--engine", "interp"][..], &["--verify"][..]] {
        let mut args = vec!["run", file];
        args.extend(shape);
        args.extend(extra);
        args.extend(["--memory-limit", "64M"]);
        let start = Instant::now();
        let out = attnc(&args);
        assert_eq!(status(&out), 1, "{extra:?}: {}", stderr(&out));
        let message = stderr(&out);
        assert!(message.contains("the interpreter needs"), "{message}");
        assert!(message.contains("--memory-limit"), "{message}");
        assert!(
            start.elapsed().as_secs_f64() < 2.0,
            "{extra:?} was not refused up front"
        );
    }
}

#[test]
fn random_inputs_past_the_memory_limit_are_refused_before_they_are_drawn() {
    let file = common::examples_dir().join("local.attn");
    let start = Instant::now();
    let out = attnc(&[
        "run",
        file.to_str().expect("utf-8 path"),
        "--random",
        "0",
        "--shape",
        "h=4096,n=65536,d=64",
        "--memory-limit",
        "1G",
    ]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("--random would draw"), "{message}");
    assert!(start.elapsed().as_secs_f64() < 1.0);
}
