//! Large temporaries kept between steps and runs of one compiled kernel.
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

/// Buffers of at least this many values are kept (smaller ones cost little to allocate).
const KEEP_FROM: usize = 1 << 20;

/// A recycled buffer serves a request of at least this fraction of its capacity (a huge buffer
/// is not spent on a small temporary while the next step needs it whole).
const MIN_FILL: usize = 2;

/// The kept buffers of one compiled kernel.
#[derive(Debug, Default)]
pub(crate) struct Pool(Mutex<Vec<Vec<f32>>>);

impl Pool {
    /// `len` zeros: a kept buffer whose capacity fits (zeroed on up to `threads` threads) or
    /// a fresh one (faulted in on up to `threads` threads).
    pub(crate) fn zeroed(&self, len: usize, threads: usize) -> Vec<f32> {
        if len >= KEEP_FROM {
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

    /// Keeps `buffer` for a later request (small buffers are dropped).
    pub(crate) fn give(&self, buffer: Vec<f32>) {
        if buffer.capacity() >= KEEP_FROM {
            if let Ok(mut kept) = self.0.lock() {
                kept.push(buffer);
            }
        }
    }

    /// Frees every kept buffer.
    pub(crate) fn release(&self) {
        if let Ok(mut kept) = self.0.lock() {
            kept.clear();
            kept.shrink_to_fit();
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.0.lock().map_or(0, |kept| {
            kept.iter()
                .map(|b| b.capacity() * std::mem::size_of::<f32>())
                .sum()
        })
    }

    /// The kept buffer of least capacity that holds `len` values and is not more than
    /// [`MIN_FILL`] times as large.
    fn take(&self, len: usize) -> Option<Vec<f32>> {
        let mut kept = self.0.lock().ok()?;
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
}
