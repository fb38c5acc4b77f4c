//! Adding gradient nodes with inferred shapes: a [`GraphBuilder`] with the few shorthands the
//! VJP rules are written in.

use super::GradError;
use crate::backward::BackwardOp;
use crate::build::GraphBuilder;
use crate::dim::{Dim, Shape};
use crate::graph::NodeId;
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};

/// The graph under construction: the forward nodes, then the gradient nodes.
pub(super) struct Emitter {
    pub(super) b: GraphBuilder,
    /// The forward node whose rule is being applied (named in errors).
    pub(super) at: Option<NodeId>,
}

impl Emitter {
    /// The symbolic shape of `id`.
    pub(super) fn shape(&self, id: NodeId) -> Shape {
        self.b.graph.node(id).shape.clone()
    }

    /// Adds `op` over `args`; `given` is the shape of nullary array ops and `sum-to`.
    pub(super) fn op(
        &mut self,
        op: Op,
        args: &[NodeId],
        given: Option<&Shape>,
    ) -> Result<NodeId, GradError> {
        let text = op.to_string();
        self.b.add(op, args, given).map_err(|detail| {
            let node = self.at.map_or(usize::MAX, NodeId::index);
            GradError::Build {
                node,
                op: text,
                detail,
            }
        })
    }

    pub(super) fn constant(&mut self, value: f64) -> Result<NodeId, GradError> {
        self.op(Op::Const(value), &[], None)
    }

    pub(super) fn fill(&mut self, value: f64, shape: &Shape) -> Result<NodeId, GradError> {
        self.op(Op::Fill { value }, &[], Some(shape))
    }

    pub(super) fn unary(&mut self, u: UnaryOp, x: NodeId) -> Result<NodeId, GradError> {
        self.op(Op::Unary(u), &[x], None)
    }

    pub(super) fn binary(
        &mut self,
        op: BinaryOp,
        a: NodeId,
        b: NodeId,
    ) -> Result<NodeId, GradError> {
        self.op(Op::Binary(op), &[a, b], None)
    }

    pub(super) fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.binary(BinaryOp::Mul, a, b)
    }

    pub(super) fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.binary(BinaryOp::Add, a, b)
    }

    pub(super) fn sub(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.binary(BinaryOp::Sub, a, b)
    }

    pub(super) fn div(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.binary(BinaryOp::Div, a, b)
    }

    /// `x · c` for a number `c`.
    pub(super) fn scale(&mut self, x: NodeId, c: f64) -> Result<NodeId, GradError> {
        let c = self.constant(c)?;
        self.mul(x, c)
    }

    /// `[a > b]`: 1, 0, or NaN where either side is NaN.
    pub(super) fn greater(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.op(Op::Backward(BackwardOp::Greater), &[a, b], None)
    }

    /// `1 − x`.
    pub(super) fn one_minus(&mut self, x: NodeId) -> Result<NodeId, GradError> {
        let one = self.constant(1.0)?;
        self.sub(one, x)
    }

    pub(super) fn transpose(&mut self, x: NodeId) -> Result<NodeId, GradError> {
        self.op(Op::Transpose, &[x], None)
    }

    pub(super) fn matmul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GradError> {
        self.op(Op::MatMul, &[a, b], None)
    }

    pub(super) fn sum(&mut self, x: NodeId, axis: usize) -> Result<NodeId, GradError> {
        let op = Op::Reduce {
            op: ReduceOp::Sum,
            axis,
        };
        self.op(op, &[x], None)
    }

    /// `x` summed down to `shape` (the adjoint of broadcasting `shape` up to `x`'s shape);
    /// `x` itself when the shapes agree.
    pub(super) fn sum_to(&mut self, x: NodeId, shape: &Shape) -> Result<NodeId, GradError> {
        if self.shape(x) == *shape {
            return Ok(x);
        }
        self.op(Op::Backward(BackwardOp::SumTo), &[x], Some(shape))
    }

    /// `x` broadcast up to `shape` (`x · ones(shape)`); `x` itself when the shapes agree.
    pub(super) fn broadcast_to(&mut self, x: NodeId, shape: &Shape) -> Result<NodeId, GradError> {
        if self.shape(x) == *shape {
            return Ok(x);
        }
        let ones = self.fill(1.0, shape)?;
        self.mul(x, ones)
    }

    /// The size of axis `axis` of `x` as a number of shape `[.., 1, ..]`: a constant for a
    /// literal size, else `sum(ones)` (a symbol bound to 0 then gives 0 without ever being
    /// used as a number, which binding refuses).
    pub(super) fn axis_size(&mut self, x: NodeId, axis: usize) -> Result<NodeId, GradError> {
        let shape = self.shape(x);
        match shape.get(axis) {
            Some(Dim::Const(c)) => self.constant(*c as f64),
            _ => {
                let ones = self.fill(1.0, &shape)?;
                self.sum(ones, axis)
            }
        }
    }
}
