//! Building graphs outside the front end: symbolic shape inference for every op and a builder
//! that adds nodes with inferred shapes (used by the optimizer to turn terms back into IR and
//! by [`crate::fused::expand`] to write fused ops out).
//!
//! The front end's lowering has its own shape rules, which report disagreements as
//! diagnostics on the source; these rules report a plain message, for code that builds IR
//! from IR.

use crate::dim::{Dim, Shape};
use crate::fused::{output_shape, Fused};
use crate::graph::{Graph, Node, NodeId, Param};
use crate::op::{DType, Op};
use attnc_syntax::Span;

/// The NumPy broadcast of two symbolic shapes.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let one = Dim::Const(1);
    let mut out = Vec::with_capacity(rank);
    for k in 0..rank {
        let x = (k + a.len()).checked_sub(rank).map_or(&one, |i| &a[i]);
        let y = (k + b.len()).checked_sub(rank).map_or(&one, |i| &b[i]);
        out.push(if x == y || y.is_one() {
            x.clone()
        } else if x.is_one() {
            y.clone()
        } else {
            return None;
        });
    }
    Some(out)
}

/// The symbolic shape of `a @ b`.
pub fn matmul(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 || a[ra - 1] != b[rb - 2] {
        return None;
    }
    let mut out = broadcast(&a[..ra - 2], &b[..rb - 2])?;
    out.extend([a[ra - 2].clone(), b[rb - 1].clone()]);
    Some(out)
}

/// The shape of `softmax_sink(x, s)`: `x`'s, when `s` broadcasts into `x`'s rows `[.., 1]`.
pub fn sink_shape(x: &[Dim], s: &[Dim]) -> Option<Shape> {
    let mut rows = x.to_vec();
    *rows.last_mut()? = Dim::Const(1);
    (broadcast(&rows, s)? == rows).then(|| x.to_vec())
}

/// The shape of `x` pooled in blocks of `size` rows: `[.., ceil(n / size), d]`.
pub fn pooled(x: &[Dim], size: &Dim) -> Option<Shape> {
    let rows = x.len().checked_sub(2)?;
    let mut out = x.to_vec();
    out[rows] = match (&x[rows], size) {
        (Dim::Const(n), Dim::Const(b)) if *b > 0 => Dim::Const(n.div_ceil(*b)),
        (_, Dim::Const(1)) => x[rows].clone(),
        (n, b) => Dim::CeilDiv(Box::new(n.clone()), Box::new(b.clone())),
    };
    Some(out)
}

/// The symbolic shape of `x.T`.
pub fn transpose(x: &[Dim]) -> Option<Shape> {
    let rank = x.len();
    if rank < 2 {
        return None;
    }
    let mut out = x.to_vec();
    out.swap(rank - 2, rank - 1);
    Some(out)
}

