//! K and V of one batch entry in the tile layouts of the products (once per batch entry).
//!
//! The kernels compute transposed products, `Sᵀ = K·Qᵀ` and `Oᵀ = Vᵀ·Pᵀ`, so that the query
//! rows are the lanes of every vector (the softmax runs down columns, without horizontal
//! reductions) and the per-query-tile operands (Q, P) are the B tiles that stay loaded while K
//! and V stream through the A tiles. Keys are padded with zeros to whole key tiles
//! ([`KEY_TILE`]), head dimensions to whole tile rows; each stored tile is 1024 contiguous bytes
//! (16 rows of 64).
//!
//! - bf16, K: tile `(g, c)` = keys `16g..16g+16` (rows) × dims `32c..32c+32`, at
//!   `(g·d_chunks + c)·1024`; `hi` and `lo` bf16 parts (`k ≈ hi + lo`; no `lo` when every
//!   remainder is 0, e.g. bf16 inputs).
//! - bf16, Vᵀ: tile `(h, g)` = columns `16g..16g+16` (rows) × keys `32h..32h+32`, at
//!   `(h·dv_groups + g)·1024`; `hi` and `lo`.
//! - int8, K: smoothed `k − μ` (μ the mean of the finite keys) in two signed digits per key,
//!   `k − μ ≈ s·(hi + lo/254)` with `s = max|k − μ| / 127`; tile `(g, c)` = keys × dims
//!   `64c..64c+64`. A key with a NaN or ∞ has `s = NaN`.
//! - int8, Vᵀ: per key tile `t` and column, `v ≈ s·(hi + lo/254)` with `s = max|v| / 127` over
//!   the tile's 64 keys; tile `(t, g)` = columns `16g..16g+16` × the tile's 64 keys.
//!
//! V values that are NaN or ∞ are stored as 0 and listed ([`BadValues`]); the kernels add them
//! back to the rows that keep their key, so a masked key's NaN never reaches a row.

use std::arch::x86_64::*;
use std::sync::Mutex;

use super::simd::{first, join, load, non_finite, split_bf16, to_bf16, transpose16};
use super::tile::TILE_BYTES;
use super::{Products, Unit, KEY_TILE};
use crate::problem::{Call, CallError, Operand};

/// 64 bytes, 64-byte aligned: the unit of every buffer handed to tile loads and stores.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// A zeroed, 64-byte aligned buffer. Large buffers go back to a process-wide pool when
/// dropped and are reused by the next packing or call, so that repeated calls do not fault in
/// fresh pages (about half of packing's time otherwise).
pub(crate) struct Lines(Vec<Line>);

/// Buffers of at least this many bytes are pooled (the scratch of a call too).
const POOLED: usize = 4 << 10;
/// The pool keeps at most this many bytes.
const POOL_BYTES: usize = 256 << 20;

static POOL: Mutex<Vec<Vec<Line>>> = Mutex::new(Vec::new());

impl Lines {
    /// At least `bytes` zero bytes; an error instead of an abort when memory runs out.
    pub(crate) fn zeroed(bytes: usize) -> Result<Lines, CallError> {
        Lines::take(bytes, true)
    }

    /// At least `bytes` bytes of unspecified (initialized) content, for a caller that writes
    /// all of them: a pooled buffer is not cleared first.
    pub(crate) fn overwritten(bytes: usize) -> Result<Lines, CallError> {
        Lines::take(bytes, false)
    }

    fn take(bytes: usize, zero: bool) -> Result<Lines, CallError> {
        let lines = bytes.div_ceil(64);
        let mut v = if bytes >= POOLED {
            // The smallest pooled buffer that fits (a poisoned pool is just not used).
            POOL.lock().ok().and_then(|mut pool| {
                let best = (0..pool.len())
                    .filter(|&i| pool[i].capacity() >= lines)
                    .min_by_key(|&i| pool[i].capacity())?;
                Some(pool.swap_remove(best))
            })
        } else {
            None
        }
        .unwrap_or_default();
        if zero {
            v.clear();
        } else {
            v.truncate(lines);
        }
        v.try_reserve_exact(lines.saturating_sub(v.len()))
            .map_err(|_| {
                CallError::Shape(format!("cannot allocate {bytes} bytes of packed operands"))
            })?;
        v.resize(lines, Line([0; 64]));
        Ok(Lines(v))
    }

