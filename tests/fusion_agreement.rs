//! The optimizer's choice is the plan: for every kernel of every example, at small shapes, the
//! fused ops the optimizer chose are exactly the fused kernels the planner runs (one fused
//! attention step per attention op, one prefix-state step per causal linear attention), and
//! the compiled kernel matches the interpreter on the program as written.

mod common;

use attnc::engine::{execute, Engine};
use attnc::io::{standard_normal, Tensor};
use attnc::ir::{Bindings, DType, Op};
use attnc_jit::plan::StepKind;

/// Every symbol of the kernel at a small odd size (window and block sizes in the examples are
/// larger, so masks are dense or near-dense here; the tile tests cover sparsity).
fn small(kernel: &attnc::ir::Kernel) -> Bindings {
    attnc::ir::bind::kernel_symbols(kernel)
        .into_iter()
        .map(|s| (s, 7))
        .collect()
}

fn inputs(kernel: &attnc::ir::Kernel, b: &Bindings) -> Vec<Tensor> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc::ir::dim::resolve_shape(&p.shape, b).expect("bound");
            let values = standard_normal(3, i as u64, shape.iter().product());
            match p.dtype {
                // (The examples run here have no i32 parameters.)
                DType::F32 | DType::I32 => Tensor::from_f32(shape, values),
                DType::F16 => {
                    Tensor::from_f16(shape, values.into_iter().map(half::f16::from_f32).collect())
                }
                DType::Bf16 => Tensor::from_bf16(
                    shape,
                    values.into_iter().map(half::bf16::from_f32).collect(),
                ),
            }
            .expect("shape")
        })
        .collect()
}

#[test]
fn chosen_fused_ops_are_the_planned_fused_kernels_for_every_example() {
    let mut fused_total = 0;
    for file in common::random_example_files() {
        let text = std::fs::read_to_string(&file).expect("example reads");
        let module = attnc::source::compile_text(&text).expect("example checks");
        for kernel in &module.kernels {
            let name = format!("{}::{}", file.display(), kernel.name);
            let b = small(kernel);
            let compiled = attnc::Compiler::new()
                .compile(kernel, &b)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // The optimizer's chosen form, as the compiled plan was built from it.
            let chosen = attnc::Compiler::new().optimize_exact(kernel, &b).kernel;
            let graph = &chosen.graph;
            let count = |f: &dyn Fn(&Op) -> bool| {
                graph
                    .topo_order()
                    .into_iter()
                    .filter(|&id| f(&graph.node(id).op))
                    .count()
            };
            // A log-sum-exp beside its attention is written by that attention's step.
            let attention_ops = count(&|op| matches!(op, Op::Attention(a) if !a.lse));
            let lse_ops = count(&|op| matches!(op, Op::Attention(a) if a.lse));
            let prefix_ops = count(&|op| matches!(op, Op::LinearAttention(l) if l.causal));
            let steps = &compiled.plan().steps;
            let attention_steps = steps
                .iter()
                .filter(|s| matches!(s.kind, StepKind::Attention(_)))
                .count();
            let prefix_steps = steps
                .iter()
                .filter(|s| matches!(s.kind, StepKind::Prefix(_) | StepKind::Chunked(_)))
                .count();
            if kernel.approx.is_empty() {
                assert_eq!(
                    attention_ops,
                    attention_steps,
                    "{name}:\n{}",
                    compiled.plan()
                );
                assert_eq!(prefix_ops, prefix_steps, "{name}:\n{}", compiled.plan());
            }
            fused_total += attention_steps + prefix_steps;
            // The trace's fusion notes list the same fused ops.
            let noted = compiled.trace.fusion.iter().filter(|n| n.fused).count();
            assert_eq!(
                noted,
                attention_ops + lse_ops + count(&|op| matches!(op, Op::LinearAttention(_)))
            );

            let xs = inputs(kernel, &b);
            let got = compiled.run(&xs, 2).expect("runs").to_f64_vec();
            let want = execute(kernel, &b, &xs, Engine::Interp, 1)
                .expect("interprets")
                .to_f64_vec();
            let (mut num, mut den) = (0.0, 0.0);
            for (g, w) in got.iter().zip(&want) {
                num += (g - w) * (g - w);
                den += w * w;
            }
            let err = (num / den.max(f64::MIN_POSITIVE)).sqrt();
            let bound = if kernel.ret_dtype == DType::F32 {
                1e-5
            } else {
                1e-2
            };
            assert!(err <= bound, "{name}: relative L2 {err:e}");
        }
    }
    assert!(
        fused_total >= 15,
        "only {fused_total} fused kernels over the examples"
    );
}

#[test]
fn the_nystrom_plan_runs_on_the_jit_as_the_interpreter_evaluates_it() {
    // The approximate plan itself (validation is not the point here): machine code and the
    // f64 interpreter on the same plan, at odd lengths, with 16 dividing n and not, within the
    // exact plans' 1e-5 (Newton–Schulz in f32 measured 6e-7 at n = 113).
    let text = std::fs::read_to_string("examples/nystrom.attn").expect("example reads");
    let module = attnc::source::compile_text(&text).expect("example checks");
    let kernel = &module.kernels[0];
    for n in [113, 203, 256] {
        let b: Bindings = [("h", 2), ("n", n), ("d", 40)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let options = attnc_opt::OptimizeOptions {
            approx: attnc_opt::ApproxPolicy {
                allowed: vec![attnc_opt::Approx::Nystrom { m: 16 }],
                tol: 1.0,
            },
            ..attnc_opt::OptimizeOptions::default()
        };
        let plan = attnc_opt::optimize(kernel, &b, &options);
        assert!(plan.trace.approximations[0].applied, "n = {n}");
        let code = attnc::Compiler::new()
            .compile_plan(&plan.kernel, &b)
            .expect("compiles");
        let xs = inputs(kernel, &b);
        let got = attnc::engine::run_compiled(&code, DType::F32, &xs, 2)
            .expect("runs")
            .to_f64_vec();
        let want = execute(&plan.kernel, &b, &xs, Engine::Interp, 1)
            .expect("interprets")
            .to_f64_vec();
        let err = attnc::ir::compare::relative_l2(
            &got.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            &want.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        );
        assert!(err <= 1e-5, "n = {n}: relative L2 {err:e}");
    }
}
