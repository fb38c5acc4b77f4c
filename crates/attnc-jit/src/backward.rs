//! Backward steps: the gradients of a fused attention (or linear attention) with respect to
//! several of its operands at once, one step writing one buffer per gradient.
//!
//! A fused attention's gradient step recomputes the forward with its row log-sum-exp
//! (`attnc_wide::backward::forward`: the AVX-512 kernel where the CPU has it, else the
//! portable one), unless the caller kept them from the forward ([`Residuals`], from
//! [`AttentionBackward::forward`]), and then runs the backward kernel
//! (`attnc_wide::backward`: FlashAttention-2 from the saved output and log-sum-exp), per batch
//! entry, visiting only the key tiles of the tile table the pattern algebra gives
//! ([`crate::tiles`]); no `m × n` buffer is allocated.
//! Work is taken by the threads in order as each is free. On the AVX-512 kernel, for
//! gradients of q, k and v, each batch entry's keys split into parts of 1,024 (the shape
//! alone sets them): a part writes its keys' rows of dK and dV, and its share of dQ, which is
//! added into dQ in part order as soon as the parts before it are in (the share buffers are
//! kept between calls); a recomputed forward splits into blocks of rows. Otherwise (bias or
//! slope gradients, the portable kernel) each entry is one item. Gradients of operands
//! broadcast over batch entries (grouped-query keys, a per-head slope) are summed over the
//! entries in entry order afterwards, so results are bit-identical for any thread count.
//!
//! Linear attention's gradient step ([`crate::backward::linear`]) runs through its key-value
//! state in O(n): the causal form with a running prefix state for `dq` and a reverse one for
//! `dk` and `dv`.

pub mod linear;

pub use linear::LinearBackward;

use crate::buffer::BufferView;
use crate::error::{JitError, Result};
use crate::kernels::attention::{AttentionSpec, TensorRef};
use crate::pool::Pool;
use crate::wide::{batch_index, buffer_err, offset_of, Tier, WideAttention};
pub use attnc_wide::backward::Saved;

use std::sync::{Mutex, OnceLock};

use attnc_wide::attention::ValueBound;
use attnc_wide::backward::{self as kernel, BiasGrad, Gradients, KeyPart, RowStats};
use attnc_wide::pages::zeroed;

/// Where one gradient goes: an operand's shape broadcast into the batch, contiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradLayout {
    /// The operand slot (0 q, 1 k, 2 v, `3 + k` bias `k`).
    pub slot: usize,
    /// The gradient's (the operand's) bound shape.
    pub shape: Vec<usize>,
    /// Element strides of the gradient per batch axis (0 where the operand is broadcast).
    pub batch_strides: Vec<usize>,
    /// Element strides between rows and between columns of one batch entry (0 where
    /// broadcast: a bias over keys only has row stride 0).
    pub row_stride: usize,
    /// See `row_stride`.
    pub col_stride: usize,
}

impl GradLayout {
    /// Elements of the gradient.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the gradient has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether batch entries map one to one onto consecutive blocks of the gradient (no
    /// broadcast over the batch), so each entry's block can be written in place.
    fn identity(&self, batch: &[usize], block: usize) -> bool {
        let mut expect = block;
        for (&size, &stride) in batch.iter().zip(&self.batch_strides).rev() {
            if size > 1 && stride != expect {
                return false;
            }
            expect *= size;
        }
        expect == self.len()
    }
}

/// The gradients of one fused attention: its forward (operands read as the fused step reads
/// them), the cotangent of its output, and one layout per gradient.
#[derive(Clone, Debug)]
pub struct AttentionBackward {
    /// The forward on the full-width path's terms (tile table at its tile sizes), used for
    /// its calls and table whichever kernel runs.
    forward: WideAttention,
    spec: AttentionSpec,
    /// The cotangent `dO` (`[batch.., m, dv]`, contiguous rows).
    d_o: TensorRef,
    /// The cotangent of the row log-sum-exp (`[batch.., m, 1]`), where it has one.
    d_lse: Option<TensorRef>,
    /// The gradients computed, in output order.
    pub grads: Vec<GradLayout>,
    /// Whether the AVX-512 kernels may run (else the portable ones).
    pub wide: bool,
    /// Buffers for the key parts' shares of dQ, kept between calls: a share is as large as
    /// the rows its keys reach (all of them on dense attention), and a fresh one costs its
    /// page faults again.
    spare: Pool,
}

