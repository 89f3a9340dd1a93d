//! Recovery on open: rebuilds a log's in-memory state from its segment files, cutting a torn tail and
//! refusing anything else that is damaged.
//!
//! Rules (see `docs/WAL.md`):
//! - every record of every segment is read back and checked (checksum, seq = previous + 1);
//! - segments chain: each header's `first_seq` and `base_digest` continue the previous segment exactly;
//! - damage in the last segment's records is a torn write: the file is cut to the last good record,
//!   fsynced, and a warning logged; unless intact entries follow the damage: then
//!   `RecoveryMode::TolerateTornTail` cuts there (and logs an error) and `AbsoluteConsistency`
//!   refuses with [`WalError::Corruption`];
//! - damage anywhere else (a sealed segment, any header) is [`WalError::Corruption`], never skipped,
//!   with one exception under `SyncPolicy::Never`, which orders no writes: a sealed segment
//!   followed only by segments holding no entry (a crash right after a roll) is the log's tail,
//!   so those segments are deleted and its damage is cut as a torn tail;
//! - a last segment shorter than a header is a torn creation: it is deleted.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::entry::LogDigest;
use crate::types::{Epoch, Seq};

use super::config::{RecoveryMode, SyncPolicy, WalConfig};
use super::error::{IoContext, WalError};
use super::fs::{create_segment, open_rw, read_exact_at, sync_dir};
use super::scan::{check_record, find_intact_record, Scan, Scanner};
use super::segment::{
    parse_segment_name, segment_file_name, Segment, SegmentHeader, SEGMENT_HEADER_LEN, SEGMENT_VERSION,
};
use super::tail::MemTail;

/// Bytes read per system call while scanning segments.
const RECOVERY_CHUNK: usize = 4 * 1024 * 1024;

/// A log's state as found on disk.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Sealed segments, oldest first.
    pub sealed: Vec<Segment>,
    /// The last segment, where appends continue.
    pub active: Segment,
    /// The active segment's file, open for writing.
    pub active_file: File,
    pub last_seq: Seq,
    pub last_epoch: Epoch,
    pub digest: LogDigest,
    pub tail: MemTail,
}

