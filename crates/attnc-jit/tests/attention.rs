//! The fused attention kernel against the f64 interpreter.
//!
//! Each case parses a `.attn` program, lowers it, lets the optimizer choose the fused attention
//! op, builds the kernel's spec from that op, JIT-compiles only that kernel (its own JITModule with the host's ISA flags, FMA included)
//! and runs it over every batch entry and row. Bound: relative L2 error ≤ 1e-5 against the
//! interpreter (f16/bf16 inputs are rounded once and fed to both engines). Every case is also
//! run with several row splits, which must give bit-identical outputs.

use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, DType, Kernel, NodeId, Op};
use attnc_jit::kernels::attention::{define_attention, AttentionSpec};
use attnc_jit::plan::parameter_attention_spec;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::default_libcall_names;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

const REL_L2: f64 = 1e-5;

type AttnFn = unsafe extern "C" fn(*const *const u8, *mut f32, u64, u64, u64);

fn kernel_of(src: &str) -> Kernel {
    let (file, diags) = attnc_syntax::parse(src);
    assert!(diags.is_empty(), "parse errors: {diags:?}\n{src}");
    let module =
        attnc_ir::lower::lower_file(&file).unwrap_or_else(|d| panic!("lower: {d:?}\n{src}"));
    module.kernels.into_iter().next().expect("one kernel")
}

fn bindings(dims: &[(&str, u64)]) -> Bindings {
    dims.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

/// A deterministic xorshift generator of values in [-scale, scale].
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// One input: the bytes the kernel reads and the (rounded) values the interpreter reads.
struct Input {
    bytes: Vec<u8>,
    values: ArrayD<f64>,
}

fn make_input(shape: &[usize], dtype: DType, rng: &mut Rng, scale: f64) -> Input {
    let count: usize = shape.iter().product();
    let mut bytes = Vec::new();
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let x = (rng.next() * scale) as f32;
        match dtype {
            DType::F32 | DType::I32 => {
                bytes.extend_from_slice(&x.to_le_bytes());
                values.push(f64::from(x));
            }
            DType::F16 => {
                let h = half::f16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                values.push(f64::from(h.to_f32()));
            }
            DType::Bf16 => {
                let h = half::bf16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                values.push(f64::from(h.to_f32()));
            }
        }
    }
    // Keep at least 8 bytes so the pointer is valid for empty tensors too.
    bytes.resize(bytes.len().max(8), 0);
    Input {
        bytes,
        values: ArrayD::from_shape_vec(IxDyn(shape), values).expect("shape"),
    }
}

fn host_module() -> JITModule {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").expect("flag");
    flags.set("enable_verifier", "true").expect("flag");
    let isa = cranelift_native::builder()
        .expect("host isa")
        .finish(settings::Flags::new(flags))
        .expect("isa");
    JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()))
}

/// A compiled attention kernel with its module (kept alive).
struct Compiled {
    _module: JITModule,
    f: AttnFn,
    spec: AttentionSpec,
    clif: String,
}

/// The optimizer's form of `kernel` and its fused attention node, if it chose one.
fn fused(kernel: &Kernel, b: &Bindings) -> (Kernel, Option<NodeId>) {
    let optimized = attnc_opt::optimize(kernel, b, &Default::default()).kernel;
    let graph = &optimized.graph;
    let id = graph
        .topo_order()
        .into_iter()
        .find(|&id| matches!(graph.node(id).op, Op::Attention(_)));
    (optimized, id)
}

fn compile(kernel: &Kernel, b: &Bindings) -> Compiled {
    let (optimized, id) = fused(kernel, b);
    let id = id.expect("the optimizer chose a fused attention");
    let spec = parameter_attention_spec(&optimized, id, b).expect("spec");
    let mut module = host_module();
    let (id, clif) = define_attention(&mut module, &spec, "attn").expect("define");
    module.finalize_definitions().expect("finalize");
    let code = module.get_finalized_function(id);
    // SAFETY: `define_attention` compiled this function with the `AttnFn` ABI.
    let f = unsafe { std::mem::transmute::<*const u8, AttnFn>(code) };
    Compiled {
        _module: module,
        f,
        spec,
        clif,
    }
}

