//! Property: no token soup and no string makes the parser, printer or renderer panic, and every
//! diagnostic span lies on character boundaries.

use attnc_syntax::{parse, print_file};
use proptest::prelude::*;

const VOCABULARY: &[&str] = &[
    "kernel",
    "let",
    "return",
    "causal",
    "window",
    "dilated",
    "global",
    "block",
    "f32",
    "f16",
    "bf16",
    "approx",
    "T",
    "lowrank",
    "random_features",
    "nystrom",
    "tol",
    "r",
    "m",
    "seed",
    "int8",
    "q",
    "softmax",
    "mask",
    "x",
    "0",
    "1",
    "256",
    "1.5",
    "1e-3",
    "99999999999999999999",
    "1e400",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ";",
    ":",
    "+",
    "-",
    "*",
    "/",
    "@",
    ".",
    "&",
    "|",
    "=",
    "->",
    "#",
    "\n",
    "é",
    "😀",
    "\u{200B}",
    "\t",
    "\r\n",
];

fn check(src: &str) {
    let (file, diagnostics) = parse(src);
    for d in &diagnostics {
        for label in &d.labels {
            assert!(src.is_char_boundary(label.span.start as usize));
            assert!(src.is_char_boundary(label.span.end as usize));
            assert!(label.span.start <= label.span.end);
        }
        let _ = d.render("fuzz.attn", src);
        let _ = d.to_json("fuzz.attn", src);
    }
    // Whatever was built prints to text that parses again without errors.
    let printed = print_file(&file);
    let (again, errors) = parse(&printed);
    assert!(errors.is_empty(), "{printed}\n{errors:#?}");
    assert_eq!(again.without_spans(), file.without_spans());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn token_soup(words in prop::collection::vec(prop::sample::select(VOCABULARY), 0..80)) {
        check(&words.join(" "));
    }

    #[test]
    fn token_soup_in_a_kernel(words in prop::collection::vec(prop::sample::select(VOCABULARY), 0..40)) {
        check(&format!("kernel f(q: f32[n]) {{ let a = {}; return q; }}", words.join(" ")));
        check(&format!("kernel f(q: f32[n]) {{ return {}", words.join("")));
    }

    #[test]
    fn any_string(src in "\\PC{0,200}") {
        check(&src);
    }

    #[test]
    fn any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        match attnc_syntax::decode_source(&bytes) {
            Ok(src) => check(src),
            Err(d) => {
                let shown = String::from_utf8_lossy(&bytes);
                let _ = d.render("bytes.attn", &shown);
            }
        }
    }
}
