//! Mixed-precision training: gradients stored in f16 or bf16, f32 master weights, and a
//! dynamic loss scaler.
//!
//! f16 has 5 exponent bits: values below 2⁻²⁴ (about 6e-8) round to zero, and gradients of a
//! mean loss over many elements are routinely that small, so an f16 gradient loses them (its
//! parameter stops learning). The cure is the one PyTorch's `GradScaler` applies: multiply the
//! loss (here: the cotangent, the gradient of the loss with respect to the output) by a large
//! scale `S` before the backward, so the gradients are `S` times larger while stored in f16,
//! then divide by `S` in f32 before the update. `S` is chosen dynamically by [`LossScaler`]:
//! it starts at 2¹⁶, halves (and the step is skipped) when a gradient overflows to ±∞ or NaN,
//! and doubles after 2,000 steps in a row without overflow.
//!
//! [`store`] rounds an f32 gradient to its storage type and counts what the rounding lost
//! (nonzero values that became zero) and what overflowed; [`MasterWeights`] keeps the f32
//! copy an optimizer updates and hands out the rounded copy the forward reads.
//!
//! ```
//! use attnc::train::{store, LossScaler, Storage};
//!
//! let mut scaler = LossScaler::new();
//! let grad = [3.0e-9f32, 1.0e-3];
//! // Unscaled, f16 storage loses the small gradient.
//! let (_, lost) = store(&grad, Storage::F16);
//! assert_eq!(lost.underflows, 1);
//! // Scaled by 2^16 it survives, and unscaling gives it back in f32.
//! let scaled: Vec<f32> = grad.iter().map(|g| g * scaler.scale()).collect();
//! let (stored, stats) = store(&scaled, Storage::F16);
//! assert_eq!(stats.underflows, 0);
//! let step = scaler.unscale(&stored);
//! assert!(step.finite);
//! assert!((step.grads[0] - 3.0e-9).abs() < 1e-11);
//! assert!(scaler.update(step.finite)); // the step is taken
//! ```

use half::{bf16, f16};

/// The storage type of gradients (and of the weights the forward reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// f32: nothing rounded.
    F32,
    /// IEEE half: 5 exponent bits, 10 mantissa bits.
    F16,
    /// bfloat16: 8 exponent bits (f32's range), 7 mantissa bits.
    Bf16,
}

impl Storage {
    /// `x` rounded to this type (to nearest even) and widened back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Storage::F32 => x,
            Storage::F16 => f16::from_f32(x).to_f32(),
            Storage::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// What rounding a gradient to its storage type did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Finite nonzero values that became ±0.
    pub underflows: usize,
    /// Finite values that became ±∞.
    pub overflows: usize,
    /// Values that were already ±∞ or NaN.
    pub non_finite: usize,
}

impl StoreStats {
    /// Whether every stored value is finite (no overflow, no ∞ or NaN given).
    pub fn finite(&self) -> bool {
        self.overflows == 0 && self.non_finite == 0
    }
}

impl std::ops::Add for StoreStats {
    type Output = StoreStats;

    fn add(self, other: StoreStats) -> StoreStats {
        StoreStats {
            underflows: self.underflows + other.underflows,
            overflows: self.overflows + other.overflows,
            non_finite: self.non_finite + other.non_finite,
        }
    }
}

impl std::ops::AddAssign for StoreStats {
    fn add_assign(&mut self, other: StoreStats) {
        *self = *self + other;
    }
}

/// `grad` rounded to `storage` (as f32 values), with what the rounding lost.
pub fn store(grad: &[f32], storage: Storage) -> (Vec<f32>, StoreStats) {
    let mut stats = StoreStats::default();
    let stored = grad
        .iter()
        .map(|&x| {
            let y = storage.round(x);
            if !x.is_finite() {
                stats.non_finite += 1;
            } else if y.is_infinite() {
                stats.overflows += 1;
            } else if y == 0.0 && x != 0.0 {
                stats.underflows += 1;
            }
            y
        })
        .collect();
    (stored, stats)
}

/// A dynamic loss scale with `GradScaler`'s defaults: start 2¹⁶, ×2 after 2,000 clean steps in
/// a row, ×½ and skip the step on an infinite or NaN gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    clean_steps: u32,
    skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler::new()
    }
}

/// Gradients divided by the loss scale, and whether all of them are finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Unscaled {
    /// The gradients in f32, divided by the scale.
    pub grads: Vec<f32>,
    /// Whether every gradient is finite (else the step must be skipped).
    pub finite: bool,
}

impl LossScaler {
    /// The defaults: scale 2¹⁶, growth ×2 every 2,000 clean steps, backoff ×½.
    pub fn new() -> LossScaler {
        LossScaler::with_options(65536.0, 2.0, 0.5, 2000)
    }

