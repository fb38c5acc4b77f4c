//! Discrepancies the randomized differential generator (`attnc-fuzzgen`, docs/testing.md)
//! found between the JIT and the interpreter, each reduced to a test named after what it
//! guards, on every tier this machine has.
mod common;

use common::tiers::{check, on_every_tier};

#[test]
fn full_width_attention_of_depth_zero_with_a_transposed_query_runs() {
    // The full-width kernels read a row of Q at `row · stride`, past the end of an empty
    // buffer when Q is transposed; depth 0 now runs on the portable kernel (every score is
    // 0: the mean of V's rows).
    let src = "kernel f(q: f32[d, m], k: f32[n, d], v: f32[n, e]) -> f32[m, e] \
        { return softmax(q.T @ k.T) @ v; }";
    let v = vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let dims = [("m", 3), ("n", 3), ("d", 0), ("e", 2)];
    for (_, out) in check(src, &dims, &[vec![], vec![], v]) {
        assert_eq!(out, [5.0, 6.0, 5.0, 6.0, 5.0, 6.0]);
    }
}

#[test]
fn scores_and_biases_near_the_f32_limit_stay_finite_on_the_full_width_tier() {
    // The full-width kernels keep scores in base 2 (x · log2 e): a bias of 2.5e38 or a score of
    // 3e38 overflows there although the softmax over them is finite. Those rows are computed
    // again on the portable kernel.
    let (m, n, d) = (5, 9, 3);
    let src = "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d], b: f32[m, n]) -> f32[m, d] \
        { return softmax(q @ k.T / sqrt(d) + b) @ v; }";
    let bias: Vec<f32> = (0..m * n).map(|i| 2.5e38 - (i % n) as f32 * 1e37).collect();
    let values = [
        common::data(m * d, 1),
        common::data(n * d, 2),
        common::data(n * d, 3),
        bias,
    ];
    let dims = [("m", m as u64), ("n", n as u64), ("d", d as u64)];
    for out in on_every_tier(check(src, &dims, &values)) {
        assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    }
    let src = "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] \
        { return softmax(q @ k.T) @ v; }";
    // Scores 3 · (0.85e38 − j · 1e36): inside the f32 range, past it times log2 e.
    let q = vec![1.0; m * d];
    let k: Vec<f32> = (0..n * d)
        .map(|i| 0.85e38 - (i / d) as f32 * 1e36)
        .collect();
    for out in on_every_tier(check(src, &dims, &[q, k, common::data(n * d, 4)])) {
        assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    }
}

#[test]
fn causal_linear_attention_rows_before_the_first_key_ignore_their_query() {
    // With m > n the first m − n rows keep no key: their numerator is the empty sum, 0, even
    // when their query is NaN or infinite (the prefix kernel multiplied it by the empty state).
    let (m, n, d) = (6, 3, 2);
    let mut q = common::data(m * d, 5);
    q[0] = f32::NAN;
    q[3] = f32::INFINITY;
    let values = [q, common::data(n * d, 6), common::data(n * d, 7)];
    let dims = [("m", m as u64), ("n", n as u64), ("d", d as u64)];
    let forms = [
        ("mask((elu(q) + 1) @ (elu(k) + 1).T, causal, 0) @ v", 0.0),
        (
            "(mask((elu(q) + 1) @ (elu(k) + 1).T, causal, 0) @ v) \
             / (sum(mask((elu(q) + 1) @ (elu(k) + 1).T, causal, 0), -1) + 1e-6)",
            0.0,
        ),
    ];
    for (body, empty) in forms {
        let src = format!(
            "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> f32[m, d] {{ return {body}; }}"
        );
        for (_, out) in check(&src, &dims, &values) {
            assert!(out[..(m - n) * d].iter().all(|&x| x == empty), "{out:?}");
        }
    }
}
