//! What an f32 engine may return: every value of a kernel with a bound on how far a correct
//! f32 engine's result may lie from it, following the rules of docs/language.md ("Values
//! beyond the f32 range").
//!
//! Each node gets its value (the f64 interpreter's semantics, rounded to the f32 range) and a
//! bound `e` per element, propagated to first order in the style of a running error
//! analysis: an operation's bound is the spread of its result over its operands' intervals
//! (`[x − e, x + e]`, evaluated at the corners, all ops being monotone or bilinear there) plus
//! its own rounding (a few units of `2⁻²⁴` relative for f32 arithmetic and the inline
//! functions, `(k + 2) · 2⁻²⁴ · Σ|terms|` for a sum of `k` terms in any order, an absolute
//! `2⁻¹⁴⁹` per operation for the subnormal range, and `2⁻¹²⁶` for the softmax weights the
//! kernels flush to zero). `e = +inf` marks a value the rules leave unspecified: one whose
//! class (finite, +inf, −inf, NaN) can differ between correct engines —
//!
//! - a sum whose terms' magnitudes on one side add up to the f32 limit (whether a partial sum
//!   overflows depends on the order of addition);
//! - a value whose interval straddles the f32 limit, or an operand interval that reaches a
//!   pole or the edge of a domain (`x / [−ε, ε]`, `log` of an interval reaching 0, `inf · 0`
//!   where the zero is not exact);
//! - a division by an exact zero or `rsqrt(0)`, whose sign depends on the sign of a zero that
//!   engines need not agree on (`relu(−0)`, sums of zeros);
//! - NaN or infinite values of V at keys a fused attention masks out (the fused kernel never
//!   reads V in tiles the mask rules out, its plain form multiplies them by 0), and values
//!   after a causal linear attention row's prefix (the prefix state never reads them);
//! - everything computed from such a value.
//!
//! A NaN or infinite value with a finite bound is certain: every correct engine returns it.

use attnc_ir::fused::{Attention, LinearAttention, Normalizer, ScoreExpr};

mod fused;
use attnc_ir::interp::{binary_scalar, broadcast_shapes, max_nan, round_to, to_f32_range, unary};
use attnc_ir::{BinaryOp, Bindings, DType, Kernel, MaskPattern, NodeId, Op, ReduceOp, UnaryOp};
use ndarray::{ArrayD, Axis, IxDyn, Zip};

/// The unit roundoff of f32, `2⁻²⁴`.
pub const U: f64 = 1.0 / 16_777_216.0;
/// The smallest positive subnormal f32, `2⁻¹⁴⁹`.
const TINY: f64 = 1.401_298_464_324_817e-45;
/// The smallest positive normal f32, `2⁻¹²⁶` (softmax weights below it are flushed to 0).
const NORMAL: f64 = 1.175_494_350_822_287_5e-38;
/// The magnitude from which f32 rounds to infinity, `2¹²⁸ − 2¹⁰³`.
pub const LIMIT: f64 = 3.402_823_567_797_336_6e38;
const INF: f64 = f64::INFINITY;

/// Whether a bound specifies its element (is neither `+inf` nor NaN).
pub fn specified(e: f64) -> bool {
    e < INF
}

/// A value with the bound of every element (`+inf`: unspecified).
#[derive(Clone, Debug)]
pub struct Bounded {
    /// The values (f64, rounded to the f32 range).
    pub x: ArrayD<f64>,
    /// How far a correct f32 engine's element may lie from each value.
    pub e: ArrayD<f64>,
}

impl Bounded {
    fn exact(x: ArrayD<f64>) -> Bounded {
        let e = ArrayD::zeros(x.raw_dim());
        Bounded { x, e }
    }

    fn scalar(x: f64, e: f64) -> Bounded {
        Bounded {
            x: ArrayD::from_elem(IxDyn(&[]), x),
            e: ArrayD::from_elem(IxDyn(&[]), e),
        }
    }
}

