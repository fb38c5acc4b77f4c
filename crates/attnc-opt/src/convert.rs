//! IR ⇄ `RecExpr`: [`to_recexpr`] turns a kernel's graph into an expression of the e-graph
//! language, [`to_kernel`] turns an extracted expression back into a fresh IR kernel with
//! recomputed symbolic shapes. Fused kernel-form nodes map one to one to the IR's fused ops
//! ([`attnc_ir::fused`]): what the optimizer chooses is what the planner runs.
//!
//! Both directions walk nodes in topological order; only mask patterns and score expressions
//! (bounded depth) are converted recursively.

mod lse;
mod pinv;
mod to_ir;

pub use to_ir::to_kernel;

use crate::analysis::AttnGraph;
use crate::lang::{Atom, Attn};
use crate::OptError;
use attnc_ir::{
    BinaryOp, Decay, Dim, Kernel, MaskPattern, NodeId, Normalizer, Op, PoolOp, Precision, ReduceOp,
    ScoreExpr, SymbolicPattern, UnaryOp,
};
use egg::{Id, RecExpr, Symbol};
use std::collections::HashMap;

/// Converts the graph of `kernel` to an expression whose root is the kernel's output, or an
/// `outputs` node listing them for a kernel with several (one e-graph, so shared subterms
/// such as the scores are chosen once for all of them).
pub fn to_recexpr(kernel: &Kernel) -> Result<RecExpr<Attn>, OptError> {
    let mut expr = RecExpr::default();
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    for node_id in kernel.graph.topo_order() {
        let operands: Vec<Id> = kernel
            .graph
            .operands(node_id)
            .iter()
            .map(|o| {
                ids.get(o)
                    .copied()
                    .ok_or(OptError::Malformed(node_id.index()))
            })
            .collect::<Result<_, _>>()?;
        let id = add_op(&mut expr, kernel, node_id, &operands)
            .ok_or(OptError::Malformed(node_id.index()))?;
        ids.insert(node_id, id);
    }
    let outputs = kernel
        .output_nodes()
        .iter()
        .map(|o| ids.get(o).copied().ok_or(OptError::Malformed(o.index())))
        .collect::<Result<Vec<Id>, _>>()?;
    if outputs.len() > 1 {
        expr.add(Attn::Outputs(outputs.into_boxed_slice()));
        return Ok(expr);
    }
    // The output must be the root (the last node): re-add it when it is not already last.
    let root = ids[&kernel.output];
    if usize::from(root) + 1 != expr.as_ref().len() {
        let node = expr[root].clone();
        expr.add(node);
    }
    Ok(expr)
}

/// Adds a leaf atom.
fn leaf(expr: &mut RecExpr<Attn>, atom: Atom) -> Id {
    expr.add(Attn::Leaf(atom))
}

/// Adds a dimension as an atom: a name for a symbol, a number for a literal size. A pooled
/// size (`ceil(n/b)`) is not an atom: the shapes that hold one are recomputed, never spelled.
fn dim_leaf(expr: &mut RecExpr<Attn>, dim: &Dim) -> Option<Id> {
    Some(match dim {
        Dim::Sym(s) => leaf(expr, Atom::Name(Symbol::from(s.as_str()))),
        Dim::Const(c) => leaf(expr, Atom::num(*c as f64)),
        Dim::CeilDiv(..) => return None,
    })
}

