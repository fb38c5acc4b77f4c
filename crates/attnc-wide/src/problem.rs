//! What one attention call computes, shared by every full-width tier.
//!
//! For one batch entry: `O = softmax(mask(score(Q Kᵀ))) V` with `Q: [m, d]`, `K: [n, d]`,
//! `V: [n, dv]`, queries aligned to the end of the keys (`i' = i + n - m`). The score form is
//! fixed ([`Score`]): `x = s·scale (+ bias[i, j]) (+ slope·(j − i'))`, then optionally
//! `cap·tanh(x / cap)`. Masked positions are replaced (never added to), a row that keeps no key
//! gives zeros (and a log-sum-exp of `-inf`), NaN in a kept score makes its row NaN.
//!
//! The caller owns the compile-time decisions: which key tiles each query tile visits and
//! whether a visited tile needs element masks ([`TileTable`], built from the pattern algebra at
//! the tier's tile sizes), and how work is split over threads (any split of rows at query-tile
//! boundaries gives bit-identical results).

use half::{bf16, f16};

mod alibi;
mod blocks;
mod segments;

pub use blocks::Blocks;
pub use segments::Segments;

/// The elements of an operand, in their storage type (widened to f32 on load).
#[derive(Clone, Copy, Debug)]
pub enum Elements<'a> {
    /// f32.
    F32(&'a [f32]),
    /// IEEE half precision.
    F16(&'a [f16]),
    /// bfloat16.
    Bf16(&'a [bf16]),
}

impl Elements<'_> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(x) => x.len(),
            Elements::F16(x) => x.len(),
            Elements::Bf16(x) => x.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `index` as f32.
    pub fn get(&self, index: usize) -> f32 {
        match self {
            Elements::F32(x) => x[index],
            Elements::F16(x) => x[index].to_f32(),
            Elements::Bf16(x) => x[index].to_f32(),
        }
    }
}

/// A `rows × cols` matrix of one batch entry: row `r`, column `c` at `r * row_stride + c`
/// (columns contiguous; a row stride of 0 repeats one row).
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    /// The elements, starting at row 0, column 0.
    pub data: Elements<'a>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements between rows.
    pub row_stride: usize,
}

impl Operand<'_> {
    /// Whether every element `(r, c)` lies inside `data`.
    pub fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|x| x.checked_add(self.cols))
            .is_some_and(|end| end <= self.data.len())
    }
}

/// An additive score bias of one batch entry, `[m, n]` broadcast: element `(i, j)` at
/// `i * row_stride + j * col_stride` (either stride may be 0).
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Elements between query rows (0: the same for every query).
    pub row_stride: usize,
    /// Elements between keys (0: the same for every key).
    pub col_stride: usize,
}

/// The score form: `x = s·scale (+ bias) (+ slope·(j − i'))`, then `cap·tanh(x / cap)`.
#[derive(Clone, Copy, Debug)]
pub struct Score<'a> {
    /// Multiplies `s = q·k`.
    pub scale: f32,
    /// An additive bias tensor.
    pub bias: Option<Bias<'a>>,
    /// An ALiBi slope: adds `slope · (j − i')`.
    pub alibi_slope: Option<f32>,
    /// A softcap `cap`: `x ↦ cap · tanh(x / cap)`, applied last.
    pub softcap: Option<f32>,
}

impl Score<'_> {
    /// `s · scale`, nothing else.
    pub fn scaled(scale: f32) -> Score<'static> {
        Score {
            scale,
            bias: None,
            alibi_slope: None,
            softcap: None,
        }
    }
}

/// Which positions `(i, j)` of the `m × n` scores are kept (`i' = i + n − m`), as in the
/// `.attn` language's patterns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyMask {
    /// `j ≤ i'`.
    Causal,
    /// `|i' − j| ≤ w`.
    Window(u64),
    /// `|i' − j| ≤ w·r` and `(i' − j) mod r = 0`.
    Dilated {
        /// Reach in strides.
        w: u64,
        /// Stride.
        r: u64,
    },
    /// `i' < g` or `j < g`.
    Global(u64),
    /// `⌊i'/b⌋ = ⌊j/b⌋`.
    Block(u64),
    /// Query `i` and key `j` have equal segment ids ([`Call::segments`]).
    Document,
    /// Row block `⌊i/b⌋` selects key block `⌊j/b⌋` ([`Call::blocks`], which holds `b`).
    TopkBlocks,
    /// Both.
    And(Box<KeyMask>, Box<KeyMask>),
    /// Either.
    Or(Box<KeyMask>, Box<KeyMask>),
}