/// What [`evaluate`] found.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The output's values and bounds.
    pub output: Bounded,
    /// Computing nodes whose operands are all finite and specified while their value is not
    /// (past the f32 range, within rounding of its limit, or a division by zero): where the
    /// program leaves the finite values. A rewrite can move such a place, so two forms of the
    /// program may then differ.
    pub limit_nodes: usize,
}

/// Evaluates `kernel` on `inputs` (f64 arrays of f32-representable values), returning the
/// output's values and bounds; `Err` for an op this evaluator does not know (a newer one).
pub fn evaluate(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[ArrayD<f64>],
) -> Result<Evaluation, String> {
    let mut limit_nodes = 0;
    let certain = |b: &Bounded| {
        b.x.iter()
            .zip(b.e.iter())
            .all(|(x, e)| x.is_finite() && *e < INF)
    };
    let shapes =
        attnc_ir::bind::resolve_node_shapes(kernel, bindings).map_err(|e| e.to_string())?;
    let graph = &kernel.graph;
    let mut values: Vec<Option<Bounded>> = vec![None; graph.len()];
    for index in 0..=kernel.output.index() {
        let id = NodeId::new(index);
        let args: Vec<&Bounded> = graph
            .operands(id)
            .iter()
            .map(|o| values[o.index()].as_ref().ok_or("an operand is missing"))
            .collect::<Result<_, _>>()?;
        let shape = &shapes[index];
        let value = match &graph.node(id).op {
            Op::Input { index, .. } => Bounded::exact(
                inputs
                    .get(*index)
                    .ok_or("no such input")?
                    .mapv(to_f32_range),
            ),
            Op::Const(c) => constant(*c),
            Op::DimValue(d) => Bounded::scalar(d.resolve(bindings).ok_or("unbound")? as f64, 0.0),
            Op::Fill { value } => {
                let c = constant(*value);
                Bounded {
                    x: ArrayD::from_elem(IxDyn(shape), c.x[[]]),
                    e: ArrayD::from_elem(IxDyn(shape), c.e[[]]),
                }
            }
            Op::RelPos => Bounded::exact(relpos(shape)?),
            Op::Random { kind, seed } => {
                let &[rows, cols] = shape.as_slice() else {
                    return Err("a random matrix has two axes".to_string());
                };
                let data = attnc_ir::random::random_matrix(*kind, *seed, rows, cols);
                let x = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| e.to_string())?;
                // The JIT reads the matrix rounded to f32.
                let e = x.mapv(|v| (v - f64::from(v as f32)).abs());
                Bounded { x, e }
            }
            Op::Unary(u) => map(args[0], |x, e| unary_bound(*u, x, e)),
            Op::Binary(b) => zip(*b, args[0], args[1])?,
            Op::MatMul => matmul(args[0], args[1])?,
            Op::Transpose => transpose(args[0]),
            Op::Reduce { op, axis } => reduce(*op, *axis, args[0]),
            Op::Softmax { axis } => softmax(*axis, args[0]),
            Op::Mask { pattern, fill } => {
                let pattern = pattern.resolve(bindings).map_err(|e| e.to_string())?;
                mask(&pattern, *fill, args[0])
            }
            Op::Cast { to } => map(args[0], |x, e| cast_bound(*to, x, e)),
            Op::Attention(a) => fused::attention(a, &args, bindings)?,
            Op::LinearAttention(l) => fused::linear(l, &args)?,
            #[allow(unreachable_patterns)]
            other => return Err(format!("no bound for `{other}`")),
        };
        if value.x.shape() != shape.as_slice() {
            return Err(format!(
                "node %{index}: bound of shape {:?}, the ir says {shape:?}",
                value.x.shape()
            ));
        }
        // Ops that compute (not those that place given values: inputs, constants, fills,
        // masks, transposes), on arrays (not the scalar arithmetic of `-1 / 0`).
        let computes = matches!(
            graph.node(id).op,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::MatMul
                | Op::Reduce { .. }
                | Op::Softmax { .. }
                | Op::Cast { .. }
                | Op::Attention(_)
                | Op::LinearAttention(_)
        ) && args.iter().any(|a| a.x.ndim() > 0);
        if computes && args.iter().all(|a| certain(a)) && !certain(&value) {
            limit_nodes += 1;
        }
        values[index] = Some(value);
    }
    let output = values[kernel.output.index()]
        .take()
        .ok_or_else(|| "no output".to_string())?;
    Ok(Evaluation {
        output,
        limit_nodes,
    })
}

