//! Reproducible pseudo-random numbers: `--random SEED` inputs and the seeded matrices of approximations.
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

    /// The next `points.len()` points of the polar method. Every candidate is written and the
    /// count advanced only past accepted ones: no branch on the (random) outcome, which would
    /// mispredict about once in five candidates.
    fn fill_polar_points(&mut self, points: &mut [[f64; 2]]) {
        let mut n = 0;
        while n < points.len() {
            let (point, accepted) = self.polar_candidate();
            points[n] = point;
            n += usize::from(accepted);
        }
    }

    /// Advances past the next `count` points of the polar method, exactly as
    /// [`Rng::fill_polar_points`] would.
    fn skip_polar_points(&mut self, count: usize) {
        let mut n = 0;
        while n < count {
            n += usize::from(self.polar_candidate().1);
        }
    }

    /// The next candidate `(u, v)` of the polar method, uniform in the square `[-1, 1)²`, and
    /// whether it is a point: inside the unit disc, not its centre.
    fn polar_candidate(&mut self) -> ([f64; 2], bool) {
        let u = 2.0 * self.next_f64() - 1.0;
        let v = 2.0 * self.next_f64() - 1.0;
        let s = u * u + v * v;
        ([u, v], s > 0.0 && s < 1.0)
    }

    /// A pair of independent standard-normal values (Marsaglia's polar method).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let mut point = [[0.0; 2]];
        self.fill_polar_points(&mut point);
        let mut out = [0.0; 2];
        polar_normals(&point, &mut out);
        (out[0], out[1])
    }
}

/// `len` standard-normal f32 values for stream `stream` of seed `seed`, reproducible across runs
/// and platforms.
pub fn standard_normal(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    polar_normals_from(&mut Rng::new(seed, stream), &mut out);
    out
}

/// The generator of stream `stream` of seed `seed` at the start of every `chunk` points of
/// the polar method (two values each) that its first `len` values use: state `k` draws
/// values `2 k chunk ..` ([`polar_normals_from`]).
///
/// Drawing is split in two so that the expensive half runs in parallel without changing a
/// value: which candidates are accepted must be found in order, but that is cheap (two
/// random numbers and a comparison each) and stores nothing but these states; turning the
/// points into values (a logarithm, a square root) can then start at any state.
pub fn polar_checkpoints(seed: u64, stream: u64, len: usize, chunk: usize) -> Vec<Rng> {
    let chunk = chunk.max(1);
    let points = len.div_ceil(2);
    let mut rng = Rng::new(seed, stream);
    let mut states = Vec::with_capacity(points.div_ceil(chunk));
    let mut done = 0;
    while done < points {
        states.push(rng.clone());
        let count = chunk.min(points - done);
        rng.skip_polar_points(count);
        done += count;
    }
    states
}

/// The next `out.len()` standard-normal values of `rng` as f32 (an odd length drops the
/// second value of the last pair, and leaves `rng` after that pair).
pub fn polar_normals_from(rng: &mut Rng, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        unsafe { polar_normals_from_avx512(rng, out) };
        return;
    }
    polar_normals_from_lanes(rng, out);
}

/// [`polar_normals_from`] compiled for AVX-512: the logarithm's divisions of all [`LANES`]
/// points in one packed instruction. IEEE division, multiplication, addition and square root
/// round the same in any vector width (and Rust never fuses a product into a sum), so every
/// value is bit-identical to the portable build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn polar_normals_from_avx512(rng: &mut Rng, out: &mut [f32]) {
    polar_normals_from_lanes(rng, out);
}

#[inline(always)]
fn polar_normals_from_lanes(rng: &mut Rng, out: &mut [f32]) {
    let mut points = [[0.0f64; 2]; LANES];
    let mut values = [0.0f64; 2 * LANES];
    for dst in out.chunks_mut(2 * LANES) {
        let count = dst.len().div_ceil(2);
        rng.fill_polar_points(&mut points[..count]);
        polar_normals(&points[..count], &mut values[..2 * count]);
        for (o, &x) in dst.iter_mut().zip(&values) {
            *o = x as f32;
        }
    }
}

/// The next `len` standard-normal values of `rng`, drawn in pairs.
fn normals(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut points = vec![[0.0; 2]; len.div_ceil(2)];
    rng.fill_polar_points(&mut points);
    let mut out = vec![0.0; 2 * points.len()];
    for (chunk, dst) in points.chunks(LANES).zip(out.chunks_mut(2 * LANES)) {
        polar_normals(chunk, dst);
    }
    out.truncate(len);
    out
}

