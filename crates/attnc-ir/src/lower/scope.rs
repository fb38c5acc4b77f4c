//! Per-kernel lowering state: the graph being built, the names in scope and the dimension
//! symbols.

use crate::dim::Shape;
use crate::graph::{Graph, Node, NodeId};
use crate::lower::builtin::{Builtin, PATTERN_NAMES};
use crate::lower::suggest::closest;
use crate::op::{DType, Op};
use attnc_syntax::{Diagnostic, Span};
use std::collections::HashMap;

/// What a name in scope stands for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Binding {
    /// A value in the graph.
    Node(NodeId),
    /// A `let` whose value failed to lower; its error is already reported, so uses of it
    /// fail silently instead of cascading.
    Poisoned,
}

/// Why lowering an expression stopped.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A new error to report.
    Error(Box<Diagnostic>),
    /// The expression uses a poisoned name; nothing new to report.
    Poisoned,
}

impl From<Diagnostic> for Failure {
    fn from(d: Diagnostic) -> Failure {
        Failure::Error(Box::new(d))
    }
}

/// The state of one kernel's lowering.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    /// The graph built so far (operands before users).
    pub graph: Graph,
    /// Parameters and `let`s; a later `let` replaces (shadows) an earlier binding.
    pub names: HashMap<String, Binding>,
    /// Dimension symbols, with the place each was first declared.
    pub dims: HashMap<String, Span>,
}

impl Scope {
    /// Adds an f32 node computed from `operands`.
    pub fn add(&mut self, op: Op, shape: Shape, span: Span, operands: &[NodeId]) -> NodeId {
        let node = Node {
            op,
            shape,
            dtype: DType::F32,
            span,
        };
        self.graph.add(node, operands)
    }

    /// The shape of node `id`.
    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.graph.node(id).shape
    }

    /// Whether `name` is a dimension symbol of this kernel.
    pub fn is_dim(&self, name: &str) -> bool {
        self.dims.contains_key(name)
    }

    /// Resolves a name used as a value: a binding, or a dimension symbol used as a number.
    pub fn resolve(&mut self, name: &str, span: Span) -> Result<NodeId, Failure> {
        match self.names.get(name) {
            // Segment ids are labels, not numbers: only `document(...)` reads them.
            Some(Binding::Node(id)) if self.graph.node(*id).dtype == DType::I32 => {
                return Err(Diagnostic::error(
                    format!("`{name}` is an i32 array of segment ids; it cannot be used as a value"),
                    span,
                )
                .with_primary_message("i32, not a number array")
                .with_note(format!(
                    "i32 parameters can only be named in a mask pattern: `mask(s, document({name}))`"
                ))
                .into())
            }
            Some(Binding::Node(id)) => return Ok(*id),
            Some(Binding::Poisoned) => return Err(Failure::Poisoned),
            None => {}
        }
        if self.is_dim(name) {
            let dim = crate::dim::Dim::Sym(name.to_string());
            return Ok(self.add(Op::DimValue(dim), Vec::new(), span, &[]));
        }
        Err(self.unknown_name(name, span).into())
    }

    /// The error for a name that is not in scope, with a suggestion when one is close.
    fn unknown_name(&self, name: &str, span: Span) -> Diagnostic {
        let mut d = Diagnostic::error(format!("unknown name `{name}`"), span)
            .with_primary_message("not a parameter, `let` or dimension of this kernel");
        if Builtin::lookup(name).is_some() {
            return d.with_note(format!("`{name}` is a function; call it as `{name}(...)`"));
        }
        if PATTERN_NAMES.contains(&name) {
            return d.with_note(format!(
                "`{name}` is a mask pattern; it can only be the second argument of `mask`"
            ));
        }
        let candidates = self
            .names
            .keys()
            .chain(self.dims.keys())
            .map(String::as_str);
        if let Some(close) = closest(name, candidates) {
            d = d.with_note(format!("did you mean `{close}`?"));
        }
        d
    }
}