/// A number written in the program: the JIT holds it as f32.
fn constant(c: f64) -> Bounded {
    let single = c as f32;
    let e = if single.is_finite() && c.is_finite() {
        (c - f64::from(single)).abs()
    } else {
        0.0
    };
    Bounded::scalar(to_f32_range(c), e)
}

/// `relpos(m, n)`.
fn relpos(shape: &[usize]) -> Result<ArrayD<f64>, String> {
    let &[m, n] = shape else {
        return Err("relpos has two axes".to_string());
    };
    Ok(ArrayD::from_shape_fn(IxDyn(&[m, n]), |i| {
        (i[1] as i128 - (i[0] as i128 + n as i128 - m as i128)) as f64
    }))
}

/// The class of a value: NaN, +inf, −inf or finite.
fn class(x: f64) -> u8 {
    if x.is_nan() {
        0
    } else if x == INF {
        1
    } else if x == -INF {
        2
    } else {
        3
    }
}

/// A computed `y` with bound `e`, rounded to the f32 range: certain to overflow when its whole
/// interval is past the limit, unspecified when the interval straddles it.
fn settle(y: f64, e: f64) -> (f64, f64) {
    let x = to_f32_range(y);
    if e.is_nan() || e == INF {
        return (x, INF);
    }
    if !y.is_finite() {
        return (x, 0.0);
    }
    let a = y.abs();
    if a + e < LIMIT {
        (x, e)
    } else if a - e >= LIMIT {
        (x, 0.0)
    } else {
        (x, INF)
    }
}

fn map(a: &Bounded, f: impl Fn(f64, f64) -> (f64, f64)) -> Bounded {
    let mut x = a.x.clone();
    let mut e = a.e.clone();
    Zip::from(&mut x).and(&mut e).for_each(|x, e| {
        (*x, *e) = f(*x, *e);
    });
    Bounded { x, e }
}

/// One elementwise function of `x ± e`.
fn unary_bound(op: UnaryOp, x: f64, e: f64) -> (f64, f64) {
    let y = unary(op, x);
    if e.is_nan() || e == INF {
        return (to_f32_range(y), INF);
    }
    if !x.is_finite() {
        // Infinities and NaN go through every function the same way in every engine.
        return (to_f32_range(y), 0.0);
    }
    match op {
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => return settle(y, e),
        // 1 / sqrt(±0) is ±inf by the sign of a zero.
        UnaryOp::Rsqrt if x == 0.0 => return (to_f32_range(y), INF),
        _ => {}
    }
    let (lo, hi) = (unary(op, x - e), unary(op, x + e));
    if class(lo) != class(y) || class(hi) != class(y) {
        return (to_f32_range(y), INF);
    }
    if !y.is_finite() {
        return (to_f32_range(y), 0.0);
    }
    let spread = (lo - y).abs().max((hi - y).abs());
    let rounding = match op {
        UnaryOp::Log => 8.0 * U * y.abs().max(1.0),
        UnaryOp::Sqrt => U * y.abs() + TINY,
        UnaryOp::Rsqrt => 3.0 * U * y.abs() + TINY,
        _ => 8.0 * U * y.abs() + 4.0 * TINY,
    };
    settle(y, spread + rounding)
}

