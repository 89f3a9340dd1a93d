//! Write-ahead log throughput: appends of 128-byte entries under each sync policy, one at a time and in
//! batches of 64, and the catch-up read path (entries read back from segment files, memory tail off).
//! Throughput is in entries. `wal_seal_4k` times the append that seals a full segment.
//!
//! Run: `cargo bench --bench wal`
//!
//! Logs live in a temporary folder (the system temp dir, so its file system decides what fsync costs).
//! Retention runs between timed sections so the disk footprint stays bounded.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use walship::wal::{SpaceWal, SyncPolicy, WalConfig};
use walship::{Epoch, Seq, SpaceId};

const ENTRY_BYTES: usize = 128;
const BATCH: usize = 64;

/// Runs `op` `iters` times and returns how long that took; retention then trims the log (untimed).
fn timed(wal: &SpaceWal, iters: u64, mut op: impl FnMut()) -> Duration {
    let t0 = Instant::now();
    for _ in 0..iters {
        op();
    }
    let took = t0.elapsed();
    retain(wal);
    took
}

fn space() -> SpaceId {
    SpaceId::new("bench").unwrap()
}

fn policies() -> [(&'static str, SyncPolicy); 3] {
    [
        ("never", SyncPolicy::Never),
        ("interval_10ms", SyncPolicy::Interval(Duration::from_millis(10))),
        ("always", SyncPolicy::Always),
    ]
}

/// Drops every sealed segment so a long run does not fill the disk (not timed).
fn retain(wal: &SpaceWal) {
    wal.truncate_prefix(wal.last_seq()).unwrap();
}

fn bench_append(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x5au8; ENTRY_BYTES]);
    let mut group = c.benchmark_group("wal_append_128b");
    for (name, policy) in policies() {
        let slow = policy == SyncPolicy::Always;
        if slow {
            group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
        } else {
            group.sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
        }
        let dir = tempfile::tempdir().unwrap();
        let wal = SpaceWal::open(dir.path(), space(), WalConfig::default().sync(policy)).unwrap();

        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("append", name), |b| {
            b.iter_custom(|iters| {
                timed(&wal, iters, || {
                    wal.append(Epoch(1), 1, payload.clone()).unwrap();
                })
            })
        });

        let items: Vec<(u8, Bytes)> = (0..BATCH).map(|_| (1u8, payload.clone())).collect();
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(BenchmarkId::new("append_batch_64", name), |b| {
            b.iter_custom(|iters| {
                timed(&wal, iters, || {
                    wal.append_batch(Epoch(1), &items).unwrap();
                })
            })
        });
    }
    group.finish();
}

/// `append` while a `subscribe()` receiver exists (every append then wakes the watch). Shippers use
/// `SpaceWal::wait_for` instead, which costs appends nothing while they are busy.
fn bench_append_subscribed(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x5au8; ENTRY_BYTES]);
    let mut group = c.benchmark_group("wal_append_128b");
    group.sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let wal = SpaceWal::open(dir.path(), space(), WalConfig::default().sync(SyncPolicy::Never)).unwrap();
    let _shipper = wal.subscribe();
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("append", "never_subscribed"), |b| {
        b.iter_custom(|iters| {
            timed(&wal, iters, || {
                wal.append(Epoch(1), 1, payload.clone()).unwrap();
            })
        })
    });
    group.finish();
}

/// `SyncPolicy::Always` with 8 threads appending at once: group commit shares each fsync among them.
fn bench_group_commit(c: &mut Criterion) {
    const THREADS: u64 = 8;
    let payload = Bytes::from(vec![0x5au8; ENTRY_BYTES]);
    let mut group = c.benchmark_group("wal_append_128b");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let dir = tempfile::tempdir().unwrap();
    let wal = SpaceWal::open(dir.path(), space(), WalConfig::default().sync(SyncPolicy::Always)).unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("append", "always_8_threads"), |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(THREADS);
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        for _ in 0..per_thread {
                            wal.append(Epoch(1), 1, payload.clone()).unwrap();
                        }
                    });
                }
            });
            let took = t0.elapsed();
            retain(&wal);
            // Normalize to `iters` appends (the threads did per_thread * THREADS >= iters).
            took.mul_f64(iters as f64 / (per_thread * THREADS) as f64)
        })
    });
    group.finish();
}

fn bench_catch_up(c: &mut Criterion) {
    // 64 MiB of entries in 8 MiB segments, memory tail off: every read goes to the segment files (the
    // page cache, after the first pass), starting from the sparse index.
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig::default().sync(SyncPolicy::Never).segment_bytes(8 << 20).tail_max_entries(0);
    let wal = SpaceWal::open(dir.path(), space(), config).unwrap();
    let payload = Bytes::from(vec![0xa5u8; ENTRY_BYTES]);
    let items: Vec<(u8, Bytes)> = (0..1024).map(|_| (1u8, payload.clone())).collect();
    while wal.last_seq() < Seq(400_000) {
        wal.append_batch(Epoch(1), &items).unwrap();
    }
    let last = wal.last_seq().0;

    let mut group = c.benchmark_group("wal_read_from_disk_128b");
    group.sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for per_call in [64usize, 1024] {
        group.throughput(Throughput::Elements(per_call as u64));
        group.bench_function(BenchmarkId::new("entries_per_call", per_call), |b| {
            let mut from = 1u64;
            b.iter(|| {
                let got = wal.read_from(Seq(from), per_call, 1 << 20).unwrap();
                from += got.len() as u64;
                if from + per_call as u64 > last {
                    from = 1;
                }
                got
            })
        });
    }
    group.finish();
}

/// The append that seals a full segment under `Interval(10 ms)` (the default policy): it makes the
/// sealed segment durable (and creates the next one) while holding the space's lock, so the writer
/// waits for it. 4 KiB entries fill 8 MiB segments (untimed); only each sealing append is timed.
fn bench_seal(c: &mut Criterion) {
    const SEAL_ENTRY: usize = 4096;
    const SEGMENT: u64 = 8 << 20;
    let mut group = c.benchmark_group("wal_seal_4k");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig::default().sync(SyncPolicy::Interval(Duration::from_millis(10))).segment_bytes(SEGMENT);
    let wal = SpaceWal::open(dir.path(), space(), config).unwrap();
    let space_dir = dir.path().join(space().as_str());
    let segments = || std::fs::read_dir(&space_dir).unwrap().count();
    let payload = Bytes::from(vec![b's'; SEAL_ENTRY]);
    let almost_full = (SEGMENT / (SEAL_ENTRY as u64 + 64)) as usize * 9 / 10;
    group.bench_function("interval_10ms", |b| {
        b.iter_custom(|iters| {
            let mut sealing = Duration::ZERO;
            for _ in 0..iters {
                // Retention leaves only the active segment; fill it (untimed) up to the append
                // that creates the next one, and time that one.
                wal.truncate_prefix(wal.last_seq()).unwrap();
                let one = segments();
                for _ in 0..almost_full {
                    wal.append(Epoch(1), 1, payload.clone()).unwrap();
                }
                loop {
                    let t = Instant::now();
                    wal.append(Epoch(1), 1, payload.clone()).unwrap();
                    let took = t.elapsed();
                    if segments() > one {
                        sealing += took;
                        break;
                    }
                }
            }
            sealing
        })
    });
    group.finish();
}

criterion_group!(benches, bench_append, bench_append_subscribed, bench_group_commit, bench_catch_up, bench_seal);
criterion_main!(benches);
