//! The owner of the Cranelift JIT module: compiles functions, frees their memory on drop and hands out typed kernel handles.
