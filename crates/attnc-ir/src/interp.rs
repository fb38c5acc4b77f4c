//! The f64 reference interpreter: the semantics every engine is tested against.
//!
//! [`evaluate`] runs a bound [`Kernel`] on f64 arrays, one node at a time in index order (which
//! is topological), without recursion, freeing each intermediate value once its last user has
//! run. It is written to be obviously right, not fast: every sum runs in index order.
//!
//! # Semantics (LANGUAGE.md §3, QUALITY.md), including the corner cases
//!
//! - Binary ops broadcast as in NumPy; `a @ b` multiplies over the last two axes and broadcasts
//!   the leading ones (`[r, n] @ [h, n, d]` is `[h, r, d]`); `.T` swaps the last two axes.
//! - **NaN propagates through every max**: `maximum(a, b)`, `minimum(a, b)`, `max(x, axis)`
//!   and the row maximum inside `softmax` return NaN when any operand is NaN (IEEE 754-2019
//!   `maximum`/`minimum`, as Cranelift's `fmax`/`fmin`, not Rust's `f64::max`). Between `+0`
//!   and `-0`, `maximum` picks `+0` and `minimum` picks `-0`.
//! - `sum` of an empty axis is 0; `mean` of an empty axis is NaN (0/0, as NumPy); `max` of an
//!   empty axis is `-inf`. Reductions keep the axis with size 1.
//! - `softmax` subtracts the row maximum `m` before `exp`. A row with `m = -inf` (every entry
//!   `-inf`, or the row is empty) gives all zeros, never NaN. A NaN anywhere in the row makes
//!   the whole row NaN. A `+inf` entry gives NaN too (`inf - inf`), as in NumPy and PyTorch.
//!   Huge finite logits (`1e30`) stay finite because of the subtraction.
//! - `mask(x, p, fill)` REPLACES the entries (i, j) of the last two axes outside `p` by `fill`
//!   (queries aligned to the end of the keys when m ≠ n), so a NaN at a masked-out position
//!   never reaches the output.
//! - `relu(NaN)` is NaN; `elu` uses alpha 1; `rsqrt(x) = 1 / sqrt(x)`; `sigmoid(x) =
//!   1 / (1 + exp(-x))`.
//! - `Cast { to }` rounds each value to the storage type the way an f32 engine stores it
//!   (f64 → f32 → f16/bf16, round to nearest even) and widens it back.
//! - Dimensions may be 0: empty in, empty out; a product over zero keys is 0.
//! - Fused ops mean their plain form (`interp/fused.rs`); causal linear attention sums each
//!   row's prefix only.
//! - **Beyond the f32 range** (`interp/range.rs`): every node's value, and every plain-form
//!   step of a fused op, is rounded to the f32 range (±inf past it, ±0 below the smallest
//!   subnormal) and otherwise keeps f64 precision.

use crate::bind::{resolve_checked, resolve_node_shapes, BindError};
use crate::dim::Bindings;
use crate::graph::{Kernel, NodeId};
use crate::op::{BinaryOp, DType, Op, ReduceOp, UnaryOp};
use masking::mask;
use ndarray::{ArrayD, ArrayView1, ArrayViewMut1, Axis, IxDyn, Zip};

mod backward;
mod fused;
mod masking;
mod memory;
mod range;
mod reduction;

pub use memory::{interp_memory, InterpMemory};
pub use range::to_f32_range;

/// Why a kernel could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The bindings do not bind every symbol, or a shape is unusable.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The number of input arrays differs from the number of parameters.
    #[error("kernel `{kernel}` takes {expected} inputs but {got} were given")]
    InputCount {
        /// The kernel's name.
        kernel: String,
        /// The number of parameters.
        expected: usize,
        /// The number of arrays given.
        got: usize,
    },
    /// An input array's rank differs from its parameter's.
    #[error(
        "input `{input}` has rank {got} but its declared shape {declared} has rank {expected}"
    )]
    InputRank {
        /// The parameter's name.
        input: String,
        /// The declared shape (`[h, n, d]`).
        declared: String,
        /// The declared rank.
        expected: usize,
        /// The array's rank.
        got: usize,
    },
    /// An input array's size along one axis differs from the bound parameter shape.
    #[error("input `{input}` axis {axis} (`{dim}`) has size {got} but {expected} was expected")]
    InputShape {
        /// The parameter's name.
        input: String,
        /// The axis.
        axis: usize,
        /// The declared dimension (`n` or `1`).
        dim: String,
        /// The bound size.
        expected: usize,
        /// The array's size.
        got: usize,
    },
    /// The graph breaks an IR invariant (a bug in whatever built it).
    #[error("internal error: node %{node} ({op}): {detail}")]
    Malformed {
        /// The node index.
        node: usize,
        /// The node's op, printed.
        op: String,
        /// What is wrong.
        detail: String,
    },
}

