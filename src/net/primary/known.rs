//! The replicas a primary knows, kept in `<data_dir>/replicas+known` with, per space, the last
//! entry each was known to hold durable. Retention ([`super::Primary::durable_everywhere`]) must
//! never trim what a replica still needs; without this file a restarted primary would not know a
//! replica until it reconnected, and trimming in between could leave it needing a snapshot.
//!
//! A position kept here is never above what the replica holds: it comes from acks the primary
//! checked against its own log, lowered to what the replica's hello says (a space set aside, or
//! not held at all, counts as 0). After a crash the file may be older than the acks, which only
//! makes retention keep more until the replica is back.
//!
//! The format is one line of JSON (`{"replica": {"space": seq}}`) and a line with its CRC32C,
//! so that an operator can read it and a damaged file is not mistaken for positions.

use std::collections::BTreeMap;
use std::path::Path;

use crate::types::{Seq, SpaceId};
use crate::wal::fs::write_durably;
use crate::wal::WalError;

/// The last entry of each space a replica is known to hold durable; a space missing counts as 0.
pub(super) type Floors = BTreeMap<SpaceId, Seq>;

/// Every known replica by name.
pub(super) type Known = BTreeMap<String, Floors>;

/// The file, in the WAL root; `+` keeps it apart from any space id (a space's folder has its id for name).
const FILE: &str = "replicas+known";

/// Larger than any real list (a name and a position per space and replica); a larger file is damaged.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The replicas kept in `dir`: none if none were kept. An unreadable or damaged file is logged
/// and read as none, which is what a primary knew before the file existed: replicas count again
/// once they reconnect.
pub(super) fn read(dir: &Path) -> Known {
    let path = dir.join(FILE);
    let bytes = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Known::new(),
        Ok(meta) if meta.len() > MAX_FILE_BYTES => Err(format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len())),
        _ => std::fs::read(&path).map_err(|e| e.to_string()),
    };
    match bytes.and_then(|b| decode(&b)) {
        Ok(known) => known,
        Err(reason) => {
            tracing::warn!(
                file = %path.display(),
                %reason,
                "unreadable list of known replicas: retention counts each replica again once it reconnects (keep a floor of your own until then)"
            );
            Known::new()
        }
    }
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
        Ok(()) => crate::wal::fs::sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::io("remove the known replicas of a former primary", &path, e)),
    }
}

fn encode(known: &Known) -> Vec<u8> {
    let plain: BTreeMap<&str, BTreeMap<&str, u64>> = known
        .iter()
        .map(|(name, floors)| (name.as_str(), floors.iter().map(|(s, seq)| (s.as_str(), seq.0)).collect()))
        .collect();
    // A map of strings to maps of strings to integers always serializes.
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
    let plain: BTreeMap<String, BTreeMap<String, u64>> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    plain
        .into_iter()
        .map(|(name, floors)| {
            let floors = floors
                .into_iter()
                .map(|(space, seq)| Ok((SpaceId::new(&space).map_err(|e| e.to_string())?, Seq(seq))))
                .collect::<Result<Floors, String>>()?;
            Ok((name, floors))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Known {
        let floors = |v: &[(&str, u64)]| v.iter().map(|(s, q)| (SpaceId::new(s).unwrap(), Seq(*q))).collect();
        Known::from([
            ("replica-1".to_string(), floors(&[("orders", 1_300), ("users", 7)])),
            ("replica \"2\"".to_string(), floors(&[])),
        ])
    }

    #[test]
    fn kept_replicas_read_back_and_a_missing_file_reads_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).is_empty());
        write(dir.path(), &sample()).unwrap();
        assert_eq!(read(dir.path()), sample());
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.starts_with(r#"{"replica \"2\"":{},"replica-1":{"orders":1300,"users":7}}"#), "{text}");
        write(dir.path(), &Known::new()).unwrap();
        assert!(read(dir.path()).is_empty());
        forget_all(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        forget_all(dir.path()).unwrap();
    }

    #[test]
    fn a_damaged_file_reads_as_none() {
        let good = encode(&sample());
        let flipped = {
            let mut b = good.clone();
            let i = b.iter().position(|&c| c == b'3').unwrap();
            b[i] = b'9';
            b
        };
        let bad_space = {
            let json = r#"{"r":{"../x":1}}"#;
            format!("{json}\ncrc32c {:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
        };
        for (what, bytes) in [
            ("a flipped digit", flipped),
            ("cut short", good[..good.len() / 2].to_vec()),
            ("no checksum", good[..good.iter().position(|&c| c == b'\n').unwrap()].to_vec()),
            ("a space id that is a path", bad_space),
            ("not UTF-8", vec![0xff, b'\n', b'x']),
        ] {
            assert!(decode(&bytes).is_err(), "{what}");
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(FILE), &bytes).unwrap();
            assert!(read(dir.path()).is_empty(), "{what}");
        }
        // Larger than any real list: not even read.
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join(FILE)).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(read(dir.path()).is_empty());
        // A folder where the file goes: an error that says what was being done.
        std::fs::create_dir(dir.path().join(format!("{FILE}.tmp"))).unwrap();
        let err = write(dir.path(), &sample()).unwrap_err();
        assert!(err.to_string().contains("known replicas"), "{err}");
    }
}
