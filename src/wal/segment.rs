//! The segment file format: file names, the fixed header, the record layout. Byte-level spec: `docs/WAL.md`.

use std::path::PathBuf;

use crate::entry::{Entry, LogDigest};
use crate::types::{Epoch, Seq};

use super::index::SparseIndex;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WSHPWAL1";
/// Version of the segment format written by this build; other versions are refused.
pub const SEGMENT_VERSION: u32 = 1;
/// Size of the segment header in bytes; the first record starts here.
pub const SEGMENT_HEADER_LEN: u64 = 40;
/// Size of a record's fixed part (before the payload) in bytes.
pub const RECORD_HEADER_LEN: usize = 33;

/// Extension of segment files.
const EXT: &str = ".wal";
/// Digits of the zero-padded first sequence in a segment's name (`u64::MAX` has 20).
const NAME_DIGITS: usize = 20;

/// File name of the segment whose first entry is `first`: `00000000000000000001.wal`.
///
/// Zero padding makes lexicographic order the sequence order, so a plain `ls` lists the log in order.
pub fn segment_file_name(first: Seq) -> String {
    format!("{:020}{EXT}", first.0)
}

/// The first sequence named by a segment file name, or `None` if `name` is not exactly a segment name
/// (20 digits, `.wal`, sequence at least 1).
pub fn parse_segment_name(name: &str) -> Option<Seq> {
    let digits = name.strip_suffix(EXT)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (seq >= 1).then_some(Seq(seq))
}

/// The fixed header at the start of every segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// Sequence of the segment's first record (also in its name).
    pub first_seq: Seq,
    /// Log digest just before `first_seq`, so the digest chain survives deleting earlier segments.
    pub base_digest: LogDigest,
}

impl SegmentHeader {
    /// Header bytes: magic | version u32 | reserved u32 | first_seq u64 | base_digest u64 | crc32c u32 | pad u32.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        // 12..16 reserved, zero.
        b[16..24].copy_from_slice(&self.first_seq.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_digest.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The format version of a valid header of another version than this build's (written by
    /// another release): not damage, so recovery says so apart from corruption.
    pub fn other_version(b: &[u8; SEGMENT_HEADER_LEN as usize]) -> Option<u32> {
        let valid = b[0..8] == SEGMENT_MAGIC && u32_at(b, 32) == crc32c::crc32c(&b[0..32]);
        let version = u32_at(b, 8);
        (valid && version != SEGMENT_VERSION).then_some(version)
    }

    /// Parses and checks a header; the error is the reason it is not one.
    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN as usize]) -> Result<SegmentHeader, String> {
        if b[0..8] != SEGMENT_MAGIC {
            return Err(format!("bad magic {:02x?}, not a walship segment", &b[0..8]));
        }
        let stored = u32_at(b, 32);
        let actual = crc32c::crc32c(&b[0..32]);
        if stored != actual {
            return Err(format!("header checksum mismatch (stored {stored:08x}, computed {actual:08x})"));
        }
        let version = u32_at(b, 8);
        if version != SEGMENT_VERSION {
            return Err(format!("segment format version {version}; this build reads only {SEGMENT_VERSION}"));
        }
        let first_seq = Seq(u64_at(b, 16));
        if first_seq == Seq::ZERO {
            return Err("header first_seq is 0; sequences start at 1".into());
        }
        // No log reaches it by appending; a segment starting there could hold no entry after it.
        if first_seq == Seq(u64::MAX) {
            return Err("header first_seq is u64::MAX, past the last sequence a log may hold".into());
        }
        Ok(SegmentHeader { first_seq, base_digest: LogDigest(u64_at(b, 24)) })
    }
}

/// The fixed part of a record, as read from disk (not yet checked against anything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub len: u32,
    pub crc: u32,
    pub seq: Seq,
    pub epoch: Epoch,
    pub timestamp_us: u64,
    pub kind: u8,
}

impl RecordHeader {
    /// Reads the fixed part of a record from its first [`RECORD_HEADER_LEN`] bytes.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        RecordHeader {
            len: u32_at(b, 0),
            crc: u32_at(b, 4),
            seq: Seq(u64_at(b, 8)),
            epoch: Epoch(u64_at(b, 16)),
            timestamp_us: u64_at(b, 24),
            kind: b[32],
        }
    }
}

