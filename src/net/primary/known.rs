//! The replicas a primary knows, kept in `<data_dir>/replicas+known` with where each stood in
//! each space. Retention ([`super::Primary::durable_everywhere`]) must never trim what a replica
//! still needs; without this file a restarted primary would not know a replica until it
//! reconnected, and trimming in between could leave it needing a snapshot.
//!
//! The positions are what a replica told this primary it holds (acks checked against this log,
//! lowered to what its hello says), so never above it until the replica cuts its own log back,
//! which the primary learns at its next hello. With them the file keeps each log's end (last
//! sequence and digest), which every position of the space is at or below: when the primary
//! starts, a log that no longer holds that prefix (cut back, or its tail lost to a crash) makes
//! the space's positions count as 0 until the replicas are back. Writing it reads no log file.
//!
//! The format is one line of JSON and a line with its CRC32C, so that an operator can read it and
//! a damaged file is never mistaken for positions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::net::error::NetError;
use crate::types::{Seq, SpaceId};
use crate::wal::fs::{read_small, write_durably, SmallFile};
use crate::wal::{SpaceWal, WalError, WalStore};

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

    fn kept(&self, wal: Option<&SpaceWal>) -> Kept {
        match self.held(wal) {
            None => Kept::NeedsSnapshot,
            Some(seq) => Kept::Durable(seq.0),
        }
    }
}

/// Where a replica stood in one space, as kept on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kept {
    /// It held entries up to this sequence durable.
    Durable(u64),
    /// Its copy lacks entries retention removed: only a snapshot helps it, so it does not count.
    NeedsSnapshot,
}

/// A log's end when positions were kept: every position kept for the space is at or below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LogEnd {
    last_seq: u64,
    digest: u64,
}

impl LogEnd {
    /// Whether `wal` still holds the prefix this end was kept for (blocking: reads up to 64 KiB).
    fn still_in(&self, wal: &SpaceWal) -> bool {
        match wal.digest_at(Seq(self.last_seq)) {
            Ok(Some(now)) => now.0 == self.digest,
            // Retention removed it since (not checkable; the positions count as they are, and
            // retention waits for those replicas to be back or forgotten), or the log is shorter.
            Ok(None) => Seq(self.last_seq) < wal.first_seq(),
            Err(e) => {
                tracing::warn!(space = %wal.space(), error = %e, "cannot check the kept replica positions");
                false
            }
        }
    }
}

/// What the file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Known {
    /// Each space's log end when the positions were kept.
    logs: BTreeMap<SpaceId, LogEnd>,
    /// Every known replica by name, with where it stood in each space (a space missing counts as 0).
    replicas: BTreeMap<String, BTreeMap<SpaceId, Kept>>,
}

impl Known {
    /// `links` (every known replica with its floors, as this primary held them a moment ago) to be
    /// kept, with the logs' ends. The ends are read after the floors, and each position is lowered
    /// by every cut since its floor was taken after both: whatever cut happens meanwhile, a
    /// position is of a prefix that the log end kept with it holds.
    pub(super) fn of(store: &WalStore, links: Vec<(String, Floors)>) -> Known {
        let logs = store
            .spaces()
            .into_iter()
            .map(|wal| {
                let (last, _, digest) = wal.end();
                (wal.space().clone(), LogEnd { last_seq: last.0, digest: digest.0 })
            })
            .collect();
        let kept = |space: &SpaceId, floor: &Floor| floor.kept(store.get(space).as_ref());
        let replicas = links
            .into_iter()
            .map(|(name, floors)| (name, floors.iter().map(|(s, f)| (s.clone(), kept(s, f))).collect()))
            .collect();
        Known { logs, replicas }
    }

    /// The replicas kept, with their floors checked against `store`'s logs as they opened
    /// (blocking: reads up to 64 KiB per space). A space whose log no longer holds the prefix
    /// the positions were kept against (cut back, or its tail lost to a crash), or has no log
    /// now, counts its replicas from 0 until they are back.
    pub(super) fn floors(self, store: &WalStore) -> BTreeMap<String, Floors> {
        // Per space: the highest position the log still vouches for (none if it no longer holds
        // the kept prefix), and its truncation count, read first: a cut after it, even one the
        // check already saw, lowers the floors.
        let logs: BTreeMap<SpaceId, (Option<u64>, u64)> = self
            .logs
            .into_iter()
            .filter_map(|(space, end)| {
                let wal = store.get(&space)?;
                let truncations = wal.truncations();
                let vouched = end.still_in(&wal).then_some(end.last_seq);
                if vouched.is_none() {
                    tracing::warn!(%space, "the log was cut back or lost its tail since the replicas' positions were kept: they count as 0 until the replicas are back");
                }
                Some((space, (vouched, truncations)))
            })
            .collect();
        let floor = |space: &SpaceId, kept: Kept| {
            let Kept::Durable(seq) = kept else { return Floor::NeedsSnapshot };
            let (vouched, truncations) = logs.get(space).copied().unwrap_or((None, 0));
            let seq = if vouched.is_some_and(|upto| seq <= upto) { Seq(seq) } else { Seq::ZERO };
            Floor::At { seq, truncations }
        };
        self.replicas
            .into_iter()
            .map(|(name, kept)| (name, kept.into_iter().map(|(s, k)| (s.clone(), floor(&s, k))).collect()))
            .collect()
    }
}

/// The file, in the WAL root; `+` keeps it apart from any space id (a space's folder has its id for name).
const FILE: &str = "replicas+known";

