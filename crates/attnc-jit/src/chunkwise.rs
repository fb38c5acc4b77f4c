//! Causal linear attention, decayed or not, in chunks of rows on the `gemm` crate's full-width
//! products: the prefill form of the prefix-state op ([`crate::plan::StepKind::Chunked`]).
//!
//! The recurrent kernel ([`crate::kernels::prefix`]) reads and writes the whole `[d, dv]` state
//! for every key, so it runs at the speed of that traffic, a few GFLOP/s. Here the keys go in
//! chunks ([`chunk_size`]): inside a chunk the decayed quadratic form, across chunks the state,
//! each a small matrix product (the form flash-linear-attention writes for GPUs). With `γ =
//! exp(-a)` and queries end-aligned (`i' = i + n − m`), for the rows `i'` of the chunk that
//! starts at key `c`:
//!
//! ```text
//! A = Q Kcᵀ;  A[i, j] ← γ^(i'−j) A[i, j] for j ≤ i', 0 beyond;   O = A Vc + γ^(i'−c+1) (Q S)
//! S ← γ^L S + (γ^(L−1−j) Kc)ᵀ Vc                     (L keys in the chunk)
//! ```
//!
//! with a column of ones beside `V` when rows are normalized (its products are the sums the
//! row divides by). A gated decay ([`attnc_ir::Decay::Gate`]) is the same with `γ^(i'−j)`
//! replaced by `exp(cq_i − ck_j)` in the rows and `exp(ck_last − ck_j)` in the state (the
//! queries' and the keys' log decays; `cq_i = ck_i'` when one `c` serves both): each weight
//! is computed from its log weight, never multiplied up, so it is rounded once and no gate
//! value makes it overflow where the plain form does not. A product of a masked score with a NaN or infinite value
//! would reach rows the op's semantics keep it from (`0 · NaN`), so a batch entry with any
//! non-finite input runs the exact recurrence instead (`recurrence`).
//!
//! Batch entries are dealt to the threads. With fewer entries than threads (one head, a
//! long prefill) each entry runs on all of them instead (`chunked_parallel`): the chunks'
//! state updates in parallel, the state carried through them in order, then the chunks'
//! rows in parallel, every value computed by the same operations as one thread computes it.

use crate::buffer::BufferView;
use crate::error::Result;
use crate::kernels::prefix::PrefixSpec;
use crate::wide::{batch_index, buffer_err, deal, deal_with, linear_operands, wide_err};
use attnc_ir::Normalizer;
use attnc_wide::flush::FlushToZero;
use attnc_wide::gemm::{sgemm, Matrix};

/// The smallest chunk the chunked form is worth its set-up for two of (the set-up of a chunk:
/// four products and the state's decay, paid per chunk of keys).
pub const CHUNK: usize = 64;

/// The chunk sizes the cost model chooses from: the `[C, C]` score block of the largest is
/// 256 KiB, still inside the L2 cache.
const CHUNK_SIZES: [usize; 4] = [32, 64, 128, 256];

/// A product with a dimension of `C` runs at about `C / (C + SMALL_PRODUCT)` of the
/// micro-kernels' speed (half speed at 32).
const SMALL_PRODUCT: f64 = 32.0;

/// The fixed cost of one chunk (four product calls, packing) in multiply-adds.
const CHUNK_OVERHEAD: f64 = 32_768.0;

/// Whether the chunked form is worth its set-up: at least two chunks of keys.
pub fn worth_chunking(spec: &PrefixSpec) -> bool {
    spec.n >= 2 * CHUNK && spec.d > 0 && spec.dv > 0
}

