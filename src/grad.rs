//! Gradients: a kernel's forward compiled beside the machine code of its vector-Jacobian
//! product, and the f64 reference gradients.
//!
//! [`Compiler::compile_grad`] optimizes the kernel with the exact rules (so attention is
//! fused where the optimizer finds it), differentiates THAT form ([`attnc_ir::grad`]: fused
//! attentions get the fused backward, masks and block sparsity carry over), and compiles the
//! gradient graph with every requested gradient as one result of one plan. The forward is
//! compiled from the same optimized form. [`CompiledGrad::backward`] takes the inputs and the
//! cotangent (the gradient of the output) and returns one gradient per requested parameter,
//! in the parameter's shape, f32; it recomputes what it needs of the forward. A kernel that
//! returns several values takes one cotangent per output ([`CompiledGrad::backward_all`]):
//! its gradients are those of `Σ_k ⟨cotangent_k, output_k⟩`.
//!
//! Training keeps the forward instead: where the gradients are one fused attention's
//! backward and the kernel returns that attention's output (f32),
//! [`CompiledGrad::forward_saving`] also returns the row log-sum-exps the fused forward
//! writes beside its output, and [`CompiledGrad::backward_saved`] starts from the output and
//! those instead of recomputing the forward. Elsewhere the pair falls back to
//! [`CompiledGrad::forward`] and [`CompiledGrad::backward`].
//!
//! [`reference_gradients`] evaluates the gradient graph of the kernel AS WRITTEN (plain ops)
//! with the f64 interpreter: the oracle `--verify` and the tests compare with.
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
//! let wrt = attnc::ir::grad::parse_wrt(kernel, "q,v").expect("parameters");
//! let grad = attnc::Compiler::new().with_threads(2).compile_grad(kernel, &bindings, &wrt)
//!     .expect("compiles");
//! assert!(grad.plan().to_string().contains("attention backward"));
//! let x = attnc::io::Tensor::from_f32(vec![64, 16], vec![0.25; 64 * 16]).expect("shape");
//! let inputs = [x.clone(), x.clone(), x.clone()];
//! let out = grad.forward(&inputs, 2).expect("runs");
//! let ones = attnc::grad::ones(&out.shape);
//! let grads = grad.backward(&inputs, &ones, 2).expect("runs");
//! assert_eq!(grads.len(), 2);
//! assert_eq!(grads[1].shape, vec![64, 16]);
//! ```

use crate::compiler::Compiler;
use crate::engine::{input_view, run_compiled, RunError};
use crate::io::{Tensor, TensorData};
use attnc_ir::backward::BackwardOp;
use attnc_ir::grad::{vjp, Vjp};
use attnc_ir::interp::evaluate_outputs;
use attnc_ir::{Bindings, DType, Kernel, Op};
use attnc_jit::backward::Saved;
use attnc_jit::plan::Plan;
use attnc_jit::{CompiledKernel, Input};
use attnc_opt::Trace;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// A kernel's forward and the machine code of its gradients.
pub struct CompiledGrad {
    /// The forward's machine code (of the optimized form the gradients differentiate).
    pub forward: CompiledKernel,
    /// The gradient graph: the optimized forward's nodes, then the gradient nodes.
    pub vjp: Vjp,
    /// The machine code of every requested gradient, one result each.
    pub backward: CompiledKernel,
    /// The optimizer's record of the forward form.
    pub trace: Trace,
    /// The forward's return type.
    pub ret: DType,
    /// Wall time of the whole compilation.
    pub elapsed: Duration,
}

impl Compiler {
    /// Optimizes `kernel` with the exact rules, differentiates the optimized form with
    /// respect to the parameters `wrt` (indices) and compiles both the forward and the
    /// gradients. The plan of the gradients is checked against the memory budget.
    pub fn compile_grad(
        &self,
        kernel: &Kernel,
        bindings: &Bindings,
        wrt: &[usize],
    ) -> Result<CompiledGrad, RunError> {
        let start = Instant::now();
        let optimized = self.optimize_exact(kernel, bindings);
        let forward = self.compile_plan(&optimized.kernel, bindings)?;
        let vjp = vjp(&optimized.kernel, wrt)?;
        let backward = CompiledKernel::compile_outputs(
            &vjp.combined(),
            &vjp.outputs(),
            bindings,
            self.options(),
        )?;
        self.check_memory(backward.plan())?;
        Ok(CompiledGrad {
            forward,
            vjp,
            backward,
            trace: optimized.trace,
            ret: kernel.ret_dtype,
            elapsed: start.elapsed(),
        })
    }
}

