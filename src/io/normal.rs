//! Several seeded standard-normal streams drawn at once, on several threads.
//!
//! Drawing is the slowest part of `--random` at attention sizes (the polar method with a
//! portable logarithm). Which candidates a stream accepts must be found in order, but that is
//! the cheap half; turning points into values can start anywhere the generator's state is
//! known. So each stream is first walked once, keeping only its state at every chunk (the
//! streams in parallel), then the chunks of all streams are drawn and turned into values,
//! spread over the threads. Every value is computed exactly as one call of
//! [`standard_normal`](attnc_ir::random::standard_normal) computes it, whatever the thread count.

#[cfg(test)]
use attnc_ir::random::standard_normal;
use attnc_ir::random::{polar_checkpoints, polar_normals_from, Rng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// One stream to draw: `len` values of stream `stream` of seed `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalStream {
    /// The seed ([`attnc_ir::random::standard_normal`]'s first argument).
    pub seed: u64,
    /// The stream (by convention the parameter's index).
    pub stream: u64,
    /// How many values.
    pub len: usize,
}

/// Values per work item of the second phase (an even number: items split at point pairs).
const CHUNK: usize = 1 << 15;

/// One work item of the second phase: the generator where a chunk starts, and its values.
type Chunk<'a> = Mutex<(Rng, &'a mut [f32])>;

/// Draws every stream, on up to `threads` threads; the result is in the order of `streams` and
/// equals `standard_normal(seed, stream, len)` for each.
pub fn standard_normal_streams(streams: &[NormalStream], threads: usize) -> Vec<Vec<f32>> {
    let threads = threads.max(1);
    let states: Vec<Vec<Rng>> = for_each_parallel(streams.len(), threads, |i| {
        let s = streams[i];
        polar_checkpoints(s.seed, s.stream, s.len, CHUNK / 2)
    });
    let mut out: Vec<Vec<f32>> = streams.iter().map(|s| vec![0.0; s.len]).collect();
    let items: Vec<Chunk<'_>> = out
        .iter_mut()
        .zip(states)
        .flat_map(|(values, states)| {
            states
                .into_iter()
                .zip(values.chunks_mut(CHUNK))
                .map(|(rng, v)| Mutex::new((rng, v)))
        })
        .collect();
    for_each_parallel(items.len(), threads, |i| {
        if let Ok(mut item) = items[i].lock() {
            let (rng, values) = &mut *item;
            polar_normals_from(rng, values);
        }
    });
    drop(items);
    out
}

/// `[f(0), …, f(count - 1)]`, the calls spread over up to `threads` threads, each taking
/// the next index when it is free.
fn for_each_parallel<T: Send>(
    count: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let workers = threads.clamp(1, count.max(1));
    if workers == 1 {
        return (0..count).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..count).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let value = f(i);
                if let Ok(mut slots) = results.lock() {
                    slots[i] = Some(value);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|v| v.expect("invariant: every index was computed"))
        .collect()
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
