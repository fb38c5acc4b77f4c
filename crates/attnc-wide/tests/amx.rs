//! The AMX products against the f64 reference (`problem::reference`): measured error under
//! named bounds on odd shapes, every mask kind, score options and storage types; NaN
//! propagation; bit-identical results under any split of rows.

use attnc_wide::amx::{self, Products, KEY_TILE, QUERY_TILE};
use attnc_wide::problem::{
    reference, Bias, Call, CallError, Elements, KeyMask, Operand, Output, Score, TileTable,
};
use half::{bf16, f16};

/// bf16 products: torch's bf16 SDPA error on standard-normal data.
const BF16_BOUND: f64 = 3e-3;
/// int8 products.
const INT8_BOUND: f64 = 1e-2;

fn bound(p: Products) -> f64 {
    match p {
        Products::Bf16 => BF16_BOUND,
        Products::Int8 => INT8_BOUND,
    }
}

const BOTH: [Products; 2] = [Products::Bf16, Products::Int8];

fn skip() -> bool {
    let missing = BOTH.iter().any(|&p| !amx::available(p));
    if missing {
        eprintln!("skipped: no AMX bf16/int8 on this machine");
    }
    missing
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
        }
    }
}

/// Rows `rows` of `call`, run in pieces of `step` rows: (O, lse) of those rows.
fn run_rows(
    p: Products,
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
        };
        amx::run(p, call, packed, start..end, &mut out).expect("run");
        start = end;
    }
    (o, lse)
}

/// All rows of `call` in one run: (O, lse).
fn run_all(p: Products, call: &Call<'_>) -> (Vec<f32>, Vec<f32>) {
    let packed = amx::pack(p, call).expect("pack");
    run_rows(p, call, &packed, 0..call.m(), usize::MAX)
}

/// Relative L2 error of O (absolute when the reference is 0), and the largest lse difference
/// over rows that keep something (rows that keep nothing must match exactly).
fn errors(got: &(Vec<f32>, Vec<f32>), want: &(Vec<f32>, Vec<f32>)) -> (f64, f64) {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.0.iter().zip(&want.0) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let o = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
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

/// Runs `case` on both products against the reference; returns the errors (O, lse).
fn check_case(case: &Case) -> [(f64, f64); 2] {
    let inputs = Inputs::new(case);
    let call = inputs.call(case);
    let want = reference(&call);
    BOTH.map(|p| {
        let got = run_all(p, &call);
        assert!(
            got.0.iter().chain(&got.1).all(|x| !x.is_nan()),
            "{p:?} {case:?}: NaN"
        );
        let (o, lse) = errors(&got, &want);
        assert!(o <= bound(p), "{p:?} {case:?}: relative L2 error {o:.2e}");
        // The log-sum-exp errs like the scores do.
        assert!(lse <= 5.0 * bound(p), "{p:?} {case:?}: lse error {lse:.2e}");
        (o, lse)
    })
}

#[test]
fn error_on_standard_normal_inputs_at_d64() {
    if skip() {
        return;
    }
    let mut case = Case::new(96, 4096, 64, 64);
    case.seed = 7;
    let [b, i] = check_case(&case);
    eprintln!(
        "m=96 n=4096 d=64: bf16 error {:.2e} (lse {:.1e}), int8 {:.2e} (lse {:.1e})",
        b.0, b.1, i.0, i.1
    );
}
