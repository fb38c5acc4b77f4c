//! The attnc IR: a `petgraph` dataflow DAG with symbolic shapes, lowering and checking from the
//! AST, text and DOT printers, and the f64 reference interpreter that defines the semantics.
//!
//! This crate knows nothing of egg or Cranelift.
#![warn(missing_docs)]

pub mod backward;
pub mod bind;
pub mod build;
pub mod compare;
pub mod dim;
pub mod dot;
pub mod fused;
pub mod grad;
pub mod graph;
pub mod interp;
pub mod lower;
pub mod op;
pub mod pattern;
pub mod print;
pub mod random;
pub mod segments;
pub mod text;
pub mod topk;

pub use backward::BackwardOp;
pub use dim::{Bindings, Dim, Shape};
pub use fused::{Attention, Decay, LinearAttention, Normalizer, Precision, ScoreExpr};
pub use graph::{Graph, Kernel, KernelOutput, Module, Node, NodeId, Param};
pub use op::{BinaryOp, DType, Op, PoolOp, RandomKind, ReduceOp, UnaryOp};
pub use pattern::{MaskPattern, SymbolicPattern};