/// Recovers the log stored in `dir` (which exists), creating its first segment if it has none.
pub(crate) fn recover(dir: &Path, config: &WalConfig) -> Result<Recovered, WalError> {
    let names = list_segments(dir)?;
    let mut tail = MemTail::new(config.tail_max_bytes, config.tail_max_entries);
    let mut segments: Vec<Segment> = Vec::with_capacity(names.len());
    let mut digest = LogDigest::EMPTY;
    let mut last_epoch = Epoch(0);
    let mut active = None;
    let count = names.len();

    for (i, (name_seq, path)) in names.iter().cloned().enumerate() {
        let mut is_last = i + 1 == count;
        let file = open_rw(&path)?;
        let file_len = file.metadata().ctx("stat segment", &path)?.len();

        if file_len < SEGMENT_HEADER_LEN {
            // A segment is created (header written) right before its first record: a short last
            // segment is a creation cut by a crash. Its base digest is then known only if it follows
            // another segment (or starts the log).
            if is_last && (i > 0 || name_seq == Seq(1)) {
                tracing::warn!(file = %path.display(), bytes = file_len, "WAL: deleting a segment whose creation was cut by a crash");
                drop(file);
                std::fs::remove_file(&path).ctx("delete torn segment", &path)?;
                sync_dir(dir)?;
                break;
            }
            return Err(WalError::corruption(
                &path,
                0,
                format!("segment is {file_len} bytes, shorter than its {SEGMENT_HEADER_LEN}-byte header"),
            ));
        }

        let mut raw = [0u8; SEGMENT_HEADER_LEN as usize];
        read_exact_at(&file, &mut raw, 0).ctx("read segment header", &path)?;
        if let Some(version) = SegmentHeader::other_version(&raw) {
            return Err(WalError::UnsupportedVersion { file: path, version, supported: SEGMENT_VERSION });
        }
        let header = SegmentHeader::decode(&raw).map_err(|reason| WalError::corruption(&path, 0, reason))?;
        if header.first_seq != name_seq {
            return Err(WalError::corruption(
                &path,
                16,
                format!("header says the segment starts at {} but its name says {name_seq}", header.first_seq),
            ));
        }
        if let Some(prev) = segments.last() {
            if header.first_seq != prev.last_seq.next() {
                // Under `Never`, the same crash as below with the sealed segment cut at a record
                // boundary: nothing there to cut, the later segments hold no entry, and the log
                // ends in the sealed segment.
                if config.sync == SyncPolicy::Never
                    && header.first_seq > prev.last_seq.next()
                    && hold_no_entry(&names[i..])?
                {
                    drop(file);
                    delete_newest_first(dir, &names[i..])?;
                    break;
                }
                return Err(WalError::corruption(
                    &path,
                    16,
                    format!(
                        "segment starts at {} but {} ends at {}: entries are missing between segments",
                        header.first_seq,
                        prev.path.display(),
                        prev.last_seq
                    ),
                ));
            }
            if header.base_digest != digest {
                return Err(WalError::corruption(
                    &path,
                    24,
                    format!("base digest {} does not continue the log's digest {digest}", header.base_digest),
                ));
            }
        } else {
            digest = header.base_digest;
        }

        let mut seg = Segment::new(path, header);
        let mut scanner = Scanner::new(&file, SEGMENT_HEADER_LEN, file_len, RECOVERY_CHUNK, config.max_entry_bytes);
        let damage = loop {
            let rec = match scanner.next_record().ctx("read segment", &seg.path)? {
                Scan::End => break None,
                Scan::Bad { offset, reason } => break Some((offset, reason)),
                Scan::Record(r) => r,
            };
            if let Err(reason) = check_record(&rec.entry, seg.last_seq.next()) {
                break Some((rec.offset, reason));
            }
            let e = rec.entry;
            seg.index.note(e.seq, rec.offset, digest);
            digest = digest.step(e.seq, e.kind, &e.payload);
            seg.last_seq = e.seq;
            seg.len = rec.offset + rec.len;
            last_epoch = e.epoch;
            tail.push(e);
        };

        if let Some((offset, reason)) = damage {
            // Intact entries after the damage: a crash that wrote pages out of order, or bytes
            // corrupted in place (see `RecoveryMode`). An intact entry right here, the one expected,
            // is neither: it is longer than `max_entry_bytes`, a configuration mistake, in any segment.
            let expected = seg.last_seq.next();
            let intact =
                find_intact_record(&file, offset, file_len, expected).ctx("search after damage in", &seg.path)?;
            if intact == Some((offset, expected)) {
                return Err(WalError::EntryOverLimit {
                    file: seg.path.clone(),
                    offset,
                    seq: expected,
                    max: config.max_entry_bytes,
                });
            }
            // Under `Never` nothing orders the writes: a crash right after a roll can leave the
            // sealed segment short of its last records and the later one(s) without any. The log
            // then ends here, and the later segments are deleted before the cut below (and only
            // once nothing below refuses the open, which must leave the files alone).
            let tail_of_the_log = is_last || (config.sync == SyncPolicy::Never && hold_no_entry(&names[i + 1..])?);
            if !tail_of_the_log {
                return Err(WalError::corruption(&seg.path, offset, format!("{reason} (in a sealed segment)")));
            }
            if let Some((at, seq)) = intact {
                if config.recovery == RecoveryMode::AbsoluteConsistency {
                    return Err(WalError::corruption(
                        &seg.path,
                        offset,
                        format!("{reason}, yet entry {seq} at offset {at} is intact (RecoveryMode::AbsoluteConsistency refuses to cut it)"),
                    ));
                }
                tracing::error!(
                    file = %seg.path.display(),
                    offset,
                    intact_seq = %seq,
                    intact_offset = at,
                    %reason,
                    "WAL: damage with intact entries after it; cutting them too (RecoveryMode::TolerateTornTail)"
                );
            }
            if !is_last {
                delete_newest_first(dir, &names[i + 1..])?;
                is_last = true;
            }
            tracing::warn!(
                file = %seg.path.display(),
                offset,
                cut_bytes = file_len - offset,
                last_seq = %seg.last_seq,
                %reason,
                "WAL: cutting a torn tail after the last complete record"
            );
            file.set_len(offset).ctx("truncate torn tail of", &seg.path)?;
            file.sync_all().ctx("fsync", &seg.path)?;
        }
        if is_last {
            active = Some(file);
            segments.push(seg);
            break;
        }
        segments.push(seg);
    }

    let (active, active_file) = match (segments.pop(), active) {
        (Some(seg), Some(file)) => (seg, file),
        // The torn last segment was deleted: the one before it is active again.
        (Some(seg), None) => {
            let file = open_rw(&seg.path)?;
            (seg, file)
        }
        (None, _) => {
            let header = SegmentHeader { first_seq: Seq(1), base_digest: LogDigest::EMPTY };
            let path = dir.join(segment_file_name(header.first_seq));
            let file = create_segment(dir, &path, &header, config.fsyncs())?;
            (Segment::new(path, header), file)
        }
    };
    tail.end_run(super::tail::Payloads::MayShare);
    tail.own_payloads();
    Ok(Recovered { last_seq: active.last_seq, sealed: segments, active, active_file, last_epoch, digest, tail })
}

