//! Feature maps written as elementwise programs, evaluated on 16 f32 lanes a strip of a row
//! at a time: the maps of linear attention other than `elu(x) + 1` — Performer's
//! `exp(xω − |x|²/2 − max) / √m` is the common one — which the 128-bit portable code would
//! otherwise evaluate four lanes at a time.
//!
//! A [`Program`] is a list of [`Node`]s, each reading only earlier ones; the last is the
//! result. A node whose value is the same in every column of a row (a constant, a load with
//! column stride 0 such as a row's `|x|²` or a head's maximum, and anything computed from
//! those only) is computed once per row as one broadcast vector; every other node fills a
//! strip of at most [`STRIP`] columns in scratch that stays in L1, so each operation is a
//! tight loop over vectors and the program's dispatch costs nothing per element.
//!
//! The arithmetic is f32 with one rounding per operation; `exp` and `elu` are within 4 ulp, `sqrt` is
//! correctly rounded, and `maximum`/`minimum` follow IEEE 754-2019 (NaN if either operand is
//! NaN, `+0` above `−0`), as the reference interpreter does.

use crate::problem::CallError;

/// Columns per strip: eight nodes' strips take 8 KiB.
pub const STRIP: usize = 256;

/// Functions of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// `−x`
    Neg,
    /// `eˣ`
    Exp,
    /// `√x`
    Sqrt,
    /// `1 / √x`
    Rsqrt,
    /// `x` where `x ≥ 0` (and NaN), else 0
    Relu,
    /// `|x|`
    Abs,
    /// `x` where `x > 0`, else `eˣ − 1`
    Elu,
}

/// Functions of two operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`
    Add,
    /// `a − b`
    Sub,
    /// `a · b`
    Mul,
    /// `a / b`
    Div,
    /// IEEE 754-2019 `maximum`
    Max,
    /// IEEE 754-2019 `minimum`
    Min,
}

/// One value of a [`Program`]; operands are indices of earlier nodes.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// Column `c` of a row reads element `start + c · stride` of source `source`, where the
    /// row's `start` for this load is given by the caller (loads are numbered in node order).
    Load {
        /// Which of the caller's sources.
        source: usize,
        /// Elements between neighbouring columns (0: the same element for the whole row).
        stride: usize,
    },
    /// A constant.
    Const(f32),
    /// A function of one earlier node.
    Unary(Unary, usize),
    /// A function of two earlier nodes.
    Binary(Binary, usize, usize),
}

/// An elementwise program over the columns of a row.
#[derive(Clone, Debug)]
pub struct Program {
    nodes: Vec<Node>,
    /// Per node: whether its value is the same in every column.
    uniform: Vec<bool>,
    /// Per node: its load number (`Node::Load` only).
    load_of: Vec<usize>,
    /// Per node: its strip in the scratch (non-uniform nodes only).
    strip_of: Vec<usize>,
    strips: usize,
    loads: usize,
}

/// Scratch for [`Program::run_row`], reused across rows.
#[derive(Default)]
pub struct Scratch {
    strips: Vec<f32>,
    /// Per node: its value when it is the same in every column of the row.
    uniforms: Vec<f32>,
}

impl Program {
    /// The program of `nodes` (the last is the result). Errors when it is empty or a node
    /// reads itself or a later node.
    pub fn new(nodes: Vec<Node>) -> Result<Program, CallError> {
        if nodes.is_empty() {
            return Err(CallError::Shape("a feature program without nodes".into()));
        }
        let (mut uniform, mut load_of, mut strip_of) = (Vec::new(), Vec::new(), Vec::new());
        let (mut loads, mut strips) = (0, 0);
        for (at, node) in nodes.iter().enumerate() {
            let operand = |x: usize| -> Result<bool, CallError> {
                if x < at {
                    Ok(uniform[x])
                } else {
                    Err(CallError::Shape(format!(
                        "feature program node {at} reads node {x}, not an earlier one"
                    )))
                }
            };
            let same = match *node {
                Node::Load { stride, .. } => stride == 0,
                Node::Const(_) => true,
                Node::Unary(_, x) => operand(x)?,
                Node::Binary(_, a, b) => operand(a)? && operand(b)?,
            };
            load_of.push(loads);
            if let Node::Load { .. } = node {
                loads += 1;
            }
            strip_of.push(strips);
            if !same {
                strips += 1;
            }
            uniform.push(same);
        }
        Ok(Program {
            nodes,
            uniform,
            load_of,
            strip_of,
            strips,
            loads,
        })
    }

