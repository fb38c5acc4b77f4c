//! The skeleton every fused attention function shares, exact or int8: declaring the function
//! and its compile-time tile table, the blocks of the layout below, reading the call's
//! parameters, iterating the table's runs for a query tile, storing the call's rows, and
//! compiling the function without Cranelift's mid-end optimizer so the emitted schedule
//! survives.
//!
//! Layout of the generated function, per call (one batch entry, a range of query rows):
//!
//! ```text
//! entry:       clamp rows, batch multi-index → base pointers of Q, K, V, biases, output
//! group_head:  a query tile of QUERY_TILE rows: Q row pointers, per-row mask bounds and
//!              bias rows; kernel-specific running state
//! run_head:    for each run of key tiles listed for this query tile in the compile-time table
//!   body:        the kernel's tile steps over the run's key tiles
//! group_fin:   the kernel's rows, stored for the rows inside [row_begin, row_end)
//! ```

use super::mask::RowMask;
use super::spec::{run_code, AttentionSpec, TensorRef, QUERY_TILE};
use crate::error::{JitError, Result};
use crate::simd::{as_float, select_f32, splat_f32, splat_i32, widen_f16};
use crate::tiles::classify;
use attnc_ir::DType;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    AbiParam, Block, GlobalValue, InstBuilder, MemFlagsData, StackSlot, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::JITModule;
use cranelift_module::{DataDescription, FuncId, Linkage, Module, ModuleReloc};
use std::collections::{BTreeSet, HashMap};

/// Memory flags of buffer accesses: the runtime checked every buffer before the call.
pub(super) fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub(super) fn codegen_err(name: &str, detail: impl ToString) -> JitError {
    JitError::Codegen {
        kernel: name.to_string(),
        detail: detail.to_string(),
    }
}

pub(super) fn elem_size(dtype: DType) -> i64 {
    match dtype {
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::Bf16 => 2,
    }
}

/// The compile-time tile table, embedded as a read-only data object `{name}.tiles`: per query
/// tile a `(first run, run count)` pair of u32, then the runs as `(first key tile, end key
/// tile, kind)` u32 triples (kind 0 full, 1 partial, 2 tail full, 3 tail partial). Query tiles
/// with equal run lists share their runs, so dense attention stores one run.
pub(super) struct TileTable {
    pub(super) bytes: Vec<u8>,
    pub(super) kinds: BTreeSet<u32>,
}

