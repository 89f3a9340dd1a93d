//! Sequential record reader over a byte range of a segment file, shared by recovery, catch-up reads and
//! suffix truncation. It reads large chunks and hands out payloads as zero-copy slices of them.
//!
//! It checks only what makes a record parseable (complete header, bounded length, complete payload);
//! the caller checks sequence and checksum with [`check_record`], because what a failure means
//! (torn tail to cut, or corruption) depends on where it happened.

use std::fs::File;
use std::io;

use bytes::Bytes;

use crate::entry::{entry_crc, Entry};
use crate::types::Seq;

use super::fs::read_exact_at;
use super::segment::{RecordHeader, RECORD_HEADER_LEN};

/// One record as read, with its position.
#[derive(Debug)]
pub(crate) struct RawRecord {
    /// File offset where the record starts.
    pub offset: u64,
    /// Bytes the record takes (header + payload).
    pub len: u64,
    /// The entry, with the checksum as stored (not yet verified).
    pub entry: Entry,
}

/// What the scanner found next.
#[derive(Debug)]
pub(crate) enum Scan {
    /// A parseable record.
    Record(RawRecord),
    /// The range ended exactly at a record boundary.
    End,
    /// The bytes at `offset` are not a complete record.
    Bad { offset: u64, reason: String },
}

/// Reads records from `[pos, end)` of a file.
pub(crate) struct Scanner<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
    buf: Bytes,
    buf_start: u64,
    chunk: usize,
    max_entry_bytes: u32,
}

