//! The backward's time against the forward's, in one process: dense attention (h = 8,
//! n = 4096, d = 64 unless given; with fewer heads than threads, each head's forward and
//! backward are split between the threads), gradients of q, k and v for a standard-normal
//! cotangent.
//!
//! ```text
//! cargo run --release --example backward_ratio -- [--threads 1] [--runs 5] [--n 4096] [--h 8]
//!     [--window W]
//! ```
//!
//! With `--window W` the kernel is causal sliding-window attention over `W` keys instead
//! (`mask(s, causal & window(W))`), whose backward visits the band's tiles only.
//!
//! Each round times, in this order: the plain forward ([`CompiledGrad::forward`]), the
//! training forward that keeps the log-sum-exps ([`CompiledGrad::forward_saving`]), the
//! backward from them ([`CompiledGrad::backward_saved`]) and the backward that recomputes the
//! forward ([`CompiledGrad::backward`], what `attnc grad` times). Rounds alternate the four,
//! so a busy minute on a shared machine slows all of them; medians are printed with the
//! ratios the acceptance criteria name: backward alone over forward, and a training step
//! (saving forward + saved backward) over the recomputing pair (forward + backward).

use attnc::grad::CompiledGrad;
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::Bindings;
use std::error::Error;
use std::time::Instant;

const DENSE: &str =
    "kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

const WINDOW: &str =
    "kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal & window(w))) @ v;
}";

fn arg(name: &str, default: usize) -> Result<usize, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or("a value after the flag")?.parse()?),
        None => Ok(default),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn Error>> {
    let (threads, runs, n) = (arg("--threads", 1)?, arg("--runs", 5)?, arg("--n", 4096)?);
    let (h, d, window) = (arg("--h", 8)?, 64, arg("--window", 0)?);
    let (source, name) = match window {
        0 => (DENSE, "dense".to_string()),
        w => (WINDOW, format!("causal window({w})")),
    };
    let module = attnc::source::compile_text(source).map_err(|e| format!("{e:?}"))?;
    let kernel = &module.kernels[0];
    let bindings: Bindings = [("h", h), ("n", n), ("d", d), ("w", window)]
        .into_iter()
        .filter(|&(symbol, _)| symbol != "w" || window > 0)
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect();
    let wrt = attnc::ir::grad::parse_wrt(kernel, "q,k,v")?;
    let compiled: CompiledGrad = attnc::Compiler::new()
        .with_threads(threads)
        .compile_grad(kernel, &bindings, &wrt)?;
    let tensor = |seed: u64| Tensor {
        shape: vec![h, n, d],
        data: TensorData::F32(standard_normal(seed, 0, h * n * d)),
    };
    let inputs = [tensor(1), tensor(2), tensor(3)];
    let cotangent = tensor(4);
    let (out, lse) = compiled.forward_saving(&inputs, threads)?;
    let lse = lse.ok_or("the fused kernel keeps its log-sum-exps")?;
    let mut times: [Vec<f64>; 4] = Default::default();
    let ms = |start: Instant| start.elapsed().as_secs_f64() * 1e3;
    for _ in 0..runs + 1 {
        let start = Instant::now();
        compiled.forward(&inputs, threads)?;
        let forward = ms(start);
        let start = Instant::now();
        compiled.forward_saving(&inputs, threads)?;
        let saving = ms(start);
        let start = Instant::now();
        compiled.backward_saved(&inputs, &out, &lse, &cotangent, threads)?;
        let saved = ms(start);
        let start = Instant::now();
        compiled.backward(&inputs, &cotangent, threads)?;
        let recomputing = ms(start);
        for (t, x) in times.iter_mut().zip([forward, saving, saved, recomputing]) {
            t.push(x);
        }
    }
    // The first round warms up.
    let [forward, saving, saved, recomputing] = times.map(|t| median(t[1..].to_vec()));
    println!("{name} h={h} n={n} d={d}, {threads} thread(s), median of {runs}:");
    println!("  forward                          {forward:9.1} ms");
    println!("  forward keeping log-sum-exps     {saving:9.1} ms");
    println!("  backward from the saved forward  {saved:9.1} ms");
    println!("  backward recomputing the forward {recomputing:9.1} ms");
    println!("  backward alone / forward: {:.2}", saved / forward);
    println!(
        "  training step, saving / recomputing: {:.0} / {:.0} ms = {:.2}",
        saving + saved,
        forward + recomputing,
        (saving + saved) / (forward + recomputing)
    );
    Ok(())
}
