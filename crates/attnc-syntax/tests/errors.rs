//! Bad inputs (QUALITY.md checklist items 1, 2 and 4): one clear error each, at the right place.

use attnc_syntax::{decode_source, parse, Diagnostic, Span};

fn errors(src: &str) -> Vec<Diagnostic> {
    let (_, diagnostics) = parse(src);
    for d in &diagnostics {
        for label in &d.labels {
            assert!(src.is_char_boundary(label.span.start as usize), "{d:?}");
            assert!(src.is_char_boundary(label.span.end as usize), "{d:?}");
        }
        let _ = d.render("t.attn", src);
    }
    diagnostics
}

fn one_error(src: &str) -> Diagnostic {
    let diagnostics = errors(src);
    assert_eq!(diagnostics.len(), 1, "{src}\n{diagnostics:#?}");
    diagnostics.into_iter().next().expect("one")
}

fn at(src: &str, needle: &str) -> u32 {
    src.find(needle).expect("needle in source") as u32
}

#[test]
fn invalid_utf8_reports_the_first_bad_byte() {
    let bytes = b"kernel f(q: f32[n]) {\n  return q; # caf\xc3\n}";
    let error = decode_source(bytes).expect_err("invalid utf-8");
    let at = bytes.iter().position(|&b| b == 0xc3).expect("bad byte") as u32;
    assert_eq!(error.primary_span().map(|s| s.start), Some(at));
    let shown = String::from_utf8_lossy(bytes);
    let text = error.render("bad.attn", &shown);
    assert!(text.contains("bad.attn:2:18"), "{text}");
}

#[test]
fn odd_unicode_outside_comments_is_an_error_and_parsing_goes_on() {
    let src = "kernel f(q: f32[n]) {\n  let é = q;\n  return q 😀;\n}\nkernel g(\u{200B}q: f32[n]) { return q; }";
    let diagnostics = errors(src);
    assert_eq!(diagnostics.len(), 3, "{diagnostics:#?}");
    assert!(diagnostics[0].message.contains("`é`"));
    assert!(diagnostics[1].message.contains("`😀`"));
    assert!(diagnostics[2].message.contains("U+200B"));
    assert_eq!(
        diagnostics[0].primary_span(),
        Some(Span::new(at(src, "é") as usize, at(src, "é") as usize + 2))
    );
}

#[test]
fn unicode_in_comments_is_fine() {
    let (file, diagnostics) = parse("# café 😀 \u{200B}\nkernel f(q: f32[n]) { return q; } # ✓");
    assert!(diagnostics.is_empty());
    assert_eq!(file.kernels.len(), 1);
}

#[test]
fn unclosed_paren_labels_the_opening_place() {
    let src = "kernel f(q: f32[n]) {\n    let s = softmax(q @ q.T;\n    return s;\n}";
    let error = one_error(src);
    assert_eq!(error.message, "expected `)` to close `(`, found `;`");
    let open = error
        .labels
        .iter()
        .find(|l| !l.primary)
        .expect("secondary label");
    assert_eq!(open.span.start, at(src, "(q @"));
    assert_eq!(open.message, "unclosed `(`");
}

#[test]
fn unclosed_brace_at_end_of_file() {
    let src = "kernel f(q: f32[n]) {\n    return q;\n";
    let error = one_error(src);
    assert_eq!(
        error.message,
        "expected `}` to close `{`, found end of file"
    );
    let open = error
        .labels
        .iter()
        .find(|l| !l.primary)
        .expect("secondary label");
    assert_eq!(open.span.start, at(src, "{"));
    assert_eq!(open.message, "this `{` is never closed");
    // The kernel is still returned.
    assert_eq!(parse(src).0.kernels.len(), 1);
}

#[test]
fn unclosed_brace_before_the_next_kernel() {
    let src = "kernel f(q: f32[n]) {\n    return q;\nkernel g(q: f32[n]) { return q; }";
    let error = one_error(src);
    assert!(
        error.message.contains("found keyword `kernel`"),
        "{}",
        error.message
    );
    assert_eq!(parse(src).0.kernels.len(), 2);
}

