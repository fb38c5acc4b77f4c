//! Linear attention without a mask on the full-width tier ([`StepKind::Linear`]): per batch
//! entry the `[d, dv]` key-value state `φKᵀ V` and the key sum `Σ_j φk_j`, then every row
//! `(φq_i · S) / (φq_i · z + eps)`.
//!
//! The features `φQ` and `φK` are buffers, or the elementwise chains that produce them (the
//! feature map the program wrote, such as `elu(x) + 1`): a chain read by this step only is
//! compiled as a row-block kernel ([`RowBlockKernel`]) and run on a few rows at a time into
//! a scratch block that stays in cache, right before the products read them, so the features
//! are never written to memory whole. The step then reads Q, K and V once and writes O once.
//! The common map `elu(x) + 1` of an input runs on `attnc-wide`'s 16-lane code instead
//! ([`Features::EluPlusOne`]), and on the full-width tier any other map of f32 buffers whose
//! operations `attnc-wide`'s feature programs have runs as one ([`Features::Lanes`]).
//!
//! Blocks are fixed (`KEY_BLOCK` keys for the state, `ROW_BLOCK` rows for the output), so
//! every value is computed by the same calls in the same order whatever the thread count
//! (bit-identical results). The state is summed in parts of `STATE_PART` keys, also fixed by
//! the shape: each part is a work item, and an entry's parts are added in order, so a few
//! batch entries (one head, a validation sample) still keep every thread busy. Parts and row
//! blocks are taken by the threads in order as each is free.
//!
//! [`StepKind::Linear`]: crate::plan::StepKind::Linear

use crate::buffer::BufferView;
use crate::error::Result;
use crate::jit::RowBlockKernel;
use crate::kernels::elementwise::{ElementwiseSpec, Expr};
use crate::kernels::prefix::PrefixSpec;
use crate::wide::{batch_index, buffer_err, deal, deal_with, wide_err};
use attnc_ir::{BinaryOp, Normalizer, UnaryOp};
use attnc_wide::features::elu_plus_one;
use attnc_wide::features::program::Scratch;
use attnc_wide::gemm::{sgemm, sgemm_add, Matrix};

mod lanes;

pub use lanes::LaneMap;

/// Keys per block of the state's products (a block of `φK` and of `V` fit in L2 at `d = 64`).
const KEY_BLOCK: usize = 512;

/// Output rows per work item of the row phase.
const ROW_BLOCK: usize = 128;

/// Keys per work item of the state phase (four key blocks): enough products per item that
/// adding the parts' states costs little, small enough that one entry of 16,384 keys gives
/// eight items.
const STATE_PART: usize = 4 * KEY_BLOCK;

/// Where a linear attention step finds `φQ` or `φK`.
#[derive(Clone, Debug)]
pub enum Features {
    /// The step's input at this position (contiguous rows).
    Buffer(usize),
    /// Computed on row blocks by a fused elementwise kernel.
    Mapped(FeatureMap),
    /// `elu(x) + 1` of the step's input at this position (contiguous rows), computed on row
    /// blocks by `attnc-wide`'s 16-lane map rather than a 128-bit kernel.
    EluPlusOne(usize),
    /// Computed on row blocks by a 16-lane feature program.
    Lanes(LaneMap),
}

impl Features {
    /// The features a chain computes: `elu(x) + 1` of a buffer `x` read with contiguous rows
    /// (`contiguous` says whether a leaf's strides are) is [`Features::EluPlusOne`] (`slot`
    /// places its buffer among the step's inputs); with `lanes` (the full-width tier, f32
    /// buffers only) a chain a feature program can run is [`Features::Lanes`]; any other
    /// chain a [`FeatureMap`].
    pub(crate) fn of_chain(
        spec: ElementwiseSpec,
        contiguous: impl Fn(&[usize]) -> bool,
        lanes: bool,
        mut slot: impl FnMut(usize) -> usize,
    ) -> Features {
        if let Expr::Binary(BinaryOp::Add, x, y) = &spec.expr {
            let elu = match (&**x, &**y) {
                (e, Expr::Const(c)) | (Expr::Const(c), e) if *c == 1.0 => Some(e),
                _ => None,
            };
            if let Some(Expr::Unary(UnaryOp::Elu, leaf)) = elu {
                if let Expr::Leaf { buf, strides } = &**leaf {
                    if contiguous(strides) {
                        return Features::EluPlusOne(slot(*buf));
                    }
                }
            }
        }
        if lanes {
            if let Some(map) = LaneMap::lower(&spec.expr, &spec.shape, &mut slot) {
                return Features::Lanes(map);
            }
        }
        let slots = spec.inputs.iter().map(|&b| slot(b)).collect();
        Features::Mapped(FeatureMap { spec, slots })
    }
}

