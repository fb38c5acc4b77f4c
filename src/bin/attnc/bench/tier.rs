//! The ceiling of a reduced-precision tier: where a plan's fused attention runs bf16 or int8
//! products on 512-bit vectors, the rate its product instructions reach on this machine,
//! measured in the same run, so that its GFLOP/s can be read against what that tier can do as
//! well as against the f32 FMA peak.

use attnc_jit::plan::{Plan, StepKind};
use attnc_jit::wide::Tier;
use attnc_wide::amx::{self, Products, Unit};
use attnc_wide::peak::{dot_product_peak, DotProduct};

/// A tier's ceiling at 1 thread and at the benchmark's thread count, in useful GFLOP/s of
/// attention (2 per multiply-add of Q·Kᵀ and P·V).
#[derive(Clone, Debug)]
pub struct TierCeiling {
    /// The tier's name in plans.
    pub tier: &'static str,
    /// How the ceiling follows from the instructions' measured rates, for people.
    pub basis: &'static str,
    /// At 1 thread.
    pub one: f64,
    /// At the benchmark's thread count.
    pub at: f64,
}

/// The ceiling of the first fused attention of `plan` that runs reduced-precision products
/// on vectors, measured at 1 and `threads` threads; `None` when no step does (the f32 tiers'
/// ceiling is the FMA peak; the AMX tile unit is not probed).
pub fn measure(plan: &Plan, threads: usize) -> Option<TierCeiling> {
    let (products, d, dv) = plan.steps.iter().find_map(|step| match &step.kind {
        StepKind::Attention(s) => match s.tier {
            Tier::Amx(p) if amx::unit(p) == Some(Unit::Vectors) => Some((p, s.d, s.dv)),
            _ => None,
        },
        _ => None,
    })?;
    let at = |t: usize| ceiling(products, d, dv, t);
    let one = at(1)?;
    let (value, basis) = one;
    let at_threads = if threads > 1 { at(threads)?.0 } else { value };
    Some(TierCeiling {
        tier: Tier::Amx(products).name(),
        basis,
        one: value,
        at: at_threads,
    })
}

/// The useful rate of `products` at `threads` threads and how it was formed.
fn ceiling(products: Products, d: usize, dv: usize, threads: usize) -> Option<(f64, &'static str)> {
    match products {
        // One `vdpbf16ps` per pair of depths (on vectors, f32 K and V are rounded to bf16
        // once, like bf16 ones).
        Products::Bf16 => {
            let rate = dot_product_peak(DotProduct::Bf16Pairs, threads)?;
            Some((rate, "vdpbf16ps at its measured rate"))
        }
        // Scores on `vpdpwssd`, P·V on `vpdpbusd` with two digits of V: each instruction does
        // half its multiply-adds' worth of useful work there. The shares follow d and dv.
        Products::Int8 => {
            let words = dot_product_peak(DotProduct::I16Pairs, threads)?;
            let bytes = dot_product_peak(DotProduct::U8Quads, threads)? / 2.0;
            let (d, dv) = (d.max(1) as f64, dv.max(1) as f64);
            let rate = (d + dv) / (d / words + dv / bytes);
            Some((
                rate,
                "vpdpwssd for Q·Kᵀ, vpdpbusd over two digits of V for P·V, at their measured \
                 rates",
            ))
        }
    }
}
