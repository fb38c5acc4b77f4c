//! The error type of the tensor-file layer.
//!
//! Every message is lowercase, has no final dot and names the file it is about, for example
//! ``input `q.npy`: unsupported dtype `<i8` (expected float32 `<f4`, float16 `<f2` or int32 `<i4`)``.

use std::fmt;
use std::path::{Path, PathBuf};

/// The kind of tensor file a [`IoError::Malformed`] error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// A NumPy `.npy` file.
    Npy,
    /// A safetensors file.
    Safetensors,
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Npy => ".npy",
            FileFormat::Safetensors => "safetensors",
        })
    }
}

/// Why reading, parsing or writing a tensor file failed.
///
/// Each variant carries the path of the file (`path`), a short statement of the problem (`what`)
/// and, where there is more to say, a `detail` that the message shows in parentheses.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// An input file could not be opened or read (missing, a directory, no permission, ...).
    #[error("input `{}`: {what}{}", path.display(), paren(detail))]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong, e.g. `file not found`.
        what: String,
        /// More information (the operating system's message), possibly empty.
        detail: String,
        /// The underlying I/O error, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// An input file is not a well-formed tensor file.
    #[error("input `{}`: {what}{}", path.display(), paren(detail))]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Which format the file was read as.
        format: FileFormat,
        /// What is wrong, e.g. `truncated header`.
        what: String,
        /// More information (sizes, offsets, how to fix it), possibly empty.
        detail: String,
    },
    /// A well-formed tensor file holds an element type attnc does not read.
    #[error("input `{}`: {}unsupported dtype `{dtype}` (expected {expected})",
        path.display(), tensor_prefix(tensor))]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name inside a safetensors file; `None` for `.npy`.
        tensor: Option<String>,
        /// The dtype as the file spells it, e.g. `<i8` or `I64`.
        dtype: String,
        /// What is accepted instead, e.g. ``float32 `<f4` or float16 `<f2` ``.
        expected: String,
    },
    /// An output file could not be written; the target was left as it was.
    #[error("output `{}`: {what}{}", path.display(), paren(detail))]
    Write {
        /// The target file.
        path: PathBuf,
        /// What went wrong, e.g. `disk full`.
        what: String,
        /// More information (the operating system's message), possibly empty.
        detail: String,
        /// The underlying I/O error, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A tensor's shape and data do not agree (or its shape overflows).
    #[error("tensor: {what}{}", paren(detail))]
    InvalidTensor {
        /// What is wrong.
        what: String,
        /// More information, possibly empty.
        detail: String,
    },
}

fn paren(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

fn tensor_prefix(tensor: &Option<String>) -> String {
    match tensor {
        Some(name) => format!("tensor `{name}`: "),
        None => String::new(),
    }
}

impl IoError {
    /// The file this error is about (`None` for [`IoError::InvalidTensor`]).
    pub fn path(&self) -> Option<&Path> {
        match self {
            IoError::Read { path, .. }
            | IoError::Malformed { path, .. }
            | IoError::UnsupportedDtype { path, .. }
            | IoError::Write { path, .. } => Some(path),
            IoError::InvalidTensor { .. } => None,
        }
    }

    /// A malformed-file error.
    pub(crate) fn malformed(
        path: &Path,
        format: FileFormat,
        what: impl Into<String>,
        detail: impl Into<String>,
    ) -> IoError {
        IoError::Malformed {
            path: path.to_path_buf(),
            format,
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// An error reading `path`, from the operating system's error.
    pub(crate) fn read(path: &Path, err: std::io::Error) -> IoError {
        let (what, detail) = match describe_io(&err) {
            Some(what) => (what.to_string(), String::new()),
            None => ("cannot read the file".to_string(), os_message(&err)),
        };
        IoError::Read {
            path: path.to_path_buf(),
            what,
            detail,
            source: Some(err),
        }
    }

    /// An error reading `path` that the operating system did not report.
    pub(crate) fn read_msg(
        path: &Path,
        what: impl Into<String>,
        detail: impl Into<String>,
    ) -> IoError {
        IoError::Read {
            path: path.to_path_buf(),
            what: what.into(),
            detail: detail.into(),
            source: None,
        }
    }

    /// An error writing `path`, from the operating system's error; `doing` says what was being
    /// done, e.g. ``creating a temporary file in `out/` ``.
    pub(crate) fn write(path: &Path, doing: &str, err: std::io::Error) -> IoError {
        let (what, detail) = match describe_io(&err) {
            Some(what) => (what.to_string(), format!("while {doing}")),
            None => (
                "cannot write the file".to_string(),
                format!("while {doing}: {}", os_message(&err)),
            ),
        };
        IoError::Write {
            path: path.to_path_buf(),
            what,
            detail,
            source: Some(err),
        }
    }

    /// An error writing `path` that the operating system did not report.
    pub(crate) fn write_msg(
        path: &Path,
        what: impl Into<String>,
        detail: impl Into<String>,
    ) -> IoError {
        IoError::Write {
            path: path.to_path_buf(),
            what: what.into(),
            detail: detail.into(),
            source: None,
        }
    }

    /// An invalid-tensor error.
    pub(crate) fn invalid_tensor(what: impl Into<String>, detail: impl Into<String>) -> IoError {
        IoError::InvalidTensor {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// A lowercase phrase for the well-known kinds of I/O error.
fn describe_io(err: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind as K;
    Some(match err.kind() {
        K::NotFound => "file not found",
        K::PermissionDenied => "permission denied",
        K::IsADirectory => "is a directory, not a file",
        K::NotADirectory => "a component of the path is not a directory",
        K::StorageFull => "disk full",
        K::QuotaExceeded => "disk quota exceeded",
        K::ReadOnlyFilesystem => "read-only file system",
        K::FileTooLarge => "file too large",
        K::UnexpectedEof => "file ended early",
        K::Interrupted => "interrupted",
        _ => return None,
    })
}

/// The operating system's message with a lowercase first letter, e.g.
/// `no space left on device (os error 28)`.
fn os_message(err: &std::io::Error) -> String {
    let text = err.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}
