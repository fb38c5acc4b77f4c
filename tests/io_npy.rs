//! `.npy` reading and writing: NumPy compatibility (fixtures written by `numpy.save`, see
//! `tests/fixtures/gen_npy.py`), round trips, and every kind of malformed file.

use std::fs;
use std::path::{Path, PathBuf};

use attnc::io::{
    encode_npy, parse_npy, parse_npy_from, read_npy, write_npy, IoError, Tensor, TensorData,
};
use half::{bf16, f16};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/npy")
        .join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    fs::read(fixture(name)).expect("fixture exists")
}

/// The error message for `bytes` parsed as the file `t.npy`.
fn parse_err(bytes: &[u8]) -> String {
    match parse_npy_from(bytes, Path::new("t.npy")) {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

/// A .npy file with the given version and header text (no padding added) and data.
fn npy_bytes(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY".to_vec();
    out.push(major);
    out.push(0);
    if major == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_header(shape: &str) -> String {
    format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n")
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// NumPy compatibility

#[test]
fn reads_numpy_f32_2x3() {
    let t = read_npy(&fixture("f32_2x3.npy")).unwrap();
    assert_eq!(t.shape, vec![2, 3]);
    assert_eq!(t.dtype_name(), "f32");
    assert_eq!(t.to_f32_vec(), vec![1.0, -2.5, 3.25, 0.0, 1e-3, -7.0]);
    let a = t.to_f64_array();
    assert_eq!(a.shape(), &[2, 3]);
    assert_eq!(a[[1, 2]], -7.0);
}

#[test]
fn reads_numpy_scalar_1d_empty_4d() {
    let s = read_npy(&fixture("f32_scalar.npy")).unwrap();
    assert_eq!(s.shape, Vec::<usize>::new());
    assert_eq!(s.to_f32_vec(), vec![1.5]);

    let v = read_npy(&fixture("f32_1d.npy")).unwrap();
    assert_eq!(v.shape, vec![5]);
    assert_eq!(v.to_f32_vec(), vec![0.0, 0.5, 1.0, 1.5, 2.0]);

    let e = read_npy(&fixture("f32_empty_0x4.npy")).unwrap();
    assert_eq!(e.shape, vec![0, 4]);
    assert!(e.is_empty());

    let d = read_npy(&fixture("f32_4d.npy")).unwrap();
    assert_eq!(d.shape, vec![2, 3, 1, 4]);
    let expected: Vec<f32> = (0..24).map(|i| (i as f32 - 7.0) / 3.0).collect();
    assert_eq!(d.to_f32_vec(), expected);
}

#[test]
fn reads_numpy_special_values() {
    let t = read_npy(&fixture("f32_special.npy")).unwrap();
    let v = t.to_f32_vec();
    assert!(v[0].is_nan());
    assert_eq!(v[1], f32::INFINITY);
    assert_eq!(v[2], f32::NEG_INFINITY);
    assert!(v[3] == 0.0 && v[3].is_sign_negative());
    assert_eq!(v[4], 1e-45); // the smallest subnormal
    assert_eq!(v[5], 3.4e38);
}

#[test]
fn reads_numpy_f16() {
    let t = read_npy(&fixture("f16_3.npy")).unwrap();
    assert_eq!(t.dtype_name(), "f16");
    assert_eq!(t.shape, vec![3]);
    assert_eq!(t.to_f32_vec(), vec![1.0, -0.5, 65504.0]);
    let t = read_npy(&fixture("f16_2x2.npy")).unwrap();
    let TensorData::F16(v) = &t.data else {
        panic!("f16 expected")
    };
    assert_eq!(v[0], f16::from_f32(0.1));
    assert_eq!(v[3], f16::from_f32(-0.4));
}

#[test]
fn reads_numpy_format_versions_2_and_3() {
    let v1 = read_npy(&fixture("f32_2x3.npy")).unwrap();
    assert_eq!(read_npy(&fixture("f32_v2.npy")).unwrap(), v1);
    assert_eq!(read_npy(&fixture("f32_v3.npy")).unwrap(), v1);
}

#[test]
fn writes_byte_identical_to_numpy() {
    for name in [
        "f32_2x3.npy",
        "f32_scalar.npy",
        "f32_1d.npy",
        "f32_empty_0x4.npy",
        "f32_4d.npy",
        "f32_special.npy",
        "f16_3.npy",
        "f16_2x2.npy",
    ] {
        let original = fixture_bytes(name);
        let tensor = parse_npy(&original).unwrap();
        assert_eq!(encode_npy(&tensor).unwrap(), original, "{name}");

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(name);
        write_npy(&out, &tensor).unwrap();
        assert_eq!(fs::read(&out).unwrap(), original, "{name}");
    }
}

#[test]
fn accepts_python2_long_suffix_and_other_spellings() {
    let data = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    for header in [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",
        "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
        "{'shape': (2, 3), 'fortran_order': False, 'descr': 'f4'}",
        "{u'descr': u'<f4', u'fortran_order': False, u'shape': (2, 3)}",
    ] {
        let t = parse_npy(&npy_bytes(1, header, &data)).unwrap();
        assert_eq!(t.shape, vec![2, 3], "{header}");
    }
    let half: Vec<u8> = [1.0f32, 2.0]
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    for descr in ["<f2", "f2", "<e", "|f2"] {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2,)}}");
        let t = parse_npy(&npy_bytes(1, &header, &half)).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.0, 2.0], "{descr}");
    }
}

