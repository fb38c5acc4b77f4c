//! Times the AMX products on the benchmark shapes: dense (h = 8, n = 4096, d = 64) and causal
//! window(256) (h = 8, n = 16384, d = 64), bf16 and int8, on 1 and 2 threads (work split by
//! (head, query tile), threads interleaved), packing included. Prints the median of the runs
//! and GFLOP/s (4·m·n·d per head for dense; 4·kept·d for the window, with the dense-equivalent
//! 4·m·n·d beside it), the packing time and the kernels' on-CPU time (summed over threads: the
//! machine is shared, so wall time alone mixes in other load), and the error of the last run
//! against the f64 reference on a sample of rows.
//!
//! `cargo run --release -p attnc-wide --example amx_bench [-- runs [filter]]`

use std::time::Instant;

use attnc_wide::amx::{self, Products, KEY_TILE, QUERY_TILE};
use attnc_wide::problem::{
    reference, Call, Elements, KeyMask, Operand, Output, Score, TileRun, TileTable,
};

const H: usize = 8;

/// CPU time of the calling thread in seconds (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`), to
/// tell our work from the machine's other load; 0 where not on x86-64 Linux.
fn thread_cpu() -> f64 {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let mut ts = [0i64; 2];
        // SAFETY: clock_gettime(CLOCK_THREAD_CPUTIME_ID = 3, &ts) writes 16 bytes to `ts`;
        // the syscall clobbers rcx and r11.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") 228i64 => _,
                in("rdi") 3i64,
                in("rsi") ts.as_mut_ptr(),
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ts[0] as f64 + ts[1] as f64 * 1e-9
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        0.0
    }
}
const D: usize = 64;

struct Workload {
    name: &'static str,
    n: usize,
    mask: Option<KeyMask>,
    window: Option<usize>,
}

/// xorshift64* normals (Box–Muller).
fn normals(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// The table of `causal ∧ window(w)` for m = n from tile corners (the kept set is convex).
fn window_table(n: usize, w: usize) -> TileTable {
    TileTable::from_fn(n, n, QUERY_TILE, KEY_TILE, |t| {
        let (r0, r1) = (t * QUERY_TILE, ((t + 1) * QUERY_TILE).min(n) - 1);
        let keeps = |i: usize, j: usize| j <= i && i - j <= w;
        let mut runs: Vec<TileRun> = Vec::new();
        for kt in 0..n.div_ceil(KEY_TILE) {
            let (a, b) = (kt * KEY_TILE, ((kt + 1) * KEY_TILE).min(n) - 1);
            // Some i in [r0, r1] ∩ [a, b + w].
            if r1 < a || r0 > b + w {
                continue;
            }
            let partial = !(keeps(r0, a) && keeps(r0, b) && keeps(r1, a) && keeps(r1, b));
            match runs.last_mut() {
                Some(r) if r.end == kt as u32 && r.partial == partial => r.end += 1,
                _ => runs.push(TileRun {
                    first: kt as u32,
                    end: kt as u32 + 1,
                    partial,
                }),
            }
        }
        runs
    })
}

fn call<'a>(
    w: &'a Workload,
    h: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    tiles: &'a TileTable,
) -> Call<'a> {
    let n = w.n;
    let op = |x: &'a [f32]| Operand {
        data: Elements::F32(&x[h * n * D..(h + 1) * n * D]),
        rows: n,
        cols: D,
        row_stride: D,
    };
    Call {
        q: op(q),
        k: op(k),
        v: op(v),
        score: Score::scaled(1.0 / (D as f32).sqrt()),
        mask: w.mask.as_ref(),
        tiles,
        segments: None,
        blocks: None,
    }
}

