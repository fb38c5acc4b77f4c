//! Binding dimension symbols from input shapes and `--shape` values.
