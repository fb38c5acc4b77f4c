//! The report of a one-shape benchmark: a table on stdout, or one JSON document.

use super::measure::{Ceilings, Measurement, Row, COMPILES};
use crate::args::BenchArgs;
use crate::inputs::Prepared;
use serde_json::json;

/// One JSON object per timed engine: times, rates and speedups.
pub fn rows_json(m: &Measurement, ceilings: &Ceilings) -> Vec<serde_json::Value> {
    let interp_ms = m.median_ms("interp");
    let naive_ms = m.median_ms("naive");
    let exact_ms = m.median_ms("exact");
    m.rows
        .iter()
        .map(|r| {
            let ms = r.median_ms();
            let g = m.gflops(ms);
            json!({
                "engine": r.engine,
                "threads": r.threads,
                "samples": r.samples.len(),
                "median_ms": ms,
                "min_ms": r.min_ms(),
                "gflops": g,
                "pct_of_ceiling": ceilings.at(r.threads).map(|c| 100.0 * g / c.gflops_total),
                "pct_of_peak": ceilings.peak_at(r.threads).map(|p| 100.0 * g / p),
                "pct_of_tier_ceiling": tier_ceiling_at(m, r).map(|c| 100.0 * g / c),
                "speedup_vs_interp": interp_ms.map(|i| i / ms),
                "speedup_vs_naive": naive_ms.map(|n| n / ms),
                "speedup_vs_exact": exact_ms.map(|e| e / ms),
            })
        })
        .collect()
}

/// The ceiling of the reduced-precision tier a JIT row ran on, at its thread count.
fn tier_ceiling_at(m: &Measurement, r: &Row) -> Option<f64> {
    let t = m.tier.as_ref().filter(|_| r.engine == "jit")?;
    if r.threads == 1 {
        Some(t.one)
    } else {
        Some(t.at)
    }
}

/// The reduced-precision tier's ceiling as JSON (`null` when the JIT rows ran none).
fn tier_json(m: &Measurement) -> serde_json::Value {
    match &m.tier {
        Some(t) => json!({
            "tier": t.tier,
            "basis": t.basis,
            "gflops_1": t.one,
            "gflops_total": t.at,
        }),
        None => serde_json::Value::Null,
    }
}

/// The ceiling as a JSON object.
pub fn ceiling_json(ceilings: &Ceilings) -> serde_json::Value {
    json!({
        "gflops_per_thread_1": ceilings.one.gflops_per_thread,
        "threads": ceilings.at_threads.threads,
        "gflops_total": ceilings.at_threads.gflops_total,
        "gflops_per_thread": ceilings.at_threads.gflops_per_thread,
        "peak_512_gflops_1": ceilings.peak.map(|p| p.0),
        "peak_512_gflops_total": ceilings.peak.map(|p| p.1),
    })
}

/// What was not timed, as JSON strings: (`interp`, `naive`).
pub fn skips_json(m: &Measurement) -> (serde_json::Value, serde_json::Value) {
    (
        m.interp_skip
            .as_ref()
            .map_or(json!("timed"), |w| json!(format!("skipped: {w}"))),
        m.naive_skip.as_ref().map_or(json!("timed"), |w| json!(w)),
    )
}