    /// The first byte.
    pub(crate) fn ptr(&self) -> *const u8 {
        self.0.as_ptr().cast()
    }

    /// The first byte, writable.
    pub(crate) fn ptr_mut(&mut self) -> *mut u8 {
        self.0.as_mut_ptr().cast()
    }

    /// The length in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.0.len() * 64
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let bytes = self.0.capacity() * 64;
        if bytes < POOLED {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            let held: usize = pool.iter().map(|v| v.capacity() * 64).sum();
            if held + bytes <= POOL_BYTES {
                pool.push(std::mem::take(&mut self.0));
            }
        }
    }
}

/// NaN and ∞ of V, by key: `entries[offsets[t]..offsets[t + 1]]` lie in key tile `t`.
pub(crate) struct BadValues {
    offsets: Vec<usize>,
    /// (key, column, value), sorted by key.
    entries: Vec<(usize, usize, f32)>,
}

impl BadValues {
    /// The non-finite values of key tile `t`.
    pub(crate) fn of_tile(&self, t: usize) -> &[(usize, usize, f32)] {
        match (self.offsets.get(t), self.offsets.get(t + 1)) {
            (Some(&a), Some(&b)) => &self.entries[a..b],
            _ => &[],
        }
    }

    fn from_entries(mut entries: Vec<(usize, usize, f32)>, key_tiles: usize) -> BadValues {
        entries.sort_by_key(|e| (e.0, e.1));
        let offsets = (0..=key_tiles)
            .map(|t| entries.partition_point(|e| e.0 < t * KEY_TILE))
            .collect();
        BadValues { offsets, entries }
    }
}

/// K and V of one batch entry in tile layout.
pub(crate) struct Data {
    /// Key tiles of [`KEY_TILE`] keys.
    pub(crate) key_tiles: usize,
    /// Tile-row chunks of the head dimension (32 bf16 or 64 int8 per chunk).
    pub(crate) d_chunks: usize,
    /// Groups of 16 value columns.
    pub(crate) dv_groups: usize,
    pub(crate) k_hi: Lines,
    pub(crate) k_lo: Option<Lines>,
    pub(crate) v_hi: Lines,
    pub(crate) v_lo: Option<Lines>,
    /// int8: the scale of each key (padded keys 0).
    pub(crate) k_scale: Vec<f32>,
    /// int8: the subtracted mean key μ (`d` values).
    pub(crate) k_mean: Vec<f32>,
    /// int8 on AVX-512 VNNI: K smoothed in 16-bit words for `vpdpwssd`, in blocks of 16 keys
    /// by 64 dimensions, `[key / 16][chunk][key % 16][64]` (128 bytes per key and chunk; zeros
    /// past d and past n); `None` when packed for the tile unit (whose digits are `k_hi`,
    /// `k_lo` and `k_scale`, empty when packed for vectors).
    pub(crate) k_words: Option<Lines>,
    /// Words per key (`64·d_chunks`).
    pub(crate) d_words: usize,
    /// The largest word magnitude: `d·level²` fits an i32, so no sum of products overflows.
    pub(crate) word_level: f32,
    /// The scale of each key's words (padded keys 0, NaN for a key with a NaN or ∞).
    pub(crate) k_word_scale: Vec<f32>,
    /// int8: `[key tile][dv_groups·16]` scales of V's `hi` digit.
    pub(crate) v_scale: Vec<f32>,
    pub(crate) bad_v: BadValues,
}

/// Whether int8 V keeps a second digit (`lo`): halves V's share of the error (about 0.5 % →
/// 0 of relative L2 on standard-normal data) for a second `tdpbusd` per output tile.
pub(crate) const INT8_V_DIGITS: usize = 2;

fn bytes(parts: &[usize]) -> Result<usize, CallError> {
    parts
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| CallError::Shape("packed operands overflow usize".into()))
}

