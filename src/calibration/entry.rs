//! Validating on one batch entry: where a kernel computes each entry of its leading axis on
//! its own, the calibration sample (rows of the first entry) is the same whether the plan runs
//! all entries or only that one, so both plans are compiled for the sample with the leading
//! dimension bound to 1.
//!
//! Plans that end in a fused attention compute only the sampled rows anyway; the others
//! (Performer's linear attention, Nyström's landmark products) would otherwise run every head
//! of every step to compare 256 rows of one.

use crate::io::{Tensor, TensorData};
use attnc_ir::dim::Dim;
use attnc_ir::{Bindings, Kernel, Op, Param};

/// `bindings` with the kernel's leading batch dimension bound to 1, when `kernel` computes
/// each entry along it on its own and it is bound to more than 1; `None` otherwise.
pub fn one_entry_bindings(kernel: &Kernel, bindings: &Bindings) -> Option<(String, Bindings)> {
    let symbol = leading_symbol(kernel)?;
    if bindings.get(&symbol).copied().unwrap_or(0) <= 1 || !separable_along(kernel, &symbol) {
        return None;
    }
    let mut one = bindings.clone();
    one.insert(symbol.clone(), 1);
    Some((symbol, one))
}

/// The symbol every output's first axis is, if they share one.
fn leading_symbol(kernel: &Kernel) -> Option<String> {
    let mut symbols = kernel.outputs().into_iter().map(|output| {
        match kernel.graph.node(output.node).shape.first() {
            Some(Dim::Sym(s)) => Some(s.clone()),
            _ => None,
        }
    });
    let first = symbols.next()??;
    symbols
        .all(|s| s.as_deref() == Some(first.as_str()))
        .then_some(first)
}

/// Whether every node of `kernel` keeps the entries along `symbol` apart: the symbol appears
/// only as the first axis of nodes of rank 3 or more (matrix products, transposes, masks and
/// pools act on the last two axes; broadcasting aligns the last axes), no reduction, softmax
/// or running sum runs along it, and no op names it otherwise (a dimension's value, a pattern
/// or pool size, a filled shape).
pub fn separable_along(kernel: &Kernel, symbol: &str) -> bool {
    let named = format!("Sym({symbol:?})");
    let leading = Dim::Sym(symbol.to_string());
    let shapes_keep_it_first = |shape: &[Dim]| {
        shape.iter().enumerate().all(|(axis, dim)| {
            !mentions(dim, symbol) || (axis == 0 && shape.len() >= 3 && *dim == leading)
        })
    };
    kernel.params.iter().all(|p| shapes_keep_it_first(&p.shape))
        && kernel.graph.dag.node_indices().all(|id| {
            let node = kernel.graph.node(id);
            // A reduction keeps its axis with extent 1: look at what it reduces.
            let reduces_it = matches!(
                node.op,
                Op::Reduce { axis: 0, .. } | Op::Softmax { axis: 0 } | Op::Cumsum { axis: 0 }
            ) && kernel
                .graph
                .operands(id)
                .iter()
                .any(|&x| kernel.graph.node(x).shape.first() == Some(&leading));
            shapes_keep_it_first(&node.shape)
                && !reduces_it
                && !format!("{:?}", node.op).contains(&named)
        })
}

/// Whether `dim` depends on `symbol`.
fn mentions(dim: &Dim, symbol: &str) -> bool {
    match dim {
        Dim::Sym(s) => s == symbol,
        Dim::Const(_) => false,
        Dim::CeilDiv(a, b) => mentions(a, symbol) || mentions(b, symbol),
    }
}

/// `tensor`, the input of `param`, as a run on one entry along `symbol` reads it: its first
/// of `entries` entries where `param`'s first axis is `symbol`, else all of it; `None` when the
/// tensor does not fit.
pub fn one_entry_input(
    param: &Param,
    symbol: &str,
    entries: usize,
    tensor: &Tensor,
) -> Option<Tensor> {
    match param.shape.first() {
        Some(Dim::Sym(s)) if s == symbol => first_entry(tensor, entries),
        _ => Some(tensor.clone()),
    }
}

/// The first entry along the leading axis of `tensor` (whose leading axis has `entries`
/// entries), as a tensor of leading extent 1; `None` when the shapes do not fit.
pub fn first_entry(tensor: &Tensor, entries: usize) -> Option<Tensor> {
    let (&lead, rest) = tensor.shape.split_first()?;
    if lead != entries || entries == 0 {
        return None;
    }
    let per: usize = rest.iter().product();
    let data = match &tensor.data {
        TensorData::F32(v) => TensorData::F32(v.get(..per)?.to_vec()),
        TensorData::F16(v) => TensorData::F16(v.get(..per)?.to_vec()),
        TensorData::Bf16(v) => TensorData::Bf16(v.get(..per)?.to_vec()),
        TensorData::I32(v) => TensorData::I32(v.get(..per)?.to_vec()),
    };
    let mut shape = tensor.shape.clone();
    shape[0] = 1;
    Some(Tensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(src: &str) -> Kernel {
        crate::source::compile_text(src)
            .expect("checks")
            .kernels
            .remove(0)
    }

    fn bindings(pairs: &[(&str, u64)]) -> Bindings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn per_head_attention_is_sampled_on_one_head() {
        let k = kernel(
            "kernel a(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d], s: f32[h, 1, 1]) \
             -> f32[h, n, d] { return softmax(mask(q @ k.T * s, causal)) @ v; }",
        );
        let b = bindings(&[("h", 8), ("n", 64), ("d", 16)]);
        let (symbol, one) = one_entry_bindings(&k, &b).expect("separable");
        assert_eq!(symbol, "h");
        assert_eq!(one["h"], 1);
        assert_eq!(one["n"], 64);
        // Bound to 1 already: nothing to gain.
        assert!(one_entry_bindings(&k, &one).is_none());
    }

    #[test]
    fn kernels_that_mix_entries_are_not() {
        let b = bindings(&[("h", 4), ("n", 32), ("d", 8)]);
        for src in [
            // A reduction over the heads.
            "kernel a(x: f32[h, n, d]) -> f32[h, n, d] { return x - sum(x, 0); }",
            "kernel a(q: f32[h, n, d], k: f32[h, n, d]) -> f32[h, n, n] \
             { return softmax(q @ k.T, 0); }",
            // The heads as rows of a matrix product.
            "kernel a(x: f32[h, d], w: f32[d, d]) -> f32[h, d] { return x @ w; }",
            // The dimension's value.
            "kernel a(x: f32[h, n, d]) -> f32[h, n, d] { return x / h; }",
        ] {
            let k = kernel(src);
            assert_eq!(leading_symbol(&k).as_deref(), Some("h"), "{src}");
            assert!(!separable_along(&k, "h"), "{src}");
            assert!(one_entry_bindings(&k, &b).is_none(), "{src}");
        }
    }

    #[test]
    fn the_first_entry_keeps_the_rest_of_the_shape() {
        let t = Tensor {
            shape: vec![3, 2, 2],
            data: TensorData::F32((0..12).map(|x| x as f32).collect()),
        };
        let first = first_entry(&t, 3).expect("fits");
        assert_eq!(first.shape, vec![1, 2, 2]);
        assert!(matches!(&first.data, TensorData::F32(v) if v == &[0.0, 1.0, 2.0, 3.0]));
        assert!(first_entry(&t, 4).is_none());
    }
}