/// One elementwise operation of `a ± ea` and `b ± eb`.
fn binary_bound(op: BinaryOp, a: f64, ea: f64, b: f64, eb: f64) -> (f64, f64) {
    let y = binary_scalar(op, a, b);
    if a.is_nan() && ea < INF || b.is_nan() && eb < INF {
        return (y, 0.0);
    }
    if ea.is_nan() || eb.is_nan() || ea == INF || eb == INF {
        return (to_f32_range(y), INF);
    }
    if op == BinaryOp::Div && b.is_finite() {
        if b == 0.0 && eb == 0.0 {
            // 0 / 0 is NaN whatever the signs; x / ±0 is ±inf by the sign of a zero.
            return if a == 0.0 && ea == 0.0 {
                (f64::NAN, 0.0)
            } else {
                (to_f32_range(y), INF)
            };
        }
        if b - eb <= 0.0 && b + eb >= 0.0 {
            return (to_f32_range(y), INF);
        }
    }
    let ends = |v: f64, e: f64| {
        if v.is_finite() {
            [v - e, v + e]
        } else {
            [v, v]
        }
    };
    let mut spread = 0.0f64;
    for ca in ends(a, ea) {
        for cb in ends(b, eb) {
            let c = binary_scalar(op, ca, cb);
            if class(c) != class(y) {
                return (to_f32_range(y), INF);
            }
            if y.is_finite() {
                spread = spread.max((c - y).abs());
            }
        }
    }
    if !y.is_finite() {
        return (to_f32_range(y), 0.0);
    }
    let rounding = match op {
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul => U * y.abs() + TINY,
        // An engine may multiply by the reciprocal.
        BinaryOp::Div => 2.0 * U * y.abs() + TINY,
        BinaryOp::Max | BinaryOp::Min => 0.0,
    };
    settle(y, spread + rounding)
}

/// Elementwise `op` with NumPy broadcasting.
fn zip(op: BinaryOp, a: &Bounded, b: &Bounded) -> Result<Bounded, String> {
    let shape = broadcast_shapes(a.x.shape(), b.x.shape()).ok_or("shapes do not broadcast")?;
    let view = |x: &ArrayD<f64>| x.broadcast(IxDyn(&shape)).map(|v| v.to_owned());
    let (ax, ae, bx, be) = match (view(&a.x), view(&a.e), view(&b.x), view(&b.e)) {
        (Some(ax), Some(ae), Some(bx), Some(be)) => (ax, ae, bx, be),
        _ => return Err("cannot broadcast".to_string()),
    };
    let mut x = ArrayD::zeros(IxDyn(&shape));
    let mut e = ArrayD::zeros(IxDyn(&shape));
    Zip::from(&mut x)
        .and(&mut e)
        .and(&ax)
        .and(&ae)
        .and(&bx)
        .and(&be)
        .for_each(|x, e, &a, &ea, &b, &eb| {
            (*x, *e) = binary_bound(op, a, ea, b, eb);
        });
    Ok(Bounded { x, e })
}

/// A sum of products `Σ a_p b_p` (or of terms, `b = 1`) added in any order.
#[derive(Default)]
struct Dot {
    raw: f64,
    /// Magnitudes (with their bounds) of the terms that may be positive, and negative.
    pos: f64,
    neg: f64,
    /// Propagated bound of the terms.
    err: f64,
    /// Σ|t|.
    mag: f64,
    count: usize,
    nan: bool,
    pinf: bool,
    ninf: bool,
    ambiguous: bool,
}