impl CompiledGrad {
    /// The forward on `inputs` (one per parameter).
    pub fn forward(&self, inputs: &[Tensor], threads: usize) -> Result<Tensor, RunError> {
        run_compiled(&self.forward, self.ret, inputs, threads)
    }

    /// The number of outputs of the kernel (one cotangent each).
    pub fn output_count(&self) -> usize {
        self.vjp.forward_outputs.len()
    }

    /// Errors unless `inputs` holds one tensor per parameter of the kernel.
    fn check_input_count(&self, inputs: &[Tensor]) -> Result<(), RunError> {
        let expected = self.vjp.params.len() - self.output_count();
        if inputs.len() != expected {
            return Err(RunError::InputCount {
                expected,
                got: inputs.len(),
            });
        }
        Ok(())
    }

    /// The gradients of every requested parameter (in the order asked, f32, each of its
    /// parameter's shape) for the cotangent `cotangent` (the output's shape, any stored
    /// type) of a kernel with one output.
    pub fn backward(
        &self,
        inputs: &[Tensor],
        cotangent: &Tensor,
        threads: usize,
    ) -> Result<Vec<Tensor>, RunError> {
        self.backward_all(inputs, std::slice::from_ref(cotangent), threads)
    }

    /// [`CompiledGrad::backward`] with one cotangent per output of the kernel, in order.
    pub fn backward_all(
        &self,
        inputs: &[Tensor],
        cotangents: &[Tensor],
        threads: usize,
    ) -> Result<Vec<Tensor>, RunError> {
        self.check_input_count(inputs)?;
        let dys = self.check_cotangents(cotangents)?;
        let views = views_with_cotangents(inputs, &dys);
        let outputs = self.backward.run_outputs(&views, threads)?;
        Ok(outputs
            .into_iter()
            .map(|o| Tensor {
                shape: o.shape,
                data: TensorData::F32(o.data),
            })
            .collect())
    }

    /// The cotangents as f32 (borrowed where they are f32 already: a cotangent is as large as
    /// the output), after checking there is one per output.
    fn check_cotangents<'a>(
        &self,
        cotangents: &'a [Tensor],
    ) -> Result<Vec<Cow<'a, [f32]>>, RunError> {
        if cotangents.len() != self.output_count() {
            return Err(RunError::CotangentCount {
                expected: self.output_count(),
                got: cotangents.len(),
            });
        }
        Ok(cotangents
            .iter()
            .map(|t| match &t.data {
                TensorData::F32(v) => Cow::Borrowed(v.as_slice()),
                _ => Cow::Owned(t.to_f32_vec()),
            })
            .collect())
    }

    /// The plan of the gradients.
    pub fn plan(&self) -> &Plan {
        self.backward.plan()
    }

    /// The names of the requested parameters, in order.
    pub fn names(&self) -> Vec<&str> {
        self.vjp.gradients.iter().map(|g| g.name.as_str()).collect()
    }
}

impl CompiledGrad {
    /// Whether [`CompiledGrad::forward_saving`] keeps the log-sum-exps: the gradient plan is
    /// one fused attention's backward over the inputs, that attention (its output the `o`
    /// operand of every gradient node, its cotangent the cotangent itself) is the forward's
    /// f32 result.
    pub fn saves_forward(&self) -> bool {
        self.ret == DType::F32
            && self.output_count() == 1
            && self.backward.saved_attention().is_some()
            && output_is_fused_attention(&self.vjp)
    }

    /// The forward on `inputs` and, where [`CompiledGrad::saves_forward`], the row
    /// log-sum-exps of its attention for [`CompiledGrad::backward_saved`] (`None`
    /// elsewhere). The output is the fused forward's with its statistics (exact, as
    /// [`CompiledGrad::forward`]'s, not necessarily in the same bits).
    pub fn forward_saving(
        &self,
        inputs: &[Tensor],
        threads: usize,
    ) -> Result<(Tensor, Option<Vec<f32>>), RunError> {
        if !self.saves_forward() {
            return Ok((self.forward(inputs, threads)?, None));
        }
        self.check_input_count(inputs)?;
        let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
        match self.backward.run_forward_saving(&views, threads)? {
            Some(saved) => {
                let shape = self.forward.output_shape().to_vec();
                let output = Tensor {
                    shape,
                    data: TensorData::F32(saved.o),
                };
                Ok((output, Some(saved.lse)))
            }
            None => Ok((self.forward(inputs, threads)?, None)),
        }
    }

