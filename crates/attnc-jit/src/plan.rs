//! Lowering an IR graph at bound shapes to a list of steps over buffers.
//!
//! Every node becomes a lazy [`Expr`] over the coordinates of its own shape: inputs and
//! materialized results are strided leaves, and elementwise ops, constants, fills, masks,
//! relpos and transposes only build bigger expressions (broadcasting and transposition are
//! stride remaps). A value is materialized (one elementwise step) only when a non-elementwise
//! op consumes it in a form it cannot read through strides, when several users share it, or
//! when it is the kernel's result. Matrix products read both operands through strides, so
//! `k.T` is never copied.
//!
//! Buffers have an element type ([`Elem`]): inputs keep their storage type. Steps that compute
//! in f32 read an f16/bf16 input through one host [`StepKind::Convert`] step (planned only when
//! such a step uses the input); the fused attention kernel loads bf16 lanes natively, and f16
//! lanes while fewer than 16 queries share each key (else one host conversion to f32 is cheaper
//! than widening in every tile); a `cast(x, bf16)` operand of its Q, K or V becomes one
//! conversion of `x` to a bf16 buffer.
//!
//! # Architecture invariant
//! Buffers `0..params.len()` are the kernel inputs in their storage types; every other buffer
//! is written by exactly one step, before any step that reads it. Every step but
//! [`StepKind::Convert`], [`StepKind::Quantize`] and [`StepKind::Attention`] reads and writes
//! f32 buffers only.

use crate::buffer::Elem;
use crate::error::{JitError, Result};
use crate::kernels::attention::quant::QuantLayout;
use crate::kernels::attention::{match_attention, AttentionSpec, Precision};
use crate::kernels::elementwise::{Coord, ElementwiseSpec, Expr};
use crate::kernels::matmul::MatMulSpec;
use crate::kernels::prefix::{match_prefix, PrefixMatch, PrefixSpec};
use crate::kernels::reduce::AxisSpec;
use attnc_ir::{BinaryOp, Bindings, DType, Kernel, NodeId, Op, ReduceOp};
use std::sync::Arc;

/// Where a buffer's contents come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferSource {
    /// Kernel parameter `index`.
    Input(usize),
    /// Written by a step.
    Temp,
}

/// One buffer of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferInfo {
    /// Number of elements.
    pub len: usize,
    /// Element type.
    pub elem: Elem,
    /// Its origin.
    pub source: BufferSource,
}

/// What a step computes.
#[derive(Clone, Debug)]
pub enum StepKind {
    /// A fused elementwise expression.
    Elementwise(ElementwiseSpec),
    /// A (batched) matrix product of `inputs[0] @ inputs[1]`.
    MatMul(MatMulSpec),
    /// A reduction of a contiguous `[outer, len, inner]` input.
    Reduce(ReduceOp, AxisSpec),
    /// A softmax of a contiguous `[outer, len, inner]` input along `len`.
    Softmax(AxisSpec),
    /// Rounding to a storage type and back, done by the host (f16/bf16 returns).
    Cast(DType),
    /// A constant computed at compile time (the seeded matrices of approximations), copied
    /// into the output by the host.
    Constant(Arc<[f32]>),
    /// Conversion of one buffer to another element type, done by the host (f16/bf16 inputs
    /// widened for f32 steps, f32 operands rounded for the fused attention kernel).
    Convert(Elem),
    /// The int8 attention pre-pass, done by the host: reads Q, K, V (in this order, any of
    /// f32/f16/bf16) and writes the packed quantized operands (a byte buffer).
    Quantize(Box<QuantLayout>),
    /// Fused `softmax(mask?(score(Q Kᵀ))) V`; reads the buffers its
    /// [`TensorRef`](crate::kernels::attention::TensorRef) slots name, in their element types
    /// (int8: the packed buffer first, then the biases).
    Attention(Box<AttentionSpec>),
    /// Causal linear attention through a running prefix state; reads `φQ`, `φK`, `V`.
    Prefix(PrefixSpec),
}

/// One step: reads `inputs`, writes all of `output`.
#[derive(Clone, Debug)]
pub struct Step {
    /// The generated function's name.
    pub name: String,
    /// What it computes.
    pub kind: StepKind,
    /// The buffers read, in operand-slot order.
    pub inputs: Vec<usize>,
    /// The buffer written.
    pub output: usize,
}

