//! Lowering an IR graph at bound shapes to a list of steps over buffers.
//!
//! The planner dispatches on ops: a fused attention op becomes one fused attention step, a
//! causal linear attention one prefix-state step (`plan/fused.rs`); it never searches the
//! graph for fusable subgraphs — that is the optimizer's choice, made once. Fused ops this
//! engine cannot run at the bound shapes (linear attention without a causal mask, states or
//! sizes past the kernels' limits) are planned by their plain form
//! ([`attnc_ir::fused::expand`]).
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

mod backward;
mod documents;
mod fused;
mod gates;
mod lse;
mod nodes;

pub use fused::parameter_attention_spec;
pub use gates::StepGate;
pub use lse::StatsPart;

use crate::backward::BackwardStep;
use crate::buffer::Elem;
use crate::error::{JitError, Result};
use crate::host::PoolSpec;
use crate::kernels::attention::quant::QuantLayout;
use crate::kernels::attention::{AttentionSpec, Precision};
use crate::kernels::elementwise::{ElementwiseSpec, Expr};
use crate::kernels::matmul::MatMulSpec;
use crate::kernels::prefix::PrefixSpec;
use crate::kernels::reduce::AxisSpec;
use crate::linear::LinearStep;
use attnc_ir::{Bindings, DType, Kernel, NodeId, Op, ReduceOp};
use attnc_wide::reduce::RowReduce;
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
    /// A reduction of each contiguous f32 row of an `[outer, len, 1]` input on 16 lanes
    /// (`attnc-wide`'s `reduce`, the full-width tier), run by the host.
    RowReduce(RowReduce, AxisSpec),
    /// A softmax of a contiguous `[outer, len, inner]` input along `len`.
    Softmax(AxisSpec),
    /// A softmax with one sink logit per lane: reads the contiguous `[outer, len, 1]` input
    /// and the `[outer]` sinks.
    SoftmaxSink(AxisSpec),
    /// Pooling of row blocks, done by the host ([`crate::host::pool`]).
    Pool(PoolSpec),
    /// The gradient of a pooling, done by the host ([`crate::host::unpool`]): reads the
    /// pooled input `x` and the pooled gradient, writes `x`'s shape.
    Unpool(PoolSpec),
    /// The running sum of a contiguous `[outer, len, inner]` input along `len`, done by the
    /// host ([`crate::host::cumsum`]).
    Cumsum(AxisSpec),
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
    /// The same op in chunks of keys on full-width matrix products ([`crate::chunkwise`]),
    /// chosen for long sequences on the full-width tier; reads what `Prefix` reads.
    Chunked(PrefixSpec),
    /// Linear attention without a mask through its `[d, dv]` key-value state on the
    /// full-width tier ([`crate::linear`]); reads `V` and `φQ`, `φK` or the buffers of the
    /// feature maps that compute them, as its [`LinearStep`] places them.
    Linear(Box<LinearStep>),
    /// Gradients of a fused op, several at once ([`crate::backward`]): writes the step's
    /// output and the other buffers its [`BackwardStep::outputs`] list.
    Backward(Box<BackwardStep>),
    /// One part of a fused attention's output with row statistics, done by the host.
    Stats(StatsPart),
}

impl StepKind {
    /// The buffers a step writes besides its own output (a backward step's other
    /// gradients).
    pub fn extra_outputs(&self) -> &[usize] {
        match self {
            StepKind::Backward(b) => b.outputs.get(1..).unwrap_or_default(),
            _ => &[],
        }
    }
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
    /// An attention step's gate, read to skip query tiles it zeroes ([`StepGate`]).
    pub gate: Option<StepGate>,
}