/// The shape of `op` over operands of `shapes`; nullary ops with an array shape (`fill`,
/// `relpos`, `random`, `input`) take it from `given`.
pub fn infer_shape(op: &Op, shapes: &[&Shape], given: Option<&Shape>) -> Result<Shape, String> {
    let wrong = || format!("{op} does not take {} operands", shapes.len());
    let bad = |what: &str| {
        let shown: Vec<String> = shapes.iter().map(|s| crate::dim::format_shape(s)).collect();
        format!("{op}: {what} ({})", shown.join(", "))
    };
    Ok(match (op, shapes) {
        (Op::Const(_) | Op::DimValue(_), []) => vec![],
        (Op::Input { .. } | Op::Fill { .. } | Op::RelPos | Op::Random { .. }, []) => given
            .cloned()
            .ok_or_else(|| format!("{op} needs an explicit shape"))?,
        (Op::Unary(_) | Op::Softmax { .. } | Op::Cast { .. }, [x]) => (*x).clone(),
        (Op::Mask { pattern, .. }, [x, segments @ ..]) if segments.len() == pattern.segments() => {
            let segments: Vec<&[Dim]> = segments.iter().map(|s| s.as_slice()).collect();
            crate::segments::check_mask(pattern, x.as_slice(), &segments).map_err(|e| bad(&e))?;
            (*x).clone()
        }
        (Op::Binary(_), [a, b]) => {
            broadcast(a, b).ok_or_else(|| bad("the shapes do not broadcast"))?
        }
        (Op::MatMul, [a, b]) => matmul(a, b).ok_or_else(|| bad("the shapes do not multiply"))?,
        (Op::Transpose, [x]) => transpose(x).ok_or_else(|| bad("rank below 2"))?,
        (Op::Reduce { axis, .. }, [x]) => {
            let mut s = (*x).clone();
            *s.get_mut(*axis).ok_or_else(|| bad("no such axis"))? = Dim::Const(1);
            s
        }
        (Op::Cumsum { axis }, [x]) if *axis < x.len() => (*x).clone(),
        (Op::SoftmaxSink, [x, s]) => {
            sink_shape(x, s).ok_or_else(|| bad("the sink does not broadcast to the rows"))?
        }
        (Op::Pool { size, .. }, [x]) => pooled(x, size).ok_or_else(|| bad("rank below 2"))?,
        (Op::Attention(a), _) => output_shape(Fused::Attention(a), shapes)?,
        (Op::LinearAttention(l), _) => output_shape(Fused::Linear(l), shapes)?,
        (Op::Backward(b), _) => b.output_shape(shapes, given)?,
        _ => return Err(wrong()),
    })
}

/// Adds nodes to a graph with inferred shapes.
#[derive(Clone, Debug, Default)]
pub struct GraphBuilder {
    /// The graph built so far.
    pub graph: Graph,
}

impl GraphBuilder {
    /// A builder whose graph starts with one `input` node per parameter (node `i` is
    /// parameter `i`, as lowering lays graphs out).
    pub fn with_params(params: &[Param]) -> GraphBuilder {
        let mut b = GraphBuilder::default();
        for (index, p) in params.iter().enumerate() {
            let op = Op::Input {
                index,
                name: p.name.clone(),
            };
            b.add_node(op, p.shape.clone(), p.dtype, &[]);
        }
        b
    }

    /// Adds `op` over `operands`, inferring its shape (see [`infer_shape`] for `given`).
    pub fn add(
        &mut self,
        op: Op,
        operands: &[NodeId],
        given: Option<&Shape>,
    ) -> Result<NodeId, String> {
        let shapes: Vec<&Shape> = operands
            .iter()
            .map(|&o| &self.graph.node(o).shape)
            .collect();
        let shape = infer_shape(&op, &shapes, given)?;
        let dtype = match op {
            Op::Cast { to } => to,
            _ => DType::F32,
        };
        Ok(self.add_node(op, shape, dtype, operands))
    }

    /// Adds a node with a known shape and type.
    pub fn add_node(&mut self, op: Op, shape: Shape, dtype: DType, operands: &[NodeId]) -> NodeId {
        let node = Node {
            op,
            shape,
            dtype,
            span: Span::default(),
        };
        self.graph.add(node, operands)
    }

    /// The rank of node `id`.
    pub fn rank(&self, id: NodeId) -> usize {
        self.graph.node(id).shape.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::BinaryOp;

    #[test]
    fn shapes_follow_numpy() {
        let s = |v: &[&str]| -> Shape { v.iter().map(|x| Dim::Sym(x.to_string())).collect() };
        let (a, b) = (s(&["h", "n", "d"]), s(&["d", "e"]));
        assert_eq!(
            infer_shape(&Op::MatMul, &[&a, &b], None).expect("multiplies"),
            s(&["h", "n", "e"])
        );
        let one = vec![Dim::Const(1), Dim::Sym("d".into())];
        assert_eq!(
            infer_shape(&Op::Binary(BinaryOp::Add), &[&a, &one], None).expect("broadcasts"),
            a
        );
        assert!(infer_shape(&Op::MatMul, &[&a, &a], None).is_err());
        assert!(infer_shape(&Op::RelPos, &[], None).is_err());
    }
}
