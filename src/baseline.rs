//! Baselines and FLOP accounting for `attnc bench`.
//!
//! [`naive_attention`] is what a Rust programmer writes without a compiler for attention:
//! straightforward loops computing `softmax(mask(q kᵀ · scale)) v` row by row, one thread,
//! f32, with the dot product split over eight partial sums (so the Rust compiler can
//! vectorize it) and masked keys skipped. [`plain_attention`] says whether a compiled plan
//! is exactly that computation (one fused attention step with a scale-only score), and
//! [`useful_flops`] counts the work a kernel must do: `2·(d + dv)` per kept (query, key)
//! pair of every attention step (`4·d` when `dv = d`; kept pairs counted exactly with the
//! mask at the bound shapes) plus `2·m·n·k` per matrix product.

use std::collections::HashMap;

use attnc_ir::{BinaryOp, MaskPattern};
use attnc_jit::kernels::attention::{AttentionSpec, ScoreExpr, TensorRef};
use attnc_jit::plan::{BufferSource, Plan, Step, StepKind};

mod documents;

/// The sizes of one batched attention `[batch, m, d] × [batch, n, d] × [batch, n, dv]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Independent (batch × head) entries.
    pub batch: usize,
    /// Query rows.
    pub m: usize,
    /// Keys.
    pub n: usize,
    /// Depth of queries and keys.
    pub d: usize,
    /// Width of values.
    pub dv: usize,
}

/// Why the naive baseline cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaselineError(pub String);

impl std::fmt::Display for BaselineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BaselineError {}

/// Naive attention: for each batch entry and query row `i`, the scores
/// `s_j = scale · q_i · k_j` of the kept keys (`mask` with end alignment, `None` keeps all),
/// a numerically stable softmax over them, and `Σ_j p_j v_j`. A row with no kept key is zero.
///
/// `q` is `[batch, m, d]`, `k` `[batch, n, d]`, `v` `[batch, n, dv]`, all row-major; the
/// result is `[batch, m, dv]`.
pub fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    mask: Option<&MaskPattern>,
) -> Result<Vec<f32>, BaselineError> {
    let AttentionShape { batch, m, n, d, dv } = shape;
    let want = |name: &str, got: usize, rows: usize, cols: usize| {
        let expected = batch.checked_mul(rows).and_then(|x| x.checked_mul(cols));
        if expected == Some(got) {
            Ok(())
        } else {
            Err(BaselineError(format!(
                "{name} has {got} elements, expected [{batch}, {rows}, {cols}]"
            )))
        }
    };
    want("q", q.len(), m, d)?;
    want("k", k.len(), n, d)?;
    want("v", v.len(), n, dv)?;
    let mut out = vec![0.0f32; batch * m * dv];
    let mut scores = vec![f32::NEG_INFINITY; n];
    for b in 0..batch {
        let qb = &q[b * m * d..(b + 1) * m * d];
        let kb = &k[b * n * d..(b + 1) * n * d];
        let vb = &v[b * n * dv..(b + 1) * n * dv];
        for i in 0..m {
            let qi = &qb[i * d..(i + 1) * d];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if mask.is_none_or(|p| p.keeps(i, j, m, n)) {
                    scale * dot(qi, &kb[j * d..(j + 1) * d])
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*s);
            }
            let row = &mut out[(b * m + i) * dv..(b * m + i + 1) * dv];
            if max == f32::NEG_INFINITY {
                continue; // fully masked: zeros
            }
            let mut sum = 0.0f32;
            for (j, &s) in scores.iter().enumerate() {
                if s == f32::NEG_INFINITY {
                    continue;
                }
                let p = (s - max).exp();
                sum += p;
                for (o, &x) in row.iter_mut().zip(&vb[j * dv..(j + 1) * dv]) {
                    *o += p * x;
                }
            }
            let inv = 1.0 / sum;
            for o in row.iter_mut() {
                *o *= inv;
            }
        }
    }
    Ok(out)
}

/// `a · b` with eight partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// The number of (query, key) pairs of an `m × n` score matrix that `mask` keeps (`None`:
/// all), counted exactly: per row from the pattern's key intervals, element by element only
/// inside the candidate range of a `dilated` pattern.
pub fn kept_pairs(mask: Option<&MaskPattern>, m: usize, n: usize) -> u64 {
    let Some(pattern) = mask else {
        return m as u64 * n as u64;
    };
    let exact = !has_dilated(pattern);
    let (m64, n64) = (m as i64, n as i64);
    let mut total = 0u64;
    for i in 0..m64 {
        let ia = i + n64 - m64;
        let spans = candidates(pattern, ia, n64);
        for (lo, hi) in spans {
            if exact {
                total += (hi - lo) as u64;
            } else {
                total += (lo..hi).filter(|&j| pattern.contains(ia, j)).count() as u64;
            }
        }
    }
    total
}

