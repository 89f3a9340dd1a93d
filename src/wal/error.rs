//! Everything that can go wrong with a write-ahead log, with the context needed to act on it.

use std::path::{Path, PathBuf};

use crate::types::{Seq, SpaceId};

/// An error of the write-ahead log. Each message says what happened, where, and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The operating system refused a file operation.
    #[error("WAL I/O error: could not {op} {}: {source}; check free space and permissions of the WAL folder, then retry (or reopen the log)", path.display())]
    Io {
        /// File or folder the operation was on.
        path: PathBuf,
        /// What was being done ("write", "fsync", "open", ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The WAL folder given is a file (or something else that is not a folder).
    #[error("WAL folder {} is not a folder: give the path of a folder (it is created if missing)", path.display())]
    NotAFolder {
        /// The path given.
        path: PathBuf,
    },
    /// Bytes on disk are not a valid log, in a place where they cannot be a torn write.
    #[error("corrupt WAL segment {} at byte {offset}: {reason}; the log cannot be trusted from here: resync this space from a healthy node (or move the space folder away) and reopen", file.display())]
    Corruption {
        /// The damaged segment file.
        file: PathBuf,
        /// Byte offset in that file where the damage starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An intact entry on disk is longer than [`WalConfig::max_entry_bytes`](super::WalConfig::max_entry_bytes):
    /// the limit was lowered below what was written. A configuration mistake, not damage: nothing
    /// is cut or set aside.
    #[error("WAL segment {} holds entry {seq} at byte {offset}, intact but longer than max_entry_bytes ({max}): the limit was lowered below what was written; raise it back and reopen", file.display())]
    EntryOverLimit {
        /// The segment holding it.
        file: PathBuf,
        /// Where its record starts.
        offset: u64,
        /// The entry.
        seq: Seq,
        /// The configured limit.
        max: u32,
    },
    /// A segment was written in another format version (by another release of walship): not
    /// damage, so it is never cut or set aside.
    #[error("WAL segment {} is in format version {version}; this build reads only version {supported}: run the release that wrote it (or a newer one)", file.display())]
    UnsupportedVersion {
        /// The segment.
        file: PathBuf,
        /// Its format version.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A replicated entry does not follow the log: entries before it are missing.
    #[error("space {space}: expected entry {expected} next but got {got}; send the entries from {expected} first")]
    Gap {
        /// The space.
        space: SpaceId,
        /// The next sequence the log accepts.
        expected: Seq,
        /// The sequence that was offered.
        got: Seq,
    },
    /// A replicated entry differs from the entry this log already holds at that sequence.
    #[error("space {space}: entry {seq} differs from the one this log holds; the logs diverged: truncate_suffix below {seq} (or resync) before applying")]
    Conflict {
        /// The space.
        space: SpaceId,
        /// Where the logs differ.
        seq: Seq,
    },
    /// A replicated entry's epoch is older than the epoch of the entry before it: epochs never go
    /// backwards along a log, so these entries are no primary's history.
    #[error("space {space}: entry {seq} is from epoch {epoch}, older than epoch {previous} of the entry before it; refused: no primary's log goes back in epochs (fetch the entries again)")]
    EpochBackwards {
        /// The space.
        space: SpaceId,
        /// The entry refused.
        seq: Seq,
        /// Its epoch.
        epoch: crate::types::Epoch,
        /// The epoch of the entry before it.
        previous: crate::types::Epoch,
    },
    /// A replicated entry fails its end-to-end checksum.
    #[error(
        "space {space}: entry {seq} fails its checksum; it was damaged in transit or by its sender: fetch it again"
    )]
    BadChecksum {
        /// The space.
        space: SpaceId,
        /// The damaged entry.
        seq: Seq,
    },
    /// A payload is longer than [`WalConfig::max_entry_bytes`](super::WalConfig::max_entry_bytes).
    #[error("entry of {len} bytes exceeds the limit of {max} bytes (WalConfig::max_entry_bytes); split it or raise the limit")]
    EntryTooLarge {
        /// Payload length offered.
        len: usize,
        /// The configured limit.
        max: u32,
    },
    /// Entries were asked for (or cut) below the first one retention kept.
    #[error("space {space}: entry {requested} was removed by retention; the log now starts at {first}: resync this reader from a snapshot")]
    Truncated {
        /// The space.
        space: SpaceId,
        /// The sequence asked for.
        requested: Seq,
        /// The first sequence the log still holds.
        first: Seq,
    },
    /// A sequence that can never name an entry of this log was given.
    #[error("space {space}: sequence {seq} is out of range: {reason}")]
    OutOfRange {
        /// The space.
        space: SpaceId,
        /// The sequence given.
        seq: Seq,
        /// Why it is out of range.
        reason: &'static str,
    },
    /// An earlier write or fsync failed in a way that leaves the file's state unknown; the log refuses
    /// further writes rather than risk acknowledging entries that are not on disk.
    #[error("space {space}: the log stopped accepting writes after a failure ({reason}); drop every handle and reopen it to recover from what is on disk")]
    Poisoned {
        /// The space.
        space: SpaceId,
        /// The failure that stopped it.
        reason: String,
    },
    /// The folder is open through another handle: two writers would write over each other.
    #[error("{what} {} is already open (another WalStore, Primary or Replica, in this process or another): close that one first", path.display())]
    InUse {
        /// "WAL folder" or "space folder".
        what: &'static str,
        /// The folder.
        path: PathBuf,
    },
}

impl WalError {
    /// Shorthand for [`WalError::Io`].
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> WalError {
        WalError::Io { path: path.to_path_buf(), op, source }
    }

    /// Shorthand for [`WalError::Corruption`].
    pub(crate) fn corruption(file: &Path, offset: u64, reason: impl Into<String>) -> WalError {
        WalError::Corruption { file: file.to_path_buf(), offset, reason: reason.into() }
    }
}

/// Attaches an operation and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, WalError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, WalError> {
        self.map_err(|e| WalError::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_context() {
        let e = WalError::corruption(Path::new("/x/00000000000000000001.wal"), 77, "checksum mismatch");
        let s = e.to_string();
        assert!(s.contains("00000000000000000001.wal") && s.contains("77") && s.contains("checksum"), "{s}");
        let e = WalError::Gap { space: SpaceId::new("s").unwrap(), expected: Seq(5), got: Seq(9) };
        assert!(e.to_string().contains("expected entry 5 next but got 9"));
    }
}
