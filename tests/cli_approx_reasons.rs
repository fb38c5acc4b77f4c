//! QUALITY.md item 12 at the command line: an approximation that cannot meet `tol` or that
//! fits nowhere is not applied, the run stays exact, and a note says why.

mod common;

use common::attnc;

/// Runs the dense benchmark kernel at a small shape with `policy` (extra arguments) and
/// returns its stderr, after checking that the run succeeded.
fn dense_run_notes(policy: &[&str]) -> String {
    let mut args = vec![
        "run",
        "benches/kernels/dense.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=256,d=16",
    ];
    args.extend_from_slice(policy);
    let out = attnc(&args);
    assert_eq!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_rank_not_below_the_sequence_length_is_refused_with_a_reason() {
    let stderr = dense_run_notes(&["--approx", "lowrank(r=512)", "--tol", "0.5"]);
    assert!(
        stderr.contains("lowrank(r = 512) not applied: nothing in this program fits it")
            && stderr.contains("more than r = 512 keys")
            && stderr.contains("the plan is exact"),
        "{stderr}"
    );
}

#[test]
fn too_few_features_for_the_tolerance_are_refused_with_a_reason() {
    let stderr = dense_run_notes(&["--approx", "random_features(m=4)"]);
    assert!(
        stderr.contains("random_features(m = 4, seed = 0) not applied")
            && stderr.contains("exceeds the tolerance"),
        "{stderr}"
    );
}