/// The tile table of `spec` for key tiles of `key_tile` keys.
pub(super) fn tile_table(spec: &AttentionSpec, key_tile: usize) -> Result<TileTable> {
    let tiles = spec.n.div_ceil(key_tile);
    let tail = !spec.n.is_multiple_of(key_tile);
    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(spec.m);
    let mut runs: Vec<[u32; 3]> = Vec::new();
    let mut seen: HashMap<Vec<[u32; 3]>, u32> = HashMap::new();
    let mut kinds = BTreeSet::new();
    let too_big = || JitError::Shape("attention tile table exceeds u32 indices".to_string());
    for g in 0..spec.m.div_ceil(QUERY_TILE) {
        let mut list: Vec<[u32; 3]> = Vec::new();
        let (i0, i1) = spec.query_tile_rows(g);
        for r in classify(spec.mask.as_ref(), spec.m, spec.n, i0, i1, key_tile) {
            let first = u32::try_from(r.first).map_err(|_| too_big())?;
            let end = u32::try_from(r.end).map_err(|_| too_big())?;
            if tail && r.end == tiles {
                if r.first < r.end - 1 {
                    list.push([first, end - 1, run_code(r.kind, false)]);
                }
                list.push([end - 1, end, run_code(r.kind, true)]);
            } else {
                list.push([first, end, run_code(r.kind, false)]);
            }
        }
        for e in &list {
            kinds.insert(e[2]);
        }
        let count = u32::try_from(list.len()).map_err(|_| too_big())?;
        let offset = match seen.get(&list) {
            Some(&o) => o,
            None => {
                let o = u32::try_from(runs.len()).map_err(|_| too_big())?;
                runs.extend_from_slice(&list);
                seen.insert(list, o);
                o
            }
        };
        rows.push((offset, count));
    }
    let mut bytes = Vec::with_capacity(8 * rows.len() + 12 * runs.len() + 8);
    for (o, c) in rows {
        bytes.extend_from_slice(&o.to_le_bytes());
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    for run in runs {
        for w in run {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
    }
    bytes.resize(bytes.len() + 8, 0);
    Ok(TileTable { bytes, kinds })
}

/// Tensor base pointers of the call's batch entry.
/// The parameters of one call of a fused attention function (the kernel ABI of `jit.rs`),
/// read in its entry block: the row range clamped to `m`, and the batch multi-index of the
/// call's batch entry (last axis fastest) for [`CallParams::base_of`].
pub(super) struct CallParams {
    pub(super) inputs: Value,
    pub(super) out: Value,
    pub(super) bidx: Value,
    pub(super) rb: Value,
    pub(super) re: Value,
    idx: Vec<Option<Value>>,
}

impl CallParams {
    pub(super) fn read(b: &mut FunctionBuilder, spec: &AttentionSpec, entry: Block) -> CallParams {
        let params = b.block_params(entry).to_vec();
        let (inputs, out, bidx, rb, re) = (params[0], params[1], params[2], params[3], params[4]);
        let m_c = b.ins().iconst(I64, spec.m as i64);
        let re = b.ins().umin(re, m_c);
        let mut idx = vec![None; spec.batch.len()];
        let mut rest = bidx;
        for a in (0..spec.batch.len()).rev() {
            let size = spec.batch[a] as i64;
            if size > 1 {
                let s = b.ins().iconst(I64, size);
                idx[a] = Some(b.ins().urem(rest, s));
                rest = b.ins().udiv(rest, s);
            }
        }
        CallParams {
            inputs,
            out,
            bidx,
            rb,
            re,
            idx,
        }
    }

    /// The address of operand `t` (buffer slot, batch strides) for this call's batch entry.
    pub(super) fn base_of(&self, b: &mut FunctionBuilder, ptr: Type, t: &TensorRef) -> Value {
        let mut p = b.ins().load(ptr, mem(), self.inputs, (t.slot * 8) as i32);
        let es = elem_size(t.dtype);
        for (a, &stride) in t.batch_strides.iter().enumerate() {
            if let (Some(i), true) = (self.idx.get(a).copied().flatten(), stride > 0) {
                let s = b.ins().iconst(I64, stride as i64 * es);
                let o = b.ins().imul(i, s);
                p = b.ins().iadd(p, o);
            }
        }
        p
    }
}

pub(super) struct Bases {
    pub(super) q: Value,
    pub(super) k: Value,
    pub(super) v: Value,
    pub(super) biases: Vec<Value>,
}

/// Per-row state visible to the tile bodies.
pub(super) struct Row {
    /// Pointer to the row of Q (its chunks are loaded in every key tile).
    pub(super) q: Value,
    /// The aligned row index `i + n - m` as i32x4.
    pub(super) ia_v: Value,
    pub(super) mask: Option<RowMask>,
    /// Per bias: the pointer to its row `i` (or the splatted value when it is constant along j).
    pub(super) bias_rows: Vec<BiasRow>,
}

#[derive(Clone, Copy)]
pub(super) enum BiasRow {
    Ptr(Value),
    Splat(Value),
}

pub(super) struct Emitter<'s> {
    pub(super) spec: &'s AttentionSpec,
    pub(super) d4: usize,
    pub(super) dv4: usize,
    /// Rows computed per query tile: `min(QUERY_TILE, m)` (lanes past it repeat the last).
    pub(super) qrows: usize,
    /// Running maximum and running sum, one lane per row of the query tile.
    pub(super) m_var: Variable,
    pub(super) l_var: Variable,
    /// The output accumulators: `QUERY_TILE × dv4` f32x4, row-major.
    pub(super) o_slot: StackSlot,
    /// The probabilities of the current key tile: `KEY_TILE` f32x4, one per key (lane = row).
    pub(super) p_slot: StackSlot,
}

impl Emitter<'_> {
    pub(super) fn iconst(&self, b: &mut FunctionBuilder, v: i64) -> Value {
        b.ins().iconst(I64, v)
    }

    /// `ptr + index * scale` (bytes), i64 arithmetic.
    pub(super) fn offset(
        &self,
        b: &mut FunctionBuilder,
        ptr: Value,
        index: Value,
        scale: i64,
    ) -> Value {
        if scale == 0 {
            return ptr;
        }
        let s = self.iconst(b, scale);
        let o = b.ins().imul(index, s);
        b.ins().iadd(ptr, o)
    }

    /// Loads `count` (1..=4) consecutive elements of `dtype` at `p` into the low lanes of an
    /// f32x4 (other lanes 0), widening f16/bf16.
    pub(super) fn load_lanes(
        &self,
        b: &mut FunctionBuilder,
        p: Value,
        count: usize,
        dtype: DType,
    ) -> Value {
        let zero = splat_f32(b, 0.0);
        if count == 0 {
            return zero;
        }
        match dtype {
            // (i32 segment ids never reach this kernel: they load as f32 bits if asked.)
            DType::F32 | DType::I32 if count == 4 => b.ins().load(F32X4, mem(), p, 0),
            DType::F32 | DType::I32 => {
                let mut v = zero;
                for l in 0..count {
                    let x = b.ins().load(F32, mem(), p, (4 * l) as i32);
                    v = b.ins().insertlane(v, x, l as u8);
                }
                v
            }
            DType::F16 | DType::Bf16 => {
                let bits = if count == 4 {
                    b.ins().uload16x4(mem(), p, 0)
                } else {
                    let mut v = splat_i32(b, 0);
                    for l in 0..count {
                        let x = b.ins().uload16(I32, mem(), p, (2 * l) as i32);
                        v = b.ins().insertlane(v, x, l as u8);
                    }
                    v
                };
                if dtype == DType::Bf16 {
                    let w = b.ins().ishl_imm_u(bits, 16);
                    as_float(b, w)
                } else {
                    widen_f16(b, bits)
                }
            }
        }
    }

    /// Loads one element as f32.
    pub(super) fn load_scalar(&self, b: &mut FunctionBuilder, p: Value, dtype: DType) -> Value {
        match dtype {
            DType::F32 => b.ins().load(F32, mem(), p, 0),
            _ => {
                let v = self.load_lanes(b, p, 1, dtype);
                b.ins().extractlane(v, 0)
            }
        }
    }

    /// Pointer to row `row` (i64) of tensor `t` at base `base`.
    pub(super) fn row_ptr(
        &self,
        b: &mut FunctionBuilder,
        t: &TensorRef,
        base: Value,
        row: Value,
    ) -> Value {
        let stride = t.row_stride as i64 * elem_size(t.dtype);
        self.offset(b, base, row, stride)
    }

    /// The per-row state of query row `i` (i64): its q chunks (widened), aligned index, mask
    /// bounds and bias row pointers.
    pub(super) fn row(&self, b: &mut FunctionBuilder, bases: &Bases, i: Value) -> Row {
        let spec = self.spec;
        let q = self.row_ptr(b, &spec.q, bases.q, i);
        let ia = b.ins().iadd_imm_s(i, spec.n as i64 - spec.m as i64);
        let ia32 = b.ins().ireduce(I32, ia);
        let ia_v = b.ins().splat(I32X4, ia32);
        let mask = spec
            .mask
            .as_ref()
            .map(|p| RowMask::new(b, p, ia, spec.m, spec.n));
        let bias_rows = spec
            .biases
            .iter()
            .zip(&bases.biases)
            .map(|(t, &base)| {
                let p = self.row_ptr(b, t, base, i);
                if t.col_stride == 0 {
                    let x = self.load_scalar(b, p, t.dtype);
                    BiasRow::Splat(b.ins().splat(F32X4, x))
                } else {
                    BiasRow::Ptr(p)
                }
            })
            .collect();
        Row {
            q,
            ia_v,
            mask,
            bias_rows,
        }
    }
}

