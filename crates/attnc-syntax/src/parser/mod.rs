//! The recursive-descent parser: tokens to an [`ast::File`](crate::ast::File) plus diagnostics.
//!
//! Parsing never fails and never panics: it returns every kernel it could build and one
//! diagnostic per problem. After an error the parser skips to a synchronization point (the next
//! `;` or `}` of the kernel body, or the next `kernel`) and goes on.
//!
//! Architecture invariant: every tree the parser builds is at most [`MAX_DEPTH`] levels deep,
//! and the parser's own recursion is bounded by the same limit, so printing, lowering and
//! dropping a parsed tree by recursion is safe on a small stack.
//!
//! The grammar is LANGUAGE.md §2, with these choices where it is silent:
//!
//! - `&` binds tighter than `|` in mask patterns (like boolean and/or); a chain of either is
//!   one n-ary node ([`PatternKind::Or`](crate::ast::PatternKind::Or)), so a union of any
//!   number of patterns is not deep. The second argument of `mask` is a pattern when it starts
//!   with a pattern keyword, or with `(`s followed by one; everywhere else pattern words are
//!   names.
//! - Reserved words ([`KEYWORDS`](crate::token::KEYWORDS)) never name anything; `f32`, `T`,
//!   `approx`, `tol`, the pattern words and the other words with a meaning are contextual.
//!   `inf` is the literal infinity.
//! - As written in the grammar: a kernel has at least one parameter (a trailing `,` is allowed
//!   there), a call at least one argument (no trailing `,`); a type may have no dimension
//!   (`f32[]`, a scalar).
//! - Comparisons (`a < b`) and keyword arguments (`window(w = 3)`) are not part of the
//!   language; they are reported as such rather than as a missing `)`.
//! - Several `@approx(...)` attributes are flattened into [`Kernel::approx`](crate::ast::Kernel).
//! - Sizes (dimensions, `r`, `m`, `seed`) are non-negative integers that fit in a `u64`;
//!   pattern sizes may also be dimension symbols; `tol` is any number.
//!
//! The pieces live in `item` (kernels, attributes, types),
//! `expr` (expressions and calls) and `pattern` (mask patterns).

mod expr;
mod item;
mod pattern;

use crate::ast::{File, Ident};
use crate::diagnostic::Diagnostic;
use crate::span::Span;
use crate::token::{is_keyword, Token, TokenKind};

/// The deepest tree the parser builds: nested parentheses, unary and postfix chains, long
/// left-associative chains of binary operators (`a + a + … + a` is a left-deep tree) and nested
/// mask patterns all count (a flat chain `p | q | …` of patterns is one level). Anything deeper
/// is an error, never a stack overflow.
pub const MAX_DEPTH: usize = 256;

/// Parses a token stream (ending in [`TokenKind::Eof`]) of `src`.
///
/// `lex_errors` are the starts of the lexer's diagnostics: a parser error right after a
/// character the lexer already reported is not reported again. Returns the file, at most
/// [`MAX_DIAGNOSTICS`](crate::MAX_DIAGNOSTICS) diagnostics and how many more were dropped.
pub(crate) fn parse_tokens(
    src: &str,
    tokens: Vec<Token>,
    lex_errors: Vec<u32>,
) -> (File, Vec<Diagnostic>, usize) {
    let mut parser = Parser {
        src,
        tokens,
        pos: 0,
        prev_end: 0,
        nesting: 0,
        diagnostics: Vec::new(),
        dropped: 0,
        lex_errors,
    };
    let file = parser.file();
    (file, parser.diagnostics, parser.dropped)
}

/// Marks a result whose error has already been reported.
#[derive(Debug)]
pub(crate) struct Reported;

type PResult<T> = Result<T, Reported>;

pub(crate) struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    /// End of the last consumed token (where a missing `;` belongs).
    prev_end: u32,
    /// How many parentheses, calls and patterns we are inside (bounds recursion).
    nesting: usize,
    diagnostics: Vec<Diagnostic>,
    /// Diagnostics not kept because there were too many already.
    dropped: usize,
    lex_errors: Vec<u32>,
}

impl<'a> Parser<'a> {
    // ----- looking at tokens -----

    fn peek(&self) -> Token {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> Token {
        let last = self.tokens.len().saturating_sub(1);
        match self.tokens.get((self.pos + n).min(last)) {
            Some(t) => *t,
            None => Token {
                kind: TokenKind::Eof,
                span: Span::default(),
            },
        }
    }

    fn bump(&mut self) -> Token {
        let token = self.peek();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
            self.prev_end = token.span.end;
        }
        token
    }