impl Step {
    /// The work space (batches, rows) of the step's kernel.
    pub fn work(&self) -> (usize, usize) {
        match &self.kind {
            StepKind::Elementwise(s) => s.work(),
            StepKind::MatMul(s) => s.work(),
            StepKind::Reduce(_, s) | StepKind::Softmax(s) => s.work(),
            StepKind::Cast(_)
            | StepKind::Constant(_)
            | StepKind::Convert(_)
            | StepKind::Quantize(_) => (1, 1),
            StepKind::Attention(s) => (s.batch_count(), s.m),
            StepKind::Prefix(s) => s.work(),
        }
    }

    /// A rough operation count, to decide whether threads pay off.
    pub fn cost(&self, buffers: &[BufferInfo]) -> usize {
        match &self.kind {
            StepKind::MatMul(s) => s.flops(),
            StepKind::Prefix(s) => s.flops(),
            StepKind::Attention(s) if s.precision == Precision::Int8 => 2usize
                .saturating_mul(s.batch_count())
                .saturating_mul(s.m)
                .saturating_mul(s.n)
                .saturating_mul(s.d.max(s.dv).max(1)),
            StepKind::Attention(s) => 4usize
                .saturating_mul(s.batch_count())
                .saturating_mul(s.m)
                .saturating_mul(s.n)
                .saturating_mul(s.d.max(s.dv).max(1)),
            _ => self
                .inputs
                .iter()
                .map(|&b| buffers[b].len)
                .sum::<usize>()
                .saturating_add(buffers[self.output].len),
        }
    }
}

/// A kernel lowered at bound shapes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The kernel's name.
    pub kernel: String,
    /// Every buffer; the first ones are the inputs.
    pub buffers: Vec<BufferInfo>,
    /// The steps, in execution order.
    pub steps: Vec<Step>,
    /// The buffer holding the result.
    pub output: usize,
    /// The result's shape.
    pub output_shape: Vec<usize>,
    /// The bound shape of each parameter.
    pub input_shapes: Vec<Vec<usize>>,
}

impl std::fmt::Display for Plan {
    /// One line per buffer and step, for `attnc explain`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "plan {} ({} steps)", self.kernel, self.steps.len())?;
        for (i, b) in self.buffers.iter().enumerate() {
            match b.source {
                BufferSource::Input(p) => {
                    writeln!(f, "  buf{i}: input #{p}, {} {}", b.len, b.elem.keyword())?
                }
                BufferSource::Temp => {
                    writeln!(f, "  buf{i}: temp, {} {}", b.len, b.elem.keyword())?
                }
            }
        }
        for step in &self.steps {
            let what = match &step.kind {
                StepKind::Elementwise(s) => {
                    format!("elementwise {:?} ({} nodes, fused)", s.shape, s.expr.size())
                }
                StepKind::MatMul(s) => format!(
                    "matmul batch {:?} {}x{}x{} (a strides {}/{}, b strides {}/{})",
                    s.batch, s.m, s.k, s.n, s.a_rs, s.a_cs, s.b_rs, s.b_cs
                ),
                StepKind::Reduce(op, s) => {
                    format!(
                        "{op} [{} x {} x {}] along the middle axis",
                        s.outer, s.len, s.inner
                    )
                }
                StepKind::Constant(data) => {
                    format!("constant ({} f32, computed at compile time)", data.len())
                }
                StepKind::Softmax(s) => {
                    format!(
                        "softmax [{} x {} x {}] along the middle axis",
                        s.outer, s.len, s.inner
                    )
                }
                StepKind::Cast(to) => format!("round to {}", to.keyword()),
                StepKind::Convert(to) => format!("convert to {} (host)", to.keyword()),
                StepKind::Quantize(l) => format!(
                    "quantize Q, K, V to int8 (host; K smoothed, {} bytes per batch entry)",
                    l.entry_bytes()
                ),
                StepKind::Attention(s) => format!(
                    "fused attention{} batch {:?} m={} n={} d={} dv={} mask {}",
                    match s.precision {
                        Precision::Exact => "",
                        Precision::Int8 => " int8",
                    },
                    s.batch,
                    s.m,
                    s.n,
                    s.d,
                    s.dv,
                    s.mask
                        .as_ref()
                        .map_or("none".to_string(), |m| m.to_string())
                ),
                StepKind::Prefix(s) => format!(
                    "causal linear attention (prefix state) batch {:?} m={} n={} d={} dv={}",
                    s.batch, s.m, s.n, s.d, s.dv
                ),
            };
            let ins: Vec<String> = step.inputs.iter().map(|b| format!("buf{b}")).collect();
            writeln!(
                f,
                "  {}: buf{} = {what} <- {}",
                step.name,
                step.output,
                ins.join(", ")
            )?;
        }
        writeln!(f, "  result: buf{} {:?}", self.output, self.output_shape)
    }
}

