//! Causal linear attention with a running prefix state: recognition in the IR
//! ([`match_prefix`]) and code generation ([`emit`]).
//!
//! The IR form is the quadratic one the optimizer's `linear-attention-causal` node expands to:
//!
//! ```text
//! A = mask(φQ @ φKᵀ, causal, 0);   out = (A @ V) / sum(A, -1)
//! ```
//!
//! With queries end-aligned to the keys (`i' = i + n − m`), row `i` of the output is
//! `(φq_i · S_i) / (φq_i · z_i)` where `S_i = Σ_{j ≤ i'} φk_j v_jᵀ` (`[d, dv]`) and
//! `z_i = Σ_{j ≤ i'} φk_j` (`[d]`). The kernel walks the rows in order, adding each key to the
//! state when it enters the prefix: O(n·d·dv) time and O(d·dv) state per batch entry, held in a
//! stack slot; the `m × n` scores are never formed. `φQ`, `φK` are whatever values the graph
//! computes (earlier steps materialize them into `[.., m, d]` / `[.., n, d]` buffers).
//!
//! Work is split over batch entries only (the work space is `(batches, 1)`): each batch
//! entry's rows are computed by one call in one fixed order, so results do not depend on the
//! thread count. A row that keeps no key (`i' < 0`, or `n = 0`) gives `0 / 0`, as the
//! quadratic form does. One difference from the quadratic form: a NaN or infinite key or value
//! *after* a row's prefix does not reach that row (the quadratic form multiplies it by the
//! mask's 0, which gives NaN).
//!
//! Declined (the plan falls back to separate kernels): a fill other than 0, a sum over another
//! axis, intermediate nodes used outside the pattern, `dv` above [`MAX_DV`] (the state update
//! is unrolled over `dv`), and a state larger than [`MAX_STATE_BYTES`].

use super::{counted_loop, elem_addr, iconst, mem, strided_offsets, KernelArgs};
use crate::error::Result;
use attnc_ir::{BinaryOp, Kernel, MaskPattern, NodeId, Op, ReduceOp};
use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// The largest state (`S` and `z`, bytes) kept on the kernel's stack.
pub const MAX_STATE_BYTES: usize = 256 * 1024;
/// The largest value width `dv` (the state update is unrolled over it).
pub const MAX_DV: usize = 1024;
/// Accumulator vectors held in registers per group of output columns.
const GROUP_VECS: usize = 8;

/// Everything the prefix kernel is specialized to. Operand 0 is `φQ` (`[.., m, d]`),
/// operand 1 `φK` (`[.., n, d]`), operand 2 `V` (`[.., n, dv]`), each with contiguous rows;
/// the output is `[batch.., m, dv]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixSpec {
    /// The output's leading (batch) axes.
    pub batch: Vec<usize>,
    /// Element stride per batch axis of `φQ`, `φK`, `V` (0 where broadcast).
    pub batch_strides: [Vec<usize>; 3],
    /// Query rows.
    pub m: usize,
    /// Keys.
    pub n: usize,
    /// Feature width.
    pub d: usize,
    /// Value width.
    pub dv: usize,
}

impl PrefixSpec {
    /// The number of batch entries.
    pub fn batch_count(&self) -> usize {
        self.batch.iter().product()
    }

    /// The work space: one unit per batch entry (the state runs over all rows).
    pub fn work(&self) -> (usize, usize) {
        (self.batch_count(), 1)
    }

    /// Floating-point operations (for threading decisions).
    pub fn flops(&self) -> usize {
        4usize
            .saturating_mul(self.batch_count())
            .saturating_mul(self.m.saturating_add(self.n))
            .saturating_mul(self.d.max(1))
            .saturating_mul(self.dv.max(1))
    }

    /// `dv` rounded up to whole vectors: the row pitch of `S` in the state slot.
    fn pitch(&self) -> usize {
        self.dv.div_ceil(4) * 4
    }

    /// Bytes of the state slot: `S` (`d × pitch`) then `z` (`d`, padded to a vector).
    fn state_bytes(&self) -> Option<usize> {
        let floats = self
            .d
            .checked_mul(self.pitch())?
            .checked_add(self.d.div_ceil(4) * 4)?;
        floats.checked_mul(4).map(|b| b.max(16))
    }
}

/// A recognized causal linear attention: the kernel spec and the graph nodes of its three
/// operands (`φQ`, `φK`, `V`), which the planner materializes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The kernel spec.
    pub spec: PrefixSpec,
    /// The nodes of `φQ`, `φK`, `V`.
    pub operands: [NodeId; 3],
}

