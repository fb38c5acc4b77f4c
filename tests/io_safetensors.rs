//! safetensors reading: valid files of F32/F16/BF16 tensors, and every kind of malformed file.

use std::fs;
use std::path::Path;

use attnc::io::{parse_safetensors, parse_safetensors_from, read_safetensors, IoError, TensorData};
use half::{bf16, f16};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A safetensors file with the given JSON header and data (the header is not padded).
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid file written by the `safetensors` crate: `q` f32 [2, 2], `k` f16 [3], `v` bf16 [1, 2].
fn valid_file() -> Vec<u8> {
    let q = f32s(&[1.0, 2.0, 3.0, -4.0]);
    let k: Vec<u8> = [0.5f32, -1.0, 2.0]
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let v: Vec<u8> = [3.0f32, -0.125]
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let tensors = vec![
        ("q", TensorView::new(Dtype::F32, vec![2, 2], &q).unwrap()),
        ("k", TensorView::new(Dtype::F16, vec![3], &k).unwrap()),
        ("v", TensorView::new(Dtype::BF16, vec![1, 2], &v).unwrap()),
    ];
    safetensors::serialize(tensors, None).unwrap()
}

fn parse_err(bytes: &[u8]) -> String {
    match parse_safetensors_from(bytes, Path::new("w.safetensors")) {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

/// The `safetensors` crate on its own also refuses the file.
fn crate_rejects(bytes: &[u8]) -> bool {
    safetensors::SafeTensors::deserialize(bytes).is_err()
}

// ---------------------------------------------------------------------------------------------
// Valid files

#[test]
fn reads_f32_f16_bf16_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    fs::write(&path, valid_file()).unwrap();
    let tensors = read_safetensors(&path).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    // The crate lays tensors out by dtype alignment, then name; we return data order.
    assert_eq!(names.len(), 3);
    let get = |name: &str| &tensors.iter().find(|(n, _)| n == name).unwrap().1;
    let q = get("q");
    assert_eq!(q.shape, vec![2, 2]);
    assert_eq!(q.dtype_name(), "f32");
    assert_eq!(q.to_f32_vec(), vec![1.0, 2.0, 3.0, -4.0]);
    let k = get("k");
    assert_eq!(k.dtype_name(), "f16");
    assert_eq!(k.to_f32_vec(), vec![0.5, -1.0, 2.0]);
    let v = get("v");
    assert!(matches!(v.data, TensorData::Bf16(_)));
    assert_eq!(v.shape, vec![1, 2]);
    assert_eq!(v.to_f32_vec(), vec![3.0, -0.125]);
}

#[test]
fn order_follows_data_offsets() {
    let header = r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let tensors = parse_safetensors(&st_bytes(header, &f32s(&[1.0, 2.0]))).unwrap();
    assert_eq!(tensors[0].0, "b");
    assert_eq!(tensors[0].1.to_f32_vec(), vec![1.0]);
    assert_eq!(tensors[1].0, "a");
}

#[test]
fn metadata_scalars_and_empty_tensors() {
    let header = r#"{"__metadata__":{"format":"pt"},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F16","shape":[0,3],"data_offsets":[4,4]}}"#;
    let tensors = parse_safetensors(&st_bytes(header, &f32s(&[7.0]))).unwrap();
    assert_eq!(tensors.len(), 2);
    let s = &tensors.iter().find(|(n, _)| n == "s").unwrap().1;
    assert_eq!(s.shape, Vec::<usize>::new());
    assert_eq!(s.to_f32_vec(), vec![7.0]);
    let e = &tensors.iter().find(|(n, _)| n == "e").unwrap().1;
    assert_eq!(e.shape, vec![0, 3]);
    assert!(e.is_empty());
}

#[test]
fn empty_file_with_no_tensors() {
    assert!(parse_safetensors(&st_bytes("{}", b"")).unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Header length

#[test]
fn rejects_header_over_100_mb() {
    let mut bytes = (100_000_001u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = parse_err(&bytes);
    assert!(
        err.contains(
            "header too large (the header claims 100000001 bytes, the limit is 100000000)"
        ),
        "{err}"
    );
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    assert!(parse_err(&bytes).contains("header too large"));
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_header_over_100_mb_on_disk_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let mut bytes = (200_000_000u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\": ");
    fs::write(&path, bytes).unwrap();
    let err = read_safetensors(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("input `{}`: header too large", path.display())),
        "{err}"
    );
}

#[test]
fn rejects_header_past_end_of_file() {
    let mut bytes = (1000u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = parse_err(&bytes);
    assert!(
        err.contains("header length past the end of the file"),
        "{err}"
    );
    assert!(crate_rejects(&bytes));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.safetensors");
    fs::write(&path, &bytes).unwrap();
    let err = read_safetensors(&path).unwrap_err().to_string();
    assert!(
        err.contains("header length past the end of the file"),
        "{err}"
    );
}

#[test]
fn rejects_truncated_length_field() {
    assert!(parse_err(b"").contains("truncated header"));
    assert!(parse_err(&[1, 0, 0]).contains("truncated header"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    fs::write(&path, [2u8, 0, 0]).unwrap();
    let err = read_safetensors(&path).unwrap_err().to_string();
    assert!(
        err.contains("truncated header (the file has 3 bytes"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Offsets

#[test]
fn rejects_overlapping_offsets() {
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0, 2.0, 3.0]));
    let err = parse_err(&bytes);
    assert!(
        err.contains("overlapping offsets: tensors `a` and `b` share bytes"),
        "{err}"
    );
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_identical_offsets() {
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0]));
    assert!(parse_err(&bytes).contains("overlapping offsets"));
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_out_of_range_offsets() {
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0, 2.0]));
    let err = parse_err(&bytes);
    assert!(
        err.contains(
            "tensor `a`: offsets out of range (data_offsets [0, 16], the data has 8 bytes)"
        ),
        "{err}"
    );
    assert!(crate_rejects(&bytes));

    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,3]}}"#;
    assert!(parse_err(&st_bytes(header, &f32s(&[1.0]))).contains("offsets out of range"));
    let header = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#;
    assert!(parse_err(&st_bytes(header, &f32s(&[1.0, 2.0]))).contains("offsets out of range"));
}

