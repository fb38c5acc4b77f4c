//! One differential case: a seed → a program and its inputs → the interpreter, the bound
//! evaluator and the JIT in every configuration, judged by the rule.
//!
//! Configurations: the program as written and as the optimizer rewrites it (its fused ops run
//! fused, and by their plain form), on the portable tier and on the full-width tiers this CPU
//! has, with 1 and 2 threads bit-identical. Each JIT result is judged against the interpreter
//! and bound of the kernel it runs. Besides, the two programs' interpreter values are
//! compared: where both are specified and finite they must agree within their bounds; where
//! one overflows and the other does not, the rewrite moved an intermediate value across the
//! f32 limit (documented, counted, not a failure).

use crate::bound::{self, Bounded};
use crate::judge::{judge, Verdict};
use crate::program::{generate, Program};
use crate::rng::Rng;
use crate::values;
use attnc_ir::{Bindings, DType, Kernel};
use attnc_jit::wide::Tiers;
use attnc_jit::{CompileOptions, CompiledKernel, Input};
use ndarray::{ArrayD, IxDyn};
use std::fmt::Write;

/// What running one case found.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every configuration follows the rule.
    Passed(Summary),
    /// The case could not be judged (an op the bound evaluator does not know); the reason.
    Skipped(String),
    /// A configuration broke the rule, or something failed that must not: the report.
    Failed(String),
}

/// Counts of a passed case.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Configurations run.
    pub configs: usize,
    /// Elements compared, over every configuration.
    pub compared: usize,
    /// Elements left unspecified, over every configuration.
    pub unspecified: usize,
    /// Whether the optimizer fused an attention (softmax or linear).
    pub fused: bool,
    /// Output elements whose class differs between the program as written and as rewritten
    /// (an intermediate moved across the f32 limit).
    pub moved_overflow: usize,
    /// Whether either program leaves the finite values, so that the two programs' values
    /// were not compared with each other.
    pub limit_reached: bool,
    /// The largest share of its bound an element used ([`Verdict::worst`]).
    pub worst: f64,
    /// The largest relative L2 error of a well-conditioned result.
    pub max_relative_l2: f64,
}

/// The program and inputs of `seed`.
pub fn draw(seed: u64) -> (Program, Rng) {
    let mut rng = Rng::new(seed);
    let program = generate(&mut rng);
    (program, rng)
}

/// Runs the case of `seed` on every configuration; a panic anywhere is a failure.
pub fn run(seed: u64) -> Outcome {
    std::panic::catch_unwind(|| judged(seed)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let program = draw(seed).0;
        Outcome::Failed(format!(
            "seed {seed}, dims {:?}\n{}\npanicked: {message}",
            program.dims,
            program.source.trim_end()
        ))
    })
}

