//! Several seeded standard-normal streams drawn at once, one stream per thread.
//!
//! Drawing is the slowest part of `--random` at attention sizes (tens of nanoseconds a value:
//! the polar method with a portable logarithm), and one stream cannot be split without
//! changing its values, so the streams themselves run in parallel. Each stream is drawn by one
//! thread from its start, so the values do not depend on the thread count.

use attnc_ir::random::standard_normal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// One stream to draw: `len` values of stream `stream` of seed `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalStream {
    /// The seed ([`standard_normal`]'s first argument).
    pub seed: u64,
    /// The stream (by convention the parameter's index).
    pub stream: u64,
    /// How many values.
    pub len: usize,
}

/// Draws every stream, on up to `threads` threads; the result is in the order of `streams` and
/// equals `standard_normal(seed, stream, len)` for each.
pub fn standard_normal_streams(streams: &[NormalStream], threads: usize) -> Vec<Vec<f32>> {
    let workers = threads.clamp(1, streams.len().max(1));
    if workers == 1 {
        return streams
            .iter()
            .map(|s| standard_normal(s.seed, s.stream, s.len))
            .collect();
    }
    // Longest streams first, so that a long one does not start last.
    let mut order: Vec<usize> = (0..streams.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(streams[i].len));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Vec<f32>>> = Mutex::new(vec![Vec::new(); streams.len()]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let s = streams[i];
                    let values = standard_normal(s.seed, s.stream, s.len);
                    if let Ok(mut slots) = results.lock() {
                        slots[i] = values;
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_streams_equal_sequential_draws() {
        let streams: Vec<NormalStream> = [(3, 0, 1000), (3, 1, 17), (9, 2, 0), (3, 3, 4097)]
            .iter()
            .map(|&(seed, stream, len)| NormalStream { seed, stream, len })
            .collect();
        for threads in [1, 2, 3, 8] {
            let drawn = standard_normal_streams(&streams, threads);
            assert_eq!(drawn.len(), streams.len());
            for (s, values) in streams.iter().zip(&drawn) {
                assert_eq!(
                    values,
                    &standard_normal(s.seed, s.stream, s.len),
                    "{threads}"
                );
            }
        }
        assert!(standard_normal_streams(&[], 4).is_empty());
    }
}
