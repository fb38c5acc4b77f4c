//! The full-width tier: fused attention steps whose arithmetic runs on the ahead-of-time
//! AVX-512 and AMX kernels of `attnc-wide`, with every decision still made here — the tile
//! table comes from the pattern algebra ([`crate::tiles`]) at the tier's tile sizes, the score
//! form from the fused op, the operands from the plan's buffers.
//!
//! A fused attention runs on this tier when the CPU has it, the compile options allow it, and
//! its score is one the kernels evaluate ([`WideScore`]: `s·scale`, plus at most one f32 bias
//! tensor, plus an ALiBi slope `slope · relpos` with one slope per batch entry, then an
//! optional softcap `cap · tanh(x / cap)`); every other score form stays on the 128-bit
//! Cranelift kernels, which remain complete. Work is split over (batch entry, query tile)
//! pairs, each thread taking the next pair as it finishes one (causal masks make later tiles
//! heavier, packed documents repeat a pattern of light and heavy tiles); every row is
//! computed the same way whichever thread computes it, so results are bit-identical across
//! thread counts.
//!
//! Plain matrix product steps run on the same tier through [`run_matmul`] (`attnc-wide`'s
//! bounds-checked front to the `gemm` crate), split in fixed chunks of output rows.

mod document;
mod topk;

use crate::buffer::BufferView;
use crate::error::{JitError, Result};
use crate::kernels::attention::{AttentionSpec, ScoreExpr, TensorRef};
use crate::kernels::matmul::MatMulSpec;
use crate::kernels::prefix::PrefixSpec;
use crate::tiles::{classify, TileKind};
use attnc_ir::{BinaryOp, MaskPattern, UnaryOp};
use attnc_wide::amx::{self, Products};
use attnc_wide::attention;
use attnc_wide::problem::{
    Bias, Call, CallError, Elements, KeyMask, Operand, Output, Score, TileRun, TileTable,
};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Which kernels compute a fused attention step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Cranelift's 128-bit code (the portable path).
    #[default]
    Cranelift,
    /// f32 products on AVX-512 (exact).
    Avx512,
    /// AMX tile products of the given precision (an approximation the policy allowed); int8
    /// runs the same kernel's products on AVX-512 VNNI where the CPU has no AMX.
    Amx(Products),
    /// Plain Rust on any CPU (`attnc_wide::portable`): the exact attentions whose masks read
    /// data (`document(...)`, `topk_blocks(...)`), which the Cranelift kernels cannot compile,
    /// where AVX-512 is missing or switched off.
    Portable,
}

impl Tier {
    /// The tier's name in plans and reports.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Cranelift => "cranelift f32x4",
            Tier::Avx512 => "avx-512",
            Tier::Amx(Products::Bf16) => match amx::unit(Products::Bf16) {
                Some(amx::Unit::Vectors) => "avx-512 bf16",
                _ => "amx bf16",
            },
            Tier::Amx(Products::Int8) => match amx::unit(Products::Int8) {
                Some(amx::Unit::Vectors) => "avx-512 vnni int8",
                _ => "amx int8",
            },
            Tier::Portable => "portable",
        }
    }
}

/// The full-width tiers a compilation may use: the CPU's, narrowed by the compile options
/// (and `ATTNC_TIERS`, see [`crate::CompileOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiers {
    /// AVX-512 f32 attention.
    pub avx512: bool,
    /// int8 attention products (AMX tiles, or AVX-512 VNNI without them).
    pub amx: bool,
    /// bf16 attention products (AMX tiles, or AVX-512 BF16 without them; `ATTNC_TIERS`
    /// switches both reduced-precision kinds as `amx`).
    pub amx_bf16: bool,
}

impl Tiers {
    /// Every tier.
    pub const ALL: Tiers = Tiers {
        avx512: true,
        amx: true,
        amx_bf16: true,
    };

    /// The tiers `ATTNC_TIERS` allows (a comma list of `avx512`, `amx`; `cranelift` or empty
    /// for none); every tier when it is unset or unreadable.
    pub fn from_env() -> Tiers {
        match std::env::var("ATTNC_TIERS") {
            Ok(list) => {
                let has = |name: &str| list.split(',').any(|t| t.trim() == name);
                Tiers {
                    avx512: has("avx512") || has("all"),
                    amx: has("amx") || has("all"),
                    amx_bf16: has("amx") || has("all"),
                }
            }
            Err(_) => Tiers::ALL,
        }
    }

    /// No full-width tier: every kernel is Cranelift's.
    pub const NONE: Tiers = Tiers {
        avx512: false,
        amx: false,
        amx_bf16: false,
    };

    /// What this CPU and process can run, within `allowed`.
    pub fn available(allowed: Tiers) -> Tiers {
        Tiers {
            avx512: allowed.avx512 && attention::available(),
            amx: allowed.amx && amx::available(Products::Int8),
            amx_bf16: allowed.amx_bf16 && amx::available(Products::Bf16),
        }
    }
}

