//! Golden CLIF of small kernels (insta; re-bless with `INSTA_UPDATE=always` or `cargo insta`).
mod common;

use attnc_jit::{CompileOptions, CompiledKernel};
use common::{bindings, kernel};

/// Options of the portable tier: the snapshots are Cranelift's code whatever this CPU has.
fn portable() -> CompileOptions {
    CompileOptions {
        tiers: attnc_jit::wide::Tiers::NONE,
        keep_text: true,
        ..CompileOptions::default()
    }
}

fn clif(src: &str, dims: &[(&str, u64)]) -> String {
    let compiled =
        CompiledKernel::compile(&kernel(src), &bindings(dims), &portable()).expect("compile");
    compiled
        .clif()
        .into_iter()
        .map(|(name, text)| format!(";; {name}\n{text}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn elementwise_clif() {
    insta::assert_snapshot!(clif(
        "kernel f(x: f32[n, d], b: f32[d]) -> f32[n, d] { return relu(x * 2 + b); }",
        &[("n", 2), ("d", 6)],
    ));
}

#[test]
fn matmul_clif() {
    insta::assert_snapshot!(clif(
        "kernel f(a: f32[m, k], b: f32[k, n]) -> f32[m, n] { return a @ b; }",
        &[("m", 5), ("k", 3), ("n", 9)],
    ));
}

/// The exact fused attention kernel at a small shape: causal window, scaled scores, depth and
/// width not multiples of the vector width (tails), two query tiles.
#[test]
fn fused_attention_clif() {
    let src = "kernel f(q: f32[m, d], k: f32[n, d], v: f32[n, e]) -> f32[m, e] \
               { return softmax(mask(q @ k.T / sqrt(d), causal & window(6))) @ v; }";
    let b = bindings(&[("m", 7), ("n", 11), ("d", 5), ("e", 6)]);
    let fused = attnc_opt::optimize(&kernel(src), &b, &Default::default()).kernel;
    let compiled = CompiledKernel::compile(&fused, &b, &portable()).expect("compile");
    assert_eq!(compiled.plan().steps.len(), 1, "{}", compiled.plan());
    let text: String = compiled
        .clif()
        .into_iter()
        .map(|(name, text)| format!(";; {name}\n{text}"))
        .collect();
    insta::assert_snapshot!(text);
}