impl Step {
    /// The work space (batches, rows) of the step's kernel.
    pub fn work(&self) -> (usize, usize) {
        match &self.kind {
            StepKind::Elementwise(s) => s.work(),
            StepKind::MatMul(s) => s.work(),
            StepKind::Reduce(_, s)
            | StepKind::RowReduce(_, s)
            | StepKind::Softmax(s)
            | StepKind::SoftmaxSink(s) => s.work(),
            StepKind::Cast(_)
            | StepKind::Pool(_)
            | StepKind::Unpool(_)
            | StepKind::Cumsum(_)
            | StepKind::Constant(_)
            | StepKind::Convert(_)
            | StepKind::Stats(_)
            | StepKind::Quantize(_) => (1, 1),
            StepKind::Attention(s) => (s.batch_count(), s.m),
            StepKind::Prefix(s) | StepKind::Chunked(s) => s.work(),
            StepKind::Linear(s) => (s.spec.batch_count(), s.spec.m),
            StepKind::Backward(b) => b.work(),
        }
    }

    /// A rough operation count, to decide whether threads pay off.
    pub fn cost(&self, buffers: &[BufferInfo]) -> usize {
        match &self.kind {
            StepKind::MatMul(s) => s.flops(),
            StepKind::Prefix(s) | StepKind::Chunked(s) => s.flops(),
            StepKind::Linear(s) => s.spec.flops(),
            StepKind::Backward(b) => b.cost(),
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
    /// Every result of a plan with several ([`plan_outputs`]): buffer and shape, the first
    /// being `output` and `output_shape`.
    pub outputs: Vec<(usize, Vec<usize>)>,
    /// The bound shape of each parameter.
    pub input_shapes: Vec<Vec<usize>>,
}

/// The most memory a plan's temporary buffers hold at once, and its largest buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanMemory {
    /// Bytes of the temporaries alive together at the fullest point (each lives from the step
    /// that writes it to the last step that reads it; the result lives to the end).
    pub peak_bytes: u64,
    /// The largest temporary: its buffer index and bytes.
    pub largest: Option<(usize, u64)>,
}

impl Plan {
    /// Bytes of buffer `b`.
    pub fn buffer_bytes(&self, b: usize) -> u64 {
        let info = &self.buffers[b];
        (info.len as u64).saturating_mul(info.elem.size() as u64)
    }

    /// The memory the plan's temporaries need (inputs are the caller's), computed from the
    /// bound shapes before anything is allocated.
    pub fn memory(&self) -> PlanMemory {
        let mut last_use = vec![None; self.buffers.len()];
        for (index, step) in self.steps.iter().enumerate() {
            for &b in &step.inputs {
                last_use[b] = Some(index);
            }
        }
        let (mut live, mut peak) = (0u64, 0u64);
        let mut largest: Option<(usize, u64)> = None;
        for (index, step) in self.steps.iter().enumerate() {
            for &out in std::iter::once(&step.output).chain(step.kind.extra_outputs()) {
                let bytes = self.buffer_bytes(out);
                live = live.saturating_add(bytes);
                if largest.is_none_or(|(_, l)| bytes > l) {
                    largest = Some((out, bytes));
                }
            }
            peak = peak.max(live);
            for &b in &step.inputs {
                let temp = self.buffers[b].source == BufferSource::Temp;
                if temp && last_use[b] == Some(index) && !self.is_output(b) {
                    live = live.saturating_sub(self.buffer_bytes(b));
                }
            }
        }
        PlanMemory {
            peak_bytes: peak,
            largest,
        }
    }

    /// Whether buffer `b` holds a result.
    pub fn is_output(&self, b: usize) -> bool {
        b == self.output || self.outputs.iter().any(|(o, _)| *o == b)
    }

