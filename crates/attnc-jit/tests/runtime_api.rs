//! The library API: buffer checks before machine code, threads, caching, memory release.
mod common;

use attnc_jit::cache::{cache_key, fingerprint, KernelCache};
use attnc_jit::{CompileOptions, CompiledKernel, Input, JitError};
use common::{bindings, kernel};
use std::sync::Arc;

const SRC: &str = "kernel f(q: f32[n, d], k: f32[n, d], v: bf16[n, d]) -> f32[n, d] \
    { return softmax(q @ k.T) @ v; }";

fn compiled() -> CompiledKernel {
    CompiledKernel::compile(
        &kernel(SRC),
        &bindings(&[("n", 3), ("d", 2)]),
        &CompileOptions::default(),
    )
    .expect("compile")
}

fn buffer_error(r: attnc_jit::Result<attnc_jit::Output>, name: &str) {
    match r {
        Err(JitError::Buffer { input, .. }) => assert!(input.contains(name), "{input}"),
        other => panic!("expected a buffer error naming {name}, got {other:?}"),
    }
}

#[test]
fn buffers_are_checked_before_running() {
    let c = compiled();
    let six = vec![0.0f32; 6];
    let five = vec![0.0f32; 5];
    let v = vec![half::bf16::ZERO; 6];
    let vf16 = vec![half::f16::ZERO; 6];
    // Too short.
    buffer_error(
        c.run(&[Input::F32(&five), Input::F32(&six), Input::Bf16(&v)], 1),
        "q",
    );
    // Too long.
    let seven = vec![0.0f32; 7];
    buffer_error(
        c.run(&[Input::F32(&six), Input::F32(&seven), Input::Bf16(&v)], 1),
        "k",
    );
    // Wrong dtype.
    buffer_error(
        c.run(&[Input::F32(&six), Input::F32(&six), Input::F32(&six)], 1),
        "v",
    );
    buffer_error(
        c.run(&[Input::F32(&six), Input::F32(&six), Input::F16(&vf16)], 1),
        "v",
    );
    // Wrong count.
    buffer_error(c.run(&[Input::F32(&six), Input::F32(&six)], 1), "f");
    // And the right ones run.
    let out = c
        .run(&[Input::F32(&six), Input::F32(&six), Input::Bf16(&v)], 1)
        .expect("run");
    assert_eq!(out.shape, vec![3, 2]);
}

#[test]
fn one_kernel_from_many_threads_is_bit_identical() {
    let k = kernel(
        "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] \
         { return softmax(mask(q @ k.T / sqrt(d), causal)) @ v + sigmoid(q @ k.T @ v); }",
    );
    let b = bindings(&[("h", 3), ("n", 37), ("d", 9)]);
    let options = CompileOptions {
        parallel_threshold: 0,
        ..CompileOptions::default()
    };
    let c = Arc::new(CompiledKernel::compile(&k, &b, &options).expect("compile"));
    let ins = common::inputs(&k, &b, 3);
    let reference = common::run_jit(&c, &k, &ins, 1).data;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (c, k, ins, reference) = (&c, &k, &ins, &reference);
            s.spawn(move || {
                for threads in [1, 2, 3, 7] {
                    let got = common::run_jit(c, k, ins, threads + t).data;
                    let same = got
                        .iter()
                        .zip(reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "threads {} differ", threads + t);
                }
            });
        }
    });
}

#[test]
fn compile_and_drop_many_kernels() {
    let k = kernel("kernel f(x: f32[n, d], w: f32[d, d]) -> f32[n, d] { return relu(x @ w) + 1; }");
    let b = bindings(&[("n", 5), ("d", 3)]);
    let x = vec![1.0f32; 15];
    let w = vec![0.5f32; 9];
    for _ in 0..1000 {
        let c = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compile");
        let out = c.run(&[Input::F32(&x), Input::F32(&w)], 1).expect("run");
        assert_eq!(out.data[0], 2.5);
    }
}

