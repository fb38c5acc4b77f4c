//! The host pre-pass of the int8 attention kernel: quantizes Q, K and V of every batch entry
//! into one packed byte buffer whose layout the kernel of [`super::int8`] reads.
//!
//! Per batch entry, O(n·d) work:
//!
//! - **K smoothing.** The mean key `k̄ = (1/n) Σ_j k_j` is subtracted from every key when the
//!   score expression is `a·S + (terms without S)` ([`shift_invariant`]): then
//!   `q_i·(k_j − k̄) = q_i·k_j − q_i·k̄` changes each row's scores by one constant, and
//!   `softmax(x + c_row) = softmax(x)`. A mask replaces scores by `-inf` per position, and a
//!   per-row constant added before it still cancels in every row (masked keys stay `-inf`), so
//!   this is exact for every mask. It removes the common offset of the keys, so their int8
//!   scales cover only the part that differs between keys.
//! - **Q** per row `i`: scale `s_q = max_c |q_ic| / L` with `L = 32767` ([`q_levels`]),
//!   `q̂ = round(q / s_q)` in [-L, L], stored as `u = q̂ + 32768` (the unsigned operand of
//!   `vpdpbusd`) split into its high and low bytes, `u = 256 h + l`. Each group of 4 depths
//!   is written 4 times (16 bytes), so the kernel loads a ready operand instead of
//!   broadcasting. 8-bit Q alone costs about 0.6 % relative error on standard-normal inputs;
//!   16 bits remove it for one more `vpdpbusd` per K operand.
//! - **K** per key `j`: scale `s_k = max_c |k_jc| / 127`, `k̂` in [-127, 127], with the
//!   correction `c_j = −128 Σ_c k̂_jc`, so `256 (c_j + Σ_c h_c k̂_jc) + Σ_c l_c k̂_jc = q̂·k̂_j`
//!   exactly (in i32 for d ≤ 516; beyond, `L` shrinks so the sums still fit).
//!   Packed per group of 4 keys and 4 depths: 16 bytes `[key][depth]`, one `vpdpbusd` operand
//!   whose four i32 lanes are the four keys.
//! - **V** per ([`KEY_BLOCK`], column): scale `s_v = max_j |v_jc| / 127` over the block's
//!   keys. With the scale on the column rather than the key, P needs no V factor, so the
//!   kernel quantizes P against its exact block maximum. Packed per group of 4 keys and 4
//!   value columns: 16 bytes `[column][key]`, so 4 bytes of P (4 keys of one row) in every
//!   lane times this operand gives 4 output columns.
//!
//! Keys are padded with zeros to a multiple of [`KEY_BLOCK`], depths and value columns to a
//! multiple of 4. Rounding is to nearest, ties to even; non-finite inputs give non-finite
//! scales and never panic.

use super::spec::{AttentionSpec, ScoreExpr, TensorRef};
use crate::buffer::BufferView;
use crate::error::{JitError, Result};
use attnc_ir::BinaryOp;
use std::ops::Range;

/// Keys per block of the int8 kernel (one online-softmax step, one P scale per row, one V
/// scale per column). 32 rather than 64: the maxima of 32 values are smaller, which takes
/// P's and V's rounding error from about 0.6 % to 0.5 % each, for one more conversion of the
/// P·V accumulators per 32 keys.
pub const KEY_BLOCK: usize = 32;

/// Byte offsets of the sections of one batch entry (every section 16-byte aligned).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantLayout {
    /// The attention the operands belong to (Q, K, V slots 0, 1, 2 of the pre-pass inputs).
    pub spec: AttentionSpec,
    /// Whether the mean key is subtracted (see the module docs).
    pub smooth_keys: bool,
    /// Groups of 4 depths: `ceil(d / 4)`.
    pub d4: usize,
    /// Value columns padded to a multiple of 4.
    pub dv_pad: usize,
    /// Keys padded to a multiple of [`KEY_BLOCK`].
    pub n_pad: usize,
    /// Largest `|q̂|` ([`q_levels`]).
    pub q_levels: i32,
    /// `[m][2][d4][16]` u8: per row, the high then the low bytes of the offset 16-bit Q,
    /// each group of 4 depths repeated in all four 32-bit lanes (a ready `vpdpbusd` operand).
    pub q: usize,
    /// `[m]` f32: Q row scales.
    pub q_scale: usize,
    /// `[n_pad / 4][d4][4 keys][4 depths]` i8: quantized K.
    pub k: usize,
    /// `[n_pad]` f32: K scales.
    pub k_scale: usize,
    /// `[n_pad]` i32: K corrections `−128 Σ_c k̂_jc` (the high bytes' share of
    /// `−Q_OFFSET Σ_c k̂_jc`; the kernel's sums start there).
    pub k_corr: usize,
    /// `[n_pad / 4][dv_pad][4 keys]` i8: quantized V.
    pub v: usize,
    /// `[n_pad / KEY_BLOCK][dv_pad]` f32: V scales per (key block, column).
    pub v_scale: usize,
    /// Bytes per batch entry.
    pub entry: usize,
}