/// Points transformed per batch: enough lanes for the compiler to use packed divisions (the
/// logarithm's series is 15 of them per value, most of the drawing time).
const LANES: usize = 8;

/// `(u f, v f)` with `f = sqrt(-2 ln(s) / s)`, `s = u² + v²`, for each point of `points`
/// (at most [`LANES`]) into `out[2i..2i + 2]`. Each value gets exactly the operations of a
/// one-point call, in the same order, so batching changes no bit.
#[inline(always)]
fn polar_normals(points: &[[f64; 2]], out: &mut [f64]) {
    let mut s = [0.5f64; LANES];
    for (s, [u, v]) in s.iter_mut().zip(points) {
        *s = u * u + v * v;
    }
    let logs = ln_lanes(&s);
    let factor: [f64; LANES] = std::array::from_fn(|l| (-2.0 * logs[l] / s[l]).sqrt());
    for (k, [u, v]) in points.iter().enumerate() {
        out[2 * k] = u * factor[k];
        out[2 * k + 1] = v * factor[k];
    }
}

/// The seeded random matrices that approximations introduce ([`crate::Op::Random`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RandomKind {
    /// Performer FAVOR+ projections `[m, d]`: blocks of `d` mutually orthogonal Gaussian
    /// directions, each row rescaled to the norm of an independent Gaussian `d`-vector, so
    /// every row is marginally `N(0, I_d)` while rows of a block stay orthogonal.
    OrthogonalFeatures,
    /// Linformer projections `[r, n]` with independent `N(0, 1/n)` entries: each projected
    /// row is a random mixture of the `n` rows with unit total variance, so projected keys
    /// and values keep the scale of the originals.
    Gaussian,
}

