//! Fused forms: the ops the optimizer chooses and the planner runs as one kernel each.
//!
//! A fused op means exactly what its plain form means (the interpreter evaluates it that way,
//! see `interp/fused.rs`, and [`expand`] writes the plain form out as IR), but it is one node:
//! the planner dispatches on it instead of re-discovering a subgraph, and its operands are
//! ordinary values — kernel parameters or anything computed before it.
//!
//! - [`Attention`]: `softmax(mask(score(Q Kᵀ), pattern, -inf)) @ V` over the last axis,
//!   computed online without the `m × n` scores. Operands `[q, k, v, bias₀, …]`; the score is
//!   an elementwise [`ScoreExpr`] over `S = Q Kᵀ` whose array leaves are the bias operands
//!   (each broadcast into `[.., m, n]`).
//! - [`LinearAttention`]: `(A V) / (sum(A, -1) + eps)` with `A = Q Kᵀ`, or its causal form
//!   `A = mask(Q Kᵀ, causal, 0)` through a running prefix state, or the causal form without
//!   the normalizer. Operands `[q, k, v]` (feature maps already applied). A causal one may
//!   decay its scores with distance ([`Decay::Slope`], RetNet's retention):
//!   `A = mask((Q Kᵀ) ∘ exp(a · relpos(m, n)), causal, 0)` with a per-head slope operand `a`
//!   (`[batch.., 1, 1]` or a scalar), run as a prefix state that decays by `exp(-a)` per key;
//!   or by data ([`Decay::Gate`]): `A = mask((Q Kᵀ) ∘ exp(cq − ckᵀ), causal, 0)` with `cq`
//!   `[batch.., m, 1]` and `ck` `[batch.., n, 1]` (one `c` twice when `m = n`).
//!
//! Shapes: `Q: [.., m, d]`, `K: [.., n, d]`, `V: [.., n, dv]`; the result is
//! `[batch.., m, dv]` with `batch` the broadcast of every operand's leading axes.
//! [`Fused::check`] is the one validator of what a fused op may contain: the optimizer's guards
//! and the planner both call it.

pub mod expand;

use crate::dim::{Bindings, Dim, Shape};
use crate::op::{BinaryOp, UnaryOp};
use crate::pattern::SymbolicPattern;
use serde::Serialize;
use std::fmt;

/// The deepest score expression a fused attention takes (its users recurse over it).
pub const MAX_SCORE_DEPTH: usize = 64;

/// The elementwise score of a fused attention over `S = Q Kᵀ`, evaluated per position
/// `(i, j)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ScoreExpr {
    /// `S[i, j] = q_i · k_j`.
    Scores,
    /// A number.
    Const(f64),
    /// The value of a dimension symbol.
    Dim(Dim),
    /// `j − i'` with `i' = i + n − m` (`relpos(m, n)`).
    RelPos,
    /// Bias operand number `k` (operand `3 + k` of the op), broadcast into `[.., m, n]`.
    Bias(usize),
    /// An elementwise function of one operand.
    Unary(UnaryOp, Box<ScoreExpr>),
    /// An elementwise function of two operands.
    Binary(BinaryOp, Box<ScoreExpr>, Box<ScoreExpr>),
}

impl ScoreExpr {
    /// `S · c`: the score of plain scaled dot-product attention.
    pub fn scaled(c: ScoreExpr) -> ScoreExpr {
        ScoreExpr::Binary(BinaryOp::Mul, Box::new(ScoreExpr::Scores), Box::new(c))
    }

    /// The number of bias operands it reads (one more than the largest index).
    pub fn biases(&self) -> usize {
        let mut count = 0;
        self.visit(&mut |e| {
            if let ScoreExpr::Bias(k) = e {
                count = count.max(k + 1);
            }
        });
        count
    }

    /// Whether it reads `S` at all.
    pub fn uses_scores(&self) -> bool {
        let mut found = false;
        self.visit(&mut |e| found |= matches!(e, ScoreExpr::Scores));
        found
    }

    /// Its depth (a leaf is 1).
    pub fn depth(&self) -> usize {
        match self {
            ScoreExpr::Unary(_, x) => 1 + x.depth(),
            ScoreExpr::Binary(_, x, y) => 1 + x.depth().max(y.depth()),
            _ => 1,
        }
    }

