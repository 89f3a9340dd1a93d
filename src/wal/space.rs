//! [`SpaceWal`]: the log of one space: append (primary and replica), read, retention, suffix truncation,
//! durability.
//!
//! Concurrency: one mutex guards the log's state and is held for the encode + one write (`pwrite`, or
//! `pwritev` for large payloads) of an append,
//! never for an fsync (group commit, see `durability.rs`) nor for a catch-up read from disk (reads use
//! positional I/O on their own handle). A reader/writer guard keeps suffix truncation (which rewrites
//! files) from running under a disk read. Lock order: disk guard, then state, then durability.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

use crate::entry::{entry_crc, now_us, Entry, LogDigest};
use crate::types::{EntryKind, Epoch, Seq, SpaceId};

use super::config::{SyncPolicy, WalConfig};
use super::durability::{publish, Durability, SyncFailure, SyncTarget};
use super::error::{IoContext, WalError};
use super::fs::{create_segment, lock_folder, open_rw, start_writeback, sync_dir, write_all_at, write_all_vectored_at};
use super::read::{self, ReadCache};
use super::recovery::recover;
use super::scan::{check_record, Scan, Scanner};
use super::segment::{
    encode_record, encode_record_header, record_len, segment_file_name, Segment, SegmentHeader, SEGMENT_HEADER_LEN,
};
use super::syncer::{Flush, Syncer};
use super::tail::{MemTail, Payloads, TailBudget};

/// Under a syncing policy, the kernel is asked to start writing the active segment out every this
/// many bytes, so that neither the Interval syncer's fsync nor the one that seals a full segment
/// (under the space's lock) finds much left to write. Without it, sealing waited for up to 10 ms
/// of writes (7.5 ms at 700 MB/s of 4 KiB appends here); RocksDB's `bytes_per_sync` does the same.
const WRITEBACK_EVERY: u64 = 1024 * 1024;

/// Read size when rebuilding a digest for a suffix truncation (at most one index interval is scanned).
const LOCATE_CHUNK: usize = 64 * 1024;
/// Scratch buffer capacity kept between appends; a larger one (after a huge entry) is released. It
/// must hold a whole replicated batch (1 MiB of entry bytes by default, plus record headers), or
/// every batch would reallocate and fault in fresh pages.
const SCRATCH_KEEP: usize = 4 * 1024 * 1024;
/// Payloads of at least this many bytes are written from their own buffers (`pwritev`) rather
/// than copied into the record buffer first; smaller ones cost less to copy than a buffer of
/// their own in the write.
const VECTORED_MIN_PAYLOAD: usize = 1024;

thread_local! {
    /// Record encoding buffer, one per thread rather than per space: a node with 10,000 spaces
    /// keeps a few of these, not 10,000.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The write-ahead log of one space. Cheap to clone (shared handle); `Send + Sync`.
///
/// Each space folder is open through one `SpaceWal` (or one [`WalStore`](super::WalStore)) at a
/// time: the handle locks the folder, and a second open fails (after waiting up to a second for
/// a handle that is being dropped) rather than write over the first.
#[derive(Clone)]
pub struct SpaceWal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SpaceWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("SpaceWal")
            .field("space", &self.inner.space)
            .field("first_seq", &st.first_seq())
            .field("last_seq", &st.last_seq)
            .field("segments", &st.segment_count())
            .finish()
    }
}

/// Whether [`SpaceWal::append_replicated`] still has to verify each entry's checksum.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checksums {
    Verify,
    AlreadyVerified,
}

/// Result of [`SpaceWal::append_replicated`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicatedAppend {
    /// Entries written.
    pub appended: usize,
    /// Entries the log already held identically (re-sent after a reconnect), or older than its retention.
    pub skipped: usize,
    /// The log's last sequence afterwards.
    pub last_seq: Seq,
}

struct Inner {
    space: SpaceId,
    dir: PathBuf,
    config: WalConfig,
    state: Mutex<State>,
    /// Held shared by disk reads, exclusively by suffix truncation.
    disk: RwLock<()>,
    /// Serializes retention, whose deletions run outside the state lock.
    retention: Mutex<()>,
    durability: Durability,
    last_tx: watch::Sender<Seq>,
    /// Wakes [`SpaceWal::wait_for`] callers. Appends notify only when `armed` says someone waits, so
    /// the write path pays one atomic load, not a lock, while shippers are busy.
    appended: tokio::sync::Notify,
    armed: AtomicBool,
    /// `State::generation`, readable without the lock: shippers and appliers check it per batch.
    truncations: AtomicU64,
    /// Wakes [`SpaceWal::wait_for_cut`] callers: on suffix truncations only, so a waiter costs
    /// appends nothing.
    cut: tokio::sync::Notify,
    /// Keeps the Interval policy's thread alive while this log is.
    _syncer: Option<Syncer>,
    /// The space folder, locked so that a second open fails instead of writing over this one.
    _folder_lock: File,
}

struct State {
    /// Sealed segments, oldest first.
    sealed: VecDeque<Segment>,
    /// The segment appends go to (always the newest).
    active: Segment,
    active_file: Arc<File>,
    last_seq: Seq,
    last_epoch: Epoch,
    digest: LogDigest,
    tail: MemTail,
    /// Bumped by every suffix truncation.
    generation: u64,
    /// Where each suffix truncation cut, by generation (rare operator actions: a few entries).
    cuts: Vec<(u64, Seq)>,
    /// Offset of the active segment up to which writeback was started ([`super::fs::start_writeback`]).
    written_back: u64,
    /// Under `SyncPolicy::Never`, sealed segments ending at or below this were fsynced, and the
    /// folder after the active segment's creation, if it starts right after (by [`SpaceWal::sync`];
    /// `None` before its first call). The syncing policies fsync each segment as they seal it.
    sealed_synced_upto: Option<Seq>,
    /// Resume positions and open files of disk reads.
    reads: ReadCache,
}