impl<'f> Scanner<'f> {
    /// A scanner of `[pos, end)` reading about `chunk` bytes per system call, refusing lengths above
    /// `max_entry_bytes`.
    pub fn new(file: &'f File, pos: u64, end: u64, chunk: usize, max_entry_bytes: u32) -> Scanner<'f> {
        Scanner {
            file,
            pos,
            end,
            buf: Bytes::new(),
            buf_start: pos,
            chunk: chunk.max(RECORD_HEADER_LEN),
            max_entry_bytes,
        }
    }

    /// Offset of the next record.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The next record. I/O errors (including the file being shorter than `end`) are returned as such.
    pub fn next_record(&mut self) -> io::Result<Scan> {
        let remaining = self.end.saturating_sub(self.pos);
        if remaining == 0 {
            return Ok(Scan::End);
        }
        let offset = self.pos;
        if remaining < RECORD_HEADER_LEN as u64 {
            return Ok(Scan::Bad {
                offset,
                reason: format!("incomplete record header: {remaining} of {RECORD_HEADER_LEN} bytes"),
            });
        }
        let head = self.bytes_at(offset, RECORD_HEADER_LEN)?;
        let mut fixed = [0u8; RECORD_HEADER_LEN];
        fixed.copy_from_slice(&head);
        let h = RecordHeader::decode(&fixed);
        if h.len > self.max_entry_bytes {
            return Ok(Scan::Bad {
                offset,
                reason: format!(
                    "record length {} exceeds the {}-byte limit (max_entry_bytes)",
                    h.len, self.max_entry_bytes
                ),
            });
        }
        let total = RECORD_HEADER_LEN as u64 + u64::from(h.len);
        if remaining < total {
            return Ok(Scan::Bad {
                offset,
                reason: format!("record of {total} bytes cut short: {remaining} bytes left"),
            });
        }
        // `total` <= `remaining` and <= 33 + max_entry_bytes: bounded by the file and the limit.
        let rec = self.bytes_at(offset, total as usize)?;
        self.pos += total;
        Ok(Scan::Record(RawRecord {
            offset,
            len: total,
            entry: Entry {
                seq: h.seq,
                epoch: h.epoch,
                timestamp_us: h.timestamp_us,
                kind: h.kind,
                payload: rec.slice(RECORD_HEADER_LEN..),
                crc: h.crc,
            },
        }))
    }

    /// `n` bytes at file offset `off` (inside `[pos, end)`), from the current chunk or a fresh read.
    fn bytes_at(&mut self, off: u64, n: usize) -> io::Result<Bytes> {
        let have_end = self.buf_start + self.buf.len() as u64;
        if off >= self.buf_start && off + n as u64 <= have_end {
            let at = (off - self.buf_start) as usize;
            return Ok(self.buf.slice(at..at + n));
        }
        let want = (self.chunk.max(n) as u64).min(self.end - off) as usize;
        let mut v = vec![0u8; want];
        read_exact_at(self.file, &mut v, off)?;
        self.buf = Bytes::from(v);
        self.buf_start = off;
        Ok(self.buf.slice(0..n))
    }
}

/// Bytes [`find_intact_record`] reads at a time: its memory stays bounded whatever the file's size.
const SEARCH_WINDOW: usize = 4 * 1024 * 1024;

/// The first intact record (complete, checksum valid) at or after `from` in `[from, end)` whose
/// sequence is at least `min_seq`, found by trying every byte offset; its length may exceed the
/// configured `max_entry_bytes` (an entry written under a larger limit is intact, not damage).
/// Recovery asks it whether damage in the last segment has intact entries after it, which a torn
/// write never leaves.
///
/// Only candidates whose sequence could be there (at most one record per
/// [`RECORD_HEADER_LEN`] bytes after `min_seq`) get their checksum computed: inside random payload
/// bytes almost no offset passes, so the search costs one pass over the range, not a checksum per
/// byte. The range is read [`SEARCH_WINDOW`] bytes at a time, and holes (a file extended without
/// being written, which reads as zeros) are skipped: a damaged size of a terabyte costs neither a
/// terabyte of memory nor a pass over it.
pub(crate) fn find_intact_record(file: &File, from: u64, end: u64, min_seq: Seq) -> io::Result<Option<(u64, Seq)>> {
    let max_seq = Seq(min_seq.0.saturating_add(end.saturating_sub(from) / RECORD_HEADER_LEN as u64));
    let mut buf = Vec::new();
    let mut start = from;
    while start.saturating_add(RECORD_HEADER_LEN as u64) <= end {
        match next_data(file, start) {
            // A header may begin in the hole's last bytes and hold its sequence in the data.
            // Only a hole is left in the range, and zeros never verify.
            Some(data) if data >= end => return Ok(None),
            Some(data) => start = start.max(data.saturating_sub(RECORD_HEADER_LEN as u64)),
            None => return Ok(None),
        }
        // The window's candidates start in its first SEARCH_WINDOW bytes; it reads one header more.
        let len = (end - start).min((SEARCH_WINDOW + RECORD_HEADER_LEN - 1) as u64) as usize;
        if len < RECORD_HEADER_LEN {
            break;
        }
        buf.resize(len, 0);
        read_exact_at(file, &mut buf, start)?;
        for at in 0..(len - RECORD_HEADER_LEN + 1).min(SEARCH_WINDOW) {
            let mut fixed = [0u8; RECORD_HEADER_LEN];
            fixed.copy_from_slice(&buf[at..at + RECORD_HEADER_LEN]);
            let h = RecordHeader::decode(&fixed);
            let offset = start + at as u64;
            let payload_at = offset + RECORD_HEADER_LEN as u64;
            if !(min_seq..=max_seq).contains(&h.seq) || payload_at + u64::from(h.len) > end {
                continue;
            }
            let head = entry_crc(h.seq, h.epoch, h.timestamp_us, h.kind, &[]);
            let crc = match buf.get(at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + h.len as usize) {
                Some(payload) => crc32c::crc32c_append(head, payload),
                None => crc_of_file_range(file, head, payload_at, u64::from(h.len))?,
            };
            if crc == h.crc {
                return Ok(Some((offset, h.seq)));
            }
        }
        start += SEARCH_WINDOW as u64;
    }
    Ok(None)
}

/// `crc` extended over `len` bytes of `file` at `at`, read a window at a time.
fn crc_of_file_range(file: &File, mut crc: u32, mut at: u64, mut len: u64) -> io::Result<u32> {
    let mut buf = vec![0u8; (len as usize).min(SEARCH_WINDOW)];
    while len > 0 {
        let n = (len as usize).min(buf.len());
        read_exact_at(file, &mut buf[..n], at)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
        len -= n as u64;
    }
    Ok(crc)
}

/// The first offset at or after `at` that is not in a hole, `None` if only holes follow; `at`
/// itself where the file system cannot tell.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn next_data(file: &File, at: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let Ok(offset) = libc::off_t::try_from(at) else { return Some(at) };
    // SAFETY: the descriptor is open for the lifetime of `file`; lseek reads no memory of ours.
    // Reads elsewhere are positioned (pread), so moving the file offset disturbs nothing.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    if found >= 0 {
        return Some(found as u64);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        // No SEEK_DATA here (EINVAL): search every byte.
        _ => Some(at),
    }
}

/// Without `SEEK_DATA`, every byte is searched.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn next_data(_file: &File, at: u64) -> Option<u64> {
    Some(at)
}

/// Checks a record read from disk is the entry expected at `expected`: right sequence, valid checksum.
pub(crate) fn check_record(e: &Entry, expected: Seq) -> Result<(), String> {
    check_seq(e, expected)?;
    check_checksum(e)
}

/// The sequence half of [`check_record`].
pub(crate) fn check_seq(e: &Entry, expected: Seq) -> Result<(), String> {
    if e.seq != expected {
        return Err(format!("expected entry {expected}, found entry {}", e.seq));
    }
    // `Seq::next` saturates there: an entry at it would be followed by a second one.
    if e.seq == Seq(u64::MAX) {
        return Err(format!("entry {} is past the last sequence a log may hold", e.seq));
    }
    Ok(())
}

