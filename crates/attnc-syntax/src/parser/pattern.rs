//! Mask patterns: `|` binds less tightly than `&` (as boolean or/and), each chain one n-ary
//! node, then parentheses and the pattern atoms `causal`, `window(w)`, `dilated(w, r)`,
//! `global(g)`, `block(b)`. Sizes are non-negative integers or dimension symbols (`window(w)`).

use super::{PResult, Parser};
use crate::ast::{DimExpr, Pattern, PatternKind};
use crate::token::TokenKind;

/// What the depth limit's message calls a pattern.
pub(super) const WHAT: &str = "pattern";

impl Parser<'_> {
    /// `pattern ('|' pattern)*` with `&` binding tighter; returns the tree height too. A chain
    /// of `|` (or `&`) is one node of the tree whatever its length, so only parentheses and
    /// the alternation of `|` and `&` nest.
    pub(super) fn pattern(&mut self) -> PResult<(Pattern, usize)> {
        self.chain(TokenKind::Pipe, Self::pattern_and, PatternKind::Or)
    }

    fn pattern_and(&mut self) -> PResult<(Pattern, usize)> {
        self.chain(TokenKind::Amp, Self::pattern_atom, PatternKind::And)
    }

    /// `operand (op operand)*`: the operand alone, or one node of every operand.
    fn chain(
        &mut self,
        op: TokenKind,
        mut operand: impl FnMut(&mut Self) -> PResult<(Pattern, usize)>,
        node: fn(Vec<Pattern>) -> PatternKind,
    ) -> PResult<(Pattern, usize)> {
        let (first, mut height) = operand(self)?;
        if self.peek().kind != op {
            return Ok((first, height));
        }
        let mut operands = vec![first];
        while self.eat(op).is_some() {
            let (next, next_height) = operand(self)?;
            height = height.max(next_height);
            operands.push(next);
        }
        let height = height + 1;
        self.check_height(height, WHAT)?;
        let span = operands[0].span.to(operands[operands.len() - 1].span);
        Ok((
            Pattern {
                kind: node(operands),
                span,
            },
            height,
        ))
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
        if word == "document" {
            return self.document(token);
        }
        if word == "topk_blocks" {
            return self.topk_blocks(token);
        }
        let arity = match word {
            "causal" => 0,
            "window" | "global" | "block" => 1,
            "dilated" => 2,
            _ => return Err(self.error_expected(
                "a mask pattern (`causal`, `window(w)`, `dilated(w, r)`, `global(g)`, `block(b)`, `document(seg)`, `topk_blocks(g, k, b)`)",
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
    /// `document(seg)` or `document(qseg, kseg)` after the word `document` (`token`): names
    /// of segment-id parameters, checked when the kernel is lowered.
    fn document(&mut self, token: crate::token::Token) -> PResult<(Pattern, usize)> {
        self.bump();
        let open = self.expect(TokenKind::LParen, "after `document`")?;
        let first = self.expect_name("the name of an i32 parameter of segment ids")?;
        let second = if self.eat(TokenKind::Comma).is_some() {
            Some(self.expect_name("the name of an i32 parameter of key segment ids")?)
        } else {
            None
        };
        let close = self.expect_close(TokenKind::RParen, open)?;
        Ok((
            Pattern {
                kind: PatternKind::Document(first, second),
                span: token.span.to(close.span),
            },
            1,
        ))
    }

    /// `topk_blocks(g, k, b)` after the word `topk_blocks` (`token`): the gate's name (checked
    /// when the kernel is lowered) and two integer literals.
    fn topk_blocks(&mut self, token: crate::token::Token) -> PResult<(Pattern, usize)> {
        self.bump();
        let open = self.expect(TokenKind::LParen, "after `topk_blocks`")?;
        let gate = self.expect_name("the name of a gate (a float parameter or `let`)")?;
        self.expect(TokenKind::Comma, "after the gate")?;
        let k = self.int("the number of key blocks kept per row block (an integer)")?;
        self.expect(TokenKind::Comma, "after the number of blocks")?;
        let b_span = self.peek().span;
        let b = self.int("the block size (an integer)")?;
        let close = self.expect_close(TokenKind::RParen, open)?;
        Ok((
            Pattern {
                kind: PatternKind::TopkBlocks { gate, k, b, b_span },
                span: token.span.to(close.span),
            },
            1,
        ))
    }

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