/// Runs the kernel over every batch entry with rows split at `cuts`.
fn run(c: &Compiled, inputs: &[Input], cuts: &[usize]) -> Vec<f32> {
    let spec = &c.spec;
    let mut out = vec![0.0f32; spec.batch_count() * spec.m * spec.dv];
    let ptrs: Vec<*const u8> = inputs.iter().map(|i| i.bytes.as_ptr()).collect();
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c < spec.m));
    bounds.push(spec.m);
    for b in 0..spec.batch_count() {
        for w in bounds.windows(2) {
            // SAFETY: every input buffer has its parameter's bound shape and dtype, `out` holds
            // the whole output, and `b` is in range.
            unsafe {
                (c.f)(
                    ptrs.as_ptr(),
                    out.as_mut_ptr(),
                    b as u64,
                    w[0] as u64,
                    w[1] as u64,
                )
            };
        }
    }
    out
}

fn rel_l2(got: &[f32], want: &ArrayD<f64>) -> f64 {
    attnc_ir::compare::compare(got.iter().map(|&g| f64::from(g)), want.iter().copied()).error()
}

/// Compiles `src` at `dims`, runs it on random inputs and compares with the interpreter.
/// Returns the compiled kernel for further checks.
fn check_with(src: &str, dims: &[(&str, u64)], seed: u64, scale: f64) -> Compiled {
    let kernel = kernel_of(src);
    let b = bindings(dims);
    let mut rng = Rng(seed | 1);
    let inputs: Vec<Input> = kernel
        .params
        .iter()
        .map(|p| {
            let shape = attnc_ir::dim::resolve_shape(&p.shape, &b).expect("bound");
            make_input(&shape, p.dtype, &mut rng, scale)
        })
        .collect();
    let values: Vec<ArrayD<f64>> = inputs.iter().map(|i| i.values.clone()).collect();
    let want = evaluate(&kernel, &b, &values).expect("interpreter");
    let c = compile(&kernel, &b);
    assert_eq!(want.len(), c.spec.batch_count() * c.spec.m * c.spec.dv);
    let got = run(&c, &inputs, &[]);
    let err = rel_l2(&got, &want);
    assert!(
        err <= REL_L2,
        "relative L2 error {err:e} > {REL_L2:e} for {dims:?}\n{src}"
    );
    for cuts in [vec![1], vec![2, 3, 7], vec![5, 6, 50]] {
        let split = run(&c, &inputs, &cuts);
        assert!(
            split
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "row split {cuts:?} changed the result\n{src}"
        );
    }
    c
}

fn check(src: &str, dims: &[(&str, u64)]) -> Compiled {
    check_with(src, dims, 0x9e37_79b9_7f4a_7c15, 1.0)
}

fn masked_src(pattern: &str) -> String {
    format!(
        "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {{
            return softmax(mask(q @ k.T / sqrt(d), {pattern})) @ v;
        }}"
    )
}

const DENSE: &str = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}";

#[test]
fn dense_square() {
    check(DENSE, &[("h", 2), ("m", 9), ("n", 9), ("d", 8), ("e", 8)]);
    check(
        DENSE,
        &[("h", 1), ("m", 113), ("n", 113), ("d", 40), ("e", 59)],
    );
}

#[test]
fn odd_sizes_from_the_quality_list() {
    check(
        DENSE,
        &[("h", 1), ("m", 203), ("n", 203), ("d", 111), ("e", 59)],
    );
    check(
        &masked_src("causal"),
        &[("h", 1), ("m", 203), ("n", 1023), ("d", 40), ("e", 3)],
    );
    check(
        &masked_src("window(17) | global(2)"),
        &[("h", 2), ("m", 113), ("n", 113), ("d", 1), ("e", 111)],
    );
}

#[test]
fn wide_heads_compile() {
    // Code size grows with d and dv only (tile bodies are unrolled over the depth).
    let start = std::time::Instant::now();
    check(
        &masked_src("causal"),
        &[("h", 1), ("m", 5), ("n", 9), ("d", 256), ("e", 256)],
    );
    eprintln!(
        "d = dv = 256: compiled and checked in {:?}",
        start.elapsed()
    );
}

