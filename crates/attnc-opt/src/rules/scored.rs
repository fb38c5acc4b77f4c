//! Scored fusion: `softmax(mask?(score)) @ v` becomes one fused attention whenever the score is
//! an elementwise tree over one product `q @ kᵀ` — biases, ALiBi slopes, softcaps, any unary
//! op — not only the fixed forms of the softmax and masking families. Masks with a `-inf` fill
//! move out through positive scales and finite shifts first, so `mask(s, p) / sqrt(d)` fuses
//! as `mask(s / sqrt(d), p)`.
//!
//! The fusion rules find `q` and `k` inside the score's e-class ([`ScoredSearcher`]: the left
//! pattern, then a bounded walk through elementwise e-nodes to a `(matmul ?q (transpose ?k))`);
//! each match carries the left pattern spelled out along that walk, and [`ScoredApplier`]
//! builds the right side from it, so egg's explanations can replay every step. The
//! extractor keeps the fused node only when the chosen score term is one the IR's fused
//! attention takes (`score::score_form`).

use super::{AttnRewrite, Guard, GuardCheck, RuleSpec};
use crate::analysis::{binary_op, unary_op, AttnGraph, ShapeAnalysis};
use crate::lang::Attn;
use egg::{
    Applier, Condition, ENodeOrVar, Id, Language, Pattern, PatternAst, RecExpr, Rewrite,
    SearchMatches, Searcher, Subst, Var,
};
use std::borrow::Cow;
use std::collections::HashSet;

/// E-classes the walk from a score to its product visits at most.
const MAX_VISITED: usize = 64;
/// Products one score yields at most (each is one candidate fused node).
const MAX_PRODUCTS: usize = 4;

/// The guard of the scored fusion rules.
const SCORED: Guard = Guard::ScoredProduct {
    s: "?s",
    axis: "?ax",
    q: "?q",
    k: "?k",
};

/// The scored fusion family.
pub fn specs() -> Vec<RuleSpec> {
    vec![
        // softmax(f(q kᵀ)) v = attention-scored(q, k, v, f(q kᵀ), all), f elementwise
        RuleSpec::guarded(
            "attention-fuse-scored",
            "(matmul (softmax ?s ?ax) ?v)",
            "(attention-scored ?q ?k ?v ?s all)",
            SCORED,
        ),
        // softmax(mask(f(q kᵀ), p)) v = attention-scored(q, k, v, f(q kᵀ), p) for fill -inf
        RuleSpec::guarded(
            "mask-attention-fuse-scored",
            "(matmul (softmax (mask ?s ?p -inf) ?ax) ?v)",
            "(attention-scored ?q ?k ?v ?s ?p)",
            SCORED,
        ),
        // logsumexp(f(q kᵀ)) = attention-lse-scored(q, k, f(q kᵀ), all), f elementwise
        RuleSpec::guarded(
            "lse-fuse-scored",
            "(logsumexp ?s ?ax)",
            "(attention-lse-scored ?q ?k ?s all)",
            SCORED,
        ),
        // logsumexp(mask(f(q kᵀ), p)) = attention-lse-scored(q, k, f(q kᵀ), p) for fill -inf
        RuleSpec::guarded(
            "mask-lse-fuse-scored",
            "(logsumexp (mask ?s ?p -inf) ?ax)",
            "(attention-lse-scored ?q ?k ?s ?p)",
            SCORED,
        ),
        // mask(x, p, -inf) c = mask(x c, p, -inf) for a scalar c > 0 (−inf · c = −inf)
        RuleSpec::guarded(
            "mask-hoist-mul",
            "(mul (mask ?x ?p -inf) ?c)",
            "(mask (mul ?x ?c) ?p -inf)",
            Guard::PositiveScalar("?c"),
        ),
        // mask(x, p, -inf) / c = mask(x / c, p, -inf) for a scalar c > 0
        RuleSpec::guarded(
            "mask-hoist-div",
            "(div (mask ?x ?p -inf) ?c)",
            "(mask (div ?x ?c) ?p -inf)",
            Guard::PositiveScalar("?c"),
        ),
        // mask(x, p, -inf) + c = mask(x + c, p, -inf) for a finite scalar c
        RuleSpec::guarded(
            "mask-hoist-add",
            "(add (mask ?x ?p -inf) ?c)",
            "(mask (add ?x ?c) ?p -inf)",
            Guard::FiniteScalar("?c"),
        ),
        // mask(x, p, -inf) − c = mask(x − c, p, -inf) for a finite scalar c
        RuleSpec::guarded(
            "mask-hoist-sub",
            "(sub (mask ?x ?p -inf) ?c)",
            "(mask (sub ?x ?c) ?p -inf)",
            Guard::FiniteScalar("?c"),
        ),
    ]
}