    /// How many loads the program has (the length of `starts` in [`Program::run_row`]).
    pub fn loads(&self) -> usize {
        self.loads
    }

    /// The nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Computes one row: `out[c]` for every column `c < out.len()`, load `l` reading
    /// `sources[source][starts[l] + c · stride]`. Errors, before anything is computed, when
    /// `starts` has the wrong length or a load would reach past its source.
    pub fn run_row(
        &self,
        sources: &[&[f32]],
        starts: &[usize],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), CallError> {
        self.check(sources, starts, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::Features::detect().avx512 {
            scratch.strips.resize(self.strips * STRIP, 0.0);
            scratch.uniforms.resize(self.nodes.len(), 0.0);
            // SAFETY: AVX-512 F/BW/DQ/VL were detected; `check` bounded every load of every
            // column; the scratch holds a strip per non-uniform node and a value per node.
            unsafe { wide::run_row(self, sources, starts, out, scratch) };
            return Ok(());
        }
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.scalar_column(sources, starts, c);
        }
        Ok(())
    }

    /// Every load of every column of a row of `columns` lies inside its source.
    fn check(&self, sources: &[&[f32]], starts: &[usize], columns: usize) -> Result<(), CallError> {
        if starts.len() != self.loads {
            return Err(CallError::Shape(format!(
                "a feature program of {} loads given {} row starts",
                self.loads,
                starts.len()
            )));
        }
        for (at, node) in self.nodes.iter().enumerate() {
            let Node::Load { source, stride } = *node else {
                continue;
            };
            let start = starts[self.load_of[at]];
            let len = sources.get(source).map(|s| s.len());
            let last = match columns {
                0 => Some(start),
                _ => (columns - 1)
                    .checked_mul(stride)
                    .and_then(|x| x.checked_add(start)),
            };
            match (len, last) {
                (Some(len), Some(last)) if columns == 0 || last < len => {}
                _ => {
                    return Err(CallError::Shape(format!(
                        "feature program load {} (source {source}, start {start}, stride \
                         {stride}) reaches past its source over {columns} columns",
                        self.load_of[at]
                    )))
                }
            }
        }
        Ok(())
    }

    /// Column `c` of a row, one f32 operation at a time (the path without AVX-512, and the
    /// tests' reference).
    pub fn scalar_column(&self, sources: &[&[f32]], starts: &[usize], c: usize) -> f32 {
        let mut values: Vec<f32> = Vec::with_capacity(self.nodes.len());
        for (at, node) in self.nodes.iter().enumerate() {
            let x = match *node {
                Node::Load { source, stride } => {
                    sources[source][starts[self.load_of[at]] + c * stride]
                }
                Node::Const(x) => x,
                Node::Unary(op, a) => scalar_unary(op, values[a]),
                Node::Binary(op, a, b) => scalar_binary(op, values[a], values[b]),
            };
            values.push(x);
        }
        values[values.len() - 1]
    }
}

fn scalar_unary(op: Unary, x: f32) -> f32 {
    match op {
        Unary::Neg => -x,
        Unary::Exp => f64::from(x).exp() as f32,
        Unary::Sqrt => x.sqrt(),
        Unary::Rsqrt => 1.0 / x.sqrt(),
        Unary::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        Unary::Abs => x.abs(),
        Unary::Elu => {
            if x > 0.0 {
                x
            } else {
                f64::from(x).exp_m1() as f32
            }
        }
    }
}

