//! Segment operands of `document(...)` and `topk_blocks(...)` patterns: their shape rule and
//! how a batch entry of the scores finds its row of segment ids (or its gate matrix).
//!
//! A segment operand is `i32[lead.., len]`: `len` is `n` (keys; also the queries of
//! `document(seg)`, read at `i' = i + n - m`) or `m` (the queries of `document(qseg, kseg)`).
//! Its leading axes are matched against the scores' batch axes FROM THE LEFT, each equal or
//! 1: one layout per sequence (`i32[b, n]`) serves every head of `f32[b, h, n, n]`, and
//! `i32[n]` serves every batch entry. (Right alignment, as NumPy does, would pair `b` with `h`.)

use crate::fused::Extent;
use crate::pattern::MaskPattern;

/// Which length a segment operand must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `document(seg)`: key ids, read for the queries at `i'`: length `n`.
    Aligned,
    /// The first operand of `document(qseg, kseg)`: length `m`.
    Queries,
    /// The second operand of `document(qseg, kseg)`: length `n`.
    Keys,
    /// The gate of `topk_blocks(g, k, b)` with this block size: a float tensor
    /// `[.., ceil(m/b), ceil(n/b)]`.
    Gate(u64),
}

/// The role each segment operand of `pattern` plays, by index (`None`: not read).
pub fn roles<S>(pattern: &MaskPattern<S>) -> Vec<Option<Role>> {
    let mut out = vec![None; pattern.segments()];
    visit(pattern, &mut |p| match *p {
        MaskPattern::Document { q, k } if q == k => out[q] = Some(Role::Aligned),
        MaskPattern::Document { q, k } => {
            out[q] = Some(Role::Queries);
            out[k] = Some(Role::Keys);
        }
        MaskPattern::TopkBlocks { g, b, .. } => out[g] = Some(Role::Gate(b)),
        _ => {}
    });
    out
}

/// Calls `f` on every leaf of `p`.
pub fn visit<S>(p: &MaskPattern<S>, f: &mut impl FnMut(&MaskPattern<S>)) {
    match p {
        MaskPattern::And(a, b) | MaskPattern::Or(a, b) => {
            visit(a, f);
            visit(b, f);
        }
        leaf => f(leaf),
    }
}

/// Checks segment operands of `segments` shapes against the scores' `batch`, `m` and `n`.
pub fn check<D: Extent>(
    roles: &[Option<Role>],
    batch: &[D],
    m: &D,
    n: &D,
    segments: &[&[D]],
) -> Result<(), String> {
    if roles.len() != segments.len() {
        return Err(format!(
            "the pattern reads {} segment operands, not {}",
            roles.len(),
            segments.len()
        ));
    }
    for (index, (role, shape)) in roles.iter().zip(segments).enumerate() {
        if let Some(Role::Gate(b)) = role {
            check_gate(index, *b, batch, m, n, shape)?;
            continue;
        }
        let Some((len, lead)) = shape.split_last() else {
            return Err(format!(
                "segment operand g{index} has rank 0, not at least 1"
            ));
        };
        let (want, what) = match role {
            Some(Role::Queries) => (m, "queries"),
            _ => (n, "keys"),
        };
        if len != want {
            return Err(format!(
                "segment operand g{index} has length {len}, but there are {want} {what}"
            ));
        }
        if !prefix_fits(lead, batch) {
            return Err(format!(
                "the leading axes of segment operand g{index} do not match the leading batch axes"
            ));
        }
    }
    Ok(())
}