impl Dot {
    fn add(&mut self, a: f64, ea: f64, b: f64, eb: f64) {
        self.count += 1;
        if a.is_nan() && ea < INF || b.is_nan() && eb < INF {
            self.nan = true;
            return;
        }
        if ea.is_nan() || eb.is_nan() || ea == INF || eb == INF {
            self.ambiguous = true;
            return;
        }
        if a.is_infinite() || b.is_infinite() {
            let (other, eo) = if a.is_infinite() { (b, eb) } else { (a, ea) };
            if other == 0.0 && eo == 0.0 {
                self.nan = true;
            } else if other.is_infinite() || other.abs() > eo {
                if a * b > 0.0 {
                    self.pinf = true;
                } else {
                    self.ninf = true;
                }
            } else {
                // The other factor may be zero or change sign.
                self.ambiguous = true;
            }
            return;
        }
        let t = a * b;
        let spread = a.abs() * eb + ea * b.abs() + ea * eb;
        let m = t.abs() + spread;
        if t - spread > 0.0 {
            self.pos += m;
        } else if t + spread < 0.0 {
            self.neg += m;
        } else {
            self.pos += m;
            self.neg += m;
        }
        self.raw += t;
        self.err += spread;
        self.mag += t.abs();
    }

    /// Whether some order of adding the (finite) terms overflows f32.
    fn finite_terms_overflow(&self) -> bool {
        let gamma = (self.count + 2) as f64 * U;
        let reaches = |s: f64| s * (1.0 + gamma) >= LIMIT;
        !(self.nan || self.pinf || self.ninf || self.ambiguous)
            && (reaches(self.pos) || reaches(self.neg))
    }

    fn finish(&self) -> (f64, f64) {
        if self.nan || self.pinf && self.ninf {
            return (f64::NAN, 0.0);
        }
        if self.ambiguous {
            return (to_f32_range(self.raw), INF);
        }
        let gamma = (self.count + 2) as f64 * U;
        let reaches = |s: f64| s * (1.0 + gamma) >= LIMIT;
        if self.pinf || self.ninf {
            let (y, other) = if self.pinf {
                (INF, self.neg)
            } else {
                (-INF, self.pos)
            };
            // Finite terms reaching the other infinity would make it NaN in some order.
            return (y, if reaches(other) { INF } else { 0.0 });
        }
        let e = self.err + gamma * self.mag + self.count as f64 * TINY;
        if reaches(self.pos) || reaches(self.neg) {
            // Some order of addition overflows. Certain only when the sum is past the limit
            // in every order and the other side cannot overflow.
            let other = if self.raw > 0.0 { self.neg } else { self.pos };
            let certain = self.raw.abs() - e >= LIMIT && !reaches(other);
            return (to_f32_range(self.raw), if certain { 0.0 } else { INF });
        }
        settle(self.raw, e)
    }
}

/// `x` broadcast to `batch ++ [rows, cols]`, row-major.
fn batched(x: &ArrayD<f64>, batch: &[usize], rows: usize, cols: usize) -> Result<Vec<f64>, String> {
    let mut shape = batch.to_vec();
    shape.extend([rows, cols]);
    let view = x
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))?;
    Ok(view.iter().copied().collect())
}

/// The batch axes, `m`, `k`, `n` of `a @ b`.
fn product_shape(a: &[usize], b: &[usize]) -> Result<(Vec<usize>, usize, usize, usize), String> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 || a[ra - 1] != b[rb - 2] {
        return Err(format!("matmul of {a:?} and {b:?}"));
    }
    let batch = broadcast_shapes(&a[..ra - 2], &b[..rb - 2]).ok_or("batch axes")?;
    Ok((batch, a[ra - 2], a[ra - 1], b[rb - 1]))
}

