//! `topk_blocks(g, k, b)` masks on the interpreter against an independently written loop:
//! ties, NaN and all-equal gates, k = 0 and k beyond the number of blocks, m ≠ n, lengths that
//! are not multiples of the block, combinations with static patterns, a gate computed from
//! pooled queries and keys, and the checker's messages for misuse.

use attnc_ir::bind::bind_shapes;
use attnc_ir::interp::evaluate;
use attnc_ir::{Bindings, Kernel};
use ndarray::{ArrayD, IxDyn};

fn lower(src: &str) -> Result<Kernel, String> {
    let (file, diagnostics) = attnc_syntax::parse(src);
    if !diagnostics.is_empty() {
        return Err(format!("{diagnostics:?}"));
    }
    attnc_ir::lower::lower_file(&file)
        .map(|mut m| m.kernels.remove(0))
        .map_err(|e| format!("{e:?}"))
}

fn run(kernel: &Kernel, inputs: &[ArrayD<f64>]) -> ArrayD<f64> {
    let shapes: Vec<Option<Vec<usize>>> = inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
    let bindings = bind_shapes(kernel, &shapes, &Bindings::new()).expect("bind");
    evaluate(kernel, &bindings, inputs).expect("evaluate")
}

/// Deterministic values in [-1, 1).
fn values(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 1.0
    })
}

/// Whether column `c` of `row` is among its `k` largest: fewer than `k` numbers beat it
/// (larger, or equal at a lower index); NaN neither wins nor beats.
fn chosen(row: &[f64], k: usize, c: usize) -> bool {
    if row[c].is_nan() {
        return false;
    }
    let beaten_by = (0..row.len())
        .filter(|&o| row[o] > row[c] || (row[o] == row[c] && o < c))
        .count();
    beaten_by < k
}

/// The kept set of `topk_blocks(g, k, b)` over `m × n` for a gate `g[r][c]`.
fn keeps(g: &[Vec<f64>], k: usize, b: usize, i: usize, j: usize) -> bool {
    chosen(&g[i / b], k, j / b)
}

fn gate(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64) -> (Vec<Vec<f64>>, ArrayD<f64>) {
    let g: Vec<Vec<f64>> = (0..rows)
        .map(|r| (0..cols).map(|c| f(r, c)).collect())
        .collect();
    let flat = g.iter().flatten().copied().collect();
    let array = ArrayD::from_shape_vec(IxDyn(&[rows, cols]), flat).expect("shape");
    (g, array)
}

#[test]
fn topk_blocks_keeps_the_largest_blocks_of_each_row_block() {
    let kernel = lower(
        "kernel k(x: f32[h, m, n], g: f32[r, c]) -> f32[h, m, n] {
            return mask(x, topk_blocks(g, 2, 3), -7);
        }",
    )
    .expect("lower");
    let gates: [&dyn Fn(usize, usize) -> f64; 5] = [
        &|r, c| ((r * 7 + c * 13) % 11) as f64,
        &|_, _| 1.0,
        &|r, c| if c % 2 == 0 { f64::NAN } else { (r + c) as f64 },
        &|r, c| if (r + c) % 3 == 0 { 0.5 } else { -0.0 },
        &|_, c| if c == 0 { f64::NEG_INFINITY } else { f64::NAN },
    ];
    for (m, n) in [(9usize, 9usize), (7, 10), (11, 4), (1, 8), (3, 3)] {
        let (rows, cols) = (m.div_ceil(3), n.div_ceil(3));
        for (which, f) in gates.iter().enumerate() {
            let (g, array) = gate(rows, cols, f);
            let x = values(&[2, m, n], 5);
            let got = run(&kernel, &[x.clone(), array]);
            for (e, (&have, &orig)) in got.iter().zip(x.iter()).enumerate() {
                let (i, j) = ((e / n) % m, e % n);
                let want = if keeps(&g, 2, 3, i, j) { orig } else { -7.0 };
                assert_eq!(have, want, "gate {which} {m}x{n} ({i}, {j})");
            }
        }
    }
}

