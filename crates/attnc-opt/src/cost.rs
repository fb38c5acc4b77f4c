//! The cost model: estimated cycles from FLOPs and DRAM bytes at the bound shapes.
//!
//! The ceilings are a [`Ceilings`] value: by default the target machine of DESIGN.md, about
//! 50 GFLOP/s per core for f32x4 FMA code and about 12 GB/s of DRAM bandwidth, at an assumed
//! 3 GHz clock: 50/3 ≈ 16.7 FLOP and 12/3 = 4 bytes per cycle; the facade passes this
//! machine's measured figures instead. A node costs `flops / 16.7 + bytes / 4` cycles, where bytes
//! count reading its array operands and writing its result in f32. Compute and traffic are
//! added rather than overlapped: the model ranks forms, it does not predict run time.
//!
//! The fused attention node costs its FLOPs only on the fraction of (i, j) its mask pattern
//! keeps (counted on up to [`SAMPLED_ROWS`] evenly spaced query rows at the bound m, n) and
//! no `m × n` bytes (`attention-scored` also computes its score tree in registers, so the
//! score child — `q @ kᵀ` and its elementwise epilogue — is not charged: see
//! [`charged_children`]); the linear-attention node costs its state products and no `n × n` work.
//! A scalar scale of a matrix product is free (an epilogue), so the model never prefers
//! `(q c) kᵀ` over `(q kᵀ) c`: the latter is the score form the JIT fuses.

use crate::analysis::{facts_of, AttnGraph};
use crate::ceilings::{Ceilings, TierSpeeds};
use crate::convert;
use crate::lang::Attn;
use attnc_ir::MaskPattern;
use egg::{CostFunction, Id, Language, RecExpr};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Bytes per element (f32).
pub const ELEMENT_BYTES: f64 = 4.0;
/// FLOPs per softmax element: max, subtract, exp (as a polynomial), sum, divide.
pub const SOFTMAX_FLOPS: f64 = 12.0;
/// FLOPs per kept score element for the elementwise score of `attention-scored` (a bias
/// add, a scale, a polynomial tanh), computed in registers.
pub const SCORE_FLOPS: f64 = 8.0;
/// How many more multiply-adds per instruction int8 products (`vpdpbusd`: 16 per 128-bit
/// register) do than f32x4 FMA (4), at the same issue rate (two per cycle each on the
/// target). The int8 kernel's Q is 16-bit (two `vpdpbusd` per product), so its `q · k`
/// products gain half of this; `p · v` gains all of it.
pub const INT8_PRODUCT_SPEEDUP: f64 = 4.0;
/// How much faster bf16 tile products (AMX) run than f32 FMAs of the same count: the measured
/// dense kernels, 0.049 s against 0.128 s at h = 8, n = 4096, d = 64 on 2 threads, rounded down.
pub const BF16_PRODUCT_SPEEDUP: f64 = 2.5;
/// How much faster the portable int8 kernel runs dense attention than the portable f32 kernel
/// under this model (2.6× measured): the unit AMX int8 speeds are rescaled from.
pub const INT8_PORTABLE_SPEEDUP: f64 = 2.6;
/// FLOP-equivalents per kept score element of the int8 kernel's softmax and quantization of
/// P. Small: that work runs mostly on execution ports the `vpdpbusd` products leave free,
/// whereas the exact kernel's exponentials compete with its FMAs ([`SOFTMAX_FLOPS`]).
pub const INT8_SOFTMAX_FLOPS: f64 = 3.0;
/// FLOP-equivalents per element of Q, K and V for the int8 kernel's host pre-pass (scales,
/// rounding, packing). It is what keeps int8 from paying on narrow windows, where each key is
/// used by few queries. This and [`INT8_SOFTMAX_FLOPS`] are fitted to the kernel's speedups
/// measured at h = 8, n = 4096, d = 64 on one thread: 2.6× dense, 1.43× causal window(256).
pub const INT8_PREPASS_FLOPS: f64 = 96.0;
/// Keys per block of the int8 kernel: a block the mask reaches is computed whole.
pub const INT8_KEY_BLOCK: usize = 32;
/// Query rows sampled to estimate the kept fraction of a mask pattern.
pub const SAMPLED_ROWS: usize = 32;