#[test]
fn rejects_invalid_offset_values() {
    for offsets in ["[-4,0]", "[0]", "[0,4,8]", "\"0-4\"", "[0.5,4]", "[0,1e3]"] {
        let header = format!(r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":{offsets}}}}}"#);
        let err = parse_err(&st_bytes(&header, &f32s(&[1.0])));
        assert!(err.contains("tensor `a`: "), "{offsets}: {err}");
    }
}

#[test]
fn rejects_offsets_not_matching_shape() {
    let header = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0, 2.0]));
    let err = parse_err(&bytes);
    assert!(
        err.contains("tensor `a`: offsets do not match the shape (shape [3] of F32 needs 12 bytes, data_offsets [0, 8] give 8)"),
        "{err}"
    );
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_gap_between_tensors() {
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0, 2.0, 3.0]));
    assert!(parse_err(&bytes).contains("gap in the data (bytes 4..8 belong to no tensor"));
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_trailing_bytes() {
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let bytes = st_bytes(header, &f32s(&[1.0, 2.0]));
    assert!(parse_err(&bytes).contains("data longer than the tensors"));
    assert!(crate_rejects(&bytes));
}

#[test]
fn rejects_shape_overflow() {
    let header =
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#;
    let err = parse_err(&st_bytes(header, &f32s(&[1.0])));
    assert!(
        err.contains("tensor `a`: ") && err.contains("overflows"),
        "{err}"
    );
    let header = r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#;
    assert!(parse_err(&st_bytes(header, &f32s(&[1.0]))).contains("invalid extent `-1`"));
}

// ---------------------------------------------------------------------------------------------
// Dtypes and header contents

