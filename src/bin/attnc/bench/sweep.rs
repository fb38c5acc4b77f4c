//! `attnc bench --sweep SYM=V1,V2,..` and `--plot PATH.svg`: every kernel of the file (or the one
//! `--kernel` names) timed at each value of one dimension, as a table or one JSON document,
//! and optionally drawn as an SVG plot.
//!
//! Without `--sweep`, `--plot` sweeps `n` over powers of two from [`DEFAULT_FIRST`] up to the
//! `n` of `--shape` (or [`DEFAULT_LAST`]). Inputs are random (`--random SEED`, default 0) at
//! every point, so `--input` cannot be combined with a sweep.

use super::measure::{measure, Ceilings, Measurement};
use super::plot::{self, Series};
use super::progress::Progress;
use super::report::{ceiling_json, optional, rows_json, skips_json};
use super::ENGINE_IGNORED;
use crate::args::BenchArgs;
use crate::check::load_module;
use crate::failure::Failure;
use crate::inputs::{parse_shape_args, prepare};
use crate::CliResult;
use attnc::ir::bind::kernel_symbols;
use attnc::ir::Bindings;
use serde_json::json;

/// The smallest value of the default sweep of `n`.
const DEFAULT_FIRST: u64 = 256;
/// The largest value of the default sweep of `n` when `--shape` does not bind `n`.
const DEFAULT_LAST: u64 = 2048;
/// The dimension the default sweep varies.
const DEFAULT_SYMBOL: &str = "n";
/// At most this many values in one sweep (each value is a full benchmark).
const MAX_VALUES: usize = 64;

/// One dimension and the values it takes, ascending and distinct.
pub struct Sweep {
    /// The dimension symbol, e.g. `n`.
    pub symbol: String,
    /// Its values, ascending, each at least 1.
    pub values: Vec<u64>,
}

/// One kernel timed at one value of the swept dimension.
struct Point {
    kernel: String,
    value: u64,
    bindings: Bindings,
    policy: String,
    measurement: Measurement,
}

/// Runs a sweep (see the module documentation).
pub fn bench_sweep(args: &BenchArgs) -> CliResult {
    if !args.shared.input.is_empty() {
        return Err(Failure::Usage(
            "--sweep and --plot time random inputs at every size; they cannot be combined with \
             --input"
                .to_string(),
        ));
    }
    if let Some(path) = &args.plot {
        crate::output_path::check("--plot", path)?;
    }
    let mut given = parse_shape_args(&args.shared.shape)?;
    let sweep = match &args.sweep {
        Some(text) => {
            let sweep = parse_sweep(text)?;
            if let Some(v) = given.get(&sweep.symbol) {
                return Err(Failure::Usage(format!(
                    "--shape binds `{}` to {v} and --sweep varies it; drop one",
                    sweep.symbol
                )));
            }
            sweep
        }
        None => default_sweep(given.remove(DEFAULT_SYMBOL))?,
    };
    let module = load_module(&args.shared.file)?;
    let mut notes = Vec::new();
    let kernels: Vec<String> = match &args.shared.kernel {
        Some(name) => vec![name.clone()],
        None => {
            let mut swept = Vec::new();
            for k in &module.kernels {
                if kernel_symbols(k).contains(&sweep.symbol) {
                    swept.push(k.name.clone());
                } else {
                    notes.push(format!(
                        "note: kernel `{}` has no dimension `{}`; not swept",
                        k.name, sweep.symbol
                    ));
                }
            }
            swept
        }
    };
    if kernels.is_empty() {
        return Err(Failure::input(
            "kernel",
            format!(
                "no kernel of `{}` has a dimension `{}` to sweep",
                args.shared.file.display(),
                sweep.symbol
            ),
        ));
    }
    if args.shared.engine.is_some() {
        notes.push(ENGINE_IGNORED.to_string());
    }

    let progress = Progress::new(kernels.len() * sweep.values.len());
    let mut ceilings = None;
    let mut points = Vec::new();
    for kernel in &kernels {
        for &value in &sweep.values {
            let mut shared = args.shared.clone();
            shared.kernel = Some(kernel.clone());
            shared.random = Some(shared.random.unwrap_or(0));
            let mut bound = given.clone();
            bound.insert(sweep.symbol.clone(), value);
            shared.shape = vec![bound
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")];
            let label = format!("{kernel} {}={value}", sweep.symbol);
            progress.show(format!("{label}: inputs"));
            let prepared = prepare(&shared, true)?;
            if !kernel_symbols(prepared.kernel()).contains(&sweep.symbol) {
                return Err(Failure::input(
                    "kernel",
                    format!(
                        "kernel `{kernel}` has no dimension `{}` to sweep",
                        sweep.symbol
                    ),
                ));
            }
            push_unique(&mut notes, prepared.notes.iter());
            if ceilings.is_none() {
                progress.show(format!("{label}: f32x4 ceiling"));
                ceilings = Some(Ceilings::measure(prepared.threads)?);
            }
            let measurement = measure(&prepared, args, |phase| {
                progress.show(format!("{label}: {phase}"));
            })?;
            push_unique(&mut notes, measurement.notes.iter());
            points.push(Point {
                kernel: kernel.clone(),
                value,
                bindings: prepared.bindings.clone(),
                policy: prepared.policy.to_string(),
                measurement,
            });
            progress.advance();
        }
    }
    drop(progress);
    let ceilings = ceilings.ok_or_else(|| Failure::input("run", "nothing was timed"))?;

    if let Some(path) = &args.plot {
        let title = plot_title(args, &sweep, &given, ceilings.threads);
        let svg = plot::render(
            &title,
            &sweep.symbol,
            &plot_series(&points, ceilings.threads),
        )?;
        plot::write(path, &svg)?;
    }
    if args.shared.format.is_json() {
        print_json(args, &sweep, &kernels, &points, &ceilings, &notes);
    } else {
        print_text(args, &sweep, &given, &points, &ceilings, &notes);
    }
    Ok(())
}

/// `n=1024,2048,4096` → a sweep; malformed text is a usage error.
pub fn parse_sweep(text: &str) -> Result<Sweep, Failure> {
    let usage = |why: String| Failure::Usage(format!("--sweep {text}: {why}"));
    let (symbol, list) = text
        .split_once('=')
        .ok_or_else(|| usage("expected SYM=V1,V2,..., e.g. n=1024,2048,4096".to_string()))?;
    let symbol = symbol.trim();
    if symbol.is_empty()
        || !symbol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(usage(format!("`{symbol}` is not a dimension name")));
    }
    let mut values = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u64>() {
            Ok(v) if v >= 1 => values.push(v),
            _ => return Err(usage(format!("`{item}` is not a positive integer"))),
        }
    }
    values.sort_unstable();
    values.dedup();
    if values.is_empty() {
        return Err(usage("no values".to_string()));
    }
    if values.len() > MAX_VALUES {
        return Err(usage(format!(
            "{} values; at most {MAX_VALUES}",
            values.len()
        )));
    }
    Ok(Sweep {
        symbol: symbol.to_string(),
        values,
    })
}