/// The score form the full-width kernels evaluate, read off a folded score expression.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WideScore {
    /// Multiplies `s`.
    pub scale: f32,
    /// The bias operand holding one more factor of the scale per batch entry (a learned
    /// temperature, `f32[]` or `[h, 1, 1]`), read when the entry's call is made.
    pub scale_by: Option<usize>,
    /// The bias operand added (an index into [`AttentionSpec::biases`]).
    pub bias: Option<usize>,
    /// The bias operand holding one ALiBi slope per batch entry.
    pub slope: Option<usize>,
    /// The softcap.
    pub softcap: Option<f32>,
}

impl WideScore {
    /// The form of `spec`'s score, when the kernels evaluate it.
    pub fn of(spec: &AttentionSpec) -> Option<WideScore> {
        let (inner, softcap) = match capped(&spec.score) {
            Some((x, cap)) => (x, Some(cap)),
            None => (&spec.score, None),
        };
        let mut form = WideScore {
            scale: 1.0,
            scale_by: None,
            bias: None,
            slope: None,
            softcap,
        };
        let mut terms = Vec::new();
        sum_terms(inner, &mut terms)?;
        let mut scaled = false;
        // A bias operand that holds one value per batch entry.
        let per_entry = |k: usize| {
            let t = &spec.biases[k];
            t.row_stride == 0 && t.col_stride == 0 && t.dtype == attnc_ir::DType::F32
        };
        for term in terms {
            if let Some((scale, by)) = scale_of(term) {
                if scaled || by.is_some_and(|k| !per_entry(k)) {
                    return None;
                }
                (scaled, form.scale, form.scale_by) = (true, scale, by);
            } else if let ScoreExpr::Bias(k) = term {
                let t = &spec.biases[*k];
                if form.bias.is_some() || t.dtype != attnc_ir::DType::F32 {
                    return None;
                }
                form.bias = Some(*k);
            } else {
                let k = slope_of(term)?;
                if form.slope.is_some() || !per_entry(k) {
                    return None;
                }
                form.slope = Some(k);
            }
        }
        (scaled && form.scale.is_finite() && form.softcap.is_none_or(|c| c.is_finite() && c != 0.0))
            .then_some(form)
    }
}

/// `cap · tanh(x / cap)` (either factor order): `(x, cap)`.
fn capped(e: &ScoreExpr) -> Option<(&ScoreExpr, f32)> {
    let ScoreExpr::Binary(BinaryOp::Mul, a, b) = e else {
        return None;
    };
    let (c, t) = match (&**a, &**b) {
        (ScoreExpr::Const(c), t) | (t, ScoreExpr::Const(c)) => (*c, t),
        _ => return None,
    };
    let ScoreExpr::Unary(UnaryOp::Tanh, inner) = t else {
        return None;
    };
    let ScoreExpr::Binary(BinaryOp::Div, x, d) = &**inner else {
        return None;
    };
    (**d == ScoreExpr::Const(c)).then_some((&**x, c as f32))
}

/// The terms of a sum (additions only).
fn sum_terms<'e>(e: &'e ScoreExpr, out: &mut Vec<&'e ScoreExpr>) -> Option<()> {
    if out.len() > 8 {
        return None;
    }
    match e {
        ScoreExpr::Binary(BinaryOp::Add, x, y) => {
            sum_terms(x, out)?;
            sum_terms(y, out)
        }
        other => {
            out.push(other);
            Some(())
        }
    }
}

/// `s` times constants and at most one bias operand, divided by constants (`s / c`,
/// `(s / c) · t`, `c · s · t`, ...): the constant part of the scale and that operand.
fn scale_of(e: &ScoreExpr) -> Option<(f32, Option<usize>)> {
    /// The factors of `e` into `constant`, `by` and `scores` (how many times `s` appears).
    fn factors(
        e: &ScoreExpr,
        constant: &mut f64,
        by: &mut Option<usize>,
        scores: &mut usize,
    ) -> Option<()> {
        match e {
            ScoreExpr::Scores => *scores += 1,
            ScoreExpr::Const(c) => *constant *= c,
            ScoreExpr::Bias(k) if by.is_none() => *by = Some(*k),
            ScoreExpr::Binary(BinaryOp::Mul, x, y) => {
                factors(x, constant, by, scores)?;
                factors(y, constant, by, scores)?;
            }
            ScoreExpr::Binary(BinaryOp::Div, x, y) => match &**y {
                ScoreExpr::Const(c) => {
                    factors(x, constant, by, scores)?;
                    *constant /= c;
                }
                _ => return None,
            },
            _ => return None,
        }
        Some(())
    }
    let (mut constant, mut by, mut scores) = (1.0, None, 0);
    factors(e, &mut constant, &mut by, &mut scores)?;
    (scores == 1).then_some((constant as f32, by))
}

