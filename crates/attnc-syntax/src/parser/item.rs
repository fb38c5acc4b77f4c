//! Kernels, `@approx` attributes, parameters and types.

use super::{PResult, Parser, Reported};
use crate::ast::{Approx, ApproxKind, DimExpr, ElemType, Expr, Kernel, Let, Param, TypeExpr};
use crate::diagnostic::Diagnostic;
use crate::span::Span;
use crate::token::{Token, TokenKind};

/// The returned values: the first and the others of `return (a, b);`.
type Returned = (Expr, Vec<Expr>);

const KNOWN_APPROX: &str =
    "known approximations: `bf16`, `f16`, `int8`, `bf16_products`, `lowrank(r = R)`, `random_features(m = M, seed = S)`, `nystrom(m = M)`, `tol = X`";

impl Parser<'_> {
    /// `attr* 'kernel' IDENT '(' params ')' ('->' (type | '(' type (',' type)* ')'))?
    /// '{' stmt* ret '}'`
    pub(super) fn kernel(&mut self) -> PResult<Kernel> {
        let start = self.peek().span;
        let mut approx = Vec::new();
        while self.at(TokenKind::At) {
            match self.attr() {
                Ok(items) => approx.extend(items),
                Err(Reported) => {
                    // Keep the kernel: skip only the broken attribute.
                    while !self.at(TokenKind::Eof) && !self.at_kernel_start() {
                        self.bump();
                    }
                }
            }
        }
        if !self.at_word("kernel") {
            return Err(self.error_expected("`kernel`"));
        }
        self.bump();
        let name = self.expect_name("a kernel name")?;
        let open = self.expect(TokenKind::LParen, "after the kernel name")?;
        let mut params = Vec::new();
        if self.at(TokenKind::RParen) {
            let span = self.peek().span;
            self.report(
                Diagnostic::error(format!("kernel `{}` has no parameters", name.name), span)
                    .with_primary_message("expected a parameter")
                    .with_note("a kernel takes at least one parameter: `name: f32[n, d]`"),
            );
        } else {
            loop {
                params.push(self.param()?);
                if self.eat(TokenKind::Comma).is_none() || self.at(TokenKind::RParen) {
                    break;
                }
            }
        }
        self.expect_close(TokenKind::RParen, open)?;
        let (ret_type, extra_ret_types) = if self.eat(TokenKind::Arrow).is_some() {
            let (first, rest) = self.return_types()?;
            (Some(first), rest)
        } else {
            (None, Vec::new())
        };
        let open = self.expect(TokenKind::LBrace, "to start the kernel body")?;
        let (stmts, (ret, extra_rets), end) = self.body(open, &name.name)?;
        Ok(Kernel {
            approx,
            name,
            params,
            ret_type,
            extra_ret_types,
            stmts,
            ret,
            extra_rets,
            span: start.to(end),
        })
    }

    /// `type | '(' type (',' type)* ')'` after `->`: the first type and the others.
    fn return_types(&mut self) -> PResult<(TypeExpr, Vec<TypeExpr>)> {
        let Some(open) = self.eat(TokenKind::LParen) else {
            return Ok((self.type_expr()?, Vec::new()));
        };
        let first = self.type_expr()?;
        let mut rest = Vec::new();
        while self.eat(TokenKind::Comma).is_some() && !self.at(TokenKind::RParen) {
            rest.push(self.type_expr()?);
        }
        self.expect_close(TokenKind::RParen, open)?;
        Ok((first, rest))
    }

    /// Whether the next tokens are `'(' … ',' … ')'` with the comma directly inside the first
    /// parenthesis: a tuple of return values rather than a parenthesized expression (whose
    /// commas are all inside calls).
    fn at_tuple(&self) -> bool {
        if !self.at(TokenKind::LParen) {
            return false;
        }
        let mut depth = 0usize;
        for token in self.tokens.iter().skip(self.pos) {
            match token.kind {
                TokenKind::LParen | TokenKind::LBracket => depth += 1,
                TokenKind::RParen | TokenKind::RBracket => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return false;
                    }
                }
                TokenKind::Comma if depth == 1 => return true,
                TokenKind::Semi | TokenKind::LBrace | TokenKind::RBrace | TokenKind::Eof => {
                    return false
                }
                _ => {}
            }
        }
        false
    }

    /// `stmt* ret '}'` after the `{`; returns the span of the closing brace (or of the last
    /// token when the brace is missing).
    fn body(&mut self, open: Token, kernel: &str) -> PResult<(Vec<Let>, Returned, Span)> {
        let mut stmts = Vec::new();
        let ret = loop {
            let token = self.peek();
            if self.at_word("let") {
                match self.let_stmt() {
                    Ok(stmt) => stmts.push(stmt),
                    Err(Reported) => self.sync_stmt(),
                }
            } else if self.at_word("return") {
                self.bump();
                match self.return_value() {
                    Ok(expr) => break Some(expr),
                    Err(Reported) => {
                        self.sync_stmt();
                        break None;
                    }
                }
            } else if token.kind == TokenKind::RBrace {
                self.bump();
                return Err(self.report(
                    Diagnostic::error(
                        format!("kernel `{kernel}` has no `return` statement"),
                        token.span,
                    )
                    .with_primary_message("expected `return` before this `}`")
                    .with_note("a kernel body ends with `return expr;`"),
                ));
            } else if token.kind == TokenKind::Eof || self.at_kernel_start() {
                return Err(self
                    .expect_close(TokenKind::RBrace, open)
                    .err()
                    .unwrap_or(Reported));
            } else {
                self.error_expected("`let` or `return`");
                self.bump();
                self.sync_stmt();
            }
        };
        if let Some(close) = self.eat(TokenKind::RBrace) {
            return ret.map(|r| (stmts, r, close.span)).ok_or(Reported);
        }
        let end = Span {
            start: self.prev_end,
            end: self.prev_end,
        };
        if self.at(TokenKind::Eof) || self.at_kernel_start() {
            self.expect_close(TokenKind::RBrace, open).err();
            return ret.map(|r| (stmts, r, end)).ok_or(Reported);
        }
        let token = self.peek();
        let message = format!(
            "expected `}}` after the `return` statement, found {}",
            self.found(token)
        );
        self.report(
            Diagnostic::error(message, token.span)
                .with_primary_message("expected `}`")
                .with_note("`return expr;` must be the last statement of a kernel body"),
        );
        // Skip the rest of the body, brackets balanced.
        let mut depth = 0usize;
        loop {
            match self.peek().kind {
                TokenKind::Eof => break,
                _ if self.at_kernel_start() => break,
                TokenKind::LBrace => depth += 1,
                TokenKind::RBrace if depth == 0 => {
                    self.bump();
                    break;
                }
                TokenKind::RBrace => depth -= 1,
                _ => {}
            }
            self.bump();
        }
        ret.map(|r| (stmts, r, end)).ok_or(Reported)
    }

    /// `'let' IDENT '=' expr ';'`
    fn let_stmt(&mut self) -> PResult<Let> {
        let start = self.bump().span;
        let name = self.expect_name("a name after `let`")?;
        self.expect(TokenKind::Eq, "after the name in `let`")?;
        let value = self.expr()?;
        let semi = self.expect(TokenKind::Semi, "after expression")?;
        Ok(Let {
            name,
            value,
            span: start.to(semi.span),
        })
    }

    /// `expr ';'` or `'(' expr (',' expr)* ')' ';'` after `return`.
    fn return_value(&mut self) -> PResult<Returned> {
        if !self.at_tuple() {
            let value = self.expr()?;
            self.expect(TokenKind::Semi, "after expression")?;
            return Ok((value, Vec::new()));
        }
        let open = self.bump();
        let first = self.expr()?;
        let mut rest = Vec::new();
        while self.eat(TokenKind::Comma).is_some() && !self.at(TokenKind::RParen) {
            rest.push(self.expr()?);
        }
        self.expect_close(TokenKind::RParen, open)?;
        self.expect(TokenKind::Semi, "after the returned values")?;
        Ok((first, rest))
    }

    /// `IDENT ':' type`
    fn param(&mut self) -> PResult<Param> {
        let name = self.expect_name("a parameter name")?;
        self.expect(TokenKind::Colon, "after the parameter name")?;
        let ty = self.type_expr()?;
        Ok(Param { name, ty })
    }

    /// `('f32' | 'f16' | 'bf16' | 'i32') '[' (dim (',' dim)*)? ']'`
    pub(super) fn type_expr(&mut self) -> PResult<TypeExpr> {
        let token = self.peek();
        let elem = match (token.kind, self.text(token)) {
            (TokenKind::Ident, "f32") => ElemType::F32,
            (TokenKind::Ident, "f16") => ElemType::F16,
            (TokenKind::Ident, "bf16") => ElemType::Bf16,
            (TokenKind::Ident, "i32") => ElemType::I32,
            _ => return Err(self.error_expected("an element type (`f32`, `f16`, `bf16` or `i32`)")),
        };
        self.bump();
        let open = self.expect(TokenKind::LBracket, "after the element type")?;
        let mut dims = Vec::new();
        // `f32[]` is a scalar.
        while !self.at(TokenKind::RBracket) {
            dims.push(self.dim()?);
            if self.eat(TokenKind::Comma).is_none() {
                break;
            }
        }
        let close = self.expect_close(TokenKind::RBracket, open)?;
        Ok(TypeExpr {
            elem,
            dims,
            span: token.span.to(close.span),
        })
    }

    /// `IDENT | INT`
    fn dim(&mut self) -> PResult<DimExpr> {
        let token = self.peek();
        if let TokenKind::Int(value) = token.kind {
            self.bump();
            return Ok(DimExpr::Lit {
                value,
                span: token.span,
            });
        }
        if token.kind == TokenKind::Ident {
            return self.expect_name("a dimension").map(DimExpr::Sym);
        }
        if token.kind == TokenKind::Minus {
            return Err(self.negative_size());
        }
        Err(self.error_expected("a dimension (a name or a non-negative integer)"))
    }

    /// An `INT` for a size, count or seed.
    pub(super) fn int(&mut self, what: &str) -> PResult<u64> {
        let token = self.peek();
        match token.kind {
            TokenKind::Int(value) => {
                self.bump();
                Ok(value)
            }
            TokenKind::Minus => Err(self.negative_size()),
            _ => Err(self.error_expected(what)),
        }
    }

    fn negative_size(&mut self) -> Reported {
        let minus = self.peek();
        let span = minus.span.to(self.peek_at(1).span);
        self.report(
            Diagnostic::error("sizes cannot be negative", span)
                .with_primary_message("negative size")
                .with_note("sizes, counts and seeds are non-negative integers"),
        )
    }

    /// `'@' 'approx' '(' approx (',' approx)* ')'`
    fn attr(&mut self) -> PResult<Vec<Approx>> {
        self.bump();
        if !self.at_word("approx") {
            let token = self.peek();
            let message = format!("expected `approx` after `@`, found {}", self.found(token));
            return Err(self.report(
                Diagnostic::error(message, token.span)
                    .with_primary_message("unknown attribute")
                    .with_note("the only attribute is `@approx(...)`"),
            ));
        }
        self.bump();
        let open = self.expect(TokenKind::LParen, "after `@approx`")?;
        let mut items = Vec::new();
        loop {
            items.push(self.approx_item()?);
            if self.eat(TokenKind::Comma).is_none() {
                break;
            }
        }
        self.expect_close(TokenKind::RParen, open)?;
        Ok(items)
    }

    fn approx_item(&mut self) -> PResult<Approx> {
        let token = self.peek();
        if token.kind != TokenKind::Ident {
            return Err(self.error_expected("an approximation"));
        }
        self.bump();
        let kind = match self.text(token) {
            "bf16" => ApproxKind::Bf16,
            "f16" => ApproxKind::F16,
            "int8" => ApproxKind::Int8,
            "bf16_products" => ApproxKind::Bf16Products,
            "lowrank" => {
                let open = self.expect(TokenKind::LParen, "after `lowrank`")?;
                let r = self.key_int("r")?;
                self.expect_close(TokenKind::RParen, open)?;
                ApproxKind::Lowrank { r }
            }
            "random_features" => {
                let open = self.expect(TokenKind::LParen, "after `random_features`")?;
                let m = self.key_int("m")?;
                let seed = if self.eat(TokenKind::Comma).is_some() {
                    Some(self.key_int("seed")?)
                } else {
                    None
                };
                self.expect_close(TokenKind::RParen, open)?;
                ApproxKind::RandomFeatures { m, seed }
            }
            "nystrom" => {
                let open = self.expect(TokenKind::LParen, "after `nystrom`")?;
                let m = self.key_int("m")?;
                self.expect_close(TokenKind::RParen, open)?;
                ApproxKind::Nystrom { m }
            }
            "tol" => {
                self.expect(TokenKind::Eq, "after `tol`")?;
                let value = self.peek();
                let tol = match value.kind {
                    TokenKind::Int(v) => v as f64,
                    TokenKind::Float(v) => v,
                    _ => return Err(self.error_expected("a number")),
                };
                self.bump();
                ApproxKind::Tol(tol)
            }
            other => {
                let message = format!("unknown approximation `{other}`");
                return Err(self.report(
                    Diagnostic::error(message, token.span)
                        .with_primary_message("unknown")
                        .with_note(KNOWN_APPROX),
                ));
            }
        };
        Ok(Approx {
            kind,
            span: token.span.to(Span {
                start: self.prev_end,
                end: self.prev_end,
            }),
        })
    }

    /// `KEY '=' INT`
    fn key_int(&mut self, key: &str) -> PResult<u64> {
        if !self.at_word(key) {
            return Err(self.error_expected(&format!("`{key}`")));
        }
        self.bump();
        self.expect(TokenKind::Eq, &format!("after `{key}`"))?;
        self.int("an integer")
    }
}
