//! Element masks of partial tiles, sixteen positions per compare.
//!
//! A [`KeyMask`] tree is compiled once per call into a postfix program of leaves and `And`/`Or`
//! steps. Every leaf keeps, for one fixed coordinate on one axis, an interval of the other axis
//! (and for `Dilated` one residue class): `Causal` keeps `i' ≥ j`, `Window(w)` keeps
//! `|i' − j| ≤ w`, and so on. A leaf's interval is computed once per fixed coordinate in
//! saturating 64-bit integers, moved to lane-relative coordinates (clamped to the lanes, which
//! keeps every comparison exact) and compared with the lane indices by AVX-512 integer compares
//! into one `__mmask16` per 16 lanes; `And`/`Or` combine whole mask buffers.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::problem::{Blocks, Call, KeyMask, Segments};

/// Lanes of one vector.
const LANES: usize = 16;

/// Vectors of lanes one evaluation covers at most (64 positions on the lane axis).
pub(super) const VECTORS: usize = 4;

/// A leaf of the mask tree, parameters saturated to `i64`.
#[derive(Clone, Copy, Debug)]
enum Leaf {
    Causal,
    Window(i64),
    Dilated {
        reach: i64,
        stride: i64,
    },
    Global(i64),
    Block(i64),
    /// Equal segment ids ([`MaskProgram::segments`]).
    Document,
    /// A selected block ([`MaskProgram::blocks`]).
    TopkBlocks,
}

/// One step of the postfix program.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Push the leaf's mask; a `Dilated` leaf names its residue table.
    Leaf(Leaf, Option<usize>),
    And,
    Or,
}

/// Which axis lies in the lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LaneAxis {
    /// Lanes are query rows (`i'`); one mask per key.
    Rows,
    /// Lanes are keys (`j`); one mask per query row.
    Keys,
}

/// Positions `lo ≤ x ≤ hi` on the lane axis, and `x ≡ residue (mod stride)` when `stride > 0`.
#[derive(Clone, Copy, Debug)]
struct Kept {
    lo: i64,
    hi: i64,
    stride: i64,
    residue: i64,
}

impl Kept {
    const ALL: Kept = Kept {
        lo: i64::MIN,
        hi: i64::MAX,
        stride: 0,
        residue: 0,
    };

    fn interval(lo: i64, hi: i64) -> Kept {
        Kept {
            lo,
            hi,
            stride: 0,
            residue: 0,
        }
    }
}

fn saturate(x: u64) -> i64 {
    x.min(i64::MAX as u64) as i64
}

impl Leaf {
    fn of(mask: &KeyMask) -> Option<Leaf> {
        Some(match mask {
            KeyMask::Causal => Leaf::Causal,
            KeyMask::Window(w) => Leaf::Window(saturate(*w)),
            KeyMask::Dilated { w, r } => {
                let stride = saturate((*r).max(1));
                Leaf::Dilated {
                    reach: saturate(*w).saturating_mul(stride),
                    stride,
                }
            }
            KeyMask::Global(g) => Leaf::Global(saturate(*g)),
            KeyMask::Block(b) => Leaf::Block(saturate((*b).max(1))),
            KeyMask::Document => Leaf::Document,
            KeyMask::TopkBlocks => Leaf::TopkBlocks,
            KeyMask::And(..) | KeyMask::Or(..) => return None,
        })
    }

