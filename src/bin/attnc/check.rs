//! `attnc check FILE`: parse and type-check; print each kernel's signature.

use crate::args::CheckArgs;
use crate::failure::Failure;
use crate::CliResult;
use attnc::ir::{Kernel, Module};
use attnc::policy::approx_to_string;
use serde_json::json;
use std::path::Path;

pub fn check(args: &CheckArgs) -> CliResult {
    let module = load_module(&args.file)?;
    if args.format.is_json() {
        let kernels: Vec<_> = module.kernels.iter().map(kernel_json).collect();
        crate::print_json(&json!({
            "ok": true,
            "file": args.file.display().to_string(),
            "kernels": kernels,
        }));
    } else {
        if module.kernels.is_empty() {
            eprintln!("note: {}: no kernels", args.file.display());
        }
        for kernel in &module.kernels {
            outln!("{}", signature(kernel));
        }
    }
    Ok(())
}

/// Reads, parses and checks a source file; every problem becomes a [`Failure`].
/// The largest `.attn` file read (programs are a few kilobytes; the bound turns a wrong path
/// such as `/dev/zero` into an error instead of an exhausted memory).
pub const MAX_SOURCE_BYTES: u64 = 16 << 20;

pub fn load_module(path: &Path) -> Result<Module, Failure> {
    let file = path.display().to_string();
    if path.is_dir() {
        return Err(Failure::input(
            "io",
            format!("`{file}` is a directory, not a .attn file"),
        ));
    }
    let bytes = attnc::io::read_bounded(path, MAX_SOURCE_BYTES)
        .map_err(|e| Failure::input("io", e.to_string()))?;
    let (text, result) = attnc::source::compile_bytes(&bytes);
    result.map_err(|diagnostics| Failure::Source {
        file,
        text,
        diagnostics,
    })
}

/// `name(q: f32[h, n, d], ...) -> f32[h, n, d]`, with the `@approx` items in front.
pub fn signature(kernel: &Kernel) -> String {
    let approx = if kernel.approx.is_empty() {
        String::new()
    } else {
        let items: Vec<String> = kernel.approx.iter().map(approx_to_string).collect();
        format!("@approx({}) ", items.join(", "))
    };
    format!("{approx}{}", attnc::ir::print::signature(kernel))
}

fn kernel_json(kernel: &Kernel) -> serde_json::Value {
    let params: Vec<_> = kernel
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "dtype": p.dtype.keyword(),
                "shape": p.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let returns: Vec<_> = kernel
        .outputs()
        .iter()
        .map(|o| {
            let shape = &kernel.graph.node(o.node).shape;
            json!({
                "dtype": o.dtype.keyword(),
                "shape": shape.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut doc = json!({
        "name": kernel.name,
        "signature": signature(kernel),
        "params": params,
        "returns": returns.first(),
        "approx": kernel.approx.iter().map(approx_to_string).collect::<Vec<_>>(),
    });
    // A kernel returning several values lists every one (`returns` is the first).
    if returns.len() > 1 {
        doc["outputs"] = json!(returns);
    }
    doc
}
