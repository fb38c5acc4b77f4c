//! Fused block-sparse online-softmax attention: recognition in the IR ([`match_attention`]) and
//! code generation ([`define_attention`]).
//!
//! The kernel computes `softmax(mask(score(Q Kᵀ))) V` without materializing the `m × n` score
//! matrix: for each query row it keeps a running maximum `m_i`, a running sum `l_i` and an
//! accumulator of width `dv` (rescaled only when the maximum grows), visits only the key tiles
//! the mask pattern reaches (classified at compile time by [`crate::tiles`]), evaluates element
//! masks only on partial tiles and finally writes `acc / l_i` (zeros for a fully masked row).
//! Query tiles of [`QUERY_TILE`] rows share every K and V load; key tiles hold [`KEY_TILE`]
//! keys.
//!
//! # What is matched
//!
//! At an `Op::MatMul` node `P @ V`: `P = softmax(X)` over the last axis; `X` is an optional
//! chain of `mask(·, pattern)` with fill `-inf` (nested masks intersect) around a score
//! expression. A `-inf` mask inside the score expression is hoisted to the softmax when only
//! `* c`, `/ c` (c > 0) and `± c` (c finite) lie between them (`softmax(mask(s, p) / sqrt(d))`).
//! The score expression is an elementwise tree (`+ - * /`, `maximum`, `minimum` and every
//! unary op) whose leaves are `S = Q @ Kᵀ` (the right operand an explicit `Transpose(K)`),
//! scalar constants and dimension values (folded to one constant per scalar subtree),
//! `relpos` (of shape exactly `[m, n]`), `ones`/`zeros` fills, and bias inputs broadcast to
//! `[..., m, n]`. `Q`, `K`, `V` and the biases must be kernel parameters (any of f32, f16,
//! bf16, widened on load); `Q`, `K` and `V` may also be `cast(param, bf16|f16)` (the plan rounds
//! the parameter once and the kernel loads the rounded copy). K and V may broadcast over
//! leading axes (MQA/GQA).
//!
//! `int8-products(P @ V)` around a matched `P @ V` (its only user) selects
//! [`Precision::Int8`]: the kernel of [`int8`] on operands packed by [`quant`].
//!
//! Declined (the plan falls back to separate kernels):
//! - a mask with a finite or NaN fill: a skipped tile would have to contribute
//!   `exp(fill - max)` per key, which the block-sparse loop never visits;
//! - a mask below any op other than the ones above (`-mask(s, p)` turns `-inf` into `+inf`);
//! - an intermediate node with users outside the pattern, or the kernel output inside it (it
//!   must be materialized);
//! - Q, K, V or a bias that is not a parameter, or whose rows are not contiguous;
//! - more than 2^29 rows or keys (2^24 with `dilated`, whose stride test runs in f32).

mod codegen;
pub mod int8;
mod mask;
pub mod quant;

pub use codegen::{
    define_attention, define_attention_with, DefinedAttention, KEY_TILE, QUERY_TILE,
};

use crate::tiles::{classify, TileKind, TileRun};
use attnc_ir::interp::{binary_scalar, unary};
use attnc_ir::{BinaryOp, Bindings, DType, Dim, Kernel, MaskPattern, NodeId, Op, UnaryOp};
use std::collections::{HashMap, HashSet};

/// A tensor the kernel reads: where its pointer is and how its elements are laid out.
///
/// Element `(b, r, c)` (batch multi-index `b` over the output's leading axes, row `r`, column
/// `c`) lives at element offset `Σ b[a] * batch_strides[a] + r * row_stride + c * col_stride`
/// from the tensor's base pointer. A stride of 0 broadcasts.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// Index into the kernel's pointer array (the IR parameter index).
    pub slot: usize,
    /// The parameter's name (for messages).
    pub name: String,
    /// Storage type; f16/bf16 are widened to f32 on load.
    pub dtype: DType,
    /// `Some(to)` when the operand is `cast(param, to)`: the kernel must read the parameter
    /// rounded to `to` (the plan converts it once and clears this).
    pub convert: Option<DType>,
    /// Element stride per leading output axis (0 where the tensor broadcasts).
    pub batch_strides: Vec<usize>,
    /// Element stride between rows (0 where broadcast).
    pub row_stride: usize,
    /// Element stride between columns (0 where broadcast).
    pub col_stride: usize,
}

