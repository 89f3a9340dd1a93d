//! Adversarial segment files: bit flips, truncations, rewritten record lengths, zeroed and random
//! ranges, junk tails, in sealed and active segments, before open (recovery) and after open (reads).
//! Deterministic (seeded xorshift), a few seconds in `cargo test --release`.
//!
//! Invariants: nothing panics; a log that opens holds a prefix of what was written, entry for entry,
//! with the matching digest; a log that does not open reports `WalError::Corruption`; a read of a
//! segment damaged after open returns correct entries or `Corruption`, never altered ones.

mod common;
#[path = "../src/wal/test_files.rs"]
mod test_files;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use bytes::Bytes;
use common::Rng;
use test_files::{copy_dir, segment_files};
use walship::wal::{SpaceWal, SyncPolicy, WalConfig, WalError, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use walship::{Entry, Epoch, LogDigest, Seq, SpaceId};

fn space() -> SpaceId {
    SpaceId::new("s").unwrap()
}

fn config() -> WalConfig {
    WalConfig::default().sync(SyncPolicy::Never).segment_bytes(2048).max_entry_bytes(1 << 16)
}

/// Record start offsets of a segment file, walked from its length fields.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN as usize;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        out.push(at);
        at += RECORD_HEADER_LEN + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    out
}

fn digest_of(es: &[Entry]) -> LogDigest {
    es.iter().fold(LogDigest::EMPTY, |d, e| d.step(e.seq, e.kind, &e.payload))
}

/// A log of about ten segments; returns it with every entry written.
fn reference_log(root: &Path) -> Vec<Entry> {
    let wal = SpaceWal::open(root, space(), config()).unwrap();
    let mut rng = Rng(0xd15c_0001);
    for i in 0..150u64 {
        let len = [0, 1, 7, 40, 300][rng.below(5)];
        let payload: Vec<u8> = (0..len).map(|j| (i as u8).wrapping_mul(31).wrapping_add(j as u8)).collect();
        wal.append(Epoch(1 + i / 50), (i % 5) as u8, Bytes::from(payload)).unwrap();
    }
    wal.read_from(Seq(1), usize::MAX, usize::MAX).unwrap()
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) -> &'static str {
    let n = bytes.len();
    match rng.below(6) {
        0 => {
            let bit = rng.below(n * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            "bit flip"
        }
        1 => {
            bytes.truncate(rng.below(n));
            "truncate"
        }
        2 => {
            let offs = record_offsets(bytes);
            if offs.is_empty() {
                bytes.truncate(rng.below(n));
                return "truncate";
            }
            let at = offs[rng.below(offs.len())];
            let real = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let c = [0, 1, real.wrapping_sub(1), real + 1, 1 << 16, (1 << 16) + 1, u32::MAX, rng.next() as u32];
            bytes[at..at + 4].copy_from_slice(&c[rng.below(c.len())].to_le_bytes());
            "record length"
        }
        3 => {
            let at = rng.below(n);
            let end = (at + 1 + rng.below(64)).min(n);
            bytes[at..end].fill(0);
            "zeroed range"
        }
        4 => {
            let at = rng.below(n);
            let end = (at + 1 + rng.below(64)).min(n);
            for b in &mut bytes[at..end] {
                *b = rng.next() as u8;
            }
            "random range"
        }
        _ => {
            for _ in 0..1 + rng.below(80) {
                bytes.push(rng.next() as u8);
            }
            "junk tail"
        }
    }
}

#[test]
fn recovery_of_mutated_segments_never_panics_nor_returns_altered_entries() {
    let root = tempfile::tempdir().unwrap();
    let orig = reference_log(root.path());
    let src = root.path().join("s");
    let segs = segment_files(&src);
    assert!(segs.len() >= 5, "{}", segs.len());
    let mut rng = Rng(0xd15c_0002);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..400 {
        let copy = tempfile::tempdir().unwrap();
        let dir = copy.path().join("s");
        copy_dir(&src, &dir);
        let victim = dir.join(segs[rng.below(segs.len())].file_name().unwrap());
        let mut bytes = std::fs::read(&victim).unwrap();
        let what = mutate(&mut rng, &mut bytes);
        std::fs::write(&victim, &bytes).unwrap();

        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let wal = SpaceWal::open(copy.path(), space(), config())?;
            let got = wal.read_from(wal.first_seq(), usize::MAX, usize::MAX)?;
            Ok::<_, WalError>((got, wal.digest(), wal.last_seq()))
        }));
        let outcome = outcome.unwrap_or_else(|_| panic!("round {round}: {what} in {} panicked", victim.display()));
        match outcome {
            Ok((got, digest, last)) => {
                opened += 1;
                assert!(got.len() <= orig.len());
                assert_eq!(got[..], orig[..got.len()], "round {round}: {what} gave altered entries");
                assert_eq!(digest, digest_of(&got), "round {round}: {what}");
                assert_eq!(last, Seq(got.len() as u64));
            }
            Err(WalError::Corruption { .. }) => refused += 1,
            Err(e) => panic!("round {round}: {what}: expected Corruption, got {e}"),
        }
    }
    assert!(opened > 0 && refused > 0, "opened {opened}, refused {refused}");
}

#[test]
fn reads_of_segments_damaged_after_open_never_return_altered_entries() {
    let root = tempfile::tempdir().unwrap();
    let orig = reference_log(root.path());
    let src = root.path().join("s");
    let mut rng = Rng(0xd15c_0003);
    for round in 0..300 {
        let copy = tempfile::tempdir().unwrap();
        let dir = copy.path().join("s");
        copy_dir(&src, &dir);
        // No memory tail: every read goes to the segments.
        let wal = SpaceWal::open(copy.path(), space(), config().tail_max_entries(0)).unwrap();
        let segs = segment_files(&dir);
        let victim = &segs[rng.below(segs.len() - 1)]; // a sealed one
        let mut bytes = std::fs::read(victim).unwrap();
        // In-place damage only (the open log knows each segment's length).
        let at = SEGMENT_HEADER_LEN as usize + rng.below(bytes.len() - SEGMENT_HEADER_LEN as usize);
        bytes[at] ^= 1 << rng.below(8);
        std::fs::write(victim, &bytes).unwrap();
        let from = Seq(1 + rng.below(orig.len()) as u64);
        let r = catch_unwind(AssertUnwindSafe(|| {
            (wal.read_from(from, 1 + rng.below(40), usize::MAX), wal.digest_at(from))
        }))
        .unwrap_or_else(|_| panic!("round {round}: read panicked"));
        match r.0 {
            Ok(got) => {
                let start = (from.0 - 1) as usize;
                assert_eq!(got[..], orig[start..start + got.len()], "round {round}: altered entries");
            }
            Err(WalError::Corruption { .. }) => {}
            Err(e) => panic!("round {round}: expected Corruption, got {e}"),
        }
        match r.1 {
            Ok(Some(d)) => assert_eq!(d, digest_of(&orig[..from.0 as usize]), "round {round}: wrong digest_at"),
            Ok(None) | Err(WalError::Corruption { .. }) => {}
            Err(e) => panic!("round {round}: expected Corruption, got {e}"),
        }
    }
}
