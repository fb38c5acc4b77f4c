//! The AMX tile state and instructions, through inline assembly (the AMX intrinsics are
//! unstable on stable Rust).
//!
//! Every tile is configured as 16 rows of 64 bytes (palette 1): a bf16 tile is 16 × 32, an int8
//! tile 16 × 64, an f32 or i32 accumulator 16 × 16. The B operand of a tile product holds its
//! reduction dimension in groups ("VNNI" layout): `tdpbf16ps` reads `B[k/2][n][2]`, `tdpbssd` and
//! `tdpbusd` read `B[k/4][n][4]`; a row of B is the 2 or 4 consecutive reduction elements of each
//! of the 16 output columns.
//!
//! The instruction wrappers name their tiles by const generics (`tmm{T}`); they are `unsafe`
//! because they touch the tile state, which is only valid between [`Session::start`] and its
//! drop, and the loads and stores read and write 16 rows of 64 bytes at `stride`.

use std::arch::asm;

/// Rows of every tile.
pub(crate) const ROWS: usize = 16;
/// Bytes of every tile row.
pub(crate) const ROW_BYTES: usize = 64;
/// Bytes of one tile, stored with a stride of [`ROW_BYTES`].
pub(crate) const TILE_BYTES: usize = ROWS * ROW_BYTES;

/// The 64-byte tile configuration of palette 1 with all 8 tiles at 16 × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn full() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            // colsb[t] (u16, little-endian) at byte 16 + 2t, rows[t] at byte 48 + t.
            c[16 + 2 * t] = ROW_BYTES as u8;
            c[48 + t] = ROWS as u8;
        }
        Config(c)
    }
}

/// The tile configuration of one kernel call: loaded once on start, released on drop (also
/// when unwinding), so the tile state never outlives the call.
pub(crate) struct Session(());

impl Session {
    /// Loads the configuration of 8 tiles of 16 × 64 bytes.
    ///
    /// # Safety
    /// The CPU has AMX-TILE and this process holds the tile-data permission
    /// ([`crate::cpu::Features`] reported `amx_bf16` or `amx_int8`).
    pub(crate) unsafe fn start() -> Session {
        let config = Config::full();
        // SAFETY: the caller guarantees AMX is usable; `config` is a valid palette-1
        // configuration of 64 readable bytes.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly, preserves_flags));
        }
        Session(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: a session exists only after `start` succeeded, so AMX is usable here;
        // `tilerelease` returns the tile state to its initial (unconfigured) state.
        unsafe {
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
}

/// `tmm{T} ← 16 rows of 64 bytes at src, src + stride, …`.
///
/// # Safety
/// A [`Session`] is live; the 16 rows lie in readable memory.
#[inline(always)]
pub(crate) unsafe fn load<const T: u8>(src: *const u8, stride: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tileloadd tmm{t}, [{p} + {s}*1]",
            t = const T,
            p = in(reg) src,
            s = in(reg) stride,
            options(nostack, readonly, preserves_flags),
        );
    }
}

/// 16 rows of 64 bytes at dst, dst + stride, … ← `tmm{T}`.
///
/// # Safety
/// A [`Session`] is live; the 16 rows lie in writable memory.
#[inline(always)]
pub(crate) unsafe fn store<const T: u8>(dst: *mut u8, stride: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tilestored [{p} + {s}*1], tmm{t}",
            t = const T,
            p = in(reg) dst,
            s = in(reg) stride,
            options(nostack, preserves_flags),
        );
    }
}

/// `tmm{T} ← 0`.
///
/// # Safety
/// A [`Session`] is live.
#[inline(always)]
pub(crate) unsafe fn zero<const T: u8>() {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags));
    }
}

/// `C[m][n] += Σₖ A[m][2k]·B[k][n][0] + A[m][2k+1]·B[k][n][1]` on bf16 pairs, f32 sums
/// (`tdpbf16ps`).
///
/// # Safety
/// A [`Session`] is live; C, A and B are distinct tiles.
#[inline(always)]
pub(crate) unsafe fn dp_bf16<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem, preserves_flags),
        );
    }
}

/// `C[m][n] += Σₖ Σₑ A[m][4k+e]·B[k][n][e]` on i8 × i8, i32 sums (`tdpbssd`).
///
/// # Safety
/// A [`Session`] is live; C, A and B are distinct tiles.
#[inline(always)]
pub(crate) unsafe fn dp_i8i8<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tdpbssd tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem, preserves_flags),
        );
    }
}