/// `a > b ? a : b`, lane-wise: two instructions instead of the eight of a NaN-propagating
/// `fmax`. The online softmax only needs a shift near the row maximum: a NaN score makes its
/// own `p = e^(NaN - m)` NaN, so the row still comes out NaN (QUALITY.md's max policy holds
/// for the output) whether or not the shift saw the NaN.
pub(super) fn max_shift(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    let gt = b.ins().fcmp(FloatCC::GreaterThan, x, y);
    select_f32(b, gt, x, y)
}

/// How a fused attention function is generated.
#[derive(Clone, Copy, Debug)]
pub struct Codegen {
    /// Whether the int8 kernel may use the CPU's u8·i8 dot-product instruction (`vpdpbusd`)
    /// where the ISA has it; without it the same integer tree is lowered to plain SIMD
    /// (identical results).
    pub dot_product: bool,
    /// Whether the CLIF text and the VCode listing are kept in [`DefinedAttention`].
    pub keep_text: bool,
}

/// A fused attention function defined in a module.
#[derive(Clone, Debug)]
pub struct DefinedAttention {
    /// The function.
    pub id: FuncId,
    /// Its CLIF before compilation (empty unless [`Codegen::keep_text`]).
    pub clif: String,
    /// Cranelift's VCode listing of the machine code, when available.
    pub vcode: Option<String>,
}