impl AttentionBackward {
    /// The backward of `spec` with cotangents `d_o` and `d_lse` (the row log-sum-exp's, where
    /// it has one), or `None` when the backward kernels do not evaluate its score form (one
    /// bias, one per-entry slope, a softcap) or its operands' rows are not contiguous.
    pub fn new(
        spec: &AttentionSpec,
        (d_o, d_lse): (TensorRef, Option<TensorRef>),
        grads: Vec<GradLayout>,
        wide: bool,
    ) -> Option<AttentionBackward> {
        let forward = WideAttention::new(spec, Tier::Avx512)?;
        let rows_ok = d_o.col_stride == 1 || spec.dv <= 1;
        let slots_ok = grads.iter().all(|g| match g.slot {
            0..=2 => true,
            k => {
                let score = forward.score();
                score.bias == Some(k - 3) || score.slope == Some(k - 3)
            }
        });
        (rows_ok && slots_ok).then(|| AttentionBackward {
            forward,
            spec: spec.clone(),
            d_o,
            d_lse,
            grads,
            wide,
            spare: Pool::keeping_from(0),
        })
    }

    /// Frees the buffers kept for dQ's shares between calls.
    pub fn release_buffers(&self) {
        self.spare.release();
    }

    /// Bytes kept for dQ's shares between calls.
    pub fn kept_buffer_bytes(&self) -> usize {
        self.spare.bytes()
    }

