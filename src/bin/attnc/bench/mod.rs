//! `attnc bench FILE`: time the compiled kernel against the reference interpreter and a naive
//! Rust implementation, in one run, next to the f32x4 FMA ceiling measured in the same run.
//!
//! One shape by default ([`report`]); with `--sweep SYM=V1,V2,..` or `--plot PATH.svg`, every
//! kernel of the file at each value of one dimension ([`sweep`]), drawn as time against that
//! dimension on log-log axes ([`plot`]), with a progress bar on a terminal ([`progress`]).

mod measure;
mod plot;
mod progress;
mod report;
mod sweep;
mod tier;

use crate::args::BenchArgs;
use crate::inputs::prepare;
use crate::CliResult;
use measure::{measure, Ceilings};

/// Runs `attnc bench`.
pub fn bench(args: &BenchArgs) -> CliResult {
    if args.sweep.is_some() || args.plot.is_some() {
        return sweep::bench_sweep(args);
    }
    let mut shared = args.shared.clone();
    if shared.input.is_empty() && shared.random.is_none() {
        shared.random = Some(0);
    }
    let prepared = prepare(&shared, true)?;
    let mut notes = prepared.notes.clone();
    if args.shared.engine.is_some() {
        notes.push(ENGINE_IGNORED.to_string());
    }
    let measurement = measure(&prepared, args, |_| {})?;
    let ceilings = Ceilings::measure(prepared.threads)?;
    notes.extend(measurement.notes.iter().cloned());
    report::single(&prepared, args, &ceilings, &measurement, &notes);
    Ok(())
}

/// The note printed when `--engine` is given: bench times every engine anyway.
const ENGINE_IGNORED: &str = "note: --engine is ignored by bench: every engine is timed";
