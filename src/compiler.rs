//! The one compilation pipeline: optimize → validate → compile → run, with its settings in one
//! value.
//!
//! A [`Compiler`] holds what every stage needs — the machine ceilings the cost model divides
//! by (handed in: the library never measures the machine or touches a file), the
//! approximation policy, threads, code-generation options and a memory budget. `attnc run`,
//! `explain` and `bench` all compile through it, so the plan one of them shows is the plan the
//! others run.
//!
//! ```
//! let module = attnc::source::compile_text(
//!     "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
//!          return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
//!      }",
//! )
//! .expect("the program checks");
//! let kernel = &module.kernels[0];
//! let bindings = [("n".to_string(), 64), ("d".to_string(), 16)].into_iter().collect();
//! let compiled = attnc::Compiler::new()
//!     .with_threads(2)
//!     .compile(kernel, &bindings)
//!     .expect("compiles");
//! assert!(compiled.plan().to_string().contains("fused attention"));
//! let q = attnc::io::Tensor::from_f32(vec![64, 16], vec![0.5; 64 * 16]).expect("shape");
//! let out = compiled.run(&[q.clone(), q.clone(), q], 2).expect("runs");
//! assert_eq!(out.shape, vec![64, 16]);
//! ```

use crate::approx::{compile_with_policy, optimizer_policy, Validation};
use crate::calibration::DrawnInputs;
use crate::engine::{run_compiled, RunError};
use crate::io::Tensor;
use crate::policy::Policy;
use attnc_ir::{Bindings, DType, Kernel};
use attnc_jit::plan::Plan;
use attnc_jit::{CompileOptions, CompiledKernel};
use attnc_opt::{ApproxPolicy, Ceilings, OptimizeOptions, Optimized, Trace};
use std::time::{Duration, Instant};

/// The settings of every stage of a compilation.
#[derive(Clone, Debug)]
pub struct Compiler {
    ceilings: Ceilings,
    policy: Policy,
    threads: usize,
    options: CompileOptions,
    memory_budget: Option<u64>,
}

impl Default for Compiler {
    fn default() -> Compiler {
        Compiler::new()
    }
}

/// Inputs that stand in for the real ones when an approximation is validated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Calibration<'a> {
    /// Tensors by parameter name (`--calibrate`); the others are drawn from `drawn`'s seed
    /// when it holds any tensor, else from the policy's seed.
    pub tensors: &'a [(String, Tensor)],
    /// Inputs a `--random` run has drawn already: the sample is drawn from their seed, so
    /// their blocks are copied, not redrawn, and the run is validated on its own inputs.
    pub drawn: DrawnInputs<'a>,
    /// How reports name where `tensors` came from (default: `the calibration files`).
    pub label: Option<&'a str>,
}

