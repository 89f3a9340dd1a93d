//! Tests of [`SpaceWal`] (kept apart from `space.rs` for readability; recovery tests are in `recovery.rs`).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::wal::segment::parse_segment_name;

fn space() -> SpaceId {
    SpaceId::new("space-1").unwrap()
}

fn never() -> WalConfig {
    WalConfig::default().sync(SyncPolicy::Never)
}

fn open(root: &Path, config: WalConfig) -> SpaceWal {
    SpaceWal::open(root, space(), config).unwrap()
}

/// Deterministic payloads of varied sizes.
fn payload(i: u64) -> Bytes {
    let len = (i * 37 % 120) as usize;
    Bytes::from((0..len).map(|k| (i as usize * 31 + k) as u8).collect::<Vec<u8>>())
}

fn digest_of(entries: &[Entry]) -> LogDigest {
    entries.iter().fold(LogDigest::EMPTY, |d, e| d.step(e.seq, e.kind, &e.payload))
}

fn all(wal: &SpaceWal) -> Vec<Entry> {
    wal.read_from(wal.first_seq(), usize::MAX, usize::MAX).unwrap()
}

/// Appends entries 1..=n with `append` and `append_batch` mixed; returns what was appended.
fn fill(wal: &SpaceWal, n: u64) -> Vec<Entry> {
    let mut i = wal.last_seq().0 + 1;
    while i <= n {
        if i % 3 == 0 && i + 4 <= n {
            let items: Vec<(EntryKind, Bytes)> = (i..i + 5).map(|k| ((k % 4) as u8, payload(k))).collect();
            let r = wal.append_batch(Epoch(1 + i / 50), &items).unwrap();
            assert_eq!(r, Seq(i)..=Seq(i + 4));
            i += 5;
        } else {
            assert_eq!(wal.append(Epoch(1 + i / 50), (i % 4) as u8, payload(i)).unwrap(), Seq(i));
            i += 1;
        }
    }
    let es = all(wal);
    assert_eq!(es.len() as u64, n);
    for (k, e) in es.iter().enumerate() {
        assert_eq!(e.seq, Seq(k as u64 + 1));
        assert_eq!(e.payload, payload(e.seq.0));
        assert!(e.verify());
    }
    es
}

fn segment_count(root: &Path) -> usize {
    std::fs::read_dir(root.join(space().as_str()))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "wal"))
        .count()
}

/// Every `read_from` window over the log matches `expected`.
fn check_reads(wal: &SpaceWal, expected: &[Entry]) {
    let first = expected[0].seq.0;
    for from in first..=expected.last().unwrap().seq.0 {
        let at = (from - first) as usize;
        for (max_entries, max_bytes) in [(1, usize::MAX), (7, usize::MAX), (usize::MAX, 300), (1000, 0)] {
            let got = wal.read_from(Seq(from), max_entries, max_bytes).unwrap();
            assert!(!got.is_empty(), "from {from}");
            let want = &expected[at..at + got.len()];
            assert_eq!(got, want, "from {from} max {max_entries}/{max_bytes}");
            let bytes: usize = got.iter().map(|e| e.payload.len()).sum();
            assert!(got.len() <= max_entries && (got.len() == 1 || bytes <= max_bytes));
            // Limited by a bound, not stopped early.
            let next = expected.get(at + got.len());
            assert!(
                next.is_none() || got.len() == max_entries || bytes + next.unwrap().payload.len() > max_bytes,
                "from {from} max {max_entries}/{max_bytes}: stopped early at {} entries",
                got.len()
            );
        }
    }
}

#[test]
fn round_trip_across_rollover_from_tail_and_disk() {
    for (tail_entries, label) in [(1_000_000, "tail"), (4, "tiny tail"), (0, "no tail")] {
        let root = tempfile::tempdir().unwrap();
        let config = never().segment_bytes(600).tail_max_entries(tail_entries);
        let wal = open(root.path(), config.clone());
        let expected = fill(&wal, 150);
        assert!(segment_count(root.path()) > 10, "{label}");
        check_reads(&wal, &expected);
        assert_eq!(wal.digest(), digest_of(&expected));
        assert_eq!(wal.last_epoch(), expected.last().unwrap().epoch);
        assert_eq!(wal.read_from(Seq(151), 10, 10).unwrap(), vec![]);
        assert!(matches!(wal.read_from(Seq(0), 1, 1), Err(WalError::OutOfRange { .. })));
        drop(wal);

        let wal = open(root.path(), config);
        assert_eq!(
            (wal.first_seq(), wal.last_seq(), wal.digest()),
            (Seq(1), Seq(150), digest_of(&expected)),
            "{label}"
        );
        check_reads(&wal, &expected);
    }
}

#[test]
fn memory_only_reads_say_when_the_disk_is_needed() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().segment_bytes(600).tail_max_entries(10));
    let expected = fill(&wal, 50);
    // The tail holds the last 10 entries: those come from memory, older ones need the disk.
    assert_eq!(wal.read_from_memory(Seq(45), 100, usize::MAX).unwrap(), Some(expected[44..].to_vec()));
    assert_eq!(wal.read_from_memory(Seq(3), 100, usize::MAX).unwrap(), None);
    assert_eq!(wal.read_from_memory(Seq(51), 100, usize::MAX).unwrap(), Some(vec![]));
    assert!(matches!(wal.read_from_memory(Seq(0), 1, 1), Err(WalError::OutOfRange { .. })));
}

