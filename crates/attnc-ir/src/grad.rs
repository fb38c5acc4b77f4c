//! Reverse-mode differentiation on the IR: the vector-Jacobian product of a kernel as an
//! ordinary IR graph.
//!
//! [`vjp`] takes a kernel and the parameters to differentiate with respect to, and returns a
//! [`Vjp`]: the forward graph followed by gradient nodes, over the kernel's parameters plus
//! one cotangent per output (the gradient of that output, of its shape; a kernel returning
//! `(a, b)` is differentiated as `Σ ⟨cotangent_a, a⟩ + ⟨cotangent_b, b⟩`). Every
//! requested parameter gets one gradient node of its own shape; [`Vjp::kernel`] turns each
//! into a single-output [`Kernel`] that the interpreter evaluates and the planner compiles
//! like any other.
//!
//! The sweep visits nodes from the output back to the parameters (index order reversed is a
//! reverse topological order) and applies one rule per node (`grad/rules.rs`); only nodes
//! that depend on a requested parameter and reach the output take part. Contributions of
//! several users add up. Broadcasting is undone by summing ([`crate::backward::BackwardOp::SumTo`]):
//! a key shared by the heads of grouped-query attention gets the sum over those heads.
//!
//! - Masks give masked entries a zero gradient (`mask(g, p, 0)`); a fully masked softmax row is
//!   all zeros and so is its gradient. NaN follows the forward: a NaN that reaches the output
//!   reaches the gradients it touches.
//! - `maximum`, `minimum` and `max` split a tie evenly; `relu` and `abs` have derivative 0 at 0.
//! - Rounding to a storage type (`cast`, f16/bf16 returns) passes gradients straight through.
//! - Fused ops get fused gradients: a fused attention's operands get
//!   [`crate::backward::BackwardOp::Attention`] nodes (FlashAttention-2's recomputation from
//!   the forward output), a linear attention's [`crate::backward::BackwardOp::Linear`] nodes.
//!   Differentiating the optimizer's fused form therefore keeps the backward free of `m × n`
//!   values wherever the forward is.
//!
//! ```
//! use attnc_ir::grad::vjp;
//! let (file, _) = attnc_syntax::parse(
//!     "kernel f(x: f32[n], w: f32[n]) -> f32[n] { return exp(x) * w; }",
//! );
//! let module = attnc_ir::lower::lower_file(&file).expect("checks");
//! let kernel = &module.kernels[0];
//! let grads = vjp(kernel, &[0]).expect("differentiates");
//! assert_eq!(grads.params.last().map(|p| p.name.as_str()), Some("cotangent"));
//! let dx = grads.kernel(0);
//! assert_eq!(dx.name, "f_grad_x");
//! ```

mod derivation;
mod emit;
mod rules;

pub use derivation::DerivationStep;

use crate::build::GraphBuilder;
use crate::graph::{Graph, Kernel, NodeId, Param};
use crate::op::{DType, Op};
use attnc_syntax::Span;
use emit::Emitter;

/// Why a gradient graph could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GradError {
    /// A requested parameter does not exist.
    #[error("kernel `{kernel}` has no parameter `{name}` (parameters: {params})")]
    UnknownParam {
        /// The kernel's name.
        kernel: String,
        /// The name asked for.
        name: String,
        /// The kernel's parameters, comma separated.
        params: String,
    },
    /// A parameter is listed twice.
    #[error("parameter `{name}` is listed twice")]
    Duplicate {
        /// Its name.
        name: String,
    },
    /// No parameter was asked for.
    #[error("no parameter to differentiate with respect to")]
    Empty,
    /// The graph holds an op whose gradient is not derived.
    #[error("cannot differentiate {op}: {why}")]
    Unsupported {
        /// The op, printed.
        op: String,
        /// Why.
        why: String,
    },
    /// A rule built an ill-shaped node (a bug in the rule or an ill-formed input graph).
    #[error("internal error: the gradient of node %{node} ({op}): {detail}")]
    Build {
        /// The forward node whose rule failed.
        node: usize,
        /// The op being added.
        op: String,
        /// What did not fit.
        detail: String,
    },
}

/// One requested gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradient {
    /// The parameter's index in the forward kernel.
    pub param: usize,
    /// Its name.
    pub name: String,
    /// The node holding the gradient (the parameter's shape).
    pub node: NodeId,
}

/// The vector-Jacobian product of a kernel (see the module docs).
#[derive(Clone, Debug)]
pub struct Vjp {
    /// The forward kernel's name.
    pub name: String,
    /// The forward kernel's parameters followed by one cotangent per output.
    pub params: Vec<Param>,
    /// The forward nodes (same ids as in the forward kernel), then the gradient nodes.
    pub graph: Graph,
    /// The forward output (the first, for a kernel with several).
    pub output: NodeId,
    /// Every forward output, in order (one cotangent each).
    pub forward_outputs: Vec<NodeId>,
    /// The requested gradients, in the order asked.
    pub gradients: Vec<Gradient>,
    /// The rules applied, from the output back.
    pub derivation: Vec<DerivationStep>,
}