/// The fraction of the `m × n` positions `pattern` keeps, counted on sampled rows.
pub fn kept_fraction(pattern: &MaskPattern, m: usize, n: usize) -> f64 {
    if m == 0 || n == 0 {
        return 0.0;
    }
    let rows = m.min(SAMPLED_ROWS);
    let mut kept = 0usize;
    for r in 0..rows {
        let i = r * m / rows;
        kept += (0..n).filter(|&j| pattern.keeps(i, j, m, n)).count();
    }
    kept as f64 / (rows * n) as f64
}

/// The fraction of the `m × n` positions a kernel computes when it visits `pattern` in key
/// blocks of `block`: every block holding a kept position counts whole.
pub fn kept_block_fraction(pattern: &MaskPattern, m: usize, n: usize, block: usize) -> f64 {
    if m == 0 || n == 0 {
        return 0.0;
    }
    let block = block.max(1);
    let rows = m.min(SAMPLED_ROWS);
    let mut computed = 0usize;
    for r in 0..rows {
        let i = r * m / rows;
        for j0 in (0..n).step_by(block) {
            let j1 = (j0 + block).min(n);
            if (j0..j1).any(|j| pattern.keeps(i, j, m, n)) {
                computed += j1 - j0;
            }
        }
    }
    computed as f64 / (rows * n) as f64
}

/// The number of elements of a shape.
fn elements(shape: &[usize]) -> f64 {
    shape.iter().map(|&s| s as f64).product()
}

/// FLOPs and bytes per cycle of `ceilings` (the defaults when they are not valid).
fn rates(ceilings: &Ceilings) -> (f64, f64) {
    let c = ceilings.or_default();
    (c.flops_per_cycle(), c.bytes_per_cycle())
}

/// Kept fractions by (pattern, m, n, key block; 1 for single positions), shared between the
/// cost functions of one optimization.
type FractionCache = Rc<RefCell<HashMap<(MaskPattern, usize, usize, usize), f64>>>;

/// The cycle cost model as an egg cost function over one e-graph.
pub struct CycleCost<'a> {
    egraph: &'a AttnGraph,
    fractions: FractionCache,
    /// FLOPs and bytes per cycle, from the ceilings.
    rates: (f64, f64),
    /// How much faster the full-width tiers run their kinds of step.
    tiers: TierSpeeds,
}

impl<'a> CycleCost<'a> {
    /// A cost function reading shapes from `egraph`.
    pub fn new(egraph: &'a AttnGraph) -> CycleCost<'a> {
        CycleCost {
            egraph,
            fractions: Rc::default(),
            rates: rates(&Ceilings::default()),
            tiers: TierSpeeds::default(),
        }
    }

    /// This cost function with the full-width tiers' speeds (non-positive: absent).
    pub fn with_tiers(mut self, tiers: TierSpeeds) -> CycleCost<'a> {
        self.tiers = tiers;
        self
    }

    /// How much faster than portable f32x4 code the compute of `enode` runs on the tiers
    /// this machine has (1: portable code).
    fn speedup(&self, enode: &Attn) -> f64 {
        let faster = |s: f64| if s.is_finite() && s > 1.0 { s } else { 1.0 };
        match enode {
            Attn::Attention(_)
            | Attn::AttentionScored(_)
            | Attn::MatMul(_)
            | Attn::LinearAttention(_) => faster(self.tiers.wide),
            // Without AMX the exact kernel runs: the same speed as `attention`.
            Attn::AttentionBf16(_) => {
                faster(self.tiers.amx_bf16).max(faster(self.tiers.wide) * BF16_PRODUCT_SPEEDUP)
                    / BF16_PRODUCT_SPEEDUP
            }
            // Priced below as the portable int8 kernel; AMX replaces it when present.
            Attn::AttentionInt8(_) if self.tiers.amx_int8 > 0.0 => {
                faster(self.tiers.amx_int8) / INT8_PORTABLE_SPEEDUP
            }
            _ => 1.0,
        }
    }

