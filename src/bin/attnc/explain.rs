//! `attnc explain FILE`: show the stages of the compilation of one kernel.

use crate::args::{Emit, ExplainArgs};
use crate::check::signature;
use crate::failure::Failure;
use crate::inputs::{prepare, Prepared};
use crate::CliResult;
use attnc_jit_text::{generated_code, CodeKind};
use serde_json::json;

pub fn explain(args: &ExplainArgs) -> CliResult {
    let mut prepared = prepare(&args.shared, false)?;
    if matches!(args.emit, Some(Emit::Clif | Emit::Asm)) {
        // Only these listings need the generated functions' text kept.
        let options = attnc_jit::CompileOptions {
            keep_text: true,
            ..prepared.compiler.options().clone()
        };
        prepared.compiler = prepared.compiler.clone().with_options(options);
    }
    if let Some(list) = &args.grad {
        return crate::grad::explain(&prepared, list, args.emit, args.shared.format.is_json());
    }
    let kernel = prepared.kernel();
    let json = args.shared.format.is_json();
    match args.emit {
        Some(Emit::Ir) => emit(json, "ir", attnc::ir::print::print_kernel(kernel)),
        Some(Emit::Dot) => emit(json, "dot", dot_before_and_after(&prepared)),
        Some(Emit::Clif) => emit(json, "clif", generated_code(&prepared, CodeKind::Clif)?),
        Some(Emit::Asm) => emit(json, "asm", generated_code(&prepared, CodeKind::Asm)?),
        Some(Emit::Egraph) => emit(
            json,
            "egraph",
            prepared
                .compiler
                .optimize(kernel, &prepared.bindings)
                .trace
                .render_text(),
        ),
        None => report(&prepared, json)?,
    }
    Ok(())
}

/// Two Graphviz graphs: the IR as written and the form the optimizer chose.
fn dot_before_and_after(prepared: &Prepared) -> String {
    let kernel = prepared.kernel();
    let optimized = prepared.compiler.optimize(kernel, &prepared.bindings);
    format!(
        "// {} as written\n{}\n// {} after optimization\n{}",
        kernel.name,
        attnc::ir::dot::dot_kernel(kernel),
        kernel.name,
        attnc::ir::dot::dot_kernel(&optimized.kernel)
    )
}

pub(crate) fn emit(json: bool, key: &str, text: String) {
    if json {
        crate::print_json(&json!({ "ok": true, key: text }));
    } else {
        out!("{text}");
    }
}

/// The whole report: signature, policy, bindings, IR and (when shapes are bound) the plan.
fn report(prepared: &Prepared, json: bool) -> CliResult {
    let kernel = prepared.kernel();
    let ir_text = attnc::ir::print::print_kernel(kernel);
    // The code `run` would execute and the optimizer's record of it: under an approximation
    // policy, the plan chosen and validated exactly as `run` does.
    let compiled = prepared.compile();
    let unbound = attnc::ir::bind::kernel_symbols(kernel)
        .iter()
        .any(|s| !prepared.bindings.contains_key(s));
    let plan_error = match &compiled {
        Err(e) if !unbound => Some(e.to_string()),
        _ => None,
    };
    let compiled = compiled.ok();
    let plan = compiled.as_ref().map(|c| {
        (
            c.plan().to_string(),
            c.code.compile_time().as_secs_f64() * 1e3,
        )
    });
    let trace = match &compiled {
        Some(c) => c.trace.clone(),
        None => prepared.compiler.optimize(kernel, &prepared.bindings).trace,
    };
    if json {
        crate::print_json(&json!({
            "ok": true,
            "kernel": kernel.name,
            "signature": signature(kernel),
            "bindings": prepared.bindings,
            "policy": prepared.policy.to_string(),
            "ir": ir_text,
            "trace": trace,
            "plan": plan.as_ref().map(|(text, _)| text),
            "plan_error": plan_error,
            "compile_ms": plan.as_ref().map(|(_, ms)| ms),
            "ceilings": attnc::machine::machine_ceilings(),
        }));
        return Ok(());
    }
    for note in &prepared.notes {
        eprintln!("{note}");
    }
    outln!("kernel {}", signature(kernel));
    outln!("policy: {}", prepared.policy);
    outln!("bindings: {}", prepared.bindings_line());
    outln!();
    outln!("== IR ({} nodes) ==", kernel.graph.len());
    out!("{ir_text}");
    outln!();
    outln!("== optimizer ==");
    outln!("ceilings: {}", attnc::machine::machine_ceilings());
    out!("{}", trace.render_text());
    outln!();
    match plan {
        Some((text, ms)) => {
            outln!("== plan (compiled in {ms:.1} ms) ==");
            out!("{text}");
        }
        None => match plan_error {
            Some(e) => outln!("== plan ==\n(not compiled: {e})"),
            None => {
                outln!("== plan ==\n(bind every dimension with --shape or inputs to see the plan)")
            }
        },
    }
    Ok(())
}

/// Generated code needs bound shapes: kernels are specialized to them.
mod attnc_jit_text {
    use super::*;

    pub enum CodeKind {
        Clif,
        Asm,
    }

    pub fn generated_code(prepared: &Prepared, kind: CodeKind) -> Result<String, Failure> {
        let compiled = prepared.compile().map_err(|e| {
            Failure::input(
                "shape",
                format!("{e} (generated code is specialized to bound shapes: pass --shape)"),
            )
        })?;
        let mut out = String::new();
        for step in &compiled.plan().steps {
            if let attnc_jit::plan::StepKind::Attention(spec) = &step.kind {
                if spec.tier != attnc_jit::wide::Tier::Cranelift {
                    out.push_str(&format!(
                        "; kernel {}: runs on the {} tier (ahead-of-time code, no CLIF)\n\n",
                        step.name,
                        spec.tier.name()
                    ));
                }
            }
        }
        for text in compiled.code.texts() {
            let body = match kind {
                CodeKind::Clif => Some(text.clif.as_str()),
                CodeKind::Asm => text.vcode.as_deref(),
            };
            out.push_str(&format!("; kernel {}\n", text.name));
            out.push_str(body.unwrap_or("; (no machine-code listing kept for this kernel)\n"));
            out.push('\n');
        }
        Ok(out)
    }
}