/// `C[m][n] += Σₖ Σₑ A[m][4k+e]·B[k][n][e]` on u8 (A) × i8 (B), i32 sums (`tdpbusd`; the
/// kernels use its mirror `tdpbsud`, tested here as a model check of the family).
///
/// # Safety
/// A [`Session`] is live; C, A and B are distinct tiles.
#[cfg(test)]
#[inline(always)]
pub(crate) unsafe fn dp_u8i8<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tdpbusd tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem, preserves_flags),
        );
    }
}

/// `C[m][n] += Σₖ Σₑ A[m][4k+e]·B[k][n][e]` on i8 (A) × u8 (B), i32 sums (`tdpbsud`).
///
/// # Safety
/// A [`Session`] is live; C, A and B are distinct tiles.
#[inline(always)]
pub(crate) unsafe fn dp_i8u8<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!(
            "tdpbsud tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem, preserves_flags),
        );
    }
}

#[cfg(test)]
mod tests {
    //! Each instruction against a scalar model of its layout, on values whose sums are exact
    //! in any order (small integers), so the comparison is bitwise.
    use super::*;
    use crate::cpu::Features;
    use half::bf16;

    /// 64-byte aligned scratch of one tile.
    #[repr(C, align(64))]
    struct Tile([u8; TILE_BYTES]);

    fn tile() -> Box<Tile> {
        Box::new(Tile([0; TILE_BYTES]))
    }