impl KeyMask {
    /// Whether `(i, j)` is kept in an `m × n` score matrix (the reference semantics); a
    /// document part reads `segments` (without them it may keep every pair).
    pub fn keeps_with(
        &self,
        i: usize,
        j: usize,
        m: usize,
        n: usize,
        segments: Option<&Segments<'_>>,
        blocks: Option<&Blocks<'_>>,
    ) -> bool {
        match self {
            KeyMask::Document => segments.is_none_or(|s| s.same(i, j)),
            KeyMask::TopkBlocks => blocks.is_none_or(|s| s.selected(i, j)),
            KeyMask::And(a, b) => {
                a.keeps_with(i, j, m, n, segments, blocks)
                    && b.keeps_with(i, j, m, n, segments, blocks)
            }
            KeyMask::Or(a, b) => {
                a.keeps_with(i, j, m, n, segments, blocks)
                    || b.keeps_with(i, j, m, n, segments, blocks)
            }
            other => other.keeps(i, j, m, n),
        }
    }

    /// Whether every kept pair must have equal segment ids (a document part on every path
    /// through `|`): only then may [`Segments::refine`] drop tiles by their ids.
    pub fn requires_document(&self) -> bool {
        match self {
            KeyMask::Document => true,
            KeyMask::And(a, b) => a.requires_document() || b.requires_document(),
            KeyMask::Or(a, b) => a.requires_document() && b.requires_document(),
            _ => false,
        }
    }

    /// Whether the mask reads a block selection.
    pub fn is_topk(&self) -> bool {
        match self {
            KeyMask::TopkBlocks => true,
            KeyMask::And(a, b) | KeyMask::Or(a, b) => a.is_topk() || b.is_topk(),
            _ => false,
        }
    }

    /// Whether the mask reads segment ids.
    pub fn is_document(&self) -> bool {
        match self {
            KeyMask::Document => true,
            KeyMask::And(a, b) | KeyMask::Or(a, b) => a.is_document() || b.is_document(),
            _ => false,
        }
    }

    /// Whether `(i, j)` is kept in an `m × n` score matrix (the reference semantics); a
    /// document part counts as keeping every pair (see [`KeyMask::keeps_with`]).
    pub fn keeps(&self, i: usize, j: usize, m: usize, n: usize) -> bool {
        let ia = i as i128 + n as i128 - m as i128;
        let jj = j as i128;
        match self {
            KeyMask::Causal => jj <= ia,
            KeyMask::Window(w) => (ia - jj).abs() <= *w as i128,
            KeyMask::Dilated { w, r } => {
                let r = (*r).max(1) as i128;
                (ia - jj).abs() <= *w as i128 * r && (ia - jj).rem_euclid(r) == 0
            }
            KeyMask::Global(g) => ia < *g as i128 || jj < *g as i128,
            KeyMask::Block(b) => {
                let b = (*b).max(1) as i128;
                ia.div_euclid(b) == jj.div_euclid(b)
            }
            KeyMask::Document | KeyMask::TopkBlocks => true,
            KeyMask::And(a, b) => a.keeps(i, j, m, n) && b.keeps(i, j, m, n),
            KeyMask::Or(a, b) => a.keeps(i, j, m, n) || b.keeps(i, j, m, n),
        }
    }
}

/// A run of key tiles `[first, end)` one query tile visits; `partial` when some position of
/// some tile in the run is masked (the kernel evaluates element masks there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileRun {
    /// First key tile.
    pub first: u32,
    /// One past the last key tile.
    pub end: u32,
    /// Whether element masks are needed.
    pub partial: bool,
}

impl TileRun {
    /// Appends key tile `tile` to `runs`: it extends the last run when it follows it with the
    /// same kind, else starts a run of its own.
    pub fn append(runs: &mut Vec<TileRun>, tile: u32, partial: bool) {
        match runs.last_mut() {
            Some(r) if r.end == tile && r.partial == partial => r.end += 1,
            _ => runs.push(TileRun {
                first: tile,
                end: tile + 1,
                partial,
            }),
        }
    }
}

