//! Running a plan: buffer checks before machine code, work split across threads.
//!
//! ```no_run
//! # fn demo(kernel: &attnc_ir::Kernel, bindings: &attnc_ir::Bindings, q: &[f32]) -> attnc_jit::Result<()> {
//! use attnc_jit::runtime::{CompileOptions, CompiledKernel, Input};
//! let compiled = CompiledKernel::compile(kernel, bindings, &CompileOptions::default())?;
//! let out = compiled.run(&[Input::F32(q)], 2)?;
//! println!("{:?} {}", out.shape, out.data.len());
//! # Ok(()) }
//! ```

use crate::buffer::{convert, BufferView, Elem, Storage};
use crate::error::{JitError, Result};
use crate::jit::{Code, FunctionText, Jit, KernelHandle};
use crate::kernels::attention::quant;
use crate::kernels::{self, KernelArgs};
use crate::linear::LinearKernel;
use crate::plan::{plan_outputs, BufferSource, Plan, PlanOptions, StepKind};
use crate::pool::Pool;
use crate::wide::{Tier, Tiers, WideAttention};
use attnc_ir::{Bindings, DType, Kernel};
use attnc_wide::pages::zeroed;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

mod saved;

/// Options of [`CompiledKernel::compile`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    /// Estimated operations each thread must get: a step runs on at most
    /// `cost / parallel_threshold` threads (at least one; 0 lets every step use all threads).
    /// Starting a thread costs tens of microseconds, so small steps stay on one.
    pub parallel_threshold: usize,
    /// Whether the IR's fused ops run as fused kernels (else they are planned by their plain
    /// form, which tests compare against).
    pub fuse_attention: bool,
    /// Whether the int8 attention kernel may use the CPU's u8·i8 dot-product instruction
    /// (`vpdpbusd`, AVX-VNNI); without it the same integer tree is lowered to plain SIMD
    /// (same results, slower).
    pub dot_product_instructions: bool,
    /// The full-width tiers fused attention may run on (where the CPU has them). The default
    /// allows every tier, narrowed by the environment variable `ATTNC_TIERS` (a comma list of
    /// `avx512`, `amx`; `cranelift` or an empty list for none), so tests can run every tier
    /// and the portable path on one machine.
    pub tiers: Tiers,
    /// Whether every generated function's CLIF and machine-code listing are kept, for
    /// [`CompiledKernel::clif`] and `attnc explain --emit clif|asm` (off by default: printing
    /// them costs about a fifth of a small kernel's code generation).
    pub keep_text: bool,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            parallel_threshold: 1 << 22,
            fuse_attention: true,
            dot_product_instructions: true,
            tiers: Tiers::from_env(),
            keep_text: false,
        }
    }
}

/// One input buffer, in its storage type (row-major, contiguous).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// f32 data.
    F32(&'a [f32]),
    /// IEEE half data (read natively by the fused attention kernel, widened once for steps
    /// that compute in f32).
    F16(&'a [half::f16]),
    /// bfloat16 data (as for f16).
    Bf16(&'a [half::bf16]),
    /// i32 segment ids, read only by document masks (carried in an f32-sized buffer, bits
    /// unchanged).
    I32(&'a [i32]),
}

impl Input<'_> {
    fn dtype(&self) -> DType {
        match self {
            Input::F32(_) => DType::F32,
            Input::F16(_) => DType::F16,
            Input::Bf16(_) => DType::Bf16,
            Input::I32(_) => DType::I32,
        }
    }

    fn len(&self) -> usize {
        self.view().len()
    }

    fn view(&self) -> BufferView<'_> {
        match *self {
            Input::F32(s) => BufferView::F32(s),
            Input::F16(s) => BufferView::F16(s),
            Input::Bf16(s) => BufferView::Bf16(s),
            Input::I32(s) => BufferView::F32(ids_as_f32(s)),
        }
    }
}

/// Segment ids viewed as the f32 buffer that carries them: the same bytes, read back as ids
/// by [`f32_as_ids`]. No kernel does arithmetic on them.
pub(crate) fn ids_as_f32(ids: &[i32]) -> &[f32] {
    // SAFETY: i32 and f32 have the same size and alignment and every bit pattern is a valid
    // f32; the slice borrows `ids` for its lifetime.
    unsafe { std::slice::from_raw_parts(ids.as_ptr().cast::<f32>(), ids.len()) }
}

/// The inverse of [`ids_as_f32`].
pub(crate) fn f32_as_ids(x: &[f32]) -> &[i32] {
    // SAFETY: as in `ids_as_f32`; every bit pattern is a valid i32.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<i32>(), x.len()) }
}

/// A kernel's result: row-major f32 data (already rounded to f16/bf16 values when the
/// return type is one of those).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// The bound result shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: Vec<f32>,
}