impl State {
    fn first_seq(&self) -> Seq {
        self.sealed.front().unwrap_or(&self.active).first_seq
    }

    /// All segments, oldest first.
    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.sealed.iter().chain(std::iter::once(&self.active))
    }

    fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }
}

impl SpaceWal {
    /// Opens (or creates) the log of `space` in `<root>/<space>/`, recovering it from its segments.
    pub fn open(root: &Path, space: SpaceId, config: WalConfig) -> Result<SpaceWal, WalError> {
        let budget = TailBudget::new(config.store_tail_max_bytes);
        SpaceWal::open_with(root, space, config, None, &budget)
    }

    /// [`SpaceWal::open`] sharing an Interval sync thread and a memory tail budget (a store passes
    /// its own).
    pub(crate) fn open_with(
        root: &Path,
        space: SpaceId,
        config: WalConfig,
        syncer: Option<&Syncer>,
        tail_budget: &Arc<TailBudget>,
    ) -> Result<SpaceWal, WalError> {
        let dir = root.join(space.as_str());
        let new_folder = !dir.exists();
        std::fs::create_dir_all(&dir).ctx("create space folder", &dir)?;
        let folder_lock = lock_folder(&dir, "space folder")?;
        let mut r = recover(&dir, &config)?;
        r.tail.share(tail_budget.clone());
        tracing::debug!(space = %space, first = %r.sealed.first().unwrap_or(&r.active).first_seq, last = %r.last_seq, segments = r.sealed.len() + 1, "WAL opened");

        let syncer = match (config.sync, syncer) {
            (SyncPolicy::Interval(_), Some(s)) => Some(s.clone()),
            (SyncPolicy::Interval(every), None) => {
                Some(Syncer::start(every).ctx("start the WAL sync thread for", &dir)?)
            }
            _ => None,
        };
        let written_back = r.active.len;
        let state = State {
            sealed_synced_upto: None,
            sealed: r.sealed.into(),
            active: r.active,
            active_file: Arc::new(r.active_file),
            last_seq: r.last_seq,
            last_epoch: r.last_epoch,
            digest: r.digest,
            tail: r.tail,
            generation: 0,
            cuts: Vec::new(),
            // What recovery found is on disk already.
            written_back,
            reads: ReadCache::default(),
        };
        // Recovery fsynced what it cut; what it read may still be only in the page cache (a previous
        // run with SyncPolicy::Never), so with an fsyncing policy make it durable before claiming so.
        // The same holds for the folder entries: a segment renamed into place, or this space's
        // folder, by a run that never synced their parent folder.
        if config.fsyncs() {
            for seg in state.segments() {
                File::open(&seg.path).and_then(|f| f.sync_all()).ctx("fsync", &seg.path)?;
            }
            sync_dir(&dir)?;
            if new_folder {
                sync_dir(root)?;
            }
        }
        let inner = Arc::new(Inner {
            space,
            dir,
            durability: Durability::new(state.last_seq),
            last_tx: watch::Sender::new(state.last_seq),
            appended: tokio::sync::Notify::new(),
            armed: AtomicBool::new(false),
            truncations: AtomicU64::new(0),
            cut: tokio::sync::Notify::new(),
            state: Mutex::new(state),
            disk: RwLock::new(()),
            retention: Mutex::new(()),
            config,
            _syncer: syncer.clone(),
            _folder_lock: folder_lock,
        });
        if let Some(s) = &syncer {
            let weak: std::sync::Weak<Inner> = Arc::downgrade(&inner);
            s.register(weak);
        }
        Ok(SpaceWal { inner })
    }

    /// The space this log belongs to.
    pub fn space(&self) -> &SpaceId {
        &self.inner.space
    }

    /// Appends one entry as the primary: assigns the next sequence, stamps `now_us()`, computes the checksum.
    ///
    /// Returns once the record is written to the OS (one `write`, so a process crash cannot lose it) and,
    /// with [`SyncPolicy::Always`], fsynced.
    pub fn append(&self, epoch: Epoch, kind: EntryKind, payload: Bytes) -> Result<Seq, WalError> {
        self.check_len(payload.len())?;
        let seq = {
            let mut st = self.inner.lock();
            self.check_writable()?;
            self.check_room(st.last_seq, 1)?;
            let seq = st.last_seq.next();
            let timestamp_us = now_us();
            let crc = entry_crc(seq, epoch, timestamp_us, kind, &payload);
            let mut one = [Entry { seq, epoch, timestamp_us, kind, payload, crc }];
            self.inner.write_run(&mut st, &mut one, Payloads::Own)?;
            seq
        };
        self.wait_policy(seq)?;
        Ok(seq)
    }

    /// Appends entries as the primary, like [`SpaceWal::append`], in one write (two if the batch crosses a
    /// segment boundary). Returns the sequences assigned; an empty batch returns an empty range after
    /// `last_seq`. If an error is returned after the first write, a prefix of the batch was appended:
    /// check [`SpaceWal::last_seq`].
    pub fn append_batch(&self, epoch: Epoch, items: &[(EntryKind, Bytes)]) -> Result<RangeInclusive<Seq>, WalError> {
        for (_, p) in items {
            self.check_len(p.len())?;
        }
        let range = {
            let mut st = self.inner.lock();
            self.check_writable()?;
            self.check_room(st.last_seq, items.len())?;
            let first = st.last_seq.next();
            let timestamp_us = now_us();
            let mut entries: Vec<Entry> = items
                .iter()
                .zip(first.0..)
                .map(|((kind, payload), s)| Entry {
                    seq: Seq(s),
                    epoch,
                    timestamp_us,
                    kind: *kind,
                    crc: entry_crc(Seq(s), epoch, timestamp_us, *kind, payload),
                    payload: payload.clone(),
                })
                .collect();
            self.inner.write_run(&mut st, &mut entries, Payloads::Own)?;
            first..=st.last_seq
        };
        if !range.is_empty() {
            self.wait_policy(*range.end())?;
        }
        Ok(range)
    }

