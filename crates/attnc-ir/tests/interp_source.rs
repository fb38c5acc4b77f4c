//! The interpreter on programs written as `.attn` source (parsed and lowered), against the
//! independent loop reference: the LANGUAGE.md examples, negative axes, f16 returns, and a
//! 100,000-statement program on a 2 MiB stack.

use attnc_ir::bind::bind_shapes;
use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, Kernel, MaskPattern, Module};
use ndarray::{ArrayD, IxDyn};

mod interp_support;
use interp_support::{arr, assert_close, random, ref_attention, ref_keeps};

fn compile(src: &str) -> Module {
    let (file, diagnostics) = attnc_syntax::parse(src);
    assert!(diagnostics.is_empty(), "parse: {diagnostics:?}");
    match attnc_ir::lower::lower_file(&file) {
        Ok(module) => module,
        Err(errors) => panic!("lower: {errors:?}"),
    }
}

fn only(src: &str) -> Kernel {
    let mut module = compile(src);
    assert_eq!(module.kernels.len(), 1);
    module.kernels.remove(0)
}

fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let bindings = bind_shapes(kernel, &shapes, &Bindings::new()).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

#[test]
fn local_attention_from_source() {
    let kernel = only(
        "kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            let s = q @ k.T / sqrt(d);
            let s = mask(s, causal & window(2));
            return softmax(s) @ v;
        }",
    );
    let pattern = MaskPattern::And(
        Box::new(MaskPattern::Causal),
        Box::new(MaskPattern::Window(2)),
    );
    for (h, n, d) in [(2, 7, 3), (1, 1, 1), (3, 4, 5)] {
        let q = random(&[h, n, d], 1);
        let k = random(&[h, n, d], 2);
        let v = random(&[h, n, d], 3);
        let want = ref_attention(&q, &k, &v, Some(&pattern));
        assert_close(&run(&kernel, &[q, k, v]), &want, 1e-12);
    }
}

#[test]
fn every_pattern_from_source_with_end_alignment() {
    let cases = [
        ("causal", MaskPattern::Causal),
        ("window(1)", MaskPattern::Window(1)),
        ("dilated(2, 2)", MaskPattern::Dilated { w: 2, r: 2 }),
        ("global(1)", MaskPattern::Global(1)),
        ("block(2)", MaskPattern::Block(2)),
        (
            "block(3) | global(1)",
            MaskPattern::Or(
                Box::new(MaskPattern::Block(3)),
                Box::new(MaskPattern::Global(1)),
            ),
        ),
        (
            "causal & (window(2) | global(1))",
            MaskPattern::And(
                Box::new(MaskPattern::Causal),
                Box::new(MaskPattern::Or(
                    Box::new(MaskPattern::Window(2)),
                    Box::new(MaskPattern::Global(1)),
                )),
            ),
        ),
    ];
    for (text, pattern) in cases {
        let kernel = only(&format!(
            "kernel f(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, m, d] {{
                return softmax(mask(q @ k.T / sqrt(d), {text})) @ v;
            }}"
        ));
        for (m, n) in [(4, 4), (2, 6), (6, 2), (1, 5)] {
            let q = random(&[2, m, 3], 4);
            let k = random(&[2, n, 3], 5);
            let v = random(&[2, n, 3], 6);
            let want = ref_attention(&q, &k, &v, Some(&pattern));
            assert_close(&run(&kernel, &[q, k, v]), &want, 1e-12);
        }
    }
}

#[test]
fn decode_with_one_query() {
    let kernel = only(
        "kernel decode(q: f32[h, 1, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, 1, d] {
            return softmax(q @ k.T / sqrt(d)) @ v;
        }",
    );
    let q = random(&[3, 1, 4], 7);
    let k = random(&[3, 9, 4], 8);
    let v = random(&[3, 9, 4], 9);
    let want = ref_attention(&q, &k, &v, None);
    assert_close(&run(&kernel, &[q, k, v]), &want, 1e-12);
}