#[test]
fn k_zero_keeps_nothing_and_k_past_the_blocks_keeps_every_number() {
    for (k, b) in [(0u64, 2usize), (5, 2), (1_000_000, 4), (u64::MAX, 1)] {
        let src = format!(
            "kernel k(x: f32[m, n], g: f32[r, c]) -> f32[m, n] {{
                return mask(x, topk_blocks(g, {k}, {b}), -7);
            }}"
        );
        let kernel = lower(&src).expect("lower");
        let (m, n) = (5usize, 7usize);
        let (g, array) = gate(m.div_ceil(b), n.div_ceil(b), |r, c| {
            if r == 1 && c == 0 {
                f64::NAN
            } else {
                (c as f64) - (r as f64)
            }
        });
        let x = values(&[m, n], 9);
        let got = run(&kernel, &[x.clone(), array]);
        for (e, (&have, &orig)) in got.iter().zip(x.iter()).enumerate() {
            let (i, j) = (e / n, e % n);
            let want = if keeps(&g, k.min(1000) as usize, b, i, j) {
                orig
            } else {
                -7.0
            };
            assert_eq!(have, want, "k {k} b {b} ({i}, {j})");
            if k == 0 {
                assert_eq!(have, -7.0);
            }
        }
    }
}

#[test]
fn combinations_with_static_patterns_and_batched_gates() {
    let kernel = lower(
        "kernel k(x: f32[h, m, n], g: f32[h, r, c]) -> f32[h, m, n] {
            return mask(x, topk_blocks(g, 1, 4) & causal | block(4), -7);
        }",
    )
    .expect("lower");
    for (m, n) in [(10usize, 10usize), (6, 13), (13, 6)] {
        let (rows, cols) = (m.div_ceil(4), n.div_ceil(4));
        let gs: Vec<Vec<Vec<f64>>> = (0..2)
            .map(|h| {
                (0..rows)
                    .map(|r| {
                        (0..cols)
                            .map(|c| ((h + r * 5 + c * 3) % 4) as f64)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let flat: Vec<f64> = gs.iter().flatten().flatten().copied().collect();
        let array = ArrayD::from_shape_vec(IxDyn(&[2, rows, cols]), flat).expect("shape");
        let x = values(&[2, m, n], 13);
        let got = run(&kernel, &[x.clone(), array]);
        for (e, (&have, &orig)) in got.iter().zip(x.iter()).enumerate() {
            let (h, i, j) = (e / (m * n), (e / n) % m, e % n);
            let ia = i as i64 + n as i64 - m as i64;
            let block = ia >= 0 && ia as usize / 4 == j / 4;
            let kept = (keeps(&gs[h], 1, 4, i, j) && j as i64 <= ia) || block;
            assert_eq!(
                have,
                if kept { orig } else { -7.0 },
                "{m}x{n} ({h}, {i}, {j})"
            );
        }
    }
}

#[test]
fn attention_over_blocks_chosen_by_pooled_queries_and_keys() {
    let kernel = lower(
        "kernel k(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
            let g = mean_pool(q, 2) @ mean_pool(k, 2).T;
            return softmax(mask(q @ k.T / sqrt(d), topk_blocks(g, 1, 2) & causal | block(2))) @ v;
        }",
    )
    .expect("lower");
    let (h, n, d) = (2, 7, 3);
    let (q, k, v) = (
        values(&[h, n, d], 1),
        values(&[h, n, d], 2),
        values(&[h, n, d], 3),
    );
    let got = run(&kernel, &[q.clone(), k.clone(), v.clone()]);
    let blocks = n.div_ceil(2);
    for b in 0..h {
        // The pooled gate, written out: means over rows 2r, 2r + 1 (the last block alone).
        let pool = |x: &ArrayD<f64>, r: usize, c: usize| {
            let rows: Vec<usize> = (2 * r..(2 * r + 2).min(n)).collect();
            rows.iter().map(|&i| x[[b, i, c]]).sum::<f64>() / rows.len() as f64
        };
        let g: Vec<Vec<f64>> = (0..blocks)
            .map(|r| {
                (0..blocks)
                    .map(|c| (0..d).map(|e| pool(&q, r, e) * pool(&k, c, e)).sum())
                    .collect()
            })
            .collect();
        for i in 0..n {
            let keys: Vec<usize> = (0..n)
                .filter(|&j| (keeps(&g, 1, 2, i, j) && j <= i) || i / 2 == j / 2)
                .collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..d).map(|c| q[[b, i, c]] * k[[b, j, c]]).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                let want: f64 = keys
                    .iter()
                    .zip(&scores)
                    .map(|(&j, s)| (s - max).exp() / total * v[[b, j, c]])
                    .sum();
                assert!((got[[b, i, c]] - want).abs() < 1e-9, "{b} {i} {c}");
            }
        }
    }
}

