//! The e-class analysis: the concrete shape of every class at the bound dimensions, its value
//! when it is a scalar constant, and the atom of a leaf class.
//!
//! Conditions of the rules ("c is constant along the softmax row", "the reduced axis is the
//! last one") and the cost model read these facts. Shapes are concrete (`Vec<usize>`) because
//! the optimizer runs per binding of the dimension symbols, as the JIT does.

use crate::lang::{Atom, Attn};
use attnc_ir::interp::{binary_scalar, broadcast_shapes, unary};
use attnc_ir::{BinaryOp, Bindings, UnaryOp};
use egg::{Analysis, DidMerge, EGraph, Id, Symbol};
use std::collections::HashMap;

/// The e-graph type the optimizer works on.
pub type AttnGraph = EGraph<Attn, ShapeAnalysis>;

/// What the analysis knows about one e-class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// The concrete shape, for array-valued classes (not for atoms and mask patterns).
    pub shape: Option<Vec<usize>>,
    /// The value, when the class is a scalar known at compile time.
    pub konst: Option<f64>,
    /// The atom, for leaf classes.
    pub atom: Option<Atom>,
}

/// The analysis: parameter shapes and dimension values of one binding.
#[derive(Clone, Debug, Default)]
pub struct ShapeAnalysis {
    /// The concrete shape of each parameter, by name.
    pub params: HashMap<Symbol, Vec<usize>>,
    /// The values of the dimension symbols.
    pub bindings: Bindings,
}

impl ShapeAnalysis {
    /// The size an atom names: a number, or a bound dimension symbol.
    pub fn resolve(&self, atom: Option<Atom>) -> Option<u64> {
        match atom? {
            Atom::Num(_) => atom?.as_index(),
            Atom::Name(s) => self.bindings.get(s.as_str()).copied(),
        }
    }
}

/// The shape of `a @ b`, or `None` when the operands do not multiply.
pub fn matmul_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 || a[ra - 1] != b[rb - 2] {
        return None;
    }
    let mut out = broadcast_shapes(&a[..ra - 2], &b[..rb - 2])?;
    out.extend([a[ra - 2], b[rb - 1]]);
    Some(out)
}

/// The shape of the fused attention of `q`, `k`, `v`: `batch ++ [m, dv]`.
pub fn attention_shape(q: &[usize], k: &[usize], v: &[usize]) -> Option<Vec<usize>> {
    let scores = matmul_shape(q, &transposed(k)?)?;
    matmul_shape(&scores, v)
}

/// `shape` with its last two axes swapped.
pub fn transposed(shape: &[usize]) -> Option<Vec<usize>> {
    let rank = shape.len();
    if rank < 2 {
        return None;
    }
    let mut out = shape.to_vec();
    out.swap(rank - 2, rank - 1);
    Some(out)
}

/// The unary op an e-node applies, if it is elementwise unary.
pub fn unary_op(node: &Attn) -> Option<(UnaryOp, Id)> {
    Some(match *node {
        Attn::Neg(x) => (UnaryOp::Neg, x),
        Attn::Exp(x) => (UnaryOp::Exp, x),
        Attn::Log(x) => (UnaryOp::Log, x),
        Attn::Sqrt(x) => (UnaryOp::Sqrt, x),
        Attn::Rsqrt(x) => (UnaryOp::Rsqrt, x),
        Attn::Tanh(x) => (UnaryOp::Tanh, x),
        Attn::Sigmoid(x) => (UnaryOp::Sigmoid, x),
        Attn::Relu(x) => (UnaryOp::Relu, x),
        Attn::Elu(x) => (UnaryOp::Elu, x),
        Attn::Abs(x) => (UnaryOp::Abs, x),
        _ => return None,
    })
}

/// The binary op an e-node applies, if it is elementwise binary.
pub fn binary_op(node: &Attn) -> Option<(BinaryOp, [Id; 2])> {
    Some(match *node {
        Attn::Add(c) => (BinaryOp::Add, c),
        Attn::Sub(c) => (BinaryOp::Sub, c),
        Attn::Mul(c) => (BinaryOp::Mul, c),
        Attn::Div(c) => (BinaryOp::Div, c),
        Attn::Maximum(c) => (BinaryOp::Max, c),
        Attn::Minimum(c) => (BinaryOp::Min, c),
        _ => return None,
    })
}

