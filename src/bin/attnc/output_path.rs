//! Output paths checked before long work (a run, a sweep), so that a typo costs no time. The
//! write itself is atomic (a temporary file renamed into place), which catches the rest:
//! devices, full disks, permissions.

use crate::failure::Failure;
use crate::CliResult;
use std::path::Path;

/// Fails when `path`, given to the option `option` (`--output`, `--plot`), is a directory or
/// lies in a directory that does not exist.
pub fn check(option: &str, path: &Path) -> CliResult {
    if path.is_dir() {
        return Err(Failure::input(
            "output",
            format!("{option} `{}` is a directory", path.display()),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Failure::input(
            "output",
            format!(
                "{option} `{}`: directory `{}` does not exist",
                path.display(),
                parent.display()
            ),
        ));
    }
    Ok(())
}
