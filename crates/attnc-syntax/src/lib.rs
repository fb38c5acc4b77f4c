//! The `.attn` front end: spans, tokens, lexer, recursive-descent parser, AST, diagnostics and a
//! pretty-printer that round-trips.
//!
//! ```
//! let src = "kernel f(q: f32[n, d]) -> f32[n, d] { return q; }";
//! let (file, diagnostics) = attnc_syntax::parse(src);
//! assert!(diagnostics.is_empty());
//! assert_eq!(file.kernels[0].name.name, "f");
//! let printed = attnc_syntax::print_file(&file);
//! assert_eq!(attnc_syntax::parse(&printed).0.without_spans(), file.without_spans());
//! ```
//!
//! Map: [`lexer`] (text → [`token`]s) → [`parser`] (tokens → [`ast`], depth-limited by
//! [`MAX_DEPTH`]) → [`mod@print`] (ast → text); [`diagnostic`] is the error type and [`render`]
//! shows it. Parsing never fails: it returns a tree and a list of diagnostics.
//!
//! This crate knows nothing of the IR, egg or Cranelift.
#![warn(missing_docs)]

pub mod ast;
pub mod diagnostic;
pub mod lexer;
pub mod parser;
pub mod print;
pub mod render;
pub mod span;
mod strip;
pub mod token;

pub use diagnostic::{Diagnostic, Label, Severity};
pub use lexer::decode_source;
pub use parser::MAX_DEPTH;
pub use print::{print_expr, print_file, print_kernel};
pub use render::{LineIndex, LocatedDiagnostic, LocatedLabel};
pub use span::Span;

/// At most this many diagnostics are returned by [`parse`]; the last one says how many more
/// there were.
pub const MAX_DIAGNOSTICS: usize = 100;

/// Parses a whole `.attn` source file.
///
/// Never panics and never fails: returns every kernel it could build and the diagnostics (lexer
/// and parser, in source order). An empty file, or one with only comments, gives no kernels and
/// no diagnostics.
pub fn parse(src: &str) -> (ast::File, Vec<Diagnostic>) {
    if src.len() > u32::MAX as usize {
        let error = Diagnostic::error("the file is too large (4 GiB or more)", Span::default());
        return (
            ast::File {
                kernels: Vec::new(),
            },
            vec![error],
        );
    }
    let (tokens, mut diagnostics, dropped) = lexer::lex_counted(src);
    let lex_errors: Vec<u32> = diagnostics
        .iter()
        .filter_map(|d| d.primary_span().map(|s| s.start))
        .collect();
    let (file, parse_diagnostics, parse_dropped) = parser::parse_tokens(src, tokens, lex_errors);
    let dropped = dropped + parse_dropped;
    diagnostics.extend(parse_diagnostics);
    diagnostics.sort_by_key(|d| d.primary_span().map_or(0, |s| s.start));
    if diagnostics.len() + dropped > MAX_DIAGNOSTICS {
        let more = diagnostics.len() + dropped - (MAX_DIAGNOSTICS - 1);
        let span = diagnostics[MAX_DIAGNOSTICS - 1]
            .primary_span()
            .unwrap_or_default();
        diagnostics.truncate(MAX_DIAGNOSTICS - 1);
        diagnostics.push(
            Diagnostic::error(format!("too many errors: {more} more not shown"), span)
                .with_primary_message("stopped reporting here"),
        );
    }
    (file, diagnostics)
}