/// Packs K and V of `call` for `products` on `unit` (the caller checked the call and the CPU).
pub(crate) fn pack(products: Products, unit: Unit, call: &Call<'_>) -> Result<Data, CallError> {
    // SAFETY (both arms): the caller checked `runs_on(products, unit)` (AMX or VNNI, AVX-512
    // and, for bf16, AVX-512 BF16) and `problem::check(call)` (every row of K and V lies
    // inside its slice).
    match products {
        Products::Bf16 => unsafe { pack_bf16(call, unit == Unit::Tiles) },
        Products::Int8 => unsafe { pack_int8(call, unit) },
    }
}

/// Row `r` of `op` in vectors of 16 columns from `c0` (`count ≤ 16` of them).
///
/// # Safety
/// `op` is in bounds (`problem::check`), `r < op.rows`, `c0 + count ≤ op.cols`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn row16(op: &Operand<'_>, r: usize, c0: usize, count: usize) -> __m512 {
    // SAFETY: by the caller, `r·stride + c0 + count ≤ data.len()`.
    unsafe { load(&op.data, r * op.row_stride + c0, count) }
}

/// K and V in bf16 tiles: `hi`, and with `pairs` the rest `lo` where some value has more than
/// bf16's 8 significant bits. The tile unit takes the pairs (its products are cheap next to
/// its tile traffic); on vectors a second product per pair would cost what the f32 kernel does,
/// so K and V are rounded once there.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn pack_bf16(call: &Call<'_>, pairs: bool) -> Result<Data, CallError> {
    let (n, d, dv) = (call.n(), call.q.cols, call.v.cols);
    let key_tiles = n.div_ceil(KEY_TILE);
    let d_chunks = d.div_ceil(32);
    let dv_groups = dv.div_ceil(16);
    let k_bytes = bytes(&[key_tiles, 4, d_chunks, TILE_BYTES])?;
    let v_bytes = bytes(&[key_tiles, 2, dv_groups, TILE_BYTES])?;
    let mut k = Bf16Planes::new(k_bytes, pairs)?;
    zero_padding(&mut k.hi, n, key_tiles, d_chunks);
    if let Some((lo, _)) = &mut k.lo {
        zero_padding(lo, n, key_tiles, d_chunks);
    }
    for j in 0..n {
        for c in 0..d_chunks {
            let c0 = 32 * c;
            // SAFETY: j < n, columns c0..c0 + count ≤ d.
            let (a, b) = unsafe {
                (
                    row16(&call.k, j, c0, (d - c0).min(16)),
                    row16(
                        &call.k,
                        j,
                        (c0 + 16).min(d),
                        d.saturating_sub(c0 + 16).min(16),
                    ),
                )
            };
            let at = ((j / 16) * d_chunks + c) * TILE_BYTES + (j % 16) * 64;
            // SAFETY: row j % 16 of tile (j/16, c), which exists for j < n.
            unsafe { k.store(at, a, b) };
        }
    }
    let (k_hi, k_lo) = k.finish();

    // Every row of every Vᵀ tile is written below (zeros past n).
    let mut v = Bf16Planes::new(v_bytes, pairs)?;
    let mut bad = Vec::new();
    let mut block = [[_mm512_setzero_ps(); 16]; 2];
    for h in 0..key_tiles * 2 {
        for g in 0..dv_groups {
            let (c0, cols) = (16 * g, (dv - 16 * g).min(16));
            for (b, rows) in block.iter_mut().enumerate() {
                for (e, x) in rows.iter_mut().enumerate() {
                    let j = 32 * h + 16 * b + e;
                    *x = if j < n {
                        // SAFETY: key j < n, columns c0..c0 + cols ≤ dv.
                        sanitize(unsafe { row16(&call.v, j, c0, cols) }, j, c0, &mut bad)
                    } else {
                        _mm512_setzero_ps()
                    };
                }
                transpose16(rows);
            }
            let base = (h * dv_groups + g) * TILE_BYTES;
            for (cc, (a, b)) in block[0].iter().zip(&block[1]).enumerate() {
                // SAFETY: row cc of tile (h, g) lies inside the planes.
                unsafe { v.store(base + cc * 64, *a, *b) };
            }
        }
    }
    let (v_hi, v_lo) = v.finish();
    Ok(Data {
        key_tiles,
        d_chunks,
        dv_groups,
        k_hi,
        k_lo,
        v_hi,
        v_lo,
        k_scale: Vec::new(),
        k_words: None,
        d_words: 0,
        word_level: 0.0,
        k_word_scale: Vec::new(),
        k_mean: Vec::new(),
        v_scale: Vec::new(),
        bad_v: BadValues::from_entries(bad, key_tiles),
    })
}

