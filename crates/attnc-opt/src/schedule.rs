//! A rewrite scheduler that times each rule: egg's `Runner` reports search and apply time per
//! iteration only, so [`TimedScheduler`] wraps egg's `BackoffScheduler` (whose banning
//! behaviour it keeps unchanged) and measures every call to `search_rewrite` and
//! `apply_rewrite`, per rule and iteration, into a [`RuleClock`] the caller keeps.
//!
//! The runner owns its scheduler behind a box, so the measurements go to a shared handle that
//! outlives the run. Times are wall-clock and vary from run to run; they are reported, never
//! used to decide anything.

use crate::analysis::ShapeAnalysis;
use crate::lang::Attn;
use egg::{BackoffScheduler, EGraph, Rewrite, RewriteScheduler, SearchMatches};
use serde::Serialize;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// One rule in one iteration: how often it applied and how long it took.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleTime {
    /// The rule's name.
    pub rule: String,
    /// Matches newly applied (0 when it matched nothing new or was banned).
    pub count: usize,
    /// Seconds searching for its matches.
    pub search_seconds: f64,
    /// Seconds applying them.
    pub apply_seconds: f64,
}

/// Per-rule measurements, by iteration, shared between a scheduler and its owner.
#[derive(Clone, Debug, Default)]
pub struct RuleClock(Rc<RefCell<Vec<Vec<RuleTime>>>>);

impl RuleClock {
    /// The entry of `rule` in `iteration`, created on first use (rules keep search order).
    fn with_entry(&self, iteration: usize, rule: &str, f: impl FnOnce(&mut RuleTime)) {
        let mut all = self.0.borrow_mut();
        if all.len() <= iteration {
            all.resize(iteration + 1, Vec::new());
        }
        let rules = &mut all[iteration];
        let index = match rules.iter().position(|r| r.rule == rule) {
            Some(i) => i,
            None => {
                rules.push(RuleTime {
                    rule: rule.to_string(),
                    count: 0,
                    search_seconds: 0.0,
                    apply_seconds: 0.0,
                });
                rules.len() - 1
            }
        };
        f(&mut rules[index]);
    }

    /// The rules measured in `iteration`, in search order (empty when none ran).
    pub fn iteration(&self, iteration: usize) -> Vec<RuleTime> {
        self.0.borrow().get(iteration).cloned().unwrap_or_default()
    }
}

/// egg's backoff scheduler with per-rule timing.
pub struct TimedScheduler {
    inner: BackoffScheduler,
    clock: RuleClock,
}

impl TimedScheduler {
    /// Wraps `inner`, recording into `clock`.
    pub fn new(inner: BackoffScheduler, clock: RuleClock) -> TimedScheduler {
        TimedScheduler { inner, clock }
    }
}

impl RewriteScheduler<Attn, ShapeAnalysis> for TimedScheduler {
    fn can_stop(&mut self, iteration: usize) -> bool {
        <BackoffScheduler as RewriteScheduler<Attn, ShapeAnalysis>>::can_stop(
            &mut self.inner,
            iteration,
        )
    }

    fn search_rewrite<'a>(
        &mut self,
        iteration: usize,
        egraph: &EGraph<Attn, ShapeAnalysis>,
        rewrite: &'a Rewrite<Attn, ShapeAnalysis>,
    ) -> Vec<SearchMatches<'a, Attn>> {
        let start = Instant::now();
        let matches = self.inner.search_rewrite(iteration, egraph, rewrite);
        let seconds = start.elapsed().as_secs_f64();
        self.clock
            .with_entry(iteration, rewrite.name.as_str(), |t| {
                t.search_seconds += seconds
            });
        matches
    }

    fn apply_rewrite(
        &mut self,
        iteration: usize,
        egraph: &mut EGraph<Attn, ShapeAnalysis>,
        rewrite: &Rewrite<Attn, ShapeAnalysis>,
        matches: Vec<SearchMatches<Attn>>,
    ) -> usize {
        let start = Instant::now();
        let applied = self
            .inner
            .apply_rewrite(iteration, egraph, rewrite, matches);
        let seconds = start.elapsed().as_secs_f64();
        self.clock
            .with_entry(iteration, rewrite.name.as_str(), |t| {
                t.apply_seconds += seconds;
                t.count += applied;
            });
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::all_rules;
    use egg::{RecExpr, Runner};

    #[test]
    fn counts_agree_with_the_runner_and_every_rule_is_timed() {
        let expr: RecExpr<Attn> =
            "(transpose (transpose (matmul (input q) (transpose (input k)))))"
                .parse()
                .expect("valid");
        let mut analysis = ShapeAnalysis::default();
        analysis.params.insert("q".into(), vec![3, 2]);
        analysis.params.insert("k".into(), vec![4, 2]);
        let clock = RuleClock::default();
        let rules = all_rules();
        let runner: Runner<Attn, ShapeAnalysis> = Runner::new(analysis)
            .with_scheduler(TimedScheduler::new(
                BackoffScheduler::default(),
                clock.clone(),
            ))
            .with_expr(&expr)
            .run(&rules);
        assert!(!runner.iterations.is_empty());
        for (i, it) in runner.iterations.iter().enumerate() {
            let times = clock.iteration(i);
            assert_eq!(times.len(), rules.len(), "iteration {i}");
            for t in &times {
                assert!(t.search_seconds >= 0.0 && t.apply_seconds >= 0.0);
                let egg_count = it
                    .applied
                    .get(&egg::Symbol::from(t.rule.as_str()))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(t.count, egg_count, "{} in iteration {i}", t.rule);
            }
        }
        assert!(runner.iterations[0]
            .applied
            .contains_key(&egg::Symbol::from("transpose-involution")));
    }
}
