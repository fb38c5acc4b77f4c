//! Mask patterns: `|` binds less tightly than `&` (as boolean or/and), both left-associative,
//! then parentheses and the pattern atoms `causal`, `window(w)`, `dilated(w, r)`, `global(g)`,
//! `block(b)`. Sizes are non-negative integers or dimension symbols (`window(w)`).

use super::{PResult, Parser};
use crate::ast::{DimExpr, Pattern, PatternKind};
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
        let arity = match word {
            "causal" => 0,
            "window" | "global" | "block" => 1,
            "dilated" => 2,
            _ => return Err(self.error_expected(
                "a mask pattern (`causal`, `window(w)`, `dilated(w, r)`, `global(g)`, `block(b)`)",
            )),
        };
        self.bump();
        if arity == 0 {
            return Ok((
                Pattern {
                    kind: PatternKind::Causal,
                    span: token.span,
                },
                1,
            ));
        }
        let open = self.expect(TokenKind::LParen, &format!("after `{word}`"))?;
        let first = self.pattern_size(word)?;
        let second = if arity == 2 {
            self.expect(TokenKind::Comma, "between the two sizes")?;
            Some(self.pattern_size(word)?)
        } else {
            None
        };
        let close = self.expect_close(TokenKind::RParen, open)?;
        let kind = match (word, second) {
            ("window", _) => PatternKind::Window(first),
            ("global", _) => PatternKind::Global(first),
            ("block", _) => PatternKind::Block(first),
            (_, Some(second)) => PatternKind::Dilated(first, second),
            (_, None) => return Err(self.error_expected("a second size")),
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

impl Parser<'_> {
    /// A size argument of pattern `word`: an integer or a dimension symbol.
    fn pattern_size(&mut self, word: &str) -> PResult<DimExpr> {
        let token = self.peek();
        if token.kind == TokenKind::Ident {
            let name = self.expect_name("a size")?;
            if self.at(TokenKind::Eq) {
                return Err(self.keyword_argument(word));
            }
            return Ok(DimExpr::Sym(name));
        }
        let value = self.int("a size (an integer or a dimension symbol)")?;
        Ok(DimExpr::Lit {
            value,
            span: token.span,
        })
    }
}
