//! Mask patterns from the AST to the IR, checking their arguments.

use crate::dim::Dim;
use crate::pattern::{MaskPattern, SymbolicPattern};
use crate::segments::Role;
use attnc_syntax::ast::{DimExpr, Ident, Pattern, PatternKind};
use attnc_syntax::{Diagnostic, Span};

/// Converts a pattern, rejecting `dilated(w, 0)` and `block(0)`. A size written as a name is a
/// dimension symbol (bound by an input's shape or `--shape`); `is_value` says which names are
/// arrays (parameters, `let`s), which cannot be sizes.
///
/// `segment(name, role)` resolves a name of `document(...)` or the gate of `topk_blocks(...)`
/// to the index of its segment operand (checking its dtype and shape).
///
/// Recurses once per nested chain (as deep as the AST) and `⌈log₂ k⌉` times within a chain
/// of `k` operands.
pub(crate) fn mask_pattern(
    p: &Pattern,
    is_value: &dyn Fn(&str) -> bool,
    segment: &mut dyn FnMut(&Ident, Role) -> Result<usize, Diagnostic>,
) -> Result<SymbolicPattern, Diagnostic> {
    let size = |d: &DimExpr| -> Result<Dim, Diagnostic> {
        match d {
            DimExpr::Lit { value, .. } => Ok(Dim::Const(*value)),
            DimExpr::Sym(id) if is_value(&id.name) => Err(Diagnostic::error(
                format!(
                    "the size `{}` of a mask pattern must be a dimension symbol or an integer",
                    id.name
                ),
                id.span,
            )
            .with_primary_message("an array, not a size")
            .with_note("pattern sizes are integers or dimension symbols bound by an input's shape or `--shape`")),
            DimExpr::Sym(id) => Ok(Dim::Sym(id.name.clone())),
        }
    };
    let zero = |d: &DimExpr| matches!(d, DimExpr::Lit { value: 0, .. });
    Ok(match &p.kind {
        PatternKind::Causal => MaskPattern::Causal,
        PatternKind::Window(w) => MaskPattern::Window(size(w)?),
        PatternKind::Dilated(_, r) if zero(r) => {
            return Err(Diagnostic::error(
                "the stride of `dilated(w, r)` must be at least 1",
                p.span,
            )
            .with_primary_message("stride 0"))
        }
        PatternKind::Dilated(w, r) => MaskPattern::Dilated {
            w: size(w)?,
            r: size(r)?,
        },
        PatternKind::Global(g) => MaskPattern::Global(size(g)?),
        PatternKind::Block(b) if zero(b) => {
            return Err(
                Diagnostic::error("the size of `block(b)` must be at least 1", p.span)
                    .with_primary_message("block size 0"),
            )
        }
        PatternKind::Block(b) => MaskPattern::Block(size(b)?),
        PatternKind::Document(seg, None) => {
            let g = segment(seg, Role::Aligned)?;
            MaskPattern::Document { q: g, k: g }
        }
        PatternKind::Document(qseg, Some(kseg)) => MaskPattern::Document {
            q: segment(qseg, Role::Queries)?,
            k: segment(kseg, Role::Keys)?,
        },
        PatternKind::TopkBlocks { b: 0, b_span, .. } => {
            return Err(Diagnostic::error(
                "the block size of `topk_blocks(g, k, b)` must be at least 1",
                *b_span,
            )
            .with_primary_message("block size 0"))
        }
        PatternKind::TopkBlocks { gate, k, b, .. } => MaskPattern::TopkBlocks {
            g: segment(gate, Role::Gate(*b))?,
            k: *k,
            b: *b,
        },
        PatternKind::And(operands) => {
            balanced(operands, p.span, is_value, segment, MaskPattern::And)?
        }
        PatternKind::Or(operands) => {
            balanced(operands, p.span, is_value, segment, MaskPattern::Or)?
        }
    })
}

/// A chain `p₁ ∘ … ∘ pₖ` of an associative `∘` (`&` or `|`) as a balanced tree of depth
/// `⌈log₂ k⌉`: `(p₁ ∘ p₂) ∘ p₃` for three, `(p₁ ∘ p₂) ∘ (p₃ ∘ p₄)` for four. A chain of any
/// length stays shallow, so the code that walks patterns by recursion needs no deep stack.
/// (The parser's chains have two or more operands; an empty one is an error.)
fn balanced(
    operands: &[Pattern],
    span: Span,
    is_value: &dyn Fn(&str) -> bool,
    segment: &mut dyn FnMut(&Ident, Role) -> Result<usize, Diagnostic>,
    node: fn(Box<SymbolicPattern>, Box<SymbolicPattern>) -> SymbolicPattern,
) -> Result<SymbolicPattern, Diagnostic> {
    match operands {
        [] => Err(Diagnostic::error("an empty chain of mask patterns", span)),
        [one] => mask_pattern(one, is_value, segment),
        _ => {
            let (left, right) = operands.split_at(operands.len().div_ceil(2));
            let left = balanced(left, span, is_value, segment, node)?;
            let right = balanced(right, span, is_value, segment, node)?;
            Ok(node(Box::new(left), Box::new(right)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(value: u64) -> DimExpr {
        DimExpr::Lit {
            value,
            span: Span::default(),
        }
    }

    fn convert(p: &Pattern) -> Result<SymbolicPattern, Diagnostic> {
        mask_pattern(p, &|name| name == "q", &mut |id, _| {
            Err(Diagnostic::error("no segments here", id.span))
        })
    }

    fn p(kind: PatternKind) -> Pattern {
        Pattern {
            kind,
            span: Span::new(3, 9),
        }
    }

    #[test]
    fn converts_combinations() {
        let pat = p(PatternKind::And(vec![
            p(PatternKind::Causal),
            p(PatternKind::Or(vec![
                p(PatternKind::Window(lit(4))),
                p(PatternKind::Dilated(lit(2), lit(3))),
            ])),
        ]));
        let got = convert(&pat).map(|m| m.to_string());
        assert_eq!(
            got.ok().as_deref(),
            Some("(causal & (window(4) | dilated(2, 3)))")
        );
    }

    #[test]
    fn rejects_zero_stride_and_block() {
        let err = convert(&p(PatternKind::Dilated(lit(2), lit(0)))).unwrap_err();
        assert!(err.message.contains("dilated"));
        assert_eq!(err.primary_span(), Some(Span::new(3, 9)));
        let err = convert(&p(PatternKind::Block(lit(0)))).unwrap_err();
        assert!(err.message.contains("block"));
        assert!(convert(&p(PatternKind::Window(lit(0)))).is_ok());
    }

    #[test]
    fn names_are_dimension_symbols_unless_they_are_arrays() {
        let id = |name: &str| attnc_syntax::ast::Ident {
            name: name.to_string(),
            span: Span::new(10, 11),
        };
        let got = convert(&p(PatternKind::Window(DimExpr::Sym(id("w"))))).expect("a symbol");
        assert_eq!(got, MaskPattern::Window(Dim::Sym("w".to_string())));
        let err = convert(&p(PatternKind::Block(DimExpr::Sym(id("q"))))).unwrap_err();
        assert!(err.message.contains("size `q`"), "{}", err.message);
        assert_eq!(err.primary_span(), Some(Span::new(10, 11)));
    }
}