/// Prints a one-shape benchmark in the format `args` asks for.
pub fn single(
    prepared: &Prepared,
    args: &BenchArgs,
    ceilings: &Ceilings,
    m: &Measurement,
    notes: &[String],
) {
    let kernel = prepared.kernel();
    let runs = args.runs.max(1) as usize;
    let warmup = args.warmup as usize;
    let threads = prepared.threads;
    if args.shared.format.is_json() {
        let (interp, naive) = skips_json(m);
        let doc = json!({
            "ok": true,
            "kernel": kernel.name,
            "bindings": prepared.bindings,
            "policy": prepared.policy.to_string(),
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
            "steps": m.steps,
            "compile_ms": m.compile_ms[0],
            "compile_ms_all": m.compile_ms,
            "compile_total_ms": m.total_ms[0],
            "compile_total_ms_all": m.total_ms,
            "flops": m.flops.flops,
            "flops_basis": m.flops.basis,
            "flops_at_most": m.flops.at_most,
            "attended_pairs": m.flops.attended_pairs,
            "ceiling": ceiling_json(ceilings),
            "tier_ceiling": tier_json(m),
            "results": rows_json(m, ceilings),
            "jit_speedup_threads_vs_1": m.jit_scaling(),
            "interp": interp,
            "naive": naive,
            "notes": notes,
        });
        crate::print_json(&doc);
        return;
    }

    for note in notes {
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
        "compile: {:.2} ms codegen, {:.2} ms with the optimizer ({} steps; {COMPILES} compiles: {} ms codegen, {} ms total)",
        m.compile_ms[0],
        m.total_ms[0],
        m.steps,
        list(&m.compile_ms),
        list(&m.total_ms),
    );
    outln!(
        "useful work: {}{:.3} GFLOP ({}; {} attended pairs)",
        if m.flops.at_most { "at most " } else { "" },
        m.flops.flops / 1e9,
        m.flops.basis,
        m.flops.attended_pairs
    );
    if m.flops.at_most {
        outln!(
            "(a mask keeps pairs chosen at run time: they count as kept, so GFLOP/s are upper bounds)"
        );
    }
    let ceiling_line = if threads > 1 {
        format!(
            "f32x4 FMA ceiling (this run): {:.1} GFLOP/s at 1 thread, {:.1} at {threads} ({:.1} per thread)",
            ceilings.one.gflops_total,
            ceilings.at_threads.gflops_total,
            ceilings.at_threads.gflops_per_thread
        )
    } else {
        format!(
            "f32x4 FMA ceiling (this run): {:.1} GFLOP/s at 1 thread",
            ceilings.one.gflops_total
        )
    };
    outln!("{ceiling_line}");
    if let Some((one, at)) = ceilings.peak {
        outln!(
            "512-bit FMA peak (this run): {one:.1} GFLOP/s at 1 thread, {at:.1} at {threads}; \
             `% peak` is against it"
        );
    }
    if let Some(t) = &m.tier {
        let jit: Vec<String> = m
            .rows
            .iter()
            .filter_map(|r| {
                let c = tier_ceiling_at(m, r)?;
                Some(format!(
                    "{:.1} % at {}",
                    100.0 * m.gflops(r.median_ms()) / c,
                    r.threads
                ))
            })
            .collect();
        outln!(
            "{} tier ceiling (this run): {:.1} GFLOP/s at 1 thread, {:.1} at {threads} ({}); \
             the jit rows reach {}",
            t.tier,
            t.one,
            t.at,
            t.basis,
            jit.join(", ")
        );
    }
    outln!("runs: {runs} timed after {warmup} warm-up (median, min)");
    outln!();
    outln!(
        "{:<8} {:>7} {:>12} {:>12} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "engine",
        "threads",
        "median ms",
        "min ms",
        "GFLOP/s",
        "% peak",
        "% f32x4",
        "vs interp",
        "vs naive"
    );
    let interp_ms = m.median_ms("interp");
    let naive_ms = m.median_ms("naive");
    for r in &m.rows {
        let ms = r.median_ms();
        let g = m.gflops(ms);
        outln!(
            "{:<8} {:>7} {:>12.3} {:>12.3} {:>9.2} {:>8} {:>10} {:>10} {:>10}",
            r.engine,
            r.threads,
            ms,
            r.min_ms(),
            g,
            optional(ceilings.peak_at(r.threads).map(|p| 100.0 * g / p), "%"),
            optional(
                ceilings.at(r.threads).map(|c| 100.0 * g / c.gflops_total),
                "%"
            ),
            optional(interp_ms.map(|i| i / ms), "x"),
            optional(naive_ms.map(|n| n / ms), "x"),
        );
    }
    if let Some(why) = &m.interp_skip {
        outln!(
            "{:<8} {:>7} {:>12}",
            "interp",
            1,
            format!("skipped ({why})")
        );
    }
    if let Some(why) = &m.naive_skip {
        outln!("{:<8} {:>7} {:>12}", "naive", 1, why);
    }
    if let Some(s) = m.jit_scaling() {
        outln!("jit {threads} threads vs 1: {s:.2}x");
    }
    let jit_ms = m
        .rows
        .iter()
        .find(|r| r.engine == "jit" && r.threads == threads)
        .map(Row::median_ms);
    if let (Some(jit), Some(exact)) = (jit_ms, m.median_ms("exact")) {
        outln!(
            "jit (approximate) vs exact at {threads} threads: {:.2}x",
            exact / jit
        );
    }
}

/// `x` with two decimals and a suffix, or `-`.
pub fn optional(x: Option<f64>, suffix: &str) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.2}{suffix}"))
}