/// Per query tile (of `query_tile` rows), the runs of key tiles (of `key_tile` keys) it visits.
/// Tiles not listed hold no kept position and are never touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileTable {
    /// Rows per query tile.
    pub query_tile: usize,
    /// Keys per key tile.
    pub key_tile: usize,
    /// Key tiles per row of tiles (`ceil(n / key_tile)`).
    key_tiles: usize,
    /// `runs[offsets[t]..offsets[t + 1]]` are query tile `t`'s runs.
    offsets: Vec<usize>,
    runs: Vec<TileRun>,
}

impl TileTable {
    /// The table whose query tile `t` visits `runs_of(t)`, for `m` queries and `n` keys.
    pub fn from_fn(
        m: usize,
        n: usize,
        query_tile: usize,
        key_tile: usize,
        mut runs_of: impl FnMut(usize) -> Vec<TileRun>,
    ) -> TileTable {
        let query_tile = query_tile.max(1);
        let key_tile = key_tile.max(1);
        let mut offsets = vec![0];
        let mut runs = Vec::new();
        let key_tiles = n.div_ceil(key_tile) as u32;
        for t in 0..m.div_ceil(query_tile) {
            runs.extend(
                runs_of(t)
                    .into_iter()
                    .map(|r| TileRun {
                        first: r.first.min(key_tiles),
                        end: r.end.min(key_tiles),
                        partial: r.partial,
                    })
                    .filter(|r| r.first < r.end),
            );
            offsets.push(runs.len());
        }
        TileTable {
            query_tile,
            key_tile,
            key_tiles: key_tiles as usize,
            offsets,
            runs,
        }
    }

    /// The (query tile, key tile) pairs visited, and all pairs.
    pub fn counts(&self) -> (usize, usize) {
        let visited = self.runs.iter().map(|r| (r.end - r.first) as usize).sum();
        let query_tiles = self.offsets.len().saturating_sub(1);
        (visited, query_tiles * self.key_tiles)
    }

    /// Every key tile, none partial (dense attention).
    pub fn dense(m: usize, n: usize, query_tile: usize, key_tile: usize) -> TileTable {
        let end = n.div_ceil(key_tile.max(1)) as u32;
        TileTable::from_fn(m, n, query_tile, key_tile, |_| {
            vec![TileRun {
                first: 0,
                end,
                partial: false,
            }]
        })
    }

    /// The table of `mask` by enumerating every position (O(m·n): tests and small shapes; the
    /// compiler builds tables from the pattern algebra instead).
    pub fn enumerate(
        mask: &KeyMask,
        m: usize,
        n: usize,
        query_tile: usize,
        key_tile: usize,
    ) -> TileTable {
        let (qt, kt) = (query_tile.max(1), key_tile.max(1));
        TileTable::from_fn(m, n, qt, kt, |t| {
            let rows = t * qt..((t + 1) * qt).min(m);
            let mut runs: Vec<TileRun> = Vec::new();
            for tile in 0..n.div_ceil(kt) {
                let keys = tile * kt..((tile + 1) * kt).min(n);
                let (mut any, mut all) = (false, true);
                for i in rows.clone() {
                    for j in keys.clone() {
                        let kept = mask.keeps(i, j, m, n);
                        any |= kept;
                        all &= kept;
                    }
                }
                if !any {
                    continue;
                }
                let partial = !all;
                TileRun::append(&mut runs, tile as u32, partial);
            }
            runs
        })
    }

    /// The runs of query tile `tile` (empty past the last tile).
    pub fn runs(&self, tile: usize) -> &[TileRun] {
        match (self.offsets.get(tile), self.offsets.get(tile + 1)) {
            (Some(&a), Some(&b)) => &self.runs[a..b],
            _ => &[],
        }
    }

    /// The number of query tiles.
    pub fn query_tiles(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// One batch entry's attention problem.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// `Q: [m, d]`.
    pub q: Operand<'a>,
    /// `K: [n, d]`.
    pub k: Operand<'a>,
    /// `V: [n, dv]`.
    pub v: Operand<'a>,
    /// The score form.
    pub score: Score<'a>,
    /// The kept positions (`None`: all); consulted on partial tiles only.
    pub mask: Option<&'a KeyMask>,
    /// The key tiles each query tile visits, at the tier's tile sizes.
    pub tiles: &'a TileTable,
    /// The segment ids a [`KeyMask::Document`] reads (`None` without one).
    pub segments: Option<Segments<'a>>,
    /// The block selection a [`KeyMask::TopkBlocks`] reads (`None` without one).
    pub blocks: Option<Blocks<'a>>,
}

impl Call<'_> {
    /// Whether `(i, j)` is kept (the reference semantics of [`Call::mask`]).
    pub fn keeps(&self, i: usize, j: usize) -> bool {
        let (m, n) = (self.m(), self.n());
        self.mask.is_none_or(|mask| {
            mask.keeps_with(i, j, m, n, self.segments.as_ref(), self.blocks.as_ref())
        })
    }
}

