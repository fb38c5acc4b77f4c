//! Expressions: `+ -` below `* / @` (all left-associative), then unary `-`, then postfix `.T`,
//! then atoms (numbers, names, calls, parentheses).
//!
//! Every function returns the expression with its tree height, so that long left-associative
//! chains and postfix chains — built by loops, not recursion — still respect
//! [`MAX_DEPTH`](super::MAX_DEPTH).

use super::{PResult, Parser, Reported};
use crate::ast::{Arg, BinOp, Expr, ExprKind, Ident};
use crate::diagnostic::Diagnostic;
use crate::token::{is_keyword, TokenKind, PATTERN_KEYWORDS};

const WHAT: &str = "expression";

impl Parser<'_> {
    /// A whole expression.
    pub(super) fn expr(&mut self) -> PResult<Expr> {
        self.additive().map(|(expr, _)| expr)
    }

    fn additive(&mut self) -> PResult<(Expr, usize)> {
        let (mut lhs, mut height) = self.multiplicative()?;
        loop {
            let op = match self.peek().kind {
                TokenKind::Plus => BinOp::Add,
                TokenKind::Minus => BinOp::Sub,
                TokenKind::Compare => return Err(self.comparison()),
                _ => return Ok((lhs, height)),
            };
            self.bump();
            let (rhs, rhs_height) = self.multiplicative()?;
            (lhs, height) = self.binary(op, lhs, height, rhs, rhs_height)?;
        }
    }

    fn multiplicative(&mut self) -> PResult<(Expr, usize)> {
        let (mut lhs, mut height) = self.unary()?;
        loop {
            let op = match self.peek().kind {
                TokenKind::Star => BinOp::Mul,
                TokenKind::Slash => BinOp::Div,
                TokenKind::At => BinOp::MatMul,
                _ => return Ok((lhs, height)),
            };
            self.bump();
            let (rhs, rhs_height) = self.unary()?;
            (lhs, height) = self.binary(op, lhs, height, rhs, rhs_height)?;
        }
    }

    fn binary(
        &mut self,
        op: BinOp,
        lhs: Expr,
        lhs_height: usize,
        rhs: Expr,
        rhs_height: usize,
    ) -> PResult<(Expr, usize)> {
        let height = 1 + lhs_height.max(rhs_height);
        self.check_height(height, WHAT)?;
        let span = lhs.span.to(rhs.span);
        let kind = ExprKind::Binary {
            op,
            lhs: Box::new(lhs),
            rhs: Box::new(rhs),
        };
        Ok((Expr { kind, span }, height))
    }

    /// `'-'* postfix`, counted in a loop so that a long chain of minuses cannot recurse.
    fn unary(&mut self) -> PResult<(Expr, usize)> {
        let mut minuses = Vec::new();
        while self.at(TokenKind::Minus) {
            if minuses.len() >= super::MAX_DEPTH {
                return Err(self.depth_error(WHAT));
            }
            minuses.push(self.bump().span);
        }
        let (mut expr, mut height) = self.postfix()?;
        height += minuses.len();
        self.check_height(height, WHAT)?;
        for minus in minuses.into_iter().rev() {
            let span = minus.to(expr.span);
            expr = Expr {
                kind: ExprKind::Neg(Box::new(expr)),
                span,
            };
        }
        Ok((expr, height))
    }

    /// `atom ('.' 'T')*`
    fn postfix(&mut self) -> PResult<(Expr, usize)> {
        let (mut expr, mut height) = self.atom()?;
        while self.at(TokenKind::Dot) {
            self.bump();
            if !self.at_word("T") {
                return Err(self.expected_t());
            }
            let t = self.bump();
            height += 1;
            self.check_height(height, WHAT)?;
            let span = expr.span.to(t.span);
            expr = Expr {
                kind: ExprKind::Transpose(Box::new(expr)),
                span,
            };
        }
        Ok((expr, height))
    }

    fn atom(&mut self) -> PResult<(Expr, usize)> {
        let token = self.peek();
        let kind = match token.kind {
            TokenKind::Int(value) => ExprKind::Number(value as f64),
            TokenKind::Float(value) => ExprKind::Number(value),
            TokenKind::LParen => {
                self.bump();
                let (mut expr, height) = self.nested(WHAT, |p| p.additive())?;
                let close = self.expect_close(TokenKind::RParen, token)?;
                expr.span = token.span.to(close.span);
                return Ok((expr, height));
            }
            TokenKind::Ident if self.text(token) == "inf" => ExprKind::Number(f64::INFINITY),
            TokenKind::Ident => {
                let name = self.text(token);
                if is_keyword(name) {
                    return Err(self.error_expected("an expression"));
                }
                if self.peek_at(1).kind == TokenKind::LParen {
                    return self.call();
                }
                ExprKind::Name(name.to_string())
            }
            _ => return Err(self.error_expected("an expression")),
        };
        self.bump();
        Ok((
            Expr {
                kind,
                span: token.span,
            },
            1,
        ))
    }

    // Error paths live in their own cold functions so that the frames of the recursive
    // functions stay small: 256 levels must fit in a 2 MiB stack even without optimization.

    #[cold]
    #[inline(never)]
    fn expected_t(&mut self) -> Reported {
        let token = self.peek();
        let message = format!("expected `T` after `.`, found {}", self.found(token));
        self.report(
            Diagnostic::error(message, token.span)
                .with_primary_message("expected `T`")
                .with_note("`.T` (swap the last two axes) is the only postfix operator"),
        )
    }

    /// Reports a comparison operator (`a < b`), which the language does not have.
    #[cold]
    #[inline(never)]
    fn comparison(&mut self) -> Reported {
        let token = self.peek();
        let op = self.text(token);
        let message = format!("comparisons (`{op}`) are not part of the language");
        self.report(
            Diagnostic::error(message, token.span)
                .with_primary_message("not an operator of `.attn`")
                .with_note(
                    "positions are kept or dropped by mask patterns, as in \
                     `mask(s, causal & window(256))`; `maximum(a, b)` and `minimum(a, b)` \
                     compare values elementwise",
                ),
        )
    }

    /// Reports `name = value` inside a call's parentheses (`softmax(x, axis = -1)`,
    /// `window(w = 3)`): arguments are positional.
    #[cold]
    #[inline(never)]
    pub(super) fn keyword_argument(&mut self, callee: &str) -> Reported {
        let eq = self.peek();
        let message = format!("keyword arguments are not part of the language (in `{callee}`)");
        self.report(
            Diagnostic::error(message, eq.span)
                .with_primary_message("`name = value` is not an argument")
                .with_note(format!(
                    "arguments are positional: write the value alone, as in `{callee}(3)` \
                     rather than `{callee}(w = 3)`"
                )),
        )
    }

    /// `IDENT '(' arg (',' arg)* ')'`
    fn call(&mut self) -> PResult<(Expr, usize)> {
        let name = self.bump();
        let callee = Ident {
            name: self.text(name).to_string(),
            span: name.span,
        };
        let open = self.bump();
        let (args, height) = self.nested(WHAT, |p| {
            let mut args = Vec::new();
            let mut height = 0;
            loop {
                // A pattern is expected only as the second argument of `mask`.
                let pattern_slot = callee.name == "mask" && args.len() == 1;
                let (arg, arg_height) = p.arg(pattern_slot)?;
                args.push(arg);
                height = height.max(arg_height);
                if p.at(TokenKind::Eq) {
                    return Err(p.keyword_argument(&callee.name));
                }
                if p.eat(TokenKind::Comma).is_none() {
                    return Ok((args, height));
                }
            }
        })?;
        let close = self.expect_close(TokenKind::RParen, open)?;
        let height = height + 1;
        self.check_height(height, WHAT)?;
        let kind = ExprKind::Call { callee, args };
        let span = name.span.to(close.span);
        Ok((Expr { kind, span }, height))
    }

    /// An expression, or — where a pattern is expected (`pattern_slot`) — a pattern when the
    /// argument starts with a pattern keyword (possibly after some `(`). Elsewhere pattern
    /// words are ordinary names.
    fn arg(&mut self, pattern_slot: bool) -> PResult<(Arg, usize)> {
        let mut i = 0;
        while self.peek_at(i).kind == TokenKind::LParen {
            i += 1;
        }
        let first = self.peek_at(i);
        if pattern_slot
            && first.kind == TokenKind::Ident
            && PATTERN_KEYWORDS.contains(&self.text(first))
        {
            let (pattern, height) = self.pattern()?;
            return Ok((Arg::Pattern(pattern), height));
        }
        let (expr, height) = self.additive()?;
        Ok((Arg::Expr(expr), height))
    }
}
