//! From the shared options to a kernel with bound shapes and one tensor per parameter.

use crate::args::{EngineArg, SharedArgs};
use crate::check::load_module;
use crate::failure::Failure;
use attnc::engine::Engine;
use attnc::io::{self, NormalStream, Tensor, TensorData};
use attnc::ir::{Bindings, DType, Kernel, Module};
use attnc::policy::{parse_approx_list, Policy};
use attnc::{Calibration, Compiler};
use std::collections::BTreeMap;
use std::path::Path;

/// A kernel ready to run: its module, bound shapes, inputs and policy.
pub struct Prepared {
    pub module: Module,
    pub kernel_index: usize,
    pub bindings: Bindings,
    pub inputs: Vec<Tensor>,
    pub policy: Policy,
    /// The pipeline every subcommand compiles through: policy, threads, this machine's
    /// ceilings and the memory budget.
    pub compiler: Compiler,
    pub engine: Engine,
    pub threads: usize,
    /// Calibration tensors for validating approximations, by parameter name.
    pub calibration: Vec<(String, Tensor)>,
    /// Notes printed on stderr in text mode and included in JSON.
    pub notes: Vec<String>,
    /// The `--random` seed and, per parameter, whether its input was drawn from it.
    pub random: Option<(u64, Vec<bool>)>,
}

impl Prepared {
    /// The bound symbols as `d=64, h=8`, or `(none)`: the `bindings:` line of a report.
    pub fn bindings_line(&self) -> String {
        if self.bindings.is_empty() {
            return "(none)".into();
        }
        let bound: Vec<String> = self
            .bindings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        bound.join(", ")
    }

    pub fn kernel(&self) -> &Kernel {
        &self.module.kernels[self.kernel_index]
    }

    /// Compiles the kernel as `run` does: optimized under the policy, approximations validated
    /// on the `--calibrate` tensors, else on the inputs the user gave, else on blocks of the
    /// `--random` inputs.
    pub fn compile(&self) -> Result<attnc::Compiled, attnc::engine::RunError> {
        let slots = self.drawn_inputs();
        let (tensors, label) = self.calibration_tensors();
        let calibration = Calibration {
            tensors: &tensors,
            drawn: attnc::calibration::DrawnInputs {
                seed: self.random.as_ref().map_or(0, |(seed, _)| *seed),
                tensors: &slots,
            },
            label: label.as_deref(),
        };
        self.compiler
            .compile_calibrated(self.kernel(), &self.bindings, calibration)
    }

    /// The tensors approximations are validated on: `--calibrate` files, and the user's own
    /// inputs for the other parameters (only when the policy approximates: they are copied),
    /// with how the report names them.
    fn calibration_tensors(&self) -> (Vec<(String, Tensor)>, Option<String>) {
        let mut tensors = self.calibration.clone();
        if self.policy.is_exact() {
            return (tensors, None);
        }
        let drawn = self.random.as_ref().map(|(_, drawn)| drawn.as_slice());
        let mut from_inputs = Vec::new();
        for (index, (param, tensor)) in self.kernel().params.iter().zip(&self.inputs).enumerate() {
            let was_drawn = drawn.is_some_and(|d| d.get(index).copied().unwrap_or(false));
            if was_drawn || tensors.iter().any(|(name, _)| *name == param.name) {
                continue;
            }
            tensors.push((param.name.clone(), tensor.clone()));
            from_inputs.push(param.name.as_str());
        }
        let label = match (from_inputs.is_empty(), self.calibration.is_empty()) {
            (true, _) => None,
            (false, true) => Some(format!("the inputs ({})", from_inputs.join(", "))),
            (false, false) => Some(format!(
                "the calibration files and the inputs ({})",
                from_inputs.join(", ")
            )),
        };
        (tensors, label)
    }

    /// The inputs drawn by `--random`, for calibration blocks to be copied from.
    pub fn drawn_inputs(&self) -> Vec<Option<&Tensor>> {
        let Some((_, drawn)) = &self.random else {
            return Vec::new();
        };
        self.inputs
            .iter()
            .zip(drawn)
            .map(|(tensor, &was_drawn)| was_drawn.then_some(tensor))
            .collect()
    }
}