    /// The kept positions on the lane axis when the other axis is at `at`.
    fn kept(self, axis: LaneAxis, at: i64) -> Kept {
        match self {
            Leaf::Causal => match axis {
                // j ≤ i'
                LaneAxis::Rows => Kept::interval(at, i64::MAX),
                LaneAxis::Keys => Kept::interval(i64::MIN, at),
            },
            // |i' − j| ≤ w
            Leaf::Window(w) => Kept::interval(at.saturating_sub(w), at.saturating_add(w)),
            // |i' − j| ≤ w·r and i' ≡ j (mod r)
            Leaf::Dilated { reach, stride } => Kept {
                lo: at.saturating_sub(reach),
                hi: at.saturating_add(reach),
                stride,
                residue: at.rem_euclid(stride),
            },
            // i' < g or j < g: symmetric in the two axes
            Leaf::Global(g) => {
                if at < g {
                    Kept::ALL
                } else {
                    Kept::interval(i64::MIN, g - 1)
                }
            }
            // ⌊i'/b⌋ = ⌊j/b⌋
            Leaf::Block(b) => {
                let start = at.div_euclid(b) * b;
                Kept::interval(start, start.saturating_add(b - 1))
            }
            // Evaluated from the ids by `fill_document`; as an interval, it may keep anything.
            Leaf::Document | Leaf::TopkBlocks => Kept::ALL,
        }
    }
}

/// A compiled [`KeyMask`].
#[derive(Clone, Debug)]
pub(super) struct MaskProgram<'a> {
    steps: Vec<Step>,
    /// Per `Dilated` leaf, `x mod stride` of lane indices `0..64` (the lane-relative residues).
    residues: Vec<[i32; LANES * VECTORS]>,
    /// Mask buffers the program needs at once.
    depth: usize,
    /// The ids a `Document` leaf compares (none: it keeps everything).
    segments: Option<Segments<'a>>,
    /// The block selection a `TopkBlocks` leaf reads (none: it keeps everything).
    blocks: Option<Blocks<'a>>,
    /// `n − m`: aligned row `i'` is query row `i' − align`.
    align: i64,
}

impl<'a> MaskProgram<'a> {
    /// The program of `call`'s mask, reading its segment ids.
    pub(super) fn for_call(mask: &KeyMask, call: &Call<'a>) -> MaskProgram<'a> {
        let mut program = MaskProgram::compile(mask);
        program.segments = call.segments;
        program.blocks = call.blocks;
        program.align = call.n() as i64 - call.m() as i64;
        program
    }

    /// Compiles `mask` without recursion (a deep tree cannot overflow the stack here),
    /// evaluating the child that needs more buffers first so a chain of `And`s needs two.
    pub(super) fn compile(mask: &KeyMask) -> MaskProgram<'a> {
        // Flatten breadth-first: children always come after their parent.
        let mut nodes = vec![mask];
        let mut children = vec![None];
        let mut i = 0;
        while i < nodes.len() {
            if let KeyMask::And(a, b) | KeyMask::Or(a, b) = nodes[i] {
                children[i] = Some([nodes.len(), nodes.len() + 1]);
                nodes.extend([&**a, &**b]);
                children.extend([None, None]);
            }
            i += 1;
        }
        // Buffers each subtree needs (Sethi–Ullman), bottom-up.
        let mut need = vec![1usize; nodes.len()];
        for i in (0..nodes.len()).rev() {
            if let Some([a, b]) = children[i] {
                need[i] = if need[a] == need[b] {
                    need[a] + 1
                } else {
                    need[a].max(need[b])
                };
            }
        }
        let mut steps = Vec::new();
        let mut residues = Vec::new();
        let mut pending = vec![(0usize, false)];
        while let Some((i, expanded)) = pending.pop() {
            match (children[i], expanded) {
                (Some([a, b]), false) => {
                    // And and Or commute: the bigger child runs first.
                    let (first, second) = if need[a] >= need[b] { (a, b) } else { (b, a) };
                    pending.extend([(i, true), (second, false), (first, false)]);
                }
                (Some(_), true) => steps.push(match nodes[i] {
                    KeyMask::And(..) => Step::And,
                    _ => Step::Or,
                }),
                (None, _) => {
                    let leaf = Leaf::of(nodes[i]).expect("invariant: only And/Or have children");
                    let table = match leaf {
                        Leaf::Dilated { stride, .. } => {
                            let mut lanes = [0i32; LANES * VECTORS];
                            for (x, r) in lanes.iter_mut().enumerate() {
                                *r = (x as i64 % stride) as i32;
                            }
                            residues.push(lanes);
                            Some(residues.len() - 1)
                        }
                        _ => None,
                    };
                    steps.push(Step::Leaf(leaf, table));
                }
            }
        }
        MaskProgram {
            steps,
            residues,
            depth: need[0],
            segments: None,
            blocks: None,
            align: 0,
        }
    }

