//! Extraction: the cheapest term of the root e-class under the cycle cost model, and bounded
//! rendering of terms.
//!
//! egg's `Extractor` re-scans every e-class until no cost changes, in hash order, which can
//! take a pass per level of a deep program. This extractor is a worklist instead: an e-node
//! is (re)priced when one of its children's classes gets cheaper, so each improvement costs
//! work proportional to its parents. It builds the result without recursion and refuses a
//! choice that would be cyclic. Terms are printed with a cap on their length, since a DAG
//! with sharing unfolds into an exponentially long tree.

use crate::analysis::AttnGraph;
use crate::cost::CycleCost;
use crate::lang::Attn;
use crate::score::{score_form, TermView};
use attnc_ir::fused::Fused;
use attnc_ir::{Attention, Precision};
use egg::{Id, Language, RecExpr};
use std::collections::{HashMap, VecDeque};

/// The cheapest term found for the root.
#[derive(Clone, Debug)]
pub struct Extraction {
    /// Its tree cost under the model (shared sub-terms counted once per use).
    pub tree_cost: f64,
    /// The term.
    pub expr: RecExpr<Attn>,
    /// Every priced e-node of the root class with the cheapest term under it, in e-node
    /// order (the chosen one among them), for the trace's account of the choice.
    pub alternatives: Vec<Alternative>,
}

/// One priced e-node of the root class.
#[derive(Clone, Debug)]
pub struct Alternative {
    /// Its tree cost.
    pub tree_cost: f64,
    /// Whether it is the chosen term.
    pub chosen: bool,
    /// The cheapest term with this e-node at the root.
    pub expr: RecExpr<Attn>,
}

/// At most this many alternatives of the root class are built for the trace.
const MAX_ALTERNATIVES: usize = 16;

/// The cheapest term of class `root`, or `None` when no finite choice exists.
pub fn extract(egraph: &AttnGraph, root: Id, model: &mut CycleCost<'_>) -> Option<Extraction> {
    let mut parents: HashMap<Id, Vec<(Id, usize)>> = HashMap::new();
    let mut queue: VecDeque<(Id, usize)> = VecDeque::new();
    for class in egraph.classes() {
        for (index, node) in class.nodes.iter().enumerate() {
            for &child in node.children() {
                parents
                    .entry(egraph.find(child))
                    .or_default()
                    .push((class.id, index));
            }
            if node.is_leaf() {
                queue.push_back((class.id, index));
            }
        }
    }
    let mut own: HashMap<(Id, usize), f64> = HashMap::new();
    let mut best: HashMap<Id, (f64, usize)> = HashMap::new();
    let root = egraph.find(root);
    // The last price of each e-node of the root class (its children's final choices).
    let mut at_root: HashMap<usize, f64> = HashMap::new();
    while let Some((class, index)) = queue.pop_front() {
        let node = &egraph[class].nodes[index];
        let mut total = *own
            .entry((class, index))
            .or_insert_with(|| model.node_cycles(node));
        let mut priced = true;
        let scored = match node {
            Attn::AttentionScored([q, k, v, score, _]) => Some(([*q, *k, *v], *score)),
            // The log-sum-exp alone has no values: k stands in for v's shape.
            Attn::AttentionLseScored([q, k, score, _]) => Some(([*q, *k, *k], *score)),
            _ => None,
        };
        if let Some((qkv, score)) = scored {
            // Only a score the IR's fused op takes; its bias leaves are computed before the
            // kernel, so their costs are charged here (the rest of the score is in registers).
            match fused_score_biases(egraph, &best, qkv, score) {
                Some(biases) => {
                    for bias in biases {
                        match best.get(&egraph.find(bias)) {
                            Some(&(cost, _)) => total += cost,
                            None => priced = false,
                        }
                    }
                }
                None => continue,
            }
        }
        for &child in crate::cost::charged_children(node).iter() {
            if !priced {
                break;
            }
            match best.get(&egraph.find(child)) {
                Some(&(cost, _)) => total += cost,
                None => {
                    priced = false;
                    break;
                }
            }
        }
        if priced && class == root {
            at_root.insert(index, total);
        }
        let improves = best.get(&class).is_none_or(|&(old, _)| total < old);
        if priced && improves {
            best.insert(class, (total, index));
            if let Some(users) = parents.get(&class) {
                queue.extend(users.iter().copied());
            }
        }
    }
    let &(tree_cost, chosen) = best.get(&root)?;
    let expr = build(egraph, root, &best)?;
    let mut priced: Vec<(usize, f64)> = at_root.into_iter().collect();
    priced.sort_by_key(|&(index, _)| index);
    let alternatives = priced
        .into_iter()
        .take(MAX_ALTERNATIVES)
        .filter_map(|(index, cost)| {
            let mut choice = best.clone();
            choice.insert(root, (cost, index));
            Some(Alternative {
                tree_cost: cost,
                chosen: index == chosen,
                expr: build(egraph, root, &choice)?,
            })
        })
        .collect();
    Some(Extraction {
        tree_cost,
        expr,
        alternatives,
    })
}