/// Queries per key from which the fused attention kernel reads f16 operands through a host
/// conversion to f32 instead of widening them natively (decode-like shapes stay native: they
/// are bound by memory, where half the bytes pay).
const F16_NATIVE_MAX_ROWS: usize = 16;

/// Fused expressions larger than this are materialized (bounds code size).
const MAX_FUSED_NODES: usize = 48;

/// Row-major strides of `shape`.
pub fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1usize;
    for (k, &d) in shape.iter().enumerate().rev() {
        strides[k] = s;
        s = s.saturating_mul(d);
    }
    strides
}

/// The value of one node while planning.
#[derive(Clone, Debug)]
struct Val {
    expr: Expr,
    shape: Vec<usize>,
}

struct Planner<'k> {
    kernel: &'k Kernel,
    bindings: &'k Bindings,
    shapes: Vec<Vec<usize>>,
    buffers: Vec<BufferInfo>,
    steps: Vec<Step>,
}

impl Planner<'_> {
    fn new_buffer(&mut self, len: usize) -> usize {
        self.new_typed_buffer(len, Elem::F32)
    }

    fn new_typed_buffer(&mut self, len: usize, elem: Elem) -> usize {
        self.buffers.push(BufferInfo {
            len,
            elem,
            source: BufferSource::Temp,
        });
        self.buffers.len() - 1
    }

    fn push(&mut self, kind: StepKind, inputs: Vec<usize>, output: usize) {
        let tag = match &kind {
            StepKind::Elementwise(_) => "ew",
            StepKind::MatMul(_) => "matmul",
            StepKind::Reduce(..) => "reduce",
            StepKind::Softmax(_) => "softmax",
            StepKind::Cast(_) => "cast",
            StepKind::Constant(_) => "const",
            StepKind::Convert(_) => "convert",
            StepKind::Quantize(_) => "quantize",
            StepKind::Attention(_) => "attention",
            StepKind::Prefix(_) => "prefix",
        };
        let name = format!("{}_s{}_{tag}", self.kernel.name, self.steps.len());
        self.steps.push(Step {
            name,
            kind,
            inputs,
            output,
        });
    }

    /// Writes `v` into a new contiguous buffer; returns the buffer.
    fn materialize(&mut self, v: &Val) -> usize {
        let len = v.shape.iter().product();
        let out = self.new_buffer(len);
        let mut inputs = Vec::new();
        v.expr.buffers(&mut inputs);
        let spec = ElementwiseSpec {
            expr: v.expr.clone(),
            shape: v.shape.clone(),
            inputs: inputs.clone(),
        };
        self.push(StepKind::Elementwise(spec), inputs, out);
        out
    }

    /// `v` as a contiguous buffer (materialized unless it already is one).
    fn contiguous_buffer(&mut self, v: &Val) -> usize {
        if let Expr::Leaf { buf, strides } = &v.expr {
            if is_contiguous(strides, &v.shape) {
                return *buf;
            }
        }
        self.materialize(v)
    }

    /// `v` as a strided leaf (materialized unless it already is one).
    fn strided(&mut self, v: &Val) -> (usize, Vec<usize>) {
        if let Expr::Leaf { buf, strides } = &v.expr {
            return (*buf, strides.clone());
        }
        let buf = self.materialize(v);
        (buf, contiguous(&v.shape))
    }

    fn leaf(buf: usize, shape: &[usize]) -> Val {
        Val {
            expr: Expr::Leaf {
                buf,
                strides: contiguous(shape),
            },
            shape: shape.to_vec(),
        }
    }
}

