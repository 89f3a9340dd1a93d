//! Replication lag per entry, measured where the entries are applied: the time from each entry's
//! append on the primary (its `timestamp_us`) to its apply on this replica (once durable here).
//! Both clocks are this machine's in process and on one host; across hosts the figure is only as
//! good as their clock synchronisation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use walship::entry::{now_us, Entry};
use walship::{ApplyHook, SpaceId};

/// An apply hook that times every entry it is given (µs), and counts entries and payload bytes.
pub struct LagRecorder {
    pub hist: Mutex<Histogram<u64>>,
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    /// Entries appended before this time (µs since the Unix epoch: a warm-up) are counted, not timed.
    pub timed_from_us: AtomicU64,
}

impl LagRecorder {
    pub fn new() -> Arc<LagRecorder> {
        Arc::new(LagRecorder {
            hist: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            timed_from_us: AtomicU64::new(0),
        })
    }

    /// `p50`, `p99`, `p999`, `max` in milliseconds and `count` (see `super::percentiles_json`).
    pub fn lag_ms_json(&self) -> serde_json::Value {
        super::percentiles_json(&self.hist.lock().unwrap_or_else(|p| p.into_inner()), 1e3)
    }
}

impl ApplyHook for LagRecorder {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let now = now_us();
        let timed_from = self.timed_from_us.load(Ordering::Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = 0;
        for e in entries {
            if e.timestamp_us >= timed_from {
                h.saturating_record(now.saturating_sub(e.timestamp_us).max(1));
            }
            bytes += e.payload.len() as u64;
        }
        drop(h);
        self.entries.fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Box::pin(async {})
    }
}
