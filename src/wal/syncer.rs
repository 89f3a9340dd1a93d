//! The background thread of [`SyncPolicy::Interval`](super::SyncPolicy::Interval): every interval it
//! fsyncs the logs that have entries not yet durable.
//!
//! One thread serves every log registered with it (a [`WalStore`](super::WalStore) shares one among its
//! spaces). It holds the logs only weakly, and stops as soon as the last [`Syncer`] handle is dropped.

use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::Duration;

/// A log the syncer can flush.
pub(crate) trait Flush: Send + Sync {
    /// Fsyncs the log if it has entries that are not durable yet.
    fn flush(&self);
}

/// Set when every [`Syncer`] handle is gone, so the thread exits without waiting out its interval.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

struct Shared {
    logs: Mutex<Vec<Weak<dyn Flush>>>,
    stop: Arc<Stop>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        *self.stop.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.stop.wake.notify_all();
    }
}

/// Handle to a running sync thread; clones share it.
#[derive(Clone)]
pub(crate) struct Syncer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Syncer")
    }
}

impl Syncer {
    /// Starts a thread that flushes registered logs every `interval` (at least 1 ms).
    pub fn start(interval: Duration) -> std::io::Result<Syncer> {
        let interval = interval.max(Duration::from_millis(1));
        let stop = Arc::new(Stop::default());
        let shared = Arc::new(Shared { logs: Mutex::new(Vec::new()), stop: stop.clone() });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new().name("walship-wal-sync".into()).spawn(move || run(weak, stop, interval))?;
        Ok(Syncer { shared })
    }

    /// Adds a log to flush.
    pub fn register(&self, log: Weak<dyn Flush>) {
        self.shared.logs.lock().unwrap_or_else(PoisonError::into_inner).push(log);
    }
}

fn run(shared: Weak<Shared>, stop: Arc<Stop>, interval: Duration) {
    loop {
        {
            let stopped = stop.stopped.lock().unwrap_or_else(PoisonError::into_inner);
            let (stopped, _) = stop.wake.wait_timeout(stopped, interval).unwrap_or_else(PoisonError::into_inner);
            if *stopped {
                return;
            }
        }
        let logs: Vec<Arc<dyn Flush>> = {
            let Some(shared) = shared.upgrade() else { return };
            let mut logs = shared.logs.lock().unwrap_or_else(PoisonError::into_inner);
            logs.retain(|l| l.strong_count() > 0);
            logs.iter().filter_map(Weak::upgrade).collect()
        };
        for log in logs {
            log.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counter(AtomicUsize);
    impl Flush for Counter {
        fn flush(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn flushes_until_dropped() {
        let s = Syncer::start(Duration::from_millis(1)).unwrap();
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        let weak: Weak<dyn Flush> = Arc::downgrade(&(c.clone() as Arc<dyn Flush>));
        s.register(weak);
        let t0 = std::time::Instant::now();
        while c.0.load(Ordering::Relaxed) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "syncer never flushed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let stop = s.shared.stop.clone();
        drop(s);
        assert!(*stop.stopped.lock().unwrap());
    }
}
