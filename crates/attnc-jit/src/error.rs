//! Errors of code generation and of running compiled kernels.

use thiserror::Error;

/// Everything that can go wrong between a checked IR kernel and its outputs.
#[derive(Debug, Error)]
pub enum JitError {
    /// The host CPU or Cranelift cannot compile something; the caller may fall back to the
    /// interpreter.
    #[error("unsupported on this cpu: {what}")]
    Unsupported {
        /// What could not be compiled.
        what: String,
    },
    /// Cranelift rejected a function (verifier or codegen error).
    #[error("code generation failed for kernel `{kernel}`: {detail}")]
    Codegen {
        /// The generated function's name.
        kernel: String,
        /// Cranelift's message.
        detail: String,
    },
    /// A buffer handed to a compiled kernel does not match what it was compiled for.
    #[error("input `{input}`: {detail}")]
    Buffer {
        /// The parameter name.
        input: String,
        /// What is wrong (length, dtype, shape).
        detail: String,
    },
    /// Shapes could not be resolved or overflow.
    #[error("shape error: {0}")]
    Shape(String),
    /// The plan met an IR construct it cannot lower.
    #[error("cannot plan `{op}`: {detail}")]
    Plan {
        /// The IR op.
        op: String,
        /// Why.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = JitError> = std::result::Result<T, E>;