#[test]
fn unclosed_bracket_in_a_type() {
    let error = one_error("kernel f(q: f32[n, d) { return q; }");
    assert_eq!(error.message, "expected `]` to close `[`, found `)`");
}

#[test]
fn deeply_unclosed_parens_give_one_error() {
    let src = format!("kernel f(q: f32[n]) {{ return {}q; }}", "(".repeat(50));
    let error = one_error(&src);
    assert!(error.message.contains("to close `(`"));
}

#[test]
fn missing_semicolon_points_after_the_expression() {
    let src = "kernel local(q: f32[n]) {\n    return softmax(q) @ q\n}";
    let error = one_error(src);
    assert_eq!(error.message, "expected `;` after expression, found `}`");
    let end = at(src, "@ q") + 3;
    assert_eq!(error.primary_span(), Some(Span { start: end, end }));
}

#[test]
fn several_errors_are_reported_in_one_file() {
    let src = "kernel f(q: f32[n]) {\n  let a = q +;\n  let b = * q;\n  return a b;\n}\nkernel g(q: f32[n]) { return ); }";
    let diagnostics = errors(src);
    assert_eq!(diagnostics.len(), 4, "{diagnostics:#?}");
}

#[test]
fn stray_tokens() {
    let error = one_error(") ] } ; kernel f(q: f32[n]) { return q; }");
    assert_eq!(error.message, "expected `kernel`, found `)`");
    let error = one_error("kernel f(q: f32[n]) { return q; } }");
    assert_eq!(error.message, "expected `kernel`, found `}`");
    let error = one_error("kernel f(q: f32[n]) { return q; let x = q; }");
    assert!(error
        .message
        .starts_with("expected `}` after the `return` statement"));
    let error = one_error("kernel f(q: f32[n]) { let x = q; }");
    assert_eq!(error.message, "kernel `f` has no `return` statement");
}

#[test]
fn keywords_are_not_names() {
    let error = one_error("kernel f(let: f32[n]) { return q; }");
    assert_eq!(
        error.message,
        "expected a parameter name, found keyword `let`"
    );
    let error = one_error("kernel f(inf: f32[n]) { return q; }");
    assert_eq!(
        error.message,
        "expected a parameter name, found keyword `inf`"
    );
}

#[test]
fn pattern_words_are_names_outside_patterns() {
    let src = "kernel window(causal: f32[n, n], block: f32[n, n]) -> f32[n, n] {\n\
               let global = causal + block;\n\
               return mask(global, causal & window(3));\n}";
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    assert_eq!(file.kernels[0].name.name, "window");
    let printed = attnc_syntax::print_file(&file);
    assert_eq!(parse(&printed).0.without_spans(), file.without_spans());
    // Outside `mask`, `window(3)` is a call (which the checker rejects), not a pattern.
    let (file, diagnostics) = parse("kernel f(q: f32[n]) { return relu(window(3)); }");
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    assert_eq!(file.kernels.len(), 1);
}

#[test]
fn infinity_and_scalar_types() {
    let src =
        "kernel f(x: f32[n, n], s: f32[]) -> f32[n, n] { return mask(x, causal, -inf) * s + inf; }";
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    assert!(file.kernels[0].params[1].ty.dims.is_empty());
    let printed = attnc_syntax::print_file(&file);
    assert!(
        printed.contains("-inf") && printed.contains("f32[]"),
        "{printed}"
    );
    assert_eq!(parse(&printed).0.without_spans(), file.without_spans());
}

