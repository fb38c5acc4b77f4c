//! Lowering from source: the language's example programs, every check's error, dtypes, spans
//! and the printers.

use attnc_ir::dim::format_shape;
use attnc_ir::dot::dot_kernel;
use attnc_ir::lower::lower_file;
use attnc_ir::print::{print_kernel, print_module};
use attnc_ir::{DType, Dim, Kernel, MaskPattern, Module, Op, UnaryOp};
use attnc_syntax::{parse, Diagnostic, Span};

/// Parses `src` (which must be free of syntax errors) and lowers it.
fn try_lower(src: &str) -> Result<Module, Vec<Diagnostic>> {
    let (file, diagnostics) = parse(src);
    assert!(diagnostics.is_empty(), "syntax errors: {diagnostics:#?}");
    lower_file(&file)
}

fn lower(src: &str) -> Module {
    match try_lower(src) {
        Ok(m) => m,
        Err(errors) => panic!("unexpected errors: {errors:#?}"),
    }
}

/// The errors of a program that must not lower.
fn errors(src: &str) -> Vec<Diagnostic> {
    match try_lower(src) {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(errors) => errors,
    }
}

/// The only error of a program.
fn error(src: &str) -> Diagnostic {
    let mut errors = errors(src);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.remove(0)
}

/// The source text under a span.
fn text(src: &str, span: Span) -> &str {
    &src[span.range()]
}

/// The texts under the primary and then the secondary labels.
fn label_texts<'a>(src: &'a str, d: &Diagnostic) -> Vec<&'a str> {
    let mut labels: Vec<_> = d.labels.iter().collect();
    labels.sort_by_key(|l| !l.primary);
    labels.iter().map(|l| text(src, l.span)).collect()
}

fn output_shape(k: &Kernel) -> String {
    format_shape(&k.graph.node(k.output).shape)
}

/// Checks the structural invariants every lowered kernel keeps.
fn check_invariants(k: &Kernel) {
    for (i, p) in k.params.iter().enumerate() {
        let node = k.graph.node(attnc_ir::NodeId::new(i));
        assert_eq!(
            node.op,
            Op::Input {
                index: i,
                name: p.name.clone()
            }
        );
        assert_eq!(node.dtype, p.dtype);
        assert_eq!(node.shape, p.shape);
    }
    for id in k.graph.topo_order() {
        let node = k.graph.node(id);
        let operands = k.graph.operands(id);
        assert_eq!(operands.len(), node.op.arity(), "{}", node.op);
        for o in operands {
            assert!(o.index() < id.index(), "operands come first");
        }
        if !matches!(node.op, Op::Input { .. } | Op::Cast { .. }) {
            assert_eq!(node.dtype, DType::F32);
        }
    }
}

const LOCAL: &str = "\
# Exact causal sliding-window attention, any number of heads.
kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    let s = q @ k.T / sqrt(d);
    let s = mask(s, causal & window(256));
    return softmax(s) @ v;
}
";

const EXAMPLES: &str = "
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
";

#[test]
fn language_examples_lower_with_their_declared_shapes() {
    let module = lower(&format!("{LOCAL}{EXAMPLES}"));
    let expected = [
        ("local", "[h, n, d]"),
        ("decode", "[h, 1, d]"),
        ("linear", "[h, n, d]"),
        ("linformer", "[h, n, d]"),
        ("performer", "[h, n, d]"),
        ("gated", "[n, d]"),
        ("alibi", "[h, n, d]"),
    ];
    assert_eq!(module.kernels.len(), expected.len());
    for (k, (name, shape)) in module.kernels.iter().zip(expected) {
        assert_eq!(k.name, name);
        assert_eq!(output_shape(k), shape, "{name}");
        assert_eq!(k.ret_dtype, DType::F32);
        check_invariants(k);
    }
    let performer = module.kernel("performer").expect("performer");
    assert_eq!(performer.approx.len(), 2);
    let decode = module.kernel("decode").expect("decode");
    assert_eq!(decode.params[1].dtype, DType::Bf16);
    assert_eq!(
        decode.graph.node(attnc_ir::NodeId::new(1)).dtype,
        DType::Bf16
    );
}

