//! The names of `document(...)` patterns: each must be an `i32` parameter whose last axis has
//! the scores' key count `n` (or query count `m` for the first name of
//! `document(qseg, kseg)`), with leading axes that match the scores' batch axes from the left
//! (see [`crate::segments`]). The gate of `topk_blocks(g, k, b)` is a float parameter or `let`
//! of shape `[batch.., ceil(m/b), ceil(n/b)]`. Each distinct name (and role) becomes one segment
//! operand of the mask.

use crate::dim::{format_shape, Dim, Shape};
use crate::fused::Extent;
use crate::graph::NodeId;
use crate::lower::scope::{Binding, Scope};
use crate::op::DType;
use crate::segments::{prefix_fits, Role};
use attnc_syntax::ast::Ident;
use attnc_syntax::Diagnostic;

/// The segment operands of one mask being lowered.
pub(crate) struct Segments {
    /// The masked scores, operand 0.
    scores: NodeId,
    /// Their shape `[batch.., m, n]` (rank ≥ 2, checked before).
    shape: Shape,
    /// The segment operands so far, with the role each was checked for.
    nodes: Vec<(NodeId, Role)>,
}

impl Segments {
    /// No segment operands yet, for scores `scores` of shape `shape`.
    pub fn new(scores: NodeId, shape: &Shape) -> Segments {
        Segments {
            scores,
            shape: shape.clone(),
            nodes: Vec::new(),
        }
    }

    /// The mask's operands: the scores, then the segment operands.
    pub fn operands(&self) -> Vec<NodeId> {
        std::iter::once(self.scores)
            .chain(self.nodes.iter().map(|&(id, _)| id))
            .collect()
    }

    /// The segment operand index of `name` in role `role`, checking its type and shape.
    pub fn resolve(
        &mut self,
        scope: &Scope,
        name: &Ident,
        role: Role,
    ) -> Result<usize, Diagnostic> {
        if let Role::Gate(b) = role {
            return self.resolve_gate(scope, name, b);
        }
        let id = match scope.names.get(&name.name) {
            Some(Binding::Node(id)) if scope.graph.node(*id).dtype == DType::I32 => *id,
            Some(Binding::Node(id)) => {
                let node = scope.graph.node(*id);
                return Err(Diagnostic::error(
                    format!(
                        "`document` needs an i32 parameter of segment ids, but `{}` is {}{}",
                        name.name,
                        node.dtype.keyword(),
                        format_shape(&node.shape)
                    ),
                    name.span,
                )
                .with_primary_message("not an i32 parameter")
                .with_note("declare the segment ids as a parameter like `seg: i32[n]`"));
            }
            Some(Binding::Poisoned) | None => {
                return Err(Diagnostic::error(
                    format!("`{}` is not a parameter of this kernel", name.name),
                    name.span,
                )
                .with_primary_message("unknown segment ids")
                .with_note("declare the segment ids as a parameter like `seg: i32[n]`"))
            }
        };
        self.check_shape(name, role, &scope.graph.node(id).shape)?;
        if let Some(index) = self.nodes.iter().position(|&(n, r)| n == id && r == role) {
            return Ok(index);
        }
        self.nodes.push((id, role));
        Ok(self.nodes.len() - 1)
    }