    /// The step that writes buffer `b`, if any.
    pub fn writer(&self, b: usize) -> Option<&Step> {
        self.steps
            .iter()
            .find(|s| s.output == b || s.kind.extra_outputs().contains(&b))
    }
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
                    "matmul{} batch {:?} {}x{}x{} (a strides {}/{}, b strides {}/{})",
                    if s.wide { " [avx-512 gemm]" } else { "" },
                    s.batch,
                    s.m,
                    s.k,
                    s.n,
                    s.a_rs,
                    s.a_cs,
                    s.b_rs,
                    s.b_cs
                ),
                StepKind::Reduce(op, s) => {
                    format!(
                        "{op} [{} x {} x {}] along the middle axis",
                        s.outer, s.len, s.inner
                    )
                }
                StepKind::RowReduce(op, s) => {
                    let op = format!("{op:?}").to_lowercase();
                    format!("{op} [{} x {}] along rows [avx-512]", s.outer, s.len)
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
                StepKind::SoftmaxSink(s) => {
                    format!(
                        "softmax with a sink logit per row [{} x {}]",
                        s.outer, s.len
                    )
                }
                StepKind::Pool(s) | StepKind::Unpool(s) => format!(
                    "{}{} [{} x {} x {}] in blocks of {} rows (host)",
                    s.op.name(),
                    if matches!(step.kind, StepKind::Unpool(_)) {
                        " gradient"
                    } else {
                        ""
                    },
                    s.outer,
                    s.n,
                    s.width,
                    s.size
                ),
                StepKind::Cumsum(s) => format!(
                    "cumsum [{} x {} x {}] along the middle axis (host)",
                    s.outer, s.len, s.inner
                ),
                StepKind::Cast(to) => format!("round to {}", to.keyword()),
                StepKind::Stats(part) => part.describe(),
                StepKind::Convert(to) => format!("convert to {} (host)", to.keyword()),
                StepKind::Quantize(l) => format!(
                    "quantize Q, K, V to int8 (host; K smoothed, {} bytes per batch entry)",
                    l.entry_bytes()
                ),
                StepKind::Attention(s) => {
                    let wide = (s.tier != crate::wide::Tier::Cranelift)
                        .then(|| crate::wide::WideAttention::new(s, s.tier))
                        .flatten();
                    let (visited, total, (qt, kt)) = match wide {
                        Some(w) => w.key_tiles(),
                        None => {
                            let (v, t) = s.key_tiles();
                            (
                                v,
                                t,
                                (
                                    crate::kernels::attention::QUERY_TILE,
                                    crate::kernels::attention::KEY_TILE,
                                ),
                            )
                        }
                    };
                    format!(
                        "fused attention{} [{}] batch {:?} m={} n={} d={} dv={} mask {}, visits {visited} of {total} key tiles ({qt} × {kt})",
                        match s.precision {
                            Precision::Exact => "",
                            Precision::Int8 => " int8",
                            Precision::Bf16 => " bf16 products",
                        },
                        s.tier.name(),
                        s.batch,
                        s.m,
                        s.n,
                        s.d,
                        s.dv,
                        s.mask
                            .as_ref()
                            .map_or("none".to_string(), |m| m.to_string())
                    )
                }
                StepKind::Prefix(s) | StepKind::Chunked(s) => format!(
                    "causal linear attention ({}{}{}) batch {:?} m={} n={} d={} dv={}",
                    if matches!(step.kind, StepKind::Chunked(_)) {
                        format!("chunks of {} keys [gemm]", crate::chunkwise::chunk_size(s))
                    } else {
                        "prefix state".to_string()
                    },
                    match (s.is_gated(), s.slope_strides.is_some()) {
                        (true, _) => ", gated decay",
                        (false, true) => ", decayed",
                        (false, false) => "",
                    },
                    match s.normalizer {
                        attnc_ir::Normalizer::None => ", unnormalized".to_string(),
                        attnc_ir::Normalizer::Sum { eps: 0.0 } => String::new(),
                        attnc_ir::Normalizer::Sum { eps } => format!(", eps {eps:e}"),
                    },
                    s.batch,
                    s.m,
                    s.n,
                    s.d,
                    s.dv
                ),
                StepKind::Backward(b) => b.describe(),
                StepKind::Linear(s) => s.describe(),
            };
            let what = match &step.gate {
                Some(g) => format!("{what}, {}", g.describe(&step.inputs)),
                None => what,
            };
            let ins: Vec<String> = step.inputs.iter().map(|b| format!("buf{b}")).collect();
            let outs: Vec<String> = std::iter::once(&step.output)
                .chain(step.kind.extra_outputs())
                .map(|b| format!("buf{b}"))
                .collect();
            writeln!(
                f,
                "  {}: {} = {what} <- {}",
                step.name,
                outs.join(", "),
                ins.join(", ")
            )?;
        }
        if self.outputs.len() > 1 {
            for (k, (buf, shape)) in self.outputs.iter().enumerate() {
                writeln!(f, "  result {k}: buf{buf} {shape:?}")?;
            }
            return Ok(());
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
    tiers: crate::wide::Tiers,
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
            StepKind::Reduce(..) | StepKind::RowReduce(..) => "reduce",
            StepKind::Softmax(_) => "softmax",
            StepKind::SoftmaxSink(_) => "softmax_sink",
            StepKind::Pool(_) => "pool",
            StepKind::Unpool(_) => "unpool",
            StepKind::Cumsum(_) => "cumsum",
            StepKind::Cast(_) => "cast",
            StepKind::Constant(_) => "const",
            StepKind::Convert(_) => "convert",
            StepKind::Quantize(_) => "quantize",
            StepKind::Attention(_) => "attention",
            StepKind::Prefix(_) => "prefix",
            StepKind::Chunked(_) => "chunked",
            StepKind::Linear(_) => "linear",
            StepKind::Backward(_) => "backward",
            StepKind::Stats(_) => "stats",
        };
        let name = format!("{}_s{}_{tag}", self.kernel.name, self.steps.len());
        self.steps.push(Step {
            name,
            kind,
            inputs,
            output,
            gate: None,
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

/// How a kernel is planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanOptions {
    /// Whether fused ops run as fused kernels (else they are planned by their plain form).
    pub fuse: bool,
    /// The full-width tiers fused attention steps may run on.
    pub tiers: crate::wide::Tiers,
}

/// Lowers `kernel` at `bindings` to a plan on the portable tier. With `fuse` false every fused
/// op is planned by its plain form (tests compare the two); else only those this engine
/// cannot run.
pub fn plan(kernel: &Kernel, bindings: &Bindings, fuse: bool) -> Result<Plan> {
    let options = PlanOptions {
        fuse,
        tiers: crate::wide::Tiers::NONE,
    };
    plan_with(kernel, bindings, &options)
}

/// [`plan`] with the full-width tiers `options` allow.
pub fn plan_with(kernel: &Kernel, bindings: &Bindings, options: &PlanOptions) -> Result<Plan> {
    plan_outputs(kernel, &[kernel.output], bindings, options)
}

/// [`plan_with`] for several nodes of `kernel`'s graph at once (`kernel.output` is ignored):
/// each node is computed once, the results are [`Plan::outputs`] in the order given.
pub fn plan_outputs(
    kernel: &Kernel,
    outputs: &[NodeId],
    bindings: &Bindings,
    options: &PlanOptions,
) -> Result<Plan> {
    if outputs.is_empty() || outputs.iter().any(|o| o.index() >= kernel.graph.len()) {
        return Err(JitError::Shape(
            "a plan needs results that are nodes of the graph".to_string(),
        ));
    }
    documents::refuse_segments(kernel, options)?;
    let fuse = options.fuse;
    let shapes = attnc_ir::bind::resolve_node_shapes(kernel, bindings)
        .map_err(|e| JitError::Shape(e.to_string()))?;
    // Fused ops (and fused gradients) this engine cannot run are planned by their plain form.
    let unsupported = |id: NodeId| {
        let op = &kernel.graph.node(id).op;
        if fused::is_fused(op) {
            !fuse || fused::unsupported(kernel, id, (&shapes, bindings), options.tiers).is_some()
        } else if backward::is_fused_grad(op) {
            !fuse || backward::unsupported(kernel, id, &shapes, bindings).is_some()
        } else {
            false
        }
    };
    let expanded;
    let mut outputs = outputs.to_vec();
    let kernel = if kernel.graph.topo_order().into_iter().any(unsupported) {
        let (k, map) = attnc_ir::fused::expand::expand_map(kernel, unsupported)
            .map_err(|e| JitError::Shape(format!("a fused op does not expand: {e}")))?;
        expanded = k;
        outputs.iter_mut().for_each(|o| *o = map[o.index()]);
        &expanded
    } else {
        kernel
    };
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
        tiers: options.tiers,
        shapes,
        buffers,
        steps: Vec::new(),
    };
    let order = kernel.graph.topo_order();
    // Liveness and user counts. A fused attention reads parameters (and 16-bit casts of
    // them) directly in their storage types, so those edges need no planned value.
    let mut live = vec![false; kernel.graph.len()];
    for o in &outputs {
        live[o.index()] = true;
    }
    let mut users = vec![0usize; kernel.graph.len()];
    for &id in order.iter().rev() {
        if !live[id.index()] {
            continue;
        }
        let direct = matches!(kernel.graph.node(id).op, Op::Attention(_));
        let unread = backward::unread_operand(&kernel.graph.node(id).op);
        for (slot, op) in kernel.graph.operands(id).into_iter().enumerate() {
            if direct && fused::direct_operand(kernel, op).is_some() || unread == Some(slot) {
                continue;
            }
            live[op.index()] = true;
            users[op.index()] += 1;
        }
    }
    let mut vals: Vec<Option<Val>> = vec![None; kernel.graph.len()];
    let mut pairs = lse::Pairs::find(kernel, &live);
    let gates = gates::Gates::find(kernel, (&live, &users), &p.shapes, &|id| {
        pairs.involves(id) || outputs.contains(&id)
    });
    for id in gates.order(kernel, order) {
        if !live[id.index()] {
            continue;
        }
        let gated = match (&kernel.graph.node(id).op, gates.of(id)) {
            (Op::Attention(a), Some(g)) => gates::plan_gated(&mut p, (id, g), a, &mut vals)?,
            _ => None,
        };
        let v = match (&kernel.graph.node(id).op, gated) {
            (_, Some(v)) => v,
            (Op::Attention(a), _) if pairs.involves(id) => pairs.plan(&mut p, id, a, &vals)?,
            (Op::Attention(a), _) => fused::plan_attention(&mut p, id, a, &vals)?,
            (Op::LinearAttention(l), _) => fused::plan_prefix(&mut p, id, l, &vals)?,
            (Op::Backward(b), _) => backward::plan_backward(&mut p, id, b, &mut vals)?,
            _ => nodes::plan_node(&mut p, id, &vals, &input_shapes)?,
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
    let mut results: Vec<(usize, Vec<usize>)> = Vec::with_capacity(outputs.len());
    for o in &outputs {
        let out_val = vals[o.index()]
            .clone()
            .ok_or_else(|| JitError::Shape("output node has no value".to_string()))?;
        // A result is a buffer of its own: never an input, never another result's.
        let buf = match &out_val.expr {
            Expr::Leaf { buf, strides }
                if is_contiguous(strides, &out_val.shape)
                    && p.buffers[*buf].source == BufferSource::Temp
                    && results.iter().all(|(b, _)| b != buf) =>
            {
                *buf
            }
            _ => p.materialize(&out_val),
        };
        results.push((buf, out_val.shape));
    }
    let (output, output_shape) = results[0].clone();
    Ok(Plan {
        kernel: kernel.name.clone(),
        buffers: p.buffers,
        steps: p.steps,
        output,
        output_shape,
        outputs: results,
        input_shapes,
    })
}

fn operand(vals: &[Option<Val>], id: NodeId) -> Result<Val> {
    vals[id.index()]
        .clone()
        .ok_or_else(|| JitError::Shape(format!("node %{} used before definition", id.index())))
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