    /// Calls `f` on every node, parents first.
    pub fn visit(&self, f: &mut impl FnMut(&ScoreExpr)) {
        f(self);
        match self {
            ScoreExpr::Unary(_, x) => x.visit(f),
            ScoreExpr::Binary(_, x, y) => {
                x.visit(f);
                y.visit(f);
            }
            _ => {}
        }
    }

    /// The value of a subtree without array leaves (`None` when it reads `S`, `relpos`, a
    /// bias or an unbound dimension).
    pub fn scalar_value(&self, bindings: &Bindings) -> Option<f64> {
        match self {
            ScoreExpr::Const(c) => Some(*c),
            ScoreExpr::Dim(d) => d.resolve(bindings).map(|v| v as f64),
            ScoreExpr::Unary(u, x) => Some(crate::interp::unary(*u, x.scalar_value(bindings)?)),
            ScoreExpr::Binary(b, x, y) => Some(crate::interp::binary_scalar(
                *b,
                x.scalar_value(bindings)?,
                y.scalar_value(bindings)?,
            )),
            ScoreExpr::Scores | ScoreExpr::RelPos | ScoreExpr::Bias(_) => None,
        }
    }

    /// The expression at `bindings` with every scalar subtree folded to one constant (so
    /// machine code sees numbers, never dimension symbols).
    pub fn folded(&self, bindings: &Bindings) -> ScoreExpr {
        if let Some(v) = self.scalar_value(bindings) {
            return ScoreExpr::Const(v);
        }
        match self {
            ScoreExpr::Unary(u, x) => ScoreExpr::Unary(*u, Box::new(x.folded(bindings))),
            ScoreExpr::Binary(b, x, y) => ScoreExpr::Binary(
                *b,
                Box::new(x.folded(bindings)),
                Box::new(y.folded(bindings)),
            ),
            other => other.clone(),
        }
    }

    /// `Some(c)` when the expression is `S`, `S · c`, `c · S` or `S / c` with `c` a scalar
    /// subtree: the plain scaled form every tier runs fastest.
    pub fn scale(&self, bindings: &Bindings) -> Option<f64> {
        match self {
            ScoreExpr::Scores => Some(1.0),
            ScoreExpr::Binary(BinaryOp::Mul, x, y) => match (&**x, &**y) {
                (ScoreExpr::Scores, c) | (c, ScoreExpr::Scores) => c.scalar_value(bindings),
                _ => None,
            },
            ScoreExpr::Binary(BinaryOp::Div, x, c) if **x == ScoreExpr::Scores => {
                c.scalar_value(bindings).map(|c| 1.0 / c)
            }
            _ => None,
        }
    }
}

impl fmt::Display for ScoreExpr {
    /// An s-expression: `(mul s 0.125)`, `(add (div s (sqrt (dim d))) (mul b0 relpos))`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScoreExpr::Scores => f.write_str("s"),
            ScoreExpr::Const(c) => write!(f, "{c:?}"),
            ScoreExpr::Dim(d) => write!(f, "(dim {d})"),
            ScoreExpr::RelPos => f.write_str("relpos"),
            ScoreExpr::Bias(k) => write!(f, "b{k}"),
            ScoreExpr::Unary(u, x) => write!(f, "({u} {x})"),
            ScoreExpr::Binary(b, x, y) => write!(f, "({b} {x} {y})"),
        }
    }
}

/// The arithmetic of a fused attention's products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum Precision {
    /// f32 arithmetic on the operands as stored (exact up to f32 rounding).
    #[default]
    Exact,
    /// Q·Kᵀ and P·V on int8-quantized operands, f32 softmax: an approximation the policy must
    /// allow. The interpreter evaluates it exactly; its error is measured before a plan that
    /// uses it is accepted.
    Int8,
    /// Q·Kᵀ and P·V on bfloat16 operands with f32 accumulation and an f32 softmax (AMX tile
    /// products): an approximation, evaluated exactly by the interpreter like `Int8`.
    Bf16,
}