/// The elementwise expression applied to the scores `S = Q Kᵀ` before the mask.
#[derive(Clone, Debug, PartialEq)]
pub enum ScoreExpr {
    /// `S[i, j] = q_i · k_j`.
    Scores,
    /// A scalar constant (folded constants and dimension values).
    Const(f64),
    /// `j - i'` with `i' = i + n - m`.
    RelPos,
    /// Bias tensor number `k` of [`AttentionSpec::biases`], broadcast to `[..., m, n]`
    /// (rows are queries, columns keys).
    Bias(usize),
    /// An elementwise function of one operand.
    Unary(UnaryOp, Box<ScoreExpr>),
    /// An elementwise function of two operands.
    Binary(BinaryOp, Box<ScoreExpr>, Box<ScoreExpr>),
}

/// The arithmetic of the fused kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 arithmetic on the operands as stored (exact up to f32 rounding).
    #[default]
    Exact,
    /// Integer Q·Kᵀ and P·V on int8-quantized operands (approximate, see [`int8`]).
    Int8,
}

/// Everything the fused attention kernel is specialized to (all shapes bound).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    /// The leading (batch) axes of the output `[..., m, dv]`.
    pub batch: Vec<usize>,
    /// Query rows.
    pub m: usize,
    /// Keys.
    pub n: usize,
    /// Depth of queries and keys.
    pub d: usize,
    /// Width of values (and of the output rows).
    pub dv: usize,
    /// `Q: [..., m, d]` (rows are queries, columns depth).
    pub q: TensorRef,
    /// `K: [..., n, d]` (rows are keys, columns depth).
    pub k: TensorRef,
    /// `V: [..., n, dv]` (rows are keys, columns value width).
    pub v: TensorRef,
    /// Bias tensors read by the score expression (rows queries, columns keys).
    pub biases: Vec<TensorRef>,
    /// The score expression over `S`.
    pub score: ScoreExpr,
    /// The kept positions (`None`: dense). Masked scores are `-inf` (the only fill matched).
    pub mask: Option<MaskPattern>,
    /// The arithmetic ([`Precision::Exact`] unless the plan saw `int8-products`).
    pub precision: Precision,
}

impl AttentionSpec {
    /// The number of batch entries (product of [`AttentionSpec::batch`]).
    pub fn batch_count(&self) -> usize {
        self.batch.iter().product()
    }

    /// The rows `[i0, i1)` of query tile `tile` ([`QUERY_TILE`] rows each, the last one
    /// shorter).
    pub fn query_tile_rows(&self, tile: usize) -> (usize, usize) {
        let i0 = (tile * QUERY_TILE).min(self.m);
        (i0, (i0 + QUERY_TILE).min(self.m))
    }

    /// The compile-time tile table of query tile `tile`: the runs of key tiles (of
    /// [`KEY_TILE`] keys) its rows visit.
    pub fn query_tile_runs(&self, tile: usize) -> Vec<TileRun> {
        let (i0, i1) = self.query_tile_rows(tile);
        classify(self.mask.as_ref(), self.m, self.n, i0, i1, KEY_TILE)
    }

    /// The fraction of the `m × n` score matrix the kernel visits (1 for dense attention).
    pub fn density(&self) -> f64 {
        if self.m == 0 || self.n == 0 {
            return 0.0;
        }
        let visited: usize = (0..self.m.div_ceil(QUERY_TILE))
            .map(|g| {
                let (i0, i1) = self.query_tile_rows(g);
                let keys: usize = self
                    .query_tile_runs(g)
                    .iter()
                    .map(|r| (r.end * KEY_TILE).min(self.n) - r.first * KEY_TILE)
                    .sum();
                keys * (i1 - i0)
            })
            .sum();
        visited as f64 / (self.m as f64 * self.n as f64)
    }
}

/// The pieces of a matched pattern, in IR terms.
struct Matcher<'a> {
    kernel: &'a Kernel,
    shapes: &'a [Vec<usize>],
    bindings: Bindings,
    /// Non-leaf nodes of the pattern (must have no users outside it).
    inner: HashSet<NodeId>,
    /// The `Q @ Kᵀ` node once found.
    scores: Option<NodeId>,
    /// Bias inputs, by node.
    biases: Vec<NodeId>,
    /// `relpos` nodes (their shape must be exactly `[m, n]`: `relpos(1, n)` broadcast over
    /// rows means something else).
    relpos: Vec<NodeId>,
    /// `-inf` masks hoisted out of the score expression.
    masks: Vec<MaskPattern>,
}