/// Declares function `name` with the kernel signature and the read-only data object
/// `{name}.tiles` holding `table`; returns the function id, a context whose function has the
/// signature and name set, and the table's global value in it.
pub(super) fn declare(
    module: &mut JITModule,
    name: &str,
    table: &TileTable,
) -> Result<(FuncId, Context, cranelift_codegen::ir::GlobalValue)> {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    let func_id = module
        .declare_function(name, Linkage::Export, &sig)
        .map_err(|e| codegen_err(name, e))?;
    let data_id = module
        .declare_data(&format!("{name}.tiles"), Linkage::Local, false, false)
        .map_err(|e| codegen_err(name, e))?;
    let mut desc = DataDescription::new();
    desc.define(table.bytes.clone().into_boxed_slice());
    desc.set_align(8);
    module
        .define_data(data_id, &desc)
        .map_err(|e| codegen_err(name, e))?;
    let mut ctx = Context::new();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, func_id.as_u32());
    let table_gv = module.declare_data_in_func(data_id, &mut ctx.func);
    Ok((func_id, ctx, table_gv))
}

/// The module's ISA with the same flags except `opt_level = none`.
fn in_order_isa(module: &JITModule, name: &str, dot_product: bool) -> Result<OwnedTargetIsa> {
    let host = module.isa();
    let mut shared = settings::builder();
    for v in host.flags().iter() {
        if v.name != "opt_level" {
            shared
                .set(v.name, &v.value_string())
                .map_err(|e| codegen_err(name, e))?;
        }
    }
    shared
        .set("opt_level", "none")
        .map_err(|e| codegen_err(name, e))?;
    let mut isa = isa::lookup(host.triple().clone()).map_err(|e| codegen_err(name, e))?;
    for v in host.isa_flags() {
        isa.set(v.name, &v.value_string())
            .map_err(|e| codegen_err(name, e))?;
    }
    if !dot_product {
        // Same integer tree, lowered without the `vpdpbusd` fold.
        for flag in ["has_avx_vnni", "has_avx512vnni"] {
            isa.set(flag, "false").map_err(|e| codegen_err(name, e))?;
        }
    }
    isa.finish(settings::Flags::new(shared))
        .map_err(|e| codegen_err(name, e))
}