/// Adds a mask pattern tree (`all` for none); sizes are numbers or dimension names, and a
/// document's children are its segment operands (`segments`, the node's ids of them). `None`
/// for a pattern the language does not spell.
fn add_pattern(
    expr: &mut RecExpr<Attn>,
    pattern: Option<&SymbolicPattern>,
    segments: &[Id],
) -> Option<Id> {
    let node = match pattern {
        None => Attn::All,
        Some(MaskPattern::Causal) => Attn::Causal,
        Some(MaskPattern::Window(w)) => Attn::Window(dim_leaf(expr, w)?),
        Some(MaskPattern::Dilated { w, r }) => {
            Attn::Dilated([dim_leaf(expr, w)?, dim_leaf(expr, r)?])
        }
        Some(MaskPattern::Global(g)) => Attn::Global(dim_leaf(expr, g)?),
        Some(MaskPattern::Block(b)) => Attn::Block(dim_leaf(expr, b)?),
        Some(MaskPattern::Document { q, k }) => {
            Attn::Document([*segments.get(*q)?, *segments.get(*k)?])
        }
        Some(MaskPattern::TopkBlocks { g, k, b }) => Attn::TopkBlocks([
            *segments.get(*g)?,
            // Beyond 2^52 blocks every k selects all: clamp so the number stays exact.
            leaf(expr, Atom::num((*k).min(1 << 52) as f64)),
            leaf(expr, Atom::num(*b as f64)),
        ]),
        Some(MaskPattern::And(a, b)) => Attn::And([
            add_pattern(expr, Some(a), segments)?,
            add_pattern(expr, Some(b), segments)?,
        ]),
        Some(MaskPattern::Or(a, b)) => Attn::Or([
            add_pattern(expr, Some(a), segments)?,
            add_pattern(expr, Some(b), segments)?,
        ]),
    };
    Some(expr.add(node))
}

/// The e-node of an elementwise unary op.
fn unary_node(u: UnaryOp, x: Id) -> Attn {
    match u {
        UnaryOp::Neg => Attn::Neg(x),
        UnaryOp::Exp => Attn::Exp(x),
        UnaryOp::Log => Attn::Log(x),
        UnaryOp::Sqrt => Attn::Sqrt(x),
        UnaryOp::Rsqrt => Attn::Rsqrt(x),
        UnaryOp::Tanh => Attn::Tanh(x),
        UnaryOp::Sigmoid => Attn::Sigmoid(x),
        UnaryOp::Relu => Attn::Relu(x),
        UnaryOp::Elu => Attn::Elu(x),
        UnaryOp::Abs => Attn::Abs(x),
    }
}

/// The e-node of an elementwise binary op.
fn binary_node(b: BinaryOp, pair: [Id; 2]) -> Attn {
    match b {
        BinaryOp::Add => Attn::Add(pair),
        BinaryOp::Sub => Attn::Sub(pair),
        BinaryOp::Mul => Attn::Mul(pair),
        BinaryOp::Div => Attn::Div(pair),
        BinaryOp::Max => Attn::Maximum(pair),
        BinaryOp::Min => Attn::Minimum(pair),
    }
}

