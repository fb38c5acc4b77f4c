//! Planning the ops of gradient graphs ([`attnc_ir::backward`]): `sum-to` as reduction steps
//! (dropping leading axes is a stride remap), `greater` as an elementwise expression, and the
//! fused gradients as backward steps. All the gradients of one fused op over the same operands
//! (the `dq`, `dk`, `dv` of one attention) are planned as ONE step that writes each into a
//! buffer of its own; the attention's forward output operand is not read (the step recomputes
//! the forward with its log-sum-exp), so a forward planned only for it is not planned at all.

use super::fused::{batch_strides, place, tensor_ref};
use super::{broadcast_map, contiguous, operand, plan_error, Planner, StepKind, Val};
use crate::backward::{
    AttentionBackward, BackwardKernel, BackwardStep, GradLayout, LinearBackward,
};
use crate::buffer::Elem;
use crate::error::Result;
use crate::host::PoolSpec;
use crate::kernels::attention::{AttentionSpec, TensorRef};
use crate::kernels::elementwise::Expr;
use crate::kernels::reduce::AxisSpec;
use crate::wide::Tier;
use attnc_ir::backward::{AttentionGrad, BackwardOp, LinearGrad};
use attnc_ir::fused::{Fused, FusedShape};
use attnc_ir::{DType, Kernel, NodeId, Op, ReduceOp};

/// The operand slot of a fused gradient that the backward step does not read: the
/// attention's own output `o` (the step recomputes it).
pub(super) fn unread_operand(op: &Op) -> Option<usize> {
    match op {
        Op::Backward(BackwardOp::Attention(a)) => Some(a.attention.arity()),
        _ => None,
    }
}

/// Whether `op` is a fused gradient (planned as a backward step, or by its plain gradient
/// graph where [`unsupported`]).
pub(super) fn is_fused_grad(op: &Op) -> bool {
    matches!(
        op,
        Op::Backward(BackwardOp::Attention(_) | BackwardOp::Linear(_))
    )
}

/// Why the backward kernels cannot compute fused gradient node `id` (it is then planned by
/// its plain gradient graph), or `None`.
pub(super) fn unsupported(
    kernel: &Kernel,
    id: NodeId,
    shapes: &[Vec<usize>],
    bindings: &attnc_ir::Bindings,
) -> Option<String> {
    let Op::Backward(BackwardOp::Attention(a)) = &kernel.graph.node(id).op else {
        return None;
    };
    let operands = kernel.graph.operands(id);
    let forward = a.attention.arity();
    let slices: Vec<&[usize]> = operands[..forward.min(operands.len())]
        .iter()
        .map(|o| shapes[o.index()].as_slice())
        .collect();
    let fs = match Fused::Attention(&a.attention).check(&slices) {
        Ok(fs) => fs,
        Err(e) => return Some(e),
    };
    // The operands as the step would read them: contiguous, in their node's type.
    let refs: Vec<TensorRef> = operands[..forward]
        .iter()
        .zip(&slices)
        .map(|(&o, shape)| {
            let node = kernel.graph.node(o);
            let dtype = match node.op {
                Op::Input { .. } => node.dtype,
                _ => DType::F32,
            };
            contiguous_ref(o.index(), shape, &fs.batch, dtype)
        })
        .collect();
    let mut spec = match spec_of(&fs, a, refs, bindings) {
        Ok(spec) => spec,
        Err(e) => return Some(e),
    };
    spec.score = a.attention.score.folded(bindings);
    let d_o = contiguous_ref(0, &fs.output(), &fs.batch, DType::F32);
    let layouts = vec![layout(a.wrt, slices[a.wrt], &fs.batch)];
    match AttentionBackward::new(&spec, (d_o, None), layouts, false) {
        Some(_) => None,
        None => Some(format!(
            "the backward kernels do not evaluate the score {}",
            a.attention.score
        )),
    }
}

/// A tensor of `shape` stored contiguously, broadcast into `batch ++ [rows, cols]`.
fn contiguous_ref(slot: usize, shape: &[usize], batch: &[usize], dtype: DType) -> TensorRef {
    let rank = batch.len() + 2;
    let pad = rank - shape.len().min(rank);
    let own = contiguous(shape);
    let mut strides = vec![0usize; rank];
    for (axis, (&size, &stride)) in shape.iter().zip(&own).enumerate() {
        if size != 1 {
            strides[axis + pad] = stride;
        }
    }
    TensorRef {
        slot,
        name: format!("%{slot}"),
        dtype,
        convert: None,
        batch_strides: strides[..rank - 2].to_vec(),
        row_stride: strides[rank - 2],
        col_stride: strides[rank - 1],
    }
}