/// A kernel compiled to machine code at bound shapes.
pub struct CompiledKernel {
    plan: Plan,
    /// One handle per step (`None` for host steps and full-width attention).
    handles: Vec<Option<KernelHandle>>,
    /// The full-width attention steps, by step index.
    wide: Vec<Option<WideAttention>>,
    /// The linear attention steps with their compiled feature maps, by step index.
    linear: Vec<Option<LinearKernel>>,
    /// The portable kernel of each full-width attention step, compiled on first need (see
    /// `crate::finite`).
    portable: Vec<OnceLock<std::result::Result<KernelHandle, String>>>,
    code: Arc<Code>,
    params: Vec<(String, DType)>,
    ret_dtype: DType,
    options: CompileOptions,
    compile_time: Duration,
    /// The query-key pairs gates skipped in the last run.
    skipped: crate::gate::Skipped,
    /// Large temporaries kept for later steps and runs.
    pool: Pool,
}

impl std::fmt::Debug for CompiledKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKernel")
            .field("kernel", &self.plan.kernel)
            .field("steps", &self.plan.steps.len())
            .finish()
    }
}

impl CompiledKernel {
    /// Frees the large temporaries this kernel keeps between runs (see `pool.rs`:
    /// each run reuses the last run's instead of faulting fresh memory in); the next run
    /// allocates them again. A fused attention's backward step keeps its buffers for dQ's
    /// shares likewise, and frees them here too.
    pub fn release_buffers(&self) {
        self.pool.release();
        self.backward_steps().for_each(|a| a.release_buffers());
    }

    /// Bytes of temporaries this kernel keeps between runs.
    pub fn kept_buffer_bytes(&self) -> usize {
        self.pool.bytes()
            + self
                .backward_steps()
                .map(|a| a.kept_buffer_bytes())
                .sum::<usize>()
    }

    /// The fused attention backward steps of the plan.
    fn backward_steps(&self) -> impl Iterator<Item = &crate::backward::AttentionBackward> {
        self.plan.steps.iter().filter_map(|step| match &step.kind {
            StepKind::Backward(b) => match &b.kernel {
                crate::backward::BackwardKernel::Attention(a) => Some(&**a),
                crate::backward::BackwardKernel::Linear(_) => None,
            },
            _ => None,
        })
    }

    /// Plans `kernel` at `bindings` and compiles every step.
    pub fn compile(
        kernel: &Kernel,
        bindings: &Bindings,
        options: &CompileOptions,
    ) -> Result<CompiledKernel> {
        CompiledKernel::compile_outputs(kernel, &[kernel.output], bindings, options)
    }

