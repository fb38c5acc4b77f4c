//! Planning the plain ops: elementwise expressions stay lazy (strided leaves, constants,
//! masks, broadcasts and transposes are stride remaps); reductions, softmax, casts, random
//! matrices and matrix products become steps.

use super::{broadcast_map, operand, plan_error, Planner, StepKind, Val};
use crate::buffer::Elem;
use crate::error::Result;
use crate::host::PoolSpec;
use crate::kernels::elementwise::{Coord, Expr};
use crate::kernels::matmul::MatMulSpec;
use crate::kernels::reduce::AxisSpec;
use attnc_ir::{NodeId, Op, ReduceOp};
use attnc_wide::reduce::RowReduce;
use std::sync::Arc;

pub(super) fn plan_node(
    p: &mut Planner<'_>,
    id: NodeId,
    vals: &[Option<Val>],
    input_shapes: &[Vec<usize>],
) -> Result<Val> {
    let node = p.kernel.graph.node(id);
    let shape = p.shapes[id.index()].clone();
    let ops = p.kernel.graph.operands(id);
    if ops.len() != node.op.arity() {
        return Err(plan_error(&node.op, "wrong number of operands"));
    }
    let rank = shape.len();
    let same = |v: &Val| v.expr.remap(&broadcast_map(&v.shape, &shape), rank);
    let val = |expr: Expr| Val {
        expr,
        shape: shape.clone(),
    };
    Ok(match &node.op {
        Op::Input { index, .. } => {
            let s = input_shapes
                .get(*index)
                .ok_or_else(|| plan_error(&node.op, "no such parameter"))?;
            if p.buffers[*index].elem == Elem::F32 {
                Planner::leaf(*index, s)
            } else {
                // f32 steps read half-precision inputs through one widened copy.
                let out = p.new_buffer(p.buffers[*index].len);
                p.push(StepKind::Convert(Elem::F32), vec![*index], out);
                Planner::leaf(out, s)
            }
        }
        Op::Const(v) => val(Expr::Const(*v as f32)),
        Op::DimValue(d) => match d.resolve(p.bindings) {
            Some(v) => val(Expr::Const(v as f32)),
            None => return Err(plan_error(&node.op, "unbound dimension")),
        },
        Op::Fill { value } => val(Expr::Const(*value as f32)),
        Op::RelPos => {
            if rank < 2 {
                return Err(plan_error(&node.op, "relpos needs two axes"));
            }
            val(Expr::RelPos {
                i: Coord::Axis(rank - 2),
                j: Coord::Axis(rank - 1),
                m: shape[rank - 2],
                n: shape[rank - 1],
            })
        }
        Op::Unary(u) => {
            let x = operand(vals, ops[0])?;
            val(Expr::Unary(*u, Box::new(same(&x))))
        }
        Op::Binary(bop) => {
            let x = operand(vals, ops[0])?;
            let y = operand(vals, ops[1])?;
            val(Expr::Binary(*bop, Box::new(same(&x)), Box::new(same(&y))))
        }
        Op::Mask { pattern, fill } => {
            if rank < 2 {
                return Err(plan_error(&node.op, "mask needs two axes"));
            }
            // The elementwise kernel evaluates positions only.
            if !pattern.is_static() {
                return Err(plan_error(
                    &node.op,
                    "a document mask outside a fused attention is not compiled; run with --engine interp",
                ));
            }
            let x = operand(vals, ops[0])?;
            val(Expr::Mask {
                pattern: pattern
                    .resolve(p.bindings)
                    .map_err(|e| plan_error(&node.op, e.to_string()))?,
                fill: *fill as f32,
                i: Coord::Axis(rank - 2),
                j: Coord::Axis(rank - 1),
                m: shape[rank - 2],
                n: shape[rank - 1],
                x: Box::new(same(&x)),
            })
        }
        Op::Transpose => {
            let x = operand(vals, ops[0])?;
            if rank < 2 {
                return Err(plan_error(&node.op, "transpose needs two axes"));
            }
            let mut map: Vec<Option<usize>> = (0..rank).map(Some).collect();
            map.swap(rank - 2, rank - 1);
            val(x.expr.remap(&map, rank))
        }
        Op::Random { kind, seed } => {
            let &[rows, cols] = shape.as_slice() else {
                return Err(plan_error(&node.op, "a random matrix needs two axes"));
            };
            let data: Arc<[f32]> = attnc_ir::random::shared_random_matrix(*kind, *seed, rows, cols)
                .iter()
                .map(|&x| x as f32)
                .collect();
            let out = p.new_buffer(data.len());
            p.push(StepKind::Constant(data), Vec::new(), out);
            Planner::leaf(out, &shape)
        }
        Op::Cast { to } => {
            let x = operand(vals, ops[0])?;
            let src = p.contiguous_buffer(&x);
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Cast(*to), vec![src], out);
            Planner::leaf(out, &shape)
        }
        Op::Reduce { op, axis } => {
            let x = operand(vals, ops[0])?;
            let src = p.contiguous_buffer(&x);
            let spec = AxisSpec::new(&x.shape, *axis);
            let out = p.new_buffer(shape.iter().product());
            // Rows of f32 on the full-width tier: 16 lanes instead of one element at a time.
            let on_rows = match op {
                ReduceOp::Sum => Some(RowReduce::Sum),
                ReduceOp::Mean => Some(RowReduce::Mean),
                ReduceOp::Max => Some(RowReduce::Max),
                ReduceOp::LogSumExp => None,
            }
            .filter(|_| p.tiers.avx512 && spec.inner == 1 && p.buffers[src].elem == Elem::F32);
            let kind = match on_rows {
                Some(row) => StepKind::RowReduce(row, spec),
                None => StepKind::Reduce(*op, spec),
            };
            p.push(kind, vec![src], out);
            Planner::leaf(out, &shape)
        }
        Op::Softmax { axis } => {
            let x = operand(vals, ops[0])?;
            let src = p.contiguous_buffer(&x);
            let spec = AxisSpec::new(&x.shape, *axis);
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Softmax(spec), vec![src], out);
            Planner::leaf(out, &shape)
        }
        Op::SoftmaxSink => {
            let x = operand(vals, ops[0])?;
            let s = operand(vals, ops[1])?;
            if rank == 0 {
                return Err(plan_error(&node.op, "softmax_sink needs an axis"));
            }
            let src = p.contiguous_buffer(&x);
            // One sink per row: the sink broadcast into `[.., 1]`, contiguous.
            let mut rows = shape.clone();
            rows[rank - 1] = 1;
            let sinks = Val {
                expr: s.expr.remap(&broadcast_map(&s.shape, &rows), rank),
                shape: rows,
            };
            let sinks = p.contiguous_buffer(&sinks);
            let spec = AxisSpec::new(&x.shape, rank - 1);
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::SoftmaxSink(spec), vec![src, sinks], out);
            Planner::leaf(out, &shape)
        }
        Op::Pool { op, size } => {
            let x = operand(vals, ops[0])?;
            if rank < 2 {
                return Err(plan_error(&node.op, "pooling needs two axes"));
            }
            let size = size
                .resolve(p.bindings)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s > 0)
                .ok_or_else(|| plan_error(&node.op, "the block size is not a bound size"))?;
            let src = p.contiguous_buffer(&x);
            let spec = PoolSpec {
                op: *op,
                outer: x.shape[..rank - 2].iter().product(),
                n: x.shape[rank - 2],
                width: x.shape[rank - 1],
                size,
            };
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Pool(spec), vec![src], out);
            Planner::leaf(out, &shape)
        }
        Op::Cumsum { axis } => {
            let x = operand(vals, ops[0])?;
            let src = p.contiguous_buffer(&x);
            let spec = AxisSpec::new(&x.shape, *axis);
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Cumsum(spec), vec![src], out);
            Planner::leaf(out, &shape)
        }
        Op::MatMul => {
            let a = operand(vals, ops[0])?;
            let b = operand(vals, ops[1])?;
            plan_matmul(p, &node.op, &a, &b, &shape)?
        }
        Op::Attention(_) | Op::LinearAttention(_) | Op::Backward(_) => {
            return Err(plan_error(&node.op, "a fused op reached the plain planner"))
        }
    })
}