/// Where the gradient of operand `slot` (of `shape`) goes: contiguous in the operand's shape.
fn layout(slot: usize, shape: &[usize], batch: &[usize]) -> GradLayout {
    let t = contiguous_ref(0, shape, batch, DType::F32);
    GradLayout {
        slot,
        shape: shape.to_vec(),
        batch_strides: t.batch_strides,
        row_stride: t.row_stride,
        col_stride: t.col_stride,
    }
}

/// The forward attention's spec over `refs`; its mask's sizes resolved at `bindings` (the
/// error says which size does not resolve).
fn spec_of(
    fs: &FusedShape<usize>,
    a: &AttentionGrad,
    mut refs: Vec<TensorRef>,
    bindings: &attnc_ir::Bindings,
) -> std::result::Result<AttentionSpec, String> {
    let mask = a
        .attention
        .mask
        .as_ref()
        .map(|m| m.resolve(bindings))
        .transpose()
        .map_err(|e| e.to_string())?;
    let biases = refs.split_off(3.min(refs.len()));
    let mut qkv = refs.into_iter();
    let (q, k, v) = (
        qkv.next()
            .unwrap_or_else(|| contiguous_ref(0, &[0, 0], &[], DType::F32)),
        qkv.next()
            .unwrap_or_else(|| contiguous_ref(0, &[0, 0], &[], DType::F32)),
        qkv.next()
            .unwrap_or_else(|| contiguous_ref(0, &[0, 0], &[], DType::F32)),
    );
    Ok(AttentionSpec {
        batch: fs.batch.clone(),
        m: fs.m,
        n: fs.n,
        d: fs.d,
        dv: fs.dv,
        q,
        k,
        v,
        biases,
        segments: Vec::new(),
        score: a.attention.score.clone(),
        mask,
        precision: attnc_ir::Precision::Exact,
        tier: Tier::Avx512,
        lse: false,
    })
}

/// Plans backward op node `id`; `vals` may already hold its value (planned with a sibling).
pub(super) fn plan_backward(
    p: &mut Planner<'_>,
    id: NodeId,
    op: &BackwardOp,
    vals: &mut [Option<Val>],
) -> Result<Val> {
    if let Some(v) = vals[id.index()].take() {
        return Ok(v);
    }
    match op {
        BackwardOp::SumTo => sum_to(p, id, vals),
        BackwardOp::Greater => {
            let ops = p.kernel.graph.operands(id);
            let shape = p.shapes[id.index()].clone();
            let rank = shape.len();
            let same = |v: &Val| v.expr.remap(&broadcast_map(&v.shape, &shape), rank);
            let (x, y) = (operand(vals, ops[0])?, operand(vals, ops[1])?);
            Ok(Val {
                expr: Expr::Greater(Box::new(same(&x)), Box::new(same(&y))),
                shape,
            })
        }
        BackwardOp::Attention(a) => attention_grad(p, id, a, vals),
        BackwardOp::Linear(l) => linear_grad(p, id, l, vals),
        BackwardOp::Unpool { op, size } => {
            let graph = &p.kernel.graph;
            let ops = graph.operands(id);
            let node_op = graph.node(id).op.clone();
            let shape = p.shapes[id.index()].clone();
            let rank = shape.len();
            let size = size
                .resolve(p.bindings)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s > 0)
                .ok_or_else(|| plan_error(&node_op, "the block size is not a bound size"))?;
            if rank < 2 {
                return Err(plan_error(&node_op, "pooling needs two axes"));
            }
            let (x, dy) = (operand(vals, ops[0])?, operand(vals, ops[1])?);
            let inputs = vec![p.contiguous_buffer(&x), p.contiguous_buffer(&dy)];
            let spec = PoolSpec {
                op: *op,
                outer: shape[..rank - 2].iter().product(),
                n: shape[rank - 2],
                width: shape[rank - 1],
                size,
            };
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Unpool(spec), inputs, out);
            Ok(Planner::leaf(out, &shape))
        }
    }
}