/// Powers of two of `n` from [`DEFAULT_FIRST`] up to `last` (or [`DEFAULT_LAST`]), ending at
/// `last` itself when it is not a power of two.
pub fn default_sweep(last: Option<u64>) -> Result<Sweep, Failure> {
    let last = last.unwrap_or(DEFAULT_LAST);
    if last == 0 {
        return Err(Failure::Usage(
            "--plot: the sweep of `n` needs n ≥ 1 (a log axis has no 0)".to_string(),
        ));
    }
    let mut values = Vec::new();
    let mut v = DEFAULT_FIRST;
    while v < last {
        values.push(v);
        v = v.saturating_mul(2);
    }
    values.push(last);
    Ok(Sweep {
        symbol: DEFAULT_SYMBOL.to_string(),
        values,
    })
}

/// Appends the notes not seen yet (every point repeats the same ones).
fn push_unique<'a>(notes: &mut Vec<String>, new: impl Iterator<Item = &'a String>) {
    for note in new {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
}

/// The other bindings, as `h=8, d=64`.
fn fixed_bindings(given: &Bindings) -> String {
    given
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plot_title(args: &BenchArgs, sweep: &Sweep, given: &Bindings, threads: usize) -> String {
    let file = args
        .shared
        .file
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let fixed = fixed_bindings(given);
    let fixed = if fixed.is_empty() {
        String::new()
    } else {
        format!(", {fixed}")
    };
    let plural = if threads == 1 { "" } else { "s" };
    format!(
        "{file}: time against {}{fixed} (jit on {threads} thread{plural})",
        sweep.symbol
    )
}

/// One series per kernel and engine: the JIT at the benchmark's thread count, the interpreter
/// and the naive baseline where they were timed.
fn plot_series(points: &[Point], threads: usize) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    let mut kernel_index = 0;
    for (i, p) in points.iter().enumerate() {
        if i > 0 && points[i - 1].kernel != p.kernel {
            kernel_index += 1;
        }
        for row in &p.measurement.rows {
            if row.engine == "jit" && row.threads != threads {
                continue;
            }
            let label = if row.engine == "jit" {
                format!("{} (jit)", p.kernel)
            } else {
                format!("{} ({})", p.kernel, row.engine)
            };
            let at = (p.value as f64, row.median_ms());
            match series.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push(at),
                None => series.push(Series {
                    label,
                    kernel_index,
                    engine: row.engine,
                    points: vec![at],
                }),
            }
        }
    }
    series
}

