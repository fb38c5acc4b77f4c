//! Validating on the sampled query rows alone: where each row of a plan's output depends only
//! on the same row of some of its inputs and on whole other ones (Performer's linear attention:
//! the query features row by row, the key-value state from every key), those inputs are cut to
//! the sampled rows and the plan is compiled for that many rows. The sample then skips the
//! other rows' work; the rows it computes are the same.
//!
//! Plans that end in a fused attention compute only the sampled rows already, and the fused
//! attention is not cut here (its masks and positions read the row index).

use crate::io::{Tensor, TensorData};
use attnc_ir::dim::{resolve_shape, Dim};
use attnc_ir::fused::Decay;
use attnc_ir::{Bindings, Kernel, NodeId, Op};
use std::ops::Range;

/// The dimension symbol the cut rows are bound to (not a name a program can write).
pub const SAMPLE_ROWS: &str = "sampled rows";

/// A plan cut to the sampled rows of its output.
#[derive(Clone, Debug)]
pub struct RowCut {
    /// The plan with the cut rows' axes renamed to [`SAMPLE_ROWS`].
    pub kernel: Kernel,
    /// `bindings` with [`SAMPLE_ROWS`] bound to the number of sampled rows.
    pub bindings: Bindings,
    /// Per parameter, whether its rows are cut.
    pub cut_params: Vec<bool>,
    /// The output rows kept, in order (row `i` of the cut output is the `i`-th of them).
    pub rows: Vec<Range<usize>>,
}

impl RowCut {
    /// The inputs of the cut plan: `inputs` (one per parameter) with the cut ones' rows
    /// gathered; `None` for the parameters that are read whole.
    pub fn cut_inputs(&self, inputs: &[Tensor]) -> Vec<Option<Tensor>> {
        inputs
            .iter()
            .zip(&self.cut_params)
            .map(|(tensor, &cut)| cut.then(|| gather_rows(tensor, &self.rows)))
            .collect()
    }
}

/// `kernel` (a plan, bound by `bindings`) cut to the output rows `rows`, when its output's
/// rows can be computed from those rows alone and `rows` leaves some out.
pub fn cut_to_rows(kernel: &Kernel, bindings: &Bindings, rows: &[Range<usize>]) -> Option<RowCut> {
    if kernel.has_several_outputs() {
        return None;
    }
    let output = kernel.graph.node(kernel.output);
    let out_shape = resolve_shape(&output.shape, bindings)?;
    let row_axis = out_shape.len().checked_sub(2)?;
    let kept: usize = rows.iter().map(|r| r.end.saturating_sub(r.start)).sum();
    let all = out_shape[row_axis];
    if kept == 0 || kept >= all || rows.iter().any(|r| r.start > r.end || r.end > all) {
        return None;
    }
    let row = match &output.shape[row_axis] {
        dim @ Dim::Sym(_) => dim.clone(),
        _ => return None,
    };
    let cut = rows_cut(kernel, &row)?;
    let sampled = Dim::Sym(SAMPLE_ROWS.to_string());
    let mut cut_kernel = kernel.clone();
    let mut cut_params = vec![false; kernel.params.len()];
    for id in kernel.graph.topo_order() {
        if !cut[id.index()] {
            continue;
        }
        let node = &mut cut_kernel.graph.dag[id];
        let axis = node.shape.len() - 2;
        node.shape[axis] = sampled.clone();
        if let Op::Input { index, .. } = node.op {
            let param = cut_kernel.params.get_mut(index)?;
            if param.shape.len() != node.shape.len() {
                return None;
            }
            param.shape[axis] = sampled.clone();
            cut_params[index] = true;
        }
    }
    if !cut_params.contains(&true) {
        return None;
    }
    let mut bindings = bindings.clone();
    bindings.insert(SAMPLE_ROWS.to_string(), kept as u64);
    Some(RowCut {
        kernel: cut_kernel,
        bindings,
        cut_params,
        rows: rows.to_vec(),
    })
}

