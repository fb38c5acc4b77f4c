//! Test support for the rule families: each rule is checked by instantiating its own left and
//! right patterns with concrete sub-expressions, converting both to IR kernels and running
//! them with the f64 interpreter on random inputs at random small shapes. Each case also
//! checks that the rule fires on its left side (so the guard accepts the case) and that egg
//! puts the right side in the same e-class. `check_proof` cannot catch an unsound rule; this
//! can.

use crate::analysis::ShapeAnalysis;
use crate::convert::to_kernel;
use crate::lang::Attn;
use crate::rules::RuleSpec;
use attnc_ir::{Bindings, Kernel};
use egg::{RecExpr, Runner};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// Mask patterns the masking cases draw from (some empty whole rows when m > n).
pub const PATTERNS: &[&str] = &[
    "causal",
    "(window 1)",
    "(and causal (window 2))",
    "(or (window 1) (global 1))",
    "(dilated 2 2)",
    "(block 2)",
    "(or (block 3) (global 1))",
];

/// Small dimension sizes.
pub fn dim() -> impl Strategy<Value = u64> {
    1u64..=5
}

/// Asserts that every rule of `family` is in `tested`.
pub fn assert_covered(family: &[RuleSpec], tested: &[&str]) {
    for spec in family {
        assert!(
            tested.contains(&spec.name),
            "rule {} has no property test",
            spec.name
        );
    }
}

/// The one kernel of `src`, lowered.
pub fn kernel(src: &str) -> Kernel {
    let (file, diags) = attnc_syntax::parse(src);
    assert!(diags.is_empty(), "parse errors in {src}: {diags:?}");
    let module = attnc_ir::lower::lower_file(&file)
        .unwrap_or_else(|d| panic!("lowering errors in {src}: {d:?}"));
    module.kernels.into_iter().next().expect("one kernel")
}

/// Replaces each `?var` token of `pattern` by its expression.
pub fn instantiate(pattern: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.starts_with('?') {
            let (_, e) = vars
                .iter()
                .find(|(v, _)| v == token)
                .unwrap_or_else(|| panic!("no value for {token}"));
            out.push_str(e);
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in pattern.chars() {
        if c == '(' || c == ')' || c.is_whitespace() {
            flush(&mut token, &mut out);
            out.push(c);
        } else {
            token.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

/// Random values in [-1, 1) (splitmix64), one array per parameter.
fn inputs(kernel: &Kernel, bindings: &Bindings, mut seed: u64) -> Vec<ArrayD<f64>> {
    let mut next = || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    kernel
        .params
        .iter()
        .map(|p| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, bindings).expect("bound");
            ArrayD::from_shape_fn(IxDyn(&shape), |_| next())
        })
        .collect()
}

/// The relative L2 error of `b` against `a` ([`attnc_ir::compare`]); NaN and infinite
/// positions must agree.
pub fn rel_l2(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let c = attnc_ir::compare::compare(b.iter().copied(), a.iter().copied());
    assert_eq!(
        (c.nan_mismatches, c.inf_mismatches),
        (0, 0),
        "NaN or infinite positions differ"
    );
    c.relative_l2
}

/// The shape analysis of `shell`'s parameters at `bindings`.
pub fn analysis_for(shell: &Kernel, bindings: &Bindings) -> ShapeAnalysis {
    let mut analysis = ShapeAnalysis {
        bindings: bindings.clone(),
        ..ShapeAnalysis::default()
    };
    for p in &shell.params {
        let shape = attnc_ir::dim::resolve_shape(&p.shape, bindings).expect("bound");
        analysis.params.insert(p.name.as_str().into(), shape);
    }
    analysis
}

/// Checks `spec` on one case: `params` is a kernel parameter list, `vars` the pattern
/// variables' expressions, `dims` the bound dimensions, `seed` the inputs' seed.
pub fn check(
    spec: &RuleSpec,
    params: &str,
    vars: &[(&str, &str)],
    dims: &[(&str, u64)],
    seed: u64,
) {
    let (ya, yb) = evaluate_both(spec, params, vars, dims, seed);
    let err = rel_l2(&ya, &yb);
    assert!(err <= 1e-9, "{}: relative L2 {err} at {dims:?}", spec.name);
}

/// Asserts that `spec` fires on its left side instantiated with `vars` (arguments as for
/// [`check`]) and returns both sides' values from the interpreter.
pub fn evaluate_both(
    spec: &RuleSpec,
    params: &str,
    vars: &[(&str, &str)],
    dims: &[(&str, u64)],
    seed: u64,
) -> (ArrayD<f64>, ArrayD<f64>) {
    let name = spec.name;
    let first = params.split(':').next().expect("a parameter").trim();
    let shell = kernel(&format!("kernel t({params}) {{ return {first}; }}"));
    let lhs: RecExpr<Attn> = instantiate(spec.lhs, vars).parse().expect("lhs parses");
    let rhs: RecExpr<Attn> = instantiate(spec.rhs, vars).parse().expect("rhs parses");
    let bindings: Bindings = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();

    let analysis = analysis_for(&shell, &bindings);
    let rules = [spec.to_rewrite()];
    let runner: Runner<Attn, ShapeAnalysis> = Runner::new(analysis)
        .with_iter_limit(1)
        .with_node_limit(10_000)
        .with_expr(&lhs)
        .run(&rules);
    let root = runner.egraph.find(runner.roots[0]);
    assert_eq!(
        runner
            .egraph
            .lookup_expr(&rhs)
            .map(|id| runner.egraph.find(id)),
        Some(root),
        "{name} did not fire on {lhs} at {dims:?}"
    );

    let left = to_kernel(&lhs, &shell, &bindings).expect("lhs converts");
    let right = to_kernel(&rhs, &shell, &bindings).expect("rhs converts");
    let xs = inputs(&shell, &bindings, seed);
    let ya = attnc_ir::interp::evaluate(&left, &bindings, &xs).expect("lhs evaluates");
    let yb = attnc_ir::interp::evaluate(&right, &bindings, &xs).expect("rhs evaluates");
    (ya, yb)
}

/// Checks that `spec`'s guard keeps it from firing on `expr` (a term of the kernel parameters
/// `params` at the bound `dims`).
pub fn refuses(spec: &RuleSpec, params: &str, expr: &str, dims: &[(&str, u64)]) {
    let first = params.split(':').next().expect("a parameter").trim();
    let shell = kernel(&format!("kernel t({params}) {{ return {first}; }}"));
    let bindings: Bindings = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let analysis = analysis_for(&shell, &bindings);
    let term: RecExpr<Attn> = expr.parse().expect("term parses");
    let runner: Runner<Attn, ShapeAnalysis> = Runner::new(analysis)
        .with_iter_limit(1)
        .with_node_limit(10_000)
        .with_expr(&term)
        .run(&[spec.to_rewrite()]);
    let fired = runner
        .iterations
        .iter()
        .any(|i| i.applied.keys().any(|name| name.as_str() == spec.name));
    assert!(!fired, "{} fired on {expr} at {dims:?}", spec.name);
}

/// The rule called `name` in `family`.
pub fn rule(family: &[RuleSpec], name: &str) -> RuleSpec {
    family
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no rule {name}"))
}
