//! Python arrays as the JIT's input views: borrowed when they can be, copied when they must.
//!
//! A float32 or float16 NumPy array in the parameter's declared type, C-contiguous and aligned,
//! is read in place (no copy): the kernel gets a slice of the array's own memory, held by a
//! read-only borrow (rust-numpy's borrow flags) and a reference to the array for as long as
//! the call runs. bfloat16 data arrives as the raw 16-bit patterns in a `uint16` array (the
//! Python side views torch and `ml_dtypes` bfloat16 data that way) and is reinterpreted in
//! place too. Everything else — other strides (Fortran order, slices, negative or zero
//! strides), misaligned data, another float type than the declared one — is copied into a
//! fresh buffer in the declared type, in logical (row-major) order, rounding to nearest-even
//! exactly as `attnc run` stores an `.npy` input of another type. A copy is refused before it
//! is made when it would not fit in the memory available, so a huge broadcast view raises
//! instead of aborting the interpreter.
//!
//! As with NumPy's own functions that release the interpreter lock, another Python thread
//! writing into an input array during a call races with the kernel's reads: the values read
//! are unspecified, but memory stays intact, since the array is referenced (it cannot be
//! resized or freed) until the call returns.

use crate::errors::input_error;
use attnc::io::{element_size, DType};
use attnc_jit::Input;
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// One input held for the length of a call.
pub enum Staged<'py> {
    /// float32 data read in place.
    F32(PyReadonlyArrayDyn<'py, f32>),
    /// float16 data read in place.
    F16(PyReadonlyArrayDyn<'py, f16>),
    /// bfloat16 bit patterns read in place.
    Bf16(PyReadonlyArrayDyn<'py, u16>),
    /// A copy in the declared type.
    OwnedF32(Vec<f32>),
    /// A copy in the declared type.
    OwnedF16(Vec<f16>),
    /// A copy in the declared type.
    OwnedBf16(Vec<bf16>),
}

/// An input with its shape.
pub struct StagedInput<'py> {
    /// The input's shape.
    pub shape: Vec<usize>,
    /// Its elements, held.
    pub data: Staged<'py>,
    /// Whether the elements were copied.
    pub copied: bool,
}

impl StagedInput<'_> {
    /// The view the JIT reads. Borrowed arrays were checked contiguous and aligned when staged.
    pub fn input(&self) -> Input<'_> {
        match &self.data {
            Staged::F32(a) => Input::F32(a.as_slice().unwrap_or(&[])),
            Staged::F16(a) => Input::F16(a.as_slice().unwrap_or(&[])),
            Staged::Bf16(a) => Input::Bf16(a.as_slice().unwrap_or(&[]).reinterpret_cast()),
            Staged::OwnedF32(v) => Input::F32(v),
            Staged::OwnedF16(v) => Input::F16(v),
            Staged::OwnedBf16(v) => Input::Bf16(v),
        }
    }
}