    /// The tier the kernels run on.
    pub fn tier_name(&self) -> &'static str {
        if self.wide && attnc_wide::attention::available() {
            "avx-512"
        } else {
            "portable"
        }
    }

    /// The forward's shape and mask (for plans).
    pub fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    /// The forward's output and row log-sum-exp over the step's input buffers (the
    /// cotangent's is not read), batch entries dealt to `threads` threads: what
    /// [`AttentionBackward::run_saved`] takes instead of recomputing them.
    pub fn forward(&self, inputs: &[BufferView<'_>], threads: usize) -> Result<Residuals> {
        let spec = &self.spec;
        let (entries, m, dv) = (spec.batch_count(), spec.m, spec.dv);
        let mut saved = Residuals {
            o: zeroed(entries * m * dv),
            lse: vec![f32::NEG_INFINITY; entries * m],
        };
        if entries == 0 || m == 0 || spec.n == 0 {
            return Ok(saved);
        }
        // With fewer entries than threads, blocks of FORWARD_ROWS rows where the AVX-512
        // kernel runs (any split of its rows gives the same bits), so one entry's forward
        // spreads over the threads; else one block per entry, each call's set-up paid once
        // (empty blocks too: with dv = 0 the log-sum-exps are still computed).
        let split = entries < threads && self.splits() && dv > 0;
        let mut rows: &mut [f32] = &mut saved.o;
        let mut items = Vec::with_capacity(entries);
        for (e, lse) in saved.lse.chunks_mut(m).enumerate() {
            let (o, rest) = std::mem::take(&mut rows).split_at_mut(m * dv);
            rows = rest;
            if !split {
                items.push((e, 0, o, lse));
                continue;
            }
            let blocks = o
                .chunks_mut(FORWARD_ROWS * dv)
                .zip(lse.chunks_mut(FORWARD_ROWS));
            for (b, (o, lse)) in blocks.enumerate() {
                items.push((e, b * FORWARD_ROWS, o, lse));
            }
        }
        // Each entry's value bound, read once for all its blocks.
        let bounds: Vec<OnceLock<Option<ValueBound>>> =
            (0..entries).map(|_| OnceLock::new()).collect();
        crate::wide::deal(items, threads, |(e, first, o, lse)| {
            self.forward.with_call(inputs, e, |call| {
                match split {
                    true => {
                        let bound = *bounds[e].get_or_init(|| ValueBound::of(call));
                        kernel::forward_rows(call, first..first + lse.len(), o, lse, bound)
                    }
                    false => kernel::forward_with(call, o, lse, self.wide),
                }
                .map_err(wide_err)
            })
        })?;
        Ok(saved)
    }

    /// Every gradient, in output order, over the step's input buffers.
    pub fn run(&self, inputs: &[BufferView<'_>], threads: usize) -> Result<Vec<Vec<f32>>> {
        self.run_saved(inputs, None, threads)
    }

    /// [`AttentionBackward::run`] from the forward's `saved` output and log-sum-exp of every
    /// batch entry (laid out as [`Residuals`]) where given, else recomputing them.
    pub fn run_saved(
        &self,
        inputs: &[BufferView<'_>],
        saved: Option<Saved<'_>>,
        threads: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let spec = &self.spec;
        let entries = spec.batch_count();
        let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
        let blocks: Vec<usize> = self.grads.iter().map(|g| self.block_len(g)).collect();
        let mut outputs: Vec<Vec<f32>> = self.grads.iter().map(|g| zeroed(g.len())).collect();
        if entries == 0 || m == 0 || n == 0 {
            return Ok(outputs);
        }
        let d_o = match inputs.get(self.d_o.slot) {
            Some(BufferView::F32(x)) => *x,
            _ => return Err(buffer_err(&self.d_o.name, "is not an f32 buffer")),
        };
        if let Some(s) = saved {
            if s.o.len() != entries * m * dv || s.lse.len() != entries * m {
                return Err(buffer_err(
                    "saved forward",
                    "does not hold the output and log-sum-exp of every row",
                ));
            }
        }
        // Gradients written in place per entry where the batch maps one to one, else
        // computed per entry and summed in entry order afterwards.
        let direct: Vec<bool> = self
            .grads
            .iter()
            .zip(&blocks)
            .map(|(g, &b)| g.identity(&spec.batch, b))
            .collect();
        let mut scratch: Vec<Vec<f32>> = self
            .grads
            .iter()
            .zip(&direct)
            .zip(&blocks)
            .map(|((_, &dir), &b)| match dir {
                true => Vec::new(),
                false => zeroed(entries * b),
            })
            .collect();
        {
            // Per entry, one block of each gradient.
            let mut per_entry: Vec<Vec<&mut [f32]>> = (0..entries).map(|_| Vec::new()).collect();
            for ((out, s), (&dir, &b)) in outputs
                .iter_mut()
                .zip(scratch.iter_mut())
                .zip(direct.iter().zip(&blocks))
            {
                let target = if dir { out } else { s };
                if b == 0 {
                    per_entry.iter_mut().for_each(|e| e.push(&mut []));
                    continue;
                }
                for (e, chunk) in target.chunks_mut(b).enumerate() {
                    per_entry[e].push(chunk);
                }
            }
            let parts = self.key_parts();
            if parts > 1 {
                // The parts need every entry's forward before they start.
                let residuals;
                let saved = match saved {
                    Some(s) => s,
                    None => {
                        residuals = self.forward(inputs, threads)?;
                        residuals.saved()
                    }
                };
                self.run_parts(inputs, d_o, saved, per_entry, parts, threads)?;
            } else {
                let items: Vec<(usize, Vec<&mut [f32]>)> =
                    per_entry.into_iter().enumerate().collect();
                crate::wide::deal(items, threads, |(e, blocks)| {
                    let kept = saved
                        .map(|s| self.entry_saved(&s, e))
                        .transpose()?
                        .map(|s| (s.o, s.lse));
                    self.entry(inputs, d_o, e, blocks, kept, (m, n, d, dv))
                })?;
            }
        }
        // Broadcast operands: the entries' blocks summed into the gradient in entry order.
        for (k, g) in self.grads.iter().enumerate() {
            if direct[k] || blocks[k] == 0 {
                continue;
            }
            let (rows, cols) = self.block_dims(g);
            for e in 0..entries {
                let index = batch_index(&spec.batch, e);
                let base: usize = g.batch_strides.iter().zip(&index).map(|(s, i)| s * i).sum();
                let block = &scratch[k][e * blocks[k]..(e + 1) * blocks[k]];
                for r in 0..rows {
                    for c in 0..cols {
                        outputs[k][base + r * g.row_stride + c * g.col_stride] +=
                            block[r * cols + c];
                    }
                }
            }
        }
        Ok(outputs)
    }

    /// The rows and columns of one batch entry's block of gradient `g` (a broadcast bias
    /// keeps only its own extent: `[1, n]`, `[m, 1]`, `[1, 1]`).
    fn block_dims(&self, g: &GradLayout) -> (usize, usize) {
        let s = &self.spec;
        match g.slot {
            0 => (s.m, s.d),
            1 => (s.n, s.d),
            2 => (s.n, s.dv),
            _ => {
                let rows = if g.row_stride == 0 { 1 } else { s.m };
                let cols = if g.col_stride == 0 { 1 } else { s.n };
                (rows, cols)
            }
        }
    }

    fn block_len(&self, g: &GradLayout) -> usize {
        let (r, c) = self.block_dims(g);
        r * c
    }

    /// One batch entry: the forward's output and log-sum-exp (`kept`, else computed now),
    /// then the backward into `blocks` (one per gradient, each zeroed and `block_dims` in
    /// row-major order).
    fn entry(
        &self,
        inputs: &[BufferView<'_>],
        d_o: &[f32],
        e: usize,
        mut blocks: Vec<&mut [f32]>,
        kept: Option<(&[f32], &[f32])>,
        (m, _n, _d, dv): (usize, usize, usize, usize),
    ) -> Result<()> {
        // A mask that reads data: the entry's call has its tile table refined from it.
        self.forward.with_call(inputs, e, |call| {
            let computed;
            let (o, lse) = match kept {
                Some(kept) => kept,
                None => {
                    let mut o = vec![0.0f32; m * dv];
                    let mut lse = vec![0.0f32; m];
                    kernel::forward_with(call, &mut o, &mut lse, self.wide).map_err(wide_err)?;
                    computed = (o, lse);
                    (computed.0.as_slice(), computed.1.as_slice())
                }
            };
            let (d_o, d_lse) = self.cotangents(inputs, d_o, e)?;
            let mut grads = Gradients::default();
            let mut slope = 0.0f32;
            let mut slope_at = None;
            for (k, (g, block)) in self.grads.iter().zip(blocks.iter_mut()).enumerate() {
                let block: &mut [f32] = block;
                match g.slot {
                    0 => grads.dq = Some(block),
                    1 => grads.dk = Some(block),
                    2 => grads.dv = Some(block),
                    _ if self.forward.score().slope == Some(g.slot - 3) => slope_at = Some(k),
                    _ => {
                        let (rows, cols) = self.block_dims(g);
                        grads.dbias = Some(BiasGrad {
                            data: block,
                            row_stride: if rows > 1 { cols } else { 0 },
                            col_stride: usize::from(cols > 1),
                        });
                    }
                }
            }
            if slope_at.is_some() {
                grads.dslope = Some(&mut slope);
            }
            let saved = Saved { o, lse };
            let cotangents = (d_o, d_lse.as_deref());
            kernel::run_with(call, &saved, cotangents, &mut grads, self.wide).map_err(wide_err)?;
            if let Some(k) = slope_at {
                if let Some(x) = blocks[k].first_mut() {
                    *x = slope;
                }
            }
            Ok(())
        })
    }
}

/// Keys per part of a batch entry's backward ([`AttentionBackward::run_parts`]). Set by the
/// shape alone, never by the thread count, so that the sums of dQ over the parts run in the
/// same order, and results are bit-identical, on any number of threads.
const PART_KEYS: usize = 1024;

/// Rows per block of an entry's forward ([`AttentionBackward::forward`]), where it splits.
const FORWARD_ROWS: usize = 4 * attnc_wide::attention::QUERY_TILE;

impl AttentionBackward {
    /// Into how many parts of [`PART_KEYS`] keys each batch entry's backward splits: several
    /// on the AVX-512 kernel for gradients of q, k and v (a bias or slope gradient sums over
    /// every key), else 1 (the entry whole).
    fn key_parts(&self) -> usize {
        match self.splits() && self.grads.iter().all(|g| g.slot <= 2) {
            true => self.spec.n.div_ceil(PART_KEYS).max(1),
            false => 1,
        }
    }

    /// Whether the AVX-512 kernels run, on their own tile sizes: they take an entry's rows
    /// ([`kernel::forward_rows`]) or keys ([`kernel::run_part`]) in parts.
    fn splits(&self) -> bool {
        use attnc_wide::attention::{available, KEY_TILE, QUERY_TILE};
        self.wide && available() && self.forward.key_tiles().2 == (QUERY_TILE, KEY_TILE)
    }

    /// The cotangents of batch entry `e`: its rows of `dO` and, where the log-sum-exp has one,
    /// of `dlse`.
    fn cotangents<'a>(
        &self,
        inputs: &[BufferView<'_>],
        d_o: &'a [f32],
        e: usize,
    ) -> Result<(&'a [f32], Option<Vec<f32>>)> {
        Ok((self.d_o_rows(d_o, e)?, self.d_lse_rows(inputs, e)?))
    }

    /// Batch entry `e`'s rows of `dO`.
    fn d_o_rows<'a>(&self, d_o: &'a [f32], e: usize) -> Result<&'a [f32]> {
        let (m, dv) = (self.spec.m, self.spec.dv);
        let at = offset_of(&self.d_o, &batch_index(&self.spec.batch, e));
        d_o.get(at..at + m * dv)
            .ok_or_else(|| buffer_err(&self.d_o.name, "is shorter than the output"))
    }

    /// Batch entry `e`'s rows of `dlse`, where the log-sum-exp has a cotangent.
    fn d_lse_rows(&self, inputs: &[BufferView<'_>], e: usize) -> Result<Option<Vec<f32>>> {
        let index = batch_index(&self.spec.batch, e);
        self.d_lse
            .as_ref()
            .map(|t| rows_of(t, inputs, &index, self.spec.m))
            .transpose()
    }

    /// Batch entry `e`'s output and log-sum-exps in `saved` (laid out as [`Residuals`]).
    fn entry_saved<'a>(&self, saved: &Saved<'a>, e: usize) -> Result<Saved<'a>> {
        let (m, dv) = (self.spec.m, self.spec.dv);
        let short = || buffer_err("saved forward", "is shorter than its entries");
        Ok(Saved {
            o: saved
                .o
                .get(e * m * dv..(e + 1) * m * dv)
                .ok_or_else(short)?,
            lse: saved.lse.get(e * m..(e + 1) * m).ok_or_else(short)?,
        })
    }

    /// The backward with each entry split into `parts` parts of [`PART_KEYS`] keys, every
    /// (entry, part) pair taken by whichever thread is free: an entry's work spreads over the
    /// threads even where there are fewer entries than threads, or a slow thread would leave
    /// the others idle at the end. Each part writes its keys' rows of dK and dV; part 0 writes
    /// dQ, the others their share of it into a buffer of the rows they reach, added into dQ in
    /// part order once the parts before it are in ([`EntryParts::finish`]). `blocks`: per
    /// entry, one block of each gradient (q, k, v only: [`AttentionBackward::key_parts`]).
    fn run_parts(
        &self,
        inputs: &[BufferView<'_>],
        d_o: &[f32],
        saved: Saved<'_>,
        blocks: Vec<Vec<&mut [f32]>>,
        parts: usize,
        threads: usize,
    ) -> Result<()> {
        let (m, n, d, dv) = (self.spec.m, self.spec.n, self.spec.d, self.spec.dv);
        let mut entries = Vec::with_capacity(blocks.len());
        let mut items = Vec::with_capacity(blocks.len() * parts);
        for (e, entry_blocks) in blocks.into_iter().enumerate() {
            let mut dq = None;
            let mut keys: Vec<[Option<&mut [f32]>; 2]> = (0..parts).map(|_| [None, None]).collect();
            for (g, block) in self.grads.iter().zip(entry_blocks) {
                let (slot, cols) = match g.slot {
                    0 => {
                        dq = Some(block);
                        continue;
                    }
                    1 => (0, d),
                    2 => (1, dv),
                    _ => return Err(buffer_err("gradient", "of a bias or slope in key parts")),
                };
                // Consecutive blocks of PART_KEYS rows, the last one shorter.
                for (p, rows) in block.chunks_mut((PART_KEYS * cols).max(1)).enumerate() {
                    if let Some(k) = keys.get_mut(p) {
                        k[slot] = Some(rows);
                    }
                }
            }
            entries.push(EntryParts::new(dq, parts));
            items.extend(
                keys.into_iter()
                    .enumerate()
                    .map(|(p, [dk, dv])| (e, p, dk, dv)),
            );
        }
        let spare = &self.spare;
        let result = crate::wide::deal(items, threads, |(e, p, dk, dv_rows)| {
            let d_o = self.d_o_rows(d_o, e)?;
            let saved = self.entry_saved(&saved, e)?;
            let entry = &entries[e];
            // The first part of the entry computes its row statistics; the others read them.
            if entry.stats.get().is_none() {
                let d_lse = self.d_lse_rows(inputs, e)?;
                entry
                    .stats
                    .get_or_init(|| RowStats::of(&saved, (d_o, d_lse.as_deref()), m, dv));
            }
            let part_tiles = PART_KEYS / attnc_wide::attention::KEY_TILE;
            let key_tiles = n.div_ceil(attnc_wide::attention::KEY_TILE);
            let tiles = p * part_tiles..((p + 1) * part_tiles).min(key_tiles);
            self.forward.with_call(inputs, e, |call| {
                let stats = entry.stats.get().expect("invariant: computed above");
                let mut grads = Gradients {
                    dk,
                    dv: dv_rows,
                    ..Gradients::default()
                };
                let dq_rows = match p {
                    0 => 0..m,
                    _ => kernel::key_part_rows(call, tiles.clone()),
                };
                let part = KeyPart { tiles, dq_rows };
                // Part 0 holds dQ until it finishes; the others write only their share.
                let mut whole =
                    (p == 0).then(|| entry.dq.lock().unwrap_or_else(|e| e.into_inner()));
                let mut share =
                    (p > 0 && entry.has_dq).then(|| spare.zeroed(part.dq_rows.len() * d, 1));
                grads.dq = match (&mut share, &mut whole) {
                    (Some(buffer), _) => Some(buffer.as_mut_slice()),
                    (None, Some(guard)) => guard.as_deref_mut(),
                    (None, None) => None,
                };
                kernel::run_part(call, &saved, stats, d_o, &mut grads, &part).map_err(wide_err)?;
                drop(whole);
                let share = share.map(|buffer| (part.dq_rows.start, buffer));
                entry.finish(p, share, d, spare);
                Ok(())
            })
        });
        spare.trim(threads + 1);
        result
    }
}

/// A part's share of dQ: the first row it covers, and the rows.
type Share = (usize, Vec<f32>);

/// What the parts of one batch entry share: dQ (part 0 writes it), the other parts' shares
/// of it until they are added, and the row statistics (computed by the first part to start).
struct EntryParts<'a> {
    dq: Mutex<Option<&'a mut [f32]>>,
    has_dq: bool,
    shares: Mutex<Shares>,
    stats: OnceLock<RowStats>,
}