impl Matcher<'_> {
    fn node(&self, id: NodeId) -> &attnc_ir::Node {
        self.kernel.graph.node(id)
    }

    fn shape(&self, id: NodeId) -> Option<&[usize]> {
        self.shapes.get(id.index()).map(Vec::as_slice)
    }

    fn operands(&self, id: NodeId) -> Vec<NodeId> {
        self.kernel.graph.operands(id)
    }

    /// The value of a scalar subtree of constants and dimension values.
    fn fold_scalar(&self, id: NodeId, depth: usize) -> Option<f64> {
        if depth > 64 {
            return None;
        }
        let ops = self.operands(id);
        match &self.node(id).op {
            Op::Const(v) => Some(*v),
            Op::DimValue(d) => d.resolve(&self.bindings).map(|v| v as f64),
            Op::Fill { value } if self.shape(id)?.iter().all(|&s| s == 1) => Some(*value),
            Op::Unary(u) => Some(unary(*u, self.fold_scalar(*ops.first()?, depth + 1)?)),
            Op::Binary(b) => Some(binary_scalar(
                *b,
                self.fold_scalar(*ops.first()?, depth + 1)?,
                self.fold_scalar(*ops.get(1)?, depth + 1)?,
            )),
            _ => None,
        }
    }

    /// Converts the score subtree at `id` into a [`ScoreExpr`].
    ///
    /// `hoist` is true while every op between `id` and the softmax maps `-inf` to `-inf`
    /// (multiplying or dividing by a positive constant, adding or subtracting a finite one):
    /// a `-inf` mask met there can move up to the softmax, `softmax(f(mask(x))) =
    /// softmax(mask(f(x)))`, so `softmax(mask(s, p) / sqrt(d))` fuses too.
    fn score(&mut self, id: NodeId, depth: usize, hoist: bool) -> Option<ScoreExpr> {
        if depth > 64 {
            return None;
        }
        if let Some(v) = self.fold_scalar(id, 0) {
            return Some(ScoreExpr::Const(v));
        }
        let ops = self.operands(id);
        match self.node(id).op.clone() {
            Op::Mask { pattern, fill } if hoist && fill == f64::NEG_INFINITY => {
                self.inner.insert(id);
                self.masks.push(pattern);
                self.score(*ops.first()?, depth + 1, true)
            }
            Op::MatMul => {
                if self.scores.is_some_and(|s| s != id) {
                    return None;
                }
                let t = *ops.get(1)?;
                if !matches!(self.node(t).op, Op::Transpose) {
                    return None;
                }
                self.inner.insert(id);
                self.inner.insert(t);
                self.scores = Some(id);
                Some(ScoreExpr::Scores)
            }
            Op::Fill { value } => Some(ScoreExpr::Const(value)),
            Op::RelPos => {
                self.relpos.push(id);
                Some(ScoreExpr::RelPos)
            }
            Op::Input { .. } => {
                let k = match self.biases.iter().position(|&b| b == id) {
                    Some(k) => k,
                    None => {
                        self.biases.push(id);
                        self.biases.len() - 1
                    }
                };
                Some(ScoreExpr::Bias(k))
            }
            Op::Unary(u) => {
                self.inner.insert(id);
                let a = self.score(*ops.first()?, depth + 1, false)?;
                Some(ScoreExpr::Unary(u, Box::new(a)))
            }
            Op::Binary(b) => {
                self.inner.insert(id);
                let (xid, yid) = (*ops.first()?, *ops.get(1)?);
                let (xc, yc) = (self.fold_scalar(xid, 0), self.fold_scalar(yid, 0));
                let positive = |c: Option<f64>| c.is_some_and(|c| c > 0.0 && c.is_finite());
                let finite = |c: Option<f64>| c.is_some_and(f64::is_finite);
                let (hx, hy) = match b {
                    BinaryOp::Mul => (hoist && positive(yc), hoist && positive(xc)),
                    BinaryOp::Div => (hoist && positive(yc), false),
                    BinaryOp::Add => (hoist && finite(yc), hoist && finite(xc)),
                    BinaryOp::Sub => (hoist && finite(yc), false),
                    BinaryOp::Max | BinaryOp::Min => (false, false),
                };
                let x = self.score(xid, depth + 1, hx)?;
                let y = self.score(yid, depth + 1, hy)?;
                Some(ScoreExpr::Binary(b, Box::new(x), Box::new(y)))
            }
            _ => None,
        }
    }

    /// The [`TensorRef`] of an input or of `cast(input, f16|bf16)` at `id` (see
    /// [`Matcher::tensor`]).
    fn operand(&self, id: NodeId, batch: &[usize], rows: usize, cols: usize) -> Option<TensorRef> {
        if let Op::Cast { to } = self.node(id).op {
            if to == DType::F32 {
                return None;
            }
            let x = *self.operands(id).first()?;
            let mut t = self.tensor(x, batch, rows, cols)?;
            t.convert = Some(to);
            return Some(t);
        }
        self.tensor(id, batch, rows, cols)
    }

    /// The [`TensorRef`] of input node `id` whose last two axes are `(rows, cols)` under the
    /// output batch shape `batch`.
    fn tensor(&self, id: NodeId, batch: &[usize], rows: usize, cols: usize) -> Option<TensorRef> {
        let Op::Input { index, name } = &self.node(id).op else {
            return None;
        };
        let param = self.kernel.params.get(*index)?;
        let shape = self.shape(id)?;
        // Right-align the shape against batch ++ [rows, cols].
        let full: Vec<usize> = batch.iter().copied().chain([rows, cols]).collect();
        if shape.len() > full.len() {
            return None;
        }
        let pad = full.len() - shape.len();
        let mut strides = vec![0usize; full.len()];
        let mut acc = 1usize;
        for a in (0..shape.len()).rev() {
            let (s, f) = (shape[a], full[a + pad]);
            if s == f && s != 1 {
                strides[a + pad] = acc;
            } else if s != 1 {
                return None;
            }
            acc = acc.checked_mul(s)?;
        }
        let rank = full.len();
        Some(TensorRef {
            slot: *index,
            name: name.clone(),
            dtype: param.dtype,
            convert: None,
            batch_strides: strides[..rank - 2].to_vec(),
            row_stride: strides[rank - 2],
            col_stride: strides[rank - 1],
        })
    }
}