/// Offset of the unsigned 16-bit Q: `q̂ + Q_OFFSET` splits into a high and a low byte.
pub const Q_OFFSET: i32 = 32768;

/// The largest `|q̂|` for depth `d`: 32767, or less where `Σ_c |q̂_c k̂_c| ≤ levels · 127 · d`
/// would not fit an i32 (d > 516).
pub fn q_levels(d: usize) -> i32 {
    let fit = i32::MAX as usize / (127 * d.max(1));
    fit.min(32767) as i32
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

impl QuantLayout {
    /// The layout for `spec` (bound shapes).
    pub fn new(spec: &AttentionSpec) -> QuantLayout {
        let d4 = spec.d.div_ceil(4);
        let dv_pad = spec.dv.div_ceil(4) * 4;
        let n_pad = spec.n.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let q = 0;
        let q_scale = align16(q + spec.m * 2 * 16 * d4);
        let k = align16(q_scale + 4 * spec.m);
        let k_scale = align16(k + n_pad * 4 * d4);
        let k_corr = align16(k_scale + 4 * n_pad);
        let v = align16(k_corr + 4 * n_pad);
        let v_scale = align16(v + n_pad * dv_pad);
        let entry = align16(v_scale + 4 * (n_pad / KEY_BLOCK) * dv_pad);
        QuantLayout {
            spec: spec.clone(),
            smooth_keys: shift_invariant(&spec.score),
            d4,
            dv_pad,
            n_pad,
            q_levels: q_levels(spec.d),
            q,
            q_scale,
            k,
            k_scale,
            k_corr,
            v,
            v_scale,
            entry,
        }
    }

    /// Bytes per batch entry.
    pub fn entry_bytes(&self) -> usize {
        self.entry
    }

    /// Bytes of the whole packed buffer.
    pub fn total_bytes(&self) -> usize {
        self.entry.saturating_mul(self.spec.batch_count())
    }
}

/// Whether adding a per-row constant to `S` adds a per-row constant to the score: the
/// expression is `a·S + b` with `a` constant and `b` free of `S` (`S` appears once, below
/// `+`, `-`, negation and multiplication or division by constants only).
pub fn shift_invariant(e: &ScoreExpr) -> bool {
    fn uses_s(e: &ScoreExpr) -> bool {
        match e {
            ScoreExpr::Scores => true,
            ScoreExpr::Const(_) | ScoreExpr::Dim(_) | ScoreExpr::RelPos | ScoreExpr::Bias(_) => {
                false
            }
            ScoreExpr::Unary(_, a) => uses_s(a),
            ScoreExpr::Binary(_, a, b) => uses_s(a) || uses_s(b),
        }
    }
    fn affine(e: &ScoreExpr) -> bool {
        match e {
            ScoreExpr::Scores => true,
            ScoreExpr::Const(_) | ScoreExpr::Dim(_) | ScoreExpr::RelPos | ScoreExpr::Bias(_) => {
                false
            }
            ScoreExpr::Unary(attnc_ir::UnaryOp::Neg, a) => affine(a),
            ScoreExpr::Unary(..) => false,
            ScoreExpr::Binary(op, a, b) => match op {
                BinaryOp::Add | BinaryOp::Sub => {
                    (affine(a) && !uses_s(b)) || (affine(b) && !uses_s(a))
                }
                BinaryOp::Mul => {
                    (affine(a) && matches!(**b, ScoreExpr::Const(_)))
                        || (affine(b) && matches!(**a, ScoreExpr::Const(_)))
                }
                BinaryOp::Div => affine(a) && matches!(**b, ScoreExpr::Const(_)),
                BinaryOp::Max | BinaryOp::Min => false,
            },
        }
    }
    affine(e)
}

/// Checks that Q, K and V (`ins`, in this order) hold every element the pre-pass reads.
fn check_operands(layout: &QuantLayout, ins: &[BufferView<'_>; 3]) -> Result<()> {
    let s = &layout.spec;
    check_extent(&s.q, &s.batch, s.m, s.d, ins[0].len())?;
    check_extent(&s.k, &s.batch, s.n, s.d, ins[1].len())?;
    check_extent(&s.v, &s.batch, s.n, s.dv, ins[2].len())
}

/// Checks that every element `t` addresses lies inside a buffer of `len` elements.
fn check_extent(
    t: &TensorRef,
    batch: &[usize],
    rows: usize,
    cols: usize,
    len: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 || batch.contains(&0) {
        return Ok(());
    }
    let mut last = (rows - 1) * t.row_stride + (cols - 1) * t.col_stride;
    for (&size, &stride) in batch.iter().zip(&t.batch_strides) {
        last = last.saturating_add((size - 1).saturating_mul(stride));
    }
    if last >= len {
        return Err(JitError::Buffer {
            input: t.name.clone(),
            detail: format!("int8 pre-pass reads element {last}, buffer has {len}"),
        });
    }
    Ok(())
}

/// Element offset of batch entry `b` (flat, row-major over `batch`) of tensor `t`.
fn batch_offset(t: &TensorRef, batch: &[usize], mut b: usize) -> usize {
    let mut off = 0;
    for a in (0..batch.len()).rev() {
        let size = batch[a].max(1);
        off += (b % size) * t.batch_strides[a];
        b /= size;
    }
    off
}

/// Reads row `r` (`cols` elements) of `t` at element offset `base` into `out`.
fn read_row(view: &BufferView<'_>, t: &TensorRef, base: usize, r: usize, out: &mut [f32]) {
    let start = base + r * t.row_stride;
    let end = start + out.len();
    match view {
        // Contiguous rows (what the matcher accepts) are copied or widened as slices.
        BufferView::F32(s) if t.col_stride == 1 => out.copy_from_slice(&s[start..end]),
        BufferView::Bf16(s) if t.col_stride == 1 => {
            for (x, h) in out.iter_mut().zip(&s[start..end]) {
                *x = h.to_f32();
            }
        }
        BufferView::F16(s) if t.col_stride == 1 => {
            for (x, h) in out.iter_mut().zip(&s[start..end]) {
                *x = h.to_f32();
            }
        }
        _ => {
            for (c, x) in out.iter_mut().enumerate() {
                *x = view.get_f32(start + c * t.col_stride);
            }
        }
    }
}

/// `(scale, quantized)` of `xs`: `scale = max |x| / 127`, `x̂ = round(x / scale)`.
fn quantize(xs: &[f32], out: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (o, &x) in out.iter_mut().zip(xs) {
        // `as` saturates and maps NaN to 0: no input panics.
        *o = round_even((x * inv).clamp(-127.0, 127.0)) as i8;
    }
    scale
}

/// [`quantize`] to `levels` (at most 32767) instead of 127.
fn quantize16(xs: &[f32], levels: i32, out: &mut [i32]) -> f32 {
    let amax = xs.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let lv = levels as f32;
    let scale = amax / lv;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = round_even((x * inv).clamp(-lv, lv)) as i32;
    }
    scale
}

/// `x` rounded to the nearest integer, ties to even, for |x| < 2^22 (NaN stays NaN): adding
/// and subtracting 1.5 · 2^23 leaves no fraction bits. `f32::round_ties_even` can be a
/// library call on baseline x86-64.
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

fn put_f32(buf: &mut [u8], at: usize, x: f32) {
    buf[at..at + 4].copy_from_slice(&x.to_le_bytes());
}

/// Packs one batch entry into `out` (`layout.entry` bytes, zeroed); of Q only the rows in
/// `q_rows` when given (the others stay zero).
fn pack_entry(
    layout: &QuantLayout,
    ins: &[BufferView<'_>; 3],
    b: usize,
    q_rows: Option<&[Range<usize>]>,
    out: &mut [u8],
) {
    let s = &layout.spec;
    let (m, n, d, dv) = (s.m, s.n, s.d, s.dv);
    let (d4, dv_pad) = (layout.d4, layout.dv_pad);
    let mut row = vec![0.0f32; d.max(dv)];
    // Quantized rows padded with zeros to whole groups of 4 (k̂ = 0 and q̂ = 0 at padding).
    let mut qrow = vec![0i8; 4 * d4];
    // Q rows: 16 bits, offset to unsigned, high and low bytes as pre-broadcast operands.
    let mut q16 = vec![0i32; 4 * d4];
    let qb = batch_offset(&s.q, &s.batch, b);
    let every_row = 0..m;
    let rows = q_rows
        .unwrap_or(std::slice::from_ref(&every_row))
        .iter()
        .flat_map(|r| r.start.min(m)..r.end.min(m));
    for i in rows {
        read_row(&ins[0], &s.q, qb, i, &mut row[..d]);
        let scale = quantize16(&row[..d], layout.q_levels, &mut q16[..d]);
        put_f32(out, layout.q_scale + 4 * i, scale);
        let base = layout.q + i * 2 * 16 * d4;
        let (hi, lo) = out[base..base + 2 * 16 * d4].split_at_mut(16 * d4);
        for ((h, l), q) in hi
            .chunks_exact_mut(16)
            .zip(lo.chunks_exact_mut(16))
            .zip(q16.chunks_exact(4))
        {
            let u: [u16; 4] = std::array::from_fn(|t| (q[t] + Q_OFFSET) as u16);
            for lane in 0..4 {
                for t in 0..4 {
                    h[4 * lane + t] = (u[t] >> 8) as u8;
                    l[4 * lane + t] = u[t] as u8;
                }
            }
        }
    }
    // K: mean, then per key, 4 depths at a time into its group's operands.
    let kb = batch_offset(&s.k, &s.batch, b);
    let mut mean = vec![0.0f64; d];
    if layout.smooth_keys && n > 0 {
        for j in 0..n {
            read_row(&ins[1], &s.k, kb, j, &mut row[..d]);
            for (a, &x) in mean.iter_mut().zip(&row[..d]) {
                *a += f64::from(x);
            }
        }
        for a in &mut mean {
            *a /= n as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|&a| a as f32).collect();
    for j in 0..n {
        read_row(&ins[1], &s.k, kb, j, &mut row[..d]);
        for (x, &a) in row[..d].iter_mut().zip(&mean) {
            *x -= a;
        }
        let scale = quantize(&row[..d], &mut qrow[..d]);
        put_f32(out, layout.k_scale + 4 * j, scale);
        // Wraps for d > 516 like the kernel's i32 sums; their total `q̂·k̂` still fits.
        let sum: i32 = qrow.iter().map(|&x| i32::from(x)).sum();
        out[layout.k_corr + 4 * j..layout.k_corr + 4 * j + 4]
            .copy_from_slice(&sum.wrapping_mul(-(Q_OFFSET >> 8)).to_le_bytes());
        let (g, l) = (j / 4, j % 4);
        for (c, q) in qrow.chunks_exact(4).enumerate() {
            let at = layout.k + 16 * (g * d4 + c) + 4 * l;
            for (o, &x) in out[at..at + 4].iter_mut().zip(q) {
                *o = x as u8;
            }
        }
    }
    // V per (key block, column): column maxima over the block's rows, then each group of 4
    // keys as its `[column][key]` operand bytes.
    let vb = batch_offset(&s.v, &s.batch, b);
    let mut block = vec![0.0f32; KEY_BLOCK * dv];
    let mut amax = vec![0.0f32; dv];
    let mut inv = vec![0.0f32; dv];
    for t in 0..layout.n_pad / KEY_BLOCK {
        let j0 = t * KEY_BLOCK;
        let keys = (n - j0).min(KEY_BLOCK);
        amax.fill(0.0);
        for (jj, r) in block.chunks_exact_mut(dv.max(1)).take(keys).enumerate() {
            read_row(&ins[2], &s.v, vb, j0 + jj, r);
            for (a, &x) in amax.iter_mut().zip(r.iter()) {
                *a = a.max(x.abs());
            }
        }
        for (c, (&a, i)) in amax.iter().zip(&mut inv).enumerate() {
            let scale = a / 127.0;
            *i = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            put_f32(out, layout.v_scale + 4 * (t * dv_pad + c), scale);
        }
        for jj in 0..keys {
            let j = j0 + jj;
            let at = layout.v + 4 * (j / 4) * dv_pad + j % 4;
            let r = &block[jj * dv..(jj + 1) * dv];
            for (c, (&x, &i)) in r.iter().zip(&inv).enumerate() {
                // `as` saturates and maps NaN to 0: no input panics.
                out[at + 4 * c] = round_even((x * i).clamp(-127.0, 127.0)) as i8 as u8;
            }
        }
    }
}

/// Packs Q, K, V (`ins`, any of f32/f16/bf16) for every batch entry, over up to `threads`
/// threads (the bytes do not depend on the count).
///
/// # Errors
///
/// [`JitError::Buffer`] when a buffer is too short for the tensors of the layout.
pub fn pack(layout: &QuantLayout, ins: &[BufferView<'_>; 3], threads: usize) -> Result<Vec<u8>> {
    let s = &layout.spec;
    check_operands(layout, ins)?;
    let mut out = vec![0u8; layout.total_bytes()];
    let entries = s.batch_count();
    if layout.entry == 0 || entries == 0 {
        return Ok(out);
    }
    let threads = threads.clamp(1, entries);
    let per = entries.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(per * layout.entry).enumerate() {
            scope.spawn(move || {
                for (k, entry) in chunk.chunks_mut(layout.entry).enumerate() {
                    pack_entry(layout, ins, t * per + k, None, entry);
                }
            });
        }
    });
    Ok(out)
}

/// The pre-pass of batch entry 0 only, and of its Q rows only `q_rows` (what a sampled run
/// reads), in a buffer of the full length: the kernel checks lengths, and the other entries
/// and rows stay zero. A sampled run of dense attention quantizes all keys but a few hundred
/// queries instead of every query.
pub fn pack_sampled(
    layout: &QuantLayout,
    ins: &[BufferView<'_>; 3],
    q_rows: &[Range<usize>],
) -> Result<Vec<u8>> {
    let s = &layout.spec;
    check_operands(layout, ins)?;
    let mut out = vec![0u8; layout.total_bytes()];
    if layout.entry > 0 && s.batch_count() > 0 {
        pack_entry(layout, ins, 0, Some(q_rows), &mut out[..layout.entry]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(src: &str) -> ScoreExpr {
        let s = Box::new(ScoreExpr::Scores);
        let c = |v| Box::new(ScoreExpr::Const(v));
        match src {
            "s*c" => ScoreExpr::Binary(BinaryOp::Mul, s, c(0.125)),
            "s/c+bias" => ScoreExpr::Binary(
                BinaryOp::Add,
                Box::new(ScoreExpr::Binary(BinaryOp::Div, s, c(8.0))),
                Box::new(ScoreExpr::Bias(0)),
            ),
            "tanh(s)" => ScoreExpr::Unary(attnc_ir::UnaryOp::Tanh, s),
            "s*s" => ScoreExpr::Binary(BinaryOp::Mul, s.clone(), s),
            _ => ScoreExpr::Scores,
        }
    }

    #[test]
    fn smoothing_only_for_affine_scores() {
        assert!(shift_invariant(&expr("s")));
        assert!(shift_invariant(&expr("s*c")));
        assert!(shift_invariant(&expr("s/c+bias")));
        assert!(!shift_invariant(&expr("tanh(s)")));
        assert!(!shift_invariant(&expr("s*s")));
    }

    #[test]
    fn quantization_is_symmetric_and_rounds_to_even() {
        let mut out = [0i8; 4];
        let scale = quantize(&[127.0, -63.5, 0.5, 1.5], &mut out);
        assert_eq!(scale, 1.0);
        assert_eq!(out, [127, -64, 0, 2]);
        let scale = quantize(&[0.0, 0.0], &mut out[..2]);
        assert_eq!(scale, 0.0);
        // NaN is ignored by the maximum and quantizes to 0.
        let mut nan = [0i8; 2];
        quantize(&[f32::NAN, 1.0], &mut nan);
        assert_eq!(nan, [0, 127]);
    }
}