impl Vjp {
    /// The first output's cotangent: its parameter index.
    pub fn cotangent(&self) -> usize {
        self.params.len() - self.forward_outputs.len()
    }

    /// The kernel of node `output` of the graph (a gradient, or the forward output), over
    /// every parameter and the cotangent.
    pub fn kernel_of(&self, name: String, output: NodeId) -> Kernel {
        Kernel {
            name,
            params: self.params.clone(),
            graph: self.graph.clone(),
            output,
            ret_dtype: DType::F32,
            extra_outputs: Vec::new(),
            approx: Vec::new(),
            span: Span::default(),
        }
    }

    /// The whole gradient graph as one kernel named `<kernel>_grad` (its output is the
    /// first gradient; [`Vjp::outputs`] lists them all).
    pub fn combined(&self) -> Kernel {
        let first = self.gradients.first().map_or(self.output, |g| g.node);
        self.kernel_of(format!("{}_grad", self.name), first)
    }

    /// Gradient `index` as an ordinary kernel named `<kernel>_grad_<param>`.
    pub fn kernel(&self, index: usize) -> Kernel {
        let g = &self.gradients[index];
        self.kernel_of(format!("{}_grad_{}", self.name, g.name), g.node)
    }

    /// The gradient nodes, in the order asked.
    pub fn outputs(&self) -> Vec<NodeId> {
        self.gradients.iter().map(|g| g.node).collect()
    }
}

/// The parameter indices of a comma-separated list of names (`q,k,v`), in the order given.
pub fn parse_wrt(kernel: &Kernel, list: &str) -> Result<Vec<usize>, GradError> {
    let mut out: Vec<usize> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let index = kernel
            .params
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| GradError::UnknownParam {
                kernel: kernel.name.clone(),
                name: name.to_string(),
                params: kernel
                    .params
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if out.contains(&index) {
            return Err(GradError::Duplicate {
                name: name.to_string(),
            });
        }
        out.push(index);
    }
    if out.is_empty() {
        return Err(GradError::Empty);
    }
    Ok(out)
}

/// The names of `count` cotangent parameters: `cotangent` for one output, `cotangent_0`,
/// `cotangent_1`, … for several; a name a parameter already has gets a `_N` suffix until it
/// is free.
fn cotangent_names(params: &[Param], count: usize) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(count);
    for k in 0..count {
        let base = match count {
            1 => "cotangent".to_string(),
            _ => format!("cotangent_{k}"),
        };
        let taken =
            |name: &str| params.iter().any(|p| p.name == name) || names.contains(&name.to_string());
        let mut name = base.clone();
        let mut n = 1;
        while taken(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        names.push(name);
    }
    names
}

/// Backpropagates the seeds `(output, its gradient)` through the graph of `e` to the nodes
/// marked in `sources` (indexed by node, covering at least every output): the gradient of
/// every node (None where no output depends on it through a source) and the rules applied.
/// Rules are applied from the last output back, to nodes that depend on a source and reach
/// an output; a source's own rule is not applied (its operands are not differentiated).
/// Seeds of one node (an output returned twice) add up.
fn backprop(
    e: &mut Emitter,
    seeds: &[(NodeId, NodeId)],
    sources: &[bool],
) -> Result<(Vec<Option<NodeId>>, Vec<DerivationStep>), GradError> {
    let count = seeds.iter().map(|(o, _)| o.index() + 1).max().unwrap_or(0);
    let graph = &e.b.graph;
    let operands: Vec<Vec<NodeId>> = (0..count).map(|i| graph.operands(NodeId::new(i))).collect();
    // A node takes part when it depends on a source and the output depends on it.
    let mut depends = vec![false; count];
    for index in 0..count {
        depends[index] = sources.get(index).copied().unwrap_or(false)
            || operands[index].iter().any(|o| depends[o.index()]);
    }
    let mut reaches = vec![false; count];
    for (output, _) in seeds {
        reaches[output.index()] = true;
    }
    for index in (0..count).rev() {
        if reaches[index] {
            for o in &operands[index] {
                reaches[o.index()] = true;
            }
        }
    }
    let needs: Vec<bool> = (0..count).map(|i| depends[i] && reaches[i]).collect();
    // A fused attention and its log-sum-exp partner get one backward (D = rowsum(dO ∘ o) −
    // dlse): the later node waits, and the earlier one's rule takes both gradients (the
    // later one's is complete by then, every user of it lying after it).
    let partners: Vec<Option<NodeId>> = (0..count)
        .map(|i| rules::lse_partner(graph, NodeId::new(i)).filter(|p| needs[p.index()]))
        .collect();
    let mut grads: Vec<Option<NodeId>> = vec![None; count];
    for &(output, seed) in seeds {
        let slot = &mut grads[output.index()];
        *slot = Some(match *slot {
            Some(sum) => e.add(sum, seed)?,
            None => seed,
        });
    }
    let mut derivation = Vec::new();
    for index in (0..count).rev() {
        if !needs[index] || sources.get(index).copied().unwrap_or(false) {
            continue;
        }
        let partner = partners[index];
        if partner.is_some_and(|p| p.index() < index) {
            continue;
        }
        let own = grads[index].map(|g| (NodeId::new(index), g));
        let later = partner.and_then(|p| grads[p.index()].map(|g| (p, g)));
        let ((id, g), applied) = match (own, later) {
            (Some(own), Some(later)) => (own, rules::apply_paired(e, own, later, &needs)?),
            (Some((id, g)), None) | (None, Some((id, g))) => {
                ((id, g), rules::apply(e, id, g, &needs)?)
            }
            (None, None) => continue,
        };
        for &(operand, contribution) in &applied.contributions {
            let slot = &mut grads[operand.index()];
            *slot = Some(match *slot {
                Some(sum) => e.add(sum, contribution)?,
                None => contribution,
            });
        }
        derivation.push(DerivationStep {
            node: id,
            op: e.b.graph.node(id).op.to_string(),
            rule: applied.rule,
            gradient: g,
            contributions: applied.contributions,
        });
    }
    e.at = None;
    Ok((grads, derivation))
}

