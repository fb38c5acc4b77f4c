//! The progress bar of a benchmark sweep: on stderr, and only when stderr is a terminal, so
//! pipes, files and tests see nothing of it.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Progress over the (kernel, value) points of a sweep.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `total` points, drawn on stderr when it is a terminal and hidden otherwise.
    pub fn new(total: usize) -> Progress {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        // A template error would only lose the styling, never the progress itself.
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress { bar }
    }

    /// Shows what is being timed now, e.g. `local n=2048: naive`.
    pub fn show(&self, what: String) {
        self.bar.set_message(what);
    }

    /// One point is done.
    pub fn advance(&self) {
        self.bar.inc(1);
    }
}

impl Drop for Progress {
    /// Clears the bar, so that the notes and results printed afterwards start on a clean line.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
