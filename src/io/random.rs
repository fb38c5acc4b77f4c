//! Reproducible pseudo-random inputs for `--random SEED`.
//!
//! xoshiro256** seeded through SplitMix64, and standard-normal samples by Marsaglia's polar
//! method. Everything is integer arithmetic plus IEEE `+ - * /` and `sqrt` (all correctly rounded)
//! and a logarithm computed here from those, never the platform's `ln`, so the same seed gives
//! bit-identical values on every platform and in every build.

/// SplitMix64's output function: a bijective mix of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The SplitMix64 generator (used to expand a seed into a xoshiro state).
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }
}

/// xoshiro256**: a small, fast generator with 256 bits of state.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// The generator for stream `stream` of seed `seed`. Distinct `(seed, stream)` pairs give
    /// independent-looking sequences; `attnc` uses one stream per kernel parameter (its index).
    pub fn new(seed: u64, stream: u64) -> Rng {
        // Hash the pair into one 64-bit key (not a plain xor, so (a, b) and (b, a) differ), then
        // expand it with SplitMix64 as the xoshiro authors recommend.
        let key = mix64(seed ^ mix64(stream.wrapping_add(0x632B_E59B_D9B4_E019)));
        let mut sm = SplitMix64 { state: key };
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = sm.next_u64();
        }
        if s == [0; 4] {
            // The all-zero state is a fixed point; SplitMix64 never yields it, but be safe.
            s[0] = 1;
        }
        Rng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform f64 in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A pair of independent standard-normal values (Marsaglia's polar method).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        loop {
            let u = 2.0 * self.next_f64() - 1.0;
            let v = 2.0 * self.next_f64() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let factor = (-2.0 * ln(s) / s).sqrt();
                return (u * factor, v * factor);
            }
        }
    }
}

/// `len` standard-normal f32 values for stream `stream` of seed `seed`, reproducible across runs
/// and platforms.
pub fn standard_normal(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed, stream);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let (a, b) = rng.normal_pair();
        out.push(a as f32);
        if out.len() < len {
            out.push(b as f32);
        }
    }
    out
}

/// The natural logarithm of a positive, finite, normal `x`, from IEEE arithmetic only (so it is
/// the same on every platform). Accurate to a few ulps, which is plenty for sampling.
fn ln(x: f64) -> f64 {
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const SQRT2: f64 = std::f64::consts::SQRT_2;
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2))
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m >= SQRT2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(t) = 2 (t + t^3/3 + t^5/5 + ...), t = (m - 1) / (m + 1), |t| < 0.172
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut term = t;
    let mut sum = 0.0;
    let mut k = 1.0;
    for _ in 0..14 {
        sum += term / k;
        term *= t2;
        k += 2.0;
    }
    let ef = e as f64;
    ef * LN2_HI + (2.0 * sum + ef * LN2_LO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std() {
        let mut rng = Rng::new(1, 2);
        for _ in 0..10_000 {
            let x = rng.next_f64() + f64::MIN_POSITIVE;
            let (ours, std) = (ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 4.0 * f64::EPSILON * std.abs().max(1.0),
                "{x}"
            );
        }
        for x in [
            1.0,
            0.5,
            0.25,
            1e-300,
            0.999_999_999,
            1.000_000_1,
            f64::MIN_POSITIVE,
        ] {
            assert!(
                (ln(x) - x.ln()).abs() <= 4.0 * f64::EPSILON * x.ln().abs().max(1.0),
                "{x}"
            );
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256** from the state [1, 2, 3, 4] (reference implementation's output).
        let mut rng = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 from seed 1234567 (reference implementation's output).
        let mut sm = SplitMix64 { state: 1_234_567 };
        assert_eq!(sm.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(sm.next_u64(), 3_203_168_211_198_807_973);
    }
}
