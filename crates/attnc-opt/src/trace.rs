//! The public entry point [`optimize`] and its record, the [`Trace`]: what went in, how the
//! e-graph grew, why saturation stopped, what the cost model said, which form was chosen and
//! the rewrites on the path from the input to it (egg explanations, one step per rule).
//!
//! `optimize` never fails: when anything goes wrong (an unbound symbol, a form that does not
//! convert back) it returns the input kernel unchanged and the trace says why.

use crate::analysis::ShapeAnalysis;
use crate::approx::{Approx, ApproxOutcome, ApproxPolicy};
use crate::ceilings::{Ceilings, TierSpeeds};
use crate::convert::{to_kernel, to_recexpr};
use crate::cost::CycleCost;
use crate::extract::{extract, render_term, tree_size};
use crate::lang::Attn;
use crate::rules::all_rules;
use crate::saturate::{saturate, total_applied, IterationStats, Limits, RuleCount, StopReason};
use crate::schedule::RuleTime;
use attnc_ir::dim::resolve_shape;
use attnc_ir::print::print_kernel;
use attnc_ir::{Bindings, Kernel};
use egg::{FlatTerm, RecExpr};
use serde::Serialize;
use std::fmt::Write;
use std::time::Instant;

/// Options of one optimization.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptimizeOptions {
    /// Saturation limits.
    pub limits: Limits,
    /// Record the derivation (egg explanations) in the trace.
    pub explain: bool,
    /// The approximations allowed (none by default: every rewrite is exact).
    pub approx: ApproxPolicy,
    /// The machine ceilings the cost model uses (default: the documented constants).
    pub ceilings: Ceilings,
    /// The full-width tiers' speeds (default: none, portable code only).
    pub tiers: TierSpeeds,
}

impl Default for OptimizeOptions {
    fn default() -> OptimizeOptions {
        OptimizeOptions {
            limits: Limits::default(),
            explain: true,
            approx: ApproxPolicy::default(),
            ceilings: Ceilings::default(),
            tiers: TierSpeeds::default(),
        }
    }
}

/// The result of [`optimize`]: the chosen form as IR and the record of how it was found.
#[derive(Clone, Debug)]
pub struct Optimized {
    /// The chosen form (the input itself when nothing cheaper was found).
    pub kernel: Kernel,
    /// What the optimizer did.
    pub trace: Trace,
}

/// Which form the optimizer returned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Decision {
    /// The extracted form, cheaper than the input under the cost model.
    Rewritten,
    /// The input, unchanged, for the reason given.
    KeptInput(String),
}

/// One rewrite on the path from the input to the chosen form.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DerivationStep {
    /// The rule applied.
    pub rule: String,
    /// True when the rule was applied right to left.
    pub backward: bool,
    /// The whole term after the step.
    pub term: String,
}

/// The record of one optimization (serializable for `--format json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    /// The kernel's name.
    pub kernel: String,
    /// The input program, as IR text.
    pub input: String,
    /// The input as an e-graph term.
    pub input_term: String,
    /// The chosen program, as IR text.
    pub output: String,
    /// The chosen form as an e-graph term.
    pub output_term: String,
    /// Per-iteration e-graph statistics.
    pub iterations: Vec<IterationStats>,
    /// Rules applied, totalled over all iterations.
    pub applied: Vec<RuleCount>,
    /// Why saturation stopped.
    pub stop_reason: StopReason,
    /// E-nodes and e-classes at the end.
    pub final_nodes: usize,
    /// E-classes at the end.
    pub final_classes: usize,
    /// Estimated cycles of the input.
    pub cost_before: f64,
    /// Estimated cycles of the chosen form.
    pub cost_after: f64,
    /// Which form was returned.
    pub decision: Decision,
    /// The rewrites from the input to the chosen form.
    pub derivation: Vec<DerivationStep>,
    /// Why the derivation is missing although the form was rewritten, if it is.
    pub derivation_omitted: Option<String>,
    /// Seconds saturating.
    pub saturate_seconds: f64,
    /// Seconds extracting (cost model included).
    pub extract_seconds: f64,
    /// Seconds building the explanation.
    pub explain_seconds: f64,
    /// What became of each allowed approximation (empty under the exact policy).
    pub approximations: Vec<ApproxOutcome>,
    /// The machine ceilings the cost model used.
    pub ceilings: Ceilings,
    /// Each attention of the chosen form: fused, or why not.
    pub fusion: Vec<crate::fusion::FusionNote>,
    /// Latent attention: the absorbed and materialized forms of the output priced, cheapest
    /// first (empty unless both were).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latent: Vec<crate::phase::LatentForm>,
}

