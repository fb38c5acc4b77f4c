//! `attnc run` on a kernel returning several values: `--output` once per output in order
//! (a count mismatch is exit 2 and writes nothing), every output in the text and JSON
//! reports, `--verify` per output, and `attnc grad` taking one `--cotangent` per output.

mod common;

use common::*;

const SHAPE: &str = "h=2,m=5,n=9,d=4";

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn repeated_output_writes_each_value_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("lse.attn");
    let (o, l) = (dir.path().join("o.npy"), dir.path().join("lse.npy"));
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "3",
        "--shape",
        SHAPE,
        "--verify",
        "--output",
        p(&o),
        "--output",
        p(&l),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("output 1: f32[2, 5, 1]"), "{text}");
    assert!(
        text.contains("verify (output 0)") && text.contains("verify (output 1)"),
        "{text}"
    );
    assert_eq!(attnc::io::read_npy(&o).expect("o").shape, vec![2, 5, 4]);
    let lse = attnc::io::read_npy(&l).expect("lse");
    assert_eq!(lse.shape, vec![2, 5, 1]);
    // m = 5 < n = 9, causal end-aligned: every row keeps keys, so every LSE is finite.
    assert!(lse.to_f32_vec().iter().all(|x| x.is_finite()));
}

#[test]
fn jit_and_interpreter_write_the_same_lse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("lse.attn");
    let mut lse = Vec::new();
    for engine in ["jit", "interp"] {
        let (o, l) = (
            dir.path().join("o.npy"),
            dir.path().join(format!("{engine}.npy")),
        );
        let out = attnc(&[
            "run",
            p(&file),
            "--engine",
            engine,
            "--random",
            "4",
            "--shape",
            SHAPE,
            "--output",
            p(&o),
            "--output",
            p(&l),
        ]);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        lse.push(attnc::io::read_npy(&l).expect("lse").to_f32_vec());
    }
    for (a, b) in lse[0].iter().zip(&lse[1]) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn an_output_count_mismatch_is_exit_2_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("lse.attn");
    let o = dir.path().join("o.npy");
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "1",
        "--shape",
        SHAPE,
        "--output",
        p(&o),
    ]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("returns 2 values but --output was given 1 time"));
    assert!(!o.exists());
    let single = examples_dir().join("local.attn");
    let out = attnc(&[
        "run",
        p(&single),
        "--random",
        "1",
        "--shape",
        "h=1,n=4,d=3",
        "--output",
        p(&o),
        "--output",
        p(&o),
    ]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(!o.exists());
}

#[test]
fn json_lists_every_output_with_its_verification() {
    let file = examples_dir().join("lse.attn");
    let out = attnc(&[
        "run",
        p(&file),
        "--random",
        "2",
        "--shape",
        SHAPE,
        "--verify",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let outputs = doc["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[1]["shape"], serde_json::json!([2, 5, 1]));
    assert_eq!(outputs[1]["verify"]["passed"], true);
    assert_eq!(doc["verify"]["passed"], true);
}

#[test]
fn grad_of_several_outputs_takes_one_cotangent_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("lse.attn");
    let grad = |extra: &[&str]| {
        let mut args = vec![
            "grad",
            p(&file),
            "--wrt",
            "q,k",
            "--random",
            "1",
            "--shape",
            SHAPE,
            "--output-dir",
            p(dir.path()),
        ];
        args.extend_from_slice(extra);
        attnc(&args)
    };
    // Ones for both outputs, checked against the interpreter.
    let out = grad(&["--verify"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).matches("cotangent: ones").count(),
        2,
        "{}",
        stdout(&out)
    );
    // One cotangent per output, in order: dq saved above is not the lse's shape.
    let dq = dir.path().join("q.npy");
    let out = grad(&["--cotangent", p(&dq)]);
    assert_eq!(status(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("returns 2 values but --cotangent was given 1 time"),
        "{}",
        stderr(&out)
    );
    let out = grad(&["--cotangent", p(&dq), "--cotangent", p(&dq)]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("output 1 of kernel"),
        "{}",
        stderr(&out)
    );
}
