//! The f64 reference interpreter: the semantics every engine is tested against.
