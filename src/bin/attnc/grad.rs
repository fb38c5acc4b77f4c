//! `attnc grad FILE --wrt q,k,v [--cotangent PATH.npy] --output-dir DIR`: the gradients of the
//! kernel's output with respect to the named parameters, written as `DIR/<param>.npy` (for a
//! kernel returning several values, of `Σ_k ⟨cotangent_k, output_k⟩`, `--cotangent` once per
//! output in order); and
//! `attnc explain FILE --grad q,k,v`: the gradient graph and how it was derived.

use crate::args::{Emit, GradArgs};
use crate::check::signature;
use crate::failure::Failure;
use crate::inputs::{prepare, Prepared};
use crate::run::{per_output_misuse, Stats};
use crate::CliResult;
use attnc::engine::{Engine, RunError};
use attnc::grad::{ones, reference_gradients, reference_graph, CompiledGrad};
use attnc::io::Tensor;
use attnc::ir::grad::{parse_wrt, GradError};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Gradients with at most this many elements are included whole in `--format json`.
const JSON_VALUES_LIMIT: usize = 65_536;

pub fn grad(args: &GradArgs) -> CliResult {
    let dir = &args.output_dir;
    if dir.exists() && !dir.is_dir() {
        return Err(Failure::input(
            "output",
            format!("--output-dir `{}` is not a directory", dir.display()),
        ));
    }
    let start = Instant::now();
    let prepared = prepare(&args.shared, true)?;
    let kernel = prepared.kernel();
    let wrt = wrt_of(&prepared, &args.wrt)?;
    let out_shapes = output_shapes(&prepared)?;
    let count = out_shapes.len();
    if !args.cotangent.is_empty() && args.cotangent.len() != count {
        let given = args.cotangent.len();
        return Err(per_output_misuse(&kernel.name, count, "--cotangent", given));
    }
    let cotangents: Vec<Tensor> = match args.cotangent.is_empty() {
        true => out_shapes.iter().map(|s| ones(s)).collect(),
        false => args
            .cotangent
            .iter()
            .zip(&out_shapes)
            .enumerate()
            .map(|(k, (path, shape))| read_cotangent(path, shape, &kernel.name, k, count))
            .collect::<Result<_, _>>()?,
    };
    let cotangent_names: Vec<String> = match args.cotangent.is_empty() {
        true => vec!["ones".to_string(); count],
        false => args
            .cotangent
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    };
    let prepare_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut notes = prepared.notes.clone();
    if !prepared.policy.is_exact() {
        notes.push(
            "note: gradients are computed from the exact form (approximations apply to `run`)"
                .to_string(),
        );
    }
    let fail = |e: RunError| Failure::input("run", e.to_string());
    let (grads, compile_ms, run_ms) = match prepared.engine {
        Engine::Jit => {
            let compiled = prepared
                .compiler
                .compile_grad(kernel, &prepared.bindings, &wrt)
                .map_err(grad_failure)?;
            let start = Instant::now();
            let grads = compiled
                .backward_all(&prepared.inputs, &cotangents, prepared.threads)
                .map_err(fail)?;
            (
                grads,
                Some(compiled.elapsed.as_secs_f64() * 1e3),
                start.elapsed().as_secs_f64() * 1e3,
            )
        }
        Engine::Interp => {
            let start = Instant::now();
            let grads = reference(&prepared, &cotangents, &wrt)?;
            (grads, None, start.elapsed().as_secs_f64() * 1e3)
        }
    };
    let names: Vec<String> = wrt.iter().map(|&p| kernel.params[p].name.clone()).collect();
    let verification = if args.verify {
        let want = match prepared.engine {
            Engine::Interp => grads.clone(),
            Engine::Jit => reference(&prepared, &cotangents, &wrt)?,
        };
        Some(
            grads
                .iter()
                .zip(&want)
                .map(|(g, w)| attnc::ir::compare::compare(g.to_f64_vec(), w.to_f64_vec()))
                .collect::<Vec<_>>(),
        )
    } else {
        None
    };
    let bound = attnc::ir::compare::tol::EXACT_CONTRACT;
    let passed = verification
        .as_ref()
        .is_none_or(|v| v.iter().all(|c| c.error() <= bound));

    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(format!("{n}.npy"))).collect();
    {
        // Held for the whole write: an interrupt waits for the files to be in place or gone.
        let mut written = crate::OUTPUT_WRITTEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        write_all(dir, &paths, &grads)?;
        *written = true;
    }

    let stats: Vec<Stats> = grads.iter().map(|g| Stats::of(&g.to_f32_vec())).collect();
    if args.shared.format.is_json() {
        let gradients: Vec<serde_json::Value> = names
            .iter()
            .zip(&grads)
            .zip(&paths)
            .zip(&stats)
            .map(|(((name, g), path), s)| {
                let mut doc = json!({
                    "param": name,
                    "shape": g.shape,
                    "path": path.display().to_string(),
                    "stats": s.to_json(),
                });
                if g.len() <= JSON_VALUES_LIMIT {
                    doc["values"] = json!(g.to_f32_vec());
                }
                doc
            })
            .collect();
        let mut doc = json!({
            "ok": passed,
            "kernel": kernel.name,
            "engine": prepared.engine.name(),
            "threads": prepared.threads,
            "bindings": prepared.bindings,
            "wrt": names,
            "cotangent": cotangent_names[0],
            "output_shape": out_shapes[0],
            "cotangents": cotangent_names,
            "output_shapes": out_shapes,
            "gradients": gradients,
            "compile_ms": compile_ms,
            "time_ms": run_ms,
            "prepare_ms": prepare_ms,
            "notes": notes,
        });
        if let Some(v) = &verification {
            doc["verify"] = json!({
                "engine": "interp",
                "bound": bound,
                "passed": passed,
                "gradients": names.iter().zip(v).map(|(n, c)| json!({
                    "param": n,
                    "relative_l2_error": c.relative_l2,
                    "max_abs_error": c.max_abs,
                    "nan_mismatches": c.nan_mismatches,
                })).collect::<Vec<_>>(),
            });
            if !passed {
                doc["error"] =
                    json!({ "kind": "verify", "message": verify_failure(&names, v, bound) });
            }
        }
        crate::print_json(&doc);
    } else {
        for note in &notes {
            eprintln!("{note}");
        }
        let bound_text: Vec<String> = prepared
            .bindings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let timing = match compile_ms {
            Some(c) => format!(
                "{} engine, {} threads, compile {c:.3} ms, run {run_ms:.3} ms",
                prepared.engine.name(),
                prepared.threads
            ),
            None => format!("{} engine, {run_ms:.3} ms", prepared.engine.name()),
        };
        outln!(
            "kernel {} [{}] gradients of {}  ({timing})",
            kernel.name,
            bound_text.join(", "),
            names.join(", ")
        );
        for (name, shape) in cotangent_names.iter().zip(&out_shapes) {
            outln!("cotangent: {name} {shape:?}");
        }
        for ((name, g), (s, path)) in names.iter().zip(&grads).zip(stats.iter().zip(&paths)) {
            outln!("d{name} {:?}: {}  -> {}", g.shape, s.line(), path.display());
        }
        if let Some(v) = &verification {
            let parts: Vec<String> = names
                .iter()
                .zip(v)
                .map(|(n, c)| format!("d{n} {:.3e}", c.relative_l2))
                .collect();
            outln!(
                "verify: relative L2 error against the interpreter: {} (bound {bound:.0e})",
                parts.join(", ")
            );
            if !passed {
                eprintln!("error: {}", verify_failure(&names, v, bound));
            }
        }
    }
    if passed {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

/// The parameters named by `list`: unknown names are the program's fault (exit 1), an empty
/// or repeating list is misuse (exit 2).
fn wrt_of(prepared: &Prepared, list: &str) -> Result<Vec<usize>, Failure> {
    parse_wrt(prepared.kernel(), list).map_err(|e| match e {
        GradError::UnknownParam { .. } => Failure::input("wrt", format!("--wrt: {e}")),
        other => Failure::Usage(format!("--wrt {list}: {other}")),
    })
}

/// A failure to compile the gradients: a gradient that cannot be derived is the program's
/// fault.
fn grad_failure(e: RunError) -> Failure {
    Failure::input("grad", e.to_string())
}

/// The bound shape of each of the kernel's outputs.
fn output_shapes(prepared: &Prepared) -> Result<Vec<Vec<usize>>, Failure> {
    let kernel = prepared.kernel();
    kernel
        .output_nodes()
        .iter()
        .map(|&node| {
            let shape = &kernel.graph.node(node).shape;
            attnc::ir::dim::resolve_shape(shape, &prepared.bindings).ok_or_else(|| {
                Failure::input(
                    "shape",
                    "the output's shape is not bound (pass --shape)".to_string(),
                )
            })
        })
        .collect()
}

/// The cotangent of output `index` (of `count`) from `path`, which must have its shape.
fn read_cotangent(
    path: &Path,
    shape: &[usize],
    kernel: &str,
    index: usize,
    count: usize,
) -> Result<Tensor, Failure> {
    let t = attnc::io::read_npy(path).map_err(|e| Failure::input("io", e.to_string()))?;
    if t.shape != shape {
        let which = match count {
            1 => "the output".to_string(),
            _ => format!("output {index}"),
        };
        return Err(Failure::input(
            "cotangent",
            format!(
                "--cotangent {}: shape {:?}, but {which} of kernel `{kernel}` is {:?}",
                path.display(),
                t.shape,
                shape
            ),
        ));
    }
    Ok(t)
}

/// The reference gradients, refused up front when the interpreter's values would not fit.
fn reference(
    prepared: &Prepared,
    cotangents: &[Tensor],
    wrt: &[usize],
) -> Result<Vec<Tensor>, Failure> {
    let kernel = prepared.kernel();
    let fail = |e: RunError| Failure::input("run", e.to_string());
    let graph = reference_graph(kernel, wrt).map_err(grad_failure)?;
    prepared
        .compiler
        .check_interp_memory(&graph, &prepared.bindings)
        .map_err(fail)?;
    reference_gradients(
        kernel,
        &prepared.bindings,
        &prepared.inputs,
        cotangents,
        wrt,
    )
    .map_err(fail)
}

/// Writes every gradient (each file atomically), creating `dir` when missing.
fn write_all(dir: &Path, paths: &[PathBuf], grads: &[Tensor]) -> CliResult {
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::input(
            "output",
            format!("--output-dir `{}`: cannot create it: {e}", dir.display()),
        )
    })?;
    for (path, g) in paths.iter().zip(grads) {
        attnc::io::write_npy(path, g).map_err(|e| Failure::input("output", e.to_string()))?;
    }
    Ok(())
}

