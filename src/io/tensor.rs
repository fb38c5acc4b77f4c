//! An owned, row-major (C-order) tensor of f32, f16 or bf16 elements, as read from a file.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use super::error::IoError;

/// Element types of tensors: the language's own (`f32`, `f16`, `bf16`).
pub use attnc_ir::DType;

/// Bytes per element of `dtype`.
pub fn element_size(dtype: DType) -> usize {
    match dtype {
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::Bf16 => 2,
    }
}

/// The elements of a [`Tensor`], in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
    /// i32 elements (segment ids).
    I32(Vec<i32>),
}

impl TensorData {
    /// `values` stored as `dtype` (rounded to nearest even for f16 and bf16).
    pub fn from_f32_as(values: Vec<f32>, dtype: DType) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(values),
            DType::F16 => TensorData::F16(values.into_iter().map(f16::from_f32).collect()),
            DType::Bf16 => TensorData::Bf16(values.into_iter().map(bf16::from_f32).collect()),
            // Saturating and truncating toward zero, as `as` does: ids are integers already.
            DType::I32 => TensorData::I32(values.into_iter().map(|x| x as i32).collect()),
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
            TensorData::I32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::Bf16(_) => DType::Bf16,
            TensorData::I32(_) => DType::I32,
        }
    }
}

/// A tensor: a shape and its elements in row-major (C) order.
///
/// The constructors check that the number of elements equals the product of the shape (with
/// overflow-checked arithmetic); the fields are public, so code that builds a `Tensor` by hand
/// can call [`Tensor::validate`] to check the same.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The extent of each dimension; empty for a scalar (which has one element).
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: TensorData,
}

/// The number of elements of `shape` (1 for a scalar), or `None` if the product overflows `usize`.
pub fn shape_product(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Formats a shape as `[2, 3]`.
pub(crate) fn format_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl Tensor {
    /// A tensor from a shape and its row-major elements; fails if the element count is not the
    /// product of the shape or the product overflows.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, IoError> {
        let t = Tensor { shape, data };
        t.validate()?;
        Ok(t)
    }

    /// A f32 tensor; see [`Tensor::new`].
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, IoError> {
        Tensor::new(shape, TensorData::F32(data))
    }

    /// A f16 tensor; see [`Tensor::new`].
    pub fn from_f16(shape: Vec<usize>, data: Vec<f16>) -> Result<Tensor, IoError> {
        Tensor::new(shape, TensorData::F16(data))
    }

    /// A bf16 tensor; see [`Tensor::new`].
    pub fn from_bf16(shape: Vec<usize>, data: Vec<bf16>) -> Result<Tensor, IoError> {
        Tensor::new(shape, TensorData::Bf16(data))
    }

    /// A f32 tensor with the shape and (logical, row-major) elements of `array`, whatever its
    /// memory layout.
    pub fn from_f32_array(array: &ArrayD<f32>) -> Tensor {
        Tensor {
            shape: array.shape().to_vec(),
            data: TensorData::F32(array.iter().copied().collect()),
        }
    }

    /// A tensor of element type `dtype` with the shape and elements of `array`, each rounded once
    /// (to nearest, ties to even) to `dtype`.
    pub fn from_f64_array(array: &ArrayD<f64>, dtype: DType) -> Tensor {
        let data = match dtype {
            DType::F32 => TensorData::F32(array.iter().map(|&x| x as f32).collect()),
            DType::F16 => TensorData::F16(array.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::Bf16 => TensorData::Bf16(array.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::I32 => TensorData::I32(array.iter().map(|&x| x as i32).collect()),
        };
        Tensor {
            shape: array.shape().to_vec(),
            data,
        }
    }

    /// Checks that the number of elements is the product of the shape.
    pub fn validate(&self) -> Result<(), IoError> {
        let expected = shape_product(&self.shape).ok_or_else(|| {
            IoError::invalid_tensor(
                "shape product overflows",
                format!("shape {}", format_shape(&self.shape)),
            )
        })?;
        if expected != self.data.len() {
            return Err(IoError::invalid_tensor(
                "element count does not match the shape",
                format!(
                    "shape {} needs {expected} elements, got {}",
                    format_shape(&self.shape),
                    self.data.len()
                ),
            ));
        }
        Ok(())
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The element type's name in attnc's language: `f32`, `f16` or `bf16`.
    pub fn dtype_name(&self) -> &'static str {
        self.dtype().keyword()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements (some dimension is 0).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements widened (exactly) to f32, row-major.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The elements widened (exactly) to f64, row-major.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::Bf16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }

    /// The tensor as an `ndarray` array of f64 (every f32/f16/bf16 value is exact in f64).
    ///
    /// Never panics: if the public fields were set by hand to disagree (see
    /// [`Tensor::validate`]), the result is the elements as a one-dimensional array; use
    /// [`Tensor::try_to_f64_array`] to get an error instead.
    pub fn to_f64_array(&self) -> ArrayD<f64> {
        self.try_to_f64_array()
            .unwrap_or_else(|_| one_dimensional(self.to_f64_vec()))
    }

    /// The tensor as an `ndarray` array of f64, or an error if the shape and the element count
    /// disagree.
    pub fn try_to_f64_array(&self) -> Result<ArrayD<f64>, IoError> {
        self.validate()?;
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_f64_vec()).map_err(|e| {
            IoError::invalid_tensor(
                "cannot build an array",
                format!("shape {}: {e}", format_shape(&self.shape)),
            )
        })
    }

    /// The tensor as an `ndarray` array of f32; like [`Tensor::to_f64_array`], a tensor whose
    /// fields disagree comes back one-dimensional.
    pub fn to_f32_array(&self) -> ArrayD<f32> {
        self.try_to_f32_array()
            .unwrap_or_else(|_| one_dimensional(self.to_f32_vec()))
    }

    /// The tensor as an `ndarray` array of f32, or an error if the shape and the element count
    /// disagree.
    pub fn try_to_f32_array(&self) -> Result<ArrayD<f32>, IoError> {
        self.validate()?;
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_f32_vec()).map_err(|e| {
            IoError::invalid_tensor(
                "cannot build an array",
                format!("shape {}: {e}", format_shape(&self.shape)),
            )
        })
    }
}