/// Evaluates `kernel` on `inputs` (one f64 array per parameter, f16/bf16 inputs already
/// widened) under `bindings`, returning the output node's value.
///
/// Checks the input shapes against the bound parameter shapes before computing anything.
pub fn evaluate(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[ArrayD<f64>],
) -> Result<ArrayD<f64>, EvalError> {
    let mut values = evaluate_outputs(kernel, bindings, inputs, &[kernel.output])?;
    values
        .pop()
        .ok_or_else(|| malformed(kernel, kernel.output.index(), "the output was not computed"))
}

/// Every output of `kernel` (one value for a single-output kernel), in order, each node
/// computed once: what a kernel returning `(a, b)` means.
pub fn evaluate_all(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[ArrayD<f64>],
) -> Result<Vec<ArrayD<f64>>, EvalError> {
    evaluate_outputs(kernel, bindings, inputs, &kernel.output_nodes())
}

/// [`evaluate`] for several nodes of `kernel`'s graph at once (a gradient graph's gradients):
/// each node is computed once, and every value is kept until its last user among the asked
/// nodes has run. Values come back in the order of `outputs`.
pub fn evaluate_outputs(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[ArrayD<f64>],
    outputs: &[NodeId],
) -> Result<Vec<ArrayD<f64>>, EvalError> {
    check_inputs(kernel, bindings, inputs)?;
    let shapes = resolve_node_shapes(kernel, bindings)?;
    let graph = &kernel.graph;
    let count = graph.len();
    let mut wanted = vec![false; count];
    for output in outputs {
        let index = output.index();
        if index >= count {
            return Err(EvalError::Malformed {
                node: index,
                op: "output".to_string(),
                detail: format!("the output node is not in the graph of {count} nodes"),
            });
        }
        wanted[index] = true;
    }
    let Some(last) = outputs.iter().map(|o| o.index()).max() else {
        return Ok(Vec::new());
    };

    // Operands of every node, and which nodes the outputs depend on (one backward sweep,
    // since operands precede their users).
    let operands: Vec<Vec<NodeId>> = graph
        .topo_order()
        .into_iter()
        .map(|id| graph.operands(id))
        .collect();
    let mut live = wanted.clone();
    for index in (0..=last).rev() {
        if !live[index] {
            continue;
        }
        for operand in &operands[index] {
            if operand.index() >= index {
                return Err(malformed(
                    kernel,
                    index,
                    "an operand does not precede its user",
                ));
            }
            live[operand.index()] = true;
        }
    }
    let mut uses = vec![0usize; count];
    for index in (0..=last).filter(|&i| live[i]) {
        for operand in &operands[index] {
            uses[operand.index()] += 1;
        }
    }

    let mut values: Vec<Option<ArrayD<f64>>> = vec![None; count];
    for index in (0..=last).filter(|&i| live[i]) {
        let id = NodeId::new(index);
        let node = graph.node(id);
        if operands[index].len() != node.op.arity() {
            return Err(malformed(
                kernel,
                index,
                &format!(
                    "has {} operands but takes {}",
                    operands[index].len(),
                    node.op.arity()
                ),
            ));
        }
        let value = {
            let args: Vec<&ArrayD<f64>> = operands[index]
                .iter()
                .map(|o| {
                    values[o.index()]
                        .as_ref()
                        .ok_or_else(|| malformed(kernel, index, "an operand was freed too early"))
                })
                .collect::<Result<_, _>>()?;
            eval_node(kernel, bindings, &node.op, &shapes[index], &args, inputs)
                .map(range::round_range)
                .map_err(|detail| malformed(kernel, index, &detail))?
        };
        if value.shape() != shapes[index].as_slice() {
            return Err(malformed(
                kernel,
                index,
                &format!(
                    "computed shape {:?} but the ir says {:?}",
                    value.shape(),
                    shapes[index]
                ),
            ));
        }
        for operand in &operands[index] {
            let o = operand.index();
            uses[o] -= 1;
            if uses[o] == 0 && !wanted[o] {
                values[o] = None;
            }
        }
        values[index] = Some(value);
    }
    let mut result = Vec::with_capacity(outputs.len());
    for (k, o) in outputs.iter().enumerate() {
        // Moved out, unless the same node is asked for again later.
        let slot = &mut values[o.index()];
        let value = if outputs[k + 1..].contains(o) {
            slot.clone()
        } else {
            slot.take()
        };
        result.push(
            value.ok_or_else(|| malformed(kernel, o.index(), "the output was not computed"))?,
        );
    }
    Ok(result)
}

