//! Validation on one batch entry (`attnc::calibration::entry`) on generated programs: wherever
//! a kernel is judged to keep the entries of its leading axis apart, its first entry computed
//! alone (the dimension bound to 1, the inputs cut to their first entry) equals the first
//! entry of the whole computation, bit for bit, in the f64 interpreter.

use attnc::calibration::entry::{first_entry, one_entry_bindings, one_entry_input};
use attnc::engine::{execute, Engine};
use attnc::io::{standard_normal, Tensor, TensorData};
use attnc::ir::dim::resolve_shape;
use attnc::ir::{Bindings, DType, Kernel};

/// Distinct standard-normal values per parameter and entry (segment ids 0).
fn inputs(kernel: &Kernel, bindings: &Bindings, seed: u64) -> Option<Vec<Tensor>> {
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = resolve_shape(&p.shape, bindings)?;
            let len = shape.iter().product();
            let data = match p.dtype {
                DType::I32 => TensorData::I32(vec![0; len]),
                dtype => TensorData::from_f32_as(standard_normal(seed, i as u64, len), dtype),
            };
            Some(Tensor { shape, data })
        })
        .collect()
}

#[test]
fn one_entry_equals_the_first_entry_of_the_whole() {
    let (mut separable, mut checked, mut compared) = (0, 0, 0);
    for seed in 0..2000 {
        let (program, _) = attnc_fuzzgen::case::draw(seed);
        let Ok(module) = attnc::source::compile_text(&program.source) else {
            continue;
        };
        let kernel = &module.kernels[0];
        let bindings: Bindings = program.dims.iter().cloned().collect();
        checked += 1;
        let Some((symbol, one)) = one_entry_bindings(kernel, &bindings) else {
            continue;
        };
        separable += 1;
        let entries = bindings[&symbol] as usize;
        let full = inputs(kernel, &bindings, seed).expect("bound shapes");
        let cut: Vec<Tensor> = full
            .iter()
            .zip(&kernel.params)
            .map(|(t, p)| one_entry_input(p, &symbol, entries, t).expect("fits"))
            .collect();
        let (Ok(whole), Ok(alone)) = (
            execute(kernel, &bindings, &full, Engine::Interp, 1),
            execute(kernel, &one, &cut, Engine::Interp, 1),
        ) else {
            continue;
        };
        compared += 1;
        let first = first_entry(&whole, entries).expect("the output leads with the symbol");
        let bits =
            |t: &Tensor| -> Vec<u32> { t.to_f32_vec().iter().map(|x| x.to_bits()).collect() };
        assert_eq!(alone.shape, first.shape, "seed {seed}:\n{}", program.source);
        assert_eq!(
            bits(&alone),
            bits(&first),
            "seed {seed}:\n{}",
            program.source
        );
    }
    eprintln!(
        "{separable} of {checked} generated programs keep their entries apart; {compared} ran"
    );
    assert!(compared > 100, "{compared} of {separable} of {checked}");
}
