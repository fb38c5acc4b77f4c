//! `attnc run --format json` reports the fraction of the fused attention work that zero gates
//! skipped (`skipped_fraction`: 0.5 with half the heads gated off, 0 with every gate open,
//! null with the interpreter), and `attnc explain` says which step skips.

mod common;

use common::*;

const SHAPE: &str = "h=8,n=70,d=16";

/// The JSON report of `attnc run examples/gated_heads.attn` with gate file `gate`.
fn report(gate: &str, engine: &str) -> serde_json::Value {
    let file = examples_dir().join("gated_heads.attn");
    let gate = format!(
        "g={}",
        examples_dir().join(gate).to_str().expect("utf-8 path")
    );
    let mut args = vec![
        "run",
        file.to_str().expect("utf-8 path"),
        "--shape",
        SHAPE,
        "--random",
        "2",
        "--input",
        &gate,
        "--engine",
        engine,
        "--format",
        "json",
    ];
    if engine == "jit" {
        args.push("--verify");
    }
    let out = attnc(&args);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    json(&out)
}

#[test]
fn half_the_heads_gated_off_skip_half_the_work() {
    let doc = report("gated_heads_half.npy", "jit");
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["skipped_fraction"], 0.5, "{doc}");
    let open = report("gated_heads_open.npy", "jit");
    assert_eq!(open["skipped_fraction"], 0.0, "{open}");
}

#[test]
fn the_interpreter_reports_no_skipped_work() {
    let doc = report("gated_heads_half.npy", "interp");
    assert!(doc["skipped_fraction"].is_null(), "{doc}");
}

#[test]
fn explain_names_the_gated_step() {
    let file = examples_dir().join("gated_heads.attn");
    let out = attnc(&[
        "explain",
        file.to_str().expect("utf-8 path"),
        "--shape",
        SHAPE,
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("skips query tiles where its gate buf"),
        "{text}"
    );
}