/// Adds node `id` of `kernel` over already converted operands; `None` on an arity mismatch.
fn add_op(expr: &mut RecExpr<Attn>, kernel: &Kernel, id: NodeId, args: &[Id]) -> Option<Id> {
    let node = kernel.graph.node(id);
    let shape = &node.shape;
    let one = |i: usize| args.get(i).copied();
    let node = match &node.op {
        Op::Input { name, .. } => Attn::Input(leaf(expr, Atom::Name(Symbol::from(name.as_str())))),
        Op::Const(v) => Attn::Const(leaf(expr, Atom::num(*v))),
        Op::DimValue(d) => Attn::DimValue(dim_leaf(expr, d)?),
        Op::Fill { value } => {
            let mut ids = vec![leaf(expr, Atom::num(*value))];
            for d in shape {
                ids.push(dim_leaf(expr, d)?);
            }
            Attn::Fill(ids.into_boxed_slice())
        }
        Op::RelPos => match shape.as_slice() {
            [m, n] => Attn::RelPos([dim_leaf(expr, m)?, dim_leaf(expr, n)?]),
            _ => return None,
        },
        Op::Unary(u) => unary_node(*u, one(0)?),
        Op::Binary(b) => binary_node(*b, [one(0)?, one(1)?]),
        Op::MatMul => Attn::MatMul([one(0)?, one(1)?]),
        Op::Transpose => Attn::Transpose(one(0)?),
        Op::Reduce { op, axis } => {
            let pair = [one(0)?, leaf(expr, Atom::num(*axis as f64))];
            match op {
                ReduceOp::Sum => Attn::Sum(pair),
                ReduceOp::Max => Attn::Max(pair),
                ReduceOp::Mean => Attn::Mean(pair),
                ReduceOp::LogSumExp => Attn::LogSumExp(pair),
            }
        }
        Op::Softmax { axis } => Attn::Softmax([one(0)?, leaf(expr, Atom::num(*axis as f64))]),
        Op::SoftmaxSink => Attn::SoftmaxSink([one(0)?, one(1)?]),
        Op::Pool { op, size } => {
            let pair = [one(0)?, dim_leaf(expr, size)?];
            match op {
                PoolOp::Mean => Attn::MeanPool(pair),
                PoolOp::Max => Attn::MaxPool(pair),
            }
        }
        Op::Cumsum { axis } => Attn::Cumsum([one(0)?, leaf(expr, Atom::num(*axis as f64))]),
        Op::Mask { pattern, fill } => {
            let x = one(0)?;
            let p = add_pattern(expr, Some(pattern), args.get(1..)?)?;
            Attn::Mask([x, p, leaf(expr, Atom::num(*fill))])
        }
        Op::Cast { to } => {
            let name = leaf(expr, Atom::Name(Symbol::from(to.keyword())));
            Attn::Cast([one(0)?, name])
        }
        Op::Random { kind, seed } => match shape.as_slice() {
            [rows, cols] => Attn::Random([
                leaf(expr, Atom::Name(Symbol::from(kind.name()))),
                leaf(expr, Atom::num(*seed as f64)),
                dim_leaf(expr, rows)?,
                dim_leaf(expr, cols)?,
            ]),
            _ => return None,
        },
        // The language spells a log-sum-exp over a plain score only (`attention-lse`).
        Op::Attention(a) if a.lse => return None,
        Op::Attention(a) => return add_attention(expr, kernel, id, a, args),
        // Gradient graphs are planned as derived (from an already optimized forward).
        Op::Backward(_) => return None,
        Op::LinearAttention(l) if l.decay != Decay::None => {
            let [q, k, v, a] = [one(0)?, one(1)?, one(2)?, one(3)?];
            // A gate's keys' log decay (operand 4); a slope has none.
            let keys = if l.decay == Decay::Gate {
                Some(one(4)?)
            } else {
                None
            };
            match (l.normalizer, keys) {
                (Normalizer::None, Some(c)) => Attn::GatedRetention([q, k, v, a, c]),
                (Normalizer::None, None) => Attn::Retention([q, k, v, a]),
                (Normalizer::Sum { eps }, keys) => {
                    let e = leaf(expr, Atom::num(eps));
                    let eps = expr.add(Attn::Const(e));
                    match keys {
                        Some(c) => Attn::GatedRetentionNormalized([q, k, v, a, c, eps]),
                        None => Attn::RetentionNormalized([q, k, v, a, eps]),
                    }
                }
            }
        }
        Op::LinearAttention(l) => {
            let [q, k, v] = [one(0)?, one(1)?, one(2)?];
            match (l.causal, l.normalizer) {
                (false, Normalizer::None) => {
                    let kt = expr.add(Attn::Transpose(k));
                    let state = expr.add(Attn::MatMul([kt, v]));
                    Attn::MatMul([q, state])
                }
                (true, Normalizer::None) => Attn::CausalPrefixProduct([q, k, v]),
                (causal, Normalizer::Sum { eps }) => {
                    let e = leaf(expr, Atom::num(eps));
                    let eps = expr.add(Attn::Const(e));
                    if causal {
                        Attn::LinearAttentionCausal([q, k, v, eps])
                    } else {
                        Attn::LinearAttention([q, k, v, eps])
                    }
                }
            }
        }
    };
    Some(expr.add(node))
}