fn has_dilated(p: &MaskPattern) -> bool {
    match p {
        MaskPattern::Dilated { .. } => true,
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => has_dilated(a) || has_dilated(b),
        _ => false,
    }
}

/// Sorted disjoint half-open key intervals of row `ia` (aligned) that contain every kept key;
/// exactly the kept keys when the pattern has no `dilated`.
fn candidates(p: &MaskPattern, ia: i64, n: i64) -> Vec<(i64, i64)> {
    let clip = |lo: i64, hi: i64| {
        let (lo, hi) = (lo.max(0), hi.min(n));
        if lo < hi {
            vec![(lo, hi)]
        } else {
            Vec::new()
        }
    };
    match p {
        MaskPattern::Causal => clip(0, ia.saturating_add(1)),
        MaskPattern::Window(w) => {
            let w = i64::try_from(*w).unwrap_or(i64::MAX);
            clip(ia.saturating_sub(w), ia.saturating_add(w).saturating_add(1))
        }
        MaskPattern::Dilated { w, r } => {
            let reach = i64::try_from(w.saturating_mul(*r)).unwrap_or(i64::MAX);
            clip(
                ia.saturating_sub(reach),
                ia.saturating_add(reach).saturating_add(1),
            )
        }
        MaskPattern::Global(g) => {
            let g = i64::try_from(*g).unwrap_or(i64::MAX);
            if ia < g {
                clip(0, n)
            } else {
                clip(0, g)
            }
        }
        MaskPattern::Block(b) => {
            let b = i64::try_from(*b).unwrap_or(i64::MAX).max(1);
            let start = ia.div_euclid(b).saturating_mul(b);
            clip(start, start.saturating_add(b))
        }
        // Every key may share the row's segment (plans with documents have no baseline).
        MaskPattern::Document { .. } | MaskPattern::TopkBlocks { .. } => clip(0, n),
        MaskPattern::And(a, b) => intersect(&candidates(a, ia, n), &candidates(b, ia, n)),
        MaskPattern::Or(a, b) => union(&candidates(a, ia, n), &candidates(b, ia, n)),
    }
}

fn intersect(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for &(a0, a1) in a {
        for &(b0, b1) in b {
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo < hi {
                out.push((lo, hi));
            }
        }
    }
    union(&out, &[])
}

