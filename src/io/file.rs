//! Reading input files whole, with clear errors for missing files, directories, devices and
//! unreadable files.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use super::error::IoError;

/// Opens `path` for reading after checking that it is a regular file (following symbolic links).
///
/// Devices, pipes and sockets are refused: reading `/dev/zero` would never end, and a pipe
/// without a writer would block.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), IoError> {
    let meta = fs::metadata(path).map_err(|e| IoError::read(path, e))?;
    if meta.is_dir() {
        return Err(IoError::read_msg(path, "is a directory, not a file", ""));
    }
    if !meta.is_file() {
        return Err(IoError::read_msg(
            path,
            "not a regular file",
            "it is a device, pipe or socket; give the path of a tensor file",
        ));
    }
    let file = File::open(path).map_err(|e| IoError::read(path, e))?;
    Ok((file, meta.len()))
}

/// Reads the whole of the regular file `path`.
pub fn read_input_file(path: &Path) -> Result<Vec<u8>, IoError> {
    let (file, len) = open_regular(path)?;
    read_rest(path, file, len)
}

/// Reads the regular file `path`, refusing one of more than `max` bytes: for files that are
/// small by nature (sources, caches, `/proc` entries), so that a wrong path — `/dev/zero`, a
/// FIFO, a huge file — is an error instead of a hang or an exhausted memory.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, IoError> {
    let (file, len) = open_regular(path)?;
    let too_large = |size: u64| {
        IoError::read_msg(
            path,
            format!("is {size} bytes, more than the {max} bytes allowed"),
            "",
        )
    };
    if len > max {
        return Err(too_large(len));
    }
    let mut bytes = Vec::new();
    // The file may grow after the check: read one byte past the bound to notice.
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| IoError::read(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_small_text(path: impl AsRef<Path>, max: u64) -> Result<String, IoError> {
    let path = path.as_ref();
    let bytes = read_bounded(path, max)?;
    String::from_utf8(bytes).map_err(|_| IoError::read_msg(path, "is not UTF-8 text", ""))
}

/// Reads everything left in `file` (expected to be about `len_hint` bytes).
pub(crate) fn read_rest(path: &Path, mut file: File, len_hint: u64) -> Result<Vec<u8>, IoError> {
    // The hint only sizes the first allocation; cap it so a lying size cannot exhaust memory.
    let cap = usize::try_from(len_hint.min(1 << 30)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(cap);
    file.read_to_end(&mut bytes)
        .map_err(|e| IoError::read(path, e))?;
    Ok(bytes)
}