/// Which nodes need only the sampled rows (their second-to-last axis, `row`): the output, and
/// every node all of whose users need only the sampled rows and read it row by row. `None`
/// when a node so marked reads a row-matched operand that others need whole, or is an op
/// whose rows cannot be cut.
fn rows_cut(kernel: &Kernel, row: &Dim) -> Option<Vec<bool>> {
    let graph = &kernel.graph;
    let order = graph.topo_order();
    let mut users: Vec<Vec<(NodeId, usize)>> = vec![Vec::new(); graph.len()];
    for &id in &order {
        for (slot, operand) in graph.operands(id).into_iter().enumerate() {
            users[operand.index()].push((id, slot));
        }
    }
    let mut cut = vec![false; graph.len()];
    for &id in order.iter().rev() {
        cut[id.index()] = id == kernel.output
            || (!users[id.index()].is_empty()
                && users[id.index()]
                    .iter()
                    .all(|&(user, slot)| cut[user.index()] && row_wise(kernel, user, slot, row)));
    }
    for &id in &order {
        if !cut[id.index()] {
            continue;
        }
        let node = graph.node(id);
        let rows_here = node.shape.len() >= 2 && node.shape[node.shape.len() - 2] == *row;
        let cuttable = matches!(
            node.op,
            Op::Input { .. }
                | Op::Fill { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::MatMul
                | Op::Cast { .. }
                | Op::Reduce { .. }
                | Op::Softmax { .. }
                | Op::SoftmaxSink
                | Op::Cumsum { .. }
                | Op::LinearAttention(_)
        );
        if !rows_here || !cuttable {
            return None;
        }
        // Every operand this node matches row by row must be cut with it.
        for (slot, operand) in graph.operands(id).into_iter().enumerate() {
            if row_wise(kernel, id, slot, row) && !cut[operand.index()] {
                return None;
            }
        }
    }
    Some(cut)
}

/// Whether row `i` of `user` reads row `i` (and no other row) of its operand `slot`, both
/// rows of the axis `row`. Broadcast operands (no such axis, or extent 1) are read whole.
fn row_wise(kernel: &Kernel, user: NodeId, slot: usize, row: &Dim) -> bool {
    let graph = &kernel.graph;
    let node = graph.node(user);
    let Some(&operand) = graph.operands(user).get(slot) else {
        return false;
    };
    let operand_shape = &graph.node(operand).shape;
    let rank = operand_shape.len();
    let rows_match = rank >= 2
        && node.shape.len() >= 2
        && operand_shape[rank - 2] == *row
        && node.shape[node.shape.len() - 2] == *row;
    if !rows_match {
        return false;
    }
    let along_rows = |axis: usize| axis + 2 == rank;
    match &node.op {
        Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } | Op::SoftmaxSink => true,
        Op::MatMul => slot == 0,
        Op::Reduce { axis, .. } | Op::Softmax { axis } | Op::Cumsum { axis } => !along_rows(*axis),
        Op::LinearAttention(l) => slot == 0 && !l.causal && l.decay == Decay::None,
        _ => false,
    }
}