    /// Mask buffers of `len` masks each, enough for this program.
    pub(super) fn buffers(&self, len: usize) -> MaskBuffers {
        MaskBuffers {
            stack: vec![vec![0u16; len]; self.depth.max(1)],
        }
    }

    /// The masks of a block: for each fixed coordinate `at(f)`, `f < count`, and each of
    /// `vectors` lane vectors, the kept lanes among lane coordinates `base + 16·v + l`. Mask
    /// `(f, v)` lands at `f · VECTORS + v` of the returned slice.
    ///
    /// # Safety
    /// AVX-512 is present; `count · VECTORS` fits the buffers and `vectors ≤ VECTORS`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn eval<'b>(
        &self,
        buffers: &'b mut MaskBuffers,
        axis: LaneAxis,
        at: impl Fn(usize) -> i64,
        count: usize,
        base: i64,
        vectors: usize,
    ) -> &'b [u16] {
        let mut live = 0;
        for step in &self.steps {
            match *step {
                Step::Leaf(Leaf::Document, _) => {
                    let out = &mut buffers.stack[live];
                    match &self.segments {
                        Some(s) => {
                            let ids = Lanes::of(s, self.align, axis, base);
                            fill_document(out, s, self.align, &ids, axis, &at, count, vectors);
                        }
                        None => out[..count * VECTORS].fill(u16::MAX),
                    }
                    live += 1;
                }
                Step::Leaf(Leaf::TopkBlocks, _) => {
                    let out = &mut buffers.stack[live];
                    match &self.blocks {
                        Some(s) => fill_blocks(out, s, self.align, axis, &at, count, base),
                        None => out[..count * VECTORS].fill(u16::MAX),
                    }
                    live += 1;
                }
                Step::Leaf(leaf, table) => {
                    let residues = table.and_then(|t| self.residues.get(t));
                    fill(
                        &mut buffers.stack[live],
                        leaf,
                        residues,
                        axis,
                        &at,
                        count,
                        base,
                        vectors,
                    );
                    live += 1;
                }
                Step::And | Step::Or => {
                    let (lower, upper) = buffers.stack.split_at_mut(live - 1);
                    let (a, b) = (&mut lower[live - 2], &upper[0]);
                    let pairs = a[..count * VECTORS].iter_mut().zip(&b[..count * VECTORS]);
                    if matches!(step, Step::And) {
                        pairs.for_each(|(x, y)| *x &= *y);
                    } else {
                        pairs.for_each(|(x, y)| *x |= *y);
                    }
                    live -= 1;
                }
            }
        }
        &buffers.stack[0][..count * VECTORS]
    }
}

/// Scratch mask buffers of one call.
#[derive(Clone, Debug)]
pub(super) struct MaskBuffers {
    stack: Vec<Vec<u16>>,
}

/// The segment ids of the 64 lane positions `base + lane`, and which lanes have one.
struct Lanes {
    ids: [i32; LANES * VECTORS],
    valid: [u16; VECTORS],
}

impl Lanes {
    fn of(s: &Segments<'_>, align: i64, axis: LaneAxis, base: i64) -> Lanes {
        let mut lanes = Lanes {
            ids: [0; LANES * VECTORS],
            valid: [0; VECTORS],
        };
        for lane in 0..LANES * VECTORS {
            let x = base.saturating_add(lane as i64);
            if let Some(id) = id_at(s, align, axis, x) {
                lanes.ids[lane] = id;
                lanes.valid[lane / LANES] |= 1 << (lane % LANES);
            }
        }
        lanes
    }
}