    /// Appends entries shipped by the primary, as a replica.
    ///
    /// Every entry's checksum is verified first ([`WalError::BadChecksum`]). Entries the log already holds
    /// identically (same checksum, length and epoch) are skipped, so re-sending after a reconnect is
    /// harmless; a different entry at a held sequence is [`WalError::Conflict`]; a missing sequence is
    /// [`WalError::Gap`]; a new entry of an older epoch than the one before it is
    /// [`WalError::EpochBackwards`]. Entries older than retention cannot be compared and are skipped. The batch is
    /// checked entirely before anything is written: on error nothing is appended.
    pub fn append_replicated(&self, entries: &[Entry]) -> Result<ReplicatedAppend, WalError> {
        self.append_replicated_checked(entries, Checksums::Verify)
    }

    /// [`SpaceWal::append_replicated`] for entries a [`crate::codec::BatchDecoder`] has just returned:
    /// it verified every entry's checksum, so the replica's hot path checks each entry once.
    pub(crate) fn append_decoded(&self, entries: &[Entry]) -> Result<ReplicatedAppend, WalError> {
        self.append_replicated_checked(entries, Checksums::AlreadyVerified)
    }

    /// Whether appending `entries` would seal the active segment and start a new one: a new file,
    /// and under `Interval`/`Always` the sealed segment's fsync, both under the space's lock. An
    /// async caller moves such an append to a blocking thread. A hint only: another writer may
    /// roll the segment first.
    pub(crate) fn append_would_roll(&self, entries: &[Entry]) -> bool {
        let bytes: u64 = entries.iter().map(|e| record_len(e.payload.len())).sum();
        let st = self.inner.lock();
        // The one exception to rolling once full: a lone record starts an empty segment, whatever its size.
        let lone_in_empty = entries.len() == 1 && st.active.len <= SEGMENT_HEADER_LEN;
        st.active.len + bytes > self.inner.config.segment_bytes && !lone_in_empty
    }

    fn append_replicated_checked(&self, entries: &[Entry], checksums: Checksums) -> Result<ReplicatedAppend, WalError> {
        for e in entries {
            self.check_len(e.payload.len())?;
            if e.seq == Seq::ZERO {
                return Err(WalError::OutOfRange {
                    space: self.inner.space.clone(),
                    seq: e.seq,
                    reason: "entries start at 1",
                });
            }
            if checksums == Checksums::Verify && !e.verify() {
                return Err(WalError::BadChecksum { space: self.inner.space.clone(), seq: e.seq });
            }
        }
        let (result, new_last) = {
            let mut st = self.inner.lock();
            self.check_writable()?;
            let last = st.last_seq;
            let mut accepted: Vec<Entry> = Vec::with_capacity(entries.len());
            let mut skipped = 0usize;
            // Entries read back from disk to compare re-sent ones with (the tail usually has them).
            let mut from_disk: Vec<Entry> = Vec::new();
            for e in entries {
                let next = Seq(last.0 + 1 + accepted.len() as u64);
                if e.seq == next {
                    // Never past it: `next` cannot overflow.
                    self.check_room(last, accepted.len() + 1)?;
                    let previous = accepted.last().map_or(st.last_epoch, |a| a.epoch);
                    if e.epoch < previous {
                        return Err(WalError::EpochBackwards {
                            space: self.inner.space.clone(),
                            seq: e.seq,
                            epoch: e.epoch,
                            previous,
                        });
                    }
                    accepted.push(e.clone());
                    continue;
                }
                if e.seq > next {
                    return Err(WalError::Gap { space: self.inner.space.clone(), expected: next, got: e.seq });
                }
                let same = if e.seq > last {
                    accepted.get((e.seq.0 - last.0 - 1) as usize).is_some_and(|a| same_entry(a, e))
                } else if e.seq < st.first_seq() {
                    true
                } else {
                    let want = (last.0 - e.seq.0 + 1).min(entries.len() as u64) as usize;
                    self.inner.held_at(&st, e.seq, want, &mut from_disk)?.is_some_and(|h| same_entry(&h, e))
                };
                if !same {
                    return Err(WalError::Conflict { space: self.inner.space.clone(), seq: e.seq });
                }
                skipped += 1;
            }
            let appended = accepted.len();
            // A replica's entries are slices of the frame they arrived in.
            self.inner.write_run(&mut st, &mut accepted, Payloads::MayShare)?;
            // Skipped entries may be another caller's append still waiting for its fsync: under
            // SyncPolicy::Always, wait for them too before the caller acknowledges them.
            (
                ReplicatedAppend { appended, skipped, last_seq: st.last_seq },
                (!entries.is_empty()).then_some(st.last_seq),
            )
        };
        if let Some(last) = new_last {
            self.wait_policy(last)?;
        }
        Ok(result)
    }

    /// Entries from `from` on: at least one if `from <= last_seq` (even if larger than `max_bytes`), then
    /// up to `max_entries` (0 counts as 1) and `max_bytes` of payload.
    ///
    /// Served from the memory tail when it holds `from` (no disk I/O), else from the segments, starting
    /// near `from` thanks to the sparse index. `from > last_seq` gives an empty vector; `from` below the
    /// first retained entry is [`WalError::Truncated`]; `Seq(0)` is [`WalError::OutOfRange`].
    pub fn read_from(&self, from: Seq, max_entries: usize, max_bytes: usize) -> Result<Vec<Entry>, WalError> {
        if from == Seq::ZERO {
            return Err(WalError::OutOfRange {
                space: self.inner.space.clone(),
                seq: from,
                reason: "sequences start at 1; read from 1 to get the whole log",
            });
        }
        let max_entries = max_entries.max(1);
        {
            let st = self.inner.lock();
            if let Some(r) = self.inner.read_memory(&st, from, max_entries, max_bytes)? {
                return Ok(r);
            }
        }
        let _disk = self.inner.disk.read().unwrap_or_else(PoisonError::into_inner);
        let parts = {
            let st = self.inner.lock();
            // Checked again: the log may have changed while the lock was released.
            if let Some(r) = self.inner.read_memory(&st, from, max_entries, max_bytes)? {
                return Ok(r);
            }
            self.inner.plan_read(&st, from, max_entries, max_bytes)
        };
        let outcome = self.inner.read_disk(parts, from, max_entries, max_bytes)?;
        self.inner.lock().reads.remember(outcome.stop, outcome.opened);
        Ok(outcome.entries)
    }

