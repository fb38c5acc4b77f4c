//! Compiling under an approximation policy: optimize with the allowed approximate rules, then
//! measure the chosen plan against the exact plan on a calibration sample, and fall back to
//! a plan without an approximation whose measured error exceeds the tolerance.
//!
//! The calibration sample is small: inputs are standard-normal values from the policy's seed
//! (or the tensors given with `--calibrate`), and only a few hundred query rows of the first
//! batch entry are compared. When a plan ends in the fused attention kernel (the exact plan
//! of softmax attention, the int8 plan, Linformer), only those rows are computed.

use crate::engine::RunError;
use crate::io::{standard_normal, Tensor, TensorData};
use crate::policy::Policy;
use attnc_ir::dim::resolve_shape;
use attnc_ir::{Bindings, Kernel};
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use attnc_opt::{Approx, ApproxPolicy, Trace};
use serde::Serialize;
use std::ops::Range;
use std::time::Instant;

/// Query rows compared per calibration: `SAMPLE_RANGES` evenly spaced runs of
/// `SAMPLE_RUN` rows of the first batch entry (all rows when there are fewer).
pub const SAMPLE_RUN: usize = 64;
/// See [`SAMPLE_RUN`].
pub const SAMPLE_RANGES: usize = 4;

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
    /// Where the sample came from: `random(seed = S)` or the calibration files.
    pub sample: String,
    /// Wall time of the measurement (exact plan compilation included), in milliseconds.
    pub millis: f64,
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

impl PolicyCompiled {
    /// One line per measurement for people.
    pub fn summary(&self, tol: f64) -> Vec<String> {
        self.validations
            .iter()
            .map(|v| {
                let verdict = if v.accepted {
                    "accepted".to_string()
                } else {
                    format!("rejected (above tol {tol}), falling back")
                };
                format!(
                    "approximation {}: measured error {:.2e} (estimated {:.1e}) on {} rows of {}, {verdict}",
                    v.approximations.join(" + "),
                    v.measured_error,
                    v.estimated_error,
                    v.sample_rows,
                    v.sample
                )
            })
            .collect()
    }
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
            ApproxKind::Lowrank { r } => Some(Approx::LowRank { r: *r, seed }),
            ApproxKind::RandomFeatures { m, seed: s } => Some(Approx::RandomFeatures {
                m: *m,
                seed: s.unwrap_or(seed),
            }),
            ApproxKind::Tol(_) => None,
        })
        .collect();
    ApproxPolicy {
        allowed,
        tol: policy.tol,
    }
}

