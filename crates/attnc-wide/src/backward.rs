//! The backward of one attention call: the gradients of `O = softmax(mask(score(Q Kᵀ))) V`
//! with respect to Q, K, V, the bias and the ALiBi slope, given the cotangent `dO` and what
//! the forward saved (`O` and the row log-sum-exp), FlashAttention-2's way (`dlse`, where
//! given, is the cotangent of the row log-sum-exp, whose own gradient is `dX = P ∘ dlse`):
//!
//! ```text
//! D_i  = Σ_c dO_ic O_ic (− dlse_i)          P_ij = exp(x_ij − lse_i)   (kept positions)
//! dP_ij = dO_i · v_j                        dX_ij = P_ij (dP_ij − D_i)
//! dY_ij = dX_ij (1 − (x_ij / cap)²)          (softcap; dX without one)
//! dS_ij = dY_ij · scale                     dbias_ij += dY_ij   dslope += dY_ij (j − r)
//! dV_j += P_ij dO_i     dQ_i += dS_ij k_j   dK_j += dS_ij q_i
//! ```
//!
//! where `x = cap·tanh(y / cap)`, `y = s·scale + bias + slope·(j − r)`, `r` the row's ALiBi
//! origin (`i'` with a softcap, else a key of its query tile: softmax ignores the row's shift
//! `slope·(r − i')`, and so does the slope's gradient, since each row's `dY` sums to 0; see
//! [`Call::alibi_origin`]). Only the key tiles the call's tile table lists are
//! visited, element masks are evaluated on partial tiles only, and no `m × n` value is ever
//! held: per tile pair a few scalars or one tile of scores. A masked position contributes
//! nothing (it is skipped, never multiplied by 0), and a row that keeps no key (`lse = −∞`)
//! contributes nothing.
//!
//! [`run`] takes the AVX-512 kernel where the CPU has it (and the call's tile table has its
//! 64 × 64 tiles), else the portable one (plain Rust, any CPU); [`forward`] computes the saved
//! `O` and log-sum-exp the same way. The backward runs with flush-to-zero
//! ([`crate::flush`]): results below 2⁻¹²⁶ are 0. Both are tested against the f64
//! [`reference`](mod@reference).

pub mod portable;
pub mod reference;

use std::ops::Range;

use crate::attention::ValueBound;
use crate::problem::{Call, CallError};

/// What the forward saved for the backward, for one batch entry: `O` (`m × dv`, row-major)
/// and the log-sum-exp of each row's masked scores (`−∞` for a row that keeps no key), with
/// ALiBi distances measured from the row's origin ([`Call::alibi_origin`]; the natural
/// log-sum-exp without a slope), as [`forward`] writes it.
#[derive(Clone, Copy, Debug)]
pub struct Saved<'a> {
    /// The output rows.
    pub o: &'a [f32],
    /// One log-sum-exp per row.
    pub lse: &'a [f32],
}

/// The gradient of a broadcast bias: element `(i, j)` of the scores adds into
/// `data[i·row_stride + j·col_stride]` (a stride of 0 sums over that axis).
#[derive(Debug)]
pub struct BiasGrad<'a> {
    /// The gradient, accumulated into (the caller zeroes it).
    pub data: &'a mut [f32],
    /// Elements between query rows.
    pub row_stride: usize,
    /// Elements between keys.
    pub col_stride: usize,
}

/// Where one call's gradients go. `dq`, `dk`, `dv` (row-major `m × d`, `n × d`, `n × dv`) are
/// written whole; the bias and slope gradients are added into.
#[derive(Debug, Default)]
pub struct Gradients<'a> {
    /// `dQ`.
    pub dq: Option<&'a mut [f32]>,
    /// `dK`.
    pub dk: Option<&'a mut [f32]>,
    /// `dV`.
    pub dv: Option<&'a mut [f32]>,
    /// The bias gradient.
    pub dbias: Option<BiasGrad<'a>>,
    /// The ALiBi slope gradient.
    pub dslope: Option<&'a mut f32>,
}