impl Trace {
    /// A trace for a kernel that was returned unchanged before saturation could run.
    fn unchanged(kernel: &Kernel, reason: String) -> Trace {
        let text = print_kernel(kernel);
        Trace {
            kernel: kernel.name.clone(),
            input: text.clone(),
            input_term: String::new(),
            output: text,
            output_term: String::new(),
            iterations: vec![],
            applied: vec![],
            stop_reason: StopReason::Other(reason.clone()),
            final_nodes: 0,
            final_classes: 0,
            cost_before: 0.0,
            cost_after: 0.0,
            decision: Decision::KeptInput(reason),
            derivation: vec![],
            derivation_omitted: None,
            saturate_seconds: 0.0,
            extract_seconds: 0.0,
            explain_seconds: 0.0,
            approximations: vec![],
            ceilings: Ceilings::default(),
            fusion: crate::fusion::notes(kernel),
            latent: vec![],
        }
    }

    /// The rule names on the derivation path, in order, without repeats.
    pub fn derivation_rules(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for step in &self.derivation {
            if !names.contains(&step.rule.as_str()) {
                names.push(&step.rule);
            }
        }
        names
    }

    /// The derivation alone, one rule and resulting term per step (deterministic: no
    /// timings), for golden tests and `attnc explain`.
    pub fn render_derivation(&self) -> String {
        let mut out = format!("{}\n", self.input_term);
        for step in &self.derivation {
            let dir = if step.backward { " (backward)" } else { "" };
            let _ = writeln!(out, "  => {}{dir}\n{}", step.rule, step.term);
        }
        out
    }

    /// The trace for people.
    pub fn render_text(&self) -> String {
        self.render(true)
    }

    /// The trace for people without the wall-clock times, so it is deterministic (golden
    /// tests): the same text as [`Trace::render_text`] less the milliseconds.
    pub fn render_text_without_timings(&self) -> String {
        self.render(false)
    }