#[test]
fn catch_up_reads_use_the_sparse_index_in_large_segments() {
    let root = tempfile::tempdir().unwrap();
    let config = never().segment_bytes(1 << 20).tail_max_entries(0);
    let wal = open(root.path(), config);
    let items: Vec<(EntryKind, Bytes)> = (0..3000u64).map(|i| (1, Bytes::from(vec![i as u8; 1000]))).collect();
    wal.append_batch(Epoch(1), &items[..1500]).unwrap();
    wal.append_batch(Epoch(1), &items[1500..]).unwrap();
    assert!(segment_count(root.path()) >= 3);
    for from in [1u64, 2, 64, 65, 66, 1000, 1047, 1048, 1049, 2999, 3000] {
        let got = wal.read_from(Seq(from), 70, usize::MAX).unwrap();
        assert_eq!(got.first().map(|e| e.seq), Some(Seq(from)));
        assert_eq!(got.len() as u64, 70.min(3001 - from));
        assert!(got.iter().all(|e| e.verify() && e.payload.len() == 1000));
    }
    // An entry larger than max_bytes still comes back alone.
    assert_eq!(wal.read_from(Seq(5), 10, 10).unwrap().len(), 1);
}

/// Batches mixing payloads copied into the record buffer and payloads written from their own
/// buffers (at and around `VECTORED_MIN_PAYLOAD`), with rolls inside batches, read back from the
/// files (no memory tail) and after a reopen exactly as appended, also through `append_replicated`.
#[test]
fn large_and_small_payloads_in_one_write_read_back_from_the_files() {
    let root = tempfile::tempdir().unwrap();
    let config = never().segment_bytes(64 * 1024).tail_max_entries(0);
    let wal = open(root.path(), config.clone());
    let sizes = [0usize, 10, VECTORED_MIN_PAYLOAD - 1, VECTORED_MIN_PAYLOAD, 4096, 37, 9000, 1025, 1, 20_000];
    let items: Vec<(EntryKind, Bytes)> = (0..400u64)
        .map(|i| {
            let len = sizes[i as usize % sizes.len()];
            (i as u8 % 3, Bytes::from((0..len).map(|k| (i as usize * 7 + k) as u8).collect::<Vec<u8>>()))
        })
        .collect();
    for chunk in items.chunks(37) {
        wal.append_batch(Epoch(1), chunk).unwrap();
    }
    assert!(segment_count(root.path()) >= 10, "rolls happened inside batches");
    let written = all(&wal);
    assert_eq!(written.len(), items.len());
    for (e, (kind, payload)) in written.iter().zip(&items) {
        assert!(e.verify(), "entry {} fails its checksum", e.seq);
        assert_eq!((e.kind, &e.payload), (*kind, payload), "entry {}", e.seq);
    }
    assert_eq!(wal.digest(), digest_of(&written));

    // A replica's log fed the same entries writes the same records.
    let replica_root = tempfile::tempdir().unwrap();
    let replica = open(replica_root.path(), config.clone());
    for chunk in written.chunks(50) {
        replica.append_replicated(chunk).unwrap();
    }
    assert_eq!(all(&replica), written);
    drop((wal, replica));
    assert_eq!(all(&open(root.path(), config.clone())), written);
    assert_eq!(all(&open(replica_root.path(), config)), written);
}

/// A roll that fails with something in place under the new segment's name (as after a rename
/// whose folder fsync failed) poisons the log: an entry that still fits in the old segment would
/// otherwise be written there past the new segment's first sequence, and no reopen would accept it.
#[test]
fn a_roll_that_may_have_left_the_new_segment_in_place_poisons_the_log() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(
        root.path(),
        WalConfig::default().sync(SyncPolicy::Interval(Duration::from_secs(3600))).segment_bytes(200),
    );
    while !wal.append_would_roll(&[Entry::new(wal.last_seq().next(), Epoch(1), 1, 0, Bytes::from(vec![7u8; 100]))]) {
        wal.append(Epoch(1), 0, Bytes::from(vec![1u8; 10])).unwrap();
    }
    let last = wal.last_seq();
    assert!(
        !wal.append_would_roll(&[Entry::new(last.next(), Epoch(1), 1, 0, Bytes::new())]),
        "a small entry still fits"
    );
    std::fs::create_dir(root.path().join("space-1").join(segment_file_name(last.next()))).unwrap();
    assert!(wal.append(Epoch(1), 0, Bytes::from(vec![7u8; 100])).is_err());
    let err = wal.append(Epoch(1), 0, Bytes::new()).unwrap_err();
    assert!(matches!(err, WalError::Poisoned { .. }), "{err}");
    assert_eq!(wal.last_seq(), last);
}

