//! The lexer: `&str` to [`Token`]s with byte spans, plus diagnostics for what it cannot read.
//!
//! Lexing never stops at an error: a character outside the language is reported (with a span on
//! its character boundaries) and skipped; a malformed number is reported and replaced by `0`.

use crate::diagnostic::Diagnostic;
use crate::span::Span;
use crate::token::{Token, TokenKind};

/// Splits `src` into tokens, ending with one [`TokenKind::Eof`], and the diagnostics of
/// anything that is not a token.
///
/// At most [`MAX_DIAGNOSTICS`](crate::MAX_DIAGNOSTICS) diagnostics are kept; the last one then
/// says how many more there were.
pub fn lex(src: &str) -> (Vec<Token>, Vec<Diagnostic>) {
    let (tokens, mut diagnostics, dropped) = lex_counted(src);
    if dropped > 0 {
        let span = diagnostics
            .last()
            .and_then(Diagnostic::primary_span)
            .unwrap_or_default();
        diagnostics.push(Diagnostic::error(
            format!("too many errors: {dropped} more not shown"),
            span,
        ));
    }
    (tokens, diagnostics)
}

/// [`lex`], returning how many diagnostics were dropped past the limit instead of a note.
pub(crate) fn lex_counted(src: &str) -> (Vec<Token>, Vec<Diagnostic>, usize) {
    let mut lexer = Lexer {
        src,
        pos: 0,
        tokens: Vec::new(),
        diagnostics: Vec::new(),
        dropped: 0,
    };
    lexer.run();
    (lexer.tokens, lexer.diagnostics, lexer.dropped)
}

/// Checks that `bytes` is UTF-8 and returns it as text, or an error at the first bad byte.
///
/// The error's span is in bytes of the original input; rendering it against
/// `String::from_utf8_lossy(bytes)` shows the right line and column, because everything before
/// the bad byte is unchanged by the lossy conversion.
pub fn decode_source(bytes: &[u8]) -> Result<&str, Diagnostic> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let len = e.error_len().unwrap_or(bytes.len() - at).max(1);
        let shown: Vec<String> = bytes[at..(at + len).min(bytes.len())]
            .iter()
            .map(|b| format!("0x{b:02x}"))
            .collect();
        Diagnostic::error(
            "the file is not valid UTF-8",
            Span::new(at, (at + len).min(bytes.len())),
        )
        .with_primary_message(format!("invalid byte {}", shown.join(" ")))
        .with_note(format!("the first invalid byte is at byte offset {at}"))
    })
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    tokens: Vec<Token>,
    diagnostics: Vec<Diagnostic>,
    /// Diagnostics not kept because there were too many already.
    dropped: usize,
}

