//! Tunables of a space's write-ahead log, with the reasons behind their defaults.

use std::time::Duration;

/// When appended records are forced to stable storage (fsync).
///
/// Every policy survives a process crash (`kill -9`): `append` returns only after its bytes are in the OS
/// page cache. The policies differ in what survives a power loss or an OS crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `append` returns after an fsync covering its entries. Concurrent appenders share one fsync
    /// (group commit), so throughput grows with the number of writers while each waits about one fsync.
    Always,
    /// `append` returns once the OS has the bytes; a background thread fsyncs dirty logs every interval
    /// and advances `durable_seq`. A power loss loses at most about one interval of entries.
    /// A zero interval is treated as 1 ms.
    Interval(Duration),
    /// No fsync on the write path (the OS writes back when it wants); `durable_seq` follows
    /// `last_seq`. Only `SpaceWal::sync` fsyncs (the active segment, the segments sealed since its
    /// last call and the folders), and retention, once, before it deletes the last sealed segment.
    /// A power loss can lose any amount of recent entries, and may leave a sealed segment short:
    /// recovery cuts it as the log's tail if no later segment holds an entry, and reports
    /// corruption otherwise rather than guessing.
    Never,
}

/// What recovery does with a bad record in a log's last segment when intact entries follow it.
///
/// A crash tears only what was not yet fsynced, but the page cache writes pages back in no set
/// order, so after a power loss the unsynced end of a segment may have holes with intact records
/// behind them. The same picture is also what a bit flip in the middle of fsynced entries looks
/// like, and after a restart nothing tells the two apart. (A bad record with nothing intact after
/// it is a torn write under either mode, and is cut.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Cut the log at the bad record and go on, dropping the intact entries after it with an
    /// error in the log that counts them. What PostgreSQL does, and RocksDB's point-in-time
    /// recovery: the node starts, and a replica re-fetches what was cut from its primary.
    #[default]
    TolerateTornTail,
    /// Refuse to open (`WalError::Corruption`) so an operator decides: nothing written is ever
    /// dropped without one. raft-engine's absolute consistency.
    AbsoluteConsistency,
}

/// What [`WalStore::open`](super::WalStore::open) does with a space whose log fails recovery as
/// damaged ([`WalError::Corruption`](super::WalError::Corruption)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DamagedSpace {
    /// The store does not open, and says which file is damaged where: an operator decides. Right
    /// where the log is the only copy (a primary).
    #[default]
    Refuse,
    /// The space's folder is moved to `<root>/damaged+spaces/<space>.<unix ms>` (kept for an operator)
    /// and the space starts again empty, listed by [`WalStore::set_aside`](super::WalStore::set_aside);
    /// the other spaces open as usual. Right for a replica, which fetches the space again from its
    /// primary ([`ReplicaConfig::new`](crate::config::ReplicaConfig::new) chooses it).
    SetAside,
}

