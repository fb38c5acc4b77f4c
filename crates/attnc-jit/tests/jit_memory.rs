//! JIT memory is returned when a kernel is dropped: compiling and dropping 10,000 kernels in one
//! process leaves resident memory flat. A leak of one 4 KiB code page per kernel would add 40 MB.
//!
//! Its own test binary, so no other test allocates in this process while it measures.

mod common;

use attnc_jit::{CompileOptions, CompiledKernel, Input};
use common::{bindings, kernel};

/// Resident set size of this process in KiB, from /proc (None where there is no /proc).
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn ten_thousand_kernels_compiled_and_dropped_keep_memory_flat() {
    let k = kernel("kernel f(x: f32[n, d], w: f32[d, d]) -> f32[n, d] { return relu(x @ w) + 1; }");
    let b = bindings(&[("n", 5), ("d", 3)]);
    let (x, w) = (vec![1.0f32; 15], vec![0.5f32; 9]);
    let compile_run_drop = || {
        let c = CompiledKernel::compile(&k, &b, &CompileOptions::default()).expect("compiles");
        let out = c.run(&[Input::F32(&x), Input::F32(&w)], 1).expect("runs");
        assert_eq!(out.data[0], 2.5);
    };
    // Warm up until the allocator and Cranelift's caches reach their steady state.
    for _ in 0..500 {
        compile_run_drop();
    }
    let Some(before) = resident_kib() else {
        eprintln!("skipped: /proc/self/status is not available");
        return;
    };
    for _ in 0..10_000 {
        compile_run_drop();
    }
    let after = resident_kib().expect("/proc/self/status was readable a moment ago");
    let growth = after.saturating_sub(before);
    eprintln!(
        "resident memory: {before} KiB before, {after} KiB after 10,000 kernels (+{growth} KiB)"
    );
    assert!(
        growth < 16 * 1024,
        "resident memory grew by {growth} KiB over 10,000 compiled and dropped kernels"
    );
}
