//! The reference interpreter against independently written expectations: plain nested loops
//! (naive attention with masks written from the LANGUAGE.md table) and hand-computed numbers.

use attnc_ir::bind::{bind_shapes, BindError};
use attnc_ir::interp::{evaluate, EvalError};
use attnc_ir::{
    BinaryOp, Bindings, DType, Dim, Graph, Kernel, MaskPattern, Node, NodeId, Op, Param, ReduceOp,
    UnaryOp,
};
use attnc_syntax::Span;
use ndarray::{ArrayD, IxDyn};

mod interp_support;
use interp_support::{arr, assert_close, random, ref_attention, ref_keeps};

// ---------------------------------------------------------------------------------------------
// A tiny graph builder.

/// `"h,n,1"` → `[Sym h, Sym n, Const 1]`; `""` → `[]`.
fn shape(spec: &str) -> Vec<Dim> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u64>() {
            Ok(v) => Dim::Const(v),
            Err(_) => Dim::Sym(s.to_string()),
        })
        .collect()
}

#[derive(Default)]
struct Builder {
    graph: Graph,
    params: Vec<Param>,
}

impl Builder {
    fn input(&mut self, name: &str, spec: &str) -> NodeId {
        let index = self.params.len();
        self.params.push(Param {
            name: name.to_string(),
            dtype: DType::F32,
            shape: shape(spec),
            span: Span::default(),
        });
        self.node(
            Op::Input {
                index,
                name: name.to_string(),
            },
            spec,
            &[],
        )
    }

    fn node(&mut self, op: Op, spec: &str, operands: &[NodeId]) -> NodeId {
        let node = Node {
            op,
            shape: shape(spec),
            dtype: DType::F32,
            span: Span::default(),
        };
        self.graph.add(node, operands)
    }

    fn kernel(self, output: NodeId) -> Kernel {
        Kernel {
            name: "k".to_string(),
            params: self.params,
            graph: self.graph,
            output,
            ret_dtype: DType::F32,
            extra_outputs: Vec::new(),
            approx: vec![],
            span: Span::default(),
        }
    }
}