/// `x` summed down to node `id`'s shape: one sum step per summed axis (kept with size 1),
/// then the leading axes dropped by a stride remap.
fn sum_to(p: &mut Planner<'_>, id: NodeId, vals: &[Option<Val>]) -> Result<Val> {
    let ops = p.kernel.graph.operands(id);
    let mut x = operand(vals, ops[0])?;
    let to = p.shapes[id.index()].clone();
    let from = x.shape.clone();
    let op = &p.kernel.graph.node(id).op;
    let lead = from
        .len()
        .checked_sub(to.len())
        .ok_or_else(|| plan_error(op, "sums to a higher rank"))?;
    let summed: Vec<usize> = (0..from.len())
        .filter(|&a| from[a] != 1 && (a < lead || to[a - lead] == 1))
        .collect();
    if !summed.is_empty() {
        let mut buf = p.contiguous_buffer(&x);
        let mut shape = from.clone();
        for &axis in &summed {
            let spec = AxisSpec::new(&shape, axis);
            shape[axis] = 1;
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Reduce(ReduceOp::Sum, spec), vec![buf], out);
            buf = out;
        }
        x = Planner::leaf(buf, &shape);
    }
    let map: Vec<Option<usize>> = (0..from.len())
        .map(|a| (a >= lead && x.shape[a] != 1).then(|| a - lead))
        .collect();
    Ok(Val {
        expr: x.expr.remap(&map, to.len()),
        shape: to,
    })
}

/// The fused attention gradients over the same operands as node `id`, as one step.
fn attention_grad(
    p: &mut Planner<'_>,
    id: NodeId,
    a: &AttentionGrad,
    vals: &mut [Option<Val>],
) -> Result<Val> {
    let graph = &p.kernel.graph;
    let op = graph.node(id).op.clone();
    let operands = graph.operands(id);
    let group = siblings(graph, id, a.wrt, |op| match op {
        Op::Backward(BackwardOp::Attention(b))
            if b.attention == a.attention && b.lse_cotangent == a.lse_cotangent =>
        {
            Some(b.wrt)
        }
        _ => None,
    });
    let forward = a.attention.arity();
    let shapes: Vec<Vec<usize>> = operands
        .iter()
        .map(|o| p.shapes[o.index()].clone())
        .collect();
    let slices: Vec<&[usize]> = shapes[..forward].iter().map(Vec::as_slice).collect();
    let fs = Fused::Attention(&a.attention)
        .check(&slices)
        .map_err(|e| plan_error(&op, e))?;
    let mut refs = Vec::with_capacity(forward);
    // A mask's data (segment ids, a block gate) follows the score's operands.
    let first_segment = 3 + a.attention.score.biases();
    let roles = a
        .attention
        .mask
        .as_ref()
        .map(attnc_ir::segments::roles)
        .unwrap_or_default();
    let mut segments = Vec::new();
    for (index, &o) in operands[..forward].iter().enumerate() {
        let placed = place(p, o, vals, index < 3)?;
        if index >= first_segment {
            let role = roles.get(index - first_segment).copied().flatten();
            let gate = matches!(role, Some(attnc_ir::segments::Role::Gate(_)));
            segments.push(super::fused::segment_ref(
                &placed,
                &shapes[index],
                &fs.batch,
                gate,
            ));
        } else {
            refs.push(tensor_ref(p, &placed, &shapes[index], &fs.batch));
        }
    }
    let d_o_node = operands[forward + 1];
    let placed = place(p, d_o_node, vals, true)?;
    let d_o = tensor_ref(p, &placed, &shapes[forward + 1], &fs.batch);
    let mut d_lse = match a.lse_cotangent {
        true => {
            let placed = place(p, operands[forward + 2], vals, true)?;
            Some(tensor_ref(p, &placed, &shapes[forward + 2], &fs.batch))
        }
        false => None,
    };
    let mut spec = spec_of(&fs, a, refs, p.bindings).map_err(|e| plan_error(&op, e))?;
    spec.score = a.attention.score.folded(p.bindings);
    spec.segments = segments;
    // Step inputs: each tensor's buffer once (converted first where it is a 16-bit cast).
    let mut inputs: Vec<usize> = Vec::new();
    let mut tensors: Vec<&mut TensorRef> = vec![&mut spec.q, &mut spec.k, &mut spec.v];
    tensors.extend(spec.biases.iter_mut());
    let mut d_o = d_o;
    tensors.push(&mut d_o);
    tensors.extend(d_lse.as_mut());
    tensors.extend(spec.segments.iter_mut());
    for t in tensors {
        let mut buf = t.slot;
        if let Some(to) = t.convert.take() {
            let out = p.new_typed_buffer(p.buffers[buf].len, Elem::of(to));
            p.push(StepKind::Convert(Elem::of(to)), vec![buf], out);
            buf = out;
        }
        t.dtype = p.buffers[buf].elem.dtype();
        t.slot = match inputs.iter().position(|&b| b == buf) {
            Some(k) => k,
            None => {
                inputs.push(buf);
                inputs.len() - 1
            }
        };
    }
    let (slots, layouts) = grad_layouts(&group, &shapes, &fs.batch);
    let backward = AttentionBackward::new(&spec, (d_o, d_lse), layouts.clone(), p.tiers.avx512)
        .ok_or_else(|| plan_error(&op, "the backward kernels do not evaluate its score"))?;
    let outputs: Vec<usize> = layouts.iter().map(|g| p.new_buffer(g.len())).collect();
    let step = BackwardStep {
        kernel: BackwardKernel::Attention(Box::new(backward)),
        outputs: outputs.clone(),
    };
    p.push(StepKind::Backward(Box::new(step)), inputs, outputs[0]);
    finish(group, &slots, &outputs, &layouts, id, vals)
}