/// The bf16 planes of one packed operand: `hi`, and with pairs `lo` with whether some value
/// of it is nonzero (a plane of zeros is dropped: the inputs had no more than bf16's bits).
struct Bf16Planes {
    hi: Lines,
    lo: Option<(Lines, __m512i)>,
}

impl Bf16Planes {
    /// Planes of `bytes` each, `lo` only with `pairs`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn new(bytes: usize, pairs: bool) -> Result<Bf16Planes, CallError> {
        let lo = match pairs {
            true => Some((Lines::overwritten(bytes)?, _mm512_setzero_si512())),
            false => None,
        };
        Ok(Bf16Planes {
            hi: Lines::overwritten(bytes)?,
            lo,
        })
    }

    /// Stores the 32 values `a, b` as one 64-byte row at byte `at` of each plane: rounded to
    /// bf16 in `hi`, their rests in `lo`.
    ///
    /// # Safety
    /// 64 bytes at `at` lie inside the planes.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn store(&mut self, at: usize, a: __m512, b: __m512) {
        // SAFETY (both arms): by the caller.
        match &mut self.lo {
            Some((lo, any)) => {
                let (ah, al) = split_bf16(a);
                let (bh, bl) = split_bf16(b);
                let rest = join(al, bl);
                *any = _mm512_or_si512(*any, rest);
                unsafe {
                    _mm512_store_si512(self.hi.ptr_mut().add(at).cast(), join(ah, bh));
                    _mm512_store_si512(lo.ptr_mut().add(at).cast(), rest);
                }
            }
            None => unsafe {
                _mm512_store_si512(
                    self.hi.ptr_mut().add(at).cast(),
                    join(to_bf16(a), to_bf16(b)),
                );
            },
        }
    }

    /// `hi`, and `lo` where some rest is nonzero.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn finish(self) -> (Lines, Option<Lines>) {
        let lo = self
            .lo
            .and_then(|(lo, any)| (_mm512_test_epi32_mask(any, any) != 0).then_some(lo));
        (self.hi, lo)
    }
}

/// Zeros the K rows of the padding keys `n..key_tiles·64`, the only rows of K that the loops
/// over keys do not write.
fn zero_padding(k: &mut Lines, n: usize, key_tiles: usize, d_chunks: usize) {
    for j in n..key_tiles * KEY_TILE {
        for c in 0..d_chunks {
            let at = ((j / 16) * d_chunks + c) * TILE_BYTES + (j % 16) * 64;
            // SAFETY: row j % 16 of tile (j / 16, c) lies inside the buffer.
            unsafe { std::ptr::write_bytes(k.ptr_mut().add(at), 0, 64) };
        }
    }
}

/// `x` with its non-finite lanes set to 0, recorded as (key, column, value).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn sanitize(x: __m512, key: usize, c0: usize, bad: &mut Vec<(usize, usize, f32)>) -> __m512 {
    let k = non_finite(x);
    if k == 0 {
        return x;
    }
    // SAFETY: __m512 is 16 plain f32.
    let lanes: [f32; 16] = unsafe { std::mem::transmute(x) };
    for (l, v) in lanes.iter().enumerate() {
        if k >> l & 1 == 1 {
            bad.push((key, c0 + l, *v));
        }
    }
    _mm512_mask_mov_ps(x, k, _mm512_setzero_ps())
}

/// The largest magnitude of a 16-bit word for a head dimension of `d`: `d·level² < 2³¹`, so
/// a `vpdpwssd` sum over the whole dimension cannot overflow its i32 (32767 for d ≤ 2;
/// 5792 at d = 64, 4096 at 128).
pub(crate) fn word_level(d: usize) -> f32 {
    ((i32::MAX as f64) / d.max(1) as f64)
        .sqrt()
        .floor()
        .min(32767.0) as f32
}

