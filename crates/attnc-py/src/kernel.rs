//! The Python `attnc.Kernel`: a checked kernel that compiles per input shape and runs on
//! NumPy arrays with the interpreter lock released.

use crate::errors::{grad_error, input_error, jit_error, specialize_error, Kind};
use crate::inputs::{stage, Given, StagedInput};
use crate::program::{OutputDim, Program, Specialized};
use attnc::approx::non_finite_input;
use attnc::io::DType;
use attnc::ir::dim::Dim;
use attnc::ir::Kernel as IrKernel;
use attnc::policy::approx_to_string;
use half::f16;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::PyArray;
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::sync::Arc;

/// A compiled kernel: call it on arrays (positionally or by parameter name).
#[pyclass(module = "attnc", name = "Kernel", frozen)]
pub struct PyKernel {
    program: Program,
    file: String,
    signature: String,
    recipe: Recipe,
}

/// What `attnc.compile` was given, to compile the same kernel again (pickling, copying).
#[derive(Clone, Debug)]
pub struct Recipe {
    /// The program's text.
    pub source: String,
    /// The options as given (`None` where not given).
    pub approx: Option<String>,
    /// The tolerance as given.
    pub tol: Option<f64>,
}

impl PyKernel {
    /// A kernel of `file` (a path, or `<string>`), ready to compile per shape.
    pub fn new(program: Program, file: String, recipe: Recipe) -> PyKernel {
        let signature = signature(program.kernel());
        PyKernel {
            program,
            file,
            signature,
            recipe,
        }
    }

    /// The graph node of result `output` (0: the first), or an input error naming the count.
    fn output_node(&self, py: Python<'_>, output: usize) -> PyResult<attnc::ir::NodeId> {
        let outputs = self.program.kernel().outputs();
        outputs.get(output).map(|o| o.node).ok_or_else(|| {
            input_error(
                py,
                None,
                None,
                format!(
                    "kernel `{}` returns {} value(s); there is no result {output}",
                    self.program.kernel().name,
                    outputs.len()
                ),
            )
        })
    }

    /// The shape of result `output` for inputs of these shapes (bound and checked).
    fn output_shape_of(
        &self,
        py: Python<'_>,
        shapes: &[Vec<usize>],
        output: usize,
    ) -> PyResult<Vec<usize>> {
        let params = self.declared();
        if shapes.len() != params.len() {
            return Err(input_error(
                py,
                None,
                None,
                format!(
                    "kernel `{}` takes {} inputs, got {} shapes",
                    self.program.kernel().name,
                    params.len(),
                    shapes.len()
                ),
            ));
        }
        let node = self.output_node(py, output)?;
        let bindings = self
            .program
            .bind(shapes)
            .map_err(|e| crate::errors::bind_error(py, &e))?;
        let kernel = self.program.kernel();
        attnc::ir::dim::resolve_shape(&kernel.graph.node(node).shape, &bindings)
            .ok_or_else(|| crate::errors::run_error(py, "the result's shape is unbound".into()))
    }

    fn declared(&self) -> &[attnc::ir::Param] {
        &self.program.kernel().params
    }

    fn param_list(&self) -> String {
        let names: Vec<&str> = self.declared().iter().map(|p| p.name.as_str()).collect();
        names.join(", ")
    }

