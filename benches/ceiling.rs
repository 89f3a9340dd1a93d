//! Throughput against the ceiling: walship replication side by side with what the same machine
//! can move over loopback without it, in one run (machines are noisy, so compare the ratios).
//!
//! Cases, each for at most `--bytes` of payload or `--seconds` of sending, whichever ends first:
//!
//! 1. `quinn`: raw quinn, one connection with the product's `TransportSettings` and mTLS
//!    identities (`server_endpoint` / `client_endpoint`); the client writes preallocated 64 KiB
//!    `Bytes` chunks (`write_chunk`) to one uni stream, the server `read_chunk`s and discards.
//! 2. `tcp`: TCP (TCP_NODELAY) + rustls 0.23 via tokio-rustls, TLS 1.3 with the same identities
//!    (`server_crypto` / `client_crypto`); the client writes the batch frames walship would send
//!    for B-byte entries (pre-encoded with `BatchEncoder`), the server reads header + payload and
//!    decodes them with `BatchDecoder` (checksums, decompression, entry parsing).
//! 3. `walship-1` / `walship-16`: `Primary` + one `Replica` in process, WAL fsync never on both
//!    sides, 1 and 16 spaces, B-byte entries; a writer thread calls `append_batch` with
//!    `--append-chunk` entries at a time, at most `--lead-mb` ahead of the replica (so shipping
//!    reads from the memory tail); time runs from the first append until the replica has applied
//!    (durable + ApplyHook) every entry. Logs are then checked identical (last seq + digest).
//! 4. `walship-128B`: as 3 with 16 spaces, 128-byte entries and lz4: entries/s.
//! 5. `catchup-1` / `catchup-16`: as 3, but the whole log is written before the replica starts,
//!    and time runs from the replica's start until it has applied every entry: a replica catching
//!    up, with no writer sharing the cores (the primary reads the log back from its files, which
//!    the page cache holds, and from its memory tail).
//!
//! Raw quinn runs again at the end (`quinn-again`); ratios are against the better of the two.
//!
//! "Payload" is entry bytes (B per entry) for cases 2-4 and stream bytes for case 1; frame and
//! entry headers are not counted. Besides MB/s, every case reports the CPU it used (`cores`:
//! process CPU time / wall time) and so `MB/cpu-s`, payload per CPU-second: on a 2-core machine
//! shared with other jobs that cost per byte varies far less than MB/s. `others` is the CPU that
//! other processes used during the case (from /proc/stat); a case above 0.25 cores is flagged `!`.
//!
//! Run: `cargo bench --bench ceiling` (options after `--`: `--seconds S` (5), `--bytes N` (1e9),
//! `--entry-bytes B` (4096), `--compression none|lz4|zstd` (none), `--append-chunk N` (64),
//! `--lead-mb M` (32), `--only quinn,tcp,walship-1,walship-16,walship-128B,catchup-1,catchup-16`, `--json PATH`,
//! `--max-unacked-mb M` (the primary's per-space window; default: the product's)).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walship::codec::batch::BatchHeader;
use walship::codec::{BatchDecoder, BatchEncoder, Compression, FrameLimits, BATCH_HEADER_LEN};
use walship::config::{PrimaryConfig, ReplicaConfig, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_ENTRIES};
use walship::entry::{now_us, Entry};
use walship::net::endpoint::{client_endpoint, server_endpoint, TransportSettings};
use walship::net::status::ConnectionState;
use walship::net::tls::{client_crypto, server_crypto, ClusterCa, NodeIdentity};
use walship::payload::PayloadGen;
use walship::wal::{SpaceWal, SyncPolicy};
use walship::{ApplyHook, Epoch, NodeId, Primary, Replica, Seq, SpaceId};

const CHUNK: usize = 64 * 1024;
const SMALL_ENTRY_BYTES: usize = 128;
const GOAL_RATIO: f64 = 0.70;
const GOAL_SMALL_ENTRIES_PER_S: f64 = 1_000_000.0;
/// Cores used by other processes during a case above which its numbers are flagged as disturbed.
const DISTURBED_CORES: f64 = 0.25;

struct Args {
    seconds: f64,
    bytes: u64,
    entry_bytes: usize,
    compression: Compression,
    compression_name: String,
    append_chunk: usize,
    lead_bytes: u64,
    only: Option<Vec<String>>,
    json: Option<String>,
    /// Overrides `PrimaryConfig::max_unacked_bytes` (to see whether that window limits throughput).
    max_unacked_bytes: Option<usize>,
}