#[test]
fn dense_decode_and_chunks() {
    check(DENSE, &[("h", 3), ("m", 1), ("n", 37), ("d", 3), ("e", 5)]);
    check(DENSE, &[("h", 2), ("m", 7), ("n", 33), ("d", 5), ("e", 1)]);
    check(DENSE, &[("h", 2), ("m", 13), ("n", 3), ("d", 9), ("e", 4)]);
}

#[test]
fn every_primitive_pattern() {
    for pattern in [
        "causal",
        "window(3)",
        "dilated(2, 3)",
        "global(2)",
        "block(4)",
        "block(3)",
        "window(0)",
        "dilated(5, 1)",
        "window(1000000000)",
        "dilated(3, 1000000000)",
        "dilated(1000000000, 2)",
        "block(1000000000)",
        "global(1000000000)",
        "global(0)",
    ] {
        let src = masked_src(pattern);
        check(&src, &[("h", 2), ("m", 21), ("n", 21), ("d", 7), ("e", 6)]);
        check(&src, &[("h", 1), ("m", 5), ("n", 23), ("d", 4), ("e", 9)]);
        check(&src, &[("h", 1), ("m", 19), ("n", 6), ("d", 4), ("e", 3)]);
        check(&src, &[("h", 1), ("m", 1), ("n", 18), ("d", 5), ("e", 4)]);
    }
}

#[test]
fn combined_patterns() {
    for pattern in [
        "causal & window(5)",
        "block(3) | global(1)",
        "(dilated(2, 2) | causal) & window(6)",
        "window(2) | dilated(3, 4)",
        "(causal & block(8)) | global(3)",
    ] {
        let src = masked_src(pattern);
        check(&src, &[("h", 2), ("m", 29), ("n", 29), ("d", 5), ("e", 7)]);
        check(&src, &[("h", 1), ("m", 11), ("n", 30), ("d", 8), ("e", 4)]);
        check(&src, &[("h", 1), ("m", 30), ("n", 11), ("d", 8), ("e", 4)]);
    }
}

#[test]
fn sparse_patterns_skip_tiles() {
    let c = check(
        &masked_src("window(2)"),
        &[("h", 1), ("m", 64), ("n", 64), ("d", 4), ("e", 4)],
    );
    assert!(c.spec.density() < 0.25, "density {}", c.spec.density());
    let c = check(
        &masked_src("causal"),
        &[("h", 1), ("m", 64), ("n", 64), ("d", 4), ("e", 4)],
    );
    assert!(c.spec.density() < 0.6, "density {}", c.spec.density());
}

#[test]
fn mask_inside_the_scale_is_hoisted() {
    let src = "kernel a(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        return softmax(mask(mask(q @ k.T, window(4)) * 0.5 / sqrt(d) - 1, causal)) @ v;
    }";
    let c = check(src, &[("h", 2), ("m", 13), ("n", 17), ("d", 5), ("e", 3)]);
    assert!(c.spec.mask.is_some());
    // Behind a negation the mask cannot move (-(-inf) = +inf): declined.
    let src = "kernel b(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        return softmax(-mask(q @ k.T, causal)) @ v;
    }";
    let kernel = kernel_of(src);
    let b = bindings(&[("h", 1), ("m", 4), ("n", 4), ("d", 4), ("e", 4)]);
    assert!(fused(&kernel, &b).1.is_none());
}

#[test]
fn alibi_bias() {
    let src = "kernel alibi(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, m, d] {
        let s = q @ k.T / sqrt(d) + slope * relpos(m, n);
        return softmax(mask(s, causal)) @ v;
    }";
    let c = check(src, &[("h", 3), ("m", 17), ("n", 17), ("d", 6)]);
    assert_eq!(c.spec.biases.len(), 1);
    let slope = &c.spec.biases[0];
    assert_eq!(
        (
            slope.batch_strides.as_slice(),
            slope.row_stride,
            slope.col_stride
        ),
        (&[1][..], 0, 0)
    );
    check(src, &[("h", 2), ("m", 3), ("n", 14), ("d", 5)]);
}

