//! The reduced-precision products (AMX tiles, and AVX-512 BF16 / VNNI vectors) against the f64
//! reference (`problem::reference`): measured error under named bounds on odd shapes, every
//! mask kind, score options and storage types; NaN propagation; bit-identical results under
//! any split of rows; the two units of each product within its bound of each other. Every test
//! runs each (products, unit) this CPU has.

use attnc_wide::amx::{self, Products, Unit, KEY_TILE, QUERY_TILE};
use attnc_wide::problem::{
    reference, Bias, Call, CallError, Elements, KeyMask, Operand, Output, Score, TileTable,
};
use half::{bf16, f16};

/// bf16 products on the tile unit (K and V as `hi + lo` pairs): torch's bf16 SDPA error on
/// standard-normal data (scores of unit spread).
const BF16_BOUND: f64 = 3e-3;
/// bf16 products on vectors, every operand rounded once (about 3.6e-3 on the same data).
const BF16_ROUNDED_BOUND: f64 = 4.5e-3;
/// int8 products on the same data.
const INT8_BOUND: f64 = 1e-2;

fn bound(kernel: Kernel) -> f64 {
    match kernel {
        (Products::Bf16, Unit::Tiles) => BF16_BOUND,
        (Products::Bf16, Unit::Vectors) => BF16_ROUNDED_BOUND,
        (Products::Int8, _) => INT8_BOUND,
    }
}

/// A kernel: its products on one unit.
type Kernel = (Products, Unit);

/// Every kernel this CPU runs.
fn kernels() -> Vec<Kernel> {
    let all = [
        (Products::Bf16, Unit::Tiles),
        (Products::Bf16, Unit::Vectors),
        (Products::Int8, Unit::Tiles),
        (Products::Int8, Unit::Vectors),
    ];
    all.into_iter()
        .filter(|&(p, u)| amx::runs_on(p, u))
        .collect()
}

fn skip() -> bool {
    let none = kernels().is_empty();
    if none {
        eprintln!("skipped: neither AMX nor AVX-512 BF16 or VNNI on this machine");
    }
    none
}

/// xorshift64* with Box–Muller normals.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn normals(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.normal()).collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Storage {
    F32,
    F16,
    Bf16,
}

/// An operand's storage in each type.
struct Data {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}

impl Data {
    fn new(x: Vec<f32>) -> Data {
        Data {
            f16: x.iter().map(|&v| f16::from_f32(v)).collect(),
            bf16: x.iter().map(|&v| bf16::from_f32(v)).collect(),
            f32: x,
        }
    }
    fn op(&self, s: Storage, rows: usize, cols: usize, row_stride: usize) -> Operand<'_> {
        Operand {
            data: match s {
                Storage::F32 => Elements::F32(&self.f32),
                Storage::F16 => Elements::F16(&self.f16),
                Storage::Bf16 => Elements::Bf16(&self.bf16),
            },
            rows,
            cols,
            row_stride,
        }
    }
}

/// One problem: shapes, mask, score options; operands drawn from `seed`.
#[derive(Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
    mask: Option<KeyMask>,
    scale: Option<f32>,
    bias: Option<(usize, usize)>,
    alibi: Option<f32>,
    softcap: Option<f32>,
    storage: Storage,
    seed: u64,
}

impl Case {
    fn new(m: usize, n: usize, d: usize, dv: usize) -> Case {
        Case {
            m,
            n,
            d,
            dv,
            mask: None,
            scale: None,
            bias: None,
            alibi: None,
            softcap: None,
            storage: Storage::F32,
            seed: 1,
        }
    }
    fn mask(mut self, mask: KeyMask) -> Case {
        self.mask = Some(mask);
        self
    }
}

struct Inputs {
    q: Data,
    k: Data,
    v: Data,
    bias: Vec<f32>,
    tiles: TileTable,
}