#[test]
fn intermediate_shapes_follow_numpy() {
    let src = "kernel f(e: f32[r, n], k: f32[h, n, d], x: f32[n, 1]) -> f32[h, r, d] {
        let a = sum(k, 1);
        let b = max(k, -1);
        let c = mean(k, 0);
        let y = x + ones(1, d);
        let z = zeros(n, 3) * 2;
        return e @ k + a * sum(b, 1) * sum(c, 1);
    }";
    let module = lower(src);
    let k = &module.kernels[0];
    let shapes: Vec<(String, String)> = k
        .graph
        .topo_order()
        .into_iter()
        .map(|id| {
            let n = k.graph.node(id);
            (text(src, n.span).to_string(), format_shape(&n.shape))
        })
        .collect();
    let find = |expr: &str| {
        shapes
            .iter()
            .find(|(t, _)| t == expr)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no node for {expr}"))
    };
    assert_eq!(find("sum(k, 1)"), "[h, 1, d]");
    assert_eq!(find("max(k, -1)"), "[h, n, 1]");
    assert_eq!(find("mean(k, 0)"), "[1, n, d]");
    assert_eq!(find("e @ k"), "[h, r, d]");
    assert_eq!(find("sum(b, 1)"), "[h, 1, 1]");
    assert_eq!(find("a * sum(b, 1) * sum(c, 1)"), "[h, 1, d]");
    // Unused lets are dropped from the graph.
    assert!(shapes.iter().all(|(t, _)| t != "x + ones(1, d)"));
    check_invariants(k);
}

#[test]
fn numbers_dimensions_and_negation() {
    let src = "kernel f(x: f32[n, d]) -> f32[n, d] { return x * -2 / sqrt(d) - -x; }";
    let module = lower(src);
    let k = &module.kernels[0];
    let ops: Vec<&Op> = k
        .graph
        .topo_order()
        .into_iter()
        .map(|id| &k.graph.node(id).op)
        .collect();
    assert!(ops.contains(&&Op::Const(-2.0)));
    assert!(ops.contains(&&Op::DimValue(Dim::Sym("d".into()))));
    assert!(ops.contains(&&Op::Unary(UnaryOp::Neg)));
    for id in k.graph.topo_order() {
        let node = k.graph.node(id);
        if matches!(node.op, Op::Const(_) | Op::DimValue(_)) {
            assert!(node.shape.is_empty());
        }
    }
    let dim = k
        .graph
        .topo_order()
        .into_iter()
        .find(|&id| matches!(k.graph.node(id).op, Op::DimValue(_)))
        .expect("dim node");
    assert_eq!(text(src, k.graph.node(dim).span), "d");
}

#[test]
fn spans_are_the_source_expressions() {
    let module = lower(LOCAL);
    let k = &module.kernels[0];
    let texts: Vec<&str> = k
        .graph
        .topo_order()
        .into_iter()
        .map(|id| text(LOCAL, k.graph.node(id).span))
        .collect();
    assert_eq!(
        texts,
        [
            "q: f32[h, n, d]",
            "k: f32[h, n, d]",
            "v: f32[h, n, d]",
            "k.T",
            "q @ k.T",
            "d",
            "sqrt(d)",
            "q @ k.T / sqrt(d)",
            "mask(s, causal & window(256))",
            "softmax(s)",
            "softmax(s) @ v",
        ]
    );
}

#[test]
fn half_precision_return_types_end_in_a_cast() {
    let src = "kernel f(x: f16[n, d]) -> bf16[n, d] { return exp(x); }";
    let module = lower(src);
    let k = &module.kernels[0];
    assert_eq!(k.ret_dtype, DType::Bf16);
    let out = k.graph.node(k.output);
    assert_eq!(out.op, Op::Cast { to: DType::Bf16 });
    assert_eq!(out.dtype, DType::Bf16);
    assert_eq!(text(src, out.span), "bf16[n, d]");
    assert_eq!(k.graph.node(attnc_ir::NodeId::new(0)).dtype, DType::F16);
    check_invariants(k);

    let module = lower("kernel g(x: f32[n]) { return x; }");
    assert_eq!(module.kernels[0].ret_dtype, DType::F32);
}

