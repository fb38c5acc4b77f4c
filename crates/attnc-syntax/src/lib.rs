//! The `.attn` front end: spans, tokens, lexer, recursive-descent parser, AST, diagnostics and a
//! pretty-printer that round-trips.
//!
//! ```
//! let src = "kernel f(q: f32[n, d]) -> f32[n, d] { return q; }";
//! let (file, diagnostics) = attnc_syntax::parse(src);
//! assert!(diagnostics.is_empty());
//! assert_eq!(file.kernels[0].name.name, "f");
//! ```
//!
//! This crate knows nothing of the IR, egg or Cranelift.
#![warn(missing_docs)]

pub mod ast;
pub mod diagnostic;
pub mod span;

pub use diagnostic::{Diagnostic, Label, Severity};
pub use span::Span;