/// The facts of an e-node from the facts of its children (used by `make` and the cost model).
pub fn facts_of(egraph: &AttnGraph, enode: &Attn) -> Facts {
    let data = |id: Id| &egraph[id].data;
    let shape = |id: Id| data(id).shape.clone();
    let atom = |id: Id| data(id).atom;
    let an = &egraph.analysis;
    let scalar = |konst: Option<f64>| Facts {
        shape: Some(vec![]),
        konst,
        atom: None,
    };
    let array = |shape: Option<Vec<usize>>| Facts {
        shape,
        ..Facts::default()
    };
    if let Some((op, x)) = unary_op(enode) {
        let mut facts = array(shape(x));
        facts.konst = data(x).konst.map(|v| unary(op, v));
        return facts;
    }
    if let Some((op, [a, b])) = binary_op(enode) {
        let s = shape(a)
            .zip(shape(b))
            .and_then(|(a, b)| broadcast_shapes(&a, &b));
        let mut facts = array(s);
        if let (Some(x), Some(y)) = (data(a).konst, data(b).konst) {
            facts.konst = Some(binary_scalar(op, x, y));
        }
        return facts;
    }
    match enode {
        Attn::Leaf(a) => Facts {
            atom: Some(*a),
            ..Facts::default()
        },
        Attn::Input(name) => {
            let s = atom(*name)
                .and_then(|a| a.as_name().map(Symbol::from))
                .and_then(|n| an.params.get(&n).cloned());
            array(s)
        }
        Attn::Const(v) => scalar(atom(*v).and_then(|a| a.as_num())),
        Attn::DimValue(d) => scalar(an.resolve(atom(*d)).map(|v| v as f64)),
        Attn::Fill(ids) => {
            let dims: Option<Vec<usize>> = ids
                .iter()
                .skip(1)
                .map(|&d| an.resolve(atom(d)).and_then(|v| usize::try_from(v).ok()))
                .collect();
            array(dims)
        }
        Attn::RelPos([m, n]) => {
            let dims = an.resolve(atom(*m)).zip(an.resolve(atom(*n)));
            array(dims.map(|(m, n)| vec![m as usize, n as usize]))
        }
        Attn::MatMul([a, b]) => array(
            shape(*a)
                .zip(shape(*b))
                .and_then(|(a, b)| matmul_shape(&a, &b)),
        ),
        Attn::Transpose(x) | Attn::NystromPinv(x) => array(shape(*x).and_then(|s| transposed(&s))),
        Attn::Sum([x, axis])
        | Attn::Max([x, axis])
        | Attn::Mean([x, axis])
        | Attn::LogSumExp([x, axis]) => {
            let axis = atom(*axis).and_then(|a| a.as_index());
            let s = shape(*x).zip(axis).and_then(|(mut s, axis)| {
                *s.get_mut(axis as usize)? = 1;
                Some(s)
            });
            array(s)
        }
        Attn::MeanPool([x, b]) | Attn::MaxPool([x, b]) => {
            let b = an.resolve(atom(*b)).filter(|&b| b > 0);
            array(shape(*x).zip(b).and_then(|(mut s, b)| {
                let rows = s.len().checked_sub(2)?;
                s[rows] = s[rows].div_ceil(b as usize);
                Some(s)
            }))
        }
        Attn::SoftmaxSink([x, sink]) => {
            let fits = shape(*x).zip(shape(*sink)).is_some_and(|(x, s)| {
                let mut rows = x.clone();
                rows.last_mut().is_some_and(|l| {
                    *l = 1;
                    true
                }) && broadcast_shapes(&rows, &s).as_deref() == Some(rows.as_slice())
            });
            array(if fits { shape(*x) } else { None })
        }
        Attn::Cumsum([x, _])
        | Attn::Softmax([x, _])
        | Attn::Mask([x, _, _])
        | Attn::Cast([x, _])
        | Attn::Int8Products(x)
        | Attn::Bf16Products(x) => array(shape(*x)),
        Attn::FavorQuery([x, _, m]) | Attn::FavorKey([x, _, m]) => {
            let m = atom(*m).and_then(|a| a.as_index());
            array(shape(*x).zip(m).and_then(|(mut s, m)| {
                *s.last_mut()? = m as usize;
                Some(s)
            }))
        }
        Attn::ProjectRows([x, _, r]) => {
            let r = atom(*r).and_then(|a| a.as_index());
            array(shape(*x).zip(r).and_then(|(mut s, r)| {
                let rows = s.len().checked_sub(2)?;
                s[rows] = r as usize;
                Some(s)
            }))
        }
        Attn::Random([_, _, rows, cols]) => {
            let dims = an.resolve(atom(*rows)).zip(an.resolve(atom(*cols)));
            array(dims.map(|(r, c)| vec![r as usize, c as usize]))
        }
        Attn::Attention([q, k, v, _, _])
        | Attn::AttentionInt8([q, k, v, _, _])
        | Attn::AttentionBf16([q, k, v, _, _])
        | Attn::AttentionScored([q, k, v, _, _])
        | Attn::LinearAttention([q, k, v, _])
        | Attn::LinearAttentionCausal([q, k, v, _])
        | Attn::CausalPrefixProduct([q, k, v]) => {
            let s = match (shape(*q), shape(*k), shape(*v)) {
                (Some(q), Some(k), Some(v)) => attention_shape(&q, &k, &v),
                _ => None,
            };
            array(s)
        }
        // Attention's shape with k for v, the value axis reduced to 1.
        Attn::AttentionLse([q, k, _, _]) | Attn::AttentionLseScored([q, k, _, _]) => {
            let s = shape(*q).zip(shape(*k)).and_then(|(q, k)| {
                let mut out = attention_shape(&q, &k, &k)?;
                *out.last_mut()? = 1;
                Some(out)
            });
            array(s)
        }
        // The slope's (or log decays') leading axes broadcast into the batch.
        Attn::Retention([q, k, v, a])
        | Attn::RetentionNormalized([q, k, v, a, _])
        | Attn::GatedRetention([q, k, v, a, _])
        | Attn::GatedRetentionNormalized([q, k, v, a, _, _]) => {
            let keys = match enode {
                Attn::GatedRetention([.., c]) | Attn::GatedRetentionNormalized([.., c, _]) => {
                    Some(*c)
                }
                _ => None,
            };
            let s = match (shape(*q), shape(*k), shape(*v), shape(*a)) {
                (Some(q), Some(k), Some(v), Some(a)) => {
                    attention_shape(&q, &k, &v).and_then(|mut out| {
                        let rank = out.len();
                        let lead_of = |x: &[usize]| x[..x.len().saturating_sub(2)].to_vec();
                        let mut lead = broadcast_shapes(&out[..rank - 2], &lead_of(&a))?;
                        if let Some(c) = keys {
                            lead = broadcast_shapes(&lead, &lead_of(&shape(c)?))?;
                        }
                        let tail = out.split_off(rank - 2);
                        Some(lead.into_iter().chain(tail).collect())
                    })
                }
                _ => None,
            };
            array(s)
        }
        _ => Facts::default(),
    }
}

