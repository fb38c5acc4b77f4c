//! bf16 and int8 attention products on AMX tiles: opt-in approximations of the exact
//! attention of [`crate::problem`], validated by their measured error.
//!
//! Both compute one batch entry's [`Call`] with reduced-precision tile products and everything
//! else (score form, masks, online softmax, quantization of P) in f32 on AVX-512. The products
//! are transposed, `Sᵀ = K·Qᵀ` and `Oᵀ = Vᵀ·Pᵀ`: the query rows are the 16 lanes of every
//! vector (the softmax needs no horizontal reduction) and Q and P, which stay the same across a
//! key tile, are the B tiles that stay loaded while K and V stream through the A tiles.
//!
//! - [`Products::Bf16`]: `tdpbf16ps` with f32 sums. Q and P are rounded to bf16; K and V enter
//!   as bf16 pairs `hi + lo` (16 significant bits) unless their inputs are bf16 already: a
//!   second product with the same resident tiles. With every operand rounded, the error on
//!   standard-normal data (d = 64, scale 1/8) is about 3.5e-3; with the pairs it is 2.45e-3
//!   (bound 3e-3). On vectors ([`Unit::Vectors`]) the second product would cost what the f32
//!   kernel does, so K and V are rounded once there (3.5e-3). The row maximum moves only when
//!   a score exceeds it by 2⁸ (rescales are rare), and weights already written in that tile
//!   are rescaled with it.
//! - [`Products::Int8`]: `Sᵀ` on `tdpbssd` with Q and the smoothed K (mean key subtracted, its
//!   effect `scale·q·μ` added back per row — exact under any mask, bias or softcap) in two
//!   signed digits per row / key (`x ≈ s·(hi + lo/254)`, two i32 planes); P quantized to u8
//!   per (row, key tile) against its tile maximum (which maps to 255); V in two signed digits
//!   per (key tile, column); `Oᵀ` on `tdpbsud` (signed V, unsigned P). Error 0.57 % (bound
//!   1 %); with one V digit it would be 0.82 % for about 30 % less time.
//!
//! On a CPU without AMX both kernels run their products on 512-bit vectors ([`Unit::Vectors`])
//! over the same operands: bf16 on `vdpbf16ps` (AVX-512 BF16), the same sums as `tdpbf16ps`
//! in another order of f32 additions; int8 with `Sᵀ` on `vpdpwssd` over 16-bit words of Q
//! and K (two depths per instruction; AVX-512 VNNI) and `Oᵀ` on `vpdpbusd` over the same P
//! and V as the tile unit.
//!
//! Usage: [`pack`] K and V once per batch entry, then [`run`] any rows (split at query-tile
//! boundaries, on any threads: results are bit-identical whatever the split). The caller builds
//! the [`TileTable`](crate::problem::TileTable) at [`QUERY_TILE`] × [`KEY_TILE`]; key tiles not in
//! the table are never touched, partial ones apply the mask element-wise (AVX-512 compares of
//! the 16 rows against intervals of the key), full ones none.
//!
//! Semantics follow [`crate::problem::reference`]: masked scores are replaced, a row that keeps
//! no key gives zeros and a log-sum-exp of `−∞`, a NaN in a kept score makes its row NaN (int8
//! carries a NaN of Q or K in the row's or key's scale, so quantization cannot hide it); a NaN
//! or ∞ in V is taken out before the products and added back to exactly the rows that keep its
//! key. Deviation: an ∞ in Q or K of the int8 products counts as NaN.
//!
//! Cost: on the machine this was built on, a tile load or store (1 KiB) costs about three
//! times a tile product, so the kernels are bound by tile traffic (about 60 loads and stores per
//! 32 × 64 key tile) more than by products, and the AVX-512 softmax slows down while the tile
//! unit runs; the tile work of the next and previous key tiles is issued in small steps between
//! the softmax vectors of the current one. int8 needs more traffic than bf16 (two score planes
//! and fresh i32 tiles per key tile for its per-tile V scales), so it is not faster here.
//!
//! Modules: `tile` (the AMX instructions, each tested against a scalar model), `pack` (tile
//! layouts of K and V), `score` (score form, row state, output), `mask` (element masks),
//! `simd` (AVX-512 helpers), `bf16` and `int8` (the kernels: driver, softmax, tile programs).

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

/// Which unit computes a kernel's products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// The AMX tile unit.
    Tiles,
    /// AVX-512 on vectors: `vdpbf16ps` (bf16), `vpdpwssd` and `vpdpbusd` (int8: 16-bit
    /// score products, the tile unit's P·V).
    Vectors,
}

