//! Messages name what the user wrote: the flag (`--calibrate`, not `--input`), the dimension
//! that is too large, negative numbers as refused values; and a first run on a new machine
//! reports the one-time ceiling measurement apart from compile time.

mod common;

use common::{attnc, attnc_with_env, json, status, stderr};

fn local() -> String {
    common::examples_dir()
        .join("local.attn")
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

#[test]
fn calibrate_errors_name_the_calibrate_flag() {
    let file = local();
    let out = attnc(&[
        "run",
        &file,
        "--random",
        "0",
        "--shape",
        "h=1,n=8,d=4",
        "--calibrate",
        "zz=f.npy",
    ]);
    assert_eq!(status(&out), 1);
    let message = stderr(&out);
    assert!(message.contains("--calibrate zz=f.npy"), "{message}");
    assert!(!message.contains("--input"), "{message}");
}

#[test]
fn negative_numbers_are_values_refused_with_the_flag_named() {
    let file = local();
    for (flag, value) in [("--tol", "-1"), ("--random", "-1"), ("--threads", "-1")] {
        let mut args = vec!["run", file.as_str(), "--shape", "h=1,n=8,d=4"];
        if flag != "--random" {
            args.extend(["--random", "0"]);
        }
        args.extend([flag, value]);
        let out = attnc(&args);
        assert_eq!(status(&out), 2, "{flag}");
        let message = stderr(&out);
        assert!(message.contains(flag), "{flag}: {message}");
        assert!(
            !message.contains("unexpected argument"),
            "{flag}: {message}"
        );
    }
}

#[test]
fn an_oversized_shape_names_the_dimension() {
    let file = local();
    let out = attnc(&[
        "run",
        &file,
        "--random",
        "0",
        "--shape",
        "h=1,n=99999999999999,d=64",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 1);
    let message = json(&out)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("the dimension n = 99999999999999 is too large"),
        "{message}"
    );
    assert!(message.contains("[h, n, n]"), "{message}");
}

#[test]
fn an_input_file_larger_than_the_memory_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("q.npy");
    // Sparse: 4 GiB long, no disk used.
    let f = std::fs::File::create(&big).expect("creates");
    f.set_len(4 << 30).expect("sets the length");
    let file = local();
    let arg = format!("q={}", big.display());
    let out = attnc(&[
        "run",
        &file,
        "--input",
        &arg,
        "--random",
        "0",
        "--memory-limit",
        "1G",
    ]);
    assert_eq!(status(&out), 1);
    let message = stderr(&out);
    assert!(message.contains("--input"), "{message}");
    assert!(message.contains("4.0 GiB"), "{message}");
}

#[test]
fn a_first_run_reports_the_ceiling_measurement_apart_from_compile_time() {
    let cache = tempfile::tempdir().expect("tempdir");
    let home = cache.path().to_str().expect("utf-8 path");
    let file = local();
    let args = [
        "run",
        file.as_str(),
        "--random",
        "0",
        "--shape",
        "h=1,n=8,d=4",
        "--format",
        "json",
    ];
    let env = [("ATTNC_CEILINGS", ""), ("XDG_CACHE_HOME", home)];
    let first = attnc_with_env(&args, &env);
    assert_eq!(status(&first), 0, "{}", stderr(&first));
    let doc = json(&first);
    let measured = doc["ceilings_measure_ms"].as_f64().expect("measured now");
    let compile = doc["compile_ms"].as_f64().expect("compiled");
    assert!(measured > 0.0 && compile >= 0.0);
    assert!(
        doc["notes"].to_string().contains("ceilings"),
        "{}",
        doc["notes"]
    );
    // The second run reads the cache: nothing measured, nothing noted.
    let second = attnc_with_env(&args, &env);
    assert_eq!(
        json(&second)["ceilings_measure_ms"],
        serde_json::Value::Null
    );
    let text = attnc_with_env(&args[..6], &env);
    assert_eq!(status(&text), 0);
    assert!(!stderr(&text).contains("measured this machine"));
}

#[test]
fn a_flat_union_of_300_patterns_runs_and_deep_nesting_gets_a_note_that_fits_patterns() {
    // A chain of `|` cannot be split with `let` (patterns have no names), so its length is not
    // nesting: 300 patterns check, run on the JIT and agree with the interpreter.
    let dir = tempfile::tempdir().expect("tempdir");
    let union: Vec<String> = (0..300)
        .map(|k| match k % 3 {
            0 => format!("dilated({}, {})", k % 4, 7 + k % 5),
            1 => format!("block({})", 3 + k % 7),
            _ => format!("global({})", k % 3),
        })
        .collect();
    let src = format!(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {{\n    \
         return softmax(mask(q @ k.T / sqrt(d), causal & ({}))) @ v;\n}}\n",
        union.join(" | ")
    );
    let file = common::write(dir.path(), "union.attn", &src);
    let path = file.to_str().expect("utf-8 path");
    let out = attnc(&["check", path]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let out = attnc(&[
        "run",
        path,
        "--random",
        "3",
        "--shape",
        "h=2,n=70,d=5",
        "--verify",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let err = doc["verify"]["relative_l2_error"]
        .as_f64()
        .expect("verified");
    assert!(err <= 1e-5, "relative error {err}");
    // Genuinely nested patterns still stop at the limit, with a note that does not offer `let`.
    let deep = format!("{}causal{}", "(window(1) | ".repeat(300), ")".repeat(300));
    let src =
        format!("kernel f(s: f32[n, n]) -> f32[n, n] {{ return mask(s, causal & {deep}); }}\n");
    let file = common::write(dir.path(), "deep.attn", &src);
    let out = attnc(&["check", file.to_str().expect("utf-8 path")]);
    assert_eq!(status(&out), 1);
    let message = stderr(&out);
    assert!(
        message.contains("pattern nests deeper than 256 levels"),
        "{message}"
    );
    assert!(message.contains("cannot be named with `let`"), "{message}");
    assert!(!message.contains("split it with `let`"), "{message}");
}