fn print_json(
    args: &BenchArgs,
    sweep: &Sweep,
    kernels: &[String],
    points: &[Point],
    ceilings: &Ceilings,
    notes: &[String],
) {
    let points_json: Vec<serde_json::Value> = points
        .iter()
        .map(|p| {
            let m = &p.measurement;
            let (interp, naive) = skips_json(m);
            json!({
                "kernel": p.kernel,
                "value": p.value,
                "bindings": p.bindings,
                "policy": p.policy,
                "steps": m.steps,
                "compile_ms": m.compile_ms[0],
                "compile_total_ms": m.total_ms[0],
                "flops": m.flops.flops,
                "flops_basis": m.flops.basis,
                "flops_at_most": m.flops.at_most,
                "attended_pairs": m.flops.attended_pairs,
                "results": rows_json(m, ceilings),
                "jit_speedup_threads_vs_1": m.jit_scaling(),
                "interp": interp,
                "naive": naive,
            })
        })
        .collect();
    let doc = json!({
        "ok": true,
        "sweep": { "symbol": sweep.symbol, "values": sweep.values },
        "kernels": kernels,
        "seed": args.shared.random.unwrap_or(0),
        "threads": ceilings.threads,
        "runs": args.runs.max(1),
        "warmup": args.warmup,
        "ceiling": ceiling_json(ceilings),
        "points": points_json,
        "plot": args.plot.as_ref().map(|p| p.display().to_string()),
        "notes": notes,
    });
    crate::print_json(&doc);
}

fn print_text(
    args: &BenchArgs,
    sweep: &Sweep,
    given: &Bindings,
    points: &[Point],
    ceilings: &Ceilings,
    notes: &[String],
) {
    for note in notes {
        eprintln!("{note}");
    }
    let threads = ceilings.threads;
    let values: Vec<String> = sweep.values.iter().map(u64::to_string).collect();
    outln!(
        "bench sweep {} = {} [{}]",
        sweep.symbol,
        values.join(", "),
        fixed_bindings(given)
    );
    outln!(
        "f32x4 FMA ceiling (this run): {:.1} GFLOP/s at {threads} thread{}",
        ceilings.at_threads.gflops_total,
        if threads == 1 { "" } else { "s" }
    );
    outln!(
        "runs: {} timed after {} warm-up; median ms per call",
        args.runs.max(1),
        args.warmup
    );
    outln!();
    let jit_t = format!("jit {threads}t");
    // An approximate JIT row comes with the exact plan's time at the same thread count.
    let has_exact = points
        .iter()
        .any(|p| p.measurement.median_ms("exact").is_some());
    let exact_header = if has_exact {
        format!(" {:>11}", format!("exact {threads}t"))
    } else {
        String::new()
    };
    outln!(
        "{:<16} {:>8} {:>11}{exact_header} {:>11} {:>11} {:>11} {:>9} {:>9}",
        "kernel",
        sweep.symbol,
        jit_t,
        "jit 1t",
        "interp",
        "naive",
        "GFLOP/s",
        "vs naive"
    );
    for p in points {
        let m = &p.measurement;
        let jit = m
            .rows
            .iter()
            .find(|r| r.engine == "jit" && r.threads == threads);
        let jit_ms = jit.map(|r| r.median_ms());
        let jit1 = m
            .rows
            .iter()
            .find(|r| r.engine == "jit" && r.threads == 1)
            .map(|r| r.median_ms());
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        let naive = m.median_ms("naive");
        let exact = if has_exact {
            format!(" {:>11}", ms(m.median_ms("exact")))
        } else {
            String::new()
        };
        outln!(
            "{:<16} {:>8} {:>11}{exact} {:>11} {:>11} {:>11} {:>9} {:>9}",
            p.kernel,
            p.value,
            ms(jit_ms),
            ms(jit1),
            ms(m.median_ms("interp")),
            ms(naive),
            optional(jit_ms.map(|t| m.gflops(t)), ""),
            optional(naive.zip(jit_ms).map(|(n, j)| n / j), "x"),
        );
    }
    if let Some(path) = &args.plot {
        outln!();
        outln!("plot: {}", path.display());
    }
}