    fn text(&self, token: Token) -> &'a str {
        self.src.get(token.span.range()).unwrap_or("")
    }

    fn at(&self, kind: TokenKind) -> bool {
        self.peek().kind == kind
    }

    fn at_word(&self, word: &str) -> bool {
        self.is_word(self.peek(), word)
    }

    fn is_word(&self, token: Token, word: &str) -> bool {
        token.kind == TokenKind::Ident && self.text(token) == word
    }

    fn eat(&mut self, kind: TokenKind) -> Option<Token> {
        if self.at(kind) {
            Some(self.bump())
        } else {
            None
        }
    }

    /// Whether the next token starts a kernel: `kernel` or `@approx`.
    fn at_kernel_start(&self) -> bool {
        self.at_word("kernel")
            || (self.at(TokenKind::At) && self.is_word(self.peek_at(1), "approx"))
    }

    /// How a token is named in "found …".
    fn found(&self, token: Token) -> String {
        match token.kind {
            TokenKind::Ident if is_keyword(self.text(token)) => {
                format!("keyword `{}`", self.text(token))
            }
            TokenKind::Ident => format!("identifier `{}`", self.text(token)),
            TokenKind::Int(_) | TokenKind::Float(_) => format!("number `{}`", self.text(token)),
            kind => kind.describe().to_string(),
        }
    }

    // ----- reporting -----

    /// Records `diagnostic` unless it repeats the previous one's place or follows right after a
    /// character the lexer rejected. Always returns [`Reported`].
    #[cold]
    #[inline(never)]
    fn report(&mut self, diagnostic: Diagnostic) -> Reported {
        let start = diagnostic.primary_span().map_or(0, |s| s.start);
        let duplicate = self
            .diagnostics
            .last()
            .and_then(Diagnostic::primary_span)
            .is_some_and(|s| s.start == start);
        let from = self.prev_end.min(start);
        let end = self.peek().span.end.max(start);
        let after_lex_error = {
            let i = self.lex_errors.partition_point(|&e| e < from);
            self.lex_errors.get(i).is_some_and(|&e| e <= end)
        };
        if duplicate || after_lex_error {
            // Already said.
        } else if self.diagnostics.len() < crate::MAX_DIAGNOSTICS {
            self.diagnostics.push(diagnostic);
        } else {
            self.dropped += 1;
        }
        Reported
    }

    /// Reports "expected {what}, found {next token}" at the next token.
    #[cold]
    #[inline(never)]
    fn error_expected(&mut self, what: &str) -> Reported {
        let token = self.peek();
        let message = format!("expected {what}, found {}", self.found(token));
        self.report(
            Diagnostic::error(message, token.span).with_primary_message(format!("expected {what}")),
        )
    }

    /// Consumes a token of `kind` or reports "expected `;` {context}, found …".
    fn expect(&mut self, kind: TokenKind, context: &str) -> PResult<Token> {
        if let Some(token) = self.eat(kind) {
            return Ok(token);
        }
        Err(self.expect_error(kind, context))
    }

    #[cold]
    #[inline(never)]
    fn expect_error(&mut self, kind: TokenKind, context: &str) -> Reported {
        let token = self.peek();
        let what = kind.describe();
        let message = format!("expected {what} {context}, found {}", self.found(token));
        // A missing `;` belongs right after the previous token, as in rustc.
        let span = if kind == TokenKind::Semi && self.pos > 0 {
            Span {
                start: self.prev_end,
                end: self.prev_end,
            }
        } else {
            token.span
        };
        self.report(
            Diagnostic::error(message, span).with_primary_message(format!("expected {what}")),
        )
    }

    /// Consumes the closing delimiter matching `open`, or reports one error that labels the
    /// opening place.
    fn expect_close(&mut self, close: TokenKind, open: Token) -> PResult<Token> {
        if let Some(token) = self.eat(close) {
            return Ok(token);
        }
        Err(self.expect_close_error(close, open))
    }

    #[cold]
    #[inline(never)]
    fn expect_close_error(&mut self, close: TokenKind, open: Token) -> Reported {
        let token = self.peek();
        let (open_text, close_text) = (open.kind.describe(), close.describe());
        let message = format!(
            "expected {close_text} to close {open_text}, found {}",
            self.found(token)
        );
        let open_label = if open.kind == TokenKind::LBrace {
            "this `{` is never closed".to_string()
        } else {
            format!("unclosed {open_text}")
        };
        self.report(
            Diagnostic::error(message, token.span)
                .with_primary_message(format!("expected {close_text}"))
                .with_label(open.span, open_label),
        )
    }

    /// Consumes a name that is not a keyword.
    fn expect_name(&mut self, what: &str) -> PResult<Ident> {
        let token = self.peek();
        if token.kind == TokenKind::Ident {
            let name = self.text(token);
            if !is_keyword(name) {
                self.bump();
                return Ok(Ident {
                    name: name.to_string(),
                    span: token.span,
                });
            }
            let message = format!("expected {what}, found keyword `{name}`");
            return Err(self.report(
                Diagnostic::error(message, token.span)
                    .with_primary_message("reserved word")
                    .with_note(format!(
                        "`{name}` is a reserved word and cannot be used as a name"
                    )),
            ));
        }
        Err(self.error_expected(what))
    }

    /// Runs `inner` one level deeper, or reports the depth limit.
    fn nested<T>(&mut self, what: &str, inner: impl FnOnce(&mut Self) -> PResult<T>) -> PResult<T> {
        if self.nesting >= MAX_DEPTH {
            return Err(self.depth_error(what));
        }
        self.nesting += 1;
        let result = inner(self);
        self.nesting -= 1;
        result
    }

    /// Reports that a tree of height `height` is too deep, if it is.
    fn check_height(&mut self, height: usize, what: &str) -> PResult<()> {
        if height > MAX_DEPTH {
            Err(self.depth_error(what))
        } else {
            Ok(())
        }
    }

    #[cold]
    #[inline(never)]
    fn depth_error(&mut self, what: &str) -> Reported {
        let span = self.peek().span;
        // Expressions can be named; patterns cannot, but their chains do not nest.
        let note = if what == pattern::WHAT {
            "patterns cannot be named with `let`: write them with fewer parentheses \
             (a chain `p | q | …` or `p & q & …` of any length is one level)"
        } else {
            "split it with `let` statements"
        };
        self.report(
            Diagnostic::error(format!("{what} nests deeper than {MAX_DEPTH} levels"), span)
                .with_primary_message("too deep here")
                .with_note(note),
        )
    }

    // ----- recovery -----

    /// Skips to the end of a broken statement: past the next `;`, or up to a `}`, `let`,
    /// `return` or kernel start, all outside braces opened while skipping. Parentheses and
    /// brackets are not counted: `;` and `}` never belong inside them, so an unclosed `(`
    /// cannot swallow the rest of the kernel.
    fn sync_stmt(&mut self) {
        let mut braces = 0usize;
        loop {
            let token = self.peek();
            match token.kind {
                TokenKind::Eof => return,
                _ if self.at_kernel_start() => return,
                TokenKind::Semi if braces == 0 => {
                    self.bump();
                    return;
                }
                TokenKind::RBrace if braces == 0 => return,
                TokenKind::RBrace => braces -= 1,
                TokenKind::LBrace => braces += 1,
                TokenKind::Ident
                    if braces == 0 && (self.at_word("let") || self.at_word("return")) =>
                {
                    return
                }
                _ => {}
            }
            self.bump();
        }
    }

    /// Skips to the next kernel start (or the end of the file).
    fn sync_item(&mut self) {
        while !self.at(TokenKind::Eof) && !self.at_kernel_start() {
            self.bump();
        }
    }

    // ----- the file -----

    fn file(&mut self) -> File {
        let mut kernels = Vec::new();
        loop {
            if self.at(TokenKind::Eof) {
                break;
            }
            let attribute = self.at(TokenKind::At) && self.peek_at(1).kind == TokenKind::Ident;
            if self.at_kernel_start() || attribute {
                match self.kernel() {
                    Ok(kernel) => kernels.push(kernel),
                    Err(Reported) => self.sync_item(),
                }
                continue;
            }
            let token = self.peek();
            let message = format!("expected `kernel`, found {}", self.found(token));
            self.report(
                Diagnostic::error(message, token.span)
                    .with_primary_message("expected `kernel`")
                    .with_note("a file holds only kernels: `kernel name(params) -> type { ... }`"),
            );
            self.bump();
            self.sync_item();
        }
        File { kernels }
    }
}