    /// [`SpaceWal::read_from`] if the memory tail can answer without touching the disk, `None` if the
    /// entries must be read from the segments (so an async caller can move that read to a blocking
    /// thread).
    pub fn read_from_memory(
        &self,
        from: Seq,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Entry>>, WalError> {
        if from == Seq::ZERO {
            return self.read_from(from, max_entries, max_bytes).map(Some);
        }
        let st = self.inner.lock();
        self.inner.read_memory(&st, from, max_entries.max(1), max_bytes)
    }

    /// Retention: deletes the oldest segments whose entries are all `<= upto` (whole segments only; never
    /// the active one, nor the newest segment holding an entry). Returns the new first sequence. The
    /// digest is unchanged.
    ///
    /// The active segment is empty right after a roll whose first record never got written (a
    /// crash, a failed write), and may lose what it holds to a power loss until it is fsynced: until
    /// the active segment holds a durable entry, the last sealed segment stays, since its records
    /// are all that tells the log's last epoch after a restart. Under `SyncPolicy::Never`, a call
    /// that would delete the last sealed segment first fsyncs the active one (and the folder, which
    /// holds its creation): nothing else makes any entry durable there.
    pub fn truncate_prefix(&self, upto: Seq) -> Result<Seq, WalError> {
        let _retention = self.inner.retention.lock().unwrap_or_else(PoisonError::into_inner);
        let (synced_here, synced_generation) = self.inner.sync_active_for_retention(upto)?;
        let (doomed, first) = {
            let mut st = self.inner.lock();
            let durable = match self.inner.config.fsyncs() {
                true => self.inner.durability.durable(),
                // `durable_seq` only follows `last_seq` under `Never`; a suffix truncation since
                // the fsync may have removed what it made durable.
                false if st.generation == synced_generation => synced_here,
                false => Seq::ZERO,
            };
            let mut doomed = Vec::new();
            while let Some(seg) = st.sealed.pop_front() {
                // Written is not enough: an entry not yet fsynced in the active segment may be lost.
                let holds_last_entry = st.sealed.is_empty() && durable < st.active.first_seq;
                if seg.last_seq > upto || holds_last_entry {
                    st.sealed.push_front(seg);
                    break;
                }
                doomed.push(seg.path);
            }
            let first = st.first_seq();
            st.tail.drop_before(first);
            st.reads.forget_before(first);
            (doomed, first)
        };
        // Unlinked outside the state lock (deleting a large file can take milliseconds), oldest first: what
        // a failure or a crash leaves behind is still a contiguous log, and it reappears on reopen.
        for path in &doomed {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io("delete segment", path, e)),
            }
        }
        if !doomed.is_empty() {
            tracing::debug!(space = %self.inner.space, removed = doomed.len(), first = %first, "WAL: retention deleted segments");
            if self.inner.config.fsyncs() {
                sync_dir(&self.inner.dir)?;
            }
        }
        Ok(first)
    }

    /// Removes every entry after `after` (a replica dropping entries the new primary does not have):
    /// cuts the segment holding `after`, deletes later segments, fsyncs, and rebuilds the digest from the
    /// nearest index point. The next append gets `after + 1`. A no-op if `after >= last_seq`.
    /// Cutting below the first retained entry is [`WalError::Truncated`] (the log would be empty with an
    /// unknown last epoch), except on a log that still starts at 1.
    pub fn truncate_suffix(&self, after: Seq) -> Result<(), WalError> {
        let _disk = self.inner.disk.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = self.inner.lock();
        self.check_writable()?;
        if after >= st.last_seq {
            return Ok(());
        }
        let first = st.first_seq();
        if after < first && first > Seq(1) {
            return Err(WalError::Truncated { space: self.inner.space.clone(), requested: after, first });
        }
        let inner = &self.inner;
        // The segment that keeps `after` as its last entry (the first one if the log is emptied).
        let keep = st.segments().take_while(|s| s.first_seq <= after).count().saturating_sub(1);
        let (cut, digest, epoch) = inner.locate_end(&st, keep, after)?;

        // Later segments go first, newest first: a crash midway leaves a log that is still contiguous.
        // A failure here leaves the files in an unknown state, so it poisons the log.
        let deletes = st.segment_count() > keep + 1;
        while st.segment_count() > keep + 1 {
            if let Err(e) = std::fs::remove_file(&st.active.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(inner.fail(WalError::io("delete segment", &st.active.path, e)));
                }
            }
            match st.sealed.pop_back() {
                Some(prev) => st.active = prev,
                None => break,
            }
        }
        // The deletions must be durable before the cut: a file system may persist the cut and not
        // the deletions, and later segments behind a shortened one read as corruption.
        if deletes {
            sync_dir(&inner.dir).map_err(|e| inner.fail(e))?;
        }
        let path = st.active.path.clone();
        let file = open_rw(&path).map_err(|e| inner.fail(e))?;
        if let Err(e) = file.set_len(cut).and_then(|()| file.sync_all()) {
            return Err(inner.fail(WalError::io("truncate", &path, e)));
        }
        sync_dir(&inner.dir).map_err(|e| inner.fail(e))?;

        st.active.len = cut;
        st.written_back = cut; // Just fsynced.
                               // Segments sealed from now on may end below what was synced before the cut.
        let below_cut = Seq(st.active.first_seq.0.saturating_sub(1));
        st.sealed_synced_upto = st.sealed_synced_upto.map(|s| s.min(below_cut));
        st.active.last_seq = after;
        st.active.index.truncate_after(after);
        st.active_file = Arc::new(file);
        st.last_seq = after;
        st.last_epoch = epoch;
        st.digest = digest;
        st.tail.truncate_after(after);
        st.reads.clear();
        st.generation += 1;
        let generation = st.generation;
        st.cuts.push((generation, after));
        inner.truncations.store(generation, Ordering::Release);
        inner.cut.notify_waiters();
        inner.durability.truncated(after, st.generation);
        publish(&inner.last_tx, after);
        inner.wake_waiters();
        tracing::info!(space = %inner.space, after = %after, "WAL: suffix truncated");
        Ok(())
    }

    /// First entry held; `last_seq + 1` for an empty log (`Seq(1)` for a new one).
    pub fn first_seq(&self) -> Seq {
        self.inner.lock().first_seq()
    }

    /// Last entry held; `Seq(0)` for a new log.
    pub fn last_seq(&self) -> Seq {
        self.inner.lock().last_seq
    }

    /// How many suffix truncations this handle's log has had since it was opened.
    pub fn truncations(&self) -> u64 {
        self.inner.truncations.load(Ordering::Acquire)
    }

    /// `last_seq` and [`SpaceWal::truncations`] read together: a consumer that starts from this
    /// position learns of every truncation after it.
    pub fn last_seq_and_truncations(&self) -> (Seq, u64) {
        let st = self.inner.lock();
        (st.last_seq, st.generation)
    }

    /// When the first entry after `after` was appended (µs), from the memory tail only (no disk
    /// I/O): that entry's time if the tail holds it, else the time of the tail's first entry after
    /// it, which is later (so an age from it is a lower bound); `None` if the tail holds none.
    pub(crate) fn appended_after_in_memory(&self, after: Seq) -> Option<u64> {
        let st = self.inner.lock();
        let at = after.next().max(st.tail.first_seq()?);
        st.tail.get(at).map(|e| e.timestamp_us)
    }

    /// Where the log ends: `last_seq`, the epoch of that entry and the digest up to it, read
    /// together (one lock: an append between separate reads would pair one end's sequence with
    /// another's digest, which a primary comparing logs takes for a divergence).
    pub(crate) fn end(&self) -> (Seq, Epoch, LogDigest) {
        let st = self.inner.lock();
        (st.last_seq, st.last_epoch, st.digest)
    }

    /// `last_seq` and the epoch of that entry, read together (one lock, and a consistent pair).
    pub fn last_seq_and_epoch(&self) -> (Seq, Epoch) {
        let st = self.inner.lock();
        (st.last_seq, st.last_epoch)
    }

    /// The lowest point any suffix truncation after the first `seen` cut the log back to, if there
    /// was one: whoever consumed entries past it (an applier) must roll back to it.
    pub fn cut_since(&self, seen: u64) -> Option<Seq> {
        self.inner.lock().cuts.iter().filter(|(g, _)| *g > seen).map(|(_, after)| *after).min()
    }

    /// Epoch of the last entry; `Epoch(0)` if there is none.
    pub fn last_epoch(&self) -> Epoch {
        self.inner.lock().last_epoch
    }

    /// Highest sequence known to be on stable storage under the sync policy (`last_seq` with
    /// [`SyncPolicy::Never`], since the OS has every appended entry).
    pub fn durable_seq(&self) -> Seq {
        self.inner.durability.durable()
    }

    /// The digest chained over every entry up to `last_seq` ([`LogDigest::step`]).
    pub fn digest(&self) -> LogDigest {
        self.inner.lock().digest
    }

    /// The log digest up to and including `seq` (the digest of the empty prefix for `Seq(0)`), to
    /// check that another node's copy ending at `seq` is a prefix of this log. `None` if `seq` is past
    /// the end, or before what retention kept (the digest just before the first entry held is known).
    /// Reads at most one index interval (64 KiB) of one segment.
    pub fn digest_at(&self, seq: Seq) -> Result<Option<LogDigest>, WalError> {
        let inner = &self.inner;
        // Lock order: disk, then state (as reads and suffix truncation take them).
        let _disk = inner.disk.read().unwrap_or_else(PoisonError::into_inner);
        let st = inner.lock();
        if seq > st.last_seq {
            return Ok(None);
        }
        if seq == st.last_seq {
            return Ok(Some(st.digest));
        }
        let first = st.sealed.front().unwrap_or(&st.active);
        if seq.next() == first.first_seq {
            return Ok(Some(first.base_digest));
        }
        if seq < first.first_seq {
            return Ok(None);
        }
        let Some(keep) = st.segments().position(|g| g.first_seq <= seq && seq <= g.last_seq) else {
            return Ok(None);
        };
        inner.locate_end(&st, keep, seq).map(|(_, digest, _)| Some(digest))
    }

    /// Receiver of `last_seq` changes: appends wake waiters without polling.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        // Under the lock appends publish under, so no append can slip between (see `publish`).
        let _st = self.inner.lock();
        self.inner.last_tx.subscribe()
    }

    /// Resolves once the log holds `seq` (at once if it does), or after a suffix truncation. Cheaper
    /// for the write path than [`SpaceWal::subscribe`]: appends only wake callers that are waiting.
    pub async fn wait_for(&self, seq: Seq) {
        self.wait_for_or_cut(seq, None).await
    }

    /// [`SpaceWal::wait_for`], also resolving at once if the log has had a suffix truncation
    /// since the caller saw `truncations` of them (one that came before the wait began included).
    pub async fn wait_for_or_cut(&self, seq: Seq, truncations: Option<u64>) {
        let notified = self.inner.appended.notified();
        tokio::pin!(notified);
        // Register first, then arm, then check: an append or a truncation either lands before the
        // check (seen) or after the arm (it notifies the registered waiter).
        notified.as_mut().enable();
        self.inner.armed.store(true, Ordering::SeqCst);
        let (last, now) = self.last_seq_and_truncations();
        if last >= seq || truncations.is_some_and(|t| t != now) {
            return;
        }
        notified.await;
    }

    /// Resolves once the log has had a suffix truncation since the caller saw `truncations` of
    /// them. Unlike [`SpaceWal::wait_for_or_cut`], appends never wake it.
    pub async fn wait_for_cut(&self, truncations: u64) {
        loop {
            let notified = self.inner.cut.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.truncations() != truncations {
                return;
            }
            notified.await;
        }
    }

    /// Receiver of `durable_seq` changes.
    pub fn subscribe_durable(&self) -> watch::Receiver<Seq> {
        let _st = self.inner.lock();
        self.inner.durability.subscribe()
    }

    /// Fsyncs now (whatever the policy) and returns the durable sequence, which then covers every entry
    /// appended before the call. Under `SyncPolicy::Never` that includes the segments sealed since
    /// the last call, and the folder that holds their creation.
    pub fn sync(&self) -> Result<Seq, WalError> {
        let target = self.inner.lock().last_seq;
        // Sealed segments before the active one, so that a power loss midway leaves no durable
        // entries after a short segment (which recovery refuses).
        if !self.inner.config.fsyncs() {
            self.inner.sync_sealed()?;
        }
        let durable = self.inner.wait_durable(target, true)?;
        // A roll meanwhile sealed the segment holding `target`: this lists it (nothing to do
        // otherwise).
        if !self.inner.config.fsyncs() {
            self.inner.sync_sealed()?;
        }
        Ok(durable)
    }

    /// Refuses `n` entries after `last` that would reach `u64::MAX`: `Seq::next` saturates there,
    /// and no log gets near it by appending (only a crafted file can start close to it).
    fn check_room(&self, last: Seq, n: usize) -> Result<(), WalError> {
        match last.0.checked_add(n as u64) {
            Some(end) if end < u64::MAX => Ok(()),
            _ => Err(WalError::OutOfRange {
                space: self.inner.space.clone(),
                seq: Seq(u64::MAX),
                reason: "the log's sequence numbers are used up (u64::MAX is never assigned)",
            }),
        }
    }

    fn check_len(&self, len: usize) -> Result<(), WalError> {
        let max = self.inner.config.max_entry_bytes;
        if len > max as usize {
            return Err(WalError::EntryTooLarge { len, max });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), WalError> {
        match self.inner.durability.poisoned() {
            None => Ok(()),
            Some(reason) => Err(WalError::Poisoned { space: self.inner.space.clone(), reason }),
        }
    }

    /// With [`SyncPolicy::Always`], waits until `seq` is durable (group commit).
    fn wait_policy(&self, seq: Seq) -> Result<(), WalError> {
        if self.inner.config.sync == SyncPolicy::Always {
            self.inner.wait_durable(seq, false)?;
        }
        Ok(())
    }
}

