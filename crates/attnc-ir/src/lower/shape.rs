//! Shape rules on symbolic dimensions: NumPy broadcasting, matrix products, transposes,
//! reductions. Every rule reports a disagreement with a label on each operand.

use crate::dim::{format_shape, Dim, Shape};
use attnc_syntax::{Diagnostic, Span};

/// One operand of a shape rule, as the error messages describe it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand<'a> {
    /// Its symbolic shape.
    pub shape: &'a [Dim],
    /// The expression it came from.
    pub span: Span,
    /// How messages call it: "left operand", "first argument".
    pub role: &'static str,
}

impl Operand<'_> {
    /// "the left operand has shape [h, n, d]"
    fn describe(&self) -> String {
        format!("the {} has shape {}", self.role, format_shape(self.shape))
    }
}

/// Two dimensions broadcast when they are equal or one of them is the constant 1.
fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    if a == b || b.is_one() {
        Some(a.clone())
    } else if a.is_one() {
        Some(b.clone())
    } else {
        None
    }
}

/// The NumPy broadcast of two shapes, aligned from the right. `what` names the kind of
/// dimension in the error ("dimension", "batch dimension").
fn broadcast_shapes(a: Operand<'_>, b: Operand<'_>, what: &str) -> Result<Shape, Diagnostic> {
    let rank = a.shape.len().max(b.shape.len());
    // A missing leading axis behaves as an axis of size 1.
    let one = Dim::Const(1);
    let mut out = Vec::with_capacity(rank);
    for k in (0..rank).rev() {
        let x = (k + a.shape.len())
            .checked_sub(rank)
            .map_or(&one, |i| &a.shape[i]);
        let y = (k + b.shape.len())
            .checked_sub(rank)
            .map_or(&one, |i| &b.shape[i]);
        let dim = broadcast_dim(x, y).ok_or_else(|| {
            Diagnostic::error(
                format!(
                    "cannot broadcast {what} `{x}` of the {} with `{y}` of the {}",
                    a.role, b.role
                ),
                a.span,
            )
            .with_primary_message(a.describe())
            .with_label(b.span, b.describe())
            .with_note("broadcast dimensions must be equal or one of them must be 1")
        })?;
        out.push(dim);
    }
    out.reverse();
    Ok(out)
}

/// The shape of an elementwise operation on `a` and `b` (NumPy broadcasting).
pub(crate) fn broadcast(a: Operand<'_>, b: Operand<'_>) -> Result<Shape, Diagnostic> {
    broadcast_shapes(a, b, "dimension")
}

/// The shape of `a @ b`: both of rank ≥ 2, contraction dimensions equal, leading axes
/// broadcast.
pub(crate) fn matmul(a: Operand<'_>, b: Operand<'_>) -> Result<Shape, Diagnostic> {
    for operand in [a, b] {
        if operand.shape.len() < 2 {
            return Err(Diagnostic::error(
                format!(
                    "matrix product needs operands of rank at least 2, but the {} has rank {}",
                    operand.role,
                    operand.shape.len()
                ),
                operand.span,
            )
            .with_primary_message(operand.describe()));
        }
    }
    let (a_batch, a_mat) = a.shape.split_at(a.shape.len() - 2);
    let (b_batch, b_mat) = b.shape.split_at(b.shape.len() - 2);
    let (rows, inner_a) = (&a_mat[0], &a_mat[1]);
    let (inner_b, cols) = (&b_mat[0], &b_mat[1]);
    if inner_a != inner_b {
        return Err(Diagnostic::error(
            format!(
                "matrix product dimensions do not match: `{inner_a}` (last axis of the {}) \
                 against `{inner_b}` (second-to-last axis of the {})",
                a.role, b.role
            ),
            a.span,
        )
        .with_primary_message(a.describe())
        .with_label(b.span, b.describe()));
    }
    let batch = broadcast_shapes(
        Operand {
            shape: a_batch,
            ..a
        },
        Operand {
            shape: b_batch,
            ..b
        },
        "batch dimension",
    )
    .map_err(|d| {
        // The labels should show the operands' full shapes, not only their batch axes.
        let mut d = d.with_primary_message(a.describe());
        if let Some(label) = d.labels.iter_mut().find(|l| !l.primary) {
            label.message = b.describe();
        }
        d
    })?;
    let mut out = batch;
    out.push(rows.clone());
    out.push(cols.clone());
    Ok(out)
}

