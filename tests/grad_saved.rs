//! The training pair: [`attnc::grad::CompiledGrad::forward_saving`] keeps the fused
//! attention's row log-sum-exps and [`attnc::grad::CompiledGrad::backward_saved`] starts from
//! them. Its gradients must be the recomputing backward's, bit for bit (both read the same
//! output and statistics), for any thread count, and within the exact bound of the f64
//! reference; the forward it returns must be the plain forward's within the same bound. Shapes
//! are odd (0, 1, 3, 113 rows; m ≠ n; rows that keep no key).

use attnc::grad::{ones, reference_gradients, CompiledGrad};
use attnc::io::{Tensor, TensorData};
use attnc::ir::compare::compare;
use attnc::ir::{Bindings, Kernel};

const EXACT: f64 = 1e-5;

/// Deterministic values in [-2, 2).
fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len = shape.iter().product();
    let data = (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    Tensor {
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

fn kernel(source: &str) -> Kernel {
    let module = attnc::source::compile_text(source).expect("the program checks");
    module.kernels[0].clone()
}

fn bindings(pairs: &[(&str, usize)]) -> Bindings {
    pairs
        .iter()
        .map(|&(k, v)| (k.to_string(), v as u64))
        .collect()
}

fn inputs(kernel: &Kernel, b: &Bindings) -> Vec<Tensor> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = attnc::ir::dim::resolve_shape(&p.shape, b).expect("bound");
            tensor(&shape, 11 + i as u64)
        })
        .collect()
}

fn compile(kernel: &Kernel, b: &Bindings, wrt: &str) -> CompiledGrad {
    let wrt = attnc::ir::grad::parse_wrt(kernel, wrt).expect("names");
    attnc::Compiler::new()
        .with_threads(2)
        .compile_grad(kernel, b, &wrt)
        .expect("compiles")
}

/// Checks the pair on one kernel and shape: saving where `saves` says, equal to the
/// recomputing backward, exact against the reference, the same for 1 and 3 threads.
fn check(source: &str, pairs: &[(&str, usize)], wrt: &str, saves: bool) {
    let k = kernel(source);
    let b = bindings(pairs);
    let compiled = compile(&k, &b, wrt);
    assert_eq!(compiled.saves_forward(), saves, "{source} at {pairs:?}");
    let x = inputs(&k, &b);
    let plain = compiled.forward(&x, 2).expect("forward");
    let (y, lse) = compiled.forward_saving(&x, 2).expect("forward saving");
    assert_eq!(lse.is_some(), saves);
    assert_eq!(y.shape, plain.shape);
    let c = compare(y.to_f64_vec(), plain.to_f64_vec());
    assert!(c.error() <= EXACT, "forward {:e}", c.error());
    let lse = lse.unwrap_or_default();
    let wrt_ids = attnc::ir::grad::parse_wrt(&k, wrt).expect("names");
    for cot in [ones(&y.shape), tensor(&y.shape, 5)] {
        let recomputed = compiled.backward(&x, &cot, 2).expect("backward");
        let saved = compiled
            .backward_saved(&x, &y, &lse, &cot, 2)
            .expect("backward from the saved forward");
        let one = compiled
            .backward_saved(&x, &y, &lse, &cot, 1)
            .expect("one thread");
        let three = compiled
            .backward_saved(&x, &y, &lse, &cot, 3)
            .expect("three threads");
        let want = reference_gradients(&k, &b, &x, std::slice::from_ref(&cot), &wrt_ids)
            .expect("reference");
        for (i, g) in saved.iter().enumerate() {
            assert_eq!(
                g, &recomputed[i],
                "d{i}: the saved forward changed the bits"
            );
            assert_eq!(g, &one[i], "d{i}: one thread");
            assert_eq!(g, &three[i], "d{i}: three threads");
            let c = compare(g.to_f64_vec(), want[i].to_f64_vec());
            assert!(c.error() <= EXACT, "d{i} at {pairs:?}: {:e}", c.error());
        }
    }
}

const DENSE: &str = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

const CAUSAL: &str = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
}";

#[test]
fn dense_saves_at_odd_shapes() {
    for (m, n) in [(1, 1), (3, 3), (113, 113), (113, 70), (64, 129), (3, 200)] {
        let shape = [("h", 2), ("m", m), ("n", n), ("d", 5), ("e", 3)];
        check(DENSE, &shape, "q,k,v", true);
    }
    check(
        DENSE,
        &[("h", 3), ("m", 113), ("n", 65), ("d", 40), ("e", 59)],
        "k",
        true,
    );
}

#[test]
fn empty_shapes_save_nothing_to_fail_on() {
    for (h, m, n, e) in [(0, 5, 5, 2), (2, 0, 5, 2), (2, 5, 0, 2), (2, 5, 7, 0)] {
        let k = kernel(DENSE);
        let b = bindings(&[("h", h), ("m", m), ("n", n), ("d", 3), ("e", e)]);
        let compiled = compile(&k, &b, "q,k,v");
        let x = inputs(&k, &b);
        let (y, lse) = compiled.forward_saving(&x, 2).expect("forward saving");
        let cot = ones(&y.shape);
        let got = compiled
            .backward_saved(&x, &y, &lse.unwrap_or_default(), &cot, 2)
            .expect("backward");
        let want = compiled.backward(&x, &cot, 2).expect("backward");
        assert_eq!(got, want);
    }
}

#[test]
fn causal_rows_that_keep_no_key_give_zero() {
    // m > n: the first m − n rows (aligned at the end) keep no key.
    check(
        CAUSAL,
        &[("h", 2), ("m", 113), ("n", 40), ("d", 7)],
        "q,k,v",
        true,
    );
    check(
        CAUSAL,
        &[("h", 1), ("m", 70), ("n", 203), ("d", 3)],
        "q,v",
        true,
    );
}

#[test]
fn score_options_save_too() {
    let alibi = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
        let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
        return softmax(mask(s, causal)) @ v;
    }";
    check(
        alibi,
        &[("h", 2), ("n", 113), ("d", 5)],
        "q,k,v,slope",
        true,
    );
    let softcap = "kernel f(q: f32[h, n, d], k: f32[1, n, d], v: f32[1, n, d]) -> f32[h, n, d] {
        let s = 30 * tanh(q @ k.T / sqrt(d) / 30);
        return softmax(mask(s, causal & window(20))) @ v;
    }";
    check(softcap, &[("h", 3), ("n", 113), ("d", 6)], "q,k,v", true);
}

#[test]
fn other_kernels_fall_back_to_recomputing() {
    // The result is not the attention itself: nothing is kept, the pair is the plain one.
    let scaled = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
        return (softmax(q @ k.T / sqrt(d)) @ v) * 2;
    }";
    check(scaled, &[("n", 33), ("d", 4)], "q,k,v", false);
    let projected =
        "kernel f(x: f32[n, e], wq: f32[e, d], wk: f32[e, d], wv: f32[e, d]) -> f32[n, d] {
        return softmax((x @ wq) @ (x @ wk).T / sqrt(d)) @ (x @ wv);
    }";
    check(projected, &[("n", 40), ("e", 6), ("d", 4)], "x,wq", false);
}