/// Node `id` (the gradient with respect to operand `wrt`) and its siblings: later nodes over the
/// same operands for which `sibling_wrt` gives the operand (the same fused op's gradients, so
/// one backward step computes them all).
fn siblings(
    graph: &attnc_ir::Graph,
    id: NodeId,
    wrt: usize,
    sibling_wrt: impl Fn(&Op) -> Option<usize>,
) -> Vec<(NodeId, usize)> {
    let operands = graph.operands(id);
    let mut group = vec![(id, wrt)];
    for other in graph.topo_order().into_iter().skip(id.index() + 1) {
        if let Some(w) = sibling_wrt(&graph.node(other).op) {
            if graph.operands(other) == operands {
                group.push((other, w));
            }
        }
    }
    group
}

/// The distinct operands the group differentiates, in order, with their gradients' layouts.
fn grad_layouts(
    group: &[(NodeId, usize)],
    shapes: &[Vec<usize>],
    batch: &[usize],
) -> (Vec<usize>, Vec<GradLayout>) {
    let mut slots: Vec<usize> = group.iter().map(|g| g.1).collect();
    slots.sort_unstable();
    slots.dedup();
    let layouts = slots
        .iter()
        .map(|&s| layout(s, &shapes[s], batch))
        .collect();
    (slots, layouts)
}

/// Sets every sibling's value to its gradient buffer and returns node `id`'s.
fn finish(
    group: Vec<(NodeId, usize)>,
    slots: &[usize],
    outputs: &[usize],
    layouts: &[GradLayout],
    id: NodeId,
    vals: &mut [Option<Val>],
) -> Result<Val> {
    let mut own = None;
    for (node, slot) in group {
        let k = slots.iter().position(|&s| s == slot).unwrap_or_default();
        let v = Planner::leaf(outputs[k], &layouts[k].shape);
        if node == id {
            own = Some(v);
        } else {
            vals[node.index()] = Some(v);
        }
    }
    own.ok_or_else(|| crate::error::JitError::Shape("a gradient lost its step".to_string()))
}

/// The linear attention gradients over the same operands as node `id`, as one step over
/// contiguous `φQ, φK, V, dO`.
fn linear_grad(
    p: &mut Planner<'_>,
    id: NodeId,
    l: &LinearGrad,
    vals: &mut [Option<Val>],
) -> Result<Val> {
    let graph = &p.kernel.graph;
    let op = graph.node(id).op.clone();
    let operands = graph.operands(id);
    let group = siblings(graph, id, l.wrt, |op| match op {
        Op::Backward(BackwardOp::Linear(b)) if b.linear == l.linear => Some(b.wrt),
        _ => None,
    });
    let shapes: Vec<Vec<usize>> = operands
        .iter()
        .map(|o| p.shapes[o.index()].clone())
        .collect();
    let slices: Vec<&[usize]> = shapes[..3].iter().map(Vec::as_slice).collect();
    let fs = Fused::Linear(&l.linear)
        .check(&slices)
        .map_err(|e| plan_error(&op, e))?;
    let mut inputs = Vec::with_capacity(4);
    let mut strides: [Vec<usize>; 4] = Default::default();
    for (index, &o) in operands.iter().enumerate() {
        let v = operand(vals, o)?;
        inputs.push(p.contiguous_buffer(&v));
        strides[index] = batch_strides(&shapes[index], &fs.batch);
    }
    let (slots, layouts) = grad_layouts(&group, &shapes, &fs.batch);
    let backward = LinearBackward {
        batch: fs.batch.clone(),
        batch_strides: strides,
        m: fs.m,
        n: fs.n,
        d: fs.d,
        dv: fs.dv,
        causal: l.linear.causal,
        normalizer: l.linear.normalizer,
        grads: layouts.clone(),
    };
    let outputs: Vec<usize> = layouts.iter().map(|g| p.new_buffer(g.len())).collect();
    let step = BackwardStep {
        kernel: BackwardKernel::Linear(backward),
        outputs: outputs.clone(),
    };
    p.push(StepKind::Backward(Box::new(step)), inputs, outputs[0]);
    finish(group, &slots, &outputs, &layouts, id, vals)
}