    /// This cost function with the rates of `ceilings` (invalid figures: the defaults).
    pub fn with_ceilings(mut self, ceilings: &Ceilings) -> CycleCost<'a> {
        self.rates = rates(ceilings);
        self
    }

    /// A second cost function over the same e-graph sharing this one's cache of mask
    /// fractions (the extractor consumes the first).
    pub fn sharing(&self) -> CycleCost<'a> {
        CycleCost {
            egraph: self.egraph,
            fractions: Rc::clone(&self.fractions),
            rates: self.rates,
            tiers: self.tiers,
        }
    }

    /// The kept fraction of the pattern class `id` (cached by pattern and size).
    fn fraction(&mut self, id: Id, m: usize, n: usize) -> f64 {
        self.block_fraction(id, m, n, 1)
    }

    /// [`kept_block_fraction`] of the pattern of class `id` (cached).
    fn block_fraction(&mut self, id: Id, m: usize, n: usize, block: usize) -> f64 {
        let Some(Some(pattern)) = convert::pattern_from_class(self.egraph, id) else {
            return 1.0;
        };
        // Sizes from dimension symbols at the bound values (an unbound one prices as dense).
        let Ok(pattern) = pattern.resolve(&self.egraph.analysis.bindings) else {
            return 1.0;
        };
        let key = (pattern, m, n, block);
        if let Some(&f) = self.fractions.borrow().get(&key) {
            return f;
        }
        let f = if block <= 1 {
            kept_fraction(&key.0, m, n)
        } else {
            kept_block_fraction(&key.0, m, n, block)
        };
        self.fractions.borrow_mut().insert(key, f);
        f
    }

    /// Whether `a ⊙ b` scales a matrix product `a` by a scalar `b`.
    fn is_product_epilogue(&self, a: Id, b: Id) -> bool {
        self.egraph[b].data.shape.as_deref() == Some(&[])
            && self.egraph[a]
                .nodes
                .iter()
                .any(|n| matches!(n, Attn::MatMul(_)))
    }

    /// The cycles of one e-node, excluding its children.
    pub fn node_cycles(&mut self, enode: &Attn) -> f64 {
        let shape = |id: Id| self.egraph[id].data.shape.clone().unwrap_or_default();
        let facts = facts_of(self.egraph, enode);
        // A value whose shape does not resolve (a product a rule built over operands that do
        // not multiply) is never a choice.
        // A kernel's list of results costs nothing beyond them.
        if matches!(enode, Attn::Outputs(_)) {
            return 0.0;
        }
        let value = !matches!(enode, Attn::Leaf(_)) && !enode.is_pattern();
        if value && facts.shape.is_none() {
            return f64::INFINITY;
        }
        let out = facts.shape.unwrap_or_default();
        let out_elems = elements(&out);
        let operand_bytes: f64 = enode
            .children()
            .iter()
            .map(|&c| elements(&shape(c)))
            .sum::<f64>()
            * ELEMENT_BYTES;
        let streamed = operand_bytes + out_elems * ELEMENT_BYTES;
        let (flops, bytes) = match enode {
            Attn::Leaf(_) | Attn::Input(_) | Attn::Const(_) | Attn::DimValue(_) => (0.0, 0.0),
            // Scalar subtrees (`1 / sqrt(d)`) are folded to one constant at compile time.
            _ if out.is_empty() => (0.0, 0.0),
            n if n.is_pattern() => (0.0, 0.0),
            Attn::Fill(_) | Attn::RelPos(_) | Attn::Random(_) => (0.0, out_elems * ELEMENT_BYTES),
            // x wᵀ, the squared norm, the maximum, the shifted exponential.
            Attn::FavorQuery([x, _, _]) | Attn::FavorKey([x, _, _]) => {
                let d = shape(*x).last().copied().unwrap_or(0) as f64;
                (out_elems * (2.0 * d + SOFTMAX_FLOPS), streamed)
            }
            // e @ x with e: [r, n].
            Attn::ProjectRows([x, _, _]) => {
                let n = shape(*x).iter().rev().nth(1).copied().unwrap_or(0) as f64;
                (2.0 * out_elems * n, streamed)
            }
            // Per Newton–Schulz iteration, four products of [a, c] and [c, a] matrices.
            Attn::NystromPinv(x) => {
                let s = shape(*x);
                let c = s.last().copied().unwrap_or(0) as f64;
                let a = s.iter().rev().nth(1).copied().unwrap_or(0) as f64;
                let per_iteration = 8.0 * out_elems * a.max(c);
                let iterations = crate::rules::approx::PINV_ITERATIONS as f64;
                (iterations * per_iteration, iterations * 6.0 * streamed)
            }
            // A marker: the work is in its operand.
            Attn::Int8Products(_) | Attn::Bf16Products(_) => (0.0, 0.0),
            Attn::Transpose(_) => (0.0, streamed),
            Attn::MatMul([a, _]) => {
                let inner = shape(*a).last().copied().unwrap_or(0) as f64;
                (2.0 * out_elems * inner, streamed)
            }
            Attn::Softmax(_) | Attn::SoftmaxSink(_) => (SOFTMAX_FLOPS * out_elems, 2.0 * streamed),
            Attn::Sum([x, _]) | Attn::Max([x, _]) | Attn::Mean([x, _]) => {
                (elements(&shape(*x)), streamed)
            }
            // A maximum, then an exponential and a sum per element.
            Attn::LogSumExp([x, _]) => (SOFTMAX_FLOPS * elements(&shape(*x)), 2.0 * streamed),
            // Written from the running maximum and sum of the attention beside it (one more
            // store per row); the rows are read once more when it runs alone.
            Attn::AttentionLse([q, k, _, _]) => (
                out_elems,
                (elements(&shape(*q)) + elements(&shape(*k))) * ELEMENT_BYTES,
            ),
            // As `attention-lse`, and its score's few operations per row (so a plain scaled
            // score keeps the plain node).
            Attn::AttentionLseScored([q, k, _, _]) => (
                out_elems * (1.0 + SCORE_FLOPS),
                (elements(&shape(*q)) + elements(&shape(*k))) * ELEMENT_BYTES,
            ),
            Attn::Attention([q, k, v, _, p])
            | Attn::AttentionScored([q, k, v, _, p])
            | Attn::AttentionInt8([q, k, v, _, p])
            | Attn::AttentionBf16([q, k, v, _, p]) => {
                let (qs, ks, vs) = (shape(*q), shape(*k), shape(*v));
                let m = qs.iter().rev().nth(1).copied().unwrap_or(0);
                let d = qs.last().copied().unwrap_or(0) as f64;
                let n = ks.iter().rev().nth(1).copied().unwrap_or(0);
                let dv = vs.last().copied().unwrap_or(0) as f64;
                let batch = if m == 0 {
                    0.0
                } else {
                    out_elems / (m as f64 * dv.max(1.0))
                };
                let score = match enode {
                    Attn::AttentionScored(_) => SCORE_FLOPS,
                    _ => 0.0,
                };
                let flops = match enode {
                    Attn::AttentionInt8(_) => {
                        let fraction = self.block_fraction(*p, m, n, INT8_KEY_BLOCK);
                        let pairs = batch * m as f64 * n as f64 * fraction;
                        let prepass =
                            (elements(&qs) + elements(&ks) + elements(&vs)) * INT8_PREPASS_FLOPS;
                        pairs
                            * (2.0 * d / (INT8_PRODUCT_SPEEDUP / 2.0)
                                + 2.0 * dv / INT8_PRODUCT_SPEEDUP
                                + INT8_SOFTMAX_FLOPS)
                            + prepass
                    }
                    Attn::AttentionBf16(_) => {
                        let pairs = batch * m as f64 * n as f64 * self.fraction(*p, m, n);
                        pairs * ((2.0 * d + 2.0 * dv) / BF16_PRODUCT_SPEEDUP + SOFTMAX_FLOPS)
                    }
                    _ => {
                        let pairs = batch * m as f64 * n as f64 * self.fraction(*p, m, n);
                        pairs * (2.0 * d + 2.0 * dv + SOFTMAX_FLOPS + score)
                    }
                };
                let bytes =
                    (elements(&qs) + elements(&ks) + elements(&vs) + out_elems) * ELEMENT_BYTES;
                (flops, bytes)
            }
            // The causal form runs the same products through a running prefix state.
            // A decayed state is scaled once per key as well.
            Attn::LinearAttention([q, k, v, _])
            | Attn::LinearAttentionCausal([q, k, v, _])
            | Attn::CausalPrefixProduct([q, k, v])
            | Attn::Retention([q, k, v, _])
            | Attn::RetentionNormalized([q, k, v, _, _])
            | Attn::GatedRetention([q, k, v, _, _])
            | Attn::GatedRetentionNormalized([q, k, v, _, _, _]) => {
                let (qs, ks, vs) = (shape(*q), shape(*k), shape(*v));
                let dv = vs.last().copied().unwrap_or(0) as f64;
                let decay = match enode {
                    Attn::Retention(_)
                    | Attn::RetentionNormalized(_)
                    | Attn::GatedRetention(_)
                    | Attn::GatedRetentionNormalized(_) => dv + 1.0,
                    _ => 0.0,
                };
                // kᵀ v and sum(kᵀ): per key row; q state and q ksum: per query row.
                let flops = elements(&ks) * (2.0 * dv + 1.0 + decay)
                    + elements(&qs) * (2.0 * dv + 2.0)
                    + out_elems;
                let state =
                    elements(&ks) / ks.iter().rev().nth(1).copied().unwrap_or(1).max(1) as f64;
                let bytes =
                    (elements(&qs) + elements(&ks) + elements(&vs) + out_elems + state * dv)
                        * ELEMENT_BYTES;
                (flops, bytes)
            }
            // A scalar scale of a product is the product's epilogue (the matmul and attention
            // kernels apply it in registers), so folding the scale into an operand never pays.
            Attn::Mul([a, b]) | Attn::Div([a, b]) if self.is_product_epilogue(*a, *b) => (0.0, 0.0),
            // Elementwise ops, masks and casts: one operation per output element.
            _ => (out_elems, streamed),
        };
        flops / (self.rates.0 * self.speedup(enode)) + bytes / self.rates.1
    }

    /// The cost of `expr` as a DAG (each distinct node counted once), with shapes from this
    /// cost function's e-graph, into which `expr` must have been added; `None` when a node of
    /// `expr` is not in the e-graph.
    pub fn dag_cycles(&mut self, expr: &RecExpr<Attn>) -> Option<f64> {
        let nodes = expr.as_ref();
        // Only nodes reachable from the root other than through a fused score are charged.
        let mut charged = vec![false; nodes.len()];
        if let Some(last) = charged.last_mut() {
            *last = true;
        }
        for index in (0..nodes.len()).rev() {
            if charged[index] {
                for c in charged_children(&nodes[index]) {
                    charged[usize::from(c)] = true;
                }
            }
        }
        let mut ids: Vec<Id> = Vec::with_capacity(nodes.len());
        let mut seen = std::collections::HashSet::new();
        let mut total = 0.0;
        for (index, node) in nodes.iter().enumerate() {
            let mapped = node.clone().map_children(|c| ids[usize::from(c)]);
            ids.push(self.egraph.lookup(mapped.clone())?);
            if charged[index] && seen.insert(mapped.clone()) {
                total += self.node_cycles(&mapped);
            }
        }
        Some(total)
    }
}

