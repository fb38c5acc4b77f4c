//! Gradients of the fused ops: the fused gradient ops (`attention-grad`, with and without a
//! log-sum-exp cotangent, `linear-attention-grad`) against central differences of the fused
//! forward and against the
//! gradient graph of the plain form, on random shapes (m ≠ n, fully masked rows, 0 and 1
//! sizes, grouped-query broadcasting), score forms (scale, biases of several broadcasts, ALiBi
//! slopes, softcaps, a multiplicative bias) and masks; and the masking rules for NaN.

mod grad_support;

use attnc_ir::build::GraphBuilder;
use attnc_ir::fused::expand::expand_map;
use attnc_ir::grad::vjp;
use attnc_ir::interp::{evaluate, evaluate_outputs};
use attnc_ir::{
    Attention, BinaryOp, Bindings, DType, Dim, Kernel, LinearAttention, MaskPattern, NodeId,
    Normalizer, Op, Param, Precision, ScoreExpr, UnaryOp,
};
use attnc_syntax::Span;
use grad_support::{assert_matches, error, measure, random};
use ndarray::ArrayD;
use proptest::prelude::*;

fn param(name: &str, shape: &[usize]) -> Param {
    Param {
        name: name.to_string(),
        dtype: DType::F32,
        shape: shape.iter().map(|&d| Dim::Const(d as u64)).collect(),
        span: Span::default(),
    }
}

/// A kernel whose output is `op` over its parameters, the feature maps `elu(x) + 1` applied
/// to the first `features` of them first (linear attention needs positive features).
fn kernel(params: Vec<Param>, op: Op, features: usize) -> Kernel {
    let mut b = GraphBuilder::with_params(&params);
    let mut args: Vec<NodeId> = (0..params.len()).map(NodeId::new).collect();
    for arg in args.iter_mut().take(features) {
        let e = b.add(Op::Unary(UnaryOp::Elu), &[*arg], None).expect("elu");
        let one = b.add(Op::Const(1.0), &[], None).expect("const");
        *arg = b
            .add(Op::Binary(BinaryOp::Add), &[e, one], None)
            .expect("add");
    }
    let output = b
        .add(op, &args, None)
        .expect("the fused op fits its operands");
    Kernel {
        name: "fused".into(),
        params,
        graph: b.graph,
        output,
        ret_dtype: DType::F32,
        extra_outputs: Vec::new(),
        approx: vec![],
        span: Span::default(),
    }
}

fn bin(op: BinaryOp, a: ScoreExpr, b: ScoreExpr) -> ScoreExpr {
    ScoreExpr::Binary(op, Box::new(a), Box::new(b))
}

fn scaled(c: f64) -> ScoreExpr {
    bin(BinaryOp::Mul, ScoreExpr::Scores, ScoreExpr::Const(c))
}

fn pattern(k: u8) -> Option<MaskPattern> {
    match k % 8 {
        0 => None,
        1 => Some(MaskPattern::Causal),
        2 => Some(MaskPattern::Window(1)),
        3 => Some(MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(2)),
        )),
        4 => Some(MaskPattern::Block(2)),
        5 => Some(MaskPattern::Or(
            Box::new(MaskPattern::Global(1)),
            Box::new(MaskPattern::Window(1)),
        )),
        6 => Some(MaskPattern::Dilated { w: 1, r: 2 }),
        _ => Some(MaskPattern::Causal),
    }
}

/// One random fused attention: layout (plain heads, grouped-query, shared rank-2 values),
/// score form, mask and sizes.
#[derive(Clone, Debug)]
struct Case {
    layout: u8,
    form: u8,
    mask: u8,
    g: usize,
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u8..3,
        0u8..6,
        any::<u8>(),
        1usize..3,
        0usize..6,
        0usize..6,
        1usize..4,
        1usize..4,
    )
        .prop_map(|(layout, form, mask, g, m, n, d, dv)| Case {
            layout,
            form,
            mask,
            g,
            m: if m == 0 { 0 } else { m },
            n,
            d,
            dv,
        })
}