impl Inputs {
    fn new(c: &Case) -> Inputs {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ c.seed.wrapping_mul(0x1234_5678_9ABC_DEF1));
        // Q and K rows padded by 3 elements, V by 1: strides differ from widths.
        let q = rng.normals(c.m * (c.d + 3));
        let k = rng.normals(c.n * (c.d + 3));
        let v = rng.normals(c.n * (c.dv + 1));
        let bias = match c.bias {
            Some((rs, cs)) => rng.normals(c.m.max(1) * rs.max(1) + c.n.max(1) * cs.max(1)),
            None => Vec::new(),
        };
        let tiles = match &c.mask {
            Some(mask) => TileTable::enumerate(mask, c.m, c.n, QUERY_TILE, KEY_TILE),
            None => TileTable::dense(c.m, c.n, QUERY_TILE, KEY_TILE),
        };
        Inputs {
            q: Data::new(q),
            k: Data::new(k),
            v: Data::new(v),
            bias,
            tiles,
        }
    }

    fn call<'a>(&'a self, c: &'a Case) -> Call<'a> {
        let scale = c.scale.unwrap_or(1.0 / (c.d.max(1) as f32).sqrt());
        Call {
            q: self.q.op(c.storage, c.m, c.d, c.d + 3),
            k: self.k.op(c.storage, c.n, c.d, c.d + 3),
            v: self.v.op(c.storage, c.n, c.dv, c.dv + 1),
            score: Score {
                scale,
                bias: c.bias.map(|(row_stride, col_stride)| Bias {
                    data: &self.bias,
                    row_stride,
                    col_stride,
                }),
                alibi_slope: c.alibi,
                softcap: c.softcap,
            },
            mask: c.mask.as_ref(),
            tiles: &self.tiles,
            segments: None,
            blocks: None,
        }
    }
}

/// Rows `rows` of `call`, run in pieces of `step` rows: (O, lse) of those rows.
fn run_rows(
    (p, unit): Kernel,
    call: &Call<'_>,
    packed: &amx::Packed,
    rows: std::ops::Range<usize>,
    step: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dv = call.v.cols;
    let count = rows.end - rows.start;
    let mut o = vec![0.0f32; count * dv];
    let mut lse = vec![0.0f32; count];
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + step).min(rows.end);
        let (a, b) = (start - rows.start, end - rows.start);
        let mut out = Output {
            o: &mut o[a * dv..b * dv],
            row_stride: dv,
            lse: Some(&mut lse[a..b]),
            lse_from_origin: false,
        };
        amx::run_on(p, unit, call, packed, start..end, &mut out).expect("run");
        start = end;
    }
    (o, lse)
}

/// All rows of `call` in one run: (O, lse).
fn run_all(kernel: Kernel, call: &Call<'_>) -> (Vec<f32>, Vec<f32>) {
    let packed = amx::pack_on(kernel.0, kernel.1, call).expect("pack");
    run_rows(kernel, call, &packed, 0..call.m(), usize::MAX)
}

/// Relative L2 error of O (absolute when the reference is 0), and the largest lse difference
/// over rows that keep something (rows that keep nothing must match exactly).
fn errors(got: &(Vec<f32>, Vec<f32>), want: &(Vec<f32>, Vec<f32>)) -> (f64, f64) {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.0.iter().zip(&want.0) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let o = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    let mut lse = 0.0f64;
    for (a, b) in got.1.iter().zip(&want.1) {
        if b.is_finite() {
            lse = lse.max((*a as f64 - *b as f64).abs());
        } else {
            assert_eq!(a, b, "lse of a row that keeps nothing");
        }
    }
    (o, lse)
}

/// Q as each product rounds it (bf16; two signed digits per row for int8), K and V exact: the
/// f64 reference on these inputs is a model of the products' largest score error, which grows
/// with the spread of the scores (bias, softcap, large scales).
fn model_q(p: Products, q: &[f32], rows: usize, d: usize, stride: usize) -> Vec<f32> {
    let mut out = q.to_vec();
    for r in 0..rows {
        let row = &mut out[r * stride..r * stride + d];
        match p {
            Products::Bf16 => row
                .iter_mut()
                .for_each(|x| *x = bf16::from_f32(*x).to_f32()),
            Products::Int8 => {
                let amax = row.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                if amax > 0.0 {
                    let s = amax / 127.0;
                    for x in row.iter_mut() {
                        let y = *x / s;
                        let hi = y.round_ties_even();
                        let lo = ((y - hi) * 254.0).round_ties_even();
                        *x = s * (hi + lo / 254.0);
                    }
                }
            }
        }
    }
    out
}