/// Signed digits of `x·inv`: `hi = round(x·inv)`, `lo = round((x·inv − hi)·254)`, both in
/// `[−127, 127]`, as i32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) fn digits(x: __m512, inv: __m512) -> (__m512i, __m512i) {
    let y = _mm512_mul_ps(x, inv);
    let h = _mm512_roundscale_ps::<0x08>(y); // nearest even, no exceptions
    let l = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(_mm512_sub_ps(y, h), _mm512_set1_ps(254.0)));
    let clamp = |v: __m512| {
        _mm512_cvtps_epi32(_mm512_min_ps(
            _mm512_max_ps(v, _mm512_set1_ps(-127.0)),
            _mm512_set1_ps(127.0),
        ))
    };
    (clamp(h), clamp(l))
}

/// int8 K in the form one unit reads: two signed digits per element for the tile unit, one
/// 16-bit word for vectors; the other form's planes empty.
struct Keys {
    hi: Lines,
    lo: Option<Lines>,
    scale: Vec<f32>,
    words: Option<Lines>,
    word_scale: Vec<f32>,
}

/// Key `j`'s row minus the mean key μ in `row` (zeros past d); returns its largest magnitude.
///
/// # Safety
/// `j < n` of a checked call; `row` holds `d.div_ceil(16)` vectors, μ as many times 16 values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn smoothed_key(call: &Call<'_>, k_mean: &[f32], j: usize, row: &mut [__m512]) -> f32 {
    let d = call.k.cols;
    let mut amax = _mm512_setzero_ps();
    for (b, r) in row.iter_mut().enumerate() {
        // SAFETY: key j < n, columns 16b..16b + count ≤ d; μ has d16·16 entries.
        *r = unsafe {
            let x = row16(&call.k, j, 16 * b, (d - 16 * b).min(16));
            let mu = _mm512_maskz_loadu_ps(first(d - 16 * b), k_mean.as_ptr().add(16 * b));
            _mm512_sub_ps(x, mu)
        };
        amax = _mm512_max_ps(amax, _mm512_abs_ps(*r));
    }
    _mm512_reduce_max_ps(amax)
}

/// K for the tile unit: two signed digits per element in the tile layout, a scale per key.
///
/// # Safety
/// A checked call; `k_mean` and `finite` from [`pack_int8`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn key_digits(
    call: &Call<'_>,
    k_mean: &[f32],
    finite: &[bool],
    (key_tiles, d_chunks): (usize, usize),
) -> Result<Keys, CallError> {
    let (n, d16) = (call.n(), call.k.cols.div_ceil(16));
    let k_bytes = bytes(&[key_tiles, 4, d_chunks, TILE_BYTES])?;
    let mut k_hi = Lines::overwritten(k_bytes)?;
    let mut k_lo = Lines::overwritten(k_bytes)?;
    zero_padding(&mut k_hi, n, key_tiles, d_chunks);
    zero_padding(&mut k_lo, n, key_tiles, d_chunks);
    let mut k_scale = vec![0.0f32; bytes(&[key_tiles, KEY_TILE])?];
    let mut row = vec![_mm512_setzero_ps(); d16];
    for j in 0..n {
        if !finite[j] {
            // The scale carries the NaN; the digits are zero.
            k_scale[j] = f32::NAN;
            for c in 0..d_chunks {
                let at = ((j / 16) * d_chunks + c) * TILE_BYTES + (j % 16) * 64;
                // SAFETY: row j % 16 of tile (j / 16, c), which exists for j < n.
                unsafe {
                    std::ptr::write_bytes(k_hi.ptr_mut().add(at), 0, 64);
                    std::ptr::write_bytes(k_lo.ptr_mut().add(at), 0, 64);
                }
            }
            continue;
        }
        // SAFETY: j < n; `row` holds d16 vectors.
        let amax = unsafe { smoothed_key(call, k_mean, j, &mut row) };
        k_scale[j] = amax / 127.0;
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        for c in 0..d_chunks {
            let mut hi = [0u8; 64];
            let mut lo = [0u8; 64];
            for q in 0..4 {
                let b = 4 * c + q;
                if b < d16 {
                    let (h, l) = digits(row[b], inv);
                    // SAFETY: 16 bytes at 16q of 64-byte arrays.
                    unsafe {
                        _mm_storeu_si128(
                            hi.as_mut_ptr().add(16 * q).cast(),
                            _mm512_cvtepi32_epi8(h),
                        );
                        _mm_storeu_si128(
                            lo.as_mut_ptr().add(16 * q).cast(),
                            _mm512_cvtepi32_epi8(l),
                        );
                    }
                }
            }
            let at = ((j / 16) * d_chunks + c) * TILE_BYTES + (j % 16) * 64;
            // SAFETY: row j % 16 of tile (j/16, c), which exists for j < n.
            unsafe {
                std::ptr::copy_nonoverlapping(hi.as_ptr(), k_hi.ptr_mut().add(at), 64);
                std::ptr::copy_nonoverlapping(lo.as_ptr(), k_lo.ptr_mut().add(at), 64);
            }
        }
    }
    Ok(Keys {
        hi: k_hi,
        lo: Some(k_lo),
        scale: k_scale,
        words: None,
        word_scale: Vec::new(),
    })
}

