//! Register-tiled f32x4 FMA matrix product over the last two axes.
