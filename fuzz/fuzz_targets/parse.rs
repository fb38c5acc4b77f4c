//! Any bytes as a `.attn` file: decode, parse, check and lower must return a module or
//! diagnostics, never panic; every diagnostic must render against the decoded text (spans on
//! char boundaries).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let (text, result) = attnc::source::compile_bytes(bytes);
    match result {
        Ok(module) => {
            // Printing walks every node of every kernel: it must not panic either.
            for kernel in &module.kernels {
                let _ = attnc::ir::print::print_kernel(kernel);
            }
        }
        Err(diagnostics) => {
            for d in &diagnostics {
                let _ = d.render("fuzz.attn", &text);
            }
        }
    }
});