#[test]
fn misuse_of_topk_blocks_is_a_located_error() {
    let cases = [
        // a gate of the wrong shape names the gate and the dimension
        (
            "kernel k(x: f32[8, 8], g: f32[4, 3]) -> f32[8, 8] { return mask(x, topk_blocks(g, 1, 2)); }",
            "dimension 1 of the gate `g` is `3`, but blocks of 2 make `4` key blocks",
        ),
        (
            "kernel k(x: f32[8, 8], g: f32[4]) -> f32[8, 8] { return mask(x, topk_blocks(g, 1, 2)); }",
            "rank at least 2",
        ),
        (
            "kernel k(x: f32[2, 8, 8], g: f32[3, 4, 4]) -> f32[2, 8, 8] { return mask(x, topk_blocks(g, 1, 2)); }",
            "leading dimensions of the gate `g`",
        ),
        // block size 0
        (
            "kernel k(x: f32[8, 8], g: f32[4, 4]) -> f32[8, 8] { return mask(x, topk_blocks(g, 1, 0)); }",
            "block size of `topk_blocks(g, k, b)` must be at least 1",
        ),
        // an i32 gate, an unknown gate
        (
            "kernel k(x: f32[8, 8], g: i32[4, 4]) -> f32[8, 8] { return mask(x, topk_blocks(g, 1, 2)); }",
            "needs a float gate",
        ),
        (
            "kernel k(x: f32[8, 8]) -> f32[8, 8] { return mask(x, topk_blocks(g, 1, 2)); }",
            "`g` is not a parameter or `let`",
        ),
        // sizes are integers
        (
            "kernel k(x: f32[8, 8], g: f32[4, 4]) -> f32[8, 8] { return mask(x, topk_blocks(g, k, 2)); }",
            "number of key blocks kept",
        ),
        (
            "kernel k(x: f32[8, 8], g: f32[4, 4]) -> f32[8, 8] { return mask(x, topk_blocks(g, -1, 2)); }",
            "",
        ),
    ];
    for (src, want) in cases {
        let err = lower(src).expect_err(src);
        assert!(err.contains(want), "{src}: {err}");
    }
}

#[test]
fn a_gate_of_the_wrong_size_is_an_error_naming_the_input_and_axis() {
    let kernel = lower(
        "kernel k(x: f32[h, m, n], g: f32[h, r, c]) -> f32[h, m, n] {
            return mask(x, topk_blocks(g, 1, 4), -7);
        }",
    )
    .expect("sizes with symbols are checked once bound");
    let x = values(&[2, 8, 9], 1);
    let run = |g: &[usize]| {
        let inputs = [x.clone(), values(g, 2)];
        let shapes: Vec<Option<Vec<usize>>> =
            inputs.iter().map(|a| Some(a.shape().to_vec())).collect();
        // Binding checks the node shapes, the gate's among them.
        let bindings =
            bind_shapes(&kernel, &shapes, &Bindings::new()).map_err(|e| e.to_string())?;
        evaluate(&kernel, &bindings, &inputs)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(run(&[2, 2, 3]).is_ok());
    let err = run(&[2, 3, 3]).expect_err("three row blocks");
    assert!(
        err.contains("input `g` axis 1 has size 3") && err.contains("over 8 queries needs 2"),
        "{err}"
    );
    let err = run(&[2, 2, 2]).expect_err("two key blocks");
    assert!(
        err.contains("axis 2") && err.contains("over 9 keys needs 3"),
        "{err}"
    );
}

#[test]
fn topk_blocks_is_a_name_outside_patterns() {
    let kernel = lower(
        "kernel topk_blocks(topk_blocks: f32[n, n]) -> f32[n, n] { return topk_blocks * 2; }",
    )
    .expect("contextual keyword");
    let x = values(&[3, 3], 1);
    assert_eq!(run(&kernel, std::slice::from_ref(&x)), x * 2.0);
}