/// Recognizes `(A @ V) / sum(A, -1)` with `A = mask(φQ @ φKᵀ, causal, 0)` at `node` (an
/// `Op::Binary(Div)`), with `shapes` the resolved shape of every node. `None` when the
/// subgraph does not have that form or cannot be fused (see the module docs).
pub fn match_prefix(kernel: &Kernel, node: NodeId, shapes: &[Vec<usize>]) -> Option<PrefixMatch> {
    let graph = &kernel.graph;
    let op = |id: NodeId| &graph.node(id).op;
    let args = |id: NodeId| graph.operands(id);
    let shape = |id: NodeId| shapes.get(id.index()).map(Vec::as_slice);
    if !matches!(op(node), Op::Binary(BinaryOp::Div)) {
        return None;
    }
    let [num, den] = args(node)[..] else {
        return None;
    };
    let [a, v] = args(num)[..] else { return None };
    let [a2] = args(den)[..] else { return None };
    let a_rank = shape(a)?.len();
    let sums_keys =
        matches!(op(den), Op::Reduce { op: ReduceOp::Sum, axis } if *axis + 1 == a_rank);
    if !matches!(op(num), Op::MatMul) || a2 != a || !sums_keys {
        return None;
    }
    let Op::Mask { pattern, fill } = op(a) else {
        return None;
    };
    if *pattern != MaskPattern::Causal || *fill != 0.0 {
        return None;
    }
    let [s] = args(a)[..] else { return None };
    let [q, t] = args(s)[..] else { return None };
    if !matches!(op(s), Op::MatMul) || !matches!(op(t), Op::Transpose) {
        return None;
    }
    let [k] = args(t)[..] else { return None };

    let out = shape(node)?;
    let (qs, ks, vs) = (shape(q)?, shape(k)?, shape(v)?);
    if out.len() < 2
        || [qs, ks, vs]
            .iter()
            .any(|s| s.len() < 2 || s.len() > out.len())
    {
        return None;
    }
    let rows = |s: &[usize]| (s[s.len() - 2], s[s.len() - 1]);
    let ((m, dv), (qm, d), (n, kd), (vn, vdv)) = (rows(out), rows(qs), rows(ks), rows(vs));
    if qm != m || kd != d || vn != n || vdv != dv || dv > MAX_DV {
        return None;
    }
    let batch = out[..out.len() - 2].to_vec();
    let batch_strides = [
        batch_strides(qs, &batch)?,
        batch_strides(ks, &batch)?,
        batch_strides(vs, &batch)?,
    ];
    let spec = PrefixSpec {
        batch,
        batch_strides,
        m,
        n,
        d,
        dv,
    };
    if spec.state_bytes()? > MAX_STATE_BYTES {
        return None;
    }
    // The scores, masked scores, numerator and normalizer are used only inside the pattern.
    let inner = [t, s, a, num, den];
    if inner.contains(&kernel.output) {
        return None;
    }
    for user in graph.topo_order() {
        if user == node || inner.contains(&user) {
            continue;
        }
        if args(user).iter().any(|o| inner.contains(o)) {
            return None;
        }
    }
    Some(PrefixMatch {
        spec,
        operands: [q, k, v],
    })
}

/// Element strides per output batch axis of a contiguous tensor of shape `s` broadcast into
/// `batch` (0 on broadcast axes); `None` when it does not broadcast.
fn batch_strides(s: &[usize], batch: &[usize]) -> Option<Vec<usize>> {
    let lead = &s[..s.len() - 2];
    let offset = batch.len().checked_sub(lead.len())?;
    let mut strides = vec![0; batch.len()];
    let mut stride = s[s.len() - 2].checked_mul(s[s.len() - 1])?;
    for (axis, &size) in lead.iter().enumerate().rev() {
        let out = batch[offset + axis];
        if size == out && size != 1 {
            strides[offset + axis] = stride;
        } else if size != 1 {
            return None;
        }
        stride = stride.checked_mul(size)?;
    }
    Some(strides)
}

/// Pointers of one batch entry and of its state.
struct Bases {
    q: Value,
    k: Value,
    v: Value,
    out: Value,
    state: Value,
}

