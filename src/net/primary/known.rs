//! The replicas a primary knows, kept in `<data_dir>/replicas+known` with where each stood in
//! each space. Retention ([`super::Primary::durable_everywhere`]) must never trim what a replica
//! still needs; without this file a restarted primary would not know a replica until it
//! reconnected, and trimming in between could leave it needing a snapshot.
//!
//! A position is kept with the log's digest there, and checked against the log when the primary
//! starts: a log cut back, or one that lost its tail to a crash, since the position was kept makes
//! it count as 0 until the replica is back. Positions are never above what the replica holds: acks
//! the primary checked against its log, lowered to what the replica's hello says it holds.
//!
//! The format is one line of JSON and a line with its CRC32C, so that an operator can read it and
//! a damaged file is never mistaken for positions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::entry::LogDigest;
use crate::net::error::NetError;
use crate::types::{Seq, SpaceId};
use crate::wal::fs::write_durably;
use crate::wal::{SpaceWal, WalError};

/// Where a replica stood in one space, for a space its current connection has not set up (none
/// since a restart, or not yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Floor {
    /// It held `seq` of this log durable when the log had had `truncations` suffix truncations
    /// ([`SpaceWal::truncations`]): a later cut lowers it.
    At { seq: Seq, truncations: u64 },
    /// Its copy lacks entries retention removed: only a snapshot helps it, so it does not count.
    NeedsSnapshot,
}

/// Where a replica stood in each space it was known in; a space missing counts as 0.
pub(super) type Floors = BTreeMap<SpaceId, Floor>;

impl Floor {
    /// What the replica holds of `wal` as the log is now, for retention; `None` if it does not count.
    pub(super) fn held(&self, wal: Option<&SpaceWal>) -> Option<Seq> {
        match *self {
            Floor::NeedsSnapshot => None,
            Floor::At { seq, truncations } => {
                Some(wal.and_then(|w| w.cut_since(truncations)).map_or(seq, |cut| seq.min(cut)))
            }
        }
    }

    /// The floor as kept on disk, with the log's digest at it, read with no cut in between.
    pub(super) fn kept(&self, wal: Option<&SpaceWal>) -> Result<Kept, WalError> {
        let (Floor::At { .. }, Some(wal)) = (self, wal) else {
            return Ok(match self {
                Floor::NeedsSnapshot => Kept::NeedsSnapshot,
                Floor::At { .. } => Kept::durable(Seq::ZERO, None),
            });
        };
        // A cut between the position and its digest would pair a position with a digest of
        // another log: read again. Cuts are rare; past a few, 0 is kept, which holds everything.
        for _ in 0..3 {
            let before = wal.truncations();
            let seq = self.held(Some(wal)).unwrap_or(Seq::ZERO);
            let digest = wal.digest_at(seq)?;
            if wal.truncations() == before {
                return Ok(Kept::durable(seq, digest));
            }
        }
        Ok(Kept::durable(Seq::ZERO, None))
    }

    /// A kept position checked against the log as it opened (blocking: reads up to 64 KiB). One
    /// that is not this log's any more (the log was cut back, or lost its tail to a crash, after
    /// it was kept) counts as 0 until the replica is back.
    pub(super) fn checked(kept: Kept, wal: Option<&SpaceWal>) -> Floor {
        let Kept::Durable { seq, digest } = kept else { return Floor::NeedsSnapshot };
        let seq = Seq(seq);
        let Some(wal) = wal else { return Floor::At { seq: Seq::ZERO, truncations: 0 } };
        let truncations = wal.truncations();
        let holds = match wal.digest_at(seq) {
            Ok(Some(now)) => Some(now.0) == digest,
            // Below what retention kept: not checkable. It counts as it is (retention waits for
            // the replica to be back, when its hello and acks tell more, or forgotten).
            Ok(None) => seq < wal.first_seq(),
            Err(e) => {
                tracing::warn!(space = %wal.space(), error = %e, "cannot check a kept replica position");
                false
            }
        };
        if !holds {
            tracing::warn!(space = %wal.space(), %seq, "a replica's kept position is not in this log any more (cut back, or its tail lost): it counts as 0 until the replica is back");
        }
        Floor::At { seq: if holds { seq } else { Seq::ZERO }, truncations }
    }
}

/// Where a replica stood in one space, as kept on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kept {
    /// It held entries up to `seq` durable, and this log's digest up to `seq` was `digest`
    /// (`None`: below what retention kept, so not checkable).
    Durable { seq: u64, digest: Option<u64> },
    /// Its copy lacks entries retention removed: only a snapshot helps it, so it does not count.
    NeedsSnapshot,
}

impl Kept {
    /// `seq` of this log, with its digest there (`None` if `seq` is not held).
    pub(super) fn durable(seq: Seq, digest: Option<LogDigest>) -> Kept {
        Kept::Durable { seq: seq.0, digest: digest.map(|d| d.0) }
    }
}

/// Every known replica by name, with where it stood in each space (a space missing counts as 0).
pub(super) type Known = BTreeMap<String, BTreeMap<SpaceId, Kept>>;

/// The file, in the WAL root; `+` keeps it apart from any space id (a space's folder has its id for name).
const FILE: &str = "replicas+known";