/// Under `Never`, `sync` also fsyncs the segments sealed since the last call (each once), and
/// lists again those sealed after a suffix truncation even where they end below what it synced
/// before. Seen through a segment whose file cannot be opened (a symlink to itself): `sync`
/// fails if and only if it had to fsync that segment.
#[cfg(unix)]
#[test]
fn sync_under_never_fsyncs_each_sealed_segment_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(space().as_str());
    let config = never().segment_bytes(300);
    let sealed = || {
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.retain(|p| p.extension().is_some_and(|x| x == "wal"));
        names.sort();
        assert!(names.len() > 2, "{names:?}");
        names.pop(); // the active segment
        names
    };
    // Whether `sync` fails with `path` unopenable.
    let sync_fails_without = |wal: &SpaceWal, path: &Path| {
        let aside = path.with_extension("aside");
        std::fs::rename(path, &aside).unwrap();
        std::os::unix::fs::symlink(path, path).unwrap();
        let failed = wal.sync().is_err();
        std::fs::remove_file(path).unwrap();
        std::fs::rename(&aside, path).unwrap();
        failed
    };
    let wal = open(root.path(), config.clone());
    fill(&wal, 60);
    let first_sealed = sealed();
    assert!(sync_fails_without(&wal, &first_sealed[0]), "never fsynced before");
    drop(wal); // poisoned by the failed fsync

    let wal = open(root.path(), config.clone());
    wal.sync().unwrap();
    assert!(!sync_fails_without(&wal, &first_sealed[0]), "fsynced by the last call");
    fill(&wal, 120);
    let newest = sealed().pop().unwrap();
    assert!(!first_sealed.contains(&newest));
    assert!(sync_fails_without(&wal, &newest), "sealed since the last call");
    drop(wal);

    let wal = open(root.path(), config.clone());
    wal.sync().unwrap();
    wal.truncate_suffix(Seq(30)).unwrap();
    fill(&wal, 90);
    let resealed = sealed().pop().unwrap();
    assert_eq!(wal.read_from(Seq(1), usize::MAX, usize::MAX).unwrap().len(), 90);
    assert!(sync_fails_without(&wal, &resealed), "sealed after the cut, below what was synced before it");
}

/// A log that starts next to `u64::MAX` (only a crafted file can) never assigns it: `Seq::next`
/// saturates there, so a second entry would repeat it. Recovery refuses a record at it too.
#[test]
fn the_last_sequence_number_is_never_assigned() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(space().as_str());
    std::fs::create_dir_all(&dir).unwrap();
    let first = Seq(u64::MAX - 2);
    let header = SegmentHeader { first_seq: first, base_digest: LogDigest::EMPTY };
    create_segment(&dir, &dir.join(segment_file_name(first)), &header, false).unwrap();
    let wal = open(root.path(), never());
    let three = [(0, Bytes::from_static(b"a")), (0, Bytes::from_static(b"b")), (0, Bytes::from_static(b"c"))];
    assert!(matches!(wal.append_batch(Epoch(1), &three), Err(WalError::OutOfRange { .. })));
    assert_eq!(wal.append(Epoch(1), 0, Bytes::from_static(b"a")).unwrap(), first);
    assert_eq!(wal.append(Epoch(1), 0, Bytes::from_static(b"b")).unwrap(), Seq(u64::MAX - 1));
    let err = wal.append(Epoch(1), 0, Bytes::from_static(b"c")).unwrap_err();
    assert!(matches!(err, WalError::OutOfRange { .. }), "{err}");
    let at_max = Entry::new(Seq(u64::MAX), Epoch(1), 1, 0, Bytes::from_static(b"c"));
    assert!(matches!(wal.append_replicated(std::slice::from_ref(&at_max)), Err(WalError::OutOfRange { .. })));
    assert_eq!(wal.last_seq(), Seq(u64::MAX - 1));
    assert!(crate::wal::scan::check_seq(&at_max, Seq(u64::MAX)).is_err(), "a record at u64::MAX is damage");
    drop(wal);
    assert_eq!(open(root.path(), never()).last_seq(), Seq(u64::MAX - 1));
}

/// The append time of the first entry after a position, from the memory tail only: that entry's
/// if held, else the tail's first (later, so an age from it is a lower bound), else none.
#[test]
fn the_append_time_after_a_position_comes_from_the_memory_tail() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().tail_max_entries(3));
    let appended = fill(&wal, 10);
    let at = |seq: u64| appended[seq as usize - 1].timestamp_us;
    let first_held = (1..=10).find(|s| wal.read_from_memory(Seq(*s), 1, 0).unwrap().is_some()).unwrap();
    assert!(first_held > 1, "the tail holds only the last entries");
    assert_eq!(wal.appended_after_in_memory(Seq(first_held)), Some(at(first_held + 1)));
    assert_eq!(wal.appended_after_in_memory(Seq(0)), Some(at(first_held)), "older than the tail: its first");
    assert_eq!(wal.appended_after_in_memory(Seq(10)), None, "nothing after the end");
}