/// Keys per chunk for `spec`: the size among 32, 64, 128 and 256 of least estimated cost (in
/// multiply-adds per batch entry). Each query row computes the quadratic form against the
/// keys of its own chunk, `C·(d + w)` at the small-product speed, and weighs `C` scores (an
/// exponential each for a gate); every chunk decays the `[d, w]` state and pays its fixed
/// cost. The products with the state cost the same at any size. So chunks stay small when
/// every key has its query (prefill) and grow when few rows share many keys (decoding,
/// `m ≪ n`).
/// `ATTNC_CHUNK=N` (a positive count) overrides the choice, for measuring the model.
pub fn chunk_size(spec: &PrefixSpec) -> usize {
    if let Some(c) = std::env::var("ATTNC_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&c| c > 0)
    {
        return c;
    }
    let w = spec.dv + usize::from(matches!(spec.normalizer, Normalizer::Sum { .. }));
    let (m, n, d, w) = (spec.m as f64, spec.n as f64, spec.d as f64, w as f64);
    let weight = match (spec.is_gated(), spec.slope_strides.is_some()) {
        (true, _) => 8.0,
        (false, true) => 1.0,
        (false, false) => 0.0,
    };
    let cost = |c: usize| {
        let c = c as f64;
        let rows = m * (c * (d + w) * (1.0 + SMALL_PRODUCT / c) + c * weight);
        let chunks = (n / c).ceil() * (d * w + CHUNK_OVERHEAD);
        rows + chunks
    };
    CHUNK_SIZES
        .into_iter()
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(CHUNK)
}

/// One batch entry's operands: `φQ` `[m, d]`, `φK` `[n, d]`, `V` `[n, dv]` (contiguous rows)
/// and its decay.
struct Entry<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    decay: Weights<'a>,
}

/// How a batch entry weighs key `j` in the row at key position `i` (`j ≤ i`).
enum Weights<'a> {
    /// Weight 1.
    One,
    /// `exp(-a (i − j))`.
    Slope(f32),
    /// `exp(cq_i − ck_j)` in query row `i`, and `exp(ck_i − ck_j)` between keys: `rows` (`cq`)
    /// one number per query, `keys` (`ck`) one per key.
    Gate { rows: &'a [f32], keys: &'a [f32] },
}

impl Weights<'_> {
    /// The weight of key `j` as seen from key `i` (the state's weighing), rounded once to f32.
    fn weight(&self, i: usize, j: usize) -> f32 {
        match self {
            Weights::One => 1.0,
            Weights::Slope(a) => (-(*a as f64) * (i - j) as f64).exp() as f32,
            Weights::Gate { keys: c, .. } => (c[i] as f64 - c[j] as f64).exp() as f32,
        }
    }

    /// The weight of key `j` in query row `query`, whose key position is `at` (`i'`), rounded
    /// once to f32.
    fn row_weight(&self, query: usize, at: usize, j: usize) -> f32 {
        match self {
            Weights::Gate { rows, keys } => (rows[query] as f64 - keys[j] as f64).exp() as f32,
            _ => self.weight(at, j),
        }
    }

    /// Whether every weight is 1.
    fn is_one(&self) -> bool {
        matches!(self, Weights::One)
    }

    /// Whether the decay's inputs are finite.
    fn is_finite(&self) -> bool {
        match self {
            Weights::One => true,
            Weights::Slope(a) => a.is_finite(),
            Weights::Gate { rows, keys } => rows.iter().chain(*keys).all(|x| x.is_finite()),
        }
    }
}

