//! Compiling under an approximation policy: optimize with the allowed approximate rules, then
//! measure the chosen plan against the exact plan on a calibration sample, and fall back to
//! a plan without an approximation whose measured error exceeds the tolerance.
//!
//! The calibration sample is small ([`crate::calibration`]): inputs are standard-normal values
//! from the policy's seed (or the tensors given with `--calibrate`), and only a few hundred
//! query rows of the first batch entry are compared. When a plan ends in the fused attention
//! kernel (the exact plan of softmax attention, the int8 plan, Linformer), only those rows are
//! computed.
//!
//! When the kernel computes each entry of its leading batch axis on its own
//! ([`crate::calibration::entry`]), both plans are compiled a second time for the sample with
//! that axis bound to 1 and run on the first entry's inputs: the same rows, without the other
//! entries' work in plans that do not end in a fused attention.
//!
//! Validation is on the critical path of `attnc run`, so the exact plan is optimized and
//! compiled on a second thread while the approximate plan compiles, the exact rows are
//! computed once however many plans are measured, and a fallback to the exact plan reuses its
//! machine code. Measured on one entry, a sample of one block per input is drawn while the
//! approximate plan compiles for it, and the plan is compiled for the run's shape only once
//! accepted.

use crate::calibration::entry::{one_entry_bindings, one_entry_input, separable_along};
use crate::calibration::rows::{cut_to_rows, RowCut};
use crate::calibration::{calibration_inputs, one_block_each, sample_rows, Fill};
use crate::compiler::{Calibration, Compiler};
use crate::engine::RunError;
use crate::io::Tensor;
use crate::policy::Policy;
use attnc_ir::dim::resolve_shape;
use attnc_ir::random::RandomKind;
use attnc_ir::{Bindings, Kernel, Op};
use attnc_jit::cache::fingerprint;
use attnc_jit::{CompiledKernel, Input};
use attnc_opt::{Approx, ApproxPolicy, Trace};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One measurement of a plan's approximations on the calibration sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Validation {
    /// The approximations the measured plan uses, as spelled.
    pub approximations: Vec<String>,
    /// Their largest estimated error.
    pub estimated_error: f64,
    /// `‖y − y_exact‖₂ / ‖y_exact‖₂` over the sampled rows.
    pub measured_error: f64,
    /// Whether the plan was kept (`measured_error ≤ tol`).
    pub accepted: bool,
    /// The number of output rows compared.
    pub sample_rows: usize,
    /// Where the sample came from: `random(seed = S)`, the calibration files, the inputs.
    pub sample: String,
    /// Wall time this measurement added to compilation, in milliseconds: from the approximate
    /// plan's machine code being ready to the verdict (waiting for the exact plan, which
    /// compiles beside the approximate one, included).
    pub millis: f64,
    /// Where that time went.
    pub cost: ValidationCost,
}

/// The work of one measurement, in milliseconds of wall time on the thread that did it (the
/// exact plan compiles on its own thread, so these may add up to more than `millis`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ValidationCost {
    /// Optimizing and compiling the exact plan (0 when an earlier measurement did it).
    pub exact_compile_ms: f64,
    /// Drawing the calibration inputs (0 when an earlier measurement did it).
    pub inputs_ms: f64,
    /// Running the exact plan on the sample (0 when an earlier measurement did it).
    pub exact_sample_ms: f64,
    /// Running the approximate plan on the sample.
    pub approximate_sample_ms: f64,
}

impl Validation {
    /// The measurement in one line, for people.
    pub fn summary(&self, tol: f64) -> String {
        let verdict = if self.accepted {
            "accepted".to_string()
        } else {
            format!("rejected (above tol {tol}), falling back")
        };
        format!(
            "approximation {}: measured error {:.2e} (estimated {:.1e}) on {} rows of {}, {verdict}",
            self.approximations.join(" + "),
            self.measured_error,
            self.estimated_error,
            self.sample_rows,
            self.sample
        )
    }
}

