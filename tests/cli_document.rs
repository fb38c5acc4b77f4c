//! `i32` segment ids and `document(...)` masks on the command line: int32 `.npy` and I32
//! safetensors inputs, the JIT against the interpreter, and every misuse an exit 1 that names
//! the input (and dimension) or the file, line and column.

mod common;

use attnc::io::{encode_npy, Tensor, TensorData};
use common::*;
use std::path::{Path, PathBuf};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn example() -> PathBuf {
    examples_dir().join("document.attn")
}

fn ids_npy(dir: &Path, name: &str, ids: &[i32]) -> PathBuf {
    let t = Tensor::new(vec![ids.len()], TensorData::I32(ids.to_vec())).expect("tensor");
    write(dir, name, encode_npy(&t).expect("encodes"))
}

fn run(args: &[&str]) -> serde_json::Value {
    let out = attnc(args);
    assert_eq!(status(&out), 0, "{args:?}: {}", stderr(&out));
    json(&out)
}

/// Unsorted ids with a single-token document and an id that never repeats.
const IDS: [i32; 13] = [4, 4, 1, 4, 7, 1, 1, 9, 4, 4, 2, 2, 2];

#[test]
fn jit_and_interpreter_agree_on_packed_documents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = ids_npy(dir.path(), "seg.npy", &IDS);
    let input = format!("seg={}", p(&seg));
    let file = example();
    let base = [
        "run",
        p(&file),
        "--random",
        "3",
        "--shape",
        "h=2,d=5",
        "--input",
        &input,
        "--format",
        "json",
    ];
    let mut jit = base.to_vec();
    jit.extend(["--engine", "jit"]);
    let mut interp = base.to_vec();
    interp.extend(["--engine", "interp"]);
    let (a, b) = (run(&jit), run(&interp));
    assert_eq!(a["shape"], serde_json::json!([2, 13, 5]));
    let (x, y) = (
        a["values"].as_array().unwrap(),
        b["values"].as_array().unwrap(),
    );
    assert_eq!(x.len(), y.len());
    for (x, y) in x.iter().zip(y) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn safetensors_i32_binds_segment_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = IDS.iter().flat_map(|x| x.to_le_bytes()).collect();
    let header = format!(
        r#"{{"seg":{{"dtype":"I32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        IDS.len(),
        bytes.len()
    );
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(&bytes);
    let path = write(dir.path(), "seg.safetensors", file);
    let example = example();
    let doc = run(&[
        "run",
        p(&example),
        "--random",
        "3",
        "--shape",
        "h=1,d=4",
        "--input",
        p(&path),
        "--engine",
        "interp",
        "--format",
        "json",
    ]);
    assert_eq!(doc["shape"], serde_json::json!([1, 13, 4]));
}