#[test]
fn masks_take_patterns_and_constant_fills() {
    let src = "kernel f(s: f32[n, n]) -> f32[n, n] {
        let a = mask(s, causal | dilated(2, 3) & block(4));
        let b = mask(a, global(1), -1e9);
        return mask(b, window(0), 2 * -(1 + 1));
    }";
    let module = lower(src);
    let k = &module.kernels[0];
    let masks: Vec<String> = k
        .graph
        .topo_order()
        .into_iter()
        .filter(|&id| matches!(k.graph.node(id).op, Op::Mask { .. }))
        .map(|id| k.graph.node(id).op.to_string())
        .collect();
    assert_eq!(
        masks,
        [
            "mask (causal | (dilated(2, 3) & block(4))) fill=-inf",
            "mask global(1) fill=-1000000000.0",
            "mask window(0) fill=-4.0",
        ]
    );
}

// ---- errors -------------------------------------------------------------------------------

#[test]
fn unknown_names_suggest_a_close_one() {
    let src = "kernel f(query: f32[n, d]) -> f32[n, d] { return querry; }";
    let d = error(src);
    assert_eq!(d.message, "unknown name `querry`");
    assert_eq!(label_texts(src, &d), ["querry"]);
    assert!(d.notes.iter().any(|n| n.contains("`query`")), "{d:#?}");

    let d = error("kernel f(x: f32[n]) -> f32[n] { return exp(zzz); }");
    assert!(d.notes.is_empty());

    let d = error("kernel f(x: f32[n]) -> f32[n] { return softmx(x); }");
    assert_eq!(d.message, "unknown function `softmx`");
    assert!(d.notes.iter().any(|n| n.contains("`softmax`")));
}

#[test]
fn duplicate_parameters_and_kernels_name_both_places() {
    let src = "kernel f(x: f32[n], x: f32[n]) -> f32[n] { return x; }";
    let d = error(src);
    assert_eq!(d.message, "duplicate parameter `x`");
    assert_eq!(d.labels.len(), 2);
    assert_eq!(d.primary_span().map(|s| s.start), Some(20));
    assert_eq!(d.labels[1].span.start, 9);

    let src =
        "kernel f(x: f32[n]) -> f32[n] { return x; }\nkernel f(y: f32[n]) -> f32[n] { return y; }";
    let d = error(src);
    assert_eq!(d.message, "duplicate kernel `f`");
    assert!(d.primary_span().map(|s| s.start) > Some(40));
    assert_eq!(d.labels[1].span, Span::new(7, 8));
}

#[test]
fn parameters_and_lets_may_not_take_dimension_names() {
    let src = "kernel f(n: f32[n]) -> f32[n] { return n; }";
    let d = error(src);
    assert!(
        d.message.contains("same name as a dimension"),
        "{}",
        d.message
    );
    assert_eq!(d.labels.len(), 2);

    let src = "kernel f(x: f32[n, d]) -> f32[n, d] { let d = 2; return x * d; }";
    let d = error(src);
    assert!(d.message.contains("dimension symbol"), "{}", d.message);
}

#[test]
fn shadowing_is_allowed() {
    let module = lower(
        "kernel f(x: f32[n, d]) -> f32[n, 1] { let x = sum(x, 1); let x = exp(x); return x; }",
    );
    assert_eq!(output_shape(&module.kernels[0]), "[n, 1]");
    let module =
        lower("kernel f(x: f32[n, d]) -> f32[n, d] { let y = x; let x = y * 2; return x; }");
    assert_eq!(output_shape(&module.kernels[0]), "[n, d]");
}

#[test]
fn wrong_arity_names_function_expected_and_got() {
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return softmax(x, 1, 2); }");
    assert_eq!(d.message, "`softmax` takes 1 or 2 arguments but got 3");
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return exp(x, x); }");
    assert_eq!(d.message, "`exp` takes 1 argument but got 2");
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return maximum(x); }");
    assert_eq!(d.message, "`maximum` takes 2 arguments but got 1");
    let d = error("kernel f(x: f32[n, n]) -> f32[n, 1] { return sum(x); }");
    assert_eq!(d.message, "`sum` takes 2 arguments but got 1");
}

