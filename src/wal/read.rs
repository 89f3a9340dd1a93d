//! Reading entries back from segment files (catch-up of a replica that is behind the memory tail).
//!
//! A read is planned under the log's lock (which segments, from which offset) and performed without it.
//! It starts at the best known position at or before `from`: the sparse index point, or better, where a
//! previous read stopped (catch-up reads are sequential, so the next one usually starts exactly there).
//! Each read call is sized from the segment's average record length, so a small read does not pull in
//! megabytes, and a few sealed segments' file handles are kept open between reads.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use crate::entry::Entry;
use crate::types::Seq;

use super::error::{IoContext, WalError};
use super::scan::{check_checksum, check_seq, Scan, Scanner};
use super::segment::{Segment, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Bounds of one read system call.
const CHUNK_MIN: usize = 4 * 1024;
const CHUNK_MAX: usize = 4 * 1024 * 1024;
/// Positions where recent reads stopped, kept to resume from (one per concurrent reader, roughly).
const HINTS: usize = 8;
/// Sealed segments kept open for reading.
const OPEN_FILES: usize = 4;

/// A known record position: entry `seq` starts at `offset` in the segment starting at `segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub segment: Seq,
    pub seq: Seq,
    pub offset: u64,
}

/// Resume positions and open handles shared by the reads of one log. Lives under the log's lock.
#[derive(Debug, Default)]
pub(crate) struct ReadCache {
    hints: VecDeque<Position>,
    files: VecDeque<(Seq, Arc<File>)>,
}

impl ReadCache {
    /// The best hint in segment `segment` at or before `from`.
    fn hint(&self, segment: Seq, from: Seq) -> Option<Position> {
        self.hints.iter().filter(|h| h.segment == segment && h.seq <= from).max_by_key(|h| h.seq).copied()
    }

    /// Remembers where a read stopped and the sealed segment file it opened.
    pub fn remember(&mut self, stop: Option<Position>, opened: Vec<(Seq, Arc<File>)>) {
        if let Some(p) = stop {
            self.hints.retain(|h| h.seq != p.seq);
            if self.hints.len() == HINTS {
                self.hints.pop_front();
            }
            self.hints.push_back(p);
        }
        for (segment, file) in opened {
            if self.files.iter().all(|(s, _)| *s != segment) {
                if self.files.len() == OPEN_FILES {
                    self.files.pop_front();
                }
                self.files.push_back((segment, file));
            }
        }
    }

    /// Forgets everything about segments starting before `first` (deleted by retention).
    pub fn forget_before(&mut self, first: Seq) {
        self.hints.retain(|h| h.segment >= first);
        self.files.retain(|(s, _)| *s >= first);
    }

    /// Forgets everything (after a suffix truncation rewrote offsets).
    pub fn clear(&mut self) {
        self.hints.clear();
        self.files.clear();
    }
}

/// One segment's share of a read.
pub(crate) struct ReadPart {
    path: PathBuf,
    segment: Seq,
    /// An open handle (the active segment's, or a cached one); otherwise opened by path.
    file: Option<Arc<File>>,
    start: Position,
    end_offset: u64,
    chunk: usize,
}

/// Plans a read of `from..` (`from` is inside `segments`, `max_entries >= 1`).
pub(crate) fn plan<'a>(
    segments: impl Iterator<Item = &'a Segment>,
    active: (Seq, &Arc<File>),
    cache: &ReadCache,
    from: Seq,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<ReadPart> {
    let mut parts = Vec::new();
    let (mut entries, mut bytes) = (0u64, 0u64);
    for seg in segments.skip_while(|s| s.last_seq < from) {
        if seg.entries() == 0 || entries >= max_entries as u64 || (entries > 0 && bytes > max_bytes as u64) {
            break;
        }
        let mut start = Position { segment: seg.first_seq, seq: seg.first_seq, offset: SEGMENT_HEADER_LEN };
        if entries == 0 {
            if let Some(p) = seg.index.lookup(from) {
                start = Position { segment: seg.first_seq, seq: p.seq, offset: p.offset };
            }
            if let Some(h) = cache.hint(seg.first_seq, from).filter(|h| h.seq > start.seq) {
                start = h;
            }
        }
        // Size reads from the segment's average record: what is skipped to reach `from`, plus what the
        // limits allow.
        let avg = (seg.len - SEGMENT_HEADER_LEN) / seg.entries().max(1);
        let skip = from.0.saturating_sub(start.seq.0).saturating_mul(avg);
        let want = (max_entries as u64)
            .saturating_mul(avg)
            .min((max_bytes as u64).saturating_add((max_entries as u64).saturating_mul(RECORD_HEADER_LEN as u64)));
        let chunk = skip.saturating_add(want).saturating_add(avg).clamp(CHUNK_MIN as u64, CHUNK_MAX as u64) as usize;
        let file = if seg.first_seq == active.0 {
            Some(active.1.clone())
        } else {
            cache.files.iter().find(|(s, _)| *s == seg.first_seq).map(|(_, f)| f.clone())
        };
        parts.push(ReadPart {
            path: seg.path.clone(),
            segment: seg.first_seq,
            file,
            start,
            end_offset: seg.len,
            chunk,
        });
        // An upper bound on what the read needs (the first segment's bytes before `from` are not counted):
        // the read stops at the limits and never opens the parts it does not reach.
        if entries > 0 {
            bytes += seg.payload_bytes();
        }
        entries += seg.last_seq.0 + 1 - from.max(seg.first_seq).0;
    }
    parts
}