/// Generates the body of a prefix kernel for the batch entry `args.batch`.
pub fn emit(b: &mut FunctionBuilder, args: KernelArgs, spec: &PrefixSpec) -> Result<()> {
    let q_ptr = args.input_ptr(b, 0);
    let k_ptr = args.input_ptr(b, 1);
    let v_ptr = args.input_ptr(b, 2);
    let [qs, ks, vs] = &spec.batch_strides;
    let offs = strided_offsets(b, args.batch, &spec.batch, &[qs, ks, vs]);
    let o_off = b.ins().imul_imm_s(args.batch, (spec.m * spec.dv) as i64);
    let bytes = spec.state_bytes().unwrap_or(16);
    let size = u32::try_from(bytes).unwrap_or(u32::MAX);
    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
    let bases = Bases {
        q: elem_addr(b, q_ptr, offs[0]),
        k: elem_addr(b, k_ptr, offs[1]),
        v: elem_addr(b, v_ptr, offs[2]),
        out: elem_addr(b, args.output, o_off),
        state: b.ins().stack_addr(types::I64, slot, 0),
    };
    // The state starts at zero.
    let zero_v = zero_vector(b);
    let zero = iconst(b, 0);
    let state_end = iconst(b, (bytes / 16 * 16) as i64);
    counted_loop(b, zero, state_end, 16, |b, off| {
        let p = b.ins().iadd(bases.state, off);
        b.ins().store(mem(), zero_v, p, 0);
        Ok(())
    })?;
    // Row i keeps keys j ≤ i + off: keys 0..off are in every row's prefix; rows 0..first keep
    // none; every later row adds its own key i + off.
    let off = spec.n as i64 - spec.m as i64;
    let first = (-off).clamp(0, spec.m as i64);
    if off > 0 {
        let end = iconst(b, off);
        counted_loop(b, zero, end, 1, |b, j| {
            add_key(b, spec, &bases, j);
            Ok(())
        })?;
    }
    let first_v = iconst(b, first);
    counted_loop(b, zero, first_v, 1, |b, i| {
        emit_row(b, spec, &bases, i);
        Ok(())
    })?;
    let m = iconst(b, spec.m as i64);
    counted_loop(b, first_v, m, 1, |b, i| {
        let j = b.ins().iadd_imm_s(i, off);
        add_key(b, spec, &bases, j);
        emit_row(b, spec, &bases, i);
        Ok(())
    })?;
    b.ins().return_(&[]);
    Ok(())
}

/// An f32x4 of zeros.
fn zero_vector(b: &mut FunctionBuilder) -> Value {
    let zero_f = b.ins().f32const(0.0);
    b.ins().splat(types::F32X4, zero_f)
}

/// Adds key `j` to the state: `S[a, :] += φk_j[a] · v_j` and `z[a] += φk_j[a]` for every `a`.
fn add_key(b: &mut FunctionBuilder, spec: &PrefixSpec, bases: &Bases, j: Value) {
    let k_off = b.ins().imul_imm_s(j, spec.d as i64);
    let k_row = elem_addr(b, bases.k, k_off);
    let v_off = b.ins().imul_imm_s(j, spec.dv as i64);
    let v_row = elem_addr(b, bases.v, v_off);
    let full = spec.dv / 4;
    // v_j once per key, in registers when it fits.
    let v_vecs: Option<Vec<Value>> = (full <= 2 * GROUP_VECS).then(|| {
        (0..full)
            .map(|c| b.ins().load(types::F32X4, mem(), v_row, (16 * c) as i32))
            .collect()
    });
    let z_base = (4 * spec.d * spec.pitch()) as i32;
    let zero = iconst(b, 0);
    let d = iconst(b, spec.d as i64);
    let _ = counted_loop(b, zero, d, 1, |b, a| {
        let ka_addr = elem_addr(b, k_row, a);
        let ka = b.ins().load(types::F32, mem(), ka_addr, 0);
        let kv = b.ins().splat(types::F32X4, ka);
        let s_off = b.ins().imul_imm_s(a, spec.pitch() as i64);
        let s_row = elem_addr(b, bases.state, s_off);
        for c in 0..full {
            let vc = match &v_vecs {
                Some(vs) => vs[c],
                None => b.ins().load(types::F32X4, mem(), v_row, (16 * c) as i32),
            };
            let old = b.ins().load(types::F32X4, mem(), s_row, (16 * c) as i32);
            let new = b.ins().fma(kv, vc, old);
            b.ins().store(mem(), new, s_row, (16 * c) as i32);
        }
        for c in 4 * full..spec.dv {
            let vc = b.ins().load(types::F32, mem(), v_row, (4 * c) as i32);
            let old = b.ins().load(types::F32, mem(), s_row, (4 * c) as i32);
            let new = b.ins().fma(ka, vc, old);
            b.ins().store(mem(), new, s_row, (4 * c) as i32);
        }
        let z_addr = elem_addr(b, bases.state, a);
        let z = b.ins().load(types::F32, mem(), z_addr, z_base);
        let z = b.ins().fadd(z, ka);
        b.ins().store(mem(), z, z_addr, z_base);
        Ok(())
    });
}

