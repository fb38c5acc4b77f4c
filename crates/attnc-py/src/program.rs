//! One checked kernel with its compile settings and its compiled code per shape: everything
//! the Python `Kernel` does that needs no interpreter.
//!
//! A [`Program`] binds the inputs' shapes (with the `shapes=` values given at compile time),
//! compiles through the same [`Compiler`] pipeline as `attnc run` — same ceilings, policy,
//! calibration — and keeps the result in a [`ShapeCache`]. A plan compiled for a call
//! ([`Program::specialize_for_call`]) validates its approximations on that call's inputs, as
//! `attnc run --input` does; one compiled before any call (from the `shapes=` values) on
//! values drawn from the policy's seed. It is shared between Python threads: the cache sits behind a mutex
//! that is held only to look up or insert, never while compiling or running.
//!
//! Gradients ([`Program::specialize_grad`]) are compiled the same way by
//! [`Compiler::compile_grad`] (the exact optimized form, differentiated, its gradients one
//! plan) and cached per input shapes and parameter list in a cache of their own.

use crate::shape_cache::ShapeCache;
use attnc::engine::RunError;
use attnc::grad::CompiledGrad;
use attnc::io::tensor::{Tensor, TensorData};
use attnc::ir::bind::{bind_shapes, kernel_symbols, BindError};
use attnc::ir::dim::{resolve_shape, Dim};
use attnc::ir::{Bindings, Kernel};
use attnc::policy::Policy;
use attnc::{Calibration, Compiled, Compiler};
use attnc_jit::backward::{Residuals, Saved};
use attnc_jit::{Input, JitError, Output};
use attnc_opt::{Ceilings, Trace};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Compiled plans kept per kernel (see [`ShapeCache`]).
pub const CACHE_CAPACITY: usize = 32;

/// How many of a kernel's most recently used plans keep their large temporaries between calls
/// (two: a model alternating prefill and decode shapes keeps both).
pub const PLANS_KEEPING_BUFFERS: usize = 2;

/// A kernel compiled at one set of input shapes.
pub struct Specialized {
    /// The inputs' shapes it was compiled for.
    pub input_shapes: Vec<Vec<usize>>,
    /// Every dimension symbol's value.
    pub bindings: Bindings,
    /// The machine code and the optimizer's record.
    pub compiled: Compiled,
}

