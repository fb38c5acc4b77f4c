//! Everything that ends a command unsuccessfully, and how it is reported (text or JSON).

use crate::args::Format;
use attnc::syntax::Diagnostic;
use serde_json::json;
use std::process::ExitCode;

/// A failed command: what to tell the user and which exit status to return.
#[derive(Debug)]
pub enum Failure {
    /// Bad command-line usage (exit status 2).
    Usage(String),
    /// Diagnostics about a source file (exit status 1).
    Source {
        /// The file as given on the command line.
        file: String,
        /// The decoded text, for excerpts.
        text: String,
        /// The errors.
        diagnostics: Vec<Diagnostic>,
    },
    /// The program's inputs or files are wrong (exit status 1); `kind` classifies it for JSON.
    Input {
        /// One word: `io`, `input`, `shape`, `kernel`, `run`, `output`.
        kind: &'static str,
        /// The message, naming the file, input or dimension at fault.
        message: String,
    },
    /// A check failed after the command printed its full report, which already says why
    /// (exit status 1; nothing more is printed, so `--format json` stays one document).
    Reported,
}

impl Failure {
    /// An input-class failure.
    pub fn input(kind: &'static str, message: impl Into<String>) -> Failure {
        Failure::Input {
            kind,
            message: message.into(),
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Source { .. } | Failure::Input { .. } | Failure::Reported => 1,
        }
    }

    /// Prints the failure in `format` and returns its exit status.
    pub fn report(self, format: Format) -> ExitCode {
        let code = self.exit_code();
        if matches!(self, Failure::Reported) {
            return ExitCode::from(code);
        }
        if format.is_json() {
            crate::print_json(&self.to_json());
        } else {
            eprint!("{}", self.to_text());
        }
        ExitCode::from(code)
    }

    fn to_text(&self) -> String {
        match self {
            Failure::Usage(message) => format!("error: {message}\n"),
            Failure::Source {
                file,
                text,
                diagnostics,
            } => {
                let mut out = String::new();
                for d in diagnostics {
                    out.push_str(&d.render(file, text));
                    out.push('\n');
                }
                let n = diagnostics.len();
                out.push_str(&format!(
                    "error: {file}: {n} error{} found\n",
                    if n == 1 { "" } else { "s" }
                ));
                out
            }
            Failure::Input { message, .. } => format!("error: {message}\n"),
            Failure::Reported => String::new(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Failure::Usage(message) => json!({
                "ok": false,
                "error": { "kind": "usage", "message": message },
            }),
            Failure::Source {
                file,
                text,
                diagnostics,
            } => {
                let located: Vec<_> = diagnostics.iter().map(|d| d.locate(file, text)).collect();
                let message = diagnostics
                    .first()
                    .map(|d| d.message.clone())
                    .unwrap_or_default();
                json!({
                    "ok": false,
                    "error": {
                        "kind": "source",
                        "file": file,
                        "message": message,
                        "diagnostics": located,
                    },
                })
            }
            Failure::Input { kind, message } => json!({
                "ok": false,
                "error": { "kind": kind, "message": message },
            }),
            Failure::Reported => json!({ "ok": false }),
        }
    }
}

/// Reports a clap parse error: help and version go to stdout with status 0; misuse gives 2.
pub fn report_clap_error(err: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ if json => {
            let message = err.render().to_string();
            let first = message.lines().next().unwrap_or("bad usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            Failure::Usage(first.to_string()).report(Format::Json)
        }
        _ => {
            let _ = err.print();
            ExitCode::from(2)
        }
    }
}