/// Larger than any real list (a name and a position per space and replica); a larger file is damaged.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The replicas kept in `dir`: none if none were kept. A file that cannot be read is an error
/// (the primary does not start): starting without it could trim what a replica still needs.
pub(super) fn read(dir: &Path) -> Result<Known, NetError> {
    let path = dir.join(FILE);
    let damaged = |reason: String| NetError::KnownReplicas { path: path.clone(), reason };
    let meta = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Known::new()),
        Err(e) => return Err(damaged(e.to_string())),
        Ok(meta) => meta,
    };
    if !meta.is_file() {
        return Err(damaged("not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(damaged(format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len())));
    }
    let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
    decode(&bytes).map_err(damaged)
}

/// Replaces the kept list with `known`, durably (a crash leaves the old list or the new one).
pub(super) fn write(dir: &Path, known: &Known) -> Result<(), WalError> {
    write_durably(dir, &dir.join(FILE), &encode(known), "keep the known replicas in")
}

/// Removes the kept list: a node that serves as a replica has no replicas of its own, and what
/// it kept as a primary may be wrong by the time it is one again (a failover cuts logs back).
pub(crate) fn forget_all(dir: &Path) -> Result<(), WalError> {
    let path = dir.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "removed the replicas this node knew as a primary: it serves as a replica now");
            crate::wal::fs::sync_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::io("remove the known replicas of a former primary", &path, e)),
    }
}

fn encode(known: &Known) -> Vec<u8> {
    let plain: BTreeMap<&str, BTreeMap<&str, Kept>> = known
        .iter()
        .map(|(name, spaces)| (name.as_str(), spaces.iter().map(|(s, kept)| (s.as_str(), *kept)).collect()))
        .collect();
    // Maps of strings to plain values always serialize.
    let json = serde_json::to_string(&plain).unwrap_or_else(|_| "{}".into());
    format!("{json}\ncrc32c {:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
}

fn decode(bytes: &[u8]) -> Result<Known, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text.lines();
    let (Some(json), Some(crc), None) = (lines.next(), lines.next(), lines.next()) else {
        return Err("not two lines".into());
    };
    let crc =
        crc.strip_prefix("crc32c ").and_then(|hex| u32::from_str_radix(hex, 16).ok()).ok_or("no checksum line")?;
    if crc != crc32c::crc32c(json.as_bytes()) {
        return Err("checksum mismatch".into());
    }
    let plain: BTreeMap<String, BTreeMap<String, Kept>> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    plain
        .into_iter()
        .map(|(name, spaces)| {
            let spaces = spaces
                .into_iter()
                .map(|(space, kept)| Ok((SpaceId::new(&space).map_err(|e| e.to_string())?, kept)))
                .collect::<Result<BTreeMap<SpaceId, Kept>, String>>()?;
            Ok((name, spaces))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Known {
        let spaces = |v: &[(&str, Kept)]| v.iter().map(|(s, k)| (SpaceId::new(s).unwrap(), *k)).collect();
        Known::from([
            (
                "replica-1".to_string(),
                spaces(&[
                    ("orders", Kept::durable(Seq(1_300), Some(LogDigest(u64::MAX)))),
                    ("users", Kept::durable(Seq(7), None)),
                    ("trimmed", Kept::NeedsSnapshot),
                ]),
            ),
            ("replica \"2\"".to_string(), spaces(&[])),
        ])
    }

    #[test]
    fn kept_replicas_read_back_and_a_missing_file_reads_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
        write(dir.path(), &sample()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), sample());
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let json = r#"{"replica \"2\"":{},"replica-1":{"orders":{"durable":{"seq":1300,"digest":18446744073709551615}},"trimmed":"needs_snapshot","users":{"durable":{"seq":7,"digest":null}}}}"#;
        assert!(text.starts_with(json), "{text}");
        write(dir.path(), &Known::new()).unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
        forget_all(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        forget_all(dir.path()).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_that_says_what_to_do() {
        let good = encode(&sample());
        let flipped = {
            let mut b = good.clone();
            let i = b.iter().position(|&c| c == b'3').unwrap();
            b[i] = b'9';
            b
        };
        let with_crc = |json: &str| format!("{json}\ncrc32c {:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes();
        for (what, bytes) in [
            ("a flipped digit", flipped),
            ("cut short", good[..good.len() / 2].to_vec()),
            ("no checksum", good[..good.iter().position(|&c| c == b'\n').unwrap()].to_vec()),
            ("a space id that is a path", with_crc(r#"{"r":{"../x":"needs_snapshot"}}"#)),
            ("a position of another shape", with_crc(r#"{"r":{"x":300}}"#)),
            ("not UTF-8", vec![0xff, b'\n', b'x']),
        ] {
            assert!(decode(&bytes).is_err(), "{what}");
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(FILE), &bytes).unwrap();
            let err = read(dir.path()).unwrap_err().to_string();
            assert!(err.contains("damaged") && err.contains("remove it to start"), "{what}: {err}");
        }
        // Larger than any real list: not even read. Not a file (a FIFO would block the start).
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join(FILE)).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("more than"));
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("not a regular file"));
        // A folder where the new file goes: an error that says what was being done.
        std::fs::create_dir(dir.path().join(format!("{FILE}.tmp"))).unwrap();
        let err = write(dir.path(), &sample()).unwrap_err();
        assert!(err.to_string().contains("known replicas"), "{err}");
    }
}