impl LaneAxis {
    /// The axis of the fixed coordinate when the lanes lie on `self`.
    fn other(self) -> LaneAxis {
        match self {
            LaneAxis::Rows => LaneAxis::Keys,
            LaneAxis::Keys => LaneAxis::Rows,
        }
    }
}

/// The id at position `x` of axis `on`: an aligned row `i'` (query row `i' − align`) or a
/// key `j`.
fn id_at(s: &Segments<'_>, align: i64, on: LaneAxis, x: i64) -> Option<i32> {
    match on {
        LaneAxis::Rows => s.query(usize::try_from(x.checked_sub(align)?).ok()?),
        LaneAxis::Keys => s.keys.get(usize::try_from(x).ok()?).copied(),
    }
}

/// A `Document` leaf: per fixed coordinate `at(f)`, the lanes whose id equals its id.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
fn fill_document(
    out: &mut [u16],
    s: &Segments<'_>,
    align: i64,
    lanes: &Lanes,
    axis: LaneAxis,
    at: &impl Fn(usize) -> i64,
    count: usize,
    vectors: usize,
) {
    let mut ids = [_mm512_setzero_si512(); VECTORS];
    for (v, x) in ids.iter_mut().enumerate() {
        // SAFETY: the table holds 64 i32, v < 4.
        *x = unsafe { _mm512_loadu_si512(lanes.ids.as_ptr().add(v * LANES).cast()) };
    }
    for (f, out) in out.chunks_exact_mut(VECTORS).take(count).enumerate() {
        let id = id_at(s, align, axis.other(), at(f));
        for (v, o) in out.iter_mut().enumerate().take(vectors) {
            *o = match id {
                Some(id) => {
                    _mm512_mask_cmpeq_epi32_mask(lanes.valid[v], ids[v], _mm512_set1_epi32(id))
                }
                None => 0,
            };
        }
    }
}

/// A `TopkBlocks` leaf: per fixed coordinate `at(f)`, the lanes whose block pair is selected,
/// one interval of lanes per block that meets them (a block holds `b` consecutive positions).
fn fill_blocks(
    out: &mut [u16],
    s: &Blocks<'_>,
    align: i64,
    axis: LaneAxis,
    at: &impl Fn(usize) -> i64,
    count: usize,
    base: i64,
) {
    let lanes = (LANES * VECTORS) as i64;
    let b = i64::try_from(s.b.max(1)).unwrap_or(i64::MAX);
    // The lane axis in block coordinates: query rows `i = i' − align`, or keys.
    let shift = match axis {
        LaneAxis::Rows => align,
        LaneAxis::Keys => 0,
    };
    let first = base.saturating_sub(shift);
    let blocks = (first.max(0) / b)..=(first.saturating_add(lanes - 1).max(0) / b);
    for (f, out) in out.chunks_exact_mut(VECTORS).take(count).enumerate() {
        let fixed = match axis {
            LaneAxis::Rows => at(f),
            LaneAxis::Keys => at(f).saturating_sub(align),
        };
        let mut bits = 0u64;
        if fixed >= 0 {
            for block in blocks.clone() {
                let (row, col) = match axis {
                    LaneAxis::Rows => (block, fixed / b),
                    LaneAxis::Keys => (fixed / b, block),
                };
                let (Ok(row), Ok(col)) = (usize::try_from(row), usize::try_from(col)) else {
                    continue;
                };
                if row >= s.rows || col >= s.cols || !s.keep[row * s.cols + col] {
                    continue;
                }
                // Lanes of this block: positions block·b .. block·b + b − 1, relative to `first`.
                // In i128: a block of up to 2^63 positions, `first` down to −2^63.
                let start = i128::from(block) * i128::from(b) - i128::from(first);
                let lo = start.clamp(0, lanes.into()) as i64;
                let hi = (start + i128::from(b)).clamp(0, lanes.into()) as i64;
                if hi > lo {
                    let width = (hi - lo) as u32;
                    let ones = if width >= 64 {
                        u64::MAX
                    } else {
                        (1u64 << width) - 1
                    };
                    bits |= ones << lo;
                }
            }
        }
        for (v, o) in out.iter_mut().enumerate() {
            *o = (bits >> (v * LANES)) as u16;
        }
    }
}