/// The shares of dQ of finished parts that wait for an earlier part, and how many parts
/// (0.. in order) dQ holds.
struct Shares {
    waiting: Vec<Option<Share>>,
    added: usize,
}

impl<'a> EntryParts<'a> {
    fn new(dq: Option<&'a mut [f32]>, parts: usize) -> Self {
        EntryParts {
            has_dq: dq.is_some(),
            dq: Mutex::new(dq),
            shares: Mutex::new(Shares {
                waiting: vec![None; parts],
                added: 0,
            }),
            stats: OnceLock::new(),
        }
    }

    /// Part `p` is done, with its share of dQ (parts after the first): adds into dQ, in part
    /// order, every share whose earlier parts are in, and gives their buffers to `spare`.
    /// The threads take parts in order, so a share waits only while an earlier part still
    /// runs: about one share per thread is held at a time, not one per part.
    fn finish(&self, p: usize, share: Option<Share>, d: usize, spare: &Pool) {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        match (p, share) {
            (0, _) => shares.added = 1,
            (_, Some(share)) => shares.waiting[p] = Some(share),
            (_, None) => {}
        }
        if shares.added == 0 || !self.has_dq {
            return;
        }
        // Part 0 is done: dQ is free.
        let mut dq = self.dq.lock().unwrap_or_else(|e| e.into_inner());
        let Some(dq) = dq.as_deref_mut() else {
            return;
        };
        let Shares { waiting, added } = &mut *shares;
        while let Some((first, share)) = waiting.get_mut(*added).and_then(Option::take) {
            let rows = &mut dq[first * d..first * d + share.len()];
            for (x, s) in rows.iter_mut().zip(&share) {
                *x += s;
            }
            spare.give(share);
            *added += 1;
        }
    }
}