/// The gate operand `g{index}` of block size `b` has shape `[lead.., ceil(m/b), ceil(n/b)]`.
fn check_gate<D: Extent>(
    index: usize,
    b: u64,
    batch: &[D],
    m: &D,
    n: &D,
    shape: &[D],
) -> Result<(), String> {
    let Some((lead, [rows, cols])) = shape.len().checked_sub(2).map(|r| shape.split_at(r)) else {
        return Err(format!(
            "gate operand g{index} has rank {}, not at least 2",
            shape.len()
        ));
    };
    let (want_rows, want_cols) = (m.blocks(b), n.blocks(b));
    // A gate `[.., r, c]` binds symbols of its own: it is checked again once they are bound.
    let differ = |a: &D, b: &D| a != b && a.known() && b.known();
    if differ(rows, &want_rows) || differ(cols, &want_cols) {
        return Err(format!(
            "gate operand g{index} is {rows} × {cols}, but {m} queries and {n} keys in blocks of {b} make {want_rows} × {want_cols}"
        ));
    }
    if !prefix_fits(lead, batch) {
        return Err(format!(
            "the leading axes of gate operand g{index} do not match the leading batch axes"
        ));
    }
    Ok(())
}

/// Whether `lead` matches the first axes of `batch`, each equal or 1.
pub fn prefix_fits<D: Extent>(lead: &[D], batch: &[D]) -> bool {
    lead.len() <= batch.len() && lead.iter().zip(batch).all(|(a, b)| a == b || a.is_one())
}

/// [`check`] for the scores of a mask node: shape `[batch.., m, n]`.
pub fn check_mask<S, D: Extent>(
    pattern: &MaskPattern<S>,
    scores: &[D],
    segments: &[&[D]],
) -> Result<(), String> {
    let rank = scores.len();
    if rank < 2 {
        return Err("the scores have rank below 2".to_string());
    }
    let (batch, mn) = scores.split_at(rank - 2);
    check(&roles(pattern), batch, &mn[0], &mn[1], segments)
}

/// The row of ids (element offset of its first) of a segment operand with bound leading axes
/// `lead` for the batch entry at multi-index `batch` (the scores' batch axes).
pub fn row_offset(lead: &[usize], len: usize, batch: &[usize]) -> usize {
    let mut offset = 0;
    for (&size, &at) in lead.iter().zip(batch) {
        offset = offset * size + if size == 1 { 0 } else { at };
    }
    offset * len
}

/// The multi-index of flat batch entry `flat` over batch axes `batch`.
pub fn unflatten(batch: &[usize], mut flat: usize) -> Vec<usize> {
    let mut out = vec![0; batch.len()];
    for (slot, &size) in out.iter_mut().zip(batch).rev() {
        if size > 0 {
            *slot = flat % size;
            flat /= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_axes_match_from_the_left() {
        let doc = MaskPattern::<u64>::Document { q: 0, k: 0 };
        // i32[n] and i32[b, n] against [b, h, n, n].
        assert!(check_mask(&doc, &[2usize, 8, 5, 5], &[&[5]]).is_ok());
        assert!(check_mask(&doc, &[2usize, 8, 5, 5], &[&[2, 5]]).is_ok());
        assert!(check_mask(&doc, &[2usize, 8, 5, 5], &[&[8, 5]]).is_err());
        assert!(check_mask(&doc, &[2usize, 8, 5, 5], &[&[4]]).is_err());
        let two = MaskPattern::<u64>::Document { q: 0, k: 1 };
        assert!(check_mask(&two, &[3usize, 7], &[&[3], &[7]]).is_ok());
        assert!(check_mask(&two, &[3usize, 7], &[&[7], &[7]]).is_err());
        // Entry (1, 5) of [2, 8] reads row 1 of i32[2, n] and row 0 of i32[1, n].
        assert_eq!(row_offset(&[2], 5, &[1, 5]), 5);
        assert_eq!(row_offset(&[1], 5, &[1, 5]), 0);
        assert_eq!(unflatten(&[2, 8], 13), vec![1, 5]);
        // A gate of blocks of 4 over 5 queries and 9 keys is [.., 2, 3].
        let topk = MaskPattern::<u64>::TopkBlocks { g: 0, k: 1, b: 4 };
        assert!(check_mask(&topk, &[2usize, 5, 9], &[&[2, 2, 3]]).is_ok());
        assert!(check_mask(&topk, &[2usize, 5, 9], &[&[2, 3]]).is_ok());
        assert!(check_mask(&topk, &[2usize, 5, 9], &[&[2, 3, 3]]).is_err());
        assert!(check_mask(&topk, &[2usize, 5, 9], &[&[3]]).is_err());
    }
}
