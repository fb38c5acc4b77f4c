//! Binding dimension symbols: every `BindError` variant and its message.

use attnc_ir::bind::{bind_shapes, kernel_symbols, resolve_node_shapes, unused_symbols, BindError};
use attnc_ir::{BinaryOp, Bindings, DType, Dim, Graph, Kernel, Node, NodeId, Op, Param, UnaryOp};
use attnc_syntax::Span;

fn shape(spec: &str) -> Vec<Dim> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u64>() {
            Ok(v) => Dim::Const(v),
            Err(_) => Dim::Sym(s.to_string()),
        })
        .collect()
}

/// A kernel with the given parameters (one input node each) and optionally one extra
/// operand-free node `(shape, op)` as its output; otherwise the first input is the output.
fn kernel(params: &[(&str, &str)], extra: Option<(&str, Op)>) -> Kernel {
    let mut graph = Graph::new();
    let mut ids = Vec::new();
    let mut ps = Vec::new();
    for (index, (name, spec)) in params.iter().enumerate() {
        ps.push(Param {
            name: name.to_string(),
            dtype: DType::F32,
            shape: shape(spec),
            span: Span::default(),
        });
        ids.push(graph.add(
            node(
                Op::Input {
                    index,
                    name: name.to_string(),
                },
                spec,
            ),
            &[],
        ));
    }
    let mut output = ids[0];
    if let Some((spec, op)) = extra {
        output = graph.add(node(op, spec), &[]);
    }
    Kernel {
        name: "attn".to_string(),
        params: ps,
        graph,
        output,
        ret_dtype: DType::F32,
        extra_outputs: Vec::new(),
        approx: vec![],
        span: Span::default(),
    }
}

fn node(op: Op, spec: &str) -> Node {
    Node {
        op,
        shape: shape(spec),
        dtype: DType::F32,
        span: Span::default(),
    }
}

