//! The dataflow graph: a `petgraph` DAG of [`Node`]s whose edges are operand slots.

use crate::dim::Shape;
use crate::op::{DType, Op};
use attnc_syntax::Span;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::Serialize;

/// Identifies a node of a [`Graph`].
pub type NodeId = NodeIndex<u32>;

/// One operation with its inferred shape and dtype.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// The inferred symbolic shape.
    pub shape: Shape,
    /// The element type of the result (f32 except for inputs and casts).
    pub dtype: DType,
    /// The source expression this node came from.
    #[serde(skip)]
    pub span: Span,
}

/// A DAG of operations. Edge weights are operand slots: edge `a → b` with weight `k` means
/// `a` is operand `k` of `b`. Nodes are added operands-first, so index order is topological.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The underlying petgraph graph.
    pub dag: DiGraph<Node, usize, u32>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds `node` with `operands` (in slot order) and returns its id.
    pub fn add(&mut self, node: Node, operands: &[NodeId]) -> NodeId {
        let id = self.dag.add_node(node);
        for (slot, &operand) in operands.iter().enumerate() {
            self.dag.add_edge(operand, id, slot);
        }
        id
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    /// The operands of `id`, in slot order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(usize, NodeId)> = self
            .dag
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, src)| src).collect()
    }

    /// Node ids in topological order (operands before users).
    pub fn topo_order(&self) -> Vec<NodeId> {
        self.dag.node_indices().collect()
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    /// True when the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }
}

/// A kernel parameter as the IR sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    /// The parameter's name.
    pub name: String,
    /// Its declared storage type.
    pub dtype: DType,
    /// Its declared symbolic shape.
    pub shape: Shape,
    /// Where it was declared.
    #[serde(skip)]
    pub span: Span,
}

/// One result of a kernel: its node and storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOutput {
    /// The node whose value is returned (a `Cast` node for f16/bf16 types).
    pub node: NodeId,
    /// The storage type.
    pub dtype: DType,
}

/// One checked kernel: parameters, graph, output nodes and declared return types.
///
/// The first output is `output`/`ret_dtype` (what single-output code reads); a kernel that
/// returns `(a, b, ..)` lists the others in `extra_outputs`. [`Kernel::outputs`] gives them
/// all in order.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The kernel's name.
    pub name: String,
    /// The parameters, in order; `Op::Input { index }` refers to `params[index]`.
    pub params: Vec<Param>,
    /// The dataflow graph.
    pub graph: Graph,
    /// The node whose value the kernel returns (a `Cast` node for f16/bf16 return types).
    pub output: NodeId,
    /// The return storage type.
    pub ret_dtype: DType,
    /// The outputs after the first of a kernel returning a tuple (empty for one output).
    pub extra_outputs: Vec<KernelOutput>,
    /// Approximations the kernel's `@approx` attribute allows (consumed by the optimizer).
    pub approx: Vec<attnc_syntax::ast::ApproxKind>,
    /// Where the kernel was declared.
    pub span: Span,
}

impl Kernel {
    /// Every output, in order (the first is `output`/`ret_dtype`).
    pub fn outputs(&self) -> Vec<KernelOutput> {
        std::iter::once(KernelOutput {
            node: self.output,
            dtype: self.ret_dtype,
        })
        .chain(self.extra_outputs.iter().copied())
        .collect()
    }

    /// The output nodes, in order.
    pub fn output_nodes(&self) -> Vec<NodeId> {
        self.outputs().iter().map(|o| o.node).collect()
    }

    /// Whether the kernel returns several values.
    pub fn has_several_outputs(&self) -> bool {
        !self.extra_outputs.is_empty()
    }
}

/// Every kernel of a checked file.
#[derive(Clone, Debug, Default)]
pub struct Module {
    /// The kernels, in source order.
    pub kernels: Vec<Kernel>,
}

impl Module {
    /// The kernel called `name`.
    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }
}
