//! The fused, block-sparse online-softmax attention kernel.
