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
