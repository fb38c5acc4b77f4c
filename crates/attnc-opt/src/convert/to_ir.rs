//! An extracted term back to IR: plain nodes one to one, fused nodes as the IR's fused ops, and
//! the approximations' random projections and features written out as plain IR.

use super::pattern_of;
use crate::lang::Attn;
use crate::score::{scalar, score_form, TermView};
use crate::OptError;
use attnc_ir::build::GraphBuilder;
use attnc_ir::{
    Attention, BinaryOp, Bindings, DType, Decay, Dim, Kernel, LinearAttention, NodeId, Normalizer,
    Op, PoolOp, Precision, RandomKind, ReduceOp, ScoreExpr, UnaryOp,
};
use egg::{Id, Language, RecExpr};

/// Converts an extracted expression back to a kernel with the signature of `original`, at
/// `bindings` (which fold the scalar attributes of fused nodes, such as an epsilon).
pub fn to_kernel(
    expr: &RecExpr<Attn>,
    original: &Kernel,
    bindings: &Bindings,
) -> Result<Kernel, OptError> {
    let mut b = GraphBuilder::with_params(&original.params);
    let nodes = expr.as_ref();
    let mut built: Vec<Option<NodeId>> = vec![None; nodes.len()];
    for (index, node) in nodes.iter().enumerate() {
        built[index] = build_node(&mut b, expr, node, &built, bindings)?;
    }
    let not_value = || OptError::Extracted("the root is not a value".into());
    let roots: Vec<NodeId> = match nodes.last() {
        Some(Attn::Outputs(list)) => list
            .iter()
            .map(|&id| built[usize::from(id)].ok_or_else(not_value))
            .collect::<Result<_, _>>()?,
        _ => vec![nodes
            .len()
            .checked_sub(1)
            .and_then(|r| built[r])
            .ok_or_else(not_value)?],
    };
    let wanted = original.outputs();
    if roots.len() != wanted.len() {
        let why = format!("{} results for {} outputs", roots.len(), wanted.len());
        return Err(OptError::Extracted(why));
    }
    let extra = roots
        .iter()
        .zip(&wanted)
        .skip(1)
        .map(|(&node, o)| attnc_ir::KernelOutput {
            node,
            dtype: o.dtype,
        })
        .collect();
    let mut kernel = Kernel {
        name: original.name.clone(),
        params: original.params.clone(),
        graph: b.graph,
        output: roots[0],
        ret_dtype: original.ret_dtype,
        extra_outputs: extra,
        approx: original.approx.clone(),
        span: original.span,
    };
    prune(&mut kernel);
    Ok(kernel)
}

