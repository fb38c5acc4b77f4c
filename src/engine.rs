//! Running one checked kernel on bound inputs, on the reference interpreter or as machine code.

use crate::io::{Tensor, TensorData};
use attnc_ir::bind::{bind_shapes, BindError};
use attnc_ir::interp::{evaluate, EvalError};
use attnc_ir::{Bindings, DType, Kernel};
use thiserror::Error;

/// Which engine executes a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The f64 reference interpreter (the semantics; slow).
    Interp,
}

impl Engine {
    /// The engine's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Interp => "interp",
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
    /// One tensor per parameter is needed.
    #[error("expected {expected} inputs, got {got}")]
    InputCount {
        /// The kernel's parameter count.
        expected: usize,
        /// The number of tensors given.
        got: usize,
    },
}

/// Binds the kernel's dimension symbols from its inputs and `given` values.
pub fn bind(kernel: &Kernel, inputs: &[Tensor], given: &Bindings) -> Result<Bindings, RunError> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|t| Some(t.shape.clone())).collect();
    Ok(bind_shapes(kernel, &shapes, given)?)
}

/// Runs `kernel` on `inputs` (one per parameter, in order) with `engine`.
///
/// The result is f32, rounded through f16/bf16 first when the kernel returns that type.
pub fn execute(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[Tensor],
    engine: Engine,
) -> Result<Tensor, RunError> {
    if inputs.len() != kernel.params.len() {
        return Err(RunError::InputCount {
            expected: kernel.params.len(),
            got: inputs.len(),
        });
    }
    match engine {
        Engine::Interp => {
            let arrays: Vec<_> = inputs.iter().map(Tensor::to_f64_array).collect();
            let result = evaluate(kernel, bindings, &arrays)?;
            let shape = result.shape().to_vec();
            let data: Vec<f32> = result.iter().map(|&x| x as f32).collect();
            Ok(output_tensor(shape, data, kernel.ret_dtype))
        }
    }
}

/// Stores f32 results in the kernel's return type: f16 stays f16, bf16 is written as f32
/// (values already rounded by the kernel's final cast).
fn output_tensor(shape: Vec<usize>, data: Vec<f32>, ret: DType) -> Tensor {
    let data = match ret {
        DType::F16 => TensorData::F16(data.into_iter().map(half::f16::from_f32).collect()),
        DType::F32 | DType::Bf16 => TensorData::F32(data),
    };
    Tensor { shape, data }
}
