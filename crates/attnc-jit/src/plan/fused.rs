//! Planning the fused ops: one fused attention step per `attention` op, one prefix-state step
//! per causal `linear-attention` op. Their operands are whatever the graph computes: kernel
//! parameters are read in their storage types, other values through the buffers earlier steps
//! write (materialized when they are lazy expressions or views without contiguous rows).

use super::{contiguous, operand, plan_error, Planner, StepKind, Val, F16_NATIVE_MAX_ROWS};
use crate::buffer::Elem;
use crate::error::{JitError, Result};
use crate::kernels::attention::quant::QuantLayout;
use crate::kernels::attention::{contains_dilated, AttentionSpec, Precision, TensorRef};
use crate::kernels::elementwise::{ElementwiseSpec, Expr};
use crate::kernels::prefix::PrefixSpec;
use crate::linear::{Features, LinearStep};
use crate::wide::{Tier, Tiers, WideAttention};
use attnc_ir::fused::{Fused, FusedShape};
use attnc_ir::{Attention, DType, Decay, Kernel, LinearAttention, NodeId, Op};
use attnc_wide::amx::Products;

/// The largest number of rows or keys the fused attention kernel takes (its row arithmetic is
/// 32-bit).
const MAX_ATTENTION_ROWS: usize = 1 << 29;

/// The largest `m + n` with a `dilated` mask (its stride test runs in f32).
const MAX_DILATED_ROWS: usize = 1 << 24;

/// Whether `op` is one of the fused ops.
pub(super) fn is_fused(op: &Op) -> bool {
    matches!(op, Op::Attention(_) | Op::LinearAttention(_))
}

/// Why this engine cannot run fused node `id` at the bound `shapes` (it is then planned by its
/// plain form), or `None`.
pub(super) fn unsupported(
    kernel: &Kernel,
    id: NodeId,
    (shapes, bindings): (&[Vec<usize>], &attnc_ir::Bindings),
    tiers: Tiers,
) -> Option<String> {
    let node = kernel.graph.node(id);
    let operands: Vec<&[usize]> = kernel
        .graph
        .operands(id)
        .iter()
        .map(|o| shapes[o.index()].as_slice())
        .collect();
    match &node.op {
        Op::Attention(a) => {
            let fs = match Fused::Attention(a).check(&operands) {
                Ok(fs) => fs,
                Err(e) => return Some(e),
            };
            // The full-width tier runs document masks at any size (the portable limits below
            // do not apply), and their plain form is not compiled.
            if a.segments() > 0 {
                return None;
            }
            if fs.m >= MAX_ATTENTION_ROWS || fs.n >= MAX_ATTENTION_ROWS {
                return Some(format!("more than {MAX_ATTENTION_ROWS} rows or keys"));
            }
            let dilated = a.mask.as_ref().is_some_and(|p| {
                p.try_map(&mut |d: &attnc_ir::Dim| d.resolve(bindings).ok_or(()))
                    .is_ok_and(|p| contains_dilated(&p))
            });
            if dilated && fs.m + fs.n + 2 >= MAX_DILATED_ROWS {
                return Some(format!(
                    "a dilated mask over more than {MAX_DILATED_ROWS} rows and keys"
                ));
            }
            None
        }
        Op::LinearAttention(l) => {
            if !l.causal && !tiers.avx512 {
                return Some("dense linear attention runs as matrix products".to_string());
            }
            let fs = match Fused::Linear(l).check(&operands) {
                Ok(fs) => fs,
                Err(e) => return Some(e),
            };
            if !l.causal {
                return None;
            }
            let spec = prefix_spec(&fs, l, [vec![], vec![], vec![]], [None, None]);
            // A gated decay always runs in chunks (on any tier).
            (!spec.is_gated())
                .then(|| spec.unsupported())
                .flatten()
                .map(str::to_string)
        }
        _ => None,
    }
}