/// A rule whose left pattern binds `?s` and whose right side also needs `?q`, `?k`: the
/// operands of a product `q kᵀ` found inside `?s`'s class.
pub(super) fn scored_rewrite(spec: &RuleSpec, s: &str, q: &str, k: &str) -> AttnRewrite {
    let lhs: Pattern<Attn> = spec
        .lhs
        .parse()
        .expect("invariant: rule patterns in the tables are valid");
    let searcher = ScoredSearcher {
        lhs,
        s: super::var(s),
        q: super::var(q),
        k: super::var(k),
    };
    let applier = ScoredApplier {
        condition: GuardCheck::new(&spec.guard),
        q: super::var(q),
        k: super::var(k),
    };
    Rewrite::new(spec.name, searcher, applier).expect("invariant: rule variables are bound")
}

/// The left pattern, then every product `q kᵀ` reachable from `?s` through elementwise
/// e-nodes (bounded), one match each. Each match carries its own left pattern: the rule's,
/// with `?s` spelled out along the path from the score to the product (siblings as fresh
/// variables), so the pattern binds `?q` and `?k` and egg's explanations can rebuild the
/// right side from it.
#[derive(Debug)]
pub struct ScoredSearcher {
    lhs: Pattern<Attn>,
    s: Var,
    q: Var,
    k: Var,
}

impl Searcher<Attn, ShapeAnalysis> for ScoredSearcher {
    fn search_eclass_with_limit(
        &self,
        egraph: &AttnGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, Attn>> {
        let found = self.lhs.search_eclass_with_limit(egraph, eclass, limit)?;
        self.extend(egraph, found, limit).into_iter().next()
    }

    fn search_with_limit(&self, egraph: &AttnGraph, limit: usize) -> Vec<SearchMatches<'_, Attn>> {
        self.lhs
            .search_with_limit(egraph, limit)
            .into_iter()
            .flat_map(|m| self.extend(egraph, m, limit))
            .collect()
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars = self.lhs.vars();
        vars.extend([self.q, self.k]);
        vars
    }
}

impl ScoredSearcher {
    /// One match per (substitution of the left pattern, product found in its `?s`).
    fn extend<'a>(
        &self,
        egraph: &AttnGraph,
        found: SearchMatches<'_, Attn>,
        limit: usize,
    ) -> Vec<SearchMatches<'a, Attn>> {
        let mut out = Vec::new();
        for subst in &found.substs {
            let Some(&s) = subst.get(self.s) else {
                continue;
            };
            for path in products(egraph, s) {
                let mut extended: Subst = subst.clone();
                let mut ast: PatternAst<Attn> = RecExpr::default();
                let mut fresh = 0usize;
                let Some(score) = self.spell(egraph, &path, 0, &mut ast, &mut extended, &mut fresh)
                else {
                    continue;
                };
                let lhs = substitute(&self.lhs.ast, self.s, &ast, score);
                out.push(SearchMatches {
                    eclass: found.eclass,
                    substs: vec![extended],
                    ast: Some(Cow::Owned(lhs)),
                });
                if out.len() >= limit {
                    return out;
                }
            }
        }
        out
    }

    /// Spells step `at` of `path` into `ast` (binding siblings to fresh variables in
    /// `subst`); returns the id of the spelled node.
    fn spell(
        &self,
        egraph: &AttnGraph,
        path: &[Step],
        at: usize,
        ast: &mut PatternAst<Attn>,
        subst: &mut Subst,
        fresh: &mut usize,
    ) -> Option<Id> {
        let step = path.get(at)?;
        let node = &egraph[step.class].nodes[step.node];
        if at + 1 == path.len() {
            // The product: (matmul ?q (transpose ?k)).
            let Attn::MatMul([a, t]) = node else {
                return None;
            };
            let k = egraph[*t].nodes.iter().find_map(|n| match n {
                Attn::Transpose(k) => Some(*k),
                _ => None,
            })?;
            subst.insert(self.q, egraph.find(*a));
            subst.insert(self.k, egraph.find(k));
            let q = ast.add(ENodeOrVar::Var(self.q));
            let k = ast.add(ENodeOrVar::Var(self.k));
            let t = ast.add(ENodeOrVar::ENode(Attn::Transpose(k)));
            return Some(ast.add(ENodeOrVar::ENode(Attn::MatMul([q, t]))));
        }
        let mut children = Vec::new();
        for (position, &child) in node.children().iter().enumerate() {
            if position == step.child {
                children.push(self.spell(egraph, path, at + 1, ast, subst, fresh)?);
            } else {
                let var: Var = format!("?scored{fresh}")
                    .parse()
                    .expect("invariant: generated variable names are valid");
                *fresh += 1;
                subst.insert(var, egraph.find(child));
                children.push(ast.add(ENodeOrVar::Var(var)));
            }
        }
        let mut index = 0;
        let spelled = node.clone().map_children(|_| {
            index += 1;
            children[index - 1]
        });
        Some(ast.add(ENodeOrVar::ENode(spelled)))
    }
}

