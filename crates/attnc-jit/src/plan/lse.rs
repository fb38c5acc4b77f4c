//! A fused attention and the log-sum-exp of its scores from one kernel pass.
//!
//! The optimizer writes `logsumexp(mask(score(Q Kᵀ)), -1)` beside `softmax(..) @ V` as an
//! attention node with `lse` set and the same operands. The online softmax already keeps each
//! row's running maximum `m` and sum `l`, so the pair is planned as one exact attention step
//! on the portable tier that also stores `(m, l)` per row after its output rows
//! ([`AttentionSpec::lse`]); two host steps then split that buffer: the rows of `O`, and
//! `m + ln(l)` per row (`-inf` where `l = 0`, a fully masked row). A log-sum-exp node without
//! a partner runs the same step and keeps only its statistics.

use super::fused::{attention_spec, attention_step};
use super::{plan_error, Planner, StepKind, Val};
use crate::error::Result;
use crate::kernels::attention::Precision;
use attnc_ir::{Attention, Kernel, NodeId, Op};
use std::collections::HashMap;

/// What a [`StepKind::Stats`] step takes from its one input, the output of an attention step
/// with row statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsPart {
    /// The first `len` elements: the attention's output rows.
    Rows {
        /// Elements copied.
        len: usize,
    },
    /// `m + ln(l)` of the `rows` `(m, l)` pairs starting at element `offset`.
    LogSumExp {
        /// Where the pairs start.
        offset: usize,
        /// How many rows.
        rows: usize,
    },
}

impl StatsPart {
    /// The step as plans print it.
    pub fn describe(&self) -> String {
        match self {
            StatsPart::Rows { len } => format!("attention rows ({len} f32, host copy)"),
            StatsPart::LogSumExp { rows, .. } => {
                format!("log-sum-exp of {rows} rows from the attention's max and sum (host)")
            }
        }
    }

    /// Computes the part from the attention step's output `src` (`None` when `src` is too
    /// short, which a plan never makes).
    pub fn run(&self, src: &[f32]) -> Option<Vec<f32>> {
        match *self {
            StatsPart::Rows { len } => src.get(..len).map(<[f32]>::to_vec),
            StatsPart::LogSumExp { offset, rows } => {
                let pairs = src.get(offset..offset.checked_add(rows.checked_mul(2)?)?)?;
                Some(pairs.chunks_exact(2).map(|p| lse(p[0], p[1])).collect())
            }
        }
    }
}

/// `m + ln(l)` in f64, rounded once; `-inf` for an empty row (`l = 0`, `m = -inf`), NaN
/// where either is NaN.
fn lse(m: f32, l: f32) -> f32 {
    if l == 0.0 {
        return f32::NEG_INFINITY;
    }
    (f64::from(m) + f64::from(l).ln()) as f32
}

/// The log-sum-exp nodes of a plan and their attentions.
pub(super) struct Pairs {
    /// Each node of a pair (either side) → its partner; an unpaired log-sum-exp → `None`.
    partner: HashMap<NodeId, Option<NodeId>>,
    /// Values already planned with their partner.
    done: HashMap<NodeId, Val>,
}

impl Pairs {
    /// Pairs every live log-sum-exp node with a live attention of the same operands, score,
    /// mask and precision.
    pub(super) fn find(kernel: &Kernel, live: &[bool]) -> Pairs {
        let graph = &kernel.graph;
        let attention = |id: NodeId| match &graph.node(id).op {
            Op::Attention(a) if live[id.index()] => Some(&**a),
            _ => None,
        };
        let mut partner = HashMap::new();
        for id in graph.topo_order() {
            let Some(l) = attention(id).filter(|a| a.lse) else {
                continue;
            };
            let operands = graph.operands(id);
            let found = graph.topo_order().into_iter().find(|&o| {
                attention(o).is_some_and(|a| {
                    !a.lse
                        && !partner.contains_key(&o)
                        && a.score == l.score
                        && a.mask == l.mask
                        && a.precision == l.precision
                        && graph.operands(o) == operands
                })
            });
            partner.insert(id, found);
            if let Some(o) = found {
                partner.insert(o, Some(id));
            }
        }
        Pairs {
            partner,
            done: HashMap::new(),
        }
    }

    /// Whether node `id` is a log-sum-exp or the attention paired with one.
    pub(super) fn involves(&self, id: NodeId) -> bool {
        self.partner.contains_key(&id)
    }

    /// Plans node `id` (`a` its attention) with its partner, or returns the value planned
    /// when the partner came first.
    pub(super) fn plan(
        &mut self,
        p: &mut Planner<'_>,
        id: NodeId,
        a: &Attention,
        vals: &[Option<Val>],
    ) -> Result<Val> {
        if let Some(v) = self.done.remove(&id) {
            return Ok(v);
        }
        if a.precision != Precision::Exact {
            let op = &p.kernel.graph.node(id).op;
            return Err(plan_error(
                op,
                "a fused log-sum-exp runs with exact products only",
            ));
        }
        let partner = self.partner.get(&id).copied().flatten();
        let mut spec = attention_spec(p, id, a, vals)?;
        spec.lse = true;
        let rows = spec.batch_count() * spec.m;
        let (offset, len) = (spec.stats_offset(), spec.stats_offset());
        let (stats, shape) = attention_step(p, spec)?;
        let mut lse_shape = shape.clone();
        if let Some(last) = lse_shape.last_mut() {
            *last = 1;
        }
        let part = |p: &mut Planner<'_>, part: StatsPart, shape: &[usize]| {
            let out = p.new_buffer(shape.iter().product());
            p.push(StepKind::Stats(part), vec![stats], out);
            Planner::leaf(out, shape)
        };
        let lse = part(p, StatsPart::LogSumExp { offset, rows }, &lse_shape);
        if !a.lse {
            let rows = part(p, StatsPart::Rows { len }, &shape);
            if let Some(other) = partner {
                self.done.insert(other, lse);
            }
            return Ok(rows);
        }
        if let Some(other) = partner {
            let rows = part(p, StatsPart::Rows { len }, &shape);
            self.done.insert(other, rows);
        }
        Ok(lse)
    }
}
