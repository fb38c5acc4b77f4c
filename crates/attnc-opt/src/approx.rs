//! Approximations the user allowed (`@approx`, `--approx`), as the optimizer sees them: which
//! rules each one adds to the e-graph, its estimated error, and how to find it in a chosen term.
//!
//! Approximate rules enter the e-graph only when the policy names them, and only when their
//! estimated error is within the tolerance; extraction then picks them if the cost model says
//! they are cheaper. The estimate is a prior, not a promise: the facade measures the error of
//! the chosen plan on a calibration sample and falls back to the exact plan when it is too big.

use crate::lang::Attn;
use egg::RecExpr;
use serde::Serialize;
use std::fmt;

/// One allowed approximation, with the seed of any random matrix it draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Approx {
    /// Q, K and V of fused attention stored as bfloat16 (f32 accumulation).
    Bf16,
    /// Q, K and V of fused attention stored as IEEE half (f32 accumulation).
    F16,
    /// Fused attention with int8 `q·k` and `p·v` products (per-block scales).
    Int8,
    /// Fused attention with bfloat16 `q·k` and `p·v` products, f32 accumulation (AMX tiles).
    Bf16Products,
    /// Linformer: keys and values projected along the sequence to `r` rows.
    LowRank {
        /// The projected length.
        r: u64,
        /// The seed of the projection.
        seed: u64,
    },
    /// Performer FAVOR+: `m` positive orthogonal random features.
    RandomFeatures {
        /// The number of features.
        m: u64,
        /// The seed of the features.
        seed: u64,
    },
    /// Nyström: a softmax attention matrix factored through `m` landmarks (mean-pooled
    /// queries and keys).
    Nystrom {
        /// The number of landmarks.
        m: u64,
    },
}

impl Approx {
    /// The estimated relative L2 error of the output: a prior used to decide whether the
    /// approximation is worth trying under a tolerance.
    ///
    /// Storage rounding: bf16 keeps 8 significant bits (unit roundoff 2⁻⁹ ≈ 2e-3 per input,
    /// a few of them per output), f16 11 bits. int8: the JIT's int8 kernel (16-bit Q, 8-bit K, V and
    /// P) measures 0.9 % on standard-normal inputs at d = 64.
    /// Random features and projections: Monte Carlo estimates whose error falls as `1/√m`
    /// (resp. `1/√r`) at unit-scale inputs, and grows fast with the input scale — which is
    /// why the measured error decides in the end.
    pub fn estimated_error(&self) -> f64 {
        match *self {
            Approx::Bf16 => 4e-3,
            Approx::F16 => 5e-4,
            Approx::Int8 => 9e-3,
            // Q, K, V and P each rounded to 8 significant bits: 2.5e-3 measured at d = 64.
            Approx::Bf16Products => 3e-3,
            Approx::LowRank { r, .. } => 1.0 / (r.max(1) as f64).sqrt(),
            Approx::RandomFeatures { m, .. } => 1.0 / (m.max(1) as f64).sqrt(),
            Approx::Nystrom { m } => nystrom_prior(m),
        }
    }

    /// Where the approximation's rules apply, said when none of them found a place.
    pub fn fits(&self) -> String {
        match *self {
            Approx::Bf16 | Approx::F16 => {
                "it rounds Q, K and V of a fused softmax attention that are not already cast"
                    .to_string()
            }
            Approx::Int8 => "it needs a fused softmax attention".to_string(),
            Approx::Bf16Products => {
                "it needs a fused softmax attention with a plain scaled score".to_string()
            }
            Approx::LowRank { r, .. } => format!(
                "it needs an unmasked softmax attention over more than r = {r} keys \
                 (projecting to as many rows as there are keys reduces nothing)"
            ),
            Approx::RandomFeatures { .. } => "it needs an unmasked or causal softmax attention \
                 whose scores are scaled by a positive constant"
                .to_string(),
            Approx::Nystrom { m } => format!(
                "it needs an unmasked softmax attention softmax(q @ k.T * scale) @ v (no mask, \
                 pattern or bias) with more than m = {m} queries and keys \
                 (as many landmarks as rows reduce nothing)"
            ),
        }
    }

    /// Whether the chosen term uses this approximation.
    pub fn used_in(&self, expr: &RecExpr<Attn>) -> bool {
        let nodes = expr.as_ref();
        nodes.iter().any(|node| match (self, node) {
            (Approx::Int8, Attn::AttentionInt8(_)) => true,
            (Approx::Bf16Products, Attn::AttentionBf16(_)) => true,
            (Approx::LowRank { .. }, Attn::ProjectRows(_)) => true,
            (Approx::RandomFeatures { .. }, Attn::FavorQuery(_)) => true,
            (Approx::Nystrom { .. }, Attn::NystromPinv(_)) => true,
            (Approx::Bf16 | Approx::F16, Attn::Attention([q, ..]))
            | (Approx::Bf16 | Approx::F16, Attn::AttentionInt8([q, ..])) => {
                let wanted = if *self == Approx::Bf16 { "bf16" } else { "f16" };
                matches!(&nodes[usize::from(*q)], Attn::Cast([_, to])
                    if nodes[usize::from(*to)].atom().and_then(|a| a.as_name().map(|n| n == wanted)) == Some(true))
            }
            _ => false,
        })
    }
}

impl fmt::Display for Approx {
    /// As spelled in `@approx(...)` and `--approx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Approx::Bf16 => f.write_str("bf16"),
            Approx::F16 => f.write_str("f16"),
            Approx::Int8 => f.write_str("int8"),
            Approx::Bf16Products => f.write_str("bf16_products"),
            Approx::LowRank { r, .. } => write!(f, "lowrank(r = {r})"),
            Approx::RandomFeatures { m, seed } => {
                write!(f, "random_features(m = {m}, seed = {seed})")
            }
            Approx::Nystrom { m } => write!(f, "nystrom(m = {m})"),
        }
    }
}

/// What the optimizer may approximate, and within what error.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApproxPolicy {
    /// The allowed approximations (empty: exact).
    pub allowed: Vec<Approx>,
    /// The largest accepted relative L2 error of the output.
    pub tol: f64,
}

impl Default for ApproxPolicy {
    fn default() -> ApproxPolicy {
        ApproxPolicy {
            allowed: Vec::new(),
            tol: 1e-2,
        }
    }
}

/// What became of one allowed approximation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApproxOutcome {
    /// The approximation, as spelled.
    pub name: String,
    /// The approximation.
    pub approx: Approx,
    /// Its estimated error.
    pub estimated_error: f64,
    /// Whether the chosen form uses it.
    pub applied: bool,
    /// Why it was not applied, if it was not.
    pub reason: Option<String>,
    /// The error measured on a calibration sample, once measured (by the caller).
    pub measured_error: Option<f64>,
}

/// The prior of `nystrom(m)`, `1/m`: about what it measures where it is worth trying, on
/// attention of low rank (queries and keys from a few clusters in contiguous runs: 1.0 % at
/// m = 64, n = 4096). No bound holds without such structure (on unstructured standard-normal
/// rows the error is ~80 %, no better than the mean of `v`), so the measurement on the
/// calibration data, the user's own when given, decides.
fn nystrom_prior(m: u64) -> f64 {
    1.0 / m.max(1) as f64
}
