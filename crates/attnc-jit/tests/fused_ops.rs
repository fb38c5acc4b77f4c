//! Fused ops built directly in the IR (not found by the optimizer) run as fused kernels and
//! match the interpreter: attention over computed operands (an elementwise Q, a product V, a
//! broadcast K), with scores that carry biases, relative positions and softcaps, under every
//! mask kind; causal linear attention with each normalizer. Shapes include 0, 1 and sizes
//! that are not multiples of the tiles.

mod common;

use attnc_ir::build::GraphBuilder;
use attnc_ir::{
    Attention, BinaryOp, DType, Dim, Kernel, LinearAttention, MaskPattern, NodeId, Normalizer, Op,
    Param, Precision, ScoreExpr, UnaryOp,
};
use attnc_jit::plan::StepKind;
use attnc_jit::{CompileOptions, CompiledKernel};
use attnc_syntax::Span;
use common::{bindings, inputs, reference, rel_l2, run_jit, REL_L2};
use proptest::prelude::*;

fn shape(spec: &str) -> Vec<Dim> {
    spec.split(',')
        .map(|s| match s.trim().parse::<u64>() {
            Ok(v) => Dim::Const(v),
            Err(_) => Dim::Sym(s.trim().to_string()),
        })
        .collect()
}

fn params(list: &[(&str, &str)]) -> Vec<Param> {
    list.iter()
        .map(|(name, spec)| Param {
            name: name.to_string(),
            dtype: DType::F32,
            shape: shape(spec),
            span: Span::default(),
        })
        .collect()
}

fn kernel(params: Vec<Param>, b: GraphBuilder, output: NodeId) -> Kernel {
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

/// Compiles `k` at `dims`, checks that it runs `steps` fused steps of `kind`, and compares
/// 1 and 2 threads (bit-identical) with the interpreter.
fn check(k: &Kernel, dims: &[(&str, u64)], seed: u64, kind: fn(&StepKind) -> bool) {
    let b = bindings(dims);
    let options = CompileOptions {
        parallel_threshold: 0,
        ..CompileOptions::default()
    };
    let compiled = CompiledKernel::compile(k, &b, &options).expect("compiles");
    assert_eq!(
        compiled
            .plan()
            .steps
            .iter()
            .filter(|s| kind(&s.kind))
            .count(),
        1,
        "{}",
        compiled.plan()
    );
    let ins = inputs(k, &b, seed);
    let want = reference(k, &b, &ins);
    let one = run_jit(&compiled, k, &ins, 1);
    let two = run_jit(&compiled, k, &ins, 2);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one.data), bits(&two.data));
    let err = rel_l2(&one.data, &want);
    assert!(err <= REL_L2, "relative L2 {err:e} at {dims:?}");
}

fn masks() -> Vec<Option<MaskPattern>> {
    vec![
        None,
        Some(MaskPattern::Causal),
        Some(MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(5)),
        )),
        Some(MaskPattern::Or(
            Box::new(MaskPattern::Block(4)),
            Box::new(MaskPattern::Global(2)),
        )),
        Some(MaskPattern::Dilated { w: 3, r: 2 }),
    ]
}

/// `cap · tanh((s / sqrt(d) + slope · relpos + bias) / cap)`.
fn rich_score() -> ScoreExpr {
    let inv = ScoreExpr::Binary(
        BinaryOp::Div,
        Box::new(ScoreExpr::Const(1.0)),
        Box::new(ScoreExpr::Unary(
            UnaryOp::Sqrt,
            Box::new(ScoreExpr::Dim(Dim::Sym("d".into()))),
        )),
    );
    let alibi = ScoreExpr::Binary(
        BinaryOp::Mul,
        Box::new(ScoreExpr::Bias(0)),
        Box::new(ScoreExpr::RelPos),
    );
    let sum = ScoreExpr::Binary(
        BinaryOp::Add,
        Box::new(ScoreExpr::Binary(
            BinaryOp::Add,
            Box::new(ScoreExpr::scaled(inv)),
            Box::new(alibi),
        )),
        Box::new(ScoreExpr::Bias(1)),
    );
    ScoreExpr::Binary(
        BinaryOp::Mul,
        Box::new(ScoreExpr::Const(6.0)),
        Box::new(ScoreExpr::Unary(
            UnaryOp::Tanh,
            Box::new(ScoreExpr::Binary(
                BinaryOp::Div,
                Box::new(sum),
                Box::new(ScoreExpr::Const(6.0)),
            )),
        )),
    )
}

fn size() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![0u64, 1, 2, 3, 5, 9, 17, 33, 113])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn attention_over_computed_operands(h in 1u64..3, m in size(), n in size(),
                                        d in prop::sample::select(vec![1u64, 3, 8, 13]),
                                        e in prop::sample::select(vec![1u64, 4, 7]),
                                        mask in 0usize..5, rich in any::<bool>(), seed in any::<u64>()) {
        let ps = params(&[
            ("q", "h, m, d"), ("k", "n, d"), ("x", "h, n, e"), ("w", "e, e"),
            ("slope", "h, 1, 1"), ("bias", "m, n"),
        ]);
        let mut b = GraphBuilder::with_params(&ps);
        let arg = |i: usize| NodeId::new(i);
        let two = b.add(Op::Const(2.0), &[], None).expect("const");
        let q = b.add(Op::Binary(BinaryOp::Mul), &[arg(0), two], None).expect("q");
        let v = b.add(Op::MatMul, &[arg(2), arg(3)], None).expect("v");
        let score = if rich { rich_score() } else { ScoreExpr::scaled(ScoreExpr::Const(0.3)) };
        let op = Attention { score, mask: masks()[mask].clone().map(Into::into), precision: Precision::Exact, lse: false };
        let mut operands = vec![q, arg(1), v];
        if rich {
            operands.extend([arg(4), arg(5)]);
        }
        let out = b.add(Op::Attention(Box::new(op)), &operands, None).expect("fits");
        let k = kernel(ps, b, out);
        check(&k, &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed % 1000,
              |s| matches!(s, StepKind::Attention(_)));
    }

    #[test]
    fn causal_linear_attention_with_each_normalizer(h in 1u64..3, m in size(), n in size(),
                                                    d in 1u64..6, e in 1u64..6,
                                                    normalizer in 0usize..3, seed in any::<u64>()) {
        let ps = params(&[("q", "h, m, d"), ("k", "h, n, d"), ("v", "n, e")]);
        let mut b = GraphBuilder::with_params(&ps);
        let arg = |i: usize| NodeId::new(i);
        // Positive features keep the sums away from 0.
        let fq = b.add(Op::Unary(UnaryOp::Exp), &[arg(0)], None).expect("φq");
        let fk = b.add(Op::Unary(UnaryOp::Sigmoid), &[arg(1)], None).expect("φk");
        let normalizer = match normalizer {
            0 => Normalizer::None,
            1 => Normalizer::Sum { eps: 0.0 },
            _ => Normalizer::Sum { eps: 0.5 },
        };
        let op = LinearAttention { causal: true, normalizer, decay: attnc_ir::Decay::None };
        let out = b.add(Op::LinearAttention(op), &[fq, fk, arg(2)], None).expect("fits");
        let k = kernel(ps, b, out);
        // Rows that keep no key (m > n) are 0/0 = NaN in both engines.
        check(&k, &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed % 1000,
              |s| matches!(s, StepKind::Prefix(_) | StepKind::Chunked(_)));
    }
}