    /// [`CompiledGrad::backward`] from the forward's `output` and `lse` (as
    /// [`CompiledGrad::forward_saving`] returned them for the same inputs) instead of a
    /// recomputed forward; recomputes where the plan cannot start from them (or `output` is
    /// not f32).
    pub fn backward_saved(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        lse: &[f32],
        cotangent: &Tensor,
        threads: usize,
    ) -> Result<Vec<Tensor>, RunError> {
        let TensorData::F32(o) = &output.data else {
            return self.backward(inputs, cotangent, threads);
        };
        if !self.saves_forward() {
            return self.backward(inputs, cotangent, threads);
        }
        self.check_input_count(inputs)?;
        let dys = self.check_cotangents(std::slice::from_ref(cotangent))?;
        let views = views_with_cotangents(inputs, &dys);
        let saved = Saved { o, lse };
        match self.backward.run_outputs_saved(&views, saved, threads)? {
            Some(outputs) => Ok(outputs
                .into_iter()
                .map(|o| Tensor {
                    shape: o.shape,
                    data: TensorData::F32(o.data),
                })
                .collect()),
            None => self.backward(inputs, cotangent, threads),
        }
    }
}

/// Whether every fused attention gradient of `vjp` differentiates the forward's output node
/// with the cotangent itself as `dO` (so the forward's output is the `O` the backward reads).
fn output_is_fused_attention(vjp: &Vjp) -> bool {
    let graph = &vjp.graph;
    let mut any = false;
    for id in graph.topo_order() {
        if let Op::Backward(BackwardOp::Attention(a)) = &graph.node(id).op {
            let operands = graph.operands(id);
            let arity = a.attention.arity();
            let cotangent = operands.get(arity + 1).map(|&c| &graph.node(c).op);
            let direct =
                matches!(cotangent, Some(Op::Input { index, .. }) if *index == vjp.cotangent());
            if operands.get(arity) != Some(&vjp.output) || !direct {
                return false;
            }
            any = true;
        }
    }
    any
}

/// A cotangent of ones (the gradient of the sum of the outputs).
pub fn ones(shape: &[usize]) -> Tensor {
    Tensor {
        shape: shape.to_vec(),
        data: TensorData::F32(vec![1.0; shape.iter().product()]),
    }
}

/// The gradients of `kernel` as written with respect to `wrt`, by the f64 interpreter on its
/// plain gradient graph (the reference; results rounded to f32), for one cotangent per
/// output.
pub fn reference_gradients(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[Tensor],
    cotangents: &[Tensor],
    wrt: &[usize],
) -> Result<Vec<Tensor>, RunError> {
    let g = vjp(kernel, wrt)?;
    if inputs.len() != kernel.params.len() {
        return Err(RunError::InputCount {
            expected: kernel.params.len(),
            got: inputs.len(),
        });
    }
    if cotangents.len() != g.forward_outputs.len() {
        return Err(RunError::CotangentCount {
            expected: g.forward_outputs.len(),
            got: cotangents.len(),
        });
    }
    let mut arrays: Vec<_> = inputs.iter().map(Tensor::to_f64_array).collect();
    arrays.extend(cotangents.iter().map(Tensor::to_f64_array));
    let values = evaluate_outputs(&g.combined(), bindings, &arrays, &g.outputs())?;
    Ok(values
        .into_iter()
        .map(|a| Tensor::from_f64_array(&a, DType::F32))
        .collect())
}

/// The gradient graph the reference evaluates (for memory checks before evaluating it).
pub fn reference_graph(kernel: &Kernel, wrt: &[usize]) -> Result<Kernel, RunError> {
    Ok(vjp(kernel, wrt)?.combined())
}

/// The gradient plan's inputs: the kernel's, then the cotangents `dys`.
fn views_with_cotangents<'a>(inputs: &'a [Tensor], dys: &'a [Cow<'a, [f32]>]) -> Vec<Input<'a>> {
    let mut views: Vec<Input<'a>> = inputs.iter().map(input_view).collect();
    views.extend(dys.iter().map(|dy| Input::F32(dy)));
    views
}