/// `a @ b` over the last two axes, leading axes broadcast.
fn matmul(a: &Bounded, b: &Bounded) -> Result<Bounded, String> {
    let (batch, m, k, n) = product_shape(a.x.shape(), b.x.shape())?;
    let batches: usize = batch.iter().product();
    let (ax, ae) = (batched(&a.x, &batch, m, k)?, batched(&a.e, &batch, m, k)?);
    let (bx, be) = (batched(&b.x, &batch, k, n)?, batched(&b.e, &batch, k, n)?);
    let mut x = vec![0.0; batches * m * n];
    let mut e = vec![0.0; batches * m * n];
    for bi in 0..batches {
        for i in 0..m {
            for j in 0..n {
                let mut dot = Dot::default();
                for p in 0..k {
                    let (ia, ib) = ((bi * m + i) * k + p, (bi * k + p) * n + j);
                    dot.add(ax[ia], ae[ia], bx[ib], be[ib]);
                }
                let o = (bi * m + i) * n + j;
                (x[o], e[o]) = dot.finish();
            }
        }
    }
    let mut shape = batch;
    shape.extend([m, n]);
    let array = |v: Vec<f64>| ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string());
    Ok(Bounded {
        x: array(x)?,
        e: array(e)?,
    })
}

/// Swaps the last two axes.
fn transpose(a: &Bounded) -> Bounded {
    let swap = |x: &ArrayD<f64>| {
        let rank = x.ndim();
        let mut v = x.view();
        if rank >= 2 {
            v.swap_axes(rank - 2, rank - 1);
        }
        v.as_standard_layout().into_owned()
    };
    Bounded {
        x: swap(&a.x),
        e: swap(&a.e),
    }
}

/// Applies `f` to every lane along `axis` of `a` (values and bounds), in place on copies.
fn lanes(
    a: &Bounded,
    axis: usize,
    mut f: impl FnMut(&[f64], &[f64], &mut [f64], &mut [f64]),
) -> Bounded {
    let mut x = a.x.clone();
    let mut e = a.e.clone();
    for (mut lx, mut le) in x
        .lanes_mut(Axis(axis))
        .into_iter()
        .zip(e.lanes_mut(Axis(axis)))
    {
        let (vx, ve): (Vec<f64>, Vec<f64>) = (lx.to_vec(), le.to_vec());
        let (mut ox, mut oe) = (vx.clone(), ve.clone());
        f(&vx, &ve, &mut ox, &mut oe);
        lx.iter_mut().zip(&ox).for_each(|(d, s)| *d = *s);
        le.iter_mut().zip(&oe).for_each(|(d, s)| *d = *s);
    }
    Bounded { x, e }
}

/// `sum`, `max` or `mean` along `axis`, keeping it with size one.
fn reduce(op: ReduceOp, axis: usize, a: &Bounded) -> Bounded {
    let one = |x: &[f64], e: &[f64]| -> (f64, f64) {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let mut dot = Dot::default();
                for (&v, &ev) in x.iter().zip(e) {
                    dot.add(v, ev, 1.0, 0.0);
                }
                let (s, es) = dot.finish();
                if op == ReduceOp::Sum {
                    (s, es)
                } else if dot.finite_terms_overflow() {
                    // The mean of values whose sum leaves the f32 range may be inside it: an
                    // engine that sums first overflows, the exact value does not.
                    (to_f32_range(dot.raw / x.len() as f64), INF)
                } else {
                    binary_bound(BinaryOp::Div, s, es, x.len() as f64, 0.0)
                }
            }
            ReduceOp::Max => {
                if x.iter().zip(e).any(|(v, ev)| v.is_nan() && *ev < INF) {
                    return (f64::NAN, 0.0);
                }
                let y = x.iter().fold(-INF, |m, &v| max_nan(m, v));
                let worst = e
                    .iter()
                    .fold(0.0f64, |m, &v| if v.is_nan() { INF } else { m.max(v) });
                settle(y, worst)
            }
            // The generator writes no log-sum-exp (its tests are in attnc-ir and attnc-jit);
            // no error bound is derived for it, so its value is left unspecified.
            ReduceOp::LogSumExp => {
                let m = x.iter().fold(-INF, |m, &v| max_nan(m, v));
                let y = if m.is_finite() {
                    m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
                } else {
                    m
                };
                (y, INF)
            }
        }
    };
    let mut shape = a.x.shape().to_vec();
    shape[axis] = 1;
    let mut x = ArrayD::zeros(IxDyn(&shape));
    let mut e = ArrayD::zeros(IxDyn(&shape));
    let (xs, es) = (a.x.lanes(Axis(axis)), a.e.lanes(Axis(axis)));
    for ((lx, le), (ox, oe)) in xs.into_iter().zip(es).zip(x.iter_mut().zip(e.iter_mut())) {
        (*ox, *oe) = one(&lx.to_vec(), &le.to_vec());
    }
    Bounded { x, e }
}