impl Analysis<Attn> for ShapeAnalysis {
    type Data = Facts;

    fn make(egraph: &mut AttnGraph, enode: &Attn, _id: Id) -> Facts {
        facts_of(egraph, enode)
    }

    fn merge(&mut self, a: &mut Facts, b: Facts) -> DidMerge {
        let mut changed_a = false;
        let mut changed_b = false;
        merge_field(&mut a.shape, b.shape, &mut changed_a, &mut changed_b);
        merge_field(&mut a.atom, b.atom, &mut changed_a, &mut changed_b);
        // Constants folded along different paths may differ in the last bit: keep the first.
        merge_field(&mut a.konst, b.konst, &mut changed_a, &mut changed_b);
        DidMerge(changed_a, changed_b)
    }
}

/// Merges one optional fact: a known value wins over an unknown one; two known values keep `a`.
fn merge_field<T: PartialEq>(a: &mut Option<T>, b: Option<T>, ca: &mut bool, cb: &mut bool) {
    match (a.is_some(), b) {
        (false, Some(value)) => {
            *a = Some(value);
            *ca = true;
        }
        (true, None) => *cb = true,
        (true, Some(value)) => {
            if a.as_ref() != Some(&value) {
                *cb = true;
            }
        }
        (false, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egg::RecExpr;

    #[test]
    fn shapes_follow_the_ir_rules() {
        let mut analysis = ShapeAnalysis::default();
        analysis.params.insert("q".into(), vec![2, 5, 3]);
        analysis.params.insert("k".into(), vec![2, 7, 3]);
        analysis.bindings.insert("d".into(), 3);
        let mut egraph = AttnGraph::new(analysis);
        let expr: RecExpr<Attn> =
            "(sum (div (matmul (input q) (transpose (input k))) (sqrt (dim d))) 2)"
                .parse()
                .expect("valid");
        let id = egraph.add_expr(&expr);
        assert_eq!(egraph[id].data.shape, Some(vec![2, 5, 1]));
        let scale: RecExpr<Attn> = "(sqrt (dim d))".parse().expect("valid");
        let sid = egraph.add_expr(&scale);
        assert_eq!(egraph[sid].data.konst, Some(3f64.sqrt()));
    }

    #[test]
    fn matmul_shape_broadcasts_batches() {
        assert_eq!(matmul_shape(&[4, 5], &[2, 5, 3]), Some(vec![2, 4, 3]));
        assert_eq!(matmul_shape(&[4, 5], &[4, 3]), None);
    }
}