/// `b · relpos` (either order): the bias index of the slope.
fn slope_of(e: &ScoreExpr) -> Option<usize> {
    match e {
        ScoreExpr::Binary(BinaryOp::Mul, x, y) => match (&**x, &**y) {
            (ScoreExpr::Bias(k), ScoreExpr::RelPos) | (ScoreExpr::RelPos, ScoreExpr::Bias(k)) => {
                Some(*k)
            }
            _ => None,
        },
        _ => None,
    }
}

/// The mask as the full-width kernels read it (a document part reads the call's segment ids).
pub fn key_mask(p: &MaskPattern) -> Option<KeyMask> {
    Some(match p {
        MaskPattern::Causal => KeyMask::Causal,
        MaskPattern::Window(w) => KeyMask::Window(*w),
        MaskPattern::Dilated { w, r } => KeyMask::Dilated { w: *w, r: *r },
        MaskPattern::Global(g) => KeyMask::Global(*g),
        MaskPattern::Block(b) => KeyMask::Block(*b),
        MaskPattern::Document { .. } => KeyMask::Document,
        MaskPattern::TopkBlocks { .. } => KeyMask::TopkBlocks,
        MaskPattern::And(a, b) => KeyMask::And(Box::new(key_mask(a)?), Box::new(key_mask(b)?)),
        MaskPattern::Or(a, b) => KeyMask::Or(Box::new(key_mask(a)?), Box::new(key_mask(b)?)),
    })
}

/// A work item of [`WideAttention`]: (batch entry, query tile, its output rows, and their
/// log-sum-exps when asked).
type Item<'o> = (usize, usize, &'o mut [f32], Option<&'o mut [f32]>);

/// What a refined tile table was built from ([`WideAttention::refine_key`]): one batch entry,
/// or the document ids (addresses and lengths of the slices read, and the rows' shift).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefineKey {
    Entry(usize),
    Ids {
        queries: (usize, usize),
        keys: (usize, usize),
        shift: i64,
    },
}

/// A fused attention step on the full-width tier, ready to run.
#[derive(Clone, Debug)]
pub struct WideAttention {
    spec: AttentionSpec,
    tier: Tier,
    score: WideScore,
    mask: Option<KeyMask>,
    tiles: TileTable,
    /// A `topk_blocks` part and the table of the mask with it keeping nothing (`tiles` has
    /// it keeping everything); each call's table lies between the two.
    topk: Option<(topk::Leaf, TileTable)>,
}

impl WideAttention {
    /// The (query tile, key tile) pairs this step visits, all pairs, and the tile sizes.
    pub fn key_tiles(&self) -> (usize, usize, (usize, usize)) {
        let (visited, total) = self.tiles.counts();
        (visited, total, (self.tiles.query_tile, self.tiles.key_tile))
    }

    /// Whether the full-width kernels compute `spec`: its score form is one they evaluate, the
    /// rows of Q, K and V are contiguous, and the depth is not 0 (their row reads assume a
    /// row inside its buffer, which an empty row of a transposed operand is not; every score
    /// is 0 then and the portable kernel is as fast).
    pub fn supports(spec: &AttentionSpec) -> bool {
        let operands_fit = [&spec.q, &spec.k, &spec.v]
            .iter()
            .zip([spec.d, spec.d, spec.dv])
            .all(|(t, cols)| t.col_stride == 1 || cols <= 1);
        // One document pair and one block selection at most: a call carries one of each.
        let mask_fits = spec.mask.as_ref().is_none_or(|m| {
            let documents = document::one_pair(m).is_some() || document::relaxed(m) == *m;
            let blocks = topk::one_leaf(m).is_some() || !topk::has_leaf(m);
            key_mask(m).is_some() && documents && blocks
        });
        spec.d > 0 && operands_fit && mask_fits && WideScore::of(spec).is_some()
    }

