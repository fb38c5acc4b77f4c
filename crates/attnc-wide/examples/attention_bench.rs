//! Times the AVX-512 f32 attention kernel on the standard workloads at 1 and 2 threads.
//!
//! ```text
//! cargo run --release -p attnc-wide --example attention_bench -- [dense|causal|window|decode|KIND:h,m,n,d]... [--runs N] [--threads 1,2]
//! ```
//!
//! Work is split over threads by (head, query tile): thread t takes every item (head, tile)
//! whose index `head · tiles + tile` is t modulo the thread count, one `attention::run` call
//! per tile, so causal work balances. Each workload runs once to warm up, then `--runs` times (default 7); the median
//! and the range are printed. GFLOP/s counts 4·d per kept (query, key) pair (dense: 4·m·n·d
//! per head); "tile GFLOP/s" counts every pair of every visited tile, the kernel's own rate.
//! "on-CPU" divides by the time the threads actually held a CPU (Linux schedstat), a steadier
//! figure on a shared machine than wall time. Decode also prints the GB/s of K and V read, next to a plain streaming read of the same
//! bytes on the same threads (the memory roof).

use std::time::Instant;

use attnc_wide::attention::{self, KEY_TILE, QUERY_TILE};
use attnc_wide::problem::{Call, Elements, KeyMask, Operand, Output, Score, TileRun, TileTable};
use half::bf16;

/// Keys row `i'` keeps: `i' − below ≤ j ≤ i' + above` (`None`: unbounded).
#[derive(Clone, Copy)]
struct Band {
    below: Option<usize>,
    above: usize,
}

/// The tile table of a band mask (what the compiler derives from the pattern algebra),
/// queries end-aligned.
fn band_table(band: Band, m: usize, n: usize) -> TileTable {
    let shift = n as i64 - m as i64;
    TileTable::from_fn(m, n, QUERY_TILE, KEY_TILE, |t| {
        let first_row = (t * QUERY_TILE) as i64 + shift;
        let last_row = (((t + 1) * QUERY_TILE).min(m) - 1) as i64 + shift;
        let mut runs: Vec<TileRun> = Vec::new();
        for tile in 0..n.div_ceil(KEY_TILE) {
            let first_key = (tile * KEY_TILE) as i64;
            let last_key = (((tile + 1) * KEY_TILE).min(n) - 1) as i64;
            let lo = |row: i64| band.below.map_or(i64::MIN, |b| row - b as i64);
            let hi = |row: i64| row + band.above as i64;
            let any = first_key <= hi(last_row) && last_key >= lo(first_row);
            let all = last_key <= hi(first_row) && first_key >= lo(last_row);
            if !any {
                continue;
            }
            let partial = !all;
            match runs.last_mut() {
                Some(r) if r.end == tile as u32 && r.partial == partial => r.end += 1,
                _ => runs.push(TileRun {
                    first: tile as u32,
                    end: tile as u32 + 1,
                    partial,
                }),
            }
        }
        runs
    })
}

fn band_mask(band: Band) -> Option<KeyMask> {
    match band.below {
        None if band.above == 0 => Some(KeyMask::Causal),
        Some(w) if band.above == 0 => Some(KeyMask::And(
            Box::new(KeyMask::Causal),
            Box::new(KeyMask::Window(w as u64)),
        )),
        _ => None,
    }
}

struct Workload {
    name: &'static str,
    heads: usize,
    m: usize,
    n: usize,
    d: usize,
    bf16_kv: bool,
    band: Option<Band>,
}

/// Deterministic values in [−1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

