//! A fused attention and the log-sum-exp of its scores (an attention node with `lse` set and
//! the same operands) run as one attention step and match the interpreter: dense, causal,
//! windowed (rows whose keys are all masked: LSE = -inf, O = 0), m ≠ n, sizes off the tiles;
//! a log-sum-exp without its attention runs alone; biased, ALiBi and soft-capped scores too.

mod common;

use attnc_ir::build::GraphBuilder;
use attnc_ir::{
    Attention, Bindings, DType, Dim, Kernel, KernelOutput, MaskPattern, NodeId, Op, Param,
    ScoreExpr,
};
use attnc_jit::plan::StepKind;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use attnc_syntax::Span;
use common::{bindings, data, rel_l2, REL_L2};
use proptest::prelude::*;

fn param(name: &str, dims: &[&str]) -> Param {
    Param {
        name: name.to_string(),
        dtype: DType::F32,
        shape: dims.iter().map(|d| Dim::Sym(d.to_string())).collect(),
        span: Span::default(),
    }
}

/// `(attention(q, k, v), lse(q, k))` under `mask`, or only the LSE when `pair` is false.
fn kernel(mask: Option<MaskPattern>, pair: bool) -> Kernel {
    let params = vec![
        param("q", &["h", "m", "d"]),
        param("k", &["h", "n", "d"]),
        param("v", &["h", "n", "e"]),
    ];
    let mut b = GraphBuilder::with_params(&params);
    let args: Vec<NodeId> = (0..3).map(NodeId::new).collect();
    let a = Attention::scaled(ScoreExpr::Const(0.37), mask.map(Into::into));
    let lse = Attention {
        lse: true,
        ..a.clone()
    };
    let o = b
        .add(Op::Attention(Box::new(a)), &args, None)
        .expect("fits");
    let l = b
        .add(Op::Attention(Box::new(lse)), &args, None)
        .expect("fits");
    let (output, extra) = if pair {
        (
            o,
            vec![KernelOutput {
                node: l,
                dtype: DType::F32,
            }],
        )
    } else {
        (l, vec![])
    };
    Kernel {
        name: "lse".into(),
        params,
        graph: b.graph,
        output,
        ret_dtype: DType::F32,
        extra_outputs: extra,
        approx: vec![],
        span: Span::default(),
    }
}

fn masks() -> Vec<Option<MaskPattern>> {
    vec![
        None,
        Some(MaskPattern::Causal),
        // With m > n, causal leaves the first rows without keys.
        Some(MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(3)),
        )),
    ]
}

/// Runs `k` by the JIT (1 and 2 threads, bit-identical) and the interpreter; checks every
/// output and that exactly one attention step ran.
fn check(k: &Kernel, b: &Bindings, seed: u64, fuse: bool) {
    let options = CompileOptions {
        parallel_threshold: 0,
        fuse_attention: fuse,
        ..CompileOptions::default()
    };
    let nodes = k.output_nodes();
    let compiled = CompiledKernel::compile_outputs(k, &nodes, b, &options).expect("compiles");
    let steps = compiled.plan().steps.iter();
    let attention = steps
        .filter(|s| matches!(s.kind, StepKind::Attention(_)))
        .count();
    assert_eq!(attention, usize::from(fuse), "{}", compiled.plan());
    let ins: Vec<(Vec<usize>, Vec<f32>)> = k
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
            let len = shape.iter().product();
            (shape, data(len, seed * 7 + i as u64))
        })
        .collect();
    let want = attnc_ir::interp::evaluate_all(k, b, &common::arrays(&ins)).expect("interpreter");
    let inputs: Vec<Input<'_>> = ins.iter().map(|(_, v)| Input::F32(v)).collect();
    let one = compiled.run_outputs(&inputs, 1).expect("runs");
    let two = compiled.run_outputs(&inputs, 2).expect("runs");
    assert_eq!(one.len(), want.len());
    for ((got, again), want) in one.iter().zip(&two).zip(&want) {
        assert_eq!(got.shape, want.shape());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.data), bits(&again.data));
        let err = rel_l2(&got.data, want);
        assert!(err <= REL_L2, "relative L2 {err:e}");
    }
}

