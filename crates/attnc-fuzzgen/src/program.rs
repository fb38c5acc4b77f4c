//! Random `.attn` programs: type-correct compositions of every op of the language, written as
//! source so a failure prints something a person can read and replay.
//!
//! An expression is generated for a target shape (a list of dimension symbols, `1` for a
//! literal size one): elementwise functions and arithmetic with NumPy broadcasting (operands
//! of fewer axes, size-one axes, reductions that keep their axis, numbers, dimension symbols
//! used as numbers), matrix products with transposed and broadcast operands, transposes,
//! softmax on any axis, `mask` with every pattern and fill, `relpos`, `ones`/`zeros`, `let`
//! bindings used twice, and the forms the optimizer fuses: scaled, biased, ALiBi, softcapped
//! and masked attention, linear attention, causal linear attention with and without its
//! normalizer. Parameters are f32, f16 or bf16; the return type is f32, f16 or bf16.
//! Dimensions are drawn per program from sizes that include 0, 1 and the tile edges
//! (4, 8, 32, 64 ± 1, 113).

use crate::rng::Rng;
use std::fmt::Write;

/// A dimension of a generated shape: a symbol, or `"1"`.
type D = &'static str;

/// The dimension symbols every program may use: batch (heads), query rows, keys, depth, value
/// width.
pub const SYMBOLS: [D; 5] = ["b", "m", "n", "d", "e"];

/// A generated program: its source and the values of its dimension symbols.
#[derive(Clone, Debug)]
pub struct Program {
    /// The `.attn` source of one kernel.
    pub source: String,
    /// Every symbol of [`SYMBOLS`] with its value.
    pub dims: Vec<(String, u64)>,
}

/// Sizes of rows and keys: 0, 1, small odd ones and the tile edges.
const LENGTHS: [u64; 17] = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 63, 64, 65, 113];
/// Sizes of the depth and value width.
const WIDTHS: [u64; 13] = [0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 40, 59];

/// Numbers written into programs (mostly harmless, some near the edges of f32).
const NUMBERS: [&str; 14] = [
    "0.5", "2", "-1.5", "3", "0.001", "-0.25", "1", "100", "0", "1e30", "1e-30", "0.1", "7", "-3",
];

/// Mask patterns (every kind, and combinations).
const PATTERNS: [&str; 14] = [
    "causal",
    "window(2)",
    "window(0)",
    "dilated(2, 3)",
    "dilated(1, 2)",
    "global(2)",
    "global(1)",
    "block(4)",
    "block(3)",
    "causal & window(3)",
    "block(8) | global(1)",
    "causal | window(1) & global(3)",
    "(causal | block(2)) & window(5)",
    "dilated(3, 2) | causal",
];

/// Fill values of `mask` (the default `-inf` is the form without a fill).
const FILLS: [&str; 8] = ["0", "7", "-1e9", "-1e30", "1e30", "-1 / 0", "1 / 0", "-2.5"];

/// Generates one program from `rng`.
pub fn generate(rng: &mut Rng) -> Program {
    let dims: Vec<(String, u64)> = SYMBOLS
        .iter()
        .map(|&s| {
            let value = match s {
                "b" => rng.pick(&[1, 1, 2, 3]),
                "m" | "n" => draw(rng, &LENGTHS),
                _ => draw(rng, &WIDTHS),
            };
            (s.to_string(), value)
        })
        .collect();
    let outputs: [&[D]; 9] = [
        &["b", "m", "e"],
        &["m", "e"],
        &["b", "m", "n"],
        &["m", "n"],
        &["b", "m", "1"],
        &["n"],
        &["m", "d"],
        &["b", "n", "e"],
        &["e"],
    ];
    let shape = outputs[rng.weighted(&[6, 5, 3, 3, 1, 1, 2, 2, 1])];
    let mut g = Gen {
        rng,
        dims: &dims,
        params: Vec::new(),
        lets: Vec::new(),
        budget: 24,
    };
    let depth = 2 + g.rng.below(3);
    let body = g.expr(shape, depth);
    if g.params.is_empty() {
        // A kernel takes at least one parameter.
        g.new_param(shape);
    }
    // Every symbol the body or the return type names must be bound by a parameter.
    let written = format!("{} {body} {}", g.lets.join(" "), shape.join(" "));
    for &symbol in &SYMBOLS {
        let bound = g.params.iter().any(|(_, _, s)| s.contains(&symbol));
        let named = written
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == symbol);
        if named && !bound {
            g.new_param(&[symbol]);
        }
    }
    let ret = g
        .rng
        .pick(&["f32", "f32", "f32", "f32", "f32", "f32", "f16", "bf16"]);
    let mut source = String::from("kernel f(");
    for (k, (name, dtype, s)) in g.params.iter().enumerate() {
        let sep = if k == 0 { "" } else { ", " };
        let _ = write!(source, "{sep}{name}: {dtype}[{}]", s.join(", "));
    }
    let _ = writeln!(source, ") -> {ret}[{}] {{", shape.join(", "));
    for line in &g.lets {
        let _ = writeln!(source, "    {line}");
    }
    let _ = writeln!(source, "    return {body};\n}}");
    Program { source, dims }
}