fn scalar_binary(op: Binary, a: f32, b: f32) -> f32 {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        Binary::Max | Binary::Min if a.is_nan() || b.is_nan() => f32::NAN,
        // Equal values (±0 included): the bits' AND is +0 unless both are −0, the OR −0
        // unless both are +0.
        Binary::Max if a == b => f32::from_bits(a.to_bits() & b.to_bits()),
        Binary::Min if a == b => f32::from_bits(a.to_bits() | b.to_bits()),
        Binary::Max => a.max(b),
        Binary::Min => a.min(b),
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{Binary, Node, Program, Scratch, Unary, STRIP};
    use crate::attention::first_lanes;
    use crate::features::{exp_lanes, expm1_lanes};
    use crate::ieee::{maximum, minimum};

    const LANES: usize = 16;

    /// Where a node's value is during a strip.
    #[derive(Clone, Copy)]
    enum Value {
        /// The same in every column.
        Uniform(__m512),
        /// A strip of the scratch (element offset).
        Strip(usize),
        /// A load's columns read in place (a source row with unit stride, from the strip's
        /// first column): copying them into a strip first cost as much as the arithmetic.
        Source(*const f32),
    }

    /// [`Program::run_row`] on AVX-512.
    ///
    /// # Safety
    /// AVX-512 F/BW/DQ/VL are present; every load of every column of `out` lies inside its
    /// source; `scratch` holds `STRIP` strip elements per non-uniform node and a uniform
    /// value per node.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn run_row(
        program: &Program,
        sources: &[&[f32]],
        starts: &[usize],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let uniforms = &mut scratch.uniforms;
        // Uniform nodes once per row (every lane of their vectors holds the one value).
        for (at, node) in program.nodes.iter().enumerate() {
            if !program.uniform[at] {
                continue;
            }
            let x = match *node {
                Node::Load { source, .. } => sources[source][starts[program.load_of[at]]],
                Node::Const(x) => x,
                Node::Unary(op, a) => _mm512_cvtss_f32(unary(op, _mm512_set1_ps(uniforms[a]))),
                Node::Binary(op, a, b) => _mm512_cvtss_f32(binary(
                    op,
                    _mm512_set1_ps(uniforms[a]),
                    _mm512_set1_ps(uniforms[b]),
                )),
            };
            uniforms[at] = x;
        }
        // A node's value in the strip from column `c0`.
        let value = |at: usize, c0: usize| match program.nodes[at] {
            _ if program.uniform[at] => Value::Uniform(_mm512_set1_ps(uniforms[at])),
            Node::Load { source, stride: 1 } => {
                let first = starts[program.load_of[at]] + c0;
                Value::Source(sources[source].as_ptr().wrapping_add(first))
            }
            _ => Value::Strip(program.strip_of[at] * STRIP),
        };
        let last = program.nodes.len() - 1;
        let base = scratch.strips.as_mut_ptr();
        let mut c0 = 0;
        while c0 < out.len() {
            let width = (out.len() - c0).min(STRIP);
            for (at, node) in program.nodes.iter().enumerate() {
                let Value::Strip(to) = value(at, c0) else {
                    continue;
                };
                let dst = base.wrapping_add(to);
                // SAFETY (all arms): the strip `to..to + STRIP` lies inside the scratch;
                // operand strips too; a load's columns c0..c0 + width are inside its source.
                unsafe {
                    match *node {
                        Node::Load { source, stride } => {
                            let first = starts[program.load_of[at]] + c0 * stride;
                            load(sources[source].as_ptr().add(first), stride, width, dst)
                        }
                        Node::Const(_) => {}
                        Node::Unary(op, a) => each1(value(a, c0), base, width, dst, op),
                        Node::Binary(op, a, b) => {
                            each2(value(a, c0), value(b, c0), base, width, dst, op)
                        }
                    }
                }
            }
            // SAFETY: out holds columns c0..c0 + width; the result's strip or vector is
            // readable.
            unsafe { store(value(last, c0), base, width, out.as_mut_ptr().add(c0)) };
            c0 += width;
        }
    }

    /// Reads `width` columns `stride` apart from `src` into the strip `dst` (unit-stride
    /// loads are read in place instead: [`Value::Source`]).
    ///
    /// # Safety
    /// As [`run_row`]: the columns lie inside the source, `dst` holds `STRIP` f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn load(src: *const f32, stride: usize, width: usize, dst: *mut f32) {
        for c in 0..width {
            // SAFETY: column c < width lies inside the source and the strip.
            unsafe { *dst.add(c) = *src.add(c * stride) };
        }
    }

    /// The 16 lanes from column `c` of a value (masked to `count` lanes).
    ///
    /// # Safety
    /// A strip value's columns `c..c + count` lie inside the scratch at `base`, a source
    /// value's inside its source.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn get(v: Value, base: *const f32, c: usize, count: usize) -> __m512 {
        match v {
            Value::Uniform(x) => x,
            // SAFETY: the caller's contract; masked lanes are not read.
            Value::Strip(at) => unsafe {
                _mm512_maskz_loadu_ps(first_lanes(count), base.add(at + c))
            },
            // SAFETY: the caller's contract: the load's columns up to the strip's width lie
            // inside its source; masked lanes are not read.
            Value::Source(at) => unsafe { _mm512_maskz_loadu_ps(first_lanes(count), at.add(c)) },
        }
    }

    /// `dst[c] = op(a[c])` over a strip of `width` columns.
    ///
    /// # Safety
    /// As [`get`] for `a`; `dst` holds `STRIP` f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn each1(a: Value, base: *const f32, width: usize, dst: *mut f32, op: Unary) {
        match op {
            Unary::Neg => unsafe { map1(a, base, width, dst, |x| unary(Unary::Neg, x)) },
            Unary::Exp => unsafe { map1(a, base, width, dst, |x| unary(Unary::Exp, x)) },
            Unary::Sqrt => unsafe { map1(a, base, width, dst, |x| unary(Unary::Sqrt, x)) },
            Unary::Rsqrt => unsafe { map1(a, base, width, dst, |x| unary(Unary::Rsqrt, x)) },
            Unary::Relu => unsafe { map1(a, base, width, dst, |x| unary(Unary::Relu, x)) },
            Unary::Abs => unsafe { map1(a, base, width, dst, |x| unary(Unary::Abs, x)) },
            Unary::Elu => unsafe { map1(a, base, width, dst, |x| unary(Unary::Elu, x)) },
        }
    }

    /// `dst[c] = op(a[c], b[c])` over a strip of `width` columns.
    ///
    /// # Safety
    /// As [`get`] for `a` and `b`; `dst` holds `STRIP` f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn each2(a: Value, b: Value, base: *const f32, width: usize, dst: *mut f32, op: Binary) {
        // One loop per operation, so the operation is chosen once per strip.
        macro_rules! with {
            ($op:expr) => {
                unsafe { map2(a, b, base, width, dst, |x, y| binary($op, x, y)) }
            };
        }
        match op {
            Binary::Add => with!(Binary::Add),
            Binary::Sub => with!(Binary::Sub),
            Binary::Mul => with!(Binary::Mul),
            Binary::Div => with!(Binary::Div),
            Binary::Max => with!(Binary::Max),
            Binary::Min => with!(Binary::Min),
        }
    }

    /// # Safety
    /// As [`each1`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn map1(
        a: Value,
        base: *const f32,
        width: usize,
        dst: *mut f32,
        f: impl Fn(__m512) -> __m512,
    ) {
        let mut c = 0;
        while c < width {
            let count = (width - c).min(LANES);
            // SAFETY: the caller's contract; masked lanes are neither read nor written.
            unsafe {
                let x = get(a, base, c, count);
                _mm512_mask_storeu_ps(dst.add(c), first_lanes(count), f(x));
            }
            c += LANES;
        }
    }

    /// # Safety
    /// As [`each2`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn map2(
        a: Value,
        b: Value,
        base: *const f32,
        width: usize,
        dst: *mut f32,
        f: impl Fn(__m512, __m512) -> __m512,
    ) {
        let mut c = 0;
        while c < width {
            let count = (width - c).min(LANES);
            // SAFETY: the caller's contract; masked lanes are neither read nor written.
            unsafe {
                let (x, y) = (get(a, base, c, count), get(b, base, c, count));
                _mm512_mask_storeu_ps(dst.add(c), first_lanes(count), f(x, y));
            }
            c += LANES;
        }
    }

    /// Writes `width` columns of the result into `out`.
    ///
    /// # Safety
    /// As [`get`]; `out` holds `width` f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn store(v: Value, base: *const f32, width: usize, out: *mut f32) {
        let mut c = 0;
        while c < width {
            let count = (width - c).min(LANES);
            // SAFETY: the caller's contract; masked lanes are neither read nor written.
            unsafe {
                _mm512_mask_storeu_ps(out.add(c), first_lanes(count), get(v, base, c, count))
            };
            c += LANES;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    fn unary(op: Unary, x: __m512) -> __m512 {
        let zero = _mm512_setzero_ps();
        match op {
            Unary::Neg => _mm512_xor_ps(x, _mm512_set1_ps(-0.0)),
            Unary::Exp => exp_lanes(x),
            Unary::Sqrt => _mm512_sqrt_ps(x),
            Unary::Rsqrt => _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_sqrt_ps(x)),
            Unary::Relu => {
                let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, zero);
                _mm512_mask_blend_ps(below, x, zero)
            }
            Unary::Abs => _mm512_andnot_ps(_mm512_set1_ps(-0.0), x),
            Unary::Elu => {
                let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
                _mm512_mask_mov_ps(expm1_lanes(x), positive, x)
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    fn binary(op: Binary, a: __m512, b: __m512) -> __m512 {
        match op {
            Binary::Add => _mm512_add_ps(a, b),
            Binary::Sub => _mm512_sub_ps(a, b),
            Binary::Mul => _mm512_mul_ps(a, b),
            Binary::Div => _mm512_div_ps(a, b),
            Binary::Max => maximum(a, b),
            Binary::Min => minimum(a, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load of source `source` with column stride `stride`.
    fn load(source: usize, stride: usize) -> Node {
        Node::Load { source, stride }
    }

    fn unary_ops() -> [Unary; 7] {
        [
            Unary::Neg,
            Unary::Exp,
            Unary::Sqrt,
            Unary::Rsqrt,
            Unary::Relu,
            Unary::Abs,
            Unary::Elu,
        ]
    }

    fn binary_ops() -> [Binary; 6] {
        [
            Binary::Add,
            Binary::Sub,
            Binary::Mul,
            Binary::Div,
            Binary::Max,
            Binary::Min,
        ]
    }

    /// Values every operation must get right: signed zeros, NaN, infinities, the exp range's
    /// edges, subnormals.
    fn specials() -> Vec<f32> {
        let mut x: Vec<f32> = (-400..400).map(|i| i as f32 / 3.7).collect();
        x.extend([
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            88.7,
            88.8,
            -87.3,
            -103.9,
            -104.5,
            1e-40,
            -1e-40,
            -1e-8,
            -0.3499,
            -0.3501,
            -20.0,
            f32::MAX,
            f32::MIN_POSITIVE,
        ]);
        x
    }

    /// Whether `got` is `want` up to `ulps` units in the last place (NaN matching NaN, equal
    /// bits for zeros and infinities).
    fn close(got: f32, want: f32, ulps: u32) -> bool {
        if want.is_nan() || got.is_nan() {
            return want.is_nan() && got.is_nan();
        }
        if want == 0.0 || want.is_infinite() || got.is_infinite() {
            return got.to_bits() == want.to_bits() || (want == 0.0 && got.abs() < 1e-44);
        }
        got.signum() == want.signum() && got.to_bits().abs_diff(want.to_bits()) <= ulps
    }

    #[test]
    fn every_operation_matches_its_scalar_form_on_special_values() {
        let x = specials();
        let n = x.len();
        // b: x reversed, so pairs meet every special against many values.
        let y: Vec<f32> = x.iter().rev().copied().collect();
        let mut scratch = Scratch::default();
        for op in unary_ops() {
            let program = Program::new(vec![load(0, 1), Node::Unary(op, 0)]).expect("a program");
            let mut out = vec![0.0f32; n];
            program
                .run_row(&[&x], &[0], &mut out, &mut scratch)
                .expect("in bounds");
            for (c, (&got, &xi)) in out.iter().zip(&x).enumerate() {
                let want = program.scalar_column(&[&x], &[0], c);
                let ulps = match op {
                    Unary::Exp | Unary::Elu => 4,
                    _ => 0,
                };
                assert!(
                    close(got, want, ulps),
                    "{op:?}({xi:e}): {got:e}, want {want:e}"
                );
            }
        }
        for op in binary_ops() {
            let program = Program::new(vec![load(0, 1), load(1, 1), Node::Binary(op, 0, 1)])
                .expect("a program");
            let mut out = vec![0.0f32; n];
            program
                .run_row(&[&x, &y], &[0, 0], &mut out, &mut scratch)
                .expect("in bounds");
            for (c, &got) in out.iter().enumerate() {
                let want = program.scalar_column(&[&x, &y], &[0, 0], c);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{op:?}({:e}, {:e})",
                    x[c],
                    y[c]
                );
            }
        }
    }

    #[test]
    fn signed_zeros_and_nan_follow_ieee_maximum_and_minimum() {
        assert_eq!(
            scalar_binary(Binary::Max, 0.0, -0.0).to_bits(),
            0.0f32.to_bits()
        );
        assert_eq!(
            scalar_binary(Binary::Max, -0.0, 0.0).to_bits(),
            0.0f32.to_bits()
        );
        assert_eq!(
            scalar_binary(Binary::Min, 0.0, -0.0).to_bits(),
            (-0.0f32).to_bits()
        );
        assert!(scalar_binary(Binary::Max, f32::NAN, 1.0).is_nan());
        assert!(scalar_binary(Binary::Min, 1.0, f32::NAN).is_nan());
    }

    /// Performer's map `exp(p − s/2 − max) · c`: a row of projections `p` (column stride 1),
    /// the row's `s` (stride 0) and the head's `max` (stride 0), over rows of 300 columns
    /// (a strip and a partial one), against the f64 form.
    #[test]
    fn performer_features_match_the_f64_map() {
        let program = Program::new(vec![
            load(0, 1),
            load(1, 0),
            Node::Const(0.5),
            Node::Binary(Binary::Mul, 1, 2),
            Node::Binary(Binary::Sub, 0, 3),
            load(2, 0),
            Node::Binary(Binary::Sub, 4, 5),
            Node::Unary(Unary::Exp, 6),
            Node::Const(0.0625),
            Node::Binary(Binary::Mul, 7, 8),
        ])
        .expect("a program");
        let (rows, cols) = (3, 300);
        let p: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let s = [1.5f32, 30.0, 0.25];
        let max = [7.0f32];
        let mut scratch = Scratch::default();
        for r in 0..rows {
            let mut out = vec![0.0f32; cols];
            program
                .run_row(&[&p, &s, &max], &[r * cols, r, 0], &mut out, &mut scratch)
                .expect("in bounds");
            for (c, &got) in out.iter().enumerate() {
                let x = f64::from(p[r * cols + c]);
                let want = (x - f64::from(s[r]) * 0.5 - 7.0).exp() * 0.0625;
                // The f32 argument (|x| < 30) carries about 2e-6 of absolute rounding, which
                // exp turns into relative error.
                assert!(
                    (f64::from(got) - want).abs() <= 4e-6 * want,
                    "row {r} column {c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn strided_loads_and_uniform_results_fill_every_column() {
        // A gathered load (stride 3) and a program whose result is uniform.
        let x: Vec<f32> = (0..60).map(|i| i as f32).collect();
        let gathered = Program::new(vec![load(0, 3)]).expect("a program");
        let mut out = vec![0.0f32; 20];
        let mut scratch = Scratch::default();
        gathered
            .run_row(&[&x], &[0], &mut out, &mut scratch)
            .expect("in bounds");
        assert_eq!(out, (0..20).map(|i| (3 * i) as f32).collect::<Vec<_>>());
        let constant =
            Program::new(vec![Node::Const(2.0), Node::Unary(Unary::Sqrt, 0)]).expect("a program");
        let mut out = vec![0.0f32; 17];
        constant
            .run_row(&[], &[], &mut out, &mut scratch)
            .expect("no loads");
        assert!(out.iter().all(|&v| v == 2.0f32.sqrt()));
    }

    #[test]
    fn unit_stride_loads_read_in_place() {
        // Read where they lie (not copied into a strip): a bare load as the result, one load
        // read twice, and a row ending at the source's last element over several strips.
        let x: Vec<f32> = (0..700).map(|i| i as f32 * 0.5).collect();
        let mut scratch = Scratch::default();
        let bare = Program::new(vec![load(0, 1)]).expect("a program");
        let mut out = vec![0.0f32; 333];
        bare.run_row(&[&x], &[367], &mut out, &mut scratch)
            .expect("in bounds");
        assert_eq!(out, x[367..].to_vec());
        let square =
            Program::new(vec![load(0, 1), Node::Binary(Binary::Mul, 0, 0)]).expect("a program");
        square
            .run_row(&[&x], &[367], &mut out, &mut scratch)
            .expect("in bounds");
        let want: Vec<f32> = x[367..].iter().map(|v| v * v).collect();
        assert_eq!(out, want);
        // Two sources, one in place and one gathered.
        let y: Vec<f32> = (0..999).map(|i| i as f32).collect();
        let mixed = Program::new(vec![
            load(0, 1),
            load(1, 3),
            Node::Binary(Binary::Sub, 0, 1),
        ])
        .expect("a program");
        mixed
            .run_row(&[&x, &y], &[367, 0], &mut out, &mut scratch)
            .expect("in bounds");
        let want: Vec<f32> = (0..333).map(|c| x[367 + c] - y[3 * c]).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn bad_programs_and_rows_are_refused() {
        assert!(Program::new(Vec::new()).is_err());
        assert!(Program::new(vec![Node::Unary(Unary::Exp, 0)]).is_err());
        let program = Program::new(vec![load(0, 2)]).expect("a program");
        let x = [1.0f32; 10];
        let mut scratch = Scratch::default();
        // Columns 0..5 at stride 2 from 1 reach element 9: inside; from 2, element 10: not.
        assert!(program
            .run_row(&[&x], &[1], &mut [0.0; 5], &mut scratch)
            .is_ok());
        assert!(program
            .run_row(&[&x], &[2], &mut [0.0; 5], &mut scratch)
            .is_err());
        assert!(program
            .run_row(&[&x], &[], &mut [0.0; 5], &mut scratch)
            .is_err());
        assert!(program
            .run_row(&[], &[0], &mut [0.0; 5], &mut scratch)
            .is_err());
        assert!(program
            .run_row(&[&x], &[usize::MAX], &mut [0.0; 2], &mut scratch)
            .is_err());
    }
}