/// `pattern` with variable `var` replaced by the subtree `score` of `spelled`.
fn substitute(
    pattern: &PatternAst<Attn>,
    var: Var,
    spelled: &PatternAst<Attn>,
    score: Id,
) -> PatternAst<Attn> {
    let mut out: PatternAst<Attn> = RecExpr::default();
    let copied = copy_subtree(spelled, score, &mut out);
    let mut map: Vec<Id> = Vec::with_capacity(pattern.as_ref().len());
    for node in pattern.as_ref() {
        let id = match node {
            ENodeOrVar::Var(v) if *v == var => copied,
            ENodeOrVar::Var(v) => out.add(ENodeOrVar::Var(*v)),
            ENodeOrVar::ENode(n) => {
                let n = n.clone().map_children(|c| map[usize::from(c)]);
                out.add(ENodeOrVar::ENode(n))
            }
        };
        map.push(id);
    }
    out
}

/// Copies the subtree of `from` rooted at `root` into `to`; returns its new id.
fn copy_subtree(from: &PatternAst<Attn>, root: Id, to: &mut PatternAst<Attn>) -> Id {
    let nodes = from.as_ref();
    let last = usize::from(root);
    // Children precede their parents: mark what the root reaches, then copy in order.
    let mut reached = vec![false; last + 1];
    reached[last] = true;
    for index in (0..=last).rev() {
        if let (true, ENodeOrVar::ENode(n)) = (reached[index], &nodes[index]) {
            for &c in n.children() {
                reached[usize::from(c)] = true;
            }
        }
    }
    let mut map: Vec<Id> = vec![Id::from(0usize); last + 1];
    for index in (0..=last).filter(|&i| reached[i]) {
        let copied = match &nodes[index] {
            ENodeOrVar::Var(v) => ENodeOrVar::Var(*v),
            ENodeOrVar::ENode(n) => {
                ENodeOrVar::ENode(n.clone().map_children(|c| map[usize::from(c)]))
            }
        };
        map[index] = to.add(copied);
    }
    map[last]
}

/// Unions each match's left side with `(attention-scored ?q ?k ?v S P)`, where `S` is the
/// spelled score and `P` the mask pattern (`all` without a mask), when the guard holds.
#[derive(Debug)]
pub struct ScoredApplier {
    condition: GuardCheck,
    q: Var,
    k: Var,
}

impl Applier<Attn, ShapeAnalysis> for ScoredApplier {
    fn apply_matches(
        &self,
        egraph: &mut AttnGraph,
        matches: &[SearchMatches<'_, Attn>],
        rule_name: egg::Symbol,
    ) -> Vec<Id> {
        let mut added = Vec::new();
        for mat in matches {
            let Some(lhs) = mat.ast.as_deref() else {
                continue;
            };
            let Some(rhs) = self.right_side(lhs) else {
                continue;
            };
            for subst in &mat.substs {
                if !self.condition.check(egraph, mat.eclass, subst) {
                    continue;
                }
                let (id, did) = egraph.union_instantiations(lhs, &rhs, subst, rule_name);
                if did {
                    added.push(id);
                }
            }
        }
        added
    }

    fn apply_one(
        &self,
        _egraph: &mut AttnGraph,
        _eclass: Id,
        _subst: &Subst,
        _searcher_ast: Option<&PatternAst<Attn>>,
        _rule_name: egg::Symbol,
    ) -> Vec<Id> {
        // Every match is applied through `apply_matches`, which has the match's own pattern.
        Vec::new()
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.q, self.k]
    }
}

