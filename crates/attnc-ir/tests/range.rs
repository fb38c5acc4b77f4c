//! The f32 range rule of the interpreter (docs/language.md, "Values beyond the f32 range"):
//! every node, and every plain-form step of a fused op, is rounded to the f32 range, so the
//! oracle overflows exactly where an f32 engine's values do and nowhere else.

use attnc_ir::bind::bind_shapes;
use attnc_ir::fused::expand::expand;
use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, Kernel, Op};
use ndarray::{ArrayD, IxDyn};

fn only(src: &str) -> Kernel {
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "parse: {diagnostics:?}");
    let mut module = attnc_ir::lower::lower_file(&file).expect("lower");
    module.kernels.remove(0)
}

fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let bindings = bind_shapes(kernel, &shapes, &Bindings::new()).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

fn full(shape: &[usize], value: f64) -> ArrayD<f64> {
    ArrayD::from_elem(IxDyn(shape), value)
}

/// `kernel` with its one plain attention replaced by the fused op (built by hand, so this
/// crate's tests need no optimizer).
fn fused_attention(kernel: &Kernel, scale: f64) -> Kernel {
    use attnc_ir::build::GraphBuilder;
    use attnc_ir::{Attention, Precision, ScoreExpr};
    let mut b = GraphBuilder::with_params(&kernel.params);
    let args: Vec<_> = (0..3).map(attnc_ir::NodeId::new).collect();
    let op = Op::Attention(Box::new(Attention {
        score: ScoreExpr::scaled(ScoreExpr::Const(scale)),
        mask: None,
        precision: Precision::Exact,
        lse: false,
    }));
    let output = b.add(op, &args, None).expect("fits");
    Kernel {
        graph: b.graph,
        output,
        ..kernel.clone()
    }
}

const ATTENTION: &str =
    "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] \
    { return softmax(q @ k.T / sqrt(d)) @ v; }";

#[test]
fn scores_beyond_f32_range_are_infinite_and_their_rows_nan() {
    // q·k = 3e40 does not fit in f32: the score is +inf, and softmax over +inf is NaN, in the
    // plain program and in the fused op alike.
    let k = only(ATTENTION);
    let inputs = [
        full(&[2, 3, 3], 1e20),
        full(&[2, 5, 3], 1e20),
        full(&[2, 5, 3], 1.0),
    ];
    let plain = run(&k, &inputs);
    assert!(plain.iter().all(|x| x.is_nan()), "{plain:?}");
    let fused = run(&fused_attention(&k, 1.0 / 3f64.sqrt()), &inputs);
    assert!(fused.iter().all(|x| x.is_nan()), "{fused:?}");
    // Scores of -inf in every position: the row is fully "masked", zeros.
    let inputs = [
        full(&[2, 3, 3], 1e20),
        full(&[2, 5, 3], -1e20),
        full(&[2, 5, 3], 1.0),
    ];
    assert!(run(&k, &inputs).iter().all(|&x| x == 0.0));
}

#[test]
fn finite_attention_over_values_near_overflow_stays_finite() {
    // The weights are 1/n each: the product with v = 1e38 never leaves the f32 range.
    let k = only(ATTENTION);
    let inputs = [
        full(&[1, 2, 3], 0.0),
        full(&[1, 9, 3], 0.0),
        full(&[1, 9, 3], 1e38),
    ];
    for kernel in [k.clone(), fused_attention(&k, 1.0 / 3f64.sqrt())] {
        let out = run(&kernel, &inputs);
        for &x in &out {
            assert!((x - 1e38).abs() <= 1e38 * 1e-12, "{x}");
        }
    }
}

#[test]
fn every_node_overflows_and_underflows_as_f32_does() {
    let k = only(
        "kernel f(x: f32[n]) -> f32[n] { return log(x * 1e-30) + exp(x) * 0 + (x * 1e10) / 1e10; }",
    );
    // 1e-20 · 1e-30 = 1e-50 is 0 in f32 (log: -inf); exp(100) is +inf (· 0: NaN); 1e30 · 1e10
    // overflows before the division brings it back.
    let out = run(&k, &[ndarray::arr1(&[1e-20, 100.0, 1e30]).into_dyn()]);
    assert_eq!(out[0], f64::NEG_INFINITY);
    assert!(out[1].is_nan());
    assert!(
        out[2].is_nan(),
        "1e40 is +inf; inf · 0 in the middle term is NaN"
    );
    let k = only("kernel f(x: f32[n]) -> f32[n] { return (x * 1e10) / 1e10; }");
    let out = run(&k, &[ndarray::arr1(&[1e30, 3e28, -1e30]).into_dyn()]);
    assert_eq!(out[0], f64::INFINITY);
    assert!(
        (out[1] - 3e28).abs() < 3e28 * 1e-15,
        "inside the range f64 precision stays"
    );
    assert_eq!(out[2], f64::NEG_INFINITY);
}

#[test]
fn inputs_and_constants_beyond_the_range_are_infinite() {
    let k = only("kernel f(x: f32[n]) -> f32[n] { return x + 0; }");
    let out = run(&k, &[ndarray::arr1(&[1e300, -1e39, 1e-300]).into_dyn()]);
    assert_eq!(
        out.as_slice().expect("contiguous"),
        &[f64::INFINITY, f64::NEG_INFINITY, 0.0]
    );
}

#[test]
fn causal_linear_attention_overflows_where_its_plain_form_does() {
    // The numerator A @ V of row i sums (i + 1) · 2e38: beyond f32 from row 1 on.
    let k = only(
        "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] { \
         return (mask(q @ k.T, causal, 0) @ v) / sum(mask(q @ k.T, causal, 0), -1); }",
    );
    let inputs = [full(&[4, 1], 1.0), full(&[4, 1], 1.0), full(&[4, 1], 2e38)];
    let plain = run(&k, &inputs);
    assert!((plain[[0, 0]] - 2e38).abs() < 2e38 * 1e-12);
    assert!(plain.iter().skip(1).all(|x| x.is_infinite()), "{plain:?}");
    let mut b = attnc_ir::build::GraphBuilder::with_params(&k.params);
    let args: Vec<_> = (0..3).map(attnc_ir::NodeId::new).collect();
    let op = Op::LinearAttention(attnc_ir::LinearAttention {
        causal: true,
        normalizer: attnc_ir::Normalizer::Sum { eps: 0.0 },
        decay: attnc_ir::Decay::None,
    });
    let output = b.add(op, &args, None).expect("fits");
    let fused = Kernel {
        graph: b.graph,
        output,
        ..k.clone()
    };
    let got = run(&fused, &inputs);
    let again = run(&expand(&fused).expect("expands"), &inputs);
    for ((a, b), c) in got.iter().zip(&again).zip(&plain) {
        assert!(a == b || (a - b).abs() <= b.abs() * 1e-12, "{a} vs {b}");
        assert!(a == c || (a - c).abs() <= c.abs() * 1e-12, "{a} vs {c}");
    }
}