impl Args {
    fn parse() -> Args {
        let argv: Vec<String> = std::env::args().collect();
        let get = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
        let num = |name: &str, default: f64| {
            get(name)
                .map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{name}: not a number: {v}")))
                .unwrap_or(default)
        };
        let compression_name = get("--compression").unwrap_or_else(|| "none".into());
        let compression = compression_name.parse::<Compression>().unwrap_or_else(|e| panic!("--compression: {e}"));
        Args {
            seconds: num("--seconds", 5.0),
            bytes: num("--bytes", 1e9) as u64,
            entry_bytes: num("--entry-bytes", 4096.0) as usize,
            compression,
            compression_name,
            append_chunk: (num("--append-chunk", 64.0) as usize).max(1),
            lead_bytes: (num("--lead-mb", 32.0) * 1024.0 * 1024.0) as u64,
            only: get("--only").map(|s| s.split(',').map(str::to_owned).collect()),
            json: get("--json"),
            max_unacked_bytes: get("--max-unacked-mb")
                .map(|v| (v.parse::<f64>().expect("--max-unacked-mb: not a number") * 1024.0 * 1024.0) as usize),
        }
    }

    fn wants(&self, case: &str) -> bool {
        self.only.as_ref().map_or(true, |o| o.iter().any(|c| c == case))
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// One measured case.
struct Outcome {
    case: String,
    detail: String,
    payload_bytes: u64,
    entries: u64,
    elapsed: Duration,
    /// Process CPU time (user + system, all threads) over the measured interval, in seconds.
    cpu_s: f64,
    /// CPU time other processes used meanwhile (user + system of the whole machine minus ours):
    /// what disturbed the measurement.
    others_s: f64,
    notes: Vec<String>,
}

impl Outcome {
    /// Cores kept busy on average: CPU time / wall time (this machine has `nproc` of them).
    fn cores(&self) -> f64 {
        self.cpu_s / self.elapsed.as_secs_f64()
    }
    /// Cores other processes kept busy on average during the measurement.
    fn others(&self) -> f64 {
        self.others_s / self.elapsed.as_secs_f64()
    }
    fn mb_s(&self) -> f64 {
        self.payload_bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    fn entries_s(&self) -> Option<f64> {
        (self.entries > 0).then(|| self.entries as f64 / self.elapsed.as_secs_f64())
    }
}

/// CPU times from procfs, in clock ticks of 1/100 s (Linux's USER_HZ); zeros where procfs is missing.
#[derive(Clone, Copy)]
struct CpuSnap {
    /// user + system time of this process (all threads).
    ours: f64,
    /// user + nice + system time of the whole machine (softirq, where loopback packets are
    /// delivered, is left out: it is mostly ours and not charged to any process).
    machine: f64,
}

impl CpuSnap {
    fn now() -> CpuSnap {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |f: &[&str], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let ours = field(&f, 11) + field(&f, 12);
        let all = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<&str> = all.lines().next().unwrap_or("").split_whitespace().skip(1).collect();
        let machine = field(&cpu, 0) + field(&cpu, 1) + field(&cpu, 2);
        CpuSnap { ours, machine }
    }

    /// Seconds of CPU used since `self` by this process and by everything else.
    fn since(self) -> (f64, f64) {
        let now = CpuSnap::now();
        let ours = (now.ours - self.ours) / 100.0;
        let machine = (now.machine - self.machine) / 100.0;
        (ours, (machine - ours).max(0.0))
    }
}

fn identities() -> (NodeIdentity, NodeIdentity) {
    let ca = ClusterCa::generate("ceiling bench CA").expect("CA");
    (ca.issue("primary").expect("primary identity"), ca.issue("replica-1").expect("replica identity"))
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. raw quinn

async fn raw_quinn(args: &Args) -> Outcome {
    let (server_id, client_id) = identities();
    let settings = TransportSettings::default();
    let server = server_endpoint(loopback(), &server_id, &settings).expect("server endpoint");
    let client = client_endpoint(loopback(), &client_id, &settings).expect("client endpoint");
    let addr = server.local_addr().expect("server addr");

    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.expect("incoming").await.expect("server handshake");
        let mut recv = conn.accept_uni().await.expect("accept_uni");
        let mut bytes = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read_chunk") {
            bytes += chunk.bytes.len() as u64;
        }
        let done = Instant::now();
        conn.close(0u32.into(), b"done");
        server.wait_idle().await;
        (bytes, done)
    });

    let conn = client.connect(addr, "primary").expect("connect").await.expect("client handshake");
    let mut send = conn.open_uni().await.expect("open_uni");
    let mut gen = PayloadGen::new(7, CHUNK);
    let chunk: Bytes = gen.next_payload();
    let deadline = args.deadline();
    let cpu0 = CpuSnap::now();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < args.bytes && start.elapsed() < deadline {
        send.write_chunk(chunk.clone()).await.expect("write_chunk");
        sent += CHUNK as u64;
    }
    send.finish().expect("finish");
    let (received, done) = receiver.await.expect("receiver task");
    let (cpu_s, others_s) = cpu0.since();
    assert_eq!(received, sent, "raw quinn: bytes received != bytes sent");
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    Outcome {
        case: "quinn".into(),
        detail: "raw quinn, 1 uni stream, 64 KiB write_chunk".into(),
        payload_bytes: received,
        entries: 0,
        elapsed: done - start,
        cpu_s,
        others_s,
        notes: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// 2. TCP + rustls

/// Entries per frame walship builds when a space has plenty queued: as many as fit in its batch bounds.
fn full_batch_entries(entry_bytes: usize) -> usize {
    (DEFAULT_MAX_BATCH_BYTES / (entry_bytes + walship::codec::batch::ENTRY_HEADER_LEN))
        .clamp(1, DEFAULT_MAX_BATCH_ENTRIES)
}

/// About 32 MiB of distinct frames of `entry_bytes`-byte entries, encoded as walship would.
fn build_frames(args: &Args, space: &SpaceId) -> (Vec<Bytes>, usize) {
    let per_frame = full_batch_entries(args.entry_bytes);
    let frames = ((32 << 20) / (per_frame * args.entry_bytes)).max(4);
    let mut gen = PayloadGen::new(11, args.entry_bytes);
    let mut enc = BatchEncoder::new(NodeId::from_name("primary"), args.compression);
    let mut seq = 1u64;
    let out = (0..frames)
        .map(|_| {
            let entries: Vec<Entry> = (0..per_frame)
                .map(|i| Entry::new(Seq(seq + i as u64), Epoch(1), now_us(), 1, gen.next_payload()))
                .collect();
            seq += per_frame as u64;
            enc.encode(space, &entries).expect("encode")
        })
        .collect();
    (out, per_frame)
}

async fn tcp_tls(args: &Args) -> Outcome {
    let (server_id, client_id) = identities();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_crypto(&server_id).expect("server crypto")));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_crypto(&client_id).expect("client crypto")));
    let listener = tokio::net::TcpListener::bind(loopback()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let space = SpaceId::new("space-00").unwrap();
    let (frames, per_frame) = build_frames(args, &space);
    let wire_per_frame = frames.iter().map(|f| f.len() as u64).sum::<u64>() as f64 / frames.len() as f64;

    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        let mut tls = acceptor.accept(tcp).await.expect("server TLS handshake");
        let limits = FrameLimits::default();
        let mut decoder = BatchDecoder::new(limits);
        let mut head = [0u8; BATCH_HEADER_LEN];
        let (mut payload_bytes, mut entries) = (0u64, 0u64);
        loop {
            match tls.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("tcp read: {e}"),
            }
            let header = BatchHeader::decode(&head, &limits).expect("batch header");
            let mut payload = BytesMut::zeroed(header.payload_len as usize);
            tls.read_exact(&mut payload).await.expect("read payload");
            let batch = decoder.decode_payload(header, payload.freeze()).expect("decode");
            entries += batch.entries.len() as u64;
            payload_bytes += batch.entries.iter().map(|e| e.payload.len() as u64).sum::<u64>();
        }
        (payload_bytes, entries, Instant::now())
    });

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls::pki_types::ServerName::try_from("primary".to_owned()).expect("server name");
    let mut tls = connector.connect(name, tcp).await.expect("client TLS handshake");
    let deadline = args.deadline();
    let frame_payload = (per_frame * args.entry_bytes) as u64;
    let cpu0 = CpuSnap::now();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut i = 0usize;
    while sent < args.bytes && start.elapsed() < deadline {
        tls.write_all(&frames[i % frames.len()]).await.expect("write frame");
        sent += frame_payload;
        i += 1;
    }
    tls.shutdown().await.expect("shutdown");
    let (received, entries, done) = receiver.await.expect("receiver task");
    let (cpu_s, others_s) = cpu0.since();
    assert_eq!(received, sent, "tcp: payload received != sent");
    Outcome {
        case: "tcp".into(),
        detail: format!("TCP + rustls TLS 1.3, walship frames, {}", args.compression_name),
        payload_bytes: received,
        entries,
        elapsed: done - start,
        cpu_s,
        others_s,
        notes: vec![format!(
            "{per_frame} entries/frame, {:.0} KiB/frame on the wire, frames pre-encoded",
            wire_per_frame / 1024.0
        )],
    }
}

