//! Feature maps evaluated on 16 lanes: an elementwise chain of the operations `attnc-wide`'s
//! [`Program`] knows (arithmetic, `maximum`/`minimum`, `exp`, `sqrt`, `rsqrt`, `relu`, `abs`,
//! `elu`, negation) over f32 buffers, lowered once at plan time and run a row at a time on the
//! block the step is about to read. Performer's `exp(xω − |x|²/2 − max)/√m` is the map this
//! exists for: its 256 exponentials per row dominate the step on 128-bit code.

use crate::error::Result;
use crate::kernels::elementwise::Expr;
use crate::wide::{buffer_err, wide_err};
use attnc_ir::{BinaryOp, UnaryOp};
use attnc_wide::features::program::{Binary, Node, Program, Scratch, Unary};

/// A feature map lowered to a [`Program`].
#[derive(Clone, Debug)]
pub struct LaneMap {
    program: Program,
    /// The map's shape (`[batch.., rows, d]`).
    shape: Vec<usize>,
    /// Per program source: its position among the step's inputs.
    pub(super) slots: Vec<usize>,
    /// Per load (in node order): its element strides along the leading axes of `shape`.
    leads: Vec<Vec<usize>>,
}

impl LaneMap {
    /// The chain `expr` over `shape` as a program, or `None` when it uses an operation or
    /// a read the program does not have. `slot` places a buffer among the step's inputs.
    pub fn lower(
        expr: &Expr,
        shape: &[usize],
        mut slot: impl FnMut(usize) -> usize,
    ) -> Option<LaneMap> {
        if shape.is_empty() {
            return None;
        }
        let mut lowering = Lowering {
            nodes: Vec::new(),
            buffers: Vec::new(),
            leads: Vec::new(),
            rank: shape.len(),
        };
        lowering.node(expr)?;
        let program = Program::new(lowering.nodes).ok()?;
        Some(LaneMap {
            program,
            shape: shape.to_vec(),
            slots: lowering.buffers.iter().map(|&b| slot(b)).collect(),
            leads: lowering.leads,
        })
    }

    /// Nodes of the program (for `explain`).
    pub fn size(&self) -> usize {
        self.program.nodes().len()
    }

    /// Rows `rows` (over the leading axes, flattened) into `out` (`rows.len() · d`), reading
    /// `sources` (the step's inputs at the map's slots, in order).
    pub fn run_block(
        &self,
        sources: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<()> {
        let rank = self.shape.len();
        let d = self.shape[rank - 1];
        let lead = &self.shape[..rank - 1];
        if out.len() != rows.len() * d {
            return Err(buffer_err("feature map", "block of the wrong size"));
        }
        let mut starts = vec![0usize; self.leads.len()];
        let mut coords = vec![0usize; lead.len()];
        for (r, row) in rows.zip(out.chunks_mut(d.max(1))) {
            let mut rest = r;
            for axis in (0..lead.len()).rev() {
                coords[axis] = rest % lead[axis].max(1);
                rest /= lead[axis].max(1);
            }
            for (start, strides) in starts.iter_mut().zip(&self.leads) {
                *start = coords.iter().zip(strides).map(|(c, s)| c * s).sum();
            }
            self.program
                .run_row(sources, &starts, &mut row[..d], scratch)
                .map_err(wide_err)?;
        }
        Ok(())
    }
}

/// The state of lowering one chain.
struct Lowering {
    nodes: Vec<Node>,
    /// The distinct buffers read, in first-read order (a load's `source` indexes these).
    buffers: Vec<usize>,
    leads: Vec<Vec<usize>>,
    rank: usize,
}

impl Lowering {
    /// Appends `expr`'s nodes; its value is the last.
    fn node(&mut self, expr: &Expr) -> Option<usize> {
        let node = match expr {
            Expr::Leaf { buf, strides } if strides.len() == self.rank => {
                let source = match self.buffers.iter().position(|b| b == buf) {
                    Some(at) => at,
                    None => {
                        self.buffers.push(*buf);
                        self.buffers.len() - 1
                    }
                };
                self.leads.push(strides[..self.rank - 1].to_vec());
                Node::Load {
                    source,
                    stride: strides[self.rank - 1],
                }
            }
            Expr::Const(x) => Node::Const(*x),
            Expr::Unary(op, x) => {
                let op = match op {
                    UnaryOp::Neg => Unary::Neg,
                    UnaryOp::Exp => Unary::Exp,
                    UnaryOp::Sqrt => Unary::Sqrt,
                    UnaryOp::Rsqrt => Unary::Rsqrt,
                    UnaryOp::Relu => Unary::Relu,
                    UnaryOp::Abs => Unary::Abs,
                    UnaryOp::Elu => Unary::Elu,
                    _ => return None,
                };
                Node::Unary(op, self.node(x)?)
            }
            Expr::Binary(op, a, b) => {
                let op = match op {
                    BinaryOp::Add => Binary::Add,
                    BinaryOp::Sub => Binary::Sub,
                    BinaryOp::Mul => Binary::Mul,
                    BinaryOp::Div => Binary::Div,
                    BinaryOp::Max => Binary::Max,
                    BinaryOp::Min => Binary::Min,
                };
                let a = self.node(a)?;
                Node::Binary(op, a, self.node(b)?)
            }
            _ => return None,
        };
        self.nodes.push(node);
        Some(self.nodes.len() - 1)
    }
}
