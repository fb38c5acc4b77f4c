//! Running one checked kernel on bound inputs, on the reference interpreter or as machine code
//! (through [`crate::Compiler`]).

use crate::io::{Tensor, TensorData};
use attnc_ir::bind::{bind_shapes, BindError};
use attnc_ir::interp::{evaluate_all, EvalError};
use attnc_ir::{Bindings, DType, Kernel};
use attnc_jit::{CompiledKernel, Input, JitError};
use thiserror::Error;

/// Which engine executes a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The f64 reference interpreter (the semantics; slow).
    Interp,
    /// Cranelift machine code (f32, SIMD, threaded).
    Jit,
}

impl Engine {
    /// The engine's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Interp => "interp",
            Engine::Jit => "jit",
        }
    }
}

/// Why a kernel could not run.
#[derive(Debug, Error)]
pub enum RunError {
    /// The inputs' shapes do not fit the kernel's parameters.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The interpreter rejected the inputs.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Code generation or the compiled kernel failed.
    #[error(transparent)]
    Jit(#[from] JitError),
    /// The calibration sample of an approximation could not be built.
    #[error("calibration: {0}")]
    Calibration(String),
    /// The gradient graph could not be built.
    #[error(transparent)]
    Grad(#[from] attnc_ir::grad::GradError),
    /// The plan's buffers, or the interpreter's values, do not fit in the memory budget.
    #[error(
        "{what} needs {} at once but {} are available; its largest buffer is {largest} \
         (use smaller shapes, or raise --memory-limit)",
        crate::compiler::format_bytes(*needed),
        crate::compiler::format_bytes(*budget)
    )]
    Memory {
        /// What needs the memory: `the plan`, `the interpreter`.
        what: &'static str,
        /// Bytes needed at the peak.
        needed: u64,
        /// Bytes allowed.
        budget: u64,
        /// The largest buffer, described.
        largest: String,
    },
    /// One tensor per parameter is needed.
    #[error("expected {expected} inputs, got {got}")]
    InputCount {
        /// The kernel's parameter count.
        expected: usize,
        /// The number of tensors given.
        got: usize,
    },
    /// A gradient needs one cotangent per output of the kernel.
    #[error("the kernel returns {expected} value{}: expected one cotangent per output, got {got}", if *expected == 1 { "" } else { "s" })]
    CotangentCount {
        /// The kernel's output count.
        expected: usize,
        /// The number of cotangents given.
        got: usize,
    },
}

/// Binds the kernel's dimension symbols from its inputs and `given` values.
pub fn bind(kernel: &Kernel, inputs: &[Tensor], given: &Bindings) -> Result<Bindings, RunError> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|t| Some(t.shape.clone())).collect();
    Ok(bind_shapes(kernel, &shapes, given)?)
}

/// Runs a compiled kernel on `inputs` (one per parameter) with `threads` workers.
pub fn run_compiled(
    compiled: &CompiledKernel,
    ret: DType,
    inputs: &[Tensor],
    threads: usize,
) -> Result<Tensor, RunError> {
    let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
    let output = compiled.run(&views, threads)?;
    Ok(output_tensor(output.shape, output.data, ret))
}

/// Runs a compiled kernel on `inputs` and returns every output, in order (`rets`: their
/// return types).
pub fn run_compiled_all(
    compiled: &CompiledKernel,
    rets: &[DType],
    inputs: &[Tensor],
    threads: usize,
) -> Result<Vec<Tensor>, RunError> {
    let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
    let outputs = compiled.run_outputs(&views, threads)?;
    Ok(outputs
        .into_iter()
        .zip(rets.iter().copied().chain(std::iter::repeat(DType::F32)))
        .map(|(o, ret)| output_tensor(o.shape, o.data, ret))
        .collect())
}

/// A tensor as the JIT's input view.
pub fn input_view(tensor: &Tensor) -> Input<'_> {
    match &tensor.data {
        TensorData::F32(v) => Input::F32(v),
        TensorData::F16(v) => Input::F16(v),
        TensorData::Bf16(v) => Input::Bf16(v),
        TensorData::I32(v) => Input::I32(v),
    }
}

/// Runs `kernel` on `inputs` (one per parameter, in order) with `engine`.
///
/// The result is f32, rounded through f16/bf16 first when the kernel returns that type.
/// `threads` applies to the JIT; the interpreter runs on the calling thread. A kernel with
/// several outputs gives its first ([`execute_all`] gives every one).
pub fn execute(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[Tensor],
    engine: Engine,
    threads: usize,
) -> Result<Tensor, RunError> {
    let all = execute_all(kernel, bindings, inputs, engine, threads)?;
    all.into_iter()
        .next()
        .ok_or_else(|| RunError::Jit(JitError::Shape("the kernel returned no value".into())))
}

/// [`execute`] for every output of `kernel`, in order (never empty).
pub fn execute_all(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[Tensor],
    engine: Engine,
    threads: usize,
) -> Result<Vec<Tensor>, RunError> {
    if inputs.len() != kernel.params.len() {
        return Err(RunError::InputCount {
            expected: kernel.params.len(),
            got: inputs.len(),
        });
    }
    match engine {
        Engine::Jit => {
            let compiled = crate::Compiler::new()
                .with_threads(threads)
                .compile(kernel, bindings)?;
            compiled.run_all(inputs, threads)
        }
        Engine::Interp => {
            let arrays: Vec<_> = inputs.iter().map(Tensor::to_f64_array).collect();
            let results = evaluate_all(kernel, bindings, &arrays)?;
            Ok(results
                .iter()
                .zip(kernel.outputs())
                .map(|(result, o)| {
                    let shape = result.shape().to_vec();
                    let data: Vec<f32> = result.iter().map(|&x| x as f32).collect();
                    output_tensor(shape, data, o.dtype)
                })
                .collect())
        }
    }
}

/// Stores f32 results in the kernel's return type: f16 stays f16, bf16 is written as f32
/// (values already rounded by the kernel's final cast).
fn output_tensor(shape: Vec<usize>, data: Vec<f32>, ret: DType) -> Tensor {
    let stored = if ret == DType::F16 {
        DType::F16
    } else {
        DType::F32
    };
    Tensor {
        shape,
        data: TensorData::from_f32_as(data, stored),
    }
}
