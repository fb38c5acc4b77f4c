//! What the chosen form fuses, and why an attention stayed unfused: for the report, so that
//! `explain` says which operand or score term blocked a fusion instead of leaving the user to
//! find an `n × n` buffer in the plan.
//!
//! Every fused op of the chosen kernel is listed. Every `softmax(x) @ v` left in plain form is
//! diagnosed by walking `x` the way the fusion rules read a score: `-inf` masks, then an
//! elementwise tree over one product `q @ kᵀ`. The first thing the walk cannot read is the
//! reason.

use attnc_ir::{Kernel, NodeId, Op};
use serde::Serialize;

/// One attention of the chosen form.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FusionNote {
    /// The node (IR index in the chosen form).
    pub node: usize,
    /// Whether it runs as one fused kernel.
    pub fused: bool,
    /// What it is, or why it is not fused.
    pub detail: String,
}

impl std::fmt::Display for FusionNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.fused { "fused" } else { "not fused" };
        write!(f, "%{}: {verdict}: {}", self.node, self.detail)
    }
}

/// The fusion notes of `kernel` (the optimizer's chosen form).
pub fn notes(kernel: &Kernel) -> Vec<FusionNote> {
    let graph = &kernel.graph;
    let mut notes = Vec::new();
    for id in graph.topo_order() {
        let node = graph.node(id);
        match &node.op {
            Op::Attention(a) => notes.push(FusionNote {
                node: id.index(),
                fused: true,
                detail: format!("attention {a}"),
            }),
            Op::LinearAttention(l) => notes.push(FusionNote {
                node: id.index(),
                fused: true,
                detail: format!("linear attention {l}"),
            }),
            Op::MatMul => {
                let ops = graph.operands(id);
                let Some(&p) = ops.first() else { continue };
                let Op::Softmax { axis } = graph.node(p).op else {
                    continue;
                };
                let detail = match why_unfused(kernel, p, axis) {
                    Some(why) => why,
                    None => "the fused form was not cheaper, or saturation stopped before \
                             reaching it"
                        .to_string(),
                };
                notes.push(FusionNote {
                    node: id.index(),
                    fused: false,
                    detail: format!("softmax %{} @ %{}: {detail}", p.index(), ops[1].index()),
                });
            }
            _ => {}
        }
    }
    notes
}

/// The first part of `softmax(x)` (node `p`) that no fusion rule reads, described.
fn why_unfused(kernel: &Kernel, p: NodeId, axis: usize) -> Option<String> {
    let graph = &kernel.graph;
    let rank = graph.node(p).shape.len();
    if axis + 1 != rank {
        return Some(format!(
            "the softmax runs over axis {axis}, not the last (the keys)"
        ));
    }
    let mut x = *graph.operands(p).first()?;
    while let Op::Mask { fill, .. } = graph.node(x).op {
        if fill != f64::NEG_INFINITY {
            return Some(format!(
                "mask %{} fills with {fill}, not -inf: the tiles a fused kernel skips would \
                 each contribute exp({fill} - max)",
                x.index()
            ));
        }
        x = *graph.operands(x).first()?;
    }
    // An elementwise tree over one product q @ kᵀ.
    let mut products = Vec::new();
    let mut stack = vec![(x, 0usize)];
    while let Some((id, depth)) = stack.pop() {
        if depth > attnc_ir::fused::MAX_SCORE_DEPTH {
            return Some("the score is deeper than a fused kernel evaluates".to_string());
        }
        let node = graph.node(id);
        match &node.op {
            Op::MatMul => {
                let ops = graph.operands(id);
                match ops.get(1).map(|&t| &graph.node(t).op) {
                    Some(Op::Transpose) => products.push(id),
                    _ => {
                        return Some(format!(
                            "the score's product %{} is not `q @ k.T` (its right operand is \
                             not a transpose)",
                            id.index()
                        ))
                    }
                }
            }
            Op::Unary(_) | Op::Binary(_) => {
                stack.extend(graph.operands(id).into_iter().map(|o| (o, depth + 1)));
            }
            Op::Mask { fill, .. } => {
                return Some(format!(
                    "mask %{} (fill {fill}) sits inside the score, behind an operation that \
                     does not keep -inf as -inf (only positive scales and finite shifts do)",
                    id.index()
                ));
            }
            Op::Input { .. }
            | Op::Const(_)
            | Op::DimValue(_)
            | Op::Fill { .. }
            | Op::RelPos
            | Op::Random { .. } => {}
            other => {
                return Some(format!(
                    "score term %{} ({other}) is not elementwise; a fused kernel evaluates \
                     the score tile by tile",
                    id.index()
                ))
            }
        }
    }
    match products.len() {
        0 => Some("the score contains no product q @ k.T".to_string()),
        1 => None,
        n => Some(format!(
            "the score combines {n} products (%{}); a fused kernel computes one q @ k.T",
            products
                .iter()
                .map(|p| p.index().to_string())
                .collect::<Vec<_>>()
                .join(", %")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(src: &str) -> Kernel {
        let (file, diags) = attnc_syntax::parse(src);
        assert!(diags.is_empty(), "{diags:?}");
        let module = attnc_ir::lower::lower_file(&file).expect("valid");
        module.kernels.into_iter().next().expect("one kernel")
    }

    fn reason(src: &str) -> String {
        let notes = notes(&kernel(src));
        let unfused: Vec<&FusionNote> = notes.iter().filter(|n| !n.fused).collect();
        assert_eq!(unfused.len(), 1, "{notes:?}");
        unfused[0].detail.clone()
    }

    #[test]
    fn each_blocker_is_named() {
        let head =
            "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d], w: f32[d, n]) -> f32[m, d] {";
        let fill = reason(&format!(
            "{head} return softmax(mask(q @ k.T, causal, -1000)) @ v; }}"
        ));
        assert!(fill.contains("fills with -1000"), "{fill}");
        let axis = reason(&format!("{head} return softmax(q @ k.T, 0) @ v; }}"));
        assert!(axis.contains("axis 0"), "{axis}");
        let product = reason(&format!("{head} return softmax(q @ w) @ v; }}"));
        assert!(product.contains("not a transpose"), "{product}");
        let reduce = reason(&format!(
            "{head} return softmax(q @ k.T - max(q @ k.T, 0)) @ v; }}"
        ));
        assert!(reduce.contains("not elementwise"), "{reduce}");
        let negated = reason(&format!(
            "{head} return softmax(-mask(q @ k.T, causal)) @ v; }}"
        ));
        assert!(negated.contains("inside the score"), "{negated}");
    }
}