#[test]
fn large_record_gets_its_own_segment_and_limits_apply() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().segment_bytes(200).max_entry_bytes(1000));
    wal.append(Epoch(1), 0, Bytes::from_static(b"small")).unwrap();
    wal.append(Epoch(1), 0, Bytes::from(vec![9u8; 1000])).unwrap();
    wal.append(Epoch(1), 0, Bytes::from_static(b"small again")).unwrap();
    assert_eq!(segment_count(root.path()), 3);
    assert!(matches!(
        wal.append(Epoch(1), 0, Bytes::from(vec![0u8; 1001])),
        Err(WalError::EntryTooLarge { len: 1001, max: 1000 })
    ));
    assert_eq!(wal.last_seq(), Seq(3));
    drop(wal);
    let wal = open(root.path(), never().segment_bytes(200).max_entry_bytes(1000));
    assert_eq!(all(&wal)[1].payload.len(), 1000);
}

#[test]
fn append_would_roll_tells_when_the_next_append_seals_the_segment() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().segment_bytes(600));
    let entry = |seq: u64| Entry::new(Seq(seq), Epoch(1), 1, 0, Bytes::from(vec![7u8; 100]));
    // An empty segment takes one record of any size; a run larger than the segment rolls.
    assert!(!wal.append_would_roll(&[Entry::new(Seq(1), Epoch(1), 1, 0, Bytes::from(vec![7u8; 1000]))]));
    assert!(wal.append_would_roll(&(1..=10).map(entry).collect::<Vec<_>>()));
    let mut seq = 0;
    while !wal.append_would_roll(&[entry(seq + 1)]) {
        seq += 1;
        wal.append_replicated(&[entry(seq)]).unwrap();
        assert_eq!(segment_count(root.path()), 1, "no roll before the hint says so");
    }
    wal.append_replicated(&[entry(seq + 1)]).unwrap();
    assert_eq!(segment_count(root.path()), 2, "the append the hint warned of rolled");
    assert!(!wal.append_would_roll(&[entry(seq + 2)]));
}

#[test]
fn truncate_prefix_removes_whole_segments_only() {
    let root = tempfile::tempdir().unwrap();
    let config = never().segment_bytes(600).tail_max_entries(8);
    let wal = open(root.path(), config.clone());
    let expected = fill(&wal, 120);
    let digest = wal.digest();
    let segments = segment_count(root.path());

    let first = wal.truncate_prefix(Seq(50)).unwrap();
    assert!(first <= Seq(51) && first > Seq(30), "first {first}");
    assert_eq!(wal.first_seq(), first);
    assert!(segment_count(root.path()) < segments);
    assert_eq!(wal.digest(), digest);
    match wal.read_from(Seq(first.0 - 1), 10, 1000) {
        Err(WalError::Truncated { requested, first: f, .. }) => assert_eq!((requested, f), (Seq(first.0 - 1), first)),
        other => panic!("expected Truncated, got {other:?}"),
    }
    check_reads(&wal, &expected[(first.0 - 1) as usize..]);

    // Never the active segment, even when asked for everything.
    let first = wal.truncate_prefix(Seq(10_000)).unwrap();
    assert_eq!(segment_count(root.path()), 1);
    assert_eq!(wal.read_from(first, usize::MAX, usize::MAX).unwrap(), expected[(first.0 - 1) as usize..]);
    // Cutting below the retained start would leave the last epoch unknown.
    assert!(matches!(wal.truncate_suffix(Seq(first.0 - 1)), Err(WalError::Truncated { .. })));
    drop(wal);

    let wal = open(root.path(), config);
    assert_eq!((wal.first_seq(), wal.last_seq(), wal.digest()), (first, Seq(120), digest));
    let seq = wal.append(Epoch(9), 1, Bytes::from_static(b"after retention")).unwrap();
    assert_eq!(seq, Seq(121));
    assert_eq!(wal.digest(), digest.step(Seq(121), 1, b"after retention"));
}

#[test]
fn truncate_suffix_then_append_matches_a_log_without_the_cut_entries() {
    // Cut points: mid-segment, on segment boundaries (found below), early, everything.
    let root = tempfile::tempdir().unwrap();
    let config = never().segment_bytes(600).tail_max_entries(6);
    let probe = open(root.path(), config.clone());
    fill(&probe, 100);
    let boundaries: Vec<u64> = std::fs::read_dir(root.path().join(space().as_str()))
        .unwrap()
        .filter_map(|e| parse_segment_name(e.unwrap().file_name().to_str()?))
        .map(|s| s.0 - 1)
        .filter(|&s| s > 0)
        .collect();
    drop(probe);
    assert!(boundaries.len() > 3);

    let mut cuts = vec![0u64, 1, 37, 99, 100, 150];
    cuts.extend(boundaries.iter().take(3));
    cuts.extend(boundaries.iter().take(3).map(|b| b + 1));
    for after in cuts {
        let root = tempfile::tempdir().unwrap();
        let wal = open(root.path(), config.clone());
        let expected = fill(&wal, 100);
        let mut rx = wal.subscribe();
        rx.borrow_and_update();
        wal.truncate_suffix(Seq(after)).unwrap();
        let kept = &expected[..after.min(100) as usize];
        assert_eq!(wal.last_seq(), Seq(after.min(100)), "after {after}");
        assert_eq!(wal.digest(), digest_of(kept), "after {after}");
        assert_eq!(wal.last_epoch(), kept.last().map_or(Epoch(0), |e| e.epoch), "after {after}");
        assert!(wal.durable_seq() <= wal.last_seq());
        if after < 100 {
            assert_eq!(*rx.borrow_and_update(), Seq(after));
        }
        assert_eq!(all(&wal), kept, "after {after}");

        let seq = wal.append(Epoch(7), 2, Bytes::from_static(b"new")).unwrap();
        assert_eq!(seq, Seq(after.min(100) + 1));
        let new_entry = wal.read_from(seq, 1, 0).unwrap().remove(0);
        let mut fresh: Vec<Entry> = kept.to_vec();
        fresh.push(new_entry);
        assert_eq!(wal.digest(), digest_of(&fresh));
        drop(wal);

        let wal = open(root.path(), config.clone());
        assert_eq!(
            (wal.last_seq(), wal.digest(), wal.last_epoch()),
            (seq, digest_of(&fresh), Epoch(7)),
            "after {after}"
        );
        assert_eq!(all(&wal), fresh);
    }
}

