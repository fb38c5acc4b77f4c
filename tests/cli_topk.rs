//! `topk_blocks(g, k, b)` masks on the command line: the example (a gate of pooled queries and
//! keys) on the JIT against the interpreter, a gate from a `.npy` file, and every misuse an
//! exit 1 that names the input and dimension or the file, line and column.

mod common;

use attnc::io::{encode_npy, Tensor, TensorData};
use common::*;
use std::path::{Path, PathBuf};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `args` on both engines and compares them (without AVX-512 the JIT runs the portable
/// tier).
fn agree(args: &[&str]) {
    let run = |engine: &str| {
        let mut all = args.to_vec();
        all.extend(["--engine", engine, "--format", "json"]);
        attnc(&all)
    };
    let interp = run("interp");
    assert_eq!(status(&interp), 0, "{args:?}: {}", stderr(&interp));
    let jit = run("jit");
    assert_eq!(status(&jit), 0, "{args:?}: {}", stderr(&jit));
    let (a, b) = (json(&jit), json(&interp));
    assert_eq!(a["shape"], b["shape"]);
    let (x, y) = (
        a["values"].as_array().expect("values"),
        b["values"].as_array().expect("values"),
    );
    assert_eq!(x.len(), y.len());
    for (x, y) in x.iter().zip(y) {
        let (x, y) = (x.as_f64().expect("number"), y.as_f64().expect("number"));
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

fn gate_npy(dir: &Path, shape: &[usize], values: Vec<f32>) -> PathBuf {
    let t = Tensor::new(shape.to_vec(), TensorData::F32(values)).expect("tensor");
    write(dir, "g.npy", encode_npy(&t).expect("encodes"))
}

const WITH_GATE: &str =
    "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], g: f32[h, r, c]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), (topk_blocks(g, 2, 4) | block(4)) & causal)) @ v;
}
";

#[test]
fn the_example_runs_on_both_engines() {
    let file = examples_dir().join("topk_blocks.attn");
    // n = 200 is not a multiple of the block (64): four blocks, the last one short.
    agree(&["run", p(&file), "--random", "3", "--shape", "h=2,n=200,d=8"]);
}

#[test]
fn a_gate_from_a_file_with_ties_and_nan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "gate.attn", WITH_GATE);
    // n = 13 keys in blocks of 4: a 4 × 4 gate per head.
    let values: Vec<f32> = (0..32)
        .map(|e| match e % 5 {
            0 => f32::NAN,
            1 | 2 => 1.0,
            _ => (e % 7) as f32,
        })
        .collect();
    let g = gate_npy(dir.path(), &[2, 4, 4], values);
    let input = format!("g={}", p(&g));
    agree(&[
        "run",
        p(&src),
        "--random",
        "5",
        "--shape",
        "h=2,n=13,d=3",
        "--input",
        &input,
    ]);
}

#[test]
fn misuse_is_an_error_naming_the_input_or_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "gate.attn", WITH_GATE);
    let g = gate_npy(dir.path(), &[2, 3, 4], vec![0.0; 24]);
    let input = format!("g={}", p(&g));
    for engine in ["interp", "jit"] {
        let out = attnc(&[
            "run",
            p(&src),
            "--random",
            "1",
            "--shape",
            "h=2,n=13,d=3",
            "--input",
            &input,
            "--engine",
            engine,
        ]);
        assert_eq!(status(&out), 1, "{engine}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("input `g` axis 1 has size 3") && err.contains("over 13 queries"),
            "{engine}: {err}"
        );
    }
    let cases = [
        (
            "zero.attn",
            "kernel k(x: f32[8, 8], g: f32[4, 4]) -> f32[8, 8] {\n    return mask(x, topk_blocks(g, 1, 0));\n}\n",
            "zero.attn:2:38",
            "block size",
        ),
        (
            "shape.attn",
            "kernel k(x: f32[8, 8], g: f32[4, 3]) -> f32[8, 8] {\n    return mask(x, topk_blocks(g, 1, 2));\n}\n",
            "shape.attn:2:32",
            "dimension 1 of the gate `g`",
        ),
        (
            "ids.attn",
            "kernel k(x: f32[8, 8], g: i32[4, 4]) -> f32[8, 8] {\n    return mask(x, topk_blocks(g, 1, 2));\n}\n",
            "ids.attn:2:32",
            "float gate",
        ),
        (
            "name.attn",
            "kernel k(x: f32[8, 8]) -> f32[8, 8] {\n    return mask(x, topk_blocks(g, 1, 2));\n}\n",
            "name.attn:2:32",
            "`g`",
        ),
    ];
    for (name, text, at, want) in cases {
        let file = write(dir.path(), name, text);
        let out = attnc(&["check", p(&file)]);
        assert_eq!(status(&out), 1, "{name}");
        let err = stderr(&out);
        assert!(err.contains(at) && err.contains(want), "{name}: {err}");
    }
}
