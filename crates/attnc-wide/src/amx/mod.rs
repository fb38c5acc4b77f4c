//! bf16 and int8 attention products on AMX tiles: opt-in approximations of the exact
//! attention of [`crate::problem`], validated by their measured error.
//!
//! Both compute one batch entry's [`Call`] with reduced-precision products and everything else
//! (score form, masks, online softmax) in f32 on AVX-512:
//!
//! - [`Products::Bf16`]: `Q·Kᵀ` and `P·V` on `tdpbf16ps` with f32 sums; P rounded to bf16.
//!   f32 and f16 Q/K enter as bf16 pairs (`hi + lo`, three products), V as one bf16 (or a pair
//!   when [`pack`] is asked for the V split — see [`bf16`]). Relative L2 error about 2e-3 on
//!   standard-normal data at d = 64 (bound 3e-3).
//! - [`Products::Int8`]: `Q·Kᵀ` on `tdpbssd` with Q and the smoothed K (mean key subtracted,
//!   its effect added back per row) in two signed digits per row/key; P quantized to u8 per
//!   (row, key tile) against its tile maximum, V in signed digits per (key tile, column);
//!   `P·V` on `tdpbusd`. Relative L2 error about 0.6 % (bound 1 %).
//!
//! Usage: [`pack`] K and V once per batch entry, then [`run`] any rows (split at query-tile
//! boundaries, on any threads: results are bit-identical whatever the split). The caller builds
//! the [`TileTable`](crate::problem::TileTable) at [`QUERY_TILE`] × [`KEY_TILE`]; key tiles not in
//! the table are never touched, partial ones apply the mask element-wise (AVX-512 compares),
//! full ones none.
//!
//! Semantics follow [`crate::problem::reference`]: masked scores are replaced, a row that keeps
//! no key gives zeros and a log-sum-exp of `−∞`, a NaN in a kept score makes its row NaN (the
//! packing finds NaN before quantization can hide it; a NaN or ∞ in V reaches exactly the rows
//! that keep its key). Deviation: an ∞ in Q or K of the int8 products counts as NaN.
//!
//! Layouts: [`pack`] (module `pack`) documents the tile layouts; module `tile` the AMX
//! instructions and their scalar models (tested).

use std::ops::Range;

use crate::cpu::Features;
use crate::problem::{check, Call, CallError, Output};

#[cfg(target_arch = "x86_64")]
mod bf16;
#[cfg(target_arch = "x86_64")]
mod int8;
#[cfg(target_arch = "x86_64")]
mod mask;
#[cfg(target_arch = "x86_64")]
mod pack;
#[cfg(target_arch = "x86_64")]
mod score;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod tile;

/// Which reduced-precision products a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Products {
    /// bf16 operands, f32 sums (`tdpbf16ps`).
    Bf16,
    /// int8 operands, i32 sums (`tdpbssd`, `tdpbusd`).
    Int8,
}

/// Rows per query tile: two AMX tiles of 16 rows.
pub const QUERY_TILE: usize = 32;
/// Keys per key tile: one `tdpbusd` reduction (64 bytes) or two of `tdpbf16ps`.
pub const KEY_TILE: usize = 64;

/// Whether this CPU and process can run `products`.
pub fn available(products: Products) -> bool {
    let f = Features::detect();
    cfg!(target_arch = "x86_64")
        && f.avx512
        && match products {
            Products::Bf16 => f.amx_bf16 && f.avx512_bf16,
            Products::Int8 => f.amx_int8,
        }
}

/// K and V of one batch entry in the tile layouts of one [`Products`].
pub struct Packed {
    products: Products,
    keys: usize,
    d: usize,
    dv: usize,
    #[cfg(target_arch = "x86_64")]
    data: pack::Data,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("products", &self.products)
            .field("keys", &self.keys)
            .field("d", &self.d)
            .field("dv", &self.dv)
            .finish()
    }
}

impl Packed {
    /// The products this was packed for.
    pub fn products(&self) -> Products {
        self.products
    }

    /// Keys, head dimension and value dimension of the packed call.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.keys, self.d, self.dv)
    }
}

fn unsupported(products: Products) -> CallError {
    CallError::Unsupported(match products {
        Products::Bf16 => "AMX-BF16 with AVX-512 BF16",
        Products::Int8 => "AMX-INT8 with AVX-512",
    })
}

/// Packs K and V of `call` for `products` (once per batch entry; independent calls may run in
/// parallel). Checks the call first.
pub fn pack(products: Products, call: &Call<'_>) -> Result<Packed, CallError> {
    if !available(products) {
        return Err(unsupported(products));
    }
    let mut none: [f32; 0] = [];
    let nothing = Output {
        o: &mut none,
        row_stride: 0,
        lse: None,
    };
    check(call, &(0..0), &nothing)?;
    #[cfg(target_arch = "x86_64")]
    {
        Ok(Packed {
            products,
            keys: call.n(),
            d: call.q.cols,
            dv: call.v.cols,
            data: pack::pack(products, call)?,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(unsupported(products))
    }
}

/// Rows `rows` of `call` with K and V from `packed` (Q is converted per query tile inside),
/// written to `out` as [`Output`] describes. `rows.start` is a multiple of [`QUERY_TILE`].
pub fn run(
    products: Products,
    call: &Call<'_>,
    packed: &Packed,
    rows: Range<usize>,
    out: &mut Output<'_>,
) -> Result<(), CallError> {
    if !available(products) {
        return Err(unsupported(products));
    }
    check(call, &rows, out)?;
    let shape = (call.n(), call.q.cols, call.v.cols);
    if packed.products != products || packed.shape() != shape {
        return Err(CallError::Shape(format!(
            "packed {:?} operands of (keys, d, dv) = {:?} do not fit a {products:?} call of {shape:?}",
            packed.products,
            packed.shape(),
        )));
    }
    let t = call.tiles;
    if (t.query_tile, t.key_tile) != (QUERY_TILE, KEY_TILE) {
        return Err(CallError::Shape(format!(
            "the tile table is {} × {}, the AMX kernels need {QUERY_TILE} × {KEY_TILE}",
            t.query_tile, t.key_tile
        )));
    }
    if rows.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `available` checked the instructions (and the AMX permission), `check` every
        // operand and output bound, and the packed data was made by `pack` for these products
        // and this (keys, d, dv); the table's tile sizes are the kernels'.
        unsafe {
            match products {
                Products::Bf16 => bf16::run(call, &packed.data, rows, out),
                Products::Int8 => int8::run(call, &packed.data, rows, out),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(unsupported(products))
    }
}
