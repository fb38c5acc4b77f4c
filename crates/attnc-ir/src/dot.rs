//! The IR as a Graphviz DOT graph: one box per node labeled with its op and type, edges from
//! operands to users (labeled with the operand slot for two-operand ops), the output node
//! drawn with a double border.
//!
//! Nodes are written in index order and edges per node, never recursively.

use crate::dim::format_shape;
use crate::graph::Kernel;
use std::fmt::Write;

/// Writes `k` as a DOT `digraph`.
pub fn dot_kernel(k: &Kernel) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&k.name));
    out.push_str("  node [shape=box, fontname=\"monospace\"];\n");
    for id in k.graph.topo_order() {
        let node = k.graph.node(id);
        let label = format!(
            "%{} {}\n{}{}",
            id.index(),
            node.op,
            node.dtype.keyword(),
            format_shape(&node.shape)
        );
        let extra = if id == k.output {
            ", peripheries=2"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  n{} [label=\"{}\"{extra}];",
            id.index(),
            escape(&label)
        );
    }
    for id in k.graph.topo_order() {
        let operands = k.graph.operands(id);
        let labeled = k.graph.node(id).op.arity() == 2;
        for (slot, operand) in operands.iter().enumerate() {
            if labeled {
                let _ = writeln!(
                    out,
                    "  n{} -> n{} [label=\"{slot}\"];",
                    operand.index(),
                    id.index()
                );
            } else {
                let _ = writeln!(out, "  n{} -> n{};", operand.index(), id.index());
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Escapes text for a double-quoted DOT string; a newline becomes DOT's `\n` line break.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_backslashes_and_newlines() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
