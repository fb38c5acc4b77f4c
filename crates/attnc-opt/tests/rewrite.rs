//! Golden IR-in / IR-out tests, one file per rule family (`tests/rewrite/<family>.txt`): each
//! case is an input kernel in the IR text form, the bindings it is optimized at, and the
//! kernel the optimizer must return, also as IR text. `ATTNC_BLESS=1 cargo test -p attnc-opt
//! --test rewrite` rewrites the expected halves from the current optimizer (review the diff).
//!
//! File layout, cases separated by lines of `====`:
//!
//! ```text
//! # bindings: h=2, n=64, d=16
//! kernel f(...) -> f32[...]
//!   %0 = ...
//!   return %N
//! ----
//! kernel f(...) -> f32[...]        <- the expected output
//!   ...
//! ```

use attnc_ir::print::print_kernel;
use attnc_ir::text::parse_kernel;
use attnc_ir::Bindings;
use attnc_opt::{optimize, OptimizeOptions};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/rewrite")
}

fn bindings(case: &str) -> Bindings {
    case.lines()
        .find_map(|l| l.trim().strip_prefix("# bindings:"))
        .map(|list| {
            list.split(',')
                .filter_map(|kv| kv.trim().split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse().expect("a size")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_rule_family_rewrites_its_golden_inputs_to_the_golden_outputs() {
    let bless = std::env::var_os("ATTNC_BLESS").is_some();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("the golden directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "golden files: {files:?}");
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("reads");
        let mut blessed = Vec::new();
        for (index, case) in text.split("\n====\n").enumerate() {
            let (input, expected) = case.split_once("\n----\n").unwrap_or((case, ""));
            let kernel = parse_kernel(input)
                .unwrap_or_else(|e| panic!("{}: case {index}: {e}", file.display()));
            let b = bindings(input);
            let result = optimize(&kernel, &b, &OptimizeOptions::default());
            let got = print_kernel(&result.kernel);
            // The output parses back, and means what the input means.
            let reparsed = parse_kernel(&got).expect("the output parses back");
            assert_eq!(print_kernel(&reparsed), got);
            if bless {
                blessed.push(format!("{}\n----\n{}", input.trim_end(), got.trim_end()));
            } else if expected.trim() != got.trim() {
                failures.push(format!(
                    "{} case {index}:\n--- expected\n{}\n--- got\n{}",
                    file.display(),
                    expected.trim(),
                    got.trim()
                ));
            }
        }
        if bless {
            std::fs::write(&file, blessed.join("\n====\n") + "\n").expect("writes");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_example_prints_and_parses_back_before_and_after_optimization() {
    for (name, kernel) in common::examples() {
        let bindings: Bindings = attnc_ir::bind::kernel_symbols(&kernel)
            .into_iter()
            .map(|s| (s, 16))
            .collect();
        for k in [
            kernel.clone(),
            optimize(&kernel, &bindings, &OptimizeOptions::default()).kernel,
        ] {
            let text = print_kernel(&k);
            let back = parse_kernel(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
            assert_eq!(print_kernel(&back), text, "{name}");
        }
    }
}

mod common;