/// The rows `rows` of `tensor` (its second-to-last axis), for every index of its leading axes.
pub fn gather_rows(tensor: &Tensor, rows: &[Range<usize>]) -> Tensor {
    fn gather<T: Copy>(values: &[T], shape: &[usize], rows: &[Range<usize>]) -> Vec<T> {
        let rank = shape.len();
        let (m, width) = (shape[rank - 2], shape[rank - 1]);
        let mut out = Vec::new();
        for block in values.chunks(m * width.max(1)) {
            for range in rows {
                out.extend_from_slice(&block[range.start * width..range.end * width]);
            }
        }
        out
    }
    let shape = &tensor.shape;
    let data = match &tensor.data {
        TensorData::F32(v) => TensorData::F32(gather(v, shape, rows)),
        TensorData::F16(v) => TensorData::F16(gather(v, shape, rows)),
        TensorData::Bf16(v) => TensorData::Bf16(gather(v, shape, rows)),
        TensorData::I32(v) => TensorData::I32(gather(v, shape, rows)),
    };
    let mut cut_shape = shape.clone();
    let rank = cut_shape.len();
    cut_shape[rank - 2] = rows.iter().map(|r| r.end - r.start).sum();
    Tensor {
        shape: cut_shape,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::sample_rows;
    use crate::engine::input_view;
    use crate::policy::Policy;
    use crate::syntax::ast::ApproxKind;
    use crate::Compiler;
    use attnc_jit::Input;

    fn bindings(pairs: &[(&str, u64)]) -> Bindings {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn random_inputs(kernel: &Kernel, bindings: &Bindings) -> Vec<Tensor> {
        kernel
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shape = resolve_shape(&p.shape, bindings).expect("bound");
                let len = shape.iter().product();
                let values = crate::io::standard_normal(5, i as u64, len);
                Tensor::from_f32(shape, values).expect("shape")
            })
            .collect()
    }

    /// The plan of `source` under `policy`, cut to the sampled rows of its output, and both
    /// plans' sampled rows on the same inputs: they must agree bit for bit.
    fn cut_and_compare(source: &str, pairs: &[(&str, u64)], policy: Policy) -> RowCut {
        let kernel = crate::source::compile_text(source)
            .expect("checks")
            .kernels
            .remove(0);
        let b = bindings(pairs);
        let compiler = Compiler::new().with_policy(policy).with_threads(2);
        let plan = compiler.optimize(&kernel, &b).kernel;
        let whole = compiler.compile_plan(&plan, &b).expect("compiles");
        let rows = sample_rows(whole.output_shape());
        let cut = cut_to_rows(&plan, &b, &rows).expect("its rows can be cut");
        let cut_code = compiler
            .compile_plan(&cut.kernel, &cut.bindings)
            .expect("the cut plan compiles");
        let inputs = random_inputs(&kernel, &b);
        let views: Vec<Input<'_>> = inputs.iter().map(input_view).collect();
        let expected = whole.run_sample(&views, 2, &rows).expect("runs");
        let cut_inputs = cut.cut_inputs(&inputs);
        let cut_views: Vec<Input<'_>> = inputs
            .iter()
            .zip(&cut_inputs)
            .map(|(t, c)| input_view(c.as_ref().unwrap_or(t)))
            .collect();
        let got = cut_code.run(&cut_views, 2).expect("runs").data;
        assert_eq!(got.len(), expected.len());
        assert!(
            got.iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "the cut plan's rows differ"
        );
        cut
    }

    #[test]
    fn performer_is_cut_to_its_query_rows_with_the_same_bits() {
        let policy = Policy {
            allowed: vec![ApproxKind::RandomFeatures {
                m: 64,
                seed: Some(3),
            }],
            tol: 1e3,
        };
        let cut = cut_and_compare(
            "kernel p(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
                return softmax(q @ k.T / sqrt(d)) @ v;
            }",
            &[("h", 1), ("n", 1000), ("d", 32)],
            policy,
        );
        // The queries are cut; the keys and values are read whole.
        assert_eq!(cut.cut_params, vec![true, false, false]);
        assert_eq!(cut.bindings[SAMPLE_ROWS], 256);
    }

    #[test]
    fn row_wise_programs_are_cut_where_broadcasts_and_whole_operands_meet() {
        let cut = cut_and_compare(
            "kernel r(x: f32[n, e], w: f32[e, d], b: f32[1, d], s: f32[n, 1]) -> f32[n, d] {
                let y = softmax(x @ w + b, -1);
                return y * s - sum(y * y, -1) + max(w, 0);
            }",
            &[("n", 777), ("e", 24), ("d", 40)],
            Policy::exact(),
        );
        assert_eq!(cut.cut_params, vec![true, false, false, true]);
    }

    fn plan_of(source: &str, pairs: &[(&str, u64)]) -> (Kernel, Bindings) {
        let kernel = crate::source::compile_text(source)
            .expect("checks")
            .kernels
            .remove(0);
        let b = bindings(pairs);
        (Compiler::new().optimize(&kernel, &b).kernel, b)
    }

    #[test]
    fn rows_that_meet_other_rows_are_not_cut() {
        let pairs = [("n", 600), ("d", 16)];
        for source in [
            // A reduction along the rows.
            "kernel a(x: f32[n, d]) -> f32[n, d] { return x - max(x, 0); }",
            // A running sum along the rows.
            "kernel a(x: f32[n, d]) -> f32[n, d] { return cumsum(x, 0); }",
            // The input's rows are also keys.
            "kernel a(x: f32[n, d]) -> f32[n, d] { return softmax(x @ x.T) @ x; }",
            // Positions: a causal mask.
            "kernel a(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] {
                return softmax(mask(q @ k.T, causal)) @ v;
            }",
        ] {
            let (plan, b) = plan_of(source, &pairs);
            let rows = sample_rows(&[600, 16]);
            assert!(cut_to_rows(&plan, &b, &rows).is_none(), "{source}");
        }
        // Every row sampled: nothing to cut.
        let (plan, b) = plan_of(
            "kernel a(x: f32[n, d]) -> f32[n, d] { return x * 2; }",
            &pairs,
        );
        let (all, some) = (std::iter::once(0..600), std::iter::once(0..64));
        assert!(cut_to_rows(&plan, &b, &all.collect::<Vec<_>>()).is_none());
        assert!(cut_to_rows(&plan, &b, &some.collect::<Vec<_>>()).is_some());
    }

    #[test]
    fn gathered_rows_follow_the_ranges_in_every_leading_block() {
        let t =
            Tensor::from_f32(vec![2, 4, 2], (0..16).map(|x| x as f32).collect()).expect("shape");
        let g = gather_rows(&t, &[0..1, 2..4]);
        assert_eq!(g.shape, vec![2, 3, 2]);
        let expected: Vec<f32> = [0, 1, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15]
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(g.data, TensorData::F32(expected));
    }
}
