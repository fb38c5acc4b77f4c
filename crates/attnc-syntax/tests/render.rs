//! Golden text of rendered diagnostics, human and JSON.

use attnc_syntax::parse;

fn render_all(src: &str) -> String {
    let (_, diagnostics) = parse(src);
    diagnostics
        .iter()
        .map(|d| d.render("examples/local.attn", src))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn missing_semicolon() {
    let src = "kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = mask(s, causal & window(256));
    return softmax(s) @ v
}
";
    let expected = "error: expected `;` after expression, found `}`
 --> examples/local.attn:4:26
  |
4 |     return softmax(s) @ v
  |                          ^ expected `;`
";
    assert_eq!(render_all(src), expected);
}

#[test]
fn unclosed_paren_on_the_same_line() {
    let src = "kernel f(q: f32[n]) {\n    let s = softmax(q @ q.T;\n    return s;\n}";
    let expected = "error: expected `)` to close `(`, found `;`
 --> examples/local.attn:2:28
  |
2 |     let s = softmax(q @ q.T;
  |                            ^ expected `)`
  |                    - unclosed `(`
";
    assert_eq!(render_all(src), expected);
}

#[test]
fn unclosed_brace_on_another_line_with_tabs_and_crlf() {
    let src = "kernel f(q: f32[n]) {\r\n\tlet x = q;\r\n\treturn x;\r\n";
    let expected = "error: expected `}` to close `{`, found end of file
 --> examples/local.attn:3:11
  |
1 | kernel f(q: f32[n]) {
  |                     - this `{` is never closed
...
3 |     return x;
  |              ^ expected `}`
";
    assert_eq!(render_all(src), expected);
}

#[test]
fn odd_unicode_with_a_note() {
    let src = "kernel f(q: f32[n]) {\n  let é = q;\n  return q;\n}";
    let expected = "error: unexpected character `é` (U+00E9)
 --> examples/local.attn:2:7
  |
2 |   let é = q;
  |       ^
  = note: names are ASCII letters, digits and `_`; other characters may appear only in comments
";
    assert_eq!(render_all(src), expected);
}

#[test]
fn json_form() {
    let src = "kernel f(q: f32[n]) {\n    let s = softmax(q @ q.T;\n    return s;\n}";
    let (_, diagnostics) = parse(src);
    let json = diagnostics[0].to_json("f.attn", src);
    assert_eq!(
        json,
        r#"{"severity":"error","message":"expected `)` to close `(`, found `;`","file":"f.attn","line":2,"column":28,"labels":[{"line":2,"column":28,"end_line":2,"end_column":29,"message":"expected `)`","primary":true},{"line":2,"column":20,"end_line":2,"end_column":21,"message":"unclosed `(`","primary":false}],"notes":[]}"#
    );
}