/// Replica idempotence: the log holds `new` already if the entry there has the same checksum, length
/// and epoch (the checksum covers seq, epoch, timestamp, kind and payload).
fn same_entry(held: &Entry, new: &Entry) -> bool {
    held.crc == new.crc && held.payload.len() == new.payload.len() && held.epoch == new.epoch
}

impl Inner {
    /// Wakes `wait_for` callers if any armed the flag. Called with the state lock held, after
    /// `last_seq` changed.
    fn wake_waiters(&self) {
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::SeqCst) {
            self.appended.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Under `SyncPolicy::Never`: fsyncs the sealed segments no call fsynced yet, then the folder
    /// (outside the state lock, so appends go on).
    fn sync_sealed(&self) -> Result<(), WalError> {
        // Retention must not delete a segment between the listing and its fsync.
        let _retention = self.retention.lock().unwrap_or_else(PoisonError::into_inner);
        let (pending, upto, generation, first_call) = {
            let st = self.lock();
            let synced = st.sealed_synced_upto;
            // Nothing sealed since, and the active segment already existed then: nothing to do.
            if synced.is_some_and(|s| st.active.first_seq.0.saturating_sub(1) <= s.0) {
                return Ok(());
            }
            let first_call = synced.is_none();
            let synced = synced.unwrap_or(Seq::ZERO);
            let pending: Vec<PathBuf> =
                st.sealed.iter().filter(|s| s.last_seq > synced).map(|s| s.path.clone()).collect();
            // Every sealed segment ends before the active one starts.
            (pending, Seq(st.active.first_seq.0.saturating_sub(1)), st.generation, first_call)
        };
        for path in &pending {
            match File::open(path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Deleted meanwhile by a suffix truncation (which fsyncs what it keeps).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.fail(WalError::io("fsync sealed segment", path, e))),
            }
        }
        sync_dir(&self.dir)?;
        // The space's own folder, created in the store's under `Never` without an fsync.
        if let Some(parent) = self.dir.parent().filter(|_| first_call) {
            sync_dir(parent)?;
        }
        let mut st = self.lock();
        // After a suffix truncation meanwhile, segments sealed since may end below `upto`
        // without having been fsynced here: the next call lists them again.
        if st.generation == generation {
            st.sealed_synced_upto = Some(st.sealed_synced_upto.map_or(upto, |s| s.max(upto)));
        }
        Ok(())
    }

