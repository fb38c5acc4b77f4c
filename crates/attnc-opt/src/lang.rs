//! The e-graph language: one node per IR op, leaf atoms for non-child data, mask patterns as
//! small trees, and the fused "kernel form" nodes the extractor may pick.
//!
//! Non-child data is spelled as leaf [`Atom`]s so rules can match and rebuild it with plain
//! patterns (which keeps every rule checkable by egg's `check_proof`):
//!
//! ```text
//! (softmax (div (matmul q (transpose k)) (sqrt (dim d))) 2)
//! (mask s (and causal (window 256)) -inf)
//! (attention q k v scale (and causal (window 256)))
//! (attention-scored q k v (add (div (matmul q (transpose k)) c) b) causal)
//! ```
//!
//! `(input q)` is kernel parameter `q`; `(const 0.5)` is a scalar; `(dim d)` is the value of a
//! dimension symbol; `(fill 1 h n)` is an array of ones of shape `[h, n]`; reductions and
//! softmax take their (already normalized) axis as a number atom.

use egg::{define_language, Id, Symbol};
use std::fmt;
use std::str::FromStr;

/// A leaf carrying data: a number (stored as f64 bits so it can be hashed and ordered) or a
/// name (a parameter, a dimension symbol or a storage type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Atom {
    /// A number: a constant, a fill value, an axis, a window size.
    Num(NumBits),
    /// A name: a parameter, a dimension symbol, a dtype keyword.
    Name(Symbol),
}

/// An f64 stored by its bits, so `-inf` and `NaN` are ordinary hashable atoms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NumBits(pub u64);

impl NumBits {
    /// The stored value.
    pub fn value(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl Atom {
    /// A number atom.
    pub fn num(value: f64) -> Atom {
        Atom::Num(NumBits(value.to_bits()))
    }

    /// The number, if this is a number atom.
    pub fn as_num(&self) -> Option<f64> {
        match self {
            Atom::Num(bits) => Some(bits.value()),
            Atom::Name(_) => None,
        }
    }

    /// The number as a non-negative integer (axes, sizes).
    pub fn as_index(&self) -> Option<u64> {
        let v = self.as_num()?;
        (v >= 0.0 && v.fract() == 0.0 && v < 9.0e15).then_some(v as u64)
    }

    /// The name, if this is a name atom.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Atom::Name(s) => Some(s.as_str()),
            Atom::Num(_) => None,
        }
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Num(bits) => {
                let v = bits.value();
                if v.fract() == 0.0 && v.abs() < 1e15 {
                    write!(f, "{}", v as i64)
                } else {
                    write!(f, "{v:?}")
                }
            }
            Atom::Name(s) => write!(f, "{s}"),
        }
    }
}

impl FromStr for Atom {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Atom, Self::Err> {
        Ok(match s.parse::<f64>() {
            Ok(v) => Atom::num(v),
            Err(_) => Atom::Name(Symbol::from(s)),
        })
    }
}