#[test]
fn bias_tensors() {
    // A full [h, m, n] bias, a per-key bias [n] and a per-query bias [m, 1].
    let src = "kernel b(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], b1: f32[h, m, n], b2: bf16[n], b3: f16[m, 1]) -> f32[h, m, e] {
        return softmax(q @ k.T * 0.3 + b1 - b2 * 2 + b3) @ v;
    }";
    let c = check(src, &[("h", 2), ("m", 9), ("n", 11), ("d", 5), ("e", 3)]);
    // b3 is constant along each row, which softmax ignores where it is finite; it stays a
    // bias, since a NaN or ±inf in it must still reach its row.
    assert_eq!(c.spec.biases.len(), 3);
}

#[test]
fn softcap() {
    let src = "kernel cap(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] {
        return softmax(30 * tanh(q @ k.T / 30)) @ v;
    }";
    check_with(src, &[("h", 2), ("m", 13), ("n", 13), ("d", 8)], 7, 6.0);
}

#[test]
fn other_unary_scores() {
    let src = "kernel u(q: f32[m, d], k: f32[n, d], v: f32[n, e]) -> f32[m, e] {
        let s = q @ k.T;
        return softmax(elu(s) + sigmoid(s) - log(abs(s) + 1) + sqrt(abs(s)) + relu(s) * rsqrt(abs(s) + 2) + maximum(s, 0.1) - minimum(s, exp(-s))) @ v;
    }";
    check(src, &[("m", 10), ("n", 13), ("d", 3), ("e", 5)]);
}

#[test]
fn grouped_query_broadcast() {
    let src = "kernel gqa(q: f32[h, m, d], k: f32[1, n, d], v: f32[1, n, d]) -> f32[h, m, d] {
        return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
    }";
    let c = check(src, &[("h", 4), ("m", 9), ("n", 9), ("d", 7)]);
    assert_eq!(c.spec.k.batch_strides, vec![0]);
    let src = "kernel gqa2(q: f32[b, h, m, d], k: f32[b, 1, n, d], v: f32[b, 1, n, d]) -> f32[b, h, m, d] {
        return softmax(q @ k.T / sqrt(d)) @ v;
    }";
    check(src, &[("b", 2), ("h", 3), ("m", 5), ("n", 6), ("d", 4)]);
}

#[test]
fn half_precision_inputs() {
    let src = "kernel hp(q: f32[h, m, d], k: f16[h, n, d], v: bf16[h, n, e]) -> f32[h, m, e] {
        return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
    }";
    check(src, &[("h", 2), ("m", 11), ("n", 11), ("d", 9), ("e", 6)]);
    let src = "kernel hp2(q: bf16[h, m, d], k: bf16[h, n, d], v: f16[h, n, e]) -> f32[h, m, e] {
        return softmax(q @ k.T / sqrt(d)) @ v;
    }";
    check(src, &[("h", 1), ("m", 5), ("n", 7), ("d", 4), ("e", 8)]);
}

#[test]
fn empty_dimensions() {
    let src = "kernel z(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        return softmax(q @ k.T * 0.5) @ v;
    }";
    check(src, &[("h", 2), ("m", 3), ("n", 0), ("d", 4), ("e", 3)]);
    check(src, &[("h", 2), ("m", 0), ("n", 5), ("d", 4), ("e", 3)]);
    check(src, &[("h", 2), ("m", 3), ("n", 5), ("d", 0), ("e", 3)]);
    check(src, &[("h", 2), ("m", 3), ("n", 5), ("d", 4), ("e", 0)]);
}