enum Kv {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Kv {
    fn elements(&self, head: usize, len: usize) -> Elements<'_> {
        match self {
            Kv::F32(x) => Elements::F32(&x[head * len..(head + 1) * len]),
            Kv::Bf16(x) => Elements::Bf16(&x[head * len..(head + 1) * len]),
        }
    }
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn run_workload(w: &Workload, threads: &[usize], runs: usize) {
    let (h, m, n, d) = (w.heads, w.m, w.n, w.d);
    let q = values(h * m * d, 1);
    let (k, v) = if w.bf16_kv {
        let conv = |x: Vec<f32>| Kv::Bf16(x.into_iter().map(bf16::from_f32).collect());
        (conv(values(h * n * d, 2)), conv(values(h * n * d, 3)))
    } else {
        (Kv::F32(values(h * n * d, 2)), Kv::F32(values(h * n * d, 3)))
    };
    let mask = w.band.and_then(band_mask);
    let tiles = match w.band {
        Some(band) => band_table(band, m, n),
        None => TileTable::dense(m, n, QUERY_TILE, KEY_TILE),
    };
    // Work counted: kept pairs (useful) and visited-tile pairs (the kernel's work).
    let shift = n as i64 - m as i64;
    let kept: f64 = (0..m)
        .map(|i| {
            let ia = i as i64 + shift;
            let (lo, hi) = match w.band {
                None => (0, n as i64 - 1),
                Some(b) => (
                    b.below.map_or(0, |x| (ia - x as i64).max(0)),
                    (ia + b.above as i64).min(n as i64 - 1),
                ),
            };
            (hi - lo + 1).max(0) as f64
        })
        .sum();
    let visited: f64 = (0..tiles.query_tiles())
        .map(|t| {
            let rows = (((t + 1) * QUERY_TILE).min(m) - t * QUERY_TILE) as f64;
            let keys: usize = tiles
                .runs(t)
                .iter()
                .flat_map(|r| r.first..r.end)
                .map(|kt| ((kt as usize + 1) * KEY_TILE).min(n) - kt as usize * KEY_TILE)
                .sum();
            rows * keys as f64
        })
        .sum();
    let flops = 4.0 * d as f64 * kept * h as f64;
    let tile_flops = 4.0 * d as f64 * visited * h as f64;
    let mut o = vec![0.0f32; h * m * d];
    let q_tiles = m.div_ceil(QUERY_TILE);
    let scale = 1.0 / (d as f32).sqrt();
    let call_of = |head: usize| Call {
        q: Operand {
            data: Elements::F32(&q[head * m * d..(head + 1) * m * d]),
            rows: m,
            cols: d,
            row_stride: d,
        },
        k: Operand {
            data: k.elements(head, n * d),
            rows: n,
            cols: d,
            row_stride: d,
        },
        v: Operand {
            data: v.elements(head, n * d),
            rows: n,
            cols: d,
            row_stride: d,
        },
        score: Score::scaled(scale),
        mask: mask.as_ref(),
        tiles: &tiles,
        segments: None,
        blocks: None,
    };
    // Nanoseconds on the CPU, summed over the threads of one run.
    let cpu = std::sync::atomic::AtomicU64::new(0);
    for &t in threads {
        let mut once = || {
            let start = Instant::now();
            std::thread::scope(|scope| {
                // Each thread gets the output tiles it computes.
                let mut parts: Vec<Vec<(usize, usize, &mut [f32])>> =
                    (0..t).map(|_| Vec::new()).collect();
                for (head, o_head) in o.chunks_mut(m * d).enumerate() {
                    for (tile, o_tile) in o_head.chunks_mut(QUERY_TILE * d).enumerate() {
                        parts[(head * q_tiles + tile) % t].push((head, tile, o_tile));
                    }
                }
                for part in parts {
                    let call_of = &call_of;
                    let cpu = &cpu;
                    scope.spawn(move || {
                        let on_cpu = on_cpu_ns();
                        for (head, tile, o_tile) in part {
                            let call = call_of(head);
                            let rows = tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(m);
                            let mut out = Output {
                                o: o_tile,
                                row_stride: d,
                                lse: None,
                                lse_from_origin: false,
                            };
                            attention::run(&call, rows, &mut out).expect("a valid call");
                        }
                        let ns = on_cpu_ns().zip(on_cpu).map_or(0, |(b, a)| b - a);
                        cpu.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
                    });
                }
            });
            start.elapsed().as_secs_f64()
        };
        once();
        let mut cpu_times = Vec::new();
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                cpu.store(0, std::sync::atomic::Ordering::Relaxed);
                let wall = once();
                cpu_times
                    .push(cpu.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9 / t as f64);
                wall
            })
            .collect();
        let med = median(&mut times);
        let cpu_med = median(&mut cpu_times);
        let (lo, hi) = (times[0], times[times.len() - 1]);
        let mut line = format!(
            "{:<8} h={h} m={m} n={n} d={d}{} threads={t}: median {med:.4} s [{lo:.4}, {hi:.4}]  {:.1} GFLOP/s [{:.1}, {:.1}]  tile {:.1} GFLOP/s",
            w.name,
            if w.bf16_kv { " bf16 K/V" } else { "" },
            flops / med / 1e9,
            flops / hi / 1e9,
            flops / lo / 1e9,
            tile_flops / med / 1e9,
        );
        if cpu_med > 0.0 {
            line += &format!("  on-CPU {:.1} GFLOP/s", flops / cpu_med / 1e9);
        }
        if q_tiles == 1 {
            let bytes = 2.0 * (h * n * d * if w.bf16_kv { 2 } else { 4 }) as f64;
            let roof = stream_read(&k, &v, t, runs);
            line += &format!(
                "  {:.1} GB/s of K+V (streaming read of the same bytes: {:.1} GB/s)",
                bytes / med / 1e9,
                bytes / roof / 1e9
            );
        }
        println!("{line}");
    }
    let checksum: f64 = o.iter().map(|&x| x as f64).sum();
    if !checksum.is_finite() {
        println!("{}: non-finite output", w.name);
    }
}