/// Everything `run` (and `explain`, `bench`) needs before execution.
pub fn prepare(args: &SharedArgs, need_inputs: bool) -> Result<Prepared, Failure> {
    let given = parse_shape_args(&args.shape)?;
    let cli_policy = parse_policy_args(args)?;
    let module = load_module(&args.file)?;
    let kernel_index = select_kernel(&module, args.kernel.as_deref(), &args.file)?;
    let kernel = &module.kernels[kernel_index];
    let mut notes = Vec::new();

    for unused in attnc::ir::bind::unused_symbols(kernel, &given) {
        notes.push(format!(
            "note: --shape {unused}: kernel `{}` has no dimension `{unused}`; ignored",
            kernel.name
        ));
    }
    let budget = crate::memory::budget(args.memory_limit);
    let mut slots = load_inputs(kernel, Flag::Input, &args.input, budget, &mut notes)?;
    let shapes: Vec<Option<Vec<usize>>> = slots
        .iter()
        .map(|s| s.as_ref().map(|t| t.shape.clone()))
        .collect();
    let bindings = match attnc::ir::bind::bind_shapes(kernel, &shapes, &given) {
        Ok(bindings) => bindings,
        // `explain` shows the symbolic program when some symbols are left unbound.
        Err(attnc::ir::bind::BindError::Unbound { .. }) if !need_inputs => given
            .into_iter()
            .filter(|(symbol, _)| attnc::ir::bind::kernel_symbols(kernel).contains(symbol))
            .collect(),
        Err(e) => return Err(Failure::input("shape", e.to_string())),
    };

    let threads = args
        .threads
        .map(|t| t as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut random = None;
    if need_inputs || args.random.is_some() {
        let drawn = fill_missing(kernel, &mut slots, &bindings, args.random, threads, budget)?;
        random = args.random.map(|seed| (seed, drawn));
    }
    let inputs: Vec<Tensor> = slots.into_iter().flatten().collect();
    let calibration = load_inputs(kernel, Flag::Calibrate, &args.calibrate, budget, &mut notes)?
        .into_iter()
        .zip(&kernel.params)
        .filter_map(|(slot, param)| slot.map(|t| (param.name.clone(), t)))
        .collect();

    let mut policy = cli_policy
        .base
        .unwrap_or_else(|| Policy::from_items(&kernel.approx));
    if let Some(tol) = cli_policy.tol {
        policy.tol = tol;
    }
    if !policy.is_exact() {
        let views: Vec<_> = inputs.iter().map(attnc::engine::input_view).collect();
        if let Some(name) = attnc::approx::non_finite_input(kernel, &views) {
            notes.push(format!(
                "note: input `{name}` holds NaN or infinite values: no approximation is applied \
                 (one could hide them, or spread them differently from the exact plan)"
            ));
            policy = Policy::exact();
        }
    }
    let engine = match args.engine {
        Some(EngineArg::Interp) => Engine::Interp,
        Some(EngineArg::Jit) | None => Engine::Jit,
    };
    let compiler = Compiler::new()
        .with_policy(policy.clone())
        .with_threads(threads)
        .with_ceilings(attnc::machine::machine_ceilings().ceilings)
        .with_memory_budget(budget);
    Ok(Prepared {
        module,
        kernel_index,
        bindings,
        inputs,
        policy,
        compiler,
        engine,
        threads,
        calibration,
        notes,
        random,
    })
}

/// `--shape h=8,n=4096 --shape d=64` → bindings; malformed text is a usage error.
pub fn parse_shape_args(values: &[String]) -> Result<Bindings, Failure> {
    let mut out = BTreeMap::new();
    for item in values.iter().flat_map(|v| v.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("--shape expects SYM=N, got `{item}`")))?;
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Failure::Usage(format!(
                "--shape: `{name}` is not a dimension name"
            )));
        }
        let value: u64 = value.parse().map_err(|_| {
            Failure::Usage(format!(
                "--shape {name}: `{value}` is not a non-negative integer"
            ))
        })?;
        if let Some(previous) = out.insert(name.to_string(), value) {
            if previous != value {
                return Err(Failure::Usage(format!(
                    "--shape gives `{name}` twice ({previous} and {value})"
                )));
            }
        }
    }
    Ok(out)
}

/// The policy the command line asks for: `base` replaces the kernel's own `@approx` list
/// (`--exact`, `--approx`), `tol` replaces the tolerance of whichever list applies.
struct PolicyArgs {
    base: Option<Policy>,
    tol: Option<f64>,
}

