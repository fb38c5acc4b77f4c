//! attnc's errors as the Python exceptions of `attnc._errors`.
//!
//! The exception classes are Python classes (so they can inherit from `ValueError` and
//! `RuntimeError` as well as from `attnc.AttncError`, and carry keyword attributes); this module
//! builds instances of them with the structured fields of each Rust error: the line and column
//! of a diagnostic, the input and dimension of a shape problem.

use crate::program::SpecializeError;
use attnc::engine::RunError;
use attnc::ir::bind::BindError;
use attnc::ir::grad::GradError;
use attnc_jit::JitError;
use attnc_syntax::Diagnostic;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyType};

/// The Python module that defines the exception classes.
const MODULE: &str = "attnc._errors";

/// One of the exception classes of `attnc._errors`.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `attnc.CompileError`: the program does not parse or check.
    Compile,
    /// `attnc.InputError`: an argument (array, dtype, name, option) is wrong.
    Input,
    /// `attnc.ShapeError`: the inputs' shapes do not fit the kernel or each other.
    Shape,
    /// `attnc.RunError`: compiling or running failed although the inputs were right.
    Run,
    /// `attnc.GradientUnavailableError`: the kernel holds an op whose gradient is not derived.
    Gradient,
}

impl Kind {
    fn class_name(self) -> &'static str {
        match self {
            Kind::Compile => "CompileError",
            Kind::Input => "InputError",
            Kind::Shape => "ShapeError",
            Kind::Run => "RunError",
            Kind::Gradient => "GradientUnavailableError",
        }
    }

    fn class<'py>(self, py: Python<'py>) -> PyResult<&'py Bound<'py, PyType>> {
        static COMPILE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        static INPUT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        static SHAPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        static RUN: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        static GRADIENT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        let cell = match self {
            Kind::Compile => &COMPILE,
            Kind::Input => &INPUT,
            Kind::Shape => &SHAPE,
            Kind::Run => &RUN,
            Kind::Gradient => &GRADIENT,
        };
        cell.import(py, MODULE, self.class_name())
    }
}

/// An exception of `kind` with `message` and keyword attributes `fields`.
pub fn raise(py: Python<'_>, kind: Kind, message: String, fields: &[(&str, Field)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        for (name, value) in fields {
            match value {
                Field::Text(Some(text)) => kwargs.set_item(*name, text)?,
                Field::Number(Some(n)) => kwargs.set_item(*name, *n)?,
                Field::Text(None) | Field::Number(None) => kwargs.set_item(*name, py.None())?,
                Field::Object(object) => kwargs.set_item(*name, object)?,
            }
        }
        let instance = kind.class(py)?.call((message.clone(),), Some(&kwargs))?;
        Ok(PyErr::from_value(instance))
    };
    // The classes ship with the package; if they cannot be had, the message still reaches
    // the caller.
    build().unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!("{message} (and attnc._errors is unusable: {e})"))
    })
}

/// A keyword attribute of an exception.
pub enum Field {
    /// A string, or `None`.
    Text(Option<String>),
    /// An integer, or `None`.
    Number(Option<u64>),
    /// Any Python object.
    Object(Py<PyAny>),
}

/// An input problem naming the input and, where one is at fault, the dimension.
pub fn input_error(
    py: Python<'_>,
    input: Option<&str>,
    axis: Option<usize>,
    message: String,
) -> PyErr {
    raise(
        py,
        Kind::Input,
        message,
        &[
            ("input", Field::Text(input.map(str::to_string))),
            ("dimension", Field::Text(None)),
            ("axis", Field::Number(axis.map(|a| a as u64))),
        ],
    )
}

/// A run or compile failure that is not the inputs' fault.
pub fn run_error(py: Python<'_>, message: String) -> PyErr {
    raise(py, Kind::Run, message, &[])
}

/// A shape problem found while binding, in Python's words (`shapes=` for `--shape`).
pub fn bind_error(py: Python<'_>, error: &BindError) -> PyErr {
    let (message, input, dimension, axis) = match error {
        BindError::InputCount { .. } | BindError::Overflow { .. } => {
            (error.to_string(), None, None, None)
        }
        BindError::RankMismatch { input, .. } => {
            (error.to_string(), Some(input.clone()), None, None)
        }
        BindError::DimConflict {
            symbol,
            second_input,
            second_axis,
            ..
        } => (
            error.to_string(),
            Some(second_input.clone()),
            Some(symbol.clone()),
            Some(*second_axis),
        ),
        BindError::LiteralMismatch {
            input,
            axis,
            expected,
            ..
        } => (
            error.to_string(),
            Some(input.clone()),
            Some(expected.to_string()),
            Some(*axis),
        ),
        BindError::GivenConflict {
            symbol,
            given,
            input,
            axis,
            got,
        } => (
            format!(
                "shapes={{'{symbol}': {given}}} contradicts input `{input}` axis {axis}, \
                 which gives `{symbol}` = {got}"
            ),
            Some(input.clone()),
            Some(symbol.clone()),
            Some(*axis),
        ),
        BindError::Unbound { symbol } => (
            format!(
                "dimension `{symbol}` is not bound: pass shapes={{'{symbol}': <size>}} \
                 or an input that has it"
            ),
            None,
            Some(symbol.clone()),
            None,
        ),
        BindError::ZeroDimAsNumber { symbol } | BindError::ZeroPool { symbol, .. } => {
            (error.to_string(), None, Some(symbol.clone()), None)
        }
        BindError::Pattern(_) => (error.to_string(), None, None, None),
        BindError::Gate { axis, .. } => (error.to_string(), None, None, Some(*axis)),
    };
    raise(
        py,
        Kind::Shape,
        message,
        &[
            ("input", Field::Text(input)),
            ("dimension", Field::Text(dimension)),
            ("axis", Field::Number(axis.map(|a| a as u64))),
        ],
    )
}