impl Precision {
    /// The name in IR text.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Fused softmax attention (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attention {
    /// The score over `S = Q Kᵀ`.
    pub score: ScoreExpr,
    /// The kept positions (`None`: all); masked scores are `-inf`.
    pub mask: Option<SymbolicPattern>,
    /// The arithmetic.
    pub precision: Precision,
    /// When set, the node's value is not `O` but the natural log-sum-exp of each row of the
    /// masked scores, `logsumexp(mask(score(Q Kᵀ)), -1)` (`[batch.., m, 1]`, `-inf` for a
    /// fully masked row). The optimizer makes one only beside an attention with the same
    /// operands, so the planner can write both from one pass (the running maximum and sum of
    /// the online softmax); `v` stays an operand for that pairing.
    pub lse: bool,
}

impl Attention {
    /// Plain scaled dot-product attention, `softmax(mask(S · c)) V`.
    pub fn scaled(c: ScoreExpr, mask: Option<SymbolicPattern>) -> Attention {
        Attention {
            score: ScoreExpr::scaled(c),
            mask,
            precision: Precision::Exact,
            lse: false,
        }
    }

    /// Its operand count: q, k, v, the biases, then the mask's segment operands (i32 ids).
    pub fn arity(&self) -> usize {
        3 + self.score.biases() + self.segments()
    }

    /// How many segment operands its mask reads (after the biases).
    pub fn segments(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.segments())
    }
}

/// How a linear attention normalizes its rows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Normalizer {
    /// No normalization: `A V`.
    None,
    /// `(A V) / (sum(A, -1) + eps)`.
    Sum {
        /// Added to the row sums (0 for the plain form).
        eps: f64,
    },
}

/// How a causal linear attention weighs its scores by distance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Decay {
    /// No weighting: `A = mask(Q Kᵀ, causal, 0)`.
    #[default]
    None,
    /// `A_ij = (q_i · k_j) · exp(a · (j − i'))` for `j ≤ i'`, with the slope `a` the op's
    /// operand 3 — a scalar or `[batch.., 1, 1]`, one per batch entry (head). With `a > 0`
    /// the weight of key `j` in row `i` is `γ^(i' − j)`, `γ = exp(-a)`: RetNet's retention.
    Slope,
    /// `A_ij = (q_i · k_j) · exp(cq_i − ck_j)` for `j ≤ i'`, with the log decays of the
    /// queries `cq` (operand 3, `[batch.., m, 1]`) and of the keys `ck` (operand 4,
    /// `[batch.., n, 1]`; the same value as `cq` when `m = n` and the program writes
    /// `exp(c − cᵀ)`): data-dependent (gated) decay, `c` the running sum of log gates (gated
    /// linear attention, Mamba-2's scalar decay), and for decoding `cq` the last `m` entries of
    /// `ck`. The weights are computed from differences of `c`, never as products of
    /// `exp(c)`, so no gate value overflows them where the plain form does not.
    Gate,
}

/// Linear attention through the `[d, dv]` key-value state (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LinearAttention {
    /// Whether `A` is masked causally (with fill 0), run as a prefix state.
    pub causal: bool,
    /// The row normalization.
    pub normalizer: Normalizer,
    /// The distance weighting of the scores (causal only).
    pub decay: Decay,
}

impl LinearAttention {
    /// Its operand count: q, k, v, then the decay slope, or the log decays of the queries and
    /// of the keys.
    pub fn arity(&self) -> usize {
        match self.decay {
            Decay::None => 3,
            Decay::Slope => 4,
            Decay::Gate => 5,
        }
    }
}

/// Either fused op, for the checks they share.
#[derive(Clone, Copy, Debug)]
pub enum Fused<'a> {
    /// A fused softmax attention.
    Attention(&'a Attention),
    /// A linear attention.
    Linear(&'a LinearAttention),
}

/// The dimensions of a checked fused op at bound or symbolic sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedShape<D> {
    /// The output's leading axes (the broadcast of every operand's).
    pub batch: Vec<D>,
    /// Queries.
    pub m: D,
    /// Keys.
    pub n: D,
    /// Query and key depth.
    pub d: D,
    /// Value width.
    pub dv: D,
}

impl<D: Clone> FusedShape<D> {
    /// The output shape `[batch.., m, dv]`.
    pub fn output(&self) -> Vec<D> {
        let mut out = self.batch.clone();
        out.extend([self.m.clone(), self.dv.clone()]);
        out
    }
}

