//! `attnc grad` and `attnc explain --grad` end to end: gradients written as `DIR/<param>.npy`,
//! `--verify` against the interpreter, `--cotangent`, `--format json`, the engines, and the
//! errors (exit 1 for the program or inputs, 2 for misuse).

mod common;

use common::*;

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn every_example_differentiates_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in random_example_files() {
        let src = std::fs::read_to_string(&file).expect("readable");
        let module = attnc::source::compile_text(&src).expect("checks");
        let names: Vec<&str> = module.kernels[0]
            .params
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        let out_dir = dir.path().join(file.file_stem().expect("stem"));
        let out = attnc(&[
            "grad",
            p(&file),
            "--wrt",
            &names.join(","),
            "--random",
            "2",
            "--shape",
            "h=2,n=33,d=5,m=7,r=4,e=6,w=4,p=5",
            "--output-dir",
            p(&out_dir),
            "--verify",
            "--format",
            "json",
        ]);
        // An op whose gradient is not derived would be refused with exit 1, never a panic.
        if status(&out) == 1 && stdout(&out).contains("cannot differentiate") {
            eprintln!("skipped {}: {}", file.display(), stdout(&out).trim());
            continue;
        }
        assert_eq!(status(&out), 0, "{}: {}", file.display(), stderr(&out));
        let doc = json(&out);
        assert_eq!(doc["ok"], true, "{}", file.display());
        assert_eq!(doc["verify"]["passed"], true);
        for name in &names {
            let written = attnc::io::read_npy(&out_dir.join(format!("{name}.npy"))).expect("npy");
            assert_eq!(written.dtype_name(), "f32");
        }
    }
}

