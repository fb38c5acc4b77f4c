//! Mask patterns: `|` binds less tightly than `&` (as boolean or/and), both left-associative,
//! then parentheses and the pattern atoms `causal`, `window(w)`, `dilated(w, r)`, `global(g)`,
//! `block(b)`.

use super::{PResult, Parser};
use crate::ast::{Pattern, PatternKind};
use crate::token::TokenKind;

const WHAT: &str = "pattern";

impl Parser<'_> {
    /// `pattern ('|' pattern)*` with `&` binding tighter; returns the tree height too.
    pub(super) fn pattern(&mut self) -> PResult<(Pattern, usize)> {
        let (mut lhs, mut height) = self.pattern_and()?;
        while self.eat(TokenKind::Pipe).is_some() {
            let (rhs, rhs_height) = self.pattern_and()?;
            height = 1 + height.max(rhs_height);
            self.check_height(height, WHAT)?;
            let span = lhs.span.to(rhs.span);
            lhs = Pattern {
                kind: PatternKind::Or(Box::new(lhs), Box::new(rhs)),
                span,
            };
        }
        Ok((lhs, height))
    }

    fn pattern_and(&mut self) -> PResult<(Pattern, usize)> {
        let (mut lhs, mut height) = self.pattern_atom()?;
        while self.eat(TokenKind::Amp).is_some() {
            let (rhs, rhs_height) = self.pattern_atom()?;
            height = 1 + height.max(rhs_height);
            self.check_height(height, WHAT)?;
            let span = lhs.span.to(rhs.span);
            lhs = Pattern {
                kind: PatternKind::And(Box::new(lhs), Box::new(rhs)),
                span,
            };
        }
        Ok((lhs, height))
    }

    fn pattern_atom(&mut self) -> PResult<(Pattern, usize)> {
        let token = self.peek();
        if token.kind == TokenKind::LParen {
            self.bump();
            let (mut pattern, height) = self.nested(WHAT, |p| p.pattern())?;
            let close = self.expect_close(TokenKind::RParen, token)?;
            pattern.span = token.span.to(close.span);
            return Ok((pattern, height));
        }
        let word = if token.kind == TokenKind::Ident {
            self.text(token)
        } else {
            ""
        };
        let (kind, arity) = match word {
            "causal" => (PatternKind::Causal, 0),
            "window" => (PatternKind::Window(0), 1),
            "dilated" => (PatternKind::Dilated(0, 0), 2),
            "global" => (PatternKind::Global(0), 1),
            "block" => (PatternKind::Block(0), 1),
            _ => return Err(self.error_expected(
                "a mask pattern (`causal`, `window(w)`, `dilated(w, r)`, `global(g)`, `block(b)`)",
            )),
        };
        self.bump();
        if arity == 0 {
            return Ok((
                Pattern {
                    kind,
                    span: token.span,
                },
                1,
            ));
        }
        let open = self.expect(TokenKind::LParen, &format!("after `{word}`"))?;
        let first = self.int("an integer size")?;
        let second = if arity == 2 {
            self.expect(TokenKind::Comma, "between the two sizes")?;
            self.int("an integer size")?
        } else {
            0
        };
        let close = self.expect_close(TokenKind::RParen, open)?;
        let kind = match kind {
            PatternKind::Window(_) => PatternKind::Window(first),
            PatternKind::Dilated(..) => PatternKind::Dilated(first, second),
            PatternKind::Global(_) => PatternKind::Global(first),
            _ => PatternKind::Block(first),
        };
        Ok((
            Pattern {
                kind,
                span: token.span.to(close.span),
            },
            1,
        ))
    }
}