// ---------------------------------------------------------------------------------------------
// 3./4. walship

/// Counts applied entries and remembers when the last run was applied.
struct Applied {
    base: Instant,
    entries: AtomicU64,
    last_ns: AtomicU64,
}

impl ApplyHook for Applied {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.last_ns.fetch_max(self.base.elapsed().as_nanos() as u64, Ordering::Release);
        self.entries.fetch_add(entries.len() as u64, Ordering::Release);
        Box::pin(async {})
    }
}

struct WriterStats {
    entries: u64,
    start_ns: u64,
    elapsed: Duration,
    waited: Duration,
}

struct WalshipCase<'a> {
    name: &'a str,
    spaces: usize,
    entry_bytes: usize,
    compression: Compression,
    compression_name: &'a str,
    /// Write the whole log first, then start the replica and time its catch-up alone (the
    /// writer's own appends no longer share the cores with the transfer).
    catchup: bool,
}

/// Appends `append_chunk` entries at a time, round-robin over `spaces`, for at most `max_bytes` of
/// payload or `deadline`, staying at most `lead_bytes` ahead of what the replica applied.
#[allow(clippy::too_many_arguments)]
fn writer(
    spaces: Vec<SpaceWal>,
    entry_bytes: usize,
    chunk: usize,
    max_bytes: u64,
    deadline: Duration,
    lead_bytes: u64,
    applied: Arc<Applied>,
) -> std::thread::JoinHandle<WriterStats> {
    std::thread::spawn(move || {
        let mut gen = PayloadGen::new(3, entry_bytes);
        let pool_chunks = (4096 / chunk).max(4);
        let pool: Vec<(u8, Bytes)> = (0..pool_chunks * chunk).map(|_| (1u8, gen.next_payload())).collect();
        let lead_entries = (lead_bytes / entry_bytes as u64).max(chunk as u64);
        let max_entries = max_bytes / entry_bytes as u64;
        let start = Instant::now();
        let start_ns = applied.base.elapsed().as_nanos() as u64;
        let (mut written, mut waited, mut i) = (0u64, Duration::ZERO, 0usize);
        while written < max_entries && start.elapsed() < deadline {
            if written.saturating_sub(applied.entries.load(Ordering::Acquire)) > lead_entries {
                let t = Instant::now();
                while written.saturating_sub(applied.entries.load(Ordering::Acquire)) > lead_entries {
                    std::thread::sleep(Duration::from_micros(50));
                }
                waited += t.elapsed();
            }
            let off = (i % pool_chunks) * chunk;
            spaces[i % spaces.len()].append_batch(Epoch(1), &pool[off..off + chunk]).expect("append_batch");
            written += chunk as u64;
            i += 1;
        }
        WriterStats { entries: written, start_ns, elapsed: start.elapsed(), waited }
    })
}

