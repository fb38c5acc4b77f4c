//! NumPy `.npy` files: a reader for format versions 1.0, 2.0 and 3.0 and a writer that produces
//! exactly the bytes `numpy.save` writes.
//!
//! Only little-endian float32 (`<f4`), float16 (`<f2`) and int32 (`<i4`) arrays in C order are read. The header
//! is a Python dict literal, parsed here by a small literal parser (never evaluated, and object
//! arrays, which hold pickles, are refused). Every size in the file is checked against the file's
//! length before anything is allocated.
//!
//! Layout: the magic `\x93NUMPY`, a major and a minor version byte, the header length (u16 LE for
//! 1.0, u32 LE for 2.0 and 3.0), the header (latin-1 for 1.0 and 2.0, UTF-8 for 3.0), the data.

use std::io::{BufWriter, Write};
use std::path::Path;

use half::f16;

use super::atomic::write_atomically_with;
use super::error::{FileFormat, IoError};
use super::file::read_input_file;
use super::tensor::{element_size, format_shape, shape_product, DType, Tensor, TensorData};

/// The first six bytes of every `.npy` file.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The longest header accepted, in bytes. NumPy writes headers of a few hundred bytes for the
/// arrays attnc reads (and refuses headers over 10,000 bytes by default when loading).
pub const MAX_HEADER_LEN: usize = 65_536;

/// The most dimensions accepted (NumPy's own limit).
pub const MAX_NDIM: usize = 64;

/// How deeply lists, tuples and dicts may nest in a header.
const MAX_NESTING: usize = 16;

/// The path shown in errors from [`parse_npy`], which has no file.
const MEMORY: &str = "<memory>";

const EXPECTED_DTYPES: &str = "float32 `<f4`, float16 `<f2` or int32 `<i4`";

/// Reads the `.npy` file at `path`.
pub fn read_npy(path: &Path) -> Result<Tensor, IoError> {
    let bytes = read_input_file(path)?;
    parse_npy_from(&bytes, path)
}

/// Parses the bytes of a `.npy` file; errors name the file `<memory>`.
pub fn parse_npy(bytes: &[u8]) -> Result<Tensor, IoError> {
    parse_npy_from(bytes, Path::new(MEMORY))
}

