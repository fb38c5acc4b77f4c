//! The owner of the Cranelift JIT module: compiles functions, frees their memory on drop and
//! hands out typed kernel handles.
//!
//! Every generated kernel has ONE extern "C" ABI ([`KERNEL_ABI`]):
//!
//! ```text
//! fn(inputs: *const *const u8, output: *mut f32, batch: u64, begin: u64, end: u64)
//! ```
//!
//! `inputs` points at one pointer per operand buffer (each in its element type, see
//! [`crate::buffer::Elem`]), `batch` is a flat batch index in
//! `0..batches`, and `[begin, end)` a range of rows in `0..rows`. A kernel writes exactly the
//! output elements that belong to its (batch, rows) and reads only within the buffer lengths
//! it was generated for. This module is the only one with `unsafe`: [`KernelHandle::run`]
//! checks every buffer length and range before entering machine code, and splits the work
//! over threads itself, so disjoint ranges are guaranteed by construction.
//!
//! # Architecture invariant
//! A [`KernelHandle`] holds an `Arc` of the [`Code`] that owns its machine code, so the code
//! cannot be freed while a handle exists.

use crate::buffer::{BufferView, Elem};
use crate::error::{JitError, Result};
use cranelift_codegen::ir::{types, AbiParam, Signature};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};
use std::sync::{Arc, Mutex, OnceLock};

/// The ABI every kernel shares, as text (for documentation and `explain`).
pub const KERNEL_ABI: &str =
    "extern \"C\" fn(inputs: *const *const u8, output: *mut f32, batch: u64, begin: u64, end: u64)";

/// The function-pointer type of [`KERNEL_ABI`].
type RawKernel = unsafe extern "C" fn(*const *const u8, *mut f32, u64, u64, u64);

/// The host ISA, built once per process from `cranelift_native::builder()` (so `has_fma`,
/// `has_avx` … reflect this CPU), opt level `speed`, verifier on in debug and test builds.
fn host_isa() -> Result<OwnedTargetIsa> {
    static ISA: OnceLock<std::result::Result<OwnedTargetIsa, String>> = OnceLock::new();
    let isa = ISA.get_or_init(|| {
        let mut flags = settings::builder();
        let verifier = if cfg!(debug_assertions) {
            "true"
        } else {
            "false"
        };
        for (name, value) in [
            ("opt_level", "speed"),
            ("enable_verifier", verifier),
            ("use_colocated_libcalls", "false"),
            ("is_pic", "false"),
        ] {
            flags.set(name, value).map_err(|e| e.to_string())?;
        }
        let builder = cranelift_native::builder().map_err(str::to_string)?;
        builder
            .finish(settings::Flags::new(flags))
            .map_err(|e| e.to_string())
    });
    isa.clone().map_err(|what| JitError::Unsupported { what })
}

/// The CPU features Cranelift compiles for (part of every kernel cache key).
pub fn cpu_features() -> String {
    match host_isa() {
        Ok(isa) => {
            let flags: Vec<String> = isa
                .isa_flags()
                .iter()
                .filter(|v| v.as_bool().unwrap_or(true))
                .map(|v| v.to_string())
                .collect();
            format!("{} {}", isa.triple(), flags.join(","))
        }
        Err(e) => format!("unsupported: {e}"),
    }
}

/// The text forms kept for each compiled function.
#[derive(Clone, Debug)]
pub struct FunctionText {
    /// The function's name.
    pub name: String,
    /// Its CLIF before Cranelift's optimizations.
    pub clif: String,
    /// Cranelift's VCode listing of the machine code (register-allocated pseudo-assembly),
    /// when available.
    pub vcode: Option<String>,
}

/// A module being filled with functions; [`Jit::finish`] turns it into runnable [`Code`].
pub struct Jit {
    module: JITModule,
    ctx: Context,
    fn_ctx: FunctionBuilderContext,
    texts: Vec<FunctionText>,
    /// Whether each function's text forms are kept ([`Jit::keeping_text`]).
    keep_text: bool,
}

impl Jit {
    /// A new, empty module for the host CPU; it keeps no text forms of its functions.
    pub fn new() -> Result<Jit> {
        let isa = host_isa()?;
        let builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        let module = JITModule::new(builder);
        let ctx = module.make_context();
        Ok(Jit {
            module,
            ctx,
            fn_ctx: FunctionBuilderContext::new(),
            texts: Vec::new(),
            keep_text: false,
        })
    }

