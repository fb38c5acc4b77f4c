//! IR ⇄ `RecExpr`: [`to_recexpr`] turns a kernel's graph into an expression of the e-graph
//! language, [`to_kernel`] turns an extracted expression back into a fresh IR kernel with
//! recomputed symbolic shapes. Fused kernel-form nodes come back as the equivalent plain IR
//! subgraph (`softmax(mask((q @ kᵀ) * scale)) @ v`, the form the JIT's attention matcher
//! recognizes), so the interpreter and every later stage can run the result.
//!
//! Both directions walk nodes in topological order; only mask patterns (a few levels deep)
//! are converted recursively.

use crate::analysis::AttnGraph;
use crate::lang::{Atom, Attn};
use crate::OptError;
use attnc_ir::{BinaryOp, DType, Dim, Graph, Kernel, MaskPattern, Node, NodeId, Op, ReduceOp};
use attnc_ir::{RandomKind, Shape, UnaryOp};
use attnc_syntax::Span;
use egg::{Id, Language, RecExpr, Symbol};
use std::collections::HashMap;

/// Converts the graph of `kernel` to an expression whose root is the kernel's output.
pub fn to_recexpr(kernel: &Kernel) -> Result<RecExpr<Attn>, OptError> {
    let mut expr = RecExpr::default();
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    for node_id in kernel.graph.topo_order() {
        let node = kernel.graph.node(node_id);
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
        let id = add_op(&mut expr, &node.op, &node.shape, &operands)
            .ok_or(OptError::Malformed(node_id.index()))?;
        ids.insert(node_id, id);
    }
    if !ids.contains_key(&kernel.output) {
        return Err(OptError::Malformed(kernel.output.index()));
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

/// Adds a dimension as an atom: a name for a symbol, a number for a literal size.
fn dim_leaf(expr: &mut RecExpr<Attn>, dim: &Dim) -> Id {
    match dim {
        Dim::Sym(s) => leaf(expr, Atom::Name(Symbol::from(s.as_str()))),
        Dim::Const(c) => leaf(expr, Atom::num(*c as f64)),
    }
}

/// Adds a mask pattern tree.
fn add_pattern(expr: &mut RecExpr<Attn>, pattern: &MaskPattern) -> Id {
    let num = |expr: &mut RecExpr<Attn>, v: u64| leaf(expr, Atom::num(v as f64));
    let node = match pattern {
        MaskPattern::Causal => Attn::Causal,
        MaskPattern::Window(w) => Attn::Window(num(expr, *w)),
        MaskPattern::Dilated { w, r } => Attn::Dilated([num(expr, *w), num(expr, *r)]),
        MaskPattern::Global(g) => Attn::Global(num(expr, *g)),
        MaskPattern::Block(b) => Attn::Block(num(expr, *b)),
        MaskPattern::And(a, b) => Attn::And([add_pattern(expr, a), add_pattern(expr, b)]),
        MaskPattern::Or(a, b) => Attn::Or([add_pattern(expr, a), add_pattern(expr, b)]),
    };
    expr.add(node)
}

/// Adds one IR op over already converted operands; `None` on an arity mismatch.
fn add_op(expr: &mut RecExpr<Attn>, op: &Op, shape: &Shape, args: &[Id]) -> Option<Id> {
    let one = |i: usize| args.get(i).copied();
    let node = match op {
        Op::Input { name, .. } => Attn::Input(leaf(expr, Atom::Name(Symbol::from(name.as_str())))),
        Op::Const(v) => Attn::Const(leaf(expr, Atom::num(*v))),
        Op::DimValue(d) => Attn::DimValue(dim_leaf(expr, d)),
        Op::Fill { value } => {
            let mut ids = vec![leaf(expr, Atom::num(*value))];
            ids.extend(shape.iter().map(|d| dim_leaf(expr, d)));
            Attn::Fill(ids.into_boxed_slice())
        }
        Op::RelPos => match shape.as_slice() {
            [m, n] => Attn::RelPos([dim_leaf(expr, m), dim_leaf(expr, n)]),
            _ => return None,
        },
        Op::Unary(u) => {
            let x = one(0)?;
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
        Op::Binary(b) => {
            let pair = [one(0)?, one(1)?];
            match b {
                BinaryOp::Add => Attn::Add(pair),
                BinaryOp::Sub => Attn::Sub(pair),
                BinaryOp::Mul => Attn::Mul(pair),
                BinaryOp::Div => Attn::Div(pair),
                BinaryOp::Max => Attn::Maximum(pair),
                BinaryOp::Min => Attn::Minimum(pair),
            }
        }
        Op::MatMul => Attn::MatMul([one(0)?, one(1)?]),
        Op::Transpose => Attn::Transpose(one(0)?),
        Op::Reduce { op, axis } => {
            let pair = [one(0)?, leaf(expr, Atom::num(*axis as f64))];
            match op {
                ReduceOp::Sum => Attn::Sum(pair),
                ReduceOp::Max => Attn::Max(pair),
                ReduceOp::Mean => Attn::Mean(pair),
            }
        }
        Op::Softmax { axis } => Attn::Softmax([one(0)?, leaf(expr, Atom::num(*axis as f64))]),
        Op::Mask { pattern, fill } => {
            let x = one(0)?;
            let p = add_pattern(expr, pattern);
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
                dim_leaf(expr, rows),
                dim_leaf(expr, cols),
            ]),
            _ => return None,
        },
        Op::Int8Products => Attn::Int8Products(one(0)?),
    };
    Some(expr.add(node))
}

/// Builds IR nodes with symbolic shapes.
struct Builder<'a> {
    /// The kernel whose parameters the new graph reads.
    original: &'a Kernel,
    /// The graph under construction.
    graph: Graph,
}