#[test]
fn axes_out_of_range_name_the_rank() {
    let src = "kernel f(x: f32[h, n, d]) -> f32[h, n, 1] { return sum(x, 3); }";
    let d = error(src);
    assert_eq!(
        d.message,
        "axis 3 of `sum` is out of range for an array of rank 3"
    );
    assert_eq!(label_texts(src, &d), ["3", "x"]);
    let d = error("kernel f(x: f32[h, n, d]) -> f32[h, n, d] { return softmax(x, -4); }");
    assert!(d.message.contains("axis -4") && d.message.contains("rank 3"));
    let d = error("kernel f(x: f32[n]) -> f32[n] { return softmax(2); }");
    assert!(d.message.contains("rank 0"), "{}", d.message);
    let d = error("kernel f(x: f32[n], y: f32[n]) -> f32[n] { return max(x, y); }");
    assert_eq!(d.message, "the axis of `max` must be an integer literal");
    assert!(d.notes.iter().any(|n| n.contains("maximum")));
    let d = error("kernel f(x: f32[n]) -> f32[1] { return mean(x, 0.5); }");
    assert!(d.message.contains("integer literal"));
}

#[test]
fn broadcast_mismatches_name_both_dimensions_and_operands() {
    let src = "kernel f(a: f32[h, n, d], b: f32[m, d]) -> f32[h, n, d] { return a + b; }";
    let d = error(src);
    assert_eq!(
        d.message,
        "cannot broadcast dimension `n` of the left operand with `m` of the right operand"
    );
    assert_eq!(label_texts(src, &d), ["a", "b"]);
    assert!(d.labels.iter().all(|l| !l.message.is_empty()));
    assert!(d.labels[0].message.contains("[h, n, d]"));
    assert!(d.labels[1].message.contains("[m, d]"));

    let d = error("kernel f(a: f32[n, 2], b: f32[n, 3]) -> f32[n, 3] { return maximum(a, b); }");
    assert_eq!(
        d.message,
        "cannot broadcast dimension `2` of the first argument with `3` of the second argument"
    );
    let d = error("kernel f(a: f32[n], b: f32[4]) -> f32[n] { return a * b; }");
    assert!(d.message.contains("`n`") && d.message.contains("`4`"));
}

#[test]
fn matmul_mismatches_name_both_dimensions() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d]) -> f32[h, n, n] { return q @ k; }";
    let d = error(src);
    assert!(
        d.message.contains("`d`") && d.message.contains("`n`"),
        "{}",
        d.message
    );
    assert_eq!(label_texts(src, &d), ["q", "k"]);

    let src = "kernel f(q: f32[h, n, d], k: f32[g, d, n]) -> f32[h, n, n] { return q @ k; }";
    let d = error(src);
    assert!(d.message.contains("batch dimension `h`") && d.message.contains("`g`"));
    assert!(d.labels[0].message.contains("[h, n, d]"));

    let d = error("kernel f(q: f32[d], k: f32[d, n]) -> f32[n] { return q @ k; }");
    assert!(d.message.contains("rank at least 2"), "{}", d.message);
    let d = error("kernel f(q: f32[d]) -> f32[d] { return q.T; }");
    assert!(d.message.contains("`.T`") && d.message.contains("rank 1"));
}

#[test]
fn return_type_mismatches_point_at_both() {
    let src = "kernel f(q: f32[h, n, d], k: f32[h, n, d]) -> f32[h, n, d] { return q @ k.T; }";
    let d = error(src);
    assert_eq!(
        d.message,
        "dimension 2 of the returned value is `n` but the return type declares `d`"
    );
    assert_eq!(label_texts(src, &d), ["q @ k.T", "d"]);

    let src = "kernel f(q: f32[n, d]) -> f32[n] { return q; }";
    let d = error(src);
    assert!(d.message.contains("rank 2") && d.message.contains("rank 1"));
    assert_eq!(label_texts(src, &d), ["q", "f32[n]"]);

    let d = error("kernel f(q: f32[n, d]) -> f32[n, e] { return q; }");
    assert_eq!(
        d.message,
        "dimension `e` of the return type does not appear in any parameter"
    );

    lower("kernel f(q: f32[n, 1]) -> f32[n, 1] { return sum(q, -1); }");
}