/// Optimizes and compiles `kernel` under `policy`, validating every approximation the
/// optimizer chose on a calibration sample (`calibration`: tensors by parameter name; the
/// others are drawn from the policy's seed), with `threads` workers.
pub fn compile_with_policy(
    kernel: &Kernel,
    bindings: &Bindings,
    policy: &Policy,
    calibration: &[(String, Tensor)],
    threads: usize,
) -> Result<PolicyCompiled, RunError> {
    let mut approx = optimizer_policy(policy);
    let mut validations = Vec::new();
    let mut rejected = Vec::new();
    let mut exact: Option<(CompiledKernel, Vec<Tensor>)> = None;
    loop {
        let mut optimized = crate::engine::optimize_with(kernel, bindings, approx.clone());
        let compiled =
            CompiledKernel::compile(&optimized.kernel, bindings, &CompileOptions::default())?;
        let applied: Vec<Approx> = optimized
            .trace
            .approximations
            .iter()
            .filter(|o| o.applied)
            .map(|o| o.approx)
            .collect();
        if applied.is_empty() {
            optimized.trace.approximations.extend(rejected);
            return Ok(PolicyCompiled {
                compiled,
                trace: optimized.trace,
                validations,
            });
        }
        let start = Instant::now();
        if exact.is_none() {
            let exact_kernel = crate::engine::optimize(kernel, bindings).kernel;
            let code =
                CompiledKernel::compile(&exact_kernel, bindings, &CompileOptions::default())?;
            let inputs = calibration_inputs(kernel, bindings, policy.seed(), calibration)?;
            exact = Some((code, inputs));
        }
        let (exact_code, inputs) = exact.as_ref().expect("set above");
        let views: Vec<Input<'_>> = inputs.iter().map(crate::engine::input_view).collect();
        let rows = sample_rows(compiled.output_shape());
        let reference = exact_code.run_sample(&views, threads, &rows)?;
        let approximate = compiled.run_sample(&views, threads, &rows)?;
        let measured = relative_l2(&approximate, &reference);
        let accepted = measured <= approx.tol;
        let width = compiled.output_shape().last().copied().unwrap_or(1).max(1);
        let sample = if calibration.is_empty() {
            format!("random(seed = {})", policy.seed())
        } else {
            "the calibration files".to_string()
        };
        validations.push(Validation {
            approximations: applied.iter().map(Approx::to_string).collect(),
            estimated_error: applied
                .iter()
                .map(Approx::estimated_error)
                .fold(0.0, f64::max),
            measured_error: measured,
            accepted,
            sample_rows: reference.len() / width,
            sample,
            millis: start.elapsed().as_secs_f64() * 1e3,
        });
        for outcome in &mut optimized.trace.approximations {
            if outcome.applied {
                outcome.measured_error = Some(measured);
            }
        }
        if accepted {
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

/// The output rows compared: a few evenly spaced runs of the first batch entry.
fn sample_rows(output_shape: &[usize]) -> Vec<Range<usize>> {
    let m = match output_shape.len() {
        0 | 1 => 1,
        r => output_shape[r - 2],
    };
    if m <= SAMPLE_RUN * SAMPLE_RANGES {
        return std::iter::once(0..m).collect();
    }
    (0..SAMPLE_RANGES)
        .map(|i| {
            // Spread over [0, m): the first run starts at 0, the last one ends at m.
            let start = i * (m - SAMPLE_RUN) / (SAMPLE_RANGES - 1);
            start..start + SAMPLE_RUN
        })
        .collect()
}

/// The calibration inputs: the given tensors, and standard-normal values elsewhere. Random
/// inputs repeat one drawn `[rows, cols]` block over their leading axes, so drawing them costs
/// a fraction of a run however many heads there are.
fn calibration_inputs(
    kernel: &Kernel,
    bindings: &Bindings,
    seed: u64,
    given: &[(String, Tensor)],
) -> Result<Vec<Tensor>, RunError> {
    let mut inputs = Vec::with_capacity(kernel.params.len());
    for (index, param) in kernel.params.iter().enumerate() {
        let shape = resolve_shape(&param.shape, bindings).ok_or_else(|| {
            RunError::Calibration(format!("the shape of `{}` is not bound", param.name))
        })?;
        if let Some((_, tensor)) = given.iter().find(|(name, _)| *name == param.name) {
            if tensor.shape != shape {
                return Err(RunError::Calibration(format!(
                    "calibration tensor `{}` has shape {:?}, the kernel needs {:?}",
                    param.name, tensor.shape, shape
                )));
            }
            inputs.push(tensor.clone());
            continue;
        }
        let len: usize = shape.iter().product();
        let block: usize = shape.iter().rev().take(2).product::<usize>().max(1);
        let drawn = standard_normal(seed, index as u64, block.min(len));
        let values: Vec<f32> = drawn.iter().copied().cycle().take(len).collect();
        inputs.push(Tensor {
            shape,
            data: TensorData::from_f32_as(values, param.dtype),
        });
    }
    Ok(inputs)
}

/// `‖a − b‖₂ / ‖b‖₂` (the absolute norm when `b` is zero; infinite on a NaN or a length
/// mismatch, so that such a plan is never accepted).
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    let error = if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    };
    if error.is_nan() {
        f64::INFINITY
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_rows_cover_small_outputs_and_spread_over_large_ones() {
        assert_eq!(sample_rows(&[2, 100, 8]), vec![0..100]);
        assert_eq!(sample_rows(&[8]), vec![0..1]);
        let rows = sample_rows(&[8, 4096, 64]);
        assert_eq!(rows.len(), SAMPLE_RANGES);
        assert_eq!(rows[0], 0..SAMPLE_RUN);
        assert_eq!(rows[SAMPLE_RANGES - 1].end, 4096);
    }

    #[test]
    fn relative_error_is_infinite_for_nan_and_mismatched_lengths() {
        assert_eq!(relative_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_l2(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
        assert_eq!(relative_l2(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(relative_l2(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }
}
