//! Gradients through the library: the gradient graph of every example's OPTIMIZED form (the
//! one `attnc grad` compiles: fused attention, linear attention through its state) against
//! central differences of the f64 interpreter, and [`attnc::Compiler::compile_grad`] against
//! the reference gradients.

mod common;

use attnc::grad::{ones, reference_gradients};
use attnc::io::{Tensor, TensorData};
use attnc::ir::grad::vjp;
use attnc::ir::interp::evaluate_outputs;
use attnc::ir::{Bindings, Kernel};
use ndarray::{ArrayD, IxDyn};

/// Every symbol the examples use, small and odd; m ≠ n.
fn small(kernel: &Kernel) -> Bindings {
    let symbols = attnc::ir::bind::kernel_symbols(kernel);
    let given: Bindings = [
        ("h", 2),
        ("n", 9),
        ("m", 4),
        ("d", 3),
        ("r", 5),
        ("e", 4),
        ("w", 3),
        ("p", 4),
    ]
    .into_iter()
    .filter(|(s, _)| symbols.iter().any(|x| x == s))
    .map(|(s, v)| (s.to_string(), v))
    .collect();
    let shapes = vec![None; kernel.params.len()];
    attnc::ir::bind::bind_shapes(kernel, &shapes, &given).expect("binds")
}

/// Deterministic values in [-1.5, 1.5).
fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 3.0 - 1.5
        })
        .collect()
}

fn arrays(kernel: &Kernel, b: &Bindings, seed: u64) -> Vec<ArrayD<f64>> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc::ir::dim::resolve_shape(&p.shape, b).expect("bound");
            let len = shape.iter().product();
            ArrayD::from_shape_vec(IxDyn(&shape), values(len, seed + i as u64)).expect("shape")
        })
        .collect()
}

/// `kernel` with every `cast` replaced by its operand (gradients pass casts straight through).
fn uncast(kernel: &Kernel) -> Kernel {
    use attnc::ir::build::GraphBuilder;
    use attnc::ir::{NodeId, Op};
    let old = &kernel.graph;
    let mut b = GraphBuilder::default();
    let mut map: Vec<NodeId> = Vec::new();
    for id in old.topo_order() {
        let node = old.node(id);
        let args: Vec<NodeId> = old.operands(id).iter().map(|o| map[o.index()]).collect();
        map.push(match node.op {
            Op::Cast { .. } => args[0],
            _ => b.graph.add(node.clone(), &args),
        });
    }
    Kernel {
        graph: b.graph,
        output: map[kernel.output.index()],
        extra_outputs: (kernel.extra_outputs.iter())
            .map(|o| attnc::ir::KernelOutput {
                node: map[o.node.index()],
                dtype: o.dtype,
            })
            .collect(),
        ..kernel.clone()
    }
}