/// Runs the prefix-state op `spec` on `inputs` (`φQ`, `φK`, `V`, and the slope when it
/// decays) into `out` (`[batch.., m, dv]`), batch entries dealt to up to `threads` threads.
pub fn run(
    spec: &PrefixSpec,
    inputs: &[BufferView<'_>],
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
    let what = "causal linear attention";
    let [q, k, v] = linear_operands(spec, inputs, out.len(), what)?;
    let decay = |at: usize, strides: &Option<Vec<usize>>| match (strides, inputs.get(at)) {
        (None, _) => Ok(None),
        (Some(_), Some(BufferView::F32(x))) => Ok(Some(*x)),
        (Some(_), _) => Err(buffer_err(what, "takes an f32 decay")),
    };
    let slope = decay(3, &spec.slope_strides)?;
    let key_decay = decay(4, &spec.key_decay_strides)?;
    if m == 0 || dv == 0 {
        return Ok(());
    }
    let entry = |e: usize| -> Entry<'_> {
        let index = batch_index(&spec.batch, e);
        let at =
            |strides: &[usize]| -> usize { strides.iter().zip(&index).map(|(s, i)| s * i).sum() };
        let [qs, ks, vs] = &spec.batch_strides;
        Entry {
            q: part(q, at(qs), m * d),
            k: part(k, at(ks), n * d),
            v: part(v, at(vs), n * dv),
            decay: match (slope, &spec.slope_strides) {
                (Some(cq), Some(strides)) if spec.is_gated() => {
                    let ck = key_decay.unwrap_or_default();
                    let key_strides = spec.key_decay_strides.as_deref().unwrap_or_default();
                    Weights::Gate {
                        rows: part(cq, at(strides), m),
                        keys: part(ck, at(key_strides), n),
                    }
                }
                (Some(s), Some(strides)) => {
                    Weights::Slope(s.get(at(strides)).copied().unwrap_or(f32::NAN))
                }
                _ => Weights::One,
            },
        }
    };
    // One entry on `threads` threads (its chunks in parallel when more than one).
    let one = |e: usize, rows: &mut [f32], threads: usize| {
        let x = entry(e);
        let gate_short =
            matches!(x.decay, Weights::Gate { rows, keys } if rows.len() != m || keys.len() != n);
        if x.q.len() != m * d || x.k.len() != n * d || x.v.len() != n * dv || gate_short {
            return Err(buffer_err("causal linear attention", "an operand is short"));
        }
        let finite = |s: &[f32]| s.iter().all(|t| t.is_finite());
        match (
            x.decay.is_finite() && finite(x.q) && finite(x.k) && finite(x.v),
            threads,
        ) {
            (true, 1) => chunked(spec, &x, rows),
            (true, _) => chunked_parallel(spec, &x, rows, threads),
            (false, _) => {
                recurrence(spec, &x, rows);
                Ok(())
            }
        }
    };
    let entries = out.len() / (m * dv);
    if entries < threads && n >= 2 * PARALLEL_KEYS {
        // Fewer entries than threads: each entry's chunks are split among all of them.
        for (e, rows) in out.chunks_mut(m * dv).enumerate() {
            one(e, rows, threads)?;
        }
        return Ok(());
    }
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(m * dv).enumerate().collect();
    deal(items, threads, |(e, rows)| one(e, rows, 1))
}

/// `len` elements of `data` from `start`, or none when it is short (the caller checks).
fn part(data: &[f32], start: usize, len: usize) -> &[f32] {
    data.get(start..start.saturating_add(len))
        .unwrap_or_default()
}

/// One batch entry in chunks (all inputs finite), subnormal results flushed to zero: decayed
/// weights far below 2⁻¹²⁶ otherwise make nearly every product take a microcode assist
/// ([`attnc_wide::flush`]), and the error is below 2⁻¹²⁶ per operation.
fn chunked(spec: &PrefixSpec, x: &Entry<'_>, out: &mut [f32]) -> Result<()> {
    let _flush = FlushToZero::new();
    let chunks = Chunks::new(spec, x);
    let (d, w) = (spec.d, chunks.w);
    let mut scratch = ChunkScratch::new(chunks.size, d, w);
    let mut state = vec![0.0f32; d * w];
    let mut update = vec![0.0f32; d * w];
    let mut rest = chunks.fill_empty_rows(out);
    for c in (0..spec.n).step_by(chunks.size) {
        let (rows, after) =
            std::mem::take(&mut rest).split_at_mut(chunks.rows_of(c).len() * spec.dv);
        rest = after;
        chunks.rows(c, (c > 0).then_some(&state[..]), &mut scratch, rows)?;
        chunks.update(c, &mut scratch, &mut update)?;
        chunks.carry(c, &state, &mut update);
        std::mem::swap(&mut state, &mut update);
    }
    Ok(())
}