fn judged(seed: u64) -> Outcome {
    let (program, mut rng) = draw(seed);
    let header = || {
        let dims: Vec<String> = program
            .dims
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "seed {seed}, dims {}\n{}",
            dims.join(" "),
            program.source.trim_end()
        )
    };
    let (file, diags) = attnc_syntax::parse(&program.source);
    if !diags.is_empty() {
        return Outcome::Failed(format!(
            "{}\ngenerated program does not parse: {diags:?}",
            header()
        ));
    }
    let k0 = match attnc_ir::lower::lower_file(&file) {
        Ok(module) => module.kernels[0].clone(),
        Err(e) => {
            return Outcome::Failed(format!(
                "{}\ngenerated program does not lower: {e:?}",
                header()
            ))
        }
    };
    let bindings: Bindings = program.dims.iter().cloned().collect();
    let inputs: Vec<(Vec<usize>, Vec<f32>)> = k0
        .params
        .iter()
        .map(|p| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &bindings).unwrap_or_default();
            let len = shape.iter().product();
            (shape, values::draw(&mut rng, len, p.dtype))
        })
        .collect();
    let options = attnc_opt::OptimizeOptions {
        explain: false,
        ..Default::default()
    };
    let k1 = attnc_opt::optimize(&k0, &bindings, &options).kernel;
    let mut summary = Summary {
        fused: k1.graph.topo_order().into_iter().any(|id| {
            matches!(
                k1.graph.node(id).op,
                attnc_ir::Op::Attention(_) | attnc_ir::Op::LinearAttention(_)
            )
        }),
        ..Summary::default()
    };
    let mut references = Vec::new();
    for (name, kernel) in [("as written", &k0), ("optimized", &k1)] {
        match reference(kernel, &bindings, &inputs) {
            Ok(r) => references.push(r),
            Err(Problem::Skip(why)) => return Outcome::Skipped(why),
            Err(Problem::Fail(why)) => {
                return Outcome::Failed(format!("{}\n{name}: {why}", header()))
            }
        }
    }
    summary.moved_overflow = moved(&references[0], &references[1]);
    // The two programs must agree, unless one leaves the finite values: a rewrite may move
    // the place where it does (language.md, "Rewrites"), and with it every value after.
    let limit = references.iter().any(|r| r.limit_nodes > 0);
    summary.limit_reached = limit;
    if let Some(why) = disagree(&references[0], &references[1]).filter(|_| !limit) {
        return Outcome::Failed(format!(
            "{}\nthe interpreter's values of the program as written and as optimized differ: {why}{}",
            header(),
            inputs_and_program(&inputs, &k0, Some(&k1))
        ));
    }
    let tiers = {
        let all = Tiers::available(Tiers::ALL);
        if all == Tiers::NONE {
            vec![Tiers::NONE]
        } else {
            vec![Tiers::NONE, all]
        }
    };
    for t in tiers {
        for (which, kernel, fuse) in [(0, &k0, true), (1, &k1, true), (1, &k1, false)] {
            let config = format!(
                "{} ({}), tiers {t:?}",
                ["as written", "optimized"][which],
                if fuse { "fused" } else { "plain form" }
            );
            let options = CompileOptions {
                fuse_attention: fuse,
                tiers: t,
                parallel_threshold: 0,
                ..CompileOptions::default()
            };
            let compiled = match CompiledKernel::compile(kernel, &bindings, &options) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(format!("{}\n{config}: compile: {e}", header())),
            };
            let one = match run_jit(&compiled, kernel, &inputs, 1) {
                Ok(o) => o,
                Err(e) => return Outcome::Failed(format!("{}\n{config}: run: {e}", header())),
            };
            if which == 1 && fuse {
                match run_jit(&compiled, kernel, &inputs, 2) {
                    Ok(two) if bits(&two) == bits(&one) => {}
                    Ok(_) => {
                        return Outcome::Failed(format!(
                            "{}\n{config}: 1 and 2 threads differ",
                            header()
                        ))
                    }
                    Err(e) => return Outcome::Failed(format!("{}\n{config}: run: {e}", header())),
                }
            }
            let r = &references[which];
            let verdict = judge(&one, &r.value, &r.bound.e);
            summary.configs += 1;
            summary.compared += verdict.compared;
            summary.unspecified += verdict.unspecified;
            summary.worst = summary.worst.max(verdict.worst);
            if let Some(e) = verdict.relative_l2 {
                summary.max_relative_l2 = summary.max_relative_l2.max(e);
            }
            if !verdict.passed() {
                return Outcome::Failed(report(
                    &header(),
                    &config,
                    &verdict,
                    &inputs,
                    &k0,
                    (which == 1).then_some(&k1),
                ));
            }
        }
    }
    Outcome::Passed(summary)
}

/// The interpreter's value of one kernel and its bounds.
struct Reference {
    value: ArrayD<f64>,
    bound: Bounded,
    /// Where the program leaves the finite values ([`bound::Evaluation::limit_nodes`]).
    limit_nodes: usize,
}

enum Problem {
    Skip(String),
    Fail(String),
}

fn reference(
    kernel: &Kernel,
    bindings: &Bindings,
    inputs: &[(Vec<usize>, Vec<f32>)],
) -> Result<Reference, Problem> {
    let arrays: Vec<ArrayD<f64>> = inputs
        .iter()
        .map(|(s, v)| {
            ArrayD::from_shape_vec(IxDyn(s), v.iter().map(|&x| f64::from(x)).collect())
                .expect("invariant: shapes come from the bindings")
        })
        .collect();
    let value = attnc_ir::interp::evaluate(kernel, bindings, &arrays)
        .map_err(|e| Problem::Fail(format!("interpreter: {e}")))?;
    let bound::Evaluation {
        output: bound,
        limit_nodes,
    } = bound::evaluate(kernel, bindings, &arrays).map_err(Problem::Skip)?;
    // The two evaluators must agree wherever the bound specifies the value (the oracle is
    // tested by its twin).
    for (k, ((&v, &b), &e)) in value
        .iter()
        .zip(bound.x.iter())
        .zip(bound.e.iter())
        .enumerate()
    {
        if !bound::specified(e) {
            continue;
        }
        let same_class = if v.is_nan() {
            b.is_nan()
        } else {
            v.is_finite() == b.is_finite() && (v.is_finite() || v == b)
        };
        let close = !v.is_finite() || (v - b).abs() <= 1e-3 * e + 1e-9 * v.abs();
        if !same_class || !close {
            return Err(Problem::Fail(format!(
                "interpreter and bound evaluator disagree at element {k}: {v} vs {b} (bound {e})"
            )));
        }
    }
    Ok(Reference {
        value,
        bound,
        limit_nodes,
    })
}

