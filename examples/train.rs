//! Training a one-layer attention model with attnc's compiled gradients, in f32, in f16
//! without loss scaling and in f16 with dynamic loss scaling.
//!
//! ```text
//! cargo run --release --example train                       # 400 steps, plot in train-loss.svg
//! cargo run --release --example train -- --steps 100 --plot /tmp/loss.svg
//! ```
//!
//! The model is `examples/gated.attn` (gated self-attention, its four projections the
//! parameters, n = 256 tokens, e = 32, d = 16). The task is to imitate a teacher: the same
//! kernel with other, fixed weights, on fresh standard-normal inputs (4 sequences a step); the
//! loss is the mean squared difference of the outputs, weighted by 2⁻¹⁰ (`--loss-weight`: the
//! size of the gradients that reach an attention layer under a few more layers, or of an
//! auxiliary loss term). One step: the forward on the compiled kernel, the loss and its
//! gradient with respect to the output (the cotangent) in f64, the compiled gradients of the
//! four weights, then Adam (lr 3e-3) on f32 master weights. The three runs start from the same
//! weights and see the same data:
//!
//! - **f32**: every value in f32;
//! - **f16**: the inputs, the weights the forward reads, the cotangent and the gradients are
//!   stored in f16 (f32 arithmetic inside the kernels, f32 master weights). The cotangent of a
//!   weighted mean over 16,384 outputs is small, below f16's smallest subnormal (2⁻²⁴ ≈ 6e-8)
//!   for most outputs: those gradients become 0 (counted) and learning stalls;
//! - **f16 + scaling**: as f16, with the cotangent multiplied by the scale of an
//!   [`attnc::train::LossScaler`] before it is stored and the gradients divided by it in f32
//!   (start 2¹⁶, ×½ and skip the step on an overflow, ×2 after 2,000 clean steps).
//!
//! It prints the loss every 50 steps, how many gradient values f16 storage turned into 0,
//! overflows and skipped steps, the mean loss of the last 20 steps relative to f32, and draws
//! the three loss curves (log scale) into an SVG file.

use attnc::grad::CompiledGrad;
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::Bindings;
use attnc::train::{store, LossScaler, MasterWeights, Storage, StoreStats};
use plotters::prelude::*;
use std::error::Error;

const N: usize = 256;
const E: usize = 32;
const D: usize = 16;
const THREADS: usize = 2;

/// One run's settings.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    storage: Storage,
    scaling: bool,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "f32",
        storage: Storage::F32,
        scaling: false,
    },
    Mode {
        name: "f16",
        storage: Storage::F16,
        scaling: false,
    },
    Mode {
        name: "f16 + scaling",
        storage: Storage::F16,
        scaling: true,
    },
];

/// What one run measured.
struct Run {
    losses: Vec<f64>,
    stats: StoreStats,
    gradient_values: usize,
    skipped: u64,
    scale: f32,
}

fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor {
        shape: shape.to_vec(),
        data: TensorData::F32(data),
    }
}

/// Weights of standard deviation `1/√e`.
fn weights(seed: u64) -> Vec<Vec<f32>> {
    let scale = 1.0 / (E as f32).sqrt();
    (0..4)
        .map(|w| {
            standard_normal(seed, w, E * D)
                .into_iter()
                .map(|x| x * scale)
                .collect()
        })
        .collect()
}

fn rounded(values: &[f32], storage: Storage) -> Vec<f32> {
    values.iter().map(|&x| storage.round(x)).collect()
}

/// Adam's moments of one weight matrix.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The settings shared by the three runs.
#[derive(Clone, Copy)]
struct Settings {
    steps: usize,
    batch: usize,
    lr: f32,
    loss_weight: f64,
}

