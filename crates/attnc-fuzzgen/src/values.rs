//! Random input values: mostly ordinary numbers, and per parameter, by chance, a few special
//! ones (NaN, ±inf, ±0, subnormals, values near the f32 limit, huge and tiny magnitudes) or a
//! whole tensor scaled far from 1. Every value is representable in its parameter's storage
//! type (rounded to it), so the interpreter and the JIT read the same numbers.

use crate::rng::Rng;
use attnc_ir::DType;

/// The special values sprinkled into inputs.
const SPECIALS: [f32; 18] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    0.0,
    -0.0,
    1e-40,
    -3e-42,
    1.4e-45,
    3.3e38,
    -3.3e38,
    1e38,
    -2e38,
    f32::MAX,
    1e20,
    -1e20,
    1e-30,
    -1e-20,
    65504.0,
];

/// Values for a parameter of `len` elements stored as `dtype`.
pub fn draw(rng: &mut Rng, len: usize, dtype: DType) -> Vec<f32> {
    let mut v: Vec<f32> = (0..len).map(|_| (rng.unit() * 4.0 - 2.0) as f32).collect();
    match rng.weighted(&[55, 10, 5, 30]) {
        1 => {
            let scale = rng.pick(&[1e-30f32, 1e-20, 1e-10, 1e10, 1e18, 1e20, 1e30, 1e37]);
            v.iter_mut().for_each(|x| *x *= scale);
        }
        2 => {
            // One sign, near the f32 limit: the sums of such values overflow.
            v.iter_mut().for_each(|x| *x = 1e38 * (1.0 + x.abs()));
        }
        3 if len > 0 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(len);
                v[at] = rng.pick(&SPECIALS);
            }
        }
        _ => {}
    }
    v.iter().map(|&x| stored(x, dtype)).collect()
}

/// `x` rounded to the storage type `dtype` (as the JIT reads it).
pub fn stored(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 | DType::I32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::Bf16 => half::bf16::from_f32(x).to_f32(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_representable_in_their_storage_type() {
        let mut rng = Rng::new(3);
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for _ in 0..50 {
                for x in draw(&mut rng, 17, dtype) {
                    assert!(x.is_nan() || stored(x, dtype) == x, "{x} as {dtype:?}");
                }
            }
        }
    }
}