    /// The call's arguments, one per parameter in order.
    fn arguments<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let params = self.declared();
        let kernel = &self.program.kernel().name;
        if args.len() > params.len() {
            return Err(input_error(
                py,
                None,
                None,
                format!(
                    "kernel `{kernel}` takes {} inputs ({}) but {} were given",
                    params.len(),
                    self.param_list(),
                    args.len()
                ),
            ));
        }
        let mut slots: Vec<Option<Bound<'py, PyAny>>> = vec![None; params.len()];
        for (slot, arg) in slots.iter_mut().zip(args.iter()) {
            *slot = Some(arg);
        }
        if let Some(kwargs) = kwargs {
            for (key, value) in kwargs.iter() {
                let key: String = key.extract()?;
                let Some(index) = params.iter().position(|p| p.name == key) else {
                    return Err(input_error(
                        py,
                        Some(&key),
                        None,
                        format!(
                            "kernel `{kernel}` has no parameter `{key}` (parameters: {})",
                            self.param_list()
                        ),
                    ));
                };
                if slots[index].is_some() {
                    return Err(input_error(
                        py,
                        Some(&key),
                        None,
                        format!("input `{key}` is given twice (by position and by name)"),
                    ));
                }
                slots[index] = Some(value);
            }
        }
        slots
            .into_iter()
            .zip(params)
            .map(|(slot, p)| {
                slot.ok_or_else(|| {
                    input_error(
                        py,
                        Some(&p.name),
                        None,
                        format!(
                            "input `{}` of kernel `{kernel}` is missing (parameters: {})",
                            p.name,
                            self.param_list()
                        ),
                    )
                })
            })
            .collect()
    }

    /// Holds every argument as an input view: NumPy float32/float16 arrays directly, anything
    /// else through `attnc._inputs.coerce` (torch tensors, DLPack, bfloat16, lists, float64).
    fn stage_all<'py>(
        &self,
        py: Python<'py>,
        arguments: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<StagedInput<'py>>> {
        static COERCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let mut staged = Vec::with_capacity(arguments.len());
        for (object, param) in arguments.iter().zip(self.declared()) {
            let given = match Given::float(object) {
                Some(given) => given,
                None => {
                    let coerce = COERCE.import(py, "attnc._inputs", "coerce")?;
                    let result = coerce.call1((object, &param.name))?;
                    let (array, bits): (Bound<'py, PyAny>, bool) = result.extract()?;
                    let given = if bits {
                        Given::bf16_bits(&array)
                    } else {
                        Given::float(&array)
                    };
                    given.ok_or_else(|| {
                        input_error(
                            py,
                            Some(&param.name),
                            None,
                            format!("input `{}`: not a float array after conversion", param.name),
                        )
                    })?
                }
            };
            staged.push(stage(py, &param.name, param.dtype, given)?);
        }
        Ok(staged)
    }

    /// Runs on staged inputs: the plan for their shapes (compiled now if new), then the machine
    /// code, both without the interpreter lock.
    fn run_staged<'py>(
        &self,
        py: Python<'py>,
        staged: &[StagedInput<'py>],
    ) -> PyResult<Bound<'py, PyAny>> {
        let shapes: Vec<&[usize]> = staged.iter().map(|s| s.shape.as_slice()).collect();
        let inputs: Vec<attnc_jit::Input<'_>> = staged.iter().map(StagedInput::input).collect();
        // Only a plan that approximates (or one yet to be chosen under a policy that allows
        // approximations) must not see NaN or infinity.
        let cached = self.program.cached(&shapes);
        let may_approximate = match &cached {
            Some(hit) => hit.compiled.approximates(),
            None => !self.program.policy().is_exact(),
        };
        let non_finite = match may_approximate {
            true => py.detach(|| non_finite_input(self.program.kernel(), &inputs)),
            false => None,
        };
        let specialized = match (non_finite, cached) {
            (Some(name), _) => {
                let message = format!(
                    "input `{name}` holds NaN or infinite values: this call runs the exact plan \
                     (an approximation could hide them, or spread them differently)"
                );
                PyErr::warn(
                    py,
                    &py.get_type::<PyUserWarning>(),
                    &std::ffi::CString::new(message).unwrap_or_default(),
                    1,
                )?;
                let owned: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
                py.detach(|| self.program.specialize_exact(&owned))
                    .map_err(|e| specialize_error(py, &e))?
            }
            (None, Some(hit)) => hit,
            (None, None) => {
                // Compiled for this call: approximations are validated on its inputs.
                let owned: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
                py.detach(|| self.program.specialize_for_call(&owned, &inputs))
                    .map_err(|e| specialize_error(py, &e))?
            }
        };
        let threads = self.program.threads();
        let rets: Vec<DType> = self
            .program
            .kernel()
            .outputs()
            .iter()
            .map(|o| o.dtype)
            .collect();
        let result = py.detach(|| {
            specialized.run_all(&inputs, threads).map(|outs| {
                outs.into_iter()
                    .zip(rets.iter().copied().chain(std::iter::repeat(DType::F32)))
                    .map(|(out, ret)| {
                        let data = if ret == DType::F16 {
                            Values::F16(out.data.into_iter().map(f16::from_f32).collect())
                        } else {
                            Values::F32(out.data)
                        };
                        (out.shape, data)
                    })
                    .collect::<Vec<_>>()
            })
        });
        let results = result.map_err(|e| jit_error(py, &e))?;
        let mut arrays = Vec::with_capacity(results.len());
        for (shape, values) in results {
            arrays.push(match values {
                Values::F32(v) => PyArray::from_owned_array(py, to_array(py, shape, v)?).into_any(),
                Values::F16(v) => PyArray::from_owned_array(py, to_array(py, shape, v)?).into_any(),
            });
        }
        // One output is an array; several are a tuple of arrays, in order.
        if arrays.len() == 1 {
            if let Some(array) = arrays.pop() {
                return Ok(array);
            }
        }
        Ok(PyTuple::new(py, arrays)?.into_any())
    }

    /// The plan of the most recent call, else of the `shapes=` values when they bind every
    /// symbol (compiled now).
    fn current(&self, py: Python<'_>) -> PyResult<Arc<Specialized>> {
        if let Some(latest) = self.program.latest() {
            return Ok(latest);
        }
        let Some(shapes) = self.program.given_input_shapes() else {
            let symbols = attnc::ir::bind::kernel_symbols(self.program.kernel());
            let unbound: Vec<String> = symbols
                .into_iter()
                .filter(|s| !self.program.given().contains_key(s))
                .collect();
            return Err(crate::errors::raise(
                py,
                Kind::Shape,
                format!(
                    "kernel `{}` has no plan yet: plans are specialized to bound shapes; call it \
                     on inputs, or compile with shapes= binding {}",
                    self.program.kernel().name,
                    unbound.join(", ")
                ),
                &[
                    ("input", crate::errors::Field::Text(None)),
                    (
                        "dimension",
                        crate::errors::Field::Text(unbound.first().cloned()),
                    ),
                    ("axis", crate::errors::Field::Number(None)),
                ],
            ));
        };
        py.detach(|| self.program.specialize(&shapes))
            .map_err(|e| specialize_error(py, &e))
    }

    /// The parameter indices of `wrt` (names, in the order wanted); every parameter when
    /// `None`.
    fn wrt_indices(&self, py: Python<'_>, wrt: Option<Vec<String>>) -> PyResult<Vec<usize>> {
        let kernel = self.program.kernel();
        let Some(names) = wrt else {
            return Ok((0..kernel.params.len()).collect());
        };
        if let Some(bad) = names
            .iter()
            .find(|n| n.contains(',') || n.trim() != n.as_str())
        {
            return Err(input_error(
                py,
                Some(bad),
                None,
                format!(
                    "wrt: `{bad}` is not a parameter name (parameters: {})",
                    self.param_list()
                ),
            ));
        }
        attnc::ir::grad::parse_wrt(kernel, &names.join(",")).map_err(|e| grad_error(py, &e))
    }

    /// The cotangents of a kernel with several outputs (`shapes`, in order): ones for each
    /// when `cotangent` is None, else one array per output in a tuple or list.
    fn stage_cotangents<'py>(
        &self,
        py: Python<'py>,
        cotangent: Option<Bound<'py, PyAny>>,
        shapes: &[Vec<usize>],
    ) -> PyResult<Vec<Cotangent<'py>>> {
        let Some(object) = cotangent.filter(|c| !c.is_none()) else {
            return shapes
                .iter()
                .map(|shape| self.stage_cotangent(py, None, false, shape))
                .collect();
        };
        let count = shapes.len();
        let items: Option<Vec<Bound<'py, PyAny>>> =
            match object.is_instance_of::<PyTuple>() || object.is_instance_of::<PyList>() {
                true => object.try_iter()?.collect::<PyResult<_>>().ok(),
                false => None,
            };
        let items = items.filter(|i| i.len() == count).ok_or_else(|| {
            input_error(
                py,
                Some("cotangent"),
                None,
                format!(
                    "kernel `{}` returns {count} values: cotangent must be a tuple of {count} arrays, one per output in order",
                    self.program.kernel().name
                ),
            )
        })?;
        items
            .into_iter()
            .zip(shapes)
            .map(|(item, shape)| self.stage_cotangent(py, Some(item), false, shape))
            .collect()
    }

    /// The cotangent as an f32 input of the output's shape (ones when not given).
    fn stage_cotangent<'py>(
        &self,
        py: Python<'py>,
        cotangent: Option<Bound<'py, PyAny>>,
        bf16_bits: bool,
        shape: &[usize],
    ) -> PyResult<Cotangent<'py>> {
        let Some(object) = cotangent.filter(|c| !c.is_none()) else {
            let len = attnc::io::shape_product(shape).ok_or_else(|| {
                crate::errors::run_error(py, "the output's size overflows".into())
            })?;
            return Ok(Cotangent::Ones(vec![1.0; len]));
        };
        static COERCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let given = if bf16_bits {
            Given::bf16_bits(&object)
        } else {
            Given::float(&object)
        };
        let given = match given {
            Some(given) => given,
            None => {
                let coerce = COERCE.import(py, "attnc._inputs", "coerce")?;
                let (array, bits): (Bound<'py, PyAny>, bool) =
                    coerce.call1((&object, "cotangent"))?.extract()?;
                let given = if bits {
                    Given::bf16_bits(&array)
                } else {
                    Given::float(&array)
                };
                given.ok_or_else(|| {
                    input_error(
                        py,
                        Some("cotangent"),
                        None,
                        "cotangent: not a float array after conversion".into(),
                    )
                })?
            }
        };
        let staged = stage(py, "cotangent", DType::F32, given)?;
        if staged.shape != shape {
            return Err(crate::errors::raise(
                py,
                Kind::Shape,
                format!(
                    "cotangent has shape {:?} but the output has shape {:?}",
                    staged.shape, shape
                ),
                &[
                    (
                        "input",
                        crate::errors::Field::Text(Some("cotangent".into())),
                    ),
                    ("dimension", crate::errors::Field::Text(None)),
                    ("axis", crate::errors::Field::Number(None)),
                ],
            ));
        }
        Ok(Cotangent::Given(staged))
    }

    /// The gradients for staged inputs: the gradient plan for their shapes and `wrt`
    /// (compiled now if new), then its machine code, both without the interpreter lock.
    /// One float32 array per parameter of `wrt`, in that order.
    fn grad_staged<'py>(
        &self,
        py: Python<'py>,
        staged: &[StagedInput<'py>],
        cotangent: Option<Bound<'py, PyAny>>,
        cotangent_bf16: bool,
        wrt: &[usize],
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let shapes: Vec<Vec<usize>> = staged.iter().map(|s| s.shape.clone()).collect();
        let specialized = py
            .detach(|| self.program.specialize_grad(&shapes, wrt))
            .map_err(|e| specialize_error(py, &e))?;
        let cotangents = match specialized.output_shapes.as_slice() {
            [shape] => vec![self.stage_cotangent(py, cotangent, cotangent_bf16, shape)?],
            shapes => self.stage_cotangents(py, cotangent, shapes)?,
        };
        let inputs: Vec<attnc_jit::Input<'_>> = staged.iter().map(StagedInput::input).collect();
        let threads = self.program.threads();
        let outputs = {
            let dys = cotangents
                .iter()
                .map(|c| match c {
                    Cotangent::Ones(v) => Ok(v.as_slice()),
                    Cotangent::Given(s) => f32_of(s).ok_or_else(|| {
                        crate::errors::run_error(
                            py,
                            "the cotangent was not staged as float32".into(),
                        )
                    }),
                })
                .collect::<PyResult<Vec<&[f32]>>>()?;
            py.detach(|| specialized.run(&inputs, &dys, threads))
                .map_err(|e| jit_error(py, &e))?
        };
        gradient_arrays(py, outputs)
    }

    /// Converted arrays (as `_run` takes them) staged for the declared parameters.
    fn stage_converted<'py>(
        &self,
        py: Python<'py>,
        arrays: &[Bound<'py, PyAny>],
        bf16: &[bool],
    ) -> PyResult<Vec<StagedInput<'py>>> {
        let params = self.declared();
        if arrays.len() != params.len() || bf16.len() != params.len() {
            return Err(input_error(
                py,
                None,
                None,
                format!(
                    "kernel `{}` takes {} inputs, got {}",
                    self.program.kernel().name,
                    params.len(),
                    arrays.len()
                ),
            ));
        }
        let mut staged = Vec::with_capacity(arrays.len());
        for ((array, &bits), param) in arrays.iter().zip(bf16).zip(params) {
            let given = if bits {
                Given::bf16_bits(array)
            } else {
                Given::float(array)
            };
            let given = given.ok_or_else(|| {
                input_error(
                    py,
                    Some(&param.name),
                    None,
                    format!("input `{}`: expected a converted array", param.name),
                )
            })?;
            staged.push(stage(py, &param.name, param.dtype, given)?);
        }
        Ok(staged)
    }
}

