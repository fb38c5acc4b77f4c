//! Typed buffers: the element types machine code reads, borrowed views of them (what a
//! [`crate::jit::KernelHandle`] checks before entering machine code), owned storage for the
//! plan's temporaries, and the host conversions between them.
//!
//! Kernels read f16/bf16 data in its storage type (the fused attention kernel widens lanes on
//! load), so a half-precision input is not copied to f32 unless a step needs f32.

use attnc_ir::DType;
use half::{bf16, f16};

/// The element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// Raw bytes (packed quantized operands of the int8 attention kernel).
    U8,
}

impl Elem {
    /// The element type that stores `dtype`.
    pub fn of(dtype: DType) -> Elem {
        match dtype {
            // Segment ids reach no compiled kernel (the compiler refuses document masks).
            DType::F32 | DType::I32 => Elem::F32,
            DType::F16 => Elem::F16,
            DType::Bf16 => Elem::Bf16,
        }
    }

    /// The IR type a kernel reads this element as (bytes are packed operands, read as f32
    /// tensors nowhere).
    pub fn dtype(self) -> DType {
        match self {
            Elem::F16 => DType::F16,
            Elem::Bf16 => DType::Bf16,
            Elem::F32 | Elem::U8 => DType::F32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::Bf16 => 2,
            Elem::U8 => 1,
        }
    }

    /// The word used in plans and messages.
    pub fn keyword(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
            Elem::U8 => "u8",
        }
    }
}

/// A borrowed, contiguous buffer in its element type.
#[derive(Clone, Copy, Debug)]
pub enum BufferView<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// Bytes.
    U8(&'a [u8]),
}

impl BufferView<'_> {
    /// The element type.
    pub fn elem(&self) -> Elem {
        match self {
            BufferView::F32(_) => Elem::F32,
            BufferView::F16(_) => Elem::F16,
            BufferView::Bf16(_) => Elem::Bf16,
            BufferView::U8(_) => Elem::U8,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufferView::F32(s) => s.len(),
            BufferView::F16(s) => s.len(),
            BufferView::Bf16(s) => s.len(),
            BufferView::U8(s) => s.len(),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address of the first element (as machine code receives it).
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            BufferView::F32(s) => s.as_ptr().cast(),
            BufferView::F16(s) => s.as_ptr().cast(),
            BufferView::Bf16(s) => s.as_ptr().cast(),
            BufferView::U8(s) => s.as_ptr(),
        }
    }

    /// Element `i` as f32 (exact for every type but `U8`, which reads as its byte value).
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            BufferView::F32(s) => s[i],
            BufferView::F16(s) => s[i].to_f32(),
            BufferView::Bf16(s) => s[i].to_f32(),
            BufferView::U8(s) => f32::from(s[i]),
        }
    }
}

/// An owned buffer (a plan temporary).
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
    /// Bytes.
    U8(Vec<u8>),
}

impl Default for Storage {
    fn default() -> Storage {
        Storage::F32(Vec::new())
    }
}

impl Storage {
    /// A borrowed view.
    pub fn view(&self) -> BufferView<'_> {
        match self {
            Storage::F32(v) => BufferView::F32(v),
            Storage::F16(v) => BufferView::F16(v),
            Storage::Bf16(v) => BufferView::Bf16(v),
            Storage::U8(v) => BufferView::U8(v),
        }
    }
}

/// `src` converted to `to`: f32 → f16/bf16 rounds to nearest even (NaN stays NaN, the same
/// rounding as the interpreter's `cast`, since every source value is exactly an f32);
/// f16/bf16 → f32 is exact. `U8` sources read as byte values; a `U8` target truncates to
/// bytes (no plan converts to it).
pub fn convert(src: BufferView<'_>, to: Elem) -> Storage {
    let n = src.len();
    match (src, to) {
        (BufferView::F32(s), Elem::F32) => Storage::F32(s.to_vec()),
        (BufferView::F16(s), Elem::F16) => Storage::F16(s.to_vec()),
        (BufferView::Bf16(s), Elem::Bf16) => Storage::Bf16(s.to_vec()),
        (_, Elem::F32) => Storage::F32((0..n).map(|i| src.get_f32(i)).collect()),
        (_, Elem::F16) => Storage::F16((0..n).map(|i| f16::from_f32(src.get_f32(i))).collect()),
        (_, Elem::Bf16) => Storage::Bf16((0..n).map(|i| bf16::from_f32(src.get_f32(i))).collect()),
        (_, Elem::U8) => Storage::U8((0..n).map(|i| src.get_f32(i) as u8).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_to_nearest_even_and_widen_exactly() {
        let xs = [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.3,
            f32::NAN,
            65520.0,
            1e-8,
        ];
        let Storage::Bf16(b) = convert(BufferView::F32(&xs), Elem::Bf16) else {
            panic!("bf16 storage expected");
        };
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins.
        assert_eq!(b[1].to_f32(), 1.0);
        assert_eq!(b[2].to_f32(), 1.015625);
        assert!(b[4].is_nan());
        let Storage::F16(h) = convert(BufferView::F32(&xs), Elem::F16) else {
            panic!("f16 storage expected");
        };
        assert_eq!(h[5].to_f32(), f32::INFINITY);
        let back = convert(BufferView::Bf16(&b), Elem::F32);
        let Storage::F32(w) = back else {
            panic!("f32 storage expected");
        };
        assert_eq!(w[0], 1.0);
        assert_eq!(w[3], bf16::from_f32(-3.3).to_f32());
    }

    #[test]
    fn views_report_type_and_length() {
        let s = Storage::U8(vec![1, 2, 3]);
        assert_eq!(s.view().elem(), Elem::U8);
        assert_eq!(s.view().len(), 3);
        assert!(!s.view().is_empty());
        assert_eq!(s.view().get_f32(2), 3.0);
    }
}
