//! `attnc bench FILE`: time the compiled kernel against the reference interpreter and a naive
//! Rust implementation, in one run, next to the f32x4 FMA ceiling measured in the same run.
//!
//! Every engine gets `--warmup` untimed runs and then `--runs` timed ones; the median and the
//! minimum are reported. The slow baselines (interpreter, naive) run once first; when that
//! took more than [`SLOW_SECONDS`] they are not repeated, and they are repeated at most until
//! [`BASELINE_BUDGET_SECONDS`] are spent. The interpreter is skipped up front when its
//! estimated time or memory is too large (or with `--no-interp`).

use crate::args::BenchArgs;
use crate::failure::Failure;
use crate::inputs::{prepare, Prepared};
use crate::CliResult;
use attnc::baseline::{naive_attention, plain_attention, useful_flops, FlopCount};
use attnc::engine::{compile, execute, run_compiled, Engine};
use attnc_jit::ceiling::{measure_f32x4_ceiling, Ceiling};
use attnc_jit::plan::{Plan, StepKind};
use serde_json::json;
use std::time::Instant;

/// A baseline run slower than this is not repeated.
const SLOW_SECONDS: f64 = 20.0;
/// Total seconds the repeats of one slow baseline may take.
const BASELINE_BUDGET_SECONDS: f64 = 60.0;
/// The interpreter is skipped when its estimated time exceeds this.
const INTERP_MAX_ESTIMATE_SECONDS: f64 = 120.0;
/// … or its estimated peak memory this many bytes.
const INTERP_MAX_BYTES: f64 = 4.0 * (1u64 << 30) as f64;
/// Compilations timed per kernel (the first one includes one-time ISA setup).
const COMPILES: usize = 3;

/// Timings of one engine at one thread count.
struct Row {
    engine: &'static str,
    threads: usize,
    samples: Vec<f64>,
}

impl Row {
    fn median_ms(&self) -> f64 {
        median(&self.samples) * 1e3
    }
    fn min_ms(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min) * 1e3
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// One untimed-or-timed call, in seconds.
fn time<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<f64, Failure> {
    let start = Instant::now();
    let out = f()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(out);
    Ok(seconds)
}

/// Warm-up and `runs` timed calls of a fast engine.
fn time_runs(
    runs: usize,
    warmup: usize,
    mut f: impl FnMut() -> Result<(), Failure>,
) -> Result<Vec<f64>, Failure> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(time(&mut f)?);
    }
    Ok(samples)
}

/// A slow baseline: one run, then repeats within the budget (none after a slow first run).
fn time_slow(
    runs: usize,
    mut f: impl FnMut() -> Result<(), Failure>,
    notes: &mut Vec<String>,
    what: &str,
) -> Result<Vec<f64>, Failure> {
    let first = time(&mut f)?;
    let mut samples = vec![first];
    if first > SLOW_SECONDS {
        notes.push(format!(
            "note: {what} took {first:.1} s; not repeated (1 sample)"
        ));
        return Ok(samples);
    }
    let more = ((BASELINE_BUDGET_SECONDS / first.max(1e-9)) as usize).min(runs.saturating_sub(1));
    for _ in 0..more {
        samples.push(time(&mut f)?);
    }
    if samples.len() < runs {
        notes.push(format!(
            "note: {what}: {} of {runs} samples (budget {BASELINE_BUDGET_SECONDS:.0} s)",
            samples.len()
        ));
    }
    Ok(samples)
}

/// Rough interpreter cost: (seconds, peak bytes), from the matmul FLOPs and node sizes.
fn interp_estimate(prepared: &Prepared, plan: &Plan, flops: &FlopCount) -> (f64, f64) {
    let kernel = prepared.kernel();
    let sizes: Vec<f64> = attnc::ir::bind::resolve_node_shapes(kernel, &prepared.bindings)
        .map(|shapes| {
            shapes
                .iter()
                .map(|s| s.iter().map(|&d| d as f64).product::<f64>())
                .collect()
        })
        .unwrap_or_default();
    let elements: f64 = sizes.iter().sum();
    let largest = sizes.iter().copied().fold(0.0, f64::max);
    // f64 matmul at ~1.5 GFLOP/s (the interpreter's plain loops) and ~30 ns per element op;
    // an attention step's FLOPs are counted over kept pairs, the interpreter does all n².
    let attention_pairs = dense_pair_flops(plan);
    let seconds = flops.flops.max(attention_pairs) / 1.5e9 + elements * 30e-9;
    (seconds, 3.0 * largest * 8.0)
}

/// FLOPs the interpreter spends on fused attention and prefix steps: it computes every pair.
fn dense_pair_flops(plan: &Plan) -> f64 {
    plan.steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Attention(a) => {
                Some(2.0 * (a.d + a.dv) as f64 * a.batch_count() as f64 * a.m as f64 * a.n as f64)
            }
            // The interpreter runs the quadratic form the prefix kernel replaces.
            StepKind::Prefix(p) => Some(
                2.0 * (p.d + p.dv + 1) as f64 * p.batch_count() as f64 * p.m as f64 * p.n as f64,
            ),
            _ => None,
        })
        .sum()
}