/// The bias classes of an `attention-scored` node's score under the current choices, when the
/// score is one the IR's fused attention takes (checked by its validator at the classes'
/// shapes); `None` otherwise.
fn fused_score_biases(
    egraph: &AttnGraph,
    best: &HashMap<Id, (f64, usize)>,
    [q, k, v]: [Id; 3],
    score: Id,
) -> Option<Vec<Id>> {
    let shape = |id: Id| egraph[egraph.find(id)].data.shape.clone();
    let (qs, ks) = (shape(q)?, shape(k)?);
    let rows = |s: &[usize]| s.len().checked_sub(2).map(|r| s[r]);
    let scores = [rows(&qs)?, rows(&ks)?];
    let view = TermView {
        node: |id: Id| {
            let id = egraph.find(id);
            let (_, index) = best.get(&id)?;
            egraph[id].nodes.get(*index)
        },
        same: |a: Id, b: Id| egraph.find(a) == egraph.find(b),
        relpos_fits: |id: Id| shape(id).as_deref() == Some(&scores[..]),
    };
    let form = score_form(score, q, k, &view).ok()?;
    let op = Attention {
        score: form.expr,
        mask: None,
        precision: Precision::Exact,
        lse: false,
    };
    let mut shapes = vec![qs, ks, shape(v)?];
    for &b in &form.biases {
        shapes.push(shape(b)?);
    }
    let slices: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    Fused::Attention(&op).check(&slices).ok()?;
    Some(form.biases)
}

/// Builds the chosen term of `root` children-first, without recursion; `None` on a cycle.
fn build(egraph: &AttnGraph, root: Id, best: &HashMap<Id, (f64, usize)>) -> Option<RecExpr<Attn>> {
    let chosen = |class: Id| -> Option<&Attn> {
        let (_, index) = best.get(&egraph.find(class))?;
        egraph[class].nodes.get(*index)
    };
    let mut expr = RecExpr::default();
    let mut done: HashMap<Id, Id> = HashMap::new();
    let mut open: std::collections::HashSet<Id> = std::collections::HashSet::new();
    let mut stack = vec![egraph.find(root)];
    while let Some(&class) = stack.last() {
        if done.contains_key(&class) {
            stack.pop();
            continue;
        }
        let node = chosen(class)?;
        let pending: Vec<Id> = node
            .children()
            .iter()
            .map(|&c| egraph.find(c))
            .filter(|c| !done.contains_key(c))
            .collect();
        if pending.is_empty() {
            let id = expr.add(node.clone().map_children(|c| done[&egraph.find(c)]));
            done.insert(class, id);
            open.remove(&class);
            stack.pop();
        } else {
            if !open.insert(class) {
                return None;
            }
            stack.extend(pending);
        }
    }
    Some(expr)
}

/// The number of nodes of `expr` unfolded as a tree (saturating).
pub fn tree_size(expr: &RecExpr<Attn>) -> u64 {
    let mut sizes: Vec<u64> = Vec::with_capacity(expr.as_ref().len());
    for node in expr.as_ref() {
        let size = node
            .children()
            .iter()
            .fold(1u64, |s, &c| s.saturating_add(sizes[usize::from(c)]));
        sizes.push(size);
    }
    sizes.last().copied().unwrap_or(0)
}

/// `expr` as an s-expression, cut after about `max_chars` characters (with `…`).
pub fn render_term(expr: &RecExpr<Attn>, max_chars: usize) -> String {
    enum Item {
        Node(Id),
        Text(&'static str),
    }
    let nodes = expr.as_ref();
    let Some(last) = nodes.len().checked_sub(1) else {
        return "()".to_string();
    };
    let mut out = String::new();
    let mut stack = vec![Item::Node(Id::from(last))];
    while let Some(item) = stack.pop() {
        if out.len() > max_chars {
            out.push_str(" …");
            break;
        }
        match item {
            Item::Text(t) => out.push_str(t),
            Item::Node(id) => {
                let node = &expr[id];
                if node.is_leaf() {
                    out.push_str(&node.to_string());
                    continue;
                }
                out.push('(');
                out.push_str(&node.to_string());
                stack.push(Item::Text(")"));
                for &child in node.children().iter().rev() {
                    stack.push(Item::Node(child));
                    stack.push(Item::Text(" "));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_matches_egg_and_is_capped() {
        let expr: RecExpr<Attn> = "(add (mul (input x) (const 2)) (neg (input x)))"
            .parse()
            .expect("valid");
        assert_eq!(render_term(&expr, 1000), expr.to_string());
        assert!(render_term(&expr, 5).ends_with('…'));
        assert_eq!(tree_size(&expr), 9);
    }

    #[test]
    fn shared_terms_are_counted_as_trees_without_blowing_up() {
        let mut expr: RecExpr<Attn> = RecExpr::default();
        let name = expr.add(Attn::Leaf("x".parse().expect("infallible")));
        let mut top = expr.add(Attn::Input(name));
        for _ in 0..200 {
            top = expr.add(Attn::Add([top, top]));
        }
        assert_eq!(tree_size(&expr), u64::MAX);
        assert!(render_term(&expr, 100).len() < 200);
    }
}
