//! Sparse per-segment index: a seq -> file offset point every [`INDEX_INTERVAL_BYTES`], so a catch-up read
//! or a suffix truncation scans at most that many bytes instead of a whole segment.

use crate::entry::LogDigest;
use crate::types::Seq;

/// Distance in bytes between index points (64 KiB: 1 024 points, 24 KiB of memory per 64 MiB segment).
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;

/// One indexed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexPoint {
    /// Sequence of the record.
    pub seq: Seq,
    /// File offset where the record starts.
    pub offset: u64,
    /// Log digest just before this record, so a digest can be rebuilt from here rather than the segment start.
    pub digest_before: LogDigest,
}

/// Index points of one segment, in seq order. The segment's first record is always a point.
#[derive(Debug, Default)]
pub(crate) struct SparseIndex {
    points: Vec<IndexPoint>,
}

impl SparseIndex {
    /// Records that a record starts at `offset`; keeps it if it is the first or far enough from the last point.
    #[inline]
    pub fn note(&mut self, seq: Seq, offset: u64, digest_before: LogDigest) {
        let due = match self.points.last() {
            None => true,
            Some(p) => offset >= p.offset + INDEX_INTERVAL_BYTES,
        };
        if due {
            self.points.push(IndexPoint { seq, offset, digest_before });
        }
    }

    /// The last point at or before `seq`, if any.
    pub fn lookup(&self, seq: Seq) -> Option<IndexPoint> {
        let n = self.points.partition_point(|p| p.seq <= seq);
        n.checked_sub(1).map(|i| self.points[i])
    }

    /// Drops the points of records after `seq` (they were cut).
    pub fn truncate_after(&mut self, seq: Seq) {
        let n = self.points.partition_point(|p| p.seq <= seq);
        self.points.truncate(n);
    }

    /// Number of points (for tests and diagnostics).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_and_spaced_points() {
        let mut ix = SparseIndex::default();
        assert_eq!(ix.lookup(Seq(5)), None);
        let step = INDEX_INTERVAL_BYTES / 4;
        for i in 0..20u64 {
            ix.note(Seq(10 + i), 40 + i * step, LogDigest(i));
        }
        // Points at i = 0, 4, 8, 12, 16.
        assert_eq!(ix.len(), 5);
        assert_eq!(ix.lookup(Seq(9)), None);
        assert_eq!(ix.lookup(Seq(10)).map(|p| p.seq), Some(Seq(10)));
        assert_eq!(ix.lookup(Seq(13)).map(|p| p.seq), Some(Seq(10)));
        let p = ix.lookup(Seq(15)).unwrap();
        assert_eq!((p.seq, p.offset, p.digest_before), (Seq(14), 40 + 4 * step, LogDigest(4)));
        assert_eq!(ix.lookup(Seq(1000)).map(|p| p.seq), Some(Seq(26)));
        ix.truncate_after(Seq(21));
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.lookup(Seq(1000)).map(|p| p.seq), Some(Seq(18)));
    }
}