fn binds(pairs: &[(&str, u64)]) -> Bindings {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

/// Binds from the inputs' shapes, then evaluates.
fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let bindings = bind_shapes(kernel, &shapes, &Bindings::new()).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

/// `softmax(mask(q @ k.T / sqrt(d), pattern)) @ v` over `q[h, m, d]`, `k, v[h, n, d]`.
fn attention_kernel(pattern: Option<MaskPattern>) -> Kernel {
    let mut b = Builder::default();
    let q = b.input("q", "h,m,d");
    let k = b.input("k", "h,n,d");
    let v = b.input("v", "h,n,d");
    let kt = b.node(Op::Transpose, "h,d,n", &[k]);
    let s = b.node(Op::MatMul, "h,m,n", &[q, kt]);
    let dim = b.node(Op::DimValue(Dim::Sym("d".into())), "", &[]);
    let root = b.node(Op::Unary(UnaryOp::Sqrt), "", &[dim]);
    let mut s = b.node(Op::Binary(BinaryOp::Div), "h,m,n", &[s, root]);
    if let Some(pattern) = pattern {
        s = b.node(
            Op::Mask {
                pattern: pattern.into(),
                fill: f64::NEG_INFINITY,
            },
            "h,m,n",
            &[s],
        );
    }
    let p = b.node(Op::Softmax { axis: 2 }, "h,m,n", &[s]);
    let o = b.node(Op::MatMul, "h,m,d", &[p, v]);
    b.kernel(o)
}

fn patterns() -> Vec<MaskPattern> {
    use MaskPattern::*;
    let bx = Box::new;
    vec![
        Causal,
        Window(0),
        Window(2),
        Dilated { w: 2, r: 2 },
        Dilated { w: 1, r: 3 },
        Global(1),
        Global(2),
        Block(1),
        Block(3),
        And(bx(Causal), bx(Window(1))),
        Or(bx(Block(2)), bx(Global(1))),
        Or(
            bx(And(bx(Causal), bx(Dilated { w: 3, r: 2 }))),
            bx(Global(1)),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference itself, on hand-computed numbers (an oracle that returned zeros would pass
// everything else).

#[test]
fn reference_attention_on_hand_numbers() {
    // One head, d = 1: scores are q*k; keys 0 and ln 3 give weights 1/4 and 3/4.
    let q = arr(&[1, 1, 1], vec![1.0]);
    let k = arr(&[1, 2, 1], vec![0.0, 3f64.ln()]);
    let v = arr(&[1, 2, 1], vec![4.0, 8.0]);
    let want = arr(&[1, 1, 1], vec![0.25 * 4.0 + 0.75 * 8.0]);
    assert_close(&ref_attention(&q, &k, &v, None), &want, 1e-12);
    assert_close(&run(&attention_kernel(None), &[q, k, v]), &want, 1e-12);
}

#[test]
fn reference_masks_match_hand_tables() {
    // causal, m = 2, n = 4: i' = i + 2.
    let keep: Vec<bool> = (0..2)
        .flat_map(|i| (0..4).map(move |j| ref_keeps(&MaskPattern::Causal, i, j, 2, 4)))
        .collect();
    assert_eq!(keep, [true, true, true, false, true, true, true, true]);
    // block(2), m = n = 4
    let keep: Vec<bool> = (0..4)
        .flat_map(|i| (0..4).map(move |j| ref_keeps(&MaskPattern::Block(2), i, j, 4, 4)))
        .collect();
    let want = [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1].map(|b| b == 1);
    assert_eq!(keep, want);
}

// ---------------------------------------------------------------------------------------------
// Softmax on known numbers.

fn softmax_kernel(spec: &str, axis: usize) -> Kernel {
    let mut b = Builder::default();
    let x = b.input("x", spec);
    let s = b.node(Op::Softmax { axis }, spec, &[x]);
    b.kernel(s)
}

#[test]
fn softmax_two_by_two() {
    let x = arr(&[2, 2], vec![0.0, 3f64.ln(), 1.0, 1.0]);
    let got = run(&softmax_kernel("r,c", 1), std::slice::from_ref(&x));
    assert_close(&got, &arr(&[2, 2], vec![0.25, 0.75, 0.5, 0.5]), 1e-12);
    // Along axis 0: columns [0, 1] and [ln 3, 1].
    let got = run(&softmax_kernel("r,c", 0), &[x]);
    let e = std::f64::consts::E;
    let c1 = 3.0 / (3.0 + e);
    assert_close(
        &got,
        &arr(&[2, 2], vec![1.0 / (1.0 + e), c1, e / (1.0 + e), 1.0 - c1]),
        1e-12,
    );
}

#[test]
fn softmax_huge_logits_stay_finite() {
    let x = arr(&[1, 3], vec![1e30, 0.0, -1e30]);
    let got = run(&softmax_kernel("r,c", 1), &[x]);
    assert_close(&got, &arr(&[1, 3], vec![1.0, 0.0, 0.0]), 0.0);
    // The largest logits f32 holds (1e300 is +inf under the f32 range rule, see range.rs).
    let x = arr(&[1, 2], vec![3e38, 3e38]);
    let got = run(&softmax_kernel("r,c", 1), &[x]);
    assert_close(&got, &arr(&[1, 2], vec![0.5, 0.5]), 0.0);
}

#[test]
fn softmax_infinities() {
    let inf = f64::INFINITY;
    let x = arr(
        &[3, 3],
        vec![
            -inf, 0.0, 0.0, // -inf gets weight 0
            -inf, -inf, -inf, // all -inf: zeros
            inf, 0.0, 0.0, // +inf: NaN (inf - inf), documented
        ],
    );
    let got = run(&softmax_kernel("r,c", 1), &[x]);
    assert_eq!(got.row_slice(0), [0.0, 0.5, 0.5]);
    assert_eq!(got.row_slice(1), [0.0, 0.0, 0.0]);
    assert!(got.row_slice(2).iter().all(|v| v.is_nan()));
}

#[test]
fn softmax_nan_propagates_to_its_row_only() {
    let x = arr(&[2, 3], vec![1.0, f64::NAN, 2.0, 1.0, 2.0, 3.0]);
    let got = run(&softmax_kernel("r,c", 1), &[x]);
    assert!(got.row_slice(0).iter().all(|v| v.is_nan()));
    assert!(got.row_slice(1).iter().all(|v| v.is_finite()));
}

#[test]
fn softmax_empty_rows_and_empty_axis() {
    // Rows of length 0: the result is empty, no panic.
    let got = run(&softmax_kernel("r,c", 1), &[ArrayD::zeros(IxDyn(&[3, 0]))]);
    assert_eq!(got.shape(), [3, 0]);
    let got = run(&softmax_kernel("r,c", 1), &[ArrayD::zeros(IxDyn(&[0, 4]))]);
    assert_eq!(got.shape(), [0, 4]);
}

trait RowSlice {
    fn row_slice(&self, r: usize) -> Vec<f64>;
}

impl RowSlice for ArrayD<f64> {
    fn row_slice(&self, r: usize) -> Vec<f64> {
        self.index_axis(ndarray::Axis(0), r)
            .iter()
            .copied()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Attention with every mask pattern, m == n and m != n (end alignment), against the reference.

#[test]
fn attention_every_pattern_and_alignment() {
    let sizes = [(5, 5), (3, 7), (7, 3), (1, 4), (4, 1), (2, 2), (6, 6)];
    let mut seed = 1;
    for pattern in patterns() {
        let kernel = attention_kernel(Some(pattern.clone()));
        for &(m, n) in &sizes {
            for &(h, d) in &[(2, 3), (1, 1)] {
                seed += 1;
                let q = random(&[h, m, d], seed);
                let k = random(&[h, n, d], seed + 1000);
                let v = random(&[h, n, d], seed + 2000);
                let want = ref_attention(&q, &k, &v, Some(&pattern));
                let got = run(&kernel, &[q, k, v]);
                assert!(got.iter().all(|x| x.is_finite()), "{pattern} m={m} n={n}");
                assert_close(&got, &want, 1e-12);
            }
        }
    }
}

#[test]
fn mask_replaces_with_fill_exactly() {
    // mask(x, causal, 7.5) on m = 2, n = 3: i' = i + 1.
    let mut b = Builder::default();
    let x = b.input("x", "m,n");
    let masked = b.node(
        Op::Mask {
            pattern: MaskPattern::Causal,
            fill: 7.5,
        },
        "m,n",
        &[x],
    );
    let kernel = b.kernel(masked);
    let x = arr(&[2, 3], vec![f64::NAN, 2.0, f64::NAN, 4.0, 5.0, 6.0]);
    let got = run(&kernel, &[x]);
    assert!(got[[0, 0]].is_nan());
    assert_eq!(got[[0, 1]], 2.0);
    assert_eq!(got[[0, 2]], 7.5);
    assert_eq!(got.row_slice(1), [4.0, 5.0, 6.0]);
}

#[test]
fn fully_masked_rows_give_zeros() {
    // m > n with causal: queries 0..m-n-1 see no key at all (i' < 0).
    let kernel = attention_kernel(Some(MaskPattern::Causal));
    let (h, m, n, d) = (2, 5, 2, 3);
    let got = run(
        &kernel,
        &[
            random(&[h, m, d], 1),
            random(&[h, n, d], 2),
            random(&[h, n, d], 3),
        ],
    );
    for hh in 0..h {
        for i in 0..m - n {
            for c in 0..d {
                assert_eq!(got[[hh, i, c]], 0.0);
            }
        }
        for c in 0..d {
            assert_ne!(got[[hh, m - 1, c]], 0.0);
        }
    }
}

/// `softmax(mask(s, causal)) @ v` with the scores given directly.
fn masked_softmax_v() -> Kernel {
    let mut b = Builder::default();
    let s = b.input("s", "n,n");
    let v = b.input("v", "n,d");
    let masked = b.node(
        Op::Mask {
            pattern: MaskPattern::Causal,
            fill: f64::NEG_INFINITY,
        },
        "n,n",
        &[s],
    );
    let p = b.node(Op::Softmax { axis: 1 }, "n,n", &[masked]);
    let o = b.node(Op::MatMul, "n,d", &[p, v]);
    b.kernel(o)
}

#[test]
fn nan_in_masked_position_does_not_leak() {
    let n = 4;
    let mut s = random(&[n, n], 9);
    for i in 0..n {
        for j in i + 1..n {
            s[[i, j]] = f64::NAN;
        }
    }
    s[[0, 3]] = f64::INFINITY;
    let got = run(&masked_softmax_v(), &[s, random(&[n, 2], 10)]);
    assert!(got.iter().all(|x| x.is_finite()), "{got:?}");
}

#[test]
fn nan_in_unmasked_position_propagates() {
    let n = 4;
    let mut s = random(&[n, n], 11);
    s[[2, 1]] = f64::NAN;
    let got = run(&masked_softmax_v(), &[s, random(&[n, 2], 12)]);
    for i in 0..n {
        let row = got.row_slice(i);
        if i == 2 {
            assert!(row.iter().all(|x| x.is_nan()));
        } else {
            assert!(row.iter().all(|x| x.is_finite()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Broadcasting and matmul.

#[test]
fn broadcast_head_scalar_times_matrix() {
    // slope[h, 1, 1] * x[n, n] -> [h, n, n]
    let mut b = Builder::default();
    let slope = b.input("slope", "h,1,1");
    let x = b.input("x", "n,n");
    let y = b.node(Op::Binary(BinaryOp::Mul), "h,n,n", &[slope, x]);
    let kernel = b.kernel(y);
    let slope = arr(&[2, 1, 1], vec![2.0, -3.0]);
    let x = random(&[3, 3], 5);
    let got = run(&kernel, &[slope.clone(), x.clone()]);
    assert_eq!(got.shape(), [2, 3, 3]);
    for h in 0..2 {
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(got[[h, i, j]], slope[[h, 0, 0]] * x[[i, j]]);
            }
        }
    }
}

#[test]
fn broadcast_scalar_and_rows() {
    // x[r, c] - const, and x[r, c] / col[r, 1], maximum(x, row[1, c])
    let mut b = Builder::default();
    let x = b.input("x", "r,c");
    let col = b.input("col", "r,1");
    let row = b.input("row", "1,c");
    let one = b.node(Op::Const(1.0), "", &[]);
    let a = b.node(Op::Binary(BinaryOp::Sub), "r,c", &[x, one]);
    let a = b.node(Op::Binary(BinaryOp::Div), "r,c", &[a, col]);
    let a = b.node(Op::Binary(BinaryOp::Max), "r,c", &[a, row]);
    let kernel = b.kernel(a);
    let x = random(&[2, 3], 1);
    let col = arr(&[2, 1], vec![2.0, 4.0]);
    let row = arr(&[1, 3], vec![0.0, -10.0, 10.0]);
    let got = run(&kernel, &[x.clone(), col.clone(), row.clone()]);
    for i in 0..2 {
        for j in 0..3 {
            let want = ((x[[i, j]] - 1.0) / col[[i, 0]]).max(row[[0, j]]);
            assert_eq!(got[[i, j]], want);
        }
    }
}

#[test]
fn matmul_broadcasts_leading_axes() {
    // e[r, n] @ k[h, n, d] -> [h, r, d]
    let mut b = Builder::default();
    let e = b.input("e", "r,n");
    let k = b.input("k", "h,n,d");
    let y = b.node(Op::MatMul, "h,r,d", &[e, k]);
    let kernel = b.kernel(y);
    let (h, r, n, d) = (3, 2, 5, 4);
    let e = random(&[r, n], 1);
    let k = random(&[h, n, d], 2);
    let got = run(&kernel, &[e.clone(), k.clone()]);
    assert_eq!(got.shape(), [h, r, d]);
    for hh in 0..h {
        for i in 0..r {
            for c in 0..d {
                let mut want = 0.0;
                for p in 0..n {
                    want += e[[i, p]] * k[[hh, p, c]];
                }
                assert!((got[[hh, i, c]] - want).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn matmul_batch_one_broadcasts_and_transpose() {
    // a[1, m, k] @ b[h, n, k].T -> [h, m, n]
    let mut b = Builder::default();
    let a = b.input("a", "1,m,k");
    let x = b.input("b", "h,n,k");
    let t = b.node(Op::Transpose, "h,k,n", &[x]);
    let y = b.node(Op::MatMul, "h,m,n", &[a, t]);
    let kernel = b.kernel(y);
    let a = random(&[1, 2, 3], 3);
    let x = random(&[4, 5, 3], 4);
    let got = run(&kernel, &[a.clone(), x.clone()]);
    for h in 0..4 {
        for i in 0..2 {
            for j in 0..5 {
                let want: f64 = (0..3).map(|p| a[[0, i, p]] * x[[h, j, p]]).sum();
                assert!((got[[h, i, j]] - want).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn matmul_hand_numbers() {
    let mut b = Builder::default();
    let a = b.input("a", "2,2");
    let x = b.input("b", "2,2");
    let y = b.node(Op::MatMul, "2,2", &[a, x]);
    let kernel = b.kernel(y);
    let got = run(
        &kernel,
        &[
            arr(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            arr(&[2, 2], vec![5.0, 6.0, 7.0, 8.0]),
        ],
    );
    assert_eq!(got, arr(&[2, 2], vec![19.0, 22.0, 43.0, 50.0]));
}

#[test]
fn same_operand_twice() {
    // x * x: both slots use one node; it must not be freed early.
    let mut b = Builder::default();
    let x = b.input("x", "n");
    let e = b.node(Op::Unary(UnaryOp::Neg), "n", &[x]);
    let y = b.node(Op::Binary(BinaryOp::Mul), "n", &[e, e]);
    let z = b.node(Op::Binary(BinaryOp::Add), "n", &[y, e]);
    let kernel = b.kernel(z);
    let got = run(&kernel, &[arr(&[3], vec![1.0, 2.0, -3.0])]);
    assert_eq!(got, arr(&[3], vec![0.0, 2.0, 12.0]));
}

// ---------------------------------------------------------------------------------------------
// Reductions, elementwise functions, constants.

fn reduce_kernel(op: ReduceOp, axis: usize, out: &str) -> Kernel {
    let mut b = Builder::default();
    let x = b.input("x", "a,b,c");
    let r = b.node(Op::Reduce { op, axis }, out, &[x]);
    b.kernel(r)
}

#[test]
fn reductions_keep_the_axis() {
    let (a, bb, c) = (2, 3, 4);
    let x = random(&[a, bb, c], 7);
    let outs = ["1,b,c", "a,1,c", "a,b,1"];
    for axis in 0..3 {
        for op in [
            ReduceOp::Sum,
            ReduceOp::Max,
            ReduceOp::Mean,
            ReduceOp::LogSumExp,
        ] {
            let got = run(
                &reduce_kernel(op, axis, outs[axis]),
                std::slice::from_ref(&x),
            );
            let mut want_shape = vec![a, bb, c];
            want_shape[axis] = 1;
            assert_eq!(got.shape(), want_shape.as_slice());
            for ((i, j, k), g) in got
                .indexed_iter()
                .map(|(ix, g)| ((ix[0], ix[1], ix[2]), *g))
            {
                let lane: Vec<f64> = (0..x.shape()[axis])
                    .map(|t| match axis {
                        0 => x[[t, j, k]],
                        1 => x[[i, t, k]],
                        _ => x[[i, j, t]],
                    })
                    .collect();
                let want = match op {
                    ReduceOp::Sum => lane.iter().sum::<f64>(),
                    ReduceOp::Mean => lane.iter().sum::<f64>() / lane.len() as f64,
                    ReduceOp::Max => lane.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    ReduceOp::LogSumExp => lane.iter().map(|v| v.exp()).sum::<f64>().ln(),
                };
                assert!((g - want).abs() < 1e-12, "{op} axis {axis}");
            }
        }
    }
}

#[test]
fn reductions_of_empty_axis_and_nan() {
    let x = ArrayD::zeros(IxDyn(&[2, 0, 1]));
    let sum = run(
        &reduce_kernel(ReduceOp::Sum, 1, "a,1,c"),
        std::slice::from_ref(&x),
    );
    assert_eq!(sum, ArrayD::<f64>::zeros(IxDyn(&[2, 1, 1])));
    let max = run(
        &reduce_kernel(ReduceOp::Max, 1, "a,1,c"),
        std::slice::from_ref(&x),
    );
    assert!(max.iter().all(|v| *v == f64::NEG_INFINITY));
    let mean = run(
        &reduce_kernel(ReduceOp::Mean, 1, "a,1,c"),
        std::slice::from_ref(&x),
    );
    assert!(mean.iter().all(|v| v.is_nan()));
    // Reducing another axis of an empty array: still empty.
    let empty = run(&reduce_kernel(ReduceOp::Sum, 0, "1,b,c"), &[x]);
    assert_eq!(empty.shape(), [1, 0, 1]);
    // max with NaN is NaN, wherever the NaN is.
    let x = arr(&[1, 3, 1], vec![f64::NAN, 1.0, 2.0]);
    assert!(run(&reduce_kernel(ReduceOp::Max, 1, "a,1,c"), &[x])[[0, 0, 0]].is_nan());
    let x = arr(&[1, 3, 1], vec![1.0, 2.0, f64::NAN]);
    assert!(run(&reduce_kernel(ReduceOp::Max, 1, "a,1,c"), &[x])[[0, 0, 0]].is_nan());
}

fn elementwise(op: Op, x: &[f64]) -> Vec<f64> {
    let mut b = Builder::default();
    let input = b.input("x", "n");
    let y = b.node(op, "n", &[input]);
    let kernel = b.kernel(y);
    run(&kernel, &[arr(&[x.len()], x.to_vec())])
        .iter()
        .copied()
        .collect()
}

#[test]
fn unary_functions() {
    let nan = f64::NAN;
    let u = |op, x: &[f64]| elementwise(Op::Unary(op), x);
    assert_eq!(u(UnaryOp::Neg, &[1.0, -2.0]), [-1.0, 2.0]);
    assert_eq!(u(UnaryOp::Exp, &[0.0, f64::NEG_INFINITY]), [1.0, 0.0]);
    assert_eq!(u(UnaryOp::Log, &[1.0, 0.0]), [0.0, f64::NEG_INFINITY]);
    assert!(u(UnaryOp::Log, &[-1.0])[0].is_nan());
    assert_eq!(u(UnaryOp::Sqrt, &[4.0, 0.0]), [2.0, 0.0]);
    assert_eq!(u(UnaryOp::Rsqrt, &[4.0, 0.0]), [0.5, f64::INFINITY]);
    assert_eq!(u(UnaryOp::Tanh, &[0.0, 1e3]), [0.0, 1.0]);
    assert_eq!(u(UnaryOp::Sigmoid, &[0.0, -1e3, 1e3]), [0.5, 0.0, 1.0]);
    let relu = u(UnaryOp::Relu, &[-2.0, 3.0, nan]);
    assert_eq!(relu[..2], [0.0, 3.0]);
    assert!(relu[2].is_nan());
    let elu = u(UnaryOp::Elu, &[-1.0, 2.0, f64::NEG_INFINITY]);
    assert!((elu[0] - ((-1f64).exp() - 1.0)).abs() < 1e-15);
    assert_eq!(elu[1..], [2.0, -1.0]);
    assert_eq!(u(UnaryOp::Abs, &[-2.0, 3.0]), [2.0, 3.0]);
    for op in [
        UnaryOp::Exp,
        UnaryOp::Sigmoid,
        UnaryOp::Elu,
        UnaryOp::Tanh,
        UnaryOp::Abs,
    ] {
        assert!(u(op, &[nan])[0].is_nan(), "{op}");
    }
}

#[test]
fn maximum_and_minimum_propagate_nan() {
    let mut b = Builder::default();
    let x = b.input("x", "n");
    let y = b.input("y", "n");
    let hi = b.node(Op::Binary(BinaryOp::Max), "n", &[x, y]);
    let lo = b.node(Op::Binary(BinaryOp::Min), "n", &[x, y]);
    let both = b.node(Op::Binary(BinaryOp::Sub), "n", &[hi, lo]);
    let nan = f64::NAN;
    let x = arr(&[4], vec![1.0, nan, 3.0, -1.0]);
    let y = arr(&[4], vec![2.0, 0.0, nan, -5.0]);
    let got = run(&b.kernel(both), &[x, y]);
    assert_eq!(got[0], 1.0);
    assert!(got[1].is_nan() && got[2].is_nan());
    assert_eq!(got[3], 4.0);
}

#[test]
fn relpos_fill_and_dim_values() {
    // relpos(m, n) with m = 2, n = 4: j - (i + 2).
    let mut b = Builder::default();
    let x = b.input("x", "m,n");
    let rel = b.node(Op::RelPos, "m,n", &[]);
    let ones = b.node(Op::Fill { value: 1.0 }, "m,n", &[]);
    let n = b.node(Op::DimValue(Dim::Sym("n".into())), "", &[]);
    let y = b.node(Op::Binary(BinaryOp::Add), "m,n", &[rel, ones]);
    let y = b.node(Op::Binary(BinaryOp::Mul), "m,n", &[y, n]);
    let y = b.node(Op::Binary(BinaryOp::Add), "m,n", &[y, x]);
    let kernel = b.kernel(y);
    let got = run(&kernel, &[ArrayD::zeros(IxDyn(&[2, 4]))]);
    let want: Vec<f64> = [-2.0, -1.0, 0.0, 1.0, -3.0, -2.0, -1.0, 0.0]
        .iter()
        .map(|r| (r + 1.0) * 4.0)
        .collect();
    assert_eq!(got, arr(&[2, 4], want));
    // m > n: relpos(3, 1) is [[2], [1], [0]] negated: j - (i - 2).
    let mut b = Builder::default();
    let x = b.input("x", "m,n");
    let rel = b.node(Op::RelPos, "m,n", &[]);
    let y = b.node(Op::Binary(BinaryOp::Add), "m,n", &[rel, x]);
    let got = run(&b.kernel(y), &[ArrayD::zeros(IxDyn(&[3, 1]))]);
    assert_eq!(got, arr(&[3, 1], vec![2.0, 1.0, 0.0]));
}

#[test]
fn cast_rounds_to_f16_and_bf16() {
    let cast = |to, x: &[f64]| elementwise(Op::Cast { to }, x);
    let tie = 1.0 + 2f64.powi(-11); // halfway between two f16 values: to even
    let got = cast(
        DType::F16,
        &[tie, 1.0 + 2f64.powi(-10), 65520.0, 1e-8, 0.1, -0.0],
    );
    assert_eq!(got[0], 1.0);
    assert_eq!(got[1], 1.0 + 2f64.powi(-10));
    assert_eq!(got[2], f64::INFINITY);
    assert_eq!(got[3], 0.0);
    assert_eq!(got[4], 0.0999755859375); // nearest f16 to 0.1
    assert!(got[5] == 0.0 && got[5].is_sign_negative());
    assert!(cast(DType::F16, &[f64::NAN])[0].is_nan());
    let got = cast(
        DType::Bf16,
        &[1.0 + 2f64.powi(-8), 1.0 + 3.0 * 2f64.powi(-8), 3e38],
    );
    assert_eq!(got[0], 1.0);
    assert_eq!(got[1], 1.0 + 2f64.powi(-6));
    assert!(got[2].is_finite() && (got[2] - 3e38).abs() / 3e38 < 1e-2);
    let got = cast(DType::F32, &[0.1]);
    assert_eq!(got[0], f64::from(0.1f32));
}

// ---------------------------------------------------------------------------------------------
// Zero-length dimensions.

#[test]
fn zero_length_dims() {
    let kernel = attention_kernel(Some(MaskPattern::Causal));
    // zero keys: every row is empty, the output is zeros
    let got = run(
        &kernel,
        &[
            random(&[2, 3, 4], 1),
            ArrayD::zeros(IxDyn(&[2, 0, 4])),
            ArrayD::zeros(IxDyn(&[2, 0, 4])),
        ],
    );
    assert_eq!(got, ArrayD::<f64>::zeros(IxDyn(&[2, 3, 4])));
    // zero queries, zero heads: empty out
    let got = run(
        &kernel,
        &[
            ArrayD::zeros(IxDyn(&[2, 0, 4])),
            random(&[2, 3, 4], 2),
            random(&[2, 3, 4], 3),
        ],
    );
    assert_eq!(got.shape(), [2, 0, 4]);
    let got = run(
        &kernel,
        &[
            ArrayD::zeros(IxDyn(&[0, 3, 4])),
            ArrayD::zeros(IxDyn(&[0, 3, 4])),
            ArrayD::zeros(IxDyn(&[0, 3, 4])),
        ],
    );
    assert_eq!(got.shape(), [0, 3, 4]);
    // head dim 0 with a sqrt(d) scale is an error, not a division by zero
    let z = ArrayD::zeros(IxDyn(&[1, 2, 0]));
    let err = bind_shapes(&kernel, &vec![Some(vec![1, 2, 0]); 3], &Bindings::new()).unwrap_err();
    assert!(
        matches!(err, BindError::ZeroDimAsNumber { ref symbol } if symbol == "d"),
        "{err}"
    );
    let err = evaluate(
        &kernel,
        &binds(&[("h", 1), ("m", 2), ("n", 2), ("d", 0)]),
        &[z.clone(), z.clone(), z],
    )
    .unwrap_err();
    assert!(
        matches!(err, EvalError::Bind(BindError::ZeroDimAsNumber { .. })),
        "{err}"
    );
    // head dim 0 without a scale: q @ k.T is all zeros, softmax uniform, @ v empty
    let mut b = Builder::default();
    let q = b.input("q", "n,d");
    let k = b.input("k", "n,d");
    let kt = b.node(Op::Transpose, "d,n", &[k]);
    let s = b.node(Op::MatMul, "n,n", &[q, kt]);
    let p = b.node(Op::Softmax { axis: 1 }, "n,n", &[s]);
    let got = run(
        &b.kernel(p),
        &[ArrayD::zeros(IxDyn(&[2, 0])), ArrayD::zeros(IxDyn(&[2, 0]))],
    );
    assert_eq!(got, arr(&[2, 2], vec![0.5; 4]));
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn evaluate_checks_inputs_first() {
    let kernel = attention_kernel(None);
    let b = binds(&[("h", 1), ("m", 2), ("n", 3), ("d", 4)]);
    let q = random(&[1, 2, 4], 1);
    let k = random(&[1, 3, 4], 2);
    let err = evaluate(&kernel, &b, &[q.clone(), k.clone()]).unwrap_err();
    assert_eq!(
        err,
        EvalError::InputCount {
            kernel: "k".into(),
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "kernel `k` takes 3 inputs but 2 were given"
    );
    let err = evaluate(&kernel, &b, &[q.clone(), k.clone(), random(&[1, 4, 4], 3)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `v` axis 1 (`n`) has size 4 but 3 was expected"
    );
    let err = evaluate(&kernel, &b, &[q.clone(), k.clone(), random(&[3, 4], 3)]).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::InputRank {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = evaluate(
        &kernel,
        &binds(&[("h", 1), ("m", 2), ("d", 4)]),
        &[q, k.clone(), k],
    )
    .unwrap_err();
    assert!(
        matches!(err, EvalError::Bind(BindError::Unbound { ref symbol }) if symbol == "n"),
        "{err}"
    );
}

#[test]
fn malformed_graph_is_an_error_not_a_panic() {
    // The IR says [n, n] but the op computes [n].
    let mut b = Builder::default();
    let x = b.input("x", "n");
    let y = b.node(Op::Unary(UnaryOp::Exp), "n,n", &[x]);
    let err = evaluate(&b.kernel(y), &binds(&[("n", 2)]), &[random(&[2], 1)]).unwrap_err();
    assert!(matches!(err, EvalError::Malformed { node: 1, .. }), "{err}");
    // A matmul with a missing operand.
    let mut b = Builder::default();
    let x = b.input("x", "n,n");
    let y = b.node(Op::MatMul, "n,n", &[x]);
    let err = evaluate(&b.kernel(y), &binds(&[("n", 2)]), &[random(&[2, 2], 1)]).unwrap_err();
    assert!(matches!(err, EvalError::Malformed { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Depth: 100,000 nodes on a 2 MiB stack.

#[test]
fn deep_chain_on_small_stack() {
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let mut b = Builder::default();
            let mut x = b.input("x", "n");
            let one = b.node(Op::Const(1.0), "", &[]);
            for _ in 0..100_000 {
                x = b.node(Op::Binary(BinaryOp::Add), "n", &[x, one]);
            }
            let kernel = b.kernel(x);
            let got = run(&kernel, &[arr(&[2], vec![0.0, 0.5])]);
            assert_eq!(got, arr(&[2], vec![100_000.0, 100_000.5]));
            drop(kernel);
        })
        .expect("spawn");
    handle.join().expect("deep chain thread");
}

#[test]
fn empty_arrays_with_huge_other_dims_return_at_once() {
    // h = 0 with n = 2^20: the score tile would be 2^40 entries per head, but there are no heads.
    let kernel = attention_kernel(Some(MaskPattern::Causal));
    let big = 1 << 20;
    let empty = ArrayD::<f64>::zeros(IxDyn(&[0, big, 4]));
    let got = run(&kernel, &[empty.clone(), empty.clone(), empty]);
    assert_eq!(got.shape(), [0, big, 4]);
}

#[test]
fn odd_sizes_from_the_quality_list() {
    for (pattern, m, n, d) in [
        (MaskPattern::Causal, 113, 113, 59),
        (MaskPattern::Window(7), 37, 203, 40),
        (MaskPattern::Block(16), 113, 3, 111),
    ] {
        let q = random(&[1, m, d], 50);
        let k = random(&[1, n, d], 51);
        let v = random(&[1, n, d], 52);
        let want = ref_attention(&q, &k, &v, Some(&pattern));
        let got = run(&attention_kernel(Some(pattern)), &[q, k, v]);
        assert_close(&got, &want, 1e-12);
    }
}

fn arb_pattern() -> impl proptest::strategy::Strategy<Value = MaskPattern> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(MaskPattern::Causal),
        (0u64..4).prop_map(MaskPattern::Window),
        (0u64..3, 1u64..4).prop_map(|(w, r)| MaskPattern::Dilated { w, r }),
        (0u64..3).prop_map(MaskPattern::Global),
        (1u64..4).prop_map(MaskPattern::Block),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone())
                .prop_map(|(a, b)| MaskPattern::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| MaskPattern::Or(Box::new(a), Box::new(b))),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn attention_matches_reference_on_random_shapes(
        pattern in arb_pattern(),
        h in 0usize..3,
        m in 0usize..7,
        n in 0usize..7,
        d in 1usize..5,
        seed in 0u64..1000,
    ) {
        let q = random(&[h, m, d], seed);
        let k = random(&[h, n, d], seed + 1);
        let v = random(&[h, n, d], seed + 2);
        let want = ref_attention(&q, &k, &v, Some(&pattern));
        let got = run(&attention_kernel(Some(pattern)), &[q, k, v]);
        assert_close(&got, &want, 1e-12);
    }
}