impl ScoredApplier {
    /// `(attention-scored ?q ?k ?v S P)` from a left side `(matmul (softmax X ?ax) ?v)`, or
    /// `(attention-lse-scored ?q ?k S P)` from `(logsumexp X ?ax)`, with `X = S` or
    /// `X = (mask S P -inf)`.
    fn right_side(&self, lhs: &PatternAst<Attn>) -> Option<PatternAst<Attn>> {
        let node = |id: Id| match &lhs[id] {
            ENodeOrVar::ENode(n) => Some(n),
            ENodeOrVar::Var(_) => None,
        };
        let root = Id::from(lhs.as_ref().len().checked_sub(1)?);
        let (x, v) = match node(root)? {
            Attn::MatMul([p, v]) => match node(*p)? {
                Attn::Softmax([x, _]) => (x, Some(*v)),
                _ => return None,
            },
            Attn::LogSumExp([x, _]) => (x, None),
            _ => return None,
        };
        let (score, pattern) = match node(*x) {
            Some(Attn::Mask([s, pattern, _])) => (*s, Some(*pattern)),
            _ => (*x, None),
        };
        let mut out: PatternAst<Attn> = RecExpr::default();
        let q = out.add(ENodeOrVar::Var(self.q));
        let k = out.add(ENodeOrVar::Var(self.k));
        let v = v.map(|v| copy_subtree(lhs, v, &mut out));
        let s = copy_subtree(lhs, score, &mut out);
        let pattern = match pattern {
            Some(p) => copy_subtree(lhs, p, &mut out),
            None => out.add(ENodeOrVar::ENode(Attn::All)),
        };
        out.add(ENodeOrVar::ENode(match v {
            Some(v) => Attn::AttentionScored([q, k, v, s, pattern]),
            None => Attn::AttentionLseScored([q, k, s, pattern]),
        }));
        Some(out)
    }
}

/// One step of the walk from a score to a product: e-node `node` of `class`, entered through
/// child `child` (unused at the product itself).
#[derive(Clone, Copy, Debug)]
struct Step {
    class: Id,
    node: usize,
    child: usize,
}