#[test]
fn fortran_order_is_accepted_when_layout_is_the_same() {
    // With at most one extent above 1, Fortran and C order are the same bytes.
    let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 3), }";
    let t = parse_npy(&npy_bytes(1, header, &f32s(&[1.0, 2.0, 3.0]))).unwrap();
    assert_eq!(t.to_f32_vec(), vec![1.0, 2.0, 3.0]);
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_f32(vec![2, 2], vec![1.0, f32::NAN, -0.0, 1e-40]).unwrap();
    let path = dir.path().join("a.npy");
    write_npy(&path, &t).unwrap();
    let back = read_npy(&path).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> { t.to_f32_vec().iter().map(|x| x.to_bits()).collect() };
    assert_eq!(bits(&back), bits(&t));
    assert_eq!(back.shape, t.shape);

    let h = Tensor::from_f16(
        vec![3],
        vec![f16::MAX, f16::MIN_POSITIVE_SUBNORMAL, f16::NAN],
    )
    .unwrap();
    write_npy(&path, &h).unwrap();
    let back = read_npy(&path).unwrap();
    let TensorData::F16(v) = back.data else {
        panic!("f16 expected")
    };
    let TensorData::F16(w) = h.data else {
        unreachable!()
    };
    let to_bits = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(to_bits(&v), to_bits(&w));
}

#[test]
fn write_refuses_bf16_naming_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.npy");
    let t = Tensor::from_bf16(vec![1], vec![bf16::ONE]).unwrap();
    let err = write_npy(&path, &t).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("output `{}`: bf16", path.display())),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn write_refuses_inconsistent_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.npy");
    let t = Tensor {
        shape: vec![4],
        data: TensorData::F32(vec![1.0]),
    };
    let err = write_npy(&path, &t).unwrap_err().to_string();
    assert!(err.contains("element count"), "{err}");
    assert!(!path.exists());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_random_tensors(
        shape in prop::collection::vec(0usize..5, 0..5),
        seed in any::<u64>(),
        half_precision in any::<bool>(),
    ) {
        let n: usize = shape.iter().product();
        let values = attnc::io::standard_normal(seed, 0, n);
        let t = if half_precision {
            Tensor::from_f16(shape.clone(), values.iter().map(|&x| f16::from_f32(x)).collect())
        } else {
            Tensor::from_f32(shape.clone(), values)
        }.unwrap();
        let bytes = encode_npy(&t).unwrap();
        prop_assert_eq!(bytes.len() % 64, (t.len() * if half_precision { 2 } else { 4 }) % 64);
        prop_assert_eq!(parse_npy(&bytes).unwrap(), t);
    }
}

// ---------------------------------------------------------------------------------------------
// Rejected files (NumPy-written)

#[test]
fn rejects_fortran_order() {
    let path = fixture("fortran_f32.npy");
    let err = read_npy(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("input `{}`: ", path.display())),
        "{err}"
    );
    assert!(
        err.contains("fortran_order: True is not supported"),
        "{err}"
    );
}

#[test]
fn rejects_big_endian() {
    let err = read_npy(&fixture("bigendian_f32.npy")).unwrap_err();
    assert!(matches!(&err, IoError::UnsupportedDtype { dtype, .. } if dtype == ">f4"));
    let msg = err.to_string();
    assert!(
        msg.contains("unsupported dtype `>f4`") && msg.contains("big-endian"),
        "{msg}"
    );
}

#[test]
fn rejects_int64_with_exact_message() {
    let path = fixture("int64.npy");
    let err = read_npy(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "input `{}`: unsupported dtype `<i8` (expected float32 `<f4`, float16 `<f2` or int32 `<i4`)",
            path.display()
        )
    );
}