impl Case {
    /// The parameters and the fused op.
    fn build(&self) -> (Vec<Param>, Op) {
        let Case { g, m, n, d, dv, .. } = *self;
        let (q, k, v, lead): (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>) = match self.layout {
            // Grouped-query: two query heads share each key/value head.
            1 => (
                vec![g, 2, m, d],
                vec![g, 1, n, d],
                vec![g, 1, n, dv],
                vec![g, 2],
            ),
            // One key head for every query head, values shared as a rank-2 matrix.
            2 => (vec![g, m, d], vec![1, n, d], vec![n, dv], vec![g]),
            _ => (vec![g, m, d], vec![g, n, d], vec![g, n, dv], vec![g]),
        };
        let mut params = vec![param("q", &q), param("k", &k), param("v", &v)];
        let c = 0.7;
        let per_head = |mut lead: Vec<usize>| {
            lead.extend([1, 1]);
            lead
        };
        let score = match self.form {
            0 => scaled(c),
            // An additive bias, broadcast three ways.
            1 => {
                let shape = match self.mask % 3 {
                    0 => vec![m, n],
                    1 => vec![1, n],
                    _ => vec![m, 1],
                };
                params.push(param("b", &shape));
                bin(BinaryOp::Add, scaled(c), ScoreExpr::Bias(0))
            }
            // An ALiBi slope per head.
            2 => {
                params.push(param("slope", &per_head(lead.clone())));
                bin(
                    BinaryOp::Add,
                    scaled(c),
                    bin(BinaryOp::Mul, ScoreExpr::Bias(0), ScoreExpr::RelPos),
                )
            }
            // A softcap over a biased score.
            3 => {
                params.push(param("b", &[m, n]));
                let cap = 1.5;
                let inner = bin(BinaryOp::Add, scaled(c), ScoreExpr::Bias(0));
                bin(
                    BinaryOp::Mul,
                    ScoreExpr::Const(cap),
                    ScoreExpr::Unary(
                        UnaryOp::Tanh,
                        Box::new(bin(BinaryOp::Div, inner, ScoreExpr::Const(cap))),
                    ),
                )
            }
            // A multiplicative per-head bias and an additive one: the generic chain rule.
            4 => {
                params.push(param("w", &per_head(lead.clone())));
                params.push(param("b", &[1, n]));
                bin(
                    BinaryOp::Add,
                    bin(BinaryOp::Mul, scaled(c), ScoreExpr::Bias(0)),
                    ScoreExpr::Unary(UnaryOp::Sigmoid, Box::new(ScoreExpr::Bias(1))),
                )
            }
            // ALiBi and a softcap together (the full-width kernels' whole score form).
            _ => {
                params.push(param("slope", &per_head(lead)));
                let cap = 2.0;
                let inner = bin(
                    BinaryOp::Add,
                    scaled(c),
                    bin(BinaryOp::Mul, ScoreExpr::RelPos, ScoreExpr::Bias(0)),
                );
                bin(
                    BinaryOp::Mul,
                    ScoreExpr::Unary(
                        UnaryOp::Tanh,
                        Box::new(bin(BinaryOp::Div, inner, ScoreExpr::Const(cap))),
                    ),
                    ScoreExpr::Const(cap),
                )
            }
        };
        let op = Op::Attention(Box::new(Attention {
            score,
            mask: pattern(self.mask).map(Into::into),
            precision: Precision::Exact,
            lse: false,
        }));
        (params, op)
    }
}

fn inputs(params: &[Param], seed: u64) -> Vec<ArrayD<f64>> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape: Vec<usize> = p
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Const(c) => *c as usize,
                    Dim::Sym(_) | Dim::CeilDiv(..) => unreachable!("constant shapes"),
                })
                .collect();
            random(&shape, seed * 31 + i as u64)
        })
        .collect()
}

