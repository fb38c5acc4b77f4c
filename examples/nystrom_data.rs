//! Inputs on which the Nyström approximation is meant to be used: attention of low rank.
//! Writes `q.npy`, `k.npy` and `v.npy` (`f32[h, n, d]`) to a directory.
//!
//! ```text
//! cargo run --release --example nystrom_data -- DIR [h n d]     # default h = 8, n = 16384, d = 64
//! attnc run examples/nystrom.attn --input q=DIR/q.npy --input k=DIR/k.npy --input v=DIR/v.npy
//! ```
//!
//! Each head has 8 centres drawn from N(0, 2²) per channel. The sequence is cut into 32 runs
//! of equal length, each run holding one centre (every centre 4 times, in a seeded shuffled
//! order), and the queries and keys of a row are its run's centre plus N(0, 0.1²) noise: the
//! attention matrix is close to one of rank 8, and each landmark segment (n/64 rows at
//! m = 64) lies inside one run. Values are standard normal. Seeded: the same files each time.

use attnc::io::{write_npy, Tensor};
use std::path::PathBuf;

const CENTRES: usize = 8;
const RUNS: usize = 32;
const CENTRE_SCALE: f32 = 2.0;
const NOISE: f32 = 0.1;

/// splitmix64, and standard normals from it (Box–Muller).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: nystrom_data DIR [h n d]"));
    let mut size = |default: usize| {
        args.next()
            .map_or(default, |s| s.parse().expect("a positive size"))
    };
    let (h, n, d) = (size(8), size(16384), size(64));
    let mut rng = Rng(2026);
    let (mut q, mut k) = (Vec::with_capacity(h * n * d), Vec::with_capacity(h * n * d));
    for _ in 0..h {
        let centres: Vec<f32> = (0..CENTRES * d)
            .map(|_| CENTRE_SCALE * rng.normal())
            .collect();
        // Every centre RUNS / CENTRES times, shuffled (Fisher–Yates).
        let mut order: Vec<usize> = (0..RUNS).map(|r| r % CENTRES).collect();
        for i in (1..RUNS).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for row in 0..n {
            let centre = order[row * RUNS / n.max(1)];
            for c in 0..d {
                q.push(centres[centre * d + c] + NOISE * rng.normal());
                k.push(centres[centre * d + c] + NOISE * rng.normal());
            }
        }
    }
    let v: Vec<f32> = (0..h * n * d).map(|_| rng.normal()).collect();
    std::fs::create_dir_all(&dir).expect("the output directory can be made");
    for (name, values) in [("q", q), ("k", k), ("v", v)] {
        let tensor = Tensor::from_f32(vec![h, n, d], values).expect("consistent shape");
        let path = dir.join(format!("{name}.npy"));
        write_npy(&path, &tensor).expect("the file can be written");
        println!("{}", path.display());
    }
}