/// A [`EvalError::Malformed`] for node `index`.
fn malformed(kernel: &Kernel, index: usize, detail: &str) -> EvalError {
    EvalError::Malformed {
        node: index,
        op: kernel.graph.node(NodeId::new(index)).op.to_string(),
        detail: detail.to_string(),
    }
}

/// Checks the number of inputs and each input's shape against the bound parameter shapes.
fn check_inputs(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[ArrayD<f64>],
) -> Result<(), EvalError> {
    if inputs.len() != kernel.params.len() {
        return Err(EvalError::InputCount {
            kernel: kernel.name.clone(),
            expected: kernel.params.len(),
            got: inputs.len(),
        });
    }
    for (param, input) in kernel.params.iter().zip(inputs) {
        let expected =
            resolve_checked(&param.shape, bindings, || format!("input `{}`", param.name))?;
        if input.ndim() != expected.len() {
            return Err(EvalError::InputRank {
                input: param.name.clone(),
                declared: crate::dim::format_shape(&param.shape),
                expected: expected.len(),
                got: input.ndim(),
            });
        }
        for (axis, (&want, &got)) in expected.iter().zip(input.shape()).enumerate() {
            if want != got {
                return Err(EvalError::InputShape {
                    input: param.name.clone(),
                    axis,
                    dim: param.shape[axis].to_string(),
                    expected: want,
                    got,
                });
            }
        }
    }
    Ok(())
}

/// Computes one node from its operand values; errors are IR invariant violations.
fn eval_node(
    kernel: &Kernel,
    bindings: &Bindings,
    op: &Op,
    shape: &[usize],
    args: &[&ArrayD<f64>],
    inputs: &[ArrayD<f64>],
) -> Result<ArrayD<f64>, String> {
    Ok(match op {
        Op::Input { index, .. } => inputs
            .get(*index)
            .ok_or_else(|| format!("input #{index} of {} does not exist", kernel.params.len()))?
            .clone(),
        Op::Const(value) => ArrayD::from_elem(IxDyn(&[]), *value),
        Op::DimValue(dim) => {
            let value = dim
                .resolve(bindings)
                .ok_or_else(|| format!("dimension `{dim}` is not bound"))?;
            ArrayD::from_elem(IxDyn(&[]), value as f64)
        }
        Op::Fill { value } => ArrayD::from_elem(IxDyn(shape), *value),
        Op::RelPos => relpos(shape)?,
        Op::Unary(u) => args[0].mapv(|x| unary(*u, x)),
        Op::Binary(b) => binary(*b, args[0], args[1])?,
        Op::MatMul => matmul(args[0], args[1])?,
        Op::Transpose => transpose(args[0])?,
        Op::Reduce { op, axis } => reduce(*op, *axis, args[0])?,
        Op::Softmax { axis } => softmax(*axis, args[0])?,
        Op::SoftmaxSink => reduction::softmax_sink(args[0], args[1])?,
        Op::Pool { op, size } => {
            let size = size
                .resolve(bindings)
                .ok_or_else(|| format!("the pool size `{size}` is not bound"))?;
            let size = usize::try_from(size).map_err(|e| e.to_string())?;
            reduction::pool(*op, size, args[0])?
        }
        Op::Cumsum { axis } => reduction::cumsum(*axis, args[0])?,
        Op::Mask { pattern, fill } => {
            let pattern = pattern.resolve(bindings).map_err(|e| e.to_string())?;
            mask(&pattern, *fill, args[0], &args[1..])?
        }
        Op::Cast { to } => args[0].mapv(|x| round_to(*to, x)),
        Op::Random { kind, seed } => {
            let &[rows, cols] = shape else {
                return Err(format!(
                    "a random matrix has shape {shape:?}, not [rows, cols]"
                ));
            };
            let data = crate::random::shared_random_matrix(*kind, *seed, rows, cols).to_vec();
            ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| e.to_string())?
        }
        Op::Attention(a) => fused::attention(a, args, bindings)?,
        Op::LinearAttention(l) => fused::linear(l, args)?,
        Op::Backward(b) => backward::evaluate(b, args, shape, bindings)?,
    })
}

/// `relpos(m, n)`: entry (i, j) is `j - (i + n - m)`.
fn relpos(shape: &[usize]) -> Result<ArrayD<f64>, String> {
    let &[m, n] = shape else {
        return Err(format!("relpos has shape {shape:?}, not [m, n]"));
    };
    Ok(ArrayD::from_shape_fn(IxDyn(&[m, n]), |index| {
        let (i, j) = (index[0] as i128, index[1] as i128);
        (j - (i + n as i128 - m as i128)) as f64
    }))
}

