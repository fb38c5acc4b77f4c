//! Equality saturation with explicit limits: a `Runner` with iteration, node and time limits
//! set before `run`, egg's `BackoffScheduler` (so a rule that matches explosively is banned
//! for a while instead of flooding the graph), and explanations (when asked for) so the path from the
//! input to the chosen form can be shown rule by rule.
//!
//! Stopping on a limit is an ordinary outcome ([`StopReason`]), never an error: the e-graph
//! still contains the input, so extraction always has a valid answer. Explanations are
//! optional: they cost time exponential in the sharing of the program (see `trace`). egg's limits are soft
//! (they are checked between iterations), which is why the scheduler's match limit matters.

use crate::analysis::{AttnGraph, ShapeAnalysis};
use crate::lang::Attn;
use crate::rules::AttnRewrite;
use crate::schedule::{RuleClock, RuleTime, TimedScheduler};
use egg::{BackoffScheduler, Id, RecExpr, Runner};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Starts, once per process and on a thread of its own, the calibration of the clock egg's
/// runner reads (the `quanta` crate measures the CPU's time-stamp counter against the system
/// clock for 500 or more rounds of a microsecond before its first reading). Started when a
/// program begins, it runs beside the reading of the inputs rather than inside the first
/// saturation; a saturation that starts before it ends waits for it.
pub fn prepare_clock() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("attnc-clock".into())
            .spawn(|| std::hint::black_box(quanta::Instant::now()));
        // Without a thread the first saturation calibrates it itself.
        drop(spawned);
    });
}

/// The limits of one saturation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Limits {
    /// At most this many iterations.
    pub iterations: usize,
    /// Stop once the e-graph has more e-nodes than this (checked between iterations).
    pub nodes: usize,
    /// Stop after this much wall time (keep it generous in tests: results should not depend
    /// on it).
    pub time: Duration,
    /// The scheduler's initial per-rule match limit per iteration.
    pub match_limit: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            iterations: 32,
            nodes: 20_000,
            time: Duration::from_secs(2),
            match_limit: 1_000,
        }
    }
}

/// Why saturation stopped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum StopReason {
    /// No rule found anything new: every equivalent form the rules reach is in the graph.
    Saturated,
    /// The iteration limit was reached after this many iterations.
    IterationLimit(usize),
    /// The e-graph grew past the node limit (it had this many e-nodes).
    NodeLimit(usize),
    /// The time limit was reached (after this many seconds).
    TimeLimit(f64),
    /// Something else stopped the runner.
    Other(String),
}

impl StopReason {
    /// True when a limit, not saturation, ended the run.
    pub fn hit_limit(&self) -> bool {
        !matches!(self, StopReason::Saturated)
    }

    /// Converts egg's reason.
    fn from_egg(reason: Option<&egg::StopReason>) -> StopReason {
        match reason {
            Some(egg::StopReason::Saturated) => StopReason::Saturated,
            Some(egg::StopReason::IterationLimit(n)) => StopReason::IterationLimit(*n),
            Some(egg::StopReason::NodeLimit(n)) => StopReason::NodeLimit(*n),
            Some(egg::StopReason::TimeLimit(s)) => StopReason::TimeLimit(*s),
            Some(egg::StopReason::Other(s)) => StopReason::Other(s.clone()),
            None => StopReason::Other("the runner did not say why it stopped".into()),
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Saturated => f.write_str("saturated"),
            StopReason::IterationLimit(n) => write!(f, "iteration limit ({n} iterations)"),
            StopReason::NodeLimit(n) => write!(f, "node limit ({n} e-nodes)"),
            StopReason::TimeLimit(s) => write!(f, "time limit ({s:.3} s)"),
            StopReason::Other(s) => write!(f, "stopped: {s}"),
        }
    }
}

/// How often one rule applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCount {
    /// The rule's name.
    pub rule: String,
    /// How many matches it newly applied.
    pub count: usize,
}

