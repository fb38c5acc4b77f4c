//! `attnc explain FILE`: show the stages of the compilation of one kernel.

use crate::args::{Emit, ExplainArgs};
use crate::check::signature;
use crate::inputs::prepare;
use crate::CliResult;
use serde_json::json;

pub fn explain(args: &ExplainArgs) -> CliResult {
    let prepared = prepare(&args.shared, false)?;
    let kernel = prepared.kernel();
    let ir_text = attnc::ir::print::print_kernel(kernel);
    let dot = attnc::ir::dot::dot_kernel(kernel);
    match (args.emit, args.shared.format.is_json()) {
        (Some(Emit::Ir), false) => print!("{ir_text}"),
        (Some(Emit::Dot), false) => print!("{dot}"),
        (emit, true) => {
            let mut doc = json!({
                "ok": true,
                "kernel": kernel.name,
                "signature": signature(kernel),
                "bindings": prepared.bindings,
                "policy": prepared.policy.to_string(),
            });
            match emit {
                Some(Emit::Ir) => doc["ir"] = json!(ir_text),
                Some(Emit::Dot) => doc["dot"] = json!(dot),
                None => {
                    doc["ir"] = json!(ir_text);
                    doc["nodes"] = json!(kernel.graph.len());
                }
            }
            crate::print_json(&doc);
        }
        (None, false) => {
            for note in &prepared.notes {
                eprintln!("{note}");
            }
            println!("kernel {}", signature(kernel));
            println!("policy: {}", prepared.policy);
            let bound: Vec<String> = prepared
                .bindings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "bindings: {}",
                if bound.is_empty() {
                    "(none)".into()
                } else {
                    bound.join(", ")
                }
            );
            println!();
            println!("== IR ({} nodes) ==", kernel.graph.len());
            print!("{ir_text}");
        }
    }
    Ok(())
}
