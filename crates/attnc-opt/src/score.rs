//! The score of a fused attention term as the IR reads it: an elementwise tree over the one
//! product `q @ kᵀ`, whose other array leaves become bias operands.
//!
//! [`score_form`] is shared by the extractor (over the chosen node of each e-class) and by the
//! conversion back to IR (over an extracted term), so the form the optimizer chooses is the
//! form the IR op carries; [`attnc_ir::fused::Fused::check`] then validates it with shapes.

use crate::analysis::{binary_op, unary_op};
use crate::lang::Attn;
use attnc_ir::fused::MAX_SCORE_DEPTH;
use attnc_ir::{Dim, ScoreExpr};
use egg::Id;

/// A score term read as IR: the expression and the classes (or term ids) of its bias leaves,
/// in `ScoreExpr::Bias` order.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreForm {
    /// The expression over `S = q kᵀ`.
    pub expr: ScoreExpr,
    /// The bias operands.
    pub biases: Vec<Id>,
}

/// How [`score_form`] sees a term: the node chosen for an id, id equality, and whether a
/// `relpos` leaf has exactly the scores' `[m, n]` shape (a `relpos(1, n)` broadcast over the
/// rows means something else and is read as a bias).
pub struct TermView<'a, N, S, R>
where
    N: Fn(Id) -> Option<&'a Attn>,
    S: Fn(Id, Id) -> bool,
    R: Fn(Id) -> bool,
{
    /// The node of an id.
    pub node: N,
    /// Whether two ids denote the same term.
    pub same: S,
    /// Whether a `relpos` id has the scores' shape.
    pub relpos_fits: R,
}

/// The score rooted at `s` of an attention over `q`, `k`: the product `(matmul q (transpose
/// k))` becomes `S`, scalar subterms numbers and dimensions, `relpos` of the scores' shape
/// the relative position, small fills constants, and every other array subterm a bias.
pub fn score_form<'a, N, S, R>(
    s: Id,
    q: Id,
    k: Id,
    view: &TermView<'a, N, S, R>,
) -> Result<ScoreForm, String>
where
    N: Fn(Id) -> Option<&'a Attn>,
    S: Fn(Id, Id) -> bool,
    R: Fn(Id) -> bool,
{
    let mut biases = Vec::new();
    let expr = read(s, q, k, view, &mut biases, 0)?;
    if !expr.uses_scores() {
        return Err("the score does not read q kᵀ".to_string());
    }
    Ok(ScoreForm { expr, biases })
}

fn read<'a, N, S, R>(
    id: Id,
    q: Id,
    k: Id,
    view: &TermView<'a, N, S, R>,
    biases: &mut Vec<Id>,
    depth: usize,
) -> Result<ScoreExpr, String>
where
    N: Fn(Id) -> Option<&'a Attn>,
    S: Fn(Id, Id) -> bool,
    R: Fn(Id) -> bool,
{
    if depth > MAX_SCORE_DEPTH {
        return Err(format!(
            "the score is deeper than {MAX_SCORE_DEPTH} operations"
        ));
    }
    let node = (view.node)(id).ok_or("a score term has no chosen node")?;
    if let Some(scalar) = scalar(id, view, 0) {
        return Ok(scalar);
    }
    if let Some((op, x)) = unary_op(node) {
        let x = read(x, q, k, view, biases, depth + 1)?;
        return Ok(ScoreExpr::Unary(op, Box::new(x)));
    }
    if let Some((op, [x, y])) = binary_op(node) {
        let x = read(x, q, k, view, biases, depth + 1)?;
        let y = read(y, q, k, view, biases, depth + 1)?;
        return Ok(ScoreExpr::Binary(op, Box::new(x), Box::new(y)));
    }
    match node {
        Attn::MatMul([a, t]) if is_key_transpose(*t, k, view) && (view.same)(*a, q) => {
            Ok(ScoreExpr::Scores)
        }
        Attn::RelPos(_) if (view.relpos_fits)(id) => Ok(ScoreExpr::RelPos),
        Attn::Fill(ids) if ids.len() <= 3 => {
            let value = ids
                .first()
                .and_then(|&v| (view.node)(v))
                .and_then(Attn::atom)
                .and_then(|a| a.as_num())
                .ok_or("a fill without a value")?;
            Ok(ScoreExpr::Const(value))
        }
        Attn::Leaf(_) => Err("an attribute where a value was expected".to_string()),
        n if n.is_pattern() => Err("a mask pattern where a value was expected".to_string()),
        _ => {
            let index = match biases.iter().position(|&b| (view.same)(b, id)) {
                Some(index) => index,
                None => {
                    biases.push(id);
                    biases.len() - 1
                }
            };
            Ok(ScoreExpr::Bias(index))
        }
    }
}

/// Whether `t` is `(transpose k)`.
fn is_key_transpose<'a, N, S, R>(t: Id, k: Id, view: &TermView<'a, N, S, R>) -> bool
where
    N: Fn(Id) -> Option<&'a Attn>,
    S: Fn(Id, Id) -> bool,
    R: Fn(Id) -> bool,
{
    matches!((view.node)(t), Some(Attn::Transpose(x)) if (view.same)(*x, k))
}

/// A scalar subterm (constants, dimensions and elementwise ops of them) as a score
/// expression; `None` when the term reads any array.
pub fn scalar<'a, N, S, R>(id: Id, view: &TermView<'a, N, S, R>, depth: usize) -> Option<ScoreExpr>
where
    N: Fn(Id) -> Option<&'a Attn>,
    S: Fn(Id, Id) -> bool,
    R: Fn(Id) -> bool,
{
    if depth > MAX_SCORE_DEPTH {
        return None;
    }
    let node = (view.node)(id)?;
    let atom = |a: Id| (view.node)(a).and_then(Attn::atom);
    if let Some((op, x)) = unary_op(node) {
        let x = scalar(x, view, depth + 1)?;
        return Some(ScoreExpr::Unary(op, Box::new(x)));
    }
    if let Some((op, [x, y])) = binary_op(node) {
        let x = scalar(x, view, depth + 1)?;
        let y = scalar(y, view, depth + 1)?;
        return Some(ScoreExpr::Binary(op, Box::new(x), Box::new(y)));
    }
    match node {
        Attn::Const(v) => atom(*v)?.as_num().map(ScoreExpr::Const),
        Attn::DimValue(d) => {
            let a = atom(*d)?;
            match (a.as_name(), a.as_index()) {
                (Some(name), _) => Some(ScoreExpr::Dim(Dim::Sym(name.to_string()))),
                (None, Some(v)) => Some(ScoreExpr::Const(v as f64)),
                _ => None,
            }
        }
        _ => None,
    }
}
