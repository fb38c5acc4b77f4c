//! The rewrite rules, one family per module, written as tables of [`RuleSpec`]s: a name, a
//! left and a right pattern, and a [`Guard`] (the side condition, checked on the e-class
//! analysis). Every applier is a plain pattern, so egg's explanations can be checked with
//! `check_proof`; the soundness of each rule is checked separately by property tests that
//! evaluate both sides with the interpreter (see `testkit`, used by each family's tests).

pub mod algebra;
pub mod approx;
pub mod linear;
pub mod lse;
pub mod masking;
pub mod prefix;
pub mod retention;
pub mod scored;
pub mod sink;
pub mod softmax;
#[cfg(test)]
mod testkit;

use crate::analysis::{matmul_shape, AttnGraph, ShapeAnalysis};
use crate::lang::Attn;
use egg::{Condition, ConditionalApplier, Id, Pattern, Rewrite, Subst, Var};

/// A rewrite of the optimizer's language.
pub type AttnRewrite = Rewrite<Attn, ShapeAnalysis>;

/// One rule of a family table.
#[derive(Clone, Debug)]
pub struct RuleSpec {
    /// The kebab-case name, prefixed by the family (`matmul-assoc`).
    pub name: &'static str,
    /// The pattern matched.
    pub lhs: &'static str,
    /// The pattern built.
    pub rhs: &'static str,
    /// The side condition.
    pub guard: Guard,
}

