//! Mask patterns from the AST to the IR, checking their arguments.

use crate::pattern::MaskPattern;
use attnc_syntax::ast::{Pattern, PatternKind};
use attnc_syntax::{Diagnostic, Span};

/// Converts a pattern, rejecting `dilated(w, 0)` and `block(0)`.
///
/// Recurses once per nested chain (as deep as the AST) and `⌈log₂ k⌉` times within a chain
/// of `k` operands.
pub(crate) fn mask_pattern(p: &Pattern) -> Result<MaskPattern, Diagnostic> {
    Ok(match &p.kind {
        PatternKind::Causal => MaskPattern::Causal,
        PatternKind::Window(w) => MaskPattern::Window(*w),
        PatternKind::Dilated(_, 0) => {
            return Err(Diagnostic::error(
                "the stride of `dilated(w, r)` must be at least 1",
                p.span,
            )
            .with_primary_message("stride 0"))
        }
        PatternKind::Dilated(w, r) => MaskPattern::Dilated { w: *w, r: *r },
        PatternKind::Global(g) => MaskPattern::Global(*g),
        PatternKind::Block(0) => {
            return Err(
                Diagnostic::error("the size of `block(b)` must be at least 1", p.span)
                    .with_primary_message("block size 0"),
            )
        }
        PatternKind::Block(b) => MaskPattern::Block(*b),
        PatternKind::And(operands) => balanced(operands, p.span, MaskPattern::And)?,
        PatternKind::Or(operands) => balanced(operands, p.span, MaskPattern::Or)?,
    })
}

/// A chain `p₁ ∘ … ∘ pₖ` of an associative `∘` (`&` or `|`) as a balanced tree of depth
/// `⌈log₂ k⌉`: `(p₁ ∘ p₂) ∘ p₃` for three, `(p₁ ∘ p₂) ∘ (p₃ ∘ p₄)` for four. A chain of any
/// length stays shallow, so the code that walks patterns by recursion needs no deep stack.
/// (The parser's chains have two or more operands; an empty one is an error.)
fn balanced(
    operands: &[Pattern],
    span: Span,
    node: fn(Box<MaskPattern>, Box<MaskPattern>) -> MaskPattern,
) -> Result<MaskPattern, Diagnostic> {
    match operands {
        [] => Err(Diagnostic::error("an empty chain of mask patterns", span)),
        [one] => mask_pattern(one),
        _ => {
            let (left, right) = operands.split_at(operands.len().div_ceil(2));
            Ok(node(
                Box::new(balanced(left, span, node)?),
                Box::new(balanced(right, span, node)?),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                p(PatternKind::Window(4)),
                p(PatternKind::Dilated(2, 3)),
            ])),
        ]));
        let got = mask_pattern(&pat).map(|m| m.to_string());
        assert_eq!(
            got.ok().as_deref(),
            Some("(causal & (window(4) | dilated(2, 3)))")
        );
    }

    #[test]
    fn rejects_zero_stride_and_block() {
        let err = mask_pattern(&p(PatternKind::Dilated(2, 0))).unwrap_err();
        assert!(err.message.contains("dilated"));
        assert_eq!(err.primary_span(), Some(Span::new(3, 9)));
        let err = mask_pattern(&p(PatternKind::Block(0))).unwrap_err();
        assert!(err.message.contains("block"));
        assert!(mask_pattern(&p(PatternKind::Window(0))).is_ok());
    }
}
