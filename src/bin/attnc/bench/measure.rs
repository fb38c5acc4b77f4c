//! Timing one kernel at one shape: the compiled kernel, the reference interpreter and a naive
//! Rust implementation, next to the f32x4 FMA ceiling measured in the same run.
//!
//! Every engine gets `--warmup` untimed runs and then `--runs` timed ones; the median and the
//! minimum are reported. The slow baselines (interpreter, naive) run once first; when that
//! took more than [`SLOW_SECONDS`] they are not repeated, and they are repeated at most until
//! [`BASELINE_BUDGET_SECONDS`] are spent. The interpreter is skipped up front when its
//! estimated time or memory is too large (or with `--no-interp`).

use crate::args::BenchArgs;
use crate::failure::Failure;
use crate::inputs::Prepared;
use attnc::baseline::{naive_attention, plain_attention, useful_flops_on, FlopCount};
use attnc::engine::{execute, run_compiled, Engine};
use attnc::policy::Policy;
use attnc_jit::ceiling::{measure_f32x4_ceiling, Ceiling};
use attnc_jit::plan::{Plan, StepKind};
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
pub const COMPILES: usize = 3;

/// Timings of one engine at one thread count.
pub struct Row {
    /// `jit`, `exact` (the exact plan, when the JIT row is approximate), `interp` or `naive`.
    pub engine: &'static str,
    /// Worker threads it ran on.
    pub threads: usize,
    /// Seconds per call, one per timed run.
    pub samples: Vec<f64>,
}

impl Row {
    /// Median milliseconds per call.
    pub fn median_ms(&self) -> f64 {
        median(&self.samples) * 1e3
    }
    /// Fastest call in milliseconds.
    pub fn min_ms(&self) -> f64 {
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

/// Warm-up and `runs` timed calls of two engines, alternating (`a`, `b`, `a`, `b`, …), so
/// that both see the same machine: on a shared host a slow minute then slows both samples
/// of a round instead of one engine's whole series. Returns `(a's, b's)` samples.
fn time_interleaved(
    runs: usize,
    warmup: usize,
    mut a: impl FnMut() -> Result<(), Failure>,
    mut b: impl FnMut() -> Result<(), Failure>,
) -> Result<(Vec<f64>, Vec<f64>), Failure> {
    for _ in 0..warmup {
        a()?;
        b()?;
    }
    let mut samples = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        samples.0.push(time(&mut a)?);
        samples.1.push(time(&mut b)?);
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
            StepKind::Prefix(p) | StepKind::Chunked(p) => Some(quadratic_flops(p)),
            StepKind::Linear(step) => Some(quadratic_flops(&step.spec)),
            _ => None,
        })
        .sum()
}

/// The quadratic form's FLOPs of a linear attention step, which the interpreter computes.
fn quadratic_flops(p: &attnc_jit::kernels::prefix::PrefixSpec) -> f64 {
    2.0 * (p.d + p.dv + 1) as f64 * p.batch_count() as f64 * p.m as f64 * p.n as f64
}

/// The f32x4 FMA ceiling of the portable tier and the machine's 512-bit FMA peak, at 1 thread
/// and at the benchmark's thread count, measured once per command and shared by every kernel
/// and shape it times. Rates are reported against the peak, so a kernel's "percent" never
/// hides the gap to the hardware.
#[derive(Clone, Copy)]
pub struct Ceilings {
    /// At 1 thread.
    pub one: Ceiling,
    /// At `threads` (the same as `one` when `threads` is 1).
    pub at_threads: Ceiling,
    /// The benchmark's thread count.
    pub threads: usize,
    /// The 512-bit FMA peak at 1 thread and at `threads` (GFLOP/s; `None` without AVX-512).
    pub peak: Option<(f64, f64)>,
}