fn parse_policy_args(args: &SharedArgs) -> Result<PolicyArgs, Failure> {
    if let Some(tol) = args.tol {
        if !(tol.is_finite() && tol > 0.0) {
            return Err(Failure::Usage(format!(
                "--tol must be a positive finite number, got {tol}"
            )));
        }
    }
    let base = if args.exact {
        Some(Policy::exact())
    } else {
        match &args.approx {
            Some(list) => Some(Policy::from_items(
                &parse_approx_list(list).map_err(Failure::Usage)?,
            )),
            None => None,
        }
    };
    Ok(PolicyArgs {
        base,
        tol: args.tol,
    })
}

fn select_kernel(module: &Module, name: Option<&str>, file: &Path) -> Result<usize, Failure> {
    let names: Vec<&str> = module.kernels.iter().map(|k| k.name.as_str()).collect();
    match name {
        Some(name) => names.iter().position(|k| *k == name).ok_or_else(|| {
            Failure::input(
                "kernel",
                format!(
                    "{}: no kernel named `{name}` (kernels: {})",
                    file.display(),
                    list_or_none(&names)
                ),
            )
        }),
        None => match names.len() {
            0 => Err(Failure::input(
                "kernel",
                format!("{}: the file has no kernel", file.display()),
            )),
            1 => Ok(0),
            _ => Err(Failure::Usage(format!(
                "{} has several kernels ({}): choose one with --kernel NAME",
                file.display(),
                names.join(", ")
            ))),
        },
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Reads every `--input`; returns one slot per parameter (None where not given).
/// The option tensors come from, for messages.
#[derive(Clone, Copy)]
enum Flag {
    Input,
    Calibrate,
}

impl Flag {
    fn spelling(self) -> &'static str {
        match self {
            Flag::Input => "--input",
            Flag::Calibrate => "--calibrate",
        }
    }
}

/// Refuses a tensor file larger than the memory budget before reading it: it is read whole.
fn check_file_size(flag: Flag, path: &Path, budget: Option<u64>) -> Result<(), Failure> {
    let (Some(budget), Ok(meta)) = (budget, std::fs::metadata(path)) else {
        return Ok(());
    };
    if meta.is_file() && meta.len() > budget {
        return Err(Failure::input(
            "memory",
            format!(
                "{} {}: the file is {} but {} are available (raise --memory-limit)",
                flag.spelling(),
                path.display(),
                attnc::compiler::format_bytes(meta.len()),
                attnc::compiler::format_bytes(budget)
            ),
        ));
    }
    Ok(())
}

fn load_inputs(
    kernel: &Kernel,
    flag: Flag,
    specs: &[String],
    budget: Option<u64>,
    notes: &mut Vec<String>,
) -> Result<Vec<Option<Tensor>>, Failure> {
    let option = flag.spelling();
    let mut slots: Vec<Option<Tensor>> = vec![None; kernel.params.len()];
    let param_index = |name: &str| kernel.params.iter().position(|p| p.name == name);
    let param_names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
    for spec in specs {
        let loaded: Vec<(String, Tensor)> = match spec.split_once('=') {
            Some((name, path)) => {
                let name = name.trim();
                if param_index(name).is_none() {
                    return Err(Failure::input(
                        "input",
                        format!(
                            "{option} {spec}: kernel `{}` has no parameter `{name}` (parameters: {})",
                            kernel.name,
                            list_or_none(&param_names)
                        ),
                    ));
                }
                check_file_size(flag, Path::new(path), budget)?;
                let tensor = io::read_npy(Path::new(path))
                    .map_err(|e| Failure::input("io", e.to_string()))?;
                vec![(name.to_string(), tensor)]
            }
            None if spec.ends_with(".safetensors") => {
                check_file_size(flag, Path::new(spec), budget)?;
                let tensors = io::read_safetensors(Path::new(spec))
                    .map_err(|e| Failure::input("io", e.to_string()))?;
                let mut matched = Vec::new();
                for (name, tensor) in tensors {
                    if param_index(&name).is_some() {
                        matched.push((name, tensor));
                    } else {
                        notes.push(format!(
                            "note: {spec}: tensor `{name}` matches no parameter; ignored"
                        ));
                    }
                }
                matched
            }
            None => {
                return Err(Failure::Usage(format!(
                    "{option} expects NAME=PATH.npy or PATH.safetensors, got `{spec}`"
                )))
            }
        };
        for (name, tensor) in loaded {
            let index = param_index(&name).expect("invariant: matched above");
            if slots[index].is_some() {
                return Err(Failure::input(
                    "input",
                    format!("{option}: `{name}` is given twice"),
                ));
            }
            let param = &kernel.params[index];
            // Segment ids are integers and values are floats: neither converts to the other.
            if (param.dtype == DType::I32) != (tensor.dtype() == DType::I32) {
                return Err(Failure::input(
                    "input",
                    format!(
                        "input `{name}` is {} but {option} gives {} data{}",
                        param.dtype.keyword(),
                        tensor.dtype().keyword(),
                        if param.dtype == DType::I32 {
                            " (save segment ids with `a.astype(np.int32)`)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            slots[index] = Some(to_param_dtype(tensor, param.dtype));
        }
    }
    Ok(slots)
}

/// Stores a tensor in its parameter's storage type (f32 data for an f16 parameter is rounded).
fn to_param_dtype(tensor: Tensor, dtype: DType) -> Tensor {
    if tensor.dtype() == dtype {
        return tensor;
    }
    let data = TensorData::from_f32_as(tensor.to_f32_vec(), dtype);
    Tensor {
        shape: tensor.shape,
        data,
    }
}

/// Fills every unbound input with standard-normal values from `seed` (stream = parameter
/// index), drawing the streams on up to `threads` threads; says which parameters it drew.
fn fill_missing(
    kernel: &Kernel,
    slots: &mut [Option<Tensor>],
    bindings: &Bindings,
    seed: Option<u64>,
    threads: usize,
    budget: Option<u64>,
) -> Result<Vec<bool>, Failure> {
    let mut wanted = Vec::new();
    // Drawn values are made as f32 and then stored in the parameter's type.
    let mut draw_bytes: u64 = 0;
    for (index, slot) in slots.iter().enumerate() {
        if slot.is_some() {
            continue;
        }
        let param = &kernel.params[index];
        let Some(seed) = seed else {
            return Err(Failure::input(
                "input",
                format!(
                    "input `{}` of kernel `{}` is not bound: pass --input {}=PATH.npy or --random SEED",
                    param.name, kernel.name, param.name
                ),
            ));
        };
        // Random segment ids would be a meaningless layout: the user passes them.
        if param.dtype == DType::I32 {
            return Err(Failure::input(
                "input",
                format!(
                    "input `{}` of kernel `{}` holds i32 segment ids, which --random does not draw: pass --input {}=PATH.npy (int32)",
                    param.name, kernel.name, param.name
                ),
            ));
        }
        let shape = attnc::ir::dim::resolve_shape(&param.shape, bindings).ok_or_else(|| {
            Failure::input(
                "shape",
                format!("the shape of input `{}` is not bound", param.name),
            )
        })?;
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&c| c <= isize::MAX as usize / 8)
            .ok_or_else(|| {
                Failure::input(
                    "shape",
                    format!("input `{}` would have too many elements", param.name),
                )
            })?;
        let stream = NormalStream {
            seed,
            stream: index as u64,
            len: count,
        };
        let bytes = (count as u64).saturating_mul(4 + io::element_size(param.dtype) as u64);
        draw_bytes = draw_bytes.saturating_add(bytes);
        wanted.push((index, shape, stream));
    }
    if let Some(budget) = budget.filter(|&b| draw_bytes > b) {
        return Err(Failure::input(
            "memory",
            format!(
                "--random would draw {} of inputs but {} are available (use smaller shapes, or raise --memory-limit)",
                attnc::compiler::format_bytes(draw_bytes),
                attnc::compiler::format_bytes(budget)
            ),
        ));
    }
    let streams: Vec<NormalStream> = wanted.iter().map(|(_, _, s)| *s).collect();
    let values = io::standard_normal_streams(&streams, threads);
    let mut drawn = vec![false; slots.len()];
    for ((index, shape, _), values) in wanted.into_iter().zip(values) {
        slots[index] = Some(Tensor {
            shape,
            data: TensorData::from_f32_as(values, kernel.params[index].dtype),
        });
        drawn[index] = true;
    }
    Ok(drawn)
}