pub fn bench(args: &BenchArgs) -> CliResult {
    let mut shared = args.shared.clone();
    if shared.input.is_empty() && shared.random.is_none() {
        shared.random = Some(0);
    }
    let prepared = prepare(&shared, true)?;
    let kernel = prepared.kernel();
    let mut notes = prepared.notes.clone();
    if args.shared.engine.is_some() {
        notes.push("note: --engine is ignored by bench: every engine is timed".to_string());
    }
    let runs = args.runs.max(1) as usize;
    let warmup = args.warmup as usize;
    let threads = prepared.threads;
    let fail = |e: attnc::engine::RunError| Failure::input("run", e.to_string());

    // Compile (timed a few times; the first includes one-time setup).
    // `compile_ms`: planning and code generation (`CompiledKernel::compile_time`);
    // `total_ms`: the whole `engine::compile`, optimizer included.
    let mut compile_ms = Vec::with_capacity(COMPILES);
    let mut total_ms = Vec::with_capacity(COMPILES);
    let mut compiled = None;
    for _ in 0..COMPILES {
        let start = Instant::now();
        let c = compile(kernel, &prepared.bindings).map_err(fail)?;
        total_ms.push(start.elapsed().as_secs_f64() * 1e3);
        compile_ms.push(c.compile_time().as_secs_f64() * 1e3);
        compiled = Some(c);
    }
    let compiled = compiled.ok_or_else(|| Failure::input("run", "nothing compiled"))?;
    let flops = useful_flops(compiled.plan());
    let steps = compiled.plan().steps.len();

    // The ceiling, in this run, at 1 thread and at `threads`.
    let ceiling_err = |e: attnc_jit::JitError| Failure::input("run", e.to_string());
    let ceiling_1 = measure_f32x4_ceiling(1).map_err(ceiling_err)?;
    let ceiling_t = if threads > 1 {
        measure_f32x4_ceiling(threads).map_err(ceiling_err)?
    } else {
        ceiling_1
    };
    let ceiling_at = |t: usize| -> Option<Ceiling> {
        if t == 1 {
            Some(ceiling_1)
        } else if t == threads {
            Some(ceiling_t)
        } else {
            None
        }
    };

    // The JIT at `threads` and at 1 thread.
    let mut rows = Vec::new();
    let mut thread_counts = vec![threads];
    if threads != 1 {
        thread_counts.push(1);
    }
    for &t in &thread_counts {
        let samples = time_runs(runs, warmup, || {
            run_compiled(&compiled, kernel.ret_dtype, &prepared.inputs, t)
                .map(drop)
                .map_err(fail)
        })?;
        rows.push(Row {
            engine: "jit",
            threads: t,
            samples,
        });
    }

    // The interpreter.
    let (estimate_s, estimate_bytes) = interp_estimate(&prepared, compiled.plan(), &flops);
    let interp_skip = if args.no_interp {
        Some("--no-interp".to_string())
    } else if estimate_s > INTERP_MAX_ESTIMATE_SECONDS {
        Some(format!("estimated {estimate_s:.0} s per run"))
    } else if estimate_bytes > INTERP_MAX_BYTES {
        Some(format!(
            "estimated {:.1} GiB of f64 intermediates",
            estimate_bytes / (1u64 << 30) as f64
        ))
    } else {
        None
    };
    match &interp_skip {
        Some(why) => notes.push(format!("note: interpreter skipped ({why})")),
        None => {
            let samples = time_slow(
                runs,
                || {
                    execute(
                        kernel,
                        &prepared.bindings,
                        &prepared.inputs,
                        Engine::Interp,
                        1,
                    )
                    .map(drop)
                    .map_err(fail)
                },
                &mut notes,
                "interpreter",
            )?;
            rows.push(Row {
                engine: "interp",
                threads: 1,
                samples,
            });
        }
    }

    // The naive Rust baseline, for plain attention only.
    let plain = plain_attention(compiled.plan());
    let naive_skip = match &plain {
        None => Some("n/a: not plain attention".to_string()),
        Some(_) if args.no_naive => Some("--no-naive".to_string()),
        Some(_) => None,
    };
    if let (Some(plain), None) = (&plain, &naive_skip) {
        let values: Vec<Vec<f32>> = prepared.inputs.iter().map(|t| t.to_f32_vec()).collect();
        let [q, k, v] = plain
            .gather(&values)
            .map_err(|e| Failure::input("run", e.to_string()))?;
        drop(values);
        let samples = time_slow(
            runs,
            || {
                naive_attention(&q, &k, &v, plain.shape, plain.scale, plain.mask.as_ref())
                    .map(drop)
                    .map_err(|e| Failure::input("run", e.to_string()))
            },
            &mut notes,
            "naive baseline",
        )?;
        rows.push(Row {
            engine: "naive",
            threads: 1,
            samples,
        });
    }

    let interp_ms = rows
        .iter()
        .find(|r| r.engine == "interp")
        .map(Row::median_ms);
    let naive_ms = rows
        .iter()
        .find(|r| r.engine == "naive")
        .map(Row::median_ms);
    let gflops = |ms: f64| flops.flops / (ms * 1e-3) / 1e9;
    let row_json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let ms = r.median_ms();
            let g = gflops(ms);
            json!({
                "engine": r.engine,
                "threads": r.threads,
                "samples": r.samples.len(),
                "median_ms": ms,
                "min_ms": r.min_ms(),
                "gflops": g,
                "pct_of_ceiling": ceiling_at(r.threads).map(|c| 100.0 * g / c.gflops_total),
                "speedup_vs_interp": interp_ms.map(|i| i / ms),
                "speedup_vs_naive": naive_ms.map(|n| n / ms),
            })
        })
        .collect();
    let jit_scaling = match (rows.first(), rows.get(1)) {
        (Some(a), Some(b)) if a.engine == "jit" && b.engine == "jit" && a.threads != 1 => {
            Some(b.median_ms() / a.median_ms())
        }
        _ => None,
    };

    if args.shared.format.is_json() {
        let doc = json!({
            "ok": true,
            "kernel": kernel.name,
            "bindings": prepared.bindings,
            "policy": prepared.policy.to_string(),
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
            "steps": steps,
            "compile_ms": compile_ms[0],
            "compile_ms_all": compile_ms,
            "compile_total_ms": total_ms[0],
            "compile_total_ms_all": total_ms,
            "flops": flops.flops,
            "flops_basis": flops.basis,
            "attended_pairs": flops.attended_pairs,
            "ceiling": {
                "gflops_per_thread_1": ceiling_1.gflops_per_thread,
                "threads": ceiling_t.threads,
                "gflops_total": ceiling_t.gflops_total,
                "gflops_per_thread": ceiling_t.gflops_per_thread,
            },
            "results": row_json,
            "jit_speedup_threads_vs_1": jit_scaling,
            "interp": interp_skip.as_ref().map_or(json!("timed"), |w| json!(format!("skipped: {w}"))),
            "naive": naive_skip.as_ref().map_or(json!("timed"), |w| json!(w)),
            "notes": notes,
        });
        crate::print_json(&doc);
        return Ok(());
    }

    for note in &notes {
        eprintln!("{note}");
    }
    let bindings: Vec<String> = prepared
        .bindings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    outln!("bench {} [{}]", kernel.name, bindings.join(", "));
    let list = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    outln!(
        "compile: {:.2} ms codegen, {:.2} ms with the optimizer ({steps} steps; {COMPILES} compiles: {} ms codegen, {} ms total)",
        compile_ms[0],
        total_ms[0],
        list(&compile_ms),
        list(&total_ms),
    );
    outln!(
        "useful work: {:.3} GFLOP ({}; {} attended pairs)",
        flops.flops / 1e9,
        flops.basis,
        flops.attended_pairs
    );
    let ceiling_line = if threads > 1 {
        format!(
            "f32x4 FMA ceiling (this run): {:.1} GFLOP/s at 1 thread, {:.1} at {threads} ({:.1} per thread)",
            ceiling_1.gflops_total, ceiling_t.gflops_total, ceiling_t.gflops_per_thread
        )
    } else {
        format!(
            "f32x4 FMA ceiling (this run): {:.1} GFLOP/s at 1 thread",
            ceiling_1.gflops_total
        )
    };
    outln!("{ceiling_line}");
    outln!("runs: {runs} timed after {warmup} warm-up (median, min)");
    outln!();
    outln!(
        "{:<8} {:>7} {:>12} {:>12} {:>9} {:>10} {:>10} {:>10}",
        "engine",
        "threads",
        "median ms",
        "min ms",
        "GFLOP/s",
        "% ceiling",
        "vs interp",
        "vs naive"
    );
    let opt =
        |x: Option<f64>, suffix: &str| x.map_or("-".to_string(), |v| format!("{v:.2}{suffix}"));
    for r in &rows {
        let ms = r.median_ms();
        let g = gflops(ms);
        outln!(
            "{:<8} {:>7} {:>12.3} {:>12.3} {:>9.2} {:>10} {:>10} {:>10}",
            r.engine,
            r.threads,
            ms,
            r.min_ms(),
            g,
            opt(
                ceiling_at(r.threads).map(|c| 100.0 * g / c.gflops_total),
                "%"
            ),
            opt(interp_ms.map(|i| i / ms), "x"),
            opt(naive_ms.map(|n| n / ms), "x"),
        );
    }
    if let Some(why) = &interp_skip {
        outln!(
            "{:<8} {:>7} {:>12}",
            "interp",
            1,
            format!("skipped ({why})")
        );
    }
    if let Some(why) = &naive_skip {
        outln!("{:<8} {:>7} {:>12}", "naive", 1, why);
    }
    if let Some(s) = jit_scaling {
        outln!("jit {threads} threads vs 1: {s:.2}x");
    }
    Ok(())
}