#[test]
fn a_fully_masked_row_has_lse_minus_inf_and_zero_output() {
    // Causal with m = 5 > n = 2: rows 0..3 keep no key.
    let k = kernel(Some(MaskPattern::Causal), true);
    let b = bindings(&[("h", 2), ("m", 5), ("n", 2), ("d", 3), ("e", 4)]);
    check(&k, &b, 1, true);
    let nodes = k.output_nodes();
    let compiled =
        CompiledKernel::compile_outputs(&k, &nodes, &b, &CompileOptions::default()).expect("ok");
    let (q, kk, v) = (data(30, 1), data(12, 2), data(16, 3));
    let out = compiled
        .run_outputs(&[Input::F32(&q), Input::F32(&kk), Input::F32(&v)], 1)
        .expect("runs");
    assert_eq!(out[1].shape, vec![2, 5, 1]);
    for head in 0..2 {
        for row in 0..3 {
            assert_eq!(out[1].data[head * 5 + row], f32::NEG_INFINITY);
            let o = &out[0].data[(head * 5 + row) * 4..][..4];
            assert!(o.iter().all(|&x| x == 0.0), "{o:?}");
        }
        assert!(out[1].data[head * 5 + 3].is_finite());
    }
}

#[test]
fn a_lone_lse_runs_one_attention_step() {
    let k = kernel(Some(MaskPattern::Causal), false);
    let b = bindings(&[("h", 1), ("m", 9), ("n", 9), ("d", 4), ("e", 2)]);
    check(&k, &b, 3, true);
    check(&k, &b, 3, false);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn output_and_lse_match_the_interpreter(h in 1u64..3,
                                            m in prop::sample::select(vec![1u64, 3, 4, 9, 17]),
                                            n in prop::sample::select(vec![1u64, 2, 8, 13, 33]),
                                            d in prop::sample::select(vec![1u64, 4, 7]),
                                            e in prop::sample::select(vec![1u64, 5, 8]),
                                            mask in 0usize..3, fuse in any::<bool>(),
                                            seed in 0u64..1000) {
        let k = kernel(masks()[mask].clone(), true);
        let b = bindings(&[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)]);
        check(&k, &b, seed, fuse);
    }
}

/// The source form `return (softmax(s) @ v, logsumexp(s, -1));` as the optimizer rewrites it:
/// one attention step for both outputs, dense and causal, matching the interpreter.
#[test]
fn the_optimizer_pairs_the_lse_with_its_attention() {
    for mask in ["", ", causal"] {
        let src = format!(
            "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> (f32[h, m, e], f32[h, m, 1]) {{
                let s = mask(q @ k.T / sqrt(d){mask});
                return (softmax(s, -1) @ v, logsumexp(s, -1));
            }}"
        )
        .replace("mask(q @ k.T / sqrt(d))", "q @ k.T / sqrt(d)");
        let k = common::kernel(&src);
        let b = bindings(&[("h", 2), ("m", 7), ("n", 11), ("d", 5), ("e", 3)]);
        let fused = common::optimized(&k, &b);
        assert_eq!(fused.outputs().len(), 2);
        let lse = fused.graph.node(fused.extra_outputs[0].node);
        assert!(
            matches!(&lse.op, Op::Attention(a) if a.lse),
            "{}",
            attnc_ir::print::print_kernel(&fused)
        );
        check(&fused, &b, 5, true);
    }
}

/// Scores with a bias, an ALiBi slope and a softcap (`attention-scored`): the log-sum-exp is
/// fused beside its attention as for a plain scaled score, one step for both outputs, and
/// alone it is one attention step too — no `m × n` scores anywhere.
#[test]
fn the_log_sum_exp_of_scored_attention_fuses() {
    let scores = [
        ("b: f32[m, n]", "q @ k.T / sqrt(d) + b"),
        (
            "b: f32[h, 1, 1]",
            "20 * tanh((q @ k.T / sqrt(d) + b * relpos(m, n)) / 20)",
        ),
    ];
    for (bias, score) in scores {
        for pair in [true, false] {
            let ret = if pair {
                "(f32[h, m, e], f32[h, m, 1]) { return (softmax(s, -1) @ v, logsumexp(s, -1)); }"
            } else {
                "f32[h, m, 1] { return logsumexp(s, -1); }"
            };
            let src = format!(
                "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], {bias}) -> {}",
                ret.replace(
                    "{ return",
                    &format!("{{ let s = mask({score}, causal); return")
                )
            );
            let k = common::kernel(&src);
            let b = bindings(&[("h", 2), ("m", 9), ("n", 70), ("d", 5), ("e", 3)]);
            let fused = common::optimized(&k, &b);
            let lse_node = *fused.output_nodes().last().expect("an output");
            assert!(
                matches!(&fused.graph.node(lse_node).op, Op::Attention(a) if a.lse),
                "{}",
                attnc_ir::print::print_kernel(&fused)
            );
            check(&fused, &b, 11, true);
        }
    }
}
