//! The IR as text, one node a line.
//!
//! ```text
//! kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d]
//!   %0 = input q #0            : f32[h, n, d]
//!   %3 = transpose %1          : f32[h, d, n]
//!   %4 = matmul %0, %3         : f32[h, n, n]
//!   ...
//!   return %9
//! ```
//!
//! Printing walks the nodes in index order (which is topological), never recursively.

use crate::dim::format_shape;
use crate::graph::{Kernel, Module, NodeId};
use crate::op::Op;
use attnc_syntax::print::print_approx_kind;
use std::fmt::Write;

/// The narrowest column at which node types are aligned.
const MIN_TYPE_COLUMN: usize = 24;

/// Lines longer than this do not push the type column further right (long mask patterns).
const MAX_TYPE_COLUMN: usize = 40;

/// Prints every kernel of `module`, separated by blank lines.
pub fn print_module(module: &Module) -> String {
    let kernels: Vec<String> = module.kernels.iter().map(print_kernel).collect();
    kernels.join("\n")
}

/// `name(q: f32[h, n, d], ...) -> f32[h, n, d]`: the kernel's parameters and return type.
pub fn signature(k: &Kernel) -> String {
    let params: Vec<String> = k
        .params
        .iter()
        .map(|p| {
            format!(
                "{}: {}{}",
                p.name,
                p.dtype.keyword(),
                format_shape(&p.shape)
            )
        })
        .collect();
    let types: Vec<String> = k
        .outputs()
        .iter()
        .map(|o| {
            let shape = if o.node.index() < k.graph.len() {
                format_shape(&k.graph.node(o.node).shape)
            } else {
                "[?]".to_string()
            };
            format!("{}{}", o.dtype.keyword(), shape)
        })
        .collect();
    let ret = if types.len() == 1 {
        types.join("")
    } else {
        format!("({})", types.join(", "))
    };
    format!("{}({}) -> {}", k.name, params.join(", "), ret)
}

/// Prints one kernel: an `@approx` line when it allows approximations, its signature, one
/// line per node with the node's type, and the returned node.
pub fn print_kernel(k: &Kernel) -> String {
    let mut out = String::new();
    if !k.approx.is_empty() {
        let items: Vec<String> = k.approx.iter().map(print_approx_kind).collect();
        let _ = writeln!(out, "@approx({})", items.join(", "));
    }
    let _ = writeln!(out, "kernel {}", signature(k));
    let lines: Vec<(String, String)> = k
        .graph
        .topo_order()
        .into_iter()
        .map(|id| {
            let node = k.graph.node(id);
            let left = format!(
                "%{} = {}",
                id.index(),
                instruction(&node.op, &k.graph.operands(id))
            );
            let ty = format!("{}{}", node.dtype.keyword(), format_shape(&node.shape));
            (left, ty)
        })
        .collect();
    let column = lines
        .iter()
        .map(|(left, _)| left.chars().count())
        .filter(|&width| width <= MAX_TYPE_COLUMN)
        .max()
        .unwrap_or(0)
        .max(MIN_TYPE_COLUMN);
    for (left, ty) in &lines {
        let _ = writeln!(out, "  {left:<column$} : {ty}");
    }
    let returned: Vec<String> = k
        .output_nodes()
        .iter()
        .map(|o| format!("%{}", o.index()))
        .collect();
    let _ = writeln!(out, "  return {}", returned.join(", "));
    out
}

/// `matmul %0, %3`, `softmax %5, axis=2`, `input q #0`, `const 0.125`.
fn instruction(op: &Op, operands: &[NodeId]) -> String {
    let mnemonic = match op {
        Op::Input { .. } => "input".to_string(),
        Op::Const(_) => "const".to_string(),
        Op::DimValue(_) => "dim".to_string(),
        Op::Fill { .. } => "fill".to_string(),
        Op::RelPos => "relpos".to_string(),
        Op::Unary(u) => u.to_string(),
        Op::Binary(b) => b.to_string(),
        Op::MatMul => "matmul".to_string(),
        Op::Transpose => "transpose".to_string(),
        Op::Reduce { op, .. } => op.to_string(),
        Op::Softmax { .. } => "softmax".to_string(),
        Op::SoftmaxSink => "softmax-sink".to_string(),
        Op::Pool { op, .. } => op.name().to_string(),
        Op::Cumsum { .. } => "cumsum".to_string(),
        Op::Mask { .. } => "mask".to_string(),
        Op::Cast { .. } => "cast".to_string(),
        Op::Random { .. } => "random".to_string(),
        Op::Attention(_) => "attention".to_string(),
        Op::LinearAttention(_) => "linear-attention".to_string(),
        Op::Backward(b) => crate::backward::mnemonic(b).to_string(),
    };
    let mut args: Vec<String> = operands.iter().map(|o| format!("%{}", o.index())).collect();
    match op {
        Op::Input { index, name } => args.push(format!("{name} #{index}")),
        Op::Const(v) | Op::Fill { value: v } => args.push(format!("{v:?}")),
        Op::DimValue(d) => args.push(d.to_string()),
        Op::Reduce { axis, .. } | Op::Softmax { axis } | Op::Cumsum { axis } => {
            args.push(format!("axis={axis}"))
        }
        Op::Pool { size, .. } => args.push(format!("size={size}")),
        Op::Mask { pattern, fill } => {
            args.push(pattern.to_string());
            args.push(format!("fill={fill:?}"));
        }
        Op::Cast { to } => args.push(format!("to={}", to.keyword())),
        Op::Random { kind, seed } => {
            args.push(kind.name().to_string());
            args.push(format!("seed={seed}"));
        }
        Op::Attention(a) => args.push(a.to_string()),
        Op::LinearAttention(l) => args.push(l.to_string()),
        Op::Backward(b) => args.extend(crate::backward::attributes(b)),
        _ => {}
    }
    match op {
        // Attributes of nullary ops read as one phrase: `input q #0`, `const 0.125`.
        Op::Input { .. } | Op::Const(_) | Op::DimValue(_) | Op::Fill { .. } | Op::Random { .. } => {
            format!("{mnemonic} {}", args.join(" "))
        }
        _ if args.is_empty() => mnemonic,
        _ => format!("{mnemonic} {}", args.join(", ")),
    }
}