/// The bounds for `case` on `kernel`: the named bound, or twice the error of the model
/// (QUALITY.md's oracle for reduced precision) where the scores spread wider.
fn bounds(kernel: Kernel, case: &Case, inputs: &Inputs, want: &(Vec<f32>, Vec<f32>)) -> (f64, f64) {
    // The values as stored (what the kernel reads), rounded as the products round them.
    let stored = |x: &Data| -> Vec<f32> {
        match case.storage {
            Storage::F32 => x.f32.clone(),
            Storage::F16 => x.f16.iter().map(|v| v.to_f32()).collect(),
            Storage::Bf16 => x.bf16.iter().map(|v| v.to_f32()).collect(),
        }
    };
    let q = model_q(kernel.0, &stored(&inputs.q), case.m, case.d, case.d + 3);
    // On vectors bf16 products round K and V once too.
    let kv = |x: &Data| -> Vec<f32> {
        match kernel {
            (Products::Bf16, Unit::Vectors) => stored(x)
                .into_iter()
                .map(|x| bf16::from_f32(x).to_f32())
                .collect(),
            _ => stored(x),
        }
    };
    let model = Inputs {
        q: Data::new(q),
        k: Data::new(kv(&inputs.k)),
        v: Data::new(kv(&inputs.v)),
        bias: inputs.bias.clone(),
        tiles: inputs.tiles.clone(),
    };
    let f32_case = Case {
        storage: Storage::F32,
        ..case.clone()
    };
    let (o, lse) = errors(&reference(&model.call(&f32_case)), want);
    (
        bound(kernel).max(2.0 * o),
        (5.0 * bound(kernel)).max(2.0 * lse),
    )
}

/// Runs `call` (of `case`) on `kernel`, checks it gives no NaN, and returns its errors against
/// `want` and their bounds, both as (O, lse).
fn measured(
    kernel: Kernel,
    case: &Case,
    inputs: &Inputs,
    call: &Call<'_>,
    want: &(Vec<f32>, Vec<f32>),
) -> ((f64, f64), (f64, f64)) {
    let got = run_all(kernel, call);
    assert!(
        got.0.iter().chain(&got.1).all(|x| !x.is_nan()),
        "{kernel:?} {case:?}: NaN"
    );
    (errors(&got, want), bounds(kernel, case, inputs, want))
}

/// Runs `case` on every kernel against the reference; prints and returns the errors (O, lse).
fn check_case(case: &Case) -> Vec<(Kernel, (f64, f64))> {
    let inputs = Inputs::new(case);
    let call = inputs.call(case);
    let want = reference(&call);
    let errors = kernels().into_iter().map(|kernel| {
        let ((o, lse), (o_bound, lse_bound)) = measured(kernel, case, &inputs, &call, &want);
        assert!(
            o <= o_bound,
            "{kernel:?} {case:?}: relative L2 error {o:.2e} > {o_bound:.2e}"
        );
        assert!(
            lse <= lse_bound,
            "{kernel:?} {case:?}: lse error {lse:.2e} > {lse_bound:.2e}"
        );
        (kernel, (o, lse))
    });
    let errors: Vec<_> = errors.collect();
    for (kernel, (o, lse)) in &errors {
        eprintln!(
            "{kernel:?} m={} n={} d={} dv={}: error {o:.2e} (lse {lse:.1e})",
            case.m, case.n, case.d, case.dv
        );
    }
    errors
}

