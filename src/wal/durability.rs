//! Durability tracking and group commit: which sequence is known to be on stable storage, and one fsync
//! shared by every thread waiting for it.
//!
//! A thread that needs `seq` durable becomes the leader if no fsync is in flight: it notes the log's
//! current end, fsyncs outside the log's main lock (so appends continue), then publishes the new durable
//! sequence and wakes the others. Threads that arrive during the fsync wait and, if the fsync did not
//! cover them, one of them leads the next. So N concurrent appenders cost about two fsyncs, not N.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::types::Seq;

/// Stores `value` in `tx`, waking receivers only if there are any.
///
/// Waking a watch's receivers costs about 100 ns even when none waits, which is a large share of an
/// append; with no receiver the value is stored silently (a later `subscribe` still sees it). Callers
/// hold the lock that `subscribe` takes, so a receiver cannot appear between the count and the store.
pub(crate) fn publish(tx: &watch::Sender<Seq>, value: Seq) {
    if tx.receiver_count() > 0 {
        tx.send_replace(value);
    } else {
        tx.send_if_modified(|v| {
            *v = value;
            false
        });
    }
}

/// What a leader fsyncs, taken under the log's main lock.
pub(crate) struct SyncTarget {
    /// The active segment (earlier segments were made durable when they were sealed).
    pub file: Arc<File>,
    pub path: PathBuf,
    /// The log's last sequence when the target was taken: durable once `file` is fsynced.
    pub upto: Seq,
    /// The log's truncation generation at that time.
    pub generation: u64,
}

/// Why waiting for durability failed.
#[derive(Debug)]
pub(crate) enum SyncFailure {
    /// This thread's fsync failed.
    Io { path: PathBuf, source: std::io::Error },
    /// An earlier fsync failed; the log no longer claims anything more is durable.
    Poisoned(String),
}

#[derive(Debug)]
struct State {
    /// An fsync is in flight.
    syncing: bool,
    /// Truncation generation the durable sequence refers to.
    generation: u64,
    /// The failure that poisoned the log, if any.
    failure: Option<String>,
}

/// The durable sequence of one log and the group-commit rendezvous.
#[derive(Debug)]
pub(crate) struct Durability {
    state: Mutex<State>,
    done: Condvar,
    poisoned: AtomicBool,
    durable: watch::Sender<Seq>,
}

