//! Kept pairs of an attention whose mask reads segment ids (`document(...)`), counted from the
//! ids a benchmark runs on, so that its GFLOP/s are those of the pairs the kernel must compute
//! and not of the whole row.

use std::collections::HashMap;

use attnc_ir::MaskPattern;

/// One batch entry's ids: query row `i` has `queries[i + shift]` (none outside the slice), key
/// `j` has `keys[j]` (the semantics of `MaskPattern::Document`).
pub(super) struct Ids<'a> {
    pub queries: &'a [i32],
    pub keys: &'a [i32],
    pub shift: i64,
}

/// The kept pairs of `pattern` over an `m × n` score matrix with these ids, when the pattern
/// keeps a pair only if its documents agree and the static rest keeps it (documents joined by
/// `&` only, no `topk_blocks`); `None` for any other pattern.
pub(super) fn kept_pairs(pattern: &MaskPattern, m: usize, n: usize, ids: &Ids<'_>) -> Option<u64> {
    if !conjunctive(pattern) {
        return None;
    }
    let rest = without_documents(pattern);
    let mut positions: HashMap<i32, Vec<usize>> = HashMap::new();
    for (j, &id) in ids.keys.iter().take(n).enumerate() {
        positions.entry(id).or_default().push(j);
    }
    let (m64, n64) = (m as i64, n as i64);
    let mut total = 0u64;
    for i in 0..m64 {
        let Some(id) = usize::try_from(i + ids.shift)
            .ok()
            .and_then(|at| ids.queries.get(at))
        else {
            continue;
        };
        let Some(same) = positions.get(id) else {
            continue;
        };
        let ia = i + n64 - m64;
        for (lo, hi) in super::candidates(&rest, ia, n64) {
            let (lo, hi) = (lo as usize, hi as usize);
            let first = same.partition_point(|&j| j < lo);
            let end = same.partition_point(|&j| j < hi);
            total += if super::has_dilated(&rest) {
                same[first..end]
                    .iter()
                    .filter(|&&j| rest.contains(ia, j as i64))
                    .count() as u64
            } else {
                (end - first) as u64
            };
        }
    }
    Some(total)
}

/// Whether every data-dependent part is a document reached through `&` only.
fn conjunctive(p: &MaskPattern) -> bool {
    match p {
        MaskPattern::TopkBlocks { .. } => false,
        MaskPattern::And(a, b) => conjunctive(a) && conjunctive(b),
        MaskPattern::Or(..) => p.is_static(),
        _ => true,
    }
}

/// The pattern with its documents keeping every pair (`global(∞)`).
fn without_documents(p: &MaskPattern) -> MaskPattern {
    match p {
        MaskPattern::Document { .. } => MaskPattern::Global(u64::MAX),
        MaskPattern::And(a, b) => MaskPattern::And(
            Box::new(without_documents(a)),
            Box::new(without_documents(b)),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts by enumeration: the reference for the counting above.
    fn enumerated(p: &MaskPattern, m: usize, n: usize, ids: &Ids<'_>) -> u64 {
        let rest = without_documents(p);
        let mut total = 0;
        for i in 0..m as i64 {
            let ia = i + n as i64 - m as i64;
            let Some(qid) = usize::try_from(i + ids.shift)
                .ok()
                .and_then(|at| ids.queries.get(at))
            else {
                continue;
            };
            for j in 0..n {
                if ids.keys[j] == *qid && rest.contains(ia, j as i64) {
                    total += 1;
                }
            }
        }
        total
    }

    #[test]
    fn counts_agree_with_enumeration() {
        let doc = || Box::new(MaskPattern::Document { q: 0, k: 0 });
        let patterns = [
            MaskPattern::Document { q: 0, k: 0 },
            MaskPattern::And(Box::new(MaskPattern::Causal), doc()),
            MaskPattern::And(doc(), Box::new(MaskPattern::Window(3))),
            MaskPattern::And(Box::new(MaskPattern::Dilated { w: 2, r: 3 }), doc()),
            MaskPattern::And(
                Box::new(MaskPattern::Or(
                    Box::new(MaskPattern::Causal),
                    Box::new(MaskPattern::Global(2)),
                )),
                doc(),
            ),
        ];
        let sorted: Vec<i32> = (0..37).map(|j| j / 10).collect();
        let unsorted: Vec<i32> = (0..37).map(|j| j * 7 % 5).collect();
        for keys in [&sorted, &unsorted] {
            for (m, shift) in [(37usize, 0i64), (5, 32), (1, 36), (0, 37)] {
                let ids = Ids {
                    queries: keys,
                    keys,
                    shift,
                };
                for p in &patterns {
                    assert_eq!(
                        kept_pairs(p, m, 37, &ids),
                        Some(enumerated(p, m, 37, &ids)),
                        "{p:?} m={m}"
                    );
                }
            }
        }
    }

    #[test]
    fn documents_under_or_and_topk_are_not_counted() {
        let ids = Ids {
            queries: &[0, 1],
            keys: &[0, 1],
            shift: 0,
        };
        let or = MaskPattern::Or(
            Box::new(MaskPattern::Causal),
            Box::new(MaskPattern::Document { q: 0, k: 0 }),
        );
        assert_eq!(kept_pairs(&or, 2, 2, &ids), None);
        let topk = MaskPattern::TopkBlocks { g: 0, k: 1, b: 1 };
        assert_eq!(kept_pairs(&topk, 2, 2, &ids), None);
    }
}