/// What every part of one call's backward reads per query row: the log-sum-exp in base 2 and
/// `D = dO · O − dlse`, computed once per call ([`RowStats::of`]).
#[derive(Clone, Debug, Default)]
pub struct RowStats {
    /// `lse · log₂ e` per row.
    pub lse2: Vec<f32>,
    /// `D` per row.
    pub dd: Vec<f32>,
}

impl RowStats {
    /// The statistics of every row of `saved` (`m` rows of `dv`) for the cotangents
    /// `(dO, dlse)`. Sizes as [`check`] requires them.
    pub fn of(
        saved: &Saved<'_>,
        (d_o, d_lse): (&[f32], Option<&[f32]>),
        m: usize,
        dv: usize,
    ) -> Self {
        let dd = (0..m)
            .map(|i| {
                let (g, o) = (&d_o[i * dv..(i + 1) * dv], &saved.o[i * dv..(i + 1) * dv]);
                let dd: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
                dd - d_lse.map_or(0.0, |l| l[i])
            })
            .collect();
        let lse2 = saved.lse[..m]
            .iter()
            .map(|l| l * std::f32::consts::LOG2_E)
            .collect();
        RowStats { lse2, dd }
    }
}

/// One part of a call's backward: the key tiles `tiles` (of [`crate::attention::KEY_TILE`]
/// keys) only. Its `dK` and `dV` hold those keys' rows (from the first key of `tiles`), its
/// `dQ` the rows `dq_rows`, which must cover every query tile that visits one of the keys
/// ([`key_part_rows`]): the part's share of `dQ`, which the caller adds over the parts. Parts
/// of one call run independently, each in the same fixed order as the whole call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPart {
    /// Key tiles.
    pub tiles: Range<usize>,
    /// The rows `dQ` holds.
    pub dq_rows: Range<usize>,
}

/// The query rows whose tiles visit one of the key tiles `tiles` of `call` (an empty range at
/// 0 when none does): what a [`KeyPart`]'s `dQ` must hold.
pub fn key_part_rows(call: &Call<'_>, tiles: Range<usize>) -> Range<usize> {
    let table = call.tiles;
    let visiting = (0..table.query_tiles()).filter(|&t| {
        table
            .runs(t)
            .iter()
            .any(|run| (run.first as usize) < tiles.end && tiles.start < run.end as usize)
    });
    let (mut first, mut last) = (None, 0);
    for t in visiting {
        first.get_or_insert(t);
        last = t;
    }
    match first {
        Some(first) => first * table.query_tile..((last + 1) * table.query_tile).min(call.m()),
        None => 0..0,
    }
}

/// Whether gradient `g`, where asked for, holds exactly `rows × cols` values.
fn fits(g: &Option<&mut [f32]>, rows: usize, cols: usize) -> bool {
    g.as_ref()
        .is_none_or(|g| rows.checked_mul(cols).is_some_and(|len| g.len() == len))
}

/// Checks a backward call before anything is read: the forward call itself (as
/// [`crate::problem::check`] does for all rows), the saved rows, `dO` and every gradient's
/// size.
pub fn check(
    call: &Call<'_>,
    saved: &Saved<'_>,
    d_o: &[f32],
    grads: &Gradients<'_>,
) -> Result<(), CallError> {
    let (m, n, d, dv) = (call.m(), call.n(), call.q.cols, call.v.cols);
    let mut scratch = [];
    let out = crate::problem::Output {
        o: &mut scratch,
        row_stride: dv,
        lse: None,
        lse_from_origin: false,
    };
    // Rows 0..0 check the operands and the table without an output.
    crate::problem::check(call, &(0..0), &out)?;
    let bad = |what: &str| Err(CallError::Shape(format!("backward: {what}")));
    let rows = m.checked_mul(dv);
    if rows.is_none_or(|r| saved.o.len() < r || d_o.len() < r) {
        return bad("o or dO holds fewer than m × dv elements");
    }
    if saved.lse.len() < m {
        return bad("the log-sum-exp holds fewer than m rows");
    }
    if !fits(&grads.dq, m, d) || !fits(&grads.dk, n, d) || !fits(&grads.dv, n, dv) {
        return bad("a gradient of q, k or v has the wrong size");
    }
    if let Some(b) = &grads.dbias {
        if m > 0 && n > 0 {
            let last = (m - 1)
                .checked_mul(b.row_stride)
                .zip((n - 1).checked_mul(b.col_stride))
                .and_then(|(r, c)| r.checked_add(c));
            if last.is_none_or(|l| l >= b.data.len()) {
                return bad("the bias gradient reaches past its elements");
            }
        }
        if call.score.bias.is_none() {
            return bad("a bias gradient without a bias");
        }
    }
    if grads.dslope.is_some() && call.score.alibi_slope.is_none() {
        return bad("a slope gradient without a slope");
    }
    Ok(())
}

