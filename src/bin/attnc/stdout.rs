//! Writing results to stdout without ever panicking.
//!
//! `println!` panics when stdout is a closed pipe (`attnc explain … | head`). Here a closed pipe
//! ends the program quietly with status 0 — the reader has all it wanted — and any other write
//! error (a full disk behind a redirect) is reported with status 1.

use std::fmt;
use std::io::{self, Write};

/// Writes `args` (and a newline when `newline`) to stdout; never returns on failure.
pub fn write(args: fmt::Arguments<'_>, newline: bool) {
    let mut lock = io::stdout().lock();
    let result = lock.write_fmt(args).and_then(|()| {
        if newline {
            lock.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(err) = result {
        fail(err);
    }
}

/// Flushes stdout at the end of a command.
pub fn flush() {
    if let Err(err) = io::stdout().lock().flush() {
        fail(err);
    }
}

fn fail(err: io::Error) -> ! {
    if err.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {err}");
    std::process::exit(1);
}