/// K for vectors: 16-bit words in blocks of 16 keys by 64 dimensions (see
/// [`Data::k_words`]), a scale per key.
///
/// # Safety
/// A checked call; `k_mean` and `finite` from [`pack_int8`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn key_words(
    call: &Call<'_>,
    k_mean: &[f32],
    finite: &[bool],
    (key_tiles, d_chunks): (usize, usize),
) -> Result<Keys, CallError> {
    let (n, d) = (call.n(), call.k.cols);
    let padded = bytes(&[key_tiles, KEY_TILE])?;
    let level = word_level(d);
    // Zeros past d and n, and for keys with a NaN or ∞.
    let mut words = Lines::zeroed(bytes(&[padded, 64 * d_chunks, 2])?)?;
    let mut word_scale = vec![0.0f32; padded];
    let mut row = vec![_mm512_setzero_ps(); d.div_ceil(16)];
    for j in 0..n {
        if !finite[j] {
            word_scale[j] = f32::NAN;
            continue;
        }
        // SAFETY: j < n; `row` holds d.div_ceil(16) vectors.
        let amax = unsafe { smoothed_key(call, k_mean, j, &mut row) };
        word_scale[j] = amax / level;
        let inv = _mm512_set1_ps(if amax > 0.0 { level / amax } else { 0.0 });
        for (b, r) in row.iter().enumerate() {
            // Rounded to nearest even; |x·inv| ≤ level, so no clamp is needed.
            let w = _mm512_cvtps_epi32(_mm512_roundscale_ps::<0x08>(_mm512_mul_ps(*r, inv)));
            // SAFETY: words 16b..16b + 16 of key j lie inside its block of chunk b / 4
            // (d.div_ceil(16)·16 ≤ 64·d_chunks).
            unsafe {
                let block = ((j / 16) * d_chunks + b / 4) * 16 + j % 16;
                let at = words.ptr_mut().add(block * 128 + 32 * (b % 4));
                _mm256_storeu_si256(at.cast(), _mm512_cvtepi32_epi16(w));
            }
        }
    }
    Ok(Keys {
        hi: Lines::overwritten(0)?,
        lo: None,
        scale: Vec::new(),
        words: Some(words),
        word_scale,
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pack_int8(call: &Call<'_>, unit: Unit) -> Result<Data, CallError> {
    let (n, d, dv) = (call.n(), call.q.cols, call.v.cols);
    let key_tiles = n.div_ceil(KEY_TILE);
    let d_chunks = d.div_ceil(64);
    let dv_groups = dv.div_ceil(16);
    let v_bytes = bytes(&[key_tiles, dv_groups, TILE_BYTES])?;
    let d16 = d.div_ceil(16);

    // μ: the mean of the finite keys, accumulated in f64 (two 8-lane halves per 16 columns).
    let mut sum = vec![_mm512_setzero_pd(); 2 * d16];
    let mut finite = vec![true; n];
    let mut count = 0usize;
    let mut row = vec![_mm512_setzero_ps(); d16];
    for (j, finite) in finite.iter_mut().enumerate() {
        let mut bad = 0;
        for (b, r) in row.iter_mut().enumerate() {
            // SAFETY: key j < n, columns 16b..16b + count ≤ d.
            *r = unsafe { row16(&call.k, j, 16 * b, (d - 16 * b).min(16)) };
            bad |= non_finite(*r);
        }
        *finite = bad == 0;
        if *finite {
            count += 1;
            for (r, s) in row.iter().zip(sum.chunks_exact_mut(2)) {
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(*r));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(*r),
                )));
                s[0] = _mm512_add_pd(s[0], lo);
                s[1] = _mm512_add_pd(s[1], hi);
            }
        }
    }
    let sum: Vec<f64> = sum
        .iter()
        // SAFETY: __m512d is 8 plain f64.
        .flat_map(|v| unsafe { std::mem::transmute::<__m512d, [f64; 8]>(*v) })
        .collect();
    let k_mean: Vec<f32> = sum
        .iter()
        .map(|s| {
            if count > 0 {
                (s / count as f64) as f32
            } else {
                0.0
            }
        })
        .collect();

    let keys = match unit {
        Unit::Tiles => key_digits(call, &k_mean, &finite, (key_tiles, d_chunks))?,
        Unit::Vectors => key_words(call, &k_mean, &finite, (key_tiles, d_chunks))?,
    };

    // Every row of every Vᵀ tile is written below (zeros past n).
    let mut v_hi = Lines::overwritten(v_bytes)?;
    let mut v_lo = Lines::overwritten(if INT8_V_DIGITS == 2 { v_bytes } else { 0 })?;
    let mut v_scale = vec![0.0f32; bytes(&[key_tiles, dv_groups, 16])?];
    let mut bad = Vec::new();
    let mut tile = vec![_mm512_setzero_ps(); KEY_TILE];
    for t in 0..key_tiles {
        let keys = (n - t * KEY_TILE).min(KEY_TILE);
        for g in 0..dv_groups {
            let (c0, cols) = (16 * g, (dv - 16 * g).min(16));
            let mut amax = _mm512_setzero_ps();
            for (e, x) in tile.iter_mut().enumerate() {
                *x = if e < keys {
                    let j = t * KEY_TILE + e;
                    // SAFETY: key j < n, columns c0..c0 + cols ≤ dv.
                    sanitize(unsafe { row16(&call.v, j, c0, cols) }, j, c0, &mut bad)
                } else {
                    _mm512_setzero_ps()
                };
                amax = _mm512_max_ps(amax, _mm512_abs_ps(*x));
            }
            let scale = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
            let inv = _mm512_maskz_div_ps(
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(amax, _mm512_setzero_ps()),
                _mm512_set1_ps(127.0),
                amax,
            );
            // SAFETY: 16 scales of (t, g) lie inside v_scale.
            unsafe { _mm512_storeu_ps(v_scale.as_mut_ptr().add((t * dv_groups + g) * 16), scale) };
            let base = (t * dv_groups + g) * TILE_BYTES;
            for b in 0..4 {
                let mut hi = [_mm512_setzero_ps(); 16];
                let mut lo = [_mm512_setzero_ps(); 16];
                for e in 0..16 {
                    let (dh, dl) = digits(tile[16 * b + e], inv);
                    hi[e] = _mm512_castsi512_ps(dh);
                    lo[e] = _mm512_castsi512_ps(dl);
                }
                transpose16(&mut hi);
                transpose16(&mut lo);
                for cc in 0..16 {
                    let at = base + cc * 64 + 16 * b;
                    // SAFETY: 16 bytes of row cc of tile (t, g).
                    unsafe {
                        let h = _mm512_cvtepi32_epi8(_mm512_castps_si512(hi[cc]));
                        _mm_store_si128(v_hi.ptr_mut().add(at).cast(), h);
                        if INT8_V_DIGITS == 2 {
                            let l = _mm512_cvtepi32_epi8(_mm512_castps_si512(lo[cc]));
                            _mm_store_si128(v_lo.ptr_mut().add(at).cast(), l);
                        }
                    }
                }
            }
        }
    }
    Ok(Data {
        key_tiles,
        d_chunks,
        dv_groups,
        k_hi: keys.hi,
        k_lo: keys.lo,
        v_hi,
        v_lo: (INT8_V_DIGITS == 2).then_some(v_lo),
        k_scale: keys.scale,
        k_mean,
        k_words: keys.words,
        d_words: 64 * d_chunks,
        word_level: word_level(d),
        k_word_scale: keys.word_scale,
        v_scale,
        bad_v: BadValues::from_entries(bad, key_tiles),
    })
}