/// The gradients as float32 NumPy arrays, in order.
fn gradient_arrays<'py>(
    py: Python<'py>,
    outputs: Vec<attnc_jit::Output>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    outputs
        .into_iter()
        .map(|o| Ok(PyArray::from_owned_array(py, to_array(py, o.shape, o.data)?).into_any()))
        .collect()
}

/// A staged input's elements when they are f32.
fn f32_of<'a>(s: &'a StagedInput<'_>) -> Option<&'a [f32]> {
    match s.input() {
        attnc_jit::Input::F32(x) => Some(x),
        _ => None,
    }
}

/// The cotangent of one gradient call.
enum Cotangent<'py> {
    /// Ones (the gradient of the output's sum).
    Ones(Vec<f32>),
    /// The caller's, as f32.
    Given(StagedInput<'py>),
}

/// A result's elements in its NumPy type.
enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

fn to_array<T>(py: Python<'_>, shape: Vec<usize>, values: Vec<T>) -> PyResult<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| {
        crate::errors::run_error(py, format!("the result does not have its shape: {e}"))
    })
}

#[pymethods]
impl PyKernel {
    /// Runs the kernel: inputs by position or by parameter name; returns a NumPy array, or a
    /// tuple of arrays for a kernel returning several values.
    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let arguments = self.arguments(py, args, kwargs)?;
        let staged = self.stage_all(py, arguments)?;
        self.run_staged(py, &staged)
    }

    /// Which inputs a call with these arguments would copy (`True`) rather than read in place;
    /// nothing is compiled or run. Conversions made before the native side sees an input
    /// (float64 rounded to float32, lists made arrays) are copies by nature and not counted.
    #[pyo3(signature = (*args, **kwargs))]
    fn _copies<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Vec<bool>> {
        let arguments = self.arguments(py, args, kwargs)?;
        Ok(self
            .stage_all(py, arguments)?
            .iter()
            .map(|s| s.copied)
            .collect())
    }

    /// Runs on arrays already converted (one per parameter, in order): float32 or float16
    /// NumPy arrays, or uint16 arrays of bfloat16 bit patterns where `bf16` says so. The path
    /// of `attnc.torch`.
    fn _run<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<Bound<'py, PyAny>>,
        bf16: Vec<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let staged = self.stage_converted(py, &arrays, &bf16)?;
        self.run_staged(py, &staged)
    }

    /// The gradients of the output with respect to the parameters in `wrt` (names; default:
    /// every parameter), for these inputs (by position or by parameter name, as for a call)
    /// and `cotangent`, the gradient of the output (an array of the output's shape; default:
    /// ones, the gradient of the output's sum; for a kernel returning several values a tuple
    /// with one array per output, the gradients being those of the sum of their products):
    /// a dict from each name in `wrt`, in order, to a float32 array of its parameter's shape.
    ///
    /// The gradients are those of the exact form (approximations apply to calls only),
    /// compiled once per input shapes and `wrt` list (the forward is recomputed as the
    /// backward needs it: nothing is kept between calls). A parameter named `wrt` or
    /// `cotangent` is passed by position.
    #[pyo3(signature = (*args, wrt=None, cotangent=None, **kwargs))]
    fn grad<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        wrt: Option<Vec<String>>,
        cotangent: Option<Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let indices = self.wrt_indices(py, wrt)?;
        let arguments = self.arguments(py, args, kwargs)?;
        let staged = self.stage_all(py, arguments)?;
        let grads = self.grad_staged(py, &staged, cotangent, false, &indices)?;
        let out = PyDict::new(py);
        for (&index, grad) in indices.iter().zip(grads) {
            out.set_item(&self.declared()[index].name, grad)?;
        }
        Ok(out)
    }

    /// [`grad`](Self::grad) on converted arrays (as `_run` takes them, the cotangent too, with
    /// `cotangent_bf16` for bfloat16 bits): one float32 array per name of `wrt`, in order.
    /// The path of `attnc.torch`'s backward.
    fn _grad<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<Bound<'py, PyAny>>,
        bf16: Vec<bool>,
        cotangent: Bound<'py, PyAny>,
        cotangent_bf16: bool,
        wrt: Vec<String>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let indices = self.wrt_indices(py, Some(wrt))?;
        let staged = self.stage_converted(py, &arrays, &bf16)?;
        self.grad_staged(py, &staged, Some(cotangent), cotangent_bf16, &indices)
    }

    /// The forward for training on converted arrays (as `_run` takes them): `(output, lse)`,
    /// where `lse` holds the row log-sum-exps of the kernel's fused attention (float32, the
    /// output's shape without its last axis) when the gradients can start from them
    /// (`_grad_saved`), and `None` otherwise (the output is then `_run`'s). The path of
    /// `attnc.torch`'s forward under autograd; exact kernels only (an approximating kernel's
    /// forward is not the form its gradients differentiate).
    fn _forward_saving<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<Bound<'py, PyAny>>,
        bf16: Vec<bool>,
    ) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
        let staged = self.stage_converted(py, &arrays, &bf16)?;
        // The float parameters (segment ids have no gradient): the log-sum-exps do not depend
        // on which of them the backward differentiates.
        let every: Vec<usize> = (self.declared().iter().enumerate())
            .filter(|(_, p)| p.dtype != DType::I32)
            .map(|(i, _)| i)
            .collect();
        let shapes: Vec<Vec<usize>> = staged.iter().map(|s| s.shape.clone()).collect();
        let specialized = if self.program.policy().is_exact() {
            // A kernel whose gradients do not compile still runs its forward.
            py.detach(|| self.program.specialize_grad(&shapes, &every))
                .ok()
        } else {
            None
        };
        if let Some(specialized) = specialized {
            let inputs: Vec<attnc_jit::Input<'_>> = staged.iter().map(StagedInput::input).collect();
            let threads = self.program.threads();
            let saved = py
                .detach(|| specialized.forward_saving(&inputs, threads))
                .map_err(|e| jit_error(py, &e))?;
            if let Some(saved) = saved {
                let shape = specialized.output_shape().to_vec();
                let rows = shape[..shape.len().saturating_sub(1)].to_vec();
                let output = PyArray::from_owned_array(py, to_array(py, shape, saved.o)?);
                let lse = PyArray::from_owned_array(py, to_array(py, rows, saved.lse)?);
                return Ok((output.into_any(), Some(lse.into_any())));
            }
        }
        Ok((self.run_staged(py, &staged)?, None))
    }

    /// `_grad` from the forward's `output` and `lse` (as `_forward_saving` returned them for
    /// these arrays) instead of a recomputed forward; recomputes where the gradients cannot
    /// start from them. The path of `attnc.torch`'s backward after a saving forward.
    #[allow(clippy::too_many_arguments)]
    fn _grad_saved<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<Bound<'py, PyAny>>,
        bf16: Vec<bool>,
        output: Bound<'py, PyAny>,
        lse: Bound<'py, PyAny>,
        cotangent: Bound<'py, PyAny>,
        cotangent_bf16: bool,
        wrt: Vec<String>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let indices = self.wrt_indices(py, Some(wrt))?;
        let staged = self.stage_converted(py, &arrays, &bf16)?;
        let shapes: Vec<Vec<usize>> = staged.iter().map(|s| s.shape.clone()).collect();
        let specialized = py
            .detach(|| self.program.specialize_grad(&shapes, &indices))
            .map_err(|e| specialize_error(py, &e))?;
        let residual = |object: &Bound<'py, PyAny>, name: &str| -> PyResult<StagedInput<'py>> {
            let given = Given::float(object).ok_or_else(|| {
                input_error(
                    py,
                    Some(name),
                    None,
                    format!("{name}: expected a float32 array"),
                )
            })?;
            stage(py, name, DType::F32, given)
        };
        let (output, lse) = (residual(&output, "output")?, residual(&lse, "lse")?);
        let given = cotangent.clone();
        let cotangent = self.stage_cotangent(
            py,
            Some(cotangent),
            cotangent_bf16,
            specialized.output_shape(),
        )?;
        let dy = match &cotangent {
            Cotangent::Ones(v) => Some(v.as_slice()),
            Cotangent::Given(s) => f32_of(s),
        };
        let (Some(o), Some(l), Some(dy)) = (f32_of(&output), f32_of(&lse), dy) else {
            return Err(crate::errors::run_error(
                py,
                "the saved forward or the cotangent was not staged as float32".into(),
            ));
        };
        let inputs: Vec<attnc_jit::Input<'_>> = staged.iter().map(StagedInput::input).collect();
        let threads = self.program.threads();
        let saved = attnc_jit::backward::Saved { o, lse: l };
        let outputs = py
            .detach(|| specialized.run_saved(&inputs, saved, dy, threads))
            .map_err(|e| jit_error(py, &e))?;
        let Some(outputs) = outputs else {
            return self.grad_staged(py, &staged, Some(given), cotangent_bf16, &indices);
        };
        gradient_arrays(py, outputs)
    }

    /// The median and the least microseconds of `calls` runs of the compiled code on these
    /// converted arrays (as for `_run`), timed in Rust around the library call alone: the
    /// baseline the Python call overhead is measured against in the same process
    /// (`python/bench/overhead.py`).
    fn _time_native(
        &self,
        py: Python<'_>,
        arrays: Vec<Bound<'_, PyAny>>,
        bf16: Vec<bool>,
        calls: usize,
    ) -> PyResult<(f64, f64)> {
        let mut staged = Vec::with_capacity(arrays.len());
        for ((array, bits), param) in arrays.iter().zip(bf16).zip(self.declared()) {
            let given = if bits {
                Given::bf16_bits(array)
            } else {
                Given::float(array)
            };
            let given = given.ok_or_else(|| {
                input_error(
                    py,
                    Some(&param.name),
                    None,
                    "expected a converted array".into(),
                )
            })?;
            staged.push(stage(py, &param.name, param.dtype, given)?);
        }
        let shapes: Vec<Vec<usize>> = staged.iter().map(|s| s.shape.clone()).collect();
        let specialized = py
            .detach(|| self.program.specialize(&shapes))
            .map_err(|e| specialize_error(py, &e))?;
        let inputs: Vec<attnc_jit::Input<'_>> = staged.iter().map(StagedInput::input).collect();
        let threads = self.program.threads();
        let times = py.detach(|| {
            let mut times = Vec::with_capacity(calls);
            for _ in 0..calls.max(1) {
                let start = std::time::Instant::now();
                let out = specialized.run(&inputs, threads)?;
                times.push(start.elapsed().as_secs_f64() * 1e6);
                std::hint::black_box(out);
            }
            Ok::<_, attnc_jit::JitError>(times)
        });
        let mut times = times.map_err(|e| jit_error(py, &e))?;
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        Ok((median, times.first().copied().unwrap_or(f64::NAN)))
    }

    /// The kernel's name.
    #[getter]
    fn name(&self) -> &str {
        &self.program.kernel().name
    }

    /// `name(q: f32[h, n, d], ...) -> f32[h, n, d]`, with `@approx(...)` in front when the
    /// kernel has it (as `attnc check` prints it).
    #[getter]
    fn signature(&self) -> &str {
        &self.signature
    }

    /// The file the kernel was read from (`<string>` for source text).
    #[getter]
    fn file(&self) -> &str {
        &self.file
    }

    /// The parameters: `(name, dtype, shape)` with each axis a symbol (str) or a size (int).
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.declared()
            .iter()
            .map(|p| {
                let shape: Vec<Bound<'py, PyAny>> = p
                    .shape
                    .iter()
                    .map(|d| dim_object(py, d))
                    .collect::<PyResult<_>>()?;
                PyTuple::new(
                    py,
                    [
                        p.name.as_str().into_pyobject(py)?.into_any(),
                        p.dtype.keyword().into_pyobject(py)?.into_any(),
                        PyTuple::new(py, shape)?.into_any(),
                    ],
                )
            })
            .collect()
    }

    /// The declared return type: `f32`, `f16` or `bf16` (results are NumPy float32 for f32 and
    /// bf16, whose values are rounded to bf16, and float16 for f16).
    #[getter]
    fn return_dtype(&self) -> &'static str {
        self.program.kernel().ret_dtype.keyword()
    }

    /// The approximation policy (`exact`, or the allowed approximations and the tolerance).
    #[getter]
    fn policy(&self) -> String {
        self.program.policy().to_string()
    }

    /// Worker threads of each call.
    #[getter]
    fn threads(&self) -> usize {
        self.program.threads()
    }

    /// The `shapes=` values given at compile time.
    #[getter]
    fn shapes(&self) -> std::collections::BTreeMap<String, u64> {
        self.program.given().clone()
    }

    /// Every dimension's value in the most recent plan (`None` before the first).
    #[getter]
    fn bindings(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        self.program.latest().map(|s| s.bindings.clone())
    }

    /// How the most recent plan's approximations were measured (a list of dicts, as `attnc run
    /// --format json`'s `validations`: approximations, estimated and measured error, whether
    /// accepted, the sample and its rows, the time it took); empty before the first plan and
    /// for exact policies. A plan compiled for a call is measured on that call's inputs.
    #[getter]
    fn validations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let validations = self
            .program
            .latest()
            .map(|s| s.compiled.validations.clone())
            .unwrap_or_default();
        crate::json::record_to_python(py, &validations)
    }

    /// The kernel plan (text) of the most recent call, else of the `shapes=` values when they
    /// bind every dimension; a `ShapeError` before either.
    #[getter]
    fn plan(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.current(py)?.compiled.plan().to_string())
    }

    /// The optimizer's trace as a dict (`attnc explain --format json`'s `trace`): of the most
    /// recent call's plan, else at the `shapes=` values, else of the program with its
    /// dimensions unbound.
    fn explain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let trace = py
            .detach(|| self.program.trace())
            .map_err(|e| specialize_error(py, &e))?;
        crate::json::record_to_python(py, &trace)
    }

    /// Where each axis of the result (of result `output`, counting from 0, for a kernel
    /// returning several) gets its size: `("const", size)`, `("input", parameter index,
    /// axis)`, `("given", size)` or `("unbound", symbol)`.
    #[pyo3(signature = (output=0))]
    fn output_dims<'py>(
        &self,
        py: Python<'py>,
        output: usize,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let node = self.output_node(py, output)?;
        self.program
            .output_dims_of(node)
            .into_iter()
            .map(|d| {
                let items = match d {
                    OutputDim::Const(c) => vec![
                        "const".into_pyobject(py)?.into_any(),
                        c.into_pyobject(py)?.into_any(),
                    ],
                    OutputDim::Input { param, axis } => vec![
                        "input".into_pyobject(py)?.into_any(),
                        param.into_pyobject(py)?.into_any(),
                        axis.into_pyobject(py)?.into_any(),
                    ],
                    OutputDim::Given(v) => vec![
                        "given".into_pyobject(py)?.into_any(),
                        v.into_pyobject(py)?.into_any(),
                    ],
                    OutputDim::Unbound(s) => vec![
                        "unbound".into_pyobject(py)?.into_any(),
                        s.into_pyobject(py)?.into_any(),
                    ],
                };
                PyTuple::new(py, items)
            })
            .collect()
    }

    /// The shape of every result, in order, for inputs of these shapes (bound and checked;
    /// nothing compiled).
    fn output_shapes(&self, py: Python<'_>, shapes: Vec<Vec<usize>>) -> PyResult<Vec<Vec<usize>>> {
        (0..self.program.kernel().outputs().len())
            .map(|k| self.output_shape_of(py, &shapes, k))
            .collect()
    }

    /// The declared type of every result, in order (`f32`, `f16`, `bf16`).
    #[getter]
    fn return_dtypes(&self) -> Vec<&'static str> {
        let kernel = self.program.kernel();
        kernel.outputs().iter().map(|o| o.dtype.keyword()).collect()
    }

    /// The result's shape for inputs of these shapes (bound and checked; nothing compiled).
    fn output_shape(&self, py: Python<'_>, shapes: Vec<Vec<usize>>) -> PyResult<Vec<usize>> {
        self.output_shape_of(py, &shapes, 0)
    }

    /// The number of compiled plans held (one per input shape, most recent 32).
    #[getter]
    fn cache_size(&self) -> usize {
        self.program.cached_count()
    }

    /// Drops every compiled plan (the next call compiles again).
    fn clear_cache(&self) {
        self.program.clear_cache();
    }

    /// Pickles as the program's text and options: unpickling compiles the kernel again
    /// (compiled code is specialized to this process and is not carried).
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let rebuild = py.import("attnc")?.getattr("_rebuild")?;
        let args = (
            self.recipe.source.as_str(),
            self.program.kernel().name.as_str(),
            self.program.given().clone(),
            self.recipe.approx.clone(),
            self.recipe.tol,
            self.program.threads(),
            self.file.as_str(),
        )
            .into_pyobject(py)?;
        Ok((rebuild, args))
    }

    fn __repr__(&self) -> String {
        format!("<attnc.Kernel {}>", self.signature)
    }
}

fn dim_object<'py>(py: Python<'py>, dim: &Dim) -> PyResult<Bound<'py, PyAny>> {
    Ok(match dim {
        Dim::Sym(s) => s.as_str().into_pyobject(py)?.into_any(),
        Dim::Const(c) => c.into_pyobject(py)?.into_any(),
        // A pooled axis, `ceil(n/b)`, is shown as written.
        Dim::CeilDiv(..) => dim.to_string().into_pyobject(py)?.into_any(),
    })
}

/// `name(q: f32[h, n, d], ...) -> f32[h, n, d]`, with the `@approx` items in front.
pub fn signature(kernel: &IrKernel) -> String {
    let approx = if kernel.approx.is_empty() {
        String::new()
    } else {
        let items: Vec<String> = kernel.approx.iter().map(approx_to_string).collect();
        format!("@approx({}) ", items.join(", "))
    };
    format!("{approx}{}", attnc::ir::print::signature(kernel))
}
