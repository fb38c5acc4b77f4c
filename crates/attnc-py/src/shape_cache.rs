//! Compiled code by the input shapes it was specialized to, most recently used first.
//!
//! Machine code is specialized to bound shapes, so a kernel called at several shapes holds one
//! compiled plan per shape. The cache is keyed by the inputs' shapes (which, with the kernel's
//! fixed `shapes=` values, determine every binding) and compared element by element: a call at
//! a shape seen before costs a short scan, no hashing and no binding. It holds at most
//! `capacity` plans; the least recently used one is dropped past that (a decoding loop whose
//! key length grows every step would otherwise keep every step's code).

/// Plans by input shapes, most recently used first.
#[derive(Debug)]
pub struct ShapeCache<T> {
    entries: Vec<(Vec<Vec<usize>>, T)>,
    capacity: usize,
}

impl<T: Clone> ShapeCache<T> {
    /// An empty cache holding at most `capacity` plans (at least one).
    pub fn new(capacity: usize) -> ShapeCache<T> {
        ShapeCache {
            entries: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    /// The plan for these input shapes, made the most recently used.
    pub fn get<S: AsRef<[usize]>>(&mut self, shapes: &[S]) -> Option<T> {
        let index = self.entries.iter().position(|(key, _)| {
            key.len() == shapes.len() && key.iter().zip(shapes).all(|(a, b)| a == b.as_ref())
        })?;
        let entry = self.entries.remove(index);
        let value = entry.1.clone();
        self.entries.insert(0, entry);
        Some(value)
    }

    /// Stores `value` for `shapes` unless a plan for them is there already (another thread
    /// compiled the same shapes meanwhile); returns the plan kept.
    pub fn insert(&mut self, shapes: Vec<Vec<usize>>, value: T) -> T {
        if let Some(kept) = self.get(&shapes) {
            return kept;
        }
        self.entries.insert(0, (shapes, value.clone()));
        self.entries.truncate(self.capacity);
        value
    }

    /// The plans after the `recent` most recently used, most recent first.
    pub fn older(&self, recent: usize) -> impl Iterator<Item = &T> {
        self.entries.iter().skip(recent).map(|(_, v)| v)
    }

    /// The most recently used plan.
    pub fn latest(&self) -> Option<&T> {
        self.entries.first().map(|(_, v)| v)
    }

    /// The number of plans held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no plan is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every plan.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_by_shape_and_keeps_the_most_recent() {
        let mut cache = ShapeCache::new(2);
        assert_eq!(cache.insert(vec![vec![1, 2]], "a"), "a");
        assert_eq!(cache.insert(vec![vec![3]], "b"), "b");
        assert_eq!(cache.get(&[[1usize, 2]]), Some("a"));
        assert_eq!(cache.latest(), Some(&"a"));
        // "b" is now the least recently used and goes first.
        cache.insert(vec![vec![4]], "c");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&[[3usize]]), None);
        assert_eq!(cache.get(&[[1usize, 2]]), Some("a"));
    }

    #[test]
    fn a_second_insert_of_the_same_shapes_keeps_the_first_plan() {
        let mut cache = ShapeCache::new(4);
        cache.insert(vec![vec![2], vec![0, 5]], 1);
        assert_eq!(cache.insert(vec![vec![2], vec![0, 5]], 2), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn shapes_differing_in_rank_or_count_miss() {
        let mut cache = ShapeCache::new(4);
        cache.insert(vec![vec![2, 3]], 1);
        assert_eq!(cache.get(&[vec![2usize, 3, 1]]), None);
        assert_eq!(cache.get(&[vec![2usize, 3], vec![1]]), None);
        assert_eq!(cache.get::<Vec<usize>>(&[]), None);
        cache.clear();
        assert!(cache.is_empty());
    }
}
