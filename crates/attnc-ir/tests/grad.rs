//! Gradients of plain programs against central finite differences of the f64 interpreter:
//! every example of `examples/*.attn` (with respect to every parameter), hand-written corner
//! cases (broadcasting, ties, masks with fully masked rows, f16 returns), and random programs.

mod grad_support;

use attnc_ir::bind::bind_shapes;
use attnc_ir::build::GraphBuilder;
use attnc_ir::grad::{parse_wrt, vjp, GradError};
use attnc_ir::interp::{evaluate, evaluate_outputs};
use attnc_ir::{
    BinaryOp, Bindings, DType, Dim, Kernel, MaskPattern, Module, NodeId, Op, Param, ReduceOp,
    UnaryOp,
};
use attnc_syntax::Span;
use grad_support::{check, random, without_casts};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

fn compile(src: &str) -> Module {
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "parse: {diagnostics:?}");
    attnc_ir::lower::lower_file(&file).unwrap_or_else(|e| panic!("lower: {e:?}"))
}

/// Small odd sizes for every dimension symbol the examples use (m ≠ n where both appear).
fn small_bindings() -> Bindings {
    [
        ("h", 2),
        ("n", 7),
        ("m", 3),
        ("d", 3),
        ("r", 4),
        ("e", 5),
        ("w", 2),
        ("p", 3),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Random inputs of `kernel` at `b`, one stream per parameter.
fn inputs(kernel: &Kernel, b: &Bindings, seed: u64) -> Vec<ndarray::ArrayD<f64>> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
            random(&shape, seed + i as u64)
        })
        .collect()
}

#[test]
fn every_example_matches_central_differences() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "examples: {files:?}");
    for path in files {
        let src = std::fs::read_to_string(&path).expect("readable");
        for kernel in compile(&src).kernels {
            let kernel = without_casts(&kernel);
            let given = small_bindings();
            let symbols = attnc_ir::bind::kernel_symbols(&kernel);
            let b: Bindings = given
                .into_iter()
                .filter(|(k, _)| symbols.contains(k))
                .collect();
            let shapes: Vec<Option<Vec<usize>>> = vec![None; kernel.params.len()];
            let b = bind_shapes(&kernel, &shapes, &b).expect("binds");
            let xs = inputs(&kernel, &b, 11);
            let all: Vec<usize> = (0..kernel.params.len()).collect();
            check(&kernel, &b, &xs, &all, 5);
        }
    }
}

fn param(name: &str, shape: &[u64]) -> Param {
    Param {
        name: name.to_string(),
        dtype: DType::F32,
        shape: shape.iter().map(|&d| Dim::Const(d)).collect(),
        span: Span::default(),
    }
}

fn kernel_of(params: Vec<Param>, b: GraphBuilder, output: NodeId) -> Kernel {
    Kernel {
        name: "k".to_string(),
        params,
        graph: b.graph,
        output,
        ret_dtype: DType::F32,
        extra_outputs: Vec::new(),
        approx: vec![],
        span: Span::default(),
    }
}