#[test]
fn alibi_relpos_and_broadcast_slope() {
    let kernel = only(
        "kernel alibi(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], slope: f32[h, 1, 1]) -> f32[h, n, d] {
            let s = q @ k.T / sqrt(d) + slope * relpos(n, n);
            return softmax(mask(s, causal)) @ v;
        }",
    );
    let (h, n, d) = (2, 5, 3);
    let q = random(&[h, n, d], 10);
    let k = random(&[h, n, d], 11);
    let v = random(&[h, n, d], 12);
    let slope = arr(&[h, 1, 1], vec![0.5, -0.25]);
    let got = run(&kernel, &[q.clone(), k.clone(), v.clone(), slope.clone()]);
    let mut want = ArrayD::zeros(IxDyn(&[h, n, d]));
    for hh in 0..h {
        for i in 0..n {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let dot: f64 = (0..d).map(|c| q[[hh, i, c]] * k[[hh, j, c]]).sum();
                    dot / (d as f64).sqrt() + slope[[hh, 0, 0]] * (j as f64 - i as f64)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                for c in 0..d {
                    want[[hh, i, c]] += (s - max).exp() / total * v[[hh, j, c]];
                }
            }
        }
    }
    assert_close(&got, &want, 1e-12);
}

#[test]
fn linear_attention_with_negative_axis() {
    let kernel = only(
        "kernel linear(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            let qf = elu(q) + 1;
            let kf = elu(k) + 1;
            return (qf @ kf.T @ v) / sum(qf @ kf.T, -1);
        }",
    );
    let (h, n, d) = (2, 4, 3);
    let q = random(&[h, n, d], 13);
    let k = random(&[h, n, d], 14);
    let v = random(&[h, n, d], 15);
    let feature = |x: f64| if x > 0.0 { x + 1.0 } else { x.exp() };
    let got = run(&kernel, &[q.clone(), k.clone(), v.clone()]);
    let mut want = ArrayD::zeros(IxDyn(&[h, n, d]));
    for hh in 0..h {
        for i in 0..n {
            let a: Vec<f64> = (0..n)
                .map(|j| {
                    (0..d)
                        .map(|c| feature(q[[hh, i, c]]) * feature(k[[hh, j, c]]))
                        .sum()
                })
                .collect();
            let total: f64 = a.iter().sum();
            for c in 0..d {
                let num: f64 = (0..n).map(|j| a[j] * v[[hh, j, c]]).sum();
                want[[hh, i, c]] = num / total;
            }
        }
    }
    assert_close(&got, &want, 1e-12);
}

#[test]
fn linformer_broadcast_matmul() {
    let kernel = only(
        "kernel linformer(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], e: f32[r, n], f: f32[r, n]) -> f32[h, n, d] {
            return softmax(q @ (e @ k).T / sqrt(d)) @ (f @ v);
        }",
    );
    let (h, n, d, r) = (2, 5, 3, 2);
    let q = random(&[h, n, d], 16);
    let k = random(&[h, n, d], 17);
    let v = random(&[h, n, d], 18);
    let e = random(&[r, n], 19);
    let f = random(&[r, n], 20);
    let project = |p: &ArrayD<f64>, x: &ArrayD<f64>| {
        ArrayD::from_shape_fn(IxDyn(&[h, r, d]), |ix| {
            (0..n)
                .map(|t| p[[ix[1], t]] * x[[ix[0], t, ix[2]]])
                .sum::<f64>()
        })
    };
    let want = ref_attention(&q, &project(&e, &k), &project(&f, &v), None);
    assert_close(&run(&kernel, &[q, k, v, e, f]), &want, 1e-12);
}

