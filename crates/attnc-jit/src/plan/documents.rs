//! Which data-dependent masks (`document(...)` and `topk_blocks(...)`, masks that read segment
//! operands) the planner compiles.

use super::PlanOptions;
use crate::error::{JitError, Result};
use attnc_ir::{Kernel, Op};

/// Masks that read segment ids (`document(...)`) or a block selection compile only inside a
/// fused exact attention, on the AVX-512 tier or, without it, the portable one (both build
/// their tile table from the data per call); anything else that reads them (a plain mask, a
/// fused gradient) is refused here, with a message pointing at the interpreter, before any
/// kernel could read an i32 buffer.
pub(super) fn refuse_segments(kernel: &Kernel, options: &PlanOptions) -> Result<()> {
    let graph = &kernel.graph;
    for id in graph.topo_order() {
        let op = &graph.node(id).op;
        let why = match op {
            Op::Attention(a) if a.segments() > 0 => {
                if !options.fuse {
                    Some("fused attention is off")
                } else if a.precision != attnc_ir::Precision::Exact {
                    Some("it runs with approximate products")
                } else {
                    None
                }
            }
            Op::Mask { pattern, .. } if !pattern.is_static() => {
                Some("only a mask fused into an attention reads segment ids")
            }
            _ => None,
        };
        if let Some(why) = why {
            return Err(JitError::Plan {
                op: op.to_string(),
                detail: format!(
                    "document(...) and topk_blocks(...) masks compile only fused into an exact attention ({why}); run with --engine interp"
                ),
            });
        }
    }
    Ok(())
}