/// Appends the record of `e` to `out`: `len u32 | crc u32 | seq u64 | epoch u64 | timestamp_us u64 | kind u8 | payload`.
///
/// The caller has checked `e.payload.len()` against `max_entry_bytes` (a `u32`).
pub(crate) fn encode_record(out: &mut Vec<u8>, e: &Entry) {
    out.reserve(RECORD_HEADER_LEN + e.payload.len());
    encode_record_header(out, e);
    out.extend_from_slice(&e.payload);
}

/// Appends the fixed part of `e`'s record to `out`: what [`encode_record`] writes before the payload.
pub(crate) fn encode_record_header(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&e.crc.to_le_bytes());
    out.extend_from_slice(&e.seq.0.to_le_bytes());
    out.extend_from_slice(&e.epoch.0.to_le_bytes());
    out.extend_from_slice(&e.timestamp_us.to_le_bytes());
    out.push(e.kind);
}

/// Bytes a record with a payload of `payload_len` bytes takes on disk.
pub(crate) fn record_len(payload_len: usize) -> u64 {
    (RECORD_HEADER_LEN + payload_len) as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What the log keeps in memory about one segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub path: PathBuf,
    pub first_seq: Seq,
    /// Last sequence in the segment; `first_seq - 1` while it is empty.
    pub last_seq: Seq,
    pub base_digest: LogDigest,
    /// Bytes of valid data, header included: the next record goes at this offset.
    pub len: u64,
    /// Sparse seq -> offset map so reads start near their target instead of at the header.
    pub index: SparseIndex,
}

impl Segment {
    /// An empty segment (header only).
    pub fn new(path: PathBuf, header: SegmentHeader) -> Segment {
        Segment {
            path,
            first_seq: header.first_seq,
            last_seq: Seq(header.first_seq.0.saturating_sub(1)),
            base_digest: header.base_digest,
            len: SEGMENT_HEADER_LEN,
            index: SparseIndex::default(),
        }
    }

    /// Number of entries held.
    pub fn entries(&self) -> u64 {
        self.last_seq.0 + 1 - self.first_seq.0
    }

    /// Sum of the payload lengths held (every byte after the header that is not a record header).
    pub fn payload_bytes(&self) -> u64 {
        (self.len - SEGMENT_HEADER_LEN).saturating_sub(self.entries() * RECORD_HEADER_LEN as u64)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(segment_file_name(Seq(1)), "00000000000000000001.wal");
        assert_eq!(segment_file_name(Seq(u64::MAX)), "18446744073709551615.wal");
        for s in [1, 9, 10, 12345, u64::MAX] {
            assert_eq!(parse_segment_name(&segment_file_name(Seq(s))), Some(Seq(s)));
        }
        assert!(segment_file_name(Seq(9)) < segment_file_name(Seq(10)));
    }

    #[test]
    fn names_reject_anything_else() {
        for bad in [
            "00000000000000000000.wal",
            "0000000000000000001.wal",
            "000000000000000000001.wal",
            "00000000000000000001.wal.tmp",
            "0000000000000000000a.wal",
            "+0000000000000000001.wal",
            "99999999999999999999.wal",
            "00000000000000000001.WAL",
            "",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_round_trip_and_checks() {
        let h = SegmentHeader { first_seq: Seq(42), base_digest: LogDigest(0xdead_beef) };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..36 {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(SegmentHeader::decode(&bad).is_err(), "flipped byte {i}");
        }
        let zero = SegmentHeader { first_seq: Seq(0), base_digest: LogDigest(0) }.encode();
        assert!(SegmentHeader::decode(&zero).is_err());
        let max = SegmentHeader { first_seq: Seq(u64::MAX), base_digest: LogDigest(0) }.encode();
        assert!(SegmentHeader::decode(&max).is_err());
    }

    #[test]
    fn record_layout() {
        let e = Entry::new(Seq(7), Epoch(3), 99, 5, Bytes::from_static(b"abc"));
        let mut out = Vec::new();
        encode_record(&mut out, &e);
        assert_eq!(out.len() as u64, record_len(3));
        let mut head = [0u8; RECORD_HEADER_LEN];
        head.copy_from_slice(&out[..RECORD_HEADER_LEN]);
        let h = RecordHeader::decode(&head);
        assert_eq!(h, RecordHeader { len: 3, crc: e.crc, seq: Seq(7), epoch: Epoch(3), timestamp_us: 99, kind: 5 });
        assert_eq!(&out[RECORD_HEADER_LEN..], b"abc");
    }
}
