//! Atomic output: write a temporary file next to the target, flush and sync it, rename it over
//! the target. On any error the target is left exactly as it was and the temporary file is
//! removed, so an output file is either the old one or the complete new one, never partial.
//!
//! Temporary files are named `.NAME.XXXXXX.attnc-tmp` in the target's directory. While one
//! exists it is also listed in a process-wide registry, so that an interrupt handler can remove
//! it with [`remove_pending_temp_files`] before the process exits (a killed process cannot run
//! destructors).

use std::fs::{self, File, Permissions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::IoError;

/// Temporary files being written right now, by any thread.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Lists a temporary file in [`PENDING`] for as long as it lives.
struct PendingGuard {
    path: PathBuf,
}

impl PendingGuard {
    fn new(path: &Path) -> PendingGuard {
        if let Ok(mut pending) = PENDING.lock() {
            pending.push(path.to_path_buf());
        }
        PendingGuard {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut pending) = PENDING.lock() {
            if let Some(i) = pending.iter().position(|p| *p == self.path) {
                pending.swap_remove(i);
            }
        }
    }
}

/// Removes every temporary file an atomic write of this process is writing right now, and
/// returns how many were removed.
///
/// Meant for an interrupt (Ctrl-C) handler that runs on an ordinary thread and exits the process
/// afterwards: the interrupted writes then leave neither a partial output nor a temporary file.
/// The targets are untouched. A write still running in another thread fails cleanly (its rename
/// finds no file) or has already completed.
pub fn remove_pending_temp_files() -> usize {
    let paths: Vec<PathBuf> = match PENDING.lock() {
        Ok(mut pending) => pending.drain(..).collect(),
        Err(_) => return 0,
    };
    paths.iter().filter(|p| fs::remove_file(p).is_ok()).count()
}

/// Writes `bytes` to `path` atomically: the file at `path` is replaced by a complete new file, or
/// left untouched on error (see the module documentation).
///
/// Errors: the directory is missing or not writable, `path` is a directory or not a regular file
/// (a device such as `/dev/full`, a pipe, a socket), the existing file is read-only, the disk is
/// full.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    write_atomically_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomically`], with `fill` writing the contents into the temporary file (it need
/// not flush). If `fill` fails, the target is untouched and the error is reported for `path`.
pub fn write_atomically_with<F>(path: &Path, fill: F) -> Result<(), IoError>
where
    F: FnOnce(&mut File) -> std::io::Result<()>,
{
    let target = resolve_target(path)?;
    let dir = parent_dir(&target);
    check_dir(path, dir)?;
    let existing_permissions = existing_permissions(path, &target)?;

    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".attnc-tmp");
    set_default_permissions(&mut builder);
    let dir_shown = dir.display().to_string();
    let mut temp = builder.tempfile_in(dir).map_err(|e| {
        IoError::write(
            path,
            &format!("creating a temporary file in `{dir_shown}`"),
            e,
        )
    })?;
    let _guard = PendingGuard::new(temp.path());
    if let Some(permissions) = existing_permissions {
        // Keep the replaced file's mode exactly (creation applied the umask to it).
        temp.as_file()
            .set_permissions(permissions)
            .map_err(|e| IoError::write(path, "setting the temporary file's permissions", e))?;
    }

    // Any early return below drops `temp`, which deletes the temporary file.
    fill(temp.as_file_mut())
        .and_then(|()| temp.as_file_mut().flush())
        .map_err(|e| IoError::write(path, "writing the temporary file", e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| IoError::write(path, "syncing the temporary file to disk", e))?;
    temp.persist(&target).map_err(|e| {
        IoError::write(path, "renaming the temporary file over the target", e.error)
    })?;
    sync_dir(dir);
    Ok(())
}

/// The file that will be replaced: `path`, or what it points to when it is a symbolic link.
fn resolve_target(path: &Path) -> Result<PathBuf, IoError> {
    if path.as_os_str().is_empty() {
        return Err(IoError::write_msg(path, "empty output path", ""));
    }
    if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(IoError::write_msg(
            path,
            "not a file path",
            "the path names a directory",
        ));
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path)
            .map_err(|e| IoError::write(path, "following the symbolic link", e)),
        _ => Ok(path.to_path_buf()),
    }
}

fn parent_dir(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn check_dir(path: &Path, dir: &Path) -> Result<(), IoError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(IoError::write_msg(
            path,
            "a component of the path is not a directory",
            format!("`{}` is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(IoError::write_msg(
            path,
            "directory does not exist",
            format!("no directory `{}`", dir.display()),
        )),
        Err(e) => Err(IoError::write(
            path,
            &format!("checking the directory `{}`", dir.display()),
            e,
        )),
    }
}

/// The permissions of the existing target, if any; errors if it cannot or must not be replaced.
fn existing_permissions(path: &Path, target: &Path) -> Result<Option<Permissions>, IoError> {
    match fs::metadata(target) {
        Ok(meta) if meta.is_dir() => {
            Err(IoError::write_msg(path, "is a directory, not a file", ""))
        }
        Ok(meta) if !meta.is_file() => Err(IoError::write_msg(
            path,
            "not a regular file",
            "it is a device, pipe or socket; outputs are written to a temporary file that is then \
             renamed over the target, so the target must be a regular file or not exist",
        )),
        Ok(meta) if meta.permissions().readonly() => Err(IoError::write_msg(
            path,
            "permission denied",
            "the existing file is read-only",
        )),
        Ok(meta) => Ok(Some(meta.permissions())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::write(path, "checking the existing file", e)),
    }
}

/// New files get `rw-rw-rw-` less the umask (applied by the operating system when the file is
/// created), as a plain `File::create` would give, instead of the temporary file's `rw-------`.
#[cfg(unix)]
fn set_default_permissions(builder: &mut tempfile::Builder<'_, '_>) {
    use std::os::unix::fs::PermissionsExt;
    builder.permissions(Permissions::from_mode(0o666));
}

#[cfg(not(unix))]
fn set_default_permissions(_builder: &mut tempfile::Builder<'_, '_>) {}

/// Makes the rename durable (best effort: some file systems do not support syncing a directory).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_a_bare_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("out.npy")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/out.npy")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/out.npy")), Path::new("/"));
    }
}