fn union(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut all: Vec<(i64, i64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(all.len());
    for (lo, hi) in all {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// What a kernel's FLOPs are counted from.
#[derive(Clone, Debug, PartialEq)]
pub struct FlopCount {
    /// Useful floating-point operations of one run.
    pub flops: f64,
    /// Kept (query, key) pairs over all attention steps and batch entries.
    pub attended_pairs: u64,
    /// `attention`, `matmul`, `attention+matmul` or `none`.
    pub basis: &'static str,
    /// Whether the counts are upper bounds: some mask keeps pairs chosen by data the count
    /// did not see (`topk_blocks`, or segment ids not among the inputs), counted as kept.
    pub at_most: bool,
}

/// Useful FLOPs of one run of `plan`: `2·(d + dv)` per kept pair of every fused attention
/// step, `2·m·n·k` per matrix product, `2·d·dv·(m + n)` per linear attention step through its
/// state (causal or not), counted as matrix work (elementwise work is not counted). Pairs
/// of data-dependent masks count as kept ([`FlopCount::at_most`]); see [`useful_flops_on`].
pub fn useful_flops(plan: &Plan) -> FlopCount {
    useful_flops_on(plan, &|_| None)
}

/// [`useful_flops`] with the pairs of `document(...)` masks counted from the segment ids the
/// kernel runs on: `ids(p)` is kernel parameter `p`'s i32 values, if it has them.
pub fn useful_flops_on<'a>(plan: &Plan, ids: &dyn Fn(usize) -> Option<&'a [i32]>) -> FlopCount {
    let (mut flops, mut pairs) = (0.0f64, 0u64);
    let (mut attention, mut matmul, mut at_most) = (false, false, false);
    for step in &plan.steps {
        match &step.kind {
            StepKind::Attention(spec) => {
                let kept = match document_pairs(plan, step, spec, ids) {
                    Some(kept) => kept,
                    None => {
                        at_most |= spec.mask.as_ref().is_some_and(|p| !p.is_static());
                        kept_pairs(spec.mask.as_ref(), spec.m, spec.n)
                            .saturating_mul(spec.batch_count() as u64)
                    }
                };
                pairs = pairs.saturating_add(kept);
                flops += 2.0 * (spec.d + spec.dv) as f64 * kept as f64;
                attention = true;
            }
            StepKind::MatMul(spec) => {
                flops += spec.flops() as f64;
                matmul = true;
            }
            // Linear attention: one d × dv multiply-add per key (state) and per row.
            StepKind::Prefix(spec) | StepKind::Chunked(spec) => {
                flops += state_flops(spec);
                matmul = true;
            }
            StepKind::Linear(step) => {
                flops += state_flops(&step.spec);
                matmul = true;
            }
            _ => {}
        }
    }
    let basis = match (attention, matmul) {
        (true, true) => "attention+matmul",
        (true, false) => "attention",
        (false, true) => "matmul",
        (false, false) => "none",
    };
    FlopCount {
        flops,
        attended_pairs: pairs,
        basis,
        at_most,
    }
}

/// One d × dv multiply-add per key (state) and per row of a linear attention step.
fn state_flops(spec: &attnc_jit::kernels::prefix::PrefixSpec) -> f64 {
    2.0 * (spec.d * spec.dv) as f64 * (spec.m + spec.n) as f64 * spec.batch_count() as f64
}

/// The kept pairs of a fused attention step with a `document(...)` mask, over every batch
/// entry, from the segment ids of the kernel parameters it reads (`None` when the mask has
/// no document, a part the ids cannot count, or ids not among the parameters).
fn document_pairs<'a>(
    plan: &Plan,
    step: &Step,
    spec: &AttentionSpec,
    ids: &dyn Fn(usize) -> Option<&'a [i32]>,
) -> Option<u64> {
    let pattern = spec.mask.as_ref()?;
    let (q, k) = document_pair(pattern)?;
    let operand = |which: usize| -> Option<(&TensorRef, &'a [i32])> {
        let t = spec.segments.get(which)?;
        let buffer = *step.inputs.get(t.slot)?;
        match plan.buffers.get(buffer)?.source {
            BufferSource::Input(p) => Some((t, ids(p)?)),
            BufferSource::Temp => None,
        }
    };
    let ((tq, query_ids), (tk, key_ids)) = (operand(q)?, operand(k)?);
    // document(seg): queries read the keys' ids end-aligned; document(qseg, kseg): row i.
    let (query_len, shift) = if q == k {
        (spec.n, spec.n as i64 - spec.m as i64)
    } else {
        (spec.m, 0)
    };
    let mut counted: HashMap<(usize, usize), u64> = HashMap::new();
    let mut total = 0u64;
    for entry in 0..spec.batch_count() {
        let at = (
            offset(tq, &spec.batch, entry),
            offset(tk, &spec.batch, entry),
        );
        let kept = match counted.get(&at) {
            Some(&kept) => kept,
            None => {
                let entry_ids = documents::Ids {
                    queries: query_ids.get(at.0..at.0.checked_add(query_len)?)?,
                    keys: key_ids.get(at.1..at.1.checked_add(spec.n)?)?,
                    shift,
                };
                let kept = documents::kept_pairs(pattern, spec.m, spec.n, &entry_ids)?;
                counted.insert(at, kept);
                kept
            }
        };
        total = total.saturating_add(kept);
    }
    Some(total)
}

/// The one `(q, k)` segment-operand pair a pattern's documents compare.
fn document_pair(p: &MaskPattern) -> Option<(usize, usize)> {
    match p {
        MaskPattern::Document { q, k } => Some((*q, *k)),
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
            match (document_pair(a), document_pair(b)) {
                (Some(x), Some(y)) if x != y => None,
                (x, y) => x.or(y),
            }
        }
        _ => None,
    }
}

/// The element offset of batch entry `entry` (last batch axis fastest) in tensor `t`.
fn offset(t: &TensorRef, batch: &[usize], mut entry: usize) -> usize {
    let mut at = 0;
    for (axis, &size) in batch.iter().enumerate().rev() {
        if size > 0 {
            at += (entry % size) * t.batch_strides.get(axis).copied().unwrap_or(0);
            entry /= size;
        }
    }
    at
}

/// A plan that is plain attention, in the terms [`naive_attention`] takes.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainAttention {
    /// The sizes.
    pub shape: AttentionShape,
    /// The score scale.
    pub scale: f32,
    /// The mask (`None`: dense).
    pub mask: Option<MaskPattern>,
    /// Parameter index of q, k and v.
    pub slots: [usize; 3],
    spec: AttentionSpec,
}