#[test]
fn append_replicated_is_idempotent_and_strict() {
    let src_root = tempfile::tempdir().unwrap();
    let primary = open(src_root.path(), never().segment_bytes(500));
    let entries = fill(&primary, 60);

    for tail in [1_000_000, 0] {
        let root = tempfile::tempdir().unwrap();
        let replica = open(root.path(), never().segment_bytes(500).tail_max_entries(tail));
        let r = replica.append_replicated(&entries[..20]).unwrap();
        assert_eq!(r, ReplicatedAppend { appended: 20, skipped: 0, last_seq: Seq(20) });
        // The same entries again (a re-send after a reconnect), then an overlapping batch.
        let r = replica.append_replicated(&entries[..20]).unwrap();
        assert_eq!(r, ReplicatedAppend { appended: 0, skipped: 20, last_seq: Seq(20) });
        let r = replica.append_replicated(&entries[10..30]).unwrap();
        assert_eq!(r, ReplicatedAppend { appended: 10, skipped: 10, last_seq: Seq(30) });

        // A gap.
        match replica.append_replicated(&entries[31..35]) {
            Err(WalError::Gap { expected, got, .. }) => assert_eq!((expected, got), (Seq(31), Seq(32))),
            other => panic!("expected Gap, got {other:?}"),
        }
        // A different entry at a held sequence (a diverged log), even behind good ones.
        let mut diverged = entries[25].clone();
        diverged.epoch = Epoch(99);
        diverged.crc = entry_crc(diverged.seq, diverged.epoch, diverged.timestamp_us, diverged.kind, &diverged.payload);
        let batch = [entries[24].clone(), diverged, entries[26].clone()];
        assert!(matches!(replica.append_replicated(&batch), Err(WalError::Conflict { seq: Seq(26), .. })));
        // A damaged entry: nothing of the batch is written.
        let mut bad = entries[31].clone();
        bad.payload = Bytes::from_static(b"tampered");
        let batch = [entries[30].clone(), bad];
        assert!(matches!(replica.append_replicated(&batch), Err(WalError::BadChecksum { seq: Seq(32), .. })));
        assert_eq!(replica.last_seq(), Seq(30));
        // A gap inside the batch: all-or-nothing.
        let batch = [entries[30].clone(), entries[32].clone()];
        assert!(matches!(replica.append_replicated(&batch), Err(WalError::Gap { .. })));
        assert_eq!(replica.last_seq(), Seq(30));
        // Epochs going backwards: after the log's last epoch, and within a batch.
        let with_epoch = |e: &Entry, epoch: u64| {
            let mut e = e.clone();
            e.epoch = Epoch(epoch);
            e.crc = entry_crc(e.seq, e.epoch, e.timestamp_us, e.kind, &e.payload);
            e
        };
        let older = with_epoch(&entries[30], 0);
        assert!(matches!(
            replica.append_replicated(&[older]),
            Err(WalError::EpochBackwards { seq: Seq(31), epoch: Epoch(0), previous: Epoch(1), .. })
        ));
        let batch = [with_epoch(&entries[30], 3), with_epoch(&entries[31], 2)];
        assert!(matches!(replica.append_replicated(&batch), Err(WalError::EpochBackwards { seq: Seq(32), .. })));
        assert_eq!(replica.last_seq(), Seq(30));

        let r = replica.append_replicated(&entries[30..]).unwrap();
        assert_eq!(r, ReplicatedAppend { appended: 30, skipped: 0, last_seq: Seq(60) });
        assert_eq!(all(&replica), entries);
        assert_eq!(replica.digest(), primary.digest());
        assert_eq!(replica.last_epoch(), primary.last_epoch());
        drop(replica);
        let replica = open(root.path(), never());
        assert_eq!(replica.digest(), primary.digest());
        assert_eq!(replica.append_replicated(&entries).unwrap().skipped, 60);
    }
}

