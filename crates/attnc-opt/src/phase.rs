//! Latent attention by phase: which way a fused attention over up-projected keys was formed,
//! and why.
//!
//! With keys `k = c @ wk` from a latent cache `c: [n, r]` (MLA), the scores
//! `q @ (c @ wk)ᵀ = (q @ wkᵀ) @ cᵀ` can run *materialized* (compute `k`, then attention of
//! depth `e`) or *absorbed* (project the queries, then attention of depth `r` straight over
//! `c`, shared by every head; values likewise, `P (c wv) = (P c) wv`). The algebra rules put
//! both in the output's e-class and the cost model prices them: absorbed reads `n·r` instead
//! of writing and reading `h·n·e` per projection — far cheaper for decoding (`m` small) — but
//! pays depth `r > e` on every one of the `m·n` scores, so prefill materializes. This module
//! labels the priced alternatives of the output class (see
//! [`crate::extract::Extraction::alternatives`]) so the trace can show the choice and the
//! costs it was made on.

use crate::analysis::AttnGraph;
use crate::extract::Alternative;
use crate::lang::Attn;
use egg::{Id, Language, RecExpr};
use serde::Serialize;
use std::fmt;

/// How one alternative forms its fused attention's keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatentForm {
    /// `absorbed` (projected queries against keys as stored) or `materialized` (keys
    /// computed by a product first).
    pub form: &'static str,
    /// Its estimated cycles (the alternative's tree cost).
    pub cycles: f64,
    /// Whether the optimizer chose it.
    pub chosen: bool,
    /// The attention's depth, and the shape of its keys.
    pub depth: usize,
    /// The shape of the keys the attention reads.
    pub keys: Vec<usize>,
}

impl fmt::Display for LatentForm {
    /// `absorbed: depth 512 over keys [65536, 512] as stored, 2.0e8 cycles (chosen)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.form == "absorbed" {
            "as stored"
        } else {
            "computed by a product"
        };
        write!(
            f,
            "{}: depth {} over keys {:?} {how}, {:.3e} cycles{}",
            self.form,
            self.depth,
            self.keys,
            self.cycles,
            if self.chosen { " (chosen)" } else { "" }
        )
    }
}

/// The latent forms among `alternatives` of the output class, cheapest first, when both an
/// absorbed and a materialized one were priced; empty otherwise.
pub fn latent_forms(egraph: &AttnGraph, alternatives: &[Alternative]) -> Vec<LatentForm> {
    let mut forms: Vec<LatentForm> = Vec::new();
    for alt in alternatives {
        let Some(form) = classify(egraph, &alt.expr) else {
            continue;
        };
        let form = LatentForm {
            cycles: alt.tree_cost,
            chosen: alt.chosen,
            ..form
        };
        // One line per form: the cheapest of each kind.
        match forms.iter_mut().find(|f| f.form == form.form) {
            Some(old) if old.cycles <= form.cycles && !form.chosen => {}
            Some(old) => *old = form,
            None => forms.push(form),
        }
    }
    let kinds = |name: &str| forms.iter().any(|f| f.form == name);
    if !(kinds("absorbed") && kinds("materialized")) {
        return Vec::new();
    }
    forms.sort_by(|a, b| a.cycles.total_cmp(&b.cycles));
    forms
}

/// The outermost fused attention of `expr`: absorbed when its keys are a parameter and its
/// queries a product, materialized when its keys are a product.
fn classify(egraph: &AttnGraph, expr: &RecExpr<Attn>) -> Option<LatentForm> {
    let nodes = expr.as_ref();
    // The e-class of every node of the term, for shapes.
    let mut classes: Vec<Option<Id>> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mapped: Option<Attn> = node
            .children()
            .iter()
            .all(|&c| classes[usize::from(c)].is_some())
            .then(|| {
                node.clone()
                    .map_children(|c| classes[usize::from(c)].unwrap_or(c))
            });
        classes.push(mapped.and_then(|n| egraph.lookup(n)));
    }
    let index = nodes.iter().rposition(|n| {
        matches!(
            n,
            Attn::Attention(_)
                | Attn::AttentionScored(_)
                | Attn::AttentionInt8(_)
                | Attn::AttentionBf16(_)
        )
    })?;
    let (q, k) = match &nodes[index] {
        Attn::Attention([q, k, ..])
        | Attn::AttentionScored([q, k, ..])
        | Attn::AttentionInt8([q, k, ..])
        | Attn::AttentionBf16([q, k, ..]) => (*q, *k),
        _ => return None,
    };
    let form = match (&expr[q], &expr[k]) {
        (Attn::MatMul(_), Attn::Input(_)) => "absorbed",
        (_, Attn::MatMul(_)) => "materialized",
        _ => return None,
    };
    let keys = classes[usize::from(k)].and_then(|c| egraph[c].data.shape.clone())?;
    let depth = *keys.last()?;
    Some(LatentForm {
        form,
        cycles: f64::NAN,
        chosen: false,
        depth,
        keys,
    })
}