#[test]
fn error_on_standard_normal_inputs_at_d64() {
    if skip() {
        return;
    }
    let mut case = Case::new(96, 4096, 64, 64);
    case.seed = 7;
    let inputs = Inputs::new(&case);
    let call = inputs.call(&case);
    let want = reference(&call);
    for kernel in kernels() {
        let e = errors(&run_all(kernel, &call), &want);
        // The named bounds themselves, no model: this is the benchmark's distribution.
        assert!(
            e.0 <= bound(kernel),
            "{kernel:?}: relative L2 error {:.2e}",
            e.0
        );
        eprintln!(
            "{kernel:?} m=96 n=4096 d=64: error {:.2e} (lse {:.1e})",
            e.0, e.1
        );
    }
}

/// Shapes that are not multiples of the tiles (and m ≠ n), head dimensions from 1 to 256.
#[test]
fn error_on_odd_shapes() {
    if skip() {
        return;
    }
    let shapes = [
        (1, 1, 1, 1),
        (3, 3, 3, 3),
        (113, 203, 40, 59),
        (203, 113, 111, 40),
        (64, 130, 128, 128),
        (33, 65, 256, 16),
        (2, 1023, 64, 111),
        (97, 64, 17, 8),
    ];
    for (seed, &(m, n, d, dv)) in shapes.iter().enumerate() {
        let mut case = Case::new(m, n, d, dv);
        case.seed = 100 + seed as u64;
        check_case(&case);
    }
}

/// Zero-sized dimensions: empty in, empty out; no keys or no head dimension gives zeros or the
/// mean of V; no value columns still gives the log-sum-exp.
#[test]
fn zero_sized_dimensions() {
    if skip() {
        return;
    }
    for (m, n, d, dv) in [
        (0, 5, 8, 8),
        (5, 0, 8, 8),
        (5, 7, 0, 8),
        (5, 7, 8, 0),
        (0, 0, 0, 0),
    ] {
        let case = Case::new(m, n, d, dv);
        let inputs = Inputs::new(&case);
        let call = inputs.call(&case);
        let want = reference(&call);
        for kernel in kernels() {
            let got = run_all(kernel, &call);
            let (o, _) = errors(&got, &want);
            assert!(o <= bound(kernel), "{kernel:?} {m}x{n}x{d}x{dv}: {o:.2e}");
            assert_eq!(got.1.len(), m);
        }
    }
}

/// Every mask kind, with tables from `TileTable::enumerate` (partial tiles masked element-wise,
/// tiles off the table never read), queries aligned to the end of the keys (m ≠ n).
#[test]
fn every_mask_kind() {
    if skip() {
        return;
    }
    let masks = [
        KeyMask::Causal,
        KeyMask::Window(37),
        KeyMask::Dilated { w: 9, r: 5 },
        KeyMask::Global(19),
        KeyMask::Block(48),
        KeyMask::And(Box::new(KeyMask::Causal), Box::new(KeyMask::Window(70))),
        KeyMask::Or(Box::new(KeyMask::Global(5)), Box::new(KeyMask::Window(3))),
    ];
    for (seed, mask) in masks.into_iter().enumerate() {
        for (m, n) in [(150, 230), (230, 150)] {
            let mut case = Case::new(m, n, 40, 24).mask(mask.clone());
            case.seed = 200 + seed as u64;
            check_case(&case);
        }
    }
}

/// Rows that keep no key (queries before the first key under a causal mask) give zeros and
/// a log-sum-exp of −∞.
#[test]
fn rows_that_keep_nothing_give_zeros() {
    if skip() {
        return;
    }
    let case = Case::new(100, 40, 16, 8).mask(KeyMask::Causal);
    let inputs = Inputs::new(&case);
    let call = inputs.call(&case);
    for p in kernels() {
        let (o, lse) = run_all(p, &call);
        // i' = i + n − m < 0 for the first 60 rows.
        assert!(o[..60 * 8].iter().all(|&x| x == 0.0), "{p:?}");
        assert!(lse[..60].iter().all(|&x| x == f32::NEG_INFINITY), "{p:?}");
        assert!(lse[60..].iter().all(|x| x.is_finite()), "{p:?}");
    }
}

