//! `attnc check` never panics: thousands of random token sequences and random byte strings go
//! through the front end (in-process) and a few hundred through the binary (exit 0 or 1 only).

mod common;

use common::*;
use proptest::prelude::*;

/// Every token kind of the language, plus a few near misses.
const VOCABULARY: &[&str] = &[
    "kernel",
    "let",
    "return",
    "@approx",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ";",
    ":",
    "->",
    "+",
    "-",
    "*",
    "/",
    "@",
    ".T",
    ".",
    "&",
    "|",
    "=",
    "f32",
    "f16",
    "bf16",
    "q",
    "k",
    "v",
    "n",
    "d",
    "h",
    "s",
    "x",
    "softmax",
    "mask",
    "causal",
    "window",
    "dilated",
    "global",
    "block",
    "sum",
    "max",
    "mean",
    "exp",
    "relpos",
    "ones",
    "sqrt",
    "tanh",
    "0",
    "1",
    "3",
    "2.5",
    "1e-3",
    "99999999999999999999",
    "1e400",
    "-1",
    "bf16",
    "int8",
    "lowrank",
    "r",
    "m",
    "seed",
    "tol",
    "random_features",
    "nystrom",
    "#",
    "\n",
    "é",
    "\u{200b}",
];

fn token_program() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(VOCABULARY), 0..60).prop_map(|t| t.join(" "))
}

/// Random programs that start from a valid kernel and splice in random tokens, so that the
/// checker (not only the parser) sees many inputs.
fn mutated_program() -> impl Strategy<Value = String> {
    let base = "kernel f(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] { \
                let s = q @ k.T / sqrt(d); return softmax(mask(s, causal & window(4))) @ v; }";
    let words: Vec<&'static str> = base.split(' ').collect();
    (
        0..words.len(),
        prop::collection::vec(prop::sample::select(VOCABULARY), 0..4),
        0..words.len(),
    )
        .prop_map(move |(at, insert, remove)| {
            let mut w: Vec<&str> = words.clone();
            w.remove(remove.min(w.len() - 1));
            let at = at.min(w.len());
            for (i, t) in insert.into_iter().enumerate() {
                w.insert(at + i, t);
            }
            w.join(" ")
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_token_sequences_never_panic(src in token_program()) {
        let _ = attnc::source::compile_bytes(src.as_bytes());
    }

    #[test]
    fn mutated_programs_never_panic(src in mutated_program()) {
        let _ = attnc::source::compile_bytes(src.as_bytes());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = attnc::source::compile_bytes(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn binary_check_exits_0_or_1(src in token_program(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in [("tokens.attn", src.into_bytes()), ("bytes.attn", bytes)] {
            let path = write(dir.path(), name, &content);
            let out = attnc(&["check", path.to_str().expect("utf-8 path")]);
            let code = status(&out);
            prop_assert!(code == 0 || code == 1, "exit {code}: {}", stderr(&out));
        }
    }
}