/// The `m` values of one batch entry (at `index`) of `t` (`[batch.., m, 1]`, f32), in row
/// order.
fn rows_of(
    t: &TensorRef,
    inputs: &[BufferView<'_>],
    index: &[usize],
    m: usize,
) -> Result<Vec<f32>> {
    let Some(BufferView::F32(x)) = inputs.get(t.slot) else {
        return Err(buffer_err(&t.name, "is not an f32 buffer"));
    };
    let at = offset_of(t, index);
    (0..m)
        .map(|i| {
            x.get(at + i * t.row_stride)
                .copied()
                .ok_or_else(|| buffer_err(&t.name, "is shorter than its rows"))
        })
        .collect()
}

/// What a fused attention's forward keeps for its backward: the output `O` and the row
/// log-sum-exp of every batch entry, entry after entry (`O` as `[batch.., m, dv]`, contiguous:
/// the attention's output itself; the log-sum-exp as `[batch.., m]`, `-inf` for a row that
/// keeps no key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Residuals {
    /// The output rows.
    pub o: Vec<f32>,
    /// One natural log-sum-exp per row.
    pub lse: Vec<f32>,
}

impl Residuals {
    /// The residuals borrowed, as [`AttentionBackward::run_saved`] takes them.
    pub fn saved(&self) -> Saved<'_> {
        Saved {
            o: &self.o,
            lse: &self.lse,
        }
    }
}