impl Lexer<'_> {
    fn run(&mut self) {
        // A byte-order mark some editors write is not part of the program.
        if self.src.starts_with('\u{FEFF}') {
            self.pos = '\u{FEFF}'.len_utf8();
        }
        let mut last_end = 0;
        while let Some(c) = self.peek_char() {
            let start = self.pos;
            if c == '#' {
                self.skip_comment();
                continue;
            }
            if c.is_whitespace() && c.is_ascii() {
                self.pos += 1;
                continue;
            }
            if c.is_ascii_alphabetic() || c == '_' {
                self.eat_while(|c| c.is_ascii_alphanumeric() || c == '_');
                self.push(TokenKind::Ident, start);
            } else if c.is_ascii_digit() {
                self.number(start);
            } else if let Some(kind) = self.punct(c) {
                self.push(kind, start);
            } else {
                self.pos += c.len_utf8();
                let first_end = self.pos;
                // One diagnostic for a run of characters outside the language.
                self.eat_while(|c| !is_known(c));
                self.unknown_chars(c, start, first_end);
                continue;
            }
            last_end = self.pos;
        }
        self.tokens.push(Token {
            kind: TokenKind::Eof,
            span: Span::new(last_end, last_end),
        });
    }

    fn peek_char(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_byte_at(&self, offset: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + offset).copied()
    }

    fn eat_while(&mut self, keep: impl Fn(char) -> bool) {
        while let Some(c) = self.peek_char() {
            if !keep(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn push(&mut self, kind: TokenKind, start: usize) {
        self.tokens.push(Token {
            kind,
            span: Span::new(start, self.pos),
        });
    }

    fn skip_comment(&mut self) {
        self.eat_while(|c| c != '\n');
    }

    fn punct(&mut self, c: char) -> Option<TokenKind> {
        let kind = match c {
            '(' => TokenKind::LParen,
            ')' => TokenKind::RParen,
            '[' => TokenKind::LBracket,
            ']' => TokenKind::RBracket,
            '{' => TokenKind::LBrace,
            '}' => TokenKind::RBrace,
            ',' => TokenKind::Comma,
            ';' => TokenKind::Semi,
            ':' => TokenKind::Colon,
            '+' => TokenKind::Plus,
            '-' if self.peek_byte_at(1) == Some(b'>') => {
                self.pos += 2;
                return Some(TokenKind::Arrow);
            }
            '-' => TokenKind::Minus,
            '*' => TokenKind::Star,
            '/' => TokenKind::Slash,
            '@' => TokenKind::At,
            '.' => TokenKind::Dot,
            '&' => TokenKind::Amp,
            '|' => TokenKind::Pipe,
            '<' | '>' | '=' | '!' if self.peek_byte_at(1) == Some(b'=') => {
                self.pos += 2;
                return Some(TokenKind::Compare);
            }
            '<' | '>' => TokenKind::Compare,
            '=' => TokenKind::Eq,
            _ => return None,
        };
        self.pos += 1;
        Some(kind)
    }

    /// `digits ('.' digits)? ([eE] [+-]? digits)?`; a `.` not followed by a digit is left alone
    /// so that `2.T` stays `2` `.` `T`.
    fn number(&mut self, start: usize) {
        let digits = |c: char| c.is_ascii_digit();
        self.eat_while(digits);
        let mut is_int = true;
        if self.peek_byte_at(0) == Some(b'.')
            && self.peek_byte_at(1).is_some_and(|b| b.is_ascii_digit())
        {
            is_int = false;
            self.pos += 1;
            self.eat_while(digits);
        }
        if matches!(self.peek_byte_at(0), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.peek_byte_at(1), Some(b'+' | b'-')));
            if self
                .peek_byte_at(1 + sign)
                .is_some_and(|b| b.is_ascii_digit())
            {
                is_int = false;
                self.pos += 1 + sign;
                self.eat_while(digits);
            }
        }
        // `2x`, `1e`, `1.5abc`: one malformed literal, not a number then a name.
        if self
            .peek_char()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.eat_while(|c| c.is_ascii_alphanumeric() || c == '_');
            let text = &self.src[start..self.pos];
            self.error(
                Diagnostic::error(
                    format!("invalid number literal `{text}`"),
                    Span::new(start, self.pos),
                )
                .with_note("numbers look like `256`, `1.5`, `1e-3` or `2.5E+4`"),
            );
            self.push(TokenKind::Int(0), start);
            return;
        }
        let text = &self.src[start..self.pos];
        let span = Span::new(start, self.pos);
        let kind = if is_int {
            match text.parse::<u64>() {
                Ok(v) => TokenKind::Int(v),
                Err(_) => {
                    self.error(
                        Diagnostic::error(format!("integer literal `{text}` is too large"), span)
                            .with_primary_message("does not fit in 64 bits")
                            .with_note(format!("the largest integer is {}", u64::MAX))
                            .with_note(
                                "write a large non-integer value with an exponent, e.g. `1e20`",
                            ),
                    );
                    TokenKind::Int(0)
                }
            }
        } else {
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => TokenKind::Float(v),
                _ => {
                    self.error(
                        Diagnostic::error(format!("number literal `{text}` is out of range"), span)
                            .with_primary_message("not a finite 64-bit float")
                            .with_note("the largest finite value is about 1.8e308"),
                    );
                    TokenKind::Float(0.0)
                }
            }
        };
        self.push(kind, start);
    }

    fn error(&mut self, diagnostic: Diagnostic) {
        if self.diagnostics.len() < crate::MAX_DIAGNOSTICS {
            self.diagnostics.push(diagnostic);
        } else {
            self.dropped += 1;
        }
    }

    /// Reports the characters from `start` to the current position; the first is `c` and ends
    /// at `first_end`.
    fn unknown_chars(&mut self, c: char, start: usize, first_end: usize) {
        let span = Span::new(start, self.pos);
        let shown = if c.is_control() || c.is_whitespace() || is_invisible(c) {
            format!("U+{:04X}", c as u32)
        } else {
            format!("`{c}` (U+{:04X})", c as u32)
        };
        let message = if first_end == self.pos {
            format!("unexpected character {shown}")
        } else {
            let count = self.src[start..self.pos].chars().count();
            format!("{count} unexpected characters, starting with {shown}")
        };
        let mut diagnostic = Diagnostic::error(message, span);
        if !c.is_ascii() {
            diagnostic = diagnostic
                .with_note("names are ASCII letters, digits and `_`; other characters may appear only in comments");
        }
        self.error(diagnostic);
    }
}

