//! Lowering an IR graph at bound shapes to a list of kernels over buffers.
