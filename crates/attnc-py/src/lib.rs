//! `attnc._attnc`: the native half of the Python package `attnc`.
//!
//! The pure-Python package (`python/attnc/`) holds the API users call — `attnc.compile`, the
//! exceptions, the input conversions for torch tensors and DLPack, `attnc.torch` — and calls
//! into this module for everything that touches a kernel:
//!
//! - [`program`]: one checked kernel, its compile settings and its compiled plans per input
//!   shape (no Python in it; unit-tested here);
//! - [`kernel`]: the `attnc.Kernel` class: call mapping, plan, trace, signature;
//! - [`inputs`]: NumPy arrays as the JIT's input slices, in place when they can be;
//! - [`errors`]: Rust errors as the exception classes of `attnc._errors`;
//! - [`shape_cache`], [`json`]: the per-shape cache and JSON → Python objects.
//!
//! ```no_run
//! # // Needs an interpreter; the package's pytest suite runs the same through Python.
//! use pyo3::prelude::*;
//! Python::attach(|py| -> PyResult<()> {
//!     let attnc = py.import("attnc")?;
//!     let kernel = attnc.call_method1(
//!         "compile",
//!         ("kernel f(x: f32[n]) -> f32[n] { return x * 2; }",),
//!     )?;
//!     println!("{}", kernel.getattr("signature")?);
//!     Ok(())
//! })
//! .expect("runs");
//! ```
#![warn(missing_docs)]

pub mod errors;
pub mod inputs;
pub mod json;
pub mod kernel;
pub mod program;
pub mod shape_cache;

use attnc::policy::{parse_approx_list, Policy};
use errors::{compile_error, input_error};
use kernel::PyKernel;
use program::Program;
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The largest `.attn` file read (the binary's bound: programs are a few kilobytes).
pub const MAX_SOURCE_BYTES: u64 = 16 << 20;

/// Compiles a kernel of source text or of a file; the Python side decides which it was given
/// and validates `shapes` and `threads`.
#[pyfunction]
#[pyo3(signature = (source=None, path=None, kernel=None, shapes=None, approx=None, tol=None, threads=None, file=None))]
#[allow(clippy::too_many_arguments)]
fn _compile(
    py: Python<'_>,
    source: Option<Vec<u8>>,
    path: Option<PathBuf>,
    kernel: Option<String>,
    shapes: Option<BTreeMap<String, u64>>,
    approx: Option<String>,
    tol: Option<f64>,
    threads: Option<usize>,
    file: Option<String>,
) -> PyResult<PyKernel> {
    let (bytes, file) = match (source, path) {
        (Some(bytes), None) => (bytes, file.unwrap_or_else(|| "<string>".to_string())),
        (None, Some(path)) => {
            let file = path.display().to_string();
            let bytes = py
                .detach(|| attnc::io::read_bounded(&path, MAX_SOURCE_BYTES))
                .map_err(|e| input_error(py, None, None, format!("cannot read {file}: {e}")))?;
            (bytes, file)
        }
        _ => {
            return Err(input_error(
                py,
                None,
                None,
                "give exactly one of source text and a path".into(),
            ))
        }
    };
    let (text, module) = attnc::source::compile_bytes(&bytes);
    let module = module.map_err(|diagnostics| compile_error(py, &file, &text, &diagnostics))?;
    let names: Vec<&str> = module.kernels.iter().map(|k| k.name.as_str()).collect();
    let index = match kernel.as_deref() {
        Some(name) => names.iter().position(|k| *k == name).ok_or_else(|| {
            input_error(
                py,
                None,
                None,
                format!(
                    "{file}: no kernel named `{name}` (kernels: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        })?,
        None => match names.len() {
            0 => {
                return Err(input_error(
                    py,
                    None,
                    None,
                    format!("{file}: the file has no kernel"),
                ))
            }
            1 => 0,
            _ => {
                return Err(input_error(
                    py,
                    None,
                    None,
                    format!(
                        "{file} has several kernels ({}): choose one with kernel=NAME",
                        names.join(", ")
                    ),
                ))
            }
        },
    };
    let Some(checked) = module.kernels.into_iter().nth(index) else {
        return Err(input_error(py, None, None, "no such kernel".into()));
    };
    let given = shapes.unwrap_or_default();
    for unused in attnc::ir::bind::unused_symbols(&checked, &given) {
        PyErr::warn(
            py,
            &py.get_type::<PyUserWarning>(),
            &std::ffi::CString::new(format!(
                "shapes: kernel `{}` has no dimension `{unused}`; ignored",
                checked.name
            ))
            .unwrap_or_default(),
            1,
        )?;
    }
    let mut policy = match approx.as_deref() {
        None => Policy::from_items(&checked.approx),
        Some("exact") => Policy::exact(),
        Some(list) => Policy::from_items(
            &parse_approx_list(list)
                .map_err(|e| input_error(py, None, None, e.replace("--approx", "approx=")))?,
        ),
    };
    if let Some(tol) = tol {
        if !(tol.is_finite() && tol > 0.0) {
            return Err(input_error(
                py,
                None,
                None,
                format!("tol must be a positive finite number, got {tol}"),
            ));
        }
        policy.tol = tol;
    }
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // The cache `attnc run` reads and writes too, so both front ends choose the same plan.
    let ceilings = py.detach(|| attnc::machine::machine_ceilings().ceilings);
    let program = Program::new(checked, given, policy, threads, ceilings);
    let recipe = kernel::Recipe {
        source: text,
        approx,
        tol,
    };
    Ok(PyKernel::new(program, file, recipe))
}

/// The module `attnc._attnc`.
#[pymodule]
fn _attnc(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // The one-time setups of the first compile start as the module loads.
    attnc::machine::prepare_in_background();
    module.add_class::<PyKernel>()?;
    module.add_function(wrap_pyfunction!(_compile, module)?)?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