/// Whether `strides` are row-major contiguous for `shape` (size-1 axes may have any stride).
fn is_contiguous(strides: &[usize], shape: &[usize]) -> bool {
    let want = contiguous(shape);
    strides
        .iter()
        .zip(&want)
        .zip(shape)
        .all(|((s, w), d)| *d <= 1 || s == w)
}

/// The map of an operand of shape `from` broadcast into shape `to`.
fn broadcast_map(from: &[usize], to: &[usize]) -> Vec<Option<usize>> {
    let lead = to.len().saturating_sub(from.len());
    from.iter()
        .enumerate()
        .map(|(k, &d)| if d == 1 { None } else { Some(k + lead) })
        .collect()
}

fn plan_error(op: &Op, detail: impl Into<String>) -> JitError {
    JitError::Plan {
        op: op.to_string(),
        detail: detail.into(),
    }
}

/// Lowers `kernel` at `bindings` to a plan; `fuse_attention` lets the fused attention kernel
/// replace every subgraph [`match_attention`] recognizes, and the prefix-state kernel every
/// one [`match_prefix`] recognizes.
pub fn plan(kernel: &Kernel, bindings: &Bindings, fuse_attention: bool) -> Result<Plan> {
    let shapes = attnc_ir::bind::resolve_node_shapes(kernel, bindings)
        .map_err(|e| JitError::Shape(e.to_string()))?;
    let mut input_shapes = Vec::with_capacity(kernel.params.len());
    for p in &kernel.params {
        let s = attnc_ir::dim::resolve_shape(&p.shape, bindings).ok_or_else(|| {
            JitError::Shape(format!("input `{}` has an unbound dimension", p.name))
        })?;
        input_shapes.push(s);
    }
    let buffers = input_shapes
        .iter()
        .enumerate()
        .map(|(i, s)| BufferInfo {
            len: s.iter().product(),
            elem: Elem::of(kernel.params[i].dtype),
            source: BufferSource::Input(i),
        })
        .collect();
    let mut p = Planner {
        kernel,
        bindings,
        shapes,
        buffers,
        steps: Vec::new(),
    };
    let order = kernel.graph.topo_order();
    // Fused attention first: a matched MatMul reads only kernel inputs, so the nodes of its
    // subgraph are needed only if something else uses them.
    let mut fused: Vec<Option<AttentionSpec>> = vec![None; kernel.graph.len()];
    // Causal linear attention: only its three operands are needed, not its n×n inner nodes.
    let mut prefix: Vec<Option<PrefixMatch>> = vec![None; kernel.graph.len()];
    if fuse_attention {
        for &id in &order {
            match kernel.graph.node(id).op {
                Op::MatMul => fused[id.index()] = match_attention(kernel, id, &p.shapes),
                Op::Binary(BinaryOp::Div) => {
                    prefix[id.index()] = match_prefix(kernel, id, &p.shapes)
                }
                _ => {}
            }
        }
    }
    // `int8-products(P @ V)` selects the int8 kernel when `P @ V` fused and has no other user
    // (another user expects the exact product).
    let mut all_users = vec![0usize; kernel.graph.len()];
    for &id in &order {
        for op in kernel.graph.operands(id) {
            all_users[op.index()] += 1;
        }
    }
    for &id in &order {
        if matches!(kernel.graph.node(id).op, Op::Int8Products) {
            if let Some(&inner) = kernel.graph.operands(id).first() {
                if let Some(spec) = fused[inner.index()].as_mut() {
                    if all_users[inner.index()] == 1 && kernel.output != inner {
                        spec.precision = Precision::Int8;
                    }
                }
            }
        }
    }
    let mut live = vec![false; kernel.graph.len()];
    live[kernel.output.index()] = true;
    let mut users = vec![0usize; kernel.graph.len()];
    for &id in order.iter().rev() {
        if !live[id.index()] || fused[id.index()].is_some() {
            continue;
        }
        let operands = match &prefix[id.index()] {
            Some(pm) => pm.operands.to_vec(),
            None => kernel.graph.operands(id),
        };
        for op in operands {
            live[op.index()] = true;
            users[op.index()] += 1;
        }
    }
    let mut vals: Vec<Option<Val>> = vec![None; kernel.graph.len()];
    for &id in &order {
        if !live[id.index()] {
            continue;
        }
        let v = match (fused[id.index()].take(), prefix[id.index()].take()) {
            (Some(spec), _) => plan_attention(&mut p, spec),
            (None, Some(pm)) => plan_prefix(&mut p, pm, &vals)?,
            (None, None) => plan_node(&mut p, id, &vals, &input_shapes)?,
        };
        let users = users[id.index()];
        let trivial = matches!(v.expr, Expr::Leaf { .. } | Expr::Const(_));
        let v = if !trivial && (users > 1 || v.expr.size() > MAX_FUSED_NODES) {
            let buf = p.materialize(&v);
            Planner::leaf(buf, &v.shape)
        } else {
            v
        };
        vals[id.index()] = Some(v);
    }
    let out_val = vals[kernel.output.index()]
        .clone()
        .ok_or_else(|| JitError::Shape("output node has no value".to_string()))?;
    let output = match &out_val.expr {
        Expr::Leaf { buf, strides }
            if is_contiguous(strides, &out_val.shape)
                && p.buffers[*buf].source == BufferSource::Temp =>
        {
            *buf
        }
        _ => p.materialize(&out_val),
    };
    Ok(Plan {
        kernel: kernel.name.clone(),
        buffers: p.buffers,
        steps: p.steps,
        output,
        output_shape: out_val.shape,
        input_shapes,
    })
}

