//! The block selection of `topk_blocks(g, k, b)`: per row of the gate, its `k` largest
//! entries, ties to the lower index, NaN never selected (so a row with fewer than `k` numbers
//! selects only those). Every engine selects through [`select`], so the rule lives here.

use std::cmp::Ordering;

/// Sets `keep[c]` for the `k` columns of `row` that `topk_blocks` selects (and clears the
/// rest); `keep` is as long as `row`. `T` widens to f64 exactly (f32 and f64 rows).
pub fn select<T: Copy + Into<f64>>(row: &[T], k: u64, keep: &mut [bool]) {
    keep.fill(false);
    let value = |c: usize| -> f64 { row[c].into() };
    let mut columns: Vec<usize> = (0..row.len()).filter(|&c| !value(c).is_nan()).collect();
    let k = usize::try_from(k).unwrap_or(usize::MAX).min(columns.len());
    if k == 0 {
        return;
    }
    // Larger first; equal values (including -0 and +0) in column order.
    let order = |&a: &usize, &b: &usize| {
        value(b)
            .partial_cmp(&value(a))
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    };
    if k < columns.len() {
        columns.select_nth_unstable_by(k - 1, order);
    }
    for &c in &columns[..k] {
        keep[c] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picked(row: &[f64], k: u64) -> Vec<usize> {
        let mut keep = vec![true; row.len()];
        select(row, k, &mut keep);
        (0..row.len()).filter(|&c| keep[c]).collect()
    }

    #[test]
    fn largest_first_ties_low_nan_never() {
        assert_eq!(picked(&[1.0, 3.0, 2.0, 3.0], 2), vec![1, 3]);
        assert_eq!(picked(&[1.0, 3.0, 2.0, 3.0], 1), vec![1]);
        assert_eq!(picked(&[5.0, 5.0, 5.0], 2), vec![0, 1]);
        assert_eq!(picked(&[f64::NAN, 0.0, f64::NAN], 3), vec![1]);
        assert_eq!(picked(&[-0.0, 0.0], 1), vec![0]);
        assert_eq!(picked(&[1.0, f64::NEG_INFINITY], 9), vec![0, 1]);
        assert_eq!(picked(&[1.0, 2.0], 0), Vec::<usize>::new());
        assert_eq!(picked(&[], 3), Vec::<usize>::new());
    }
}