/// The gradients of one batch entry (see the module docs), on AVX-512 where available.
pub fn run(
    call: &Call<'_>,
    saved: &Saved<'_>,
    d_o: &[f32],
    grads: &mut Gradients<'_>,
) -> Result<(), CallError> {
    run_with(call, saved, (d_o, None), grads, true)
}

/// [`run`] with the cotangents `(dO, dlse)` (`dlse`: one per row, where the log-sum-exp has
/// one), on the portable kernel unless `wide` allows AVX-512.
pub fn run_with(
    call: &Call<'_>,
    saved: &Saved<'_>,
    (d_o, d_lse): (&[f32], Option<&[f32]>),
    grads: &mut Gradients<'_>,
    wide: bool,
) -> Result<(), CallError> {
    check(call, saved, d_o, grads)?;
    if d_lse.is_some_and(|l| l.len() < call.m()) {
        return Err(CallError::Shape(
            "backward: the log-sum-exp's cotangent holds fewer than m rows".into(),
        ));
    }
    // Peaked rows hold weights far below 2⁻¹²⁶ of their largest; products on them would be
    // subnormal and take microcode assists (5.9× slower at scores of standard deviation 30).
    // Flushed to zero instead: an absolute error below 2⁻¹²⁶ per operation.
    let _flush = crate::flush::FlushToZero::new();
    #[cfg(target_arch = "x86_64")]
    if wide && parts_run(call) {
        let (m, dv) = (call.m(), call.v.cols);
        let stats = RowStats::of(saved, (d_o, d_lse), m, dv);
        let whole = KeyPart {
            tiles: 0..call.n().div_ceil(crate::attention::KEY_TILE),
            dq_rows: 0..m,
        };
        // SAFETY: AVX-512 was detected, `check` passed (the whole call is its one part) and
        // the table has the kernel's tiles.
        unsafe { crate::attention::backward::run(call, &stats, d_o, grads, &whole) };
        return Ok(());
    }
    let _ = wide;
    portable::backward(call, saved, (d_o, d_lse), grads);
    Ok(())
}

/// Whether the AVX-512 kernels run on this CPU for `call` (the whole call's, [`run_part`] and
/// [`forward_rows`]): the kernel is available and the call's tile table has its tiles.
pub fn parts_run(call: &Call<'_>) -> bool {
    call.tiles.query_tile == crate::attention::QUERY_TILE
        && call.tiles.key_tile == crate::attention::KEY_TILE
        && crate::attention::available()
}

/// One [`KeyPart`] of a call's backward on the AVX-512 kernel (see [`parts_run`]), with the
/// row statistics of the whole call: `dK` and `dV` of the part's keys are written, its share
/// of `dQ` into `grads.dq` (rows `part.dq_rows`). The bias and slope gradients sum over every
/// key and are not split: a part refuses them.
pub fn run_part(
    call: &Call<'_>,
    saved: &Saved<'_>,
    stats: &RowStats,
    d_o: &[f32],
    grads: &mut Gradients<'_>,
    part: &KeyPart,
) -> Result<(), CallError> {
    check_part(call, saved, stats, d_o, grads, part)?;
    if !parts_run(call) {
        return Err(CallError::Shape(
            "backward: key parts need the AVX-512 kernel and its tiles".into(),
        ));
    }
    let _flush = crate::flush::FlushToZero::new();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 was detected, `check_part` passed and the table has the kernel's tiles.
    unsafe {
        crate::attention::backward::run(call, stats, d_o, grads, part)
    };
    Ok(())
}

