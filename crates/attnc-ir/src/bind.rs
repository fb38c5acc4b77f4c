//! Binding dimension symbols from input shapes and `--shape` values.
//!
//! [`bind_shapes`] gives every dimension symbol a kernel uses a value: first from the concrete
//! shapes of the inputs that were provided (in parameter order), then from the `--shape` values
//! for symbols no input binds. It then checks that every node's shape resolves and that its
//! element count fits ([`resolve_node_shapes`]), so later stages may multiply shapes freely.
//!
//! ```
//! use attnc_ir::bind::{bind_shapes, BindError};
//! use attnc_ir::{Bindings, Dim, Graph, Kernel, Node, Op, Param, DType};
//! use attnc_syntax::Span;
//!
//! let shape = vec![Dim::Sym("n".into()), Dim::Sym("d".into())];
//! let mut graph = Graph::new();
//! let q = graph.add(
//!     Node { op: Op::Input { index: 0, name: "q".into() }, shape: shape.clone(),
//!            dtype: DType::F32, span: Span::default() },
//!     &[],
//! );
//! let kernel = Kernel {
//!     name: "id".into(),
//!     params: vec![Param { name: "q".into(), dtype: DType::F32, shape, span: Span::default() }],
//!     graph, output: q, ret_dtype: DType::F32, extra_outputs: vec![], approx: vec![],
//!     span: Span::default(),
//! };
//! let bound = bind_shapes(&kernel, &[Some(vec![3, 4])], &Bindings::new()).unwrap();
//! assert_eq!(bound["n"], 3);
//! assert_eq!(bound["d"], 4);
//! let err = bind_shapes(&kernel, &[None], &Bindings::new()).unwrap_err();
//! assert!(matches!(err, BindError::Unbound { .. }));
//! ```

mod gates;

use crate::dim::{format_shape, Bindings, Dim};
use crate::graph::Kernel;
use crate::op::Op;
use std::collections::{BTreeMap, BTreeSet};

/// Why dimension symbols could not be bound, or a bound shape is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The number of input shapes differs from the number of parameters.
    #[error("kernel `{kernel}` takes {expected} inputs but {got} were given")]
    InputCount {
        /// The kernel's name.
        kernel: String,
        /// The number of parameters.
        expected: usize,
        /// The number of inputs given.
        got: usize,
    },
    /// An input's rank differs from its parameter's declared rank.
    #[error("input `{input}` has rank {got} but is declared {declared} with rank {expected}")]
    RankMismatch {
        /// The parameter's name.
        input: String,
        /// The declared shape, as written (`[h, n, d]`).
        declared: String,
        /// The declared rank.
        expected: usize,
        /// The input's rank.
        got: usize,
    },
    /// Two input axes declared with the same symbol have different sizes.
    #[error(
        "dimension `{symbol}` is {first_value} from input `{first_input}` axis {first_axis} \
         but {second_value} from input `{second_input}` axis {second_axis}"
    )]
    DimConflict {
        /// The dimension symbol.
        symbol: String,
        /// The input that bound the symbol first.
        first_input: String,
        /// Its axis.
        first_axis: usize,
        /// The value it gave.
        first_value: u64,
        /// The input that disagrees.
        second_input: String,
        /// Its axis.
        second_axis: usize,
        /// The value it gives.
        second_value: u64,
    },
    /// An input axis declared with a literal size has another size.
    #[error("input `{input}` axis {axis} has size {got} but its type declares {expected}")]
    LiteralMismatch {
        /// The parameter's name.
        input: String,
        /// The axis.
        axis: usize,
        /// The declared size.
        expected: u64,
        /// The input's size.
        got: u64,
    },
    /// A `--shape` value contradicts the size an input gives the same symbol.
    #[error(
        "--shape {symbol}={given} contradicts input `{input}` axis {axis}, \
         which gives `{symbol}` = {got}"
    )]
    GivenConflict {
        /// The dimension symbol.
        symbol: String,
        /// The `--shape` value.
        given: u64,
        /// The input that binds the symbol.
        input: String,
        /// Its axis.
        axis: usize,
        /// The value the input gives.
        got: u64,
    },
    /// A symbol the kernel uses is bound neither by an input nor by `--shape`.
    #[error(
        "dimension `{symbol}` is not bound: pass --shape {symbol}=<size> \
         or an input that has it"
    )]
    Unbound {
        /// The dimension symbol.
        symbol: String,
    },
    /// A shape's element count overflows (checked multiplication).
    #[error("{place} would have shape {symbolic} = {shape}: too many elements to hold{}", dims_hint(.dims))]
    Overflow {
        /// What has the shape: ``input `q` `` or `node %7 (matmul)`.
        place: String,
        /// The shape as written (`[h, n, n]`).
        symbolic: String,
        /// The shape with its bound values (`[65536, 65536, 65536]`).
        shape: String,
        /// The dimension symbols of the shape and their values, largest first.
        dims: Vec<(String, u64)>,
    },
    /// The block size of a pooling is bound to 0.
    #[error("the block size `{symbol}` of `{pool}` is 0; it must be at least 1")]
    ZeroPool {
        /// `mean-pool` or `max-pool`.
        pool: String,
        /// The symbol that gave it.
        symbol: String,
    },
    /// A mask pattern's size does not resolve (a stride or block size bound to 0).
    #[error(transparent)]
    Pattern(#[from] crate::pattern::PatternError),
    /// The gate of a `topk_blocks` pattern does not have one entry per pair of blocks.
    #[error(
        "{gate} axis {axis} has size {got}, but `{pattern}` over {count} {what} needs {expected} there (ceil({count}/{b}) blocks)"
    )]
    Gate {
        /// ``input `g` `` or the node that computes the gate.
        gate: String,
        /// The axis.
        axis: usize,
        /// Its size.
        got: usize,
        /// The number of blocks.
        expected: usize,
        /// The pattern, with its k and b.
        pattern: String,
        /// Queries or keys.
        count: usize,
        /// "queries" or "keys".
        what: &'static str,
        /// The block size.
        b: u64,
    },
    /// A dimension symbol used as a number (`sqrt(d)`) is bound to 0.
    #[error("dimension `{symbol}` is 0 but is used as a number (e.g. sqrt({symbol}))")]
    ZeroDimAsNumber {
        /// The dimension symbol.
        symbol: String,
    },
}