/// A fused attention op as its e-graph node: `attention` (or `attention-int8`) for a scaled
/// score, else `attention-scored` (wrapped in `int8-products` for int8 precision).
fn add_attention(
    expr: &mut RecExpr<Attn>,
    kernel: &Kernel,
    id: NodeId,
    a: &attnc_ir::Attention,
    args: &[Id],
) -> Option<Id> {
    let (q, k, v) = (*args.first()?, *args.get(1)?, *args.get(2)?);
    let pattern = add_pattern(expr, a.mask.as_ref(), args.get(3 + a.score.biases()..)?)?;
    let scale = match &a.score {
        ScoreExpr::Scores => Some(ScoreExpr::Const(1.0)),
        ScoreExpr::Binary(BinaryOp::Mul, x, c) if **x == ScoreExpr::Scores && is_scalar(c) => {
            Some((**c).clone())
        }
        _ => None,
    };
    if let Some(c) = scale {
        let c = add_score(expr, &c, None, &[], None)?;
        let node = match a.precision {
            Precision::Exact => Attn::Attention([q, k, v, c, pattern]),
            Precision::Int8 => Attn::AttentionInt8([q, k, v, c, pattern]),
            Precision::Bf16 => Attn::AttentionBf16([q, k, v, c, pattern]),
        };
        return Some(expr.add(node));
    }
    let operands = kernel.graph.operands(id);
    let rows = |i: usize| -> Option<Dim> {
        let shape = &kernel.graph.node(*operands.get(i)?).shape;
        shape.get(shape.len().checked_sub(2)?).cloned()
    };
    let relpos = Some((rows(0)?, rows(1)?));
    let kt = expr.add(Attn::Transpose(k));
    let s = expr.add(Attn::MatMul([q, kt]));
    let biases = args.get(3..3 + a.score.biases())?;
    let score = add_score(expr, &a.score, Some(s), biases, relpos)?;
    let fused = expr.add(Attn::AttentionScored([q, k, v, score, pattern]));
    Some(match a.precision {
        Precision::Exact => fused,
        Precision::Int8 => expr.add(Attn::Int8Products(fused)),
        Precision::Bf16 => expr.add(Attn::Bf16Products(fused)),
    })
}

/// Whether a score expression reads no array.
fn is_scalar(e: &ScoreExpr) -> bool {
    let mut scalar = true;
    e.visit(&mut |x| {
        scalar &= !matches!(
            x,
            ScoreExpr::Scores | ScoreExpr::RelPos | ScoreExpr::Bias(_)
        )
    });
    scalar
}

/// Adds a score expression; `s` is the scores' id, `biases` the bias operands' ids, `relpos`
/// the scores' `[m, n]`.
fn add_score(
    expr: &mut RecExpr<Attn>,
    e: &ScoreExpr,
    s: Option<Id>,
    biases: &[Id],
    relpos: Option<(Dim, Dim)>,
) -> Option<Id> {
    let node = match e {
        ScoreExpr::Scores => return s,
        ScoreExpr::Bias(i) => return biases.get(*i).copied(),
        ScoreExpr::Const(c) => Attn::Const(leaf(expr, Atom::num(*c))),
        ScoreExpr::Dim(d) => Attn::DimValue(dim_leaf(expr, d)?),
        ScoreExpr::RelPos => {
            let (m, n) = relpos.clone()?;
            Attn::RelPos([dim_leaf(expr, &m)?, dim_leaf(expr, &n)?])
        }
        ScoreExpr::Unary(u, x) => {
            let x = add_score(expr, x, s, biases, relpos)?;
            unary_node(*u, x)
        }
        ScoreExpr::Binary(b, x, y) => {
            let x = add_score(expr, x, s, biases, relpos.clone())?;
            let y = add_score(expr, y, s, biases, relpos)?;
            binary_node(*b, [x, y])
        }
    };
    Some(expr.add(node))
}