#[test]
fn bad_approximation_arguments() {
    let cases = [
        ("lowrank(r = 0)", "rank"),
        ("random_features(m = 0)", "features"),
        ("nystrom(m = 0)", "landmarks"),
        ("tol = 0", "tol"),
        ("tol = 2e6", "tol"),
    ];
    for (item, word) in cases {
        let src = format!("@approx({item})\nkernel f(x: f32[n]) -> f32[n] {{ return x; }}");
        let d = error(&src);
        assert!(d.message.contains(word), "{item}: {}", d.message);
        assert_eq!(text(&src, d.primary_span().unwrap_or_default()), item);
    }
    let src = "@approx(lowrank(r = 4), tol = 0.1, lowrank(r = 8))\nkernel f(x: f32[n]) -> f32[n] { return x; }";
    let d = error(src);
    assert_eq!(d.message, "`lowrank` is listed twice in `@approx`");
    assert_eq!(label_texts(src, &d), ["lowrank(r = 8)", "lowrank(r = 4)"]);
    let module = lower(
        "@approx(bf16, lowrank(r = 4), tol = 1e6)\nkernel f(x: f32[n]) -> f32[n] { return x; }",
    );
    assert_eq!(module.kernels[0].approx.len(), 3);
}

#[test]
fn patterns_and_expressions_in_the_wrong_place() {
    // Outside `mask`, a pattern word is a name: unknown here, with a note.
    let src = "kernel f(x: f32[n, n]) -> f32[n, n] { return softmax(causal); }";
    let d = error(src);
    assert_eq!(d.message, "unknown name `causal`");
    assert!(d.notes.iter().any(|n| n.contains("mask pattern")), "{d:?}");
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return relu(window(3)); }");
    assert_eq!(d.message, "`window` is a mask pattern, not a function");

    let src = "kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, x); }";
    let d = error(src);
    assert!(
        d.message.contains("expected a mask pattern"),
        "{}",
        d.message
    );

    // The fill is a constant expression: `causal` there is a name, not a number.
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, causal, causal); }");
    assert_eq!(
        d.message,
        "the fill value of `mask` must be a constant number"
    );
}

#[test]
fn pattern_words_name_kernels_parameters_and_lets() {
    let module = lower(
        "kernel window(causal: f32[n, n], block: f32[]) -> f32[n, n] {\n\
         let global = causal * block;\n\
         return mask(global, causal & window(2), -inf); }",
    );
    let k = &module.kernels[0];
    assert_eq!(k.name, "window");
    assert_eq!(k.params[1].shape, Vec::<Dim>::new());
    let masks: Vec<String> = k
        .graph
        .topo_order()
        .into_iter()
        .filter_map(|id| match &k.graph.node(id).op {
            Op::Mask { pattern, fill } => Some(format!("{pattern} {fill}")),
            _ => None,
        })
        .collect();
    assert_eq!(masks, ["(causal & window(2)) -inf"]);
}

#[test]
fn pattern_sizes_from_dimension_symbols() {
    let module =
        lower("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, window(w) | block(n)); }");
    let k = &module.kernels[0];
    let symbols = attnc_ir::bind::kernel_symbols(k);
    assert_eq!(symbols, ["n", "w"]);
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, window(x)); }");
    assert!(d.message.contains("size `x`"), "{}", d.message);
}

#[test]
fn bad_mask_arguments() {
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, dilated(2, 0)); }");
    assert!(d.message.contains("dilated"));
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, causal & block(0)); }");
    assert!(d.message.contains("block"));
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, causal, x); }");
    assert!(d.message.contains("constant"));
    let d = error("kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, causal, 0 / 0); }");
    assert!(d.message.contains("not a number"));
    let d = error("kernel f(x: f32[n]) -> f32[n] { return mask(x, causal); }");
    assert!(d.message.contains("rank at least 2"));
}

#[test]
fn fills_and_relpos_take_dimensions() {
    let module = lower("kernel f(x: f32[m, n]) -> f32[m, n] { return x + relpos(m, n) + ones(1, n) + zeros(m, 1); }");
    assert_eq!(output_shape(&module.kernels[0]), "[m, n]");
    let d = error("kernel f(x: f32[m, n]) -> f32[m, n] { return ones(x); }");
    assert!(
        d.message.contains("`x` is not a dimension symbol"),
        "{}",
        d.message
    );
    let d = error("kernel f(x: f32[m, n]) -> f32[m, n] { return zeros(1.5, n); }");
    assert!(d.message.contains("non-negative integers"));
    let d = error("kernel f(x: f32[m, n]) -> f32[m, n] { return relpos(m); }");
    assert_eq!(d.message, "`relpos` takes 2 arguments but got 1");
}