/// A kernel compiled under a policy.
pub struct PolicyCompiled {
    /// The machine code of the accepted plan.
    pub compiled: CompiledKernel,
    /// The optimizer's record of the accepted plan; its approximation outcomes include the
    /// measured errors, and approximations rejected by measurement.
    pub trace: Trace,
    /// Every measurement, in order (empty when the plan is exact).
    pub validations: Vec<Validation>,
}

/// The approximations of `policy` as the optimizer sees them (seeded).
pub fn optimizer_policy(policy: &Policy) -> ApproxPolicy {
    use attnc_syntax::ast::ApproxKind;
    let seed = policy.seed();
    let allowed = policy
        .allowed
        .iter()
        .filter_map(|kind| match kind {
            ApproxKind::Bf16 => Some(Approx::Bf16),
            ApproxKind::F16 => Some(Approx::F16),
            ApproxKind::Int8 => Some(Approx::Int8),
            ApproxKind::Bf16Products => Some(Approx::Bf16Products),
            ApproxKind::Lowrank { r } => Some(Approx::LowRank { r: *r, seed }),
            ApproxKind::RandomFeatures { m, seed: s } => Some(Approx::RandomFeatures {
                m: *m,
                seed: s.unwrap_or(seed),
            }),
            ApproxKind::Nystrom { m } => Some(Approx::Nystrom { m: *m }),
            ApproxKind::Tol(_) => None,
        })
        .collect();
    ApproxPolicy {
        allowed,
        tol: policy.tol,
    }
}

/// The exact plan's side of every measurement: built once, on the first approximate plan.
struct Reference {
    /// The exact plan (to recognise a fallback that arrives at it).
    kernel: Kernel,
    /// Its machine code.
    code: CompiledKernel,
    /// The calibration inputs (the first batch entry's only while `one_entry` holds: the
    /// reference is dropped when that ends).
    inputs: Vec<Tensor>,
    /// The exact plan's sampled rows, computed on the first measurement.
    rows: Option<Vec<f32>>,
}