/// Whether this CPU and process can run `products` on `unit`.
pub fn runs_on(products: Products, unit: Unit) -> bool {
    let f = Features::detect();
    cfg!(target_arch = "x86_64")
        && f.avx512
        && match (products, unit) {
            (Products::Bf16, Unit::Tiles) => f.amx_bf16 && f.avx512_bf16,
            (Products::Bf16, Unit::Vectors) => f.avx512_bf16,
            (Products::Int8, Unit::Tiles) => f.amx_int8,
            (Products::Int8, Unit::Vectors) => f.avx512_vnni,
        }
}

/// The unit [`run`] uses for `products` on this CPU (the tile unit where it has one), if any.
pub fn unit(products: Products) -> Option<Unit> {
    [Unit::Tiles, Unit::Vectors]
        .into_iter()
        .find(|&u| runs_on(products, u))
}

/// Whether this CPU and process can run `products`.
pub fn available(products: Products) -> bool {
    unit(products).is_some()
}

/// K and V of one batch entry in the tile layouts of one [`Products`].
pub struct Packed {
    products: Products,
    unit: Unit,
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
            .field("unit", &self.unit)
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

    /// The unit this was packed for.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// Keys, head dimension and value dimension of the packed call.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.keys, self.d, self.dv)
    }
}

fn unsupported(products: Products) -> CallError {
    CallError::Unsupported(match products {
        Products::Bf16 => "AVX-512 BF16",
        Products::Int8 => "AMX-INT8 or AVX-512 VNNI",
    })
}

/// Packs K and V of `call` for `products` on the unit [`run`] uses (once per batch entry;
/// independent calls may run in parallel). Checks the call first.
pub fn pack(products: Products, call: &Call<'_>) -> Result<Packed, CallError> {
    let unit = unit(products).ok_or_else(|| unsupported(products))?;
    pack_on(products, unit, call)
}

/// [`pack`] for the products on `unit` (an error where this CPU cannot run them there).
pub fn pack_on(products: Products, unit: Unit, call: &Call<'_>) -> Result<Packed, CallError> {
    if !runs_on(products, unit) {
        return Err(unsupported(products));
    }
    let mut none: [f32; 0] = [];
    let nothing = Output {
        o: &mut none,
        row_stride: 0,
        lse: None,
        lse_from_origin: false,
    };
    check(call, &(0..0), &nothing)?;
    #[cfg(target_arch = "x86_64")]
    {
        Ok(Packed {
            products,
            unit,
            keys: call.n(),
            d: call.q.cols,
            dv: call.v.cols,
            data: pack::pack(products, unit, call)?,
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
    let unit = unit(products).ok_or_else(|| unsupported(products))?;
    run_on(products, unit, call, packed, rows, out)
}

/// [`run`] with the products on `unit` (an error where this CPU cannot run them there, or
/// `packed` was packed for another unit).
pub fn run_on(
    products: Products,
    unit: Unit,
    call: &Call<'_>,
    packed: &Packed,
    rows: Range<usize>,
    out: &mut Output<'_>,
) -> Result<(), CallError> {
    if !runs_on(products, unit) {
        return Err(unsupported(products));
    }
    check(call, &rows, out)?;
    let shape = (call.n(), call.q.cols, call.v.cols);
    if (packed.products, packed.unit) != (products, unit) || packed.shape() != shape {
        return Err(CallError::Shape(format!(
            "packed {:?} operands on {:?} of (keys, d, dv) = {:?} do not fit a {products:?} call \
             on {unit:?} of {shape:?}",
            packed.products,
            packed.unit,
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
    if out.lse_from_origin && out.lse.is_some() && call.score.alibi_slope.is_some() {
        // These kernels measure ALiBi distances from each row's own position.
        return Err(CallError::Shape(
            "the AMX kernels write the natural log-sum-exp only, not the one from ALiBi origins"
                .into(),
        ));
    }
    if rows.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `runs_on` checked the instructions (and the AMX permission), `check` every
        // operand and output bound, and the packed data was made by `pack` for these products
        // and this (keys, d, dv); the table's tile sizes are the kernels'.
        unsafe {
            match products {
                Products::Bf16 => bf16::run(call, &packed.data, rows, out, unit == Unit::Vectors),
                Products::Int8 => int8::run(call, &packed.data, rows, out, unit == Unit::Vectors),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(unsupported(products))
    }
}
