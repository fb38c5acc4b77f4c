//! Shared helpers of the JIT tests: compile `.attn` source, run the JIT and the f64
//! interpreter on the same inputs, compare.
#![allow(dead_code)]

use attnc_ir::{Bindings, DType, Kernel};
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use ndarray::{ArrayD, IxDyn};

pub mod tiers;

/// The relative L2 bound the JIT holds against the f64 interpreter on exact f32 plans.
pub const REL_L2: f64 = 1e-5;

/// Parses and lowers `src` and returns its first kernel.
pub fn kernel(src: &str) -> Kernel {
    let (file, diags) = attnc_syntax::parse(src);
    assert!(diags.is_empty(), "parse errors: {diags:?}");
    let module = attnc_ir::lower::lower_file(&file).unwrap_or_else(|e| panic!("lower: {e:?}"));
    module.kernels[0].clone()
}

/// `kernel` as the optimizer rewrites it at `b` (fused ops chosen).
pub fn optimized(kernel: &Kernel, b: &Bindings) -> Kernel {
    attnc_opt::optimize(kernel, b, &Default::default()).kernel
}

/// Binds `kernel`'s symbols from `dims`.
pub fn bindings(dims: &[(&str, u64)]) -> Bindings {
    dims.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Deterministic pseudo-random values in [-2, 2) (xorshift).
pub fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Random inputs for every parameter of `kernel` at `b` (f32 values, rounded to the declared
/// storage type).
pub fn inputs(kernel: &Kernel, b: &Bindings, seed: u64) -> Vec<(Vec<usize>, Vec<f32>)> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, b).expect("bound");
            let len = shape.iter().product();
            let mut v = data(len, seed * 31 + i as u64);
            for x in &mut v {
                *x = match p.dtype {
                    DType::F32 | DType::I32 => *x,
                    DType::F16 => half::f16::from_f32(*x).to_f32(),
                    DType::Bf16 => half::bf16::from_f32(*x).to_f32(),
                };
            }
            (shape, v)
        })
        .collect()
}

/// `ins` as the interpreter's f64 arrays.
pub fn arrays(ins: &[(Vec<usize>, Vec<f32>)]) -> Vec<ArrayD<f64>> {
    ins.iter()
        .map(|(s, v)| {
            ArrayD::from_shape_vec(IxDyn(s), v.iter().map(|&x| f64::from(x)).collect())
                .expect("shape")
        })
        .collect()
}

/// The interpreter's result on `ins`.
pub fn reference(kernel: &Kernel, b: &Bindings, ins: &[(Vec<usize>, Vec<f32>)]) -> ArrayD<f64> {
    attnc_ir::interp::evaluate(kernel, b, &arrays(ins)).expect("interpreter")
}

/// Storage for typed inputs.
pub struct Typed {
    f16: Vec<Vec<half::f16>>,
    bf16: Vec<Vec<half::bf16>>,
}

/// Runs the JIT on `ins` (converted to each parameter's storage type).
pub fn run_jit(
    compiled: &CompiledKernel,
    kernel: &Kernel,
    ins: &[(Vec<usize>, Vec<f32>)],
    threads: usize,
) -> attnc_jit::Output {
    let typed = Typed {
        f16: ins
            .iter()
            .map(|(_, v)| v.iter().map(|&x| half::f16::from_f32(x)).collect())
            .collect(),
        bf16: ins
            .iter()
            .map(|(_, v)| v.iter().map(|&x| half::bf16::from_f32(x)).collect())
            .collect(),
    };
    let inputs: Vec<Input<'_>> = kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| match p.dtype {
            DType::F32 => Input::F32(&ins[i].1),
            DType::F16 => Input::F16(&typed.f16[i]),
            DType::Bf16 => Input::Bf16(&typed.bf16[i]),
            DType::I32 => unreachable!("these tests declare no i32 parameters"),
        })
        .collect();
    compiled.run(&inputs, threads).expect("jit run")
}

/// Relative L2 error of `got` against `want` ([`attnc_ir::compare`]), with NaN and infinite
/// positions required to agree.
pub fn rel_l2(got: &[f32], want: &ArrayD<f64>) -> f64 {
    assert_eq!(got.len(), want.len(), "element counts differ");
    let c = attnc_ir::compare::compare(got.iter().map(|&g| f64::from(g)), want.iter().copied());
    assert_eq!(
        c.nan_mismatches, 0,
        "NaN mismatch between the jit and the interpreter"
    );
    assert_eq!(
        c.inf_mismatches, 0,
        "infinity mismatch between the jit and the interpreter"
    );
    c.relative_l2
}

/// Compiles `kernel` on the tiers this run allows (AVX-512 where the CPU has it) and on the
/// portable tier alone, runs each at 1 and 3 threads (which must agree bit for bit) and
/// checks it against `want`; returns the larger error. `what` names the case in failures.
pub fn on_every_tier(
    kernel: &Kernel,
    b: &Bindings,
    views: &[Input<'_>],
    want: &ArrayD<f64>,
    what: &str,
) -> f64 {
    let mut worst: f64 = 0.0;
    for tiers in [
        CompileOptions::default().tiers,
        attnc_jit::wide::Tiers::NONE,
    ] {
        let options = CompileOptions {
            parallel_threshold: 0,
            tiers,
            ..CompileOptions::default()
        };
        let compiled = CompiledKernel::compile(kernel, b, &options).expect("compile");
        let one = compiled.run(views, 1).expect("run");
        let three = compiled.run(views, 3).expect("run");
        assert_eq!(one.data, three.data, "threads 1 vs 3 differ: {what}");
        let err = rel_l2(&one.data, want);
        assert!(err <= REL_L2, "relative L2 {err} for {what} ({tiers:?})");
        worst = worst.max(err);
    }
    worst
}

/// Compiles `src` at `dims` as written and as the optimizer rewrites it (its fused ops run
/// fused and by their plain form), runs JIT (1 and 2 threads) and interpreter on random
/// inputs, asserts the bound and bit-identical thread results; returns the larger error.
pub fn check(src: &str, dims: &[(&str, u64)], seed: u64) -> f64 {
    let k = kernel(src);
    let b = bindings(dims);
    let ins = inputs(&k, &b, seed);
    let want = reference(&k, &b, &ins);
    let fused = optimized(&k, &b);
    let mut worst = 0.0f64;
    for (program, fuse_attention) in [(&fused, true), (&fused, false), (&k, true)] {
        let options = CompileOptions {
            parallel_threshold: 0,
            fuse_attention,
            ..CompileOptions::default()
        };
        let compiled = CompiledKernel::compile(program, &b, &options)
            .unwrap_or_else(|e| panic!("compile: {e}"));
        let one = run_jit(&compiled, program, &ins, 1);
        let two = run_jit(&compiled, program, &ins, 2);
        assert_eq!(one.shape, want.shape(), "shapes differ");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.data), bits(&two.data), "threads 1 vs 2 differ");
        let err = rel_l2(&one.data, &want);
        assert!(
            err <= REL_L2,
            "relative L2 error {err} > {REL_L2} for {src} at {dims:?} (fused: {fuse_attention})"
        );
        worst = worst.max(err);
    }
    worst
}