/// A dimension the shape check can compare and broadcast: symbolic [`Dim`]s or bound sizes.
pub trait Extent: Clone + PartialEq + fmt::Display {
    /// Whether this is the size 1 (which broadcasts).
    fn is_one(&self) -> bool;
    /// `ceil(self / b)`, the number of blocks of `b` (`b ≥ 1`).
    fn blocks(&self, b: u64) -> Self;
    /// Whether the size is known (no symbols): only known sizes can be told apart.
    fn known(&self) -> bool;
}

impl Extent for Dim {
    fn is_one(&self) -> bool {
        Dim::is_one(self)
    }
    fn blocks(&self, b: u64) -> Dim {
        let rows = [self.clone(), Dim::Const(1)];
        crate::build::pooled(&rows, &Dim::Const(b))
            .map_or_else(|| self.clone(), |mut s| s.swap_remove(0))
    }
    fn known(&self) -> bool {
        self.symbols().is_empty()
    }
}

impl Extent for usize {
    fn is_one(&self) -> bool {
        *self == 1
    }
    fn blocks(&self, b: u64) -> usize {
        self.div_ceil(usize::try_from(b.max(1)).unwrap_or(usize::MAX))
    }
    fn known(&self) -> bool {
        true
    }
}

impl Fused<'_> {
    /// Its operand count.
    pub fn arity(&self) -> usize {
        match self {
            Fused::Attention(a) => a.arity(),
            Fused::Linear(l) => l.arity(),
        }
    }

    /// Checks the op and its operand shapes (`[q, k, v, biases..]`, symbolic or bound) and
    /// returns its dimensions, or says what does not fit.
    pub fn check<D: Extent>(&self, operands: &[&[D]]) -> Result<FusedShape<D>, String> {
        if operands.len() != self.arity() {
            return Err(format!(
                "takes {} operands, not {}",
                self.arity(),
                operands.len()
            ));
        }
        if let Fused::Attention(a) = self {
            if !a.score.uses_scores() {
                return Err(format!("the score {} does not read q kᵀ", a.score));
            }
            if a.score.depth() > MAX_SCORE_DEPTH {
                return Err(format!(
                    "the score is deeper than {MAX_SCORE_DEPTH} operations"
                ));
            }
        }
        let (q, k, v) = (operands[0], operands[1], operands[2]);
        for (name, s) in [("q", q), ("k", k), ("v", v)] {
            if s.len() < 2 {
                return Err(format!("{name} has rank {}, not at least 2", s.len()));
            }
        }
        let last2 = |s: &[D]| (s[s.len() - 2].clone(), s[s.len() - 1].clone());
        let ((m, d), (n, kd), (vn, dv)) = (last2(q), last2(k), last2(v));
        if kd != d {
            return Err(format!("q has depth {d} but k has depth {kd}"));
        }
        if vn != n {
            return Err(format!("k has {n} keys but v has {vn} rows"));
        }
        let mut batch: Vec<D> = Vec::new();
        for (name, s) in [("q", q), ("k", k), ("v", v)] {
            batch = broadcast(&batch, &s[..s.len() - 2])
                .ok_or_else(|| format!("the leading axes of {name} do not broadcast"))?;
        }
        if let Fused::Linear(l) = self {
            if l.decay != Decay::None && !l.causal {
                return Err("a decayed linear attention must be causal".to_string());
            }
            if l.decay == Decay::Gate {
                for (at, who, rows) in [(3, "queries", &m), (4, "keys", &n)] {
                    let c = operands
                        .get(at)
                        .ok_or_else(|| format!("a gated decay takes the log decay of its {who}"))?;
                    let rank = c.len();
                    if rank < 2 || !c[rank - 1].is_one() || c[rank - 2] != *rows {
                        return Err(format!(
                            "the log decay of the {who} must be [.., {rows}, 1]"
                        ));
                    }
                    batch = broadcast(&batch, &c[..rank - 2]).ok_or_else(|| {
                        format!("the leading axes of the log decay of the {who} do not broadcast")
                    })?;
                }
                return Ok(FusedShape { batch, m, n, d, dv });
            }
            for slope in &operands[3..] {
                let rank = slope.len();
                if slope[rank.saturating_sub(2)..].iter().any(|s| !s.is_one()) {
                    return Err(
                        "the decay slope must be a scalar or have size 1 in its last two axes"
                            .to_string(),
                    );
                }
                batch = broadcast(&batch, &slope[..rank.saturating_sub(2)])
                    .ok_or("the leading axes of the decay slope do not broadcast")?;
            }
            return Ok(FusedShape { batch, m, n, d, dv });
        }
        let (biases, segments) = match self {
            Fused::Attention(a) => operands[3..].split_at(a.score.biases()),
            Fused::Linear(_) => (&operands[3..], &operands[..0]),
        };
        for (index, bias) in biases.iter().enumerate() {
            let rank = bias.len();
            let row = (rank >= 2).then(|| &bias[rank - 2]);
            let col = bias.last();
            let fits_row = row.is_none_or(|r| r.is_one() || *r == m);
            let fits_col = col.is_none_or(|c| c.is_one() || *c == n);
            if !fits_row || !fits_col {
                return Err(format!(
                    "bias b{index} does not broadcast into the {m} × {n} scores"
                ));
            }
            let lead = &bias[..rank.saturating_sub(2)];
            batch = broadcast(&batch, lead)
                .ok_or_else(|| format!("the leading axes of bias b{index} do not broadcast"))?;
        }
        if let Fused::Attention(Attention {
            mask: Some(mask), ..
        }) = self
        {
            let roles = crate::segments::roles(mask);
            crate::segments::check(&roles, &batch, &m, &n, segments)?;
        }
        Ok(FusedShape { batch, m, n, d, dv })
    }
}

