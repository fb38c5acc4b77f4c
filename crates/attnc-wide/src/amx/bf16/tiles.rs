//! The tile-unit programs of the bf16 kernel: `Sᵀ = K·Qᵀ` and `Oᵀ += Vᵀ·Pᵀ` in steps (on CPUs
//! without AMX each step runs the same products on [`super::vectors`] instead).

use super::{vectors, Scratch, P_SLOT, S_SLOT};
use crate::amx::pack::Data;
use crate::amx::tile::{self, TILE_BYTES};
use crate::amx::KEY_TILE;

/// The tile-unit work issued between the softmax vectors of one key tile: `Oᵀ += Vᵀ·Pᵀ` of the
/// previous tile (`prev`: key tile, P slot), then `Sᵀ` of the next (`next`: key tile, S slot),
/// as a linear program of steps. Tiles 0–1 accumulate (row groups 0, 1), 2–3 stream the A
/// operand (K or Vᵀ), 4–7 hold the resident B operand (Qᵀ or Pᵀ).
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
        // Each unit of work (a value-column group, a key group) in two halves: the `hi`
        // products, then the `lo` products and the stores.
        let pv_steps = if prev.is_some() {
            2 * data.dv_groups
        } else {
            0
        };
        let s_steps = if next.is_some() {
            2 * data.d_chunks.div_ceil(2) * 4
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
    /// A tile session is live (AVX-512 BF16 is usable instead when `sc.on_vectors`); the key
    /// tiles lie below `data.key_tiles`; `sc` was sized for `data`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
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
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    pub(super) unsafe fn finish(&self, done: usize, data: &Data, sc: &mut Scratch) {
        // SAFETY: the caller's contract.
        unsafe { self.until(self.steps, done, data, sc) };
    }

    /// Half `k % 2` of value-column group `g = k / 2` of `Oᵀ += Vᵀ·Pᵀ` (Pᵀ loaded at the first
    /// group).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn pv_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.prev else { return };
        let groups = data.dv_groups;
        let (g, half) = (k / 2, k % 2);
        if sc.on_vectors {
            // On vectors the halves are the two row groups.
            // SAFETY: the caller's bounds; AVX-512 BF16 is usable when the kernel runs on
            // vectors.
            unsafe { vectors::values(data, sc, (kt, slot, g, half)) };
            return;
        }
        // SAFETY: Pᵀ tiles of the slot, Oᵀ tiles (g, rg) and Vᵀ tiles (2kt + h, g) lie inside
        // their buffers.
        unsafe {
            let o0 = sc.o.ptr_mut().add(g * TILE_BYTES);
            let o1 = o0.add(sc.dv_pad * 64);
            let v0 = (2 * kt * groups + g) * TILE_BYTES;
            let v1 = v0 + groups * TILE_BYTES;
            let part = if half == 0 {
                if g == 0 {
                    let p = sc.p.ptr().add(slot * P_SLOT);
                    tile::load::<4>(p, 64);
                    tile::load::<5>(p.add(TILE_BYTES), 64);
                    tile::load::<6>(p.add(2 * TILE_BYTES), 64);
                    tile::load::<7>(p.add(3 * TILE_BYTES), 64);
                }
                tile::load::<0>(o0, 64);
                tile::load::<1>(o1, 64);
                Some(&data.v_hi)
            } else {
                data.v_lo.as_ref()
            };
            if let Some(part) = part {
                tile::load::<2>(part.ptr().add(v0), 64);
                tile::dp_bf16::<0, 2, 4>();
                tile::dp_bf16::<1, 2, 5>();
                tile::load::<3>(part.ptr().add(v1), 64);
                tile::dp_bf16::<0, 3, 6>();
                tile::dp_bf16::<1, 3, 7>();
            }
            if half == 1 {
                tile::store::<0>(o0, 64);
                tile::store::<1>(o1, 64);
            }
        }
    }

    /// Half `k % 2` of step `k / 2` of `Sᵀ = K·Qᵀ`: dimension chunks `2p, 2p + 1` (Qᵀ loaded
    /// at the pair's first step) for key group `g`; the accumulators start at 0 for the first
    /// pair and continue from the stored partial sums after it (heads wider than 64).
    ///
    /// # Safety
    /// As [`Work::until`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn s_step(&self, k: usize, data: &Data, sc: &mut Scratch) {
        let Some((kt, slot)) = self.next else { return };
        let ch = data.d_chunks;
        let (k, half) = (k / 2, k % 2);
        let (pair, g) = (k / 4, k % 4);
        let c0 = 2 * pair;
        let two = c0 + 1 < ch;
        if sc.on_vectors {
            // On vectors the halves are the two row groups.
            // SAFETY: the caller's bounds; AVX-512 BF16 is usable when the kernel runs on
            // vectors.
            unsafe { vectors::scores(data, sc, (kt, slot, g, half), c0..ch.min(c0 + 2)) };
            return;
        }
        // SAFETY: Qᵀ tiles (c0, c0 + 1), K tiles (4kt + g, c0..), Sᵀ tiles of the slot lie
        // inside their buffers.
        unsafe {
            let s0 = sc.s.ptr_mut().add(slot * S_SLOT + g * TILE_BYTES);
            let s1 = s0.add(KEY_TILE * 64);
            let part = if half == 0 {
                if g == 0 {
                    let q = sc.qt.ptr().add(2 * c0 * TILE_BYTES);
                    tile::load::<4>(q, 64);
                    tile::load::<5>(q.add(TILE_BYTES), 64);
                    if two {
                        tile::load::<6>(q.add(2 * TILE_BYTES), 64);
                        tile::load::<7>(q.add(3 * TILE_BYTES), 64);
                    }
                }
                if pair == 0 {
                    tile::zero::<0>();
                    tile::zero::<1>();
                } else {
                    tile::load::<0>(s0, 64);
                    tile::load::<1>(s1, 64);
                }
                Some(&data.k_hi)
            } else {
                data.k_lo.as_ref()
            };
            let k0 = ((4 * kt + g) * ch + c0) * TILE_BYTES;
            if let Some(part) = part {
                tile::load::<2>(part.ptr().add(k0), 64);
                tile::dp_bf16::<0, 2, 4>();
                tile::dp_bf16::<1, 2, 5>();
                if two {
                    tile::load::<3>(part.ptr().add(k0 + TILE_BYTES), 64);
                    tile::dp_bf16::<0, 3, 6>();
                    tile::dp_bf16::<1, 3, 7>();
                }
            }
            if half == 1 {
                tile::store::<0>(s0, 64);
                tile::store::<1>(s1, 64);
            }
        }
    }
}
