//! `attnc bench` end to end on a tiny shape: the JSON document has every field, and every
//! time and rate is positive. No timing assertions (the machine is shared).

mod common;

use common::*;

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn bench_json_has_positive_timings() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "bench",
        file.to_str().expect("utf-8 path"),
        "--shape",
        "h=2,n=40,d=8",
        "--threads",
        "2",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["kernel"], "local");
    assert_eq!(doc["runs"], 2);
    positive(&doc["compile_ms"], "compile_ms");
    positive(&doc["flops"], "flops");
    positive(&doc["attended_pairs"], "attended_pairs");
    positive(
        &doc["ceiling"]["gflops_per_thread_1"],
        "ceiling at 1 thread",
    );
    positive(&doc["ceiling"]["gflops_total"], "ceiling total");
    let results = doc["results"].as_array().expect("results is an array");
    let engines: Vec<(&str, u64)> = results
        .iter()
        .map(|r| {
            (
                r["engine"].as_str().expect("engine name"),
                r["threads"].as_u64().expect("thread count"),
            )
        })
        .collect();
    for want in [("jit", 2), ("jit", 1), ("interp", 1), ("naive", 1)] {
        assert!(engines.contains(&want), "{want:?} in {engines:?}");
    }
    for r in results {
        let engine = r["engine"].as_str().unwrap_or("?");
        positive(&r["median_ms"], &format!("{engine} median_ms"));
        positive(&r["min_ms"], &format!("{engine} min_ms"));
        positive(&r["gflops"], &format!("{engine} gflops"));
        positive(&r["pct_of_ceiling"], &format!("{engine} pct_of_ceiling"));
        positive(
            &r["speedup_vs_interp"],
            &format!("{engine} speedup_vs_interp"),
        );
        positive(
            &r["speedup_vs_naive"],
            &format!("{engine} speedup_vs_naive"),
        );
        assert!(r["samples"].as_u64().is_some_and(|s| (1..=2).contains(&s)));
    }
}

#[test]
fn bench_non_attention_kernel_has_no_naive_baseline() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = write(
        dir.path(),
        "mm.attn",
        "kernel mm(a: f32[n, k], b: f32[k, m]) -> f32[n, m] { return a @ b; }\n",
    );
    let out = attnc(&[
        "bench",
        file.to_str().expect("utf-8 path"),
        "--shape",
        "n=8,k=8,m=8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-interp",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["flops_basis"], "matmul");
    assert_eq!(doc["flops"], 2.0 * 8.0 * 8.0 * 8.0);
    assert!(doc["naive"].as_str().is_some_and(|s| s.starts_with("n/a")));
    assert!(doc["interp"]
        .as_str()
        .is_some_and(|s| s.contains("skipped")));
    let results = doc["results"].as_array().expect("results");
    assert!(results.iter().all(|r| r["engine"] == "jit"));
}

#[test]
fn bench_under_an_approximation_times_the_exact_plan_beside_it() {
    let out = attnc(&[
        "bench",
        "benches/kernels/dense.attn",
        "--shape",
        "h=1,n=512,d=64",
        "--approx",
        "int8",
        "--tol",
        "0.05",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-interp",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["policy"], "int8 (tol 0.05)");
    let rows = doc["results"].as_array().expect("results");
    let notes = doc["notes"].to_string();
    // Where no int8 kernel beats the exact one (an AVX-512 CPU without AMX), the optimizer
    // leaves int8 out and bench says so; there is then no second plan to time.
    if notes.contains("int8 not applied") {
        assert!(rows.iter().all(|r| r["engine"] != "exact"), "{doc}");
        assert!(!notes.contains("approximations applied"), "{notes}");
    } else {
        let exact = rows
            .iter()
            .find(|r| r["engine"] == "exact")
            .unwrap_or_else(|| panic!("an exact row: {doc}"));
        positive(&exact["median_ms"], "exact median");
        let jit = rows.iter().find(|r| r["engine"] == "jit").expect("jit row");
        positive(&jit["speedup_vs_exact"], "jit vs exact");
        // The naive baseline still runs: the exact plan is plain attention.
        assert!(rows.iter().any(|r| r["engine"] == "naive"), "{doc}");
        assert!(notes.contains("approximations applied: int8"), "{notes}");
    }

    // Without an approximation there is no exact row.
    let out = attnc(&[
        "bench",
        "benches/kernels/dense.attn",
        "--shape",
        "h=1,n=64,d=16",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-interp",
        "--format",
        "json",
    ]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let doc = json(&out);
    let engines: Vec<String> = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["engine"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!engines.contains(&"exact".to_string()), "{engines:?}");
}

/// A plan whose attention runs reduced-precision products on vectors reports that tier's
/// ceiling, measured in the run, and each JIT row's share of it; other plans report none.
#[test]
fn bench_reports_the_ceiling_of_a_reduced_precision_tier_on_vectors() {
    use attnc_wide::amx::{self, Products, Unit};
    let bench = |program: &str, approx: &[&str]| {
        let mut args = vec![
            "bench",
            program,
            "--shape",
            "h=1,n=512,d=64",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--no-interp",
            "--no-naive",
            "--format",
            "json",
        ];
        args.extend(approx);
        let out = attnc(&args);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        json(&out)
    };
    let doc = bench(
        "benches/kernels/dense_bf16.attn",
        &["--approx", "bf16_products", "--tol", "0.01"],
    );
    let applied = doc["notes"]
        .to_string()
        .contains("approximations applied: bf16_products");
    if applied && amx::unit(Products::Bf16) == Some(Unit::Vectors) {
        let tier = &doc["tier_ceiling"];
        assert_eq!(tier["tier"], "avx-512 bf16", "{doc}");
        let one = positive(&tier["gflops_1"], "tier ceiling at 1 thread");
        assert!(tier["basis"].as_str().unwrap_or("").contains("vdpbf16ps"));
        for row in doc["results"].as_array().expect("results") {
            if row["engine"] == "jit" {
                let share = positive(&row["pct_of_tier_ceiling"], "share of the tier ceiling");
                let gflops = positive(&row["gflops"], "jit GFLOP/s");
                if row["threads"] == 1 {
                    assert!((share - 100.0 * gflops / one).abs() < 1e-6 * share);
                }
            } else {
                assert!(row["pct_of_tier_ceiling"].is_null(), "{row}");
            }
        }
    } else {
        assert!(doc["tier_ceiling"].is_null(), "{doc}");
    }
    // The exact f32 kernel is read against the FMA peak alone.
    let doc = bench("benches/kernels/dense.attn", &[]);
    assert!(doc["tier_ceiling"].is_null(), "{doc}");
}