/// Compiles `ctx` without Cranelift's mid-end optimizer and defines it as `func_id`; returns
/// the VCode listing.
///
/// The tile bodies are emitted in the order they should run: per step a few loads and the
/// FMAs that consume them, with at most 16 vector values live. The e-graph pass would place
/// every pure instruction (the FMAs) at its first use and keep loads in program order, so
/// an unrolled tile would load everything first and spill most of it. Constants are shared
/// by construction, so the optimizer has little else to do here.
pub(super) fn define_in_order(
    module: &mut JITModule,
    func_id: FuncId,
    ctx: &mut Context,
    name: &str,
    codegen: Codegen,
) -> Result<Option<String>> {
    let isa = in_order_isa(module, name, codegen.dot_product)?;
    ctx.set_disasm(codegen.keep_text);
    ctx.compile(&*isa, &mut ControlPlane::default())
        .map_err(|e| codegen_err(name, format!("{:?}", e.inner)))?;
    let code = ctx
        .compiled_code()
        .ok_or_else(|| codegen_err(name, "no compiled code"))?;
    let align = u64::from(code.buffer.alignment)
        .max(u64::from(isa.function_alignment().minimum))
        .max(isa.symbol_alignment());
    let relocs: Vec<ModuleReloc> = code
        .buffer
        .relocs()
        .iter()
        .map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, func_id))
        .collect();
    let bytes = code.code_buffer().to_vec();
    let vcode = code.vcode.clone();
    module
        .define_function_bytes(func_id, align, &bytes, &relocs)
        .map_err(|e| codegen_err(name, e))?;
    Ok(vcode)
}

/// The blocks of a fused attention function (the layout in the module docs), shared by the
/// exact and the int8 kernel.
pub(super) struct Skeleton {
    pub(super) entry: Block,
    pub(super) group_head: Block,
    pub(super) run_head: Block,
    pub(super) run_body: Block,
    pub(super) run_next: Block,
    pub(super) group_fin: Block,
    pub(super) exit: Block,
}

impl Skeleton {
    /// Creates the blocks: `entry` takes the function's parameters, `group_head` the query
    /// tile and `run_head` the run index (i64).
    pub(super) fn new(b: &mut FunctionBuilder) -> Skeleton {
        let k = Skeleton {
            entry: b.create_block(),
            group_head: b.create_block(),
            run_head: b.create_block(),
            run_body: b.create_block(),
            run_next: b.create_block(),
            group_fin: b.create_block(),
            exit: b.create_block(),
        };
        b.append_block_params_for_function_params(k.entry);
        b.append_block_param(k.group_head, I64);
        b.append_block_param(k.run_head, I64);
        k
    }

    /// Ends the entry block: jumps to the query tile holding row `rb` (or exits when
    /// `[rb, re)` is empty). Returns the table's address and that of its runs.
    pub(super) fn enter_groups(
        &self,
        b: &mut FunctionBuilder,
        spec: &AttentionSpec,
        (ptr, table_gv): (Type, GlobalValue),
        (rb, re): (Value, Value),
    ) -> (Value, Value) {
        let table = b.ins().symbol_value(ptr, table_gv);
        let groups = spec.m.div_ceil(QUERY_TILE) as i64;
        let runs_base = b.ins().iadd_imm_s(table, 8 * groups);
        let any = b.ins().icmp(IntCC::UnsignedLessThan, rb, re);
        let qt = b.ins().iconst(I64, QUERY_TILE as i64);
        let g0 = b.ins().udiv(rb, qt);
        b.ins()
            .brif(any, self.group_head, &[g0.into()], self.exit, &[]);
        (table, runs_base)
    }

    /// Starts `group_head`: the query tile `g`, its first row `i0` and the last row `m - 1`
    /// (rows past it are clamped to it: computed, not stored).
    pub(super) fn group_head(
        &self,
        b: &mut FunctionBuilder,
        spec: &AttentionSpec,
    ) -> (Value, Value, Value) {
        b.switch_to_block(self.group_head);
        let g = b.block_params(self.group_head)[0];
        let i0 = b.ins().imul_imm_s(g, QUERY_TILE as i64);
        let last = b.ins().iconst(I64, spec.m as i64 - 1);
        (g, i0, last)
    }
}

/// Declares a fused attention function over the tile table of `key_tile` keys, builds its
/// body with `emit(b, pointer type, table)` and defines it in source order.
pub(super) fn define_with_table(
    module: &mut JITModule,
    spec: &AttentionSpec,
    name: &str,
    (key_tile, codegen): (usize, Codegen),
    emit: impl FnOnce(&mut FunctionBuilder, Type, GlobalValue, &BTreeSet<u32>) -> Result<()>,
) -> Result<DefinedAttention> {
    let table = tile_table(spec, key_tile)?;
    let (func_id, mut ctx, table_gv) = declare(module, name, &table)?;
    let ptr = module.target_config().pointer_type();
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        emit(&mut b, ptr, table_gv, &table.kinds)?;
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let clif = match codegen.keep_text {
        true => ctx.func.display().to_string(),
        false => String::new(),
    };
    let vcode = define_in_order(module, func_id, &mut ctx, name, codegen)?;
    Ok(DefinedAttention {
        id: func_id,
        clif,
        vcode,
    })
}