/// `x − base` clamped to `[−1, 64]`: comparisons with lane indices `0..64` are unchanged.
fn relative(x: i64, base: i64) -> i32 {
    let lanes = (LANES * VECTORS) as i128;
    (x as i128 - base as i128).clamp(-1, lanes) as i32
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[allow(clippy::too_many_arguments)]
fn fill(
    out: &mut [u16],
    leaf: Leaf,
    residues: Option<&[i32; LANES * VECTORS]>,
    axis: LaneAxis,
    at: &impl Fn(usize) -> i64,
    count: usize,
    base: i64,
    vectors: usize,
) {
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let lane_index: [__m512i; VECTORS] = [
        iota,
        _mm512_add_epi32(iota, _mm512_set1_epi32(16)),
        _mm512_add_epi32(iota, _mm512_set1_epi32(32)),
        _mm512_add_epi32(iota, _mm512_set1_epi32(48)),
    ];
    let mut lane_residue = [_mm512_setzero_si512(); VECTORS];
    if let Some(table) = residues {
        for (v, r) in lane_residue.iter_mut().enumerate() {
            // SAFETY: the table holds 64 i32, v < 4.
            *r = unsafe { _mm512_loadu_si512(table.as_ptr().add(v * LANES).cast()) };
        }
    }
    for (f, out) in out.chunks_exact_mut(VECTORS).take(count).enumerate() {
        let kept = leaf.kept(axis, at(f));
        let lo = _mm512_set1_epi32(relative(kept.lo, base));
        let hi = _mm512_set1_epi32(relative(kept.hi, base));
        // x ≡ residue (mod stride) with x = base + index: index ≡ residue − base.
        let residue = if kept.stride > 0 {
            let r = (kept.residue as i128 - base as i128).rem_euclid(kept.stride as i128);
            _mm512_set1_epi32(if r < (LANES * VECTORS) as i128 {
                r as i32
            } else {
                -1
            })
        } else {
            _mm512_setzero_si512()
        };
        for ((o, &index), &lane_residue) in out
            .iter_mut()
            .zip(&lane_index)
            .zip(&lane_residue)
            .take(vectors)
        {
            let mut k = _mm512_cmpge_epi32_mask(index, lo);
            k = _mm512_mask_cmple_epi32_mask(k, index, hi);
            if kept.stride > 0 {
                k = _mm512_mask_cmpeq_epi32_mask(k, lane_residue, residue);
            }
            *o = k;
        }
    }
}

/// The band of a masked tile a product has to cover: of the first `count` vectors, those
/// `lo..hi` in which some lane keeps one of `items` (`masks[item·4 + v]`, one bit per lane),
/// and whether every lane of them keeps every one of those items. The forward's masks have
/// query rows in the lanes (items are keys), the backward's keys (items are query rows).
pub(super) fn kept_band(masks: &[u16], items: Range<usize>, count: usize) -> (Range<usize>, bool) {
    let mut any = [false; VECTORS];
    let mut full = [true; VECTORS];
    for item in items {
        for v in 0..count {
            let bits = masks[item * VECTORS + v];
            any[v] |= bits != 0;
            full[v] &= bits == u16::MAX;
        }
    }
    let lo = (0..count).find(|&v| any[v]).unwrap_or(count);
    let hi = (lo..count).rfind(|&v| any[v]).map_or(lo, |v| v + 1);
    (lo..hi, (lo..hi).all(|v| full[v]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Features;

    #[test]
    fn a_causal_diagonal_tile_keeps_the_row_vectors_at_and_below_each_key_group() {
        // keep[key·4 + r]: row 16r + l keeps key `key` when 16r + l ≥ key.
        let keep: Vec<u16> = (0..64)
            .flat_map(|key| {
                (0..VECTORS)
                    .map(move |r| (0..16).fold(0u16, |m, l| m | u16::from(16 * r + l >= key) << l))
            })
            .collect();
        assert_eq!(kept_band(&keep, 0..16, 4), (0..4, false));
        assert_eq!(kept_band(&keep, 16..32, 4), (1..4, false));
        assert_eq!(kept_band(&keep, 48..64, 4), (3..4, false));
        assert_eq!(kept_band(&keep, 48..64, 3), (3..3, true));
        // Row vectors past the diagonal block keep every key of the group.
        assert_eq!(kept_band(&keep, 0..1, 4), (0..4, true));
        assert_eq!(kept_band(&keep, 17..18, 4), (1..4, false));
    }

    #[test]
    fn a_band_in_the_middle_is_found() {
        let mut keep = vec![0u16; 8 * VECTORS];
        keep[2 * VECTORS + 1] = 0x00f0;
        keep[5 * VECTORS + 2] = u16::MAX;
        assert_eq!(kept_band(&keep, 0..8, 4), (1..3, false));
        assert_eq!(kept_band(&keep, 5..6, 4), (2..3, true));
        assert_eq!(kept_band(&keep, 6..8, 4), (4..4, true));
    }

    fn masks() -> Vec<KeyMask> {
        use KeyMask::*;
        let b = Box::new;
        vec![
            Causal,
            Window(5),
            Window(0),
            Dilated { w: 3, r: 4 },
            Dilated { w: 2, r: 0 },
            Dilated { w: u64::MAX, r: 3 },
            Global(7),
            Block(8),
            Block(u64::MAX),
            And(b(Causal), b(Window(9))),
            Or(b(And(b(Causal), b(Block(16)))), b(Global(3))),
            And(b(Or(b(Window(2)), b(Global(1)))), b(Dilated { w: 5, r: 2 })),
        ]
    }

    /// Every leaf and combination against `KeyMask::keeps`, on both lane axes, with lane
    /// bases below, inside and past the matrix (queries end-aligned, m ≠ n).
    #[test]
    fn programs_match_keeps() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let (m, n) = (70usize, 90usize);
        for mask in masks() {
            let program = MaskProgram::compile(&mask);
            // SAFETY: AVX-512 was detected.
            unsafe { assert_program_keeps(&program, &mask, m, n, None, None) };
        }
    }

    /// Document leaves (alone and combined) against `KeyMask::keeps_with`, on both lane axes,
    /// with unsorted ids, m ≠ n both ways and lane bases past either end.
    #[test]
    fn document_programs_compare_segment_ids() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let ids: Vec<i32> = (0..90).map(|x: i32| (x * 7919) % 13 / 3).collect();
        let b = Box::new;
        let masks = [
            KeyMask::Document,
            KeyMask::And(b(KeyMask::Causal), b(KeyMask::Document)),
            KeyMask::Or(b(KeyMask::Document), b(KeyMask::Window(2))),
        ];
        for (m, n) in [(70usize, 90usize), (90, 60), (1, 90)] {
            let seg = Segments {
                queries: &ids[..n],
                keys: &ids[..n],
                shift: n as i64 - m as i64,
            };
            let align = n as i64 - m as i64;
            for mask in &masks {
                let mut program = MaskProgram::compile(mask);
                program.segments = Some(seg);
                program.align = align;
                // SAFETY: AVX-512 was detected.
                unsafe { assert_program_keeps(&program, mask, m, n, Some(&seg), None) };
            }
        }
    }

    /// Block-selection leaves (alone and combined) against `KeyMask::keeps_with`, on both lane
    /// axes, with m ≠ n both ways, a block size that does not divide them and lane bases past
    /// either end.
    #[test]
    fn topk_programs_read_the_selection() {
        if !Features::detect().avx512 {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let bx = Box::new;
        let masks = [
            KeyMask::TopkBlocks,
            KeyMask::And(bx(KeyMask::Causal), bx(KeyMask::TopkBlocks)),
            KeyMask::Or(bx(KeyMask::TopkBlocks), bx(KeyMask::Block(16))),
        ];
        for (m, n, b) in [
            (70usize, 90usize, 7usize),
            (90, 60, 16),
            (1, 90, 3),
            (65, 65, 1),
            (20, 30, usize::MAX),
        ] {
            let (rows, cols) = (m.div_ceil(b), n.div_ceil(b));
            let keep: Vec<bool> = (0..rows * cols).map(|x| (x * 7919) % 5 < 2).collect();
            let blocks = Blocks {
                keep: &keep,
                rows,
                cols,
                b,
            };
            let align = n as i64 - m as i64;
            for mask in &masks {
                let mut program = MaskProgram::compile(mask);
                program.blocks = Some(blocks);
                program.align = align;
                // SAFETY: AVX-512 was detected.
                unsafe { assert_program_keeps(&program, mask, m, n, None, Some(&blocks)) };
            }
        }
    }

    /// `program` (compiled from `mask`, with its data set) against `KeyMask::keeps_with` on
    /// both lane axes, at lane bases before, inside and past an `m × n` score matrix.
    ///
    /// # Safety
    /// AVX-512 is present.
    unsafe fn assert_program_keeps(
        program: &MaskProgram<'_>,
        mask: &KeyMask,
        m: usize,
        n: usize,
        seg: Option<&Segments<'_>>,
        blocks: Option<&Blocks<'_>>,
    ) {
        let align = n as i64 - m as i64;
        let mut buffers = program.buffers(m.max(n).max(64) * VECTORS);
        for base in [-70i64, -3, 0, 17, 64] {
            // SAFETY: AVX-512 is present (the caller's contract); the buffers hold every
            // fixed position.
            let got = unsafe {
                program.eval(
                    &mut buffers,
                    LaneAxis::Keys,
                    |f| f as i64 + align,
                    m,
                    base,
                    4,
                )
            }
            .to_vec();
            for i in 0..m {
                for lane in 0..64 {
                    let j = base + lane as i64;
                    if j < 0 || j >= n as i64 {
                        continue;
                    }
                    let want = mask.keeps_with(i, j as usize, m, n, seg, blocks);
                    let bit = got[i * VECTORS + lane / 16] >> (lane % 16) & 1 == 1;
                    assert_eq!(bit, want, "{mask:?} keys {m}x{n} base {base} i {i} j {j}");
                }
            }
            // SAFETY: as above.
            let got =
                unsafe { program.eval(&mut buffers, LaneAxis::Rows, |f| f as i64, n, base, 4) }
                    .to_vec();
            for j in 0..n {
                for lane in 0..64 {
                    let i = base + lane as i64 - align;
                    if i < 0 || i >= m as i64 {
                        continue;
                    }
                    let want = mask.keeps_with(i as usize, j, m, n, seg, blocks);
                    let bit = got[j * VECTORS + lane / 16] >> (lane % 16) & 1 == 1;
                    assert_eq!(bit, want, "{mask:?} rows {m}x{n} base {base} i {i} j {j}");
                }
            }
        }
    }

    #[test]
    fn deep_trees_compile_without_recursion() {
        let mut mask = KeyMask::Causal;
        for _ in 0..100_000 {
            mask = KeyMask::And(Box::new(KeyMask::Window(3)), Box::new(mask));
        }
        let program = MaskProgram::compile(&mask);
        assert_eq!(program.steps.len(), 200_001);
        assert_eq!(program.depth, 2);
        // Dropping the tree recursively would overflow; leak-free iterative drop instead.
        let mut pending = vec![mask];
        while let Some(node) = pending.pop() {
            if let KeyMask::And(a, b) | KeyMask::Or(a, b) = node {
                pending.push(*a);
                pending.push(*b);
            }
        }
    }
}