/// Deletes `segments`, which hold no entry and follow the log's end, newest first (so that a
/// crash midway leaves a log that still chains), then fsyncs the folder.
fn delete_newest_first(dir: &Path, segments: &[(Seq, PathBuf)]) -> Result<(), WalError> {
    for (_, later) in segments.iter().rev() {
        tracing::warn!(file = %later.display(), "WAL: deleting a segment with no entry after a sealed segment cut short by a crash");
        std::fs::remove_file(later).ctx("delete empty segment", later)?;
    }
    sync_dir(dir)
}

/// Whether none of `segments` holds an intact entry: each is shorter than a header, or has no
/// intact record (of the sequences its name allows) after it.
fn hold_no_entry(segments: &[(Seq, PathBuf)]) -> Result<bool, WalError> {
    for (first_seq, path) in segments {
        let file = File::open(path).ctx("open segment", path)?;
        let len = file.metadata().ctx("stat segment", path)?.len();
        if len > SEGMENT_HEADER_LEN
            && find_intact_record(&file, SEGMENT_HEADER_LEN, len, *first_seq).ctx("search", path)?.is_some()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Segment files of `dir` in sequence order. Deletes leftover `.tmp` files of cut segment creations.
fn list_segments(dir: &Path) -> Result<Vec<(Seq, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_segment_name(name) {
            out.push((seq, entry.path()));
        } else if name.strip_suffix(".tmp").and_then(parse_segment_name).is_some() {
            tracing::warn!(file = %entry.path().display(), "WAL: deleting a leftover segment creation");
            std::fs::remove_file(entry.path()).ctx("delete leftover", &entry.path())?;
        }
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytes::Bytes;

    use super::*;
    use crate::wal::segment::record_len;
    use crate::wal::test_files::{copy_dir, segment_files};
    use crate::wal::{SpaceWal, SyncPolicy};
    use crate::SpaceId;

    fn config() -> WalConfig {
        WalConfig::default().sync(SyncPolicy::Never)
    }

    fn space() -> SpaceId {
        SpaceId::new("s").unwrap()
    }

    fn payload(i: u64) -> Bytes {
        Bytes::from(format!("entry-{i}-{}", "x".repeat(i as usize % 7)))
    }

    /// A log of `n` entries in one segment; returns its folder and segment file.
    fn one_segment(root: &Path, n: u64) -> PathBuf {
        let wal = SpaceWal::open(root, space(), config()).unwrap();
        for i in 1..=n {
            wal.append(Epoch(1), 1, payload(i)).unwrap();
        }
        segment_files(&root.join("s")).pop().unwrap()
    }

    /// File offset of the first payload byte of entry `seq` in a segment from [`one_segment`].
    fn payload_offset(seq: u64) -> u64 {
        SEGMENT_HEADER_LEN + (1..seq).map(|i| record_len(payload(i).len())).sum::<u64>() + 33
    }

    fn flip_byte(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn damage_with_intact_entries_after_it_is_cut_or_refused_by_mode() {
        let root = tempfile::tempdir().unwrap();
        let seg = one_segment(root.path(), 20);
        flip_byte(&seg, payload_offset(6));
        let strict = config().recovery(RecoveryMode::AbsoluteConsistency);
        match SpaceWal::open(root.path(), space(), strict) {
            Err(WalError::Corruption { offset, reason, .. }) => {
                assert_eq!(offset, payload_offset(6) - 33);
                assert!(reason.contains("entry 7") && reason.contains("intact"), "{reason}");
            }
            other => panic!("expected Corruption, got {:?}", other.map(|w| w.last_seq())),
        }
        // Refusing left the files alone: the default mode then cuts at the damage.
        let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
        assert_eq!(wal.last_seq(), Seq(5));
        assert_eq!(wal.read_from(Seq(1), 100, usize::MAX).unwrap().len(), 5);
    }

    #[test]
    fn an_entry_longer_than_a_lowered_max_entry_bytes_refuses_to_open_under_any_mode() {
        let root = tempfile::tempdir().unwrap();
        one_segment(root.path(), 10);
        for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::AbsoluteConsistency] {
            match SpaceWal::open(root.path(), space(), config().max_entry_bytes(4).recovery(mode)) {
                Err(e @ WalError::EntryOverLimit { seq: Seq(1), .. }) => {
                    assert!(e.to_string().contains("raise it back"), "{e}")
                }
                other => panic!("{mode:?}: expected EntryOverLimit, got {:?}", other.map(|w| w.last_seq())),
            }
        }
        // Nothing was cut: with the limit back, all ten entries are there.
        assert_eq!(SpaceWal::open(root.path(), space(), config()).unwrap().last_seq(), Seq(10));
        // The same in a sealed segment: a configuration mistake there too, not corruption.
        let root = tempfile::tempdir().unwrap();
        let (_, segs) = multi_segment_log(root.path());
        match SpaceWal::open(root.path(), space(), config().max_entry_bytes(4)) {
            Err(WalError::EntryOverLimit { file, seq: Seq(1), .. }) => assert_eq!(file, segs[0]),
            other => panic!("expected EntryOverLimit, got {:?}", other.map(|w| w.last_seq())),
        }
    }

    #[test]
    fn a_torn_last_record_is_cut_under_absolute_consistency_too() {
        let root = tempfile::tempdir().unwrap();
        let seg = one_segment(root.path(), 8);
        let len = std::fs::metadata(&seg).unwrap().len();
        // The last record half written, then zeros where the rest of its page would be.
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 10).unwrap();
        f.set_len(len + 4000).unwrap();
        drop(f);
        let wal = SpaceWal::open(root.path(), space(), config().recovery(RecoveryMode::AbsoluteConsistency)).unwrap();
        assert_eq!(wal.last_seq(), Seq(7));
    }

    #[test]
    fn torn_write_at_every_byte_of_the_last_record() {
        let root = tempfile::tempdir().unwrap();
        let n = 6u64;
        let (full_digest, prefix_digest, expected) = {
            let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
            for i in 1..=n {
                wal.append(Epoch(1), 1, payload(i)).unwrap();
            }
            let all = wal.read_from(Seq(1), 100, usize::MAX).unwrap();
            let prefix =
                all[..(n - 1) as usize].iter().fold(LogDigest::EMPTY, |d, e| d.step(e.seq, e.kind, &e.payload));
            (wal.digest(), prefix, all)
        };
        let src = root.path().join("s");
        let seg = segment_files(&src).pop().unwrap();
        let full_len = std::fs::metadata(&seg).unwrap().len();
        let last_len = record_len(payload(n).len());
        assert_ne!(full_digest, prefix_digest);

        for cut in 0..last_len {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(&src, &copy.path().join("s"));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(copy.path().join("s").join(seg.file_name().unwrap()))
                .unwrap();
            f.set_len(full_len - last_len + cut).unwrap();
            drop(f);

            let wal = SpaceWal::open(copy.path(), space(), config()).unwrap();
            assert_eq!(wal.last_seq(), Seq(n - 1), "cut at byte {cut}");
            assert_eq!(wal.digest(), prefix_digest, "cut at byte {cut}");
            assert_eq!(wal.read_from(Seq(1), 100, usize::MAX).unwrap(), expected[..(n - 1) as usize]);
            // The log continues where the good records end.
            let e = &expected[(n - 1) as usize];
            assert_eq!(wal.append(e.epoch, e.kind, e.payload.clone()).unwrap(), Seq(n));
            assert_eq!(wal.digest(), full_digest);
            drop(wal);
            let wal = SpaceWal::open(copy.path(), space(), config()).unwrap();
            assert_eq!((wal.last_seq(), wal.digest()), (Seq(n), full_digest), "reopen after cut at byte {cut}");
        }
    }

    #[test]
    fn damaged_last_record_is_cut() {
        let root = tempfile::tempdir().unwrap();
        {
            let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
            for i in 1..=3 {
                wal.append(Epoch(1), 1, payload(i)).unwrap();
            }
        }
        let seg = segment_files(&root.path().join("s")).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
        assert_eq!(wal.last_seq(), Seq(2));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), (bytes.len() as u64) - record_len(payload(3).len()));
    }

    /// Builds a log of three or more segments; returns its folder and the segment files.
    fn multi_segment_log(root: &Path) -> (PathBuf, Vec<PathBuf>) {
        let wal = SpaceWal::open(root, space(), config().segment_bytes(200)).unwrap();
        for i in 1..=20 {
            wal.append(Epoch(1), 1, payload(i)).unwrap();
        }
        let dir = root.join("s");
        let segs = segment_files(&dir);
        assert!(segs.len() >= 3, "{segs:?}");
        (dir, segs)
    }

    #[test]
    fn flipped_byte_in_a_sealed_segment_is_corruption() {
        let root = tempfile::tempdir().unwrap();
        let (_, segs) = multi_segment_log(root.path());
        let sealed = &segs[1];
        let mut bytes = std::fs::read(sealed).unwrap();
        // First record's payload: after the segment header and the record header.
        let at = SEGMENT_HEADER_LEN as usize + 33 + 2;
        bytes[at] ^= 0x10;
        std::fs::write(sealed, &bytes).unwrap();
        match SpaceWal::open(root.path(), space(), config().segment_bytes(200)) {
            Err(WalError::Corruption { file, offset, reason }) => {
                assert_eq!(&file, sealed);
                assert_eq!(offset, SEGMENT_HEADER_LEN);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn truncated_sealed_segment_is_corruption() {
        let root = tempfile::tempdir().unwrap();
        let (_, segs) = multi_segment_log(root.path());
        let len = std::fs::metadata(&segs[0]).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&segs[0]).unwrap().set_len(len - 1).unwrap();
        let err = SpaceWal::open(root.path(), space(), config()).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == &segs[0]), "{err}");
    }

    #[test]
    fn bad_header_or_missing_segment_is_corruption() {
        let root = tempfile::tempdir().unwrap();
        let (_, segs) = multi_segment_log(root.path());
        // A damaged header, even in the last segment.
        let last = segs.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        bytes[20] ^= 1;
        std::fs::write(last, &bytes).unwrap();
        let err = SpaceWal::open(root.path(), space(), config()).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, offset: 0, .. } if file == last), "{err}");
        bytes[20] ^= 1;
        std::fs::write(last, &bytes).unwrap();
        // A missing middle segment: a gap between segments.
        std::fs::remove_file(&segs[1]).unwrap();
        let err = SpaceWal::open(root.path(), space(), config()).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == &segs[2]), "{err}");
    }

    #[test]
    fn torn_segment_creation_is_deleted() {
        let root = tempfile::tempdir().unwrap();
        let (dir, segs) = multi_segment_log(root.path());
        let (last_seq, digest) = {
            let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
            (wal.last_seq(), wal.digest())
        };
        let next = dir.join(segment_file_name(last_seq.next()));
        std::fs::write(&next, [b'W', b'S']).unwrap();
        std::fs::write(dir.join(format!("{}.tmp", segment_file_name(Seq(999)))), b"junk").unwrap();
        let wal = SpaceWal::open(root.path(), space(), config().segment_bytes(200)).unwrap();
        assert_eq!((wal.last_seq(), wal.digest()), (last_seq, digest));
        assert_eq!(segment_files(&dir), segs);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), segs.len(), "leftover .tmp deleted");
        assert_eq!(wal.append(Epoch(1), 1, payload(21)).unwrap(), last_seq.next());
    }

    /// A crash right after a roll (or a failed first write) leaves a header-only active segment;
    /// retention afterwards must not delete the records that tell the last epoch on reopen.
    #[test]
    fn the_last_epoch_survives_retention_behind_an_empty_active_segment() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("s");
        let cfg = config().sync(SyncPolicy::Always).segment_bytes(200);
        let (last, digest) = {
            let wal = SpaceWal::open(root.path(), space(), cfg.clone()).unwrap();
            for i in 1..=20 {
                wal.append(Epoch(3), 1, payload(i)).unwrap();
            }
            (wal.last_seq(), wal.digest())
        };
        let next = SegmentHeader { first_seq: last.next(), base_digest: digest };
        create_segment(&dir, &dir.join(segment_file_name(next.first_seq)), &next, true).unwrap();
        {
            let wal = SpaceWal::open(root.path(), space(), cfg.clone()).unwrap();
            assert_eq!((wal.last_seq(), wal.last_epoch()), (last, Epoch(3)));
            let first = wal.truncate_prefix(last).unwrap();
            assert!(first <= last, "the newest segment holding an entry stays (first {first})");
        }
        let wal = SpaceWal::open(root.path(), space(), cfg).unwrap();
        assert_eq!((wal.last_seq(), wal.digest(), wal.last_epoch()), (last, digest, Epoch(3)));
        let deposed = crate::entry::Entry::new(last.next(), Epoch(1), 0, 1, payload(99));
        let err = wal.append_replicated(&[deposed]).unwrap_err();
        assert!(matches!(err, WalError::EpochBackwards { .. }), "{err}");
    }

    /// A last segment whose size reads a terabyte (a damaged inode, a sparse extension) is cut
    /// back like any torn tail, in bounded memory: the search for intact entries after the damage
    /// reads windows and skips holes.
    #[test]
    fn a_last_segment_extended_to_a_terabyte_is_cut_back() {
        let root = tempfile::tempdir().unwrap();
        let seg = one_segment(root.path(), 5);
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(1 << 40).unwrap();
        let wal = SpaceWal::open(root.path(), space(), config()).unwrap();
        assert_eq!(wal.last_seq(), Seq(5));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    }

    /// Under `SyncPolicy::Never` a crash right after a roll can leave the sealed segment short of
    /// its last records and the new segment empty or header-only: the log ends in the sealed
    /// segment, cut like a torn tail. Under a syncing policy, or with an entry in a later
    /// segment, the same damage stays corruption.
    #[test]
    fn a_torn_sealed_segment_followed_only_by_empty_ones_is_the_tail_under_never() {
        let setup = |root: &Path, next_len: usize, cut: u64| {
            let (dir, segs) = multi_segment_log(root);
            let wal = SpaceWal::open(root, space(), config()).unwrap();
            let (last, digest) = (wal.last_seq(), wal.digest());
            let entries = wal.read_from(Seq(1), 100, usize::MAX).unwrap();
            drop(wal);
            let next = dir.join(segment_file_name(last.next()));
            let header = SegmentHeader { first_seq: last.next(), base_digest: digest }.encode();
            std::fs::write(&next, &header[..next_len]).unwrap();
            let sealed = segs.last().unwrap().clone();
            let len = std::fs::metadata(&sealed).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&sealed).unwrap().set_len(len - cut).unwrap();
            (dir, segs, entries, next)
        };
        // Cut inside the last record (damage to cut), or at its start (a record boundary: the
        // sealed segment reads clean, only the later one's first sequence tells).
        let whole_record = crate::wal::segment::record_len(payload(20).len()); // the last entry's
        for (next_len, cut) in [0, SEGMENT_HEADER_LEN as usize].into_iter().flat_map(|n| [(n, 5), (n, whole_record)]) {
            let root = tempfile::tempdir().unwrap();
            let (dir, segs, entries, next) = setup(root.path(), next_len, cut);
            let wal = SpaceWal::open(root.path(), space(), config().segment_bytes(200)).unwrap();
            let last = entries.last().unwrap().seq;
            assert_eq!(wal.last_seq(), Seq(last.0 - 1), "next segment of {next_len} bytes, {cut} bytes cut");
            assert_eq!(wal.read_from(Seq(1), 100, usize::MAX).unwrap()[..], entries[..entries.len() - 1]);
            assert!(!next.exists());
            assert_eq!(segment_files(&dir), segs);
            assert_eq!(wal.append(Epoch(1), 1, payload(99)).unwrap(), last);
        }
        // Under a syncing policy the sealed segment was fsynced before the next was created.
        let root = tempfile::tempdir().unwrap();
        let (_, segs, _, _) = setup(root.path(), 0, 5);
        let err = SpaceWal::open(root.path(), space(), config().sync(SyncPolicy::Always)).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == segs.last().unwrap()), "{err}");
        // An entry in the later segment: the damage is in the middle of the log.
        let root = tempfile::tempdir().unwrap();
        let (_, segs, entries, next) = setup(root.path(), SEGMENT_HEADER_LEN as usize, 5);
        let mut rec = Vec::new();
        let e = crate::entry::Entry::new(entries.last().unwrap().seq.next(), Epoch(1), 0, 1, payload(21));
        crate::wal::segment::encode_record(&mut rec, &e);
        std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&next).unwrap(), &rec).unwrap();
        let err = SpaceWal::open(root.path(), space(), config()).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == segs.last().unwrap()), "{err}");
        // Damage with an intact entry after it in the sealed segment, refused by the mode: the
        // empty later segment is left alone with everything else.
        let root = tempfile::tempdir().unwrap();
        let (_, segs, _, next) = setup(root.path(), SEGMENT_HEADER_LEN as usize, 0);
        let sealed = segs.last().unwrap();
        let mut bytes = std::fs::read(sealed).unwrap();
        bytes[SEGMENT_HEADER_LEN as usize + 40] ^= 0x40;
        std::fs::write(sealed, &bytes).unwrap();
        let strict = config().recovery(RecoveryMode::AbsoluteConsistency);
        let err = SpaceWal::open(root.path(), space(), strict).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == sealed), "{err}");
        assert!(next.exists(), "a refused open deleted {}", next.display());
    }

    /// The same under `Interval`, with the active segment's first entry written but not yet
    /// fsynced: a power loss can take it, so retention keeps the sealed segment until it is durable.
    #[test]
    fn retention_keeps_the_last_epoch_until_the_active_segment_holds_a_durable_entry() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("s");
        let cfg = config().sync(SyncPolicy::Interval(std::time::Duration::from_secs(3600))).segment_bytes(200);
        let wal = SpaceWal::open(root.path(), space(), cfg.clone()).unwrap();
        let mut i = 0;
        let last = loop {
            i += 1;
            let before = segment_files(&dir).len();
            let seq = wal.append(Epoch(3), 1, payload(i)).unwrap();
            if before > 0 && segment_files(&dir).len() > before {
                break seq;
            }
        };
        assert!(wal.durable_seq() < last, "the roll fsynced the sealed segment only");
        wal.truncate_prefix(last).unwrap();
        // A power loss now: the active segment's unsynced record is gone.
        let lost = root.path().join("after-power-loss");
        copy_dir(&dir, &lost.join("s"));
        let active = segment_files(&lost.join("s")).pop().unwrap();
        std::fs::OpenOptions::new().write(true).open(&active).unwrap().set_len(SEGMENT_HEADER_LEN).unwrap();
        let reopened = SpaceWal::open(&lost, space(), cfg).unwrap();
        assert_eq!((reopened.last_seq(), reopened.last_epoch()), (Seq(last.0 - 1), Epoch(3)));
    }
}