/// Output elements whose class differs between the two programs, where both are specified.
fn moved(a: &Reference, b: &Reference) -> usize {
    specified_pairs(a, b)
        .filter(|&((x, _), (y, _))| x.is_finite() != y.is_finite() || x.is_nan() != y.is_nan())
        .count()
}

/// A finite element where the two programs' values differ by more than their bounds allow.
fn disagree(a: &Reference, b: &Reference) -> Option<String> {
    specified_pairs(a, b)
        .enumerate()
        .find(|&(_, ((x, ex), (y, ey)))| {
            x.is_finite() && y.is_finite() && (x - y).abs() > 2.0 * (ex + ey) + 1e-300
        })
        .map(|(k, ((x, ex), (y, ey)))| format!("element {k}: {x} ± {ex} vs {y} ± {ey}"))
}

fn specified_pairs<'r>(
    a: &'r Reference,
    b: &'r Reference,
) -> impl Iterator<Item = ((f64, f64), (f64, f64))> + 'r {
    let pairs = |r: &'r Reference| r.value.iter().copied().zip(r.bound.e.iter().copied());
    pairs(a)
        .zip(pairs(b))
        .filter(|&((_, ea), (_, eb))| ea < f64::INFINITY && eb < f64::INFINITY)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `compiled` on `inputs` converted to each parameter's storage type.
fn run_jit(
    compiled: &CompiledKernel,
    kernel: &Kernel,
    inputs: &[(Vec<usize>, Vec<f32>)],
    threads: usize,
) -> attnc_jit::Result<Vec<f32>> {
    let f16: Vec<Vec<half::f16>> = inputs
        .iter()
        .map(|(_, v)| v.iter().map(|&x| half::f16::from_f32(x)).collect())
        .collect();
    let bf16: Vec<Vec<half::bf16>> = inputs
        .iter()
        .map(|(_, v)| v.iter().map(|&x| half::bf16::from_f32(x)).collect())
        .collect();
    let views: Vec<Input<'_>> = kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| match p.dtype {
            // (Generated programs declare no i32 parameters.)
            DType::F32 | DType::I32 => Input::F32(&inputs[i].1),
            DType::F16 => Input::F16(&f16[i]),
            DType::Bf16 => Input::Bf16(&bf16[i]),
        })
        .collect();
    Ok(compiled.run(&views, threads)?.data)
}

/// The failure report: what broke, where, and the inputs' special values.
fn report(
    header: &str,
    config: &str,
    v: &Verdict,
    inputs: &[(Vec<usize>, Vec<f32>)],
    kernel: &Kernel,
    optimized: Option<&Kernel>,
) -> String {
    let mut s = format!("{header}\n{config}: ");
    let _ = write!(
        s,
        "{} of {} compared elements break the rule ({} unspecified)",
        v.mismatch_count, v.compared, v.unspecified
    );
    if let Some(e) = v.relative_l2 {
        let _ = write!(s, "; relative L2 {e:e}");
    }
    for m in &v.mismatches {
        let _ = write!(
            s,
            "\n  element {}: jit {:e}, interpreter {:e} ± {:e}",
            m.index, m.got, m.want, m.bound
        );
    }
    s.push_str(&inputs_and_program(inputs, kernel, optimized));
    s
}

/// The inputs' shapes and special values, and the optimized program.
fn inputs_and_program(
    inputs: &[(Vec<usize>, Vec<f32>)],
    kernel: &Kernel,
    optimized: Option<&Kernel>,
) -> String {
    let mut s = String::new();
    for ((shape, data), p) in inputs.iter().zip(&kernel.params) {
        let special: Vec<String> = data
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_finite() || x.abs() > 1e10 || (**x != 0.0 && x.abs() < 1e-10))
            .take(6)
            .map(|(k, x)| format!("[{k}]={x:e}"))
            .collect();
        let _ = write!(s, "\n  input {} {shape:?}", p.name);
        if !special.is_empty() {
            let _ = write!(s, ": {}", special.join(" "));
        }
    }
    if let Some(k) = optimized {
        let _ = write!(s, "\noptimized:\n{}", attnc_ir::print::print_kernel(k));
    }
    s
}
