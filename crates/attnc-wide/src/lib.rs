//! Full-width CPU kernels: the arithmetic tier under attnc's JIT.
//!
//! Cranelift lowers no vector wider than 128 bits on x86-64, so the compiler keeps deciding and
//! specializing (tile tables from the pattern algebra, score forms, shapes) while the tile
//! products and online-softmax epilogues of the common score forms run here, on 512-bit
//! vectors (AVX-512) and on AMX tiles, dispatched at run time by CPU features.
//!
//! - [`cpu`]: which tiers this CPU has, and the one-time AMX permission request;
//! - [`problem`]: what one attention call computes (operands, score form, mask, tile table)
//!   and its scalar reference;
//! - [`attention`]: f32 flash attention on AVX-512 (block-sparse, tile tables given by the
//!   caller);
//! - [`amx`]: bf16 and int8 attention products on AMX tiles (approximate tiers);
//! - [`backward`]: the gradients of one attention call (FlashAttention-2 from the saved
//!   output and log-sum-exp), block-sparse by the same tile tables, portable and AVX-512;
//! - [`features`]: linear attention's feature maps (`elu(x) + 1`, and any elementwise map as a
//!   [`features::program::Program`]) on 16 lanes;
//! - [`reduce`]: sums, means and maxima of contiguous rows on 16 lanes;
//! - [`pages`]: large zeroed buffers on transparent huge pages (fewer page faults);
//! - [`gemm`]: plain f32 matrix products (through the `gemm` crate), bounds-checked;
//! - [`flush`]: flush-to-zero for the span of a kernel (no subnormal results);
//! - [`peak`]: the measured 512-bit FMA peak benchmarks report against;
//! - [`portable`]: the same attention in plain Rust on any CPU, for the calls whose tile
//!   tables come from data (the 128-bit generated kernels compile static masks only).
//!
//! Every kernel here is tested against a plain scalar reference; the 128-bit Cranelift kernels
//! of `attnc-jit` remain the portable path.
#![warn(missing_docs)]

pub mod amx;
pub mod attention;
pub mod backward;
pub mod cpu;
pub mod features;
pub mod flush;
pub mod gemm;
mod ieee;
pub mod pages;
pub mod peak;
pub mod portable;
pub mod problem;
pub mod reduce;