/// Larger than any real list (a name and a position per space and replica); a larger file is damaged.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The replicas kept in `dir`: none if none were kept. A damaged file is an error (the primary
/// does not start: starting without it could trim what a replica still needs), and so is one
/// that cannot be read.
pub(super) fn read(dir: &Path) -> Result<Known, NetError> {
    let path = dir.join(FILE);
    let damaged = |reason: String| NetError::KnownReplicas { path: path.clone(), reason };
    match read_small(&path, MAX_FILE_BYTES, "read the known replicas")? {
        SmallFile::Missing => Ok(Known::default()),
        SmallFile::Damaged(reason) => Err(damaged(reason)),
        SmallFile::Bytes(bytes) => decode(&bytes).map_err(damaged),
    }
}

/// Replaces the kept list with `known`, durably (a crash leaves the old list or the new one).
pub(super) fn write(dir: &Path, known: &Known) -> Result<(), WalError> {
    let path = dir.join(FILE);
    let json = serde_json::to_string(known)
        .map_err(|e| WalError::io("encode the known replicas", &path, std::io::Error::other(e)))?;
    write_durably(dir, &path, &with_checksum(&json), "keep the known replicas in")
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

fn with_checksum(json: &str) -> Vec<u8> {
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
    serde_json::from_str(json).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{SyncPolicy, WalConfig};

    fn id(s: &str) -> SpaceId {
        SpaceId::new(s).unwrap()
    }

    fn sample() -> Known {
        let spaces = |v: &[(&str, Kept)]| v.iter().map(|(s, k)| (id(s), *k)).collect();
        Known {
            logs: BTreeMap::from([(id("orders"), LogEnd { last_seq: 1_400, digest: u64::MAX })]),
            replicas: BTreeMap::from([
                (
                    "replica-1".to_string(),
                    spaces(&[("orders", Kept::Durable(1_300)), ("trimmed", Kept::NeedsSnapshot)]),
                ),
                ("replica \"2\"".to_string(), spaces(&[])),
            ]),
        }
    }

    #[test]
    fn kept_replicas_read_back_and_a_missing_file_reads_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Known::default());
        write(dir.path(), &sample()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), sample());
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let json = r#"{"logs":{"orders":{"last_seq":1400,"digest":18446744073709551615}},"replicas":{"replica \"2\"":{},"replica-1":{"orders":{"durable":1300},"trimmed":"needs_snapshot"}}}"#;
        assert!(text.starts_with(json), "{text}");
        forget_all(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        forget_all(dir.path()).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_that_says_what_to_do() {
        let good = with_checksum(&serde_json::to_string(&sample()).unwrap());
        let flipped = {
            let mut b = good.clone();
            let i = b.iter().position(|&c| c == b'3').unwrap();
            b[i] = b'9';
            b
        };
        for (what, bytes) in [
            ("a flipped digit", flipped),
            ("cut short", good[..good.len() / 2].to_vec()),
            ("no checksum", good[..good.iter().position(|&c| c == b'\n').unwrap()].to_vec()),
            ("a space id that is a path", with_checksum(r#"{"logs":{},"replicas":{"r":{"../x":"needs_snapshot"}}}"#)),
            ("a position of another shape", with_checksum(r#"{"logs":{},"replicas":{"r":{"x":300}}}"#)),
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

    /// Positions kept with the logs' ends come back as they were; a log cut back, or one that
    /// lost its tail, since they were kept makes its space's positions 0.
    #[test]
    fn kept_positions_are_checked_against_the_logs_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = WalConfig { sync: SyncPolicy::Never, ..WalConfig::default() };
        let store = WalStore::open(dir.path(), config.clone()).unwrap();
        let append = |space: &str, n: u64, tag: &str| {
            let wal = store.space(&id(space)).unwrap();
            for i in 0..n {
                wal.append(crate::types::Epoch(1), 0, bytes::Bytes::from(format!("{tag}-{i}"))).unwrap();
            }
        };
        for space in ["kept", "cut", "short"] {
            append(space, 10, "old");
        }
        let at = |seq| Floor::At { seq: Seq(seq), truncations: 0 };
        let floors = |v: [(&str, Floor); 4]| v.into_iter().map(|(s, f)| (id(s), f)).collect::<Floors>();
        let before = floors([("kept", at(8)), ("cut", at(8)), ("short", at(8)), ("trimmed", Floor::NeedsSnapshot)]);
        let known = Known::of(&store, vec![("r".to_string(), before.clone())]);
        assert_eq!(known.logs.len(), 3);
        assert_eq!(known.clone().floors(&store)["r"], before, "as they were");
        // "cut" is cut back and written again; "short" lost its tail (as a crash under Never can).
        store.space(&id("cut")).unwrap().truncate_suffix(Seq(5)).unwrap();
        append("cut", 5, "new");
        store.space(&id("short")).unwrap().truncate_suffix(Seq(9)).unwrap();
        let after = known.floors(&store);
        let expected = floors([("kept", at(8)), ("cut", at(0)), ("short", at(0)), ("trimmed", Floor::NeedsSnapshot)]);
        assert_eq!(
            after["r"].iter().map(|(s, f)| (s.clone(), f.held(None))).collect::<Vec<_>>(),
            expected.iter().map(|(s, f)| (s.clone(), f.held(None))).collect::<Vec<_>>()
        );
        // A cut after the floors were taken: the position is lowered to it, and kept with the
        // log's end after it.
        let taken =
            vec![("r".to_string(), floors([("kept", at(8)), ("cut", at(0)), ("short", at(0)), ("trimmed", at(1))]))];
        store.space(&id("kept")).unwrap().truncate_suffix(Seq(4)).unwrap();
        append("kept", 3, "new");
        let known = Known::of(&store, taken);
        assert_eq!(known.replicas["r"][&id("kept")], Kept::Durable(4));
        assert_eq!(known.logs[&id("kept")].last_seq, 7);
        assert_eq!(known.floors(&store)["r"][&id("kept")].held(None), Some(Seq(4)));
    }
}