/// [`chunked`] for one batch entry on up to `threads` threads, with the same results bit for
/// bit: each chunk's state update (keys weighed from its last key, times its values) is
/// independent of the others, so those products run in parallel; the state before each chunk
/// is then carried through the chunks in order as before (one scaled sum per chunk, serial);
/// and each chunk's rows read only their own state, so they run in parallel too. The states
/// take `n / chunk · d · w` values, which is why only entries that would leave threads idle
/// take this form.
fn chunked_parallel(
    spec: &PrefixSpec,
    x: &Entry<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let chunks = Chunks::new(spec, x);
    let (d, w, size) = (spec.d, chunks.w, chunks.size);
    let starts: Vec<usize> = (0..spec.n).step_by(size).collect();
    let per_item = PARALLEL_KEYS.div_ceil(size).max(1);
    // Slot c: chunk c's update, then the state after chunk c.
    let mut slots = vec![0.0f32; starts.len() * d * w];
    let items: Vec<(usize, &mut [f32])> = slots.chunks_mut(per_item * d * w).enumerate().collect();
    deal_with(
        items,
        threads,
        || ChunkScratch::new(size, d, w),
        |scratch, (item, updates)| {
            let _flush = FlushToZero::new();
            for (k, update) in updates.chunks_mut(d * w).enumerate() {
                chunks.update(starts[item * per_item + k], scratch, update)?;
            }
            Ok(())
        },
    )?;
    {
        let _flush = FlushToZero::new();
        for (k, &c) in starts.iter().enumerate().skip(1) {
            let (before, from) = slots.split_at_mut(k * d * w);
            chunks.carry(c, &before[(k - 1) * d * w..], &mut from[..d * w]);
        }
    }
    // Each chunk's rows, from the state before it (slot c − 1).
    let mut rest = chunks.fill_empty_rows(out);
    let mut items = Vec::with_capacity(starts.len().div_ceil(per_item));
    for (item, group) in starts.chunks(per_item).enumerate() {
        let rows: usize = group.iter().map(|&c| chunks.rows_of(c).len()).sum();
        let (mine, after) = std::mem::take(&mut rest).split_at_mut(rows * spec.dv);
        rest = after;
        items.push((item, mine));
    }
    let slots = &slots;
    deal_with(
        items,
        threads,
        || ChunkScratch::new(size, d, w),
        |scratch, (item, mut rows)| {
            let _flush = FlushToZero::new();
            for (k, &c) in starts[item * per_item..].iter().take(per_item).enumerate() {
                let index = item * per_item + k;
                let state = (index > 0).then(|| &slots[(index - 1) * d * w..index * d * w]);
                let (mine, after) = rows.split_at_mut(chunks.rows_of(c).len() * spec.dv);
                rows = after;
                chunks.rows(c, state, scratch, mine)?;
            }
            Ok(())
        },
    )
}

/// `data` as a row-major `rows × cols` matrix.
fn row_major(data: &[f32], rows: usize, cols: usize) -> Matrix<'_> {
    Matrix {
        data,
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

/// The transpose of the row-major `cols × rows` matrix `data`, as a `rows × cols` matrix.
fn transposed(data: &[f32], rows: usize, cols: usize) -> Matrix<'_> {
    Matrix {
        data,
        rows,
        cols,
        row_stride: 1,
        col_stride: rows,
    }
}

/// Keys per work item of [`chunked_parallel`] (whole chunks).
const PARALLEL_KEYS: usize = 1024;

/// One batch entry cut into chunks: what every chunk's products share.
struct Chunks<'e, 'a> {
    spec: &'e PrefixSpec,
    x: &'e Entry<'a>,
    /// Keys per chunk.
    size: usize,
    /// Columns of the values and of the state: `dv`, and the sums' column when normalized.
    w: usize,
    normalized: bool,
    /// `n − m`: query row `i` sits at key position `i + off`.
    off: isize,
    /// A slope's weights by distance, `γ^t` for `t < size` (empty otherwise).
    powers: Vec<f32>,
}

/// The buffers one chunk's products use, reused from chunk to chunk.
struct ChunkScratch {
    values: Vec<f32>,
    scores: Vec<f32>,
    rows_out: Vec<f32>,
    carried: Vec<f32>,
    keys: Vec<f32>,
}

impl ChunkScratch {
    fn new(size: usize, d: usize, w: usize) -> ChunkScratch {
        ChunkScratch {
            values: vec![0.0; size * w],
            scores: vec![0.0; size * size],
            rows_out: vec![0.0; size * w],
            carried: vec![0.0; size * w],
            keys: vec![0.0; size * d],
        }
    }
}

impl<'e, 'a> Chunks<'e, 'a> {
    fn new(spec: &'e PrefixSpec, x: &'e Entry<'a>) -> Chunks<'e, 'a> {
        let size = chunk_size(spec);
        let normalized = matches!(spec.normalizer, Normalizer::Sum { .. });
        // A slope's weights depend on the distance only: γ^t for t < chunk, once per entry.
        let powers: Vec<f32> = match x.decay {
            Weights::Slope(_) => (0..size).map(|t| x.decay.weight(t, 0)).collect(),
            _ => Vec::new(),
        };
        Chunks {
            spec,
            x,
            size,
            w: spec.dv + usize::from(normalized),
            normalized,
            off: spec.n as isize - spec.m as isize,
            powers,
        }
    }