impl Builder<'_> {
    /// Adds a node, inferring its shape from its operands.
    fn add(&mut self, op: Op, operands: &[NodeId], fill_shape: Option<Shape>) -> Option<NodeId> {
        let shapes: Vec<&Shape> = operands
            .iter()
            .map(|&o| &self.graph.node(o).shape)
            .collect();
        let shape = match (&op, shapes.as_slice()) {
            (Op::Const(_) | Op::DimValue(_), []) => vec![],
            (Op::Fill { .. } | Op::RelPos | Op::Random { .. }, []) => fill_shape?,
            (
                Op::Unary(_)
                | Op::Softmax { .. }
                | Op::Mask { .. }
                | Op::Cast { .. }
                | Op::Int8Products,
                [x],
            ) => (*x).clone(),
            (Op::Binary(_), [a, b]) => broadcast(a, b)?,
            (Op::MatMul, [a, b]) => matmul(a, b)?,
            (Op::Transpose, [x]) => transpose(x)?,
            (Op::Reduce { axis, .. }, [x]) => {
                let mut s = (*x).clone();
                *s.get_mut(*axis)? = Dim::Const(1);
                s
            }
            _ => return None,
        };
        let dtype = match op {
            Op::Cast { to } => to,
            _ => DType::F32,
        };
        let node = Node {
            op,
            shape,
            dtype,
            span: Span::default(),
        };
        Some(self.graph.add(node, operands))
    }

    /// The rank of a node.
    fn rank(&self, id: NodeId) -> usize {
        self.graph.node(id).shape.len()
    }
}

/// NumPy broadcasting on symbolic shapes.
fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let one = Dim::Const(1);
    let mut out = Vec::with_capacity(rank);
    for k in 0..rank {
        let x = (k + a.len()).checked_sub(rank).map_or(&one, |i| &a[i]);
        let y = (k + b.len()).checked_sub(rank).map_or(&one, |i| &b[i]);
        out.push(if x == y || y.is_one() {
            x.clone()
        } else if x.is_one() {
            y.clone()
        } else {
            return None;
        });
    }
    Some(out)
}

/// The symbolic shape of `a @ b`.
fn matmul(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 || a[ra - 1] != b[rb - 2] {
        return None;
    }
    let mut out = broadcast(&a[..ra - 2], &b[..rb - 2])?;
    out.extend([a[ra - 2].clone(), b[rb - 1].clone()]);
    Some(out)
}

/// The symbolic shape of `x.T`.
fn transpose(x: &[Dim]) -> Option<Shape> {
    let rank = x.len();
    if rank < 2 {
        return None;
    }
    let mut out = x.to_vec();
    out.swap(rank - 2, rank - 1);
    Some(out)
}