    /// Under `SyncPolicy::Never`, when retention up to `upto` would reach the last sealed segment:
    /// fsyncs the active segment's entries and the folder (outside the state lock, so appends go
    /// on), and returns the last entry made durable, with the log's suffix-truncation generation
    /// then; else `Seq(0)`, with no I/O.
    fn sync_active_for_retention(&self, upto: Seq) -> Result<(Seq, u64), WalError> {
        if self.config.fsyncs() {
            return Ok((Seq::ZERO, 0));
        }
        let (file, path, last, generation) = {
            let st = self.lock();
            match st.sealed.back() {
                Some(newest) if newest.last_seq <= upto && st.active.last_seq >= st.active.first_seq => {
                    (st.active_file.clone(), st.active.path.clone(), st.active.last_seq, st.generation)
                }
                _ => return Ok((Seq::ZERO, st.generation)),
            }
        };
        if let Err(e) = file.sync_data() {
            return Err(self.fail(WalError::io("fsync before retention", &path, e)));
        }
        sync_dir(&self.dir)?;
        Ok((last, generation))
    }

    /// Poisons the log after a failure that leaves the file state unknown, and passes the error on.
    fn fail(&self, err: WalError) -> WalError {
        tracing::error!(space = %self.space, error = %err, "WAL: refusing further writes");
        self.durability.poison(err.to_string());
        err
    }

