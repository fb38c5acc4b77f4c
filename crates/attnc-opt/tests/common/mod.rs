//! Helpers shared by the integration tests: building kernels from source, random inputs, and
//! comparing interpreter results.
#![allow(dead_code)]

use attnc_ir::{Bindings, Kernel};
use ndarray::{ArrayD, IxDyn};
use std::path::PathBuf;

/// The one kernel of `src`, lowered.
pub fn kernel(src: &str) -> Kernel {
    let (file, diags) = attnc_syntax::parse(src);
    let shown: String = src.chars().take(300).collect();
    assert!(diags.is_empty(), "parse errors in {shown}: {diags:?}");
    let module = attnc_ir::lower::lower_file(&file)
        .unwrap_or_else(|d| panic!("lowering errors in {shown}: {d:?}"));
    module.kernels.into_iter().next().expect("one kernel")
}

/// Bindings from pairs.
pub fn bindings(pairs: &[(&str, u64)]) -> Bindings {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Deterministic pseudo-random values in [-1, 1) (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Random inputs for every parameter of `kernel` at `bindings`.
pub fn inputs(kernel: &Kernel, bindings: &Bindings, seed: u64) -> Vec<ArrayD<f64>> {
    let mut rng = Rng(seed);
    kernel
        .params
        .iter()
        .map(|p| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, bindings).expect("bound");
            ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.next())
        })
        .collect()
}

/// The relative L2 error of `b` against `a` ([`attnc_ir::compare`]); NaN and infinite
/// positions must agree.
pub fn rel_l2(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let c = attnc_ir::compare::compare(b.iter().copied(), a.iter().copied());
    assert_eq!(
        (c.nan_mismatches, c.inf_mismatches),
        (0, 0),
        "NaN or infinite positions differ"
    );
    c.relative_l2
}

/// Evaluates both kernels on the same random inputs and returns their relative L2 distance.
pub fn compare(a: &Kernel, b: &Kernel, bindings: &Bindings, seed: u64) -> f64 {
    let xs = inputs(a, bindings, seed);
    let ya = attnc_ir::interp::evaluate(a, bindings, &xs).expect("left side evaluates");
    let yb = attnc_ir::interp::evaluate(b, bindings, &xs).expect("right side evaluates");
    rel_l2(&ya, &yb)
}

/// Every `.attn` example of the repository, by file stem (each file's first kernel).
pub fn examples() -> Vec<(String, Kernel)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "attn"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples missing in {dir:?}");
    files
        .into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).expect("readable");
            let name = p.file_stem().expect("stem").to_string_lossy().to_string();
            (name, kernel(&src))
        })
        .collect()
}
