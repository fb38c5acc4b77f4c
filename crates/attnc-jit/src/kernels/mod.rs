//! Kernel generators: each turns one planned step into a Cranelift function.

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod reduce;