/// The largest element count any array may have: its f64 buffer must fit in `isize` bytes.
pub const MAX_ELEMENTS: usize = (isize::MAX as usize) / std::mem::size_of::<f64>();

/// Every dimension symbol the kernel uses (in parameter shapes, node shapes, as numbers and as
/// mask pattern sizes), in order of first appearance.
pub fn kernel_symbols(kernel: &Kernel) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    let mut note = |dim: &Dim| {
        for name in dim.symbols() {
            if seen.insert(name.to_string()) {
                order.push(name.to_string());
            }
        }
    };
    for param in &kernel.params {
        param.shape.iter().for_each(&mut note);
    }
    for id in kernel.graph.topo_order() {
        let node = kernel.graph.node(id);
        node.shape.iter().for_each(&mut note);
        if let Op::DimValue(dim) = &node.op {
            note(dim);
        }
        if let Some(pattern) = node_pattern(&node.op) {
            for symbol in pattern.symbols() {
                note(&Dim::Sym(symbol));
            }
        }
    }
    order
}

/// The mask pattern an op carries, if any.
pub fn node_pattern(op: &Op) -> Option<&crate::pattern::SymbolicPattern> {
    match op {
        Op::Mask { pattern, .. } => Some(pattern),
        Op::Attention(a) => a.mask.as_ref(),
        _ => None,
    }
}

/// The symbols in `given` (from `--shape`) that `kernel` does not use, sorted; the command line
/// prints a note for each and otherwise ignores them.
pub fn unused_symbols(kernel: &Kernel, given: &Bindings) -> Vec<String> {
    let used: BTreeSet<String> = kernel_symbols(kernel).into_iter().collect();
    given
        .keys()
        .filter(|name| !used.contains(*name))
        .cloned()
        .collect()
}

/// Where a symbol's value came from.
enum Source {
    /// From input `param` axis `axis`.
    Input { param: usize, axis: usize },
}

/// Binds every dimension symbol of `kernel`.
///
/// `input_shapes[i]` is the concrete shape of parameter `i`, or `None` when that input is not
/// provided (its symbols must then come from other inputs or `given`). Inputs bind first, in
/// parameter order; `given` (the `--shape` values) binds the rest, and a `given` value that
/// contradicts an input is an error. `given` values for symbols the kernel does not use are
/// ignored (see [`unused_symbols`]). The result holds exactly the symbols the kernel uses, and
/// every node shape is checked with [`resolve_node_shapes`].
pub fn bind_shapes(
    kernel: &Kernel,
    input_shapes: &[Option<Vec<usize>>],
    given: &Bindings,
) -> Result<Bindings, BindError> {
    if input_shapes.len() != kernel.params.len() {
        return Err(BindError::InputCount {
            kernel: kernel.name.clone(),
            expected: kernel.params.len(),
            got: input_shapes.len(),
        });
    }
    let mut bound: BTreeMap<String, (u64, Source)> = BTreeMap::new();
    for (p, (param, shape)) in kernel.params.iter().zip(input_shapes).enumerate() {
        let Some(shape) = shape else { continue };
        if shape.len() != param.shape.len() {
            return Err(BindError::RankMismatch {
                input: param.name.clone(),
                declared: format_shape(&param.shape),
                expected: param.shape.len(),
                got: shape.len(),
            });
        }
        for (axis, (dim, &size)) in param.shape.iter().zip(shape).enumerate() {
            let size = size as u64;
            match dim {
                Dim::Const(expected) => {
                    if *expected != size {
                        return Err(BindError::LiteralMismatch {
                            input: param.name.clone(),
                            axis,
                            expected: *expected,
                            got: size,
                        });
                    }
                }
                // Parameter types never hold a pooled size.
                Dim::CeilDiv(..) => {}
                Dim::Sym(symbol) => match bound.get(symbol) {
                    Some((
                        value,
                        Source::Input {
                            param: fp,
                            axis: fa,
                        },
                    )) => {
                        if *value != size {
                            return Err(BindError::DimConflict {
                                symbol: symbol.clone(),
                                first_input: kernel.params[*fp].name.clone(),
                                first_axis: *fa,
                                first_value: *value,
                                second_input: param.name.clone(),
                                second_axis: axis,
                                second_value: size,
                            });
                        }
                    }
                    None => {
                        bound.insert(symbol.clone(), (size, Source::Input { param: p, axis }));
                    }
                },
            }
        }
    }

    let mut bindings = Bindings::new();
    for symbol in kernel_symbols(kernel) {
        let value = match (bound.get(&symbol), given.get(&symbol)) {
            (Some((value, Source::Input { param, axis })), Some(&g)) => {
                if *value != g {
                    return Err(BindError::GivenConflict {
                        symbol,
                        given: g,
                        input: kernel.params[*param].name.clone(),
                        axis: *axis,
                        got: *value,
                    });
                }
                *value
            }
            (Some((value, _)), None) => *value,
            (None, Some(&g)) => g,
            (None, None) => return Err(BindError::Unbound { symbol }),
        };
        bindings.insert(symbol, value);
    }
    resolve_node_shapes(kernel, &bindings)?;
    Ok(bindings)
}

