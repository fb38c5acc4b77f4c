//! Times refining a causal tile table by a document mask's ids (`Segments::refine`), for
//! sorted ids (documents of 1,024 tokens, the packed layout: binary searches per query tile)
//! and for ids that repeat with a short period (unsorted: a comparison per tile pair), at
//! growing n.
//!
//! ```text
//! cargo run --release -p attnc-wide --example refine_bench
//! ```

use std::time::Instant;

use attnc_wide::attention::{KEY_TILE, QUERY_TILE};
use attnc_wide::problem::{Segments, TileRun, TileTable};

/// The fastest of `runs` timings of `f`, in milliseconds.
fn fastest_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// The causal table of an `n × n` score matrix at this kernel's (square) tiles: query tile
/// `t` visits key tiles `0..t` whole and tile `t` partial.
fn causal_table(n: usize) -> TileTable {
    assert_eq!(QUERY_TILE, KEY_TILE);
    TileTable::from_fn(n, n, QUERY_TILE, KEY_TILE, |t| {
        let mut runs = Vec::new();
        for tile in 0..=t as u32 {
            TileRun::append(&mut runs, tile, tile == t as u32);
        }
        runs
    })
}

fn main() {
    println!("n        sorted ids   unsorted ids   (ms, fastest of 5)");
    for n in [16_384usize, 65_536, 262_144] {
        let table = causal_table(n);
        let sorted: Vec<i32> = (0..n).map(|j| (j / 1024) as i32).collect();
        let unsorted: Vec<i32> = (0..n).map(|j| (j % 7) as i32).collect();
        let time = |ids: &[i32]| {
            let seg = Segments {
                queries: ids,
                keys: ids,
                shift: 0,
            };
            fastest_ms(5, || {
                std::hint::black_box(seg.refine(&table, n, n));
            })
        };
        println!("{n:<8} {:>10.3} {:>14.3}", time(&sorted), time(&unsorted));
    }
}