/// Bias (per row and key, per key, per row, strided), ALiBi, softcap, negative scale.
#[test]
fn score_options() {
    if skip() {
        return;
    }
    let options: [fn(&mut Case); 7] = [
        |c| c.bias = Some((c.n, 1)),
        |c| c.bias = Some((0, 1)),
        |c| c.bias = Some((1, 0)),
        |c| c.bias = Some((2 * c.n + 1, 2)),
        |c| c.alibi = Some(-0.05),
        |c| c.softcap = Some(2.5),
        |c| c.scale = Some(-0.3),
    ];
    for (seed, set) in options.iter().enumerate() {
        let mut case = Case::new(70, 150, 32, 20);
        case.seed = 300 + seed as u64;
        set(&mut case);
        check_case(&case);
        // The same under a mask (partial tiles evaluate the full form).
        let mut masked = case.clone().mask(KeyMask::And(
            Box::new(KeyMask::Causal),
            Box::new(KeyMask::Window(90)),
        ));
        masked.seed += 50;
        check_case(&masked);
    }
    // All options at once.
    let mut case = Case::new(64, 200, 24, 16).mask(KeyMask::Causal);
    case.bias = Some((200, 1));
    case.alibi = Some(0.02);
    case.softcap = Some(4.0);
    check_case(&case);
}

/// f16 and bf16 operands (widened on load; bf16 inputs need no `lo` parts).
#[test]
fn half_precision_inputs() {
    if skip() {
        return;
    }
    for (seed, storage) in [Storage::F16, Storage::Bf16].into_iter().enumerate() {
        let mut case = Case::new(80, 300, 64, 48).mask(KeyMask::Window(100));
        case.storage = storage;
        case.seed = 400 + seed as u64;
        check_case(&case);
    }
}

/// Any split of rows at query-tile boundaries (and ends inside a tile) gives bit-identical
/// results.
#[test]
fn splits_are_bit_identical() {
    if skip() {
        return;
    }
    let mut case = Case::new(200, 170, 48, 40).mask(KeyMask::Dilated { w: 30, r: 2 });
    case.bias = Some((170, 1));
    let inputs = Inputs::new(&case);
    let call = inputs.call(&case);
    for p in kernels() {
        let packed = amx::pack_on(p.0, p.1, &call).expect("pack");
        let whole = run_rows(p, &call, &packed, 0..200, usize::MAX);
        for step in [QUERY_TILE, 2 * QUERY_TILE, 3 * QUERY_TILE] {
            let split = run_rows(p, &call, &packed, 0..200, step);
            assert!(bitwise(&whole, &split), "{p:?}, pieces of {step}");
        }
        // A range that starts at a tile and ends inside one.
        let part = run_rows(p, &call, &packed, 64..117, 32);
        let dv = call.v.cols;
        assert!(
            bitwise(
                &part,
                &(
                    whole.0[64 * dv..117 * dv].to_vec(),
                    whole.1[64..117].to_vec()
                )
            ),
            "{p:?}, rows 64..117"
        );
        // Threads interleaved by query tile.
        let mut o = vec![0.0f32; 200 * dv];
        let mut lse = vec![0.0f32; 200];
        std::thread::scope(|s| {
            let pieces: Vec<_> = o
                .chunks_mut(QUERY_TILE * dv)
                .zip(lse.chunks_mut(QUERY_TILE))
                .enumerate()
                .collect();
            let (even, odd): (Vec<_>, Vec<_>) = pieces.into_iter().partition(|(t, _)| t % 2 == 0);
            for list in [even, odd] {
                let (call, packed) = (&call, &packed);
                s.spawn(move || {
                    for (t, (o, lse)) in list {
                        let rows = t * QUERY_TILE..((t + 1) * QUERY_TILE).min(200);
                        let mut out = Output {
                            o,
                            row_stride: dv,
                            lse: Some(lse),
                            lse_from_origin: false,
                        };
                        amx::run_on(p.0, p.1, call, packed, rows, &mut out).expect("run");
                    }
                });
            }
        });
        assert!(bitwise(&whole, &(o, lse)), "{p:?}, two threads");
    }
}