    /// This module, keeping the CLIF and VCode listing of every function it defines when
    /// `keep` (for `explain --emit`). Printing them takes about a fifth of a small
    /// function's code generation, so compiles that only run skip it.
    pub fn keeping_text(mut self, keep: bool) -> Jit {
        self.keep_text = keep;
        self
    }

    /// Whether the text forms are kept: generators that define their own functions record
    /// theirs only then.
    pub fn keeps_text(&self) -> bool {
        self.keep_text
    }

    /// The kernel signature ([`KERNEL_ABI`]) in this module's calling convention.
    pub fn kernel_signature(&self) -> Signature {
        let mut sig = self.module.make_signature();
        let ptr = self.module.target_config().pointer_type();
        sig.params.push(AbiParam::new(ptr));
        sig.params.push(AbiParam::new(ptr));
        for _ in 0..3 {
            sig.params.push(AbiParam::new(types::I64));
        }
        sig
    }

    /// Defines kernel `name` with the shared ABI: `body` fills the function through the
    /// builder (its entry block is created, has the five parameters and is current); it must
    /// end every path with `return`. The CLIF text and VCode listing are kept where the
    /// module keeps text ([`Jit::keeping_text`]).
    pub fn define_kernel(
        &mut self,
        name: &str,
        body: impl FnOnce(
            &mut FunctionBuilder,
            &mut JITModule,
            [cranelift_codegen::ir::Value; 5],
        ) -> Result<()>,
    ) -> Result<FuncId> {
        let codegen = |detail: String| JitError::Codegen {
            kernel: name.to_string(),
            detail,
        };
        let sig = self.kernel_signature();
        let id = self
            .module
            .declare_function(name, Linkage::Local, &sig)
            .map_err(|e| codegen(e.to_string()))?;
        self.module.clear_context(&mut self.ctx);
        self.ctx.func.signature = sig;
        self.ctx.set_disasm(self.keep_text);
        let frontend = self.module.target_config();
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fn_ctx);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry);
            let params = [p[0], p[1], p[2], p[3], p[4]];
            body(&mut b, &mut self.module, params)?;
            b.seal_all_blocks();
            b.finalize(frontend);
        }
        let clif = self.keep_text.then(|| self.ctx.func.display().to_string());
        self.module
            .define_function(id, &mut self.ctx)
            .map_err(|e| codegen(format!("{e:?}")))?;
        if let Some(clif) = clif {
            let vcode = self.ctx.compiled_code().and_then(|c| c.vcode.clone());
            self.texts.push(FunctionText {
                name: name.to_string(),
                clif,
                vcode,
            });
        }
        Ok(id)
    }

    /// The module, for generators that define their own functions (the fused attention
    /// kernel); record their text with [`Jit::record_text`].
    pub fn module_mut(&mut self) -> &mut JITModule {
        &mut self.module
    }

    /// Records the CLIF (and VCode listing) of a function defined directly through
    /// [`Jit::module_mut`] (nothing unless the module keeps text).
    pub fn record_text(&mut self, name: &str, clif: String, vcode: Option<String>) {
        if !self.keep_text {
            return;
        }
        self.texts.push(FunctionText {
            name: name.to_string(),
            clif,
            vcode,
        });
    }

    /// Records that kernel `name` runs the code of `from`, a function defined earlier (its
    /// text says so instead of repeating it).
    pub fn share_text(&mut self, from: &str, name: &str) {
        if !self.keep_text {
            return;
        }
        let note = format!("; the same code as {from}\n");
        self.texts.push(FunctionText {
            name: name.to_string(),
            clif: note.clone(),
            vcode: Some(note),
        });
    }

    /// Finalizes every defined function into executable memory.
    pub fn finish(mut self) -> Result<Arc<Code>> {
        self.module
            .finalize_definitions()
            .map_err(|e| JitError::Codegen {
                kernel: "<module>".to_string(),
                detail: e.to_string(),
            })?;
        Ok(Arc::new(Code {
            module: Mutex::new(Some(self.module)),
            texts: self.texts,
        }))
    }
}

