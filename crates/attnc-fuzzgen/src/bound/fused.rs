//! Bounds of the fused forms: a fused attention is its plain form with the values of keys it
//! masks out left unspecified; a linear attention is either of its two forms, and a causal
//! one's prefix state reads nothing past a row's prefix.

use super::*;

/// Fused attention: its plain form, plus the masked keys' values left unspecified.
pub(super) fn attention(
    a: &Attention,
    args: &[&Bounded],
    bindings: &Bindings,
) -> Result<Bounded, String> {
    let (q, k, v) = (args[0], args[1], args[2]);
    let mut s = matmul(q, &transpose(k))?;
    if scale_of(&a.score.folded(bindings)).abs() * std::f64::consts::LOG2_E < 1.0 {
        // The full-width kernels fold the scale into q: a product beyond the f32 range that
        // the scale brings back stays finite there.
        Zip::from(&mut s.e).and(&s.x).for_each(|e, &x| {
            if x.is_infinite() {
                *e = INF;
            }
        });
    }
    let rank = s.x.ndim();
    let (m, n) = (s.x.shape()[rank - 2], s.x.shape()[rank - 1]);
    let mut x = score(&a.score, &s, &args[3..], (m, n), bindings, 0)?;
    if let Some(pattern) = &a.mask {
        let pattern = pattern.resolve(bindings).map_err(|e| e.to_string())?;
        x = mask(&pattern, -INF, &x);
    }
    let p = softmax(x.x.ndim() - 1, &x);
    let mut out = matmul(&p, v)?;
    weightless_values_unspecified(&p, v, &mut out)?;
    Ok(out)
}

/// The constant factor of the scores in a score expression (`s · c`, `c · s`, `s / c`), 1
/// when there is none.
fn scale_of(e: &ScoreExpr) -> f64 {
    let mut scale = 1.0;
    e.visit(&mut |x| {
        if let ScoreExpr::Binary(op, a, b) = x {
            match (op, &**a, &**b) {
                (BinaryOp::Mul, ScoreExpr::Scores, ScoreExpr::Const(c))
                | (BinaryOp::Mul, ScoreExpr::Const(c), ScoreExpr::Scores) => scale = *c,
                (BinaryOp::Div, ScoreExpr::Scores, ScoreExpr::Const(c)) => scale = 1.0 / c,
                _ => {}
            }
        }
    });
    scale
}

/// Marks output (row i, column c) unspecified where a key of weight exactly 0 in row i (masked
/// out, or of score −inf) has a value in column c that is not certainly finite: the plain
/// form's `0 · inf` is NaN, while the fused kernels skip the tiles a mask rules out and give
/// zeros for a row whose every weight is 0.
fn weightless_values_unspecified(
    p: &Bounded,
    v: &Bounded,
    out: &mut Bounded,
) -> Result<(), String> {
    let rank = out.x.ndim();
    let batch = out.x.shape()[..rank - 2].to_vec();
    let (m, dv) = (out.x.shape()[rank - 2], out.x.shape()[rank - 1]);
    let n = p.x.shape()[p.x.ndim() - 1];
    let (vx, ve) = (batched(&v.x, &batch, n, dv)?, batched(&v.e, &batch, n, dv)?);
    let (px, pe) = (batched(&p.x, &batch, m, n)?, batched(&p.e, &batch, m, n)?);
    let batches: usize = batch.iter().product();
    let mut e = out.e.as_standard_layout().into_owned();
    let flat = e.as_slice_mut().ok_or("layout")?;
    for b in 0..batches {
        for c in 0..dv {
            let bad: Vec<usize> = (0..n)
                .filter(|&j| {
                    let at = (b * n + j) * dv + c;
                    !vx[at].is_finite() || !specified(ve[at])
                })
                .collect();
            if bad.is_empty() {
                continue;
            }
            for i in 0..m {
                // A weight that may be 0 (or is not known).
                let weightless = |j: usize| {
                    let at = (b * m + i) * n + j;
                    {
                        let low = px[at] - pe[at];
                        low.is_nan() || low <= 0.0
                    }
                };
                if bad.iter().any(|&j| weightless(j)) {
                    flat[(b * m + i) * dv + c] = INF;
                }
            }
        }
    }
    out.e = e;
    Ok(())
}