impl Ceilings {
    /// Measures the ceiling at 1 thread and at `threads`.
    pub fn measure(threads: usize) -> Result<Ceilings, Failure> {
        let err = |e: attnc_jit::JitError| Failure::input("run", e.to_string());
        let one = measure_f32x4_ceiling(1).map_err(err)?;
        let at_threads = if threads > 1 {
            measure_f32x4_ceiling(threads).map_err(err)?
        } else {
            one
        };
        let peak = attnc_wide::peak::f32_fma_peak(1).map(|one| {
            let at = if threads > 1 {
                attnc_wide::peak::f32_fma_peak(threads).unwrap_or(one)
            } else {
                one
            };
            (one, at)
        });
        Ok(Ceilings {
            one,
            at_threads,
            threads,
            peak,
        })
    }

    /// The widest-vector peak at `t` threads (the f32x4 ceiling where no wider vector
    /// exists), when it was measured.
    pub fn peak_at(&self, t: usize) -> Option<f64> {
        match self.peak {
            Some((one, _)) if t == 1 => Some(one),
            Some((_, at)) if t == self.threads => Some(at),
            Some(_) => None,
            None => self.at(t).map(|c| c.gflops_total),
        }
    }

    /// The ceiling at `t` threads, when it was measured.
    pub fn at(&self, t: usize) -> Option<Ceiling> {
        if t == 1 {
            Some(self.one)
        } else if t == self.threads {
            Some(self.at_threads)
        } else {
            None
        }
    }
}

/// Everything timed for one kernel at one shape.
pub struct Measurement {
    /// Planning and code generation of each compile, in ms (`CompiledKernel::compile_time`).
    pub compile_ms: Vec<f64>,
    /// The whole `engine::compile` of each compile, optimizer included, in ms.
    pub total_ms: Vec<f64>,
    /// Steps of the kernel plan.
    pub steps: usize,
    /// Useful work of one call.
    pub flops: FlopCount,
    /// One row per engine and thread count, the JIT first (at `threads`, then at 1).
    pub rows: Vec<Row>,
    /// Why the interpreter was not timed, if it was not.
    pub interp_skip: Option<String>,
    /// Why the naive baseline was not timed, if it was not.
    pub naive_skip: Option<String>,
    /// The ceiling of the reduced-precision tier the JIT rows ran on, if any.
    pub tier: Option<super::tier::TierCeiling>,
    /// Notes for stderr (text) or the JSON document.
    pub notes: Vec<String>,
}

impl Measurement {
    /// The median of the first row of `engine`, in ms.
    pub fn median_ms(&self, engine: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.engine == engine)
            .map(Row::median_ms)
    }

    /// GFLOP/s of a call taking `ms` milliseconds.
    pub fn gflops(&self, ms: f64) -> f64 {
        self.flops.flops / (ms * 1e-3) / 1e9
    }

    /// How much faster the JIT is at `threads` than at 1 thread.
    pub fn jit_scaling(&self) -> Option<f64> {
        match (self.rows.first(), self.rows.get(1)) {
            (Some(a), Some(b)) if a.engine == "jit" && b.engine == "jit" && a.threads != 1 => {
                Some(b.median_ms() / a.median_ms())
            }
            _ => None,
        }
    }
}