    /// The step of `spec` on `tier` (not [`Tier::Cranelift`]), with its tile table built from
    /// the pattern algebra at the tier's tile sizes; `None` when the tier cannot run it.
    pub fn new(spec: &AttentionSpec, tier: Tier) -> Option<WideAttention> {
        let score = WideScore::of(spec)?;
        let (qt, kt) = match tier {
            Tier::Cranelift => return None,
            Tier::Avx512 | Tier::Portable => (attention::QUERY_TILE, attention::KEY_TILE),
            Tier::Amx(_) => (amx::QUERY_TILE, amx::KEY_TILE),
        };
        if !WideAttention::supports(spec) {
            return None;
        }
        let (m, n) = (spec.m, spec.n);
        let mask = spec.mask.as_ref().and_then(key_mask);
        // A block selection bounds the mask between keeping everything there (`tiles`) and
        // nothing (`unselected`); each call's table is refined between the two.
        let leaf = spec.mask.as_ref().and_then(topk::one_leaf);
        let selected = match (&spec.mask, leaf) {
            (Some(p), Some(_)) => topk::substituted(p, true),
            (p, _) => p.clone(),
        };
        // A mask that requires equal ids is classified with its documents taken as kept: the
        // per-call refinement drops tiles by their ids and keeps this table's full tiles
        // full where both tiles hold one and the same id.
        let required = mask.as_ref().is_some_and(KeyMask::requires_document);
        let table = |pattern: Option<&MaskPattern>| {
            let relaxed = pattern.filter(|_| required).map(document::relaxed);
            let pattern = relaxed.as_ref().or(pattern);
            TileTable::from_fn(m, n, qt, kt, |t| {
                let (i0, i1) = ((t * qt).min(m), ((t + 1) * qt).min(m));
                classify(pattern, m, n, i0, i1, kt)
                    .into_iter()
                    .map(|r| TileRun {
                        first: r.first as u32,
                        end: r.end as u32,
                        partial: r.kind == TileKind::Partial,
                    })
                    .collect()
            })
        };
        let tiles = table(selected.as_ref());
        let topk = leaf.zip(spec.mask.as_ref()).map(|(leaf, p)| {
            let unselected = match topk::substituted(p, false) {
                Some(rest) => table(Some(&rest)),
                None => TileTable::from_fn(m, n, qt, kt, |_| Vec::new()),
            };
            (leaf, unselected)
        });
        Some(WideAttention {
            spec: spec.clone(),
            tier,
            score,
            mask,
            tiles,
            topk,
        })
    }

    /// The tier it runs on.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The rows per query tile of its kernels.
    pub(crate) fn query_tile(&self) -> usize {
        self.tiles.query_tile
    }