fn operand(vals: &[Option<Val>], id: NodeId) -> Result<Val> {
    vals[id.index()]
        .clone()
        .ok_or_else(|| JitError::Shape(format!("node %{} used before definition", id.index())))
}

fn plan_node(
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
            let x = operand(vals, ops[0])?;
            val(Expr::Mask {
                pattern: pattern.clone(),
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
            let data: Arc<[f32]> = attnc_ir::random::random_matrix(*kind, *seed, rows, cols)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let out = p.new_buffer(data.len());
            p.push(StepKind::Constant(data), Vec::new(), out);
            Planner::leaf(out, &shape)
        }
        // Exact here: only the fused attention kernel has an int8 form.
        Op::Int8Products => operand(vals, ops[0])?,
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
            p.push(StepKind::Reduce(*op, spec), vec![src], out);
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
        Op::MatMul => {
            let a = operand(vals, ops[0])?;
            let b = operand(vals, ops[1])?;
            plan_matmul(p, &node.op, &a, &b, &shape)?
        }
    })
}

/// The fused attention step. Q, K, V and the biases are read in their storage types; a cast
/// operand (`TensorRef::convert`) reads a copy of its parameter rounded once by a host step.
/// The int8 kernel reads the packed buffer of a host [`StepKind::Quantize`] step instead of
/// Q, K and V.
fn plan_attention(p: &mut Planner<'_>, mut spec: AttentionSpec) -> Val {
    let mut inputs: Vec<usize> = Vec::new();
    let mut converted: Vec<(usize, DType, usize)> = Vec::new();
    // Resolves a tensor to its buffer and points its slot at the step's operand list.
    let mut bind = |p: &mut Planner<'_>,
                    t: &mut crate::kernels::attention::TensorRef,
                    inputs: &mut Vec<usize>| {
        let param = t.slot;
        let buf = match t.convert.take() {
            Some(to) => match converted.iter().find(|c| c.0 == param && c.1 == to) {
                Some(c) => c.2,
                None => {
                    let out = p.new_typed_buffer(p.buffers[param].len, Elem::of(to));
                    p.push(StepKind::Convert(Elem::of(to)), vec![param], out);
                    converted.push((param, to, out));
                    out
                }
            },
            None => param,
        };
        t.dtype = match p.buffers[buf].elem {
            Elem::F16 => DType::F16,
            Elem::Bf16 => DType::Bf16,
            Elem::F32 | Elem::U8 => DType::F32,
        };
        t.slot = match inputs.iter().position(|&b| b == buf) {
            Some(k) => k,
            None => {
                inputs.push(buf);
                inputs.len() - 1
            }
        };
    };
    let mut shape = spec.batch.clone();
    shape.extend([spec.m, spec.dv]);
    let out = p.new_buffer(shape.iter().product());
    match spec.precision {
        Precision::Exact => {
            let reused = spec.m >= F16_NATIVE_MAX_ROWS;
            for t in [&mut spec.q, &mut spec.k, &mut spec.v]
                .into_iter()
                .chain(spec.biases.iter_mut())
            {
                // f16 lanes widen in ~15 instructions (no F16C through Cranelift): when every
                // key row serves many queries, one host conversion costs less than widening
                // in every tile, and keeps the tile code (and its compile time) small.
                // (A `cast(x, f16)` operand keeps its one conversion, to f16.)
                if reused && t.convert.is_none() && p.buffers[t.slot].elem == Elem::F16 {
                    t.convert = Some(DType::F32);
                }
                bind(p, t, &mut inputs);
            }
        }
        Precision::Int8 => {
            let mut qkv = Vec::new();
            for t in [&mut spec.q, &mut spec.k, &mut spec.v] {
                let mut own = Vec::new();
                bind(p, t, &mut own);
                qkv.push(own[0]);
                t.slot = qkv.len() - 1;
            }
            let layout = QuantLayout::new(&spec);
            let packed = p.new_typed_buffer(layout.total_bytes(), Elem::U8);
            p.push(StepKind::Quantize(Box::new(layout)), qkv, packed);
            inputs.push(packed);
            for t in spec.biases.iter_mut() {
                bind(p, t, &mut inputs);
            }
        }
    }
    p.push(StepKind::Attention(Box::new(spec)), inputs, out);
    Planner::leaf(out, &shape)
}