/// `; the dimension n = 99999 is too large` for the largest symbol of an overflowing shape.
fn dims_hint(dims: &[(String, u64)]) -> String {
    dims.first()
        .map(|(name, value)| format!("; the dimension {name} = {value} is too large"))
        .unwrap_or_default()
}

/// Resolves one symbolic shape to sizes, checking that its element count fits
/// ([`MAX_ELEMENTS`]); `place` names the shape's owner in errors.
///
/// The check multiplies the non-zero sizes, so `[0, 2^62, 2^62]` is rejected too: ndarray
/// refuses such shapes even though they hold no elements.
pub fn resolve_checked(
    shape: &[Dim],
    bindings: &Bindings,
    place: impl FnOnce() -> String,
) -> Result<Vec<usize>, BindError> {
    let mut values = Vec::with_capacity(shape.len());
    for dim in shape {
        let value = dim.resolve(bindings).ok_or_else(|| BindError::Unbound {
            symbol: dim.to_string(),
        })?;
        values.push(value);
    }
    let sizes: Option<Vec<usize>> = values.iter().map(|&v| usize::try_from(v).ok()).collect();
    let count = sizes.as_ref().and_then(|sizes| {
        sizes
            .iter()
            .try_fold(1usize, |count, &size| count.checked_mul(size.max(1)))
    });
    match (sizes, count) {
        (Some(sizes), Some(count)) if count <= MAX_ELEMENTS => Ok(sizes),
        _ => {
            let shown: Vec<Dim> = values.iter().map(|&v| Dim::Const(v)).collect();
            let mut dims: Vec<(String, u64)> = shape
                .iter()
                .zip(&values)
                .filter(|(dim, _)| matches!(dim, Dim::Sym(_)))
                .map(|(dim, &value)| (dim.to_string(), value))
                .collect();
            dims.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            dims.dedup();
            Err(BindError::Overflow {
                place: place(),
                symbolic: format_shape(shape),
                shape: format_shape(&shown),
                dims,
            })
        }
    }
}

/// Resolves the shape of every node of `kernel` (indexed by node index) and of every
/// parameter, checking that each element count fits, that no dimension used as a number is
/// 0 (it would divide by zero in `q @ k.T / sqrt(d)`) and that every mask pattern's sizes
/// resolve.
pub fn resolve_node_shapes(
    kernel: &Kernel,
    bindings: &Bindings,
) -> Result<Vec<Vec<usize>>, BindError> {
    for param in &kernel.params {
        resolve_checked(&param.shape, bindings, || format!("input `{}`", param.name))?;
    }
    let mut shapes = Vec::with_capacity(kernel.graph.len());
    for id in kernel.graph.topo_order() {
        let node = kernel.graph.node(id);
        if let Op::DimValue(dim) = &node.op {
            match dim.resolve(bindings) {
                None => {
                    return Err(BindError::Unbound {
                        symbol: dim.to_string(),
                    })
                }
                Some(0) => {
                    return Err(BindError::ZeroDimAsNumber {
                        symbol: dim.to_string(),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some(pattern) = node_pattern(&node.op) {
            pattern.resolve(bindings)?;
        }
        if let Op::Pool { op, size } = &node.op {
            if size.resolve(bindings) == Some(0) {
                return Err(BindError::ZeroPool {
                    pool: op.name().to_string(),
                    symbol: size.to_string(),
                });
            }
        }
        let shape = resolve_checked(&node.shape, bindings, || {
            format!("node %{} ({})", id.index(), node.op)
        })?;
        shapes.push(shape);
    }
    gates::check(kernel, &shapes)?;
    Ok(shapes)
}