/// Statistics of one iteration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IterationStats {
    /// The iteration number, from 0.
    pub index: usize,
    /// E-nodes at the start of the iteration.
    pub egraph_nodes: usize,
    /// E-classes at the start of the iteration.
    pub egraph_classes: usize,
    /// The rules that applied, with counts.
    pub applied: Vec<RuleCount>,
    /// Every rule searched, with its count and its own search and apply time.
    pub rule_times: Vec<RuleTime>,
    /// Seconds searching for matches.
    pub search_seconds: f64,
    /// Seconds applying matches.
    pub apply_seconds: f64,
    /// Seconds rebuilding the e-graph.
    pub rebuild_seconds: f64,
    /// Seconds for the whole iteration.
    pub total_seconds: f64,
}

/// A finished saturation: the runner (with its e-graph and explanations) and its report.
pub struct Saturation {
    /// The egg runner after `run`.
    pub runner: Runner<Attn, ShapeAnalysis>,
    /// The e-class of the input expression.
    pub root: Id,
    /// Why it stopped.
    pub stop: StopReason,
    /// Per-iteration statistics.
    pub iterations: Vec<IterationStats>,
    /// E-nodes and e-classes at the end.
    pub final_size: (usize, usize),
    /// Wall time of the run.
    pub seconds: f64,
}

impl Saturation {
    /// The saturated e-graph.
    pub fn egraph(&self) -> &AttnGraph {
        &self.runner.egraph
    }
}

/// Saturates `expr` under `rules` within `limits`, with explanations enabled when `explain`.
pub fn saturate(
    expr: &RecExpr<Attn>,
    analysis: ShapeAnalysis,
    rules: &[AttnRewrite],
    limits: &Limits,
    explain: bool,
) -> Saturation {
    let start = Instant::now();
    // Every limit and the scheduler are set before `run`, and explanations before the
    // expression is added.
    let clock = RuleClock::default();
    let scheduler = BackoffScheduler::default().with_initial_match_limit(limits.match_limit);
    let runner = Runner::new(analysis);
    let runner = if explain {
        runner.with_explanations_enabled()
    } else {
        runner.with_explanations_disabled()
    };
    let runner = runner
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .with_scheduler(TimedScheduler::new(scheduler, clock.clone()))
        .with_expr(expr)
        .run(rules);
    let seconds = start.elapsed().as_secs_f64();
    let iterations = runner
        .iterations
        .iter()
        .enumerate()
        .map(|(index, it)| IterationStats {
            index,
            egraph_nodes: it.egraph_nodes,
            egraph_classes: it.egraph_classes,
            applied: it
                .applied
                .iter()
                .map(|(rule, &count)| RuleCount {
                    rule: rule.to_string(),
                    count,
                })
                .collect(),
            rule_times: clock.iteration(index),
            search_seconds: it.search_time,
            apply_seconds: it.apply_time,
            rebuild_seconds: it.rebuild_time,
            total_seconds: it.total_time,
        })
        .collect();
    let stop = StopReason::from_egg(runner.stop_reason.as_ref());
    let root = runner
        .roots
        .first()
        .copied()
        .unwrap_or_else(|| Id::from(0usize));
    let final_size = (
        runner.egraph.total_number_of_nodes(),
        runner.egraph.number_of_classes(),
    );
    Saturation {
        runner,
        root,
        stop,
        iterations,
        final_size,
        seconds,
    }
}

/// The total count per rule over all iterations, in first-applied order.
pub fn total_applied(iterations: &[IterationStats]) -> Vec<RuleCount> {
    let mut totals: Vec<RuleCount> = Vec::new();
    for it in iterations {
        for rc in &it.applied {
            match totals.iter_mut().find(|t| t.rule == rc.rule) {
                Some(t) => t.count += rc.count,
                None => totals.push(rc.clone()),
            }
        }
    }
    totals
}
