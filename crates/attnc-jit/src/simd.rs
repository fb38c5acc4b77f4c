//! Vector math emitted inline as f32x4 Cranelift instructions: exp with range reduction and the functions built on it.