/// Side conditions, on the variables of the left pattern.
#[derive(Clone, Debug)]
pub enum Guard {
    /// No condition.
    Always,
    /// The class is a scalar (shape `[]`).
    Scalar(&'static str),
    /// `axis` is the last axis of `a @ b` (its rank is the larger of the two ranks).
    LastAxisOfProduct {
        /// Left factor.
        a: &'static str,
        /// Right factor.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
    },
    /// As `LastAxisOfProduct`, and `scale` is a scalar: fusion of a scaled score.
    ScaledLastAxis {
        /// Left factor.
        a: &'static str,
        /// Right factor.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
        /// The scale.
        scale: &'static str,
    },
    /// As `LastAxisOfProduct`, and `b` has the rank of the product (so `axis` is also its
    /// last axis): `sum(a @ b, -1) = a @ sum(b, -1)`.
    SumThroughProduct {
        /// Left factor.
        a: &'static str,
        /// Right factor.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
    },
    /// As `ScaledLastAxis` (with `b` the key, as in `a @ bᵀ`), and `bias` broadcasts into
    /// the score `a @ bᵀ` without enlarging it: the fused kernel reads it per tile.
    BiasedScore {
        /// The query.
        a: &'static str,
        /// The key.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
        /// The scale.
        scale: &'static str,
        /// The additive bias.
        bias: &'static str,
    },
    /// As `ScaledLastAxis`, and `cap` is a scalar: a softcapped score `cap tanh(s / cap)`.
    CappedScore {
        /// The query.
        a: &'static str,
        /// The key.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
        /// The scale.
        scale: &'static str,
        /// The cap.
        cap: &'static str,
    },
    /// `a @ b` is well-formed at the bound shapes (for the product a rule creates).
    ProductDefined {
        /// Left factor.
        a: &'static str,
        /// Right factor.
        b: &'static str,
    },
    /// `c` is a scalar or has size 1 along its last axis, so `c ⊙ A` scales whole rows of
    /// `A` and commutes with a product on the right.
    RowScale {
        /// The factor.
        c: &'static str,
        /// The scaled matrix.
        a: &'static str,
    },
    /// As `LastAxisOfProduct`, and `eps` is a finite scalar: a linear-attention normalizer
    /// `sum(·) + eps`.
    EpsNormalizer {
        /// Left factor.
        a: &'static str,
        /// Right factor.
        b: &'static str,
        /// The axis atom.
        axis: &'static str,
        /// The epsilon.
        eps: &'static str,
    },
    /// `a @ v` and `b @ v` are both well-formed (for distributing a product over a sum).
    ProductsDefined {
        /// The first term.
        a: &'static str,
        /// The second term.
        b: &'static str,
        /// The right factor.
        v: &'static str,
    },
    /// A scalar known to be positive and finite.
    PositiveScalar(&'static str),
    /// A scalar known to be finite.
    FiniteScalar(&'static str),
    /// `q` and `k` (bound by the scored searcher inside `s`) multiply as `q @ kᵀ` into exactly
    /// the shape of `s`, and `axis` is its last axis: the score is elementwise over that
    /// product without enlarging it.
    ScoredProduct {
        /// The score.
        s: &'static str,
        /// The softmax axis atom.
        axis: &'static str,
        /// The query.
        q: &'static str,
        /// The key.
        k: &'static str,
    },
    /// `c` is constant along `axis` of `x`, does not enlarge `x` by broadcasting, and is a finite
    /// constant or `max(x, axis)` (see `shift_is_safe`).
    RowConstant {
        /// The array.
        x: &'static str,
        /// The shift.
        c: &'static str,
        /// The softmax axis atom.
        axis: &'static str,
    },
    /// Decayed causal scores `mask((q kᵀ) * exp(slope * relpos(rows, cols)), causal, 0)`:
    /// `rows` and `cols` are the scores' last two dimensions, `slope` is a scalar or has size
    /// 1 in its last two axes and does not enlarge the scores; or gated scores
    /// `mask((q kᵀ) * exp(cq - ckᵀ), causal, 0)` (`slope` is `cq`): `cq` `[.., m, 1]` and
    /// `ck` `[.., n, 1]` over scores `[.., m, n]`, not enlarging them. `axis` (if given) is
    /// their last axis and `eps` (if given) a finite scalar. Checked by
    /// [`retention::DecayCheck`].
    CausalDecay {
        /// The query.
        q: &'static str,
        /// The key.
        k: &'static str,
        /// The log-decay slope, or the queries' log decay `cq`.
        slope: &'static str,
        /// How the log weight is formed.
        form: DecayForm,
        /// The normalizer's sum axis atom.
        axis: Option<&'static str>,
        /// The normalizer's epsilon.
        eps: Option<&'static str>,
    },
    /// `x` has exactly `rank` axes and the sink `s` broadcasts into its rows (`x`'s shape
    /// with the last axis 1) without enlarging them. Checked by `sink::rewrite`'s condition.
    SinkRows {
        /// The scores.
        x: &'static str,
        /// The sink logit.
        s: &'static str,
        /// The rank of `x` the rule's axis atom is written for.
        rank: usize,
    },
}

/// How the log weight of [`Guard::CausalDecay`] scores is formed.
#[derive(Clone, Copy, Debug)]
pub enum DecayForm {
    /// `slope * relpos(rows, cols)`, with the `relpos` row and column count atoms.
    Relpos {
        /// The `relpos` row count atom.
        rows: &'static str,
        /// The `relpos` column count atom.
        cols: &'static str,
    },
    /// `cq - ckᵀ` (`cq` is the guard's `slope`), with the keys' log decay `ck`.
    Gate {
        /// The keys' log decay.
        keys: &'static str,
    },
}

impl RuleSpec {
    /// A rule without side condition.
    pub const fn plain(name: &'static str, lhs: &'static str, rhs: &'static str) -> RuleSpec {
        RuleSpec {
            name,
            lhs,
            rhs,
            guard: Guard::Always,
        }
    }

    /// A rule with a side condition.
    pub const fn guarded(
        name: &'static str,
        lhs: &'static str,
        rhs: &'static str,
        guard: Guard,
    ) -> RuleSpec {
        RuleSpec {
            name,
            lhs,
            rhs,
            guard,
        }
    }

    /// The egg rewrite.
    pub fn to_rewrite(&self) -> AttnRewrite {
        if let Guard::ScoredProduct { s, q, k, .. } = self.guard {
            return scored::scored_rewrite(self, s, q, k);
        }
        if let Guard::CausalDecay { .. } = self.guard {
            return retention::rewrite(self);
        }
        if let Guard::SinkRows { .. } = self.guard {
            return sink::rewrite(self);
        }
        self.guarded_by(GuardCheck::new(&self.guard))
    }

    /// Its patterns as a rewrite whose applier holds only where `condition` does.
    fn guarded_by<C>(&self, condition: C) -> AttnRewrite
    where
        C: Condition<Attn, ShapeAnalysis> + Send + Sync + 'static,
    {
        let lhs: Pattern<Attn> = self
            .lhs
            .parse()
            .expect("invariant: rule patterns in the tables are valid");
        let rhs: Pattern<Attn> = self
            .rhs
            .parse()
            .expect("invariant: rule patterns in the tables are valid");
        let applier = ConditionalApplier {
            condition,
            applier: rhs,
        };
        Rewrite::new(self.name, lhs, applier).expect("invariant: rule variables are bound")
    }
}

/// Every exact rule, in family order.
pub fn all_specs() -> Vec<RuleSpec> {
    let mut specs = algebra::specs();
    specs.extend(softmax::specs());
    specs.extend(masking::specs());
    specs.extend(linear::specs());
    specs.extend(prefix::specs());
    specs.extend(retention::specs());
    specs.extend(scored::specs());
    specs.extend(lse::specs());
    specs.extend(sink::specs());
    specs
}

/// Every exact rule as egg rewrites.
pub fn all_rules() -> Vec<AttnRewrite> {
    all_specs().iter().map(RuleSpec::to_rewrite).collect()
}

/// A parsed variable.
fn var(name: &str) -> Var {
    name.parse()
        .expect("invariant: guard variables in the tables are valid")
}

/// A [`Guard`] with its variables parsed, as an egg [`Condition`].
#[derive(Clone, Debug)]
pub struct GuardCheck {
    kind: u8,
    vars: [Option<Var>; 5],
}

impl GuardCheck {
    /// Parses the variables of `guard`.
    fn new(guard: &Guard) -> GuardCheck {
        let (kind, names): (u8, [Option<&str>; 5]) = match guard {
            Guard::Always => (0, [None; 5]),
            Guard::Scalar(c) => (1, [Some(c), None, None, None, None]),
            Guard::LastAxisOfProduct { a, b, axis } => {
                (2, [Some(a), Some(b), Some(axis), None, None])
            }
            Guard::ScaledLastAxis { a, b, axis, scale } => {
                (2, [Some(a), Some(b), Some(axis), Some(scale), None])
            }
            Guard::SumThroughProduct { a, b, axis } => {
                (3, [Some(a), Some(b), Some(axis), None, None])
            }
            Guard::ProductDefined { a, b } => (4, [Some(a), Some(b), None, None, None]),
            Guard::RowConstant { x, c, axis } => (5, [Some(x), Some(c), Some(axis), None, None]),
            Guard::BiasedScore {
                a,
                b,
                axis,
                scale,
                bias,
            } => (6, [Some(a), Some(b), Some(axis), Some(scale), Some(bias)]),
            Guard::CappedScore {
                a,
                b,
                axis,
                scale,
                cap,
            } => (7, [Some(a), Some(b), Some(axis), Some(scale), Some(cap)]),
            Guard::PositiveScalar(c) => (8, [Some(c), None, None, None, None]),
            Guard::RowScale { c, a } => (11, [Some(c), Some(a), None, None, None]),
            Guard::ProductsDefined { a, b, v } => (13, [Some(a), Some(b), None, None, Some(v)]),
            Guard::EpsNormalizer { a, b, axis, eps } => {
                (12, [Some(a), Some(b), Some(axis), None, Some(eps)])
            }
            Guard::FiniteScalar(c) => (9, [Some(c), None, None, None, None]),
            Guard::ScoredProduct { s, axis, q, k } => {
                (10, [Some(q), Some(k), Some(axis), None, Some(s)])
            }
            // Built by `retention::rewrite`; here it fails closed.
            Guard::CausalDecay { .. } => (u8::MAX, [None; 5]),
            // Built by `sink::rewrite`; here it fails closed.
            Guard::SinkRows { .. } => (u8::MAX, [None; 5]),
        };
        GuardCheck {
            kind,
            vars: names.map(|n| n.map(var)),
        }
    }
}

/// The shape of the class bound to `v`.
fn shape_of(egraph: &AttnGraph, subst: &Subst, v: Option<Var>) -> Option<Vec<usize>> {
    let id: Id = *subst.get(v?)?;
    egraph[id].data.shape.clone()
}

/// The index atom of the class bound to `v`.
fn index_of(egraph: &AttnGraph, subst: &Subst, v: Option<Var>) -> Option<usize> {
    let id: Id = *subst.get(v?)?;
    egraph[id].data.atom?.as_index().map(|i| i as usize)
}

impl Condition<Attn, ShapeAnalysis> for GuardCheck {
    fn check(&self, egraph: &mut AttnGraph, _eclass: Id, subst: &Subst) -> bool {
        let [v0, v1, v2, v3, v4] = self.vars;
        if v3.is_some() && !shape_of(egraph, subst, v3).is_some_and(|s| s.is_empty()) {
            return false;
        }
        let s0 = || shape_of(egraph, subst, v0);
        let s1 = || shape_of(egraph, subst, v1);
        match self.kind {
            0 => true,
            1 => s0().is_some_and(|s| s.is_empty()),
            6 | 7 => {
                let (Some(a), Some(b), Some(axis)) = (s0(), s1(), index_of(egraph, subst, v2))
                else {
                    return false;
                };
                let Some(x) = transposed_last(&b).and_then(|bt| matmul_shape(&a, &bt)) else {
                    return false;
                };
                let Some(extra) = shape_of(egraph, subst, v4) else {
                    return false;
                };
                let fits = if self.kind == 6 {
                    broadcasts_into(&x, &extra)
                } else {
                    extra.is_empty()
                };
                axis + 1 == x.len() && fits
            }
            2 | 3 => {
                let (Some(a), Some(b), Some(axis)) = (s0(), s1(), index_of(egraph, subst, v2))
                else {
                    return false;
                };
                let rank = a.len().max(b.len());
                axis + 1 == rank && (self.kind == 2 || b.len() == rank)
            }
            4 => s0()
                .zip(s1())
                .is_some_and(|(a, b)| matmul_shape(&a, &b).is_some()),
            8 | 9 => {
                let konst = v0
                    .and_then(|v| subst.get(v))
                    .and_then(|&id| egraph[id].data.konst);
                s0().is_some_and(|s| s.is_empty())
                    && konst.is_some_and(|c| c.is_finite() && (self.kind == 9 || c > 0.0))
            }
            13 => {
                let v = shape_of(egraph, subst, v4);
                let both = s0().zip(s1()).zip(v);
                both.is_some_and(|((a, b), v)| {
                    matmul_shape(&a, &v).is_some() && matmul_shape(&b, &v).is_some()
                })
            }
            11 => {
                let (Some(c), Some(a)) = (s0(), s1()) else {
                    return false;
                };
                a.len() >= 2 && c.last().is_none_or(|&last| last == 1)
            }
            12 => {
                let (Some(a), Some(b), Some(axis)) = (s0(), s1(), index_of(egraph, subst, v2))
                else {
                    return false;
                };
                let eps = v4.and_then(|v| subst.get(v)).map(|&id| &egraph[id].data);
                let finite = eps.is_some_and(|e| {
                    e.shape.as_deref() == Some(&[]) && e.konst.is_some_and(f64::is_finite)
                });
                axis + 1 == a.len().max(b.len()) && finite
            }
            10 => {
                let (Some(q), Some(k), Some(axis)) = (s0(), s1(), index_of(egraph, subst, v2))
                else {
                    return false;
                };
                let product = transposed_last(&k).and_then(|kt| matmul_shape(&q, &kt));
                let score = shape_of(egraph, subst, v4);
                product.is_some() && product == score && axis + 1 == score.map_or(0, |s| s.len())
            }
            5 => {
                let (Some(x), Some(c), Some(axis)) = (s0(), s1(), index_of(egraph, subst, v2))
                else {
                    return false;
                };
                row_constant(&x, &c, axis) && shift_is_safe(egraph, subst, v0, v1, v2)
            }
            _ => false,
        }
    }

    fn vars(&self) -> Vec<Var> {
        self.vars.iter().flatten().copied().collect()
    }
}

/// Whether the row shift `c` of `softmax(x ± c)` may be dropped without changing which values
/// are NaN or infinite: a finite constant, or `max(x, axis)` itself, the stable-softmax idiom
/// (equal except on a row that is entirely `-inf`, where `-inf - -inf` makes the written form
/// NaN and `softmax` gives zeros: docs/language.md, "Rewrites"). Any other shift may be an
/// input holding NaN or ±inf, which the written form propagates and `softmax(x)` would drop.
fn shift_is_safe(
    egraph: &AttnGraph,
    subst: &Subst,
    x: Option<Var>,
    c: Option<Var>,
    axis: Option<Var>,
) -> bool {
    let class = |v: Option<Var>| v.and_then(|v| subst.get(v)).map(|&id| egraph.find(id));
    let (Some(x), Some(c), Some(axis)) = (class(x), class(c), class(axis)) else {
        return false;
    };
    if let Some(k) = egraph[c].data.konst {
        return k.is_finite();
    }
    egraph[c].nodes.iter().any(|node| match node {
        Attn::Max([a, ax]) => egraph.find(*a) == x && egraph.find(*ax) == axis,
        _ => false,
    })
}

/// `s` with its last two axes swapped.
fn transposed_last(s: &[usize]) -> Option<Vec<usize>> {
    let mut t = s.to_vec();
    let r = t.len();
    (r >= 2).then(|| {
        t.swap(r - 2, r - 1);
        t
    })
}

/// Whether `c` broadcast against `x` leaves `x`'s shape as is.
pub fn broadcasts_into(x: &[usize], c: &[usize]) -> bool {
    if c.len() > x.len() {
        return false;
    }
    let offset = x.len() - c.len();
    c.iter()
        .enumerate()
        .all(|(i, &size)| size == 1 || size == x[offset + i])
}

/// Whether `c` broadcast against `x` is constant along `axis` and leaves `x`'s shape as is.
pub fn row_constant(x: &[usize], c: &[usize], axis: usize) -> bool {
    if c.len() > x.len() || axis >= x.len() {
        return false;
    }
    let offset = x.len() - c.len();
    let fits = c
        .iter()
        .enumerate()
        .all(|(i, &size)| size == 1 || size == x[offset + i]);
    let along = axis < offset || c[axis - offset] == 1 || x[axis] == 1;
    fits && along
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_builds_and_names_are_unique_kebab_case() {
        let specs = all_specs();
        let mut names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        for name in &names {
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{name}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), specs.len());
        assert_eq!(all_rules().len(), specs.len());
    }

    #[test]
    fn row_constant_shapes() {
        assert!(row_constant(&[2, 3, 4], &[2, 3, 1], 2));
        assert!(row_constant(&[2, 3, 4], &[], 2));
        assert!(!row_constant(&[2, 3, 4], &[4], 2));
        assert!(!row_constant(&[3, 4], &[2, 3, 1], 1));
    }
}
