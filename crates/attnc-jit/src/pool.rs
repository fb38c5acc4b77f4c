//! Large temporaries kept between steps and runs of one compiled kernel (and, with a
//! smaller size, a fused backward's shares of dQ, `crate::backward`).
//!
//! A plan's temporaries are allocations of up to hundreds of megabytes (Performer's
//! `[8, 16384, 256]` projections take 134 MB each). Freed, the allocator returns them to the
//! operating system; allocated again, every page is faulted in and cleared by the kernel once
//! more. On a virtual machine that clearing ran at about 3 GB/s and took a third of a Performer
//! run. Kept here instead, a dead temporary serves a later step of the same run, and every
//! temporary serves the next run: after the first run, zeroing memory that is already mapped
//! is all a temporary costs.
//!
//! The price is memory: between runs the kernel holds its plan's large temporaries (never
//! more than one run's worth: each run takes buffers out and gives them back).
//! [`CompiledKernel::release_buffers`](crate::CompiledKernel::release_buffers) frees them.

use std::sync::Mutex;

use attnc_wide::pages;

/// Buffers of at least this many values are kept by default (smaller ones cost little to
/// allocate).
const KEEP_FROM: usize = 1 << 20;

/// A recycled buffer serves a request of at least this fraction of its capacity (a huge buffer
/// is not spent on a small temporary while the next step needs it whole).
const MIN_FILL: usize = 2;

/// Kept buffers: a compiled kernel's large temporaries, or a backward's shares of dQ.
pub(crate) struct Pool {
    kept: Mutex<Vec<Vec<f32>>>,
    /// The least capacity kept, in values.
    keep_from: usize,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::keeping_from(KEEP_FROM)
    }
}

/// A copy keeps nothing: kept buffers belong to the kernel that used them.
impl Clone for Pool {
    fn clone(&self) -> Pool {
        Pool::keeping_from(self.keep_from)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} bytes kept)", self.bytes())
    }
}

impl Pool {
    /// A pool that keeps buffers of at least `values` values.
    pub(crate) fn keeping_from(values: usize) -> Pool {
        Pool {
            kept: Mutex::new(Vec::new()),
            keep_from: values,
        }
    }

    /// `len` zeros: a kept buffer whose capacity fits (zeroed on up to `threads` threads) or
    /// a fresh one (faulted in on up to `threads` threads).
    pub(crate) fn zeroed(&self, len: usize, threads: usize) -> Vec<f32> {
        if len >= self.keep_from {
            if let Some(mut buffer) = self.take(len) {
                buffer.truncate(len);
                pages::in_parts(&mut buffer, threads, |part| part.fill(0.0));
                // The capacity is there: `resize` writes the missing zeros in place.
                buffer.resize(len, 0.0);
                return buffer;
            }
        }
        pages::zeroed_in_parallel(len, threads)
    }

    /// Keeps `buffer` for a later request (buffers below the pool's size are dropped).
    pub(crate) fn give(&self, buffer: Vec<f32>) {
        if buffer.capacity() >= self.keep_from.max(1) {
            if let Ok(mut kept) = self.kept.lock() {
                kept.push(buffer);
            }
        }
    }

    /// Keeps the `count` largest buffers only.
    pub(crate) fn trim(&self, count: usize) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
            kept.truncate(count);
        }
    }

    /// Frees every kept buffer.
    pub(crate) fn release(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            *kept = Vec::new();
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.kept.lock().map_or(0, |kept| {
            kept.iter()
                .map(|b| b.capacity() * std::mem::size_of::<f32>())
                .sum()
        })
    }

    /// The kept buffer of least capacity that holds `len` values and is not more than
    /// [`MIN_FILL`] times as large.
    fn take(&self, len: usize) -> Option<Vec<f32>> {
        let mut kept = self.kept.lock().ok()?;
        let (at, _) = kept
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() / MIN_FILL <= len)
            .min_by_key(|(_, b)| b.capacity())?;
        Some(kept.swap_remove(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_come_back_zeroed_and_fitting() {
        let pool = Pool::default();
        let mut a = pool.zeroed(KEEP_FROM + 5, 2);
        a.iter_mut().for_each(|x| *x = 3.0);
        let ptr = a.as_ptr();
        pool.give(a);
        assert!(pool.bytes() >= (KEEP_FROM + 5) * 4);
        // Too small a request for it: a fresh buffer.
        let small = pool.zeroed(KEEP_FROM / 4, 2);
        assert_ne!(small.as_ptr(), ptr);
        // A fitting one reuses it, all zeros, at the asked length.
        let b = pool.zeroed(KEEP_FROM + 1, 2);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), KEEP_FROM + 1);
        assert!(b.iter().all(|&x| x == 0.0));
        assert_eq!(pool.bytes(), 0);
        // Small buffers are not kept; release frees the rest.
        pool.give(vec![1.0; 10]);
        assert_eq!(pool.bytes(), 0);
        pool.give(b);
        pool.release();
        assert_eq!(pool.bytes(), 0);
    }

    #[test]
    fn a_pool_from_any_size_keeps_the_largest_and_copies_keep_nothing() {
        let pool = Pool::keeping_from(0);
        for len in [10, 30, 20] {
            pool.give(vec![1.0; len]);
        }
        pool.give(Vec::new());
        assert_eq!(pool.bytes(), 60 * 4);
        pool.trim(2);
        assert_eq!(pool.bytes(), 50 * 4);
        assert_eq!(pool.clone().bytes(), 0);
        // The 20-value buffer serves 12 (at least half of it), zeroed.
        let b = pool.zeroed(12, 1);
        assert_eq!(b, vec![0.0; 12]);
        assert!(b.capacity() >= 20);
        assert_eq!(pool.bytes(), 30 * 4);
        pool.release();
        assert_eq!(pool.bytes(), 0);
    }
}