pub(super) fn plan_matmul(
    p: &mut Planner<'_>,
    op: &Op,
    a: &Val,
    b: &Val,
    shape: &[usize],
) -> Result<Val> {
    let (ra, rb, r) = (a.shape.len(), b.shape.len(), shape.len());
    if ra < 2 || rb < 2 || r < 2 {
        return Err(plan_error(op, "matmul needs two axes on both operands"));
    }
    let (abuf, astr) = p.strided(a);
    let (bbuf, bstr) = p.strided(b);
    let batch = shape[..r - 2].to_vec();
    let batch_strides = |shape_x: &[usize], strides: &[usize]| -> Vec<usize> {
        let lead = shape_x.len() - 2;
        (0..r - 2)
            .map(|t| {
                let offset = (r - 2) - lead;
                if t < offset {
                    0
                } else {
                    let k = t - offset;
                    if shape_x[k] == 1 {
                        0
                    } else {
                        strides[k]
                    }
                }
            })
            .collect()
    };
    let spec = MatMulSpec {
        a_batch_strides: batch_strides(&a.shape, &astr),
        b_batch_strides: batch_strides(&b.shape, &bstr),
        batch,
        m: a.shape[ra - 2],
        k: a.shape[ra - 1],
        n: b.shape[rb - 1],
        a_rs: astr[ra - 2],
        a_cs: astr[ra - 1],
        b_rs: bstr[rb - 2],
        b_cs: bstr[rb - 1],
        wide: p.tiers.avx512,
    };
    if spec.k != b.shape[rb - 2] || spec.m != shape[r - 2] || spec.n != shape[r - 1] {
        return Err(plan_error(op, "operand shapes do not agree"));
    }
    let out = p.new_buffer(shape.iter().product());
    p.push(StepKind::MatMul(spec), vec![abuf, bbuf], out);
    Ok(Planner::leaf(out, shape))
}