/// Optimizes and compiles `kernel` under the compiler's policy, validating every
/// approximation the optimizer chose on a calibration sample (`calibration`: tensors by
/// parameter name and inputs a `--random` run drew already; the others are drawn from the
/// policy's seed) with the compiler's threads.
pub(crate) fn compile_with_policy(
    compiler: &Compiler,
    kernel: &Kernel,
    bindings: &Bindings,
    calibration: Calibration<'_>,
) -> Result<PolicyCompiled, RunError> {
    let policy = compiler.policy();
    let threads = compiler.threads();
    let drawn = calibration.drawn;
    // A run that drew its inputs (`--random SEED`) is validated on them: the sample comes
    // from the run's seed, so its blocks are copied rather than drawn again.
    let drew = drawn.tensors.iter().any(Option::is_some);
    let sample_seed = if drew { drawn.seed } else { policy.seed() };
    let label = calibration.label.unwrap_or("the calibration files");
    let calibration = calibration.tensors;
    // The sample on one batch entry where the kernel allows it: the given inputs cut to their
    // first entry (a tensor that does not fit keeps the full shape and its errors); the drawn
    // ones serve whole, their first block being that entry's.
    let mut one_entry = one_entry_bindings(kernel, bindings);
    let mut entry_given = Vec::new();
    if let Some((symbol, _)) = &one_entry {
        let entries = bindings.get(symbol).copied().unwrap_or(0) as usize;
        let cut = |p: &attnc_ir::Param, t: &Tensor| one_entry_input(p, symbol, entries, t);
        let given: Option<Vec<(String, Tensor)>> = calibration
            .iter()
            .map(|(name, t)| {
                let cut_t = match kernel.params.iter().find(|p| p.name == *name) {
                    Some(p) => cut(p, t),
                    None => Some(t.clone()),
                };
                cut_t.map(|t| (name.clone(), t))
            })
            .collect();
        match given {
            Some(g) => entry_given = g,
            None => one_entry = None,
        }
    }
    let mut approx = optimizer_policy(policy);
    let mut validations = Vec::new();
    let mut rejected = Vec::new();
    let mut reference: Option<Reference> = None;
    loop {
        let mut optimized = compiler.optimize_with(kernel, bindings, approx.clone());
        let applied: Vec<Approx> = optimized
            .trace
            .approximations
            .iter()
            .filter(|o| o.applied)
            .map(|o| o.approx)
            .collect();
        if applied.is_empty() {
            let compiled = match reference.take() {
                // Falling back to the exact plan: its code is already compiled (for the run's
                // shape unless the sample was one entry's).
                Some(r)
                    if one_entry.is_none()
                        && fingerprint(&r.kernel) == fingerprint(&optimized.kernel) =>
                {
                    r.code
                }
                _ => compiler.compile_plan(&optimized.kernel, bindings)?,
            };
            optimized.trace.approximations.extend(rejected);
            return Ok(PolicyCompiled {
                compiled,
                trace: optimized.trace,
                validations,
            });
        }
        // A plan that mixes the entries (or will not compile for one) is measured at the run's
        // shape, against a reference built for it.
        let sample_one = match &one_entry {
            Some((symbol, one)) if separable_along(&optimized.kernel, symbol) => Some(one),
            _ => None,
        };
        // A one-entry sample whose inputs are one block each does not depend on the plan
        // (`Fill` has nothing to fill): the first time, it is drawn while the plan compiles.
        let draw_early =
            reference.is_none() && sample_one.is_some_and(|one| one_block_each(kernel, one));
        // Everything from here on is the validation's work when the sample is drawn early
        // (the one-entry plan exists for the sample only).
        let early_start = Instant::now();
        let (sample_plan, mut early_inputs, mut early_exact) = std::thread::scope(|scope| {
            let early = sample_one.filter(|_| draw_early).map(|one| {
                let given = &entry_given[..];
                scope.spawn(move || {
                    timed(|| {
                        calibration_inputs(
                            kernel,
                            one,
                            sample_seed,
                            given,
                            drawn,
                            Fill::Repeat,
                            threads,
                        )
                    })
                })
            });
            // Seeded matrices (Performer's features) are drawn on a thread of their own while
            // the plan compiles: they are kept per process
            // (`attnc_ir::random::shared_random_matrix`), and its constant steps wait for them.
            let matrices =
                sample_one.map_or_else(Vec::new, |one| random_matrices(&optimized.kernel, one));
            if !matrices.is_empty() {
                scope.spawn(move || {
                    for (kind, seed, rows, cols) in matrices {
                        attnc_ir::random::shared_random_matrix(kind, seed, rows, cols);
                    }
                });
            }
            // The exact plan for the same sample compiles on a third thread meanwhile.
            let exact = sample_one
                .filter(|_| draw_early)
                .map(|one| scope.spawn(move || timed(|| exact_plan(compiler, kernel, one))));
            let plan = sample_one.and_then(|one| sample_plan(compiler, &optimized.kernel, one));
            (plan, early.map(joined), exact.map(joined))
        });
        let (one_entry_plan, row_cut) = match sample_plan {
            Some((code, cut)) => (Some(code), cut),
            None => (None, None),
        };
        if one_entry_plan.is_none() && one_entry.take().is_some() {
            reference = None;
            early_inputs = None;
            early_exact = None;
        }
        let (sample_bindings, given) = match &one_entry {
            Some((_, one)) => (one, &entry_given[..]),
            None => (bindings, calibration),
        };
        let mut cost = ValidationCost::default();
        // Measured on one entry, the plan is compiled for the run's shape only once accepted.
        let compile_full = || match one_entry_plan {
            Some(_) => None,
            None => Some(compiler.compile_plan(&optimized.kernel, bindings)),
        };
        let (compiled, ready) = match &reference {
            Some(_) => (compile_full().transpose()?, Instant::now()),
            None => {
                let (compiled, ready, built) = std::thread::scope(|scope| {
                    let exact = early_exact.is_none().then(|| {
                        scope.spawn(|| timed(|| exact_plan(compiler, kernel, sample_bindings)))
                    });
                    let compiled = compile_full();
                    let ready = match early_inputs {
                        Some(_) => early_start,
                        None => Instant::now(),
                    };
                    let fill = match (&one_entry_plan, &compiled) {
                        _ if row_cut.is_some() => Fill::Repeat,
                        (Some(code), _) | (None, Some(Ok(code))) => Fill::for_plan(code.plan()),
                        _ => Fill::Repeat,
                    };
                    let inputs = early_inputs.unwrap_or_else(|| {
                        timed(|| {
                            calibration_inputs(
                                kernel,
                                sample_bindings,
                                sample_seed,
                                given,
                                drawn,
                                fill,
                                threads,
                            )
                        })
                    });
                    let exact = match exact {
                        Some(h) => joined(h),
                        None => early_exact.expect("invariant: compiled early when not here"),
                    };
                    (compiled, ready, (exact, inputs))
                });
                let ((exact, exact_time), (inputs, inputs_time)) = built;
                let (exact_kernel, code) = exact?;
                cost.exact_compile_ms = millis(exact_time);
                cost.inputs_ms = millis(inputs_time);
                reference = Some(Reference {
                    kernel: exact_kernel,
                    code,
                    inputs: inputs?,
                    rows: None,
                });
                (compiled.transpose()?, ready)
            }
        };
        let r = reference.as_mut().expect("invariant: built above");
        let views: Vec<Input<'_>> = r.inputs.iter().map(crate::engine::input_view).collect();
        let sampled = one_entry_plan
            .as_ref()
            .or(compiled.as_ref())
            .expect("invariant: compiled for the run's shape without a one-entry plan");
        let rows = sample_rows(r.code.output_shape());
        // A plan cut to the sampled rows runs on those rows of its row-wise inputs, all of
        // its output being the sample.
        let cut_inputs = row_cut.as_ref().map(|cut| cut.cut_inputs(&r.inputs));
        let (sampled_views, sampled_rows) = match &cut_inputs {
            Some(cut) => (
                r.inputs
                    .iter()
                    .zip(cut)
                    .map(|(whole, cut)| crate::engine::input_view(cut.as_ref().unwrap_or(whole)))
                    .collect(),
                sample_rows(sampled.output_shape()),
            ),
            None => (views.clone(), rows.clone()),
        };
        let ((approximate, approximate_time), exact) = std::thread::scope(|scope| {
            // The first time, the exact rows are computed beside the approximate ones, the
            // threads split between them: the samples are small, and two plans on all the
            // threads each would contend for the cores and for the memory map (their fresh
            // temporaries fault in at once).
            let beside = r.rows.is_none();
            let exact_threads = (threads / 2).max(1);
            let own_threads = if beside {
                threads - threads / 2
            } else {
                threads
            }
            .max(1);
            let exact = beside.then(|| {
                let (code, views, rows) = (&r.code, &views, &rows);
                scope.spawn(move || timed(|| code.run_sample(views, exact_threads, rows)))
            });
            let approximate =
                timed(|| sampled.run_sample(&sampled_views, own_threads, &sampled_rows));
            (approximate, exact.map(joined))
        });
        if let Some((exact_rows, time)) = exact {
            cost.exact_sample_ms = millis(time);
            r.rows = Some(exact_rows?);
        }
        let expected = r.rows.as_deref().unwrap_or_default();
        cost.approximate_sample_ms = millis(approximate_time);
        let measured = relative_l2(&approximate?, expected);
        let accepted = measured <= approx.tol;
        let width = sampled.output_shape().last().copied().unwrap_or(1).max(1);
        let random = format!("random(seed = {sample_seed})");
        let sample = match (calibration.is_empty(), drew) {
            (true, _) => random,
            (false, true) => format!("{label} and {random}"),
            (false, false) => label.to_string(),
        };
        validations.push(Validation {
            approximations: applied.iter().map(Approx::to_string).collect(),
            estimated_error: applied
                .iter()
                .map(Approx::estimated_error)
                .fold(0.0, f64::max),
            measured_error: measured,
            accepted,
            sample_rows: expected.len() / width,
            sample,
            millis: millis(ready.elapsed()),
            cost,
        });
        for outcome in &mut optimized.trace.approximations {
            if outcome.applied {
                outcome.measured_error = Some(measured);
            }
        }
        if accepted {
            let compiled = match compiled {
                Some(code) => code,
                None => compiler.compile_plan(&optimized.kernel, bindings)?,
            };
            optimized.trace.approximations.extend(rejected);
            return Ok(PolicyCompiled {
                compiled,
                trace: optimized.trace,
                validations,
            });
        }
        // Fall back: forbid what this plan used and optimize again.
        for outcome in &mut optimized.trace.approximations {
            if outcome.applied {
                outcome.applied = false;
                outcome.reason = Some(format!(
                    "its measured error {measured:.2e} exceeds the tolerance {:.1e}",
                    approx.tol
                ));
                rejected.push(outcome.clone());
            }
        }
        approx.allowed.retain(|a| !applied.contains(a));
    }
}