/// Writes output row `i`: `(φq_i · S) / (φq_i · z)`, in groups of up to [`GROUP_VECS`]
/// register accumulators, then the scalar tail.
fn emit_row(b: &mut FunctionBuilder, spec: &PrefixSpec, bases: &Bases, i: Value) {
    let q_off = b.ins().imul_imm_s(i, spec.d as i64);
    let q_row = elem_addr(b, bases.q, q_off);
    let o_off = b.ins().imul_imm_s(i, spec.dv as i64);
    let o_row = elem_addr(b, bases.out, o_off);
    let z_base = (4 * spec.d * spec.pitch()) as i32;
    let zero = iconst(b, 0);
    let d = iconst(b, spec.d as i64);
    // The normalizer φq_i · z, one FMA chain in feature order.
    let den_var = b.declare_var(types::F32);
    let zero_f = b.ins().f32const(0.0);
    b.def_var(den_var, zero_f);
    let _ = counted_loop(b, zero, d, 1, |b, a| {
        let qa_addr = elem_addr(b, q_row, a);
        let qa = b.ins().load(types::F32, mem(), qa_addr, 0);
        let z_addr = elem_addr(b, bases.state, a);
        let z = b.ins().load(types::F32, mem(), z_addr, z_base);
        let old = b.use_var(den_var);
        let new = b.ins().fma(qa, z, old);
        b.def_var(den_var, new);
        Ok(())
    });
    let den = b.use_var(den_var);
    let den_v = b.ins().splat(types::F32X4, den);
    let full = spec.dv / 4;
    let mut c0 = 0;
    while c0 < full {
        let vecs = GROUP_VECS.min(full - c0);
        let acc = accumulate(b, spec, bases, q_row, types::F32X4, c0 * 16, vecs);
        for (t, var) in acc.iter().enumerate() {
            let x = b.use_var(*var);
            let y = b.ins().fdiv(x, den_v);
            b.ins().store(mem(), y, o_row, (16 * (c0 + t)) as i32);
        }
        c0 += vecs;
    }
    let tail = spec.dv - 4 * full;
    if tail > 0 {
        let acc = accumulate(b, spec, bases, q_row, types::F32, 16 * full, tail);
        for (t, var) in acc.iter().enumerate() {
            let x = b.use_var(*var);
            let y = b.ins().fdiv(x, den);
            b.ins().store(mem(), y, o_row, (16 * full + 4 * t) as i32);
        }
    }
}

/// `count` accumulators of type `ty` (f32x4 or f32) holding `Σ_a φq_i[a] · S[a, cols]` for
/// the columns starting at byte `start` of each state row, one FMA chain per accumulator.
fn accumulate(
    b: &mut FunctionBuilder,
    spec: &PrefixSpec,
    bases: &Bases,
    q_row: Value,
    ty: types::Type,
    start: usize,
    count: usize,
) -> Vec<Variable> {
    let width = if ty == types::F32X4 { 16 } else { 4 };
    let zero_init = if ty == types::F32X4 {
        zero_vector(b)
    } else {
        b.ins().f32const(0.0)
    };
    let acc: Vec<Variable> = (0..count)
        .map(|_| {
            let var = b.declare_var(ty);
            b.def_var(var, zero_init);
            var
        })
        .collect();
    let zero = iconst(b, 0);
    let d = iconst(b, spec.d as i64);
    let _ = counted_loop(b, zero, d, 1, |b, a| {
        let qa_addr = elem_addr(b, q_row, a);
        let qa = b.ins().load(types::F32, mem(), qa_addr, 0);
        let qv = if ty == types::F32X4 {
            b.ins().splat(types::F32X4, qa)
        } else {
            qa
        };
        let s_off = b.ins().imul_imm_s(a, spec.pitch() as i64);
        let s_row = elem_addr(b, bases.state, s_off);
        for (t, var) in acc.iter().enumerate() {
            let s = b.ins().load(ty, mem(), s_row, (start + width * t) as i32);
            let old = b.use_var(*var);
            let new = b.ins().fma(qv, s, old);
            b.def_var(*var, new);
        }
        Ok(())
    });
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_strides_broadcast_leading_and_unit_axes() {
        assert_eq!(batch_strides(&[2, 3, 5, 4], &[2, 3]), Some(vec![60, 20]));
        assert_eq!(batch_strides(&[1, 5, 4], &[2, 3]), Some(vec![0, 0]));
        assert_eq!(batch_strides(&[5, 4], &[2]), Some(vec![0]));
        assert_eq!(batch_strides(&[3, 5, 4], &[2]), None);
        assert_eq!(batch_strides(&[2, 1, 5, 4], &[2, 3]), Some(vec![20, 0]));
    }

    #[test]
    fn state_size_pads_rows_to_vectors() {
        let spec = PrefixSpec {
            batch: vec![],
            batch_strides: [vec![], vec![], vec![]],
            m: 1,
            n: 1,
            d: 3,
            dv: 5,
        };
        assert_eq!(spec.pitch(), 8);
        assert_eq!(spec.state_bytes(), Some(4 * (3 * 8 + 4)));
    }
}