#[test]
fn comparisons_and_keyword_arguments_are_named_as_such() {
    for (src, needle) in [
        ("kernel f(a: f32[n], b: f32[n]) { return a < b; }", "<"),
        (
            "kernel f(a: f32[n], b: f32[n]) { let m = a * 2 >= b; return m; }",
            ">=",
        ),
        (
            "kernel f(a: f32[n], b: f32[n]) { return mask(a, a == b); }",
            "==",
        ),
        (
            "kernel f(a: f32[n], b: f32[n]) { return relu(a != b); }",
            "!=",
        ),
    ] {
        let error = one_error(src);
        assert_eq!(
            error.message,
            format!("comparisons (`{needle}`) are not part of the language"),
            "{src}"
        );
        assert_eq!(error.primary_span().map(|s| s.start), Some(at(src, needle)));
    }
    for (src, callee) in [
        (
            "kernel f(s: f32[n, n]) { return mask(s, window(w = 3)); }",
            "window",
        ),
        (
            "kernel f(s: f32[n, n]) { return softmax(s, axis = -1); }",
            "softmax",
        ),
        (
            "kernel f(s: f32[n, n]) { return mask(s, causal, fill = 0); }",
            "mask",
        ),
    ] {
        let error = one_error(src);
        assert_eq!(
            error.message,
            format!("keyword arguments are not part of the language (in `{callee}`)"),
            "{src}"
        );
    }
}

#[test]
fn pattern_sizes_may_be_dimension_symbols() {
    let src = "kernel f(s: f32[n, n]) -> f32[n, n] { return mask(s, window(w) | dilated(w, r) & block(64)); }";
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let printed = attnc_syntax::print_file(&file);
    assert!(
        printed.contains("window(w) | dilated(w, r) & block(64)"),
        "{printed}"
    );
}

#[test]
fn overflowing_numbers() {
    let error = one_error("kernel f(q: f32[99999999999999999999]) { return q; }");
    assert_eq!(
        error.message,
        "integer literal `99999999999999999999` is too large"
    );
    let error = one_error("kernel f(q: f32[n]) { return q * 1e400; }");
    assert_eq!(error.message, "number literal `1e400` is out of range");
    let error = one_error("kernel f(q: f32[n]) { return mask(q, window(18446744073709551616)); }");
    assert!(error.message.contains("too large"));
    let (file, diagnostics) =
        parse("kernel f(q: f32[18446744073709551615]) { return q * 1.7e308; }");
    assert!(diagnostics.is_empty());
    assert_eq!(file.kernels.len(), 1);
    let error = one_error("kernel f(q: f32[n]) { return 12abc; }");
    assert_eq!(error.message, "invalid number literal `12abc`");
}

#[test]
fn negative_sizes() {
    for src in [
        "kernel f(q: f32[-1]) { return q; }",
        "kernel f(q: f32[n]) { return mask(q, window(-3)); }",
        "@approx(lowrank(r = -4)) kernel f(q: f32[n]) { return q; }",
    ] {
        let error = one_error(src);
        assert_eq!(error.message, "sizes cannot be negative", "{src}");
    }
}

#[test]
fn bad_attributes() {
    let error = one_error("@approx(fp8) kernel f(q: f32[n]) { return q; }");
    assert_eq!(error.message, "unknown approximation `fp8`");
    let error = one_error("@inline kernel f(q: f32[n]) { return q; }");
    assert_eq!(
        error.message,
        "expected `approx` after `@`, found identifier `inline`"
    );
    // The kernel after a bad attribute is kept.
    let (file, _) = parse("@approx(fp8) kernel f(q: f32[n]) { return q; }");
    assert_eq!(file.kernels.len(), 1);
}

#[test]
fn no_parameters_is_an_error() {
    let error = one_error("kernel f() { return 1; }");
    assert_eq!(error.message, "kernel `f` has no parameters");
}

#[test]
fn many_errors_are_capped() {
    let src = "é ".repeat(10_000);
    let diagnostics = errors(&src);
    assert_eq!(diagnostics.len(), attnc_syntax::MAX_DIAGNOSTICS);
    assert!(diagnostics
        .last()
        .expect("some")
        .message
        .starts_with("too many errors"));
}