/// The checksum half of [`check_record`].
pub(crate) fn check_checksum(e: &Entry) -> Result<(), String> {
    if !e.verify() {
        return Err(format!("checksum mismatch in entry {}", e.seq));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::types::Epoch;
    use crate::wal::segment::encode_record;

    fn file_with(records: &[Entry], junk: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut buf = Vec::new();
        for e in records {
            encode_record(&mut buf, e);
        }
        let good = buf.len() as u64;
        buf.extend_from_slice(junk);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&buf).unwrap();
        (f, good)
    }

    fn entries(n: u64) -> Vec<Entry> {
        (1..=n).map(|s| Entry::new(Seq(s), Epoch(1), s, 2, Bytes::from(vec![s as u8; s as usize * 3]))).collect()
    }

    #[test]
    fn reads_across_small_chunks() {
        let es = entries(20);
        let (f, good) = file_with(&es, &[]);
        for chunk in [1, 40, 100, 1 << 20] {
            let mut s = Scanner::new(f.as_file(), 0, good, chunk, 1024);
            for (i, want) in es.iter().enumerate() {
                match s.next_record().unwrap() {
                    Scan::Record(r) => {
                        assert_eq!(&r.entry, want);
                        check_record(&r.entry, Seq(i as u64 + 1)).unwrap();
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(matches!(s.next_record().unwrap(), Scan::End));
            assert_eq!(s.pos(), good);
        }
    }

    #[test]
    fn reports_bad_tails_without_allocating() {
        let es = entries(3);
        // A length of 4 GiB must be refused from the header alone.
        let (f, good) = file_with(&es, &[0xff; 40]);
        let mut s = Scanner::new(f.as_file(), 0, good + 40, 64, 1024);
        for _ in 0..3 {
            assert!(matches!(s.next_record().unwrap(), Scan::Record(_)));
        }
        match s.next_record().unwrap() {
            Scan::Bad { offset, reason } => {
                assert_eq!(offset, good);
                assert!(reason.contains("exceeds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let (f, good) = file_with(&es, &[1, 2, 3]);
        let mut s = Scanner::new(f.as_file(), 0, good + 3, 64, 1024);
        for _ in 0..3 {
            s.next_record().unwrap();
        }
        assert!(matches!(s.next_record().unwrap(), Scan::Bad { offset, .. } if offset == good));
    }

    #[test]
    fn check_record_catches_seq_and_crc() {
        let e = Entry::new(Seq(4), Epoch(1), 0, 0, Bytes::from_static(b"x"));
        assert!(check_record(&e, Seq(4)).is_ok());
        assert!(check_record(&e, Seq(5)).is_err());
        let bad = Entry { crc: e.crc ^ 1, ..e };
        assert!(check_record(&bad, Seq(4)).unwrap_err().contains("checksum"));
    }

    #[test]
    fn finds_a_record_straddling_a_search_window() {
        let mut junk = vec![0xa5u8; SEARCH_WINDOW - 10];
        let e = Entry::new(Seq(7), Epoch(1), 0, 2, Bytes::from(vec![9u8; 100]));
        encode_record(&mut junk, &e);
        let (f, _) = file_with(&[], &junk);
        let end = junk.len() as u64;
        assert_eq!(find_intact_record(f.as_file(), 0, end, Seq(7)).unwrap(), Some((SEARCH_WINDOW as u64 - 10, Seq(7))));
        assert_eq!(find_intact_record(f.as_file(), 0, end, Seq(8)).unwrap(), None, "below min_seq");
        assert_eq!(find_intact_record(f.as_file(), 0, end - 1, Seq(7)).unwrap(), None, "cut short");
    }

    /// A segment whose size was damaged to a terabyte (a hole): searched in bounded memory and
    /// without reading the hole.
    #[test]
    fn skips_holes_and_finds_what_follows_them() {
        let es = entries(3);
        let (f, good) = file_with(&es, &[]);
        let far = 1u64 << 39;
        let mut rec = Vec::new();
        encode_record(&mut rec, &Entry::new(Seq(9), Epoch(1), 0, 2, Bytes::from_static(b"after the hole")));
        crate::wal::fs::write_all_at(f.as_file(), &rec, far).unwrap();
        f.as_file().set_len(1 << 40).unwrap();
        assert_eq!(find_intact_record(f.as_file(), good, 1 << 40, Seq(4)).unwrap(), Some((far, Seq(9))));
        // A range that ends in the hole, with data after it.
        assert_eq!(find_intact_record(f.as_file(), good + 7, 8 << 20, Seq(4)).unwrap(), None);
        f.as_file().set_len(far).unwrap();
        f.as_file().set_len(1 << 40).unwrap();
        assert_eq!(find_intact_record(f.as_file(), good, 1 << 40, Seq(4)).unwrap(), None);
    }
}