fn verify_failure(names: &[String], v: &[attnc::ir::compare::Comparison], bound: f64) -> String {
    let worst = names
        .iter()
        .zip(v)
        .max_by(|a, b| a.1.error().total_cmp(&b.1.error()))
        .map(|(n, c)| format!("d{n} {:.3e}", c.error()))
        .unwrap_or_default();
    format!("--verify: the error {worst} against the interpreter exceeds the bound {bound:.0e}")
}

/// `attnc explain FILE --grad LIST`: the forward's optimization, the derivation of the
/// gradient graph, the graph and its plan (or one stage with `--emit`).
pub fn explain(prepared: &Prepared, list: &str, emit: Option<Emit>, json: bool) -> CliResult {
    let kernel = prepared.kernel();
    let wrt = wrt_of(prepared, list)?;
    let unbound = attnc::ir::bind::kernel_symbols(kernel)
        .iter()
        .any(|s| !prepared.bindings.contains_key(s));
    // Bound shapes: the optimized form's gradients, compiled. Unbound: the gradients of the
    // kernel as written.
    let compiled: Option<CompiledGrad> = if unbound {
        None
    } else {
        Some(
            prepared
                .compiler
                .compile_grad(kernel, &prepared.bindings, &wrt)
                .map_err(grad_failure)?,
        )
    };
    let (vjp, trace) = match &compiled {
        Some(c) => (c.vjp.clone(), Some(c.trace.clone())),
        None => (
            attnc::ir::grad::vjp(kernel, &wrt).map_err(|e| grad_failure(RunError::Grad(e)))?,
            None,
        ),
    };
    let graph = vjp.combined();
    let mut ir = attnc::ir::print::print_kernel(&graph);
    for g in &vjp.gradients {
        ir.push_str(&format!("  d{} = %{}\n", g.name, g.node.index()));
    }
    let plan = compiled.as_ref().map(|c| c.plan().to_string());
    match emit {
        Some(Emit::Ir) => {
            crate::explain::emit(json, "ir", ir);
            return Ok(());
        }
        Some(Emit::Dot) => {
            crate::explain::emit(json, "dot", attnc::ir::dot::dot_kernel(&graph));
            return Ok(());
        }
        Some(Emit::Egraph) => {
            let text = trace.map(|t| t.render_text()).unwrap_or_else(|| {
                "(bind every dimension with --shape to see the forward's optimization)\n".into()
            });
            crate::explain::emit(json, "egraph", text);
            return Ok(());
        }
        Some(Emit::Clif | Emit::Asm) => {
            let Some(c) = &compiled else {
                return Err(Failure::input(
                    "shape",
                    "generated code is specialized to bound shapes: pass --shape",
                ));
            };
            let mut out = String::new();
            for text in c.backward.texts() {
                let body = if matches!(emit, Some(Emit::Clif)) {
                    Some(text.clif.as_str())
                } else {
                    text.vcode.as_deref()
                };
                out.push_str(&format!("; kernel {}\n", text.name));
                out.push_str(body.unwrap_or("; (no machine-code listing kept for this kernel)\n"));
                out.push('\n');
            }
            if out.is_empty() {
                out.push_str("; every step of the gradient plan runs ahead-of-time code\n");
            }
            crate::explain::emit(
                json,
                if matches!(emit, Some(Emit::Clif)) {
                    "clif"
                } else {
                    "asm"
                },
                out,
            );
            return Ok(());
        }
        None => {}
    }
    let names: Vec<&str> = vjp.gradients.iter().map(|g| g.name.as_str()).collect();
    if json {
        crate::print_json(&json!({
            "ok": true,
            "kernel": kernel.name,
            "signature": signature(kernel),
            "bindings": prepared.bindings,
            "wrt": names,
            "forward_trace": trace,
            "derivation": vjp.derivation,
            "derivation_text": vjp.render_derivation(),
            "ir": ir,
            "plan": plan,
        }));
        return Ok(());
    }
    for note in &prepared.notes {
        eprintln!("{note}");
    }
    outln!("kernel {}", signature(kernel));
    let cotangents = match kernel.outputs().len() {
        1 => "cotangent: the output's shape".to_string(),
        count => format!("cotangents: one per output, {count}"),
    };
    outln!("gradients of {} ({cotangents})", names.join(", "));
    outln!("bindings: {}", prepared.bindings_line());
    outln!();
    match &trace {
        Some(t) => {
            outln!("== forward: the optimized form the gradients differentiate ==");
            out!("{}", t.render_text());
        }
        None => outln!(
            "== forward ==\n(bind every dimension with --shape: the gradients of the optimized form are shown then; below, those of the kernel as written)"
        ),
    }
    outln!();
    outln!("== derivation (reverse mode, from the output back) ==");
    out!("{}", vjp.render_derivation());
    outln!();
    outln!("== gradient graph ({} nodes) ==", graph.graph.len());
    out!("{ir}");
    outln!();
    match plan {
        Some(text) => {
            outln!("== plan ==");
            out!("{text}");
        }
        None => outln!("== plan ==\n(bind every dimension with --shape or inputs to see the plan)"),
    }
    Ok(())
}
