//! Test support for gradients: central finite differences of the f64 interpreter, and the
//! comparison every gradient test makes against them.
#![allow(dead_code)]

use attnc_ir::build::GraphBuilder;
use attnc_ir::compare::compare;
use attnc_ir::grad::{vjp, Vjp};
use attnc_ir::interp::evaluate_outputs;
use attnc_ir::{Bindings, Kernel, NodeId, Op};
use ndarray::{ArrayD, IxDyn};

/// Deterministic pseudo-random values in [-2, 2) (xorshift), as `interp_support::random`.
pub fn random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
    })
}

/// At most this many elements of each parameter are perturbed.
const SAMPLED: usize = 48;

/// The gradients of `wrt` from the VJP graph and from central differences of `kernel` (the
/// same sampled elements of each), for one cotangent per output.
pub struct Measured {
    /// Per parameter: (VJP values, finite-difference values) at the sampled elements.
    pub pairs: Vec<(Vec<f64>, Vec<f64>)>,
    /// The whole VJP gradients.
    pub gradients: Vec<ArrayD<f64>>,
    /// `Σ |y ∘ cotangent|`, the size of the objective (its rounding sets the differences'
    /// noise).
    pub scale: f64,
}

/// `Σ_k Σ output_k(inputs) ∘ cotangents[k]` over the kernel's outputs; with `absolute`, the
/// sum of the terms' magnitudes.
pub fn objective(
    kernel: &Kernel,
    b: &Bindings,
    inputs: &[ArrayD<f64>],
    cotangents: &[ArrayD<f64>],
    absolute: bool,
) -> f64 {
    let ys =
        evaluate_outputs(kernel, b, inputs, &kernel.output_nodes()).expect("the forward evaluates");
    let term = |a: f64, c: f64| if absolute { (a * c).abs() } else { a * c };
    ys.iter()
        .zip(cotangents)
        .map(|(y, c)| {
            y.iter()
                .zip(c.iter())
                .map(|(&a, &c)| term(a, c))
                .sum::<f64>()
        })
        .sum()
}

/// The VJP gradients of `kernel` (through `grads`, the VJP of `kernel` or of an equivalent
/// form) and central differences of `kernel` at the sampled elements.
pub fn measure(
    kernel: &Kernel,
    grads: &Vjp,
    b: &Bindings,
    inputs: &[ArrayD<f64>],
    cotangents: &[ArrayD<f64>],
) -> Measured {
    let mut all = inputs.to_vec();
    all.extend(cotangents.iter().cloned());
    let gk = grads.kernel(0);
    let gradients = evaluate_outputs(&gk, b, &all, &grads.outputs()).expect("the vjp evaluates");
    let mut pairs = Vec::new();
    for (g, value) in grads.gradients.iter().zip(&gradients) {
        let x = &inputs[g.param];
        let len = x.len();
        let step = len.div_ceil(SAMPLED).max(1);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for e in (0..len).step_by(step) {
            let base = x.as_slice().expect("standard layout")[e];
            let h = 1e-5 * base.abs().max(1.0);
            let at = |delta: f64| {
                let mut moved = inputs.to_vec();
                moved[g.param].as_slice_mut().expect("standard layout")[e] = base + delta;
                objective(kernel, b, &moved, cotangents, false)
            };
            want.push((at(h) - at(-h)) / (2.0 * h));
            got.push(value.as_slice().expect("standard layout")[e]);
        }
        pairs.push((got, want));
    }
    let scale = objective(kernel, b, inputs, cotangents, true);
    Measured {
        pairs,
        gradients,
        scale,
    }
}

/// Gradients smaller than this (in L2 norm) are compared absolutely: a gradient that is 0 in
/// exact arithmetic (`q` of a normalized linear attention over one key) is rounding noise on
/// both sides.
pub const FLOOR: f64 = 1e-4;

/// The relative L2 error of `got` against `want`, relative to at least `floor`.
pub fn error_above(got: &[f64], want: &[f64], floor: f64) -> f64 {
    let c = compare(got.iter().copied(), want.iter().copied());
    if !c.error().is_finite() {
        return c.error();
    }
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    c.relative_l2 * norm.max(f64::MIN_POSITIVE) / norm.max(floor)
}

/// [`error_above`] with the floor [`FLOOR`].
pub fn error(got: &[f64], want: &[f64]) -> f64 {
    error_above(got, want, FLOOR)
}

/// Asserts that every sampled gradient matches its central difference within `tol` relative
/// L2 error (gradients below [`FLOOR`], or below `1e-4` of the objective's size, compared
/// absolutely: the differences' rounding noise grows with the objective); `what` names the
/// case.
pub fn assert_matches(m: &Measured, names: &[String], tol: f64, what: &str) {
    for ((got, want), name) in m.pairs.iter().zip(names) {
        let e = error_above(got, want, FLOOR.max(1e-4 * m.scale));
        assert!(
            e <= tol,
            "{what}: d{name}: relative L2 error {e:e} against central differences\n vjp {got:?}\n  fd {want:?}",
        );
    }
}

/// Differentiates `kernel` with respect to `wrt` and checks the gradients against central
/// differences on `inputs` with a random cotangent per output.
pub fn check(kernel: &Kernel, b: &Bindings, inputs: &[ArrayD<f64>], wrt: &[usize], seed: u64) {
    let grads = vjp(kernel, wrt).expect("the kernel differentiates");
    let outputs = evaluate_outputs(kernel, b, inputs, &kernel.output_nodes()).expect("evaluates");
    let cotangents: Vec<ArrayD<f64>> = outputs
        .iter()
        .enumerate()
        .map(|(k, y)| random(y.shape(), seed ^ 0xC07A ^ (k as u64) << 32))
        .collect();
    let m = measure(kernel, &grads, b, inputs, &cotangents);
    let names: Vec<String> = grads.gradients.iter().map(|g| g.name.clone()).collect();
    assert_matches(&m, &names, 1e-6, &kernel.name);
}

/// `kernel` with every `cast` replaced by its operand (gradients pass casts straight through,
/// so finite differences are taken of the uncast form).
pub fn without_casts(kernel: &Kernel) -> Kernel {
    let old = &kernel.graph;
    let mut b = GraphBuilder::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(old.len());
    for id in old.topo_order() {
        let node = old.node(id);
        let args: Vec<NodeId> = old.operands(id).iter().map(|o| map[o.index()]).collect();
        let new = match node.op {
            Op::Cast { .. } => args[0],
            _ => b.graph.add(node.clone(), &args),
        };
        map.push(new);
    }
    Kernel {
        graph: b.graph,
        output: map[kernel.output.index()],
        extra_outputs: kernel
            .extra_outputs
            .iter()
            .map(|o| attnc_ir::KernelOutput {
                node: map[o.node.index()],
                dtype: o.dtype,
            })
            .collect(),
        ..kernel.clone()
    }
}