/// Compiles the prepared kernel and times every engine on its inputs.
///
/// `on_phase` is told what is being timed next (for a progress display).
pub fn measure(
    prepared: &Prepared,
    args: &BenchArgs,
    mut on_phase: impl FnMut(&str),
) -> Result<Measurement, Failure> {
    let kernel = prepared.kernel();
    let mut notes = Vec::new();
    let runs = args.runs.max(1) as usize;
    let warmup = args.warmup as usize;
    let threads = prepared.threads;
    let fail = |e: attnc::engine::RunError| Failure::input("run", e.to_string());

    // Compile (timed a few times; the first includes one-time setup). Under an approximation
    // policy this is `run`'s compile: optimize with the allowed approximations and validate.
    on_phase("compile");
    let mut compile_ms = Vec::with_capacity(COMPILES);
    let mut total_ms = Vec::with_capacity(COMPILES);
    let mut compiled = None;
    let mut applied: Vec<String> = Vec::new();
    for _ in 0..COMPILES {
        let start = Instant::now();
        let result = prepared.compile().map_err(fail)?;
        // A named approximation the optimizer left out says why (once, from the first compile).
        if total_ms.is_empty() {
            for o in result.trace.approximations.iter().filter(|o| !o.applied) {
                let why = o.reason.as_deref().unwrap_or("no reason given");
                notes.push(format!("note: {} not applied: {why}", o.name));
            }
        }
        applied = result
            .trace
            .approximations
            .iter()
            .filter(|o| o.applied)
            .map(|o| match o.measured_error {
                Some(e) => format!("{} (measured error {e:.2e})", o.name),
                None => o.name.clone(),
            })
            .collect();
        let c = result.code;
        total_ms.push(start.elapsed().as_secs_f64() * 1e3);
        compile_ms.push(c.compile_time().as_secs_f64() * 1e3);
        compiled = Some(c);
    }
    let compiled = compiled.ok_or_else(|| Failure::input("run", "nothing compiled"))?;
    // With an approximation applied, the exact plan is timed too (row `exact`), and the useful
    // work and the baselines are those of the exact computation.
    let exact = if applied.is_empty() {
        None
    } else {
        notes.push(format!(
            "note: approximations applied: {}; row `exact` times the exact plan",
            applied.join(", ")
        ));
        let exact = prepared.compiler.clone().with_policy(Policy::exact());
        Some(
            exact
                .compile(kernel, &prepared.bindings)
                .map_err(fail)?
                .code,
        )
    };
    let reference = exact.as_ref().unwrap_or(&compiled);
    let ids = |p: usize| match prepared.inputs.get(p).map(|t| &t.data) {
        Some(attnc::io::TensorData::I32(ids)) => Some(ids.as_slice()),
        _ => None,
    };
    let flops = useful_flops_on(reference.plan(), &ids);
    let steps = compiled.plan().steps.len();
    let tier = super::tier::measure(compiled.plan(), threads);

    // The JIT at `threads` and at 1 thread; with an exact plan beside an approximate one,
    // the two alternate at `threads`, so that their ratio compares like with like.
    on_phase("jit");
    let compiled = &compiled;
    let run_jit = |t: usize| {
        move || {
            run_compiled(compiled, kernel.ret_dtype, &prepared.inputs, t)
                .map(drop)
                .map_err(fail)
        }
    };
    let mut rows = Vec::new();
    let mut exact_row = None;
    let first = match &exact {
        Some(exact) => {
            let run_exact = || {
                run_compiled(exact, kernel.ret_dtype, &prepared.inputs, threads)
                    .map(drop)
                    .map_err(fail)
            };
            let (jit, exact) = time_interleaved(runs, warmup, run_jit(threads), run_exact)?;
            exact_row = Some(Row {
                engine: "exact",
                threads,
                samples: exact,
            });
            jit
        }
        None => time_runs(runs, warmup, run_jit(threads))?,
    };
    rows.push(Row {
        engine: "jit",
        threads,
        samples: first,
    });
    if threads != 1 {
        rows.push(Row {
            engine: "jit",
            threads: 1,
            samples: time_runs(runs, warmup, run_jit(1))?,
        });
    }
    rows.extend(exact_row);

    // The interpreter.
    let (estimate_s, estimate_bytes) = interp_estimate(prepared, reference.plan(), &flops);
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
            on_phase("interp");
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
    let plain = plain_attention(reference.plan());
    let naive_skip = match &plain {
        None => Some("n/a: not plain attention".to_string()),
        Some(_) if args.no_naive => Some("--no-naive".to_string()),
        Some(_) => None,
    };
    if let (Some(plain), None) = (&plain, &naive_skip) {
        on_phase("naive");
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

    Ok(Measurement {
        compile_ms,
        total_ms,
        steps,
        flops,
        rows,
        interp_skip,
        naive_skip,
        tier,
        notes,
    })
}