/// What a backward step computes.
#[derive(Clone, Debug)]
pub enum BackwardKernel {
    /// A fused attention's gradients.
    Attention(Box<AttentionBackward>),
    /// A linear attention's gradients.
    Linear(LinearBackward),
}

/// A step that writes several gradients: `outputs[k]` receives gradient `k` (the step's own
/// output buffer is `outputs[0]`).
#[derive(Clone, Debug)]
pub struct BackwardStep {
    /// The kernel.
    pub kernel: BackwardKernel,
    /// The buffers written, one per gradient.
    pub outputs: Vec<usize>,
}

impl BackwardStep {
    /// Every gradient, in the order of `outputs`.
    pub fn run(&self, inputs: &[BufferView<'_>], threads: usize) -> Result<Vec<Vec<f32>>> {
        match &self.kernel {
            BackwardKernel::Attention(a) => a.run(inputs, threads),
            BackwardKernel::Linear(l) => l.run(inputs, threads),
        }
    }

    /// The work space (batch entries, rows), to decide whether threads pay off.
    pub fn work(&self) -> (usize, usize) {
        match &self.kernel {
            BackwardKernel::Attention(a) => (a.spec.batch_count(), a.spec.m),
            BackwardKernel::Linear(l) => (l.batch.iter().product(), l.m),
        }
    }

    /// A rough operation count: the forward and five products per visited score.
    pub fn cost(&self) -> usize {
        match &self.kernel {
            BackwardKernel::Attention(a) => {
                let s = &a.spec;
                let (visited, total) = s.key_tiles();
                let dense = s.m.saturating_mul(s.n).saturating_mul(s.d.max(s.dv).max(1));
                let share = dense / total.max(1) * visited.max(1);
                14usize
                    .saturating_mul(s.batch_count())
                    .saturating_mul(share)
            }
            BackwardKernel::Linear(l) => 8usize
                .saturating_mul(l.batch.iter().product())
                .saturating_mul(l.m + l.n)
                .saturating_mul(l.d.max(1) * l.dv.max(1)),
        }
    }

    /// One line for plans.
    pub fn describe(&self) -> String {
        let slots: Vec<String> = match &self.kernel {
            BackwardKernel::Attention(a) => a.grads.iter(),
            BackwardKernel::Linear(l) => l.grads.iter(),
        }
        .map(|g| format!("d{}", attnc_ir::backward::slot_name(g.slot)))
        .collect();
        match &self.kernel {
            BackwardKernel::Attention(a) => {
                let s = &a.spec;
                // Both backward kernels visit the full-width forward's tile table.
                let (visited, total, (qt, kt)) = a.forward.key_tiles();
                format!(
                    "attention backward [{}] {} batch {:?} m={} n={} d={} dv={} mask {}, visits {visited} of {total} key tiles ({qt} × {kt}) (forward recomputed with its log-sum-exp)",
                    a.tier_name(),
                    slots.join(", "),
                    s.batch,
                    s.m,
                    s.n,
                    s.d,
                    s.dv,
                    s.mask.as_ref().map_or("none".to_string(), |m| m.to_string())
                )
            }
            BackwardKernel::Linear(l) => format!(
                "linear attention backward ({}key-value state{}) {} batch {:?} m={} n={} d={} dv={}",
                if l.causal { "causal prefix " } else { "" },
                if l.causal { " and its reverse" } else { "" },
                slots.join(", "),
                l.batch,
                l.m,
                l.n,
                l.d,
                l.dv
            ),
        }
    }
}

fn wide_err(e: attnc_wide::problem::CallError) -> JitError {
    JitError::Plan {
        op: "attention backward".to_string(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_layouts_are_recognized() {
        let g = GradLayout {
            slot: 1,
            shape: vec![2, 3, 4, 5],
            batch_strides: vec![60, 20],
            row_stride: 5,
            col_stride: 1,
        };
        assert!(g.identity(&[2, 3], 20));
        // Keys shared by the second batch axis (grouped-query attention).
        let shared = GradLayout {
            shape: vec![2, 1, 4, 5],
            batch_strides: vec![20, 0],
            ..g
        };
        assert!(!shared.identity(&[2, 3], 20));
        assert_eq!(batch_index(&[2, 3], 4), vec![1, 1]);
    }
}