#[test]
fn rejects_float64() {
    let err = read_npy(&fixture("f64.npy")).unwrap_err().to_string();
    assert!(
        err.contains(
            "unsupported dtype `<f8` (expected float32 `<f4`, float16 `<f2` or int32 `<i4`"
        ),
        "{err}"
    );
}

#[test]
fn rejects_object_arrays_without_unpickling() {
    let err = read_npy(&fixture("object.npy")).unwrap_err().to_string();
    assert!(
        err.contains("unsupported dtype `|O`") && err.contains("pickles"),
        "{err}"
    );
}

#[test]
fn rejects_bool() {
    let err = read_npy(&fixture("bool.npy")).unwrap_err().to_string();
    assert!(err.contains("unsupported dtype `|b1`"), "{err}");
}

#[test]
fn rejects_structured_dtype() {
    let header = "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (1,)}";
    let err = parse_err(&npy_bytes(1, header, &f32s(&[1.0, 2.0])));
    assert!(err.contains("structured arrays are not supported"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Malformed files

#[test]
fn rejects_empty_file() {
    assert!(parse_err(b"").contains("empty file"));
}

#[test]
fn rejects_bad_magic() {
    let err = parse_err(b"PK\x03\x04 this is a zip file");
    assert!(
        err.starts_with("input `t.npy`: bad magic: not a .npy file"),
        "{err}"
    );
    let mut bytes = fixture_bytes("f32_2x3.npy");
    bytes[1] = b'n';
    assert!(parse_err(&bytes).contains("bad magic"));
    // A prefix of something else, shorter than the magic.
    assert!(parse_err(b"\x93NX").contains("bad magic"));
}

#[test]
fn rejects_unsupported_version() {
    let mut bytes = fixture_bytes("f32_2x3.npy");
    bytes[6] = 4;
    let err = parse_err(&bytes);
    assert!(
        err.contains("unsupported .npy format version 4.0 (expected 1.0, 2.0 or 3.0)"),
        "{err}"
    );
    bytes[6] = 1;
    bytes[7] = 1;
    assert!(parse_err(&bytes).contains("version 1.1"));
}

#[test]
fn rejects_truncated_header() {
    let bytes = fixture_bytes("f32_2x3.npy");
    for cut in [3, 6, 7, 9] {
        let err = parse_err(&bytes[..cut]);
        assert!(
            err.contains("truncated header") || err.contains("bad magic"),
            "{cut}: {err}"
        );
    }
    assert!(parse_err(&bytes[..9]).contains("truncated header"));
    let v2 = fixture_bytes("f32_v2.npy");
    assert!(parse_err(&v2[..11]).contains("truncated header"));
}

#[test]
fn rejects_header_length_past_end_of_file() {
    let bytes = fixture_bytes("f32_2x3.npy");
    let err = parse_err(&bytes[..60]);
    assert!(
        err.contains("header length past the end of the file"),
        "{err}"
    );
    let mut bytes = bytes;
    bytes[8..10].copy_from_slice(&60_000u16.to_le_bytes());
    assert!(parse_err(&bytes).contains("header length past the end of the file"));
}

#[test]
fn rejects_header_over_the_limit() {
    // A version 2.0 header claiming 4 GB, and a real 100 kB one.
    let mut bytes = fixture_bytes("f32_v2.npy");
    bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(parse_err(&bytes).contains("header too large"));
    let mut header = f32_header("(1,)");
    header.insert_str(header.len() - 1, &" ".repeat(100_000));
    let err = parse_err(&npy_bytes(2, &header, &f32s(&[1.0])));
    assert!(
        err.contains("header too large (the header claims 100"),
        "{err}"
    );
}

#[test]
fn rejects_unparsable_header_dict() {
    let cases = [
        "not a dict at all",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} trailing",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}",
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr': 4, 'fortran_order': False, 'shape': (2, 3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -3)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, __import__('os'))}",
        "{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}",
        "(1, 2)",
        "",
    ];
    let data = f32s(&[0.0; 6]);
    for header in cases {
        let err = parse_err(&npy_bytes(1, header, &data));
        assert!(
            err.starts_with("input `t.npy`: unparsable header ("),
            "{header}: {err}"
        );
    }
}

#[test]
fn rejects_deeply_nested_header_without_overflowing_the_stack() {
    let header = format!("{{'descr': {}", "[".repeat(60_000));
    assert!(parse_err(&npy_bytes(1, &header, b"")).contains("nesting too deep"));
}

#[test]
fn rejects_invalid_utf8_in_version_3_header() {
    let mut header = f32_header("(1,)").into_bytes();
    header[2] = 0xff;
    let mut bytes = b"\x93NUMPY\x03\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&f32s(&[1.0]));
    assert!(parse_err(&bytes).contains("not valid UTF-8"));
}

#[test]
fn rejects_data_shorter_than_shape() {
    let bytes = fixture_bytes("f32_2x3.npy");
    let err = parse_err(&bytes[..bytes.len() - 1]);
    assert!(
        err.contains("data shorter than the shape implies (shape [2, 3] of f32 needs 24 bytes, the file has 23)"),
        "{err}"
    );
}

#[test]
fn rejects_data_longer_than_shape() {
    let mut bytes = fixture_bytes("f16_3.npy");
    bytes.extend_from_slice(&[0, 0]);
    let err = parse_err(&bytes);
    assert!(err.contains("data longer than the shape implies"), "{err}");
}

#[test]
fn rejects_shape_product_overflow() {
    let header = f32_header("(4294967296, 4294967296, 4294967296)");
    let err = parse_err(&npy_bytes(1, &header, b""));
    assert!(err.contains("shape product overflows"), "{err}");
    // product fits, bytes do not
    let header = f32_header(&format!("({},)", usize::MAX / 2));
    assert!(parse_err(&npy_bytes(1, &header, b"")).contains("shape product overflows"));
    let header = f32_header("(99999999999999999999999999999,)");
    assert!(parse_err(&npy_bytes(1, &header, b"")).contains("not a valid size"));
}

#[test]
fn rejects_too_many_dimensions() {
    let shape = format!("({})", vec!["1"; 65].join(", "));
    let err = parse_err(&npy_bytes(1, &f32_header(&shape), &f32s(&[1.0])));
    assert!(err.contains("65 dimensions"), "{err}");
}

#[test]
fn huge_shape_with_tiny_file_allocates_nothing() {
    // 2^40 elements claimed, 4 bytes present: rejected before any allocation.
    let err = parse_err(&npy_bytes(
        1,
        &f32_header("(1099511627776,)"),
        &f32s(&[1.0]),
    ));
    assert!(err.contains("data shorter than the shape implies"), "{err}");
}

#[test]
fn errors_without_a_file_name_the_memory_buffer() {
    let err = parse_npy(b"nope").unwrap_err().to_string();
    assert!(err.starts_with("input `<memory>`: bad magic"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// File-system errors

#[test]
fn missing_file() {
    let err = read_npy(Path::new("/nonexistent/dir/q.npy")).unwrap_err();
    assert!(matches!(err, IoError::Read { .. }));
    assert_eq!(
        err.to_string(),
        "input `/nonexistent/dir/q.npy`: file not found"
    );
}

#[test]
fn directory_instead_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_npy(dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "input `{}`: is a directory, not a file",
            dir.path().display()
        )
    );
}

#[test]
fn device_instead_of_file() {
    // Reading /dev/zero would never end.
    let err = read_npy(Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(
        err.starts_with("input `/dev/zero`: not a regular file"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn unreadable_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret.npy");
    fs::write(&path, fixture_bytes("f32_2x3.npy")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&path).is_ok() {
        eprintln!("note: running as root (permissions are not enforced); skipping unreadable_file");
        return;
    }
    let err = read_npy(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("input `{}`: permission denied", path.display())
    );
}

#[test]
fn empty_file_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.npy");
    fs::write(&path, b"").unwrap();
    let err = read_npy(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("input `{}`: empty file", path.display())),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: no input makes the parser panic

fn valid_files() -> Vec<Vec<u8>> {
    ["f32_2x3.npy", "f16_3.npy", "f32_v3.npy", "f32_scalar.npy"]
        .iter()
        .map(|n| fixture_bytes(n))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_npy(&bytes);
    }

    #[test]
    fn random_bytes_after_magic_never_panic(
        version in 0u8..5,
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = b"\x93NUMPY".to_vec();
        bytes.push(version);
        bytes.push(0);
        bytes.extend_from_slice(&rest);
        let _ = parse_npy(&bytes);
    }

    #[test]
    fn mutated_valid_files_never_panic(
        which in 0usize..4,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = valid_files()[which].clone();
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
        if let Ok(t) = parse_npy(&bytes) {
            // Whatever parses is a consistent tensor.
            prop_assert!(t.validate().is_ok());
        }
    }

    #[test]
    fn mutated_headers_never_panic(
        header in "[{}()\\[\\]'\":, a-z0-9<>|LTrueFalsNn_.-]{0,120}",
        data in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let _ = parse_npy(&npy_bytes(1, &header, &data));
        let _ = parse_npy(&npy_bytes(3, &header, &data));
    }
}