impl Compiler {
    /// The exact policy, the documented default ceilings, every core, default options, no
    /// memory budget.
    pub fn new() -> Compiler {
        Compiler {
            ceilings: Ceilings::default(),
            policy: Policy::exact(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            options: CompileOptions::default(),
            memory_budget: None,
        }
    }

    /// The ceilings the cost model divides by (measured by the caller, e.g. once per machine).
    pub fn with_ceilings(mut self, ceilings: Ceilings) -> Compiler {
        self.ceilings = ceilings;
        self
    }

    /// The approximations allowed, and their tolerance.
    pub fn with_policy(mut self, policy: Policy) -> Compiler {
        self.policy = policy;
        self
    }

    /// Worker threads of validation runs (runs take their own count).
    pub fn with_threads(mut self, threads: usize) -> Compiler {
        self.threads = threads.max(1);
        self
    }

    /// Code-generation options.
    pub fn with_options(mut self, options: CompileOptions) -> Compiler {
        self.options = options;
        self
    }

    /// The most bytes a plan's temporaries may hold at once; a plan past it is refused before
    /// anything is allocated.
    pub fn with_memory_budget(mut self, bytes: Option<u64>) -> Compiler {
        self.memory_budget = bytes;
        self
    }

    /// The approximation policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The cost model's ceilings.
    pub fn ceilings(&self) -> Ceilings {
        self.ceilings
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Code-generation options.
    pub fn options(&self) -> &CompileOptions {
        &self.options
    }

    /// The optimizer's options for `kernel` under this compiler's ceilings, with `approx`
    /// allowed.
    fn optimize_options(&self, kernel: &Kernel, approx: ApproxPolicy) -> OptimizeOptions {
        let tiers = attnc_jit::wide::Tiers::available(self.options.tiers);
        OptimizeOptions {
            ceilings: self.ceilings,
            approx,
            tiers: tier_speeds(tiers, kernel),
            ..OptimizeOptions::default()
        }
    }

    /// Stage 1, exact rules only: the cheapest equivalent form of `kernel` at `bindings`.
    pub fn optimize_exact(&self, kernel: &Kernel, bindings: &Bindings) -> Optimized {
        attnc_opt::optimize(
            kernel,
            bindings,
            &self.optimize_options(kernel, ApproxPolicy::default()),
        )
    }

    /// Stage 1 with the policy's approximate rules added (not yet validated).
    pub fn optimize(&self, kernel: &Kernel, bindings: &Bindings) -> Optimized {
        attnc_opt::optimize(
            kernel,
            bindings,
            &self.optimize_options(kernel, optimizer_policy(&self.policy)),
        )
    }

    /// Stage 1 under an explicit approximation set (validation's fallbacks narrow it).
    pub(crate) fn optimize_with(
        &self,
        kernel: &Kernel,
        bindings: &Bindings,
        approx: ApproxPolicy,
    ) -> Optimized {
        attnc_opt::optimize(kernel, bindings, &self.optimize_options(kernel, approx))
    }

    /// Stage 3 alone: machine code for an already optimized `plan`, checked against the
    /// memory budget.
    pub fn compile_plan(
        &self,
        plan: &Kernel,
        bindings: &Bindings,
    ) -> Result<CompiledKernel, RunError> {
        // Every output of the kernel, each node computed once (a fused attention and the
        // log-sum-exp beside it share one step).
        let outputs = plan.output_nodes();
        let code = CompiledKernel::compile_outputs(plan, &outputs, bindings, &self.options)?;
        self.check_memory(code.plan())?;
        Ok(code)
    }

    /// Stages 1–3: optimize, validate any approximation on a calibration sample drawn from the
    /// policy's seed, compile.
    pub fn compile(&self, kernel: &Kernel, bindings: &Bindings) -> Result<Compiled, RunError> {
        self.compile_calibrated(kernel, bindings, Calibration::default())
    }

    /// [`Compiler::compile`] with the calibration inputs given.
    pub fn compile_calibrated(
        &self,
        kernel: &Kernel,
        bindings: &Bindings,
        calibration: Calibration<'_>,
    ) -> Result<Compiled, RunError> {
        let start = Instant::now();
        let (code, trace, validations) = if self.policy.is_exact() {
            let optimized = self.optimize_exact(kernel, bindings);
            let code = self.compile_plan(&optimized.kernel, bindings)?;
            (code, optimized.trace, Vec::new())
        } else {
            let result = compile_with_policy(self, kernel, bindings, calibration)?;
            (result.compiled, result.trace, result.validations)
        };
        Ok(Compiled {
            code,
            trace,
            validations,
            ret: kernel.ret_dtype,
            rets: kernel.outputs().iter().map(|o| o.dtype).collect(),
            elapsed: start.elapsed(),
        })
    }

    /// Refuses to run the reference interpreter (`--engine interp`, `--verify`) where its f64
    /// values of `kernel` at `bindings` exceed the memory budget, naming the largest.
    pub fn check_interp_memory(
        &self,
        kernel: &Kernel,
        bindings: &Bindings,
    ) -> Result<(), RunError> {
        let Some(budget) = self.memory_budget else {
            return Ok(());
        };
        let memory = attnc_ir::interp::interp_memory(kernel, bindings).map_err(RunError::Bind)?;
        if memory.peak_bytes <= budget {
            return Ok(());
        }
        let largest = memory.largest.map(|(node, bytes)| {
            format!(
                "the interpreter's f64 value of `{}` ({})",
                kernel.graph.node(node).op,
                format_bytes(bytes)
            )
        });
        Err(RunError::Memory {
            what: "the interpreter",
            needed: memory.peak_bytes,
            budget,
            largest: largest.unwrap_or_default(),
        })
    }

    /// Refuses a plan whose temporaries exceed the memory budget, naming its largest buffer.
    pub(crate) fn check_memory(&self, plan: &Plan) -> Result<(), RunError> {
        let Some(budget) = self.memory_budget else {
            return Ok(());
        };
        let memory = plan.memory();
        if memory.peak_bytes <= budget {
            return Ok(());
        }
        let largest = memory.largest.map(|(buf, bytes)| {
            let info = &plan.buffers[buf];
            let writer = plan
                .writer(buf)
                .map_or_else(|| "an input".to_string(), |s| s.name.clone());
            format!(
                "{} {} elements ({}) written by {writer}",
                info.elem.keyword(),
                info.len,
                format_bytes(bytes)
            )
        });
        Err(RunError::Memory {
            what: "the plan",
            needed: memory.peak_bytes,
            budget,
            largest: largest.unwrap_or_default(),
        })
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A compiled kernel with the record of how it was chosen.
pub struct Compiled {
    /// The machine code of the accepted plan.
    pub code: CompiledKernel,
    /// The optimizer's record of the accepted plan (approximation outcomes include measured
    /// errors and approximations rejected by measurement).
    pub trace: Trace,
    /// Every validation measurement, in order (empty when the plan is exact).
    pub validations: Vec<Validation>,
    /// The kernel's (first) return type (results are rounded to it).
    pub ret: DType,
    /// The return type of every output, in order.
    pub rets: Vec<DType>,
    /// Wall time of the whole compilation, validation included.
    pub elapsed: Duration,
}

impl Compiled {
    /// Stage 4: runs on `inputs` (one per parameter) with `threads` workers; the first
    /// output.
    pub fn run(&self, inputs: &[Tensor], threads: usize) -> Result<Tensor, RunError> {
        run_compiled(&self.code, self.ret, inputs, threads)
    }

    /// Stage 4 for every output of the kernel, in order.
    pub fn run_all(&self, inputs: &[Tensor], threads: usize) -> Result<Vec<Tensor>, RunError> {
        crate::engine::run_compiled_all(&self.code, &self.rets, inputs, threads)
    }

    /// The plan the machine code runs.
    pub fn plan(&self) -> &Plan {
        self.code.plan()
    }

    /// Whether the accepted plan applies an approximation.
    pub fn approximates(&self) -> bool {
        self.trace.approximations.iter().any(|o| o.applied)
    }

    /// Milliseconds validation added to the compilation.
    pub fn validation_ms(&self) -> f64 {
        self.validations.iter().map(|v| v.millis).sum()
    }

    /// One line per validation measurement, for people.
    pub fn summary(&self, tol: f64) -> Vec<String> {
        self.validations.iter().map(|v| v.summary(tol)).collect()
    }
}

/// The optimizer's view of the full-width tiers this compiler may use for `kernel`.
fn tier_speeds(tiers: attnc_jit::wide::Tiers, kernel: &Kernel) -> attnc_opt::TierSpeeds {
    use attnc_wide::amx::{self, Products, Unit};
    let mut speeds =
        attnc_opt::TierSpeeds::measured_kernels(tiers.avx512, tiers.amx_bf16, tiers.amx);
    if amx::unit(Products::Int8) == Some(Unit::Vectors) {
        speeds = speeds.int8_on_vectors();
    }
    if amx::unit(Products::Bf16) == Some(Unit::Vectors) {
        // bf16 inputs need no rounding on the way in: the products gain more there.
        let params = &kernel.params;
        let bf16_inputs = params.iter().any(|p| p.dtype == DType::Bf16)
            && params
                .iter()
                .all(|p| matches!(p.dtype, DType::Bf16 | DType::I32));
        speeds = speeds.bf16_on_vectors(bf16_inputs);
    }
    speeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
        assert_eq!(format_bytes(16 << 30), "16.0 GiB");
    }

    #[test]
    fn a_plan_past_the_budget_is_refused_naming_its_largest_buffer() {
        let module = crate::source::compile_text(
            "kernel f(q: f32[n, d], k: f32[n, d]) -> f32[n, n] { return softmax(q @ k.T); }",
        )
        .expect("checks");
        let kernel = &module.kernels[0];
        let bindings: Bindings = [("n".to_string(), 2048), ("d".to_string(), 8)]
            .into_iter()
            .collect();
        let small = Compiler::new().with_memory_budget(Some(1 << 20));
        let err = small.compile(kernel, &bindings).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains("16.0 MiB") && text.contains("f_s"), "{text}");
        let large = Compiler::new().with_memory_budget(Some(1 << 30));
        assert!(large.compile(kernel, &bindings).is_ok());
    }
}
