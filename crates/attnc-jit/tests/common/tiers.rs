//! Running a program on every tier this machine has (the portable one and the full-width
//! ones), fused and by the plain form, against the interpreter.

use super::{bindings, kernel, optimized, reference, rel_l2, run_jit, REL_L2};
use attnc_jit::plan::StepKind;
use attnc_jit::wide::{Tier, Tiers};
use attnc_jit::{CompileOptions, CompiledKernel};

/// The tiers to run: the portable one, and every full-width tier this CPU has (said when
/// there is none).
pub fn tiers() -> Vec<Tiers> {
    let all = Tiers::available(Tiers::ALL);
    if all == Tiers::NONE {
        eprintln!("no full-width tier on this CPU: only the portable tier is tested");
        vec![Tiers::NONE]
    } else {
        vec![Tiers::NONE, all]
    }
}

/// Runs `src` on `values` (f32, already representable in each parameter's storage type) as
/// optimized (fused, and by the plain form) and as written, on every tier, against the
/// interpreter: NaN and infinity positions equal, relative L2 within the exact bound, 1 and 3
/// threads bit-identical. Returns the optimized program's fused results, one per tier, each
/// with the tier its fused attention ran on (`None` without one).
pub fn check(
    src: &str,
    dims: &[(&str, u64)],
    values: &[Vec<f32>],
) -> Vec<(Option<Tier>, Vec<f32>)> {
    let k = kernel(src);
    let b = bindings(dims);
    let ins: Vec<(Vec<usize>, Vec<f32>)> = k
        .params
        .iter()
        .zip(values)
        .map(|(p, v)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
            assert_eq!(shape.iter().product::<usize>(), v.len(), "{}", p.name);
            (shape, v.clone())
        })
        .collect();
    let want = reference(&k, &b, &ins);
    let fused = optimized(&k, &b);
    let mut results = Vec::new();
    for tiers in tiers() {
        for (index, (program, fuse_attention)) in [(&fused, true), (&fused, false), (&k, true)]
            .into_iter()
            .enumerate()
        {
            let options = CompileOptions {
                fuse_attention,
                tiers,
                parallel_threshold: 0,
                ..CompileOptions::default()
            };
            let compiled = CompiledKernel::compile(program, &b, &options).expect("compile");
            let one = run_jit(&compiled, program, &ins, 1);
            let three = run_jit(&compiled, program, &ins, 3);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one.data), bits(&three.data), "threads 1 vs 3 differ");
            let err = rel_l2(&one.data, &want);
            assert!(
                err <= REL_L2,
                "error {err} on {tiers:?} (fused: {fuse_attention}) for {src} at {dims:?}"
            );
            if index == 0 {
                results.push((attention_tier(&compiled), one.data));
            }
        }
    }
    results
}

/// The results of [`check`], asserting that the first ran on the portable tier and any other
/// on a full-width one.
pub fn on_every_tier(results: Vec<(Option<Tier>, Vec<f32>)>) -> Vec<Vec<f32>> {
    for (k, (tier, _)) in results.iter().enumerate() {
        let tier = tier.expect("the attention is fused");
        assert_eq!(
            tier == Tier::Cranelift,
            k == 0,
            "result {k} ran on {tier:?}"
        );
    }
    results.into_iter().map(|(_, data)| data).collect()
}

/// The tier of the compiled kernel's fused attention step, if it has one.
pub fn attention_tier(compiled: &CompiledKernel) -> Option<Tier> {
    compiled.plan().steps.iter().find_map(|s| match &s.kind {
        StepKind::Attention(spec) => Some(spec.tier),
        _ => None,
    })
}