    /// The gate of `topk_blocks(name, k, b)`: a float array `[batch.., ceil(m/b), ceil(n/b)]`.
    fn resolve_gate(&mut self, scope: &Scope, name: &Ident, b: u64) -> Result<usize, Diagnostic> {
        let note = "the gate scores key blocks per query block, e.g. `let g = mean_pool(q, 64) @ mean_pool(k, 64).T;`";
        let id = match scope.names.get(&name.name) {
            Some(Binding::Node(id)) if scope.graph.node(*id).dtype != DType::I32 => *id,
            Some(Binding::Node(id)) => {
                let node = scope.graph.node(*id);
                return Err(Diagnostic::error(
                    format!(
                        "`topk_blocks` needs a float gate, but `{}` is {}{}",
                        name.name,
                        node.dtype.keyword(),
                        format_shape(&node.shape)
                    ),
                    name.span,
                )
                .with_primary_message("not a float array")
                .with_note(note));
            }
            Some(Binding::Poisoned) | None => {
                return Err(Diagnostic::error(
                    format!("`{}` is not a parameter or `let` of this kernel", name.name),
                    name.span,
                )
                .with_primary_message("unknown gate")
                .with_note(note))
            }
        };
        let gate = &scope.graph.node(id).shape;
        let rank = self.shape.len();
        let (batch, mn) = self.shape.split_at(rank - 2);
        let want = [mn[0].blocks(b), mn[1].blocks(b)];
        let shown = format_shape(gate);
        let wrong = |what: String| {
            Diagnostic::error(what, name.span)
                .with_primary_message(format!("this has shape {shown}"))
                .with_note(format!(
                    "the masked scores have shape {}; in blocks of {b} the gate is {} (leading dimensions match the scores' first batch dimensions, each equal or 1)",
                    format_shape(&self.shape),
                    format_shape(&want),
                ))
        };
        let Some(lead) = gate.len().checked_sub(2).map(|r| &gate[..r]) else {
            return Err(wrong(format!(
                "the gate `{}` of `topk_blocks` must have rank at least 2, not {}",
                name.name,
                gate.len()
            )));
        };
        for (axis, (got, want), what) in [
            (gate.len() - 2, (&gate[gate.len() - 2], &want[0]), "query"),
            (gate.len() - 1, (&gate[gate.len() - 1], &want[1]), "key"),
        ] {
            // Sizes with symbols are compared once bound (`bind::resolve_node_shapes`): a
            // gate parameter `f32[h, r, c]` binds its own symbols.
            let constant = |d: &Dim| d.symbols().is_empty();
            if got != want && constant(got) && constant(want) {
                return Err(wrong(format!(
                    "dimension {axis} of the gate `{}` is `{got}`, but blocks of {b} make `{want}` {what} blocks",
                    name.name
                )));
            }
        }
        if !prefix_fits(lead, batch) {
            return Err(wrong(format!(
                "the leading dimensions of the gate `{}` do not match the scores' batch dimensions {}",
                name.name,
                format_shape(batch)
            )));
        }
        let role = Role::Gate(b);
        if let Some(index) = self.nodes.iter().position(|&(n, r)| n == id && r == role) {
            return Ok(index);
        }
        self.nodes.push((id, role));
        Ok(self.nodes.len() - 1)
    }

    fn check_shape(&self, name: &Ident, role: Role, seg: &[Dim]) -> Result<(), Diagnostic> {
        let rank = self.shape.len();
        let (batch, mn) = self.shape.split_at(rank - 2);
        let (want, what) = match role {
            Role::Queries => (&mn[0], "queries"),
            Role::Aligned | Role::Keys | Role::Gate(_) => (&mn[1], "keys"),
        };
        let shown = format_shape(seg);
        let Some((len, lead)) = seg.split_last() else {
            return Err(Diagnostic::error(
                format!("segment ids `{}` must have rank at least 1", name.name),
                name.span,
            ));
        };
        if len != want {
            return Err(Diagnostic::error(
                format!(
                    "the last dimension of segment ids `{}` is `{len}`, but the scores have `{want}` {what}",
                    name.name
                ),
                name.span,
            )
            .with_primary_message(format!("this has shape {shown}"))
            .with_note(format!(
                "the masked scores have shape {}",
                format_shape(&self.shape)
            )));
        }
        if !prefix_fits(lead, batch) {
            return Err(Diagnostic::error(
                format!(
                    "the leading dimensions of segment ids `{}` do not match the scores' batch dimensions {}",
                    name.name,
                    format_shape(batch)
                ),
                name.span,
            )
            .with_primary_message(format!("this has shape {shown}"))
            .with_note("leading dimensions match the scores' first batch dimensions (each equal or 1): `i32[n]` or `i32[b, n]` for scores `[b, h, n, n]`"));
        }
        Ok(())
    }
}