fn train(grad: &CompiledGrad, mode: Mode, set: Settings) -> Result<Run, Box<dyn Error>> {
    let teacher: Vec<Tensor> = weights(1).into_iter().map(|w| tensor(&[E, D], w)).collect();
    let mut master: Vec<MasterWeights> = weights(2)
        .into_iter()
        .map(|w| MasterWeights::new(w, mode.storage))
        .collect();
    let mut adam: Vec<Adam> = (0..4)
        .map(|_| Adam {
            m: vec![0.0; E * D],
            v: vec![0.0; E * D],
        })
        .collect();
    let mut scaler = LossScaler::new();
    let mut run = Run {
        losses: Vec::with_capacity(set.steps),
        stats: StoreStats::default(),
        gradient_values: 0,
        skipped: 0,
        scale: 1.0,
    };
    let count = (set.batch * N * D) as f64;
    let mut taken = 0i32;
    for step in 0..set.steps {
        let scale = if mode.scaling { scaler.scale() } else { 1.0 };
        let working: Vec<Tensor> = master
            .iter()
            .map(|w| tensor(&[E, D], w.working()))
            .collect();
        let mut total = vec![vec![0.0f32; E * D]; 4];
        let mut loss = 0.0f64;
        let mut finite = true;
        for b in 0..set.batch {
            // The same data for every mode, stored in the mode's type.
            let stream = (step * set.batch + b) as u64;
            let x = rounded(&standard_normal(1000, stream, N * E), mode.storage);
            let x = tensor(&[N, E], x);
            let mut teacher_inputs = vec![x.clone()];
            teacher_inputs.extend(teacher.iter().cloned());
            let target = grad.forward(&teacher_inputs, THREADS)?.to_f32_vec();
            let mut inputs = vec![x];
            inputs.extend(working.iter().cloned());
            let out = grad.forward(&inputs, THREADS)?.to_f32_vec();
            let diff: Vec<f64> = out
                .iter()
                .zip(&target)
                .map(|(y, t)| f64::from(*y) - f64::from(*t))
                .collect();
            loss += diff.iter().map(|e| e * e).sum::<f64>() / count;
            // d loss / d out (times the scale), stored in the mode's type.
            let cotangent: Vec<f32> = diff
                .iter()
                .map(|e| (set.loss_weight * 2.0 * e / count) as f32 * scale)
                .collect();
            let (cotangent, stats) = store(&cotangent, mode.storage);
            run.stats += stats;
            run.gradient_values += cotangent.len();
            finite &= stats.finite();
            let grads = grad.backward(&inputs, &tensor(&[N, D], cotangent), THREADS)?;
            for (t, g) in total.iter_mut().zip(&grads) {
                let (stored, stats) = store(&g.to_f32_vec(), mode.storage);
                run.stats += stats;
                run.gradient_values += stored.len();
                finite &= stats.finite();
                for (t, g) in t.iter_mut().zip(stored) {
                    *t += g;
                }
            }
        }
        run.losses.push(loss * set.loss_weight);
        let apply = if mode.scaling {
            scaler.update(finite)
        } else {
            finite
        };
        if !apply {
            continue;
        }
        taken += 1;
        let (b1, b2) = (0.9f32, 0.999f32);
        let (c1, c2) = (1.0 - b1.powi(taken), 1.0 - b2.powi(taken));
        for ((w, a), g) in master.iter_mut().zip(&mut adam).zip(&total) {
            // Unscaled in f32 (the scale is a power of two: exact).
            let g: Vec<f32> = g.iter().map(|g| g / scale).collect();
            let mut step_dir = vec![0.0f32; g.len()];
            for (((m, v), g), s) in a.m.iter_mut().zip(&mut a.v).zip(&g).zip(&mut step_dir) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *s = (*m / c1) / ((*v / c2).sqrt() + 1e-30);
            }
            w.sgd(&step_dir, set.lr);
        }
    }
    run.skipped = scaler.skipped();
    run.scale = if mode.scaling { scaler.scale() } else { 1.0 };
    Ok(run)
}

fn plot(path: &str, runs: &[(Mode, Run)]) -> Result<(), Box<dyn Error>> {
    let steps = runs.iter().map(|(_, r)| r.losses.len()).max().unwrap_or(1);
    let (lo, hi) = runs
        .iter()
        .flat_map(|(_, r)| r.losses.iter().copied())
        .filter(|l| *l > 0.0 && l.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "gated attention imitating a teacher: loss per step",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..steps, (lo * 0.8..hi * 1.25).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("mean squared error")
        .draw()?;
    let colors = [BLUE, RED, GREEN];
    for ((mode, run), color) in runs.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                run.losses.iter().copied().enumerate(),
                color.stroke_width(2),
            ))?
            .label(mode.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut set = Settings {
        steps: 400,
        batch: 4,
        lr: 3e-3,
        loss_weight: 1.0 / 1024.0,
    };
    let mut path = "train-loss.svg".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.as_str(), value) {
            ("--steps", Some(v)) => set.steps = v.parse()?,
            ("--batch", Some(v)) => set.batch = v.parse()?,
            ("--lr", Some(v)) => set.lr = v.parse()?,
            ("--loss-weight", Some(v)) => set.loss_weight = v.parse()?,
            ("--plot", Some(v)) => path = v,
            _ => {
                return Err(
                    "usage: train [--steps N] [--batch B] [--lr X] [--loss-weight W] \
                            [--plot PATH.svg]"
                        .into(),
                )
            }
        }
    }
    let module = attnc::source::compile_text(include_str!("gated.attn"))
        .map_err(|d| format!("gated.attn: {d:?}"))?;
    let kernel = &module.kernels[0];
    let bindings: Bindings = [("n", N), ("e", E), ("d", D)]
        .into_iter()
        .map(|(s, v)| (s.to_string(), v as u64))
        .collect();
    let wrt = attnc::ir::grad::parse_wrt(kernel, "wq,wk,wv,wg")?;
    let grad = attnc::Compiler::new()
        .with_threads(THREADS)
        .compile_grad(kernel, &bindings, &wrt)?;
    let mut runs = Vec::new();
    for mode in MODES {
        let start = std::time::Instant::now();
        let run = train(&grad, mode, set)?;
        println!(
            "{:>14}: loss {:.3e} → {:.3e} ({:.1} s); gradient values stored as 0 that were \
             not: {} of {} ({:.2} %); overflows {}; skipped steps {}; final scale {}",
            mode.name,
            run.losses.first().copied().unwrap_or(f64::NAN),
            run.losses.last().copied().unwrap_or(f64::NAN),
            start.elapsed().as_secs_f64(),
            run.stats.underflows,
            run.gradient_values,
            100.0 * run.stats.underflows as f64 / run.gradient_values.max(1) as f64,
            run.stats.overflows,
            run.skipped,
            run.scale,
        );
        for (i, l) in run.losses.iter().enumerate().step_by(50) {
            print!("  {i}:{l:.2e}");
        }
        println!();
        runs.push((mode, run));
    }
    // The mean of the last 20 steps' losses (each step sees other data).
    let last = |r: &Run| {
        let tail = &r.losses[r.losses.len().saturating_sub(20)..];
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    };
    let f32_loss = last(&runs[0].1);
    for (mode, run) in &runs {
        println!(
            "{:>14}: mean loss of the last 20 steps {:.4e}, {:+.2} % against f32",
            mode.name,
            last(run),
            100.0 * (last(run) - f32_loss) / f32_loss
        );
    }
    plot(&path, &runs)?;
    println!("loss curves: {path}");
    Ok(())
}