/// The score expression of a fused attention over the scores `s`.
fn score(
    e: &ScoreExpr,
    s: &Bounded,
    biases: &[&Bounded],
    (m, n): (usize, usize),
    bindings: &Bindings,
    depth: usize,
) -> Result<Bounded, String> {
    if depth > attnc_ir::fused::MAX_SCORE_DEPTH {
        return Err("the score is too deep".to_string());
    }
    Ok(match e {
        ScoreExpr::Scores => s.clone(),
        ScoreExpr::Const(c) => constant(*c),
        ScoreExpr::Dim(d) => Bounded::scalar(d.resolve(bindings).ok_or("unbound")? as f64, 0.0),
        ScoreExpr::RelPos => Bounded::exact(relpos(&[m, n])?),
        ScoreExpr::Bias(i) => (*biases.get(*i).ok_or("no such bias")?).clone(),
        ScoreExpr::Unary(u, x) => map(
            &score(x, s, biases, (m, n), bindings, depth + 1)?,
            |x, e| unary_bound(*u, x, e),
        ),
        ScoreExpr::Binary(op, x, y) => {
            let x = score(x, s, biases, (m, n), bindings, depth + 1)?;
            let y = score(y, s, biases, (m, n), bindings, depth + 1)?;
            zip(*op, &x, &y)?
        }
    })
}

/// Linear attention: its plain form; the causal one sums each row's prefix only, through a
/// state `Σ k_j v_jᵀ` whose reassociation is bounded (and may overflow) on its own.
pub(super) fn linear(l: &LinearAttention, args: &[&Bounded]) -> Result<Bounded, String> {
    let (q, k, v) = (args[0], args[1], args[2]);
    let kt = transpose(k);
    if !l.causal {
        // The kernel's form, q (kᵀ v) / (q Σk + eps), which the interpreter evaluates too, and
        // the plain form a kernel may run instead, (q kᵀ) v / (Σ q kᵀ + eps).
        let state = matmul(&kt, v)?;
        let num = matmul(q, &state)?;
        let a = matmul(q, &kt)?;
        let plain_num = matmul(&a, v)?;
        let Normalizer::Sum { eps } = l.normalizer else {
            return Ok(either_form(num, &plain_num));
        };
        let ksum = reduce(ReduceOp::Sum, kt.x.ndim() - 1, &kt);
        let mut den = matmul(q, &ksum)?;
        let mut plain_den = reduce(ReduceOp::Sum, a.x.ndim() - 1, &a);
        if eps != 0.0 {
            den = zip(BinaryOp::Add, &den, &constant(eps))?;
            plain_den = zip(BinaryOp::Add, &plain_den, &constant(eps))?;
        }
        let plain = zip(BinaryOp::Div, &plain_num, &plain_den)?;
        return Ok(either_form(zip(BinaryOp::Div, &num, &den)?, &plain));
    }
    causal_linear(l.normalizer, q, k, v)
}

/// The values of one form, with a bound that also covers another: the two must be of one
/// class (finite, ±inf, NaN), else the element is unspecified (a product moved across the f32
/// limit), and a finite element's bound reaches the other form's interval.
fn either_form(form: Bounded, other: &Bounded) -> Bounded {
    let mut out = form;
    Zip::from(&mut out.e)
        .and(&out.x)
        .and(&other.x)
        .and(&other.e)
        .for_each(|e, &x, &y, &ey| {
            if !specified(*e) || !specified(ey) || class(x) != class(y) {
                *e = INF;
            } else if x.is_finite() {
                *e = e.max((x - y).abs() + ey);
            }
        });
    out
}