/// A size atom as a dimension: a name is a symbol, a number a size.
fn atom_dim(atom: Option<Atom>) -> Option<Dim> {
    let atom = atom?;
    match (atom.as_name(), atom.as_index()) {
        (Some(name), _) => Some(Dim::Sym(name.to_string())),
        (None, Some(v)) => Some(Dim::Const(v)),
        _ => None,
    }
}

/// Converts a pattern subtree of `expr` back to a [`SymbolicPattern`]; `None` for `all`.
/// The segment operands a document reads are appended to `segments` (once each), and the
/// pattern indexes them there.
pub(crate) fn pattern_of(
    expr: &RecExpr<Attn>,
    id: Id,
    segments: &mut Vec<Id>,
) -> Result<Option<SymbolicPattern>, OptError> {
    let found = std::cell::RefCell::new(std::mem::take(segments));
    let result = pattern_in(expr, id, &found);
    *segments = found.into_inner();
    result.ok_or_else(|| OptError::Extracted(format!("not a mask pattern: {}", expr[id])))
}

fn pattern_in(
    expr: &RecExpr<Attn>,
    id: Id,
    found: &std::cell::RefCell<Vec<Id>>,
) -> Option<Option<SymbolicPattern>> {
    let num = |i: Id| atom_dim(expr[i].atom());
    let sub = |i: Id| pattern_in(expr, i, found).flatten();
    let segment = |i: Id| {
        let mut found = found.borrow_mut();
        Some(match found.iter().position(|&s| s == i) {
            Some(k) => k,
            None => {
                found.push(i);
                found.len() - 1
            }
        })
    };
    pattern_node(&expr[id], num, sub, segment)
}

/// The mask pattern an e-class of `egraph` describes (its first pattern node, recursively);
/// `Some(None)` for `all`, `None` when the class is not a pattern.
pub fn pattern_from_class(egraph: &AttnGraph, id: Id) -> Option<Option<SymbolicPattern>> {
    let node = egraph[id].nodes.iter().find(|n| n.is_pattern())?;
    let num = |i: Id| atom_dim(egraph[i].data.atom);
    let sub = |i: Id| pattern_from_class(egraph, i).flatten();
    // The cost model reads positions only; which operand a document reads does not matter.
    let segment = |_: Id| Some(0);
    pattern_node(node, num, sub, segment)
}