/// Converts a pattern subtree of `expr` back to a [`MaskPattern`]; `None` for `all`.
fn pattern_of(expr: &RecExpr<Attn>, id: Id) -> Result<Option<MaskPattern>, OptError> {
    let num = |i: Id| expr[i].atom().and_then(|a| a.as_index());
    let sub = |i: Id| pattern_of(expr, i).ok().flatten();
    pattern_node(&expr[id], num, sub)
        .ok_or_else(|| OptError::Extracted(format!("not a mask pattern: {}", expr[id])))
}

/// The mask pattern an e-class of `egraph` describes (its first pattern node, recursively);
/// `Some(None)` for `all`, `None` when the class is not a pattern.
pub fn pattern_from_class(egraph: &AttnGraph, id: Id) -> Option<Option<MaskPattern>> {
    let node = egraph[id].nodes.iter().find(|n| n.is_pattern())?;
    let num = |i: Id| egraph[i].data.atom.and_then(|a| a.as_index());
    let sub = |i: Id| pattern_from_class(egraph, i).flatten();
    pattern_node(node, num, sub)
}

/// The one mapping from pattern nodes to [`MaskPattern`], shared by extracted terms and e-classes:
/// `num` reads a size child, `sub` converts an operand of `&`/`|` (`None` for `all` or a
/// malformed operand). `Some(None)` for `all`; `None` when `node` is not a well-formed pattern.
fn pattern_node(
    node: &Attn,
    num: impl Fn(Id) -> Option<u64>,
    sub: impl Fn(Id) -> Option<MaskPattern>,
) -> Option<Option<MaskPattern>> {
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

/// Converts an extracted expression back to a kernel with the signature of `original`.
pub fn to_kernel(expr: &RecExpr<Attn>, original: &Kernel) -> Result<Kernel, OptError> {
    let mut b = Builder {
        original,
        graph: Graph::new(),
    };
    for (index, param) in original.params.iter().enumerate() {
        let node = Node {
            op: Op::Input {
                index,
                name: param.name.clone(),
            },
            shape: param.shape.clone(),
            dtype: param.dtype,
            span: param.span,
        };
        b.graph.add(node, &[]);
    }
    let nodes = expr.as_ref();
    let mut built: Vec<Option<NodeId>> = vec![None; nodes.len()];
    for (index, node) in nodes.iter().enumerate() {
        built[index] = build_node(&mut b, expr, node, &built)?;
    }
    let root = nodes
        .len()
        .checked_sub(1)
        .and_then(|r| built[r])
        .ok_or_else(|| OptError::Extracted("the root is not a value".into()))?;
    let mut kernel = Kernel {
        name: original.name.clone(),
        params: original.params.clone(),
        graph: b.graph,
        output: root,
        ret_dtype: original.ret_dtype,
        approx: original.approx.clone(),
        span: original.span,
    };
    prune(&mut kernel);
    Ok(kernel)
}

/// Builds the IR for one e-node; `Ok(None)` for atoms and patterns (read by their users).
fn build_node(
    b: &mut Builder<'_>,
    expr: &RecExpr<Attn>,
    node: &Attn,
    built: &[Option<NodeId>],
) -> Result<Option<NodeId>, OptError> {
    let bad = |what: &str| OptError::Extracted(format!("{what} in {node}"));
    let value = |id: Id| built[usize::from(id)].ok_or_else(|| bad("an operand is not a value"));
    let atom = |id: Id| {
        expr[id]
            .atom()
            .ok_or_else(|| bad("an attribute is not an atom"))
    };
    let index = |id: Id| {
        atom(id)?
            .as_index()
            .map(|v| v as usize)
            .ok_or_else(|| bad("an axis is not an index"))
    };
    let dim = |id: Id| -> Result<Dim, OptError> {
        let a = atom(id)?;
        match (a.as_name(), a.as_index()) {
            (Some(name), _) => Ok(Dim::Sym(name.to_string())),
            (None, Some(v)) => Ok(Dim::Const(v)),
            _ => Err(bad("a dimension is not a size")),
        }
    };
    let fail = || bad("shapes do not agree");
    if let Some((op, x)) = crate::analysis::unary_op(node) {
        return Ok(Some(
            b.add(Op::Unary(op), &[value(x)?], None).ok_or_else(fail)?,
        ));
    }
    if let Some((op, [x, y])) = crate::analysis::binary_op(node) {
        let ids = [value(x)?, value(y)?];
        return Ok(Some(b.add(Op::Binary(op), &ids, None).ok_or_else(fail)?));
    }
    let id = match node {
        Attn::Leaf(_) => return Ok(None),
        n if n.is_pattern() => return Ok(None),
        Attn::Input(name) => {
            let name = atom(*name)?;
            let position = b
                .original
                .params
                .iter()
                .position(|p| Some(p.name.as_str()) == name.as_name())
                .ok_or_else(|| bad("an unknown parameter"))?;
            return Ok(Some(NodeId::new(position)));
        }
        Attn::Const(v) => {
            let v = atom(*v)?
                .as_num()
                .ok_or_else(|| bad("a constant is not a number"))?;
            b.add(Op::Const(v), &[], None)
        }
        Attn::DimValue(d) => match dim(*d)? {
            Dim::Const(c) => b.add(Op::Const(c as f64), &[], None),
            sym => b.add(Op::DimValue(sym), &[], None),
        },
        Attn::Fill(ids) => {
            let (first, rest) = ids
                .split_first()
                .ok_or_else(|| bad("a fill without value"))?;
            let v = atom(*first)?.as_num().ok_or_else(|| bad("a fill value"))?;
            let shape: Shape = rest.iter().map(|&d| dim(d)).collect::<Result<_, _>>()?;
            b.add(Op::Fill { value: v }, &[], Some(shape))
        }
        Attn::RelPos([m, n]) => b.add(Op::RelPos, &[], Some(vec![dim(*m)?, dim(*n)?])),
        Attn::MatMul([x, y]) => b.add(Op::MatMul, &[value(*x)?, value(*y)?], None),
        Attn::Transpose(x) => b.add(Op::Transpose, &[value(*x)?], None),
        Attn::Sum([x, a]) | Attn::Max([x, a]) | Attn::Mean([x, a]) => {
            let op = match node {
                Attn::Sum(_) => ReduceOp::Sum,
                Attn::Max(_) => ReduceOp::Max,
                _ => ReduceOp::Mean,
            };
            let reduce = Op::Reduce {
                op,
                axis: index(*a)?,
            };
            b.add(reduce, &[value(*x)?], None)
        }
        Attn::Softmax([x, a]) => b.add(Op::Softmax { axis: index(*a)? }, &[value(*x)?], None),
        Attn::Mask([x, p, f]) => {
            let fill = atom(*f)?.as_num().ok_or_else(|| bad("a mask fill"))?;
            match pattern_of(expr, *p)? {
                Some(pattern) => b.add(Op::Mask { pattern, fill }, &[value(*x)?], None),
                None => Some(value(*x)?),
            }
        }
        Attn::Cast([x, t]) => {
            let to = match atom(*t)?.as_name() {
                Some("f16") => DType::F16,
                Some("bf16") => DType::Bf16,
                Some("f32") => DType::F32,
                _ => return Err(bad("an unknown storage type")),
            };
            b.add(Op::Cast { to }, &[value(*x)?], None)
        }
        Attn::Random([kind, seed, rows, cols]) => {
            let kind = atom(*kind)?
                .as_name()
                .and_then(RandomKind::from_name)
                .ok_or_else(|| bad("an unknown random matrix"))?;
            let seed = atom(*seed)?
                .as_index()
                .ok_or_else(|| bad("a seed is not an integer"))?;
            let shape = vec![dim(*rows)?, dim(*cols)?];
            b.add(Op::Random { kind, seed }, &[], Some(shape))
        }
        Attn::Int8Products(x) => b.add(Op::Int8Products, &[value(*x)?], None),
        Attn::FavorQuery([x, seed, m]) | Attn::FavorKey([x, seed, m]) => {
            let keys = matches!(node, Attn::FavorKey(_));
            expand_favor(b, value(*x)?, index(*seed)? as u64, index(*m)? as u64, keys)
        }
        Attn::ProjectRows([x, seed, r]) => {
            expand_projection(b, value(*x)?, index(*seed)? as u64, index(*r)? as u64)
        }
        Attn::Attention([q, k, v, s, p]) | Attn::AttentionInt8([q, k, v, s, p]) => {
            let scale = match expr[*s] {
                Attn::Const(c) if atom(c)?.as_num() == Some(1.0) => None,
                _ => Some(value(*s)?),
            };
            let pattern = pattern_of(expr, *p)?;
            let attention =
                expand_attention(b, [value(*q)?, value(*k)?, value(*v)?], scale, pattern);
            match (node, attention) {
                (Attn::AttentionInt8(_), Some(a)) => b.add(Op::Int8Products, &[a], None),
                (_, a) => a,
            }
        }
        Attn::AttentionScored([q, k, v, s, p]) => {
            let node_of = |id: Id| Some(&expr[id]);
            if !score_is_fusable(*s, *q, *k, node_of, |a, b| same_term(expr, a, b)) {
                return Err(bad("a score the attention kernel cannot fuse"));
            }
            let pattern = pattern_of(expr, *p)?;
            expand_scored(b, value(*s)?, value(*v)?, pattern)
        }
        Attn::LinearAttention([q, k, v]) => expand_linear(b, [value(*q)?, value(*k)?, value(*v)?]),
        Attn::LinearAttentionCausal([q, k, v]) => {
            expand_linear_causal(b, [value(*q)?, value(*k)?, value(*v)?])
        }
        _ => return Err(bad("an unexpected node")),
    };
    Ok(Some(id.ok_or_else(fail)?))
}

/// `softmax(mask((q @ kᵀ) * scale, pattern)) @ v` as plain IR.
fn expand_attention(
    b: &mut Builder<'_>,
    [q, k, v]: [NodeId; 3],
    scale: Option<NodeId>,
    pattern: Option<MaskPattern>,
) -> Option<NodeId> {
    let kt = b.add(Op::Transpose, &[k], None)?;
    let mut s = b.add(Op::MatMul, &[q, kt], None)?;
    if let Some(c) = scale {
        s = b.add(Op::Binary(BinaryOp::Mul), &[s, c], None)?;
    }
    if let Some(pattern) = pattern {
        let fill = f64::NEG_INFINITY;
        s = b.add(Op::Mask { pattern, fill }, &[s], None)?;
    }
    let axis = b.rank(s).checked_sub(1)?;
    let p = b.add(Op::Softmax { axis }, &[s], None)?;
    b.add(Op::MatMul, &[p, v], None)
}

/// FAVOR+ features `exp(x wᵀ - |x|²/2 - c)` of `x: [.., n, d]` with `w` the seeded
/// `[m, d]` orthogonal features; `c` is the row maximum of `x wᵀ` for queries and its maximum
/// over all rows for keys. Both shifts (and the usual `1/√m`) scale numerator and
/// denominator of linear attention alike, so they cancel; they only keep `exp` in range.
fn expand_favor(b: &mut Builder<'_>, x: NodeId, seed: u64, m: u64, keys: bool) -> Option<NodeId> {
    let rank = b.rank(x);
    let d = b.graph.node(x).shape.last()?.clone();
    let kind = RandomKind::OrthogonalFeatures;
    let w = b.add(Op::Random { kind, seed }, &[], Some(vec![Dim::Const(m), d]))?;
    let wt = b.add(Op::Transpose, &[w], None)?;
    let proj = b.add(Op::MatMul, &[x, wt], None)?;
    let squares = b.add(Op::Binary(BinaryOp::Mul), &[x, x], None)?;
    let last = rank.checked_sub(1)?;
    let norm = b.add(
        Op::Reduce {
            op: ReduceOp::Sum,
            axis: last,
        },
        &[squares],
        None,
    )?;
    let half = b.add(Op::Const(0.5), &[], None)?;
    let half_norm = b.add(Op::Binary(BinaryOp::Mul), &[norm, half], None)?;
    let mut shift = b.add(
        Op::Reduce {
            op: ReduceOp::Max,
            axis: last,
        },
        &[proj],
        None,
    )?;
    if keys {
        let rows = rank.checked_sub(2)?;
        shift = b.add(
            Op::Reduce {
                op: ReduceOp::Max,
                axis: rows,
            },
            &[shift],
            None,
        )?;
    }
    let centered = b.add(Op::Binary(BinaryOp::Sub), &[proj, half_norm], None)?;
    let shifted = b.add(Op::Binary(BinaryOp::Sub), &[centered, shift], None)?;
    b.add(Op::Unary(UnaryOp::Exp), &[shifted], None)
}

/// Linformer's `e @ x` for `x: [.., n, d]` with `e` the seeded `[r, n]` Gaussian projection.
fn expand_projection(b: &mut Builder<'_>, x: NodeId, seed: u64, r: u64) -> Option<NodeId> {
    let shape = &b.graph.node(x).shape;
    let n = shape.get(shape.len().checked_sub(2)?)?.clone();
    let kind = RandomKind::Gaussian;
    let e = b.add(Op::Random { kind, seed }, &[], Some(vec![Dim::Const(r), n]))?;
    b.add(Op::MatMul, &[e, x], None)
}

/// `softmax(mask(score, pattern)) @ v` as plain IR (the score already built).
fn expand_scored(
    b: &mut Builder<'_>,
    mut s: NodeId,
    v: NodeId,
    pattern: Option<MaskPattern>,
) -> Option<NodeId> {
    if let Some(pattern) = pattern {
        let fill = f64::NEG_INFINITY;
        s = b.add(Op::Mask { pattern, fill }, &[s], None)?;
    }
    let axis = b.rank(s).checked_sub(1)?;
    let p = b.add(Op::Softmax { axis }, &[s], None)?;
    b.add(Op::MatMul, &[p, v], None)
}

/// Whether the sub-terms `a` and `b` of `expr` are equal (a parsed `RecExpr` is not
/// hash-consed, so equal terms may have different ids).
fn same_term(expr: &RecExpr<Attn>, a: Id, b: Id) -> bool {
    let mut stack = vec![(a, b)];
    while let Some((a, b)) = stack.pop() {
        if a == b {
            continue;
        }
        let (x, y) = (&expr[a], &expr[b]);
        if !x.matches(y) || stack.len() > 4096 {
            return false;
        }
        stack.extend(
            x.children()
                .iter()
                .copied()
                .zip(y.children().iter().copied()),
        );
    }
    true
}

/// Whether the score term rooted at `s` is one the JIT's attention matcher fuses: `q` and
/// `k` are kernel parameters, and the score is an elementwise tree over `q @ kᵀ` (one
/// product, possibly used more than once) whose other leaves are scalars, dimension values,
/// fills, `relpos` and parameters (bias tensors the matcher broadcasts to `[.., m, n]`).
/// `node` gives the chosen node of an id, `same` compares ids (classes or expression ids).
pub fn score_is_fusable<'a>(
    s: Id,
    q: Id,
    k: Id,
    node: impl Fn(Id) -> Option<&'a Attn>,
    same: impl Fn(Id, Id) -> bool,
) -> bool {
    let is_input = |id: Id| matches!(node(id), Some(Attn::Input(_)));
    if !is_input(q) || !is_input(k) {
        return false;
    }
    let mut found = false;
    let mut stack = vec![(s, 0usize)];
    let mut steps = 0usize;
    while let Some((id, depth)) = stack.pop() {
        steps += 1;
        if depth > 64 || steps > 4096 {
            return false;
        }
        let Some(n) = node(id) else {
            return false;
        };
        match n {
            Attn::MatMul([a, t]) => {
                let Some(Attn::Transpose(kt)) = node(*t) else {
                    return false;
                };
                if !same(*a, q) || !same(*kt, k) {
                    return false;
                }
                found = true;
            }
            Attn::Input(_)
            | Attn::Const(_)
            | Attn::DimValue(_)
            | Attn::Fill(_)
            | Attn::RelPos(_)
            | Attn::Leaf(_) => {}
            n => {
                if let Some((_, x)) = crate::analysis::unary_op(n) {
                    stack.push((x, depth + 1));
                } else if let Some((_, [x, y])) = crate::analysis::binary_op(n) {
                    stack.push((x, depth + 1));
                    stack.push((y, depth + 1));
                } else {
                    return false;
                }
            }
        }
    }
    found
}