impl Call<'_> {
    /// Queries.
    pub fn m(&self) -> usize {
        self.q.rows
    }

    /// Keys.
    pub fn n(&self) -> usize {
        self.k.rows
    }
}

/// Where a call writes rows `rows.start..rows.end`: row `r` of O at
/// `(r − rows.start) * row_stride` of `o` (dv values), its log-sum-exp at `lse[r − rows.start]`.
#[derive(Debug)]
pub struct Output<'a> {
    /// The output rows.
    pub o: &'a mut [f32],
    /// Elements between output rows.
    pub row_stride: usize,
    /// The natural log-sum-exp of each row's masked scores (`-inf` for a row that keeps no key).
    pub lse: Option<&'a mut [f32]>,
    /// Write the log-sum-exp of the scores with ALiBi distances measured from each query
    /// tile's origin ([`Call::alibi_origin`]) instead: what the backward reads
    /// (`crate::backward::Saved`). The same as the natural one without a slope.
    pub lse_from_origin: bool,
}

/// Why a full-width kernel refused a call (before touching any memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// This CPU (or this process) lacks the tier's instructions.
    Unsupported(&'static str),
    /// The operands, tile table, rows or output do not fit together.
    Shape(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unsupported(what) => write!(f, "this cpu has no {what}"),
            CallError::Shape(detail) => write!(f, "attention call: {detail}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Checks that `call` is well formed and that `out` can hold rows `rows` (which start at a
/// query-tile boundary): every element any kernel may read or write lies inside its slice.
pub fn check(
    call: &Call<'_>,
    rows: &std::ops::Range<usize>,
    out: &Output<'_>,
) -> Result<(), CallError> {
    let bad = |detail: String| Err(CallError::Shape(detail));
    let (m, n) = (call.m(), call.n());
    let (d, dv) = (call.q.cols, call.v.cols);
    if call.k.cols != d || call.v.rows != n {
        return bad(format!(
            "q is [{m}, {d}], k [{n}, {}], v [{}, {dv}]",
            call.k.cols, call.v.rows
        ));
    }
    if call.mask.is_some_and(KeyMask::is_topk) {
        match call.blocks {
            Some(s) if s.fits(m, n) => {}
            Some(s) => {
                return bad(format!(
                    "the block selection is {} × {} blocks of {}, not right for {m} × {n}",
                    s.rows, s.cols, s.b
                ))
            }
            None => return bad("a topk_blocks mask without its selection".to_string()),
        }
    }
    if call.mask.is_some_and(KeyMask::is_document) {
        match call.segments {
            Some(s) if s.keys.len() == n => {}
            Some(s) => {
                return bad(format!(
                    "the key segment ids hold {}, there are {n} keys",
                    s.keys.len()
                ))
            }
            None => return bad("a document mask without segment ids".to_string()),
        }
    }
    for (name, op) in [("q", &call.q), ("k", &call.k), ("v", &call.v)] {
        if !op.in_bounds() {
            return bad(format!(
                "{name} reaches past its {} elements",
                op.data.len()
            ));
        }
    }
    if let Some(b) = call.score.bias {
        if m > 0 && n > 0 {
            let last = (m - 1)
                .checked_mul(b.row_stride)
                .zip((n - 1).checked_mul(b.col_stride))
                .and_then(|(r, c)| r.checked_add(c));
            if last.is_none_or(|l| l >= b.data.len()) {
                return bad(format!(
                    "the bias reaches past its {} elements",
                    b.data.len()
                ));
            }
        }
    }
    let t = call.tiles;
    if t.query_tiles() != m.div_ceil(t.query_tile) {
        return bad(format!(
            "the tile table has {} query tiles for {m} rows of {}",
            t.query_tiles(),
            t.query_tile
        ));
    }
    if rows.start > rows.end || rows.end > m || !rows.start.is_multiple_of(t.query_tile) {
        return bad(format!("rows {rows:?} of {m} do not start a query tile"));
    }
    let count = rows.end - rows.start;
    if count > 0 && dv > 0 {
        let need = (count - 1)
            .checked_mul(out.row_stride)
            .and_then(|x| x.checked_add(dv));
        if out.row_stride < dv || need.is_none_or(|need| need > out.o.len()) {
            return bad(format!(
                "the output holds {} elements for {count} rows of {dv}",
                out.o.len()
            ));
        }
    }
    if out.lse.as_ref().is_some_and(|l| l.len() < count) {
        return bad(format!(
            "the log-sum-exp output holds fewer than {count} rows"
        ));
    }
    Ok(())
}

/// The scalar f64 reference of one call, every row: `(O [m, dv] row-major, lse [m])`.
pub fn reference(call: &Call<'_>) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (call.m(), call.n());
    let (d, dv) = (call.q.cols, call.v.cols);
    let mut out = vec![0.0f32; m * dv];
    let mut lses = vec![f32::NEG_INFINITY; m];
    let mut x = vec![0.0f64; n];
    for i in 0..m {
        let ia = i as f64 + n as f64 - m as f64;
        let mut kept = vec![false; n];
        for j in 0..n {
            kept[j] = call.keeps(i, j);
            let mut s = 0.0f64;
            for c in 0..d {
                s += call.q.data.get(i * call.q.row_stride + c) as f64
                    * call.k.data.get(j * call.k.row_stride + c) as f64;
            }
            let mut v = s * call.score.scale as f64;
            if let Some(b) = call.score.bias {
                v += b.data[i * b.row_stride + j * b.col_stride] as f64;
            }
            if let Some(slope) = call.score.alibi_slope {
                v += slope as f64 * (j as f64 - ia);
            }
            if let Some(cap) = call.score.softcap {
                v = cap as f64 * (v / cap as f64).tanh();
            }
            x[j] = v;
        }
        // NaN-propagating maximum over kept positions.
        let mut max = f64::NEG_INFINITY;
        for j in (0..n).filter(|&j| kept[j]) {
            max = if x[j].is_nan() || max.is_nan() {
                f64::NAN
            } else {
                max.max(x[j])
            };
        }
        if max == f64::NEG_INFINITY {
            continue;
        }
        let mut sum = 0.0f64;
        let mut acc = vec![0.0f64; dv];
        for j in (0..n).filter(|&j| kept[j]) {
            let p = (x[j] - max).exp();
            sum += p;
            for (c, a) in acc.iter_mut().enumerate() {
                *a += p * call.v.data.get(j * call.v.row_stride + c) as f64;
            }
        }
        for c in 0..dv {
            out[i * dv + c] = (acc[c] / sum) as f32;
        }
        lses[i] = (max + sum.ln()) as f32;
    }
    (out, lses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumerated_tables_list_only_reached_tiles() {
        let mask = KeyMask::Causal;
        let t = TileTable::enumerate(&mask, 8, 8, 4, 4);
        assert_eq!(
            t.runs(0),
            &[TileRun {
                first: 0,
                end: 1,
                partial: true
            }]
        );
        assert_eq!(
            t.runs(1),
            &[
                TileRun {
                    first: 0,
                    end: 1,
                    partial: false
                },
                TileRun {
                    first: 1,
                    end: 2,
                    partial: true
                }
            ]
        );
        assert!(t.runs(2).is_empty());
        assert_eq!(t.query_tiles(), 2);
    }

    #[test]
    fn reference_gives_zeros_for_rows_that_keep_nothing() {
        // m = 2 queries aligned to the end of n = 1 key: row 0 is i' = -1 and keeps nothing.
        let q = vec![1.0f32; 2 * 3];
        let k = vec![1.0f32; 3];
        let v = vec![2.0f32; 3];
        fn op(x: &[f32], rows: usize) -> Operand<'_> {
            Operand {
                data: Elements::F32(x),
                rows,
                cols: 3,
                row_stride: 3,
            }
        }
        let mask = KeyMask::Causal;
        let tiles = TileTable::enumerate(&mask, 2, 1, 4, 4);
        let call = Call {
            q: op(&q, 2),
            k: op(&k, 1),
            v: op(&v, 1),
            score: Score::scaled(1.0),
            mask: Some(&mask),
            tiles: &tiles,
            segments: None,
            blocks: None,
        };
        let (o, lse) = reference(&call);
        assert_eq!(o, vec![0.0, 0.0, 0.0, 2.0, 2.0, 2.0]);
        assert_eq!(lse[0], f32::NEG_INFINITY);
        assert!((lse[1] - 3.0).abs() < 1e-6);
    }
}
