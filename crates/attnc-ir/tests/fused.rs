//! The fused ops mean their plain form: each is evaluated directly and through
//! `fused::expand`, on random shapes (0, 1 and odd sizes, m ≠ n, broadcast batches), and
//! scaled attention also against independent loops.

mod interp_support;

use attnc_ir::build::GraphBuilder;
use attnc_ir::fused::expand::expand;
use attnc_ir::interp::evaluate;
use attnc_ir::{
    Attention, BinaryOp, Bindings, DType, Decay, Dim, Kernel, LinearAttention, MaskPattern,
    Normalizer, Op, Param, Precision, ScoreExpr, UnaryOp,
};
use attnc_syntax::Span;
use interp_support::{assert_close, random, ref_attention};
use ndarray::ArrayD;
use proptest::prelude::*;

fn shape(spec: &str) -> Vec<Dim> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim().parse::<u64>() {
            Ok(v) => Dim::Const(v),
            Err(_) => Dim::Sym(s.trim().to_string()),
        })
        .collect()
}

/// A kernel of one fused op over parameters named and shaped by `params`.
fn kernel(params: &[(&str, &str)], op: Op) -> Kernel {
    let params: Vec<Param> = params
        .iter()
        .map(|(name, spec)| Param {
            name: name.to_string(),
            dtype: DType::F32,
            shape: shape(spec),
            span: Span::default(),
        })
        .collect();
    let mut b = GraphBuilder::with_params(&params);
    let args: Vec<_> = (0..params.len()).map(attnc_ir::NodeId::new).collect();
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

fn binds(pairs: &[(&str, usize)]) -> Bindings {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), *v as u64))
        .collect()
}

/// Evaluates `kernel` fused and expanded on random inputs; returns the fused result.
fn both(kernel: &Kernel, b: &Bindings, seed: u64) -> (Vec<ArrayD<f64>>, ArrayD<f64>) {
    let inputs: Vec<ArrayD<f64>> = kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
            random(&s, seed.wrapping_mul(7).wrapping_add(i as u64))
        })
        .collect();
    let fused = evaluate(kernel, b, &inputs).expect("fused evaluates");
    let plain = expand(kernel).expect("expands");
    assert!(plain.graph.topo_order().iter().all(|&id| !matches!(
        plain.graph.node(id).op,
        Op::Attention(_) | Op::LinearAttention(_)
    )));
    let want = evaluate(&plain, b, &inputs).expect("plain form evaluates");
    assert_close(&fused, &want, 1e-12);
    (inputs, fused)
}

fn patterns() -> Vec<Option<MaskPattern>> {
    vec![
        None,
        Some(MaskPattern::Causal),
        Some(MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(2)),
        )),
        Some(MaskPattern::Or(
            Box::new(MaskPattern::Block(3)),
            Box::new(MaskPattern::Global(1)),
        )),
        Some(MaskPattern::Dilated { w: 2, r: 2 }),
    ]
}

