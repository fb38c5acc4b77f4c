//! `attnc run FILE`: compile and run one kernel, print a summary, optionally write `--output`
//! (once per output, in order, for a kernel returning several).

use crate::args::RunArgs;
use crate::failure::Failure;
use crate::inputs::{prepare, Prepared};
use crate::CliResult;
use attnc::engine::{execute_all, Engine};
use attnc::io::Tensor;
use attnc::policy::Policy;
use attnc::Compiled;
use serde_json::json;
use std::time::Instant;

/// The misuse of an option that is given once per output of a `count`-output kernel but was
/// given `given` times.
pub fn per_output_misuse(kernel: &str, count: usize, option: &str, given: usize) -> Failure {
    let plural = |k: usize| if k == 1 { "" } else { "s" };
    Failure::Usage(format!(
        "kernel `{kernel}` returns {count} value{} but {option} was given {given} time{}: give it once per output, in order",
        plural(count),
        plural(given),
    ))
}

/// Outputs with at most this many elements are included whole in `--format json`.
const JSON_VALUES_LIMIT: usize = 65_536;

pub fn run(args: &RunArgs) -> CliResult {
    for path in &args.output {
        crate::output_path::check("--output", path)?;
    }
    let start = Instant::now();
    let prepared = prepare(&args.shared, true)?;
    let prepare_ms = start.elapsed().as_secs_f64() * 1e3;
    let kernel = prepared.kernel();
    let count = kernel.outputs().len();
    if !args.output.is_empty() && args.output.len() != count {
        return Err(per_output_misuse(
            &kernel.name,
            count,
            "--output",
            args.output.len(),
        ));
    }
    let mut notes = prepared.notes.clone();
    let ceilings = attnc::machine::machine_ceilings();
    if let Some(ms) = ceilings.measure_ms {
        notes.push(format!(
            "note: measured this machine's ceilings for the cost model in {ms:.0} ms (once: they are cached; not part of compile time)"
        ));
    }
    if args.verify {
        // Refused before the run, not after it.
        prepared
            .compiler
            .check_interp_memory(kernel, &prepared.bindings)
            .map_err(|e| Failure::input("verify", e.to_string()))?;
    }
    let (outputs, timing) = execute_timed(&prepared)?;
    notes.extend(timing.approx_notes.iter().cloned());
    let verifications = if args.verify {
        verify(&prepared, &outputs, &timing)?
    } else {
        Vec::new()
    };
    // The first output is reported as before; the others are listed after it.
    let output = outputs
        .first()
        .ok_or_else(|| Failure::input("run", "the kernel returned no value"))?;
    let verification =
        verifications
            .iter()
            .fold(None, |worst: Option<&Verification>, v| match worst {
                Some(w) if w.error - w.bound >= v.error - v.bound => Some(w),
                _ => Some(v),
            });
    write_outputs(&args.output, &outputs)?;
    let values = output.to_f32_vec();
    let stats = Stats::of(&values);
    if args.shared.format.is_json() {
        let mut doc = json!({
            "ok": true,
            "kernel": kernel.name,
            "engine": prepared.engine.name(),
            "threads": prepared.threads,
            "bindings": prepared.bindings,
            "policy": prepared.policy.to_string(),
            "shape": output.shape,
            "dtype": output.dtype_name(),
            "time_ms": timing.run_ms,
            "compile_ms": timing.compile_ms,
            "prepare_ms": prepare_ms,
            "ceilings_measure_ms": ceilings.measure_ms,
            "validation_ms": timing.validation_ms,
            "skipped_fraction": timing.skipped_fraction,
            "stats": stats.to_json(),
            "output": args.output.first().map(|p| p.display().to_string()),
            "notes": notes,
            "approximations": timing.approximations,
            "validations": timing.validations,
        });
        if let Some(v) = verification {
            doc["verify"] = v.to_json();
            if !v.passed() {
                doc["ok"] = json!(false);
                doc["error"] = json!({ "kind": "verify", "message": v.failure() });
            }
        }
        if values.len() <= JSON_VALUES_LIMIT {
            doc["values"] = json!(values);
        }
        if outputs.len() > 1 {
            doc["outputs"] = json!(outputs
                .iter()
                .enumerate()
                .map(|(k, o)| output_json(k, o, args.output.get(k), verifications.get(k)))
                .collect::<Vec<_>>());
        }
        crate::print_json(&doc);
    } else {
        for note in &notes {
            eprintln!("{note}");
        }
        print_text(&prepared, output, &values, &stats, &timing);
        for (k, extra) in outputs.iter().enumerate().skip(1) {
            let values = extra.to_f32_vec();
            outln!(
                "output {k}: {}{:?}  stats: {}",
                extra.dtype_name(),
                extra.shape,
                Stats::of(&values).line()
            );
        }
        for (k, v) in verifications.iter().enumerate() {
            let which = if outputs.len() > 1 {
                format!(" (output {k})")
            } else {
                String::new()
            };
            outln!(
                "verify{which}: relative L2 error {:.3e} against the interpreter (max abs {:.3e}, {} NaN mismatches; bound {:.0e})",
                v.relative_l2, v.max_abs, v.nan_mismatches, v.bound
            );
        }
        for path in &args.output {
            outln!("wrote {}", path.display());
        }
        if let Some(v) = verification.as_ref().filter(|v| !v.passed()) {
            eprintln!("error: {}", v.failure());
        }
    }
    match verification {
        Some(v) if !v.passed() => Err(Failure::Reported),
        _ => Ok(()),
    }
}