impl Durability {
    /// Starts with `durable` already on stable storage (what recovery found).
    pub fn new(durable: Seq) -> Durability {
        Durability {
            state: Mutex::new(State { syncing: false, generation: 0, failure: None }),
            done: Condvar::new(),
            poisoned: AtomicBool::new(false),
            durable: watch::Sender::new(durable),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The highest sequence known durable.
    pub fn durable(&self) -> Seq {
        *self.durable.borrow()
    }

    /// Receiver of durable-sequence changes. The caller holds the log's main lock, so no value is
    /// published silently (see [`publish`]) while the receiver is being created.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        let _st = self.lock();
        self.durable.subscribe()
    }

    /// Raises the durable sequence to `seq` (never lowers it). Called with the log's main lock held, or
    /// by a leader (holding this struct's lock) whose generation is current.
    pub fn advance(&self, seq: Seq) {
        let notify = self.durable.receiver_count() > 0;
        self.durable.send_if_modified(|d| {
            let raise = seq > *d;
            if raise {
                *d = seq;
            }
            raise && notify
        });
    }

    /// After a suffix truncation to `after`, fsynced (main lock held): everything up to `after` is durable
    /// and nothing more. Starts a new generation, so an fsync that began before the cut cannot mark cut
    /// entries durable.
    pub fn truncated(&self, after: Seq, generation: u64) {
        let mut st = self.lock();
        st.generation = generation;
        self.durable.send_if_modified(|d| {
            let changed = *d != after;
            *d = after;
            changed
        });
    }

    /// The failure that poisoned the log, if any (cheap when there is none).
    pub fn poisoned(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        self.lock().failure.clone()
    }

    /// Marks the log as failed: it must not write or claim durability again until reopened.
    pub fn poison(&self, reason: String) {
        let mut st = self.lock();
        self.poison_locked(&mut st, reason);
        self.done.notify_all();
    }

    fn poison_locked(&self, st: &mut State, reason: String) {
        st.failure.get_or_insert(reason);
        self.poisoned.store(true, Ordering::Release);
    }

    /// Blocks until `target` is durable, fsyncing as the leader when nobody else is.
    ///
    /// `force` makes this thread wait for an fsync that starts after the call (an explicit `sync()`),
    /// even if `target` already looks durable. `take` is called without any lock of this struct held.
    pub fn wait(&self, target: Seq, force: bool, take: impl Fn() -> SyncTarget) -> Result<Seq, SyncFailure> {
        let mut st = self.lock();
        let mut forced = !force;
        loop {
            if let Some(reason) = &st.failure {
                return Err(SyncFailure::Poisoned(reason.clone()));
            }
            let durable = self.durable();
            if forced && durable >= target {
                return Ok(durable);
            }
            if st.syncing {
                st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            drop(st);

            let t = take();
            let result = t.file.sync_data();

            st = self.lock();
            st.syncing = false;
            self.done.notify_all();
            if let Err(source) = result {
                self.poison_locked(&mut st, format!("fsync of {} failed: {source}", t.path.display()));
                return Err(SyncFailure::Io { path: t.path, source });
            }
            if st.generation == t.generation {
                self.advance(t.upto);
            }
            forced = true;
            if t.upto < target {
                // Entries up to `target` were cut by a suffix truncation meanwhile: nothing more to wait for.
                return Ok(self.durable());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn concurrent_waiters_share_fsyncs() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let d = Arc::new(Durability::new(Seq(0)));
        let takes = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (1..=8u64)
            .map(|i| {
                let (f, d, takes) = (f.clone(), d.clone(), takes.clone());
                std::thread::spawn(move || {
                    d.wait(Seq(i), false, || {
                        takes.fetch_add(1, Ordering::Relaxed);
                        SyncTarget { file: f.clone(), path: "t".into(), upto: Seq(8), generation: 0 }
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap() >= Seq(1));
        }
        assert_eq!(d.durable(), Seq(8));
        assert!(takes.load(Ordering::Relaxed) >= 1);
        // Already durable: no fsync unless forced.
        let calls = AtomicUsize::new(0);
        let take = || {
            calls.fetch_add(1, Ordering::Relaxed);
            SyncTarget { file: f.clone(), path: "t".into(), upto: Seq(8), generation: 0 }
        };
        d.wait(Seq(8), false, take).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        d.wait(Seq(8), true, take).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stale_generation_does_not_advance() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let d = Durability::new(Seq(5));
        d.truncated(Seq(3), 1);
        assert_eq!(d.durable(), Seq(3));
        // The first leader took its target before the cut (generation 0, upto 5): its fsync must not
        // claim 5. The next take sees the cut log (generation 1, upto 4) and ends the wait.
        let calls = AtomicUsize::new(0);
        let r = d.wait(Seq(5), false, || {
            let first = calls.fetch_add(1, Ordering::Relaxed) == 0;
            let (upto, generation) = if first { (Seq(5), 0) } else { (Seq(4), 1) };
            SyncTarget { file: f.clone(), path: "t".into(), upto, generation }
        });
        assert_eq!(r.unwrap(), Seq(4));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(d.durable(), Seq(4));
    }

    #[test]
    fn poison_stops_waiters() {
        let d = Durability::new(Seq(0));
        d.poison("disk on fire".into());
        assert_eq!(d.poisoned().as_deref(), Some("disk on fire"));
        let f = Arc::new(tempfile::tempfile().unwrap());
        let r = d.wait(Seq(1), false, || SyncTarget { file: f.clone(), path: "t".into(), upto: Seq(1), generation: 0 });
        assert!(matches!(r, Err(SyncFailure::Poisoned(_))));
    }
}
