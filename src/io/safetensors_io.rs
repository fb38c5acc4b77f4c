//! Reading safetensors files of F32, F16 and BF16 tensors.
//!
//! Layout: an u64 LE header length `n`, `n` bytes of JSON (an object mapping each tensor name to
//! `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional `__metadata__` object of
//! strings), then the data; offsets are relative to the start of the data.
//!
//! The header length is checked (at most 100 MB, within the file) before the rest of the file is
//! read. Then every tensor is checked here, so that errors can name the tensor: a supported dtype,
//! offsets inside the data, a byte size matching the shape, no two tensors overlapping, no bytes
//! left unindexed, no duplicate names. Finally the `safetensors` crate parses the file too (it
//! enforces the same rules), and the data is taken from its views.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use super::error::{FileFormat, IoError};
use super::file::{open_regular, read_rest};
use super::tensor::{element_size, format_shape, shape_product, DType, Tensor, TensorData};

/// The longest JSON header accepted, in bytes (the limit of the safetensors format).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The path shown in errors from [`parse_safetensors`], which has no file.
const MEMORY: &str = "<memory>";

const EXPECTED_DTYPES: &str = "F32, F16 or BF16";

fn bad(path: &Path, what: impl Into<String>, detail: impl Into<String>) -> IoError {
    IoError::malformed(path, FileFormat::Safetensors, what, detail)
}

/// Reads every tensor of the safetensors file at `path`, in the order of their data in the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, IoError> {
    let (mut file, file_len) = open_regular(path)?;
    let mut head = [0u8; 8];
    file.read_exact(&mut head).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            truncated(path, file_len)
        } else {
            IoError::read(path, e)
        }
    })?;
    // Refuse an absurd or lying header length before reading the rest of a possibly huge file.
    check_header_len(path, u64::from_le_bytes(head), file_len)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| IoError::read(path, e))?;
    let bytes = read_rest(path, file, file_len)?;
    parse_safetensors_from(&bytes, path)
}

/// Parses the bytes of a safetensors file; errors name the file `<memory>`.
pub fn parse_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, IoError> {
    parse_safetensors_from(bytes, Path::new(MEMORY))
}

fn truncated(path: &Path, file_len: u64) -> IoError {
    bad(
        path,
        "truncated header",
        format!("the file has {file_len} bytes, the header length alone takes 8"),
    )
}

fn check_header_len(path: &Path, header_len: u64, file_len: u64) -> Result<(), IoError> {
    if header_len > MAX_HEADER_LEN {
        return Err(bad(
            path,
            "header too large",
            format!("the header claims {header_len} bytes, the limit is {MAX_HEADER_LEN}"),
        ));
    }
    let after = file_len.saturating_sub(8);
    if header_len > after {
        return Err(bad(
            path,
            "header length past the end of the file",
            format!("the header claims {header_len} bytes, the file has only {after} after the length field"),
        ));
    }
    Ok(())
}