#[test]
fn cache_hits_and_keys() {
    let k = kernel(SRC);
    let b = bindings(&[("n", 3), ("d", 2)]);
    let cache = KernelCache::new();
    let options = CompileOptions::default();
    let a = cache.get_or_compile(&k, &b, &options).expect("compile");
    let again = cache.get_or_compile(&k, &b, &options).expect("compile");
    assert!(Arc::ptr_eq(&a, &again));
    let other = cache
        .get_or_compile(&k, &bindings(&[("n", 4), ("d", 2)]), &options)
        .expect("compile");
    assert!(!Arc::ptr_eq(&a, &other));
    assert_eq!(cache.len(), 2);
    let key = cache_key(&k, &b, &options);
    assert!(!key.cpu.is_empty());
    assert!(fingerprint(&k).contains("matmul"));
    // Same program text elsewhere in a file: same fingerprint.
    let moved = kernel(&format!("\n\n   {SRC}"));
    assert_eq!(fingerprint(&moved), fingerprint(&k));
    cache.clear();
    assert!(cache.is_empty());
    drop(a);
}

#[test]
fn compiled_kernel_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledKernel>();
    assert_send_sync::<KernelCache>();
}

#[test]
fn clif_and_machine_code_text_are_kept_when_asked() {
    let options = CompileOptions {
        keep_text: true,
        ..CompileOptions::default()
    };
    let c = CompiledKernel::compile(&kernel(SRC), &bindings(&[("n", 3), ("d", 2)]), &options)
        .expect("compile");
    let clif = c.clif();
    assert!(!clif.is_empty());
    assert!(clif
        .iter()
        .all(|(name, text)| name.starts_with("f_s") && text.contains("function")));
    assert!(c.texts().iter().all(|t| t.vcode.is_some()));
    assert!(c.compile_time().as_nanos() > 0);
    // By default nothing is kept, and the code runs the same.
    let plain = compiled();
    assert!(plain.clif().is_empty() && plain.texts().is_empty());
    let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, -1.0];
    let v: Vec<half::bf16> = x.iter().rev().map(|&y| half::bf16::from_f32(y)).collect();
    let inputs = [Input::F32(&x), Input::F32(&x), Input::Bf16(&v)];
    let (a, b) = (
        c.run(&inputs, 1).expect("run"),
        plain.run(&inputs, 1).expect("run"),
    );
    assert_eq!(a.data, b.data);
}

#[test]
fn kept_temporaries_serve_later_runs_and_threads_alike() {
    // Unoptimized, the plan writes an n × n score matrix and its softmax (4 MiB each at
    // n = 1024): large temporaries, kept between runs.
    let src = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] \
        { return softmax(q @ k.T) @ v; }";
    let (n, d) = (1024usize, 16usize);
    let c = CompiledKernel::compile(
        &kernel(src),
        &bindings(&[("n", n as u64), ("d", d as u64)]),
        &CompileOptions::default(),
    )
    .expect("compile");
    let (q, k, v) = (
        common::data(n * d, 1),
        common::data(n * d, 2),
        common::data(n * d, 3),
    );
    let ins = [Input::F32(&q), Input::F32(&k), Input::F32(&v)];
    assert_eq!(c.kept_buffer_bytes(), 0);
    let first = c.run(&ins, 1).expect("run").data;
    let kept = c.kept_buffer_bytes();
    assert!(kept >= n * n * 4, "{kept} bytes kept");
    // Later runs reuse them (zeroed again), on any thread count, with the same results.
    for threads in [2, 1, 3] {
        let again = c.run(&ins, threads).expect("run").data;
        assert!(
            first
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{threads} threads"
        );
        assert_eq!(
            c.kept_buffer_bytes(),
            kept,
            "never more than one run's worth"
        );
    }
    c.release_buffers();
    assert_eq!(c.kept_buffer_bytes(), 0);
    let after = c.run(&ins, 2).expect("run").data;
    assert!(first
        .iter()
        .zip(&after)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