#[test]
fn rejects_other_dtypes_naming_tensor_and_dtype() {
    let header = r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    let err =
        parse_safetensors_from(&st_bytes(header, &[0; 8]), Path::new("w.safetensors")).unwrap_err();
    assert!(
        matches!(&err, IoError::UnsupportedDtype { tensor: Some(t), dtype, .. }
        if t == "ids" && dtype == "I64")
    );
    assert_eq!(
        err.to_string(),
        "input `w.safetensors`: tensor `ids`: unsupported dtype `I64` (expected F32, F16 or BF16)"
    );
    for dtype in ["F64", "BOOL", "U8", "F8_E4M3", "Q4_K"] {
        let header = format!(r#"{{"x":{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,1]}}}}"#);
        let err = parse_err(&st_bytes(&header, &[0]));
        assert!(
            err.contains(&format!("tensor `x`: unsupported dtype `{dtype}`")),
            "{err}"
        );
    }
}

#[test]
fn rejects_duplicate_tensor_names() {
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let err = parse_err(&st_bytes(header, &f32s(&[1.0, 2.0])));
    assert!(err.contains("duplicate tensor `a`"), "{err}");
}

#[test]
fn rejects_unparsable_headers() {
    for header in [
        "",
        "[]",
        " {}",
        "{",
        "{\"a\": }",
        "{\"a\": 5}",
        "{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}",
        "{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}",
        "{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}",
        "{\"__metadata__\": {\"x\": 1}}",
        "{\"__metadata__\": [1]}",
    ] {
        let err = parse_err(&st_bytes(header, &[]));
        assert!(
            err.starts_with("input `w.safetensors`: "),
            "{header}: {err}"
        );
    }
    let mut bytes = st_bytes("{\"\u{e9}\": 1}", &[]);
    bytes[10] = 0xff; // invalid UTF-8 inside the JSON
    assert!(parse_err(&bytes).contains("unparsable header"));
}

#[test]
fn rejects_deeply_nested_json() {
    let header = format!("{{\"a\": {}", "[".repeat(100_000));
    assert!(parse_err(&st_bytes(&header, &[])).contains("unparsable header"));
}

// ---------------------------------------------------------------------------------------------
// File-system errors

#[test]
fn missing_file_and_directory() {
    let err = read_safetensors(Path::new("/nonexistent/w.safetensors"))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "input `/nonexistent/w.safetensors`: file not found");
    let dir = tempfile::tempdir().unwrap();
    let err = read_safetensors(dir.path()).unwrap_err().to_string();
    assert!(err.ends_with("is a directory, not a file"), "{err}");
    let err = read_safetensors(Path::new("/dev/null"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: no input makes the parser panic

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_safetensors(&bytes);
    }

    #[test]
    fn random_json_headers_never_panic(
        header in r#"[{}\[\]":, 0-9a-zA-Z_-]{0,100}"#,
        data in prop::collection::vec(any::<u8>(), 0..24),
    ) {
        let _ = parse_safetensors(&st_bytes(&header, &data));
    }

    #[test]
    fn random_offsets_never_panic(
        a in (0u64..40, 0u64..40), b in (0u64..40, 0u64..40),
        sa in prop::collection::vec(0u64..4, 0..3), sb in prop::collection::vec(0u64..4, 0..3),
        data_len in 0usize..40,
        da in prop::sample::select(vec!["F32", "F16", "BF16", "I8"]),
    ) {
        let header = format!(
            r#"{{"a":{{"dtype":"{da}","shape":{sa:?},"data_offsets":[{},{}]}},"b":{{"dtype":"F16","shape":{sb:?},"data_offsets":[{},{}]}}}}"#,
            a.0, a.1, b.0, b.1
        );
        let bytes = st_bytes(&header, &vec![0u8; data_len]);
        let ours = parse_safetensors(&bytes);
        if let Ok(tensors) = &ours {
            for (_, t) in tensors {
                prop_assert!(t.validate().is_ok());
            }
            // What we accept, the reference parser accepts too.
            prop_assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
        }
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = valid_file();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes[i] ^= 1 << (byte % 8),
                2 => bytes.insert(i, byte),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        if do_cut && !bytes.is_empty() {
            let n = cut.index(bytes.len());
            bytes.truncate(n);
        }
        if let Ok(tensors) = parse_safetensors(&bytes) {
            for (_, t) in tensors {
                prop_assert!(t.validate().is_ok());
            }
        }
    }
}