/// A kernel parameter the attention kernel reads in its storage type: `input` itself, or
/// `cast(input, f16|bf16)` (read from one converted copy). `(parameter, conversion)`.
pub(super) fn direct_operand(kernel: &Kernel, id: NodeId) -> Option<(usize, Option<DType>)> {
    match &kernel.graph.node(id).op {
        Op::Input { index, .. } => Some((*index, None)),
        Op::Cast { to } if *to != DType::F32 => {
            let x = *kernel.graph.operands(id).first()?;
            match kernel.graph.node(x).op {
                Op::Input { index, .. } => Some((index, Some(*to))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Where one operand of a fused step lives: a buffer, its element strides per axis of the
/// operand's own shape, and a conversion to apply first.
pub(super) struct Placed {
    buf: usize,
    strides: Vec<usize>,
    convert: Option<DType>,
    name: String,
}

/// Places operand `id` of a fused step (read with contiguous rows when `rows_contiguous`).
pub(super) fn place(
    p: &mut Planner<'_>,
    id: NodeId,
    vals: &[Option<Val>],
    rows_contiguous: bool,
) -> Result<Placed> {
    let shape = p.shapes[id.index()].clone();
    let name = match &p.kernel.graph.node(id).op {
        Op::Input { name, .. } => name.clone(),
        _ => format!("%{}", id.index()),
    };
    if let Some((param, convert)) = direct_operand(p.kernel, id) {
        return Ok(Placed {
            buf: param,
            strides: contiguous(&shape),
            convert,
            name: p.kernel.params[param].name.clone(),
        });
    }
    let v = operand(vals, id)?;
    if let Expr::Leaf { buf, strides } = &v.expr {
        let cols = shape.last().copied().unwrap_or(1);
        let rows_ok = !rows_contiguous || cols <= 1 || strides.last() == Some(&1);
        if rows_ok && p.buffers[*buf].elem == Elem::F32 {
            return Ok(Placed {
                buf: *buf,
                strides: strides.clone(),
                convert: None,
                name,
            });
        }
    }
    let buf = p.materialize(&v);
    Ok(Placed {
        buf,
        strides: contiguous(&shape),
        convert: None,
        name,
    })
}

/// The [`TensorRef`] of a placed operand of `shape` broadcast into `batch ++ [rows, cols]`
/// (its slot is the buffer, renumbered by the caller).
pub(super) fn tensor_ref(
    p: &Planner<'_>,
    placed: &Placed,
    shape: &[usize],
    batch: &[usize],
) -> TensorRef {
    broadcast_ref(placed, p.buffers[placed.buf].elem.dtype(), shape, batch)
}

/// [`tensor_ref`] with the element type given.
fn broadcast_ref(placed: &Placed, dtype: DType, shape: &[usize], batch: &[usize]) -> TensorRef {
    let rank = batch.len() + 2;
    let pad = rank - shape.len().min(rank);
    let mut strides = vec![0usize; rank];
    for (axis, (&size, &stride)) in shape.iter().zip(&placed.strides).enumerate() {
        if size != 1 {
            strides[axis + pad] = stride;
        }
    }
    TensorRef {
        slot: placed.buf,
        name: placed.name.clone(),
        dtype,
        convert: placed.convert,
        batch_strides: strides[..rank - 2].to_vec(),
        row_stride: strides[rank - 2],
        col_stride: strides[rank - 1],
    }
}

/// The [`TensorRef`] of a segment operand `[lead.., len]`: one row of ids per batch entry,
/// its leading axes matched to the batch axes from the left (size 1 broadcasts). A gate of
/// `topk_blocks` (`gate`) is `[lead.., rows, cols]` of floats: one matrix per batch entry.
pub(super) fn segment_ref(
    placed: &Placed,
    shape: &[usize],
    batch: &[usize],
    gate: bool,
) -> TensorRef {
    let lead = shape.len().saturating_sub(1 + usize::from(gate));
    let batch_strides = (0..batch.len())
        .map(|axis| match shape.get(axis) {
            Some(&size) if axis < lead && size != 1 => placed.strides[axis],
            _ => 0,
        })
        .collect();
    TensorRef {
        slot: placed.buf,
        name: placed.name.clone(),
        dtype: if gate { DType::F32 } else { DType::I32 },
        convert: if gate { placed.convert } else { None },
        batch_strides,
        row_stride: match placed.strides.len().checked_sub(2) {
            Some(axis) if gate => placed.strides[axis],
            _ => 0,
        },
        col_stride: placed.strides.last().copied().unwrap_or(1),
    }
}

/// The fused attention step of node `id`. Q, K, V and the biases are read in their storage
/// types; a cast operand reads a copy of its parameter rounded once by a host step. The int8
/// kernel reads the packed buffer of a host [`StepKind::Quantize`] step instead of Q, K, V.
pub(super) fn plan_attention(
    p: &mut Planner<'_>,
    id: NodeId,
    a: &Attention,
    vals: &[Option<Val>],
) -> Result<Val> {
    let spec = attention_spec(p, id, a, vals)?;
    let (out, shape) = attention_step(p, spec)?;
    Ok(Planner::leaf(out, &shape))
}

/// The kernel spec of fused attention `id` over the planned values of its operands.
pub(super) fn attention_spec(
    p: &mut Planner<'_>,
    id: NodeId,
    a: &Attention,
    vals: &[Option<Val>],
) -> Result<AttentionSpec> {
    let op = &p.kernel.graph.node(id).op;
    let operands = p.kernel.graph.operands(id);
    let shapes: Vec<Vec<usize>> = operands
        .iter()
        .map(|o| p.shapes[o.index()].clone())
        .collect();
    let slices: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    let fs = Fused::Attention(a)
        .check(&slices)
        .map_err(|e| plan_error(op, e))?;
    let mut refs = Vec::with_capacity(operands.len());
    let mut segments = Vec::new();
    let first_segment = 3 + a.score.biases();
    let roles = a
        .mask
        .as_ref()
        .map(attnc_ir::segments::roles)
        .unwrap_or_default();
    for (index, &o) in operands.iter().enumerate() {
        // Q, K, V are loaded as vectors along their rows; biases may have any strides.
        let placed = place(p, o, vals, index < 3)?;
        if index >= first_segment {
            let role = roles.get(index - first_segment).copied().flatten();
            let gate = matches!(role, Some(attnc_ir::segments::Role::Gate(_)));
            segments.push(segment_ref(&placed, &shapes[index], &fs.batch, gate));
        } else {
            refs.push(tensor_ref(p, &placed, &shapes[index], &fs.batch));
        }
    }
    let mut refs = refs.into_iter();
    let (Some(q), Some(k), Some(v)) = (refs.next(), refs.next(), refs.next()) else {
        return Err(plan_error(op, "fewer than three operands"));
    };
    let spec = AttentionSpec {
        batch: fs.batch,
        m: fs.m,
        n: fs.n,
        d: fs.d,
        dv: fs.dv,
        q,
        k,
        v,
        biases: refs.collect(),
        segments,
        score: a.score.folded(p.bindings),
        mask: resolved_mask(a, p.bindings, op)?,
        precision: a.precision,
        tier: Tier::Cranelift,
        lse: false,
    };
    Ok(spec)
}

/// The fused attention kernel's spec for node `id` of `kernel` when every operand is a kernel
/// parameter read as stored: tensor slots are parameter indices. For tests and tools that run
/// the kernel alone (the planner builds specs over its buffers instead).
pub fn parameter_attention_spec(
    kernel: &Kernel,
    id: NodeId,
    bindings: &attnc_ir::Bindings,
) -> Result<AttentionSpec> {
    let node = kernel.graph.node(id);
    let Op::Attention(a) = &node.op else {
        return Err(plan_error(&node.op, "not a fused attention"));
    };
    let shapes = attnc_ir::bind::resolve_node_shapes(kernel, bindings)
        .map_err(|e| crate::error::JitError::Shape(e.to_string()))?;
    let operands = kernel.graph.operands(id);
    let slices: Vec<&[usize]> = operands
        .iter()
        .map(|o| shapes[o.index()].as_slice())
        .collect();
    let fs = Fused::Attention(a)
        .check(&slices)
        .map_err(|e| plan_error(&node.op, e))?;
    let mut refs = Vec::new();
    for (&o, shape) in operands.iter().zip(&slices) {
        let Some((param, None)) = direct_operand(kernel, o) else {
            return Err(plan_error(&node.op, "an operand is not a parameter"));
        };
        let placed = Placed {
            buf: param,
            strides: contiguous(shape),
            convert: None,
            name: kernel.params[param].name.clone(),
        };
        refs.push(broadcast_ref(
            &placed,
            kernel.params[param].dtype,
            shape,
            &fs.batch,
        ));
    }
    let mut refs = refs.into_iter();
    let (Some(q), Some(k), Some(v)) = (refs.next(), refs.next(), refs.next()) else {
        return Err(plan_error(&node.op, "fewer than three operands"));
    };
    Ok(AttentionSpec {
        batch: fs.batch,
        m: fs.m,
        n: fs.n,
        d: fs.d,
        dv: fs.dv,
        q,
        k,
        v,
        biases: refs.collect(),
        segments: Vec::new(),
        score: a.score.folded(bindings),
        mask: resolved_mask(a, bindings, &node.op)?,
        precision: a.precision,
        tier: Tier::Cranelift,
        lse: false,
    })
}

/// The mask of `a` with its sizes resolved at `bindings`.
fn resolved_mask(
    a: &Attention,
    bindings: &attnc_ir::Bindings,
    op: &Op,
) -> Result<Option<attnc_ir::MaskPattern>> {
    a.mask
        .as_ref()
        .map(|m| m.resolve(bindings))
        .transpose()
        .map_err(|e| plan_error(op, e.to_string()))
}

/// Binds the spec's tensors to step inputs (converting where asked) and pushes the step;
/// returns its output buffer ([`AttentionSpec::output_len`] long) and the shape of its rows.
pub(super) fn attention_step(
    p: &mut Planner<'_>,
    mut spec: AttentionSpec,
) -> Result<(usize, Vec<usize>)> {
    let mut inputs: Vec<usize> = Vec::new();
    let mut converted: Vec<(usize, DType, usize)> = Vec::new();
    // Resolves a tensor to its buffer and points its slot at the step's operand list (a slot
    // of its own when `own`, else shared with an operand reading the same buffer).
    let mut bind = |p: &mut Planner<'_>, t: &mut TensorRef, inputs: &mut Vec<usize>, own: bool| {
        let source = t.slot;
        let buf = match t.convert.take() {
            Some(to) => match converted.iter().find(|c| c.0 == source && c.1 == to) {
                Some(c) => c.2,
                None => {
                    let out = p.new_typed_buffer(p.buffers[source].len, Elem::of(to));
                    p.push(StepKind::Convert(Elem::of(to)), vec![source], out);
                    converted.push((source, to, out));
                    out
                }
            },
            None => source,
        };
        t.dtype = p.buffers[buf].elem.dtype();
        t.slot = match inputs.iter().position(|&b| b == buf) {
            Some(k) if !own => k,
            _ => {
                inputs.push(buf);
                inputs.len() - 1
            }
        };
    };
    let mut shape = spec.batch.clone();
    shape.extend([spec.m, spec.dv]);
    // The portable exact kernel and the AVX-512 one write the row statistics of a
    // log-sum-exp; the AMX kernels (approximate products) never see one.
    spec.tier = match tier_of(&spec, p.tiers) {
        Tier::Amx(_) if spec.lse => Tier::Cranelift,
        tier => tier,
    };
    if !spec.segments.is_empty() && !matches!(spec.tier, Tier::Avx512 | Tier::Portable) {
        return Err(JitError::Plan {
            op: "attention".to_string(),
            detail: "a document or top-k block mask runs on the AVX-512 or the portable tier \
                     only, which cannot run this attention (its operands' layout or score \
                     form); run with --engine interp"
                .to_string(),
        });
    }
    let out = p.new_buffer(spec.output_len());
    match spec.precision {
        Precision::Int8 | Precision::Bf16 | Precision::Exact if spec.tier != Tier::Cranelift => {
            // The full-width kernels read every operand in its storage type and pack what
            // they need themselves. V has a slot of its own, so a rerun can read a scaled copy
            // of it alone (`crate::finite`).
            for (index, t) in [&mut spec.q, &mut spec.k, &mut spec.v]
                .into_iter()
                .chain(spec.biases.iter_mut())
                .enumerate()
            {
                bind(p, t, &mut inputs, index == 2);
            }
        }
        // Without AMX, bf16 products run as the exact f32 kernel: more accurate than asked.
        Precision::Exact | Precision::Bf16 => {
            let reused = spec.m >= F16_NATIVE_MAX_ROWS;
            for (index, t) in [&mut spec.q, &mut spec.k, &mut spec.v]
                .into_iter()
                .chain(spec.biases.iter_mut())
                .enumerate()
            {
                // f16 lanes widen in ~15 instructions (no F16C through Cranelift): when every
                // key row serves many queries, one host conversion costs less than widening
                // in every tile, and keeps the tile code (and its compile time) small.
                // (A `cast(x, f16)` operand keeps its one conversion, to f16.)
                if reused && t.convert.is_none() && p.buffers[t.slot].elem == Elem::F16 {
                    t.convert = Some(DType::F32);
                }
                bind(p, t, &mut inputs, index == 2);
            }
        }
        Precision::Int8 => {
            let mut qkv = Vec::new();
            for t in [&mut spec.q, &mut spec.k, &mut spec.v] {
                let mut own = Vec::new();
                bind(p, t, &mut own, false);
                qkv.push(own[0]);
                t.slot = qkv.len() - 1;
            }
            let layout = QuantLayout::new(&spec);
            let packed = p.new_typed_buffer(layout.total_bytes(), Elem::U8);
            p.push(StepKind::Quantize(Box::new(layout)), qkv, packed);
            inputs.push(packed);
            for t in spec.biases.iter_mut() {
                bind(p, t, &mut inputs, false);
            }
        }
    }
    // Segment ids are read as stored, after every other operand's slot.
    for t in spec.segments.iter_mut() {
        bind(p, t, &mut inputs, false);
    }
    p.push(StepKind::Attention(Box::new(spec)), inputs, out);
    Ok((out, shape))
}

/// The tier a fused attention runs on: the full-width kernels when they are allowed and
/// evaluate its score form, else Cranelift's.
fn tier_of(spec: &AttentionSpec, tiers: Tiers) -> Tier {
    let tier = match spec.precision {
        Precision::Exact if tiers.avx512 => Tier::Avx512,
        // Masks that read data have no Cranelift kernel: plain Rust instead.
        Precision::Exact if !spec.segments.is_empty() => Tier::Portable,
        Precision::Int8 if tiers.amx => Tier::Amx(Products::Int8),
        Precision::Bf16 if tiers.amx_bf16 => Tier::Amx(Products::Bf16),
        _ => return Tier::Cranelift,
    };
    if WideAttention::supports(spec) {
        tier
    } else {
        Tier::Cranelift
    }
}

/// The prefix-state kernel's spec for a checked causal linear attention (`batch_strides`
/// of φQ, φK, V, and `decay_strides` of the decay slope or of a gate's two log decays).
fn prefix_spec(
    fs: &FusedShape<usize>,
    l: &LinearAttention,
    batch_strides: [Vec<usize>; 3],
    decay_strides: [Option<Vec<usize>>; 2],
) -> PrefixSpec {
    let [slope_strides, key_strides] = decay_strides;
    let or_broadcast = |s: Option<Vec<usize>>| s.unwrap_or_else(|| vec![0; fs.batch.len()]);
    PrefixSpec {
        batch: fs.batch.clone(),
        batch_strides,
        m: fs.m,
        n: fs.n,
        d: fs.d,
        dv: fs.dv,
        normalizer: l.normalizer,
        slope_strides: match l.decay {
            Decay::None => None,
            Decay::Slope | Decay::Gate => Some(or_broadcast(slope_strides)),
        },
        key_decay_strides: (l.decay == Decay::Gate).then(|| or_broadcast(key_strides)),
    }
}

/// The prefix-state step of a causal linear attention over contiguous `φQ`, `φK`, `V`
/// buffers (materialized when they are computed values or strided views).
pub(super) fn plan_prefix(
    p: &mut Planner<'_>,
    id: NodeId,
    l: &LinearAttention,
    vals: &[Option<Val>],
) -> Result<Val> {
    let op = &p.kernel.graph.node(id).op;
    let operands = p.kernel.graph.operands(id);
    let shapes: Vec<Vec<usize>> = operands
        .iter()
        .map(|o| p.shapes[o.index()].clone())
        .collect();
    let slices: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    let fs = Fused::Linear(l)
        .check(&slices)
        .map_err(|e| plan_error(op, e))?;
    if !l.causal {
        return plan_linear(p, (&fs, l), (&operands, &shapes), vals);
    }
    let mut inputs = Vec::with_capacity(5);
    let mut strides: [Vec<usize>; 3] = Default::default();
    let mut decay: [Option<Vec<usize>>; 2] = Default::default();
    for (index, &o) in operands.iter().enumerate() {
        let v = operand(vals, o)?;
        inputs.push(p.contiguous_buffer(&v));
        let s = batch_strides(&shapes[index], &fs.batch);
        match index {
            0..=2 => strides[index] = s,
            3 => decay[0] = Some(s),
            _ => decay[1] = Some(s),
        }
    }
    let spec = prefix_spec(&fs, l, strides, decay);
    let mut shape = fs.batch.clone();
    shape.extend([fs.m, fs.dv]);
    let out = p.new_buffer(shape.iter().product());
    // Long sequences run in chunks on the full-width products; short ones and the portable
    // tier keep the recurrent kernel. A gated decay always runs in chunks.
    let kind = if spec.is_gated() || (p.tiers.avx512 && crate::chunkwise::worth_chunking(&spec)) {
        StepKind::Chunked(spec)
    } else {
        StepKind::Prefix(spec)
    };
    p.push(kind, inputs, out);
    Ok(Planner::leaf(out, &shape))
}

/// Plans a linear attention without a mask as one [`LinearStep`]: a feature operand that is
/// still a lazy elementwise chain (no other step reads it, else it would be a buffer) or a
/// view without contiguous rows is computed on row blocks inside the step instead of being
/// materialized whole.
fn plan_linear(
    p: &mut Planner<'_>,
    (fs, l): (&FusedShape<usize>, &LinearAttention),
    (operands, shapes): (&[NodeId], &[Vec<usize>]),
    vals: &[Option<Val>],
) -> Result<Val> {
    let mut inputs: Vec<usize> = Vec::new();
    let mut slot = |buf: usize| match inputs.iter().position(|&b| b == buf) {
        Some(at) => at,
        None => {
            inputs.push(buf);
            inputs.len() - 1
        }
    };
    let mut features = Vec::with_capacity(2);
    for (&o, shape) in operands.iter().zip(shapes).take(2) {
        let v = operand(vals, o)?;
        let whole = match &v.expr {
            Expr::Leaf { strides, .. } => super::is_contiguous(strides, &v.shape),
            _ => false,
        };
        features.push(if whole {
            Features::Buffer(slot(p.contiguous_buffer(&v)))
        } else {
            let mut bufs = Vec::new();
            v.expr.buffers(&mut bufs);
            let spec = ElementwiseSpec {
                expr: v.expr.clone(),
                shape: shape.clone(),
                inputs: bufs,
            };
            let lanes =
                p.tiers.avx512 && spec.inputs.iter().all(|&b| p.buffers[b].elem == Elem::F32);
            Features::of_chain(spec, |s| super::is_contiguous(s, shape), lanes, &mut slot)
        });
    }
    let values = operand(vals, operands[2])?;
    let values = slot(p.contiguous_buffer(&values));
    let strides = [0, 1, 2].map(|k| batch_strides(&shapes[k], &fs.batch));
    let spec = prefix_spec(fs, l, strides, [None, None]);
    let [queries, keys]: [Features; 2] = features
        .try_into()
        .map_err(|_| plan_error(&p.kernel.graph.node(operands[0]).op, "takes three operands"))?;
    let mut shape = fs.batch.clone();
    shape.extend([fs.m, fs.dv]);
    let out = p.new_buffer(shape.iter().product());
    let step = LinearStep {
        spec,
        features: [queries, keys],
        values,
    };
    p.push(StepKind::Linear(Box::new(step)), inputs, out);
    Ok(Planner::leaf(out, &shape))
}

/// Element strides per output batch axis of a contiguous tensor of shape `s` broadcast into
/// `batch` (0 on broadcast axes): its axes before the last two (none for a scalar slope).
pub(super) fn batch_strides(s: &[usize], batch: &[usize]) -> Vec<usize> {
    let full = contiguous(s);
    let lead = s.len().saturating_sub(2);
    let offset = batch.len() - lead;
    let mut strides = vec![0; batch.len()];
    for axis in 0..lead {
        if s[axis] != 1 {
            strides[offset + axis] = full[axis];
        }
    }
    strides
}