#[test]
fn gated_attention() {
    let kernel = only(
        "kernel gated(x: f32[n, e], wq: f32[e, d], wk: f32[e, d], wv: f32[e, d], wg: f32[e, d]) -> f32[n, d] {
            let a = softmax((x @ wq) @ (x @ wk).T / sqrt(d)) @ (x @ wv);
            return sigmoid(x @ wg) * a;
        }",
    );
    let (n, e, d) = (4, 5, 3);
    let x = random(&[n, e], 21);
    let w: Vec<ArrayD<f64>> = (0..4).map(|s| random(&[e, d], 22 + s)).collect();
    let proj = |w: &ArrayD<f64>| {
        ArrayD::from_shape_fn(IxDyn(&[1, n, d]), |ix| {
            (0..e).map(|t| x[[ix[1], t]] * w[[t, ix[2]]]).sum::<f64>()
        })
    };
    let a = ref_attention(&proj(&w[0]), &proj(&w[1]), &proj(&w[2]), None);
    let g = proj(&w[3]);
    let want = ArrayD::from_shape_fn(IxDyn(&[n, d]), |ix| {
        a[[0, ix[0], ix[1]]] / (1.0 + (-g[[0, ix[0], ix[1]]]).exp())
    });
    let mut inputs = vec![x];
    inputs.extend(w);
    assert_close(&run(&kernel, &inputs), &want, 1e-12);
}

#[test]
fn reductions_with_negative_axes_keep_dims() {
    let kernel = only(
        "kernel f(x: f32[a, b, c]) -> f32[a, 1, 1] {
            return max(sum(x, -1), -2) - mean(mean(x, 1), 2);
        }",
    );
    let x = random(&[3, 4, 5], 30);
    let got = run(&kernel, std::slice::from_ref(&x));
    let want = ArrayD::from_shape_fn(IxDyn(&[3, 1, 1]), |ix| {
        let a = ix[0];
        let row_sums: Vec<f64> = (0..4).map(|b| (0..5).map(|c| x[[a, b, c]]).sum()).collect();
        let max = row_sums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean: f64 = row_sums.iter().sum::<f64>() / 20.0;
        max - mean
    });
    assert_close(&got, &want, 1e-12);
}

#[test]
fn mask_fill_ones_zeros_and_f16_return() {
    let kernel = only(
        "kernel f(x: f32[m, n]) -> f16[m, n] {
            return mask(x, causal, -5) + ones(m, n) * 2 + zeros(m, n);
        }",
    );
    let x = arr(
        &[2, 3],
        vec![0.1, f64::NAN, f64::NAN, 1.0 / 3.0, 4.0, 1000.1],
    );
    let got = run(&kernel, &[x]);
    // m = 2, n = 3: i' = i + 1, so (0, 2) is masked; f16 rounding of each sum
    let f16 = |v: f64| half::f16::from_f32(v as f32).to_f64();
    let want = arr(
        &[2, 3],
        vec![
            f16(2.1),
            f64::NAN,
            -3.0,
            f16(1.0 / 3.0 + 2.0),
            6.0,
            f16(1002.1),
        ],
    );
    assert_close(&got, &want, 0.0);
    assert_eq!(got[[1, 2]], 1002.0); // f16 spacing is 1 at 1002
}

#[test]
fn nan_masked_away_from_source() {
    let kernel = only(
        "kernel f(s: f32[n, n], v: f32[n, d]) -> f32[n, d] {
            return softmax(mask(s, causal)) @ v;
        }",
    );
    let n = 5;
    let mut s = random(&[n, n], 40);
    for i in 0..n {
        for j in 0..n {
            if !ref_keeps(&MaskPattern::Causal, i, j, n, n) {
                s[[i, j]] = f64::NAN;
            }
        }
    }
    let got = run(&kernel, &[s, random(&[n, 2], 41)]);
    assert!(got.iter().all(|v| v.is_finite()));
}

#[test]
fn hundred_thousand_statements_on_small_stack() {
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let mut src = String::from("kernel f(x: f32[n]) -> f32[n] {\n");
            for _ in 0..100_000 {
                src.push_str("let x = x + 1;\n");
            }
            src.push_str("return x;\n}\n");
            let kernel = only(&src);
            let got = run(&kernel, &[arr(&[2], vec![0.0, -1.0])]);
            assert_eq!(got, arr(&[2], vec![100_000.0, 99_999.0]));
            drop(kernel);
        })
        .expect("spawn");
    handle.join().expect("deep program thread");
}