/// Finalized machine code; the memory is freed when the last handle and owner are dropped.
pub struct Code {
    /// `Mutex` only to make the (`!Sync`) module shareable; it is touched just at lookup
    /// and drop.
    module: Mutex<Option<JITModule>>,
    texts: Vec<FunctionText>,
}

impl Code {
    /// The text forms of every function, in definition order.
    pub fn texts(&self) -> &[FunctionText] {
        &self.texts
    }

    /// A typed handle to kernel `id` that was generated for inputs of exactly `input_lens`
    /// (elements, element type), an output of `output_len` elements, and a work space of `batches × rows`.
    ///
    /// The caller (the plan) vouches that the generated code, given buffers of these lengths
    /// and a (batch, rows) range inside the work space, stays in bounds and writes only the
    /// output elements of that range.
    pub(crate) fn handle(
        self: &Arc<Code>,
        id: FuncId,
        name: &str,
        input_lens: Vec<(usize, Elem)>,
        output_len: usize,
        batches: usize,
        rows: usize,
    ) -> Result<KernelHandle> {
        let guard = self.module.lock().map_err(|_| JitError::Codegen {
            kernel: name.to_string(),
            detail: "jit module lock poisoned".to_string(),
        })?;
        let module = guard.as_ref().ok_or_else(|| JitError::Codegen {
            kernel: name.to_string(),
            detail: "jit module already freed".to_string(),
        })?;
        let ptr = module.get_finalized_function(id);
        // SAFETY: `ptr` is the finalized entry of a function declared with
        // `Jit::kernel_signature`, i.e. the system-V/host-default C ABI with parameters
        // (ptr, ptr, i64, i64, i64) and no results, which is exactly `RawKernel`. The code
        // lives as long as `self` (the handle keeps the Arc).
        let func = unsafe { std::mem::transmute::<*const u8, RawKernel>(ptr) };
        Ok(KernelHandle {
            code: Arc::clone(self),
            func,
            name: name.to_string(),
            input_lens,
            output_len,
            batches,
            rows,
        })
    }
}

impl Drop for Code {
    fn drop(&mut self) {
        let module = match self.module.get_mut() {
            Ok(m) => m.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(module) = module {
            // SAFETY: every `KernelHandle` holds an `Arc<Code>`, so when `Code` drops no
            // handle exists and no kernel of this module is running or can be called again.
            unsafe { module.free_memory() };
        }
    }
}

/// A callable kernel with the shared ABI, checked against the buffer lengths it was
/// generated for.
#[derive(Clone)]
pub struct KernelHandle {
    /// Keeps the machine code alive while this handle exists.
    #[allow(dead_code)]
    code: Arc<Code>,
    func: RawKernel,
    name: String,
    input_lens: Vec<(usize, Elem)>,
    output_len: usize,
    batches: usize,
    rows: usize,
}

impl std::fmt::Debug for KernelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelHandle")
            .field("name", &self.name)
            .field("batches", &self.batches)
            .field("rows", &self.rows)
            .finish()
    }
}

/// A raw output pointer shared by the threads of one [`KernelHandle::run`]; each thread
/// writes a disjoint (batch, rows) range.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the pointer is only used inside `KernelHandle::run`, whose threads write disjoint
// element sets of one live `&mut [f32]`.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// The input pointer table, shared read-only by the threads of one run.
struct SharedIns(Vec<*const u8>);

impl SharedIns {
    fn table(&self) -> *const *const u8 {
        self.0.as_ptr()
    }
}
// SAFETY: the pointers come from live slice borrows held for the whole run; kernels
// only read through them.
unsafe impl Send for SharedIns {}
// SAFETY: as above.
unsafe impl Sync for SharedIns {}

impl KernelHandle {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The work space: (batches, rows).
    pub fn work(&self) -> (usize, usize) {
        (self.batches, self.rows)
    }

