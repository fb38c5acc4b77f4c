//! attnc: a compiler for attention.
//!
//! The facade over the stages: [`source`] turns `.attn` text into checked IR, [`io`] reads and
//! writes tensors, [`policy`] holds the approximation policy, [`Compiler`] is the one
//! pipeline (optimize → validate → compile → run) with its settings, and [`engine`] runs a
//! kernel on the reference interpreter or as machine code. [`grad`] compiles a kernel's
//! gradients beside its forward; [`train`] has the mixed-precision pieces of a training loop
//! (storage rounding with underflow counts, f32 master weights, a dynamic loss scaler). The
//! pipeline never measures the machine or writes a file on its own: the ceilings the cost model
//! divides by are handed to the [`Compiler`], and [`machine`] (called by the front ends: the
//! `attnc` binary and the Python package) measures and caches them.
//!
//! ```
//! let module = attnc::source::compile_text(
//!     "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
//!          return softmax(q @ k.T / sqrt(d)) @ v;
//!      }",
//! )
//! .expect("the program checks");
//! assert_eq!(module.kernels[0].name, "f");
//! ```
#![warn(missing_docs)]

pub mod approx;
pub mod baseline;
pub mod calibration;
pub mod compiler;
pub mod engine;
pub mod grad;
pub mod io;
pub mod machine;
pub mod policy;
pub mod source;
pub mod train;

pub use attnc_ir as ir;
pub use attnc_jit as jit;
pub use attnc_syntax as syntax;
pub use compiler::{Calibration, Compiled, Compiler};
