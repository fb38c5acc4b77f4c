//! The widest-vector f32 FMA peak of this machine, measured: what `attnc bench` reports every
//! kernel's GFLOP/s against, so that "percent of the ceiling" never hides the gap to the
//! hardware (a 128-bit kernel at 70 % of its own ceiling is at under 20 % of this).
//!
//! The probe runs independent chains of 512-bit FMAs on registers only (no memory traffic),
//! enough chains to cover the instruction's latency at two issues per cycle, on each of
//! `threads` threads at once.

use crate::cpu::Features;
use std::time::Instant;

/// FMA instructions per chain and pass of the probe.
const STEPS: u64 = 1 << 22;

/// Independent accumulator chains (latency 4 × 2 ports; 12 leaves slack).
const CHAINS: usize = 12;

/// The measured 512-bit f32 FMA rate of `threads` threads running together, in GFLOP/s
/// (counting 2 FLOP per lane per FMA), best of three passes; `None` without AVX-512.
pub fn f32_fma_peak(threads: usize) -> Option<f64> {
    if !Features::detect().avx512 {
        return None;
    }
    let threads = threads.max(1);
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            let sinks: Vec<f32> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(run_chains)).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0.0))
                    .collect()
            });
            let seconds = start.elapsed().as_secs_f64();
            // The sum keeps the chains from being optimized away.
            std::hint::black_box(sinks.iter().sum::<f32>());
            seconds
        })
        .fold(f64::INFINITY, f64::min);
    let flops = threads as f64 * STEPS as f64 * CHAINS as f64 * 16.0 * 2.0;
    Some(flops / best / 1e9)
}

/// One thread's FMA chains; returns a value that depends on all of them.
fn run_chains() -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `f32_fma_peak` checked AVX-512 before any thread runs this.
        unsafe { chains_avx512() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut total = _mm512_setzero_ps();
    for x in acc {
        total = _mm512_add_ps(total, x);
    }
    _mm512_reduce_add_ps(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_a_plausible_rate_where_avx512_exists() {
        match f32_fma_peak(1) {
            Some(g) => {
                eprintln!("512-bit f32 FMA peak, 1 thread: {g:.1} GFLOP/s");
                assert!(g.is_finite() && g > 1.0, "{g}");
            }
            None => eprintln!("skipped: no AVX-512"),
        }
    }
}