/// Writes each output to its path (each atomically, as one file is), holding the interrupt
/// handler's lock for the whole set; if one write fails, the files already written are
/// removed, so a failed run leaves none of its outputs behind.
fn write_outputs(paths: &[std::path::PathBuf], outputs: &[Tensor]) -> Result<(), Failure> {
    if paths.is_empty() {
        return Ok(());
    }
    let mut written = crate::OUTPUT_WRITTEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (k, (path, output)) in paths.iter().zip(outputs).enumerate() {
        if let Err(e) = attnc::io::write_npy(path, output) {
            for done in &paths[..k] {
                let _ = std::fs::remove_file(done);
            }
            return Err(Failure::input("output", e.to_string()));
        }
    }
    *written = true;
    Ok(())
}

/// One output of a kernel returning several, for `--format json`.
fn output_json(
    k: usize,
    output: &Tensor,
    path: Option<&std::path::PathBuf>,
    verification: Option<&Verification>,
) -> serde_json::Value {
    let values = output.to_f32_vec();
    let mut doc = json!({
        "index": k,
        "shape": output.shape,
        "dtype": output.dtype_name(),
        "stats": Stats::of(&values).to_json(),
        "output": path.map(|p| p.display().to_string()),
    });
    if let Some(v) = verification {
        doc["verify"] = v.to_json();
    }
    if values.len() <= JSON_VALUES_LIMIT {
        doc["values"] = json!(values);
    }
    doc
}

/// Wall-clock times of one run, in milliseconds.
struct Timing {
    /// The whole compile step, validation included.
    compile_ms: Option<f64>,
    /// What validating approximations added to `compile_ms`.
    validation_ms: f64,
    run_ms: f64,
    /// The fraction of the fused attention work that zero gates skipped (`None`: the
    /// interpreter, which has no fused kernel).
    skipped_fraction: Option<f64>,
    /// What the policy's approximations became, for people.
    approx_notes: Vec<String>,
    /// The optimizer's approximation outcomes, for `--format json`.
    approximations: serde_json::Value,
    /// The calibration measurements, for `--format json`.
    validations: serde_json::Value,
}