/// The NumPy broadcast of two lists of axes.
fn broadcast<D: Extent>(a: &[D], b: &[D]) -> Option<Vec<D>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for k in 0..rank {
        let x = (k + a.len()).checked_sub(rank).map(|i| &a[i]);
        let y = (k + b.len()).checked_sub(rank).map(|i| &b[i]);
        out.push(match (x, y) {
            (Some(x), None) => x.clone(),
            (None, Some(y)) => y.clone(),
            (Some(x), Some(y)) if x == y || y.is_one() => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            _ => return None,
        });
    }
    Some(out)
}

/// The symbolic output shape of a fused op over operands of `shapes`.
pub fn output_shape(op: Fused<'_>, shapes: &[&Shape]) -> Result<Shape, String> {
    let slices: Vec<&[Dim]> = shapes.iter().map(|s| s.as_slice()).collect();
    let fs = op.check(&slices)?;
    Ok(match op {
        // The log-sum-exp of each query row keeps the reduced key axis with size 1.
        Fused::Attention(a) if a.lse => {
            let mut out = fs.batch;
            out.extend([fs.m, Dim::Const(1)]);
            out
        }
        _ => fs.output(),
    })
}

impl fmt::Display for Attention {
    /// The attributes as IR text prints them: `score=(mul s 0.125), mask=causal`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "score={}", self.score)?;
        if let Some(mask) = &self.mask {
            write!(f, ", mask={mask}")?;
        }
        if self.precision != Precision::Exact {
            write!(f, ", precision={}", self.precision.name())?;
        }
        if self.lse {
            f.write_str(", lse")?;
        }
        Ok(())
    }
}

