//! Tensor files: `.npy` and safetensors readers, the `.npy` writer, atomic output, seeded normal
//! inputs.
//!
//! Everything here is defensive: no input, however malformed, makes a reader panic, allocate
//! more than the file's size, or load a pickle; every error is an [`IoError`] whose message names
//! the file. Outputs are written atomically ([`write_atomically`]), so a failed or interrupted
//! write never leaves a partial file.
//!
//! - [`Tensor`] / [`TensorData`] / [`DType`]: an owned row-major f32, f16 or bf16 tensor.
//! - [`read_npy`], [`parse_npy`], [`write_npy`], [`encode_npy`]: NumPy `.npy` (format 1.0, 2.0,
//!   3.0; little-endian float32 `<f4`, float16 `<f2` and int32 `<i4`).
//! - [`read_safetensors`], [`parse_safetensors`]: safetensors files of F32, F16 and BF16 tensors.
//! - [`write_atomically`], [`write_atomically_with`], [`remove_pending_temp_files`].
//! - [`standard_normal`]: reproducible standard-normal inputs for `--random SEED`;
//!   [`standard_normal_streams`] draws several streams in parallel.

pub mod atomic;
pub mod error;
pub mod file;
pub mod normal;
pub mod npy;
pub mod safetensors_io;
pub mod tensor;

pub use atomic::{remove_pending_temp_files, write_atomically, write_atomically_with};
pub use attnc_ir::random::{standard_normal, Rng};
pub use error::{FileFormat, IoError};
pub use file::{read_bounded, read_input_file, read_small_text};
pub use normal::{standard_normal_streams, NormalStream};
pub use npy::{encode_npy, parse_npy, parse_npy_from, read_npy, write_npy};
pub use safetensors_io::{parse_safetensors, parse_safetensors_from, read_safetensors};
pub use tensor::{element_size, shape_product, DType, Tensor, TensorData};