/// The shape of `x.T`: the last two axes swapped; `x` needs rank ≥ 2.
pub(crate) fn transpose(shape: &[Dim], span: Span) -> Result<Shape, Diagnostic> {
    if shape.len() < 2 {
        return Err(Diagnostic::error(
            format!(
                "`.T` needs an operand of rank at least 2, but it has rank {}",
                shape.len()
            ),
            span,
        )
        .with_primary_message(format!("this has shape {}", format_shape(shape))));
    }
    let mut out = shape.to_vec();
    let rank = out.len();
    out.swap(rank - 2, rank - 1);
    Ok(out)
}

/// Normalizes `axis` (negative counts from the end) against `rank`.
pub(crate) fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank_i = i64::try_from(rank).ok()?;
    let normalized = if axis < 0 { axis + rank_i } else { axis };
    if (0..rank_i).contains(&normalized) {
        usize::try_from(normalized).ok()
    } else {
        None
    }
}

/// The shape of a reduction of `shape` over `axis`: that axis kept with size 1.
pub(crate) fn reduce(shape: &[Dim], axis: usize) -> Shape {
    let mut out = shape.to_vec();
    out[axis] = Dim::Const(1);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> Dim {
        Dim::Sym(s.to_string())
    }

    fn op<'a>(shape: &'a [Dim], role: &'static str) -> Operand<'a> {
        Operand {
            shape,
            span: Span::new(0, 1),
            role,
        }
    }

    #[test]
    fn broadcasting_aligns_from_the_right() {
        let a = [sym("h"), Dim::Const(1), sym("n")];
        let b = [sym("m"), sym("n")];
        let out = broadcast(op(&a, "left operand"), op(&b, "right operand"));
        assert_eq!(out.ok(), Some(vec![sym("h"), sym("m"), sym("n")]));
        let scalar: [Dim; 0] = [];
        let out = broadcast(op(&scalar, "left operand"), op(&b, "right operand"));
        assert_eq!(out.ok(), Some(b.to_vec()));
    }

    #[test]
    fn broadcasting_rejects_different_symbols_and_literals() {
        let a = [sym("n")];
        let b = [sym("m")];
        let err = broadcast(op(&a, "left operand"), op(&b, "right operand")).unwrap_err();
        assert!(err.message.contains("`n`") && err.message.contains("`m`"));
        assert_eq!(err.labels.len(), 2);
        let c = [Dim::Const(2)];
        let d = [Dim::Const(3)];
        assert!(broadcast(op(&c, "left operand"), op(&d, "right operand")).is_err());
        assert!(broadcast(op(&a, "left operand"), op(&c, "right operand")).is_err());
    }

    #[test]
    fn matmul_broadcasts_batches_and_checks_contraction() {
        let e = [sym("r"), sym("n")];
        let k = [sym("h"), sym("n"), sym("d")];
        let out = matmul(op(&e, "left operand"), op(&k, "right operand"));
        assert_eq!(out.ok(), Some(vec![sym("h"), sym("r"), sym("d")]));
        let err = matmul(op(&k, "left operand"), op(&k, "right operand")).unwrap_err();
        assert!(err.message.contains("`d`") && err.message.contains("`n`"));
        let v = [sym("n")];
        assert!(matmul(op(&v, "left operand"), op(&k, "right operand")).is_err());
    }

    #[test]
    fn axes_normalize_against_rank() {
        assert_eq!(normalize_axis(-1, 3), Some(2));
        assert_eq!(normalize_axis(2, 3), Some(2));
        assert_eq!(normalize_axis(3, 3), None);
        assert_eq!(normalize_axis(-4, 3), None);
        assert_eq!(normalize_axis(0, 0), None);
        assert_eq!(normalize_axis(i64::MIN, 3), None);
    }
}
