//! Mask patterns from the AST to the IR, checking their arguments.

use crate::pattern::MaskPattern;
use attnc_syntax::ast::{Pattern, PatternKind};
use attnc_syntax::Diagnostic;

/// Converts a pattern, rejecting `dilated(w, 0)` and `block(0)`.
///
/// Recurses once per nested `&`/`|`, so no deeper than the AST itself.
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
        PatternKind::And(a, b) => {
            MaskPattern::And(Box::new(mask_pattern(a)?), Box::new(mask_pattern(b)?))
        }
        PatternKind::Or(a, b) => {
            MaskPattern::Or(Box::new(mask_pattern(a)?), Box::new(mask_pattern(b)?))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_syntax::Span;

    fn p(kind: PatternKind) -> Pattern {
        Pattern {
            kind,
            span: Span::new(3, 9),
        }
    }

    #[test]
    fn converts_combinations() {
        let pat = p(PatternKind::And(
            Box::new(p(PatternKind::Causal)),
            Box::new(p(PatternKind::Or(
                Box::new(p(PatternKind::Window(4))),
                Box::new(p(PatternKind::Dilated(2, 3))),
            ))),
        ));
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