/// Binds every dimension symbol that appears in a parameter shape, from the resolved shapes of
/// the input nodes.
fn infer_bindings(kernel: &Kernel, shapes: &[Vec<usize>]) -> Bindings {
    let mut bindings = Bindings::new();
    for id in kernel.graph.topo_order() {
        if let Op::Input { index, .. } = &kernel.graph.node(id).op {
            let (Some(param), Some(shape)) = (kernel.params.get(*index), shapes.get(id.index()))
            else {
                continue;
            };
            for (dim, &size) in param.shape.iter().zip(shape) {
                if let Dim::Sym(name) = dim {
                    bindings.insert(name.clone(), size as u64);
                }
            }
        }
    }
    bindings
}

/// Recognizes `softmax(mask?(score(Q @ Kᵀ))) @ V` at `node` (an `Op::MatMul`), with `shapes`
/// the resolved shape of every node (indexed by node index). Returns `None` when the subgraph
/// does not have that form or cannot be fused (see the module docs).
pub fn match_attention(
    kernel: &Kernel,
    node: NodeId,
    shapes: &[Vec<usize>],
) -> Option<AttentionSpec> {
    let graph = &kernel.graph;
    if !matches!(graph.node(node).op, Op::MatMul) {
        return None;
    }
    let mut mt = Matcher {
        kernel,
        shapes,
        bindings: infer_bindings(kernel, shapes),
        inner: HashSet::new(),
        scores: None,
        biases: Vec::new(),
        relpos: Vec::new(),
        masks: Vec::new(),
    };
    let ops = graph.operands(node);
    let (p, v) = (*ops.first()?, *ops.get(1)?);
    let p_rank = mt.shape(p)?.len();
    let Op::Softmax { axis } = graph.node(p).op else {
        return None;
    };
    if p_rank < 2 || axis != p_rank - 1 {
        return None;
    }
    mt.inner.insert(p);
    // Masks directly under the softmax, intersected.
    let mut x = *graph.operands(p).first()?;
    let mut mask: Option<MaskPattern> = None;
    while let Op::Mask { pattern, fill } = &graph.node(x).op {
        if *fill != f64::NEG_INFINITY {
            return None;
        }
        mt.inner.insert(x);
        mask = Some(match mask {
            None => pattern.clone(),
            Some(outer) => MaskPattern::And(Box::new(pattern.clone()), Box::new(outer)),
        });
        x = *graph.operands(x).first()?;
    }
    let score = mt.score(x, 0, true)?;
    for p in std::mem::take(&mut mt.masks) {
        mask = Some(match mask {
            None => p,
            Some(outer) => MaskPattern::And(Box::new(p), Box::new(outer)),
        });
    }
    let s = mt.scores?;
    let s_ops = graph.operands(s);
    let q = *s_ops.first()?;
    let t = *s_ops.get(1)?;
    let k = *graph.operands(t).first()?;

    // Shapes: output [..., m, dv], Q [.., m, d], K [.., n, d], V [.., n, dv].
    let out = mt.shape(node)?.to_vec();
    if out.len() < 2 {
        return None;
    }
    let (m, dv) = (out[out.len() - 2], out[out.len() - 1]);
    let batch = out[..out.len() - 2].to_vec();
    let qs = mt.shape(q)?;
    let ks = mt.shape(k)?;
    if qs.len() < 2 || ks.len() < 2 {
        return None;
    }
    let d = qs[qs.len() - 1];
    let n = ks[ks.len() - 2];
    if ks[ks.len() - 1] != d || qs[qs.len() - 2] != m {
        return None;
    }
    // The scores must not broadcast the output past what the P @ V product shows.
    let xs = mt.shape(x)?;
    if xs.len() < 2 || xs[xs.len() - 2] != m || xs[xs.len() - 1] != n {
        return None;
    }
    if m >= 1 << 29 || n >= 1 << 29 {
        return None;
    }
    let q_ref = mt.operand(q, &batch, m, d)?;
    let k_ref = mt.operand(k, &batch, n, d)?;
    let v_ref = mt.operand(v, &batch, n, dv)?;
    // Rows of Q, K, V must be contiguous for vector loads.
    if (d > 1 && (q_ref.col_stride != 1 || k_ref.col_stride != 1))
        || (dv > 1 && v_ref.col_stride != 1)
    {
        return None;
    }
    for &r in &mt.relpos {
        if mt.shape(r)? != [m, n] {
            return None;
        }
    }
    let mut biases = Vec::new();
    for &b in &mt.biases {
        biases.push(mt.tensor(b, &batch, m, n)?);
    }
    if mask.is_some() && matches!(mask, Some(ref p) if contains_dilated(p)) && m + n + 2 >= 1 << 24
    {
        return None;
    }
    // Every inner node is used only inside the pattern, and none is the kernel's output.
    mt.inner.insert(node);
    for user in graph.topo_order() {
        if mt.inner.contains(&user) {
            continue;
        }
        if graph
            .operands(user)
            .iter()
            .any(|o| *o != node && mt.inner.contains(o))
        {
            return None;
        }
    }
    if kernel.output != node && mt.inner.contains(&kernel.output) {
        return None;
    }
    Some(AttentionSpec {
        batch,
        m,
        n,
        d,
        dv,
        q: q_ref,
        k: k_ref,
        v: v_ref,
        biases,
        score,
        mask,
        precision: Precision::Exact,
    })
}