/// Parses the bytes of a `.npy` file read from `path` (used only in error messages).
pub fn parse_npy_from(bytes: &[u8], path: &Path) -> Result<Tensor, IoError> {
    let bad = |what: &str, detail: String| IoError::malformed(path, FileFormat::Npy, what, detail);

    if bytes.is_empty() {
        return Err(bad("empty file, not a .npy file", String::new()));
    }
    let magic_len = MAGIC.len().min(bytes.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(bad(
            "bad magic: not a .npy file",
            format!(
                "a .npy file starts with `\\x93NUMPY`, this one with `{}`",
                escape_bytes(&bytes[..bytes.len().min(8)])
            ),
        ));
    }
    if bytes.len() < MAGIC.len() + 2 {
        return Err(bad(
            "truncated header",
            format!("the file has only {} bytes", bytes.len()),
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let len_size = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => {
            return Err(bad(
                &format!("unsupported .npy format version {major}.{minor}"),
                "expected 1.0, 2.0 or 3.0".to_string(),
            ))
        }
    };
    let len_end = 8 + len_size;
    let Some(len_bytes) = bytes.get(8..len_end) else {
        return Err(bad(
            "truncated header",
            format!(
                "the file has only {} bytes, the header length field ends at byte {len_end}",
                bytes.len()
            ),
        ));
    };
    let header_len = if len_size == 2 {
        usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]))
    } else {
        let n = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        usize::try_from(n).unwrap_or(usize::MAX)
    };
    if header_len > MAX_HEADER_LEN {
        return Err(bad(
            "header too large",
            format!("the header claims {header_len} bytes, the limit is {MAX_HEADER_LEN}"),
        ));
    }
    let data_start = len_end + header_len;
    let Some(header_bytes) = bytes.get(len_end..data_start) else {
        return Err(bad(
            "header length past the end of the file",
            format!(
                "the header claims {header_len} bytes, the file has only {} after the length field",
                bytes.len() - len_end
            ),
        ));
    };
    let header_text: String = if major == 3 {
        std::str::from_utf8(header_bytes)
            .map_err(|e| bad("unparsable header", format!("not valid UTF-8: {e}")))?
            .to_string()
    } else {
        // latin-1: every byte is the code point of the same value
        header_bytes.iter().map(|&b| char::from(b)).collect()
    };
    let header = parse_header(&header_text).map_err(|msg| bad("unparsable header", msg))?;
    let dtype = header_dtype(&header, path)?;
    let shape = header_shape(&header).map_err(|msg| bad("unparsable header", msg))?;
    let fortran = header_fortran(&header).map_err(|msg| bad("unparsable header", msg))?;
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(bad(
            "fortran_order: True is not supported",
            "attnc reads C-ordered arrays; save `np.ascontiguousarray(a)` instead".to_string(),
        ));
    }

    let count = shape_product(&shape).ok_or_else(|| {
        bad(
            "shape product overflows",
            format!("shape {}", format_shape(&shape)),
        )
    })?;
    let need = count.checked_mul(element_size(dtype)).ok_or_else(|| {
        bad(
            "shape product overflows",
            format!("shape {} of {}", format_shape(&shape), dtype.keyword()),
        )
    })?;
    let data = &bytes[data_start..];
    if data.len() != need {
        let what = if data.len() < need {
            "data shorter than the shape implies"
        } else {
            "data longer than the shape implies"
        };
        return Err(bad(
            what,
            format!(
                "shape {} of {} needs {need} bytes, the file has {}",
                format_shape(&shape),
                dtype.keyword(),
                data.len()
            ),
        ));
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => TensorData::F16(
            data.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::I32 => TensorData::I32(
            data.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::Bf16 => {
            return Err(bad("internal error: bf16 .npy", String::new()));
        }
    };
    Tensor::new(shape, data)
}

/// `\x93NUMPY`-style escaping of raw bytes for messages.
fn escape_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() && b != b'`' && b != b'\\' {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The header: a Python literal

/// A Python literal value, as far as `.npy` headers use them.
#[derive(Debug, Clone, PartialEq)]
enum Py {
    Str(String),
    Int(i128),
    Bool(bool),
    None,
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
}

impl Py {
    /// Python's `repr`, for messages.
    fn repr(&self) -> String {
        fn join(items: &[Py]) -> String {
            items.iter().map(Py::repr).collect::<Vec<_>>().join(", ")
        }
        match self {
            Py::Str(s) => format!("'{s}'"),
            Py::Int(i) => i.to_string(),
            Py::Bool(true) => "True".to_string(),
            Py::Bool(false) => "False".to_string(),
            Py::None => "None".to_string(),
            Py::Tuple(items) if items.len() == 1 => format!("({},)", items[0].repr()),
            Py::Tuple(items) => format!("({})", join(items)),
            Py::List(items) => format!("[{}]", join(items)),
            Py::Dict(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.repr(), v.repr()))
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
        }
    }
}

/// The three entries of a header dict.
struct Header {
    descr: Py,
    fortran_order: Py,
    shape: Py,
}

struct LiteralParser {
    chars: Vec<char>,
    pos: usize,
}

impl LiteralParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn err(&self, msg: &str) -> String {
        match self.peek() {
            Some(c) => format!(
                "{msg} at character {}, found `{}`",
                self.pos,
                c.escape_debug()
            ),
            None => format!(
                "{msg} at character {}, found the end of the header",
                self.pos
            ),
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected `{c}`")))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Py, String> {
        if depth > MAX_NESTING {
            return Err(self.err("nesting too deep"));
        }
        self.skip_ws();
        match self.peek() {
            Some('{') => self.dict(depth),
            Some('(') => self.sequence('(', ')', depth),
            Some('[') => self.sequence('[', ']', depth),
            Some('\'') | Some('"') => self.string(),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => self.int(),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                match word.as_str() {
                    "True" => Ok(Py::Bool(true)),
                    "False" => Ok(Py::Bool(false)),
                    "None" => Ok(Py::None),
                    // Python 2 and bytes prefixes on a string literal
                    "u" | "b" | "U" | "B" if matches!(self.peek(), Some('\'' | '"')) => {
                        self.string()
                    }
                    _ => {
                        self.pos = start;
                        Err(self.err("unexpected name"))
                    }
                }
            }
            _ => Err(self.err("expected a value")),
        }
    }

    fn string(&mut self) -> Result<Py, String> {
        let Some(quote) = self.peek() else {
            return Err(self.err("expected a string"));
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None | Some('\n') => return Err(self.err("unterminated string")),
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(Py::Str(out));
                }
                Some('\\') => {
                    self.pos += 1;
                    let Some(c) = self.peek() else {
                        return Err(self.err("unterminated string"));
                    };
                    self.pos += 1;
                    out.push(match c {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        other => other,
                    });
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn int(&mut self) -> Result<Py, String> {
        let start = self.pos;
        let negative = match self.peek() {
            Some('-') => {
                self.pos += 1;
                true
            }
            Some('+') => {
                self.pos += 1;
                false
            }
            _ => false,
        };
        let digits_start = self.pos;
        let mut value: i128 = 0;
        while let Some(c) = self.peek() {
            let Some(d) = c.to_digit(10) else { break };
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i128::from(d)))
                .ok_or_else(|| format!("integer too large at character {start}"))?;
            self.pos += 1;
        }
        if self.pos == digits_start {
            return Err(self.err("expected digits"));
        }
        // Python 2 long suffix, as in `(3L, 4L)`
        if matches!(self.peek(), Some('L' | 'l')) {
            self.pos += 1;
        }
        if matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '.' || c == '_') {
            return Err(self.err("expected an integer"));
        }
        Ok(Py::Int(if negative { -value } else { value }))
    }

    /// A tuple `( ... )` or a list `[ ... ]`; `(x)` without a comma is just `x`.
    fn sequence(&mut self, open: char, close: char, depth: usize) -> Result<Py, String> {
        self.expect(open)?;
        let mut items = Vec::new();
        let mut saw_comma = false;
        loop {
            self.skip_ws();
            if self.peek() == Some(close) {
                self.pos += 1;
                break;
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(',') => {
                    self.pos += 1;
                    saw_comma = true;
                }
                Some(c) if c == close => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err(&format!("expected `,` or `{close}`"))),
            }
        }
        if open == '[' {
            Ok(Py::List(items))
        } else if items.len() == 1 && !saw_comma {
            Ok(items.pop().unwrap_or(Py::None))
        } else {
            Ok(Py::Tuple(items))
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Py, String> {
        self.expect('{')?;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some('}') {
                self.pos += 1;
                break;
            }
            let key = self.value(depth + 1)?;
            self.expect(':')?;
            let value = self.value(depth + 1)?;
            items.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err("expected `,` or `}`")),
            }
        }
        Ok(Py::Dict(items))
    }
}