/// Softmax along `axis`.
fn softmax(axis: usize, a: &Bounded) -> Bounded {
    if a.x.is_empty() {
        return a.clone();
    }
    lanes(a, axis, |x, e, ox, oe| {
        let certain_nan = x.iter().zip(e).any(|(v, ev)| v.is_nan() && *ev < INF);
        let unknown = e.iter().any(|v| v.is_nan() || *v == INF);
        let max = x.iter().fold(-INF, |m, &v| max_nan(m, v));
        if certain_nan || (!unknown && max == INF) {
            ox.fill(f64::NAN);
            oe.fill(0.0);
            return;
        }
        if !unknown && max == -INF {
            ox.fill(0.0);
            oe.fill(0.0);
            return;
        }
        // The interpreter's arithmetic, for the values.
        let mut p: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
        if unknown {
            ox.iter_mut()
                .zip(&p)
                .for_each(|(o, v)| *o = to_f32_range(*v));
            oe.fill(INF);
            return;
        }
        // Perturbing the logits by at most E moves each weight by a factor within e^±2E.
        let worst = e.iter().fold(0.0f64, |m, &v| m.max(v));
        let grow = (2.0 * worst).exp_m1();
        let n = x.len() as f64;
        for (k, (&pk, &xk)) in p.iter().zip(x).enumerate() {
            ox[k] = to_f32_range(pk);
            if xk == -INF {
                oe[k] = 0.0;
                continue;
            }
            let moved = pk * grow;
            let moved = if moved.is_nan() { 1.0 } else { moved };
            let rounding = pk * ((xk - max).abs() + n + 12.0) * U + NORMAL;
            oe[k] = (moved + rounding).min(1.0);
        }
    })
}

/// `mask(x, pattern, fill)` over the last two axes.
fn mask(pattern: &MaskPattern, fill: f64, a: &Bounded) -> Bounded {
    let rank = a.x.ndim();
    let (m, n) = (a.x.shape()[rank - 2], a.x.shape()[rank - 1]);
    let f = constant(fill);
    let (fx, fe) = (f.x[[]], f.e[[]]);
    let mut x = a.x.as_standard_layout().into_owned();
    let mut e = a.e.as_standard_layout().into_owned();
    if m * n == 0 {
        return Bounded { x, e };
    }
    for (k, (v, ev)) in x.iter_mut().zip(e.iter_mut()).enumerate() {
        let at = k % (m * n);
        if !pattern.keeps(at / n, at % n, m, n) {
            (*v, *ev) = (fx, fe);
        }
    }
    Bounded { x, e }
}