fn binds(pairs: &[(&str, u64)]) -> Bindings {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

fn qkv() -> Kernel {
    kernel(&[("q", "h,m,d"), ("k", "h,n,d"), ("v", "h,n,d")], None)
}

#[test]
fn binds_from_inputs_and_given() {
    let k = qkv();
    let got = bind_shapes(
        &k,
        &[Some(vec![2, 3, 4]), Some(vec![2, 5, 4]), None],
        &binds(&[("unused", 9)]),
    )
    .expect("bind");
    assert_eq!(got, binds(&[("h", 2), ("m", 3), ("n", 5), ("d", 4)]));
    // Nothing provided: everything from --shape.
    let given = binds(&[("h", 1), ("m", 2), ("n", 3), ("d", 4), ("x", 5)]);
    let got = bind_shapes(&k, &[None, None, None], &given).expect("bind");
    assert_eq!(got, binds(&[("h", 1), ("m", 2), ("n", 3), ("d", 4)]));
    // A given value that agrees with an input is fine.
    let got = bind_shapes(&k, &[Some(vec![1, 2, 4]), None, None], &given).expect("bind");
    assert_eq!(got["n"], 3);
    assert_eq!(unused_symbols(&k, &given), ["x"]);
    assert_eq!(kernel_symbols(&k), ["h", "m", "d", "n"]);
}

#[test]
fn input_count() {
    let err = bind_shapes(&qkv(), &[None, None], &Bindings::new()).unwrap_err();
    assert_eq!(
        err,
        BindError::InputCount {
            kernel: "attn".into(),
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "kernel `attn` takes 3 inputs but 2 were given"
    );
}

#[test]
fn rank_mismatch() {
    let err = bind_shapes(&qkv(), &[None, Some(vec![2, 3]), None], &Bindings::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `k` has rank 2 but is declared [h, n, d] with rank 3"
    );
    assert!(matches!(
        err,
        BindError::RankMismatch {
            expected: 3,
            got: 2,
            ..
        }
    ));
}

#[test]
fn dim_conflict_names_both_places() {
    let err = bind_shapes(
        &qkv(),
        &[
            Some(vec![2, 3, 4]),
            Some(vec![2, 5, 4]),
            Some(vec![2, 6, 4]),
        ],
        &Bindings::new(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        BindError::DimConflict {
            symbol: "n".into(),
            first_input: "k".into(),
            first_axis: 1,
            first_value: 5,
            second_input: "v".into(),
            second_axis: 1,
            second_value: 6,
        }
    );
    assert_eq!(
        err.to_string(),
        "dimension `n` is 5 from input `k` axis 1 but 6 from input `v` axis 1"
    );
    // The same symbol twice in one input.
    let sq = kernel(&[("x", "n,n")], None);
    let err = bind_shapes(&sq, &[Some(vec![3, 4])], &Bindings::new()).unwrap_err();
    assert!(matches!(
        err,
        BindError::DimConflict {
            first_axis: 0,
            second_axis: 1,
            ..
        }
    ));
}

#[test]
fn literal_mismatch() {
    let k = kernel(&[("q", "h,1,d")], None);
    let err = bind_shapes(&k, &[Some(vec![2, 3, 4])], &Bindings::new()).unwrap_err();
    assert_eq!(
        err,
        BindError::LiteralMismatch {
            input: "q".into(),
            axis: 1,
            expected: 1,
            got: 3
        }
    );
    assert_eq!(
        err.to_string(),
        "input `q` axis 1 has size 3 but its type declares 1"
    );
    assert!(bind_shapes(&k, &[Some(vec![2, 1, 4])], &Bindings::new()).is_ok());
}

#[test]
fn given_conflicts_with_input() {
    let err = bind_shapes(
        &qkv(),
        &[Some(vec![2, 3, 4]), None, None],
        &binds(&[("d", 8), ("n", 3)]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "--shape d=8 contradicts input `q` axis 2, which gives `d` = 4"
    );
    assert!(matches!(
        err,
        BindError::GivenConflict {
            given: 8,
            got: 4,
            axis: 2,
            ..
        }
    ));
}

#[test]
fn unbound_symbol() {
    let err =
        bind_shapes(&qkv(), &[Some(vec![2, 3, 4]), None, None], &Bindings::new()).unwrap_err();
    assert_eq!(err, BindError::Unbound { symbol: "n".into() });
    assert_eq!(
        err.to_string(),
        "dimension `n` is not bound: pass --shape n=<size> or an input that has it"
    );
    // A symbol only a node uses (ones(r)).
    let k = kernel(&[("x", "n")], Some(("r", Op::Fill { value: 1.0 })));
    let err = bind_shapes(&k, &[Some(vec![2])], &Bindings::new()).unwrap_err();
    assert_eq!(err, BindError::Unbound { symbol: "r".into() });
    assert!(bind_shapes(&k, &[Some(vec![2])], &binds(&[("r", 3)])).is_ok());
}

#[test]
fn shape_product_overflow() {
    let k = qkv();
    let big = 1u64 << 22;
    let err = bind_shapes(
        &k,
        &[None, None, None],
        &binds(&[("h", big), ("m", big), ("n", 1), ("d", big)]),
    )
    .unwrap_err();
    assert!(matches!(err, BindError::Overflow { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "input `q` would have shape [h, m, d] = [4194304, 4194304, 4194304]: too many elements \
         to hold; the dimension d = 4194304 is too large"
    );
    // Overflow in an intermediate node only: q @ k.T is [n, n].
    let mut k = kernel(&[("q", "n,d")], None);
    let s = k
        .graph
        .add(node(Op::MatMul, "n,n"), &[NodeId::new(0), NodeId::new(0)]);
    k.output = s;
    let err = bind_shapes(&k, &[None], &binds(&[("n", 1 << 33), ("d", 1)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node %1 (matmul) would have shape [n, n] = [8589934592, 8589934592]: too many elements \
         to hold; the dimension n = 8589934592 is too large"
    );
    // u64::MAX and a zero: still rejected (ndarray refuses such shapes), never a panic.
    let err = bind_shapes(&k, &[None], &binds(&[("n", u64::MAX), ("d", 0)])).unwrap_err();
    assert!(matches!(err, BindError::Overflow { .. }), "{err}");
    // Zero-size dims are fine.
    assert!(bind_shapes(&k, &[None], &binds(&[("n", 0), ("d", 0)])).is_ok());
}

#[test]
fn zero_dim_used_as_number() {
    // q / sqrt(d) with d = 0
    let mut k = kernel(&[("q", "n,d")], None);
    let d = k
        .graph
        .add(node(Op::DimValue(Dim::Sym("d".into())), ""), &[]);
    let r = k.graph.add(node(Op::Unary(UnaryOp::Sqrt), ""), &[d]);
    let y = k
        .graph
        .add(node(Op::Binary(BinaryOp::Div), "n,d"), &[NodeId::new(0), r]);
    k.output = y;
    let err = bind_shapes(&k, &[Some(vec![3, 0])], &Bindings::new()).unwrap_err();
    assert_eq!(err, BindError::ZeroDimAsNumber { symbol: "d".into() });
    assert_eq!(
        err.to_string(),
        "dimension `d` is 0 but is used as a number (e.g. sqrt(d))"
    );
    assert!(bind_shapes(&k, &[Some(vec![0, 2])], &Bindings::new()).is_ok());
}

#[test]
fn node_shapes_by_index() {
    let mut k = kernel(&[("q", "n,d")], None);
    let t = k.graph.add(node(Op::Transpose, "d,n"), &[NodeId::new(0)]);
    let one = k.graph.add(node(Op::Fill { value: 1.0 }, "1,n"), &[]);
    k.output = k
        .graph
        .add(node(Op::Binary(BinaryOp::Add), "d,n"), &[t, one]);
    let shapes = resolve_node_shapes(&k, &binds(&[("n", 3), ("d", 2)])).expect("resolve");
    assert_eq!(shapes, vec![vec![3, 2], vec![2, 3], vec![1, 3], vec![2, 3]]);
}

#[test]
fn pattern_sizes_bind_from_given_values_or_say_they_are_unbound() {
    let src = "kernel f(x: f32[n, n]) -> f32[n, n] { return mask(x, causal & window(w) | dilated(2, r)); }";
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let module = attnc_ir::lower::lower_file(&file).expect("checks");
    let k = &module.kernels[0];
    let bound = bind_shapes(k, &[Some(vec![5, 5])], &binds(&[("w", 2), ("r", 3)])).expect("binds");
    assert_eq!(bound["w"], 2);
    let err = bind_shapes(k, &[Some(vec![5, 5])], &binds(&[("r", 3)])).unwrap_err();
    assert_eq!(err, BindError::Unbound { symbol: "w".into() });
    let err = bind_shapes(k, &[Some(vec![5, 5])], &binds(&[("w", 1), ("r", 0)])).unwrap_err();
    assert!(err.to_string().contains("stride"), "{err}");
    // Evaluated with the bound window: row 4 keeps keys 2..=4 of `window(2)` & causal.
    let x = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[5, 5]), 1.0);
    let out = attnc_ir::interp::evaluate(k, &bound, &[x]).expect("runs");
    let row: Vec<bool> = (0..5).map(|j| out[[4, j]] == 1.0).collect();
    // dilated(2, 3) also keeps j = 4 - 3 = 1.
    assert_eq!(row, [false, true, true, true, true]);
}
