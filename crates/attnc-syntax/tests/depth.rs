//! The depth limit (QUALITY.md checklist item 3): 100,000-deep or 100,000-long inputs give one
//! clear error, on a 2 MiB stack, and parsing, printing, rendering and dropping all finish.

use attnc_syntax::{parse, print_file, MAX_DEPTH};

const N: usize = 100_000;

/// Parses `src` on a thread with a 2 MiB stack; prints and renders whatever came back, then
/// drops it; returns the diagnostic messages.
fn parse_on_small_stack(src: String) -> Vec<String> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let (file, diagnostics) = parse(&src);
            let printed = print_file(&file);
            let (again, _) = parse(&printed);
            drop(again);
            let messages = diagnostics.iter().map(|d| d.message.clone()).collect();
            for d in &diagnostics {
                let _ = d.render("deep.attn", &src);
            }
            drop(file);
            messages
        })
        .expect("spawn")
        .join()
        .expect("no stack overflow or panic")
}

fn kernel(body: &str) -> String {
    format!("kernel f(q: f32[n]) {{\n    return {body};\n}}\n")
}

fn assert_depth_error(messages: &[String], what: &str) {
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        messages[0],
        format!("{what} nests deeper than {MAX_DEPTH} levels")
    );
}

#[test]
fn nested_parentheses() {
    let src = kernel(&format!("{}q{}", "(".repeat(N), ")".repeat(N)));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn unclosed_nested_parentheses() {
    let src = kernel(&format!("{}q", "(".repeat(N)));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn nested_calls() {
    let src = kernel(&format!("{}q{}", "exp(".repeat(N), ")".repeat(N)));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn long_sums() {
    let src = kernel(&vec!["q"; N].join(" + "));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn long_products() {
    let src = kernel(&vec!["q"; N].join(" @ "));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn unary_minus_chains() {
    let src = kernel(&format!("{}q", "-".repeat(N)));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn transpose_chains() {
    let src = kernel(&format!("q{}", ".T".repeat(N)));
    assert_depth_error(&parse_on_small_stack(src), "expression");
}

#[test]
fn nested_patterns() {
    let src = kernel(&format!(
        "mask(q, {}causal{})",
        "(".repeat(N),
        ")".repeat(N)
    ));
    assert_depth_error(&parse_on_small_stack(src), "pattern");
    // `|` and `&` alternating, each operand in parentheses: genuinely nested.
    let src = kernel(&format!(
        "mask(q, {}causal{})",
        "causal & (window(1) | (".repeat(N / 2),
        "))".repeat(N / 2)
    ));
    assert_depth_error(&parse_on_small_stack(src), "pattern");
}

#[test]
fn flat_pattern_chains_of_any_length_are_not_nesting() {
    // A union (or intersection) of many patterns cannot be split with `let`: a chain is one
    // level, whatever its length.
    for op in [" | ", " & "] {
        let src = kernel(&format!("mask(q, {})", vec!["window(1)"; N].join(op)));
        assert!(parse_on_small_stack(src).is_empty(), "{op}");
        let (file, _) = parse(&kernel(&format!(
            "mask(q, {})",
            vec!["window(1)"; 300].join(op)
        )));
        let printed = print_file(&file);
        assert_eq!(parse(&printed).0.without_spans(), file.without_spans());
    }
    // Chains inside chains nest once per level.
    let mixed = vec!["causal & window(2) & block(3)"; 1000].join(" | ");
    assert!(parse_on_small_stack(kernel(&format!("mask(q, {mixed})"))).is_empty());
}

#[test]
fn the_pattern_depth_note_does_not_suggest_let() {
    let src = kernel(&format!(
        "mask(q, {}causal{})",
        "(".repeat(MAX_DEPTH + 1),
        ")".repeat(MAX_DEPTH + 1)
    ));
    let (_, diagnostics) = parse(&src);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let rendered = diagnostics[0].render("deep.attn", &src);
    assert!(
        rendered.contains("pattern nests deeper than 256 levels"),
        "{rendered}"
    );
    assert!(
        rendered.contains("cannot be named with `let`"),
        "{rendered}"
    );
    assert!(
        rendered.contains("of any length is one level"),
        "{rendered}"
    );
    // Expressions can be split with `let`, and the note says so.
    let (_, diagnostics) = parse(&kernel(&vec!["q"; MAX_DEPTH + 1].join(" + ")));
    assert_eq!(diagnostics[0].notes, ["split it with `let` statements"]);
}

#[test]
fn parsing_goes_on_after_a_depth_error() {
    let deep = vec!["q"; N].join(" + ");
    let src = format!(
        "kernel f(q: f32[n]) {{\n    let a = {deep};\n    return q;\n}}\nkernel g(q: f32[n]) {{ return q +; }}\n"
    );
    let messages = parse_on_small_stack(src);
    assert_eq!(messages.len(), 2, "{messages:?}");
}

#[test]
fn the_limit_itself_is_allowed() {
    // A sum of MAX_DEPTH terms is a tree of height MAX_DEPTH.
    let src = kernel(&vec!["q"; MAX_DEPTH].join(" + "));
    assert!(parse_on_small_stack(src).is_empty());
    let src = kernel(&vec!["q"; MAX_DEPTH + 1].join(" + "));
    assert_eq!(parse_on_small_stack(src).len(), 1);
    let src = kernel(&format!(
        "{}q{}",
        "(".repeat(MAX_DEPTH),
        ")".repeat(MAX_DEPTH)
    ));
    assert!(parse_on_small_stack(src).is_empty());
    let src = kernel(&format!("{}q", "-".repeat(MAX_DEPTH - 1)));
    assert!(parse_on_small_stack(src).is_empty());
    // Mixed forms: every level is counted once.
    let src = kernel(&format!(
        "{}q{}",
        "-(".repeat(MAX_DEPTH / 2),
        ").T".repeat(MAX_DEPTH / 2)
    ));
    assert!(parse_on_small_stack(src).len() <= 1);
}