/// One timed run: pack every head, then every (head, query tile) on `threads` threads.
fn once(
    p: Products,
    w: &Workload,
    threads: usize,
    inputs: (&[f32], &[f32], &[f32]),
    tiles: &TileTable,
    o: &mut [f32],
) -> (f64, f64, f64) {
    let (q, k, v) = inputs;
    let n = w.n;
    let start = Instant::now();
    let packed: Vec<amx::Packed> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..H)
                        .step_by(threads)
                        .map(|h| (h, amx::pack(p, &call(w, h, q, k, v, tiles)).expect("pack")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, amx::Packed)> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("packing thread"))
            .collect();
        all.sort_by_key(|e| e.0);
        all.into_iter().map(|e| e.1).collect()
    });
    let packing = start.elapsed().as_secs_f64();
    let tiles_per_head = n.div_ceil(QUERY_TILE);
    let mut items: Vec<Vec<(usize, usize, &mut [f32])>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (idx, chunk) in o.chunks_mut(QUERY_TILE * D).enumerate() {
        let (h, t) = (idx / tiles_per_head, idx % tiles_per_head);
        items[idx % threads].push((h, t, chunk));
    }
    let cpu = std::thread::scope(|s| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|list| {
                let packed = &packed;
                s.spawn(move || {
                    let c0 = thread_cpu();
                    for (h, t, chunk) in list {
                        let c = call(w, h, q, k, v, tiles);
                        let rows = t * QUERY_TILE..((t + 1) * QUERY_TILE).min(n);
                        let mut out = Output {
                            o: chunk,
                            row_stride: D,
                            lse: None,
                            lse_from_origin: false,
                        };
                        amx::run(p, &c, &packed[h], rows, &mut out).expect("run");
                    }
                    thread_cpu() - c0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .sum::<f64>()
    });
    (start.elapsed().as_secs_f64(), packing, cpu)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let filter = args.get(2).cloned().unwrap_or_default();
    let workloads = [
        Workload {
            name: "dense n=4096",
            n: 4096,
            mask: None,
            window: None,
        },
        Workload {
            name: "causal window(256) n=16384",
            n: 16384,
            mask: Some(KeyMask::And(
                Box::new(KeyMask::Causal),
                Box::new(KeyMask::Window(256)),
            )),
            window: Some(256),
        },
    ];
    for p in [Products::Bf16, Products::Int8] {
        if !amx::available(p) {
            println!("{p:?}: not available on this machine");
            continue;
        }
        for w in &workloads {
            let label = format!("{p:?} {}", w.name);
            if !label.contains(&filter) {
                continue;
            }
            let n = w.n;
            let (q, k, v) = (
                normals(H * n * D, 11),
                normals(H * n * D, 22),
                normals(H * n * D, 33),
            );
            let tiles = match w.window {
                Some(wd) => window_table(n, wd),
                None => TileTable::dense(n, n, QUERY_TILE, KEY_TILE),
            };
            let pairs: f64 = match w.window {
                Some(wd) => (0..n).map(|i| (i.min(wd) + 1) as f64).sum(),
                None => (n * n) as f64,
            };
            let flops = 4.0 * pairs * D as f64 * H as f64;
            let mut o = vec![0.0f32; H * n * D];
            for threads in [1, 2] {
                once(p, w, threads, (&q, &k, &v), &tiles, &mut o); // warm-up
                let mut times: Vec<(f64, f64, f64)> = (0..runs)
                    .map(|_| once(p, w, threads, (&q, &k, &v), &tiles, &mut o))
                    .collect();
                times.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (med, pack, cpu) = times[times.len() / 2];
                let dense = 4.0 * (n * n) as f64 * D as f64 * H as f64;
                let equivalent = if w.window.is_some() {
                    format!(" ({:.0} dense-equivalent)", dense / med / 1e9)
                } else {
                    String::new()
                };
                println!(
                    "{label:<40} {threads} thread(s): median {:.4} s [{:.4} .. {:.4}] {:>7.1} GFLOP/s{equivalent} (packing {:.4} s; kernels on CPU {:.4} s)",
                    med,
                    times[0].0,
                    times[times.len() - 1].0,
                    flops / med / 1e9,
                    pack,
                    cpu
                );
            }
            // Error of the last run on head 0, rows 0..64, against the f64 reference.
            let sample = 64;
            let sub = match w.window {
                Some(_) => TileTable::enumerate(
                    w.mask.as_ref().expect("mask"),
                    sample,
                    n,
                    QUERY_TILE,
                    KEY_TILE,
                ),
                None => TileTable::dense(sample, n, QUERY_TILE, KEY_TILE),
            };
            let mut c = call(w, 0, &q, &k, &v, &tiles);
            // The last `sample` queries (aligned to the end of the keys, as the full call's).
            let qs = &q[(n - sample) * D..n * D];
            c.q = Operand {
                data: Elements::F32(qs),
                rows: sample,
                cols: D,
                row_stride: D,
            };
            c.tiles = &sub;
            let (want, _) = reference(&c);
            let got = &o[(n - sample) * D..n * D];
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            println!(
                "{label:<40} relative L2 error (head 0, last {sample} rows): {:.2e}",
                (num / den).sqrt()
            );
        }
    }
}