/// The one mapping from pattern nodes to [`MaskPattern`], shared by extracted terms and e-classes:
/// `num` reads a size child, `sub` converts an operand of `&`/`|` (`None` for `all` or a
/// malformed operand). `Some(None)` for `all`; `None` when `node` is not a well-formed pattern.
fn pattern_node(
    node: &Attn,
    num: impl Fn(Id) -> Option<Dim>,
    sub: impl Fn(Id) -> Option<SymbolicPattern>,
    segment: impl Fn(Id) -> Option<usize>,
) -> Option<Option<SymbolicPattern>> {
    let pair = |a: Id, b: Id| Some((Box::new(sub(a)?), Box::new(sub(b)?)));
    Some(Some(match *node {
        Attn::All => return Some(None),
        Attn::Causal => MaskPattern::Causal,
        Attn::Window(w) => MaskPattern::Window(num(w)?),
        Attn::Dilated([w, r]) => MaskPattern::Dilated {
            w: num(w)?,
            r: num(r)?,
        },
        Attn::Global(g) => MaskPattern::Global(num(g)?),
        Attn::Block(b) => MaskPattern::Block(num(b)?),
        Attn::Document([q, k]) => {
            // `document(seg)` has one array at both ends: one operand, queries aligned (the
            // same array twice as `document(s, s)` needs m = n, where both read alike).
            MaskPattern::Document {
                q: segment(q)?,
                k: segment(k)?,
            }
        }
        Attn::TopkBlocks([g, k, b]) => {
            let count = |i: Id| match num(i)? {
                Dim::Const(c) => Some(c),
                _ => None,
            };
            MaskPattern::TopkBlocks {
                g: segment(g)?,
                k: count(k)?,
                b: count(b)?,
            }
        }
        Attn::And([a, b]) => {
            let (a, b) = pair(a, b)?;
            MaskPattern::And(a, b)
        }
        Attn::Or([a, b]) => {
            let (a, b) = pair(a, b)?;
            MaskPattern::Or(a, b)
        }
        _ => return None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_ir::print::print_kernel;

    fn kernel(src: &str) -> Kernel {
        let (file, diags) = attnc_syntax::parse(src);
        assert!(diags.is_empty(), "{diags:?}");
        let module = attnc_ir::lower::lower_file(&file).expect("valid");
        module.kernels.into_iter().next().expect("one kernel")
    }

    fn none() -> attnc_ir::Bindings {
        attnc_ir::Bindings::new()
    }

    #[test]
    fn round_trip_keeps_the_program() {
        let k = kernel(
            "kernel f(q: f32[h, n, d], k: f32[h, n, d]) -> f16[h, n, n] {\n\
             return softmax(mask(q @ k.T / sqrt(d), causal & window(4)) + ones(n, n)); }",
        );
        let expr = to_recexpr(&k).expect("converts");
        let back = to_kernel(&expr, &k, &none()).expect("converts back");
        assert_eq!(print_kernel(&back), print_kernel(&k));
    }

    #[test]
    fn scored_attention_becomes_one_fused_op_or_is_refused() {
        let k = kernel(
            "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d], b: f32[n, n]) -> f32[n, d] { return q; }",
        );
        let fused = "(attention-scored (input q) (input k) (input v) \
                     (add (matmul (input q) (transpose (input k))) (input b)) causal)";
        let expr: RecExpr<Attn> = fused.parse().expect("valid");
        let back = to_kernel(&expr, &k, &none()).expect("converts back");
        let Op::Attention(a) = &back.graph.node(back.output).op else {
            panic!("not fused: {}", print_kernel(&back));
        };
        assert_eq!(a.to_string(), "score=(add s b0), mask=causal");
        assert_eq!(back.graph.operands(back.output).len(), 4);
        // A score without q kᵀ, or a softmax inside it: not a fused attention.
        for score in [
            "(input b)",
            "(softmax (matmul (input q) (transpose (input k))) 1)",
        ] {
            let text = format!("(attention-scored (input q) (input k) (input v) {score} causal)");
            let expr: RecExpr<Attn> = text.parse().expect("valid");
            assert!(to_kernel(&expr, &k, &none()).is_err(), "{score}");
        }
    }

    #[test]
    fn fused_ops_round_trip_through_terms() {
        let k = kernel(
            "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d], b: f32[n, n]) -> f32[n, d] { return q; }",
        );
        for text in [
            "(attention (input q) (input k) (input v) (div (const 1) (sqrt (dim d))) causal)",
            "(attention-int8 (input q) (input k) (input v) (const 0.5) all)",
            "(attention-scored (input q) (input k) (input v) \
             (mul (const 2) (tanh (add (matmul (input q) (transpose (input k))) (input b)))) (window 3))",
            "(linear-attention-causal (input q) (input k) (input v) (const 0.001))",
            "(linear-attention (input q) (input k) (input v) (const 0))",
            "(causal-prefix-product (input q) (input k) (input v))",
        ] {
            let expr: RecExpr<Attn> = text.parse().expect("valid");
            let back = to_kernel(&expr, &k, &none()).expect("converts back");
            let again = to_kernel(&to_recexpr(&back).expect("converts"), &k, &none())
                .expect("converts back again");
            assert_eq!(print_kernel(&again), print_kernel(&back), "{text}");
            assert!(
                matches!(
                    back.graph.node(back.output).op,
                    Op::Attention(_) | Op::LinearAttention(_)
                ),
                "{text}"
            );
        }
    }
}