#[test]
fn errors_are_collected_across_statements_and_kernels() {
    let src = "
kernel f(x: f32[n, d]) -> f32[n, d] {
    let a = y;
    let b = a + 1;
    let c = x @ x;
    return a;
}
kernel g(x: f32[n]) -> f32[n] { return softmax(x, 2); }
kernel h(x: f32[n]) -> f32[n] { return x; }
";
    let errs = errors(src);
    let messages: Vec<&str> = errs.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert_eq!(messages[0], "unknown name `y`");
    assert!(messages[1].contains("matrix product"));
    assert!(messages[2].contains("axis 2"));
    for d in &errs {
        assert!(!d.message.ends_with('.'));
        assert!(!d.message.starts_with(char::is_uppercase));
    }
}

#[test]
fn error_count_is_capped() {
    let mut src = String::from("kernel f(x: f32[n]) -> f32[n] {\n");
    for i in 0..500 {
        src.push_str(&format!("    let a{i} = nope;\n"));
    }
    src.push_str("    return x;\n}\n");
    let errs = errors(&src);
    assert_eq!(errs.len(), attnc_ir::lower::MAX_ERRORS);
    assert!(errs[errs.len() - 1]
        .notes
        .iter()
        .any(|n| n.contains("too many errors")));
}

// ---- scale --------------------------------------------------------------------------------

/// Runs `f` on a thread with a 2 MiB stack, as the CLI's worst case.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no stack overflow")
}

#[test]
fn a_hundred_thousand_lets_lower_and_print() {
    let mut src = String::from("kernel f(x: f32[n, d]) -> f32[n, d] {\n    let a = x;\n");
    for _ in 0..100_000 {
        src.push_str("    let a = a + 1;\n");
    }
    src.push_str("    return a;\n}\n");
    let (file, diagnostics) = parse(&src);
    assert!(diagnostics.is_empty());
    let (nodes, printed, dot) = on_small_stack(move || {
        let module = lower_file(&file).expect("valid");
        let k = &module.kernels[0];
        (
            k.graph.len(),
            print_kernel(k).lines().count(),
            dot_kernel(k).len(),
        )
    });
    assert_eq!(nodes, 1 + 2 * 100_000);
    assert_eq!(printed, nodes + 2);
    assert!(dot > nodes);
}

#[test]
fn deep_expressions_lower_on_a_small_stack() {
    let depth = 250;
    let body = format!("{}x{}", "exp(".repeat(depth), ")".repeat(depth));
    let src = format!("kernel f(x: f32[n]) -> f32[n] {{ return {body}; }}");
    let (file, diagnostics) = parse(&src);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let len = on_small_stack(move || lower_file(&file).map(|m| m.kernels[0].graph.len()));
    assert_eq!(len.ok(), Some(depth + 1));
}