/// The children whose cost a node pays: all of them, except the score of `attention-scored`,
/// which the fused kernel computes tile by tile in registers (its FLOPs are in the node's own
/// cost; its `m × n` bytes are never written).
pub fn charged_children(enode: &Attn) -> Vec<Id> {
    match enode {
        Attn::AttentionScored([q, k, v, _, p]) => vec![*q, *k, *v, *p],
        Attn::AttentionLseScored([q, k, _, p]) => vec![*q, *k, *p],
        _ => enode.children().to_vec(),
    }
}

impl CostFunction<Attn> for CycleCost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &Attn, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = self.node_cycles(enode);
        charged_children(enode)
            .iter()
            .fold(own, |sum, &id| sum + costs(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_fractions_count_every_block_the_pattern_reaches() {
        let window = MaskPattern::And(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Window(256)),
        );
        let (m, n) = (4096, 4096);
        let kept = kept_fraction(&window, m, n);
        let blocks = kept_block_fraction(&window, m, n, INT8_KEY_BLOCK);
        // About 257 kept keys per row, computed in 32-key blocks: 9 or 10 blocks.
        assert!(blocks > kept && blocks < kept * 1.25, "{kept} {blocks}");
        assert_eq!(kept_block_fraction(&window, m, n, 1), kept);
        // A dense pattern computes everything at any block size; nothing, nothing.
        assert_eq!(
            kept_block_fraction(&MaskPattern::Window(n as u64), m, n, 32),
            1.0
        );
        assert_eq!(kept_block_fraction(&window, 0, n, 32), 0.0);
    }
}
