//! The `attnc` command line (LANGUAGE.md §4, §5): `check`, `run`, `explain`, `bench`, `grad`.
//!
//! Results go to stdout, diagnostics and notes to stderr; `--format json` makes both results
//! and errors one JSON document on stdout. Exit status: 0 success, 1 the program or inputs are
//! wrong, 2 command-line misuse.

/// `println!` for results: never panics (see [`stdout`]).
macro_rules! outln {
    () => { $crate::stdout::write(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*), true) };
}

/// `print!` for results: never panics (see [`stdout`]).
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*), false) };
}

mod args;
mod bench;
mod check;
mod explain;
mod failure;
mod grad;
mod inputs;
mod memory;
mod output_path;
mod run;
mod stdout;

use args::{Cli, Command, Format};
use clap::Parser;
use failure::Failure;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status after Ctrl-C, as shells report a SIGINT death.
const INTERRUPTED: i32 = 130;

fn main() -> ExitCode {
    keep_freed_memory();
    attnc::machine::prepare_in_background();
    let raw: Vec<String> = std::env::args().collect();
    install_interrupt_handler(wants_json(&raw));
    let cli = match Cli::try_parse_from(&raw) {
        Ok(cli) => cli,
        Err(err) => return failure::report_clap_error(err, wants_json(&raw)),
    };
    let format = cli.command.format();
    let result = match &cli.command {
        Command::Check(a) => check::check(a),
        Command::Run(a) => run::run(a),
        Command::Explain(a) => explain::explain(a),
        Command::Bench(a) => bench::bench(a),
        Command::Grad(a) => grad::grad(a),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        // An interrupt removes the temporary file of an output being written, so the write
        // fails; the handler, not that failure, says how the command ended.
        Err(_) if INTERRUPTING.load(Ordering::SeqCst) => wait_for_the_interrupt_handler(),
        Err(failure) => failure.report(format),
    };
    stdout::flush();
    code
}

/// Makes freed memory stay in this process for the next allocation instead of going back to
/// the operating system.
///
/// glibc maps every allocation of 32 MiB and more afresh and unmaps it when freed, so each run
/// of a kernel faults its output in again and the kernel clears every page; `bench` repeats
/// that per timed run, `grad` per step. Clearing ran at about 3 GB/s on a virtual machine
/// measured for docs/PERFORMANCE.md: 5–10 % of a packed-documents attention run at n =
/// 16,384. From the heap, with its top never trimmed, a freed buffer serves the next one of
/// its size, zeroed in place. Peak memory is unchanged in the measured cases; memory freed late
/// in a command is returned at exit instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it runs before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Whether the command's output file is in place, held locked for the whole write: an
/// interrupt during the write waits for it to fail (its temporary file removed) or finish, so
/// the exit status says truthfully whether the output was written.
pub static OUTPUT_WRITTEN: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Set by the interrupt handler as it starts.
static INTERRUPTING: AtomicBool = AtomicBool::new(false);

/// Parks the main thread while the interrupt handler finishes and exits the process (with 0
/// when the outputs were written, else 130).
fn wait_for_the_interrupt_handler() -> ! {
    loop {
        std::thread::park();
    }
}

/// Ctrl-C, SIGTERM and SIGHUP exit promptly, even mid-compile or mid-benchmark, and remove the
/// temporary file of any output being written, so no partial file is ever left behind; under
/// `--format json` the interruption is one JSON error on stdout. Exit status 130 unless the
/// outputs were already written.
fn install_interrupt_handler(json: bool) {
    let installed = ctrlc::set_handler(move || {
        INTERRUPTING.store(true, Ordering::SeqCst);
        attnc::io::remove_pending_temp_files();
        let written = OUTPUT_WRITTEN.lock().is_ok_and(|w| *w);
        if written {
            stdout::flush();
            std::process::exit(0);
        }
        if json {
            print_json(&serde_json::json!({
                "ok": false,
                "error": { "kind": "interrupted", "message": "interrupted by a signal" },
            }));
            stdout::flush();
        } else {
            eprintln!("interrupted");
        }
        std::process::exit(INTERRUPTED);
    });
    if let Err(err) = installed {
        eprintln!("note: cannot handle Ctrl-C: {err}");
    }
}

/// Whether the raw arguments ask for JSON, so that even usage errors come out as JSON.
fn wants_json(raw: &[String]) -> bool {
    raw.windows(2).any(|w| w[0] == "--format" && w[1] == "json")
        || raw.iter().any(|a| a == "--format=json")
}

/// Shorthand used by the subcommands.
pub type CliResult = Result<(), Failure>;

/// Prints `value` as one JSON document on stdout.
pub fn print_json(value: &serde_json::Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_string())
    );
}

impl Format {
    /// True for `--format json`.
    pub fn is_json(self) -> bool {
        matches!(self, Format::Json)
    }
}