fn bitwise(a: &(Vec<f32>, Vec<f32>), b: &(Vec<f32>, Vec<f32>)) -> bool {
    let same = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits())
    };
    same(&a.0, &b.0) && same(&a.1, &b.1)
}

/// NaN in Q, K or V reaches exactly what the reference says: a NaN query row is NaN; a NaN key
/// makes the rows that keep it NaN and no other; a NaN value makes its column NaN in the rows
/// that keep its key; a NaN bias at a masked position changes nothing. Quantization must not
/// hide any of them.
#[test]
fn nan_propagates_as_in_the_reference() {
    if skip() {
        return;
    }
    let (m, n, d, dv) = (64, 96, 20, 12);
    let mask = KeyMask::Causal;
    let mut case = Case::new(m, n, d, dv).mask(mask.clone());
    case.bias = Some((n, 1));
    let mut inputs = Inputs::new(&case);
    let (qs, ks, vs) = (d + 3, d + 3, dv + 1);
    inputs.q.f32[5 * qs + 7] = f32::NAN; // query row 5
    inputs.k.f32[70 * ks + 2] = f32::NAN; // key 70: kept by rows i' ≥ 70, i.e. i ≥ 38
    inputs.v.f32[40 * vs + 3] = f32::NAN; // key 40, column 3: rows i ≥ 8
    inputs.bias[10 * n + 90] = f32::NAN; // row 10 (i' = 42) masks key 90
    let inputs = Inputs {
        q: Data::new(inputs.q.f32),
        k: Data::new(inputs.k.f32),
        v: Data::new(inputs.v.f32),
        ..inputs
    };
    let call = inputs.call(&case);
    let want = reference(&call);
    for p in kernels() {
        let got = run_all(p, &call);
        for i in 0..m {
            for c in 0..dv {
                let (g, w) = (got.0[i * dv + c], want.0[i * dv + c]);
                assert_eq!(
                    g.is_nan(),
                    w.is_nan(),
                    "{p:?} O[{i}][{c}] = {g}, reference {w}"
                );
            }
            assert_eq!(got.1[i].is_nan(), want.1[i].is_nan(), "{p:?} lse[{i}]");
        }
        assert!(
            want.0[5 * dv].is_nan() && want.0[38 * dv].is_nan() && want.0[20 * dv + 3].is_nan()
        );
        assert!(!want.0[10 * dv].is_nan() && !want.0[20 * dv].is_nan());
    }
}

/// Scores far from zero (the tile maximum still weighs 255 in int8, no overflow to 0) and
/// row maxima that move in the middle of a key tile (bf16 rescales the weights it already
/// wrote: this once gave errors of 100 %).
#[test]
fn large_scores_and_maxima_that_move_mid_tile() {
    if skip() {
        return;
    }
    // bf16 storage: Q is exact in bf16, so the score error stays small even at this scale.
    let mut case = Case::new(40, 130, 16, 8);
    case.scale = Some(40.0);
    case.storage = Storage::Bf16;
    check_case(&case);
    // Scores that grow along the keys: the maximum moves in almost every block.
    let mut rising = Case::new(150, 200, 16, 8).mask(KeyMask::Causal);
    rising.alibi = Some(0.7);
    rising.storage = Storage::Bf16;
    check_case(&rising);
}

/// `o` as an output of rows of 8 values, no log-sum-exp.
fn rows_of_8(o: &mut [f32]) -> Output<'_> {
    Output {
        o,
        row_stride: 8,
        lse: None,
        lse_from_origin: false,
    }
}

