//! Tensor files: `.npy` and safetensors readers, the `.npy` writer, atomic output, seeded normal inputs.