/// A failure of the compile pipeline or of a run.
pub fn compile_run_error(py: Python<'_>, error: &RunError) -> PyErr {
    match error {
        RunError::Bind(bind) => bind_error(py, bind),
        RunError::Jit(jit) => jit_error(py, jit),
        RunError::InputCount { .. } | RunError::CotangentCount { .. } => {
            input_error(py, None, None, error.to_string())
        }
        // The binary's advice names its option; Python has none to raise.
        RunError::Memory { .. } => run_error(
            py,
            error.to_string().replace(", or raise --memory-limit", ""),
        ),
        RunError::Eval(_) | RunError::Calibration(_) => run_error(py, error.to_string()),
        RunError::Grad(grad) => grad_error(py, grad),
    }
}

/// A gradient that cannot be built: a wrong `wrt` list is the caller's input, an op without
/// a derived gradient `attnc.GradientUnavailableError`.
pub fn grad_error(py: Python<'_>, error: &GradError) -> PyErr {
    match error {
        GradError::UnknownParam { name, .. } | GradError::Duplicate { name } => {
            input_error(py, Some(name), None, error.to_string())
        }
        GradError::Empty => input_error(py, None, None, error.to_string()),
        GradError::Unsupported { .. } | GradError::Build { .. } => run_error(py, error.to_string()),
    }
}

/// A failure of the machine code's checks or of code generation.
pub fn jit_error(py: Python<'_>, error: &JitError) -> PyErr {
    match error {
        JitError::Buffer { input, detail } => {
            input_error(py, Some(input), None, format!("input `{input}`: {detail}"))
        }
        JitError::Shape(_) => raise(
            py,
            Kind::Shape,
            error.to_string(),
            &[
                ("input", Field::Text(None)),
                ("dimension", Field::Text(None)),
                ("axis", Field::Number(None)),
            ],
        ),
        JitError::Unsupported { .. } | JitError::Codegen { .. } | JitError::Plan { .. } => {
            run_error(py, error.to_string())
        }
    }
}

/// A failure to specialize a kernel to some shapes.
pub fn specialize_error(py: Python<'_>, error: &SpecializeError) -> PyErr {
    match error {
        SpecializeError::Bind(bind) => bind_error(py, bind),
        SpecializeError::Compile(run) => compile_run_error(py, run),
    }
}

/// `attnc.CompileError` for the diagnostics of `text` (read from `file`): the first
/// diagnostic's message, line and column, every diagnostic rendered, and each as a dict.
pub fn compile_error(py: Python<'_>, file: &str, text: &str, diagnostics: &[Diagnostic]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let mut rendered = String::new();
        for d in diagnostics {
            rendered.push_str(&d.render(file, text));
            rendered.push('\n');
        }
        let n = diagnostics.len();
        rendered.push_str(&format!(
            "error: {file}: {n} error{} found",
            if n == 1 { "" } else { "s" }
        ));
        let located: Vec<_> = diagnostics.iter().map(|d| d.locate(file, text)).collect();
        let list = PyList::empty(py);
        for d in &located {
            let value = serde_json::to_value(d)
                .map_err(|e| PyRuntimeError::new_err(format!("diagnostic: {e}")))?;
            list.append(crate::json::to_python(py, &value)?)?;
        }
        let first = located.first();
        let fields = [
            (
                "message",
                Field::Text(Some(first.map(|d| d.message.clone()).unwrap_or_default())),
            ),
            ("file", Field::Text(Some(file.to_string()))),
            ("line", Field::Number(first.map(|d| d.line as u64))),
            ("column", Field::Number(first.map(|d| d.column as u64))),
            ("diagnostics", Field::Object(list.into_any().unbind())),
        ];
        Ok(raise(py, Kind::Compile, rendered, &fields))
    };
    build().unwrap_or_else(|e| e)
}