/// `(q (kᵀ v)) / (q sum(kᵀ, -1))` as plain IR.
fn expand_linear(b: &mut Builder<'_>, [q, k, v]: [NodeId; 3]) -> Option<NodeId> {
    let kt = b.add(Op::Transpose, &[k], None)?;
    let state = b.add(Op::MatMul, &[kt, v], None)?;
    let num = b.add(Op::MatMul, &[q, state], None)?;
    let axis = b.rank(kt).checked_sub(1)?;
    let ksum = b.add(
        Op::Reduce {
            op: ReduceOp::Sum,
            axis,
        },
        &[kt],
        None,
    )?;
    let den = b.add(Op::MatMul, &[q, ksum], None)?;
    b.add(Op::Binary(BinaryOp::Div), &[num, den], None)
}

/// `mask(q kᵀ, causal, 0) v / sum(mask(q kᵀ, causal, 0), -1)` as plain IR, the masked
/// scores built once (the form the JIT's prefix-state matcher recognizes).
fn expand_linear_causal(b: &mut Builder<'_>, [q, k, v]: [NodeId; 3]) -> Option<NodeId> {
    let kt = b.add(Op::Transpose, &[k], None)?;
    let s = b.add(Op::MatMul, &[q, kt], None)?;
    let mask = Op::Mask {
        pattern: MaskPattern::Causal,
        fill: 0.0,
    };
    let a = b.add(mask, &[s], None)?;
    let num = b.add(Op::MatMul, &[a, v], None)?;
    let axis = b.rank(a).checked_sub(1)?;
    let den = b.add(
        Op::Reduce {
            op: ReduceOp::Sum,
            axis,
        },
        &[a],
        None,
    )?;
    b.add(Op::Binary(BinaryOp::Div), &[num, den], None)
}