/// A float array of one of the three storage types, as the caller gave it.
pub enum Given<'py> {
    /// float32.
    F32(Bound<'py, PyArrayDyn<f32>>),
    /// float16.
    F16(Bound<'py, PyArrayDyn<f16>>),
    /// bfloat16 bit patterns.
    Bf16(Bound<'py, PyArrayDyn<u16>>),
}

impl<'py> Given<'py> {
    /// An array of float32 or float16 elements, else `None`.
    pub fn float(object: &Bound<'py, PyAny>) -> Option<Given<'py>> {
        if let Ok(a) = object.cast::<PyArrayDyn<f32>>() {
            return Some(Given::F32(a.clone()));
        }
        if let Ok(a) = object.cast::<PyArrayDyn<f16>>() {
            return Some(Given::F16(a.clone()));
        }
        None
    }

    /// A `uint16` array read as bfloat16 bit patterns, else `None`.
    pub fn bf16_bits(object: &Bound<'py, PyAny>) -> Option<Given<'py>> {
        object
            .cast::<PyArrayDyn<u16>>()
            .ok()
            .map(|a| Given::Bf16(a.clone()))
    }

    fn dtype(&self) -> DType {
        match self {
            Given::F32(_) => DType::F32,
            Given::F16(_) => DType::F16,
            Given::Bf16(_) => DType::Bf16,
        }
    }

    fn is_c_contiguous(&self) -> bool {
        match self {
            Given::F32(a) => a.is_c_contiguous(),
            Given::F16(a) => a.is_c_contiguous(),
            Given::Bf16(a) => a.is_c_contiguous(),
        }
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Given::F32(a) => a.shape().to_vec(),
            Given::F16(a) => a.shape().to_vec(),
            Given::Bf16(a) => a.shape().to_vec(),
        }
    }
}

/// Holds `given` for parameter `name` of declared type `declared`: in place when it is of that
/// type, contiguous and aligned, else copied into that type.
pub fn stage<'py>(
    py: Python<'py>,
    name: &str,
    declared: DType,
    given: Given<'py>,
) -> PyResult<StagedInput<'py>> {
    let shape = given.shape();
    let busy = |e: numpy::BorrowError| {
        input_error(
            py,
            Some(name),
            None,
            format!("input `{name}`: the array is being written by other code ({e})"),
        )
    };
    // Segment ids (i32 parameters) are not staged from Python yet.
    if declared == DType::I32 {
        return Err(input_error(
            py,
            Some(name),
            None,
            format!("input `{name}`: i32 segment ids are not accepted from Python yet; use the attnc command line"),
        ));
    }
    // `as_slice` accepts Fortran order too; only row-major memory is the logical order.
    if given.dtype() == declared && given.is_c_contiguous() {
        let data = match &given {
            Given::F32(a) => {
                let r = a.try_readonly().map_err(busy)?;
                r.as_slice().is_ok().then_some(Staged::F32(r))
            }
            Given::F16(a) => {
                let r = a.try_readonly().map_err(busy)?;
                r.as_slice().is_ok().then_some(Staged::F16(r))
            }
            Given::Bf16(a) => {
                let r = a.try_readonly().map_err(busy)?;
                r.as_slice().is_ok().then_some(Staged::Bf16(r))
            }
        };
        if let Some(data) = data {
            return Ok(StagedInput {
                shape,
                data,
                copied: false,
            });
        }
    }
    let len = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            input_error(
                py,
                Some(name),
                None,
                format!("input `{name}`: shape {shape:?} has too many elements"),
            )
        })?;
    check_copy_fits(py, name, &shape, len, declared)?;
    let values = widen(&given, len).map_err(busy)?;
    let data = match declared {
        DType::F32 => Staged::OwnedF32(values),
        DType::F16 => Staged::OwnedF16(values.into_iter().map(f16::from_f32).collect()),
        DType::Bf16 => Staged::OwnedBf16(values.into_iter().map(bf16::from_f32).collect()),
        // Refused above.
        DType::I32 => Staged::OwnedF32(values),
    };
    Ok(StagedInput {
        shape,
        data,
        copied: true,
    })
}

/// The elements of `given` in logical order, widened exactly to f32.
fn widen(given: &Given<'_>, len: usize) -> Result<Vec<f32>, numpy::BorrowError> {
    let mut out = Vec::with_capacity(len);
    match given {
        Given::F32(a) => out.extend(a.try_readonly()?.as_array().iter().copied()),
        Given::F16(a) => out.extend(a.try_readonly()?.as_array().iter().map(|x| x.to_f32())),
        Given::Bf16(a) => out.extend(
            a.try_readonly()?
                .as_array()
                .iter()
                .map(|&x| bf16::from_bits(x).to_f32()),
        ),
    }
    Ok(out)
}

/// Refuses a copy of `len` elements (an f32 staging buffer plus the declared type) that the
/// memory available cannot hold.
fn check_copy_fits(
    py: Python<'_>,
    name: &str,
    shape: &[usize],
    len: usize,
    declared: DType,
) -> PyResult<()> {
    let per_element = 4 + if declared == DType::F32 {
        0
    } else {
        element_size(declared)
    };
    let bytes = (len as u64).saturating_mul(per_element as u64);
    let available = crate::program::available_memory().unwrap_or(u64::MAX);
    if bytes > available || len > isize::MAX as usize / per_element {
        return Err(input_error(
            py,
            Some(name),
            None,
            format!(
                "input `{name}`: copying its {} elements (shape {shape:?}, not contiguous or \
                 not {}) needs {} but {} are available",
                len,
                declared.keyword(),
                attnc::compiler::format_bytes(bytes),
                attnc::compiler::format_bytes(available)
            ),
        ));
    }
    Ok(())
}