#[test]
fn fully_masked_rows_are_zero() {
    // More queries than keys under causal: the first m - n rows keep nothing.
    let c = check(
        &masked_src("causal"),
        &[("h", 1), ("m", 7), ("n", 3), ("d", 4), ("e", 5)],
    );
    let kernel = kernel_of(&masked_src("causal"));
    let _ = kernel;
    let inputs: Vec<Input> = [(vec![1, 7, 4]), vec![1, 3, 4], vec![1, 3, 5]]
        .iter()
        .map(|s| make_input(s, DType::F32, &mut Rng(5), 1.0))
        .collect();
    let out = run(&c, &inputs, &[]);
    assert!(out[..4 * 5].iter().all(|&x| x == 0.0), "{out:?}");
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn nan_semantics() {
    // NaN in K at key 5: rows that mask key 5 stay finite, rows that keep it become NaN.
    let src = masked_src("causal");
    let kernel = kernel_of(&src);
    let b = bindings(&[("h", 1), ("m", 9), ("n", 9), ("d", 4), ("e", 4)]);
    let c = compile(&kernel, &b);
    let mut rng = Rng(11);
    let mut inputs: Vec<Input> = [vec![1, 9, 4], vec![1, 9, 4], vec![1, 9, 4]]
        .iter()
        .map(|s| make_input(s, DType::F32, &mut rng, 1.0))
        .collect();
    let nan = f32::NAN.to_le_bytes();
    inputs[1].bytes[5 * 16..5 * 16 + 4].copy_from_slice(&nan);
    inputs[1].values[[0, 5, 0]] = f64::NAN;
    let values: Vec<ArrayD<f64>> = inputs.iter().map(|i| i.values.clone()).collect();
    let want = evaluate(&kernel, &b, &values).expect("interpreter");
    let got = run(&c, &inputs, &[]);
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g.is_nan(), w.is_nan(), "element {i}: {g} vs {w}");
        let row = i / 4;
        assert_eq!(g.is_nan(), row >= 5, "element {i}");
    }
}

#[test]
fn fuses_only_what_the_optimizer_proves() {
    let b = bindings(&[("h", 1), ("m", 4), ("n", 4), ("d", 4), ("e", 4)]);
    // A finite fill: skipped tiles would have to contribute exp(fill - max).
    let src = "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        return softmax(mask(q @ k.T, causal, -1000)) @ v;
    }";
    assert!(fused(&kernel_of(src), &b).1.is_none());
    // relpos broadcast over rows is not the aligned relpos of the score: a computed bias.
    let src = "kernel rp(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {
        return softmax(q @ k.T + relpos(1, n)) @ v;
    }";
    let b5 = bindings(&[("h", 2), ("m", 5), ("n", 7), ("d", 4), ("e", 3)]);
    let (optimized, id) = fused(&kernel_of(src), &b5);
    let id = id.expect("fused");
    let operands = optimized.graph.operands(id);
    assert_eq!(operands.len(), 4);
    assert!(matches!(optimized.graph.node(operands[3]).op, Op::RelPos));
    // Not an attention at all.
    let src = "kernel h(q: f32[m, d], k: f32[d, n]) -> f32[m, n] { return q @ k; }";
    let b = bindings(&[("m", 2), ("n", 3), ("d", 4)]);
    assert!(fused(&kernel_of(src), &b).1.is_none());
}

#[test]
fn clif_is_returned() {
    let c = check(
        &masked_src("window(1)"),
        &[("h", 1), ("m", 4), ("n", 4), ("d", 4), ("e", 4)],
    );
    assert!(c.clif.contains("function"), "{}", c.clif);
    assert!(c.clif.contains("fma"), "the score and P·V loops use fma");
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    let prim = prop::sample::select(vec![
        "causal".to_string(),
        "window(1)".to_string(),
        "window(4)".to_string(),
        "dilated(2, 3)".to_string(),
        "dilated(1, 2)".to_string(),
        "global(2)".to_string(),
        "block(3)".to_string(),
        "block(5)".to_string(),
    ]);
    prim.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} & {b})")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("({a} | {b})")),
        ]
    })
}