/// The gradient of `source` through `output` for the seed gradient `seed`, added to `b`
/// (zeros of `source`'s shape when the output does not depend on it). For writing fused
/// gradient ops out as plain IR.
pub(crate) fn gradient_of(
    b: &mut GraphBuilder,
    output: NodeId,
    seed: NodeId,
    source: NodeId,
) -> Result<NodeId, GradError> {
    let mut e = Emitter {
        b: std::mem::take(b),
        at: None,
    };
    let mut sources = vec![false; e.b.graph.len()];
    sources[source.index()] = true;
    let result = backprop(&mut e, &[(output, seed)], &sources).and_then(|(grads, _)| {
        match grads.get(source.index()).copied().flatten() {
            Some(g) => Ok(g),
            None => {
                let shape = e.shape(source);
                e.fill(0.0, &shape)
            }
        }
    });
    *b = e.b;
    result
}

/// The vector-Jacobian product of `kernel` with respect to the parameters `wrt` (indices).
pub fn vjp(kernel: &Kernel, wrt: &[usize]) -> Result<Vjp, GradError> {
    if wrt.is_empty() {
        return Err(GradError::Empty);
    }
    for (k, &p) in wrt.iter().enumerate() {
        let param = kernel
            .params
            .get(p)
            .ok_or_else(|| GradError::UnknownParam {
                kernel: kernel.name.clone(),
                name: format!("#{p}"),
                params: kernel.params.len().to_string(),
            })?;
        if wrt[..k].contains(&p) {
            return Err(GradError::Duplicate {
                name: param.name.clone(),
            });
        }
    }
    let forward = &kernel.graph;
    let count = forward.len();
    let outputs = kernel.output_nodes();
    if let Some(bad) = outputs.iter().find(|o| o.index() >= count) {
        return Err(GradError::Build {
            node: bad.index(),
            op: "output".to_string(),
            detail: format!("not a node of the {count}-node graph"),
        });
    }
    let sources: Vec<bool> = (0..count)
        .map(|i| matches!(&forward.node(NodeId::new(i)).op, Op::Input { index, .. } if wrt.contains(index)))
        .collect();
    let mut params = kernel.params.clone();
    let mut e = Emitter {
        b: GraphBuilder {
            graph: forward.clone(),
        },
        at: None,
    };
    let names = cotangent_names(&params, outputs.len());
    let mut seeds = Vec::with_capacity(outputs.len());
    for (&output, name) in outputs.iter().zip(names) {
        let cotangent = Param {
            name,
            dtype: DType::F32,
            shape: forward.node(output).shape.clone(),
            span: Span::default(),
        };
        let seed = e.b.add_node(
            Op::Input {
                index: params.len(),
                name: cotangent.name.clone(),
            },
            cotangent.shape.clone(),
            DType::F32,
            &[],
        );
        params.push(cotangent);
        seeds.push((output, seed));
    }
    let (grads, derivation) = backprop(&mut e, &seeds, &sources)?;

    e.at = None;
    let mut gradients = Vec::with_capacity(wrt.len());
    for &p in wrt {
        // The parameter's input nodes (lowering makes one; built graphs may hold several).
        let mut total: Option<NodeId> = None;
        for index in 0..count {
            let is_param = matches!(forward.node(NodeId::new(index)).op,
                Op::Input { index: q, .. } if q == p);
            if let (true, Some(g)) = (is_param, grads.get(index).copied().flatten()) {
                total = Some(match total {
                    Some(t) => e.add(t, g)?,
                    None => g,
                });
            }
        }
        let node = match total {
            Some(t) => t,
            // The output does not depend on the parameter: its gradient is zero.
            None => e.fill(0.0, &kernel.params[p].shape)?,
        };
        gradients.push(Gradient {
            param: p,
            name: kernel.params[p].name.clone(),
            node,
        });
    }
    Ok(Vjp {
        name: kernel.name.clone(),
        params,
        graph: e.b.graph,
        output: kernel.output,
        forward_outputs: outputs,
        gradients,
        derivation,
    })
}