/// The prefix-state step over contiguous `φQ`, `φK`, `V` buffers (materialized when they are
/// computed values or strided views).
fn plan_prefix(p: &mut Planner<'_>, pm: PrefixMatch, vals: &[Option<Val>]) -> Result<Val> {
    let mut inputs = Vec::with_capacity(3);
    for id in pm.operands {
        let v = operand(vals, id)?;
        inputs.push(p.contiguous_buffer(&v));
    }
    let mut shape = pm.spec.batch.clone();
    shape.extend([pm.spec.m, pm.spec.dv]);
    let out = p.new_buffer(shape.iter().product());
    p.push(StepKind::Prefix(pm.spec), inputs, out);
    Ok(Planner::leaf(out, &shape))
}

fn plan_matmul(p: &mut Planner<'_>, op: &Op, a: &Val, b: &Val, shape: &[usize]) -> Result<Val> {
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
    };
    if spec.k != b.shape[rb - 2] || spec.m != shape[r - 2] || spec.n != shape[r - 1] {
        return Err(plan_error(op, "operand shapes do not agree"));
    }
    let out = p.new_buffer(shape.iter().product());
    p.push(StepKind::MatMul(spec), vec![abuf, bbuf], out);
    Ok(Planner::leaf(out, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_strides() {
        assert_eq!(contiguous(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous(&[]), Vec::<usize>::new());
        assert_eq!(contiguous(&[0, 5]), vec![5, 1]);
    }

    #[test]
    fn size_one_axes_broadcast() {
        assert_eq!(broadcast_map(&[1, 4], &[3, 4]), vec![None, Some(1)]);
        assert_eq!(broadcast_map(&[4], &[2, 3, 4]), vec![Some(2)]);
        assert!(is_contiguous(&[99, 1], &[1, 4]));
        assert!(!is_contiguous(&[1, 3], &[3, 4]));
    }

    #[test]
    fn transpose_and_broadcast_are_stride_remaps() {
        let leaf = Expr::Leaf {
            buf: 0,
            strides: vec![4, 1],
        };
        // [3, 4] transposed to [4, 3].
        let t = leaf.remap(&[Some(1), Some(0)], 2);
        assert_eq!(
            t,
            Expr::Leaf {
                buf: 0,
                strides: vec![1, 4]
            }
        );
        // [4] broadcast into [2, 4]: stride 0 on the new leading axis.
        let row = Expr::Leaf {
            buf: 1,
            strides: vec![1],
        };
        assert_eq!(
            row.remap(&[Some(1)], 2),
            Expr::Leaf {
                buf: 1,
                strides: vec![0, 1]
            }
        );
    }
}