define_language! {
    /// The optimizer's language (see the module docs for the spelling). The macro takes no
    /// per-variant docs; each variant is its op's spelling, documented above.
    #[allow(missing_docs)]
    pub enum Attn {
        // ---- leaves of the dataflow ----
        "input" = Input(Id),
        "const" = Const(Id),
        "dim" = DimValue(Id),
        "fill" = Fill(Box<[Id]>),
        "relpos" = RelPos([Id; 2]),
        // ---- elementwise ----
        "neg" = Neg(Id),
        "exp" = Exp(Id),
        "log" = Log(Id),
        "sqrt" = Sqrt(Id),
        "rsqrt" = Rsqrt(Id),
        "tanh" = Tanh(Id),
        "sigmoid" = Sigmoid(Id),
        "relu" = Relu(Id),
        "elu" = Elu(Id),
        "abs" = Abs(Id),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "maximum" = Maximum([Id; 2]),
        "minimum" = Minimum([Id; 2]),
        // ---- structure ----
        "matmul" = MatMul([Id; 2]),
        "transpose" = Transpose(Id),
        "sum" = Sum([Id; 2]),
        "max" = Max([Id; 2]),
        "mean" = Mean([Id; 2]),
        "softmax" = Softmax([Id; 2]),
        // log(sum(exp(x), axis)), stable, keeping the axis (x, axis)
        "logsumexp" = LogSumExp([Id; 2]),
        // softmax over the last axis with one extra logit s in the denominator (x, s)
        "softmax-sink" = SoftmaxSink([Id; 2]),
        // blocks of b consecutive rows pooled by mean / maximum (x, b: a size atom)
        "mean-pool" = MeanPool([Id; 2]),
        "max-pool" = MaxPool([Id; 2]),
        // inclusive running sum along an axis (x, axis)
        "cumsum" = Cumsum([Id; 2]),
        "mask" = Mask([Id; 3]),
        "cast" = Cast([Id; 2]),
        // a seeded random matrix: kind name, seed, rows, cols (approximations only)
        "random" = Random([Id; 4]),
        // the operand, an attention, may run with int8 products (approximations only)
        "int8-products" = Int8Products(Id),
        // the operand, an attention, may run with bf16 products (approximations only)
        "bf16-products" = Bf16Products(Id),
        // ---- mask patterns ----
        "all" = All,
        "causal" = Causal,
        "window" = Window(Id),
        "dilated" = Dilated([Id; 2]),
        "global" = Global(Id),
        "block" = Block(Id),
        // document(qseg, kseg): the children are the i32 segment-id arrays (one array twice
        // for `document(seg)`), so fusing a mask carries them along as values
        "document" = Document([Id; 2]),
        // topk_blocks(g, k, b): the gate array (a value, carried along like segment ids), then
        // the numbers k and b
        "topk-blocks" = TopkBlocks([Id; 3]),
        "and" = And([Id; 2]),
        "or" = Or([Id; 2]),
        // ---- kernel forms ----
        // softmax(mask((q @ kᵀ) * scale, pattern)) @ v, computed online without the score matrix
        "attention" = Attention([Id; 5]),
        // softmax(mask(score, pattern)) @ v where score is an elementwise tree over one q @ kᵀ
        // (scalars, relpos and broadcast bias parameters at the other leaves), computed online
        "attention-scored" = AttentionScored([Id; 5]),
        // logsumexp(mask((q @ kᵀ) * scale, pattern), -1): the log-sum-exp an `attention` over
        // the same q, k, scale and pattern computes from its running maximum and sum
        "attention-lse" = AttentionLse([Id; 4]),
        // logsumexp(mask(score, pattern), -1) for a score `attention-scored` takes (q k score
        // pattern): computed beside that attention, or online alone, without the score matrix
        "attention-lse-scored" = AttentionLseScored([Id; 4]),
        // a kernel's several results, in order (the root of a kernel returning a tuple)
        "outputs" = Outputs(Box<[Id]>),
        // (φq (φkᵀ v)) / (φq sum(φkᵀ, -1) + eps): linear attention through the [d, dv] key-value
        // state (q k v eps, eps a scalar)
        "linear-attention" = LinearAttention([Id; 4]),
        // mask(q kᵀ, causal, 0) v / (sum(mask(q kᵀ, causal, 0), -1) + eps): causal linear
        // attention through a running [d, dv] prefix state (queries end-aligned to the keys)
        "linear-attention-causal" = LinearAttentionCausal([Id; 4]),
        // mask(q kᵀ, causal, 0) v: the unnormalized causal form, through the same prefix state
        "causal-prefix-product" = CausalPrefixProduct([Id; 3]),
        // mask((q kᵀ) * exp(a * relpos(m, n)), causal, 0) v: retention, through a prefix state
        // that decays by exp(-a) per key (q k v a; a a scalar or one per batch entry)
        "retention" = Retention([Id; 4]),
        // the same over (sum(mask((q kᵀ) * exp(a * relpos), causal, 0), -1) + eps)
        // (q k v a eps)
        "retention-normalized" = RetentionNormalized([Id; 5]),
        // mask((q kᵀ) * exp(cq - ckᵀ), causal, 0) v: gated decay, cq = [.., m, 1] and
        // ck = [.., n, 1] running sums of log gates (one c twice when m = n), through a prefix
        // state decaying by exp(ck_j - ck_{j-1}) at key j (q k v cq ck)
        "gated-retention" = GatedRetention([Id; 5]),
        // the same over (sum(mask((q kᵀ) * exp(cq - ckᵀ), causal, 0), -1) + eps)
        // (q k v cq ck eps)
        "gated-retention-normalized" = GatedRetentionNormalized([Id; 6]),
        // `attention` with int8 q·k and p·v products (per-block scales, f32 softmax); approximate
        "attention-int8" = AttentionInt8([Id; 5]),
        // `attention` with bf16 q·k and p·v products (f32 accumulation and softmax); approximate
        "attention-bf16" = AttentionBf16([Id; 5]),
        // Performer FAVOR+ positive random features of queries (x, seed, m): exp(x wᵀ - |x|²/2)
        // shifted by its row maximum (a per-query factor the normalization cancels)
        "favor-query" = FavorQuery([Id; 3]),
        // the same features of keys, shifted by one maximum over all keys (cancelled likewise)
        "favor-key" = FavorKey([Id; 3]),
        // Linformer: e @ x with e a seeded [r, n] Gaussian projection along the rows (x, seed, r)
        "project-rows" = ProjectRows([Id; 3]),
        // Nyström: the pseudo-inverse of each [.., a, c] matrix x, as a fixed number of
        // Newton–Schulz iterations (x); written out as plain IR products
        "nystrom-pinv" = NystromPinv(Id),
        // ---- data ----
        Leaf(Atom),
    }
}

impl Attn {
    /// The atom, if this node is a leaf.
    pub fn atom(&self) -> Option<Atom> {
        match self {
            Attn::Leaf(a) => Some(*a),
            _ => None,
        }
    }

    /// True for the nodes that describe mask patterns.
    pub fn is_pattern(&self) -> bool {
        matches!(
            self,
            Attn::All
                | Attn::Causal
                | Attn::Window(_)
                | Attn::Dilated(_)
                | Attn::Global(_)
                | Attn::Block(_)
                | Attn::Document(_)
                | Attn::TopkBlocks(_)
                | Attn::And(_)
                | Attn::Or(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egg::RecExpr;

    #[test]
    fn atoms_round_trip_through_text() {
        for text in ["2", "-inf", "0.125", "NaN", "q", "f16"] {
            let atom: Atom = text.parse().expect("infallible");
            assert_eq!(atom.to_string(), text);
        }
        assert_eq!(Atom::num(3.0).as_index(), Some(3));
        assert_eq!(Atom::num(-1.0).as_index(), None);
    }

    #[test]
    fn expressions_parse_and_print() {
        let text = "(attention (input q) (input k) (input v) (const 1) (and causal (window 256)))";
        let expr: RecExpr<Attn> = text.parse().expect("valid");
        assert_eq!(expr.to_string(), text);
        let masked: RecExpr<Attn> = "(mask (input s) causal -inf)".parse().expect("valid");
        assert_eq!(masked.to_string(), "(mask (input s) causal -inf)");
    }
}
