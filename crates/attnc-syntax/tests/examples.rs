//! Every program of LANGUAGE.md §1 and §3 parses without diagnostics and round-trips.

use attnc_syntax::ast::{ApproxKind, ExprKind};
use attnc_syntax::{parse, print_file};

const FIRST_LOOK: &str = r#"
# Exact causal sliding-window attention, any number of heads.
kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = mask(s, causal & window(256));
    return softmax(s) @ v;
}
"#;

const MEANING: &str = r#"
kernel decode(q: f32[h, 1, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, 1, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}

kernel linear(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let qf = elu(q) + 1;
    let kf = elu(k) + 1;
    return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);      # the compiler finds the O(n) form
}

kernel linformer(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], e: f32[r, n], f: f32[r, n]) -> f32[h, n, d] {
    return softmax(q @ (e @ k).T / sqrt(d)) @ (f @ v);
}

@approx(random_features(m = 256, seed = 7), tol = 0.1)
kernel performer(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}

kernel gated(x: f32[n, e], wq: f32[e, d], wk: f32[e, d], wv: f32[e, d], wg: f32[e, d]) -> f32[n, d] {
    let a = softmax((x @ wq) @ (x @ wk).T / sqrt(d)) @ (x @ wv);
    return sigmoid(x @ wg) * a;
}

kernel alibi(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
    return softmax(mask(s, causal)) @ v;
}
"#;

fn parses_clean(src: &str) -> attnc_syntax::ast::File {
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let printed = print_file(&file);
    let (again, diagnostics) = parse(&printed);
    assert!(diagnostics.is_empty(), "{printed}\n{diagnostics:#?}");
    assert_eq!(again.without_spans(), file.without_spans(), "{printed}");
    file
}

#[test]
fn first_look_parses() {
    let file = parses_clean(FIRST_LOOK);
    assert_eq!(file.kernels.len(), 1);
    let kernel = &file.kernels[0];
    assert_eq!(kernel.name.name, "local");
    assert_eq!(kernel.params.len(), 3);
    assert_eq!(kernel.stmts.len(), 2);
    assert!(matches!(kernel.ret.kind, ExprKind::Binary { .. }));
}

#[test]
fn meaning_examples_parse() {
    let file = parses_clean(MEANING);
    let names: Vec<&str> = file.kernels.iter().map(|k| k.name.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "decode",
            "linear",
            "linformer",
            "performer",
            "gated",
            "alibi"
        ]
    );
    let performer = &file.kernels[3];
    let approx: Vec<&ApproxKind> = performer.approx.iter().map(|a| &a.kind).collect();
    assert_eq!(
        approx,
        [
            &ApproxKind::RandomFeatures {
                m: 256,
                seed: Some(7)
            },
            &ApproxKind::Tol(0.1)
        ]
    );
}

#[test]
fn first_look_prints_canonically() {
    let (file, _) = parse(FIRST_LOOK);
    let expected =
        "kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = mask(s, causal & window(256));
    return softmax(s) @ v;
}
";
    assert_eq!(print_file(&file), expected);
}

#[test]
fn several_attributes_are_flattened() {
    let src =
        "@approx(bf16, f16)\n@approx(int8, lowrank(r = 64), random_features(m = 8), tol = 1e-3)\n\
               kernel k(q: f32[n], ) { return q; }";
    let file = parses_clean(src);
    let kinds: Vec<ApproxKind> = file.kernels[0]
        .approx
        .iter()
        .map(|a| a.kind.clone())
        .collect();
    assert_eq!(
        kinds,
        vec![
            ApproxKind::Bf16,
            ApproxKind::F16,
            ApproxKind::Int8,
            ApproxKind::Lowrank { r: 64 },
            ApproxKind::RandomFeatures { m: 8, seed: None },
            ApproxKind::Tol(1e-3),
        ]
    );
    assert!(file.kernels[0].ret_type.is_none());
}

#[test]
fn nystrom_parses_and_prints_as_written() {
    let src = "@approx(nystrom(m = 64), tol = 0.05)\n\
kernel nys(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}
";
    let file = parses_clean(src);
    assert_eq!(
        file.kernels[0].approx[0].kind,
        ApproxKind::Nystrom { m: 64 }
    );
    assert_eq!(print_file(&file), src);
}

#[test]
fn minimal_parentheses() {
    for (src, printed) in [
        ("a - (b - c)", "a - (b - c)"),
        ("(a - b) - c", "a - b - c"),
        ("-(a + b)", "-(a + b)"),
        ("(a @ b).T", "(a @ b).T"),
        ("(-a).T", "(-a).T"),
        ("-a.T", "-a.T"),
        ("a * (b + c)", "a * (b + c)"),
        ("(a * b) + c", "a * b + c"),
        ("a / (b * c)", "a / (b * c)"),
        ("2.T + 1e-7 + 1e20 + 0.5", "2.0.T + 1e-7 + 1e20 + 0.5"),
        (
            "mask(s, (causal | window(1)) & (block(2) & global(3)) | dilated(4, 5))",
            "mask(s, (causal | window(1)) & (block(2) & global(3)) | dilated(4, 5))",
        ),
        (
            "mask(s, causal | (window(1) | block(2)))",
            "mask(s, causal | (window(1) | block(2)))",
        ),
        ("mask(s, ((causal)))", "mask(s, causal)"),
        ("f((a + b), -1)", "f(a + b, -1.0)"),
    ] {
        let kernel = format!("kernel k(x: f32[n]) {{ return {src}; }}");
        let file = parses_clean(&kernel);
        assert_eq!(
            attnc_syntax::print_expr(&file.kernels[0].ret),
            printed,
            "{src}"
        );
    }
}

#[test]
fn empty_and_comment_only_files_have_no_kernels_and_no_errors() {
    for src in ["", "   \n\t\r\n", "# only a comment", "# one\n# two\n"] {
        let (file, diagnostics) = parse(src);
        assert!(file.kernels.is_empty());
        assert!(diagnostics.is_empty(), "{src:?}: {diagnostics:?}");
    }
}

#[test]
fn a_tuple_return_parses_and_prints_back() {
    let src = "kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> (f32[n, d], f32[n, 1]) {\n    let s = q @ k.T;\n    return (softmax(s, -1.0) @ v, logsumexp(s, -1.0));\n}\n";
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let k = &file.kernels[0];
    assert_eq!(k.extra_ret_types.len(), 1);
    assert_eq!(k.extra_rets.len(), 1);
    let printed = attnc_syntax::print::print_kernel(k);
    assert_eq!(printed, src);
    // A parenthesized single value stays one value; commas inside calls are not a tuple.
    let (file, diagnostics) =
        attnc_syntax::parse("kernel g(x: f32[n]) -> (f32[n]) { return (softmax(x, -1) + 1) * 2; }");
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    assert!(file.kernels[0].extra_rets.is_empty());
    assert!(file.kernels[0].extra_ret_types.is_empty());
    // An unclosed tuple is a diagnostic, not a panic.
    let (_, diagnostics) = attnc_syntax::parse("kernel g(x: f32[n]) { return (x, x; }");
    assert!(!diagnostics.is_empty());
}