/// [`check`] for one part: the call, `dO` and the saved rows as for the whole call, the row
/// statistics of every row, gradients sized to the part, and `dq_rows` covering the part.
fn check_part(
    call: &Call<'_>,
    saved: &Saved<'_>,
    stats: &RowStats,
    d_o: &[f32],
    grads: &Gradients<'_>,
    part: &KeyPart,
) -> Result<(), CallError> {
    let bad = |what: &str| Err(CallError::Shape(format!("backward part: {what}")));
    if grads.dbias.is_some() || grads.dslope.is_some() {
        return bad("bias and slope gradients sum over every key");
    }
    let (m, n, d, dv) = (call.m(), call.n(), call.q.cols, call.v.cols);
    // The whole-call checks on gradients of the whole call's size.
    let whole = Gradients::default();
    check(call, saved, d_o, &whole)?;
    if stats.lse2.len() < m || stats.dd.len() < m {
        return bad("the row statistics hold fewer than m rows");
    }
    let key_tile = crate::attention::KEY_TILE;
    if part.tiles.start > part.tiles.end || part.tiles.end > n.div_ceil(key_tile) {
        return bad("key tiles outside the call");
    }
    let keys = (part.tiles.start * key_tile).min(n)..(part.tiles.end * key_tile).min(n);
    let needed = key_part_rows(call, part.tiles.clone());
    let covered =
        needed.is_empty() || (part.dq_rows.start <= needed.start && needed.end <= part.dq_rows.end);
    if !covered || part.dq_rows.end > m {
        return bad("dQ's rows do not cover the query tiles visiting the keys");
    }
    if !fits(&grads.dq, part.dq_rows.len(), d)
        || !fits(&grads.dk, keys.len(), d)
        || !fits(&grads.dv, keys.len(), dv)
    {
        return bad("a gradient of q, k or v has the wrong size for the part");
    }
    Ok(())
}

/// [`forward`] of the rows `rows` only (`o` and `lse` hold those rows), on the AVX-512 kernel
/// ([`parts_run`]): the same bits as those rows of the whole call, since any split of its
/// rows gives them. `bound` is the call's [`ValueBound`] where the caller computed it once
/// for all its blocks of rows (else each block reads every value for it).
pub fn forward_rows(
    call: &Call<'_>,
    rows: Range<usize>,
    o: &mut [f32],
    lse: &mut [f32],
    bound: Option<ValueBound>,
) -> Result<(), CallError> {
    if !parts_run(call) {
        return Err(CallError::Shape(
            "forward: row blocks need the AVX-512 kernel and its tiles".into(),
        ));
    }
    let mut out = crate::problem::Output {
        o,
        row_stride: call.v.cols,
        lse: Some(lse),
        lse_from_origin: true,
    };
    crate::attention::run_with_bound(call, rows, &mut out, bound)
}

/// The forward of one batch entry with its log-sum-exp as the backward reads it ([`Saved`]),
/// every row: on the AVX-512 kernel where available (and the table has its tile sizes), else
/// the portable one.
pub fn forward(call: &Call<'_>, o: &mut [f32], lse: &mut [f32]) -> Result<(), CallError> {
    forward_with(call, o, lse, true)
}

/// [`forward`], on the portable kernel unless `wide` allows AVX-512.
pub fn forward_with(
    call: &Call<'_>,
    o: &mut [f32],
    lse: &mut [f32],
    wide: bool,
) -> Result<(), CallError> {
    let (m, dv) = (call.m(), call.v.cols);
    let mut out = crate::problem::Output {
        o,
        row_stride: dv,
        lse: Some(lse),
        lse_from_origin: true,
    };
    if wide && parts_run(call) {
        return crate::attention::run(call, 0..m, &mut out);
    }
    crate::problem::check(call, &(0..m), &out)?;
    let lse = out.lse.take().unwrap_or_default();
    portable::forward(call, out.o, lse);
    Ok(())
}