impl fmt::Display for LinearAttention {
    /// The attributes as IR text prints them: `causal, eps=1e-6`, `causal, decay, unnormalized`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.causal { "causal" } else { "dense" })?;
        match self.decay {
            Decay::None => {}
            Decay::Slope => f.write_str(", decay")?,
            Decay::Gate => f.write_str(", gate")?,
        }
        match self.normalizer {
            Normalizer::None => f.write_str(", unnormalized"),
            Normalizer::Sum { eps: 0.0 } => Ok(()),
            Normalizer::Sum { eps } => write!(f, ", eps={eps:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(names: &str) -> Shape {
        names
            .split(',')
            .map(|s| match s.trim().parse::<u64>() {
                Ok(v) => Dim::Const(v),
                Err(_) => Dim::Sym(s.trim().to_string()),
            })
            .collect()
    }

    #[test]
    fn attention_shapes_broadcast_the_leading_axes() {
        let a = Attention::scaled(ScoreExpr::Const(0.5), None);
        let (q, k, v) = (dims("h, m, d"), dims("1, n, d"), dims("n, e"));
        let out = output_shape(Fused::Attention(&a), &[&q, &k, &v]).expect("fits");
        assert_eq!(out, dims("h, m, e"));
        let bad = dims("h, n, c");
        let err = output_shape(Fused::Attention(&a), &[&q, &bad, &v]).unwrap_err();
        assert!(err.contains("depth"), "{err}");
    }

    #[test]
    fn biases_must_broadcast_into_the_scores() {
        let score = ScoreExpr::Binary(
            BinaryOp::Add,
            Box::new(ScoreExpr::Scores),
            Box::new(ScoreExpr::Binary(
                BinaryOp::Mul,
                Box::new(ScoreExpr::Bias(0)),
                Box::new(ScoreExpr::RelPos),
            )),
        );
        let a = Attention {
            score,
            mask: Some(crate::MaskPattern::Causal),
            precision: Precision::Exact,
            lse: false,
        };
        assert_eq!(a.arity(), 4);
        let (q, k, v) = (dims("h, m, d"), dims("h, n, d"), dims("h, n, d"));
        let slope = dims("g, 1, 1");
        let out = output_shape(Fused::Attention(&a), &[&q, &k, &v, &slope]).unwrap_err();
        assert!(out.contains("leading axes of bias"), "{out}");
        let slope = dims("h, 1, 1");
        assert!(output_shape(Fused::Attention(&a), &[&q, &k, &v, &slope]).is_ok());
        let wrong = dims("h, m, d");
        assert!(output_shape(Fused::Attention(&a), &[&q, &k, &v, &wrong]).is_err());
        assert_eq!(a.to_string(), "score=(add s (mul b0 relpos)), mask=causal");
    }

    #[test]
    fn scores_fold_and_scales_are_recognized() {
        let c = ScoreExpr::Binary(
            BinaryOp::Div,
            Box::new(ScoreExpr::Const(1.0)),
            Box::new(ScoreExpr::Unary(
                UnaryOp::Sqrt,
                Box::new(ScoreExpr::Dim(Dim::Sym("d".into()))),
            )),
        );
        let score = ScoreExpr::scaled(c);
        let b: Bindings = [("d".to_string(), 64)].into_iter().collect();
        assert_eq!(score.scale(&b), Some(0.125));
        assert_eq!(score.folded(&b), ScoreExpr::scaled(ScoreExpr::Const(0.125)));
        assert_eq!(score.scale(&Bindings::new()), None);
        let no_scores = Attention::scaled(ScoreExpr::Const(1.0), None);
        let no_scores = Attention {
            score: ScoreExpr::Const(1.0),
            ..no_scores
        };
        let (q, k, v) = (dims("m, d"), dims("n, d"), dims("n, d"));
        assert!(output_shape(Fused::Attention(&no_scores), &[&q, &k, &v]).is_err());
    }

    #[test]
    fn bound_shapes_check_like_symbolic_ones() {
        let l = LinearAttention {
            causal: true,
            normalizer: Normalizer::Sum { eps: 1e-6 },
            decay: Decay::None,
        };
        let shape = Fused::Linear(&l)
            .check::<usize>(&[&[2, 5, 3], &[2, 7, 3], &[7, 4]])
            .expect("fits");
        assert_eq!(shape.output(), vec![2, 5, 4]);
        assert_eq!(l.to_string(), "causal, eps=1e-6");
    }

    #[test]
    fn decay_slopes_are_per_batch_entry_and_causal_only() {
        let l = LinearAttention {
            causal: true,
            normalizer: Normalizer::None,
            decay: Decay::Slope,
        };
        let linear = Fused::Linear(&l);
        assert_eq!(linear.arity(), 4);
        let shape = linear
            .check::<usize>(&[&[5, 3], &[7, 3], &[7, 4], &[2, 1, 1]])
            .expect("a per-head slope fits");
        assert_eq!(shape.output(), vec![2, 5, 4]);
        assert!(linear
            .check::<usize>(&[&[5, 3], &[7, 3], &[7, 4], &[]])
            .is_ok());
        let err = linear
            .check::<usize>(&[&[5, 3], &[7, 3], &[7, 4], &[2, 5, 1]])
            .unwrap_err();
        assert!(err.contains("slope"), "{err}");
        let dense = LinearAttention { causal: false, ..l };
        let err = Fused::Linear(&dense)
            .check::<usize>(&[&[5, 3], &[7, 3], &[7, 4], &[]])
            .unwrap_err();
        assert!(err.contains("causal"), "{err}");
        assert_eq!(l.to_string(), "causal, decay, unnormalized");
    }
}