    /// Writes `entries` (consecutive, starting at `last_seq + 1`, lengths checked) and updates the state:
    /// one write per segment touched (`pwritev` when payloads go from their own buffers), rolling
    /// over to a new segment when the active one is full.
    /// Entries' payloads are moved into the memory tail. Subscribers learn the new `last_seq` even if a
    /// later part of the run failed.
    fn write_run(&self, st: &mut State, entries: &mut [Entry], payloads: Payloads) -> Result<(), WalError> {
        let before = st.last_seq;
        let result = self.write_parts(st, entries);
        st.tail.end_run(payloads);
        st.tail.settle_if_due();
        if st.last_seq != before {
            publish(&self.last_tx, st.last_seq);
            self.wake_waiters();
            if self.config.sync == SyncPolicy::Never {
                self.durability.advance(st.last_seq);
            }
        }
        result
    }

    fn write_parts(&self, st: &mut State, entries: &mut [Entry]) -> Result<(), WalError> {
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let result = self.write_parts_with(st, entries, &mut scratch);
        if scratch.capacity() <= SCRATCH_KEEP {
            SCRATCH.with(|s| *s.borrow_mut() = scratch);
        }
        result
    }

    fn write_parts_with(&self, st: &mut State, entries: &mut [Entry], scratch: &mut Vec<u8>) -> Result<(), WalError> {
        let limit = self.config.segment_bytes;
        // Where each payload written from its own buffer goes: (its offset in `scratch`, its entry).
        let mut referenced: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < entries.len() {
            let start = st.active.len;
            scratch.clear();
            referenced.clear();
            let mut end = start;
            let mut j = i;
            while j < entries.len() {
                let e = &entries[j];
                let rec = record_len(e.payload.len());
                // A record larger than a whole segment still gets one, alone.
                if end > SEGMENT_HEADER_LEN && end + rec > limit {
                    break;
                }
                if e.payload.len() >= VECTORED_MIN_PAYLOAD {
                    encode_record_header(scratch, e);
                    referenced.push((scratch.len(), j));
                } else {
                    encode_record(scratch, e);
                }
                end += rec;
                j += 1;
            }
            if j == i {
                self.roll(st)?;
                continue;
            }
            let written = if referenced.is_empty() {
                write_all_at(&st.active_file, scratch, start)
            } else {
                let mut parts = Vec::with_capacity(2 * referenced.len() + 1);
                let mut from = 0;
                for &(at, k) in &referenced {
                    parts.push(&scratch[from..at]);
                    parts.push(&entries[k].payload[..]);
                    from = at;
                }
                parts.push(&scratch[from..]);
                write_all_vectored_at(&st.active_file, &parts, start)
            };
            if let Err(e) = written {
                // Cut any partial write so the next record does not land after garbage.
                if let Err(cut) = st.active_file.set_len(start) {
                    let source =
                        std::io::Error::new(e.kind(), format!("{e}; cutting the partial write failed too: {cut}"));
                    return Err(self.fail(WalError::io("write", &st.active.path, source)));
                }
                return Err(WalError::io("write", &st.active.path, e));
            }
            if self.config.fsyncs() && end.saturating_sub(st.written_back) >= WRITEBACK_EVERY {
                let from = st.written_back.min(start);
                start_writeback(&st.active_file, from, end - from);
                st.written_back = end;
            }
            let State { active, tail, digest, .. } = &mut *st;
            let mut offset = start;
            for e in &mut entries[i..j] {
                active.index.note(e.seq, offset, *digest);
                offset += record_len(e.payload.len());
                *digest = digest.step(e.seq, e.kind, &e.payload);
                let payload = std::mem::take(&mut e.payload);
                tail.push(Entry { payload, ..*e });
            }
            active.len = offset;
            active.last_seq = entries[j - 1].seq;
            st.last_seq = entries[j - 1].seq;
            st.last_epoch = entries[j - 1].epoch;
            i = j;
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one at `last_seq + 1`.
    fn roll(&self, st: &mut State) -> Result<(), WalError> {
        let durable = self.config.fsyncs();
        if durable {
            // A sealed segment is never fsynced again: make it durable now so a crash cannot leave it
            // short while a later segment exists (recovery would rightly call that corruption).
            if let Err(e) = st.active_file.sync_data() {
                return Err(self.fail(WalError::io("fsync sealed segment", &st.active.path, e)));
            }
            self.durability.advance(st.last_seq);
        }
        let header = SegmentHeader { first_seq: st.last_seq.next(), base_digest: st.digest };
        let path = self.dir.join(segment_file_name(header.first_seq));
        let file = match create_segment(&self.dir, &path, &header, durable) {
            Ok(file) => file,
            // Something may be in place under the new segment's name (its folder's fsync failed
            // after the rename): writing on in the old segment, past the new one's first
            // sequence, would leave a log that no reopen accepts. Not knowing is the same.
            Err(e) if !matches!(path.try_exists(), Ok(false)) => return Err(self.fail(e)),
            Err(e) => return Err(e),
        };
        tracing::debug!(space = %self.space, segment = %path.display(), "WAL: new segment");
        let sealed = std::mem::replace(&mut st.active, Segment::new(path, header));
        st.written_back = 0;
        st.sealed.push_back(sealed);
        st.active_file = Arc::new(file);
        Ok(())
    }

    /// Entries from `from` if the memory tail can answer (or no entry exists there), `None` if disk is needed.
    fn read_memory(
        &self,
        st: &State,
        from: Seq,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Entry>>, WalError> {
        if from > st.last_seq {
            return Ok(Some(Vec::new()));
        }
        let first = st.first_seq();
        if from < first {
            return Err(WalError::Truncated { space: self.space.clone(), requested: from, first });
        }
        Ok(st.tail.read(from, max_entries, max_bytes))
    }

    /// Plans a disk read of `from..` (`first_seq <= from <= last_seq`).
    fn plan_read(&self, st: &State, from: Seq, max_entries: usize, max_bytes: usize) -> Vec<read::ReadPart> {
        read::plan(st.segments(), (st.active.first_seq, &st.active_file), &st.reads, from, max_entries, max_bytes)
    }

    /// Performs a planned disk read.
    fn read_disk(
        &self,
        parts: Vec<read::ReadPart>,
        from: Seq,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<read::ReadOutcome, WalError> {
        read::read(parts, from, max_entries, max_bytes, self.config.max_entry_bytes, |requested| {
            // Retention deleted a segment after the plan was made.
            WalError::Truncated { space: self.space.clone(), requested, first: self.lock().first_seq() }
        })
    }

    /// The entry at `seq` (`first_seq <= seq <= last_seq`) from the tail, or from disk via `cache`, which
    /// is refilled with up to `want` entries from `seq` when it does not hold it.
    fn held_at(&self, st: &State, seq: Seq, want: usize, cache: &mut Vec<Entry>) -> Result<Option<Entry>, WalError> {
        if let Some(e) = st.tail.get(seq) {
            return Ok(Some(e.clone()));
        }
        let find = |cache: &[Entry]| {
            let i = cache.first().and_then(|h| seq.0.checked_sub(h.seq.0))?;
            cache.get(usize::try_from(i).ok()?).cloned()
        };
        if let Some(e) = find(cache) {
            return Ok(Some(e));
        }
        // Called with the state lock held, which also keeps retention and truncation out.
        let parts = self.plan_read(st, seq, want, usize::MAX);
        let stop = read::read(parts, seq, want, usize::MAX, self.config.max_entry_bytes, |requested| {
            WalError::Truncated { space: self.space.clone(), requested, first: st.first_seq() }
        })?;
        *cache = stop.entries;
        Ok(find(cache))
    }

    /// Where segment `keep` must end for the log to end at `after`: (file offset, digest, epoch of `after`).
    fn locate_end(&self, st: &State, keep: usize, after: Seq) -> Result<(u64, LogDigest, Epoch), WalError> {
        let Some(seg) = st.segments().nth(keep) else {
            return Err(WalError::OutOfRange { space: self.space.clone(), seq: after, reason: "no segment holds it" });
        };
        let Some(point) = seg.index.lookup(after) else {
            // `after` precedes this segment's records: it ends empty.
            return Ok((SEGMENT_HEADER_LEN, seg.base_digest, Epoch(0)));
        };
        let file = File::open(&seg.path).ctx("open segment", &seg.path)?;
        let mut scanner = Scanner::new(&file, point.offset, seg.len, LOCATE_CHUNK, self.config.max_entry_bytes);
        let mut digest = point.digest_before;
        let mut expected = point.seq;
        while expected <= after {
            let rec = match scanner.next_record().ctx("read segment", &seg.path)? {
                Scan::Record(r) => r,
                Scan::End => {
                    return Err(WalError::corruption(
                        &seg.path,
                        scanner.pos(),
                        format!("segment ends before entry {expected}"),
                    ))
                }
                Scan::Bad { offset, reason } => return Err(WalError::corruption(&seg.path, offset, reason)),
            };
            check_record(&rec.entry, expected).map_err(|reason| WalError::corruption(&seg.path, rec.offset, reason))?;
            digest = digest.step(rec.entry.seq, rec.entry.kind, &rec.entry.payload);
            if rec.entry.seq == after {
                return Ok((rec.offset + rec.len, digest, rec.entry.epoch));
            }
            expected = expected.next();
        }
        Err(WalError::corruption(&seg.path, scanner.pos(), format!("entry {after} not found")))
    }

    /// Waits until `target` is durable (group commit), poisoning the log if an fsync fails.
    fn wait_durable(&self, target: Seq, force: bool) -> Result<Seq, WalError> {
        let take = || {
            let st = self.lock();
            SyncTarget {
                file: st.active_file.clone(),
                path: st.active.path.clone(),
                upto: st.last_seq,
                generation: st.generation,
            }
        };
        self.durability.wait(target, force, take).map_err(|f| match f {
            SyncFailure::Io { path, source } => {
                let err = WalError::io("fsync", &path, source);
                tracing::error!(space = %self.space, error = %err, "WAL: fsync failed; refusing further writes");
                err
            }
            SyncFailure::Poisoned(reason) => WalError::Poisoned { space: self.space.clone(), reason },
        })
    }
}

impl Flush for Inner {
    fn flush(&self) {
        if self.durability.poisoned().is_some() {
            return; // Already reported; retrying an fsync after a failure proves nothing.
        }
        let last = self.lock().last_seq;
        if last > self.durability.durable() {
            if let Err(e) = self.wait_durable(last, false) {
                tracing::warn!(space = %self.space, error = %e, "WAL: background fsync failed");
            }
        }
    }
}

impl Drop for Inner {
    /// A clean shutdown leaves nothing un-fsynced under an fsyncing policy.
    fn drop(&mut self) {
        if self.config.fsyncs() && self.durability.poisoned().is_none() {
            let st = self.lock();
            if st.last_seq > self.durability.durable() {
                if let Err(e) = st.active_file.sync_data() {
                    tracing::warn!(space = %self.space, error = %e, "WAL: final fsync failed");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "space_tests.rs"]
mod tests;
