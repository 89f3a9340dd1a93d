//! The memory tail: the most recent entries of a log, so shipping live entries never reads disk.

use std::collections::VecDeque;

use crate::entry::Entry;
use crate::types::Seq;

use super::segment::RECORD_HEADER_LEN;

/// A bounded run of the log's last entries, contiguous in seq and ending at the log's `last_seq`.
#[derive(Debug)]
pub(crate) struct MemTail {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
}

/// What one entry costs against the byte budget: its payload plus a record header's worth of overhead.
fn cost(e: &Entry) -> usize {
    e.payload.len() + RECORD_HEADER_LEN
}

impl MemTail {
    /// An empty tail bounded by `max_bytes` and `max_entries`.
    pub fn new(max_bytes: usize, max_entries: usize) -> MemTail {
        MemTail { entries: VecDeque::with_capacity(max_entries.min(4096)), bytes: 0, max_bytes, max_entries }
    }

    /// Adds the entry after the current last one, evicting the oldest entries beyond the budget.
    #[inline]
    pub fn push(&mut self, e: Entry) {
        if self.max_entries == 0 {
            return;
        }
        self.bytes += cost(&e);
        self.entries.push_back(e);
        while self.entries.len() > self.max_entries || (self.bytes > self.max_bytes && !self.entries.is_empty()) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= cost(&old);
            }
        }
    }

    /// Sequence of the oldest entry held.
    pub fn first_seq(&self) -> Option<Seq> {
        self.entries.front().map(|e| e.seq)
    }

    /// The entry at `seq`, if held.
    pub fn get(&self, seq: Seq) -> Option<&Entry> {
        let first = self.first_seq()?;
        let i = seq.0.checked_sub(first.0)?;
        self.entries.get(usize::try_from(i).ok()?)
    }

    /// Entries from `from` on (at least one if any, then up to `max_entries` and `max_bytes` of payload),
    /// or `None` if `from` is older than the tail.
    pub fn read(&self, from: Seq, max_entries: usize, max_bytes: usize) -> Option<Vec<Entry>> {
        let first = self.first_seq()?;
        let skip = usize::try_from(from.0.checked_sub(first.0)?).ok()?;
        let mut out = Vec::with_capacity(max_entries.min(self.entries.len().saturating_sub(skip)));
        let mut bytes = 0usize;
        for e in self.entries.iter().skip(skip) {
            if out.len() >= max_entries || (!out.is_empty() && bytes + e.payload.len() > max_bytes) {
                break;
            }
            bytes += e.payload.len();
            out.push(e.clone());
        }
        Some(out)
    }

    /// Drops entries after `seq` (a suffix truncation).
    pub fn truncate_after(&mut self, seq: Seq) {
        while self.entries.back().is_some_and(|e| e.seq > seq) {
            if let Some(e) = self.entries.pop_back() {
                self.bytes -= cost(&e);
            }
        }
    }

    /// Drops entries before `seq` (retention).
    pub fn drop_before(&mut self, seq: Seq) {
        while self.entries.front().is_some_and(|e| e.seq < seq) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= cost(&e);
            }
        }
    }

    /// Number of entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::Epoch;

    fn e(seq: u64, len: usize) -> Entry {
        Entry::new(Seq(seq), Epoch(1), 0, 0, Bytes::from(vec![7u8; len]))
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let mut t = MemTail::new(1000, 3);
        for s in 1..=5 {
            t.push(e(s, 10));
        }
        assert_eq!((t.len(), t.first_seq()), (3, Some(Seq(3))));
        let mut t = MemTail::new(2 * (100 + RECORD_HEADER_LEN), 100);
        for s in 1..=5 {
            t.push(e(s, 100));
        }
        assert_eq!((t.len(), t.first_seq()), (2, Some(Seq(4))));
        // An entry larger than the whole budget is not kept at all.
        t.push(e(6, 10_000));
        assert_eq!(t.len(), 0);
        let mut off = MemTail::new(1000, 0);
        off.push(e(1, 1));
        assert_eq!(off.first_seq(), None);
    }

    #[test]
    fn reads_and_truncates() {
        let mut t = MemTail::new(usize::MAX, 100);
        for s in 1..=10 {
            t.push(e(s, 10));
        }
        assert!(t.read(Seq(0), 10, 100).is_none());
        let r = t.read(Seq(3), 4, usize::MAX).unwrap();
        assert_eq!(r.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        assert_eq!(t.read(Seq(3), 100, 25).unwrap().len(), 2);
        assert_eq!(t.read(Seq(3), 100, 1).unwrap().len(), 1, "at least one entry whatever max_bytes");
        assert_eq!(t.read(Seq(11), 100, 100).unwrap().len(), 0);
        assert_eq!(t.get(Seq(4)).map(|e| e.seq), Some(Seq(4)));
        t.truncate_after(Seq(7));
        t.drop_before(Seq(3));
        assert_eq!((t.len(), t.first_seq()), (5, Some(Seq(3))));
        assert!(t.get(Seq(8)).is_none());
        t.truncate_after(Seq(0));
        assert_eq!(t.len(), 0);
    }
}