/// Causal linear attention, row by row.
fn causal_linear(
    normalizer: Normalizer,
    q: &Bounded,
    k: &Bounded,
    v: &Bounded,
) -> Result<Bounded, String> {
    let a = matmul(q, &transpose(k))?;
    let (ra, rq, rv) = (a.x.ndim(), q.x.ndim(), v.x.ndim());
    let (m, n) = (a.x.shape()[ra - 2], a.x.shape()[ra - 1]);
    let d = q.x.shape()[rq - 1];
    let dv = v.x.shape()[rv - 1];
    let batch = broadcast_shapes(&a.x.shape()[..ra - 2], &v.x.shape()[..rv - 2])
        .ok_or("batch axes of the scores and v")?;
    let (ax, ae) = (batched(&a.x, &batch, m, n)?, batched(&a.e, &batch, m, n)?);
    let (qx, qe) = (batched(&q.x, &batch, m, d)?, batched(&q.e, &batch, m, d)?);
    let (kx, ke) = (batched(&k.x, &batch, n, d)?, batched(&k.e, &batch, n, d)?);
    let (vx, ve) = (batched(&v.x, &batch, n, dv)?, batched(&v.e, &batch, n, dv)?);
    let batches: usize = batch.iter().product();
    let mut x = vec![0.0; batches * m * dv];
    let mut e = vec![0.0; batches * m * dv];
    let gamma = |count: usize| (count + d + 4) as f64 * U;
    for b in 0..batches {
        // Running magnitudes of the prefix state, |S|[p][c] = Σ_j |k_jp| |v_jc|, and of z.
        let mut state = vec![0.0f64; d * dv];
        let mut zsum = vec![0.0f64; d];
        // Infinities in the prefix: (q·k) v and q (k v) may differ in class (NaN or ±inf).
        let mut k_infinite = false;
        let mut v_infinite = vec![false; dv];
        let mut next = 0;
        for i in 0..m {
            let end = (i as i128 + n as i128 - m as i128 + 1).clamp(0, n as i128) as usize;
            while next < end {
                for c in 0..dv {
                    v_infinite[c] |= vx[(b * n + next) * dv + c].is_infinite();
                }
                for p in 0..d {
                    k_infinite |= kx[(b * n + next) * d + p].is_infinite();
                    let kp = kx[(b * n + next) * d + p].abs() + ke[(b * n + next) * d + p];
                    zsum[p] += kp;
                    for c in 0..dv {
                        let at = (b * n + next) * dv + c;
                        state[p * dv + c] += kp * (vx[at].abs() + ve[at]);
                    }
                }
                next += 1;
            }
            let row = |j: usize| (b * m + i) * n + j;
            let qrow = |p: usize| qx[(b * m + i) * d + p].abs() + qe[(b * m + i) * d + p];
            let q_infinite = (0..d).any(|p| qx[(b * m + i) * d + p].is_infinite());
            // A score of the prefix beyond the f32 range (or not known): the plain form
            // multiplies it by v, the prefix state never forms it.
            let score_overflow =
                (0..end).any(|j| ax[row(j)].is_infinite() || !specified(ae[row(j)]));
            let reassociated = end > 0 && (q_infinite || k_infinite || score_overflow);
            // The state's own magnitudes: past the limit, the prefix kernel overflows.
            let reach = |s: &dyn Fn(usize) -> f64| -> (f64, bool) {
                let mut total = 0.0;
                let mut over = false;
                for p in 0..d {
                    let w = qrow(p);
                    if w > 0.0 {
                        over |= s(p) * (1.0 + gamma(end)) >= LIMIT;
                        total += w * s(p);
                    }
                }
                (total, over || total * (1.0 + gamma(end)) >= LIMIT)
            };
            let mut den = Dot::default();
            for j in 0..end {
                den.add(ax[row(j)], ae[row(j)], 1.0, 0.0);
            }
            let (zmag, zover) = reach(&|p| zsum[p]);
            let (den, den_e) = widen(den.finish(), zmag, zover, gamma(end));
            let den = match normalizer {
                Normalizer::None => None,
                Normalizer::Sum { eps } if eps != 0.0 => Some(binary_bound(
                    BinaryOp::Add,
                    den,
                    den_e,
                    eps,
                    constant(eps).e[[]],
                )),
                Normalizer::Sum { .. } => Some((den, den_e)),
            };
            for c in 0..dv {
                let mut num = Dot::default();
                for j in 0..end {
                    let at = (b * n + j) * dv + c;
                    num.add(ax[row(j)], ae[row(j)], vx[at], ve[at]);
                }
                let (smag, sover) = reach(&|p| state[p * dv + c]);
                let (y, ey) = widen(num.finish(), smag, sover, gamma(end));
                let (y, ey) = match den {
                    Some((dx, de)) => binary_bound(BinaryOp::Div, y, ey, dx, de),
                    None => (y, ey),
                };
                // Values after the prefix: the plain form multiplies them by 0.
                let after = (end..n).any(|j| {
                    let at = (b * n + j) * dv + c;
                    !vx[at].is_finite() || !specified(ve[at])
                });
                let infinite = reassociated || end > 0 && v_infinite[c];
                let o = (b * m + i) * dv + c;
                x[o] = y;
                e[o] = if after || infinite { INF } else { ey };
            }
        }
    }
    let mut shape = batch;
    shape.extend([m, dv]);
    let array = |v: Vec<f64>| ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string());
    Ok(Bounded {
        x: array(x)?,
        e: array(e)?,
    })
}

/// A prefix sum `(y, e)` widened by the rounding of the reassociated state (magnitude `mag`),
/// unspecified when the state may overflow while the sum is finite.
fn widen((y, e): (f64, f64), mag: f64, over: bool, gamma: f64) -> (f64, f64) {
    if over || e.is_nan() || e == INF {
        return (y, INF);
    }
    if !y.is_finite() {
        return (y, e);
    }
    settle(y, e + gamma * mag)
}
