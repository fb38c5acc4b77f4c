//! A score scale read from an operand — a learned temperature, one for the kernel (`f32[]`)
//! or one per head (`f32[h, 1, 1]`) — on every tier this machine has: the full-width kernels
//! take its value per batch entry, and give the interpreter's results for every value, zero,
//! negative and infinite ones included (an infinite one through the portable kernel's
//! rescue), at odd shapes, fused and by the plain form.
mod common;

use common::data;
use common::tiers::{check, on_every_tier};

/// Odd shapes (h, n, d): tile edges and a head width past any tile.
const SHAPES: [(usize, usize, usize); 3] = [(2, 113, 24), (3, 65, 3), (1, 130, 64)];

fn dims(h: usize, n: usize, d: usize, w: usize) -> Vec<(&'static str, u64)> {
    [("h", h), ("n", n), ("d", d), ("w", w)]
        .map(|(k, v)| (k, v as u64))
        .to_vec()
}

fn qkv(h: usize, n: usize, d: usize) -> [Vec<f32>; 3] {
    [data(h * n * d, 1), data(h * n * d, 2), data(h * n * d, 3)]
}

#[test]
fn a_temperature_for_the_kernel_runs_full_width() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], t: f32[]) \
        -> f32[h, n, d] { \
            let s = q @ k.T / sqrt(d) * t; \
            return softmax(mask(s, causal & window(w), -inf)) @ v; }";
    for (h, n, d) in SHAPES {
        for t in [0.7f32, -1.3, 0.0, 3.0] {
            let [q, k, v] = qkv(h, n, d);
            let values = [q, k, v, vec![t]];
            on_every_tier(check(src, &dims(h, n, d, 37), &values));
        }
    }
}

#[test]
fn a_temperature_per_head_runs_full_width() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], t: f32[h, 1, 1]) \
        -> f32[h, n, d] { return softmax(t * (q @ k.T) * 0.125) @ v; }";
    for (h, n, d) in SHAPES {
        let [q, k, v] = qkv(h, n, d);
        let t: Vec<f32> = (0..h).map(|i| [0.5, -2.0, 0.0][i % 3]).collect();
        let results = on_every_tier(check(src, &dims(h, n, d, 1), &[q, k, v, t]));
        // The heads differ: each read its own temperature.
        assert!(results.iter().all(|out| out.iter().all(|x| x.is_finite())));
    }
}

#[test]
fn an_infinite_temperature_gives_the_interpreters_nans() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], t: f32[h, 1, 1]) \
        -> f32[h, n, d] { return softmax(q @ k.T * t) @ v; }";
    let (h, n, d) = (2, 70, 8);
    let [q, k, v] = qkv(h, n, d);
    let t = vec![f32::INFINITY, 1.0];
    // `check` requires NaN and infinity positions to agree with the interpreter's.
    let results = on_every_tier(check(src, &dims(h, n, d, 1), &[q, k, v, t]));
    for out in results {
        let (first, second) = out.split_at(n * d);
        assert!(first.iter().any(|x| x.is_nan()), "the infinite head");
        assert!(second.iter().all(|x| x.is_finite()), "the finite head");
    }
}
