//! Splitting batches by size. PostgreSQL caps a single array (and so one `unnest` INSERT) at
//! 1 GB, and the worker's memory should not follow message sizes either: batches are bounded
//! in bytes as well as in count.

/// Split `items` into consecutive runs whose sizes add up to at most `max_bytes`. An item
/// larger than `max_bytes` is a run of its own; no run is empty.
pub fn chunks_by_size<T>(items: &[T], max_bytes: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && bytes.saturating_add(n) > max_bytes {
            chunks.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(n);
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sizes: &[usize], max: usize) -> Vec<Vec<usize>> {
        chunks_by_size(sizes, max, |s| *s)
            .into_iter()
            .map(|c| c.to_vec())
            .collect()
    }

    #[test]
    fn empty_input_gives_no_chunks() {
        assert!(split(&[], 10).is_empty());
    }

    #[test]
    fn fits_in_one() {
        assert_eq!(split(&[3, 3, 4], 10), vec![vec![3, 3, 4]]);
    }

    #[test]
    fn splits_at_the_budget() {
        assert_eq!(
            split(&[4, 4, 4, 4, 4], 10),
            vec![vec![4, 4], vec![4, 4], vec![4]]
        );
    }

    #[test]
    fn oversized_item_is_alone() {
        assert_eq!(
            split(&[1, 50, 1, 1], 10),
            vec![vec![1], vec![50], vec![1, 1]]
        );
        assert_eq!(split(&[50], 10), vec![vec![50]]);
    }

    #[test]
    fn zero_sized_items_stay_together() {
        assert_eq!(split(&[0, 0, 0], 0), vec![vec![0, 0, 0]]);
    }

    #[test]
    fn every_item_kept_in_order() {
        let sizes: Vec<usize> = (0..1000).map(|i| (i * 7919) % 100).collect();
        let chunks = split(&sizes, 250);
        assert_eq!(chunks.concat(), sizes);
        for c in &chunks {
            assert!(c.len() == 1 || c.iter().sum::<usize>() <= 250);
        }
    }
}
