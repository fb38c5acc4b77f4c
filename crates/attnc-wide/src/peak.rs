//! The widest-vector peaks of this machine, measured: what `attnc bench` reports every kernel's
//! GFLOP/s against, so that "percent of the ceiling" never hides the gap to the hardware (a
//! 128-bit kernel at 70 % of its own ceiling is at under 20 % of this).
//!
//! Each probe runs independent chains of one 512-bit instruction on registers only (no memory
//! traffic), enough chains to cover its latency at two issues per cycle, on each of `threads`
//! threads at once, and counts 2 operations per multiply-add: the f32 FMA
//! ([`f32_fma_peak`]) and the reduced-precision dot products the bf16 and int8 kernels use on
//! vectors ([`dot_product_peak`]).

use crate::cpu::Features;
use std::time::Instant;

/// Instructions per chain and pass of a probe.
const STEPS: u64 = 1 << 22;

/// Independent accumulator chains (latency 4 to 6 × 2 ports; 12 leaves slack).
const CHAINS: usize = 12;

/// A 512-bit dot-product instruction of the reduced-precision kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotProduct {
    /// `vdpbf16ps`: pairs of bf16, f32 sums (2 multiply-adds per lane).
    Bf16Pairs,
    /// `vpdpwssd`: pairs of signed 16-bit words, i32 sums (2 multiply-adds per lane).
    I16Pairs,
    /// `vpdpbusd`: quads of unsigned × signed bytes, i32 sums (4 multiply-adds per lane).
    U8Quads,
}

impl DotProduct {
    /// Multiply-adds per lane of one instruction.
    pub fn multiply_adds(self) -> usize {
        match self {
            DotProduct::Bf16Pairs | DotProduct::I16Pairs => 2,
            DotProduct::U8Quads => 4,
        }
    }

    /// The instruction's mnemonic.
    pub fn mnemonic(self) -> &'static str {
        match self {
            DotProduct::Bf16Pairs => "vdpbf16ps",
            DotProduct::I16Pairs => "vpdpwssd",
            DotProduct::U8Quads => "vpdpbusd",
        }
    }

    fn available(self, f: Features) -> bool {
        f.avx512
            && match self {
                DotProduct::Bf16Pairs => f.avx512_bf16,
                DotProduct::I16Pairs | DotProduct::U8Quads => f.avx512_vnni,
            }
    }
}

/// The measured 512-bit f32 FMA rate of `threads` threads running together, in GFLOP/s
/// (counting 2 FLOP per lane per FMA), best of three passes; `None` without AVX-512.
pub fn f32_fma_peak(threads: usize) -> Option<f64> {
    Features::detect()
        .avx512
        .then(|| rate(threads, 1, Probe::Fma))
}

/// The measured rate of `kind` on `threads` threads running together, in G operations per
/// second (2 per multiply-add, as [`f32_fma_peak`] counts), best of three passes; `None`
/// where this CPU lacks the instruction.
pub fn dot_product_peak(kind: DotProduct, threads: usize) -> Option<f64> {
    kind.available(Features::detect())
        .then(|| rate(threads, kind.multiply_adds(), Probe::Dot(kind)))
}

#[derive(Clone, Copy)]
enum Probe {
    Fma,
    Dot(DotProduct),
}

/// Operations per second (G) of `probe` on `threads` threads: `multiply_adds` per lane per
/// instruction.
fn rate(threads: usize, multiply_adds: usize, probe: Probe) -> f64 {
    let threads = threads.max(1);
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            let sinks: Vec<f32> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| s.spawn(move || run_chains(probe)))
                    .collect();
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
    let ops = threads as f64 * STEPS as f64 * CHAINS as f64 * 16.0 * 2.0 * multiply_adds as f64;
    ops / best / 1e9
}

/// One thread's chains of `probe`; returns a value that depends on all of them.
fn run_chains(probe: Probe) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `f32_fma_peak` and `dot_product_peak` checked the instructions before any
        // thread runs this.
        unsafe {
            match probe {
                Probe::Fma => chains_fma(),
                Probe::Dot(DotProduct::Bf16Pairs) => chains_bf16(),
                Probe::Dot(DotProduct::I16Pairs) => chains_vnni::<false>(),
                Probe::Dot(DotProduct::U8Quads) => chains_vnni::<true>(),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = probe;
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_fma() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    sum_lanes(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn chains_bf16() -> f32 {
    use std::arch::x86_64::*;
    // 1e-3 · 1e-3 per product: the sums stay finite over every step.
    let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, a, a);
        }
    }
    sum_lanes(acc)
}

/// `vpdpbusd` chains when `BYTES`, else `vpdpwssd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
fn chains_vnni<const BYTES: bool>() -> f32 {
    use std::arch::x86_64::*;
    // Products of 1: the i32 sums wrap only after far more steps than a pass runs.
    let a = _mm512_set1_epi8(1);
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..STEPS {
        for x in acc.iter_mut() {
            *x = if BYTES {
                _mm512_dpbusd_epi32(*x, a, a)
            } else {
                _mm512_dpwssd_epi32(*x, a, a)
            };
        }
    }
    sum_lanes(acc.map(|x| _mm512_cvtepi32_ps(x)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes(acc: [std::arch::x86_64::__m512; CHAINS]) -> f32 {
    use std::arch::x86_64::*;
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

    #[test]
    fn dot_product_peaks_are_plausible_where_the_cpu_has_them() {
        let fma = f32_fma_peak(1);
        for kind in [
            DotProduct::Bf16Pairs,
            DotProduct::I16Pairs,
            DotProduct::U8Quads,
        ] {
            match (dot_product_peak(kind, 1), fma) {
                (Some(g), Some(fma)) => {
                    eprintln!("{}: {g:.1} G ops/s against FMA {fma:.1}", kind.mnemonic());
                    // Every such CPU runs them at least at half the FMA's rate per operation.
                    assert!(g.is_finite() && g > 0.5 * fma, "{g} {fma}");
                }
                (None, _) => eprintln!("skipped: no {}", kind.mnemonic()),
                (Some(g), None) => panic!("{} without AVX-512: {g}", kind.mnemonic()),
            }
        }
    }
}