#[test]
fn source_corner_cases_match_central_differences() {
    let cases = [
        // Broadcasting both ways, rank-lower operands, reductions of every kind.
        "kernel f(a: f32[h, n, d], b: f32[n, d], c: f32[h, 1, 1]) -> f32[h, n, 1] {
            return sum(a * b + c, -1) + mean(a / (b * b + 1), 2) - max(a - c, -1);
        }",
        // Every unary function, on domains where each is smooth.
        "kernel f(x: f32[n, d]) -> f32[n, d] {
            let p = x * x + 0.5;
            return exp(x) + log(p) + sqrt(p) + rsqrt(p) + tanh(x) + sigmoid(x) + relu(x)
                + elu(x) + abs(x) - x;
        }",
        // maximum and minimum, and a softmax over a masked matrix with fully masked rows
        // (m = 3 queries, n = 2 keys, causal: the first query keeps nothing).
        "kernel f(q: f32[m, d], k: f32[n, d], w: f32[m, n]) -> f32[m, n] {
            let s = maximum(q @ k.T, w) * minimum(w, q @ k.T);
            return softmax(mask(s, causal)) + mask(w, window(0), 0.5);
        }",
        // Matrix products with broadcast batches: the shared operand sums over the heads.
        "kernel f(x: f32[h, n, e], w: f32[e, d], k: f32[1, n, d]) -> f32[h, n, n] {
            return softmax((x @ w) @ k.T);
        }",
        // The hierarchical forms: a per-head sink (its gradient summed over the rows), the
        // log-sum-exp (a softmax), running sums along the rows.
        "kernel f(x: f32[h, n, d], s: f32[h, 1, 1]) -> f32[h, n, d] {
            return softmax_sink(x * 2, s) + logsumexp(x, -1) * x + cumsum(x * x, 1);
        }",
    ];
    let b: Bindings = [("h", 2), ("n", 2), ("m", 3), ("d", 3), ("e", 4)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    for (i, src) in cases.iter().enumerate() {
        let kernel = compile(src).kernels.remove(0);
        let symbols = attnc_ir::bind::kernel_symbols(&kernel);
        let b: Bindings = b
            .iter()
            .filter(|(k, _)| symbols.contains(k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let xs = inputs(&kernel, &b, 100 + i as u64);
        let all: Vec<usize> = (0..kernel.params.len()).collect();
        check(&kernel, &b, &xs, &all, i as u64);
    }
}

#[test]
fn pooling_matches_central_differences() {
    // Blocks of 2 over 5 rows (the last block has one row), pooled keys and values in an
    // attention and a max-pool (distinct values: its maximum is unique, so differentiable).
    let kernel = compile(
        "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] {
            let s = q @ mean_pool(k, 2).T;
            return softmax(s) @ max_pool(v * 3, 2) + softmax(s) @ mean_pool(v * v, 2);
        }",
    )
    .kernels
    .remove(0);
    let b: Bindings = [("m", 3), ("n", 5), ("d", 3)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let xs = inputs(&kernel, &b, 77);
    check(&kernel, &b, &xs, &[0, 1, 2], 7);
}

#[test]
fn max_pool_gives_the_block_gradient_to_its_first_maximum() {
    let kernel = compile(
        "kernel f(x: f32[n, d]) {
            return max_pool(x, 2);
        }",
    )
    .kernels
    .remove(0);
    let b: Bindings = [("n", 3), ("d", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let grads = vjp(&kernel, &[0]).expect("differentiates");
    // Rows 0 and 1 tie in block 0: the first gets the gradient; row 2 is block 1 alone.
    let x = ArrayD::from_shape_vec(IxDyn(&[3, 1]), vec![4.0, 4.0, -1.0]).expect("shape");
    let cotangent = ArrayD::from_elem(IxDyn(&[2, 1]), 1.0);
    let dx = evaluate(&grads.kernel(0), &b, &[x, cotangent]).expect("evaluates");
    assert_eq!(dx.iter().copied().collect::<Vec<_>>(), vec![1.0, 0.0, 1.0]);
}

#[test]
fn fully_masked_rows_and_masked_entries_get_zero_gradient() {
    let kernel = compile(
        "kernel f(q: f32[m, d], k: f32[n, d]) -> f32[m, n] {
            return softmax(mask(q @ k.T, causal));
        }",
    )
    .kernels
    .remove(0);
    let b: Bindings = [("m", 4), ("n", 2), ("d", 2)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let grads = vjp(&kernel, &[0]).expect("differentiates");
    let xs = vec![random(&[4, 2], 1), random(&[2, 2], 2), random(&[4, 2], 3)];
    let dq = evaluate(&grads.kernel(0), &b, &xs).expect("evaluates");
    // Queries 0 and 1 (i' = -2, -1) keep no key: their gradient rows are exactly zero.
    for i in 0..2 {
        for c in 0..2 {
            assert_eq!(dq[[i, c]], 0.0);
        }
    }
    assert!(dq.iter().skip(4).any(|&x| x != 0.0));
}

#[test]
fn f16_returns_pass_gradients_straight_through() {
    let kernel = compile("kernel f(x: f16[n], w: f32[n]) -> f16[n] { return exp(x) * w; }")
        .kernels
        .remove(0);
    let b: Bindings = [("n".to_string(), 5)].into_iter().collect();
    let grads = vjp(&kernel, &[0, 1]).expect("differentiates");
    let xs = vec![random(&[5], 1), random(&[5], 2), random(&[5], 3)];
    let got = evaluate_outputs(&grads.kernel(0), &b, &xs, &grads.outputs()).expect("evaluates");
    for i in 0..5 {
        let (x, w, g) = (xs[0][[i]], xs[1][[i]], xs[2][[i]]);
        assert!((got[0][[i]] - g * w * x.exp()).abs() < 1e-12);
        assert!((got[1][[i]] - g * x.exp()).abs() < 1e-12);
    }
}

#[test]
fn parameters_are_named_and_checked() {
    let kernel = compile("kernel f(x: f32[n], w: f32[n]) -> f32[n] { return x * 2; }")
        .kernels
        .remove(0);
    assert_eq!(parse_wrt(&kernel, "w, x").expect("names"), vec![1, 0]);
    assert!(matches!(
        parse_wrt(&kernel, "x,y"),
        Err(GradError::UnknownParam { .. })
    ));
    assert!(matches!(
        parse_wrt(&kernel, "x,x"),
        Err(GradError::Duplicate { .. })
    ));
    assert!(matches!(parse_wrt(&kernel, " , "), Err(GradError::Empty)));
    // w does not reach the output: its gradient is zeros of its shape.
    let grads = vjp(&kernel, &[1]).expect("differentiates");
    let b: Bindings = [("n".to_string(), 3)].into_iter().collect();
    let xs = vec![random(&[3], 1), random(&[3], 2), random(&[3], 3)];
    let dw = evaluate(&grads.kernel(0), &b, &xs).expect("evaluates");
    assert_eq!(dw.shape(), &[3]);
    assert!(dw.iter().all(|&x| x == 0.0));
    // A parameter named `cotangent` pushes the cotangent's name aside.
    let kernel = compile("kernel f(cotangent: f32[n]) -> f32[n] { return cotangent * 2; }")
        .kernels
        .remove(0);
    let grads = vjp(&kernel, &[0]).expect("differentiates");
    assert_eq!(grads.params[1].name, "cotangent_1");
    assert!(grads.render_derivation().contains("vjp-mul"));
}

/// A random program over three parameters: a few random ops on a pool of values, then a sum
/// of the last values (so every parameter tends to reach the output).
fn random_program(ops: &[(u8, u8, u8)]) -> Kernel {
    let params = vec![
        param("a", &[2, 3, 4]),
        param("b", &[3, 4]),
        param("c", &[2, 1, 1]),
    ];
    let mut b = GraphBuilder::with_params(&params);
    let mut pool: Vec<NodeId> = (0..3).map(NodeId::new).collect();
    let shape = |b: &GraphBuilder, id: NodeId| b.graph.node(id).shape.clone();
    for &(kind, x, y) in ops {
        let a = pool[x as usize % pool.len()];
        let c = pool[y as usize % pool.len()];
        let rank = shape(&b, a).len();
        let added = match kind % 10 {
            0 => {
                let u = [
                    UnaryOp::Neg,
                    UnaryOp::Exp,
                    UnaryOp::Tanh,
                    UnaryOp::Sigmoid,
                    UnaryOp::Relu,
                    UnaryOp::Elu,
                    UnaryOp::Abs,
                ][y as usize % 7];
                // Bounded inputs keep exp finite.
                let t = b.add(Op::Unary(UnaryOp::Tanh), &[a], None).expect("unary");
                b.add(Op::Unary(u), &[t], None).ok()
            }
            1 => {
                // log, sqrt, rsqrt of a positive value.
                let sq = b
                    .add(Op::Binary(BinaryOp::Mul), &[a, a], None)
                    .expect("mul");
                let one = b.add(Op::Const(0.5), &[], None).expect("const");
                let p = b
                    .add(Op::Binary(BinaryOp::Add), &[sq, one], None)
                    .expect("add");
                let u = [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Rsqrt][y as usize % 3];
                b.add(Op::Unary(u), &[p], None).ok()
            }
            2 | 3 => {
                let op = [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Max,
                    BinaryOp::Min,
                ][(x as usize + y as usize) % 5];
                b.add(Op::Binary(op), &[a, c], None).ok()
            }
            4 => {
                // Division by a value kept away from 0.
                let sq = b
                    .add(Op::Binary(BinaryOp::Mul), &[c, c], None)
                    .expect("mul");
                let one = b.add(Op::Const(1.0), &[], None).expect("const");
                let den = b
                    .add(Op::Binary(BinaryOp::Add), &[sq, one], None)
                    .expect("add");
                b.add(Op::Binary(BinaryOp::Div), &[a, den], None).ok()
            }
            5 => {
                let ct = b.add(Op::Transpose, &[c], None).ok();
                let direct = b.add(Op::MatMul, &[a, c], None).ok();
                direct.or_else(|| ct.and_then(|t| b.add(Op::MatMul, &[a, t], None).ok()))
            }
            6 => (rank >= 1).then(|| {
                let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][y as usize % 3];
                let axis = x as usize % rank;
                b.add(Op::Reduce { op, axis }, &[a], None).expect("reduce")
            }),
            7 => (rank >= 1).then(|| {
                b.add(Op::Softmax { axis: rank - 1 }, &[a], None)
                    .expect("softmax")
            }),
            8 => (rank >= 2).then(|| {
                let pattern = [
                    MaskPattern::Causal,
                    MaskPattern::Window(1),
                    MaskPattern::Block(2),
                ][y as usize % 3]
                    .clone();
                let fill = if x % 2 == 0 { f64::NEG_INFINITY } else { -0.5 };
                let masked = b
                    .add(
                        Op::Mask {
                            pattern: pattern.into(),
                            fill,
                        },
                        &[a],
                        None,
                    )
                    .expect("mask");
                // A -inf fill feeds a softmax, which turns it into zeros.
                if fill.is_finite() {
                    masked
                } else {
                    b.add(Op::Softmax { axis: rank - 1 }, &[masked], None)
                        .expect("softmax")
                }
            }),
            _ => (rank >= 2).then(|| b.add(Op::Transpose, &[a], None).expect("transpose")),
        };
        if let Some(id) = added {
            pool.push(id);
        }
    }
    // The sum of the last three values (broadcast where they can be).
    let mut out = *pool.last().expect("a value");
    for &other in pool.iter().rev().skip(1).take(2) {
        if let Ok(sum) = b.add(Op::Binary(BinaryOp::Add), &[out, other], None) {
            out = sum;
        }
    }
    kernel_of(params, b, out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_programs_match_central_differences(
        ops in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..8),
        seed in 0u64..1000,
    ) {
        let kernel = random_program(&ops);
        let b = Bindings::new();
        let xs = vec![random(&[2, 3, 4], seed), random(&[3, 4], seed + 1), random(&[2, 1, 1], seed + 2)];
        let y = evaluate(&kernel, &b, &xs).expect("evaluates");
        prop_assume!(y.iter().all(|v| v.is_finite() && v.abs() < 1e6));
        check(&kernel, &b, &xs, &[0, 1, 2], seed);
    }
}