#[test]
fn gradients_match_between_engines_and_take_a_cotangent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "k.attn",
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            return softmax(mask(q @ k.T / sqrt(d), causal & window(5))) @ v;
        }",
    );
    // A cotangent of the output's shape, written by `run` from another kernel.
    let cot_src = write(
        dir.path(),
        "c.attn",
        "kernel c(x: f32[h, n, d]) -> f32[h, n, d] { return x * 0.5; }",
    );
    let cot = dir.path().join("cot.npy");
    let out = attnc(&[
        "run",
        p(&cot_src),
        "--random",
        "4",
        "--shape",
        "h=2,n=20,d=3",
        "--output",
        p(&cot),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let mut results = Vec::new();
    for engine in ["jit", "interp"] {
        let out_dir = dir.path().join(engine);
        let out = attnc(&[
            "grad",
            p(&src),
            "--wrt",
            "k,q",
            "--random",
            "1",
            "--shape",
            "h=2,n=20,d=3",
            "--cotangent",
            p(&cot),
            "--output-dir",
            p(&out_dir),
            "--engine",
            engine,
        ]);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        assert!(stdout(&out).contains("dk [2, 20, 3]"), "{}", stdout(&out));
        let k = attnc::io::read_npy(&out_dir.join("k.npy")).expect("k.npy");
        results.push(k.to_f64_vec());
    }
    let c = attnc::ir::compare::compare(results[0].clone(), results[1].clone());
    assert!(c.error() <= 1e-5, "jit vs interp: {:e}", c.error());

    // A cotangent of another shape is the input's fault.
    let out = attnc(&[
        "grad",
        p(&src),
        "--wrt",
        "q",
        "--random",
        "1",
        "--shape",
        "h=2,n=21,d=3",
        "--cotangent",
        p(&cot),
        "--output-dir",
        p(&dir.path().join("x")),
    ]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("--cotangent"), "{}", stderr(&out));
}

#[test]
fn errors_exit_1_for_the_program_and_2_for_misuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("local.attn");
    let out_dir = dir.path().join("g");
    let run = |extra: &[&str]| {
        let mut args = vec!["grad", p(&file), "--random", "0", "--shape", "h=1,n=8,d=4"];
        args.extend_from_slice(extra);
        attnc(&args)
    };
    // An unknown parameter names the kernel's parameters.
    let out = run(&["--wrt", "q,x", "--output-dir", p(&out_dir)]);
    assert_eq!(status(&out), 1);
    assert!(
        stderr(&out).contains("parameters: q, k, v"),
        "{}",
        stderr(&out)
    );
    // A repeated or empty list, a missing --wrt or --output-dir: misuse.
    assert_eq!(
        status(&run(&["--wrt", "q,q", "--output-dir", p(&out_dir)])),
        2
    );
    assert_eq!(
        status(&run(&["--wrt", ",", "--output-dir", p(&out_dir)])),
        2
    );
    assert_eq!(status(&run(&["--output-dir", p(&out_dir)])), 2);
    assert_eq!(status(&run(&["--wrt", "q"])), 2);
    // The output directory is a file: nothing is written.
    let not_dir = write(dir.path(), "file", "x");
    let out = run(&["--wrt", "q", "--output-dir", p(&not_dir)]);
    assert_eq!(status(&out), 1);
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
    // Errors come as one JSON document under --format json.
    let out = run(&[
        "--wrt",
        "zz",
        "--output-dir",
        p(&out_dir),
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 1);
    assert_eq!(json(&out)["ok"], false);
    assert!(!out_dir.exists(), "no output directory after failures");
}

#[test]
fn explain_shows_the_backward_graph_and_its_derivation() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "explain",
        p(&file),
        "--grad",
        "q,k,v",
        "--shape",
        "h=2,n=300,d=16",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "mask-attention-fuse",
        "vjp-attention",
        "FlashAttention-2",
        "attention-grad",
        "attention backward",
        "dq = %",
    ] {
        assert!(text.contains(expected), "missing `{expected}`:\n{text}");
    }
    // Unbound shapes: the gradients of the kernel as written, without a plan.
    let out = attnc(&["explain", p(&file), "--grad", "q"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("vjp-softmax"), "{}", stdout(&out));
    let out = attnc(&[
        "explain",
        p(&file),
        "--grad",
        "q",
        "--shape",
        "h=1,n=8,d=4",
        "--emit",
        "ir",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert!(json(&out)["ir"]
        .as_str()
        .expect("ir text")
        .contains("attention-grad"));
}

#[test]
fn npy_inputs_give_gradients_that_match_central_differences() {
    // A biased, masked kernel with m != n and a broadcast slope: the JIT's gradients from .npy
    // inputs, as directional derivatives, against central differences of the f64 interpreter.
    let dir = tempfile::tempdir().expect("tempdir");
    let src_text = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, m, d] {
        let s = q @ k.T / sqrt(d) + slope * relpos(m, n);
        return softmax(mask(s, causal & window(6))) @ v;
    }";
    let src = write(dir.path(), "k.attn", src_text);
    let shapes: [(&str, Vec<usize>); 5] = [
        ("q", vec![2, 5, 3]),
        ("k", vec![2, 11, 3]),
        ("v", vec![2, 11, 3]),
        ("slope", vec![2, 1, 1]),
        ("cot", vec![2, 5, 3]),
    ];
    let mut tensors = Vec::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let len = shape.iter().product();
        let data = attnc::io::standard_normal(9, i as u64, len);
        let t = attnc::io::Tensor::from_f32(shape.clone(), data).expect("shape");
        attnc::io::write_npy(&dir.path().join(format!("{name}.npy")), &t).expect("writes");
        tensors.push(t);
    }
    let out_dir = dir.path().join("grads");
    let input = |n: &str| format!("{n}={}", p(&dir.path().join(format!("{n}.npy"))));
    let (iq, ik, iv, is) = (input("q"), input("k"), input("v"), input("slope"));
    let out = attnc(&[
        "grad",
        p(&src),
        "--wrt",
        "slope,q,k,v",
        "--input",
        &iq,
        "--input",
        &ik,
        "--input",
        &iv,
        "--input",
        &is,
        "--cotangent",
        p(&dir.path().join("cot.npy")),
        "--output-dir",
        p(&out_dir),
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));

    let module = attnc::source::compile_text(src_text).expect("checks");
    let kernel = &module.kernels[0];
    let bindings: attnc::ir::Bindings = [("h", 2), ("m", 5), ("n", 11), ("d", 3)]
        .into_iter()
        .map(|(s, v)| (s.to_string(), v))
        .collect();
    let cot = tensors[4].to_f64_vec();
    let f = |inputs: &[ndarray::ArrayD<f64>]| -> f64 {
        let y = attnc::ir::interp::evaluate(kernel, &bindings, inputs).expect("evaluates");
        y.iter().zip(&cot).map(|(a, b)| a * b).sum()
    };
    let base: Vec<ndarray::ArrayD<f64>> = tensors[..4].iter().map(|t| t.to_f64_array()).collect();
    let eps = 1e-6;
    for (i, name) in ["q", "k", "v", "slope"].iter().enumerate() {
        let grad = attnc::io::read_npy(&out_dir.join(format!("{name}.npy"))).expect("npy");
        let u = attnc::io::standard_normal(77, i as u64, base[i].len());
        let shifted = |sign: f64| {
            let mut x = base.clone();
            for (a, du) in x[i].iter_mut().zip(&u) {
                *a += sign * eps * f64::from(*du);
            }
            f(&x)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
        let analytic: f64 = grad
            .to_f64_vec()
            .iter()
            .zip(&u)
            .map(|(g, du)| g * f64::from(*du))
            .sum();
        assert!(
            (analytic - numeric).abs() <= 1e-4 * numeric.abs().max(1.0),
            "d{name}: {analytic} vs {numeric}"
        );
    }
}

#[test]
fn a_failed_run_leaves_existing_gradient_files_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("local.attn");
    let out_dir = dir.path().join("g");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let old = write(&out_dir, "q.npy", "not an npy file, kept as it is");
    let cot = write(dir.path(), "cot.npy", "garbage");
    let out = attnc(&[
        "grad",
        p(&file),
        "--wrt",
        "q",
        "--random",
        "0",
        "--shape",
        "h=1,n=8,d=4",
        "--cotangent",
        p(&cot),
        "--output-dir",
        p(&out_dir),
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert_eq!(json(&out)["ok"], false);
    assert_eq!(
        std::fs::read_to_string(&old).expect("kept"),
        "not an npy file, kept as it is"
    );
}
