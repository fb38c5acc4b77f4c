//! Reductions over the last axis of f32 rows (`sum`, `mean`, `max`), which the full-width
//! tier runs on 16 lanes (`attnc-wide`'s `reduce`), against the f64 interpreter on every tier:
//! empty, short and long rows, more rows than one work item holds, NaN, −0 and −∞ in place;
//! threads 1 and 3 bit-identical (checked by `common::tiers::check`).
mod common;

use attnc_jit::plan::{plan_with, PlanOptions, StepKind};
use attnc_jit::wide::Tiers;
use common::tiers::check;
use common::{bindings, data, kernel, optimized};

const SOURCES: [&str; 3] = [
    "kernel s(x: f32[r, n]) -> f32[r, 1] { return sum(x, -1); }",
    "kernel m(x: f32[r, n]) -> f32[r, 1] { return mean(x, -1); }",
    "kernel x(x: f32[r, n]) -> f32[r, 1] { return max(x, -1); }",
];

/// Whether the plan of `src` at `dims` reduces rows on 16 lanes.
fn on_rows(src: &str, dims: &[(&str, u64)]) -> bool {
    let b = bindings(dims);
    let options = PlanOptions {
        fuse: true,
        tiers: Tiers::available(Tiers::ALL),
    };
    let plan = plan_with(&optimized(&kernel(src), &b), &b, &options).expect("plans");
    plan.steps
        .iter()
        .any(|s| matches!(s.kind, StepKind::RowReduce(..)))
}

#[test]
fn row_reductions_match_the_interpreter() {
    let wide = Tiers::available(Tiers::ALL).avx512;
    for (rows, n) in [(3usize, 0usize), (2, 1), (5, 17), (4, 300), (2100, 5)] {
        let dims = [("r", rows as u64), ("n", n as u64)];
        let mut x = data(rows * n, (rows + n) as u64);
        if n > 0 {
            x[n - 1] = f32::NAN;
            if rows > 2 {
                x[n..2 * n].fill(-0.0);
                x[2 * n..3 * n].fill(f32::NEG_INFINITY);
            }
        }
        for src in SOURCES {
            if wide && n > 0 {
                assert!(on_rows(src, &dims), "{src} at {dims:?} not on rows");
            }
            check(src, &dims, std::slice::from_ref(&x));
        }
    }
}