/// Removes the nodes of `kernel` that the output does not use (parameters always stay), so the
/// lowering invariants hold: inputs first, every other node feeds the output, topological.
fn prune(kernel: &mut Kernel) {
    let graph = &kernel.graph;
    let count = graph.len();
    let mut live = vec![false; count];
    if kernel.output.index() < count {
        live[kernel.output.index()] = true;
    }
    live.iter_mut()
        .take(kernel.params.len())
        .for_each(|l| *l = true);
    let operands: Vec<Vec<NodeId>> = graph
        .topo_order()
        .into_iter()
        .map(|id| graph.operands(id))
        .collect();
    for index in (0..count).rev() {
        if live[index] {
            for o in &operands[index] {
                live[o.index()] = true;
            }
        }
    }
    let mut fresh = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; count];
    for index in (0..count).filter(|&i| live[i]) {
        let args: Vec<NodeId> = operands[index]
            .iter()
            .filter_map(|o| map[o.index()])
            .collect();
        map[index] = Some(fresh.add(graph.node(NodeId::new(index)).clone(), &args));
    }
    if let Some(out) = map.get(kernel.output.index()).copied().flatten() {
        kernel.output = out;
    }
    kernel.graph = fresh;
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

    #[test]
    fn round_trip_keeps_the_program() {
        let k = kernel(
            "kernel f(q: f32[h, n, d], k: f32[h, n, d]) -> f16[h, n, n] {\n\
             return softmax(mask(q @ k.T / sqrt(d), causal & window(4)) + ones(n, n)); }",
        );
        let expr = to_recexpr(&k).expect("converts");
        let back = to_kernel(&expr, &k).expect("converts back");
        assert_eq!(print_kernel(&back), print_kernel(&k));
    }

    #[test]
    fn scored_attention_expands_to_the_jit_form_or_is_refused() {
        let k = kernel(
            "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d], b: f32[n, n]) -> f32[n, d] { return q; }",
        );
        let fused = "(attention-scored (input q) (input k) (input v) \
                     (add (matmul (input q) (transpose (input k))) (input b)) causal)";
        let expr: RecExpr<Attn> = fused.parse().expect("valid");
        let text = print_kernel(&to_kernel(&expr, &k).expect("converts back"));
        for op in ["transpose", "matmul", "add", "mask", "softmax"] {
            assert!(text.contains(op), "{op} missing in {text}");
        }
        // Scale folded into q, a second product, or a score without q kᵀ: not the JIT's form.
        for score in [
            "(matmul (mul (input q) (const 2)) (transpose (input k)))",
            "(add (matmul (input q) (transpose (input k))) (matmul (input b) (input v)))",
            "(input b)",
            "(softmax (matmul (input q) (transpose (input k))) 1)",
        ] {
            let text = format!("(attention-scored (input q) (input k) (input v) {score} causal)");
            let expr: RecExpr<Attn> = text.parse().expect("valid");
            assert!(to_kernel(&expr, &k).is_err(), "{score}");
        }
    }

    #[test]
    fn fused_attention_expands_to_the_jit_form() {
        let k =
            kernel("kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] { return q; }");
        let expr: RecExpr<Attn> = "(attention (input q) (input k) (input v) (const 1) causal)"
            .parse()
            .expect("valid");
        let back = to_kernel(&expr, &k).expect("converts back");
        let text = print_kernel(&back);
        assert!(text.contains("softmax") && text.contains("mask") && text.contains("transpose"));
    }
}