/// One elementwise unary function.
pub fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        // NaN < 0 is false, so NaN passes through.
        UnaryOp::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        UnaryOp::Elu => {
            if x > 0.0 {
                x
            } else {
                x.exp_m1()
            }
        }
        UnaryOp::Abs => x.abs(),
    }
}

/// IEEE 754-2019 `maximum`: NaN if either is NaN; `+0` beats `-0`.
pub fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a > b {
        a
    } else if b > a {
        b
    } else if a.is_sign_positive() {
        a
    } else {
        b
    }
}

/// IEEE 754-2019 `minimum`: NaN if either is NaN; `-0` beats `+0`.
pub fn min_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a < b {
        a
    } else if b < a {
        b
    } else if a.is_sign_negative() {
        a
    } else {
        b
    }
}

/// One elementwise binary function.
pub fn binary_scalar(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => max_nan(a, b),
        BinaryOp::Min => min_nan(a, b),
    }
}

/// The NumPy broadcast of two shapes, or `None` when they are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for (k, slot) in out.iter_mut().enumerate() {
        // Axis k of the result is axis k - (rank - len) of each operand, or 1 when missing.
        let da = (k + a.len()).checked_sub(rank).map_or(1, |i| a[i]);
        let db = (k + b.len()).checked_sub(rank).map_or(1, |i| b[i]);
        *slot = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Elementwise `op` with NumPy broadcasting.
fn binary(op: BinaryOp, a: &ArrayD<f64>, b: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let shape = broadcast_shapes(a.shape(), b.shape()).ok_or_else(|| {
        format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        )
    })?;
    let av = a
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", a.shape()))?;
    let bv = b
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", b.shape()))?;
    let mut out = ArrayD::zeros(IxDyn(&shape));
    Zip::from(&mut out)
        .and(&av)
        .and(&bv)
        .for_each(|o, &x, &y| *o = binary_scalar(op, x, y));
    Ok(out)
}