/// Rounding `x ± e` to a storage type and back.
fn cast_bound(to: DType, x: f64, e: f64) -> (f64, f64) {
    let y = round_to(to, x);
    if e.is_nan() || e == INF {
        return (y, INF);
    }
    if !x.is_finite() {
        return (y, 0.0);
    }
    // Rounding is monotone: the engine's value rounds between the rounded ends.
    let (lo, hi) = (round_to(to, x - e), round_to(to, x + e));
    if class(lo) != class(y) || class(hi) != class(y) {
        return (y, INF);
    }
    if !y.is_finite() {
        return (y, 0.0);
    }
    (y, (lo - y).abs().max((hi - y).abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_past_the_limit_are_unspecified_unless_certain() {
        let mut dot = Dot::default();
        for t in [3e38, 3e38, -3e38] {
            dot.add(t, 0.0, 1.0, 0.0);
        }
        assert_eq!(
            dot.finish().1,
            INF,
            "3e38 + 3e38 overflows first in one order only"
        );
        let mut dot = Dot::default();
        for t in [3e38, 3e38, 3e38] {
            dot.add(t, 0.0, 1.0, 0.0);
        }
        assert_eq!(dot.finish(), (INF, 0.0), "every order overflows");
        let mut dot = Dot::default();
        for t in [1e38, 1e38, -1e38] {
            dot.add(t, 0.0, 1.0, 0.0);
        }
        let (y, e) = dot.finish();
        assert_eq!(y, 1e38);
        assert!(e > 0.0 && e < 1e32);
    }

    #[test]
    fn infinities_times_zeros_are_nan_only_when_the_zero_is_exact() {
        assert!(binary_bound(BinaryOp::Mul, INF, 0.0, 0.0, 0.0).0.is_nan());
        assert_eq!(binary_bound(BinaryOp::Mul, INF, 0.0, 0.0, 1e-9).1, INF);
        assert_eq!(binary_bound(BinaryOp::Mul, INF, 0.0, 2.0, 1e-9), (INF, 0.0));
        assert_eq!(binary_bound(BinaryOp::Div, 1.0, 0.0, 0.0, 0.0).1, INF);
        assert!(binary_bound(BinaryOp::Div, 0.0, 0.0, 0.0, 0.0).0.is_nan());
    }

    #[test]
    fn a_mean_whose_sum_leaves_the_range_is_unspecified() {
        let a = Bounded::exact(ndarray::arr1(&[3e38, 3e38]).into_dyn());
        let mean = reduce(ReduceOp::Mean, 0, &a);
        assert_eq!(
            (mean.x[[0]], mean.e[[0]]),
            (3e38, INF),
            "the exact mean, unspecified"
        );
        let sum = reduce(ReduceOp::Sum, 0, &a);
        assert_eq!(
            (sum.x[[0]], sum.e[[0]]),
            (INF, 0.0),
            "every order overflows"
        );
        let a = Bounded::exact(ndarray::arr1(&[1e38, 1e38]).into_dyn());
        let mean = reduce(ReduceOp::Mean, 0, &a);
        assert!(mean.e[[0]] < 1e32, "{:?}", mean.e);
    }

    #[test]
    fn values_at_the_limit_may_round_either_way() {
        let max = f64::from(f32::MAX);
        assert_eq!(settle(max, 0.0), (max, 0.0));
        assert_eq!(settle(max, max * 1e-6).1, INF);
        assert_eq!(settle(1e39, 1e30), (INF, 0.0));
        let (y, e) = unary_bound(UnaryOp::Exp, 88.72, 0.0);
        assert!(y.is_finite() && e < y * 1e-5, "{y} {e}");
        let edge = unary_bound(UnaryOp::Exp, 88.722_839, 0.0);
        assert_eq!(edge.1, INF, "e^88.722839 is within rounding of the limit");
        assert_eq!(unary_bound(UnaryOp::Log, 1e-3, 1e-2).1, INF);
    }

    #[test]
    fn softmax_weights_move_with_their_logits() {
        let a = Bounded {
            x: ndarray::arr1(&[0.0, 1.0, -INF]).into_dyn(),
            e: ndarray::arr1(&[1e-3, 0.0, 0.0]).into_dyn(),
        };
        let p = softmax(0, &a);
        assert!((p.x[[0]] + p.x[[1]] - 1.0).abs() < 1e-12);
        assert!(p.e[[0]] > 2e-3 * p.x[[0]] && p.e[[0]] < 1e-2);
        assert_eq!((p.x[[2]], p.e[[2]]), (0.0, 0.0));
    }
}