/// A size: mostly small, sometimes a tile edge, rarely 0.
fn draw(rng: &mut Rng, sizes: &[u64]) -> u64 {
    if rng.chance(0.04) {
        0
    } else {
        sizes[1 + rng.below(sizes.len() - 1)]
    }
}

struct Gen<'a> {
    rng: &'a mut Rng,
    dims: &'a [(String, u64)],
    /// (name, dtype, shape) of every parameter so far.
    params: Vec<(String, &'static str, Vec<D>)>,
    /// `let` statements, in order.
    lets: Vec<String>,
    /// Productions left before only leaves are generated.
    budget: usize,
}

impl Gen<'_> {
    fn value(&self, d: D) -> u64 {
        self.dims
            .iter()
            .find(|(s, _)| s == d)
            .map_or(1, |(_, v)| *v)
    }

    /// A parameter of exactly `shape`: an earlier one of that shape, or a new one.
    fn param(&mut self, shape: &[D]) -> String {
        let same: Vec<usize> = (0..self.params.len())
            .filter(|&k| self.params[k].2 == shape)
            .collect();
        if !same.is_empty() && self.rng.chance(0.35) {
            return self.params[self.rng.pick(&same)].0.clone();
        }
        self.new_param(shape)
    }

    fn new_param(&mut self, shape: &[D]) -> String {
        let name = format!("p{}", self.params.len());
        let dtype = ["f32", "f16", "bf16"][self.rng.weighted(&[14, 3, 3])];
        self.params.push((name.clone(), dtype, shape.to_vec()));
        name
    }

    /// A number, or a dimension symbol with a nonzero value used as one.
    fn number(&mut self) -> String {
        if self.rng.chance(0.2) {
            let symbols: Vec<D> = SYMBOLS
                .iter()
                .copied()
                .filter(|&s| self.value(s) > 0)
                .collect();
            if !symbols.is_empty() {
                return self.rng.pick(&symbols).to_string();
            }
        }
        self.rng.pick(&NUMBERS).to_string()
    }

    /// An expression of exactly `shape`.
    fn expr(&mut self, shape: &[D], depth: usize) -> String {
        if depth == 0 || self.budget == 0 {
            return self.leaf(shape);
        }
        self.budget -= 1;
        let rank = shape.len();
        let two = rank >= 2;
        // leaf, unary, binary, matmul, transpose, softmax, mask, attention, linear, shared let
        let weights = [
            2,
            4,
            5,
            if two { 3 } else { 0 },
            if two { 1 } else { 0 },
            2,
            if two { 2 } else { 0 },
            if two { 4 } else { 0 },
            if two { 2 } else { 0 },
            1,
        ];
        match self.rng.weighted(&weights) {
            0 => self.leaf(shape),
            1 => self.unary(shape, depth),
            2 => self.binary(shape, depth),
            3 => self.matmul(shape, depth),
            4 => {
                let mut swapped = shape.to_vec();
                swapped.swap(rank - 2, rank - 1);
                format!("({}).T", self.expr(&swapped, depth - 1))
            }
            5 => {
                let x = self.expr(shape, depth - 1);
                if self.rng.chance(0.5) {
                    format!("softmax({x})")
                } else {
                    format!("softmax({x}, {})", self.axis(rank))
                }
            }
            6 => self.mask(shape, depth),
            7 => self.attention(shape, depth),
            8 => self.linear(shape, depth),
            _ => {
                let x = self.expr(shape, depth - 1);
                let name = format!("t{}", self.lets.len());
                self.lets.push(format!("let {name} = {x};"));
                let f = self.rng.pick(&["tanh", "exp", "abs", "relu", "sigmoid"]);
                let op = self.rng.pick(&["+", "*", "-"]);
                format!("({name} {op} {f}({name}))")
            }
        }
    }

    /// A leaf of exactly `shape`: a parameter, `ones`/`zeros`, or `relpos` for rank 2.
    fn leaf(&mut self, shape: &[D]) -> String {
        match self.rng.weighted(&[12, 1, 1]) {
            1 => format!(
                "{}({})",
                self.rng.pick(&["ones", "zeros"]),
                shape.join(", ")
            ),
            2 if shape.len() == 2 => format!("relpos({}, {})", shape[0], shape[1]),
            _ => self.param(shape),
        }
    }

    /// An axis of a rank-`rank` value, written positive or negative.
    fn axis(&mut self, rank: usize) -> String {
        let a = self.rng.below(rank);
        if self.rng.chance(0.5) {
            format!("{}", a as i64 - rank as i64)
        } else {
            a.to_string()
        }
    }

    fn unary(&mut self, shape: &[D], depth: usize) -> String {
        let x = self.expr(shape, depth - 1);
        let f = self.rng.pick(&[
            "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "elu", "abs", "-",
        ]);
        if f == "-" {
            format!("(-{x})")
        } else {
            format!("{f}({x})")
        }
    }

    fn binary(&mut self, shape: &[D], depth: usize) -> String {
        let x = self.expr(shape, depth - 1);
        let y = self.broadcastable(shape, depth - 1);
        let (x, y) = if self.rng.chance(0.5) { (x, y) } else { (y, x) };
        match self.rng.weighted(&[4, 3, 4, 2, 1, 1]) {
            0 => format!("({x} + {y})"),
            1 => format!("({x} - {y})"),
            2 => format!("({x} * {y})"),
            3 => format!("({x} / {y})"),
            4 => format!("maximum({x}, {y})"),
            _ => format!("minimum({x}, {y})"),
        }
    }

    /// An expression whose shape broadcasts to `shape` (and is `shape` often).
    fn broadcastable(&mut self, shape: &[D], depth: usize) -> String {
        let rank = shape.len();
        match self.rng.weighted(&[10, 2, 2, 3, 3, 1]) {
            1 => {
                // Some axes of size one.
                let mut s = shape.to_vec();
                for d in &mut s {
                    if self.rng.chance(0.5) {
                        *d = "1";
                    }
                }
                self.expr(&s, depth)
            }
            2 if rank >= 2 => self.expr(&shape[1..], depth),
            3 if depth > 0 => {
                // A reduction keeps its axis with size one.
                let a = self.rng.below(rank);
                let mut s = shape.to_vec();
                if self.rng.chance(0.6) {
                    s[a] = self.rng.pick(&SYMBOLS);
                }
                let f = self.rng.pick(&["sum", "max", "mean"]);
                let x = self.expr(&s, depth - 1);
                let ax = if self.rng.chance(0.5) {
                    a.to_string()
                } else {
                    (a as i64 - rank as i64).to_string()
                };
                format!("{f}({x}, {ax})")
            }
            4 => self.number(),
            5 if rank >= 2 => format!(
                "relpos({}, {}) * {}",
                shape[rank - 2],
                shape[rank - 1],
                self.rng.pick(&["0.5", "-0.25", "1"])
            ),
            _ => self.expr(shape, depth),
        }
    }

    /// A shape's batch axes, sometimes dropped or of size one (they broadcast).
    fn batch_of(&mut self, shape: &[D]) -> Vec<D> {
        let batch = &shape[..shape.len() - 2];
        match self.rng.weighted(&[6, 1, 1]) {
            1 => Vec::new(),
            2 => batch.iter().map(|_| "1").collect(),
            _ => batch.to_vec(),
        }
    }

    fn matmul(&mut self, shape: &[D], depth: usize) -> String {
        let r = shape.len();
        let (rows, cols) = (shape[r - 2], shape[r - 1]);
        let inner = self.rng.pick(&["d", "e", "n", "m", "1"]);
        let left_batch = shape[..r - 2].to_vec();
        let right_batch = self.batch_of(shape);
        let (left_batch, right_batch) = if self.rng.chance(0.8) {
            (left_batch, right_batch)
        } else {
            (right_batch, left_batch)
        };
        let a = self.operand(&left_batch, (rows, inner), depth - 1);
        let b = self.operand(&right_batch, (inner, cols), depth - 1);
        format!("({a} @ {b})")
    }

    /// An operand of `batch ++ [rows, cols]`, sometimes written as a transposed value.
    fn operand(&mut self, batch: &[D], (rows, cols): (D, D), depth: usize) -> String {
        let mut s = batch.to_vec();
        if self.rng.chance(0.3) {
            s.extend([cols, rows]);
            format!("({}).T", self.expr(&s, depth))
        } else {
            s.extend([rows, cols]);
            self.expr(&s, depth)
        }
    }

    fn mask(&mut self, shape: &[D], depth: usize) -> String {
        let x = self.expr(shape, depth - 1);
        let p = self.rng.pick(&PATTERNS);
        if self.rng.chance(0.5) {
            format!("mask({x}, {p})")
        } else {
            format!("mask({x}, {p}, {})", self.rng.pick(&FILLS))
        }
    }

    /// `softmax(score(q @ k.T)) @ v` in one of the forms the optimizer fuses.
    fn attention(&mut self, shape: &[D], depth: usize) -> String {
        let r = shape.len();
        let (rows, cols) = (shape[r - 2], shape[r - 1]);
        let batch = shape[..r - 2].to_vec();
        let keys = self.rng.pick(&["n", "n", "m", "1"]);
        let width = self.rng.pick(&["d", "d", "e"]);
        let sub = depth.saturating_sub(2);
        let q = self.operand(&batch, (rows, width), sub);
        let kb = self.batch_of(shape);
        let k = {
            let mut s = kb.clone();
            s.extend([keys, width]);
            self.expr(&s, sub)
        };
        let vb = if self.rng.chance(0.7) {
            kb
        } else {
            self.batch_of(shape)
        };
        let v = {
            let mut s = vb;
            s.extend([keys, cols]);
            self.expr(&s, sub)
        };
        let s0 = format!("{q} @ ({k}).T");
        let scaled = match self.rng.weighted(&[3, 2, 1]) {
            0 if self.value(width) > 0 => format!("{s0} / sqrt({width})"),
            1 => format!("{s0} * {}", self.rng.pick(&["0.125", "0.3", "2"])),
            _ => s0,
        };
        let mut bias_shape = batch.clone();
        bias_shape.extend([rows, keys]);
        let score = match self.rng.weighted(&[5, 2, 2, 1, 1, 1]) {
            1 => format!("{scaled} + relpos({rows}, {keys}) * {}", {
                let mut slope = batch.clone();
                slope.extend(["1", "1"]);
                if self.rng.chance(0.6) {
                    self.param(&slope)
                } else {
                    "0.5".to_string()
                }
            }),
            2 => {
                let s = if self.rng.chance(0.5) {
                    bias_shape.clone()
                } else {
                    vec![rows, keys]
                };
                format!("{scaled} + {}", self.param(&s))
            }
            3 => {
                let cap = self.rng.pick(&["30", "5"]);
                format!("{cap} * tanh(({scaled}) / {cap})")
            }
            4 => format!("maximum({scaled}, {})", self.param(&bias_shape)),
            5 => format!("elu({scaled})"),
            _ => scaled,
        };
        let score = if self.rng.chance(0.6) {
            format!("mask({score}, {})", self.rng.pick(&PATTERNS))
        } else {
            score
        };
        format!("(softmax({score}) @ {v})")
    }

    /// Linear attention `(φq φkᵀ v) / sum(φq φkᵀ, -1)`, or its causal forms.
    fn linear(&mut self, shape: &[D], depth: usize) -> String {
        let r = shape.len();
        let (rows, cols) = (shape[r - 2], shape[r - 1]);
        let batch = shape[..r - 2].to_vec();
        let keys = self.rng.pick(&["n", "m"]);
        let width = self.rng.pick(&["d", "e"]);
        let sub = depth.saturating_sub(2);
        let feature = |g: &mut Gen<'_>, x: String| match g.rng.below(3) {
            0 => format!("(elu({x}) + 1)"),
            1 => format!("(relu({x}) + 0.5)"),
            _ => format!("exp({x})"),
        };
        let mut qs = batch.clone();
        qs.extend([rows, width]);
        let q = self.expr(&qs, sub);
        let q = feature(self, q);
        let mut ks = batch.clone();
        ks.extend([keys, width]);
        let k = self.expr(&ks, sub);
        let k = feature(self, k);
        let mut vs = batch;
        vs.extend([keys, cols]);
        let v = self.expr(&vs, sub);
        let a = format!("t{}", self.lets.len());
        let eps = if self.rng.chance(0.3) { " + 1e-6" } else { "" };
        match self.rng.below(3) {
            0 => {
                self.lets.push(format!("let {a} = {q} @ ({k}).T;"));
                format!("(({a} @ {v}) / (sum({a}, -1){eps}))")
            }
            1 => {
                self.lets
                    .push(format!("let {a} = mask({q} @ ({k}).T, causal, 0);"));
                format!("(({a} @ {v}) / (sum({a}, -1){eps}))")
            }
            _ => {
                self.lets
                    .push(format!("let {a} = mask({q} @ ({k}).T, causal, 0);"));
                format!("({a} @ {v})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_programs_parse_and_lower() {
        for seed in 0..300 {
            let p = generate(&mut Rng::new(seed));
            let (file, diags) = attnc_syntax::parse(&p.source);
            assert!(diags.is_empty(), "seed {seed}: {diags:?}\n{}", p.source);
            if let Err(e) = attnc_ir::lower::lower_file(&file) {
                panic!("seed {seed}: {e:?}\n{}", p.source);
            }
        }
    }

    #[test]
    fn a_seed_names_one_program() {
        let a = generate(&mut Rng::new(42));
        let b = generate(&mut Rng::new(42));
        assert_eq!(a.source, b.source);
        assert_eq!(a.dims, b.dims);
    }
}
