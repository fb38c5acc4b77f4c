//! Whole programs from LANGUAGE.md §3 and views the planner must handle, at odd shapes.
mod common;

use common::check;

#[test]
fn language_examples() {
    let dims = [("h", 2), ("n", 13), ("d", 5), ("r", 3), ("e", 7)];
    for src in [
        "kernel decode(q: f32[h, 1, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, 1, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
        "kernel linear(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            let qf = elu(q) + 1;
            let kf = elu(k) + 1;
            return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);
        }",
        "kernel linformer(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], e: f32[r, n], f: f32[r, n]) -> f32[h, n, d] {
            return softmax(q @ (e @ k).T / sqrt(d)) @ (f @ v);
        }",
        "kernel gated(x: f32[n, e], wq: f32[e, d], wk: f32[e, d], wv: f32[e, d], wg: f32[e, d]) -> f32[n, d] {
            let a = softmax((x @ wq) @ (x @ wk).T / sqrt(d)) @ (x @ wv);
            return sigmoid(x @ wg) * a;
        }",
        "kernel alibi(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
            let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
            return softmax(mask(s, causal)) @ v;
        }",
    ] {
        check(src, &dims, 11);
    }
}

#[test]
fn views_and_copies() {
    let dims = [("n", 6), ("d", 5)];
    for src in [
        "kernel f(x: f32[n, d]) -> f32[n, d] { return x; }",
        "kernel f(x: f32[n, d]) -> f32[d, n] { return x.T; }",
        "kernel f(x: f32[n, d]) -> f32[d, 1] { return sum(x.T, -1); }",
        "kernel f(x: f32[n, d]) -> f32[d, n] { return softmax(x.T); }",
        "kernel f(x: f32[n, d]) -> f32[n, d] { return softmax(x, 0) * mean(x, 0); }",
        "kernel f(x: f32[n, d]) -> f32[n, n] { return (x + 1) @ (x * 2).T; }",
        "kernel f(x: f32[n, d]) -> f32[n, d] { return ones(n, n) @ x + zeros(n, d); }",
        "kernel f(x: f32[n, d]) -> f32[n, d] { let y = exp(x); let z = y * y; return z + y.T.T; }",
        "kernel f(x: f32[n, d]) -> f32[n, d] { return x.T.T @ ones(d, d) / d; }",
        "kernel f(x: f32[n, d]) -> f32[n, 1] { return max(mask(x @ x.T, window(1), 0), 1); }",
    ] {
        check(src, &dims, 12);
    }
}

#[test]
fn batched_masks_and_broadcast_biases() {
    let dims = [("h", 3), ("m", 7), ("n", 11), ("d", 4)];
    check(
        "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], bias: f32[m, n]) -> f32[h, m, d] {
            return softmax(mask(q @ k.T + bias, dilated(2, 2) | block(3))) @ v;
        }",
        &dims,
        13,
    );
    check(
        "kernel f(q: f32[h, m, d], k: f32[h, n, d]) -> f32[h, m, n] {
            return mask(relpos(m, n) + q @ k.T, causal & global(2), -5);
        }",
        &dims,
        14,
    );
}

#[test]
fn long_and_odd_shapes() {
    check(
        "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] {
            return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
        }",
        &[("h", 2), ("m", 203), ("n", 1023), ("d", 59)],
        15,
    );
    check(
        "kernel f(a: f32[m, k], b: f32[k, n], c: f32[n, k]) -> f32[m, n] { return a @ b + a @ c.T; }",
        &[("m", 113), ("k", 111), ("n", 203)],
        16,
    );
}

#[test]
fn shared_subexpressions_do_not_blow_up() {
    // Each `let` is used twice: without materializing shared values the fused expression
    // would have 2^40 nodes.
    let mut body = String::from("let x0 = a;\n");
    for i in 1..=40 {
        body.push_str(&format!("let x{i} = tanh(x{p} * x{p} + 0.5);\n", p = i - 1));
    }
    let src = format!("kernel f(a: f32[n, d]) -> f32[n, d] {{ {body} return x40; }}");
    check(&src, &[("n", 3), ("d", 5)], 17);
}

#[test]
fn long_chains_are_split_into_bounded_steps() {
    let mut body = String::from("let x0 = a;\n");
    for i in 1..=2000 {
        // Exactly representable constants: f32 and f64 run the same recurrence.
        body.push_str(&format!("let x{i} = x{p} * 0.75 + 0.125;\n", p = i - 1));
    }
    let src = format!("kernel f(a: f32[n, d]) -> f32[n, d] {{ {body} return x2000; }}");
    check(&src, &[("n", 2), ("d", 9)], 18);
}

#[test]
fn steps_computing_the_same_expression_share_one_function() {
    // Three elementwise steps, each after its own product: the same expression on the same
    // shape, reading a different buffer.
    let src = "kernel f(x: f32[n, d], w: f32[d, d]) -> f32[n, d] {
        let a = tanh(x @ w) * 0.5 + 1;
        let b = tanh(a @ w) * 0.5 + 1;
        return tanh(b @ w) * 0.5 + 1;
    }";
    let dims = [("n", 37), ("d", 12)];
    check(src, &dims, 19);
    let kernel = common::kernel(src);
    let b = common::bindings(&dims);
    let plan = common::optimized(&kernel, &b);
    let options = attnc_jit::CompileOptions {
        keep_text: true,
        ..Default::default()
    };
    let compiled = attnc_jit::CompiledKernel::compile(&plan, &b, &options).expect("compiles");
    let texts = compiled.clif();
    let elementwise: Vec<&String> = texts
        .iter()
        .filter(|(name, _)| name.ends_with("_ew"))
        .map(|(_, clif)| clif)
        .collect();
    assert_eq!(elementwise.len(), 3, "each step has a text: {texts:?}");
    assert!(elementwise[0].starts_with("function"), "{}", elementwise[0]);
    for clif in &elementwise[1..] {
        assert_eq!(*clif, "; the same code as f_s1_ew\n");
    }
}
