//! `--format json` turns every failure into one JSON document on stdout, on every subcommand:
//! source errors (exit 1), input errors (exit 1) and command-line misuse (exit 2).

mod common;

use common::*;

const SUBCOMMANDS: [&str; 4] = ["check", "run", "explain", "bench"];

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `attnc SUB ARGS.. --format json` and returns (status, document).
fn json_failure(sub: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec![sub];
    all.extend(args);
    all.extend(["--format", "json"]);
    let out = attnc(&all);
    let doc = json(&out);
    assert_eq!(doc["ok"], false, "{sub}: {doc}");
    (status(&out), doc)
}

#[test]
fn source_errors_are_json_on_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "broken.attn",
        "kernel f(q: f32[n, d]) -> f32[n, d] {\n    return q @ ;\n}\n",
    );
    for sub in SUBCOMMANDS {
        let (code, doc) = json_failure(sub, &[p(&src)]);
        assert_eq!(code, 1, "{sub}");
        let error = &doc["error"];
        assert_eq!(error["kind"], "source", "{sub}: {doc}");
        assert_eq!(error["file"], p(&src), "{sub}");
        assert_eq!(error["diagnostics"][0]["line"], 2, "{sub}: {doc}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{sub}"
        );
    }
}

#[test]
fn missing_files_are_json_on_every_subcommand() {
    for sub in SUBCOMMANDS {
        let (code, doc) = json_failure(sub, &["/no/such/file.attn"]);
        assert_eq!(code, 1, "{sub}: {doc}");
        assert!(
            doc["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("/no/such/file.attn")),
            "{sub}: {doc}"
        );
    }
}

#[test]
fn usage_errors_are_json_on_every_subcommand() {
    let file = examples_dir().join("local.attn");
    for sub in SUBCOMMANDS {
        let (code, doc) = json_failure(sub, &[p(&file), "--no-such-flag"]);
        assert_eq!(code, 2, "{sub}: {doc}");
        assert_eq!(doc["error"]["kind"], "usage", "{sub}: {doc}");
    }
}

#[test]
fn shape_errors_are_json_on_run_explain_and_bench() {
    let file = examples_dir().join("local.attn");
    for sub in ["run", "explain", "bench"] {
        let (code, doc) = json_failure(sub, &[p(&file), "--shape", "h=1,n=8,d=0", "--random", "1"]);
        assert_eq!(code, 1, "{sub}: {doc}");
        assert!(doc["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}
