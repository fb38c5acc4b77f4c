//! Large zeroed buffers on transparent huge pages.
//!
//! A plan's temporaries are fresh allocations of up to hundreds of megabytes (Performer's
//! `[8, 16384, 256]` projections take 134 MB each), mapped by the allocator and faulted in a
//! 4 KiB page at a time by the step that first writes them: about 33,000 faults per such
//! buffer, each a trip through the kernel's fault and memory-cgroup paths. Where the kernel
//! offers huge pages on request (`madvise` mode, the common default), asking for them before
//! the first write takes 512 times fewer faults, and the buffer then costs fewer TLB misses
//! to stream. Nothing else changes: the memory is the same zeroed `Vec<f32>`.

/// Buffers from this size on are advised (below it a huge page would be mostly slack).
const HUGE_FROM_BYTES: usize = 4 << 20;

/// A huge page's size on x86-64 and aarch64 Linux with 4 KiB base pages.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// `len` zeros, on huge pages where the kernel grants them for buffers this large.
pub fn zeroed(len: usize) -> Vec<f32> {
    let buffer = vec![0.0f32; len];
    if std::mem::size_of_val(buffer.as_slice()) >= HUGE_FROM_BYTES {
        advise_huge(&buffer);
    }
    buffer
}

/// Asks for huge pages over the whole 2 MiB pages inside `buffer` (a hint: refusals and
/// errors change nothing).
#[cfg(target_os = "linux")]
fn advise_huge(buffer: &[f32]) {
    let start = buffer.as_ptr() as usize;
    let end = start + std::mem::size_of_val(buffer);
    let first = start.next_multiple_of(HUGE_PAGE);
    let last = end / HUGE_PAGE * HUGE_PAGE;
    if last <= first {
        return;
    }
    // SAFETY: the range lies inside `buffer`'s allocation, which stays mapped while borrowed;
    // MADV_HUGEPAGE changes how the range is backed, never its contents or its mapping.
    unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_HUGEPAGE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_buffer: &[f32]) {}

/// Below this many values a second thread costs more than the clearing it would share.
const PARALLEL_FROM: usize = 1 << 20;

/// [`zeroed`], its pages faulted in on up to `threads` threads, each its own contiguous part:
/// the kernel's clearing of a fresh buffer runs in parallel, before the step that writes it
/// ([`fault_in_zeros`] says why that matters).
pub fn zeroed_in_parallel(len: usize, threads: usize) -> Vec<f32> {
    let mut buffer = zeroed(len);
    in_parts(&mut buffer, threads, fault_in_zeros);
    buffer
}

/// Runs `f` on up to `threads` contiguous parts of `buffer` at once, this thread taking the
/// first; on the whole buffer here when it is below a few megabytes or `threads ≤ 1`.
pub fn in_parts(buffer: &mut [f32], threads: usize, f: impl Fn(&mut [f32]) + Sync) {
    if threads <= 1 || buffer.len() < PARALLEL_FROM {
        f(buffer);
        return;
    }
    let part = buffer.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut parts = buffer.chunks_mut(part);
        let own = parts.next();
        for p in parts {
            scope.spawn(move || f(p));
        }
        if let Some(p) = own {
            f(p);
        }
    });
}

/// Faults in every page of `part`, which holds zeros, for writing: one zero written per 4 KiB.
///
/// The kernel clears a page at its first write fault, and a thread that writes into a page
/// another thread is faulting in waits for that clear: when threads take interleaved pieces
/// of one fresh output, a huge page's 2 MiB clear runs on one thread while the others wait.
/// Each thread faulting in its own contiguous part first clears the pages in parallel.
///
/// Nothing is read first: a read of a fresh page maps the kernel's shared zero page, and the
/// write after it then faults again to replace that mapping, which flushes the TLBs of every
/// CPU running one of the process's threads.
pub fn fault_in_zeros(part: &mut [f32]) {
    const PAGE_VALUES: usize = 4096 / std::mem::size_of::<f32>();
    for x in part.iter_mut().step_by(PAGE_VALUES) {
        let p: *mut f32 = x;
        // SAFETY: `p` comes from a live `&mut f32`; the volatile write (of the zero it holds)
        // is not dropped, which is what makes the fault happen.
        unsafe { p.write_volatile(0.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_every_size_are_zeroed_and_writable() {
        for len in [
            0,
            1,
            1000,
            (HUGE_FROM_BYTES / 4) - 1,
            3 * HUGE_FROM_BYTES / 4 + 17,
        ] {
            let mut buffer = zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&x| x == 0.0));
            for (i, x) in buffer.iter_mut().enumerate().step_by(4096) {
                *x = i as f32;
            }
            assert!(buffer
                .iter()
                .enumerate()
                .step_by(4096)
                .all(|(i, &x)| x == i as f32));
        }
    }

    #[test]
    fn buffers_faulted_in_on_threads_are_zeroed() {
        for (len, threads) in [
            (0, 3),
            (5, 2),
            (PARALLEL_FROM + 3, 2),
            (PARALLEL_FROM * 2, 3),
        ] {
            let buffer = zeroed_in_parallel(len, threads);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn faulting_in_zeros_leaves_zeros() {
        for len in [0, 1, 1023, 1024, 1025, 3 * HUGE_FROM_BYTES / 4 + 17] {
            let mut fresh = zeroed(len);
            fault_in_zeros(&mut fresh);
            assert!(fresh.iter().all(|&x| x == 0.0));
            fault_in_zeros(&mut fresh[len / 3..]);
            assert!(fresh.iter().all(|&x| x == 0.0));
        }
    }
}