async fn walship_case(args: &Args, c: &WalshipCase<'_>) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let (primary_id, replica_id) = identities();
    let mut pc = PrimaryConfig::new("primary", loopback(), dir.path().join("p"));
    pc.wal.sync = SyncPolicy::Never;
    pc.compression = c.compression;
    if let Some(n) = args.max_unacked_bytes {
        pc.max_unacked_bytes = n;
    }
    let primary = Primary::start(pc, primary_id).await.expect("primary");
    let spaces: Vec<SpaceWal> = (0..c.spaces)
        .map(|i| primary.space(&SpaceId::new(&format!("space-{i:02}")).unwrap()).expect("space"))
        .collect();
    let mut rc = ReplicaConfig::new("replica-1", primary.local_addr(), "primary", dir.path().join("r"));
    rc.wal.sync = SyncPolicy::Never;
    let applied = Arc::new(Applied { base: Instant::now(), entries: AtomicU64::new(0), last_ns: AtomicU64::new(0) });
    let start_replica = || async {
        let replica = Replica::start_with_hook(rc, replica_id, Some(applied.clone())).await.expect("replica");
        let connect_deadline = Instant::now() + Duration::from_secs(10);
        while replica.status().connection != ConnectionState::Connected {
            assert!(Instant::now() < connect_deadline, "replica did not connect");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        replica
    };

    let (replica, cpu0, stats) = if c.catchup {
        // No replica yet, so no lead cap: the writer fills the log as fast as it can.
        let w =
            writer(spaces, c.entry_bytes, args.append_chunk, args.bytes, args.deadline(), u64::MAX, applied.clone());
        let mut stats = tokio::task::spawn_blocking(move || w.join().expect("writer")).await.expect("join");
        let cpu0 = CpuSnap::now();
        stats.start_ns = applied.base.elapsed().as_nanos() as u64;
        (start_replica().await, cpu0, stats)
    } else {
        let replica = start_replica().await;
        let cpu0 = CpuSnap::now();
        let w = writer(
            spaces,
            c.entry_bytes,
            args.append_chunk,
            args.bytes,
            args.deadline(),
            args.lead_bytes,
            applied.clone(),
        );
        let stats = tokio::task::spawn_blocking(move || w.join().expect("writer")).await.expect("join");
        (replica, cpu0, stats)
    };
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    while applied.entries.load(Ordering::Acquire) < stats.entries {
        assert!(Instant::now() < drain_deadline, "replica did not catch up within 120 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (cpu_s, others_s) = cpu0.since();
    let elapsed = Duration::from_nanos(applied.last_ns.load(Ordering::Acquire).saturating_sub(stats.start_ns));

    let p = primary.status();
    let r = replica.status();
    let theirs: BTreeMap<String, (Seq, String)> =
        p.spaces.iter().map(|s| (s.space.as_str().to_owned(), (s.last_seq, s.digest.clone()))).collect();
    let ours: BTreeMap<String, (Seq, String)> =
        r.spaces.iter().map(|s| (s.log.space.as_str().to_owned(), (s.log.last_seq, s.log.digest.clone()))).collect();
    let identical = theirs == ours;
    let wire = p.replicas.first().map(|v| v.bytes_sent).unwrap_or(0);
    let path = p.replicas.first().and_then(|v| v.path.clone());
    replica.shutdown().await;
    primary.shutdown().await;
    drop(dir);

    let payload_bytes = stats.entries * c.entry_bytes as u64;
    let writer_note = if c.catchup {
        format!(
            "log written first ({:.0} MB in {:.2}s, {:.0} entries/s); timed from the replica's start to its last apply",
            payload_bytes as f64 / 1e6,
            stats.elapsed.as_secs_f64(),
            stats.entries as f64 / stats.elapsed.as_secs_f64()
        )
    } else {
        format!(
            "writer: append_batch x{} on its own thread, {:.0} entries/s, waited {:.0}% of {:.2}s on the {} MiB lead cap{}",
            args.append_chunk,
            stats.entries as f64 / stats.elapsed.as_secs_f64(),
            100.0 * stats.waited.as_secs_f64() / stats.elapsed.as_secs_f64(),
            stats.elapsed.as_secs_f64(),
            args.lead_bytes >> 20,
            if stats.waited.as_secs_f64() > 0.2 * stats.elapsed.as_secs_f64() {
                " (so the writer was not the bottleneck)"
            } else {
                " (writer may be the bottleneck)"
            }
        )
    };
    let mut notes = vec![
        writer_note,
        format!(
            "wire: {:.1} MB/s of frames ({:.2}x payload)",
            wire as f64 / elapsed.as_secs_f64() / 1e6,
            wire as f64 / payload_bytes.max(1) as f64
        ),
        format!("logs identical (last seq + digest, {} space(s)): {identical}", c.spaces),
    ];
    if let Some(path) = path {
        notes.push(format!("path: lost packets {}, congestion events {}", path.lost_packets, path.congestion_events));
    }
    assert!(identical, "{}: replica logs differ from the primary's", c.name);
    Outcome {
        case: c.name.into(),
        detail: format!(
            "walship{}, {} space{}, {} B entries, {}",
            if c.catchup { " catch-up of a written log" } else { "" },
            c.spaces,
            if c.spaces == 1 { "" } else { "s" },
            c.entry_bytes,
            c.compression_name
        ),
        payload_bytes,
        entries: stats.entries,
        elapsed,
        cpu_s,
        others_s,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// report

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("unix {}", now_us() / 1_000_000))
}

fn percent(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = cpu_model();
    let when = date();
    let load_before = loadavg();
    println!("ceiling: walship vs raw quinn vs TCP+TLS over 127.0.0.1, one run");
    println!("machine: {nproc} CPUs, {model}; {when}; load average {load_before}");
    println!(
        "each case: at most {:.0} MB of payload or {:.1}s of sending; {} B entries, compression {} \
         (the 128 B case: lz4); QUIC: the product's TransportSettings (congestion {:?}); tokio \
         multi-thread runtime, 2 workers",
        args.bytes as f64 / 1e6,
        args.seconds,
        args.entry_bytes,
        args.compression_name,
        TransportSettings::default().congestion
    );

    let mut results: Vec<Outcome> = Vec::new();
    let mut run = |o: Outcome| {
        println!(
            "  {:<13} {:>9.1} MB/s {:>12} entries/s  ({:.0} MB in {:.2}s, {:.2} cores busy)",
            o.case,
            o.mb_s(),
            o.entries_s().map(|e| format!("{e:.0}")).unwrap_or_else(|| "-".into()),
            o.payload_bytes as f64 / 1e6,
            o.elapsed.as_secs_f64(),
            o.cores()
        );
        results.push(o);
    };
    if args.wants("quinn") {
        run(raw_quinn(&args).await);
    }
    if args.wants("tcp") {
        run(tcp_tls(&args).await);
    }
    let name = args.compression_name.as_str();
    let cases = [
        WalshipCase {
            name: "walship-1",
            spaces: 1,
            entry_bytes: args.entry_bytes,
            compression: args.compression,
            compression_name: name,
            catchup: false,
        },
        WalshipCase {
            name: "walship-16",
            spaces: 16,
            entry_bytes: args.entry_bytes,
            compression: args.compression,
            compression_name: name,
            catchup: false,
        },
        WalshipCase {
            name: "walship-128B",
            spaces: 16,
            entry_bytes: SMALL_ENTRY_BYTES,
            compression: Compression::Lz4,
            compression_name: "lz4",
            catchup: false,
        },
        WalshipCase {
            name: "catchup-1",
            spaces: 1,
            entry_bytes: args.entry_bytes,
            compression: args.compression,
            compression_name: name,
            catchup: true,
        },
        WalshipCase {
            name: "catchup-16",
            spaces: 16,
            entry_bytes: args.entry_bytes,
            compression: args.compression,
            compression_name: name,
            catchup: true,
        },
    ];
    for c in &cases {
        if args.wants(c.name) {
            run(walship_case(&args, c).await);
        }
    }
    if args.wants("quinn") {
        // Once more at the end: the ceiling is the better of the two (other load only slows a run).
        let mut o = raw_quinn(&args).await;
        o.case = "quinn-again".into();
        run(o);
    }
    let load_after = loadavg();

    let best = |f: fn(&Outcome) -> f64| {
        results
            .iter()
            .filter(|o| o.case.starts_with("quinn"))
            .map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    let quinn = best(Outcome::mb_s);
    let quinn_per_cpu = best(|o| o.mb_s() / o.cores());
    let ratio = |o: &Outcome| quinn.map(|q| o.mb_s() / q);
    let ratio_per_cpu = |o: &Outcome| quinn_per_cpu.map(|q| o.mb_s() / o.cores() / q);
    println!();
    println!(
        "{:<13} {:>9} {:>11} {:>8} {:>6} {:>8} {:>8} {:>7}  what",
        "case", "MB/s", "entries/s", "vs quinn", "cores", "MB/cpu-s", "vs quinn", "others"
    );
    for o in &results {
        println!(
            "{:<13} {:>9.1} {:>11} {:>8} {:>6.2} {:>8.0} {:>8} {:>6.2}{}  {}",
            o.case,
            o.mb_s(),
            o.entries_s().map(|e| format!("{e:.0}")).unwrap_or_else(|| "-".into()),
            ratio(o).map(percent).unwrap_or_else(|| "-".into()),
            o.cores(),
            o.mb_s() / o.cores(),
            ratio_per_cpu(o).map(percent).unwrap_or_else(|| "-".into()),
            o.others(),
            if o.others() > DISTURBED_CORES { "!" } else { " " },
            o.detail
        );
        for n in &o.notes {
            println!("{:<13} {:>67}    {n}", "", "");
        }
    }
    println!(
        "MB = 10^6 bytes of entry payload (raw quinn: stream bytes). vs quinn = against the better \
         raw quinn run. cores = this process's CPU time / wall time (of {nproc}). MB/cpu-s = payload \
         per CPU-second: the cost per byte, less sensitive to other load than MB/s. others = cores \
         other processes used meanwhile; '!' above {DISTURBED_CORES}: that case was disturbed, rerun."
    );
    println!();
    println!("goals (reported, not asserted):");
    let mut goals = serde_json::Map::new();
    for case in ["walship-1", "walship-16"] {
        if let Some(r) = results.iter().find(|o| o.case == case).and_then(ratio) {
            let met = r >= GOAL_RATIO;
            println!(
                "  {case} >= {} of raw quinn with {} B entries: {} -> {}",
                percent(GOAL_RATIO),
                args.entry_bytes,
                percent(r),
                if met { "met" } else { "NOT met" }
            );
            goals.insert(
                format!("{case}_ratio_to_quinn"),
                serde_json::json!({ "goal": GOAL_RATIO, "value": r, "met": met }),
            );
        }
    }
    if let Some(e) = results.iter().find(|o| o.case == "walship-128B").and_then(Outcome::entries_s) {
        let met = e >= GOAL_SMALL_ENTRIES_PER_S;
        println!(
            "  walship-128B >= {:.0} entries/s durable on the replica: {e:.0} -> {}",
            GOAL_SMALL_ENTRIES_PER_S,
            if met { "met" } else { "NOT met" }
        );
        goals.insert(
            "walship_128B_entries_per_s".into(),
            serde_json::json!({ "goal": GOAL_SMALL_ENTRIES_PER_S, "value": e, "met": met }),
        );
    }
    let disturbed: Vec<&str> =
        results.iter().filter(|o| o.others() > DISTURBED_CORES).map(|o| o.case.as_str()).collect();
    println!(
        "load average before {load_before}, after {load_after}; disturbed by other processes: {}",
        if disturbed.is_empty() {
            "none".to_owned()
        } else {
            disturbed.join(", ") + " (rerun when the machine is quiet)"
        }
    );

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "bench": "ceiling",
            "date": when,
            "machine": { "nproc": nproc, "cpu": model, "loadavg_before": load_before, "loadavg_after": load_after },
            "settings": {
                "seconds": args.seconds,
                "max_bytes": args.bytes,
                "entry_bytes": args.entry_bytes,
                "compression": args.compression_name,
                "append_chunk": args.append_chunk,
                "lead_bytes": args.lead_bytes,
                "max_unacked_bytes": args.max_unacked_bytes,
                "quic_congestion": format!("{:?}", TransportSettings::default().congestion),
            },
            "cases": results.iter().map(|o| serde_json::json!({
                "case": o.case,
                "what": o.detail,
                "payload_bytes": o.payload_bytes,
                "entries": o.entries,
                "seconds": o.elapsed.as_secs_f64(),
                "cpu_seconds": o.cpu_s,
                "cores_busy": o.cores(),
                "mb_per_cpu_s": o.mb_s() / o.cores(),
                "other_processes_cores": o.others(),
                "disturbed": o.others() > DISTURBED_CORES,
                "ratio_to_quinn_per_cpu": ratio_per_cpu(o),
                "mb_per_s": o.mb_s(),
                "entries_per_s": o.entries_s(),
                "ratio_to_quinn": ratio(o),
                "notes": o.notes,
            })).collect::<Vec<_>>(),
            "goals": goals,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json).expect("json")).expect("write --json");
        println!("wrote {path}");
    }
}