/// This thread's time on a CPU so far (Linux schedstat; excludes time other tenants of a
/// shared machine held the CPU), if known.
fn on_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Median seconds to read K and V once with 512-bit loads (XOR-folded, so the loads are the
/// only work), split over `t` threads: the memory roof of decode.
fn stream_read(k: &Kv, v: &Kv, t: usize, runs: usize) -> f64 {
    let slices: Vec<&[u8]> = [k, v]
        .iter()
        .map(|x| match x {
            Kv::F32(x) => bytes_of_f32(x),
            Kv::Bf16(x) => bytes_of_bf16(x),
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn fold(bytes: &[u8]) -> u64 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut blocks = bytes.chunks_exact(256);
        for block in &mut blocks {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: the block holds 256 bytes; 64-byte part i lies inside it.
                let x = unsafe { _mm512_loadu_si512(block.as_ptr().add(64 * i).cast()) };
                *a = _mm512_xor_si512(*a, x);
            }
        }
        let tail: u64 = blocks.remainder().iter().map(|&b| b as u64).sum();
        let mut lanes = [0u64; 8];
        let all = _mm512_xor_si512(
            _mm512_xor_si512(acc[0], acc[1]),
            _mm512_xor_si512(acc[2], acc[3]),
        );
        // SAFETY: `lanes` holds 64 bytes.
        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), all) };
        lanes.iter().fold(tail, |x, &y| x ^ y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn fold(bytes: &[u8]) -> u64 {
        bytes.iter().map(|&b| b as u64).sum()
    }
    let once = || {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..t)
                .map(|i| {
                    let slices = &slices;
                    scope.spawn(move || {
                        let mut sum = 0u64;
                        for s in slices {
                            let chunk = s.len().div_ceil(t);
                            let part = &s[(i * chunk).min(s.len())..((i + 1) * chunk).min(s.len())];
                            // SAFETY: main checked AVX-512 before any workload runs.
                            sum ^= unsafe { fold(part) };
                        }
                        sum
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(total);
        start.elapsed().as_secs_f64()
    };
    once();
    let mut times: Vec<f64> = (0..runs).map(|_| once()).collect();
    median(&mut times)
}

fn bytes_of_f32(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 bit pattern is valid bytes; the length covers the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn bytes_of_bf16(x: &[bf16]) -> &[u8] {
    // SAFETY: as above; bf16 is a plain 16-bit value.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

/// GFLOP/s of independent 512-bit FMAs on `t` threads right now (the machine's roof).
fn fma_peak(t: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        fn chains(iters: usize) -> f32 {
            let mut acc = [_mm512_set1_ps(0.0); 24];
            let a = _mm512_set1_ps(0.999_999);
            let b = _mm512_set1_ps(1e-7);
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            let mut s = _mm512_setzero_ps();
            for x in acc {
                s = _mm512_add_ps(s, x);
            }
            _mm512_reduce_add_ps(s)
        }
        let iters = 20_000_000;
        let mut best = 0.0f64;
        for _ in 0..3 {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..t {
                    // SAFETY: main checked AVX-512 before calling.
                    scope.spawn(|| std::hint::black_box(unsafe { chains(iters) }));
                }
            });
            let flops = (t * iters * 24 * 32) as f64;
            best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
        }
        best
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = t;
        0.0
    }
}

fn main() {
    if !attention::available() {
        println!("skipped: this CPU has no AVX-512");
        return;
    }
    let mut names = Vec::new();
    let mut runs = 7;
    let mut threads = vec![1, 2];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|x| x.parse().ok()).unwrap_or(runs),
            "--threads" => {
                threads = args
                    .next()
                    .map(|x| x.split(',').filter_map(|t| t.parse().ok()).collect())
                    .unwrap_or(threads)
            }
            name => names.push(name.to_string()),
        }
    }
    // The band tables against enumeration, on a small size.
    for band in [
        Band {
            below: None,
            above: 0,
        },
        Band {
            below: Some(100),
            above: 0,
        },
    ] {
        let mask = band_mask(band).expect("a band mask");
        for (m, n) in [(300, 300), (200, 450)] {
            assert_eq!(
                band_table(band, m, n),
                TileTable::enumerate(&mask, m, n, QUERY_TILE, KEY_TILE)
            );
        }
    }
    let all = [
        Workload {
            name: "dense",
            heads: 8,
            m: 4096,
            n: 4096,
            d: 64,
            bf16_kv: false,
            band: None,
        },
        Workload {
            name: "causal",
            heads: 8,
            m: 16384,
            n: 16384,
            d: 64,
            bf16_kv: false,
            band: Some(Band {
                below: None,
                above: 0,
            }),
        },
        Workload {
            name: "window",
            heads: 8,
            m: 16384,
            n: 16384,
            d: 64,
            bf16_kv: false,
            band: Some(Band {
                below: Some(256),
                above: 0,
            }),
        },
        Workload {
            name: "decode",
            heads: 8,
            m: 1,
            n: 32768,
            d: 128,
            bf16_kv: true,
            band: None,
        },
    ];
    let peaks: Vec<String> = threads
        .iter()
        .map(|&t| format!("{t} thread(s) {:.1}", fma_peak(t)))
        .collect();
    println!("512-bit FMA peak now (GFLOP/s): {}", peaks.join(", "));
    for w in &all {
        if names.is_empty() || names.iter().any(|n| n == w.name) {
            run_workload(w, &threads, runs);
        }
    }
    // Any other shape: `dense:h,m,n,d` or `causal:h,m,n,d` (f32), or `decode:h,m,n,d` (bf16
    // K and V).
    for name in &names {
        let Some((kind, dims)) = name.split_once(':') else {
            continue;
        };
        let dims: Vec<usize> = dims.split(',').filter_map(|x| x.parse().ok()).collect();
        if let ([heads, m, n, d], "dense" | "causal" | "decode") = (&dims[..], kind) {
            let w = Workload {
                name: match kind {
                    "dense" => "dense",
                    "causal" => "causal",
                    _ => "decode",
                },
                heads: *heads,
                m: *m,
                n: *n,
                d: *d,
                bf16_kv: kind == "decode",
                band: (kind == "causal").then_some(Band {
                    below: None,
                    above: 0,
                }),
            };
            run_workload(&w, &threads, runs);
        }
    }
    let peaks: Vec<String> = threads
        .iter()
        .map(|&t| format!("{t} thread(s) {:.1}", fma_peak(t)))
        .collect();
    println!("512-bit FMA peak after (GFLOP/s): {}", peaks.join(", "));
}
