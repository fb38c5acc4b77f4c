//! attnc: a compiler for attention.
//!
//! The facade over the stages: [`source`] turns `.attn` text into checked IR, [`io`] reads and
//! writes tensors, [`policy`] holds the approximation policy, [`ceilings`] measures (once per
//! machine) the figures the cost model divides by, and [`engine`] runs a kernel on the
//! reference interpreter or as machine code.
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
pub mod ceilings;
pub mod engine;
pub mod io;
pub mod policy;
pub mod source;

pub use attnc_ir as ir;
pub use attnc_syntax as syntax;