/// Runs the prepared kernel, timing compilation and execution apart for the JIT; every
/// output, in order.
fn execute_timed(prepared: &Prepared) -> Result<(Vec<Tensor>, Timing), Failure> {
    let kernel = prepared.kernel();
    let fail = |e: attnc::engine::RunError| Failure::input("run", e.to_string());
    match prepared.engine {
        Engine::Jit => {
            let compiled = prepared.compile().map_err(fail)?;
            let (approx_notes, approximations, validations) = if prepared.policy.is_exact() {
                (Vec::new(), json!([]), json!([]))
            } else {
                (
                    approximation_notes(&prepared.policy, &compiled),
                    json!(compiled.trace.approximations),
                    json!(compiled.validations),
                )
            };
            let start = Instant::now();
            let output = compiled
                .run_all(&prepared.inputs, prepared.threads)
                .map_err(fail)?;
            let run_ms = start.elapsed().as_secs_f64() * 1e3;
            Ok((
                output,
                Timing {
                    compile_ms: Some(compiled.elapsed.as_secs_f64() * 1e3),
                    validation_ms: compiled.validation_ms(),
                    run_ms,
                    skipped_fraction: Some(compiled.code.skipped_fraction()),
                    approx_notes,
                    approximations,
                    validations,
                },
            ))
        }
        Engine::Interp => {
            prepared
                .compiler
                .check_interp_memory(kernel, &prepared.bindings)
                .map_err(fail)?;
            let start = Instant::now();
            let output = execute_all(
                kernel,
                &prepared.bindings,
                &prepared.inputs,
                prepared.engine,
                prepared.threads,
            )
            .map_err(fail)?;
            let run_ms = start.elapsed().as_secs_f64() * 1e3;
            Ok((
                output,
                Timing {
                    compile_ms: None,
                    validation_ms: 0.0,
                    run_ms,
                    skipped_fraction: None,
                    approx_notes: if prepared.policy.is_exact() {
                        Vec::new()
                    } else {
                        vec!["note: the interpreter is exact: no approximation applied".to_string()]
                    },
                    approximations: json!([]),
                    validations: json!([]),
                },
            ))
        }
    }
}

/// How far a result is from the interpreter's on the same inputs, and the bound it is held to.
struct Verification {
    relative_l2: f64,
    max_abs: f64,
    nan_mismatches: usize,
    /// The judged error ([`attnc::ir::compare::Comparison::error`]).
    error: f64,
    /// The plan's contract: the language's bound for exact plans, the policy's `tol` when an
    /// approximation was applied.
    bound: f64,
}

impl Verification {
    fn passed(&self) -> bool {
        self.error <= self.bound
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "engine": "interp",
            "relative_l2_error": self.relative_l2,
            "max_abs_error": self.max_abs,
            "nan_mismatches": self.nan_mismatches,
            "bound": self.bound,
            "passed": self.passed(),
        })
    }

    fn failure(&self) -> String {
        format!(
            "--verify: the error {:.3e} against the interpreter exceeds the plan's bound {:.0e}",
            self.error, self.bound
        )
    }
}

/// Runs the reference interpreter on the same inputs and measures the error of every output
/// against the plan's contract.
fn verify(
    prepared: &Prepared,
    outputs: &[Tensor],
    timing: &Timing,
) -> Result<Vec<Verification>, Failure> {
    let references = execute_all(
        prepared.kernel(),
        &prepared.bindings,
        &prepared.inputs,
        Engine::Interp,
        1,
    )
    .map_err(|e| Failure::input("run", e.to_string()))?;
    let approximated = timing
        .approximations
        .as_array()
        .is_some_and(|list| list.iter().any(|o| o["applied"] == json!(true)));
    Ok(outputs
        .iter()
        .zip(&references)
        .zip(prepared.kernel().outputs())
        .map(|((output, reference), o)| {
            verify_one(prepared, output, reference, o.dtype, approximated)
        })
        .collect())
}

/// The error of one output against the interpreter's value of it.
fn verify_one(
    prepared: &Prepared,
    output: &Tensor,
    reference: &Tensor,
    dtype: attnc::ir::DType,
    approximated: bool,
) -> Verification {
    let c = attnc::ir::compare::compare(output.to_f64_vec(), reference.to_f64_vec());
    let exact_bound = match dtype {
        // A half-precision result is rounded once on store: its own rounding error.
        attnc::ir::DType::F16 => 1e-3,
        attnc::ir::DType::Bf16 => 1e-2,
        // (No kernel returns i32: the checker refuses it.)
        attnc::ir::DType::F32 | attnc::ir::DType::I32 => attnc::ir::compare::tol::EXACT_CONTRACT,
    };
    Verification {
        relative_l2: c.relative_l2,
        max_abs: c.max_abs,
        nan_mismatches: c.nan_mismatches,
        error: c.error(),
        bound: if approximated {
            prepared.policy.tol.max(exact_bound)
        } else {
            exact_bound
        },
    }
}