#[test]
fn digest_of_appended_log_equals_replicated_rebuild_and_survives_reopen() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let primary = open(a.path(), never().segment_bytes(1000));
    fill(&primary, 200);
    let replica = open(b.path(), never().segment_bytes(333));
    let mut from = Seq(1);
    loop {
        let batch = primary.read_from(from, 17, 900).unwrap();
        let Some(last) = batch.last() else { break };
        from = last.seq.next();
        replica.append_replicated(&batch).unwrap();
    }
    assert_eq!(replica.digest(), primary.digest());
    assert_ne!(replica.digest(), LogDigest::EMPTY);
    let d = primary.digest();
    drop((primary, replica));
    assert_eq!(open(a.path(), never()).digest(), d);
    assert_eq!(open(b.path(), never()).digest(), d);
}

#[test]
fn subscribe_wakes_on_append() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never());
    let mut rx = wal.subscribe();
    let mut durable = wal.subscribe_durable();
    assert_eq!(*rx.borrow_and_update(), Seq(0));
    let writer = wal.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        writer.append(Epoch(1), 0, Bytes::from_static(b"wake up")).unwrap()
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
        assert_eq!(*rx.borrow_and_update(), Seq(1));
        // Never: the OS has it, so durable follows.
        tokio::time::timeout(Duration::from_secs(10), durable.wait_for(|s| *s == Seq(1))).await.unwrap().unwrap();
    });
    assert_eq!(t.join().unwrap(), Seq(1));
    assert_eq!(wal.durable_seq(), Seq(1));
    assert_eq!(wal.sync().unwrap(), Seq(1));
}

#[test]
fn wait_for_wakes_every_waiter_and_misses_no_append() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
    // Several waiters chase a writer appending one entry at a time: each must see every target reached.
    let n = 2_000u64;
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let w = wal.clone();
            rt.spawn(async move {
                let mut next = Seq(1);
                while next.0 <= n {
                    tokio::time::timeout(Duration::from_secs(20), w.wait_for(next)).await.expect("woken");
                    next = Seq(w.last_seq().0.max(next.0 - 1) + 1);
                }
            })
        })
        .collect();
    let writer = wal.clone();
    std::thread::spawn(move || {
        for i in 0..n {
            // Pauses make the waiters actually park between appends.
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            writer.append(Epoch(1), 0, Bytes::from(i.to_le_bytes().to_vec())).unwrap();
        }
    })
    .join()
    .unwrap();
    rt.block_on(async {
        for w in waiters {
            w.await.unwrap();
        }
        // Already there: resolves at once.
        tokio::time::timeout(Duration::from_secs(1), wal.wait_for(Seq(n))).await.unwrap();
    });
}

#[test]
fn always_policy_group_commit_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let config = WalConfig::default().sync(SyncPolicy::Always).segment_bytes(4096);
    let wal = open(root.path(), config.clone());
    let threads = 6u64;
    let per_thread = 40u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..per_thread {
                    let p = Bytes::from(format!("thread {t} entry {i}"));
                    let seq = if i % 5 == 4 {
                        *wal.append_batch(Epoch(1), &[(t as u8, p.clone()), (t as u8, p)]).unwrap().end()
                    } else {
                        wal.append(Epoch(1), t as u8, p).unwrap()
                    };
                    // Returned means durable.
                    assert!(wal.durable_seq() >= seq);
                    seqs.push(seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<Seq> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len() as u64, threads * per_thread);
    let total = threads * per_thread + threads * (per_thread / 5);
    assert_eq!(wal.last_seq(), Seq(total));
    assert_eq!(wal.durable_seq(), wal.last_seq());
    let entries = all(&wal);
    assert_eq!(entries.len() as u64, total);
    let digest = wal.digest();
    drop(wal);
    let wal = open(root.path(), config);
    assert_eq!((wal.last_seq(), wal.durable_seq(), wal.digest()), (Seq(total), Seq(total), digest));
    assert_eq!(all(&wal), entries);
}

#[test]
fn interval_policy_advances_durable_seq_without_more_appends() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), WalConfig::default().sync(SyncPolicy::Interval(Duration::from_millis(5))));
    let mut durable = wal.subscribe_durable();
    for i in 0..10 {
        wal.append(Epoch(1), 0, payload(i)).unwrap();
    }
    let t0 = Instant::now();
    while wal.durable_seq() < Seq(10) {
        assert!(t0.elapsed() < Duration::from_secs(10), "durable_seq stuck at {}", wal.durable_seq());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(durable.has_changed().unwrap());
    assert_eq!(*durable.borrow_and_update(), Seq(10));
    assert_eq!(wal.sync().unwrap(), Seq(10));
}

#[test]
fn handles_are_send_sync_and_cheap() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<SpaceWal>();
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never());
    assert_eq!((wal.first_seq(), wal.last_seq(), wal.last_epoch()), (Seq(1), Seq(0), Epoch(0)));
    assert_eq!(wal.digest(), LogDigest::EMPTY);
    assert_eq!(wal.space(), &space());
    assert!(wal.append_batch(Epoch(1), &[]).unwrap().is_empty());
    assert!(format!("{wal:?}").contains("space-1"));
}