    /// [`CompiledKernel::compile`] for several nodes of `kernel`'s graph at once (a gradient
    /// graph's gradients; `kernel.output` is ignored): [`CompiledKernel::run_outputs`] returns
    /// each, every node computed once.
    pub fn compile_outputs(
        kernel: &Kernel,
        outputs: &[attnc_ir::NodeId],
        bindings: &Bindings,
        options: &CompileOptions,
    ) -> Result<CompiledKernel> {
        let start = Instant::now();
        let tiers = Tiers::available(options.tiers);
        let plan = plan_outputs(
            kernel,
            outputs,
            bindings,
            &PlanOptions {
                fuse: options.fuse_attention,
                tiers,
            },
        )?;
        // Once per process: products (matrix, linear, chunked, backward steps) wait for it.
        attnc_wide::gemm::prepare_in_background();
        let mut jit = Jit::new()?.keeping_text(options.keep_text);
        let mut ids = Vec::with_capacity(plan.steps.len());
        let mut map_ids = Vec::with_capacity(plan.steps.len());
        let mut elementwise: std::collections::HashMap<String, (cranelift_module::FuncId, String)> =
            std::collections::HashMap::new();
        for step in &plan.steps {
            let mut maps = [None, None];
            if let StepKind::Linear(linear) = &step.kind {
                for (k, map) in linear.maps() {
                    let name = format!("{}_{}", step.name, ["phi_q", "phi_k"][k]);
                    maps[k] = Some(jit.define_kernel(&name, |b, _, p| {
                        kernels::elementwise::emit_block(b, KernelArgs::new(p), &map.spec)
                    })?);
                }
            }
            map_ids.push(maps);
            let id = match &step.kind {
                StepKind::Cast(_)
                | StepKind::Constant(_)
                | StepKind::Convert(_)
                | StepKind::Pool(_)
                | StepKind::Unpool(_)
                | StepKind::Cumsum(_)
                | StepKind::Stats(_)
                | StepKind::RowReduce(..)
                | StepKind::Quantize(_) => None,
                StepKind::Elementwise(spec) => {
                    // Steps that compute the same expression on the same shapes share one
                    // function (Nyström's pseudo-inverse repeats its update six times).
                    let key = format!("{:?}", spec.by_slot());
                    match elementwise.get(&key) {
                        Some((id, first)) => {
                            let id = *id;
                            jit.share_text(first, &step.name);
                            Some(id)
                        }
                        None => {
                            let id = jit.define_kernel(&step.name, |b, _, p| {
                                kernels::elementwise::emit(b, KernelArgs::new(p), spec)
                            })?;
                            elementwise.insert(key, (id, step.name.clone()));
                            Some(id)
                        }
                    }
                }
                StepKind::MatMul(spec) if spec.wide => None,
                StepKind::Linear(_) | StepKind::Chunked(_) | StepKind::Backward(_) => None,
                StepKind::MatMul(spec) => Some(jit.define_kernel(&step.name, |b, _, p| {
                    kernels::matmul::emit(b, KernelArgs::new(p), spec)
                })?),
                StepKind::Reduce(op, spec) => Some(jit.define_kernel(&step.name, |b, _, p| {
                    kernels::reduce::emit_reduce(b, KernelArgs::new(p), *op, *spec)
                })?),
                StepKind::Attention(spec) if spec.tier != Tier::Cranelift => None,
                StepKind::Attention(spec) => {
                    let codegen = kernels::attention::Codegen {
                        dot_product: options.dot_product_instructions,
                        keep_text: jit.keeps_text(),
                    };
                    let defined = kernels::attention::define_attention_with(
                        jit.module_mut(),
                        spec,
                        &step.name,
                        codegen,
                    )?;
                    jit.record_text(&step.name, defined.clif, defined.vcode);
                    Some(defined.id)
                }
                StepKind::Prefix(spec) => Some(jit.define_kernel(&step.name, |b, _, p| {
                    kernels::prefix::emit(b, KernelArgs::new(p), spec)
                })?),
                StepKind::Softmax(spec) => Some(jit.define_kernel(&step.name, |b, _, p| {
                    kernels::reduce::emit_softmax(b, KernelArgs::new(p), *spec, false)
                })?),
                StepKind::SoftmaxSink(spec) => Some(jit.define_kernel(&step.name, |b, _, p| {
                    kernels::reduce::emit_softmax(b, KernelArgs::new(p), *spec, true)
                })?),
            };
            ids.push(id);
        }
        let code = jit.finish()?;
        let mut handles = Vec::with_capacity(ids.len());
        for (step, id) in plan.steps.iter().zip(ids) {
            handles.push(match id {
                None => None,
                Some(id) => {
                    let (batches, rows) = step.work();
                    let lens = step
                        .inputs
                        .iter()
                        .map(|&b| (plan.buffers[b].len, plan.buffers[b].elem))
                        .collect();
                    Some(code.handle(
                        id,
                        &step.name,
                        lens,
                        plan.buffers[step.output].len,
                        batches,
                        rows,
                    )?)
                }
            });
        }
        let mut linear = Vec::with_capacity(plan.steps.len());
        for (step, ids) in plan.steps.iter().zip(map_ids) {
            linear.push(match &step.kind {
                StepKind::Linear(l) => {
                    let mut maps = [None, None];
                    for (k, map) in l.maps() {
                        let Some(id) = ids[k] else { continue };
                        let lens = map
                            .spec
                            .inputs
                            .iter()
                            .map(|&b| (plan.buffers[b].len, plan.buffers[b].elem))
                            .collect();
                        let work = (
                            map.spec.work().1,
                            map.spec.shape.last().copied().unwrap_or(1),
                        );
                        let name = format!("{}_{}", step.name, ["phi_q", "phi_k"][k]);
                        maps[k] = Some(code.block_handle(id, &name, lens, work)?);
                    }
                    Some(LinearKernel::new((**l).clone(), maps))
                }
                _ => None,
            });
        }
        let wide = plan
            .steps
            .iter()
            .map(|step| match &step.kind {
                StepKind::Attention(spec) if spec.tier != Tier::Cranelift => {
                    WideAttention::new(spec, spec.tier)
                        .map(Some)
                        .ok_or_else(|| JitError::Plan {
                            op: step.name.clone(),
                            detail: format!("the {} tier cannot run it", spec.tier.name()),
                        })
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CompiledKernel {
            portable: plan.steps.iter().map(|_| OnceLock::new()).collect(),
            wide,
            linear,
            params: kernel
                .params
                .iter()
                .map(|p| (p.name.clone(), p.dtype))
                .collect(),
            ret_dtype: kernel.ret_dtype,
            plan,
            handles,
            code,
            options: options.clone(),
            compile_time: start.elapsed(),
            skipped: Default::default(),
            pool: Default::default(),
        })
    }

    /// The plan the kernel runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The bound result shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.plan.output_shape
    }

    /// The declared return type.
    pub fn ret_dtype(&self) -> DType {
        self.ret_dtype
    }

    /// Wall time of planning and code generation.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// (kernel name, CLIF text) of every generated function, in step order: empty unless the
    /// kernel was compiled with [`CompileOptions::keep_text`].
    pub fn clif(&self) -> Vec<(String, String)> {
        self.code
            .texts()
            .iter()
            .map(|t| (t.name.clone(), t.clif.clone()))
            .collect()
    }

    /// The fraction of the fused attention steps' query-key pairs that the last run skipped
    /// because a gate multiplying the attention was zero on their query tiles (0 when the
    /// plan has no attention step).
    pub fn skipped_fraction(&self) -> f64 {
        let total: u64 = self
            .plan
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Attention(a) => Some((a.batch_count() * a.m) as u64 * a.n as u64),
                _ => None,
            })
            .sum();
        match total {
            0 => 0.0,
            t => self.skipped.get() as f64 / t as f64,
        }
    }

    /// The text forms (CLIF and Cranelift's VCode listing of the machine code): empty unless
    /// compiled with [`CompileOptions::keep_text`].
    pub fn texts(&self) -> &[FunctionText] {
        self.code.texts()
    }

    /// Checks every input against the bound shapes: count, dtype and element count. Runs
    /// before any machine code.
    pub fn check_inputs(&self, inputs: &[Input<'_>]) -> Result<()> {
        if inputs.len() != self.params.len() {
            return Err(JitError::Buffer {
                input: self.plan.kernel.clone(),
                detail: format!(
                    "kernel takes {} inputs, got {}",
                    self.params.len(),
                    inputs.len()
                ),
            });
        }
        self.check_some(inputs)
    }

    /// Checks the first `inputs.len()` parameters' inputs: dtype and element count.
    fn check_some(&self, inputs: &[Input<'_>]) -> Result<()> {
        for (k, (input, (name, dtype))) in inputs.iter().zip(&self.params).enumerate() {
            if input.dtype() != *dtype {
                return Err(JitError::Buffer {
                    input: name.clone(),
                    detail: format!(
                        "declared {} but given {} data",
                        dtype.keyword(),
                        input.dtype().keyword()
                    ),
                });
            }
            let shape = &self.plan.input_shapes[k];
            let want: usize = shape.iter().product();
            if input.len() != want {
                return Err(JitError::Buffer {
                    input: name.clone(),
                    detail: format!(
                        "bound shape {shape:?} has {want} elements, buffer has {}",
                        input.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs the kernel on `inputs` with up to `threads` threads (0 counts as 1). Results are
    /// bit-identical for every thread count.
    pub fn run(&self, inputs: &[Input<'_>], threads: usize) -> Result<Output> {
        Ok(self.run_all(inputs, threads, None)?.swap_remove(0))
    }

    /// Every result of a kernel compiled by [`CompiledKernel::compile_outputs`], in order.
    pub fn run_outputs(&self, inputs: &[Input<'_>], threads: usize) -> Result<Vec<Output>> {
        self.run_all(inputs, threads, None)
    }

    /// The rows `sample` of the output's first batch entry (the output read as
    /// `[batch, m, width]`), computing as little as the plan allows: when its last step is the
    /// fused attention kernel, only the sampled rows of that step run. Used to measure an
    /// approximation on a calibration sample at a small fraction of a run's cost.
    pub fn run_sample(
        &self,
        inputs: &[Input<'_>],
        threads: usize,
        sample: &[Range<usize>],
    ) -> Result<Vec<f32>> {
        let output = self.run_all(inputs, threads, Some(sample))?.swap_remove(0);
        let shape = &output.shape;
        let (m, width) = match shape.len() {
            0 => (1, 1),
            1 => (1, shape[0]),
            r => (shape[r - 2], shape[r - 1]),
        };
        let mut rows = Vec::new();
        for range in sample {
            let (r0, r1) = (range.start.min(m), range.end.min(m));
            rows.extend_from_slice(&output.data[r0 * width..r1 * width]);
        }
        Ok(rows)
    }

    /// Runs every step; with `sample`, a final attention step computes only those rows of its
    /// first batch entry. Returns every result of the plan.
    fn run_all(
        &self,
        inputs: &[Input<'_>],
        threads: usize,
        sample: Option<&[Range<usize>]>,
    ) -> Result<Vec<Output>> {
        self.check_inputs(inputs)?;
        self.skipped.reset();
        let threads = threads.max(1);
        // Temporaries live from the step that writes them to the last step that reads them.
        let mut last_use = vec![0usize; self.plan.buffers.len()];
        for (index, step) in self.plan.steps.iter().enumerate() {
            for &b in &step.inputs {
                last_use[b] = index;
            }
        }
        let mut temps: Vec<Storage> = vec![Storage::default(); self.plan.buffers.len()];
        for (index, ((((step, handle), wide), portable), linear)) in self
            .plan
            .steps
            .iter()
            .zip(&self.handles)
            .zip(&self.wide)
            .zip(&self.portable)
            .zip(&self.linear)
            .enumerate()
        {
            let out = {
                let views: Vec<BufferView<'_>> = step
                    .inputs
                    .iter()
                    .map(|&b| match self.plan.buffers[b].source {
                        BufferSource::Input(i) => inputs[i].view(),
                        BufferSource::Temp => temps[b].view(),
                    })
                    .collect();
                let t = self.step_threads(index, threads);
                let needed = match sample {
                    Some(rows) if index + 1 == self.plan.steps.len() => {
                        Needed::FirstEntryRows(rows)
                    }
                    Some(rows) if self.read_only_by_sampled_attention(step.output) => {
                        Needed::FirstEntry(rows)
                    }
                    _ => Needed::All,
                };
                if let StepKind::Backward(b) = &step.kind {
                    // Several gradients at once: each into its own buffer.
                    for (buf, data) in b.outputs.iter().zip(b.run(&views, t)?) {
                        temps[*buf] = Storage::F32(data);
                    }
                    None
                } else {
                    let kernels = (handle.as_ref(), wide.as_ref(), portable, linear.as_ref());
                    Some(self.run_step(step, kernels, &views, t, needed)?)
                }
            };
            if let Some(out) = out {
                temps[step.output] = out;
            }
            for &b in &step.inputs {
                if last_use[b] == index && !self.plan.is_output(b) {
                    if let Storage::F32(dead) = std::mem::take(&mut temps[b]) {
                        self.pool.give(dead);
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(self.plan.outputs.len().max(1));
        let outputs = if self.plan.outputs.is_empty() {
            vec![(self.plan.output, self.plan.output_shape.clone())]
        } else {
            self.plan.outputs.clone()
        };
        for (k, (buf, shape)) in outputs.iter().enumerate() {
            // Moved out, unless a later result is the same buffer.
            let storage = if outputs[k + 1..].iter().any(|(b, _)| b == buf) {
                temps[*buf].clone()
            } else {
                std::mem::take(&mut temps[*buf])
            };
            let data = match storage {
                Storage::F32(v) => v,
                other => match convert(other.view(), Elem::F32) {
                    Storage::F32(v) => v,
                    _ => Vec::new(),
                },
            };
            results.push(Output {
                shape: shape.clone(),
                data,
            });
        }
        Ok(results)
    }
}

impl CompiledKernel {
    /// The threads step `index` runs on, of `threads`: fewer where its work is small.
    fn step_threads(&self, index: usize, threads: usize) -> usize {
        let cost = self.plan.steps[index].cost(&self.plan.buffers);
        match self.options.parallel_threshold {
            0 => threads,
            per => (cost / per).clamp(1, threads),
        }
    }

    /// Whether buffer `b` is read by the last step only, and that step is an attention step
    /// (which, sampled, reads batch entry 0 only: attention kernels index every operand by
    /// the entry they compute).
    fn read_only_by_sampled_attention(&self, b: usize) -> bool {
        let Some((last, earlier)) = self.plan.steps.split_last() else {
            return false;
        };
        matches!(last.kind, StepKind::Attention(_))
            && b != self.plan.output
            && last.inputs.contains(&b)
            && earlier.iter().all(|s| !s.inputs.contains(&b))
    }

    /// Runs one step on `views` (its input buffers) with up to `threads` threads and returns
    /// the buffer it writes, all of it or only what `needed` says is read afterwards (the rest
    /// stays zero).
    fn run_step(
        &self,
        step: &crate::plan::Step,
        (handle, wide, portable, linear): StepKernels<'_>,
        views: &[BufferView<'_>],
        threads: usize,
        needed: Needed<'_>,
    ) -> Result<Storage> {
        let len = self.plan.buffers[step.output].len;
        let host_input = |k: usize| -> Result<BufferView<'_>> {
            views.get(k).copied().ok_or_else(|| JitError::Plan {
                op: step.name.clone(),
                detail: format!("host step has no operand {k}"),
            })
        };
        Ok(match (&step.kind, handle) {
            (StepKind::Cast(to), _) => {
                let mut out = self.pool.zeroed(len, threads);
                // Plans cast f32 buffers; anything else is widened first.
                match host_input(0)? {
                    BufferView::F32(src) => cast(src, &mut out, *to),
                    other => {
                        if let Storage::F32(src) = convert(other, Elem::F32) {
                            cast(&src, &mut out, *to);
                        }
                    }
                }
                Storage::F32(out)
            }
            (StepKind::Constant(data), _) => Storage::F32(data.to_vec()),
            (StepKind::Unpool(spec), _) => {
                let mut out = self.pool.zeroed(len, threads);
                crate::host::unpool(spec, views, &mut out)?;
                Storage::F32(out)
            }
            (StepKind::Stats(part), _) => {
                let part = match host_input(0)? {
                    BufferView::F32(src) => part.run(src),
                    _ => None,
                };
                Storage::F32(part.ok_or_else(|| JitError::Plan {
                    op: step.name.clone(),
                    detail: "the attention output is shorter than its statistics".to_string(),
                })?)
            }
            (StepKind::Pool(spec), _) => {
                let mut out = self.pool.zeroed(len, threads);
                crate::host::pool(spec, views, &mut out)?;
                Storage::F32(out)
            }
            (StepKind::RowReduce(op, spec), _) => {
                let BufferView::F32(src) = host_input(0)? else {
                    return Err(JitError::Plan {
                        op: step.name.clone(),
                        detail: "a row reduction reads f32 rows".to_string(),
                    });
                };
                let mut out = self.pool.zeroed(len, threads);
                row_reduce(*op, spec, src, &mut out, threads)?;
                Storage::F32(out)
            }
            (StepKind::Cumsum(spec), _) => {
                let mut out = self.pool.zeroed(len, threads);
                crate::host::cumsum(spec, views, &mut out)?;
                Storage::F32(out)
            }
            (StepKind::Convert(to), _) => convert(host_input(0)?, *to),
            (StepKind::Quantize(layout), _) => {
                let ins = [host_input(0)?, host_input(1)?, host_input(2)?];
                match needed {
                    Needed::FirstEntry(rows) => {
                        Storage::U8(quant::pack_sampled(layout, &ins, rows)?)
                    }
                    _ => Storage::U8(quant::pack(layout, &ins, threads)?),
                }
            }
            (StepKind::Linear(_), _) => {
                let kernel = linear.ok_or_else(|| JitError::Plan {
                    op: step.name.clone(),
                    detail: "linear attention step has no kernel".to_string(),
                })?;
                let mut out = self.pool.zeroed(len, threads);
                kernel.run(views, &mut out, threads)?;
                Storage::F32(out)
            }
            (StepKind::Chunked(spec), _) => {
                let mut out = self.pool.zeroed(len, threads);
                crate::chunkwise::run(spec, views, &mut out, threads)?;
                Storage::F32(out)
            }
            (StepKind::MatMul(spec), None) if spec.wide => {
                let mut out = self.pool.zeroed(len, threads);
                crate::wide::run_matmul(spec, views, &mut out, threads)?;
                Storage::F32(out)
            }
            (StepKind::Attention(spec), _) if wide.is_some() && spec.lse => {
                let w = wide.expect("invariant: checked by the guard");
                let rows = spec.stats_offset();
                let mut out = self.pool.zeroed(len, threads);
                let mut lse = vec![0.0f32; spec.batch_count() * spec.m];
                let (o, stats) = out.split_at_mut(rows);
                let non_finite = w.run_with_lse(views, o, Some(&mut lse), threads)?;
                // The statistics the log-sum-exp step reads, as (m, l) pairs: (lse, 1).
                for (pair, &l) in stats.chunks_exact_mut(2).zip(&lse) {
                    pair[0] = l;
                    pair[1] = 1.0;
                }
                // Rescaling V changes O, never the log-sum-exp of the scores.
                let io = (o, Some(non_finite));
                let entries =
                    crate::finite::rescue_wide(spec, w.score(), views, io, &|v, o, e| {
                        w.run_rows(v, o, e, 0..spec.m)
                    })?;
                if !entries.is_empty() && spec.segments.is_empty() {
                    // Those entries' rows and statistics from the portable kernel instead.
                    let h = self.portable_attention(step, spec, portable)?;
                    let mut again = self.pool.zeroed(len, threads);
                    let (per, m) = (spec.m * spec.dv, spec.m);
                    for &e in &entries {
                        h.run_rows(views, &mut again, e, 0..m)?;
                        out[e * per..(e + 1) * per].copy_from_slice(&again[e * per..(e + 1) * per]);
                        let at = rows + 2 * e * m..rows + 2 * (e + 1) * m;
                        out[at.clone()].copy_from_slice(&again[at]);
                    }
                } else if !entries.is_empty() {
                    // A mask built from data: every entry again on the plain-Rust kernel
                    // (base e), those entries' rows and statistics taken from it.
                    let h = data_mask_fallback(spec)?;
                    let (per, m) = (spec.m * spec.dv, spec.m);
                    let mut again = vec![0.0f32; rows];
                    let mut again_lse = vec![0.0f32; spec.batch_count() * m];
                    h.run_with_lse(views, &mut again, Some(&mut again_lse), threads)?;
                    for &e in &entries {
                        out[e * per..(e + 1) * per].copy_from_slice(&again[e * per..(e + 1) * per]);
                        let at = rows + 2 * e * m;
                        for (i, &l) in again_lse[e * m..(e + 1) * m].iter().enumerate() {
                            out[at + 2 * i] = l;
                            out[at + 2 * i + 1] = 1.0;
                        }
                    }
                }
                Storage::F32(out)
            }
            (StepKind::Attention(spec), _) if wide.is_some() => {
                let w = wide.expect("invariant: checked by the guard");
                // Whether the kernel saw a non-finite value as it wrote (None: scan for one).
                let (mut out, non_finite) = match needed {
                    Needed::FirstEntryRows(rows) => (
                        run_sampled_rows(w, views, (len, spec.dv), rows, threads)?,
                        None,
                    ),
                    _ => {
                        let mut out = self.pool.zeroed(len, threads);
                        let non_finite = match &step.gate {
                            Some(g) => {
                                let io = (views, &mut out[..]);
                                crate::gate::run(g, spec, w, io, threads, &self.skipped)?;
                                None
                            }
                            None => Some(w.run(views, &mut out, threads)?),
                        };
                        (out, non_finite)
                    }
                };
                let io = (&mut out[..], non_finite);
                let entries =
                    crate::finite::rescue_wide(spec, w.score(), views, io, &|v, o, e| {
                        w.run_rows(v, o, e, 0..spec.m)
                    })?;
                if !entries.is_empty() {
                    // A mask built from data: the plain-Rust kernel reads its ids in base e;
                    // any other, the generated portable kernel.
                    type Rows<'r> =
                        Box<dyn Fn(&[BufferView<'_>], &mut [f32], usize) -> Result<()> + 'r>;
                    let rows: Rows<'_> = if spec.segments.is_empty() {
                        let h = self.portable_attention(step, spec, portable)?;
                        Box::new(move |v, o, e| h.run_rows(v, o, e, 0..spec.m))
                    } else {
                        let h = data_mask_fallback(spec)?;
                        Box::new(move |v, o, e| h.run_rows(v, o, e, 0..spec.m))
                    };
                    crate::finite::recompute(spec, views, &mut out, &entries, rows)?;
                }
                Storage::F32(out)
            }
            (StepKind::Attention(spec), Some(h)) => {
                let mut out = match needed {
                    Needed::FirstEntryRows(rows) => {
                        run_sampled_rows(h, views, (len, spec.dv), rows, threads)?
                    }
                    _ => {
                        let mut out = self.pool.zeroed(len, threads);
                        match &step.gate {
                            Some(g) => {
                                let io = (views, &mut out[..]);
                                crate::gate::run(g, spec, h, io, threads, &self.skipped)?
                            }
                            None => h.run(views, &mut out, threads)?,
                        }
                        out
                    }
                };
                crate::finite::keep_finite(spec, views, &mut out, &|v, o, e| {
                    h.run_rows(v, o, e, 0..spec.m)
                })?;
                Storage::F32(out)
            }
            (_, Some(h)) => {
                let mut out = self.pool.zeroed(len, threads);
                h.run(views, &mut out, threads)?;
                Storage::F32(out)
            }
            (_, None) => {
                return Err(JitError::Plan {
                    op: step.name.clone(),
                    detail: "step has no compiled kernel".to_string(),
                })
            }
        })
    }
}

/// Rows of a reduction per work item of [`row_reduce`].
const REDUCED_ROWS: usize = 1024;

/// Reduces each `spec.len`-element row of `src` into `out` (one value per row), blocks of
/// rows dealt to `threads` threads.
fn row_reduce(
    op: attnc_wide::reduce::RowReduce,
    spec: &crate::kernels::reduce::AxisSpec,
    src: &[f32],
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let len = spec.len;
    if out.len() != spec.outer || src.len() != spec.outer * len {
        return Err(JitError::Buffer {
            input: "row reduction".to_string(),
            detail: format!(
                "{} elements are not {} rows of {len}",
                src.len(),
                spec.outer
            ),
        });
    }
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(REDUCED_ROWS).enumerate().collect();
    crate::wide::deal(items, threads, |(block, rows)| {
        let first = block * REDUCED_ROWS * len;
        let part = &src[first..first + rows.len() * len];
        attnc_wide::reduce::rows(op, part, len, rows).map_err(crate::wide::wide_err)
    })
}

/// The plain-Rust kernel of an attention whose mask is built from data (document ids, a
/// block selection): it scores in base e, so it rescues the entries whose base-2 scores left
/// the f32 range on the AVX-512 tier, where the Cranelift kernel cannot read the ids.
fn data_mask_fallback(spec: &crate::kernels::attention::AttentionSpec) -> Result<WideAttention> {
    WideAttention::new(spec, Tier::Portable).ok_or_else(|| JitError::Plan {
        op: "attention".to_string(),
        detail: "the portable kernel cannot run this attention with a mask built from data"
            .to_string(),
    })
}

/// A lazily compiled portable kernel (or why it could not be compiled).
type PortableCell = OnceLock<std::result::Result<KernelHandle, String>>;

/// What runs one step: its generated kernel, full-width attention, lazily compiled portable
/// attention, or linear attention with its feature maps.
type StepKernels<'k> = (
    Option<&'k KernelHandle>,
    Option<&'k WideAttention>,
    &'k PortableCell,
    Option<&'k LinearKernel>,
);

impl CompiledKernel {
    /// The portable (Cranelift) kernel of the full-width attention `step`, compiled the first
    /// time a run needs it.
    fn portable_attention<'c>(
        &self,
        step: &crate::plan::Step,
        spec: &crate::kernels::attention::AttentionSpec,
        cell: &'c PortableCell,
    ) -> Result<&'c KernelHandle> {
        let build = || -> Result<KernelHandle> {
            // The portable kernel evaluates positions only.
            if !spec.segments.is_empty() {
                return Err(JitError::Plan {
                    op: "attention".to_string(),
                    detail: "a document mask has no portable kernel".to_string(),
                });
            }
            let mut spec = spec.clone();
            spec.tier = Tier::Cranelift;
            let name = format!("{}_portable", step.name);
            let mut jit = Jit::new()?;
            let codegen = kernels::attention::Codegen {
                dot_product: self.options.dot_product_instructions,
                keep_text: false,
            };
            let defined =
                kernels::attention::define_attention_with(jit.module_mut(), &spec, &name, codegen)?;
            let code = jit.finish()?;
            let lens = step
                .inputs
                .iter()
                .map(|&b| (self.plan.buffers[b].len, self.plan.buffers[b].elem))
                .collect();
            let (batches, rows) = step.work();
            let out = self.plan.buffers[step.output].len;
            code.handle(defined.id, &name, lens, out, batches, rows)
        };
        cell.get_or_init(|| build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|detail| JitError::Codegen {
                kernel: step.name.clone(),
                detail: detail.clone(),
            })
    }
}

/// What of a step's output the later steps read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Needed<'a> {
    /// Everything.
    All,
    /// Batch entry 0 (the step feeds only a sampled attention step, which computes these
    /// rows of it).
    FirstEntry(&'a [Range<usize>]),
    /// These rows of batch entry 0 (the sampled last step).
    FirstEntryRows(&'a [Range<usize>]),
}

/// Runs the rows `rows` of batch entry 0 (rows of `width` values) into an output of `len`
/// zeros, the row ranges spread over up to `threads` threads (each writes its own copy of the
/// output, untouched pages stay unmapped; the rows are then gathered).
fn run_sampled_rows(
    h: &(impl RowKernel + Sync),
    views: &[BufferView<'_>],
    (len, width): (usize, usize),
    rows: &[Range<usize>],
    threads: usize,
) -> Result<Vec<f32>> {
    let workers = threads.clamp(1, rows.len().max(1));
    let mut out = zeroed(len);
    if workers == 1 {
        for range in rows {
            h.run_rows(views, &mut out, 0, range.clone())?;
        }
        return Ok(out);
    }
    let per = rows.len().div_ceil(workers);
    let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    let mut part = zeroed(len);
                    for range in chunk {
                        h.run_rows(views, &mut part, 0, range.clone())?;
                    }
                    Ok(part)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for (chunk, part) in rows.chunks(per).zip(parts) {
        let part = part?;
        for range in chunk {
            let span = range.start * width..(range.end * width).min(len);
            if span.start < span.end {
                out[span.clone()].copy_from_slice(&part[span]);
            }
        }
    }
    Ok(out)
}

/// A kernel that computes chosen rows of one batch entry.
trait RowKernel {
    /// Rows `rows` of batch entry `batch` into `out` (the whole output's layout).
    fn run_rows(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        batch: usize,
        rows: Range<usize>,
    ) -> Result<()>;
}

impl RowKernel for KernelHandle {
    fn run_rows(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        batch: usize,
        rows: Range<usize>,
    ) -> Result<()> {
        KernelHandle::run_rows(self, inputs, out, batch, rows)
    }
}

impl RowKernel for WideAttention {
    fn run_rows(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        batch: usize,
        rows: Range<usize>,
    ) -> Result<()> {
        WideAttention::run_rows(self, inputs, out, batch, rows)
    }
}

/// Rounds `src` to `to` and widens back into `dst` (round to nearest even, NaN kept).
fn cast(src: &[f32], dst: &mut [f32], to: DType) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = match to {
            DType::F32 | DType::I32 => *s,
            DType::F16 => half::f16::from_f32(*s).to_f32(),
            DType::Bf16 => half::bf16::from_f32(*s).to_f32(),
        };
    }
}