fn one_dimensional<T>(values: Vec<T>) -> ArrayD<T> {
    ndarray::Array1::from(values).into_dyn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_element_count() {
        assert!(Tensor::from_f32(vec![2, 3], vec![0.0; 6]).is_ok());
        let err = Tensor::from_f32(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor: element count does not match the shape (shape [2, 3] needs 6 elements, got 5)"
        );
        assert!(Tensor::from_f32(vec![], vec![1.0]).is_ok());
        assert!(Tensor::from_f32(vec![0, 7], vec![]).is_ok());
    }

    #[test]
    fn new_checks_overflow() {
        let err = Tensor::from_f32(vec![usize::MAX, 2], vec![]).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // A zero extent makes the product 0, even next to huge extents.
        assert_eq!(shape_product(&[usize::MAX, 0]), Some(0));
    }

    #[test]
    fn conversions() {
        let t = Tensor::from_f16(vec![2], vec![f16::from_f32(1.5), f16::from_f32(-0.25)]).unwrap();
        assert_eq!(t.dtype_name(), "f16");
        assert_eq!(t.to_f32_vec(), vec![1.5, -0.25]);
        let a = t.to_f64_array();
        assert_eq!(a.shape(), &[2]);
        assert_eq!(a[[1]], -0.25);

        let b = Tensor::from_bf16(vec![1, 1], vec![bf16::from_f32(3.0)]).unwrap();
        assert_eq!(b.dtype(), DType::Bf16);
        assert_eq!(b.to_f64_array()[[0, 0]], 3.0);

        let arr = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let transposed = arr.t().to_owned();
        let t = Tensor::from_f64_array(&transposed, DType::F32);
        assert_eq!(t.to_f32_vec(), vec![1.0, 3.0, 2.0, 4.0]);
        let h = Tensor::from_f64_array(&arr, DType::F16);
        assert_eq!(h.dtype(), DType::F16);
        assert_eq!(h.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn hand_built_mismatch_is_an_error_not_a_panic() {
        let t = Tensor {
            shape: vec![3],
            data: TensorData::F32(vec![1.0]),
        };
        assert!(t.try_to_f64_array().is_err());
        assert!(t.try_to_f32_array().is_err());
        assert_eq!(t.to_f64_array().shape(), &[1]);
        assert_eq!(t.to_f32_array().shape(), &[1]);
    }
}