/// Settings of a [`SpaceWal`](super::SpaceWal) (all spaces of a [`WalStore`](super::WalStore) share one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalConfig {
    /// A segment is sealed and a new one started when the next record would make it larger than this.
    /// Retention deletes whole segments, so this is also the granularity of `truncate_prefix`.
    /// Default 64 MiB. A record larger than this still goes, alone, into its own segment.
    pub segment_bytes: u64,
    /// Durability of appends. Default `Interval(10 ms)`: appends cost no fsync, and a power loss loses
    /// at most about 10 ms of entries, which replication to another node covers.
    pub sync: SyncPolicy,
    /// Memory tail budget in bytes (payload + 33 bytes per entry): recent entries are served to
    /// shippers from memory without disk I/O. Default 32 MiB.
    pub tail_max_bytes: usize,
    /// Memory tail budget in entries. Default 262 144. 0 disables the tail (every read goes to disk).
    pub tail_max_entries: usize,
    /// Memory tail budget in bytes of all the spaces of a [`WalStore`](super::WalStore) together
    /// (a lone [`SpaceWal`](super::SpaceWal) counts alone), so memory stays bounded however many
    /// spaces there are. A space that appends while the store is over it drops its own oldest
    /// entries (they are then read from the segments) down to its fair share (this / spaces), or
    /// all of them past twice this: the store holds at most twice this, plus up to 4 KiB per space
    /// not yet counted. Default 512 MiB.
    pub store_tail_max_bytes: usize,
    /// Largest payload accepted, and the bound on any length read from disk. Default 16 MiB.
    /// Never lower it below the largest entry already written: recovery refuses to open a log
    /// holding a longer entry (and says so).
    pub max_entry_bytes: u32,
    /// Damage followed by intact entries in the last segment: cut or refuse. Default
    /// [`RecoveryMode::TolerateTornTail`].
    pub recovery: RecoveryMode,
    /// A space that fails recovery as damaged: refuse to open the store, or set it aside. Default
    /// [`DamagedSpace::Refuse`].
    pub damaged_space: DamagedSpace,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 * 1024 * 1024,
            sync: SyncPolicy::Interval(Duration::from_millis(10)),
            tail_max_bytes: 32 * 1024 * 1024,
            tail_max_entries: 262_144,
            store_tail_max_bytes: 512 * 1024 * 1024,
            max_entry_bytes: 16 * 1024 * 1024,
            recovery: RecoveryMode::TolerateTornTail,
            damaged_space: DamagedSpace::Refuse,
        }
    }
}

impl WalConfig {
    /// Sets [`WalConfig::segment_bytes`].
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Sets [`WalConfig::sync`].
    pub fn sync(mut self, policy: SyncPolicy) -> Self {
        self.sync = policy;
        self
    }

    /// Sets [`WalConfig::tail_max_bytes`].
    pub fn tail_max_bytes(mut self, bytes: usize) -> Self {
        self.tail_max_bytes = bytes;
        self
    }

    /// Sets [`WalConfig::store_tail_max_bytes`].
    pub fn store_tail_max_bytes(mut self, bytes: usize) -> Self {
        self.store_tail_max_bytes = bytes;
        self
    }

    /// Sets [`WalConfig::tail_max_entries`].
    pub fn tail_max_entries(mut self, entries: usize) -> Self {
        self.tail_max_entries = entries;
        self
    }

    /// Sets [`WalConfig::damaged_space`].
    pub fn damaged_space(mut self, policy: DamagedSpace) -> Self {
        self.damaged_space = policy;
        self
    }

    /// Sets [`WalConfig::max_entry_bytes`].
    pub fn max_entry_bytes(mut self, bytes: u32) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// Sets [`WalConfig::recovery`].
    pub fn recovery(mut self, mode: RecoveryMode) -> Self {
        self.recovery = mode;
        self
    }

    /// True when this policy ever fsyncs on its own (so sealing a segment must make it durable first).
    pub(crate) fn fsyncs(&self) -> bool {
        !matches!(self.sync, SyncPolicy::Never)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_chain() {
        let c = WalConfig::default()
            .segment_bytes(1)
            .sync(SyncPolicy::Always)
            .tail_max_bytes(2)
            .tail_max_entries(3)
            .store_tail_max_bytes(5)
            .max_entry_bytes(4)
            .recovery(RecoveryMode::AbsoluteConsistency)
            .damaged_space(DamagedSpace::SetAside);
        assert_eq!(
            c,
            WalConfig {
                segment_bytes: 1,
                sync: SyncPolicy::Always,
                tail_max_bytes: 2,
                tail_max_entries: 3,
                store_tail_max_bytes: 5,
                max_entry_bytes: 4,
                recovery: RecoveryMode::AbsoluteConsistency,
                damaged_space: DamagedSpace::SetAside,
            }
        );
        assert!(c.fsyncs());
        assert!(!WalConfig::default().sync(SyncPolicy::Never).fsyncs());
    }
}
