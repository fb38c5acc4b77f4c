//! The attnc optimizer: equality saturation over the IR with egg.
//!
//! Architecture, in pipeline order:
//!
//! - [`lang`]: the e-graph language, mirroring the IR ops, with leaf atoms for attributes and
//!   fused kernel-form nodes (`attention`, `attention-scored` for biased or softcapped
//!   scores, `linear-attention`);
//! - [`convert`]: IR `Kernel` → `RecExpr` and back (fused nodes come back as the plain IR the
//!   JIT's attention matcher recognizes);
//! - [`analysis`]: concrete shapes at the bound dimensions and scalar constants per e-class;
//! - [`rules`]: the exact rule families (algebra, softmax, masking, linear), as tables;
//! - [`saturate`]: the runner with limits, backoff scheduling and explanations;
//! - [`schedule`]: the backoff scheduler, timed per rule;
//! - [`cost`]: estimated cycles from FLOPs and bytes, against [`ceilings`] (this machine's or
//!   the documented defaults);
//! - [`extract`]: a worklist extractor under that model, and bounded term rendering;
//! - [`fusion`]: which attentions of the chosen form are fused, and why the others are not;
//! - [`trace`]: [`optimize`], the one entry point, and its [`Trace`].
//!
//! Architecture invariant: the unoptimized kernel is always a valid answer — `optimize` never
//! fails and returns the input when nothing cheaper is found or anything goes wrong.
//!
//! ```
//! let src = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {\n\
//!            return softmax(mask(q @ k.T, causal)) @ v; }";
//! let (file, _) = attnc_syntax::parse(src);
//! let module = attnc_ir::lower::lower_file(&file).expect("valid");
//! let kernel = &module.kernels[0];
//! let bindings = [("n".to_string(), 64), ("d".to_string(), 8)].into_iter().collect();
//! let result = attnc_opt::optimize(kernel, &bindings, &Default::default());
//! assert!(result.trace.derivation_rules().contains(&"mask-attention-fuse"));
//! ```
#![warn(missing_docs)]

pub mod analysis;
pub mod approx;
pub mod ceilings;
pub mod convert;
pub mod cost;
pub mod extract;
pub mod fusion;
pub mod lang;
pub mod rules;
pub mod saturate;
pub mod schedule;
pub mod score;
pub mod trace;

pub use approx::{Approx, ApproxOutcome, ApproxPolicy};
pub use ceilings::{Ceilings, TierSpeeds};
pub use saturate::{Limits, StopReason};
pub use trace::{optimize, Decision, DerivationStep, OptimizeOptions, Optimized, Trace};

/// Why a kernel could not be converted to or from the e-graph language.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptError {
    /// The IR node with this index breaks an IR invariant.
    #[error("node %{0} of the ir is malformed")]
    Malformed(usize),
    /// An extracted expression does not convert back to IR.
    #[error("extracted form does not convert back: {0}")]
    Extracted(String),
}