#[test]
fn sequential_catch_up_resumes_where_it_stopped_and_survives_truncations() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().segment_bytes(100 * 1024).tail_max_entries(0));
    let items: Vec<(EntryKind, Bytes)> = (0..4000u64).map(|i| (1, payload(i))).collect();
    wal.append_batch(Epoch(1), &items).unwrap();
    let expected = all(&wal);
    // Two readers interleaved, each resuming where its last read stopped.
    let (mut a, mut b) = (Seq(1), Seq(1500));
    while a <= Seq(4000) || b <= Seq(4000) {
        for from in [&mut a, &mut b] {
            let got = wal.read_from(*from, 37, 2000).unwrap();
            if let Some(last) = got.last() {
                assert_eq!(got[..], expected[(from.0 - 1) as usize..last.seq.0 as usize]);
                *from = last.seq.next();
            }
        }
    }
    // Cut in the middle of what was read, write different entries: reads must see the new ones.
    wal.truncate_suffix(Seq(2000)).unwrap();
    wal.append(Epoch(2), 9, Bytes::from_static(b"rewritten")).unwrap();
    let got = wal.read_from(Seq(1990), 20, usize::MAX).unwrap();
    assert_eq!(got.len(), 12);
    assert_eq!(got[..11], expected[1989..2000]);
    assert_eq!((got[11].seq, got[11].epoch, &got[11].payload[..]), (Seq(2001), Epoch(2), &b"rewritten"[..]));
    // Retention removes segments a reader was in: it gets Truncated, not stale data.
    let first = wal.truncate_prefix(Seq(1500)).unwrap();
    assert!(first > Seq(1000));
    assert!(matches!(wal.read_from(Seq(1000), 10, 1000), Err(WalError::Truncated { .. })));
    assert_eq!(wal.read_from(first, 1, 0).unwrap()[0], expected[(first.0 - 1) as usize]);
}

mod model {
    //! Random operation sequences checked against a plain in-memory model of the log.

    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Append(u8),
        Batch(Vec<u8>),
        TruncateSuffix(u8),
        TruncatePrefix(u8),
        Reopen,
        Read(u16, u8, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(Op::Append),
            2 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Op::Batch),
            1 => any::<u8>().prop_map(Op::TruncateSuffix),
            1 => any::<u8>().prop_map(Op::TruncatePrefix),
            1 => Just(Op::Reopen),
            3 => (any::<u16>(), any::<u8>(), any::<u16>()).prop_map(|(a, b, c)| Op::Read(a, b, c)),
        ]
    }

    /// (seq, epoch, kind, payload) of every entry ever kept, from seq 1 (retention does not remove from it).
    type Model = Vec<(Seq, Epoch, EntryKind, Bytes)>;

    fn body(n: u8, seq: u64) -> Bytes {
        Bytes::from(vec![seq as u8; n as usize % 90])
    }

    fn run(ops: Vec<Op>) {
        let root = tempfile::tempdir().unwrap();
        let config = never().segment_bytes(256).tail_max_entries(3);
        let mut wal = open(root.path(), config.clone());
        let mut model: Model = Vec::new();
        let mut first = Seq(1);
        let mut epoch = Epoch(1);
        for op in ops {
            let last = Seq(model.len() as u64);
            match op {
                Op::Append(n) => {
                    let seq = wal.append(epoch, n % 3, body(n, last.0 + 1)).unwrap();
                    assert_eq!(seq, last.next());
                    model.push((seq, epoch, n % 3, body(n, seq.0)));
                }
                Op::Batch(ns) => {
                    let items: Vec<(EntryKind, Bytes)> =
                        ns.iter().enumerate().map(|(i, &n)| (n % 3, body(n, last.0 + 1 + i as u64))).collect();
                    let r = wal.append_batch(epoch, &items).unwrap();
                    assert_eq!(*r.start(), last.next());
                    for (i, (k, p)) in items.into_iter().enumerate() {
                        model.push((Seq(last.0 + 1 + i as u64), epoch, k, p));
                    }
                }
                Op::TruncateSuffix(back) => {
                    let floor = if first > Seq(1) { first.0 } else { 0 };
                    let after = last.0.saturating_sub(u64::from(back) % 20).max(floor);
                    wal.truncate_suffix(Seq(after)).unwrap();
                    model.truncate(after as usize);
                    epoch = Epoch(epoch.0 + 1);
                }
                Op::TruncatePrefix(k) => {
                    let upto = Seq(first.0 + u64::from(k) % 30);
                    let new_first = wal.truncate_prefix(upto).unwrap();
                    assert!(new_first >= first && new_first <= first.max(upto.next()), "{first} {upto} {new_first}");
                    assert!(new_first <= last.next());
                    first = new_first;
                }
                Op::Reopen => {
                    drop(wal);
                    wal = open(root.path(), config.clone());
                }
                Op::Read(off, max_entries, max_bytes) => {
                    let span = last.0 + 2 - first.0;
                    let from = Seq(first.0 + u64::from(off) % span);
                    let (max_entries, max_bytes) = (usize::from(max_entries % 20), usize::from(max_bytes % 400));
                    let got = wal.read_from(from, max_entries, max_bytes).unwrap();
                    let mut want = Vec::new();
                    let mut bytes = 0;
                    for m in model.iter().skip((from.0 - 1) as usize) {
                        if want.len() >= max_entries.max(1) || (!want.is_empty() && bytes + m.3.len() > max_bytes) {
                            break;
                        }
                        bytes += m.3.len();
                        want.push(m);
                    }
                    assert_eq!(got.len(), want.len(), "read {from} {max_entries} {max_bytes}");
                    for (g, w) in got.iter().zip(want) {
                        assert!(g.verify());
                        assert_eq!((g.seq, g.epoch, g.kind, &g.payload), (w.0, w.1, w.2, &w.3));
                    }
                    if first > Seq(1) {
                        assert!(matches!(wal.read_from(Seq(first.0 - 1), 1, 1), Err(WalError::Truncated { .. })));
                    }
                }
            }
            let last = Seq(model.len() as u64);
            assert_eq!((wal.first_seq(), wal.last_seq()), (first, last));
            assert_eq!(wal.last_epoch(), model.last().map_or(Epoch(0), |m| m.1));
            let digest = model.iter().fold(LogDigest::EMPTY, |d, m| d.step(m.0, m.2, &m.3));
            assert_eq!(wal.digest(), digest);
        }
    }

    #[test]
    fn random_operations_match_the_model() {
        let config =
            Config { cases: 48, rng_seed: RngSeed::Fixed(0x5eed), failure_persistence: None, ..Config::default() };
        proptest::test_runner::TestRunner::new(config)
            .run(&proptest::collection::vec(op(), 1..60), |ops| {
                run(ops);
                Ok(())
            })
            .unwrap();
    }
}

