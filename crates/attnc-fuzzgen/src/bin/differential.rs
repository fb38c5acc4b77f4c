//! Runs generated programs through the JIT and the interpreter and reports every case that
//! breaks the documented semantics.
//!
//! ```text
//! differential [--seed S] [--count N] [--jobs J] [--print]
//! ```
//!
//! Seeds `S .. S + N` (default 0 and 1); `--print` shows each program. Exit status 1 when a
//! case fails. A failure's report names its seed: `--seed SEED` alone replays it.

use attnc_fuzzgen::case::{self, Outcome};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

struct Args {
    seed: u64,
    count: u64,
    jobs: usize,
    print: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        seed: 0,
        count: 1,
        jobs: 1,
        print: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} takes a number"))?;
            v.parse()
                .map_err(|_| format!("{name}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--seed" => a.seed = number("--seed")?,
            "--count" => a.count = number("--count")?,
            "--jobs" => a.jobs = number("--jobs")?.max(1) as usize,
            "--print" => a.print = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Totals {
    passed: u64,
    skipped: u64,
    failed: Vec<u64>,
    fused: u64,
    configs: u64,
    compared: u64,
    unspecified: u64,
    moved: u64,
    limit: u64,
    worst: f64,
    max_relative_l2: f64,
    skip_reasons: Vec<String>,
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("differential: {e}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let next = AtomicU64::new(a.seed);
    let totals = Mutex::new(Totals::default());
    let end = a.seed.saturating_add(a.count);
    std::thread::scope(|scope| {
        for _ in 0..a.jobs {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                if a.print {
                    println!("seed {seed}:\n{}", case::draw(seed).0.source);
                }
                let outcome = case::run(seed);
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Outcome::Passed(s) => {
                        t.passed += 1;
                        t.fused += u64::from(s.fused);
                        t.configs += s.configs as u64;
                        t.compared += s.compared as u64;
                        t.unspecified += s.unspecified as u64;
                        t.moved += s.moved_overflow as u64;
                        t.limit += u64::from(s.limit_reached);
                        t.worst = t.worst.max(s.worst);
                        t.max_relative_l2 = t.max_relative_l2.max(s.max_relative_l2);
                    }
                    Outcome::Skipped(why) => {
                        t.skipped += 1;
                        if !t.skip_reasons.contains(&why) {
                            t.skip_reasons.push(why);
                        }
                    }
                    Outcome::Failed(report) => {
                        t.failed.push(seed);
                        println!("FAILED {report}\n");
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    println!(
        "{} programs (seeds {}..{end}) in {:.1} s: {} passed, {} failed, {} skipped; \
         {} with a fused attention; {} JIT runs judged; {} elements compared, {} unspecified; \
         {} output elements where the rewrite moved the f32 limit; \
         {} programs leave the finite values (written and optimized forms not compared)",
        a.count,
        a.seed,
        start.elapsed().as_secs_f64(),
        t.passed,
        t.failed.len(),
        t.skipped,
        t.fused,
        t.configs,
        t.compared,
        t.unspecified,
        t.moved,
        t.limit
    );
    println!(
        "tiers: {}; largest share of its bound an element used: {:.3} (allowed {}); \
         largest relative L2 error of a well-conditioned result: {:.2e} (allowed {:.0e})",
        tier_names(),
        t.worst,
        attnc_fuzzgen::judge::SLACK,
        t.max_relative_l2,
        attnc_ir::compare::tol::EXACT_F32
    );
    for why in &t.skip_reasons {
        println!("skipped: {why}");
    }
    if !t.failed.is_empty() {
        let mut seeds = t.failed.clone();
        seeds.sort_unstable();
        println!("failed seeds: {seeds:?}");
        std::process::exit(1);
    }
}

/// The tiers each case runs on, on this machine.
fn tier_names() -> String {
    let all = attnc_jit::wide::Tiers::available(attnc_jit::wide::Tiers::ALL);
    if all == attnc_jit::wide::Tiers::NONE {
        "portable only (no full-width tier on this CPU)".to_string()
    } else {
        format!("portable, and full-width {all:?}")
    }
}
