//! The tile-unit programs of the int8 kernel: `Sᵀ = K·Qᵀ` (two planes) and `Vᵀ·Pᵀ` in steps
//! (on CPUs without AMX each product step runs [`super::vectors`] instead, and each store step
//! nothing).

use super::{vectors, Scratch, P_SLOT, S_PART, S_SLOT};
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
        // Each unit of work in four steps: the products, then the stores, of the `hi` and `lo`
        // digits of a value-column group; of row group 0 and 1 of a key group.
        let pv_steps = if prev.is_some() {
            4 * data.dv_groups
        } else {
            0
        };
        let s_steps = if next.is_some() {
            4 * data.d_chunks * 4
        } else {
            0
        };
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
    /// A tile session is live (AVX-512 VNNI is usable instead when `sc.on_vectors`); the key
    /// tiles lie below `data.key_tiles`; `sc` was sized for
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

    /// Step `k % 4` (`hi` products, their stores, `lo` products, their stores) of value-column
    /// group `g = k / 4` of `Vᵀ·Pᵀ` into the PV buffer (Pᵀ loaded at the first group).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn pv_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let (g, half, store) = (k / 4, k / 2 % 2, k % 2 == 1);
        if sc.on_vectors {
            let plane = match half {
                0 => Some(data.v_hi.ptr()),
                _ => data.v_lo.as_ref().map(|v| v.ptr()),
            };
            if let (Some(v), false) = (plane, store) {
                // SAFETY: the caller's bounds; VNNI is usable when the kernel runs on vectors.
                unsafe { vectors::values(data, v, sc, (kt, slot, g, half)) };
            }
            return;
        }
        let rg_stride = sc.dv_pad * 64;
        // SAFETY: Pᵀ tiles of the slot, Vᵀ tiles (kt, g) and PV tiles (part, rg, g) lie
        // inside their buffers.
        unsafe {
            let v = (kt * data.dv_groups + g) * TILE_BYTES;
            let pv = sc.pv.ptr_mut().add(g * TILE_BYTES);
            match (half, store, &data.v_lo) {
                (0, false, _) => {
                    if g == 0 {
                        let p = sc.p.ptr().add(slot * P_SLOT);
                        tile::load::<4>(p, 64);
                        tile::load::<5>(p.add(TILE_BYTES), 64);
                    }
                    tile::zero::<0>();
                    tile::zero::<1>();
                    tile::load::<6>(data.v_hi.ptr().add(v), 64);
                    tile::dp_i8u8::<0, 6, 4>();
                    tile::dp_i8u8::<1, 6, 5>();
                }
                (0, true, _) => {
                    tile::store::<0>(pv, 64);
                    tile::store::<1>(pv.add(rg_stride), 64);
                }
                (_, false, Some(v_lo)) => {
                    tile::zero::<2>();
                    tile::zero::<3>();
                    tile::load::<7>(v_lo.ptr().add(v), 64);
                    tile::dp_i8u8::<2, 7, 4>();
                    tile::dp_i8u8::<3, 7, 5>();
                }
                (_, true, Some(_)) => {
                    tile::store::<2>(pv.add(2 * rg_stride), 64);
                    tile::store::<3>(pv.add(3 * rg_stride), 64);
                }
                (_, _, None) => {}
            }
        }
    }

    /// Products (`k` even) or stores (`k` odd) of row group `k / 2 % 2` of key group `g` of `Sᵀ`
    /// for dimension chunk `c` (`k / 4 = 4c + g`; Qᵀ loaded at the chunk's first group;
    /// accumulators from 0 at the first chunk, from the stored partial sums after it).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let ch = data.d_chunks;
        let (k, rg, store) = (k / 4, k / 2 % 2, k % 2 == 1);
        let (c, g) = (k / 4, k % 4);
        if sc.on_vectors {
            // The whole head dimension at the first chunk's product step.
            if let (Some(words), 0, false) = (&data.k_words, c, store) {
                // SAFETY: the caller's bounds; VNNI is usable when the kernel runs on vectors,
                // and the data was packed for vectors then (`run_on` checks the unit).
                unsafe { vectors::scores(data, words.ptr(), sc, (kt, slot, g, rg)) };
            }
            return;
        }
        let Some(k_lo) = &data.k_lo else { return };
        // SAFETY: Qᵀ tiles (c, rg), K tiles (4kt + g, c) and the slot's S tiles (part, rg, g)
        // lie inside their buffers.
        unsafe {
            let kk = ((4 * kt + g) * ch + c) * TILE_BYTES;
            if rg == 0 && !store {
                if g == 0 {
                    let at = 2 * c * TILE_BYTES;
                    tile::load::<4>(sc.q_hi.ptr().add(at), 64);
                    tile::load::<5>(sc.q_lo.ptr().add(at), 64);
                    tile::load::<6>(sc.q_hi.ptr().add(at + TILE_BYTES), 64);
                    tile::load::<7>(sc.q_lo.ptr().add(at + TILE_BYTES), 64);
                }
                tile::load::<2>(data.k_hi.ptr().add(kk), 64);
                tile::load::<3>(k_lo.ptr().add(kk), 64);
            }
            let hh =
                sc.s.ptr_mut()
                    .add(slot * S_SLOT + g * TILE_BYTES + rg * KEY_TILE * 64);
            let x = hh.add(S_PART);
            if store {
                tile::store::<0>(hh, 64);
                tile::store::<1>(x, 64);
                return;
            }
            if c == 0 {
                tile::zero::<0>();
                tile::zero::<1>();
            } else {
                tile::load::<0>(hh, 64);
                tile::load::<1>(x, 64);
            }
            if rg == 0 {
                tile::dp_i8i8::<0, 2, 4>();
                tile::dp_i8i8::<1, 3, 4>();
                tile::dp_i8i8::<1, 2, 5>();
            } else {
                tile::dp_i8i8::<0, 2, 6>();
                tile::dp_i8i8::<1, 3, 6>();
                tile::dp_i8i8::<1, 2, 7>();
            }
        }
    }
}