#[test]
fn a_long_pattern_union_lowers_to_a_shallow_tree_keeping_the_same_positions() {
    // A chain of `|` (or `&`) is one parser node of any length; lowering makes it a balanced
    // tree, so the JIT, the optimizer and the printers walk `⌈log₂ k⌉` levels.
    fn depth(p: &MaskPattern) -> usize {
        match p {
            MaskPattern::And(a, b) | MaskPattern::Or(a, b) => 1 + depth(a).max(depth(b)),
            _ => 0,
        }
    }
    fn pattern_of(src: String) -> MaskPattern {
        let (file, diagnostics) = parse(&src);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        on_small_stack(move || {
            let module = lower_file(&file).expect("valid");
            let k = &module.kernels[0];
            let pattern =
                k.graph
                    .topo_order()
                    .into_iter()
                    .find_map(|id| match &k.graph.node(id).op {
                        Op::Mask { pattern, .. } => Some(pattern.clone()),
                        _ => None,
                    });
            // Literal sizes only: the pattern resolves without bindings.
            let bindings = attnc_ir::Bindings::new();
            pattern
                .expect("a mask")
                .resolve(&bindings)
                .expect("literal sizes")
        })
    }
    let kernel =
        |p: &str| format!("kernel f(s: f32[n, n]) -> f32[n, n] {{ return mask(s, {p}); }}");
    let union: Vec<String> = (0..100_000u64)
        .map(|k| match k % 4 {
            0 => format!("dilated({}, {})", k % 3, 5 + k % 7),
            1 => format!("block({})", 2 + k % 9),
            2 => format!("global({})", k % 2),
            _ => format!("window({})", k % 2),
        })
        .collect();
    let intersection: Vec<String> = (0..100_000u64)
        .map(|k| match k % 3 {
            0 => "causal".to_string(),
            _ => format!("window({})", 1 + k % 11),
        })
        .collect();
    for (operands, op) in [(union, " | "), (intersection, " & ")] {
        let pattern = pattern_of(kernel(&operands.join(op)));
        assert_eq!(depth(&pattern), 17, "⌈log₂ 100000⌉ levels for{op}");
        // The same positions as the distinct operands one at a time: any of them (`|`), or
        // all of them (`&`).
        let distinct: std::collections::BTreeSet<&String> = operands.iter().collect();
        let leaves: Vec<MaskPattern> = distinct
            .into_iter()
            .map(|o| pattern_of(kernel(o)))
            .collect();
        let mut kept = 0;
        for i in 0..24 {
            for j in 0..24 {
                let keeps = |l: &MaskPattern| l.keeps(i, j, 24, 24);
                let want = if op == " | " {
                    leaves.iter().any(keeps)
                } else {
                    leaves.iter().all(keeps)
                };
                assert_eq!(pattern.keeps(i, j, 24, 24), want, "{op} at ({i}, {j})");
                kept += usize::from(want);
            }
        }
        assert!(kept > 24 && kept < 24 * 24, "{kept} positions kept for{op}");
    }
}

// ---- printers -----------------------------------------------------------------------------

#[test]
fn text_printer_golden() {
    let module = lower(LOCAL);
    let expected = "\
kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d]
  %0 = input q #0          : f32[h, n, d]
  %1 = input k #1          : f32[h, n, d]
  %2 = input v #2          : f32[h, n, d]
  %3 = transpose %1        : f32[h, d, n]
  %4 = matmul %0, %3       : f32[h, n, n]
  %5 = dim d               : f32[]
  %6 = sqrt %5             : f32[]
  %7 = div %4, %6          : f32[h, n, n]
  %8 = mask %7, (causal & window(256)), fill=-inf : f32[h, n, n]
  %9 = softmax %8, axis=2  : f32[h, n, n]
  %10 = matmul %9, %2      : f32[h, n, d]
  return %10
";
    assert_eq!(print_kernel(&module.kernels[0]), expected);
    assert_eq!(print_module(&module), expected);
}

#[test]
fn text_printer_shows_approximations_and_casts() {
    let module = lower(
        "@approx(random_features(m = 8, seed = 1), tol = 0.5)\nkernel p(x: f32[n]) -> f16[n] { return x; }",
    );
    let text = print_kernel(&module.kernels[0]);
    assert!(
        text.starts_with(
            "@approx(random_features(m = 8, seed = 1), tol = 0.5)\nkernel p(x: f32[n]) -> f16[n]\n"
        ),
        "{text}"
    );
    assert!(text.contains("%1 = cast %0, to=f16"), "{text}");
}

#[test]
fn dot_has_one_node_line_per_ir_node() {
    let module = lower(&format!("{LOCAL}{EXAMPLES}"));
    for k in &module.kernels {
        let dot = dot_kernel(k);
        assert!(dot.starts_with("digraph"), "{dot}");
        assert!(dot.trim_end().ends_with('}'));
        let node_lines = dot
            .lines()
            .filter(|l| {
                l.trim_start().starts_with('n') && l.contains("[label=") && !l.contains("->")
            })
            .count();
        assert_eq!(node_lines, k.graph.len(), "{}", k.name);
        let edges = dot.lines().filter(|l| l.contains("->")).count();
        assert_eq!(edges, k.graph.dag.edge_count());
        assert_eq!(dot.matches("peripheries=2").count(), 1);
    }
    let local = dot_kernel(&module.kernels[0]);
    assert!(local.contains("n0 -> n4 [label=\"0\"];"), "{local}");
    assert!(local.contains("n1 -> n3;"), "{local}");
}
