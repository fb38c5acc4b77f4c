//! Small hand-picked programs, JIT against the interpreter.
mod common;
use common::check;

#[test]
fn add_broadcast() {
    check(
        "kernel f(a: f32[n, d], b: f32[1, d]) -> f32[n, d] { return a + b * 2; }",
        &[("n", 5), ("d", 7)],
        1,
    );
}

#[test]
fn matmul_plain_and_transposed() {
    check(
        "kernel f(a: f32[m, k], b: f32[k, n]) -> f32[m, n] { return a @ b; }",
        &[("m", 13), ("k", 9), ("n", 19)],
        2,
    );
    check(
        "kernel f(a: f32[m, k], b: f32[n, k]) -> f32[m, n] { return a @ b.T; }",
        &[("m", 13), ("k", 9), ("n", 19)],
        3,
    );
}

#[test]
fn softmax_attention() {
    check(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] { return softmax(mask(q @ k.T / sqrt(d), causal)) @ v; }",
        &[("h", 2), ("n", 11), ("d", 5)],
        4,
    );
}