    /// Rows that keep no key (`i' < 0`) get the empty numerator over `0 + eps`; the rest of
    /// `out`, from the first row a chunk computes, is returned.
    fn fill_empty_rows<'o>(&self, out: &'o mut [f32]) -> &'o mut [f32] {
        let empty_rows = usize::try_from(-self.off).unwrap_or(0).min(self.spec.m);
        let (empty, rest) = out.split_at_mut(empty_rows * self.spec.dv);
        empty.fill(empty_row_value(self.spec.normalizer));
        rest
    }

    /// The query rows whose key position `i'` lies in the chunk that starts at key `c`.
    fn rows_of(&self, c: usize) -> std::ops::Range<usize> {
        let len = self.size.min(self.spec.n - c);
        let first = (c as isize - self.off).max(0) as usize;
        let end = ((c + len) as isize - self.off).clamp(0, self.spec.m as isize) as usize;
        first..end.max(first)
    }

    /// V of the chunk at `c` into the scratch, beside a column of ones when rows are
    /// normalized; returns its key count.
    fn load_values(&self, c: usize, scratch: &mut ChunkScratch) -> usize {
        let (dv, w) = (self.spec.dv, self.w);
        let len = self.size.min(self.spec.n - c);
        for j in 0..len {
            let row = &mut scratch.values[j * w..(j + 1) * w];
            row[..dv].copy_from_slice(&self.x.v[(c + j) * dv..(c + j + 1) * dv]);
            if self.normalized {
                row[dv] = 1.0;
            }
        }
        len
    }

    /// The output rows of the chunk at `c` into `out` (its [`Chunks::rows_of`], `dv` each):
    /// the chunk's own keys by the weighed quadratic form, the keys before it through
    /// `state` (the state before the chunk; `None` for the first).
    fn rows(
        &self,
        c: usize,
        state: Option<&[f32]>,
        scratch: &mut ChunkScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let (d, dv, w, x) = (self.spec.d, self.spec.dv, self.w, self.x);
        let rows = self.rows_of(c);
        if rows.is_empty() {
            return Ok(());
        }
        let len = self.load_values(c, scratch);
        let (first, end, count) = (rows.start, rows.end, rows.len());
        let vc = row_major(&scratch.values[..len * w], len, w);
        let qm = row_major(&x.q[first * d..end * d], count, d);
        let kt = transposed(&x.k[c * d..(c + len) * d], d, len);
        let a = &mut scratch.scores[..count * len];
        sgemm(&qm, &kt, a).map_err(wide_err)?;
        for i in 0..count {
            let at = ((first + i) as isize + self.off) as usize; // i'
            let s = &mut a[i * len..(i + 1) * len];
            weigh_row(&x.decay, &self.powers, (first + i, at), c, s);
        }
        let am = row_major(a, count, len);
        let o = &mut scratch.rows_out[..count * w];
        sgemm(&am, &vc, o).map_err(wide_err)?;
        // The keys before the chunk, through the state (none before the first).
        let t = &mut scratch.carried[..count * w];
        if let Some(state) = state {
            let sm = row_major(state, d, w);
            sgemm(&qm, &sm, t).map_err(wide_err)?;
        }
        for i in 0..count {
            let row = &mut o[i * w..(i + 1) * w];
            if state.is_some() {
                let at = ((first + i) as isize + self.off) as usize; // i'
                let g = x.decay.row_weight(first + i, at, c - 1);
                for (y, s) in row.iter_mut().zip(&t[i * w..(i + 1) * w]) {
                    *y += g * s;
                }
            }
            finish_row(self.spec.normalizer, row, &mut out[i * dv..(i + 1) * dv]);
        }
        Ok(())
    }

    /// The chunk at `c`'s contribution to the state, `(w(last, j) k_j)ᵀ V` with `last` its
    /// last key, into `update` (`[d, w]`).
    fn update(&self, c: usize, scratch: &mut ChunkScratch, update: &mut [f32]) -> Result<()> {
        let (d, w, x) = (self.spec.d, self.w, self.x);
        let len = self.load_values(c, scratch);
        let last = c + len - 1;
        let kd = &mut scratch.keys[..len * d];
        kd.copy_from_slice(&x.k[c * d..(c + len) * d]);
        if !x.decay.is_one() {
            for (j, row) in kd.chunks_mut(d).enumerate() {
                let g = x.decay.weight(last, c + j);
                row.iter_mut().for_each(|t| *t *= g);
            }
        }
        let kdt = transposed(kd, d, len);
        let vc = row_major(&scratch.values[..len * w], len, w);
        sgemm(&kdt, &vc, update).map_err(wide_err)
    }

    /// `S ← w(last, c−1) S + U`: with `into` holding the chunk at `c`'s update `U` (`last`
    /// its last key) and `before` the state before the chunk (the keys before it weighed as
    /// seen from key `c − 1`), `into` becomes the state after it; the first chunk's state is
    /// its update.
    fn carry(&self, c: usize, before: &[f32], into: &mut [f32]) {
        if c == 0 {
            return;
        }
        let last = c + self.size.min(self.spec.n - c) - 1;
        let g = self.x.decay.weight(last, c - 1);
        for (u, s) in into.iter_mut().zip(before) {
            *u += g * s;
        }
    }
}