/// `a @ b` over the last two axes; the leading axes broadcast.
fn matmul(a: &ArrayD<f64>, b: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let (ra, rb) = (a.ndim(), b.ndim());
    if ra < 2 || rb < 2 {
        return Err(format!(
            "matmul of shapes {:?} and {:?} (rank < 2)",
            a.shape(),
            b.shape()
        ));
    }
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(format!(
            "matmul of shapes {:?} and {:?}: inner sizes differ",
            a.shape(),
            b.shape()
        ));
    }
    let batch = broadcast_shapes(&a.shape()[..ra - 2], &b.shape()[..rb - 2]).ok_or_else(|| {
        format!(
            "matmul of shapes {:?} and {:?}: batch axes do not broadcast",
            a.shape(),
            b.shape()
        )
    })?;
    let batches: usize = batch.iter().product();
    let mut shape = batch.clone();
    shape.extend([m, n]);
    if batches == 0 || m == 0 || n == 0 {
        // Empty result: return before looping over a possibly huge batch of empty matrices.
        return Ok(ArrayD::zeros(IxDyn(&shape)));
    }
    let a3 = standard_batched(a, &batch, m, k)?;
    let b3 = standard_batched(b, &batch, k, n)?;
    let mut out = vec![0.0; batches * m * n];
    for bi in 0..batches {
        let a_mat = &a3[bi * m * k..(bi + 1) * m * k];
        let b_mat = &b3[bi * k * n..(bi + 1) * k * n];
        let o_mat = &mut out[bi * m * n..(bi + 1) * m * n];
        // Each output element sums its k products in order p = 0, 1, ...
        for i in 0..m {
            for p in 0..k {
                let x = a_mat[i * k + p];
                for j in 0..n {
                    o_mat[i * n + j] += x * b_mat[p * n + j];
                }
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// `x` broadcast to `batch ++ [rows, cols]`, as a row-major buffer.
fn standard_batched(
    x: &ArrayD<f64>,
    batch: &[usize],
    rows: usize,
    cols: usize,
) -> Result<Vec<f64>, String> {
    let mut shape = batch.to_vec();
    shape.extend([rows, cols]);
    let view = x
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", x.shape()))?;
    Ok(view.iter().copied().collect())
}

/// Swaps the last two axes.
fn transpose(x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    let rank = x.ndim();
    if rank < 2 {
        return Err(format!("transpose of shape {:?} (rank < 2)", x.shape()));
    }
    let mut view = x.view();
    view.swap_axes(rank - 2, rank - 1);
    Ok(view.as_standard_layout().into_owned())
}

/// Reduces `axis`, keeping it with size 1.
fn reduce(op: ReduceOp, axis: usize, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    if axis >= x.ndim() {
        return Err(format!(
            "axis {axis} of shape {:?} is out of range",
            x.shape()
        ));
    }
    let reduced = x.map_axis(Axis(axis), |lane: ArrayView1<'_, f64>| match op {
        ReduceOp::Sum => lane.iter().sum::<f64>(),
        ReduceOp::Mean => lane.iter().sum::<f64>() / lane.len() as f64,
        ReduceOp::Max => lane.iter().fold(f64::NEG_INFINITY, |m, &v| max_nan(m, v)),
        ReduceOp::LogSumExp => reduction::logsumexp_lane(lane),
    });
    Ok(reduced.insert_axis(Axis(axis)))
}

/// Numerically stable softmax along `axis`.
fn softmax(axis: usize, x: &ArrayD<f64>) -> Result<ArrayD<f64>, String> {
    if axis >= x.ndim() {
        return Err(format!(
            "axis {axis} of shape {:?} is out of range",
            x.shape()
        ));
    }
    let mut out = x.clone();
    if out.is_empty() {
        return Ok(out);
    }
    for lane in out.lanes_mut(Axis(axis)) {
        softmax_row(lane);
    }
    Ok(out)
}

/// Softmax of one row in place; see the module docs for NaN and infinities.
fn softmax_row(mut row: ArrayViewMut1<'_, f64>) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| max_nan(m, v));
    if max == f64::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // A NaN max makes every entry NaN through the subtraction.
    row.mapv_inplace(|v| (v - max).exp());
    let total: f64 = row.iter().sum();
    row.mapv_inplace(|v| v / total);
}

/// Rounds `x` to the storage type `to` (through f32, as an f32 engine stores it) and widens it.
pub fn round_to(to: DType, x: f64) -> f64 {
    let single = x as f32;
    match to {
        DType::F32 => f64::from(single),
        DType::F16 => half::f16::from_f32(single).to_f64(),
        DType::Bf16 => half::bf16::from_f32(single).to_f64(),
        // Segment ids are never rounded (every engine compares them as integers).
        DType::I32 => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_min_follow_ieee_maximum() {
        assert!(max_nan(f64::NAN, 1.0).is_nan());
        assert!(max_nan(1.0, f64::NAN).is_nan());
        assert!(min_nan(f64::NAN, f64::NEG_INFINITY).is_nan());
        assert_eq!(max_nan(-1.0, 2.0), 2.0);
        assert_eq!(min_nan(-1.0, 2.0), -1.0);
        assert!(max_nan(-0.0, 0.0).is_sign_positive());
        assert!(max_nan(0.0, -0.0).is_sign_positive());
        assert!(min_nan(0.0, -0.0).is_sign_negative());
        assert!(min_nan(-0.0, 0.0).is_sign_negative());
    }

    #[test]
    fn numpy_broadcast_rules() {
        assert_eq!(broadcast_shapes(&[2, 1, 1], &[3, 3]), Some(vec![2, 3, 3]));
        assert_eq!(broadcast_shapes(&[], &[4]), Some(vec![4]));
        assert_eq!(broadcast_shapes(&[0, 1], &[1, 5]), Some(vec![0, 5]));
        assert_eq!(broadcast_shapes(&[2, 3], &[3, 2]), None);
        assert_eq!(broadcast_shapes(&[0], &[2]), None);
    }

    #[test]
    fn softmax_row_corner_cases() {
        let mut row = ndarray::arr1(&[f64::NEG_INFINITY, f64::NEG_INFINITY]);
        softmax_row(row.view_mut());
        assert_eq!(row.to_vec(), [0.0, 0.0]);
        let mut row = ndarray::arr1(&[0.0, f64::NEG_INFINITY, f64::NAN]);
        softmax_row(row.view_mut());
        assert!(row.iter().all(|v| v.is_nan()));
        let mut row = ndarray::Array1::<f64>::zeros(0);
        softmax_row(row.view_mut());
        assert_eq!(row.len(), 0);
    }

    #[test]
    fn round_to_storage_types() {
        assert_eq!(round_to(DType::F16, 1.0 + 2f64.powi(-11)), 1.0);
        assert_eq!(round_to(DType::F16, 70000.0), f64::INFINITY);
        assert_eq!(round_to(DType::Bf16, 1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(round_to(DType::F32, 1.0 + 2f64.powi(-30)), 1.0);
    }
}