    /// A scaler starting at `scale`, multiplied by `growth_factor` after `growth_interval`
    /// clean steps in a row and by `backoff_factor` on each overflow (clamped to sane values:
    /// a positive finite scale, growth ≥ 1, backoff in (0, 1], interval ≥ 1).
    pub fn with_options(
        scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
    ) -> LossScaler {
        let positive = |x: f32, default: f32| if x.is_finite() && x > 0.0 { x } else { default };
        LossScaler {
            scale: positive(scale, 65536.0),
            growth_factor: positive(growth_factor, 2.0).max(1.0),
            backoff_factor: positive(backoff_factor, 0.5).min(1.0),
            growth_interval: growth_interval.max(1),
            clean_steps: 0,
            skipped: 0,
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Steps skipped so far (one per overflow).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Clean steps since the last change of scale.
    pub fn clean_steps(&self) -> u32 {
        self.clean_steps
    }

    /// `cotangent` times the scale (the gradient of the scaled loss), in f32.
    pub fn scale_cotangent(&self, cotangent: &[f32]) -> Vec<f32> {
        cotangent.iter().map(|g| g * self.scale).collect()
    }

    /// Stored (scaled) gradients divided by the scale in f32, with whether all are finite.
    pub fn unscale(&self, stored: &[f32]) -> Unscaled {
        let inv = 1.0 / self.scale;
        let grads: Vec<f32> = stored.iter().map(|g| g * inv).collect();
        let finite = stored.iter().all(|g| g.is_finite());
        Unscaled { grads, finite }
    }

    /// Records one step: `finite` says whether every gradient of the step was finite. Returns
    /// whether the optimizer should apply the step (false: skip it; the scale was halved).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale * self.backoff_factor).max(f32::MIN_POSITIVE);
            self.clean_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            let grown = self.scale * self.growth_factor;
            // A scale that would overflow f32 stays where it is.
            if grown.is_finite() {
                self.scale = grown;
            }
            self.clean_steps = 0;
        }
        true
    }
}

/// f32 master weights and their copy in the storage type the forward reads.
#[derive(Clone, Debug, PartialEq)]
pub struct MasterWeights {
    /// The f32 values the optimizer updates.
    pub master: Vec<f32>,
    storage: Storage,
}

impl MasterWeights {
    /// Master weights `values`, read by the forward in `storage`.
    pub fn new(values: Vec<f32>, storage: Storage) -> MasterWeights {
        MasterWeights {
            master: values,
            storage,
        }
    }

    /// The weights as the forward reads them: each rounded to the storage type.
    pub fn working(&self) -> Vec<f32> {
        self.master.iter().map(|&w| self.storage.round(w)).collect()
    }

    /// Plain SGD on the master copy: `w −= lr · g` (g in f32, already unscaled).
    pub fn sgd(&mut self, grads: &[f32], lr: f32) {
        for (w, g) in self.master.iter_mut().zip(grads) {
            *w -= lr * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_grows_after_the_interval_and_backs_off_on_overflow() {
        let mut s = LossScaler::with_options(1024.0, 2.0, 0.5, 3);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale(), 1024.0);
        assert!(s.update(true));
        assert_eq!(s.scale(), 2048.0);
        assert_eq!(s.clean_steps(), 0);
        assert!(s.update(true) && s.update(true));
        // An overflow skips the step, halves the scale and restarts the count.
        assert!(!s.update(false));
        assert_eq!((s.scale(), s.clean_steps(), s.skipped()), (1024.0, 0, 1));
        for _ in 0..3 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale(), 2048.0);
    }

    #[test]
    fn defaults_are_those_of_grad_scaler() {
        let mut s = LossScaler::new();
        assert_eq!(s.scale(), 65536.0);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale(), 65536.0);
        s.update(true);
        assert_eq!(s.scale(), 131072.0);
    }

    #[test]
    fn the_scale_stays_finite_and_positive() {
        let mut s = LossScaler::with_options(f32::MAX, 2.0, 0.5, 1);
        s.update(true);
        assert_eq!(s.scale(), f32::MAX);
        let mut s = LossScaler::with_options(1.0, 2.0, 0.5, 1);
        for _ in 0..400 {
            s.update(false);
        }
        assert!(s.scale() > 0.0);
        let s = LossScaler::with_options(f32::NAN, 0.0, 7.0, 0);
        assert_eq!(s, LossScaler::with_options(65536.0, 2.0, 1.0, 1));
    }

    #[test]
    fn unscale_flags_infinities_and_nan() {
        let s = LossScaler::with_options(4.0, 2.0, 0.5, 10);
        assert_eq!(
            s.unscale(&[4.0, -8.0]),
            Unscaled {
                grads: vec![1.0, -2.0],
                finite: true
            }
        );
        assert!(!s.unscale(&[1.0, f32::INFINITY]).finite);
        assert!(!s.unscale(&[f32::NAN]).finite);
    }

    #[test]
    fn store_counts_underflows_and_overflows() {
        let (v, stats) = store(&[1e-9, 7e4, 1.0, 0.0, f32::NAN], Storage::F16);
        assert_eq!(v[0], 0.0);
        assert!(v[1].is_infinite());
        assert_eq!(v[2], 1.0);
        assert_eq!(
            stats,
            StoreStats {
                underflows: 1,
                overflows: 1,
                non_finite: 1
            }
        );
        assert!(!stats.finite());
        // bf16 has f32's range: neither happens.
        let (_, stats) = store(&[1e-9, 7e4], Storage::Bf16);
        assert_eq!(stats, StoreStats::default());
    }

    #[test]
    fn master_weights_keep_updates_the_storage_type_would_round_away() {
        let mut w = MasterWeights::new(vec![1.0], Storage::F16);
        for _ in 0..100 {
            w.sgd(&[-1e-4], 1.0);
        }
        // 1 + 1e-4 rounds to 1 in f16 at every step; the f32 master accumulates them.
        assert!((w.master[0] - 1.01).abs() < 1e-4);
        assert_eq!(w.working()[0], f16::from_f32(1.01).to_f32());
    }
}
