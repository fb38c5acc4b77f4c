//! Fused block-sparse online-softmax attention: the kernel spec the planner builds from the
//! IR's fused attention op ([`attnc_ir::Attention`]) and code generation
//! ([`define_attention`]).
//!
//! The kernel computes `softmax(mask(score(Q Kᵀ))) V` without materializing the `m × n` score
//! matrix: for each query row it keeps a running maximum `m_i`, a running sum `l_i` and an
//! accumulator of width `dv` (rescaled only when the maximum grows), visits only the key tiles
//! the mask pattern reaches (classified at compile time by [`crate::tiles`]), evaluates element
//! masks only on partial tiles and finally writes `acc / l_i` (zeros for a fully masked row).
//! Query tiles of [`QUERY_TILE`] rows share every K and V load; key tiles hold [`KEY_TILE`]
//! keys.
//!
//! Q, K, V and the biases are read through [`TensorRef`]s: kernel inputs in their storage
//! types (f16/bf16 widened on load) or buffers earlier steps computed; K and V may broadcast
//! over leading axes (MQA/GQA). [`Precision::Int8`] selects the kernel of [`int8`] on operands
//! packed by [`quant`].

mod define;
mod exact;
pub mod int8;
mod int8_ops;
mod mask;
pub mod quant;
mod score;
mod skeleton;
mod spec;

pub use define::{define_attention, define_attention_with};
pub use skeleton::{Codegen, DefinedAttention};
pub use spec::{
    contains_dilated, AttentionSpec, Precision, ScoreExpr, TensorRef, KEY_TILE, QUERY_TILE,
};
