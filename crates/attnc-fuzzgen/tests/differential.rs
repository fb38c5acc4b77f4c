//! The randomized differential test at CI size: generated programs, every JIT configuration
//! against the interpreter by the documented rule. `ATTNC_DIFFERENTIAL_PROGRAMS=N` runs seeds
//! `0..N` instead of the default; the long run is the `differential` binary (docs/testing.md).
//! Fails with the report of every failing seed.

use attnc_fuzzgen::case::{run, Outcome};

/// Seeds run by default: a fixed range (about 25 s in the test profile on one core), so a
/// failure replays with `--seed`.
const DEFAULT_PROGRAMS: u64 = 250;

fn programs() -> u64 {
    match std::env::var("ATTNC_DIFFERENTIAL_PROGRAMS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("ATTNC_DIFFERENTIAL_PROGRAMS=`{v}` is not a count")),
        Err(_) => DEFAULT_PROGRAMS,
    }
}

#[test]
fn generated_programs_agree_with_the_interpreter() {
    let count = programs();
    let mut failures = Vec::new();
    let (mut passed, mut fused) = (0u64, 0u64);
    for seed in 0..count {
        match run(seed) {
            Outcome::Passed(s) => {
                passed += 1;
                fused += u64::from(s.fused);
            }
            Outcome::Skipped(why) => eprintln!("seed {seed} skipped: {why}"),
            Outcome::Failed(report) => failures.push(report),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The generator must keep reaching the fused kernels (guards the generator itself).
    assert!(
        passed >= count * 9 / 10,
        "only {passed} of {count} cases ran"
    );
    assert!(
        fused >= count / 10,
        "only {fused} of {count} cases fused an attention"
    );
}

#[test]
fn seeds_that_found_gaps_in_the_rules_pass() {
    // 1811: a causal linear attention's score q·k past the f32 range (its plain form is
    // NaN, the prefix state never forms it); 1849: a mean whose sum leaves the f32 range;
    // 2093, 2589: softmax(x + c) = softmax(x) with a row shift c = ±inf, or x + c past the
    // limit, rewrote a NaN or all-zero row into a finite one (the rule now keeps input shifts).
    for seed in [1811, 1849, 2093, 2589] {
        match run(seed) {
            Outcome::Passed(s) => {
                assert!(s.compared > 0, "seed {seed} compared nothing");
                assert_eq!(s.limit_reached, seed != 1811, "seed {seed}");
            }
            other => panic!("seed {seed}: {other:?}"),
        }
    }
}