impl PlainAttention {
    /// Gathers q, k and v from the kernel's inputs (f32 values, one vector per parameter)
    /// into the contiguous `[batch, rows, cols]` layout [`naive_attention`] takes
    /// (broadcast K/V are copied per batch entry).
    pub fn gather(&self, inputs: &[Vec<f32>]) -> Result<[Vec<f32>; 3], BaselineError> {
        let s = &self.spec;
        let one = |t: &TensorRef, rows: usize, cols: usize| {
            let src = inputs
                .get(t.slot)
                .ok_or_else(|| BaselineError(format!("no input for `{}`", t.name)))?;
            gather(src, t, &s.batch, rows, cols)
        };
        Ok([
            one(&s.q, s.m, s.d)?,
            one(&s.k, s.n, s.d)?,
            one(&s.v, s.n, s.dv)?,
        ])
    }
}

/// Copies tensor `t` (strided over the output batch axes `batch`) into `[batch, rows, cols]`.
fn gather(
    src: &[f32],
    t: &TensorRef,
    batch: &[usize],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, BaselineError> {
    let count: usize = batch.iter().product();
    let mut out = Vec::with_capacity(count * rows * cols);
    let mut index = vec![0usize; batch.len()];
    for _ in 0..count {
        let base: usize = index.iter().zip(&t.batch_strides).map(|(i, s)| i * s).sum();
        for r in 0..rows {
            for c in 0..cols {
                let at = base + r * t.row_stride + c * t.col_stride;
                let x = src.get(at).ok_or_else(|| {
                    BaselineError(format!("`{}` is shorter than its strides say", t.name))
                })?;
                out.push(*x);
            }
        }
        for (i, &size) in index.iter_mut().zip(batch).rev() {
            *i += 1;
            if *i < size {
                break;
            }
            *i = 0;
        }
    }
    Ok(out)
}

/// Whether `plan` is plain attention: one fused attention step (optionally followed by the
/// host's rounding of an f16/bf16 result) whose score is `Q Kᵀ` times a constant, with no
/// bias. `None` for every other kernel.
pub fn plain_attention(plan: &Plan) -> Option<PlainAttention> {
    let mut spec = None;
    for step in &plan.steps {
        match &step.kind {
            StepKind::Attention(s) if spec.is_none() => spec = Some(s.as_ref()),
            StepKind::Cast(_) if spec.is_some() => {}
            _ => return None,
        }
    }
    let spec = spec?;
    if !spec.biases.is_empty() || spec.mask.as_ref().is_some_and(|m| !m.is_static()) {
        return None;
    }
    let scale = score_scale(&spec.score)?;
    Some(PlainAttention {
        shape: AttentionShape {
            batch: spec.batch_count(),
            m: spec.m,
            n: spec.n,
            d: spec.d,
            dv: spec.dv,
        },
        scale: scale as f32,
        mask: spec.mask.clone(),
        slots: [spec.q.slot, spec.k.slot, spec.v.slot],
        spec: spec.clone(),
    })
}

/// `c` when the score expression is `S`, `S * c`, `c * S` or `S / c`.
fn score_scale(score: &ScoreExpr) -> Option<f64> {
    match score {
        ScoreExpr::Scores => Some(1.0),
        ScoreExpr::Binary(BinaryOp::Mul, a, b) => match (a.as_ref(), b.as_ref()) {
            (ScoreExpr::Scores, ScoreExpr::Const(c)) | (ScoreExpr::Const(c), ScoreExpr::Scores) => {
                Some(*c)
            }
            _ => None,
        },
        ScoreExpr::Binary(BinaryOp::Div, a, b) => match (a.as_ref(), b.as_ref()) {
            (ScoreExpr::Scores, ScoreExpr::Const(c)) if *c != 0.0 => Some(1.0 / *c),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Tensor;
    use attnc_ir::interp::evaluate;

    fn compile(text: &str) -> attnc_ir::Module {
        crate::source::compile_text(text).expect("the program checks")
    }

    fn bindings(pairs: &[(&str, u64)]) -> attnc_ir::Bindings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// The naive baseline agrees with the f64 reference interpreter, with masks and m != n.
    #[test]
    fn naive_matches_the_interpreter() {
        let cases = [
            ("", 5, 7),
            (", causal", 3, 9),
            (", causal & window(2)", 6, 6),
            (", block(3) | global(1)", 4, 8),
            (", dilated(2, 2)", 5, 5),
        ];
        for (mask, m, n) in cases {
            let text = format!(
                "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {{
                     return softmax(mask(q @ k.T / sqrt(d){mask})) @ v;
                 }}"
            );
            let text = if mask.is_empty() {
                text.replace("mask(q @ k.T / sqrt(d))", "q @ k.T / sqrt(d)")
            } else {
                text
            };
            let module = compile(&text);
            let kernel = &module.kernels[0];
            let (h, d, e) = (2usize, 5usize, 3usize);
            let b = bindings(&[
                ("h", h as u64),
                ("m", m as u64),
                ("n", n as u64),
                ("d", d as u64),
                ("e", e as u64),
            ]);
            let q = crate::io::standard_normal(1, 0, h * m * d);
            let k = crate::io::standard_normal(1, 1, h * n * d);
            let v = crate::io::standard_normal(1, 2, h * n * e);
            let tensors = [
                Tensor::new(vec![h, m, d], crate::io::TensorData::F32(q.clone())),
                Tensor::new(vec![h, n, d], crate::io::TensorData::F32(k.clone())),
                Tensor::new(vec![h, n, e], crate::io::TensorData::F32(v.clone())),
            ];
            let arrays: Vec<_> = tensors
                .iter()
                .map(|t| t.as_ref().expect("valid tensor").to_f64_array())
                .collect();
            let want = evaluate(kernel, &b, &arrays).expect("interprets");

            let compiled = crate::Compiler::new()
                .compile(kernel, &b)
                .expect("compiles");
            let plain = plain_attention(compiled.plan()).expect("plain attention");
            assert_eq!(plain.slots, [0, 1, 2]);
            let [gq, gk, gv] = plain
                .gather(&[q.clone(), k.clone(), v.clone()])
                .expect("gathers");
            assert_eq!((gq, gk, gv), (q.clone(), k.clone(), v.clone()));
            let got = naive_attention(&q, &k, &v, plain.shape, plain.scale, plain.mask.as_ref())
                .expect("runs");
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "mask `{mask}`: {g} vs {w}"
                );
            }
            // Kept pairs agree with enumerating the mask.
            let count = (0..m)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .filter(|&(i, j)| plain.mask.as_ref().is_none_or(|p| p.keeps(i, j, m, n)))
                .count() as u64;
            assert_eq!(
                kept_pairs(plain.mask.as_ref(), m, n),
                count,
                "mask `{mask}`"
            );
        }
    }

    #[test]
    fn kept_pairs_of_common_patterns() {
        assert_eq!(kept_pairs(None, 4, 6), 24);
        assert_eq!(kept_pairs(Some(&MaskPattern::Causal), 4, 4), 10);
        let local = MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(2)),
        );
        // rows keep 1, 2, 3, 3, 3 keys
        assert_eq!(kept_pairs(Some(&local), 5, 5), 12);
        // decode: one query aligned to the last key
        assert_eq!(kept_pairs(Some(&local), 1, 100), 3);
    }

    #[test]
    fn non_attention_plans_are_not_plain() {
        let module = compile("kernel g(a: f32[n, k], b: f32[k, m]) -> f32[n, m] { return a @ b; }");
        let b = bindings(&[("n", 3), ("k", 4), ("m", 5)]);
        let compiled = crate::Compiler::new()
            .compile(&module.kernels[0], &b)
            .expect("compiles");
        assert!(plain_attention(compiled.plan()).is_none());
        let flops = useful_flops(compiled.plan());
        assert_eq!(flops.flops, 2.0 * 3.0 * 4.0 * 5.0);
        assert_eq!(flops.basis, "matmul");
    }

    #[test]
    fn document_pairs_count_from_the_segment_ids() {
        let module = compile(
            "kernel p(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], seg: i32[n]) -> f32[h, n, d] {
                 return softmax(mask(q @ k.T, causal & document(seg))) @ v;
             }",
        );
        let b = bindings(&[("h", 3), ("n", 100), ("d", 4)]);
        let Ok(compiled) = crate::Compiler::new().compile(&module.kernels[0], &b) else {
            // Without the AVX-512 tier a document mask does not compile.
            return;
        };
        // Documents of 30, 30, 30 and 10 tokens: causal within each.
        let seg: Vec<i32> = (0..100).map(|j| j / 30).collect();
        let per_head = 3 * (30 * 31 / 2) + 10 * 11 / 2;
        let counted = useful_flops_on(compiled.plan(), &|p| (p == 3).then_some(seg.as_slice()));
        assert_eq!(counted.attended_pairs, 3 * per_head);
        assert!(!counted.at_most);
        assert_eq!(counted.flops, 3.0 * per_head as f64 * 2.0 * 8.0);
        // Without the ids, every pair the causal part keeps is counted, as an upper bound.
        let bound = useful_flops(compiled.plan());
        assert_eq!(bound.attended_pairs, 3 * 100 * 101 / 2);
        assert!(bound.at_most);
    }
}