/// The fused gradients of `kernel` against central differences and against the gradient
/// graph of its plain form.
fn check_fused(kernel: &Kernel, seed: u64) {
    let b = Bindings::new();
    let xs = inputs(&kernel.params, seed);
    let all: Vec<usize> = (0..kernel.params.len()).collect();
    let grads = vjp(kernel, &all).expect("differentiates");
    assert!(grads
        .graph
        .topo_order()
        .into_iter()
        .any(|id| matches!(grads.graph.node(id).op, Op::Backward(_))));
    let y = evaluate(kernel, &b, &xs).expect("evaluates");
    let cotangent = random(y.shape(), seed ^ 0x5EED);
    let m = measure(kernel, &grads, &b, &xs, std::slice::from_ref(&cotangent));
    let names: Vec<String> = grads.gradients.iter().map(|g| g.name.clone()).collect();
    assert_matches(&m, &names, 1e-6, &attnc_ir::print::print_kernel(kernel));
    // The same gradients through the plain form of every fused op.
    let gk = grads.kernel(0);
    let (plain, map) = expand_map(&gk, |_| true).expect("expands");
    assert!(plain.graph.topo_order().into_iter().all(|id| !matches!(
        plain.graph.node(id).op,
        Op::Attention(_) | Op::LinearAttention(_)
    )));
    let outputs: Vec<NodeId> = grads.outputs().iter().map(|o| map[o.index()]).collect();
    let mut all_in = xs.clone();
    all_in.push(cotangent);
    let via_plain = evaluate_outputs(&plain, &b, &all_in, &outputs).expect("evaluates");
    for ((fused, plain), name) in m.gradients.iter().zip(&via_plain).zip(&names) {
        let (fused, plain) = (
            fused.iter().copied().collect::<Vec<_>>(),
            plain.iter().copied().collect::<Vec<_>>(),
        );
        let e = error(&fused, &plain);
        assert!(
            e <= 1e-9,
            "d{name}: fused vs plain {e:e}\n fused {fused:?}\n plain {plain:?}\n{}",
            attnc_ir::print::print_kernel(kernel)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn fused_attention_gradients_match_central_differences(c in case(), seed in 0u64..1000) {
        let (params, op) = c.build();
        check_fused(&kernel(params, op, 0), seed);
    }

    // The row log-sum-exp of the same attentions: its gradient is attention-grad with a
    // log-sum-exp cotangent (over a zero value column). Rows that keep no key have a
    // log-sum-exp of −∞, which central differences cannot take: those cases are skipped.
    #[test]
    fn attention_lse_gradients_match_central_differences(c in case(), seed in 0u64..1000) {
        let (params, op) = c.build();
        let Op::Attention(mut a) = op else { unreachable!("case() builds attentions") };
        a.lse = true;
        let k = kernel(params, Op::Attention(a), 0);
        let y = evaluate(&k, &Bindings::new(), &inputs(&k.params, seed)).expect("evaluates");
        prop_assume!(y.iter().all(|x| x.is_finite()));
        check_fused(&k, seed);
    }

    // An attention returned with its own log-sum-exp: one attention-grad per operand with
    // both cotangents (D = rowsum(dO ∘ o) − dlse).
    #[test]
    fn attention_with_its_lse_differentiates_in_one_backward(c in case(), seed in 0u64..1000) {
        let (params, op) = c.build();
        let Op::Attention(a) = &op else { unreachable!("case() builds attentions") };
        let lse = Op::Attention(Box::new(Attention { lse: true, ..(**a).clone() }));
        let mut k = kernel(params, op, 0);
        let args = k.graph.operands(k.output);
        let mut b = GraphBuilder { graph: k.graph.clone() };
        let second = b.add(lse, &args, None).expect("the log-sum-exp fits");
        k.graph = b.graph;
        k.extra_outputs = vec![attnc_ir::KernelOutput { node: second, dtype: DType::F32 }];
        let xs = inputs(&k.params, seed);
        let ys = evaluate_outputs(&k, &Bindings::new(), &xs, &k.output_nodes()).expect("runs");
        prop_assume!(ys[1].iter().all(|x| x.is_finite()));
        let all: Vec<usize> = (0..k.params.len()).collect();
        let grads = vjp(&k, &all).expect("differentiates");
        prop_assert!(grads.derivation.iter().any(|d| d.rule == "vjp-attention-and-lse"));
        let cotangents: Vec<ArrayD<f64>> =
            ys.iter().enumerate().map(|(i, y)| random(y.shape(), seed ^ (i as u64 + 7))).collect();
        let m = measure(&k, &grads, &Bindings::new(), &xs, &cotangents);
        let names: Vec<String> = grads.gradients.iter().map(|g| g.name.clone()).collect();
        assert_matches(&m, &names, 1e-6, &attnc_ir::print::print_kernel(&k));
    }

    #[test]
    fn linear_attention_gradients_match_central_differences(
        causal in any::<bool>(),
        normalizer in 0u8..3,
        layout in 0u8..2,
        (g, m, n, d, dv) in (1usize..3, 1usize..6, 1usize..6, 1usize..4, 1usize..4),
        seed in 0u64..1000,
    ) {
        // Causal rows before the first key keep nothing: without eps they divide 0 by 0.
        let m = if causal && normalizer == 1 { m.min(n) } else { m };
        let normalizer = match normalizer {
            0 => Normalizer::None,
            1 => Normalizer::Sum { eps: 0.0 },
            _ => Normalizer::Sum { eps: 0.5 },
        };
        let (k, v) = if layout == 1 { (vec![1, n, d], vec![n, dv]) } else { (vec![g, n, d], vec![g, n, dv]) };
        let params = vec![param("q", &[g, m, d]), param("k", &k), param("v", &v)];
        let op = Op::LinearAttention(LinearAttention {
            causal,
            normalizer,
            decay: attnc_ir::Decay::None,
        });
        check_fused(&kernel(params, op, 2), seed);
    }

    // Retention: the gradient of every slot, the per-head slope included, through the plain
    // form's gradient graph.
    #[test]
    fn decayed_linear_attention_gradients_match_central_differences(
        normalizer in 0u8..3,
        (g, m, n, d, dv) in (1usize..3, 1usize..6, 1usize..6, 1usize..4, 1usize..4),
        seed in 0u64..1000,
    ) {
        let m = if normalizer == 1 { m.min(n) } else { m };
        let normalizer = match normalizer {
            0 => Normalizer::None,
            1 => Normalizer::Sum { eps: 0.0 },
            _ => Normalizer::Sum { eps: 0.5 },
        };
        let params = vec![
            param("q", &[g, m, d]),
            param("k", &[g, n, d]),
            param("v", &[n, dv]),
            param("a", &[g, 1, 1]),
        ];
        let op = Op::LinearAttention(LinearAttention {
            causal: true,
            normalizer,
            decay: attnc_ir::Decay::Slope,
        });
        check_fused(&kernel(params, op, 2), seed);
    }
}

#[test]
fn self_attention_differentiates_every_slot() {
    // attention(x, x, x): the gradient of x sums the three slots' partial derivatives.
    let params = vec![param("x", &[2, 5, 3])];
    let mut b = GraphBuilder::with_params(&params);
    let x = NodeId::new(0);
    let a = Attention::scaled(ScoreExpr::Const(0.6), Some(MaskPattern::Causal));
    let out = b
        .add(Op::Attention(Box::new(a)), &[x, x, x], None)
        .expect("fits");
    let kernel = Kernel {
        name: "self".into(),
        params,
        graph: b.graph,
        output: out,
        ret_dtype: DType::F32,
        extra_outputs: Vec::new(),
        approx: vec![],
        span: Span::default(),
    };
    check_fused(&kernel, 3);
}

#[test]
fn nan_at_masked_positions_reaches_no_gradient() {
    // A NaN bias where the causal mask drops the score: the forward replaces it, and so does
    // the backward (even through a softcap, whose partial there is NaN).
    let (m, n) = (4, 4);
    let params = vec![
        param("q", &[1, m, 2]),
        param("k", &[1, n, 2]),
        param("v", &[1, n, 2]),
        param("b", &[m, n]),
    ];
    let cap = 2.0;
    let inner = bin(BinaryOp::Add, scaled(0.5), ScoreExpr::Bias(0));
    let score = bin(
        BinaryOp::Mul,
        ScoreExpr::Const(cap),
        ScoreExpr::Unary(
            UnaryOp::Tanh,
            Box::new(bin(BinaryOp::Div, inner, ScoreExpr::Const(cap))),
        ),
    );
    let op = Op::Attention(Box::new(Attention {
        score,
        mask: Some(MaskPattern::Causal),
        precision: Precision::Exact,
        lse: false,
    }));
    let kernel = kernel(params, op, 0);
    let mut xs = inputs(&kernel.params, 9);
    for i in 0..m {
        for j in i + 1..n {
            xs[3][[i, j]] = f64::NAN;
        }
    }
    let grads = vjp(&kernel, &[0, 1, 2, 3]).expect("differentiates");
    xs.push(random(&[1, m, 2], 77));
    let got = evaluate_outputs(&grads.kernel(0), &Bindings::new(), &xs, &grads.outputs())
        .expect("evaluates");
    for (g, name) in got.iter().zip(["q", "k", "v", "b"]) {
        assert!(g.iter().all(|x| x.is_finite()), "d{name} has a NaN: {g:?}");
    }
    // A NaN at a kept position reaches the gradients of its row.
    xs[3][[2, 1]] = f64::NAN;
    let got = evaluate_outputs(&grads.kernel(0), &Bindings::new(), &xs, &grads.outputs())
        .expect("evaluates");
    assert!(got[0].iter().any(|x| x.is_nan()));
}