    /// The text trace, with or without the times.
    fn render(&self, timings: bool) -> String {
        let ms = |seconds: f64| {
            if timings {
                format!("{:.2} ms", seconds * 1e3)
            } else {
                "– ms".to_string()
            }
        };
        let mut out = String::new();
        let _ = writeln!(out, "optimizer trace for kernel `{}`", self.kernel);
        let _ = writeln!(out, "\ninput:\n{}", self.input.trim_end());
        let _ = writeln!(out, "\nsaturation:");
        for it in &self.iterations {
            let rules: Vec<String> = it
                .applied
                .iter()
                .map(|r| format!("{} ×{}", r.rule, r.count))
                .collect();
            let _ = writeln!(
                out,
                "  iteration {:>2}: {:>6} e-nodes {:>6} e-classes  {}  {}",
                it.index,
                it.egraph_nodes,
                it.egraph_classes,
                ms(it.total_seconds),
                if rules.is_empty() {
                    "-".to_string()
                } else {
                    rules.join(", ")
                }
            );
            if timings {
                let _ = writeln!(out, "{}", slowest_rules(&it.rule_times));
            }
        }
        let _ = writeln!(
            out,
            "  stopped: {} ({} e-nodes, {} e-classes, {})",
            self.stop_reason,
            self.final_nodes,
            self.final_classes,
            ms(self.saturate_seconds)
        );
        let _ = writeln!(
            out,
            "\ncost: {:.0} → {:.0} estimated cycles ({} extraction)",
            self.cost_before,
            self.cost_after,
            ms(self.extract_seconds)
        );
        match &self.decision {
            Decision::Rewritten => {
                let _ = writeln!(out, "decision: rewritten");
            }
            Decision::KeptInput(why) => {
                let _ = writeln!(out, "decision: kept the input ({why})");
            }
        }
        if !self.derivation.is_empty() {
            let _ = writeln!(out, "\nderivation:\n  {}", clip(&self.input_term));
            for (i, step) in self.derivation.iter().enumerate() {
                let dir = if step.backward { " (backward)" } else { "" };
                let _ = writeln!(
                    out,
                    "  {}. {}{dir}\n     {}",
                    i + 1,
                    step.rule,
                    clip(&step.term)
                );
            }
        }
        if !self.approximations.is_empty() {
            let _ = writeln!(out, "\napproximations:");
            for a in &self.approximations {
                let status = match (&a.reason, a.applied) {
                    (_, true) => "applied".to_string(),
                    (Some(why), false) => format!("not applied: {why}"),
                    (None, false) => "not applied".to_string(),
                };
                let measured = a
                    .measured_error
                    .map(|e| format!(", measured {e:.2e}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {}: estimated error {:.1e}{measured}, {status}",
                    a.name, a.estimated_error
                );
            }
        }
        if !self.fusion.is_empty() {
            let _ = writeln!(out, "\nfusion:");
            for note in &self.fusion {
                let _ = writeln!(out, "  {note}");
            }
        }
        if !self.latent.is_empty() {
            let _ = writeln!(
                out,
                "\nlatent attention (keys as up-projections; the cheaper form for this phase):"
            );
            for form in &self.latent {
                let _ = writeln!(out, "  {form}");
            }
        }
        if let Some(why) = &self.derivation_omitted {
            let _ = writeln!(out, "\nderivation omitted: {why}");
        }
        let _ = writeln!(out, "\noutput:\n{}", self.output.trim_end());
        out
    }
}

/// How many rules the text trace names per iteration, slowest first.
pub const SLOWEST_RULES: usize = 5;

/// One line naming the slowest rules of an iteration (search + apply time, with counts).
fn slowest_rules(times: &[RuleTime]) -> String {
    let mut sorted: Vec<&RuleTime> = times.iter().collect();
    let total = |t: &RuleTime| t.search_seconds + t.apply_seconds;
    sorted.sort_by(|a, b| total(b).total_cmp(&total(a)));
    let named: Vec<String> = sorted
        .iter()
        .take(SLOWEST_RULES)
        .map(|t| {
            format!(
                "{} {:.3} ms (search {:.3}, apply {:.3}) ×{}",
                t.rule,
                total(t) * 1e3,
                t.search_seconds * 1e3,
                t.apply_seconds * 1e3,
                t.count
            )
        })
        .collect();
    let all: f64 = times.iter().map(total).sum();
    format!(
        "      rules: {:.3} ms in {} rules; slowest: {}",
        all * 1e3,
        times.len(),
        if named.is_empty() {
            "-".to_string()
        } else {
            named.join(", ")
        }
    )
}

/// Shortens very long terms in the text rendering.
fn clip(term: &str) -> String {
    const MAX: usize = 400;
    if term.chars().count() <= MAX {
        term.to_string()
    } else {
        let head: String = term.chars().take(MAX).collect();
        format!("{head} …")
    }
}

/// Terms in the trace are cut after this many characters.
pub const MAX_TERM_CHARS: usize = 4_000;

/// Explanations (and so derivations) are enabled only when the input, and then the chosen
/// form, unfold into trees of at most this many nodes: egg's explanations work on terms, and
/// a program with shared sub-expressions unfolds exponentially (measured: a chain of 12
/// `x = x * x + x` took 1.9 s to saturate with explanations, 0.1 ms without).
pub const MAX_EXPLAINED_TREE: u64 = 10_000;

/// Optimizes `kernel` at `bindings` with the exact rule families; see the module docs.
pub fn optimize(kernel: &Kernel, bindings: &Bindings, options: &OptimizeOptions) -> Optimized {
    let mut result = optimize_kernel(kernel, bindings, options);
    result.trace.ceilings = options.ceilings;
    result
}

/// [`optimize`], less recording the ceilings in the trace.
fn optimize_kernel(kernel: &Kernel, bindings: &Bindings, options: &OptimizeOptions) -> Optimized {
    let expr = match to_recexpr(kernel) {
        Ok(expr) => expr,
        Err(e) => return unchanged(kernel, format!("the kernel does not convert: {e}")),
    };
    let mut analysis = ShapeAnalysis {
        bindings: bindings.clone(),
        ..ShapeAnalysis::default()
    };
    for param in &kernel.params {
        match resolve_shape(&param.shape, bindings) {
            Some(shape) => {
                analysis.params.insert(param.name.as_str().into(), shape);
            }
            None => {
                return unchanged(
                    kernel,
                    format!("the shape of `{}` is not bound", param.name),
                )
            }
        }
    }
    if expr.as_ref().len() > options.limits.nodes {
        let why = format!(
            "the program has {} e-nodes, more than the node limit {}",
            expr.as_ref().len(),
            options.limits.nodes
        );
        return unchanged(kernel, why);
    }
    let mut rules = all_rules();
    let mut outcomes = Vec::new();
    for approx in &options.approx.allowed {
        if outcomes.iter().any(|o: &ApproxOutcome| o.approx == *approx) {
            continue;
        }
        let estimated_error = approx.estimated_error();
        let within = estimated_error <= options.approx.tol;
        // bf16 products pay only on AMX tiles or AVX-512 BF16; elsewhere the exact kernel
        // would run instead.
        let runnable = *approx != Approx::Bf16Products || options.tiers.amx_bf16 > 0.0;
        if within && runnable {
            rules.extend(crate::rules::approx::rules(approx));
        }
        outcomes.push(ApproxOutcome {
            name: approx.to_string(),
            approx: *approx,
            estimated_error,
            applied: false,
            measured_error: None,
            reason: if !within {
                Some(format!(
                    "its estimated error {estimated_error:.1e} exceeds the tolerance {:.1e}",
                    options.approx.tol
                ))
            } else if !runnable {
                Some(
                    "it needs bf16 products on AMX tiles or AVX-512 BF16 vectors, which this \
                     CPU lacks or ATTNC_TIERS switched off"
                        .to_string(),
                )
            } else {
                None
            },
        });
    }
    // egg's explanations cost time exponential in sharing (they work on unfolded terms), so
    // programs whose term is large are saturated without them and get no derivation.
    let explain = options.explain && tree_size(&expr) <= MAX_EXPLAINED_TREE;
    let mut sat = saturate(&expr, analysis, &rules, &options.limits, explain);

    let extract_start = Instant::now();
    let latent;
    let (best, cost_before, cost_after) = {
        let egraph = sat.egraph();
        let mut model = CycleCost::new(egraph)
            .with_ceilings(&options.ceilings)
            .with_tiers(options.tiers);
        let extraction = extract(egraph, sat.root, &mut model);
        latent = extraction
            .as_ref()
            .map(|e| crate::phase::latent_forms(egraph, &e.alternatives))
            .unwrap_or_default();
        let best = extraction.map(|e| e.expr);
        let before = model.dag_cycles(&expr);
        let after = best.as_ref().and_then(|b| model.dag_cycles(b));
        (best.unwrap_or_else(|| expr.clone()), before, after)
    };
    let extract_seconds = extract_start.elapsed().as_secs_f64();

    let mut trace = Trace {
        kernel: kernel.name.clone(),
        input: print_kernel(kernel),
        input_term: render_term(&expr, MAX_TERM_CHARS),
        output: String::new(),
        output_term: String::new(),
        iterations: sat.iterations.clone(),
        applied: total_applied(&sat.iterations),
        stop_reason: sat.stop.clone(),
        final_nodes: sat.final_size.0,
        final_classes: sat.final_size.1,
        cost_before: cost_before.unwrap_or(f64::NAN),
        cost_after: cost_after.unwrap_or(f64::NAN),
        decision: Decision::Rewritten,
        derivation: vec![],
        derivation_omitted: None,
        saturate_seconds: sat.seconds,
        extract_seconds,
        explain_seconds: 0.0,
        approximations: vec![],
        ceilings: options.ceilings,
        fusion: vec![],
        latent,
    };
    let cheaper = matches!((cost_before, cost_after), (Some(b), Some(a)) if a < b);
    let chosen = if cheaper {
        match to_kernel(&best, kernel, bindings) {
            Ok(k) => Some(k),
            Err(e) => {
                trace.decision =
                    Decision::KeptInput(format!("the chosen form does not convert: {e}"));
                None
            }
        }
    } else {
        let why = if cost_before.is_some() && cost_after.is_some() {
            "nothing cheaper was found"
        } else {
            "the cost model could not price a form"
        };
        trace.decision = Decision::KeptInput(why.into());
        None
    };
    let chosen_form = chosen.is_some();
    let result = match chosen {
        Some(k) => {
            trace.output_term = render_term(&best, MAX_TERM_CHARS);
            if explain && tree_size(&best) <= MAX_EXPLAINED_TREE {
                let start = Instant::now();
                trace.derivation = derivation(&mut sat.runner, &expr, &best);
                trace.explain_seconds = start.elapsed().as_secs_f64();
            } else if options.explain {
                trace.derivation_omitted = Some(format!(
                    "the terms unfold into more than {MAX_EXPLAINED_TREE} nodes"
                ));
            }
            k
        }
        None => {
            trace.output_term = trace.input_term.clone();
            trace.cost_after = trace.cost_before;
            kernel.clone()
        }
    };
    for outcome in &mut outcomes {
        if outcome.reason.is_none() {
            outcome.applied = chosen_form && outcome.approx.used_in(&best);
            if !outcome.applied {
                let fired = crate::rules::approx::rules(&outcome.approx)
                    .iter()
                    .any(|rule| {
                        trace
                            .applied
                            .iter()
                            .any(|c| c.rule == rule.name.as_str() && c.count > 0)
                    });
                outcome.reason = Some(if fired {
                    "no cheaper form uses it".to_string()
                } else {
                    format!("nothing in this program fits it: {}", outcome.approx.fits())
                });
            }
        }
    }
    trace.approximations = outcomes;
    trace.output = print_kernel(&result);
    trace.fusion = crate::fusion::notes(&result);
    Optimized {
        kernel: result,
        trace,
    }
}

/// The input returned unchanged, with the reason.
fn unchanged(kernel: &Kernel, reason: String) -> Optimized {
    Optimized {
        kernel: kernel.clone(),
        trace: Trace::unchanged(kernel, reason),
    }
}

/// The rewrites from `from` to `to`, one step per rule application.
pub fn derivation(
    runner: &mut egg::Runner<Attn, ShapeAnalysis>,
    from: &RecExpr<Attn>,
    to: &RecExpr<Attn>,
) -> Vec<DerivationStep> {
    let mut explanation = runner.explain_equivalence(from, to);
    let flat = explanation.make_flat_explanation().clone();
    flat.iter()
        .skip(1)
        .map(|term| {
            let (rule, backward) = step_rule(term).unwrap_or_else(|| ("?".to_string(), false));
            DerivationStep {
                rule,
                backward,
                term: term.remove_rewrites().to_string(),
            }
        })
        .collect()
}

/// The rule a flat explanation step applies (searched without recursion).
fn step_rule(term: &FlatTerm<Attn>) -> Option<(String, bool)> {
    let mut stack = vec![term];
    while let Some(t) = stack.pop() {
        if let Some(rule) = &t.forward_rule {
            return Some((rule.to_string(), false));
        }
        if let Some(rule) = &t.backward_rule {
            return Some((rule.to_string(), true));
        }
        stack.extend(t.children.iter());
    }
    None
}
