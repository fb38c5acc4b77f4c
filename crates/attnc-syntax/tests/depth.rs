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
    let src = kernel(&format!("mask(q, {})", vec!["causal"; N].join(" & ")));
    assert_depth_error(&parse_on_small_stack(src), "pattern");
    let src = kernel(&format!("mask(q, {})", vec!["window(1)"; N].join(" | ")));
    assert_depth_error(&parse_on_small_stack(src), "pattern");
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
