//! End-to-end replication over QUIC on loopback: one primary, one replica, 16 spaces, 128-byte
//! entries, lz4, WAL fsync never on both sides.
//!
//! 1. Throughput: a writer appends as fast as it can; reports entries/s written and entries/s
//!    delivered durable on the replica (first append to last entry durable).
//! 2. Lag at a fixed rate (10,000 entries/s): per-entry lag from the primary's append to durable +
//!    applied on the replica, as p50/p99/p999/max from an HDR histogram.
//!
//! Run: `cargo bench --bench e2e` (options: `-- --entries N --rate R --seconds S`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::entry::{now_us, Entry};
use walship::net::tls::ClusterCa;
use walship::payload::PayloadGen;
use walship::wal::SyncPolicy;
use walship::{ApplyHook, Epoch, Primary, Replica, SpaceId};

const SPACES: usize = 16;
const ENTRY_BYTES: usize = 128;

/// Records, for every entry applied on the replica, how long ago the primary appended it.
struct LagRecorder {
    hist: Mutex<Histogram<u64>>,
    applied: AtomicU64,
}

impl ApplyHook for LagRecorder {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let now = now_us();
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            let _ = h.record(now.saturating_sub(e.timestamp_us).max(1));
        }
        self.applied.fetch_add(entries.len() as u64, Ordering::Relaxed);
        Box::pin(async {})
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    primary: Primary,
    replica: Replica,
    lag: Arc<LagRecorder>,
    spaces: Vec<walship::wal::SpaceWal>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate("bench CA").expect("CA");
    let mut pc = PrimaryConfig::new("primary", "127.0.0.1:0".parse().unwrap(), dir.path().join("p"));
    pc.wal.sync = SyncPolicy::Never;
    let primary = Primary::start(pc, ca.issue("primary").unwrap()).await.expect("primary");
    let mut rc = ReplicaConfig::new("replica-1", primary.local_addr(), "primary", dir.path().join("r"));
    rc.wal.sync = SyncPolicy::Never;
    let lag = Arc::new(LagRecorder { hist: Mutex::new(Histogram::new(3).unwrap()), applied: AtomicU64::new(0) });
    let replica =
        Replica::start_with_hook(rc, ca.issue("replica-1").unwrap(), Some(lag.clone())).await.expect("replica");
    let spaces =
        (0..SPACES).map(|i| primary.space(&SpaceId::new(&format!("space-{i:02}")).unwrap()).unwrap()).collect();
    Setup { _dir: dir, primary, replica, lag, spaces }
}

/// Appends `n` entries round-robin, at `rate` entries/s (0 = unthrottled), on a plain thread.
fn write(spaces: Vec<walship::wal::SpaceWal>, n: u64, rate: u64) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let mut gen = PayloadGen::new(1, ENTRY_BYTES);
        let payloads: Vec<_> = (0..4096).map(|_| gen.next_payload()).collect();
        let start = Instant::now();
        for i in 0..n {
            if rate > 0 {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                let elapsed = start.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            }
            let w = &spaces[i as usize % spaces.len()];
            w.append(Epoch(1), 1, payloads[i as usize % payloads.len()].clone()).expect("append");
        }
        start.elapsed()
    })
}

async fn wait_applied(lag: &LagRecorder, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while lag.applied.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)) {
        Some(v) => v.parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}")),
        None => default,
    }
}

fn report(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms",
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let entries = arg("--entries", 2_000_000.0) as u64;
    let rate = arg("--rate", 10_000.0) as u64;
    let seconds = arg("--seconds", 5.0);
    println!("e2e: 1 replica, {SPACES} spaces, {ENTRY_BYTES}-byte entries, lz4, fsync never, loopback");

    // 1. Throughput.
    let s = setup().await;
    let start = Instant::now();
    let writer = write(s.spaces.clone(), entries, 0);
    wait_applied(&s.lag, entries).await;
    let delivered = start.elapsed();
    let written = writer.join().expect("writer");
    let applied = s.lag.applied.load(Ordering::Relaxed);
    let p = s.primary.status();
    let wire = p.replicas.first().map(|r| r.bytes_sent).unwrap_or(0);
    println!(
        "throughput: {entries} entries written in {:.2}s ({:.0} entries/s); {applied} durable on the replica after {:.2}s = {:.0} entries/s ({:.1} MB/s payload, {:.1} MB/s frames)",
        written.as_secs_f64(),
        entries as f64 / written.as_secs_f64(),
        delivered.as_secs_f64(),
        applied as f64 / delivered.as_secs_f64(),
        (applied * ENTRY_BYTES as u64) as f64 / delivered.as_secs_f64() / 1e6,
        wire as f64 / delivered.as_secs_f64() / 1e6,
    );
    println!("  lag while saturated: {}", report(&s.lag.hist.lock().unwrap()));
    // Every space, by id: same last sequence and digest on both sides.
    let ours: BTreeMap<String, _> =
        p.spaces.iter().map(|x| (x.space.to_string(), (x.last_seq, x.digest.clone()))).collect();
    let theirs: BTreeMap<String, _> = s
        .replica
        .status()
        .spaces
        .iter()
        .map(|x| (x.log.space.to_string(), (x.log.last_seq, x.log.digest.clone())))
        .collect();
    let identical = ours == theirs;
    println!("  logs identical: {identical}");
    s.replica.shutdown().await;
    s.primary.shutdown().await;

    // 2. Lag at a fixed rate.
    let s = setup().await;
    let n = (rate as f64 * seconds) as u64;
    let writer = write(s.spaces.clone(), n, rate);
    writer.join().expect("writer");
    wait_applied(&s.lag, n).await;
    println!("lag at {rate} entries/s for {seconds}s ({n} entries): {}", report(&s.lag.hist.lock().unwrap()));
    s.replica.shutdown().await;
    s.primary.shutdown().await;
}