/// An elementwise chain computing features, fused into the step that reads them.
#[derive(Clone, Debug)]
pub struct FeatureMap {
    /// The chain over the features' own shape (`[batch.., rows, d]`); its leaves name plan
    /// buffers.
    pub spec: ElementwiseSpec,
    /// For each buffer the chain reads (`spec.inputs`), its position in the step's inputs.
    pub slots: Vec<usize>,
}

/// A planned linear attention step without a mask.
#[derive(Clone, Debug)]
pub struct LinearStep {
    /// Shapes, batch strides and the normalizer (the prefix kernel's spec, without its
    /// causal order).
    pub spec: PrefixSpec,
    /// `φQ` and `φK`.
    pub features: [Features; 2],
    /// The position of `V` in the step's inputs.
    pub values: usize,
}

impl LinearStep {
    /// The step for `explain`: sizes, normalizer and what was fused.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        let normalizer = match s.normalizer {
            Normalizer::None => ", unnormalized".to_string(),
            Normalizer::Sum { eps: 0.0 } => String::new(),
            Normalizer::Sum { eps } => format!(", eps {eps:e}"),
        };
        let fused: Vec<String> = ["φQ", "φK"]
            .iter()
            .zip(&self.features)
            .filter_map(|(name, f)| match f {
                Features::Mapped(map) => Some(format!("{name} ({} nodes)", map.spec.expr.size())),
                Features::EluPlusOne(_) => Some(format!("{name} (elu+1 on avx-512)")),
                Features::Lanes(map) => Some(format!("{name} ({} nodes on avx-512)", map.size())),
                Features::Buffer(_) => None,
            })
            .collect();
        let fused = match fused.len() {
            0 => String::new(),
            _ => format!(
                ", feature maps of {} fused on blocks of {KEY_BLOCK} keys / {ROW_BLOCK} rows",
                fused.join(" and ")
            ),
        };
        format!(
            "linear attention (key-value state [avx-512 gemm]{normalizer}{fused}) batch {:?} m={} n={} d={} dv={}",
            s.batch, s.m, s.n, s.d, s.dv
        )
    }

    /// The fused feature maps: 0 for `φQ`, 1 for `φK`.
    pub fn maps(&self) -> impl Iterator<Item = (usize, &FeatureMap)> {
        self.features
            .iter()
            .enumerate()
            .filter_map(|(k, f)| match f {
                Features::Mapped(map) => Some((k, map)),
                Features::Buffer(_) | Features::EluPlusOne(_) | Features::Lanes(_) => None,
            })
    }
}

/// A linear attention step ready to run: the step and its compiled feature maps.
#[derive(Clone, Debug)]
pub struct LinearKernel {
    step: LinearStep,
    maps: [Option<RowBlockKernel>; 2],
}

impl LinearKernel {
    /// The step with the kernels of its [`LinearStep::maps`] (by the same index).
    pub fn new(step: LinearStep, maps: [Option<RowBlockKernel>; 2]) -> LinearKernel {
        LinearKernel { step, maps }
    }