#[test]
fn digest_at_matches_the_digest_of_every_prefix_across_segments_and_retention() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never().segment_bytes(4096));
    let mut prefixes = vec![LogDigest::EMPTY];
    for i in 0..600u64 {
        wal.append(Epoch(1), (i % 3) as u8, Bytes::from(format!("entry {i} {}", "z".repeat((i % 50) as usize))))
            .unwrap();
        prefixes.push(wal.digest());
    }
    for (seq, d) in prefixes.iter().enumerate() {
        assert_eq!(wal.digest_at(Seq(seq as u64)).unwrap(), Some(*d), "prefix {seq}");
    }
    assert_eq!(wal.digest_at(Seq(601)).unwrap(), None);
    let first = wal.truncate_prefix(Seq(300)).unwrap();
    assert_eq!(wal.digest_at(Seq(first.0 - 1)).unwrap(), Some(prefixes[first.0 as usize - 1]));
    assert_eq!(wal.digest_at(Seq(first.0 - 2)).unwrap(), None);
    assert_eq!(wal.digest_at(Seq(550)).unwrap(), Some(prefixes[550]));
}

/// `truncate_suffix` deletes later segments newest first, then cuts: a crash between the two leaves
/// a shorter but contiguous log, which reopens with everything it holds readable.
#[test]
fn a_crash_between_the_deletions_and_the_cut_of_truncate_suffix_reopens() {
    let root = tempfile::tempdir().unwrap();
    let config = WalConfig::default().sync(SyncPolicy::Always).segment_bytes(300);
    let expected = fill(&open(root.path(), config.clone()), 60);
    let dir = root.path().join(space().as_str());
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 5, "{segments:?}");
    // What truncate_suffix had done when the crash came: the two newest segments deleted.
    for path in &segments[segments.len() - 2..] {
        std::fs::remove_file(path).unwrap();
    }
    let wal = open(root.path(), config);
    let held = all(&wal);
    assert!(wal.last_seq() < Seq(60) && !held.is_empty());
    assert_eq!(held[..], expected[..held.len()]);
    assert_eq!(wal.digest(), digest_of(&held));
}

#[test]
fn truncations_are_counted_with_their_lowest_cut() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never());
    fill(&wal, 30);
    assert_eq!((wal.truncations(), wal.cut_since(0)), (0, None));
    wal.truncate_suffix(Seq(20)).unwrap();
    wal.truncate_suffix(Seq(12)).unwrap();
    fill(&wal, 25);
    wal.truncate_suffix(Seq(18)).unwrap();
    // A truncation past the end cuts nothing and is not counted.
    wal.truncate_suffix(Seq(99)).unwrap();
    assert_eq!(wal.truncations(), 3);
    assert_eq!(wal.cut_since(0), Some(Seq(12)));
    assert_eq!(wal.cut_since(2), Some(Seq(18)));
    assert_eq!(wal.cut_since(3), None);
}

#[tokio::test]
async fn wait_for_or_cut_ends_on_a_truncation_before_or_during_the_wait() {
    let root = tempfile::tempdir().unwrap();
    let wal = open(root.path(), never());
    fill(&wal, 10);
    let seen = wal.truncations();
    wal.truncate_suffix(Seq(5)).unwrap();
    // The truncation came before the wait began: at once.
    tokio::time::timeout(Duration::from_secs(60), wal.wait_for_or_cut(Seq(11), Some(seen))).await.unwrap();
    // One during the wait wakes it.
    let seen = wal.truncations();
    let waiting = wal.clone();
    let waiter = tokio::spawn(async move { waiting.wait_for_or_cut(Seq(11), Some(seen)).await });
    tokio::task::yield_now().await;
    wal.truncate_suffix(Seq(3)).unwrap();
    tokio::time::timeout(Duration::from_secs(60), waiter).await.unwrap().unwrap();
}