/// A copy of `kernel` with the operands of the parameters in `casts` wrapped in
/// `cast(param, to)` and, when `int8`, the output wrapped in `int8-products` — the IR forms the
/// optimizer emits for `@approx(bf16)`, `@approx(f16)` and `@approx(int8)`, for tests and
/// benchmarks that exercise the kernels without it.
pub fn with_low_precision(kernel: &Kernel, casts: &[(usize, DType)], int8: bool) -> Kernel {
    let old = &kernel.graph;
    let mut graph = attnc_ir::Graph::new();
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for id in old.topo_order() {
        let node = old.node(id).clone();
        let ops: Vec<NodeId> = old.operands(id).iter().map(|o| map[o]).collect();
        let cast = match node.op {
            Op::Input { index, .. } => casts.iter().find(|c| c.0 == index).map(|c| c.1),
            _ => None,
        };
        let mut new = graph.add(node.clone(), &ops);
        if let Some(to) = cast {
            let wrapped = attnc_ir::Node {
                op: Op::Cast { to },
                dtype: to,
                ..node
            };
            new = graph.add(wrapped, &[new]);
        }
        map.insert(id, new);
    }
    let mut output = map[&kernel.output];
    if int8 {
        let node = attnc_ir::Node {
            op: Op::Int8Products,
            ..graph.node(output).clone()
        };
        output = graph.add(node, &[output]);
    }
    Kernel {
        graph,
        output,
        ..kernel.clone()
    }
}

/// Whether a pattern uses `dilated` (whose stride test runs in f32 and needs sizes < 2^24).
fn contains_dilated(p: &MaskPattern) -> bool {
    match p {
        MaskPattern::Dilated { .. } => true,
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
            contains_dilated(a) || contains_dilated(b)
        }
        _ => false,
    }
}

/// How a run of key tiles is processed by the generated code (the `kind` word of the table).
pub(crate) fn run_code(kind: TileKind, tail: bool) -> u32 {
    match (kind, tail) {
        (TileKind::Full, false) => 0,
        (TileKind::Partial, false) => 1,
        (TileKind::Full, true) => 2,
        (TileKind::Partial, true) => 3,
    }
}