    /// Every row of every batch entry into `out` (`[batch.., m, dv]`), on up to `threads`
    /// threads. Returns whether some value written is not finite (each query tile's rows are
    /// checked as they are written, while they are in cache).
    pub fn run(&self, inputs: &[BufferView<'_>], out: &mut [f32], threads: usize) -> Result<bool> {
        self.run_with_lse(inputs, out, None, threads)
    }

    /// [`WideAttention::run`], and with `lse` (`[batch.., m]`) each row's log-sum-exp of its
    /// kept scores (`-inf` for a row that keeps none) from the same pass.
    pub fn run_with_lse(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        lse: Option<&mut [f32]>,
        threads: usize,
    ) -> Result<bool> {
        self.run_tiles(inputs, (out, lse), &|_, _| true, threads)
    }

    /// The query tiles `(batch entry, rows)` that `keep` accepts into `out` (and their
    /// log-sum-exps into `lse`), on up to `threads` threads; other rows are left as they are.
    /// Returns whether some value written to `out` is not finite.
    pub fn run_tiles(
        &self,
        inputs: &[BufferView<'_>],
        (out, lse): (&mut [f32], Option<&mut [f32]>),
        keep: &(dyn Fn(usize, Range<usize>) -> bool + Sync),
        threads: usize,
    ) -> Result<bool> {
        let (m, dv) = (self.spec.m, self.spec.dv);
        let entries = self.spec.batch_count();
        self.check_output(out.len())?;
        if lse.as_ref().is_some_and(|l| l.len() != entries * m) {
            return Err(JitError::Buffer {
                input: "log-sum-exp".to_string(),
                detail: "does not hold one value per row".to_string(),
            });
        }
        if m == 0 || dv == 0 || entries == 0 {
            return Ok(false);
        }
        let qt = self.query_tile();
        let bounds: Vec<OnceLock<Option<attention::ValueBound>>> =
            (0..entries).map(|_| OnceLock::new()).collect();
        self.prepare(inputs, &bounds, threads)?;
        // Work items: (batch entry, query tile, its output rows, their log-sum-exps), taken in
        // order by whichever thread is free.
        let mut lse_tiles: Vec<Option<&mut [f32]>> = match lse {
            Some(l) => l
                .chunks_mut(m)
                .flat_map(|e| e.chunks_mut(qt))
                .map(Some)
                .collect(),
            None => Vec::new(),
        };
        lse_tiles.reverse();
        let mut items: Vec<Item<'_>> = Vec::new();
        for (b, entry) in out.chunks_mut(m * dv).enumerate() {
            for (t, rows) in entry.chunks_mut(qt * dv).enumerate() {
                let lse = lse_tiles.pop().flatten();
                if keep(b, t * qt..((t + 1) * qt).min(m)) {
                    items.push((b, t, rows, lse));
                }
            }
        }
        let threads = threads.clamp(1, items.len().max(1));
        let queue = Queue::new(items);
        let non_finite = AtomicBool::new(false);
        on_threads(threads, || {
            self.run_items(inputs, &bounds, || queue.next(), &non_finite)
        })?;
        Ok(non_finite.into_inner())
    }

    /// Every batch entry's value bound, where the kernel reads one, computed on `threads`
    /// threads before the query tiles (computed on first need instead, an entry's bound would
    /// keep the other threads waiting at its first query tiles). The output's pages are the
    /// caller's to fault in: the runtime's buffers come faulted in on all threads
    /// (`attnc_wide::pages::zeroed_in_parallel`).
    fn prepare(
        &self,
        inputs: &[BufferView<'_>],
        bounds: &[OnceLock<Option<attention::ValueBound>>],
        threads: usize,
    ) -> Result<()> {
        if threads <= 1 || !self.reads_value_bound() {
            return Ok(());
        }
        let entries = Queue::new((0..bounds.len()).collect());
        on_threads(threads, || {
            while let Some(b) = entries.next() {
                let call = self.call(inputs, b)?;
                bounds[b].get_or_init(|| attention::ValueBound::of(&call));
            }
            Ok(())
        })
    }

    /// Whether [`WideAttention::run_items`] reads each entry's value bound.
    fn reads_value_bound(&self) -> bool {
        !matches!(self.tier, Tier::Amx(_) | Tier::Portable)
            && self.spec.m > attention::ROW_KERNEL_MAX_M
    }

    /// Rows `rows` of batch entry `batch` into `out` (the whole output's layout; nothing else
    /// is written). Query tiles the range only partly covers are computed whole into scratch
    /// and the asked rows copied.
    pub fn run_rows(
        &self,
        inputs: &[BufferView<'_>],
        out: &mut [f32],
        batch: usize,
        rows: Range<usize>,
    ) -> Result<()> {
        self.check_output(out.len())?;
        let (m, dv, qt) = (self.spec.m, self.spec.dv, self.query_tile());
        let rows = rows.start.min(m)..rows.end.min(m);
        if batch >= self.spec.batch_count() || rows.is_empty() || dv == 0 {
            return Ok(());
        }
        for t in rows.start / qt..rows.end.div_ceil(qt) {
            let tile = t * qt..((t + 1) * qt).min(m);
            let mut scratch = vec![0.0f32; tile.len() * dv];
            let mut item = Some((batch, t, &mut scratch[..], None));
            let bounds: Vec<_> = (0..=batch).map(|_| OnceLock::new()).collect();
            self.run_items(inputs, &bounds, || item.take(), &AtomicBool::new(false))?;
            let keep = tile.start.max(rows.start)..tile.end.min(rows.end);
            let from = (keep.start - tile.start) * dv..(keep.end - tile.start) * dv;
            let to = (batch * m + keep.start) * dv..(batch * m + keep.end) * dv;
            out[to].copy_from_slice(&scratch[from]);
        }
        Ok(())
    }

    fn check_output(&self, len: usize) -> Result<()> {
        let want = self.spec.batch_count() * self.spec.m * self.spec.dv;
        if len != want {
            return Err(JitError::Buffer {
                input: "output".to_string(),
                detail: format!("holds {len} elements, the attention writes {want}"),
            });
        }
        Ok(())
    }

    /// Computes work items `(batch entry, query tile, its output rows)` in order; the AMX
    /// tiers pack an entry's keys and values once per run of items of that entry.
    ///
    /// `bounds[b]` holds batch entry `b`'s values magnitude, computed by the first thread that
    /// needs it: V is read once per call, not once per thread. `non_finite` is set when an
    /// item's output holds a value that is not finite.
    fn run_items<'o>(
        &self,
        inputs: &[BufferView<'_>],
        bounds: &[OnceLock<Option<attention::ValueBound>>],
        mut items: impl FnMut() -> Option<Item<'o>>,
        non_finite: &AtomicBool,
    ) -> Result<()> {
        let qt = self.query_tile();
        let mut packed: Option<(usize, amx::Packed)> = None;
        // A data-dependent mask's tile table (and block selection), built from one batch
        // entry's ids and gate (items come in entry order, so each entry's is built once per
        // thread, and once for all the entries that read the same ids without a gate).
        let mut refined: Option<(RefineKey, TileTable, Vec<bool>)> = None;
        while let Some((b, t, rows, lse)) = items() {
            let mut call = self.call(inputs, b)?;
            let key = self.refine_key(&call, b);
            if self.reads_data() && refined.as_ref().is_none_or(|(built, ..)| *built != key) {
                let (table, keep) = self.refine(inputs, b, self.required_segments(&call))?;
                refined = Some((key, table, keep));
            }
            if let Some((_, table, keep)) = &refined {
                call.tiles = table;
                call.blocks = self.selection(keep);
            }
            let range = (t * qt)..((t + 1) * qt).min(self.spec.m);
            let mut output = Output {
                o: rows,
                row_stride: self.spec.dv,
                lse,
                lse_from_origin: false,
            };
            let result = match self.tier {
                Tier::Amx(products) => {
                    if packed.as_ref().is_none_or(|(entry, _)| *entry != b) {
                        packed = Some((b, amx::pack(products, &call).map_err(wide_err)?));
                    }
                    let (_, p) = packed.as_ref().expect("invariant: packed just above");
                    amx::run(products, &call, p, range, &mut output)
                }
                Tier::Portable => attnc_wide::portable::run(&call, range, &mut output),
                // The row kernel (decode) reads V once anyway and needs no bound: a pass over
                // the values to find one would double its memory traffic.
                _ if self.spec.m <= attention::ROW_KERNEL_MAX_M => {
                    attention::run(&call, range, &mut output)
                }
                _ => {
                    // The values' magnitude, read once per entry (by `prepare`, or by whichever
                    // thread needs it first) rather than by every query tile.
                    let value_bound = bounds
                        .get(b)
                        .and_then(|slot| *slot.get_or_init(|| attention::ValueBound::of(&call)));
                    attention::run_with_bound(&call, range, &mut output, value_bound)
                }
            };
            result.map_err(wide_err)?;
            if crate::finite::any_non_finite(output.o) {
                non_finite.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// What entry `b`'s refined tile table depends on: the entry where a block selection is
    /// read (each entry has its own gate), else the document ids it reads (heads that share
    /// one `seg` share the table).
    fn refine_key(&self, call: &Call<'_>, b: usize) -> RefineKey {
        match (&self.topk, &call.segments) {
            (None, Some(s)) => RefineKey::Ids {
                queries: (s.queries.as_ptr() as usize, s.queries.len()),
                keys: (s.keys.as_ptr() as usize, s.keys.len()),
                shift: s.shift,
            },
            _ => RefineKey::Entry(b),
        }
    }

    /// Whether the mask reads data (segment ids or a block selection), so that each batch
    /// entry's tile table is refined from it.
    fn reads_data(&self) -> bool {
        self.topk.is_some() || self.mask.as_ref().is_some_and(KeyMask::requires_document)
    }

    /// The segment ids of `call` when every kept pair needs equal ids (only then may tiles be
    /// dropped by their ids).
    fn required_segments<'c>(&self, call: &Call<'c>) -> Option<attnc_wide::problem::Segments<'c>> {
        let required = self.mask.as_ref().is_some_and(KeyMask::requires_document);
        call.segments.filter(|_| required)
    }

    /// Runs `f` on batch entry `b`'s call, its tile table (and block selection) refined from
    /// the entry's data where the mask reads data, as [`WideAttention::run_rows`] computes it.
    pub(crate) fn with_call<R>(
        &self,
        inputs: &[BufferView<'_>],
        b: usize,
        f: impl FnOnce(&Call<'_>) -> Result<R>,
    ) -> Result<R> {
        let mut call = self.call(inputs, b)?;
        let refined = match self.reads_data() {
            true => Some(self.refine(inputs, b, self.required_segments(&call))?),
            false => None,
        };
        if let Some((table, keep)) = &refined {
            call.tiles = table;
            call.blocks = self.selection(keep);
        }
        f(&call)
    }

    /// The block selection `keep` as the kernels read it (`None` without `topk_blocks`).
    fn selection<'k>(&self, keep: &'k [bool]) -> Option<attnc_wide::problem::Blocks<'k>> {
        self.topk.as_ref().map(|(leaf, _)| self.blocks(leaf, keep))
    }

    /// Batch entry `b`'s tile table and block selection (empty without one): the selection
    /// refines the static bounds, then the segment ids (when every kept pair needs equal ids)
    /// drop what their ranges cannot reach.
    fn refine(
        &self,
        inputs: &[BufferView<'_>],
        b: usize,
        segments: Option<attnc_wide::problem::Segments<'_>>,
    ) -> Result<(TileTable, Vec<bool>)> {
        let (m, n) = (self.spec.m, self.spec.n);
        let (mut table, keep) = match &self.topk {
            Some((leaf, unselected)) => {
                let index = batch_index(&self.spec.batch, b);
                let keep = topk::selection(&self.spec, inputs, &index, *leaf)?;
                let table = self
                    .blocks(leaf, &keep)
                    .refine(&self.tiles, unselected, m, n);
                (table, keep)
            }
            None => (self.tiles.clone(), Vec::new()),
        };
        if let Some(segments) = segments {
            table = segments.refine(&table, m, n);
        }
        Ok((table, keep))
    }

    /// The selection `keep` of `leaf` as the kernels read it.
    fn blocks<'k>(&self, leaf: &topk::Leaf, keep: &'k [bool]) -> attnc_wide::problem::Blocks<'k> {
        let b = usize::try_from(leaf.b.max(1)).unwrap_or(usize::MAX);
        attnc_wide::problem::Blocks {
            keep,
            rows: self.spec.m.div_ceil(b),
            cols: self.spec.n.div_ceil(b),
            b,
        }
    }

    /// The score form it evaluates.
    pub(crate) fn score(&self) -> WideScore {
        self.score
    }

    /// The call of batch entry `b` over the step's input buffers.
    pub(crate) fn call<'a>(&'a self, inputs: &[BufferView<'a>], b: usize) -> Result<Call<'a>> {
        let spec = &self.spec;
        let index = batch_index(&spec.batch, b);
        let operand = |t: &TensorRef, rows: usize, cols: usize| -> Result<Operand<'a>> {
            let offset = offset_of(t, &index);
            let data = match inputs.get(t.slot) {
                Some(BufferView::F32(x)) => Elements::F32(x.get(offset..).unwrap_or_default()),
                Some(BufferView::F16(x)) => Elements::F16(x.get(offset..).unwrap_or_default()),
                Some(BufferView::Bf16(x)) => Elements::Bf16(x.get(offset..).unwrap_or_default()),
                _ => return Err(buffer_err(&t.name, "is not a float buffer")),
            };
            Ok(Operand {
                data,
                rows,
                cols,
                row_stride: t.row_stride,
            })
        };
        let f32_of = |k: usize| -> Result<(&'a [f32], &TensorRef)> {
            let t = &spec.biases[k];
            match inputs.get(t.slot) {
                Some(BufferView::F32(x)) => {
                    Ok((x.get(offset_of(t, &index)..).unwrap_or_default(), t))
                }
                _ => Err(buffer_err(&t.name, "is not an f32 buffer")),
            }
        };
        let bias = match self.score.bias {
            Some(k) => {
                let (data, t) = f32_of(k)?;
                Some(Bias {
                    data,
                    row_stride: t.row_stride,
                    col_stride: t.col_stride,
                })
            }
            None => None,
        };
        let alibi_slope = match self.score.slope {
            Some(k) => Some(
                *f32_of(k)?
                    .0
                    .first()
                    .ok_or_else(|| buffer_err(&spec.biases[k].name, "is empty"))?,
            ),
            None => None,
        };
        let scale = match self.score.scale_by {
            Some(k) => {
                let by = *f32_of(k)?
                    .0
                    .first()
                    .ok_or_else(|| buffer_err(&spec.biases[k].name, "is empty"))?;
                self.score.scale * by
            }
            None => self.score.scale,
        };
        Ok(Call {
            q: operand(&spec.q, spec.m, spec.d)?,
            k: operand(&spec.k, spec.n, spec.d)?,
            v: operand(&spec.v, spec.n, spec.dv)?,
            score: Score {
                scale,
                bias,
                alibi_slope,
                softcap: self.score.softcap,
            },
            mask: self.mask.as_ref(),
            tiles: &self.tiles,
            segments: document::segments(spec, inputs, &index)?,
            blocks: None,
        })
    }
}

/// Output rows per work item of [`run_matmul`]: a fixed split, so each output element is
/// computed by the same product call whatever the thread count (bit-identical results).
const MATMUL_ROWS: usize = 128;

/// A planned matrix product on the full-width tier: every batch entry's `A · B` in chunks of
/// `MATMUL_ROWS` output rows, taken by up to `threads` threads as each is free.
pub fn run_matmul(
    spec: &MatMulSpec,
    inputs: &[BufferView<'_>],
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let (m, n, k) = (spec.m, spec.n, spec.k);
    let entries: usize = spec.batch.iter().product();
    let want = entries * m * n;
    if out.len() != want {
        return Err(buffer_err(
            "output",
            &format!("holds {} elements, not {want}", out.len()),
        ));
    }
    let (a, b) = match (inputs.first(), inputs.get(1)) {
        (Some(BufferView::F32(a)), Some(BufferView::F32(b))) => (*a, *b),
        _ => return Err(buffer_err("matmul", "takes two f32 buffers")),
    };
    if m == 0 || n == 0 || entries == 0 {
        return Ok(());
    }
    let mut items: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (e, entry) in out.chunks_mut(m * n).enumerate() {
        for (c, rows) in entry.chunks_mut(MATMUL_ROWS * n).enumerate() {
            items.push((e, c * MATMUL_ROWS, rows));
        }
    }
    deal(items, threads, |(e, r0, rows)| {
        let index = batch_index(&spec.batch, e);
        let dot =
            |strides: &[usize]| -> usize { strides.iter().zip(&index).map(|(s, i)| s * i).sum() };
        let count = rows.len() / n;
        let a_off = dot(&spec.a_batch_strides) + r0 * spec.a_rs;
        let left = attnc_wide::gemm::Matrix {
            data: a.get(a_off..).unwrap_or_default(),
            rows: count,
            cols: k,
            row_stride: spec.a_rs,
            col_stride: spec.a_cs,
        };
        let right = attnc_wide::gemm::Matrix {
            data: b.get(dot(&spec.b_batch_strides)..).unwrap_or_default(),
            rows: k,
            cols: n,
            row_stride: spec.b_rs,
            col_stride: spec.b_cs,
        };
        attnc_wide::gemm::sgemm(&left, &right, rows).map_err(wide_err)
    })
}

/// The f32 buffers `φQ`, `φK`, `V` of a linear attention step `what`, after checking that the
/// output (`out_len` elements) holds its `[batch.., m, dv]` rows.
pub(crate) fn linear_operands<'a>(
    spec: &PrefixSpec,
    inputs: &[BufferView<'a>],
    out_len: usize,
    what: &str,
) -> Result<[&'a [f32]; 3]> {
    if out_len != spec.batch_count() * spec.m * spec.dv {
        return Err(buffer_err(
            "output",
            &format!("does not hold the {what}'s rows"),
        ));
    }
    let f32s = |k: usize| match inputs.get(k) {
        Some(BufferView::F32(x)) => Ok(*x),
        _ => Err(buffer_err(what, "takes f32 buffers")),
    };
    Ok([f32s(0)?, f32s(1)?, f32s(2)?])
}

/// Runs `work` on every item on up to `threads` threads, each taking the next item as it
/// finishes one ([`Queue`]).
pub(crate) fn deal<T: Send>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> Result<()> + Sync,
) -> Result<()> {
    deal_with(items, threads, || (), |_, item| work(item))
}

/// [`deal`] with a state per thread, made by `state` once and passed to each of that
/// thread's items (scratch buffers reused across items instead of allocated per item).
pub(crate) fn deal_with<T: Send, S>(
    items: Vec<T>,
    threads: usize,
    state: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, T) -> Result<()> + Sync,
) -> Result<()> {
    let threads = threads.clamp(1, items.len().max(1));
    let queue = Queue::new(items);
    on_threads(threads, || {
        let mut own = state();
        while let Some(item) = queue.next() {
            work(&mut own, item)?;
        }
        Ok(())
    })
}

/// Work items handed out in order, one at a time, to whichever thread asks next.
///
/// Items differ in cost (a causal query tile's keys grow with its row; a document's tiles
/// repeat with the document's length), so a fixed deal leaves one thread behind: dealt
/// round-robin to 2 threads, 16 packed causal documents give one thread 72 key tiles for the
/// other's 64. Taken on demand, every thread stays busy until the queue is empty. An item's
/// result does not depend on the thread that computes it.
pub(crate) struct Queue<T>(std::sync::Mutex<std::vec::IntoIter<T>>);

impl<T> Queue<T> {
    pub(crate) fn new(items: Vec<T>) -> Queue<T> {
        Queue(std::sync::Mutex::new(items.into_iter()))
    }

    /// The next item, or `None` once all are taken (or a thread panicked while taking one).
    pub(crate) fn next(&self) -> Option<T> {
        self.0.lock().ok()?.next()
    }
}

/// Runs `work` once on each of `threads` threads: the calling thread and `threads − 1`
/// scoped ones. The first error (in thread order, the caller first) is returned, a panic is
/// resumed.
///
/// The caller takes a share rather than waiting: its thread-local scratch (the attention
/// tiles' buffers, the `gemm` crate's packing slab) is then allocated and faulted in once and
/// kept for the next step and the next run, where a fresh thread starts without it.
pub(crate) fn on_threads(threads: usize, work: impl Fn() -> Result<()> + Sync) -> Result<()> {
    let work = &work;
    if threads <= 1 {
        return work();
    }
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let own = work();
        std::iter::once(own)
            .chain(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            )
            .collect()
    });
    results.into_iter().collect()
}

/// The multi-index of batch entry `b` over `batch` (last axis fastest).
pub(crate) fn batch_index(batch: &[usize], mut b: usize) -> Vec<usize> {
    let mut index = vec![0; batch.len()];
    for (a, &size) in batch.iter().enumerate().rev() {
        if size > 0 {
            index[a] = b % size;
            b /= size;
        }
    }
    index
}

/// The element offset of batch entry `index` in tensor `t`.
pub(crate) fn offset_of(t: &TensorRef, index: &[usize]) -> usize {
    t.batch_strides.iter().zip(index).map(|(s, i)| s * i).sum()
}

pub(crate) fn buffer_err(name: &str, detail: &str) -> JitError {
    JitError::Buffer {
        input: name.to_string(),
        detail: detail.to_string(),
    }
}

pub(crate) fn wide_err(e: CallError) -> JitError {
    JitError::Plan {
        op: "attention".to_string(),
        detail: e.to_string(),
    }
}
