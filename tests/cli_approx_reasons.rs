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

#[test]
fn nystrom_with_as_many_landmarks_as_keys_is_refused_with_a_reason() {
    let stderr = dense_run_notes(&["--approx", "nystrom(m=256)", "--tol", "0.5"]);
    assert!(
        stderr.contains("nystrom(m = 256) not applied: nothing in this program fits it")
            && stderr.contains("more than m = 256 queries and keys")
            && stderr.contains("the plan is exact"),
        "{stderr}"
    );
}

#[test]
fn nystrom_on_masked_attention_is_refused_with_a_reason() {
    let out = attnc(&[
        "run",
        "benches/kernels/causal.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=256,d=16",
        "--approx",
        "nystrom(m=16)",
        "--tol",
        "0.5",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nystrom(m = 16) not applied: nothing in this program fits it")
            && stderr.contains("unmasked softmax attention")
            && stderr.contains("the plan is exact"),
        "{stderr}"
    );
}

#[test]
fn nystrom_without_landmarks_is_an_error() {
    // On the command line: misuse, status 2.
    let out = attnc(&[
        "run",
        "benches/kernels/dense.attn",
        "--random",
        "0",
        "--shape",
        "h=1,n=256,d=16",
        "--approx",
        "nystrom(m=0)",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`nystrom` needs `m = N` with N >= 1"),
        "{stderr}"
    );
    // In the source: an error at the item, status 1.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("zero.attn");
    std::fs::write(
        &path,
        "@approx(nystrom(m = 0))\nkernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {\n    return softmax(q @ k.T) @ v;\n}\n",
    )
    .expect("writes");
    let file = path.display().to_string();
    let out = attnc(&["run", &file, "--random", "0", "--shape", "n=8,d=2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the number of landmarks of `nystrom(m)` must be at least 1")
            && stderr.contains("zero.attn:1:9"),
        "{stderr}"
    );
}
