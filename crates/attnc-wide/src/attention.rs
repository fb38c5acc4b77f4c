//! f32 flash attention on AVX-512 (being built).