    /// Runs the kernel over its whole work space, split into contiguous (batch, row) chunks
    /// over up to `threads` threads. Every output element is computed by exactly one call, so
    /// the result does not depend on `threads`.
    pub fn run(&self, inputs: &[BufferView<'_>], output: &mut [f32], threads: usize) -> Result<()> {
        self.check_buffers(inputs, output)?;
        let units = self.batches.saturating_mul(self.rows);
        if units == 0 {
            return Ok(());
        }
        let ins = SharedIns(inputs.iter().map(|s| s.as_ptr()).collect());
        let out = SharedOut(output.as_mut_ptr());
        let threads = threads.clamp(1, units);
        let chunk = units.div_ceil(threads);
        let run_units = |u0: usize, u1: usize| {
            let mut u = u0;
            while u < u1 {
                let batch = u / self.rows;
                let row = u % self.rows;
                let row_end = self.rows.min(row + (u1 - u));
                // SAFETY: buffer counts, element types and lengths were checked above against what the code
                // was generated for; `batch < batches` and `row < row_end <= rows`; the
                // (batch, row) ranges of different threads are disjoint, so no element is
                // written twice or read while written (inputs never alias the output: they
                // are distinct borrows).
                unsafe {
                    (self.func)(
                        ins.table(),
                        out.get(),
                        batch as u64,
                        row as u64,
                        row_end as u64,
                    )
                };
                u += row_end - row;
            }
        };
        if threads == 1 {
            run_units(0, units);
        } else {
            std::thread::scope(|s| {
                for t in 1..threads {
                    let (u0, u1) = (t * chunk, ((t + 1) * chunk).min(units));
                    if u0 < u1 {
                        let run_units = &run_units;
                        s.spawn(move || run_units(u0, u1));
                    }
                }
                run_units(0, chunk.min(units));
            });
        }
        Ok(())
    }

    /// Runs the kernel on the (batch entry, rows) `units` only, spread over up to `threads`
    /// threads; other rows are left as they are. Units must not overlap (each row is then
    /// written by one call).
    pub fn run_units(
        &self,
        inputs: &[BufferView<'_>],
        output: &mut [f32],
        units: &[(usize, std::ops::Range<usize>)],
        threads: usize,
    ) -> Result<()> {
        self.check_buffers(inputs, output)?;
        let units: Vec<(usize, usize, usize)> = units
            .iter()
            .map(|(b, r)| (*b, r.start, r.end.min(self.rows)))
            .filter(|&(b, r0, r1)| b < self.batches && r0 < r1)
            .collect();
        if units.is_empty() {
            return Ok(());
        }
        let ins = SharedIns(inputs.iter().map(|s| s.as_ptr()).collect());
        let out = SharedOut(output.as_mut_ptr());
        let threads = threads.clamp(1, units.len());
        let run_share = |share: usize| {
            for &(batch, r0, r1) in units.iter().skip(share).step_by(threads) {
                // SAFETY: buffer counts, element types and lengths were checked above;
                // `batch < batches` and `r0 < r1 <= rows`; units do not overlap and each is
                // run by one thread, so no element is written twice or read while written.
                unsafe { (self.func)(ins.table(), out.get(), batch as u64, r0 as u64, r1 as u64) };
            }
        };
        std::thread::scope(|s| {
            for share in 1..threads {
                let run_share = &run_share;
                s.spawn(move || run_share(share));
            }
            run_share(0);
        });
        Ok(())
    }

    /// Runs the kernel on the rows `rows` of batch entry `batch` only, on the calling thread
    /// (calibration samples). Rows outside the range are left as they are.
    pub fn run_rows(
        &self,
        inputs: &[BufferView<'_>],
        output: &mut [f32],
        batch: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        self.check_buffers(inputs, output)?;
        if batch >= self.batches || rows.start >= rows.end.min(self.rows) {
            return Ok(());
        }
        let ins: Vec<*const u8> = inputs.iter().map(|s| s.as_ptr()).collect();
        // SAFETY: buffer counts and lengths were checked against what the code was generated
        // for; `batch < batches` and `rows.start < row_end <= rows`.
        unsafe {
            (self.func)(
                ins.as_ptr(),
                output.as_mut_ptr(),
                batch as u64,
                rows.start as u64,
                rows.end.min(self.rows) as u64,
            )
        };
        Ok(())
    }

    /// Checks the buffer count and every length against what the code was generated for.
    fn check_buffers(&self, inputs: &[BufferView<'_>], output: &[f32]) -> Result<()> {
        check_inputs(&self.name, &self.input_lens, inputs)?;
        if output.len() != self.output_len {
            return Err(JitError::Buffer {
                input: format!("{} output", self.name),
                detail: format!(
                    "expected {} elements, got {}",
                    self.output_len,
                    output.len()
                ),
            });
        }
        Ok(())
    }
}

/// Checks the buffer count, every length and element type of `inputs` against `lens`, what
/// kernel `name` was generated for.
fn check_inputs(name: &str, lens: &[(usize, Elem)], inputs: &[BufferView<'_>]) -> Result<()> {
    if inputs.len() != lens.len() {
        return Err(JitError::Buffer {
            input: name.to_string(),
            detail: format!("kernel takes {} buffers, got {}", lens.len(), inputs.len()),
        });
    }
    for (k, (buf, &(len, elem))) in inputs.iter().zip(lens).enumerate() {
        if buf.len() != len || buf.elem() != elem {
            return Err(JitError::Buffer {
                input: format!("{name} operand {k}"),
                detail: format!(
                    "expected {len} {} elements, got {} {}",
                    elem.keyword(),
                    buf.len(),
                    buf.elem().keyword()
                ),
            });
        }
    }
    Ok(())
}

/// A callable elementwise kernel that writes a block of rows into a buffer of that block's
/// size (generated by [`crate::kernels::elementwise::emit_block`]): row `r` of a call over
/// `begin..end` lands at row `r - begin` of the block. Fused steps use it to compute an
/// operand a few rows at a time instead of materializing it whole.
#[derive(Clone)]
pub struct RowBlockKernel {
    /// Keeps the machine code alive while this handle exists.
    #[allow(dead_code)]
    code: Arc<Code>,
    func: RawKernel,
    name: String,
    input_lens: Vec<(usize, Elem)>,
    row_len: usize,
    rows: usize,
}

impl std::fmt::Debug for RowBlockKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowBlockKernel")
            .field("name", &self.name)
            .field("row_len", &self.row_len)
            .field("rows", &self.rows)
            .finish()
    }
}

impl Code {
    /// A typed handle to the row-block kernel `id`, generated for inputs of exactly
    /// `input_lens` and `rows` rows of `row_len` elements.
    ///
    /// The caller (the plan) vouches that the generated code, given buffers of these lengths
    /// and rows `begin..end` inside `0..rows`, stays in bounds and writes exactly the
    /// `(end - begin) · row_len` elements of its block.
    pub(crate) fn block_handle(
        self: &Arc<Code>,
        id: FuncId,
        name: &str,
        input_lens: Vec<(usize, Elem)>,
        (rows, row_len): (usize, usize),
    ) -> Result<RowBlockKernel> {
        let whole = self.handle(id, name, input_lens, 0, 1, rows)?;
        Ok(RowBlockKernel {
            code: whole.code,
            func: whole.func,
            name: whole.name,
            input_lens: whole.input_lens,
            row_len,
            rows,
        })
    }
}

impl RowBlockKernel {
    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Computes rows `rows` into `block` (`rows.len() · row_len` elements), on the calling
    /// thread. Errors, before any machine code runs, when a buffer or the block has another
    /// length than the code was generated for or the rows reach past the work space.
    pub fn run_block(
        &self,
        inputs: &[BufferView<'_>],
        rows: std::ops::Range<usize>,
        block: &mut [f32],
    ) -> Result<()> {
        check_inputs(&self.name, &self.input_lens, inputs)?;
        let count = rows.end.saturating_sub(rows.start);
        if rows.end > self.rows || count.checked_mul(self.row_len) != Some(block.len()) {
            return Err(JitError::Buffer {
                input: format!("{} block", self.name),
                detail: format!(
                    "rows {rows:?} of {} into {} elements (rows of {})",
                    self.rows,
                    block.len(),
                    self.row_len
                ),
            });
        }
        if count == 0 {
            return Ok(());
        }
        let ins: Vec<*const u8> = inputs.iter().map(|s| s.as_ptr()).collect();
        // SAFETY: buffer counts, element types and lengths were checked against what the code
        // was generated for; `rows.start < rows.end <= self.rows`, and the code writes row
        // `r` at row `r - rows.start` of its output, so exactly the `count · row_len`
        // elements of `block` (checked above), which is borrowed mutably and aliases no input.
        unsafe {
            (self.func)(
                ins.as_ptr(),
                block.as_mut_ptr(),
                0,
                rows.start as u64,
                rows.end as u64,
            )
        };
        Ok(())
    }
}