/// What a read returned and learned.
pub(crate) struct ReadOutcome {
    pub entries: Vec<Entry>,
    /// Where the read stopped inside a segment (the next read likely starts there).
    pub stop: Option<Position>,
    /// Sealed segment files it opened.
    pub opened: Vec<(Seq, Arc<File>)>,
}

/// Reads `from..` out of the planned parts, verifying every returned entry's checksum and sequence.
/// `gone` builds the error for a segment deleted by retention after the plan was made.
pub(crate) fn read(
    parts: Vec<ReadPart>,
    from: Seq,
    max_entries: usize,
    max_bytes: usize,
    max_entry_bytes: u32,
    gone: impl Fn(Seq) -> WalError,
) -> Result<ReadOutcome, WalError> {
    let mut out = ReadOutcome { entries: Vec::new(), stop: None, opened: Vec::new() };
    let mut bytes = 0usize;
    'parts: for part in parts {
        let file = match part.file {
            Some(f) => f,
            None => match File::open(&part.path) {
                Ok(f) => {
                    let f = Arc::new(f);
                    out.opened.push((part.segment, f.clone()));
                    f
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone(from.max(part.start.seq))),
                Err(e) => return Err(WalError::io("open segment", &part.path, e)),
            },
        };
        let mut scanner = Scanner::new(&file, part.start.offset, part.end_offset, part.chunk, max_entry_bytes);
        let mut expected = part.start.seq;
        loop {
            let rec = match scanner.next_record().ctx("read segment", &part.path)? {
                Scan::End => break,
                Scan::Bad { offset, reason } => return Err(WalError::corruption(&part.path, offset, reason)),
                Scan::Record(r) => r,
            };
            let e = rec.entry;
            let corrupt = |reason| WalError::corruption(&part.path, rec.offset, reason);
            // Sequence first, also for the records skipped to reach `from`; checksums of returned ones.
            check_seq(&e, expected).map_err(corrupt)?;
            if e.seq < from {
                expected = expected.next();
                continue;
            }
            if out.entries.len() >= max_entries || (!out.entries.is_empty() && bytes + e.payload.len() > max_bytes) {
                out.stop = Some(Position { segment: part.segment, seq: e.seq, offset: rec.offset });
                break 'parts;
            }
            check_checksum(&e).map_err(corrupt)?;
            expected = expected.next();
            bytes += e.payload.len();
            out.entries.push(e);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_recent_hints_and_files() {
        let mut c = ReadCache::default();
        let f = Arc::new(tempfile::tempfile().unwrap());
        for i in 0..20u64 {
            let p = Position { segment: Seq(1 + i / 10 * 10), seq: Seq(1 + i), offset: 40 + i };
            c.remember(Some(p), vec![(p.segment, f.clone())]);
        }
        assert_eq!(c.hints.len(), HINTS);
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.hint(Seq(11), Seq(15)).map(|h| h.seq), Some(Seq(15)));
        assert_eq!(c.hint(Seq(11), Seq(100)).map(|h| h.seq), Some(Seq(20)));
        assert_eq!(c.hint(Seq(1), Seq(5)), None, "evicted");
        c.forget_before(Seq(11));
        assert_eq!(c.files.len(), 1);
        c.clear();
        assert_eq!(c.hint(Seq(11), Seq(15)), None);
    }
}
