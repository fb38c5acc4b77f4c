//! The machine ceilings the cost model divides by: f32x4 FMA throughput, memory bandwidth and
//! the clock that turns seconds into cycles.
//!
//! The default is the target machine as measured for DESIGN.md (50 GFLOP/s per core, 12 GB/s,
//! an assumed 3 GHz), so tests and golden traces do not depend on the machine running them;
//! callers that want this machine's numbers measure them (the `attnc` facade does, once per
//! machine) and pass them in [`crate::OptimizeOptions`].

use serde::{Deserialize, Serialize};

/// Throughput ceilings of one core.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ceilings {
    /// f32x4 FMA GFLOP/s of one core.
    pub gflops: f64,
    /// Memory bandwidth in GB/s (10⁹ bytes per second).
    pub gbytes_per_second: f64,
    /// The clock in GHz, used only to express costs in cycles.
    pub ghz: f64,
}

/// How much faster than the portable f32x4 code ([`Ceilings::gflops`]) the full-width tiers
/// run each kind of step; 0 where a tier is absent (the default: portable code only, so tests
/// and golden traces do not depend on the CPU running them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TierSpeeds {
    /// AVX-512 f32: fused attention, matrix products, dense linear attention.
    pub wide: f64,
    /// bf16 products of a fused attention (`bf16_products`): AMX tiles, or AVX-512 BF16
    /// ([`TierSpeeds::bf16_on_vectors`]).
    pub amx_bf16: f64,
    /// int8 products of a fused attention (`int8`): AMX tiles, or AVX-512 VNNI
    /// ([`TierSpeeds::int8_on_vectors`]).
    pub amx_int8: f64,
}

impl TierSpeeds {
    /// The speeds of the kernels as measured on the AVX-512 + AMX machine of DESIGN.md
    /// (h = 8, n = 4096, d = 64, 2 threads, against the portable kernel's 0.82 s): f32
    /// attention 0.15 s, bf16 products 0.049 s, int8 products 0.068 s. Each is kept only
    /// where `present` says the tier can run.
    pub fn measured_kernels(wide: bool, amx_bf16: bool, amx_int8: bool) -> TierSpeeds {
        let keep = |present: bool, speed: f64| if present { speed } else { 0.0 };
        TierSpeeds {
            wide: keep(wide, 5.0),
            amx_bf16: keep(amx_bf16, 15.0),
            amx_int8: keep(amx_int8, 11.0),
        }
    }

    /// These speeds with the int8 products on AVX-512 VNNI instead of AMX tiles (where int8 is
    /// present): 1.45× the f32 attention, as measured on an AVX-512 VNNI machine without AMX
    /// (h = 8, n = 4096, d = 64: 111.4 ms against 161.9 ms, `attnc bench … --approx int8`).
    pub fn int8_on_vectors(mut self) -> TierSpeeds {
        if self.amx_int8 > 0.0 {
            self.amx_int8 = 1.45 * self.wide.max(1.0);
        }
        self
    }

    /// These speeds with the bf16 products on AVX-512 BF16 instead of AMX tiles (where bf16 is
    /// present), for a kernel whose floating-point inputs are all bf16 (`bf16_inputs`) or
    /// not: `vdpbf16ps` does twice the work of an f32 FMA, and other inputs are rounded on the
    /// way in. Measured on an AVX-512 BF16 machine without AMX (h = 8, n = 4096, d = 64, 2
    /// threads, `attnc bench … --approx bf16_products`, exact kernel in the same run): bf16
    /// inputs 99–106 ms against 168–171 ms (1.65×), f32 inputs 103–126 ms against 166–182 ms
    /// (1.4–1.6×; priced at the low end).
    pub fn bf16_on_vectors(mut self, bf16_inputs: bool) -> TierSpeeds {
        if self.amx_bf16 > 0.0 {
            let gain = if bf16_inputs { 1.65 } else { 1.4 };
            self.amx_bf16 = gain * self.wide.max(1.0);
        }
        self
    }
}

impl Default for Ceilings {
    fn default() -> Ceilings {
        Ceilings {
            gflops: 50.0,
            gbytes_per_second: 12.0,
            ghz: 3.0,
        }
    }
}

impl Ceilings {
    /// FLOPs per cycle.
    pub fn flops_per_cycle(&self) -> f64 {
        self.gflops / self.ghz
    }

    /// Bytes per cycle.
    pub fn bytes_per_cycle(&self) -> f64 {
        self.gbytes_per_second / self.ghz
    }

    /// Whether every figure is a positive finite number (a cost model needs all three).
    pub fn is_valid(&self) -> bool {
        [self.gflops, self.gbytes_per_second, self.ghz]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
    }

    /// These ceilings when valid, else the defaults.
    pub fn or_default(self) -> Ceilings {
        if self.is_valid() {
            self
        } else {
            Ceilings::default()
        }
    }
}

impl std::fmt::Display for Ceilings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} GFLOP/s (f32x4 FMA, one core), {:.1} GB/s memory, {:.1} GHz assumed clock",
            self.gflops, self.gbytes_per_second, self.ghz
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_constants() {
        let c = Ceilings::default();
        assert!((c.flops_per_cycle() - 50.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.bytes_per_cycle(), 4.0);
    }

    #[test]
    fn invalid_figures_fall_back_to_the_defaults() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let c = Ceilings {
                gbytes_per_second: bad,
                ..Ceilings::default()
            };
            assert!(!c.is_valid());
            assert_eq!(c.or_default(), Ceilings::default());
        }
        let fast = Ceilings {
            gflops: 190.0,
            ..Ceilings::default()
        };
        assert_eq!(fast.or_default(), fast);
    }
}