/// Parses the header dict and checks it has exactly the keys `descr`, `fortran_order`, `shape`.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut p = LiteralParser {
        chars: text.chars().collect(),
        pos: 0,
    };
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos != p.chars.len() {
        return Err(p.err("unexpected text after the header dict"));
    }
    let Py::Dict(items) = value else {
        return Err(format!(
            "the header is not a dict but `{}`",
            short(&value.repr())
        ));
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    for (key, value) in items {
        let slot = match &key {
            Py::Str(k) if k == "descr" => &mut descr,
            Py::Str(k) if k == "fortran_order" => &mut fortran_order,
            Py::Str(k) if k == "shape" => &mut shape,
            other => return Err(format!("unexpected key `{}`", short(&other.repr()))),
        };
        if slot.is_some() {
            return Err(format!("duplicate key `{}`", key.repr()));
        }
        *slot = Some(value);
    }
    let missing = |name: &str| format!("missing key `'{name}'`");
    Ok(Header {
        descr: descr.ok_or_else(|| missing("descr"))?,
        fortran_order: fortran_order.ok_or_else(|| missing("fortran_order"))?,
        shape: shape.ok_or_else(|| missing("shape"))?,
    })
}

/// At most 60 characters of `s`, for messages.
fn short(s: &str) -> String {
    if s.chars().count() <= 60 {
        s.to_string()
    } else {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    }
}