impl RandomKind {
    /// The name used by printers and the e-graph language.
    pub fn name(self) -> &'static str {
        match self {
            RandomKind::OrthogonalFeatures => "orthogonal-features",
            RandomKind::Gaussian => "gaussian",
        }
    }

    /// The kind called `name` by [`RandomKind::name`].
    pub fn from_name(name: &str) -> Option<RandomKind> {
        [RandomKind::OrthogonalFeatures, RandomKind::Gaussian]
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

/// The row-major `[rows, cols]` matrix of `kind` drawn from `seed`: the same on every platform
/// and in every build, so the interpreter and the JIT see identical projections.
pub fn random_matrix(kind: RandomKind, seed: u64, rows: usize, cols: usize) -> Vec<f64> {
    // Stream numbers far from the per-parameter streams of `--random`.
    let mut rng = Rng::new(seed, 0x5eed_0000 + kind as u64);
    let mut draw = move |len: usize| normals(&mut rng, len);
    match kind {
        RandomKind::Gaussian => {
            let scale = 1.0 / (cols.max(1) as f64).sqrt();
            draw(rows * cols).into_iter().map(|x| x * scale).collect()
        }
        RandomKind::OrthogonalFeatures => {
            let mut out = Vec::with_capacity(rows * cols);
            while out.len() < rows * cols {
                let block_rows = (rows - out.len() / cols.max(1)).min(cols);
                let block = orthonormal_rows(&draw(cols * cols), cols);
                for row in block.chunks(cols.max(1)).take(block_rows) {
                    let norm = draw(cols).iter().map(|x| x * x).sum::<f64>().sqrt();
                    out.extend(row.iter().map(|x| x * norm));
                }
            }
            out
        }
    }
}

/// Matrices of at most this many values are kept by [`shared_random_matrix`].
const SHARED_UP_TO: usize = 1 << 20;

/// How many matrices [`shared_random_matrix`] keeps (the oldest goes first).
const SHARED_KEPT: usize = 8;

/// [`random_matrix`], kept for later calls in this process: a plan names the same matrix once
/// per side (Performer's queries and keys share their features), and validation compiles a
/// plan for its sample before the run's shape, drawing the matrix on a thread of its own
/// meanwhile (a call while another draws the same matrix waits for it).
pub fn shared_random_matrix(
    kind: RandomKind,
    seed: u64,
    rows: usize,
    cols: usize,
) -> std::sync::Arc<[f64]> {
    use std::sync::{Arc, Mutex, OnceLock};
    type Slot = Arc<OnceLock<Arc<[f64]>>>;
    type Kept = Vec<((RandomKind, u64, usize, usize), Slot)>;
    static KEPT: OnceLock<Mutex<Kept>> = OnceLock::new();
    if rows.saturating_mul(cols) > SHARED_UP_TO {
        return random_matrix(kind, seed, rows, cols).into();
    }
    let key = (kind, seed, rows, cols);
    // The slot of `key`, made if new: a second caller while the first draws waits for it.
    let slot: Slot = match KEPT.get_or_init(Mutex::default).lock() {
        Ok(mut kept) => match kept.iter().find(|(k, _)| *k == key) {
            Some((_, slot)) => slot.clone(),
            None => {
                if kept.len() >= SHARED_KEPT {
                    kept.remove(0);
                }
                let slot = Slot::default();
                kept.push((key, slot.clone()));
                slot
            }
        },
        Err(_) => Slot::default(),
    };
    slot.get_or_init(|| random_matrix(kind, seed, rows, cols).into())
        .clone()
}

/// Gram-Schmidt (modified, twice for stability) on the rows of a square `[d, d]` Gaussian
/// matrix; a row that collapses (probability 0) is replaced by a unit basis vector.
fn orthonormal_rows(gaussian: &[f64], d: usize) -> Vec<f64> {
    let mut q = gaussian.to_vec();
    for i in 0..d {
        for _pass in 0..2 {
            for j in 0..i {
                let dot = fixed_order_dot(&q[i * d..(i + 1) * d], &q[j * d..(j + 1) * d]);
                for c in 0..d {
                    q[i * d + c] -= dot * q[j * d + c];
                }
            }
        }
        let norm = (0..d).map(|c| q[i * d + c].powi(2)).sum::<f64>().sqrt();
        if norm > 1e-12 {
            q[i * d..(i + 1) * d].iter_mut().for_each(|x| *x /= norm);
        } else {
            q[i * d..(i + 1) * d].fill(0.0);
            q[i * d + i] = 1.0;
        }
    }
    q
}

/// `Σ a[c]·b[c]` in a fixed order: element `c` goes into partial sum `c mod 8`, and the eight
/// are added pairwise. The bits are the same in every build (Rust neither reorders nor fuses
/// float arithmetic), and the dependency chains are an eighth of one running sum's, which is
/// what made Gram–Schmidt slow.
fn fixed_order_dot(a: &[f64], b: &[f64]) -> f64 {
    const PARTS: usize = 8;
    let mut sums = [0.0f64; PARTS];
    let (a_whole, a_rest) = a.split_at(a.len() / PARTS * PARTS);
    let (b_whole, b_rest) = b.split_at(a_whole.len().min(b.len()));
    for (x, y) in a_whole.chunks_exact(PARTS).zip(b_whole.chunks_exact(PARTS)) {
        for l in 0..PARTS {
            sums[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a_rest.iter().zip(b_rest).enumerate() {
        sums[l] += x * y;
    }
    ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]))
}

/// The natural logarithm of a positive, finite, normal `x`, from IEEE arithmetic only (so it is
/// the same on every platform). Accurate to a few ulps, which is plenty for sampling.
#[cfg(test)]
fn ln(x: f64) -> f64 {
    ln_lanes(&[x])[0]
}

/// [`ln`] of every lane, each with the same operations in the same order as one value alone;
/// the lanes only let the compiler use packed arithmetic.
#[inline(always)]
fn ln_lanes<const L: usize>(x: &[f64; L]) -> [f64; L] {
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const SQRT2: f64 = std::f64::consts::SQRT_2;
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2))
    let mut m = [0.0f64; L];
    let mut ef = [0.0f64; L];
    for l in 0..L {
        let bits = x[l].to_bits();
        let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let mant = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
        let high = mant >= SQRT2;
        m[l] = if high { mant * 0.5 } else { mant };
        ef[l] = (e + i64::from(high)) as f64;
    }
    // ln(m) = 2 atanh(t) = 2 (t + t^3/3 + t^5/5 + ...), t = (m - 1) / (m + 1), |t| < 0.172
    let mut t2 = [0.0f64; L];
    let mut term = [0.0f64; L];
    for l in 0..L {
        let t = (m[l] - 1.0) / (m[l] + 1.0);
        t2[l] = t * t;
        term[l] = t;
    }
    let mut sum = [0.0f64; L];
    let mut k = 1.0;
    for _ in 0..14 {
        for l in 0..L {
            sum[l] += term[l] / k;
            term[l] *= t2[l];
        }
        k += 2.0;
    }
    std::array::from_fn(|l| ef[l] * LN2_HI + (2.0 * sum[l] + ef[l] * LN2_LO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_matrices_equal_fresh_ones() {
        for (kind, seed, rows, cols) in [
            (RandomKind::OrthogonalFeatures, 11, 20, 8),
            (RandomKind::Gaussian, 11, 20, 8),
            (RandomKind::OrthogonalFeatures, 12, 20, 8),
        ] {
            let fresh = random_matrix(kind, seed, rows, cols);
            assert_eq!(&*shared_random_matrix(kind, seed, rows, cols), &fresh[..]);
            // The kept copy, the second time.
            assert_eq!(&*shared_random_matrix(kind, seed, rows, cols), &fresh[..]);
        }
    }

    #[test]
    fn orthogonal_features_are_orthogonal_within_a_block() {
        let d = 8;
        let w = super::random_matrix(super::RandomKind::OrthogonalFeatures, 3, 12, d);
        assert_eq!(w.len(), 12 * d);
        for a in 0..d {
            for b in 0..a {
                let dot: f64 = (0..d).map(|c| w[a * d + c] * w[b * d + c]).sum();
                assert!(dot.abs() < 1e-9, "rows {a} and {b}: {dot}");
            }
        }
        // Norms are chi(d)-distributed, not 1.
        let norms: Vec<f64> = w
            .chunks(d)
            .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        assert!(norms.iter().any(|n| (n - 1.0).abs() > 0.05), "{norms:?}");
        assert_eq!(
            w,
            super::random_matrix(super::RandomKind::OrthogonalFeatures, 3, 12, d)
        );
    }

    #[test]
    fn gaussian_projections_have_variance_one_over_columns() {
        let (r, n) = (64, 512);
        let e = super::random_matrix(super::RandomKind::Gaussian, 1, r, n);
        let variance = e.iter().map(|x| x * x).sum::<f64>() / e.len() as f64;
        assert!((variance * n as f64 - 1.0).abs() < 0.05, "{variance}");
        assert!(super::random_matrix(super::RandomKind::Gaussian, 1, 0, 5).is_empty());
        assert!(super::random_matrix(super::RandomKind::OrthogonalFeatures, 1, 4, 0).is_empty());
    }

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

    /// The polar method one value pair at a time, as `attnc` drew before batching.
    fn one_pair_at_a_time(seed: u64, stream: u64, len: usize) -> Vec<f32> {
        fn scalar_ln(x: f64) -> f64 {
            const LN2_HI: f64 = 0.693_147_180_369_123_8;
            const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
            let bits = x.to_bits();
            let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
            let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
            if m >= std::f64::consts::SQRT_2 {
                m *= 0.5;
                e += 1;
            }
            let t = (m - 1.0) / (m + 1.0);
            let t2 = t * t;
            let (mut term, mut sum, mut k) = (t, 0.0, 1.0);
            for _ in 0..14 {
                sum += term / k;
                term *= t2;
                k += 2.0;
            }
            let ef = e as f64;
            ef * LN2_HI + (2.0 * sum + ef * LN2_LO)
        }
        let mut rng = Rng::new(seed, stream);
        let mut out = Vec::new();
        while out.len() < len {
            let u = 2.0 * rng.next_f64() - 1.0;
            let v = 2.0 * rng.next_f64() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let factor = (-2.0 * scalar_ln(s) / s).sqrt();
                out.push((u * factor) as f32);
                out.push((v * factor) as f32);
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn batched_drawing_gives_the_values_of_one_pair_at_a_time() {
        for (seed, stream, len) in [(0, 0, 1), (0, 1, 2), (7, 3, 17), (1, 0, 4099)] {
            let got = standard_normal(seed, stream, len);
            let want = one_pair_at_a_time(seed, stream, len);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{seed} {stream} {len}");
            // Drawing from the checkpoints, chunk by chunk, gives the same values.
            for chunk in [1, 3, 64] {
                let states = polar_checkpoints(seed, stream, len, chunk);
                assert_eq!(states.len(), len.div_ceil(2).div_ceil(chunk));
                let mut split = vec![0.0f32; len];
                for (mut rng, dst) in states.into_iter().zip(split.chunks_mut(2 * chunk)) {
                    polar_normals_from(&mut rng, dst);
                }
                assert_eq!(
                    bits(&split),
                    bits(&want),
                    "{seed} {stream} {len} chunk {chunk}"
                );
            }
        }
        assert!(standard_normal(3, 4, 0).is_empty());
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