/// Weighs the scores `s` of query row `query` at key position `row` (`i'`) against the keys
/// from `first` on: keys after `row` get 0, the others their decay weight (from `powers` for a
/// slope, by [`exp_f32`] of the log weight for a gate; branch-free, so the loop vectorizes).
fn weigh_row(
    decay: &Weights<'_>,
    powers: &[f32],
    (query, row): (usize, usize),
    first: usize,
    s: &mut [f32],
) {
    match decay {
        Weights::One => {
            for (j, t) in s.iter_mut().enumerate() {
                *t = if first + j > row { 0.0 } else { *t };
            }
        }
        Weights::Slope(_) => {
            for (j, t) in s.iter_mut().enumerate() {
                let back = row.wrapping_sub(first + j);
                *t = if first + j > row {
                    0.0
                } else {
                    *t * powers[back]
                };
            }
        }
        Weights::Gate { rows, keys } => {
            let ci = rows[query];
            let keys = &keys[first..first + s.len()];
            for (j, (t, &cj)) in s.iter_mut().zip(keys).enumerate() {
                let w = exp_f32(ci - cj);
                *t = if first + j > row { 0.0 } else { *t * w };
            }
        }
    }
}

/// `e^x` in f32 to within about 2 ulp, without branches (it vectorizes): `x = n ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r`, and `2^n` applied in two halves so
/// results down to the subnormals come out; +inf above the range, NaN for NaN.
fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-104.0, 89.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n = n as i32;
    let half = n / 2;
    let scale = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    p * scale(half) * scale(n - half)
}

/// The value of every element of a row that keeps no key: `0 / (0 + eps)` (NaN for `eps = 0`,
/// as the plain form's `0 / sum(∅)`), or 0 unnormalized.
fn empty_row_value(normalizer: Normalizer) -> f32 {
    match normalizer {
        Normalizer::None => 0.0,
        Normalizer::Sum { eps } => 0.0 / (0.0 + eps as f32),
    }
}

/// Writes an output row from its numerators (and, normalized, the sum after them).
fn finish_row(normalizer: Normalizer, got: &[f32], row: &mut [f32]) {
    let dv = row.len();
    match normalizer {
        Normalizer::None => row.copy_from_slice(&got[..dv]),
        Normalizer::Sum { eps } => {
            let den = got[dv] + eps as f32;
            for (o, y) in row.iter_mut().zip(&got[..dv]) {
                *o = y / den;
            }
        }
    }
}