fn print_text(
    prepared: &Prepared,
    output: &Tensor,
    values: &[f32],
    stats: &Stats,
    timing: &Timing,
) {
    let kernel = prepared.kernel();
    let bindings: Vec<String> = prepared
        .bindings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let validation = if timing.validation_ms > 0.0 {
        format!(" (validation {:.3} ms)", timing.validation_ms)
    } else {
        String::new()
    };
    let timing = match timing.compile_ms {
        Some(compile_ms) => format!(
            "{} engine, {} threads, compile {compile_ms:.3} ms{validation}, run {:.3} ms",
            prepared.engine.name(),
            prepared.threads,
            timing.run_ms
        ),
        None => format!("{} engine, {:.3} ms", prepared.engine.name(), timing.run_ms),
    };
    outln!(
        "kernel {} [{}] -> {}{:?}  ({timing})",
        kernel.name,
        bindings.join(", "),
        output.dtype_name(),
        output.shape,
    );
    outln!("policy: {}", prepared.policy);
    outln!(
        "stats: min {:.6} max {:.6} mean {:.6} l2 {:.6} nan {}",
        stats.min,
        stats.max,
        stats.mean,
        stats.l2,
        stats.nan
    );
    let row = output.shape.last().copied().unwrap_or(1).clamp(1, 8);
    let head: Vec<String> = values.iter().take(row).map(|v| format!("{v:.6}")).collect();
    if !head.is_empty() {
        let more = if values.len() > head.len() {
            ", ..."
        } else {
            ""
        };
        outln!("first: [{}{more}]", head.join(", "));
    }
}

/// Summary statistics of an output, over its finite and non-finite values alike.
pub(crate) struct Stats {
    min: f64,
    max: f64,
    mean: f64,
    l2: f64,
    nan: usize,
}

impl Stats {
    /// `min … max … mean … l2 … nan …`, for people.
    pub(crate) fn line(&self) -> String {
        format!(
            "min {:.6} max {:.6} mean {:.6} l2 {:.6} nan {}",
            self.min, self.max, self.mean, self.l2, self.nan
        )
    }

    pub(crate) fn of(values: &[f32]) -> Stats {
        let mut stats = Stats {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            l2: 0.0,
            nan: 0,
        };
        let mut sum = 0.0;
        for &v in values {
            let v = f64::from(v);
            if v.is_nan() {
                stats.nan += 1;
                continue;
            }
            stats.min = stats.min.min(v);
            stats.max = stats.max.max(v);
            sum += v;
            stats.l2 += v * v;
        }
        let counted = values.len() - stats.nan;
        if counted == 0 {
            stats.min = f64::NAN;
            stats.max = f64::NAN;
        }
        stats.mean = if counted == 0 {
            f64::NAN
        } else {
            sum / counted as f64
        };
        stats.l2 = stats.l2.sqrt();
        stats
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        json!({
            "min": self.min, "max": self.max, "mean": self.mean, "l2": self.l2, "nan": self.nan,
        })
    }
}

/// What became of each allowed approximation, one note per line.
fn approximation_notes(policy: &Policy, result: &Compiled) -> Vec<String> {
    let mut notes: Vec<String> = result
        .summary(policy.tol)
        .into_iter()
        .map(|line| format!("note: {line}"))
        .collect();
    for outcome in &result.trace.approximations {
        if let (false, Some(why)) = (outcome.applied, &outcome.reason) {
            notes.push(format!("note: {} not applied: {why}", outcome.name));
        }
    }
    if !result.approximates() {
        notes.push("note: the plan is exact".to_string());
    }
    notes
}