#[test]
fn misuse_is_an_error_naming_the_input_or_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = example();
    let floats = Tensor::new(vec![4], TensorData::F32(vec![0.0; 4])).expect("tensor");
    let floats = write(dir.path(), "f.npy", encode_npy(&floats).expect("encodes"));
    let short = ids_npy(dir.path(), "short.npy", &[0, 0, 1]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        // float data for an i32 parameter
        (
            vec![
                "--shape".into(),
                "h=1,d=2".into(),
                "--input".into(),
                format!("seg={}", p(&floats)),
            ],
            "input `seg` is i32",
        ),
        // ids of the wrong length: names the input and the dimension
        (
            vec![
                "--shape".into(),
                "h=1,d=2,n=4".into(),
                "--input".into(),
                format!("seg={}", p(&short)),
            ],
            "seg",
        ),
        // --random does not draw segment ids
        (vec!["--shape".into(), "h=1,d=2,n=4".into()], "--input seg="),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = ["run", p(&file), "--random", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = attnc(&refs);
        assert_eq!(status(&out), 1, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let bad = write(
        dir.path(),
        "bad.attn",
        "kernel k(x: f32[n, n], seg: i32[n]) -> f32[n, n] {\n    return x * seg;\n}\n",
    );
    let out = attnc(&["check", p(&bad)]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("bad.attn:2:16"), "{}", stderr(&out));
    let wrong_len = write(
        dir.path(),
        "len.attn",
        "kernel k(x: f32[m, n], seg: i32[m]) -> f32[m, n] {\n    return mask(x, document(seg));\n}\n",
    );
    let out = attnc(&["check", p(&wrong_len)]);
    assert_eq!(status(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains("len.attn:2:29") && err.contains("`seg`"),
        "{err}"
    );
}

/// Gradients through a document mask (unsorted ids, a single-token document, m = n = 13 so
/// tiles are partial; of the output alone and of the output with its row log-sum-exp) and
/// through a top-k block mask, on the tiers this machine has and on
/// the portable tier alone: `attnc grad --verify` compares each with the interpreter's.
#[test]
fn gradients_through_data_dependent_masks_match_the_interpreter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = ids_npy(dir.path(), "seg.npy", &IDS);
    let input = format!("seg={}", p(&seg));
    let out_dir = dir.path().join("grads");
    let document = example();
    let topk = examples_dir().join("topk_blocks.attn");
    // The output and its row log-sum-exp over the documents: both cotangents (ones) reach
    // the fused backward, the log-sum-exp's as D − dlse.
    let with_lse = dir.path().join("document_lse.attn");
    std::fs::write(
        &with_lse,
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) -> (f32[h, n, d], f32[h, n, 1]) {
            let s = mask(q @ k.T / sqrt(d), causal & document(seg));
            return (softmax(s) @ v, logsumexp(s, -1));
        }",
    )
    .expect("writes");
    let cases: [(&Path, &str, Vec<&str>); 3] = [
        (&document, "h=2,d=5", vec!["--input", &input]),
        (&with_lse, "h=2,d=5", vec!["--input", &input]),
        (&topk, "h=2,n=150,d=8", vec![]),
    ];
    for (file, shape, extra) in &cases {
        for tiers in ["all", "cranelift"] {
            let mut args = vec![
                "grad",
                p(file),
                "--wrt",
                "q,k,v",
                "--random",
                "2",
                "--shape",
                shape,
                "--output-dir",
                p(&out_dir),
                "--verify",
                "--format",
                "json",
            ];
            args.extend(extra.iter().copied());
            let out = attnc_with_env(&args, &[("ATTNC_TIERS", tiers)]);
            assert_eq!(status(&out), 0, "{args:?} ({tiers}): {}", stderr(&out));
            let doc = json(&out);
            assert_eq!(doc["verify"]["passed"], true, "{doc}");
            for g in doc["verify"]["gradients"].as_array().expect("gradients") {
                let err = g["relative_l2_error"].as_f64().expect("an error");
                assert!(err <= 1e-5, "{} d{}: {err} ({tiers})", p(file), g["param"]);
            }
        }
    }
}

/// Rows of more than 1,024 keys split the backward into parts of keys, each refining its
/// call's tile table from the ids: gradients through packed documents (one of a single
/// token) match the interpreter, and 1 and 2 threads write the same bytes.
#[test]
fn gradients_through_long_document_rows_split_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids: Vec<i32> = [(0, 700), (1, 1), (2, 599), (3, 800)]
        .iter()
        .flat_map(|&(id, len)| std::iter::repeat_n(id, len))
        .collect();
    let seg = ids_npy(dir.path(), "seg.npy", &ids);
    let input = format!("seg={}", p(&seg));
    let mut written = Vec::new();
    for threads in ["1", "2"] {
        let out_dir = dir.path().join(format!("grads{threads}"));
        let doc = run(&[
            "grad",
            p(&example()),
            "--wrt",
            "q,k,v",
            "--random",
            "3",
            "--shape",
            "h=2,n=2100,d=8",
            "--input",
            &input,
            "--threads",
            threads,
            "--output-dir",
            p(&out_dir),
            "--verify",
            "--format",
            "json",
        ]);
        assert_eq!(doc["verify"]["passed"], true, "{doc}");
        for g in doc["verify"]["gradients"].as_array().expect("gradients") {
            let err = g["relative_l2_error"].as_f64().expect("an error");
            assert!(err <= 1e-5, "d{}: {err} ({threads} threads)", g["param"]);
        }
        let files: Vec<Vec<u8>> = ["q", "k", "v"]
            .iter()
            .map(|name| std::fs::read(out_dir.join(format!("{name}.npy"))).expect("written"))
            .collect();
        written.push(files);
    }
    assert_eq!(
        written[0], written[1],
        "1 and 2 threads wrote different gradients"
    );
}
