//! Cranelift code generation for attnc: every checked IR kernel becomes machine code.
//!
//! A [`plan`] lowers an IR graph at bound shapes to kernels over buffers; [`kernels`] generate
//! one Cranelift function each; [`jit`] owns the compiled code; [`runtime`] checks buffers and
//! runs the plan across threads; [`cache`] keeps compiled kernels by (IR, shapes, options, CPU);
//! [`ceiling`] and [`bandwidth`] measure this machine's FMA and memory ceilings.
//! [`wide`] runs fused attention on the full-width AVX-512 and AMX kernels of `attnc-wide`
//! where the CPU has them, and [`linear`] linear attention without a mask, its feature maps
//! fused on row blocks. After a fused attention step, `finite` recomputes the batch entries
//! whose accumulator overflowed from a scaled copy of V. Only [`jit`] contains `unsafe`.
//!
//! ```no_run
//! # fn demo(kernel: &attnc_ir::Kernel, bindings: &attnc_ir::Bindings, x: &[f32]) -> attnc_jit::Result<()> {
//! use attnc_jit::{CompileOptions, CompiledKernel, Input};
//! // Keeping the CLIF of each function is optional (it is printed below).
//! let options = CompileOptions { keep_text: true, ..CompileOptions::default() };
//! let compiled = CompiledKernel::compile(kernel, bindings, &options)?;
//! let out = compiled.run(&[Input::F32(x)], 2)?; // checked: count, dtype, length
//! for (name, clif) in compiled.clif() {
//!     println!("{name}:\n{clif}");
//! }
//! # let _ = out; Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod backward;
pub mod bandwidth;
pub mod buffer;
pub mod cache;
pub mod ceiling;
pub mod chunkwise;
pub mod error;
mod finite;
mod gate;
pub mod host;
pub mod jit;
pub mod kernels;
pub mod linear;
pub mod plan;
mod pool;
pub mod runtime;
pub mod simd;
pub mod tiles;
pub mod wide;

pub use error::{JitError, Result};
pub use runtime::{CompileOptions, CompiledKernel, Input, Output};