/// Whether `c` can start a token, a comment or whitespace.
fn is_known(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || c == '#'
        || (c.is_ascii() && c.is_whitespace())
        || "()[]{},;:+-*/@.&|=<>".contains(c)
}

/// Characters that render as nothing (zero-width spaces and joiners, BOM, bidi controls).
fn is_invisible(c: char) -> bool {
    matches!(c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0xFEFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<TokenKind> {
        let (tokens, diagnostics) = lex(src);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        tokens.into_iter().map(|t| t.kind).collect()
    }

    #[test]
    fn numbers_in_every_form() {
        assert_eq!(
            kinds("123 1.5 1e-3 2.5E+4 1e20"),
            vec![
                TokenKind::Int(123),
                TokenKind::Float(1.5),
                TokenKind::Float(1e-3),
                TokenKind::Float(2.5e4),
                TokenKind::Float(1e20),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn dot_t_after_an_integer_is_a_transpose() {
        assert_eq!(
            kinds("2.T"),
            vec![
                TokenKind::Int(2),
                TokenKind::Dot,
                TokenKind::Ident,
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn arrow_and_minus() {
        assert_eq!(
            kinds("-> -"),
            vec![TokenKind::Arrow, TokenKind::Minus, TokenKind::Eof]
        );
    }

    #[test]
    fn comparisons_are_tokens_so_the_parser_can_name_them() {
        assert_eq!(
            kinds("< <= > >= == != ="),
            vec![
                TokenKind::Compare,
                TokenKind::Compare,
                TokenKind::Compare,
                TokenKind::Compare,
                TokenKind::Compare,
                TokenKind::Compare,
                TokenKind::Eq,
                TokenKind::Eof
            ]
        );
        // A lone `!` is outside the language.
        assert_eq!(lex("!").1.len(), 1);
    }

    #[test]
    fn overflowing_integer_is_an_error() {
        let (_, diagnostics) = lex("99999999999999999999");
        assert_eq!(diagnostics.len(), 1);
        assert!(diagnostics[0].message.contains("too large"));
    }

    #[test]
    fn non_finite_float_is_an_error() {
        let (_, diagnostics) = lex("1e400");
        assert_eq!(diagnostics.len(), 1);
        assert!(diagnostics[0].message.contains("out of range"));
    }

    #[test]
    fn odd_unicode_is_reported_on_char_boundaries() {
        let src = "a é 😀 \u{200B} b ☃☃☃ c";
        let (tokens, diagnostics) = lex(src);
        assert_eq!(diagnostics.len(), 4);
        assert_eq!(
            diagnostics[3].message,
            "3 unexpected characters, starting with `☃` (U+2603)"
        );
        for d in &diagnostics {
            let span = d.primary_span().expect("primary label");
            assert!(src.is_char_boundary(span.start as usize));
            assert!(src.is_char_boundary(span.end as usize));
        }
        assert_eq!(tokens.len(), 4);
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        assert_eq!(kinds("\u{FEFF}x"), vec![TokenKind::Ident, TokenKind::Eof]);
        assert_eq!(lex("x\u{FEFF}").1.len(), 1);
    }

    #[test]
    fn comments_are_skipped() {
        assert_eq!(kinds("# hi\n# there"), vec![TokenKind::Eof]);
    }

    #[test]
    fn invalid_utf8_points_at_the_first_bad_byte() {
        let err = decode_source(b"kernel \xff x").expect_err("invalid");
        assert_eq!(err.primary_span(), Some(Span::new(7, 8)));
        assert_eq!(decode_source(b"ok").ok(), Some("ok"));
    }
}
