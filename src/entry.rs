//! The log entry: the unit the WAL stores and batches carry.

use bytes::Bytes;

use crate::types::{EntryKind, Epoch, Seq};

/// One entry of a space's log.
///
/// `crc` is the entry checksum computed once when the primary appends it ([`entry_crc`]) and carried
/// unchanged through the WAL, the wire and the replica's WAL, so every hop can verify the entry on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the space's log.
    pub seq: Seq,
    /// Epoch of the primary that appended it.
    pub epoch: Epoch,
    /// The primary's wall-clock time of the append, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// What the embedding server says this entry is.
    pub kind: EntryKind,
    /// The entry's bytes (a slice of a larger buffer where it came from a batch or a disk read).
    pub payload: Bytes,
    /// CRC32C over `seq`, `epoch`, `timestamp_us`, `kind` and `payload` (see [`entry_crc`]).
    pub crc: u32,
}

impl Entry {
    /// Builds an entry and computes its checksum.
    pub fn new(seq: Seq, epoch: Epoch, timestamp_us: u64, kind: EntryKind, payload: Bytes) -> Entry {
        let crc = entry_crc(seq, epoch, timestamp_us, kind, &payload);
        Entry { seq, epoch, timestamp_us, kind, payload, crc }
    }

    /// True if the stored checksum matches the entry's fields.
    pub fn verify(&self) -> bool {
        entry_crc(self.seq, self.epoch, self.timestamp_us, self.kind, &self.payload) == self.crc
    }
}

/// The entry checksum: CRC32C of `seq (u64 LE) | epoch (u64 LE) | timestamp_us (u64 LE) | kind (u8) | payload`.
pub fn entry_crc(seq: Seq, epoch: Epoch, timestamp_us: u64, kind: EntryKind, payload: &[u8]) -> u32 {
    let mut head = [0u8; 25];
    head[0..8].copy_from_slice(&seq.0.to_le_bytes());
    head[8..16].copy_from_slice(&epoch.0.to_le_bytes());
    head[16..24].copy_from_slice(&timestamp_us.to_le_bytes());
    head[24] = kind;
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Current wall-clock time in microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The per-space log digest: a 64-bit fingerprint chained over `(seq, kind, payload)` of every entry in
/// order. Two logs of a space hold the same entries exactly when their digests at the same `seq` match
/// (up to 64-bit hash collisions).
///
/// Step: `d' = xxh3_64_with_seed(payload, splitmix64(d ^ splitmix64(seq) ^ kind))`, starting from 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LogDigest(pub u64);

impl LogDigest {
    /// The digest of an empty log.
    pub const EMPTY: LogDigest = LogDigest(0);

    /// The digest after one more entry.
    pub fn step(self, seq: Seq, kind: EntryKind, payload: &[u8]) -> LogDigest {
        let seed = splitmix64(self.0 ^ splitmix64(seq.0) ^ kind as u64);
        LogDigest(xxhash_rust::xxh3::xxh3_64_with_seed(payload, seed))
    }
}

impl std::fmt::Display for LogDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_covers_every_field() {
        let e = Entry::new(Seq(5), Epoch(2), 77, 3, Bytes::from_static(b"hello"));
        assert!(e.verify());
        for changed in [
            Entry { seq: Seq(6), ..e.clone() },
            Entry { epoch: Epoch(3), ..e.clone() },
            Entry { timestamp_us: 78, ..e.clone() },
            Entry { kind: 4, ..e.clone() },
            Entry { payload: Bytes::from_static(b"hellp"), ..e.clone() },
        ] {
            assert!(!changed.verify());
        }
    }

    #[test]
    fn digest_depends_on_order_and_content() {
        let a = LogDigest::EMPTY.step(Seq(1), 0, b"x").step(Seq(2), 0, b"y");
        let b = LogDigest::EMPTY.step(Seq(1), 0, b"y").step(Seq(2), 0, b"x");
        let c = LogDigest::EMPTY.step(Seq(1), 1, b"x").step(Seq(2), 0, b"y");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, LogDigest::EMPTY.step(Seq(1), 0, b"x").step(Seq(2), 0, b"y"));
    }
}
