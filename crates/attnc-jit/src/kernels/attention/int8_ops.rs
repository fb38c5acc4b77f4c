//! The integer and bit-level arithmetic of the int8 attention kernel: `u8 · i8` dot products
//! in the form Cranelift folds into `vpdpbusd`, byte shuffles, exact small-integer
//! conversions and a degree-3 `2^x` with the exponent added as an integer — each chosen for
//! the execution ports it leaves to the dot products (see [`super::int8`]).

use super::quant::KEY_BLOCK;
use crate::simd::{as_float, as_int, const_f32x4, const_i32x4, lanes, select_f32};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{I32X4, I8X16};
use cranelift_codegen::ir::{ConstantData, InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// `acc + dot4(a, u)`: lane `l` adds `Σ_t a[4l+t] · u[4l+t]` with `a` signed and `u` unsigned
/// bytes (i8x16 both), exactly (products fit i16, sums wrap like the instruction's).
///
/// This is the tree Cranelift's x64 backend folds into one `vpdpbusd` when the ISA has
/// AVX-VNNI (or AVX512-VNNI); instruction selection matches it, so it folds with the mid-end
/// optimizer off too. Without VNNI it lowers to widening multiplies and pairwise adds.
pub(super) fn dot_u8i8(b: &mut FunctionBuilder, a: Value, u: Value, acc: Value) -> Value {
    let al = b.ins().swiden_low(a);
    let ul = b.ins().uwiden_low(u);
    let lo = b.ins().imul(al, ul);
    let ah = b.ins().swiden_high(a);
    let uh = b.ins().uwiden_high(u);
    let hi = b.ins().imul(ah, uh);
    let lo0 = b.ins().swiden_low(lo);
    let lo1 = b.ins().swiden_high(lo);
    let x = b.ins().iadd_pairwise(lo0, lo1);
    let hi0 = b.ins().swiden_low(hi);
    let hi1 = b.ins().swiden_high(hi);
    let y = b.ins().iadd_pairwise(hi0, hi1);
    let s = b.ins().iadd_pairwise(x, y);
    b.ins().iadd(s, acc)
}

/// The sum of the four lanes `(x0 + x1) + (x2 + x3)`, as a scalar.
pub(super) fn hsum(b: &mut FunctionBuilder, v: Value) -> Value {
    let x: Vec<Value> = (0..4).map(|l| b.ins().extractlane(v, l as u8)).collect();
    let s01 = b.ins().fadd(x[0], x[1]);
    let s23 = b.ins().fadd(x[2], x[3]);
    b.ins().fadd(s01, s23)
}

/// The low byte of each 32-bit lane of `x`, all four in every lane (`[b0 b1 b2 b3] × 4`):
/// one `pshufb`.
pub(super) fn low_bytes_broadcast(b: &mut FunctionBuilder, x: Value) -> Value {
    let flags = lanes();
    let xb = b.ins().bitcast(I8X16, flags, x);
    let sel: Vec<u8> = (0..16).map(|k| 4 * (k % 4)).collect();
    let imm = b.func.dfg.immediates.push(ConstantData::from(sel));
    b.ins().shuffle(xb, xb, imm)
}

/// Each i32 lane of `x` shifted left by 8 bits, as a byte shuffle: on x86-64 one `pshufb`
/// (mask bytes with the high bit set give 0), which unlike a vector shift does not compete
/// with `vpdpbusd` for execution ports.
pub(super) fn shift_lanes_left_8(b: &mut FunctionBuilder, x: Value) -> Value {
    let flags = lanes();
    let xb = b.ins().bitcast(I8X16, flags, x);
    let r = if cfg!(target_arch = "x86_64") {
        // Byte 4l + t takes byte 4l + t - 1 for t > 0; 0x80 clears byte 4l.
        let sel: Vec<u8> = (0..16u8)
            .map(|k| if k % 4 == 0 { 0x80 } else { k - 1 })
            .collect();
        let c = b.func.dfg.constants.insert(ConstantData::from(sel));
        let mask = b.ins().vconst(I8X16, c);
        b.ins().x86_pshufb(xb, mask)
    } else {
        return b.ins().ishl_imm_u(x, 8);
    };
    b.ins().bitcast(I32X4, flags, r)
}

/// Largest `|A|` of a P·V accumulator: `KEY_BLOCK` products of `P ≤ 255` and `|V| ≤ 127`.
pub(super) const PV_SUM_BOUND: usize = KEY_BLOCK * 255 * 127;
const _: () = assert!(
    PV_SUM_BOUND < 1 << 22,
    "P·V sums must convert by the MAGIC trick"
);

/// `f32(a)` for i32 lanes with `|a| < 2^22` (the P·V sums, [`PV_SUM_BOUND`]), exactly: `a`
/// added to the bits of [`MAGIC`] as an integer, then `MAGIC` subtracted. An integer and a
/// float addition, which unlike `cvtdq2ps` do not compete with `vpdpbusd` for ports.
pub(super) fn small_int_to_f32(b: &mut FunctionBuilder, a: Value) -> Value {
    let magic_bits = const_i32x4(b, [MAGIC.to_bits() as i32; 4]);
    let x = b.ins().iadd(a, magic_bits);
    let x = as_float(b, x);
    let magic = const_f32x4(b, MAGIC);
    b.ins().fsub(x, magic)
}

/// The lane-wise maximum `x < y ? y : x`, the form x86-64 lowers to one `maxps` (a NaN in
/// `x` is kept, one in `y` dropped; either way the row's result is NaN-tainted garbage).
pub(super) fn lane_max(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    let less = b.ins().fcmp(FloatCC::LessThan, x, y);
    select_f32(b, less, y, x)
}

/// `2^f` on `[-1/2, 1/2]` to 7.5e-5 relative: a degree-3 polynomial fitted to the relative
/// error (coefficients of `f³, f², f, 1`). P is rounded to 8 bits next, and every factor it
/// contributes to O also scales `l`, so this accuracy is plenty; one FMA fewer than the
/// degree-4 Taylor polynomial. (Degree 2, at 1.7e-3, raised the kernel's error on
/// standard-normal inputs from 0.959 % to 0.976 %: too close to the default tolerance.)
pub(super) const EXP2_POLY: [f32; 4] = [0.055_171_62, 0.242_611_17, 0.693_261, 0.999_928_06];

/// Constants of [`exp2_nonpos_fast`] (and of P's rounding), materialized once per block so
/// that the softmax loop does not reload them.
pub(super) struct ExpConsts {
    low: Value,
    pub(super) magic: Value,
    /// [`EXP2_POLY`] times the result's scale.
    poly: [Value; 4],
}

/// `1.5 · 2^23`: adding it to a float of magnitude below `2^22` rounds to an integer (ties
/// to even) and leaves that integer in the low mantissa bits, since its own low 22 bits are 0.
pub(super) const MAGIC: f32 = 12_582_912.0;

/// The least `t` [`exp2_nonpos_fast`] evaluates: `2^-125` times the polynomial is still a
/// normal f32 (no slow subnormal arithmetic), and far below anything 8-bit P resolves.
pub(super) const EXP2_FLOOR: f32 = -125.0;

impl ExpConsts {
    /// The constants of `scale · 2^t`, `scale ≥ 1`: the exponent field of `scale · 2^f` is
    /// then at least 126, so adding `k ≥ -125` leaves a normal number.
    pub(super) fn new(b: &mut FunctionBuilder, scale: f32) -> ExpConsts {
        debug_assert!(scale >= 1.0);
        ExpConsts {
            low: const_f32x4(b, EXP2_FLOOR),
            magic: const_f32x4(b, MAGIC),
            poly: EXP2_POLY.map(|c| const_f32x4(b, c * scale)),
        }
    }
}

/// `scale · 2^t` (the scale of [`ExpConsts::new`]) for f32x4 `t ≤ 0` (or `-inf`) to about
/// 1e-4 relative: plenty for weights that are rounded to 8 bits next. `t` is clamped to
/// [`EXP2_FLOOR`], split as `k + f` (`|f| ≤ 1/2`, `k` by the [`MAGIC`] rounding trick),
/// `2^f` by [`EXP2_POLY`], and `k` added to the exponent field of the polynomial as an
/// integer (the low bits of the rounding sum shifted up; the magic number's own bits shift
/// out). Below the floor (and for `-inf`) the result is about `scale · 2^-125`, not 0.
/// Of its 9 instructions only the FMAs, the clamp and the shift compete with `vpdpbusd`
/// for execution ports; the additions and the integer add do not. Callers fold `log2 e`
/// into the factor that makes `t`.
pub(super) fn exp2_nonpos_fast(b: &mut FunctionBuilder, c: &ExpConsts, t: Value) -> Value {
    let under = b.ins().fcmp(FloatCC::LessThan, t, c.low);
    let tc = select_f32(b, under, c.low, t);
    let tm = b.ins().fadd(tc, c.magic);
    // tm = MAGIC + k exactly (k = round(t)), so kf = k and f = t - k.
    let kf = b.ins().fsub(tm, c.magic);
    let f = b.ins().fsub(tc, kf);
    let mut p = c.poly[0];
    for &cv in &c.poly[1..] {
        p = b.ins().fma(p, f, cv);
    }
    // bits(tm) = bits(MAGIC) + k, and bits(MAGIC) << 23 = 0 (mod 2^32): k in the exponent.
    let k = as_int(b, tm);
    let k = b.ins().ishl_imm_u(k, 23);
    let pb = as_int(b, p);
    let e = b.ins().iadd(pb, k);
    as_float(b, e)
}

/// The index of a group of 4 keys in its block: a constant in unrolled code, or a loop
/// counter. The attention kernels compile without the mid-end optimizer (see
/// `define_in_order`), so constant address arithmetic must be folded here.
#[derive(Clone, Copy)]
pub(super) enum Group {
    Const(usize),
    Counter(Value),
}

impl Group {
    /// `base + g · scale` (bytes).
    pub(super) fn addr(self, b: &mut FunctionBuilder, base: Value, scale: i64) -> Value {
        match self {
            Group::Const(0) => base,
            Group::Const(g) => b.ins().iadd_imm_s(base, g as i64 * scale),
            Group::Counter(g) => {
                // A shift rather than a multiply where it can: `imul` would take a port
                // the dot products need.
                let o = if scale > 0 && (scale as u64).is_power_of_two() {
                    b.ins().ishl_imm_s(g, i64::from(scale.trailing_zeros()))
                } else {
                    b.ins().imul_imm_s(g, scale)
                };
                b.ins().iadd(base, o)
            }
        }
    }
}