/// Paths from class `s` through elementwise e-nodes to products `(matmul q (transpose k))`
/// (at most [`MAX_VISITED`] classes, [`MAX_PRODUCTS`] products, one path per product).
fn products(egraph: &AttnGraph, s: Id) -> Vec<Vec<Step>> {
    let mut found: Vec<Vec<Step>> = Vec::new();
    let mut seen_products: HashSet<(Id, Id)> = HashSet::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(Id, Vec<Step>)> = vec![(egraph.find(s), Vec::new())];
    while let Some((class, path)) = stack.pop() {
        if found.len() >= MAX_PRODUCTS || !seen.insert(class) || seen.len() > MAX_VISITED {
            continue;
        }
        // A scalar holds no product.
        if egraph[class].data.shape.as_deref() == Some(&[]) {
            continue;
        }
        for (index, node) in egraph[class].nodes.iter().enumerate() {
            let here = |child: usize| {
                let mut p = path.clone();
                p.push(Step {
                    class,
                    node: index,
                    child,
                });
                p
            };
            if let Attn::MatMul([a, t]) = node {
                let key = egraph[*t].nodes.iter().find_map(|n| match n {
                    Attn::Transpose(k) => Some((egraph.find(*a), egraph.find(*k))),
                    _ => None,
                });
                if let Some(key) = key {
                    if seen_products.insert(key) && found.len() < MAX_PRODUCTS {
                        found.push(here(0));
                    }
                }
            } else if unary_op(node).is_some() || binary_op(node).is_some() {
                for (position, &child) in node.children().iter().enumerate() {
                    stack.push((egraph.find(child), here(position)));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::specs;
    use crate::rules::testkit::{assert_covered, check, dim, rule, PATTERNS};
    use proptest::prelude::*;

    #[test]
    fn every_rule_has_a_property_test() {
        assert_covered(
            &specs(),
            &[
                "attention-fuse-scored",
                "mask-attention-fuse-scored",
                "lse-fuse-scored",
                "mask-lse-fuse-scored",
                "mask-hoist-mul",
                "mask-hoist-div",
                "mask-hoist-add",
                "mask-hoist-sub",
            ],
        );
    }

    /// Elementwise scores over `q kᵀ` with biases, unary ops and a second use of the product.
    const SCORES: &[&str] = &[
        "(add (mul (matmul (input q) (transpose (input k))) (const 0.3)) (input bias))",
        "(mul (const 4) (tanh (div (matmul (input q) (transpose (input k))) (const 4))))",
        "(sub (elu (matmul (input q) (transpose (input k)))) (sigmoid (matmul (input q) (transpose (input k)))))",
        "(maximum (matmul (input q) (transpose (input k))) (input c))",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn attention_fuse_scored(b in dim(), m in dim(), n in dim(), d in dim(), e in dim(),
                                 score in 0..SCORES.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "attention-fuse-scored"),
                  "q: f32[b, m, d], k: f32[b, n, d], v: f32[n, e], bias: f32[m, n], c: f32[b, 1, n]",
                  &[("?s", SCORES[score]), ("?ax", "2"), ("?v", "(input v)"),
                    ("?q", "(input q)"), ("?k", "(input k)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d), ("e", e)], seed);
        }

        #[test]
        fn mask_attention_fuse_scored(b in dim(), m in dim(), n in dim(), d in dim(),
                                      score in 0..SCORES.len(), p in 0..PATTERNS.len(),
                                      seed in any::<u64>()) {
            check(&rule(&specs(), "mask-attention-fuse-scored"),
                  "q: f32[b, m, d], k: f32[b, n, d], v: f32[b, n, d], bias: f32[m, n], c: f32[b, 1, n]",
                  &[("?s", SCORES[score]), ("?ax", "2"), ("?v", "(input v)"), ("?p", PATTERNS[p]),
                    ("?q", "(input q)"), ("?k", "(input k)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn lse_fuse_scored(b in dim(), m in dim(), n in dim(), d in dim(),
                           score in 0..SCORES.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "lse-fuse-scored"),
                  "q: f32[b, m, d], k: f32[b, n, d], bias: f32[m, n], c: f32[b, 1, n]",
                  &[("?s", SCORES[score]), ("?ax", "2"), ("?q", "(input q)"), ("?k", "(input k)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_lse_fuse_scored(b in dim(), m in dim(), n in dim(), d in dim(),
                                score in 0..SCORES.len(), p in 0..PATTERNS.len(),
                                seed in any::<u64>()) {
            check(&rule(&specs(), "mask-lse-fuse-scored"),
                  "q: f32[b, m, d], k: f32[b, n, d], bias: f32[m, n], c: f32[b, 1, n]",
                  &[("?s", SCORES[score]), ("?ax", "2"), ("?p", PATTERNS[p]),
                    ("?q", "(input q)"), ("?k", "(input k)")],
                  &[("b", b), ("m", m), ("n", n), ("d", d)], seed);
        }

        #[test]
        fn mask_hoist_mul(m in dim(), n in dim(), p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-hoist-mul"), "x: f32[m, n]",
                  &[("?x", "(input x)"), ("?p", PATTERNS[p]), ("?c", "(const 0.5)")],
                  &[("m", m), ("n", n)], seed);
        }

        #[test]
        fn mask_hoist_div(m in dim(), n in dim(), p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-hoist-div"), "x: f32[m, n]",
                  &[("?x", "(input x)"), ("?p", PATTERNS[p]), ("?c", "(sqrt (dim n))")],
                  &[("m", m), ("n", n)], seed);
        }

        #[test]
        fn mask_hoist_add(m in dim(), n in dim(), p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-hoist-add"), "x: f32[m, n]",
                  &[("?x", "(input x)"), ("?p", PATTERNS[p]), ("?c", "(const -3)")],
                  &[("m", m), ("n", n)], seed);
        }

        #[test]
        fn mask_hoist_sub(m in dim(), n in dim(), p in 0..PATTERNS.len(), seed in any::<u64>()) {
            check(&rule(&specs(), "mask-hoist-sub"), "x: f32[m, n]",
                  &[("?x", "(input x)"), ("?p", PATTERNS[p]), ("?c", "(const 2.5)")],
                  &[("m", m), ("n", n)], seed);
        }
    }
}