/// One tensor's entry in the header, checked.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// Parses the bytes of a safetensors file read from `path` (used only in error messages).
pub fn parse_safetensors_from(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>, IoError> {
    let Some(head) = bytes.first_chunk::<8>() else {
        return Err(truncated(path, bytes.len() as u64));
    };
    let header_len = u64::from_le_bytes(*head);
    check_header_len(path, header_len, bytes.len() as u64)?;
    // fits: header_len <= bytes.len() - 8
    let header_end = 8 + usize::try_from(header_len).unwrap_or(usize::MAX - 8);
    let Some(header) = bytes.get(8..header_end) else {
        return Err(bad(path, "header length past the end of the file", ""));
    };
    let data_len = bytes.len() - header_end;

    if header.first() != Some(&b'{') {
        return Err(bad(
            path,
            "unparsable header",
            "the JSON header must start with `{`",
        ));
    }
    let Entries(raw) = serde_json::from_slice(header)
        .map_err(|e| bad(path, "unparsable header", format!("invalid JSON: {e}")))?;

    let mut entries = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    for (name, value) in raw {
        if !seen.insert(name.clone()) {
            return Err(bad(path, format!("duplicate tensor `{name}`"), ""));
        }
        if name == "__metadata__" {
            check_metadata(path, &value)?;
            continue;
        }
        entries.push(check_entry(path, name, &value, data_len)?);
    }

    entries.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0usize;
    let mut previous: Option<&Entry> = None;
    for e in &entries {
        if e.begin < covered {
            let other = previous.map(|p| p.name.as_str()).unwrap_or("");
            return Err(bad(
                path,
                format!(
                    "overlapping offsets: tensors `{other}` and `{}` share bytes",
                    e.name
                ),
                format!(
                    "`{}` starts at byte {} of the data, before `{other}` ends at byte {covered}",
                    e.name, e.begin
                ),
            ));
        }
        if e.begin > covered {
            return Err(bad(
                path,
                "gap in the data",
                format!(
                    "bytes {covered}..{} belong to no tensor (before `{}`)",
                    e.begin, e.name
                ),
            ));
        }
        covered = e.end;
        previous = Some(e);
    }
    if covered != data_len {
        return Err(bad(
            path,
            "data longer than the tensors",
            format!(
                "the tensors cover {covered} bytes, the data has {data_len}; the file may be \
                 corrupt or have trailing bytes"
            ),
        ));
    }

    // Defence in depth: the reference parser must accept the file too.
    let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        bad(
            path,
            "rejected by the safetensors parser",
            lower_first(&e.to_string()),
        )
    })?;

    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let view = parsed.tensor(&e.name).map_err(|err| {
            bad(
                path,
                format!("tensor `{}`: {}", e.name, lower_first(&err.to_string())),
                "",
            )
        })?;
        let raw = view.data();
        let data = match e.dtype {
            DType::F32 => TensorData::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                raw.chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            DType::Bf16 => TensorData::Bf16(
                raw.chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            DType::I32 => TensorData::I32(
                raw.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        };
        let tensor = Tensor::new(e.shape, data)
            .map_err(|err| bad(path, format!("tensor `{}`: {err}", e.name), ""))?;
        out.push((e.name, tensor));
    }
    Ok(out)
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn check_metadata(path: &Path, value: &serde_json::Value) -> Result<(), IoError> {
    let ok = match value {
        serde_json::Value::Object(map) => map.values().all(|v| v.is_string()),
        serde_json::Value::Null => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(bad(
            path,
            "unparsable header",
            "`__metadata__` must be an object of strings",
        ))
    }
}

fn check_entry(
    path: &Path,
    name: String,
    value: &serde_json::Value,
    data_len: usize,
) -> Result<Entry, IoError> {
    let field_err = |msg: String| bad(path, format!("tensor `{name}`: {msg}"), "");
    let serde_json::Value::Object(obj) = value else {
        return Err(field_err("its entry is not a JSON object".into()));
    };
    let dtype_text = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| field_err("`dtype` is missing or not a string".into()))?;
    let dtype = match dtype_text {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::Bf16,
        "I32" => DType::I32,
        other => {
            let mut dtype: String = other.chars().take(40).collect();
            if other.chars().count() > 40 {
                dtype.push_str("...");
            }
            return Err(IoError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: Some(name),
                dtype,
                expected: EXPECTED_DTYPES.to_string(),
            });
        }
    };
    let shape_json = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| field_err("`shape` is missing or not a list".into()))?;
    let mut shape = Vec::with_capacity(shape_json.len());
    for d in shape_json {
        let extent = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| field_err(format!("`shape` has the invalid extent `{d}`")))?;
        shape.push(extent);
    }
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| field_err("`data_offsets` is missing or not a pair".into()))?;
    let offset = |v: &serde_json::Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let (Some(begin), Some(end)) = (offset(&offsets[0]), offset(&offsets[1])) else {
        return Err(field_err(format!(
            "`data_offsets` are not byte offsets: `{}`",
            serde_json::Value::Array(offsets.clone())
        )));
    };
    if begin > end || end > data_len {
        return Err(bad(
            path,
            format!("tensor `{name}`: offsets out of range"),
            format!("data_offsets [{begin}, {end}], the data has {data_len} bytes"),
        ));
    }
    let need = shape_product(&shape)
        .and_then(|n| n.checked_mul(element_size(dtype)))
        .ok_or_else(|| field_err(format!("shape {} overflows", format_shape(&shape))))?;
    if end - begin != need {
        return Err(bad(
            path,
            format!("tensor `{name}`: offsets do not match the shape"),
            format!(
                "shape {} of {} needs {need} bytes, data_offsets [{begin}, {end}] give {}",
                format_shape(&shape),
                dtype_text,
                end - begin
            ),
        ));
    }
    Ok(Entry {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// The header's top-level entries in file order, duplicates kept (serde_json's maps would drop
/// them silently).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}