/// The element type named by `descr`, or why it is not supported.
fn header_dtype(header: &Header, path: &Path) -> Result<DType, IoError> {
    let unsupported = |dtype: String, expected: String| IoError::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: None,
        dtype,
        expected,
    };
    let descr = match &header.descr {
        Py::Str(s) => s.as_str(),
        Py::List(_) => {
            return Err(unsupported(
                short(&header.descr.repr()),
                format!("{EXPECTED_DTYPES}; structured arrays are not supported"),
            ))
        }
        other => {
            return Err(IoError::malformed(
                path,
                FileFormat::Npy,
                "unparsable header",
                format!("`descr` is not a string but `{}`", short(&other.repr())),
            ))
        }
    };
    let (order, kind) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '=' | '|' | '!')) => (Some(c), &descr[1..]),
        _ => (None, descr),
    };
    let dtype = match kind {
        "f4" | "f" | "float32" => Some(DType::F32),
        "f2" | "e" | "float16" => Some(DType::F16),
        "i4" | "i" | "int32" => Some(DType::I32),
        _ => None,
    };
    match (order, dtype) {
        (Some('>' | '!'), Some(_)) => Err(unsupported(
            descr.to_string(),
            format!(
                "little-endian {EXPECTED_DTYPES}; this array is big-endian, save `a.astype('<{}')`",
                match dtype {
                    Some(DType::F32) => "f4",
                    Some(DType::I32) => "i4",
                    _ => "f2",
                }
            ),
        )),
        (_, Some(dtype)) => Ok(dtype),
        (_, None) if kind == "O" || kind.starts_with("O") => Err(unsupported(
            short(descr),
            format!("{EXPECTED_DTYPES}; object arrays hold pickles, which attnc never loads"),
        )),
        (_, None) if matches!(kind, "f8" | "d" | "float64") => Err(unsupported(
            short(descr),
            format!("{EXPECTED_DTYPES}; save `a.astype(np.float32)`"),
        )),
        (_, None) => Err(unsupported(short(descr), EXPECTED_DTYPES.to_string())),
    }
}

fn header_shape(header: &Header) -> Result<Vec<usize>, String> {
    let Py::Tuple(dims) = &header.shape else {
        return Err(format!(
            "`shape` is not a tuple but `{}`",
            short(&header.shape.repr())
        ));
    };
    if dims.len() > MAX_NDIM {
        return Err(format!(
            "`shape` has {} dimensions, at most {MAX_NDIM} are supported",
            dims.len()
        ));
    }
    dims.iter()
        .map(|d| match d {
            Py::Int(n) => usize::try_from(*n)
                .map_err(|_| format!("`shape` has the extent {n}, which is not a valid size")),
            other => Err(format!(
                "`shape` has the non-integer extent `{}`",
                short(&other.repr())
            )),
        })
        .collect()
}

