//! Tokens: the lexer's output and the parser's input.

use crate::span::Span;

/// What kind of token, with the value of literals.
///
/// Keywords are not separate kinds: they are [`TokenKind::Ident`]s that the parser recognizes
/// by their text (see [`KEYWORDS`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TokenKind {
    /// A name or keyword: ASCII letter or `_`, then letters, digits and `_`.
    Ident,
    /// An integer literal written with digits only (`256`); it fits in a `u64`.
    Int(u64),
    /// A literal with a fraction or an exponent (`1.5`, `1e-3`); always finite.
    Float(f64),
    /// `(`
    LParen,
    /// `)`
    RParen,
    /// `[`
    LBracket,
    /// `]`
    RBracket,
    /// `{`
    LBrace,
    /// `}`
    RBrace,
    /// `,`
    Comma,
    /// `;`
    Semi,
    /// `:`
    Colon,
    /// `+`
    Plus,
    /// `-`
    Minus,
    /// `*`
    Star,
    /// `/`
    Slash,
    /// `@`: matrix product, and the start of an attribute (`@approx`).
    At,
    /// `.`
    Dot,
    /// `&`
    Amp,
    /// `|`
    Pipe,
    /// `=`
    Eq,
    /// `->`
    Arrow,
    /// `<`, `<=`, `>`, `>=`, `==` or `!=`: not part of the language, lexed so that the parser
    /// can say so.
    Compare,
    /// The end of the input (its span is empty and sits just after the last token).
    Eof,
}

impl TokenKind {
    /// How the token is named in messages ("found `;`").
    pub fn describe(self) -> &'static str {
        match self {
            TokenKind::Ident => "identifier",
            TokenKind::Int(_) => "integer",
            TokenKind::Float(_) => "number",
            TokenKind::LParen => "`(`",
            TokenKind::RParen => "`)`",
            TokenKind::LBracket => "`[`",
            TokenKind::RBracket => "`]`",
            TokenKind::LBrace => "`{`",
            TokenKind::RBrace => "`}`",
            TokenKind::Comma => "`,`",
            TokenKind::Semi => "`;`",
            TokenKind::Colon => "`:`",
            TokenKind::Plus => "`+`",
            TokenKind::Minus => "`-`",
            TokenKind::Star => "`*`",
            TokenKind::Slash => "`/`",
            TokenKind::At => "`@`",
            TokenKind::Dot => "`.`",
            TokenKind::Amp => "`&`",
            TokenKind::Pipe => "`|`",
            TokenKind::Eq => "`=`",
            TokenKind::Arrow => "`->`",
            TokenKind::Compare => "comparison",
            TokenKind::Eof => "end of file",
        }
    }
}

/// One token with its byte span.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Token {
    /// What kind.
    pub kind: TokenKind,
    /// Where it was written.
    pub span: Span,
}

/// Reserved words: they can never name a kernel, parameter, `let` binding, call or variable.
///
/// `kernel`, `let`, `return` structure a file; `inf` is the literal infinity (`-inf` is its
/// negation). Every other word with a meaning is contextual: the pattern words
/// ([`PATTERN_KEYWORDS`]) start a mask pattern only where a pattern is expected (the second
/// argument of `mask`), so `kernel window(...)` and a parameter named `causal` are fine; `f32`,
/// `i32`, `approx`, `T`, `int8`, `lowrank`, `random_features`, `nystrom`, `tol`, `r`, `m`, `seed` are
/// ordinary names outside the one place where they have their meaning.
pub const KEYWORDS: &[&str] = &["kernel", "let", "return", "inf"];

/// Words that start a mask pattern where one is expected.
pub const PATTERN_KEYWORDS: &[&str] = &[
    "causal",
    "window",
    "dilated",
    "global",
    "block",
    "document",
    "topk_blocks",
];

/// Whether `name` is reserved (see [`KEYWORDS`]).
pub fn is_keyword(name: &str) -> bool {
    KEYWORDS.contains(&name)
}