/// Calls that do not fit are refused before any kernel runs.
#[test]
fn misfit_calls_are_refused() {
    if skip() {
        return;
    }
    let case = Case::new(40, 50, 8, 8);
    let inputs = Inputs::new(&case);
    let call = inputs.call(&case);
    for (p, unit) in kernels() {
        let packed = amx::pack_on(p, unit, &call).expect("pack");
        assert_eq!((packed.products(), packed.unit()), (p, unit));
        let mut o = vec![0.0f32; 40 * 8];
        let mut out = rows_of_8(&mut o);
        // Packed for the other products, or for the same products on the other unit.
        for (other, other_unit) in kernels().into_iter().filter(|&k| k != (p, unit)) {
            assert!(matches!(
                amx::run_on(other, other_unit, &call, &packed, 0..40, &mut out),
                Err(CallError::Shape(_))
            ));
        }
        // Rows that do not start a query tile.
        assert!(amx::run_on(p, unit, &call, &packed, 5..40, &mut out).is_err());
        // A table at other tile sizes.
        let other = TileTable::dense(40, 50, 16, 16);
        let wrong = Call {
            tiles: &other,
            ..call
        };
        assert!(amx::run_on(p, unit, &wrong, &packed, 0..40, &mut out).is_err());
        // Packed operands of another shape.
        let small = Case::new(40, 20, 8, 8);
        let small_inputs = Inputs::new(&small);
        let small_call = small_inputs.call(&small);
        assert!(amx::run_on(p, unit, &small_call, &packed, 0..40, &mut out).is_err());
        // An output too short.
        let mut short = vec![0.0f32; 10];
        let mut out = rows_of_8(&mut short);
        assert!(amx::run_on(p, unit, &call, &packed, 0..40, &mut out).is_err());
    }
    // A unit this CPU lacks, or that has no such products, refuses too.
    for p in [Products::Bf16, Products::Int8] {
        for unit in [Unit::Tiles, Unit::Vectors] {
            if !amx::runs_on(p, unit) {
                let mut o = vec![0.0f32; 40 * 8];
                let mut out = rows_of_8(&mut o);
                if let Some(&(q, u)) = kernels().first() {
                    let packed = amx::pack_on(q, u, &call).expect("pack");
                    assert!(matches!(
                        amx::pack_on(p, unit, &call),
                        Err(CallError::Unsupported(_))
                    ));
                    let got = amx::run_on(p, unit, &call, &packed, 0..40, &mut out);
                    assert!(
                        matches!(got, Err(CallError::Unsupported(_))),
                        "{p:?} {unit:?}"
                    );
                }
            }
        }
    }
}

/// Each product's two units (AMX tiles; AVX-512 BF16 or VNNI vectors) agree within its bound
/// (where a CPU has both), and `run` picks the tile unit when it has one.
#[test]
fn units_agree_within_the_bound() {
    if skip() {
        return;
    }
    for products in [Products::Bf16, Products::Int8] {
        let units: Vec<Kernel> = kernels().into_iter().filter(|k| k.0 == products).collect();
        assert_eq!(amx::unit(products), units.first().map(|k| k.1));
        if units.len() < 2 {
            eprintln!("one {products:?} unit here: {units:?}");
            continue;
        }
        let mut case = Case::new(100, 300, 130, 40).mask(KeyMask::Causal);
        case.bias = Some((300, 1));
        let inputs = Inputs::new(&case);
        let call = inputs.call(&case);
        let tiles = run_all(units[0], &call);
        let vectors = run_all(units[1], &call);
        let (o, _) = errors(&vectors, &tiles);
        assert!(o <= bound(units[1]), "{products:?}: {o:.2e}");
    }
}

/// Key tiles off the table are never read: with a table that lists only key tile 0, the
/// result is attention over those keys even though the call has no mask, and NaN in the
/// other tiles' K and V changes nothing.
#[test]
fn tiles_off_the_table_are_never_read() {
    if skip() {
        return;
    }
    let (m, n) = (64, 192);
    let case = Case::new(m, n, 32, 16);
    let mut inputs = Inputs::new(&case);
    for j in KEY_TILE..n {
        inputs.k.f32[j * (32 + 3)] = f32::NAN;
        inputs.v.f32[j * (16 + 1)] = f32::NAN;
    }
    let inputs = Inputs {
        q: Data::new(inputs.q.f32),
        k: Data::new(inputs.k.f32),
        v: Data::new(inputs.v.f32),
        ..inputs
    };
    // i' = i + 128 ≥ 64: the global pattern keeps keys 0..64 only, i.e. key tile 0, in full.
    let first = KeyMask::Global(KEY_TILE as u64);
    let tiles = TileTable::enumerate(&first, m, n, QUERY_TILE, KEY_TILE);
    assert!((0..tiles.query_tiles()).all(|t| tiles.runs(t).len() == 1 && !tiles.runs(t)[0].partial));
    let mut call = inputs.call(&case);
    call.tiles = &tiles;
    call.mask = None;
    let want = reference(&Call {
        mask: Some(&first),
        ..call
    });
    for p in kernels() {
        let got = run_all(p, &call);
        let (o, _) = errors(&got, &want);
        assert!(o <= bound(p), "{p:?}: {o:.2e}");
    }
}