    /// A small deterministic generator (no dependency needed for unit tests).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn int(&mut self, lo: i32, hi: i32) -> i32 {
            lo + (self.next() % (hi - lo + 1) as u32) as i32
        }
    }

    fn amx() -> Option<Features> {
        let f = Features::detect();
        if f.amx_bf16 && f.amx_int8 {
            Some(f)
        } else {
            eprintln!("skipped: this process has no AMX bf16/int8");
            None
        }
    }

    #[test]
    fn load_store_and_zero_move_16_rows_of_64_bytes() {
        if amx().is_none() {
            return;
        }
        // A source with a row stride of 96 bytes: only 64 of every 96 move.
        let src: Vec<u8> = (0..16 * 96).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0xAAu8; 16 * 80];
        // SAFETY: AMX is usable (checked above); 16 rows of 64 bytes at strides 96 and 80
        // lie inside `src` and `dst`.
        unsafe {
            let _s = Session::start();
            load::<3>(src.as_ptr(), 96);
            store::<3>(dst.as_mut_ptr(), 80);
        }
        for r in 0..16 {
            assert_eq!(&dst[r * 80..r * 80 + 64], &src[r * 96..r * 96 + 64]);
            assert!(dst[r * 80 + 64..r * 80 + 80].iter().all(|&b| b == 0xAA));
        }
        let mut z = tile();
        z.0.fill(1);
        // SAFETY: as above, one tile of 1024 bytes at stride 64.
        unsafe {
            let _s = Session::start();
            load::<5>(src.as_ptr(), 64);
            zero::<5>();
            store::<5>(z.0.as_mut_ptr(), 64);
        }
        assert!(z.0.iter().all(|&b| b == 0));
    }

    #[test]
    fn tdpbf16ps_matches_its_pair_interleaved_model() {
        if amx().is_none() {
            return;
        }
        let mut rng = Lcg(1);
        // A: 16 × 32 bf16 row-major; B: [16 pairs][16 columns][2]; C: 16 × 16 f32.
        let a: Vec<f32> = (0..16 * 32).map(|_| rng.int(-8, 8) as f32).collect();
        let b: Vec<f32> = (0..16 * 16 * 2).map(|_| rng.int(-8, 8) as f32).collect();
        let c0: Vec<f32> = (0..256).map(|_| rng.int(-100, 100) as f32).collect();
        let (mut ta, mut tb, mut tc) = (tile(), tile(), tile());
        for (i, x) in a.iter().enumerate() {
            ta.0[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
        }
        for (i, x) in b.iter().enumerate() {
            tb.0[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
        }
        for (i, x) in c0.iter().enumerate() {
            tc.0[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
        // SAFETY: AMX is usable; every tile is 1024 bytes at stride 64.
        unsafe {
            let _s = Session::start();
            load::<0>(tc.0.as_ptr(), 64);
            load::<1>(ta.0.as_ptr(), 64);
            load::<2>(tb.0.as_ptr(), 64);
            dp_bf16::<0, 1, 2>();
            store::<0>(tc.0.as_mut_ptr(), 64);
        }
        for m in 0..16 {
            for n in 0..16 {
                let mut want = c0[m * 16 + n];
                for k in 0..16 {
                    for e in 0..2 {
                        want += a[m * 32 + 2 * k + e] * b[(k * 16 + n) * 2 + e];
                    }
                }
                let got = f32::from_le_bytes(tc.0[4 * (m * 16 + n)..][..4].try_into().unwrap());
                assert_eq!(got, want, "C[{m}][{n}]");
            }
        }
    }

    /// The model of `tdpbssd` (both signed), `tdpbusd` (A unsigned) and `tdpbsud` (B unsigned).
    fn int8_case(signed_a: bool, signed_b: bool) {
        if amx().is_none() {
            return;
        }
        let mut rng = Lcg(2 + signed_a as u64 + 2 * signed_b as u64);
        let a: Vec<u8> = (0..1024)
            .map(|_| {
                if signed_a {
                    rng.int(-128, 127) as i8 as u8
                } else {
                    rng.int(0, 255) as u8
                }
            })
            .collect();
        let b: Vec<u8> = (0..1024)
            .map(|_| {
                if signed_b {
                    rng.int(-128, 127) as i8 as u8
                } else {
                    rng.int(0, 255) as u8
                }
            })
            .collect();
        let c0: Vec<i32> = (0..256).map(|_| rng.int(-100_000, 100_000)).collect();
        let (mut ta, mut tb, mut tc) = (tile(), tile(), tile());
        ta.0.copy_from_slice(&a);
        tb.0.copy_from_slice(&b);
        for (i, x) in c0.iter().enumerate() {
            tc.0[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
        // SAFETY: AMX is usable; every tile is 1024 bytes at stride 64.
        unsafe {
            let _s = Session::start();
            load::<7>(tc.0.as_ptr(), 64);
            load::<4>(ta.0.as_ptr(), 64);
            load::<6>(tb.0.as_ptr(), 64);
            match (signed_a, signed_b) {
                (true, true) => dp_i8i8::<7, 4, 6>(),
                (false, true) => dp_u8i8::<7, 4, 6>(),
                _ => dp_i8u8::<7, 4, 6>(),
            }
            store::<7>(tc.0.as_mut_ptr(), 64);
        }
        for m in 0..16 {
            for n in 0..16 {
                let mut want = c0[m * 16 + n];
                for k in 0..16 {
                    for e in 0..4 {
                        let av = if signed_a {
                            a[m * 64 + 4 * k + e] as i8 as i32
                        } else {
                            a[m * 64 + 4 * k + e] as i32
                        };
                        let bv = b[(k * 16 + n) * 4 + e];
                        let bv = if signed_b { bv as i8 as i32 } else { bv as i32 };
                        want += av * bv;
                    }
                }
                let got = i32::from_le_bytes(tc.0[4 * (m * 16 + n)..][..4].try_into().unwrap());
                assert_eq!(got, want, "C[{m}][{n}]");
            }
        }
    }

    #[test]
    fn tdpbssd_matches_its_model() {
        int8_case(true, true);
    }

    #[test]
    fn tdpbusd_matches_its_model() {
        int8_case(false, true);
    }

    #[test]
    fn tdpbsud_matches_its_model() {
        int8_case(true, false);
    }

    #[test]
    fn tdpbf16ps_propagates_nan_and_flushes_no_normal_value() {
        if amx().is_none() {
            return;
        }
        // A NaN in row 0 of A and in column 3 of B reach exactly their row and column.
        let (mut ta, mut tb, mut tc) = (tile(), tile(), tile());
        for i in 0..512 {
            let x = if i == 5 { f32::NAN } else { 1.0 };
            ta.0[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
            let y = if i == (7 * 16 + 3) * 2 { f32::NAN } else { 0.5 };
            tb.0[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(y).to_bits().to_le_bytes());
        }
        // SAFETY: AMX is usable; every tile is 1024 bytes at stride 64.
        unsafe {
            let _s = Session::start();
            zero::<0>();
            load::<1>(ta.0.as_ptr(), 64);
            load::<2>(tb.0.as_ptr(), 64);
            dp_bf16::<0, 1, 2>();
            store::<0>(tc.0.as_mut_ptr(), 64);
        }
        for m in 0..16 {
            for n in 0..16 {
                let got = f32::from_le_bytes(tc.0[4 * (m * 16 + n)..][..4].try_into().unwrap());
                if m == 0 || n == 3 {
                    assert!(got.is_nan(), "C[{m}][{n}] = {got}");
                } else {
                    assert_eq!(got, 16.0, "C[{m}][{n}]");
                }
            }
        }
    }
}
