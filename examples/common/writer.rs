//! The built-in writer of the `primary` binary and the load test: paced appends across the
//! demo spaces on a thread of its own, counting and timing them for the status and the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use walship::payload::PayloadGen;
use walship::wal::SpaceWal;
use walship::Epoch;

/// Progress counters of the built-in writer, read while it runs.
#[derive(Default)]
pub struct WriterStats {
    pub written: AtomicU64,
    /// Microseconds from the writer's start to its last append so far.
    pub elapsed_us: AtomicU64,
    /// Set (Release) once the writer stops, whether it finished or failed, after every other
    /// field has its final value: a reader that sees it (Acquire) sees those.
    pub done: AtomicBool,
    /// When the writer stopped.
    pub finished_at: std::sync::OnceLock<Instant>,
    /// Why it stopped early, if an append failed.
    pub error: Mutex<Option<String>>,
    /// Append latencies in nanoseconds, when the plan asked for them (`time_appends_after`):
    /// the writer records into its own histogram and merges it in every [`MERGE_EVERY`], so a
    /// reader never waits behind appends.
    pub append_ns: Option<Mutex<Histogram<u64>>>,
}

impl WriterStats {
    /// A copy of the append latencies so far, if appends are timed.
    pub fn append_latencies(&self) -> Option<Histogram<u64>> {
        self.append_ns.as_ref().map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// What the built-in writer writes.
pub struct WriterPlan {
    /// Written round-robin, one entry each in turn.
    pub spaces: Vec<SpaceWal>,
    pub epoch: Epoch,
    /// Entries per second; 0 writes as fast as possible.
    pub rate: u64,
    pub entry_bytes: usize,
    /// Stop after this many entries (else only when told to stop).
    pub total: Option<u64>,
    /// Seed of the payloads.
    pub seed: u64,
    /// Time every append made this long after the start or later, into
    /// [`WriterStats::append_ns`]; `None` times nothing.
    pub time_appends_after: Option<Duration>,
}

/// Append latencies in nanoseconds (1 ns to 60 s, 3 significant digits).
pub fn append_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// A running built-in writer.
pub struct Writer {
    /// Its counters, read while it runs.
    pub stats: Arc<WriterStats>,
    /// Its thread, which ends at the plan's total, at the stop flag, or with the first append error.
    pub thread: std::thread::JoinHandle<Result<(), String>>,
}

/// Writes `plan` on its own thread (the write path never waits for replication) until its total
/// or until `stop` is set.
pub fn spawn_writer(plan: WriterPlan, stop: Arc<AtomicBool>) -> Writer {
    let stats = Arc::new(WriterStats {
        append_ns: plan.time_appends_after.map(|_| Mutex::new(append_histogram())),
        ..WriterStats::default()
    });
    let s2 = stats.clone();
    let handle = std::thread::spawn(move || {
        let result = write(plan, &stop, &s2);
        if let Err(e) = &result {
            *s2.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        }
        let _ = s2.finished_at.set(Instant::now());
        s2.done.store(true, Ordering::Release);
        result
    });
    Writer { stats, thread: handle }
}

/// The body of [`spawn_writer`]'s thread: writes until the plan's total, `stop`, or an append error.
fn write(plan: WriterPlan, stop: &AtomicBool, stats: &WriterStats) -> Result<(), String> {
    let WriterPlan { spaces, epoch, rate, entry_bytes, total, seed, time_appends_after } = plan;
    let timed_from = time_appends_after.unwrap_or(Duration::MAX);
    // Between due checks: about one entry's interval, but never a busy loop nor a long nap.
    let nap = match rate {
        0 => Duration::ZERO,
        r => Duration::from_secs_f64(1.0 / r as f64).clamp(Duration::from_micros(200), Duration::from_millis(10)),
    };
    let mut gen = PayloadGen::new(seed, entry_bytes);
    let mut local = stats.append_ns.as_ref().map(|_| append_histogram());
    let mut last_merge = Instant::now();
    let start = Instant::now();
    let mut written = 0u64;
    let limit = total.unwrap_or(u64::MAX);
    while written < limit && !stop.load(Ordering::Relaxed) && !spaces.is_empty() {
        let due = if rate == 0 { limit } else { ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(limit) };
        if written >= due {
            std::thread::sleep(nap);
            continue;
        }
        // Write what is due in bursts of at most BURST entries or BURST_TIME (a slow disk),
        // publishing progress and checking the stop flag in between.
        let burst_start = Instant::now();
        let mut hist = local.as_mut().filter(|_| burst_start.duration_since(start) >= timed_from);
        let mut result = Ok(());
        for _ in 0..(due - written).min(BURST) {
            let wal = &spaces[(written % spaces.len() as u64) as usize];
            let payload = gen.next_payload();
            let t = hist.is_some().then(Instant::now);
            if let Err(e) = wal.append(epoch, 1, payload) {
                result = Err(e.to_string());
                break;
            }
            if let (Some(h), Some(t)) = (hist.as_mut(), t) {
                h.saturating_record(t.elapsed().as_nanos() as u64);
            }
            written += 1;
            // The clock, every few appends only: the demo's appends are not timed at all.
            if written % 64 == 0 && burst_start.elapsed() >= BURST_TIME {
                break;
            }
        }
        if last_merge.elapsed() >= MERGE_EVERY || result.is_err() || written >= limit {
            merge(&mut local, stats);
            last_merge = Instant::now();
        }
        stats.elapsed_us.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.written.store(written, Ordering::Relaxed);
        result?;
    }
    merge(&mut local, stats);
    Ok(())
}

/// Most appends the built-in writer makes between looks at its stop flag and its rate.
const BURST: u64 = 4096;
/// Longest the built-in writer appends between looks at its stop flag (appends can be slow
/// under `--sync always`).
const BURST_TIME: Duration = Duration::from_millis(10);
/// How often the built-in writer merges its append latencies into the shared histogram.
pub const MERGE_EVERY: Duration = Duration::from_millis(50);

/// Adds the writer's own latency histogram into the shared one and empties it.
fn merge(local: &mut Option<Histogram<u64>>, stats: &WriterStats) {
    if let (Some(l), Some(shared)) = (local.as_mut(), stats.append_ns.as_ref()) {
        if !l.is_empty() {
            let _ = shared.lock().unwrap_or_else(|p| p.into_inner()).add(&*l);
            l.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use walship::SpaceId;

    use super::*;

    #[test]
    fn the_writer_counts_and_times_every_append_of_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        let space = SpaceId::new("space-000").unwrap();
        let wal = SpaceWal::open(dir.path(), space, walship::wal::WalConfig::default()).unwrap();
        let plan = WriterPlan {
            spaces: vec![wal.clone()],
            epoch: Epoch(1),
            rate: 0,
            entry_bytes: 64,
            total: Some(10_000),
            seed: 7,
            time_appends_after: Some(Duration::ZERO),
        };
        let Writer { stats, thread } = spawn_writer(plan, Arc::new(AtomicBool::new(false)));
        thread.join().unwrap().unwrap();
        assert!(stats.done.load(Ordering::Acquire));
        assert!(stats.finished_at.get().is_some());
        assert_eq!(stats.written.load(Ordering::Relaxed), 10_000);
        assert_eq!(stats.append_latencies().unwrap().len(), 10_000);
        assert!(stats.error.lock().unwrap().is_none());
        assert_eq!(wal.last_seq().0, 10_000);
    }

    #[test]
    fn a_failed_append_is_kept_as_the_writer_error() {
        let dir = tempfile::tempdir().unwrap();
        let space = SpaceId::new("space-000").unwrap();
        let config = walship::wal::WalConfig { max_entry_bytes: 32, ..walship::wal::WalConfig::default() };
        let wal = SpaceWal::open(dir.path(), space, config).unwrap();
        let plan = WriterPlan {
            spaces: vec![wal],
            epoch: Epoch(1),
            rate: 0,
            entry_bytes: 64,
            total: Some(10),
            seed: 7,
            time_appends_after: None,
        };
        let Writer { stats, thread } = spawn_writer(plan, Arc::new(AtomicBool::new(false)));
        assert!(thread.join().unwrap().is_err());
        assert!(stats.done.load(Ordering::Acquire));
        assert_eq!(stats.written.load(Ordering::Relaxed), 0);
        assert!(stats.error.lock().unwrap().is_some());
    }
}