mod random {
    //! Random problems on every kernel this CPU runs: shapes from 0 and 1 up to a few tiles
    //! and across their boundaries, every mask kind, score options and storage types.

    use super::*;
    use proptest::prelude::*;

    fn mask() -> impl Strategy<Value = Option<KeyMask>> {
        prop_oneof![
            Just(None),
            Just(Some(KeyMask::Causal)),
            (1u64..90).prop_map(|w| Some(KeyMask::Window(w))),
            (1u64..70).prop_map(|b| Some(KeyMask::Block(b))),
            (1u64..40).prop_map(|g| Some(KeyMask::Global(g))),
            (1u64..20).prop_map(|w| Some(KeyMask::And(
                Box::new(KeyMask::Causal),
                Box::new(KeyMask::Window(4 * w))
            ))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn random_problems_hold_their_bounds(
            (m, n) in (0usize..140, 0usize..200),
            d in prop_oneof![Just(0usize), Just(1), 2usize..130],
            dv in prop_oneof![Just(0usize), Just(1), 2usize..70],
            mask in mask(),
            options in 0usize..4,
            storage in 0usize..3,
            seed in 0u64..1000,
        ) {
            if skip() {
                return Ok(());
            }
            let mut case = Case::new(m, n, d, dv);
            case.mask = mask;
            case.seed = seed;
            case.storage = [Storage::F32, Storage::F16, Storage::Bf16][storage];
            match options {
                1 => case.bias = Some((n, 1)),
                2 => case.softcap = Some(3.0),
                3 => case.alibi = Some(-0.03),
                _ => {}
            }
            check_in_the_values_scale(&case);
        }
    }

    /// [`check_case`], except that O's error may also reach the named bound times the values'
    /// scale. Quantizing P and V errs by a share of V's magnitude (about 1.5e-3 of it for
    /// int8, whatever the shape); an output that cancels to far below V's magnitude (a head
    /// dimension of 1, where every row's weights are nearly alike) makes that a large share of
    /// itself. The relative bound at the benchmark's shapes is `error_on_standard_normal_inputs_at_d64`'s.
    fn check_in_the_values_scale(case: &Case) {
        let inputs = Inputs::new(case);
        let call = inputs.call(case);
        let want = reference(&call);
        let values = &inputs.v.f32;
        let v_rms = (values.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>()
            / values.len().max(1) as f64)
            .sqrt();
        let o_norm = want
            .0
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale_norm = v_rms * (want.0.len() as f64).sqrt();
        for kernel in kernels() {
            let ((o, lse), (o_bound, lse_bound)) = measured(kernel, case, &inputs, &call, &want);
            // `o` is relative to O's norm where that is positive.
            let o_abs = if o_norm > 0.0 { o * o_norm } else { o };
            assert!(
                o <= o_bound || o_abs <= bound(kernel) * scale_norm,
                "{kernel:?} {case:?}: relative L2 error {o:.2e} > {o_bound:.2e}, and \
                 {o_abs:.2e} > {:.2e} of the values' scale",
                bound(kernel) * scale_norm
            );
            assert!(
                lse <= lse_bound,
                "{kernel:?} {case:?}: lse error {lse:.2e} > {lse_bound:.2e}"
            );
        }
    }
}
