//! Cranelift code generation for attnc: every checked IR kernel becomes machine code.
//!
//! A [`plan`] lowers an IR graph at bound shapes to kernels over buffers; [`kernels`] generate
//! one Cranelift function each; [`jit`] owns the compiled code; [`runtime`] checks buffers and
//! runs the plan across threads. Only [`jit`] contains `unsafe`.
#![warn(missing_docs)]

pub mod error;
pub mod jit;
pub mod kernels;
pub mod plan;
pub mod runtime;
pub mod simd;
pub mod tiles;

pub use error::{JitError, Result};
pub use runtime::{CompileOptions, CompiledKernel, Input, Output};