    /// Every row of every batch entry into `out` (`[batch.., m, dv]`), reading the step's
    /// `inputs`, on up to `threads` threads.
    pub fn run(&self, inputs: &[BufferView<'_>], out: &mut [f32], threads: usize) -> Result<()> {
        let spec = &self.step.spec;
        let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
        let entries = spec.batch_count();
        if out.len() != entries * m * dv {
            return Err(buffer_err(
                "output",
                "does not hold the linear attention's rows",
            ));
        }
        let [queries, keys] = [0, 1].map(|k| self.rows_of(k, inputs));
        let (queries, keys) = (queries?, keys?);
        let values = match inputs.get(self.step.values) {
            Some(BufferView::F32(x)) => *x,
            _ => return Err(buffer_err("linear attention", "takes f32 values")),
        };
        if m == 0 || dv == 0 || entries == 0 {
            return Ok(());
        }
        let offset = |e: usize, which: usize| -> usize {
            let index = batch_index(&spec.batch, e);
            spec.batch_strides[which]
                .iter()
                .zip(&index)
                .map(|(s, i)| s * i)
                .sum()
        };
        // Phase 1: each entry's state [d, dv + 1]: φKᵀ V beside the key sums, by parts of
        // keys (blocks of keys within a part), then the parts of each entry added in order.
        let width = dv + 1;
        let parts = n.div_ceil(STATE_PART).max(1);
        let mut partial = vec![0.0f32; entries * parts * d * width];
        let part_of = |e: usize, p: usize, state: &mut [f32]| -> Result<()> {
            let (k0, v0) = (offset(e, 1), offset(e, 2));
            let mut kv = vec![0.0f32; d * dv];
            let mut sums = vec![0.0f32; d];
            let (mut scratch, mut lanes) = (Vec::new(), Scratch::default());
            let keys_of_part = p * STATE_PART..((p + 1) * STATE_PART).min(n);
            for r0 in keys_of_part.clone().step_by(KEY_BLOCK) {
                let count = KEY_BLOCK.min(keys_of_part.end - r0);
                let block = keys.block(k0 + r0 * d, count, d, &mut scratch, &mut lanes)?;
                let kt = Matrix {
                    data: block,
                    rows: d,
                    cols: count,
                    row_stride: 1,
                    col_stride: d,
                };
                let vm = Matrix {
                    data: values.get(v0 + r0 * dv..).unwrap_or_default(),
                    rows: count,
                    cols: dv,
                    row_stride: dv,
                    col_stride: 1,
                };
                sgemm_add(&kt, &vm, &mut kv).map_err(wide_err)?;
                // Row by row: contiguous reads.
                for row in block.chunks_exact(d) {
                    for (s, x) in sums.iter_mut().zip(row) {
                        *s += x;
                    }
                }
            }
            for (a, row) in state.chunks_exact_mut(width).enumerate() {
                row[..dv].copy_from_slice(&kv[a * dv..(a + 1) * dv]);
                row[dv] = sums[a];
            }
            Ok(())
        };
        let mut items: Vec<(usize, &mut [f32])> =
            partial.chunks_mut((d * width).max(1)).enumerate().collect();
        if d == 0 {
            items.clear();
        }
        deal(items, threads, |(i, state)| {
            part_of(i / parts, i % parts, state)
        })?;
        let states = match parts {
            1 => partial,
            _ => {
                let mut states = vec![0.0f32; entries * d * width];
                let items: Vec<(usize, &mut [f32])> =
                    states.chunks_mut((d * width).max(1)).enumerate().collect();
                let partial = &partial;
                deal(items, threads, |(e, state)| {
                    let own = &partial[e * parts * state.len()..(e + 1) * parts * state.len()];
                    for part in own.chunks_exact(state.len()) {
                        for (s, x) in state.iter_mut().zip(part) {
                            *s += x;
                        }
                    }
                    Ok(())
                })?;
                states
            }
        };
        // Phase 2: rows [φq_i S | φq_i z], then the division.
        let mut rows: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (e, entry) in out.chunks_mut(m * dv).enumerate() {
            for (c, chunk) in entry.chunks_mut(ROW_BLOCK * dv).enumerate() {
                rows.push((e, c * ROW_BLOCK, chunk));
            }
        }
        let states = &states;
        deal_with(
            rows,
            threads,
            BlockScratch::default,
            |own, (e, r0, chunk)| {
                let count = chunk.len() / dv;
                let BlockScratch {
                    features,
                    lanes,
                    both,
                } = own;
                let block = queries.block(offset(e, 0) + r0 * d, count, d, features, lanes)?;
                both.clear();
                both.resize(count * width, 0.0);
                let qm = Matrix {
                    data: block,
                    rows: count,
                    cols: d,
                    row_stride: d,
                    col_stride: 1,
                };
                let sm = Matrix {
                    data: states.get(e * d * width..).unwrap_or_default(),
                    rows: d,
                    cols: width,
                    row_stride: width,
                    col_stride: 1,
                };
                sgemm(&qm, &sm, both).map_err(wide_err)?;
                for (row, got) in chunk.chunks_mut(dv).zip(both.chunks_exact(width)) {
                    match spec.normalizer {
                        Normalizer::None => row.copy_from_slice(&got[..dv]),
                        Normalizer::Sum { eps } => {
                            let den = got[dv] + eps as f32;
                            for (o, x) in row.iter_mut().zip(&got[..dv]) {
                                *o = x / den;
                            }
                        }
                    }
                }
                Ok(())
            },
        )
    }

    /// Where feature `k` (0: `φQ`, 1: `φK`) comes from among `inputs`.
    fn rows_of<'a>(&'a self, k: usize, inputs: &[BufferView<'a>]) -> Result<FeatureRows<'a>> {
        let f32s = |slot: usize| match inputs.get(slot) {
            Some(BufferView::F32(x)) => Ok(*x),
            _ => Err(buffer_err("linear attention", "takes f32 features")),
        };
        match (&self.step.features[k], &self.maps[k]) {
            (Features::Buffer(slot), _) => Ok(FeatureRows::Buffer(f32s(*slot)?)),
            (Features::EluPlusOne(slot), _) => Ok(FeatureRows::EluPlusOne(f32s(*slot)?)),
            (Features::Lanes(map), _) => {
                let sources = map.slots.iter().map(|&s| f32s(s)).collect::<Result<_>>()?;
                Ok(FeatureRows::Lanes { map, sources })
            }
            (Features::Mapped(map), Some(kernel)) => {
                let views = map
                    .slots
                    .iter()
                    .map(|&s| inputs.get(s).copied())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| buffer_err("linear attention", "lacks a feature map input"))?;
                Ok(FeatureRows::Mapped { kernel, views })
            }
            (Features::Mapped(_), None) => Err(buffer_err(
                "linear attention",
                "has a feature map without its kernel",
            )),
        }
    }
}

/// Buffers one thread reuses across the row blocks it computes (allocating them per block
/// costs a map and a round of page faults each at these sizes).
#[derive(Default)]
struct BlockScratch {
    features: Vec<f32>,
    lanes: Scratch,
    /// `[φq_i S | φq_i z]` per row.
    both: Vec<f32>,
}

/// The rows of `φQ` or `φK`: read from a buffer, or computed block by block.
enum FeatureRows<'a> {
    Buffer(&'a [f32]),
    EluPlusOne(&'a [f32]),
    Lanes {
        map: &'a LaneMap,
        sources: Vec<&'a [f32]>,
    },
    Mapped {
        kernel: &'a RowBlockKernel,
        views: Vec<BufferView<'a>>,
    },
}

impl FeatureRows<'_> {
    /// The `count` rows of `d` features from element `start` (a row boundary), borrowed from
    /// the buffer or computed into `scratch` (a feature program's strips in `lanes`).
    fn block<'s>(
        &'s self,
        start: usize,
        count: usize,
        d: usize,
        scratch: &'s mut Vec<f32>,
        lanes: &mut Scratch,
    ) -> Result<&'s [f32]> {
        let len = count * d;
        match self {
            FeatureRows::Buffer(x) => x
                .get(start..start + len)
                .ok_or_else(|| buffer_err("linear attention", "features end early")),
            FeatureRows::EluPlusOne(x) => {
                let src = x
                    .get(start..start + len)
                    .ok_or_else(|| buffer_err("linear attention", "features end early"))?;
                scratch.resize(len, 0.0);
                elu_plus_one(src, scratch).map_err(wide_err)?;
                Ok(scratch)
            }
            FeatureRows::Lanes { map, sources } => {
                scratch.resize(len, 0.0);
                let first = start / d.max(1);
                map.run_block(sources, first..first + count, scratch, lanes)?;
                Ok(scratch)
            }
            FeatureRows::Mapped { kernel, views } => {
                scratch.resize(len, 0.0);
                if len > 0 {
                    let first = start / d;
                    kernel.run_block(views, first..first + count, scratch)?;
                }
                Ok(scratch)
            }
        }
    }
}