/// The approximate plan `plan` compiled for the one-entry sample `bindings`: cut to the
/// sampled rows where its rows allow it ([`cut_to_rows`]), else whole.
fn sample_plan(
    compiler: &Compiler,
    plan: &Kernel,
    bindings: &Bindings,
) -> Option<(CompiledKernel, Option<RowCut>)> {
    let output = resolve_shape(&plan.graph.node(plan.output).shape, bindings);
    let cut = output.and_then(|shape| cut_to_rows(plan, bindings, &sample_rows(&shape)));
    if let Some(cut) = cut {
        if let Ok(code) = compiler.compile_plan(&cut.kernel, &cut.bindings) {
            return Some((code, Some(cut)));
        }
    }
    compiler
        .compile_plan(plan, bindings)
        .ok()
        .map(|code| (code, None))
}

/// The exact plan of `kernel` and its machine code.
fn exact_plan(
    compiler: &Compiler,
    kernel: &Kernel,
    bindings: &Bindings,
) -> Result<(Kernel, CompiledKernel), RunError> {
    let plan = compiler.optimize_exact(kernel, bindings).kernel;
    let code = compiler.compile_plan(&plan, bindings)?;
    Ok((plan, code))
}

/// The seeded `[rows, cols]` matrices `plan` names at `bindings`.
fn random_matrices(plan: &Kernel, bindings: &Bindings) -> Vec<(RandomKind, u64, usize, usize)> {
    plan.graph
        .topo_order()
        .into_iter()
        .filter_map(|id| {
            let node = plan.graph.node(id);
            let Op::Random { kind, seed } = node.op else {
                return None;
            };
            match resolve_shape(&node.shape, bindings)?.as_slice() {
                &[rows, cols] => Some((kind, seed, rows, cols)),
                _ => None,
            }
        })
        .collect()
}

/// What a scoped thread returned (its panic resumed here).
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `f()` and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The first parameter whose input holds a NaN or an infinity (segment ids never do). Such an
/// input forbids every approximation for its run: one could hide them, or spread them
/// differently from the exact plan (`attnc run` falls back to the exact policy, a Python
/// call to the exact plan).
pub fn non_finite_input<'k>(kernel: &'k Kernel, inputs: &[Input<'_>]) -> Option<&'k str> {
    let finite = |input: &Input<'_>| match *input {
        Input::F32(v) => v.iter().all(|x| x.is_finite()),
        Input::F16(v) => v.iter().all(|x| x.is_finite()),
        Input::Bf16(v) => v.iter().all(|x| x.is_finite()),
        Input::I32(_) => true,
    };
    kernel
        .params
        .iter()
        .zip(inputs)
        .find(|(_, input)| !finite(input))
        .map(|(param, _)| param.name.as_str())
}

/// `‖a − b‖₂ / ‖b‖₂` judged by the project's one metric ([`attnc_ir::compare`]): the
/// absolute norm when `b` is zero, infinite on a NaN or infinity of one side only or a length
/// mismatch, so such a plan is never accepted.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    attnc_ir::compare::relative_l2(a, b)
}