fn size() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![0u64, 1, 2, 3, 4, 5, 7, 9, 13, 17, 113])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn random_shapes_and_patterns(
        pattern in prop::option::of(pattern_strategy()),
        h in 1u64..3,
        m in size(),
        n in size(),
        d in size(),
        e in size(),
        seed in any::<u64>(),
    ) {
        let body = match &pattern {
            Some(p) => format!("mask(q @ k.T * 0.35, {p})"),
            None => "q @ k.T * 0.35".to_string(),
        };
        let src = format!(
            "kernel r(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {{
                return softmax({body}) @ v;
            }}"
        );
        check_with(&src, &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed, 1.0);
    }

    #[test]
    fn random_dtypes_biases_and_broadcasts(
        pattern in pattern_strategy(),
        kt in prop::sample::select(vec!["f32", "f16", "bf16"]),
        vt in prop::sample::select(vec!["f32", "f16", "bf16"]),
        kv_heads in prop::sample::select(vec!["h", "1"]),
        score in prop::sample::select(vec![
            "q @ k.T / sqrt(d)",
            "q @ k.T / sqrt(d) + slope * relpos(m, n)",
            "8 * tanh(q @ k.T / 8)",
            "q @ k.T * 0.2 + slope",
        ]),
        h in 1u64..4,
        m in size(),
        n in size(),
        d in prop::sample::select(vec![1u64, 3, 8, 13, 40]),
        e in size(),
        seed in any::<u64>(),
    ) {
        let src = format!(
            "kernel r(q: f32[h, m, d], k: {kt}[{kv_heads}, n, d], v: {vt}[{kv_heads}, n, e], slope: f32[h, 1, 1]) -> f32[h, m, e] {{
                return softmax(mask({score}, {pattern})) @ v;
            }}"
        );
        check_with(&src, &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed, 2.0);
    }
}

/// The calling thread's CPU time in seconds (Linux `/proc/thread-self/schedstat`).
fn thread_cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

/// Rough single-thread throughput (run with `--ignored --nocapture`); not a benchmark.
#[test]
#[ignore]
fn timing() {
    for (pattern, n, d) in [
        (None, 4096u64, 64u64),
        (Some("causal"), 4096, 64),
        (None, 1024u64, 64u64),
        (None, 1024, 16),
        (None, 1024, 128),
        (Some("causal"), 1024, 64),
        (Some("window(64)"), 4096, 64),
    ] {
        let src = match pattern {
            Some(p) => masked_src(p),
            None => DENSE.to_string(),
        };
        let kernel = kernel_of(&src);
        let b = bindings(&[("h", 1), ("m", n), ("n", n), ("d", d), ("e", d)]);
        let c = compile(&kernel, &b);
        let mut rng = Rng(3);
        let inputs: Vec<Input> = vec![vec![1, n as usize, d as usize]; 3]
            .iter()
            .map(|s| make_input(s, DType::F32, &mut rng, 1.0))
            .collect();
        // Several repetitions, each running the kernel enough times for about 4 GFLOP (the
        // CPU-time clock may tick only every few ms). The machine is shared: wall time, and the
        // thread's CPU time from /proc (time on a core, not waiting for one), median and best.
        let flops = 4.0 * (n * n * d) as f64 * c.spec.density();
        let inner = (4e9 / flops).ceil().max(1.0) as usize;
        let reps = 9;
        let mut times: Vec<(f64, f64)> = (0..reps)
            .map(|_| {
                let cpu0 = thread_cpu_secs();
                let start = std::time::Instant::now();
                for _ in 0..inner {
                    run(&c, &inputs, &[]);
                }
                let wall = start.elapsed().as_secs_f64() / inner as f64;
                let cpu = match (cpu0, thread_cpu_secs()) {
                    (Some(a), Some(b)) if b > a => (b - a) / inner as f64,
                    _ => wall,
                };
                (wall, cpu)
            })
            .collect();
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let wall = times[reps / 2].0;
        times.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (cpu_best, cpu) = (times[0].1, times[reps / 2].1);
        eprintln!(
            "{pattern:?} n={n} d={d} (visited density {:.3}): CPU time {:.2} ms = {:.2} GFLOP/s \
             (best {:.2}), wall {:.2} ms = {:.2} GFLOP/s",
            c.spec.density(),
            cpu * 1e3,
            flops / cpu / 1e9,
            flops / cpu_best / 1e9,
            wall * 1e3,
            flops / wall / 1e9,
        );
    }
}