/// One run of key tiles of the compile-time table (see [`Emitter::iterate_runs`]).
pub(super) struct Run {
    /// The run's index in the table (the `run_head` block parameter).
    pub(super) index: Value,
    /// Its first key tile and one past its last (i64).
    pub(super) first: Value,
    pub(super) end: Value,
    /// Its kind (i32): bit 0 partial, bit 1 the short last tile.
    pub(super) kind: Value,
}

impl Emitter<'_> {
    /// Loops over the runs the table lists for query tile `g`: jumps from the current block
    /// to `run_head`, which goes on to `run_body` while runs remain and to `group_fin` after
    /// the last; returns with the builder in `run_body`, where the run has been read. (The
    /// table is `[groups] (first run, run count)` u32 pairs, then `(first, end, kind)` runs.)
    pub(super) fn iterate_runs(
        &self,
        b: &mut FunctionBuilder,
        (table, runs_base): (Value, Value),
        g: Value,
        (run_head, run_body, group_fin): (Block, Block, Block),
    ) -> Run {
        let entry_p = self.offset(b, table, g, 8);
        let r0 = b.ins().uload32(mem().with_readonly(), entry_p, 0);
        let rc = b.ins().uload32(mem().with_readonly(), entry_p, 4);
        let r_end = b.ins().iadd(r0, rc);
        b.ins().jump(run_head, &[r0.into()]);
        b.switch_to_block(run_head);
        let r = b.block_params(run_head)[0];
        let more = b.ins().icmp(IntCC::UnsignedLessThan, r, r_end);
        b.ins().brif(more, run_body, &[], group_fin, &[]);
        b.switch_to_block(run_body);
        let rp = self.offset(b, runs_base, r, 12);
        Run {
            index: r,
            first: b.ins().uload32(mem().with_readonly(), rp, 0),
            end: b.ins().uload32(mem().with_readonly(), rp, 4),
            kind: b.ins().load(I32, mem().with_readonly(), rp, 8),
        }
    }
}

/// Query tile `g` (rows `i0 .. i0 + rows`) of a fused attention function, at its end.
pub(super) struct QueryTile {
    pub(super) g: Value,
    pub(super) i0: Value,
    pub(super) rows: usize,
}

impl QueryTile {
    /// Stores the tile's rows that lie in the call's row range `[rb, re)` with `store(b, r,
    /// i)` (row `r` of the tile is row `i`; the others were computed but belong to another
    /// call), then jumps to `group_head` with the next tile, or to `exit` past the range.
    pub(super) fn finish(
        &self,
        b: &mut FunctionBuilder,
        (rb, re): (Value, Value),
        (group_head, exit): (Block, Block),
        mut store: impl FnMut(&mut FunctionBuilder, usize, Value),
    ) {
        for r in 0..self.rows {
            let i = b.ins().iadd_imm_s(self.i0, r as i64);
            let lo = b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, rb);
            let hi = b.ins().icmp(IntCC::UnsignedLessThan, i, re);
            let mine = b.ins().band(lo, hi);
            let store_block = b.create_block();
            let next = b.create_block();
            b.ins().brif(mine, store_block, &[], next, &[]);
            b.switch_to_block(store_block);
            store(b, r, i);
            b.ins().jump(next, &[]);
            b.switch_to_block(next);
        }
        let g1 = b.ins().iadd_imm_s(self.g, 1);
        let next_i0 = b.ins().imul_imm_s(g1, QUERY_TILE as i64);
        let again = b.ins().icmp(IntCC::UnsignedLessThan, next_i0, re);
        b.ins().brif(again, group_head, &[g1.into()], exit, &[]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }
}