impl Specialized {
    /// Runs on `inputs` (one per parameter, in its declared storage type) with `threads`
    /// workers; the buffers are checked against the bound shapes before any machine code runs.
    pub fn run(&self, inputs: &[Input<'_>], threads: usize) -> Result<Output, JitError> {
        self.compiled.code.run(inputs, threads)
    }

    /// [`Specialized::run`] for every output of the kernel, in order.
    pub fn run_all(&self, inputs: &[Input<'_>], threads: usize) -> Result<Vec<Output>, JitError> {
        self.compiled.code.run_outputs(inputs, threads)
    }
}

/// A kernel's gradients compiled at one set of input shapes, for one list of parameters.
pub struct SpecializedGrad {
    /// Every dimension symbol's value.
    pub bindings: Bindings,
    /// Every output's shape, in order (one cotangent each).
    pub output_shapes: Vec<Vec<usize>>,
    /// The forward and the gradients' machine code.
    pub compiled: CompiledGrad,
}

impl SpecializedGrad {
    /// The (first) output's shape: the cotangent's of a kernel with one output.
    pub fn output_shape(&self) -> &[usize] {
        &self.output_shapes[0]
    }

    /// The gradients (one per parameter asked for, in that order, f32 in the parameter's
    /// shape) for `inputs` (one per parameter, in its declared storage type) and `cotangents`
    /// (f32, one per output of its shape), with `threads` workers; every buffer is checked
    /// against the bound shapes before any machine code runs.
    pub fn run(
        &self,
        inputs: &[Input<'_>],
        cotangents: &[&[f32]],
        threads: usize,
    ) -> Result<Vec<Output>, JitError> {
        let mut views = inputs.to_vec();
        views.extend(cotangents.iter().map(|dy| Input::F32(dy)));
        self.compiled.backward.run_outputs(&views, threads)
    }
}

impl SpecializedGrad {
    /// The forward's output and its attention's row log-sum-exps, where the gradients are
    /// one fused attention's backward that can start from them
    /// ([`CompiledGrad::saves_forward`]); `None` elsewhere. `inputs`: one per parameter.
    pub fn forward_saving(
        &self,
        inputs: &[Input<'_>],
        threads: usize,
    ) -> Result<Option<Residuals>, JitError> {
        if !self.compiled.saves_forward() {
            return Ok(None);
        }
        self.compiled.backward.run_forward_saving(inputs, threads)
    }

    /// [`SpecializedGrad::run`] from the forward's output `o` and log-sum-exps `lse` (as
    /// [`SpecializedGrad::forward_saving`] gave them for the same inputs), or `None` where the
    /// gradients cannot start from them.
    pub fn run_saved(
        &self,
        inputs: &[Input<'_>],
        saved: Saved<'_>,
        cotangent: &[f32],
        threads: usize,
    ) -> Result<Option<Vec<Output>>, JitError> {
        if !self.compiled.saves_forward() {
            return Ok(None);
        }
        let mut views = inputs.to_vec();
        views.push(Input::F32(cotangent));
        self.compiled
            .backward
            .run_outputs_saved(&views, saved, threads)
    }
}

/// The call's `inputs` as calibration tensors by parameter name (copies in their storage type).
fn calibration_tensors(
    kernel: &Kernel,
    shapes: &[Vec<usize>],
    inputs: &[Input<'_>],
) -> Vec<(String, Tensor)> {
    kernel
        .params
        .iter()
        .zip(shapes)
        .zip(inputs)
        .map(|((param, shape), input)| {
            let data = match *input {
                Input::F32(v) => TensorData::F32(v.to_vec()),
                Input::F16(v) => TensorData::F16(v.to_vec()),
                Input::Bf16(v) => TensorData::Bf16(v.to_vec()),
                Input::I32(v) => TensorData::I32(v.to_vec()),
            };
            let tensor = Tensor {
                shape: shape.clone(),
                data,
            };
            (param.name.clone(), tensor)
        })
        .collect()
}

/// Why a kernel could not be specialized to some shapes.
#[derive(Debug)]
pub enum SpecializeError {
    /// The shapes do not fit the kernel's parameters (or each other).
    Bind(BindError),
    /// Optimizing, validating or compiling failed.
    Compile(RunError),
}

/// Where one axis of the result gets its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputDim {
    /// A literal size.
    Const(u64),
    /// The size of axis `axis` of input `param`.
    Input {
        /// The parameter's index.
        param: usize,
        /// Its axis.
        axis: usize,
    },
    /// A size given at compile time (`shapes=`), bound by no input.
    Given(u64),
    /// A symbol no input and no `shapes=` value binds.
    Unbound(String),
}

/// A checked kernel, its settings and its compiled plans.
pub struct Program {
    kernel: Kernel,
    given: Bindings,
    compiler: Compiler,
    threads: usize,
    cache: Mutex<ShapeCache<Arc<Specialized>>>,
    grad_cache: Mutex<ShapeCache<Arc<SpecializedGrad>>>,
    /// Exact plans of an approximating kernel, for calls whose inputs hold NaN or infinity.
    exact_cache: Mutex<ShapeCache<Arc<Specialized>>>,
}

/// Exact plans kept for calls with non-finite inputs (such calls are rare).
const EXACT_CACHE_CAPACITY: usize = 4;

impl Program {
    /// `kernel` under `policy`, with `given` binding symbols no input binds, running on
    /// `threads` workers, planned with `ceilings`.
    pub fn new(
        kernel: Kernel,
        given: Bindings,
        policy: Policy,
        threads: usize,
        ceilings: Ceilings,
    ) -> Program {
        let threads = threads.max(1);
        let compiler = Compiler::new()
            .with_policy(policy)
            .with_threads(threads)
            .with_ceilings(ceilings);
        Program {
            kernel,
            given,
            compiler,
            threads,
            cache: Mutex::new(ShapeCache::new(CACHE_CAPACITY)),
            grad_cache: Mutex::new(ShapeCache::new(CACHE_CAPACITY)),
            exact_cache: Mutex::new(ShapeCache::new(EXACT_CACHE_CAPACITY)),
        }
    }

    /// The checked kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The `shapes=` values.
    pub fn given(&self) -> &Bindings {
        &self.given
    }

    /// The approximation policy.
    pub fn policy(&self) -> &Policy {
        self.compiler.policy()
    }

    /// Worker threads of every run.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn cache(&self) -> MutexGuard<'_, ShapeCache<Arc<Specialized>>> {
        // The cache is consistent after any panic (entries are whole values).
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The plan compiled for exactly these input shapes, if there is one.
    pub fn cached<S: AsRef<[usize]>>(&self, shapes: &[S]) -> Option<Arc<Specialized>> {
        self.cache().get(shapes)
    }

    /// The most recently used plan.
    pub fn latest(&self) -> Option<Arc<Specialized>> {
        self.cache().latest().cloned()
    }

    /// The number of plans held.
    pub fn cached_count(&self) -> usize {
        self.cache().len()
    }

    /// Drops every compiled plan (forward and gradients).
    pub fn clear_cache(&self) {
        self.cache().clear();
        self.exact_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.grad_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The gradients with respect to the parameters `wrt` (indices, in the order wanted) for
    /// these input shapes: from the cache, else bound and compiled (slow: call without the
    /// interpreter lock).
    pub fn specialize_grad(
        &self,
        shapes: &[Vec<usize>],
        wrt: &[usize],
    ) -> Result<Arc<SpecializedGrad>, SpecializeError> {
        // The parameter list is one more entry of the key (the forward's cache is apart).
        let mut key = shapes.to_vec();
        key.push(wrt.to_vec());
        let cache = || {
            self.grad_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if let Some(hit) = cache().get(&key) {
            return Ok(hit);
        }
        let bindings = self.bind(shapes).map_err(SpecializeError::Bind)?;
        let output_shapes: Vec<Vec<usize>> = (self.kernel.output_nodes().iter())
            .map(|&node| {
                resolve_shape(&self.kernel.graph.node(node).shape, &bindings)
                    .expect("invariant: bind_shapes binds and checks every node's shape")
            })
            .collect();
        let compiler = self.compiler.clone().with_memory_budget(available_memory());
        let compiled = compiler
            .compile_grad(&self.kernel, &bindings, wrt)
            .map_err(SpecializeError::Compile)?;
        let specialized = Arc::new(SpecializedGrad {
            bindings,
            output_shapes,
            compiled,
        });
        Ok(cache().insert(key, specialized))
    }

    /// Binds every symbol from the inputs' shapes and the `shapes=` values.
    pub fn bind(&self, shapes: &[Vec<usize>]) -> Result<Bindings, BindError> {
        let slots: Vec<Option<Vec<usize>>> = shapes.iter().cloned().map(Some).collect();
        bind_shapes(&self.kernel, &slots, &self.given)
    }

    /// The plan for these input shapes: from the cache, else bound and compiled (slow: call
    /// without the interpreter lock). Only the [`PLANS_KEEPING_BUFFERS`] most recently used
    /// plans keep their large temporaries between calls: a kernel called at many shapes (a
    /// decoding loop, varied batch sizes) holds one or two runs' worth, not one per shape.
    pub fn specialize(&self, shapes: &[Vec<usize>]) -> Result<Arc<Specialized>, SpecializeError> {
        self.specialize_on(shapes, None)
    }

    /// [`Program::specialize`] for a call on `inputs` (one per parameter, of `shapes`): a plan
    /// compiled now validates its approximations on these inputs, the data the user runs.
    pub fn specialize_for_call(
        &self,
        shapes: &[Vec<usize>],
        inputs: &[Input<'_>],
    ) -> Result<Arc<Specialized>, SpecializeError> {
        self.specialize_on(shapes, Some(inputs))
    }

    /// The exact plan for these input shapes, whatever the policy: what a call runs when its
    /// inputs hold NaN or infinity ([`attnc::approx::non_finite_input`]).
    pub fn specialize_exact(
        &self,
        shapes: &[Vec<usize>],
    ) -> Result<Arc<Specialized>, SpecializeError> {
        let cache = || {
            self.exact_cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if let Some(hit) = cache().get(shapes) {
            return Ok(hit);
        }
        let exact = self.compiler.clone().with_policy(Policy::exact());
        let specialized = self.compile_at(shapes, exact, Calibration::default())?;
        Ok(cache().insert(shapes.to_vec(), specialized))
    }

    /// The kernel compiled by `compiler` for these input shapes, approximations validated on
    /// `calibration` (the shapes bound, the memory budget what is available now).
    fn compile_at(
        &self,
        shapes: &[Vec<usize>],
        compiler: Compiler,
        calibration: Calibration<'_>,
    ) -> Result<Arc<Specialized>, SpecializeError> {
        let bindings = self.bind(shapes).map_err(SpecializeError::Bind)?;
        let compiled = (compiler.with_memory_budget(available_memory()))
            .compile_calibrated(&self.kernel, &bindings, calibration)
            .map_err(SpecializeError::Compile)?;
        Ok(Arc::new(Specialized {
            input_shapes: shapes.to_vec(),
            bindings,
            compiled,
        }))
    }

    fn specialize_on(
        &self,
        shapes: &[Vec<usize>],
        inputs: Option<&[Input<'_>]>,
    ) -> Result<Arc<Specialized>, SpecializeError> {
        let plan = self.specialize_cached(shapes, inputs)?;
        for older in self.cache().older(PLANS_KEEPING_BUFFERS) {
            older.compiled.code.release_buffers();
        }
        Ok(plan)
    }

    fn specialize_cached(
        &self,
        shapes: &[Vec<usize>],
        inputs: Option<&[Input<'_>]>,
    ) -> Result<Arc<Specialized>, SpecializeError> {
        if let Some(hit) = self.cached(shapes) {
            return Ok(hit);
        }
        // Copied only when an approximation will be measured on them.
        let samples = match inputs {
            Some(inputs) if !self.compiler.policy().is_exact() => {
                calibration_tensors(&self.kernel, shapes, inputs)
            }
            _ => Vec::new(),
        };
        let names: Vec<&str> = samples.iter().map(|(name, _)| name.as_str()).collect();
        let label = format!("the call's inputs ({})", names.join(", "));
        let calibration = Calibration {
            tensors: &samples,
            label: (!samples.is_empty()).then_some(label.as_str()),
            ..Calibration::default()
        };
        let specialized = self.compile_at(shapes, self.compiler.clone(), calibration)?;
        Ok(self.cache().insert(shapes.to_vec(), specialized))
    }

    /// The inputs' shapes the `shapes=` values alone fix, when they bind every symbol of every
    /// parameter.
    pub fn given_input_shapes(&self) -> Option<Vec<Vec<usize>>> {
        self.kernel
            .params
            .iter()
            .map(|p| resolve_shape(&p.shape, &self.given))
            .collect()
    }

    /// The optimizer's record: of the most recent plan when there is one (the plan calls run),
    /// else of the plan at the `shapes=` values when they bind everything, else of the program
    /// optimized with the symbols it has (as `attnc explain` does without `--shape`).
    pub fn trace(&self) -> Result<Trace, SpecializeError> {
        if let Some(latest) = self.latest() {
            return Ok(latest.compiled.trace.clone());
        }
        if let Some(shapes) = self.given_input_shapes() {
            return Ok(self.specialize(&shapes)?.compiled.trace.clone());
        }
        let symbols = kernel_symbols(&self.kernel);
        let partial: Bindings = self
            .given
            .iter()
            .filter(|(s, _)| symbols.contains(s))
            .map(|(s, v)| (s.clone(), *v))
            .collect();
        Ok(self.compiler.optimize(&self.kernel, &partial).trace)
    }

    /// Where each axis of the result gets its size: from the first input axis declared with
    /// its symbol, else the `shapes=` value.
    pub fn output_dims(&self) -> Vec<OutputDim> {
        self.output_dims_of(self.kernel.output)
    }

    /// [`Program::output_dims`] of the kernel's result `output` (its graph node).
    pub fn output_dims_of(&self, output: attnc::ir::NodeId) -> Vec<OutputDim> {
        let shape = &self.kernel.graph.node(output).shape;
        shape
            .iter()
            .map(|dim| match dim {
                Dim::Const(c) => OutputDim::Const(*c),
                Dim::Sym(symbol) => {
                    let from_input =
                        self.kernel
                            .params
                            .iter()
                            .enumerate()
                            .find_map(|(p, param)| {
                                param
                                    .shape
                                    .iter()
                                    .position(|d| matches!(d, Dim::Sym(s) if s == symbol))
                                    .map(|axis| OutputDim::Input { param: p, axis })
                            });
                    from_input
                        .or_else(|| self.given.get(symbol).map(|v| OutputDim::Given(*v)))
                        .unwrap_or_else(|| OutputDim::Unbound(symbol.clone()))
                }
                // A pooled axis (`ceil(n/b)`) is no one input's axis: it is known only once
                // the kernel is bound, so it is reported as unbound, spelled as written.
                Dim::CeilDiv(..) => OutputDim::Unbound(dim.to_string()),
            })
            .collect()
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes, the budget a plan's buffers must fit in (as for
/// the binary); `None` where the system does not say.
pub fn available_memory() -> Option<u64> {
    let text = attnc::io::read_small_text("/proc/meminfo", 1 << 20).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(source: &str, given: &[(&str, u64)]) -> Program {
        let module = attnc::source::compile_text(source).expect("checks");
        let kernel = module.kernels.into_iter().next().expect("one kernel");
        let given = given.iter().map(|(s, v)| (s.to_string(), *v)).collect();
        Program::new(kernel, given, Policy::exact(), 1, Ceilings::default())
    }

    const DECODE: &str = "kernel decode(q: f32[h, 1, d], k: f32[h, n, d], v: f32[h, n, d]) \
                          -> f32[h, 1, d] { return softmax(q @ k.T / sqrt(d)) @ v; }";

    #[test]
    fn only_the_most_recent_plans_keep_their_temporaries() {
        // Unfused (a matrix product and an explicit softmax), so every run has large
        // temporaries: the n × n scores.
        let p = program(
            "kernel f(x: f32[n, d]) -> f32[n, n] { let s = x @ x.T; return s / (s * s + 1.0); }",
            &[],
        );
        let run = |n: usize| {
            let plan = p.specialize(&[vec![n, 4]]).expect("compiles");
            let x = vec![0.5f32; n * 4];
            plan.run(&[attnc_jit::Input::F32(&x)], 1).expect("runs");
            plan
        };
        let kept = |plan: &Specialized| plan.compiled.code.kept_buffer_bytes();
        let (a, b, c) = (run(1024), run(1100), run(1200));
        assert!(
            kept(&b) > 0 && kept(&c) > 0,
            "the two most recent keep theirs"
        );
        // Specializing c released a's; using a again releases b's.
        assert_eq!(kept(&a), 0);
        run(1024);
        assert_eq!(kept(&b), 0);
        assert!(kept(&c) > 0);
    }

    #[test]
    fn compiles_once_per_shape_and_runs() {
        let p = program(DECODE, &[]);
        let shapes = vec![vec![2, 1, 3], vec![2, 5, 3], vec![2, 5, 3]];
        let a = p.specialize(&shapes).expect("compiles");
        let b = p.specialize(&shapes).expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.bindings.get("n"), Some(&5));
        let q = vec![0.5f32; 6];
        let kv = vec![1.0f32; 30];
        let out = a
            .run(&[Input::F32(&q), Input::F32(&kv), Input::F32(&kv)], 1)
            .expect("runs");
        assert_eq!(out.shape, vec![2, 1, 3]);
        assert!(out.data.iter().all(|&x| (x - 1.0).abs() < 1e-6));
        p.specialize(&[vec![2, 1, 3], vec![2, 7, 3], vec![2, 7, 3]])
            .expect("another shape");
        assert_eq!(p.cached_count(), 2);
        assert_eq!(p.latest().expect("latest").bindings.get("n"), Some(&7));
    }

    #[test]
    fn gradients_compile_once_per_shape_and_list_and_match_the_reference() {
        let p = program(DECODE, &[]);
        let shapes = vec![vec![2, 1, 3], vec![2, 5, 3], vec![2, 5, 3]];
        let a = p.specialize_grad(&shapes, &[2, 0]).expect("compiles");
        assert!(Arc::ptr_eq(
            &a,
            &p.specialize_grad(&shapes, &[2, 0]).expect("cached")
        ));
        assert!(!Arc::ptr_eq(
            &a,
            &p.specialize_grad(&shapes, &[0]).expect("another list")
        ));
        assert_eq!(a.output_shape(), [2, 1, 3]);
        let q: Vec<f32> = (0..6).map(|i| (i as f32 * 0.37).sin()).collect();
        let kv: Vec<f32> = (0..30).map(|i| (i as f32 * 0.61).cos()).collect();
        let dy = [1.0f32; 6];
        let grads = a
            .run(
                &[Input::F32(&q), Input::F32(&kv), Input::F32(&kv)],
                &[&dy[..]],
                1,
            )
            .expect("runs");
        assert_eq!(grads.len(), 2);
        assert_eq!(grads[0].shape, vec![2, 5, 3]);
        assert_eq!(grads[1].shape, vec![2, 1, 3]);
        // dV of softmax(...) @ V with a cotangent of ones: each key's attention weight, so
        // every head's dV column sums to 1.
        for h in 0..2 {
            let sum: f32 = (0..5).map(|j| grads[0].data[h * 15 + j * 3]).sum();
            assert!((sum - 1.0).abs() < 1e-5, "head {h}: {sum}");
        }
        // A cotangent of the wrong length is refused before anything runs.
        assert!(a
            .run(
                &[Input::F32(&q), Input::F32(&kv), Input::F32(&kv)],
                &[&dy[..5]],
                1
            )
            .is_err());
    }

    #[test]
    fn shape_conflicts_are_bind_errors() {
        let p = program(DECODE, &[]);
        let err = p
            .specialize(&[vec![2, 1, 3], vec![2, 5, 3], vec![2, 6, 3]])
            .err()
            .expect("conflict");
        assert!(matches!(
            err,
            SpecializeError::Bind(BindError::DimConflict { .. })
        ));
        let err = p
            .specialize(&[vec![2, 1, 3], vec![2, 5, 3], vec![2, 5, 3, 1]])
            .err()
            .expect("rank");
        assert!(matches!(
            err,
            SpecializeError::Bind(BindError::RankMismatch { .. })
        ));
    }

    #[test]
    fn output_dims_name_their_input_axis_or_given_value() {
        let p = program(
            "kernel f(x: f32[n, e]) -> f32[n, 4] { return x @ ones(e, 4); }",
            &[],
        );
        assert_eq!(
            p.output_dims(),
            vec![OutputDim::Input { param: 0, axis: 0 }, OutputDim::Const(4)]
        );
        let p = program(DECODE, &[("h", 2)]);
        assert_eq!(
            p.output_dims(),
            vec![
                OutputDim::Input { param: 0, axis: 0 },
                OutputDim::Const(1),
                OutputDim::Input { param: 0, axis: 2 }
            ]
        );
    }

    #[test]
    fn traces_with_and_without_bound_shapes() {
        let p = program(DECODE, &[("h", 2)]);
        assert!(p.given_input_shapes().is_none());
        let symbolic = p
            .trace()
            .map_err(|e| format!("{e:?}"))
            .expect("optimizes unbound");
        assert_eq!(symbolic.kernel, "decode");
        let p = program(DECODE, &[("h", 2), ("n", 8), ("d", 4)]);
        assert_eq!(
            p.given_input_shapes(),
            Some(vec![vec![2, 1, 4], vec![2, 8, 4], vec![2, 8, 4]])
        );
        p.trace()
            .map_err(|e| format!("{e:?}"))
            .expect("compiles at the given shapes");
        assert_eq!(p.cached_count(), 1);
    }
}