/// Builds the IR for one e-node; `Ok(None)` for atoms and patterns (read by their users).
fn build_node(
    b: &mut GraphBuilder,
    expr: &RecExpr<Attn>,
    node: &Attn,
    built: &[Option<NodeId>],
    bindings: &Bindings,
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
    let shaped =
        |r: Result<NodeId, String>| r.map_err(|e| bad(&format!("shapes do not agree ({e})")));
    if let Some((op, x)) = crate::analysis::unary_op(node) {
        return Ok(Some(shaped(b.add(Op::Unary(op), &[value(x)?], None))?));
    }
    if let Some((op, [x, y])) = crate::analysis::binary_op(node) {
        let ids = [value(x)?, value(y)?];
        return Ok(Some(shaped(b.add(Op::Binary(op), &ids, None))?));
    }
    let id = match node {
        Attn::Leaf(_) => return Ok(None),
        n if n.is_pattern() => return Ok(None),
        Attn::Input(name) => {
            let name = atom(*name)?;
            let position = b
                .graph
                .topo_order()
                .into_iter()
                .find(|&id| matches!(&b.graph.node(id).op, Op::Input { name: n, .. } if Some(n.as_str()) == name.as_name()))
                .ok_or_else(|| bad("an unknown parameter"))?;
            return Ok(Some(position));
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
            let shape: Vec<Dim> = rest.iter().map(|&d| dim(d)).collect::<Result<_, _>>()?;
            b.add(Op::Fill { value: v }, &[], Some(&shape))
        }
        Attn::RelPos([m, n]) => b.add(Op::RelPos, &[], Some(&vec![dim(*m)?, dim(*n)?])),
        Attn::MatMul([x, y]) => b.add(Op::MatMul, &[value(*x)?, value(*y)?], None),
        Attn::Transpose(x) => b.add(Op::Transpose, &[value(*x)?], None),
        Attn::Sum([x, a]) | Attn::Max([x, a]) | Attn::Mean([x, a]) | Attn::LogSumExp([x, a]) => {
            let op = match node {
                Attn::Sum(_) => ReduceOp::Sum,
                Attn::Max(_) => ReduceOp::Max,
                Attn::Mean(_) => ReduceOp::Mean,
                _ => ReduceOp::LogSumExp,
            };
            let reduce = Op::Reduce {
                op,
                axis: index(*a)?,
            };
            b.add(reduce, &[value(*x)?], None)
        }
        Attn::Softmax([x, a]) => b.add(Op::Softmax { axis: index(*a)? }, &[value(*x)?], None),
        Attn::SoftmaxSink([x, s]) => b.add(Op::SoftmaxSink, &[value(*x)?, value(*s)?], None),
        Attn::Cumsum([x, a]) => b.add(Op::Cumsum { axis: index(*a)? }, &[value(*x)?], None),
        Attn::MeanPool([x, size]) | Attn::MaxPool([x, size]) => {
            let op = match node {
                Attn::MeanPool(_) => PoolOp::Mean,
                _ => PoolOp::Max,
            };
            let pool = Op::Pool {
                op,
                size: dim(*size)?,
            };
            b.add(pool, &[value(*x)?], None)
        }
        Attn::Mask([x, p, f]) => {
            let fill = atom(*f)?.as_num().ok_or_else(|| bad("a mask fill"))?;
            let mut segments = Vec::new();
            match pattern_of(expr, *p, &mut segments)? {
                Some(pattern) => {
                    let mut operands = vec![value(*x)?];
                    for s in segments {
                        operands.push(value(s)?);
                    }
                    b.add(Op::Mask { pattern, fill }, &operands, None)
                }
                None => Ok(value(*x)?),
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
            b.add(Op::Random { kind, seed }, &[], Some(&shape))
        }
        Attn::Int8Products(x) | Attn::Bf16Products(x) => {
            let inner = value(*x)?;
            let node_ir = b.graph.dag[inner].clone();
            match node_ir.op {
                Op::Attention(mut a) => {
                    a.precision = match node {
                        Attn::Int8Products(_) => Precision::Int8,
                        _ => Precision::Bf16,
                    };
                    b.graph.dag[inner].op = Op::Attention(a);
                    Ok(inner)
                }
                // Product precisions mark a fused attention only; elsewhere the value is exact.
                _ => Ok(inner),
            }
        }
        Attn::FavorQuery([x, seed, m]) | Attn::FavorKey([x, seed, m]) => {
            let keys = matches!(node, Attn::FavorKey(_));
            expand_favor(b, value(*x)?, index(*seed)? as u64, index(*m)? as u64, keys)
        }
        Attn::NystromPinv(x) => super::pinv::build(b, value(*x)?),
        Attn::ProjectRows([x, seed, r]) => {
            expand_projection(b, value(*x)?, index(*seed)? as u64, index(*r)? as u64)
        }
        Attn::Attention([q, k, v, s, p])
        | Attn::AttentionInt8([q, k, v, s, p])
        | Attn::AttentionBf16([q, k, v, s, p]) => {
            let view = TermView {
                node: |id: Id| Some(&expr[id]),
                same: |a: Id, b: Id| same_term(expr, a, b),
                relpos_fits: |_: Id| false,
            };
            let mut args = vec![value(*q)?, value(*k)?, value(*v)?];
            // A scale known at compile time folds into the score; a scalar computed at run
            // time (an `f32[]` parameter) is read as a bias of shape [].
            let score = match scalar(*s, &view, 0) {
                Some(ScoreExpr::Const(1.0)) => ScoreExpr::Scores,
                Some(scale) => ScoreExpr::scaled(scale),
                None => {
                    args.push(value(*s)?);
                    ScoreExpr::scaled(ScoreExpr::Bias(0))
                }
            };
            let precision = match node {
                Attn::AttentionInt8(_) => Precision::Int8,
                Attn::AttentionBf16(_) => Precision::Bf16,
                _ => Precision::Exact,
            };
            let mut segments = Vec::new();
            let op = Attention {
                score,
                mask: pattern_of(expr, *p, &mut segments)?,
                precision,
                lse: false,
            };
            for s in segments {
                args.push(value(s)?);
            }
            b.add(Op::Attention(Box::new(op)), &args, None)
        }
        Attn::AttentionLse([q, k, s, p]) => super::lse::build(b, expr, [*q, *k, *s, *p], built),

        // The list of a kernel's results is read by `to_kernel`.
        Attn::Outputs(_) => return Ok(None),
        Attn::AttentionScored([q, k, _, s, p]) | Attn::AttentionLseScored([q, k, s, p]) => {
            let (qv, kv) = (value(*q)?, value(*k)?);
            // The log-sum-exp alone reads the values of the attention beside it (so the
            // planner pairs the two), or k in their place.
            let (vv, lse) = match node {
                Attn::AttentionScored([_, _, v, _, _]) => (value(*v)?, false),
                _ => {
                    let beside = super::lse::partner_values(b, expr, [*q, *k, *s, *p], built, true);
                    (beside.unwrap_or(kv), true)
                }
            };
            let rows = |id: NodeId| {
                let shape = &b.graph.node(id).shape;
                shape.len().checked_sub(2).map(|r| shape[r].clone())
            };
            let (m, n) = (rows(qv), rows(kv));
            let view = TermView {
                node: |id: Id| Some(&expr[id]),
                same: |a: Id, c: Id| same_term(expr, a, c),
                relpos_fits: |id: Id| match &expr[id] {
                    Attn::RelPos([rm, rn]) => {
                        dim(*rm).ok() == m && dim(*rn).ok() == n && m.is_some()
                    }
                    _ => false,
                },
            };
            let form = score_form(*s, *q, *k, &view).map_err(|e| bad(&e))?;
            let mut args = vec![qv, kv, vv];
            for bias in &form.biases {
                args.push(value(*bias)?);
            }
            let mut segments = Vec::new();
            let op = Attention {
                score: form.expr,
                mask: pattern_of(expr, *p, &mut segments)?,
                precision: Precision::Exact,
                lse,
            };
            for s in segments {
                args.push(value(s)?);
            }
            b.add(Op::Attention(Box::new(op)), &args, None)
        }
        Attn::LinearAttention([q, k, v, e]) | Attn::LinearAttentionCausal([q, k, v, e]) => {
            let view = TermView {
                node: |id: Id| Some(&expr[id]),
                same: |a: Id, c: Id| a == c,
                relpos_fits: |_: Id| false,
            };
            let eps = scalar(*e, &view, 0)
                .and_then(|s| s.scalar_value(bindings))
                .ok_or_else(|| bad("an epsilon that is not a known scalar"))?;
            let op = LinearAttention {
                causal: matches!(node, Attn::LinearAttentionCausal(_)),
                normalizer: Normalizer::Sum { eps },
                decay: Decay::None,
            };
            b.add(
                Op::LinearAttention(op),
                &[value(*q)?, value(*k)?, value(*v)?],
                None,
            )
        }
        Attn::CausalPrefixProduct([q, k, v]) => {
            let op = LinearAttention {
                causal: true,
                normalizer: Normalizer::None,
                decay: Decay::None,
            };
            b.add(
                Op::LinearAttention(op),
                &[value(*q)?, value(*k)?, value(*v)?],
                None,
            )
        }
        Attn::Retention([q, k, v, a])
        | Attn::RetentionNormalized([q, k, v, a, _])
        | Attn::GatedRetention([q, k, v, a, _])
        | Attn::GatedRetentionNormalized([q, k, v, a, _, _]) => {
            let normalizer = match node {
                Attn::RetentionNormalized([.., e]) | Attn::GatedRetentionNormalized([.., e]) => {
                    let view = TermView {
                        node: |id: Id| Some(&expr[id]),
                        same: |a: Id, c: Id| a == c,
                        relpos_fits: |_: Id| false,
                    };
                    let eps = scalar(*e, &view, 0)
                        .and_then(|s| s.scalar_value(bindings))
                        .ok_or_else(|| bad("an epsilon that is not a known scalar"))?;
                    Normalizer::Sum { eps }
                }
                _ => Normalizer::None,
            };
            let decay = match node {
                Attn::GatedRetention(_) | Attn::GatedRetentionNormalized(_) => Decay::Gate,
                _ => Decay::Slope,
            };
            let op = LinearAttention {
                causal: true,
                normalizer,
                decay,
            };
            let mut operands = vec![value(*q)?, value(*k)?, value(*v)?, value(*a)?];
            if let Attn::GatedRetention([.., c]) | Attn::GatedRetentionNormalized([.., c, _]) = node
            {
                operands.push(value(*c)?);
            }
            b.add(Op::LinearAttention(op), &operands, None)
        }
        _ => return Err(bad("an unexpected node")),
    };
    Ok(Some(shaped(id)?))
}

/// FAVOR+ features `exp(x wᵀ - |x|²/2 - c)` of `x: [.., n, d]` with `w` the seeded
/// `[m, d]` orthogonal features; `c` is the row maximum of `x wᵀ` for queries and its maximum
/// over all rows for keys. Both shifts (and the usual `1/√m`) scale numerator and
/// denominator of linear attention alike, so they cancel; they only keep `exp` in range.
///
/// Where `x = y·s` for a scalar `s` (the score scale, split between queries and keys), the
/// scale goes onto the matrix and the norm instead (`y (s wᵀ)`, `s²|y|²/2`): the same
/// features without a scaled copy of `y` written and read back (`s wᵀ` is `[d, m]`, far
/// smaller than `y` at any length worth approximating).
fn expand_favor(
    b: &mut GraphBuilder,
    x: NodeId,
    seed: u64,
    m: u64,
    keys: bool,
) -> Result<NodeId, String> {
    let rank = b.rank(x);
    let d = b
        .graph
        .node(x)
        .shape
        .last()
        .cloned()
        .ok_or("features of a scalar")?;
    let kind = RandomKind::OrthogonalFeatures;
    let w = b.add(
        Op::Random { kind, seed },
        &[],
        Some(&vec![Dim::Const(m), d]),
    )?;
    let (x, scale) = scaled_by_scalar(b, x);
    let mut wt = b.add(Op::Transpose, &[w], None)?;
    if let Some(s) = scale {
        wt = b.add(Op::Binary(BinaryOp::Mul), &[wt, s], None)?;
    }
    let proj = b.add(Op::MatMul, &[x, wt], None)?;
    let squares = b.add(Op::Binary(BinaryOp::Mul), &[x, x], None)?;
    let last = rank.checked_sub(1).ok_or("features of a scalar")?;
    let sum = |axis| Op::Reduce {
        op: ReduceOp::Sum,
        axis,
    };
    let max = |axis| Op::Reduce {
        op: ReduceOp::Max,
        axis,
    };
    let norm = b.add(sum(last), &[squares], None)?;
    let mut half = b.add(Op::Const(0.5), &[], None)?;
    if let Some(s) = scale {
        let squared = b.add(Op::Binary(BinaryOp::Mul), &[s, s], None)?;
        half = b.add(Op::Binary(BinaryOp::Mul), &[squared, half], None)?;
    }
    let half_norm = b.add(Op::Binary(BinaryOp::Mul), &[norm, half], None)?;
    let mut shift = b.add(max(last), &[proj], None)?;
    if keys {
        let rows = rank.checked_sub(2).ok_or("key features of a vector")?;
        shift = b.add(max(rows), &[shift], None)?;
    }
    let centered = b.add(Op::Binary(BinaryOp::Sub), &[proj, half_norm], None)?;
    let shifted = b.add(Op::Binary(BinaryOp::Sub), &[centered, shift], None)?;
    b.add(Op::Unary(UnaryOp::Exp), &[shifted], None)
}

/// `(y, Some(s))` when node `x` is `y·s` (or `s·y`) for a scalar `s` and a `y` of `x`'s
/// shape, else `(x, None)`.
fn scaled_by_scalar(b: &GraphBuilder, x: NodeId) -> (NodeId, Option<NodeId>) {
    if !matches!(b.graph.node(x).op, Op::Binary(BinaryOp::Mul)) {
        return (x, None);
    }
    let shape = &b.graph.node(x).shape;
    match b.graph.operands(x).as_slice() {
        &[y, s] | &[s, y]
            if b.graph.node(s).shape.is_empty() && b.graph.node(y).shape == *shape =>
        {
            (y, Some(s))
        }
        _ => (x, None),
    }
}

/// Linformer's `e @ x` for `x: [.., n, d]` with `e` the seeded `[r, n]` Gaussian projection.
fn expand_projection(b: &mut GraphBuilder, x: NodeId, seed: u64, r: u64) -> Result<NodeId, String> {
    let shape = &b.graph.node(x).shape;
    let n = shape
        .get(
            shape
                .len()
                .checked_sub(2)
                .ok_or("a projection of a vector")?,
        )
        .cloned()
        .ok_or("a projection of a vector")?;
    let kind = RandomKind::Gaussian;
    let e = b.add(
        Op::Random { kind, seed },
        &[],
        Some(&vec![Dim::Const(r), n]),
    )?;
    b.add(Op::MatMul, &[e, x], None)
}

/// Whether the sub-terms `a` and `b` of `expr` are equal (a parsed `RecExpr` is not
/// hash-consed, so equal terms may have different ids).
pub(crate) fn same_term(expr: &RecExpr<Attn>, a: Id, b: Id) -> bool {
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

/// Removes the nodes of `kernel` that the output does not use (parameters always stay), so the
/// lowering invariants hold: inputs first, every other node feeds the output, topological.
fn prune(kernel: &mut Kernel) {
    let graph = &kernel.graph;
    let count = graph.len();
    let mut live = vec![false; count];
    for o in kernel.output_nodes() {
        if o.index() < count {
            live[o.index()] = true;
        }
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
    let mut fresh = attnc_ir::Graph::new();
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
    for extra in &mut kernel.extra_outputs {
        if let Some(out) = map.get(extra.node.index()).copied().flatten() {
            extra.node = out;
        }
    }
    kernel.graph = fresh;
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_ir::interp::evaluate_outputs;
    use attnc_ir::Param;
    use ndarray::ArrayD;

    /// FAVOR+ features of `y·s` for a scalar `s` read `y` itself (the scale moved onto the
    /// matrix and the norm) and equal those of `y` times a vector of `s`, which the lowering
    /// keeps as written.
    #[test]
    fn favor_features_of_a_scaled_input_move_the_scale_off_it() {
        let sym = |s: &str| Dim::Sym(s.to_string());
        let param = |name: &str, shape: Vec<Dim>| Param {
            name: name.to_string(),
            dtype: DType::F32,
            shape,
            span: Default::default(),
        };
        let params = vec![
            param("y", vec![sym("n"), sym("d")]),
            param("s", vec![]),
            param("sv", vec![sym("d")]),
        ];
        let (n, d, scale) = (37usize, 8usize, 0.6f64);
        let bindings: Bindings = [("n".to_string(), n as u64), ("d".to_string(), d as u64)]
            .into_iter()
            .collect();
        let y = ArrayD::from_shape_fn(vec![n, d], |i| {
            ((i[0] * 7 + i[1] * 3) % 11) as f64 / 5.0 - 1.0
        });
        let inputs = [
            y,
            ArrayD::from_elem(vec![], scale),
            ArrayD::from_elem(vec![d], scale),
        ];
        for keys in [false, true] {
            let mut b = GraphBuilder::with_params(&params);
            let (y, s, sv) = (NodeId::new(0), NodeId::new(1), NodeId::new(2));
            let by_scalar = b
                .add(Op::Binary(BinaryOp::Mul), &[y, s], None)
                .expect("y·s");
            let by_vector = b
                .add(Op::Binary(BinaryOp::Mul), &[y, sv], None)
                .expect("y·sv");
            let moved = expand_favor(&mut b, by_scalar, 7, 16, keys).expect("features of y·s");
            let kept = expand_favor(&mut b, by_vector, 7, 16, keys).expect("features of y·sv");
            // The folded features' product reads y, not y·s.
            let readers_of_scaled = (0..b.graph.len())
                .map(NodeId::new)
                .filter(|&id| b.graph.operands(id).contains(&by_scalar))
                .count();
            assert_eq!(readers_of_scaled, 0, "keys {keys}");
            let kernel = Kernel {
                name: "favor".to_string(),
                params: params.clone(),
                graph: b.graph,
                output: moved,
                ret_dtype: DType::F32,
                extra_outputs: Vec::new(),
                approx: Vec::new(),
                span: Default::default(),
            };
            let values =
                evaluate_outputs(&kernel, &bindings, &inputs, &[moved, kept]).expect("evaluates");
            let error =
                attnc_ir::compare::compare(values[0].iter().copied(), values[1].iter().copied())
                    .error();
            assert!(error < 1e-12, "keys {keys}: {error}");
        }
    }
}