/// One batch entry by the recurrence `S ← w(j, j−1) S + w(j, j) k_j v_jᵀ`, row by row as the
/// prefix kernel computes it: the form whose non-finite values follow the op's semantics (a
/// key or value after a row's prefix never reaches it; a NaN or infinite slope, or a log decay
/// whose differences are NaN, makes the rows NaN as the plain form's weights do).
fn recurrence(spec: &PrefixSpec, x: &Entry<'_>, out: &mut [f32]) {
    let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
    let normalized = matches!(spec.normalizer, Normalizer::Sum { .. });
    let w = dv + usize::from(normalized);
    let off = n as isize - m as isize;
    let mut state = vec![0.0f32; d * w];
    let mut got = vec![0.0f32; w];
    let mut next = 0usize; // keys 0..next are in the state
    for i in 0..m {
        let last = i as isize + off; // i'
        let row = &mut out[i * dv..(i + 1) * dv];
        if last < 0 {
            row.fill(empty_row_value(spec.normalizer));
            continue;
        }
        while next as isize <= last {
            let (k, v) = (&x.k[next * d..][..d], &x.v[next * dv..][..dv]);
            // The step from key next − 1 to key next (the state is zero before key 0).
            let step = match next {
                0 => 1.0,
                j => x.decay.weight(j, j - 1),
            };
            // The key's own weight: 1, or NaN where the decay's input is not finite (as the
            // plain form's exp(c_j − c_j) or exp(-a · 0)).
            let own = x.decay.weight(next, next);
            for (a, s) in state.chunks_mut(w).enumerate() {
                if !x.decay.is_one() {
                    s.iter_mut().for_each(|t| *t *= step);
                }
                let ka = k[a] * own;
                for (t, y) in s[..dv].iter_mut().zip(v) {
                    *t += ka * y;
                }
                if normalized {
                    s[dv] += ka;
                }
            }
            next += 1;
        }
        got.fill(0.0);
        for (qa, s) in x.q[i * d..][..d].iter().zip(state.chunks(w)) {
            for (g, t) in got.iter_mut().zip(s) {
                *g += qa * t;
            }
        }
        if let Weights::Gate { .. } = x.decay {
            // The state weighs keys as seen from key i'; the row sees them from cq_i.
            let at = last as usize;
            let r = x.decay.row_weight(i, at, at);
            got.iter_mut().for_each(|g| *g *= r);
        }
        finish_row(spec.normalizer, &got, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op's plain form in f64: `Σ_{j ≤ i'} exp(-a (i' − j)) (q_i · k_j) v_j`, normalized.
    fn plain(spec: &PrefixSpec, q: &[f32], k: &[f32], v: &[f32], a: f32) -> Vec<f64> {
        let (m, n, d, dv) = (spec.m, spec.n, spec.d, spec.dv);
        let mut out = vec![0.0f64; m * dv];
        for i in 0..m {
            let last = i as isize + n as isize - m as isize;
            let mut sum = 0.0f64;
            for j in 0..n {
                if j as isize > last {
                    break;
                }
                let dot: f64 = (0..d)
                    .map(|t| q[i * d + t] as f64 * k[j * d + t] as f64)
                    .sum();
                let w = dot * (-(a as f64) * (last - j as isize) as f64).exp();
                sum += w;
                for c in 0..dv {
                    out[i * dv + c] += w * v[j * dv + c] as f64;
                }
            }
            if let Normalizer::Sum { eps } = spec.normalizer {
                for c in 0..dv {
                    out[i * dv + c] /= sum + eps;
                }
            }
        }
        out
    }

    /// The op on one batch entry: no decay (`decay` 0), a slope (1) or gates (2).
    fn one_entry(
        m: usize,
        n: usize,
        (d, dv): (usize, usize),
        normalizer: Normalizer,
        decay: usize,
    ) -> PrefixSpec {
        PrefixSpec {
            batch: vec![],
            batch_strides: Default::default(),
            m,
            n,
            d,
            dv,
            normalizer,
            slope_strides: (decay > 0).then(Vec::new),
            key_decay_strides: (decay == 2).then(Vec::new),
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn chunks_agree_with_the_plain_form_at_chunk_edges() {
        for (m, n) in [
            (1, 200),
            (3, 3),
            (64, 64),
            (65, 129),
            (200, 128),
            (130, 257),
            (300, 130),
        ] {
            for normalizer in [Normalizer::None, Normalizer::Sum { eps: 1e-3 }] {
                for a in [0.0f32, 0.05, 3.0] {
                    let (d, dv) = (5, 7);
                    let spec = one_entry(m, n, (d, dv), normalizer, 1);
                    let (q, k, v) = (values(m * d, 1), values(n * d, 2), values(n * dv, 3));
                    // Positive scores keep the normalized sums away from 0.
                    let k: Vec<f32> = k.iter().map(|t| t.abs()).collect();
                    let q: Vec<f32> = q.iter().map(|t| t.abs()).collect();
                    let decay = if a == 0.0 {
                        Weights::One
                    } else {
                        Weights::Slope(a)
                    };
                    let x = Entry {
                        q: &q,
                        k: &k,
                        v: &v,
                        decay,
                    };
                    let want = plain(&spec, &q, &k, &v, a);
                    for form in 0..2 {
                        let mut got = vec![0.0f32; m * dv];
                        if form == 0 {
                            chunked(&spec, &x, &mut got).expect("runs");
                        } else {
                            recurrence(&spec, &x, &mut got);
                        }
                        let num: f64 = got
                            .iter()
                            .zip(&want)
                            .map(|(g, w)| (*g as f64 - w).powi(2))
                            .sum();
                        let den: f64 = want.iter().map(|w| w * w).sum();
                        let err = (num / den.max(1e-300)).sqrt();
                        assert!(err < 2e-6, "form {form} m={m} n={n} a={a}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_entrys_chunks_on_threads_give_the_same_bits() {
        // One entry, more threads than entries: the chunks' updates and rows run in parallel
        // and must give what one thread gives, bit for bit, for every decay and normalizer,
        // with m = n, m < n (end-aligned rows), m = 1 and n past and off the work items.
        for (m, n) in [(2300, 2300), (700, 4100), (1, 3000), (2048, 2048)] {
            for normalizer in [Normalizer::None, Normalizer::Sum { eps: 1e-3 }] {
                for decay in 0..3 {
                    let (d, dv) = (6, 5);
                    let spec = one_entry(m, n, (d, dv), normalizer, decay);
                    let q: Vec<f32> = values(m * d, 7).iter().map(|t| t.abs()).collect();
                    let k: Vec<f32> = values(n * d, 8).iter().map(|t| t.abs()).collect();
                    let v = values(n * dv, 9);
                    // A slope, or gates: log decays falling by up to 0.05 per key.
                    let logs: Vec<f32> = (0..n)
                        .scan(0.0f32, |c, i| {
                            *c -= 0.05 * (values(1, i as u32)[0] + 0.5);
                            Some(*c)
                        })
                        .collect();
                    let slope = [0.02f32];
                    let rows = &logs[n - m..];
                    let mut inputs = vec![
                        BufferView::F32(&q),
                        BufferView::F32(&k),
                        BufferView::F32(&v),
                    ];
                    match decay {
                        1 => inputs.push(BufferView::F32(&slope)),
                        2 => {
                            inputs.push(BufferView::F32(rows));
                            inputs.push(BufferView::F32(&logs));
                        }
                        _ => {}
                    }
                    let mut one = vec![0.0f32; m * dv];
                    run(&spec, &inputs, &mut one, 1).expect("runs");
                    assert!(one.iter().all(|t| t.is_finite()));
                    for threads in [2, 3] {
                        let mut many = vec![0.0f32; m * dv];
                        run(&spec, &inputs, &mut many, threads).expect("runs");
                        let same = one
                            .iter()
                            .zip(&many)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "m={m} n={n} decay {decay} threads {threads}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_fast_exponential_is_within_a_few_ulp() {
        let mut x = -104.0f32;
        while x < 89.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if want >= f32::MAX as f64 {
                assert!(
                    got == f64::INFINITY || got >= 0.999_999 * want,
                    "{x}: {got}"
                );
            } else if want > f32::MIN_POSITIVE as f64 {
                let err = (got - want).abs();
                assert!(
                    err <= 4.0 * f32::EPSILON as f64 * want,
                    "{x}: {got} vs {want}"
                );
            } else {
                let err = (got - want).abs();
                assert!(
                    err <= 2.0 * f32::MIN_POSITIVE as f64,
                    "{x}: {got} vs {want}"
                );
            }
            x += 0.001_3;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn a_nan_value_after_a_rows_prefix_does_not_reach_it() {
        let (n, d, dv) = (200, 3, 2);
        let spec = PrefixSpec {
            batch: vec![],
            batch_strides: [vec![], vec![], vec![]],
            m: n,
            n,
            d,
            dv,
            normalizer: Normalizer::None,
            slope_strides: None,
            key_decay_strides: None,
        };
        let q = values(n * d, 4);
        let k = values(n * d, 5);
        let mut v = values(n * dv, 6);
        v[150 * dv] = f32::NAN;
        let mut out = vec![0.0f32; n * dv];
        let inputs = [
            BufferView::F32(&q),
            BufferView::F32(&k),
            BufferView::F32(&v),
        ];
        run(&spec, &inputs, &mut out, 2).expect("runs");
        assert!(out[..150 * dv].iter().all(|t| t.is_finite()));
        assert!(out[150 * dv].is_nan());
    }
}