fn inv_sqrt_d() -> ScoreExpr {
    ScoreExpr::Binary(
        BinaryOp::Div,
        Box::new(ScoreExpr::Const(1.0)),
        Box::new(ScoreExpr::Unary(
            UnaryOp::Sqrt,
            Box::new(ScoreExpr::Dim(Dim::Sym("d".into()))),
        )),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn scaled_attention_is_its_plain_form_and_the_loops(
        h in 0usize..3, m in 0usize..7, n in 0usize..7, d in 1usize..5, e in 0usize..4,
        p in 0usize..5, seed in any::<u64>(),
    ) {
        let op = Op::Attention(Box::new(Attention::scaled(inv_sqrt_d(), patterns()[p].clone().map(Into::into))));
        let k = kernel(&[("q", "h, m, d"), ("k", "h, n, d"), ("v", "h, n, e")], op);
        let b = binds(&[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)]);
        let (inputs, fused) = both(&k, &b, seed);
        let want = ref_attention(&inputs[0], &inputs[1], &inputs[2], patterns()[p].as_ref());
        assert_close(&fused, &want, 1e-12);
    }

    #[test]
    fn scored_attention_with_broadcast_biases(
        h in 1usize..3, m in 0usize..6, n in 0usize..6, d in 1usize..4, p in 0usize..5,
        seed in any::<u64>(),
    ) {
        // 4 tanh((s / sqrt(d) + slope relpos + bias) / 4), int8 precision evaluated exactly.
        let biased = ScoreExpr::Binary(
            BinaryOp::Add,
            Box::new(ScoreExpr::Binary(
                BinaryOp::Add,
                Box::new(ScoreExpr::scaled(inv_sqrt_d())),
                Box::new(ScoreExpr::Binary(BinaryOp::Mul, Box::new(ScoreExpr::Bias(0)), Box::new(ScoreExpr::RelPos))),
            )),
            Box::new(ScoreExpr::Bias(1)),
        );
        let capped = ScoreExpr::Binary(
            BinaryOp::Mul,
            Box::new(ScoreExpr::Const(4.0)),
            Box::new(ScoreExpr::Unary(
                UnaryOp::Tanh,
                Box::new(ScoreExpr::Binary(BinaryOp::Div, Box::new(biased), Box::new(ScoreExpr::Const(4.0)))),
            )),
        );
        let op = Op::Attention(Box::new(Attention {
            score: capped,
            mask: patterns()[p].clone().map(Into::into),
            precision: Precision::Int8,
            lse: false,
        }));
        let k = kernel(
            &[("q", "h, m, d"), ("k", "n, d"), ("v", "1, n, d"), ("slope", "h, 1, 1"), ("bias", "m, n")],
            op,
        );
        let b = binds(&[("h", h), ("m", m), ("n", n), ("d", d)]);
        both(&k, &b, seed);
    }

    #[test]
    fn linear_attention_is_its_plain_form(
        h in 0usize..3, m in 0usize..7, n in 0usize..7, d in 1usize..4, e in 0usize..4,
        causal in any::<bool>(), normalizer in 0usize..3, seed in any::<u64>(),
    ) {
        let normalizer = match normalizer {
            0 => Normalizer::None,
            1 => Normalizer::Sum { eps: 0.0 },
            _ => Normalizer::Sum { eps: 0.25 },
        };
        let op = Op::LinearAttention(LinearAttention { causal, normalizer, decay: Decay::None });
        // Positive features so the sums stay away from 0.
        let k = kernel(&[("q", "h, m, d"), ("k", "h, n, d"), ("v", "n, e")], op);
        let b = binds(&[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)]);
        let inputs: Vec<ArrayD<f64>> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
                random(&s, seed.wrapping_mul(7).wrapping_add(i as u64)).mapv(|x| if i < 2 { x.exp() } else { x })
            })
            .collect();
        let fused = evaluate(&k, &b, &inputs).expect("fused evaluates");
        let want = evaluate(&expand(&k).expect("expands"), &b, &inputs).expect("plain");
        assert_close(&fused, &want, 1e-10);
    }

    // Slopes of either sign (growth too), per head, m ≠ n, every normalizer.
    #[test]
    fn decayed_linear_attention_is_its_plain_form(
        h in 0usize..3, m in 0usize..7, n in 0usize..7, d in 1usize..4, e in 0usize..4,
        normalizer in 0usize..3, seed in any::<u64>(),
    ) {
        let normalizer = match normalizer {
            0 => Normalizer::None,
            1 => Normalizer::Sum { eps: 0.0 },
            _ => Normalizer::Sum { eps: 0.25 },
        };
        let op = Op::LinearAttention(LinearAttention { causal: true, normalizer, decay: Decay::Slope });
        let k = kernel(&[("q", "h, m, d"), ("k", "h, n, d"), ("v", "n, e"), ("a", "h, 1, 1")], op);
        let b = binds(&[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)]);
        let inputs: Vec<ArrayD<f64>> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
                random(&s, seed.wrapping_mul(7).wrapping_add(i as u64)).mapv(|x| if i < 2 { x.exp() } else { x })
            })
            .collect();
        let fused = evaluate(&k, &b, &inputs).expect("fused evaluates");
        let want = evaluate(&expand(&k).expect("expands"), &b, &inputs).expect("plain");
        assert_close(&fused, &want, 1e-10);
    }
}

/// Retention against a separately written recurrence: `S_i = γ S_{i−1} + k_i v_iᵀ`,
/// `out_i = q_i S_i`, with `γ = exp(-a)`.
#[test]
fn decayed_linear_attention_is_the_retention_recurrence() {
    let op = Op::LinearAttention(LinearAttention {
        causal: true,
        normalizer: Normalizer::None,
        decay: Decay::Slope,
    });
    let k = kernel(
        &[("q", "n, 2"), ("k", "n, 2"), ("v", "n, 3"), ("a", "")],
        op,
    );
    let n = 9;
    let b = binds(&[("n", n)]);
    let (q, kk, v) = (random(&[n, 2], 1), random(&[n, 2], 2), random(&[n, 3], 3));
    let a = ndarray::arr0(0.7).into_dyn();
    let out = evaluate(&k, &b, &[q.clone(), kk.clone(), v.clone(), a]).expect("evaluates");
    let gamma = (-0.7f64).exp();
    let mut state = [[0.0; 3]; 2];
    for i in 0..n {
        for (r, row) in state.iter_mut().enumerate() {
            for (c, s) in row.iter_mut().enumerate() {
                *s = gamma * *s + kk[[i, r]] * v[[i, c]];
            }
        }
        for c in 0..3 {
            let want = q[[i, 0]] * state[0][c] + q[[i, 1]] * state[1][c];
            assert!(
                (out[[i, c]] - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "row {i}"
            );
        }
    }
}

#[test]
fn causal_linear_attention_keeps_later_nan_keys_out_of_earlier_rows() {
    let op = Op::LinearAttention(LinearAttention {
        causal: true,
        normalizer: Normalizer::Sum { eps: 0.0 },
        decay: Decay::None,
    });
    let k = kernel(&[("q", "n, 1"), ("k", "n, 1"), ("v", "n, 1")], op);
    let b = binds(&[("n", 3)]);
    let q = ndarray::arr2(&[[1.0], [1.0], [1.0]]).into_dyn();
    let kk = ndarray::arr2(&[[1.0], [2.0], [f64::NAN]]).into_dyn();
    let v = ndarray::arr2(&[[3.0], [6.0], [1.0]]).into_dyn();
    let out = evaluate(&k, &b, &[q, kk, v]).expect("evaluates");
    assert_eq!(out[[0, 0]], 3.0);
    assert_eq!(out[[1, 0]], 5.0);
    assert!(out[[2, 0]].is_nan());
}