#[test]
fn optimized_examples_match_central_differences() {
    for path in common::random_example_files() {
        let src = std::fs::read_to_string(&path).expect("readable");
        let module = attnc::source::compile_text(&src).expect("checks");
        let kernel = uncast(&module.kernels[0]);
        let b = small(&kernel);
        let optimized = attnc::Compiler::new().optimize_exact(&kernel, &b).kernel;
        let all: Vec<usize> = (0..kernel.params.len()).collect();
        let g = match vjp(&optimized, &all) {
            Ok(g) => g,
            // An op whose gradient is not derived would be refused, never a panic.
            Err(e @ attnc::ir::grad::GradError::Unsupported { .. }) => {
                eprintln!("skipped {}: {e}", path.display());
                continue;
            }
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let xs = arrays(&kernel, &b, 7);
        // One cotangent per output: the objective is Σ_k ⟨cot_k, y_k⟩.
        let ys = evaluate_outputs(&optimized, &b, &xs, &optimized.output_nodes()).expect("runs");
        let cots: Vec<ArrayD<f64>> = (ys.iter().enumerate())
            .map(|(k, y)| {
                let seed = 99 + k as u64;
                ArrayD::from_shape_vec(IxDyn(y.shape()), values(y.len(), seed)).expect("shape")
            })
            .collect();
        let mut with_cot = xs.clone();
        with_cot.extend(cots.iter().cloned());
        let grads = evaluate_outputs(&g.combined(), &b, &with_cot, &g.outputs()).expect("vjp");
        let f = |xs: &[ArrayD<f64>]| -> f64 {
            let ys = evaluate_outputs(&kernel, &b, xs, &kernel.output_nodes()).expect("runs");
            (ys.iter().zip(&cots))
                .map(|(y, c)| y.iter().zip(c.iter()).map(|(a, c)| a * c).sum::<f64>())
                .sum()
        };
        for (grad, value) in g.gradients.iter().zip(&grads) {
            let len = xs[grad.param].len();
            let step = len.div_ceil(24).max(1);
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for e in (0..len).step_by(step) {
                let base = xs[grad.param].as_slice().expect("layout")[e];
                let h = 1e-5 * base.abs().max(1.0);
                let at = |delta: f64| {
                    let mut moved = xs.clone();
                    moved[grad.param].as_slice_mut().expect("layout")[e] = base + delta;
                    f(&moved)
                };
                want.push((at(h) - at(-h)) / (2.0 * h));
                got.push(value.as_slice().expect("layout")[e]);
            }
            let c = attnc::ir::compare::compare(got.iter().copied(), want.iter().copied());
            let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
            let err = c.error() * norm.max(f64::MIN_POSITIVE) / norm.max(1e-4);
            assert!(
                err <= 1e-6,
                "{}: d{}: relative L2 error {err:e} against central differences",
                path.display(),
                grad.name
            );
        }
    }
}

fn tensor(shape: Vec<usize>, seed: u64) -> Tensor {
    let len = shape.iter().product();
    Tensor {
        shape,
        data: TensorData::F32(values(len, seed).into_iter().map(|x| x as f32).collect()),
    }
}

#[test]
fn compiled_gradients_match_the_reference() {
    let module = attnc::source::compile_text(
        "kernel f(x: f32[n, e], wq: f32[e, d], wk: f32[e, d], wv: f32[e, d]) -> f32[n, d] {
             let s = (x @ wq) @ (x @ wk).T / sqrt(d);
             return softmax(mask(s, causal & window(20))) @ (x @ wv);
         }",
    )
    .expect("checks");
    let kernel = &module.kernels[0];
    let b: Bindings = [("n", 150), ("e", 12), ("d", 8)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let wrt = attnc::ir::grad::parse_wrt(kernel, "wq,wk,wv,x").expect("names");
    let compiled = attnc::Compiler::new()
        .with_threads(2)
        .compile_grad(kernel, &b, &wrt)
        .expect("compiles");
    assert!(compiled.plan().to_string().contains("attention backward"));
    let inputs = vec![
        tensor(vec![150, 12], 1),
        tensor(vec![12, 8], 2),
        tensor(vec![12, 8], 3),
        tensor(vec![12, 8], 4),
    ];
    let y = compiled.forward(&inputs, 2).expect("forward");
    assert_eq!(y.shape, vec![150, 8]);
    for cot in [ones(&y.shape), tensor(y.shape.clone(), 9)] {
        let got = compiled.backward(&inputs, &cot, 2).expect("backward");
        let want = reference_gradients(kernel, &b, &inputs, std::slice::from_ref(&cot), &wrt)
            .expect("reference");
        assert_eq!(compiled.names(), vec!["wq", "wk", "wv", "x"]);
        for ((g, w), name) in got.iter().zip(&want).zip(compiled.names()) {
            assert_eq!(g.shape, w.shape);
            let c = attnc::ir::compare::compare(g.to_f64_vec(), w.to_f64_vec());
            assert!(c.error() <= 1e-5, "d{name}: {:e}", c.error());
        }
    }
    // Wrong input counts are refused before anything runs.
    assert!(compiled.backward(&inputs[..3], &ones(&y.shape), 1).is_err());
}
