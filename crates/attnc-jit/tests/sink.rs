//! An attention sink, `softmax_sink(mask(scores), s) @ v`, is rewritten into the fused
//! attention, its log-sum-exp from the same pass and a row scale `sigmoid(lse − s)`, and
//! matches the interpreter: a sink per head or per row, causal with rows that keep no key
//! (m > n), m ≠ n, sizes off the tiles; no `m × n` buffer is planned.
mod common;

use attnc_jit::plan::{plan, StepKind};
use common::{bindings, check, kernel, optimized, REL_L2};
use proptest::prelude::*;

/// The sink program with `s` of shape `sink`.
fn sink(sink: &str) -> String {
    format!(
        "kernel t(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e], s: f32[{sink}]) -> f32[h, m, e] {{
    return softmax_sink(mask(q @ k.T / sqrt(d), causal), s) @ v;
}}"
    )
}

#[test]
fn the_sink_runs_in_the_fused_attention_with_no_scores_buffer() {
    let dims = [("h", 2), ("m", 300), ("n", 300), ("d", 16), ("e", 8)];
    let b = bindings(&dims);
    let p = plan(&optimized(&kernel(&sink("h, 1, 1")), &b), &b, true).expect("plans");
    let attentions = p
        .steps
        .iter()
        .filter(|s| matches!(s.kind, StepKind::Attention(_)))
        .count();
    assert_eq!(attentions, 1, "one fused attention:\n{p}");
    let largest = p.buffers.iter().map(|b| b.len).max().unwrap_or(0);
    assert!(largest < 300 * 300, "largest buffer {largest}:\n{p}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn sinks_per_head_and_per_row_match_the_interpreter(
        h in 1u64..3, m in 1u64..140, n in 1u64..140, d in 1u64..20, e in 1u64..10,
        per_row in any::<bool>(), seed in any::<u64>(),
    ) {
        let shape = if per_row { "h, m, 1" } else { "h, 1, 1" };
        let err = check(&sink(shape), &[("h", h), ("m", m), ("n", n), ("d", d), ("e", e)], seed % 1000);
        prop_assert!(err <= REL_L2, "{err:e}");
    }
}
