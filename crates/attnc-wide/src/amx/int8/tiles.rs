//! The tile-unit programs of the int8 kernel: `Sᵀ = K·Qᵀ` (two planes) and `Vᵀ·Pᵀ` in steps.

use super::{Scratch, P_SLOT, S_PART, S_SLOT};
use crate::amx::pack::Data;
use crate::amx::tile::{self, TILE_BYTES};
use crate::amx::KEY_TILE;

/// The tile-unit work issued between the softmax vectors of one key tile: `Vᵀ·Pᵀ` of the
/// previous tile (`prev`: key tile, P slot), then `Sᵀ` of the next (`next`: key tile, S slot).
/// S: tiles 0–1 accumulate, 2–3 stream K, 4–7 hold Qᵀ (hi and lo of both row groups). P·V:
/// tiles 0–3 accumulate (hi and lo of both row groups), 6–7 stream Vᵀ, 4–5 hold Pᵀ.
pub(super) struct Work {
    prev: Option<(usize, usize)>,
    next: Option<(usize, usize)>,
    pv_steps: usize,
    /// All steps.
    pub(super) steps: usize,
}

impl Work {
    pub(super) fn new(
        data: &Data,
        prev: Option<(usize, usize)>,
        next: Option<(usize, usize)>,
    ) -> Work {
        let pv_steps = if prev.is_some() { data.dv_groups } else { 0 };
        let s_steps = if next.is_some() { data.d_chunks * 4 } else { 0 };
        Work {
            prev,
            next,
            pv_steps,
            steps: pv_steps + s_steps,
        }
    }

    /// Runs steps `done..want`; returns how many are done.
    ///
    /// # Safety
    /// A tile session is live; the key tiles lie below `data.key_tiles`; `sc` was sized for
    /// `data`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn until(
        &self,
        want: usize,
        done: usize,
        data: &Data,
        sc: &mut Scratch,
    ) -> usize {
        for k in done..want {
            // SAFETY: the caller's contract.
            unsafe {
                if k < self.pv_steps {
                    self.pv_step(k, data, sc);
                } else {
                    self.s_step(k - self.pv_steps, data, sc);
                }
            }
        }
        want.max(done)
    }

    /// Runs the remaining steps.
    ///
    /// # Safety
    /// As [`Work::until`].
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn finish(&self, done: usize, data: &Data, sc: &mut Scratch) {
        // SAFETY: the caller's contract.
        unsafe { self.until(self.steps, done, data, sc) };
    }

    /// Value-column group `g` of `Vᵀ·Pᵀ` into the PV buffer (Pᵀ loaded at the first group).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn pv_step(&self, g: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let rg_stride = sc.dv_pad * 64;
        // SAFETY: Pᵀ tiles of the slot, Vᵀ tiles (kt, g) and PV tiles (part, rg, g) lie
        // inside their buffers.
        unsafe {
            if g == 0 {
                let p = sc.p.ptr().add(slot * P_SLOT);
                tile::load::<4>(p, 64);
                tile::load::<5>(p.add(TILE_BYTES), 64);
            }
            let v = (kt * data.dv_groups + g) * TILE_BYTES;
            let pv = sc.pv.ptr_mut().add(g * TILE_BYTES);
            tile::zero::<0>();
            tile::zero::<1>();
            tile::load::<6>(data.v_hi.ptr().add(v), 64);
            tile::dp_i8u8::<0, 6, 4>();
            tile::dp_i8u8::<1, 6, 5>();
            tile::store::<0>(pv, 64);
            tile::store::<1>(pv.add(rg_stride), 64);
            if let Some(v_lo) = &data.v_lo {
                tile::zero::<2>();
                tile::zero::<3>();
                tile::load::<7>(v_lo.ptr().add(v), 64);
                tile::dp_i8u8::<2, 7, 4>();
                tile::dp_i8u8::<3, 7, 5>();
                tile::store::<2>(pv.add(2 * rg_stride), 64);
                tile::store::<3>(pv.add(3 * rg_stride), 64);
            }
        }
    }

    /// Key group `g` of `Sᵀ` for dimension chunk `c` (Qᵀ loaded at the chunk's first group;
    /// accumulators from 0 at the first chunk, from the stored partial sums after it).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let Some(k_lo) = &data.k_lo else { return };
        let ch = data.d_chunks;
        let (c, g) = (k / 4, k % 4);
        // SAFETY: Qᵀ tiles (c, rg), K tiles (4kt + g, c) and the slot's S tiles (part, rg, g)
        // lie inside their buffers.
        unsafe {
            if g == 0 {
                let at = 2 * c * TILE_BYTES;
                tile::load::<4>(sc.q_hi.ptr().add(at), 64);
                tile::load::<5>(sc.q_lo.ptr().add(at), 64);
                tile::load::<6>(sc.q_hi.ptr().add(at + TILE_BYTES), 64);
                tile::load::<7>(sc.q_lo.ptr().add(at + TILE_BYTES), 64);
            }
            let kk = ((4 * kt + g) * ch + c) * TILE_BYTES;
            tile::load::<2>(data.k_hi.ptr().add(kk), 64);
            tile::load::<3>(k_lo.ptr().add(kk), 64);
            let hh = sc.s.ptr_mut().add(slot * S_SLOT + g * TILE_BYTES);
            let x = hh.add(S_PART);
            let rg1 = KEY_TILE * 64;
            if c == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(hh, 64);
                tile::load::<1>(x, 64);
            }
            tile::dp_i8i8::<0, 2, 4>();
            tile::dp_i8i8::<1, 3, 4>();
            tile::dp_i8i8::<1, 2, 5>();
            tile::store::<0>(hh, 64);
            tile::store::<1>(x, 64);
            if c == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(hh.add(rg1), 64);
                tile::load::<1>(x.add(rg1), 64);
            }
            tile::dp_i8i8::<0, 2, 6>();
            tile::dp_i8i8::<1, 3, 6>();
            tile::dp_i8i8::<1, 2, 7>();
            tile::store::<0>(hh.add(rg1), 64);
            tile::store::<1>(x.add(rg1), 64);
        }
    }
}