fn header_fortran(header: &Header) -> Result<bool, String> {
    match header.fortran_order {
        Py::Bool(b) => Ok(b),
        ref other => Err(format!(
            "`fortran_order` is not True or False but `{}`",
            short(&other.repr())
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The header NumPy writes for a C-ordered array of `descr` and `shape`: format 1.0 unless the
/// header needs more than 65,535 bytes, spaces up to a multiple of 64 bytes, a final newline.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape_repr = match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_repr}, }}");
    // NumPy leaves room for the first extent to grow to 21 digits (for in-place appends).
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        dict.push_str(&" ".repeat(21usize.saturating_sub(digits)));
    }
    let text_len = dict.len() + 1; // the final newline
    let padded = |prefix: usize| text_len + 64 - (prefix + text_len) % 64;
    let (version, len_size) = if padded(MAGIC.len() + 4) <= usize::from(u16::MAX) {
        (1u8, 2usize)
    } else {
        (2u8, 4usize)
    };
    let prefix = MAGIC.len() + 2 + len_size;
    let header_len = padded(prefix);
    let pad = header_len - text_len;
    let mut out = Vec::with_capacity(prefix + header_len);
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.push(0);
    if len_size == 2 {
        // fits: the version choice above guarantees header_len <= u16::MAX
        out.extend_from_slice(&u16::try_from(header_len).unwrap_or(u16::MAX).to_le_bytes());
    } else {
        out.extend_from_slice(&u32::try_from(header_len).unwrap_or(u32::MAX).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

/// The descr and header for `tensor`, or why it cannot be a `.npy` file.
fn npy_prefix(tensor: &Tensor) -> Result<Vec<u8>, IoError> {
    tensor.validate()?;
    let descr = match tensor.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I32 => "<i4",
        DType::Bf16 => {
            return Err(IoError::invalid_tensor(
                "bf16 cannot be stored in a .npy file",
                "NumPy has no bfloat16; convert to f32 first",
            ))
        }
    };
    if tensor.shape.len() > MAX_NDIM {
        return Err(IoError::invalid_tensor(
            "too many dimensions for a .npy file",
            format!("{} dimensions, at most {MAX_NDIM}", tensor.shape.len()),
        ));
    }
    Ok(npy_header(descr, &tensor.shape))
}

fn write_elements<W: Write>(w: &mut W, data: &TensorData) -> std::io::Result<()> {
    match data {
        TensorData::F32(v) => {
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        TensorData::F16(v) => {
            for x in v {
                w.write_all(&x.to_bits().to_le_bytes())?;
            }
        }
        TensorData::Bf16(v) => {
            for x in v {
                w.write_all(&x.to_bits().to_le_bytes())?;
            }
        }
        TensorData::I32(v) => {
            for x in v {
                w.write_all(&x.to_le_bytes())?;
            }
        }
    }
    Ok(())
}

/// The bytes of the `.npy` file `numpy.save` would write for `tensor` (f32 or f16; a bf16
/// tensor is an error, NumPy has no bfloat16).
pub fn encode_npy(tensor: &Tensor) -> Result<Vec<u8>, IoError> {
    let mut out = npy_prefix(tensor)?;
    out.reserve(tensor.len() * element_size(tensor.dtype()));
    write_elements(&mut out, &tensor.data)
        .map_err(|e| IoError::invalid_tensor("cannot encode the tensor", e.to_string()))?;
    Ok(out)
}

/// Writes `tensor` (f32 or f16) to the `.npy` file `path`, atomically (see
/// [`write_atomically`](super::write_atomically)): the file is complete or left as it was.
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<(), IoError> {
    let header = npy_prefix(tensor).map_err(|e| match e {
        IoError::InvalidTensor { what, detail } => IoError::Write {
            path: path.to_path_buf(),
            what,
            detail,
            source: None,
        },
        other => other,
    })?;
    write_atomically_with(path, |file| {
        let mut w = BufWriter::with_capacity(1 << 16, file);
        w.write_all(&header)?;
        write_elements(&mut w, &tensor.data)?;
        w.flush()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Py, String> {
        let mut p = LiteralParser {
            chars: text.chars().collect(),
            pos: 0,
        };
        p.value(0)
    }

    #[test]
    fn literals() {
        assert_eq!(parse("(2, 3)"), Ok(Py::Tuple(vec![Py::Int(2), Py::Int(3)])));
        assert_eq!(parse("(5,)"), Ok(Py::Tuple(vec![Py::Int(5)])));
        assert_eq!(parse("()"), Ok(Py::Tuple(vec![])));
        assert_eq!(parse("(5)"), Ok(Py::Int(5)));
        assert_eq!(
            parse("(3L, 4L)"),
            Ok(Py::Tuple(vec![Py::Int(3), Py::Int(4)]))
        );
        assert_eq!(parse("u'<f4'"), Ok(Py::Str("<f4".into())));
        assert_eq!(parse("\"a\\'b\""), Ok(Py::Str("a'b".into())));
        assert!(parse("(3.5,)").is_err());
        assert!(parse("99999999999999999999999999999999999999999999").is_err());
        assert!(parse(&"[".repeat(1000)).is_err());
        assert!(parse("__import__('os')").is_err());
    }

    #[test]
    fn header_keys() {
        let ok = parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }");
        assert!(ok.is_ok());
        let dup =
            parse_header("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': ()}");
        assert!(dup.err().unwrap_or_default().contains("duplicate"));
        let extra = parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (), 'x': 1}");
        assert!(extra.err().unwrap_or_default().contains("unexpected key"));
        let missing = parse_header("{'descr': '<f4', 'shape': ()}");
        assert!(missing.err().unwrap_or_default().contains("fortran_order"));
    }

    #[test]
    fn header_alignment() {
        for shape in [
            vec![],
            vec![1],
            vec![2, 3],
            vec![123_456_789, 1, 1, 1, 1, 1, 1, 1],
        ] {
            let h = npy_header("<f4", &shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(h.last(), Some(&b'\n'));
        }
    }
}
