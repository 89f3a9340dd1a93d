//! Load test over a lossy link: a primary and N replicas with the link simulator between them,
//! writes at a given rate across many spaces, then verifies every replica's logs and reports
//! throughput, append latency, replication lag and QUIC path statistics.
//!
//! ```text
//! cargo run --release --example loadtest -- --replicas 2 --spaces 64 --rate 20000 --entry-bytes 128 \
//!     --duration 30s --compression lz4 --loss 2% --delay 20ms --seed 1 --report-json report.json
//! ```
//! `--link sim` (default) runs everything in one process on the in-memory link simulator; `--link udp`
//! puts a `lossy_link` forwarder on real 127.0.0.1 sockets between the primary and each replica.
//! `--single-stream` multiplexes every space onto one stream, to measure head-of-line blocking.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use walship::codec::Compression;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::entry::{now_us, Entry};
use walship::net::endpoint::{client_config, server_config, TransportSettings};
use walship::net::tls::ClusterCa;
use walship::netsim::{self, Impairment, SimNetwork};
use walship::wal::SpaceWal;
use walship::{ApplyHook, Epoch, Primary, Replica, SpaceId};

#[derive(Parser, Debug, Clone)]
#[command(about = "walship load test over a simulated lossy link, with verification and a JSON report")]
struct Args {
    /// Number of replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Number of memory spaces.
    #[arg(long, default_value_t = 64)]
    spaces: usize,
    /// Entries per second written, or `max` for as fast as possible.
    #[arg(long, default_value = "20000", value_parser = parse_write_rate)]
    rate: u64,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128)]
    entry_bytes: usize,
    /// How long to write.
    #[arg(long, default_value = "30s", value_parser = netsim::parse_duration)]
    duration: Duration,
    /// Leave the entries appended during this first part of the run out of the latency and lag
    /// percentiles (they are still written, counted and verified). A fresh connection spends a few
    /// round trips in slow start, which at high rates over long RTTs shows up as a one-off lag spike
    /// that dominates the p99 of a short run; use e.g. `--warmup 2s` to measure the steady state.
    #[arg(long, default_value = "0s", value_parser = netsim::parse_duration)]
    warmup: Duration,
    /// Batch compression: none, lz4, zstd, zstd:LEVEL.
    #[arg(long, default_value = "lz4")]
    compression: Compression,
    /// WAL durability on every node: never, always, interval:10ms.
    #[arg(long, default_value = "never", value_parser = common::parse_sync)]
    sync: walship::wal::SyncPolicy,
    #[command(flatten)]
    impair: common::ImpairmentFlags,
    /// Bandwidth cap of the link, each direction (e.g. 100mbit).
    #[arg(long, value_parser = netsim::parse_rate)]
    link_rate: Option<u64>,
    /// Cut the link this long after the start...
    #[arg(long, value_parser = netsim::parse_duration)]
    partition_at: Option<Duration>,
    /// ... for this long.
    #[arg(long, default_value = "2s", value_parser = netsim::parse_duration)]
    partition_for: Duration,
    /// Where the link is simulated: `sim` (in process) or `udp` (forwarders on real sockets).
    #[arg(long, default_value = "sim")]
    link: String,
    /// Congestion controller: cubic, newreno or bbr.
    #[arg(long, default_value = "bbr")]
    congestion: walship::net::endpoint::CongestionControl,
    /// Congestion window of a new connection (e.g. 1MB); default: quinn's (240 KB with BBR). With a
    /// high --rate and a long --delay, the default shows up as a lag spike while the window grows.
    #[arg(long, value_parser = common::parse_bytes)]
    initial_window: Option<u64>,
    /// Wait this long for more entries before a batch closes (default: none).
    #[arg(long, value_parser = netsim::parse_duration)]
    linger: Option<Duration>,
    /// Multiplex every space onto one stream (head-of-line comparison).
    #[arg(long)]
    single_stream: bool,
    /// Run the nodes as separate `primary` and `replica` processes (the example binaries, built with
    /// `cargo build --release --examples`), with a `lossy_link` forwarder in front of each replica;
    /// verification reads their `--status-file`s. Lag is then sampled from the primary's status.
    #[arg(long)]
    processes: bool,
    /// Where the `primary` and `replica` binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seed of the link simulator and the payloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest wait for convergence after writes stop.
    #[arg(long, default_value = "120s", value_parser = netsim::parse_duration)]
    converge_timeout: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// No progress bar (for logs and CI).
    #[arg(long)]
    quiet: bool,
}

/// CPU seconds this process has used (user + system), from /proc/self/stat; `None` off Linux.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are the 14th and 15th fields.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Flag combinations that could not give a meaningful run, refused before anything starts: nothing
/// to replicate, a partition after the end, a report that could not be written, or a warm-up as
/// long as the run (nothing would be timed, and every percentile would read 0).
fn check_args(args: &Args) -> Result<(), String> {
    if args.duration.is_zero() {
        return Err("--duration must be > 0".into());
    }
    if args.spaces == 0 || args.replicas == 0 {
        return Err("--spaces and --replicas must be at least 1: nothing would be replicated or verified".into());
    }
    if let Some(at) = args.partition_at {
        if at >= args.duration || args.partition_for.is_zero() {
            return Err(format!(
                "--partition-at {at:?} must be before the end of --duration {:?}, with a non-zero --partition-for",
                args.duration
            ));
        }
    }
    if let Some(path) = &args.report_json {
        // Fail now, not after the whole run.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot write --report-json {}: {e}", path.display()))?;
    }
    if args.warmup >= args.duration {
        return Err(format!(
            "--warmup {:?} must be shorter than --duration {:?}: nothing would be timed",
            args.warmup, args.duration
        ));
    }
    Ok(())
}

/// What a report needs to be compared with another machine's: versions, OS, CPUs.
struct System {
    walship: &'static str,
    os: String,
    cpus: usize,
    cpu_model: Option<String>,
}

fn system() -> System {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
    });
    System {
        walship: env!("CARGO_PKG_VERSION"),
        os: match kernel {
            Some(k) => format!("{} {k}", std::env::consts::OS),
            None => std::env::consts::OS.to_string(),
        },
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
    }
}

fn system_json() -> serde_json::Value {
    let s = system();
    json!({ "walship": s.walship, "os": s.os, "cpus": s.cpus, "cpu_model": s.cpu_model })
}

fn system_line() -> String {
    let s = system();
    format!("walship {}, {}, {} CPUs ({})", s.walship, s.os, s.cpus, s.cpu_model.as_deref().unwrap_or("model unknown"))
}

fn parse_write_rate(s: &str) -> Result<u64, String> {
    match s {
        "max" => Ok(0),
        // 0 stands for `max` inside; said out loud, it is more likely a slip (and `max` with
        // large entries writes gigabytes).
        "0" => Err("--rate 0: write `max` for as fast as possible".into()),
        _ => s.parse().map_err(|_| format!("bad rate {s:?}: entries per second, or `max`")),
    }
}

/// Per-replica lag: for every entry applied (durable) on the replica, how long since its append.
struct LagRecorder {
    hist: Mutex<Histogram<u64>>,
    entries: AtomicU64,
    bytes: AtomicU64,
    /// Entries appended before this time (µs since the epoch, `--warmup`) are counted, not timed.
    timed_from_us: AtomicU64,
}

impl LagRecorder {
    fn new() -> Arc<LagRecorder> {
        Arc::new(LagRecorder {
            hist: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            timed_from_us: AtomicU64::new(0),
        })
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

/// Starts a `lossy_link` forwarder to `upstream` on 127.0.0.1 for replica `name` (seeded from
/// `seed` and the name), adds its control to `controls` and returns the address to dial.
fn start_forwarder(
    upstream: SocketAddr,
    imp: Impairment,
    seed: u64,
    name: &str,
    controls: &mut Vec<netsim::forwarder::ForwarderControl>,
) -> std::io::Result<SocketAddr> {
    let fwd = netsim::forwarder::Forwarder::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream,
        imp,
        imp,
        netsim::model::derive_seed(seed, name.as_bytes()),
    )?;
    controls.push(fwd.control());
    let addr = fwd.local_addr();
    tokio::spawn(fwd.run(std::future::pending::<()>()));
    Ok(addr)
}

/// The link: how a partition is switched on and off.
enum Link {
    Sim(SimNetwork),
    Udp(Vec<netsim::forwarder::ForwarderControl>),
}

impl Link {
    /// Cuts or heals the link as `--partition-at/--partition-for` say at `elapsed`; returns the
    /// line to print when that changed it.
    fn follow_partition(&self, args: &Args, elapsed: Duration, partitioned: &mut bool) -> Option<String> {
        let at = args.partition_at?;
        let want = elapsed >= at && elapsed < at + args.partition_for;
        if want == *partitioned {
            return None;
        }
        self.partition(want);
        *partitioned = want;
        Some(format!("[{:>6.1}s] link {}", elapsed.as_secs_f64(), if want { "partitioned" } else { "healed" }))
    }

    fn partition(&self, on: bool) {
        match self {
            Link::Sim(net) => net.partition_all(on),
            Link::Udp(ctls) => ctls.iter().for_each(|c| c.set_partitioned(on)),
        }
    }

    fn stats(&self) -> netsim::LinkStats {
        match self {
            Link::Sim(net) => net.stats(),
            Link::Udp(ctls) => {
                let mut all = netsim::LinkStats::default();
                for c in ctls {
                    let s = c.stats();
                    all.merge(&s.up);
                    all.merge(&s.down);
                }
                all
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::init_tracing_with("error");
    common::raise_fd_limit();
    let args = Args::parse();
    let processes = args.processes;
    match processes {
        true => common::exit_with_verdict("loadtest", processes::run(args)).await,
        false => common::exit_with_verdict("loadtest", run(args)).await,
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    check_args(&args)?;
    let imp = args.impair.impairment(args.link_rate, None);
    imp.validate()?;
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::generate("loadtest CA")?;
    let settings = TransportSettings {
        congestion: args.congestion,
        initial_window: args.initial_window,
        ..TransportSettings::default()
    };
    let mut pcfg = PrimaryConfig::new("primary", "127.0.0.1:0".parse()?, dir.path().join("primary"));
    pcfg.compression = args.compression;
    pcfg.wal.sync = args.sync;
    pcfg.single_stream = args.single_stream;
    pcfg.transport = settings.clone();
    pcfg.linger = args.linger;
    let primary_id = ca.issue("primary")?;

    let names: Vec<String> = (1..=args.replicas).map(|i| format!("replica-{i}")).collect();
    let lags: Vec<Arc<LagRecorder>> = names.iter().map(|_| LagRecorder::new()).collect();
    let mut replicas = Vec::new();
    let (primary, link) = match args.link.as_str() {
        "sim" => {
            let net = SimNetwork::new(args.seed);
            net.set_default(imp);
            let paddr: SocketAddr = "127.0.0.1:7000".parse()?;
            let ep = netsim::sim_endpoint(
                &net,
                paddr,
                Some(server_config(&primary_id, &settings)?),
                Some(client_config(&primary_id, &settings)?),
            )?;
            let primary = Primary::with_endpoint(pcfg, ep).await?;
            for (i, name) in names.iter().enumerate() {
                let id = ca.issue(name)?;
                let ep = netsim::sim_endpoint(
                    &net,
                    SocketAddr::from(([127, 0, 0, 1], 7001 + i as u16)),
                    None,
                    Some(client_config(&id, &settings)?),
                )?;
                let mut rcfg = ReplicaConfig::new(name, paddr, "primary", dir.path().join(name));
                rcfg.wal.sync = args.sync;
                replicas.push(Replica::with_endpoint(rcfg, ep, Some(lags[i].clone())).await?);
            }
            (primary, Link::Sim(net))
        }
        "udp" => {
            let primary = Primary::start(pcfg, primary_id).await?;
            let mut ctls = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let addr = start_forwarder(primary.local_addr(), imp, args.seed, name, &mut ctls)?;
                let mut rcfg = ReplicaConfig::new(name, addr, "primary", dir.path().join(name));
                rcfg.wal.sync = args.sync;
                rcfg.transport = settings.clone();
                replicas.push(Replica::start_with_hook(rcfg, ca.issue(name)?, Some(lags[i].clone())).await?);
            }
            (primary, Link::Udp(ctls))
        }
        other => return Err(format!("unknown --link {other:?}: use sim or udp").into()),
    };

    let spaces: Vec<SpaceWal> =
        common::space_names(args.spaces).iter().map(|s| primary.space(s)).collect::<Result<_, _>>()?;
    println!(
        "loadtest: {} replicas, {} spaces, {} entries/s of {} bytes for {:?}, {:?}, {} streams, link {} [{}], seed {}",
        args.replicas,
        args.spaces,
        if args.rate == 0 { "max".to_string() } else { args.rate.to_string() },
        args.entry_bytes,
        args.duration,
        args.compression,
        if args.single_stream { "one multiplexed" } else { "per-space" },
        args.link,
        imp,
        args.seed
    );
    if !args.warmup.is_zero() {
        println!("warm-up: entries appended in the first {:?} are verified but not timed", args.warmup);
    }

    // Writer thread: paced appends, each timed once the warm-up is over.
    let stop = Arc::new(AtomicBool::new(false));
    let timed_from_us = now_us() + args.warmup.as_micros() as u64;
    for lag in &lags {
        lag.timed_from_us.store(timed_from_us, Ordering::Relaxed);
    }
    let plan = common::WriterPlan {
        spaces,
        epoch: Epoch(1),
        rate: args.rate,
        entry_bytes: args.entry_bytes,
        total: None,
        seed: args.seed,
        time_appends_after: Some(args.warmup),
    };
    let (writer_stats, writer) = common::spawn_writer(plan, stop.clone());
    let written = &writer_stats.written;

    let cpu_start = cpu_seconds();
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(args.duration.as_millis() as u64) };
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")?);
    let started = Instant::now();
    let mut partitioned = false;
    let mut last = (Instant::now(), 0u64);
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(line) = link.follow_partition(&args, started.elapsed(), &mut partitioned) {
            // A hidden bar (`--quiet`) prints nothing; the events still belong in the log.
            match args.quiet {
                true => println!("{line}"),
                false => bar.println(line),
            }
        }
        let n = written.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), n);
        let status = primary.status();
        let lag: Vec<String> = status
            .replicas
            .iter()
            .map(|r| format!("{} {:?} lag {}e/{}ms", r.name, r.state, r.max_lag.entries, r.max_lag.ms))
            .collect();
        bar.set_position(started.elapsed().as_millis() as u64);
        bar.set_message(format!("written {n} ({rate:.0}/s) | {}", lag.join(" | ")));
    }
    if partitioned {
        link.partition(false);
    }
    stop.store(true, Ordering::Relaxed);
    let append_hist = writer.join().map_err(|_| "writer panicked")??.unwrap_or_else(common::append_histogram);
    let write_time = started.elapsed();
    let entries_written = written.load(Ordering::Relaxed);
    bar.finish_and_clear();
    println!(
        "writes stopped after {:.1}s: {entries_written} entries; waiting for convergence ...",
        write_time.as_secs_f64()
    );

    // Converge: every replica holds every space with the primary's last sequence and digest.
    let stop_at = Instant::now();
    let converged = loop {
        let p = primary.status();
        let all = replicas.iter().all(|r| {
            let rs = r.status();
            p.spaces.iter().all(|ps| rs.log(&ps.space).is_some_and(|x| x.same_log(ps)))
        });
        if all {
            break Some(stop_at.elapsed());
        }
        if stop_at.elapsed() > args.converge_timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Identical logs can still trail in what is durable and applied (under a sync interval, by up
    // to one interval): the delivered counts and lags are read once every entry has arrived.
    while converged.is_some()
        && lags.iter().any(|l| l.entries.load(Ordering::Relaxed) < entries_written)
        && stop_at.elapsed() <= args.converge_timeout
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total_time = started.elapsed();
    let cpu = cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a);

    // Verify and report.
    let p = primary.status();
    let mut differences = Vec::new();
    for r in &replicas {
        let rs = r.status();
        for ps in &p.spaces {
            match rs.log(&ps.space) {
                Some(x) if x.same_log(ps) => {}
                Some(x) => differences.push(format!(
                    "{} {}: last_seq {} digest {} (primary {} {})",
                    rs.name, ps.space, x.last_seq, x.digest, ps.last_seq, ps.digest
                )),
                None => differences.push(format!("{} {}: missing", rs.name, ps.space)),
            }
        }
    }
    for (name, lag) in names.iter().zip(&lags) {
        let applied = lag.entries.load(Ordering::Relaxed);
        if applied != entries_written {
            differences.push(format!("{name}: {applied} entries applied of {entries_written} written"));
        }
    }
    let verified = differences.is_empty() && converged.is_some();
    let secs = total_time.as_secs_f64();
    let delivered_entries = lags.iter().map(|l| l.entries.load(Ordering::Relaxed)).min().unwrap_or(0);
    let delivered_bytes = lags.iter().map(|l| l.bytes.load(Ordering::Relaxed)).min().unwrap_or(0);
    // Over every connection of the run (a partition makes new ones), all replicas together.
    let frame_bytes: u64 = p.replicas.iter().map(|r| r.totals.bytes_sent).sum();
    let udp_tx: u64 = p.replicas.iter().map(|r| r.totals.udp_tx_bytes).sum();
    let entries_sent: u64 = p.replicas.iter().map(|r| r.totals.entries_sent).sum();
    let batches_sent: u64 = p.replicas.iter().map(|r| r.totals.batches_sent).sum();
    // Batch payloads before compression (each entry with its 17-byte header) and as sent.
    let raw_frame_bytes = entries_sent * (args.entry_bytes as u64 + 17);
    let sent_payload = frame_bytes.saturating_sub(batches_sent * walship::codec::batch::BATCH_HEADER_LEN as u64);
    let ratio = |num: u64, den: u64| if den > 0 { num as f64 / den as f64 } else { 0.0 };
    let q = |h: &Histogram<u64>, q: f64, div: f64| h.value_at_quantile(q) as f64 / div;
    let replicas_json: Vec<_> = names
        .iter()
        .zip(&lags)
        .map(|(name, lag)| {
            let h = lag.hist.lock().unwrap_or_else(|e| e.into_inner());
            let view = p.replicas.iter().find(|r| &r.name == name);
            json!({
                "name": name,
                "entries": lag.entries.load(Ordering::Relaxed),
                "lag_ms": { "p50": q(&h, 0.5, 1e3), "p99": q(&h, 0.99, 1e3), "p999": q(&h, 0.999, 1e3), "max": h.max() as f64 / 1e3 },
                "reconnects": view.map(|v| v.reconnects),
                "state": view.map(|v| v.state),
                "path": view.and_then(|v| v.path.clone()).map(|mut path| {
                    // Lost packets, congestion events and bytes of every connection of the run.
                    let t = view.map(|v| v.totals).unwrap_or_default();
                    (path.lost_packets, path.congestion_events) = (t.lost_packets, t.congestion_events);
                    (path.udp_tx_bytes, path.udp_rx_bytes) = (t.udp_tx_bytes, t.udp_rx_bytes);
                    path
                }),
            })
        })
        .collect();
    let link_stats = link.stats();
    let report = json!({
        "verified": verified,
        "differences": differences,
        "entries_written": entries_written,
        "delivered": { "entries": delivered_entries, "payload_bytes": delivered_bytes },
        "throughput": {
            "entries_per_s": delivered_entries as f64 / secs,
            "payload_mb_per_s": delivered_bytes as f64 / secs / 1e6,
            "wire_mb_per_s": udp_tx as f64 / secs / 1e6,
            "wire_mb_per_s_per_replica": udp_tx as f64 / secs / 1e6 / names.len().max(1) as f64,
            "bases": "entries_per_s and payload_mb_per_s: delivered to each replica (the slowest one); wire_mb_per_s: UDP bytes the primary sent to all replicas together",
        },
        "compression": {
            "codec": args.compression,
            // Entries' bytes (with their headers) over frame bytes: batch headers count, so small
            // batches read below 1 even when compressed.
            "ratio": ratio(raw_frame_bytes, frame_bytes),
            // Batch payloads before and after compression: what the codec itself achieved.
            "payload_ratio": ratio(raw_frame_bytes, sent_payload),
            "entries_per_batch": ratio(entries_sent, batches_sent),
        },
        "append_latency_us": {
            "p50": q(&append_hist, 0.5, 1e3), "p99": q(&append_hist, 0.99, 1e3), "p999": q(&append_hist, 0.999, 1e3), "max": append_hist.max() as f64 / 1e3,
        },
        "converge_ms": converged.map(|d| d.as_secs_f64() * 1e3),
        "cpu": {
            "seconds": cpu,
            "cores": cpu.map(|c| c / secs),
            "us_per_entry": cpu.map(|c| c * 1e6 / entries_written.max(1) as f64),
            "note": "whole process: primary, replicas and link simulator together",
        },
        "replicas": replicas_json,
        "link": {
            "mode": args.link, "impairment": imp.to_string(), "packets": link_stats.packets, "dropped": link_stats.dropped(),
            "duplicated": link_stats.duplicated, "reordered": link_stats.reordered,
            "overtaking": link_stats.overtaking,
        },
        "config": {
            "replicas": args.replicas, "spaces": args.spaces, "rate": args.rate, "entry_bytes": args.entry_bytes,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(), "single_stream": args.single_stream,
            "seed": args.seed, "congestion": args.congestion, "initial_window": args.initial_window,
            "sync": format!("{:?}", args.sync),
        },
        "elapsed_s": secs,
        "system": system_json(),
    });

    println!("\n== walship load test report ==");
    println!("system:            {}", system_line());
    println!(
        "verified:          {}",
        if verified {
            "true (every replica's logs identical to the primary's, each entry applied once)".to_string()
        } else {
            format!("FALSE: {} differences", differences.len())
        }
    );
    for d in differences.iter().take(10) {
        println!("  {d}");
    }
    println!(
        "entries written:   {entries_written} in {:.1}s; delivered per replica: {delivered_entries} ({:.1} MB payload)",
        write_time.as_secs_f64(),
        delivered_bytes as f64 / 1e6
    );
    println!(
        "throughput:        {:.0} entries/s, {:.2} MB/s payload per replica; {:.2} MB/s on the wire to {} replica(s)",
        report["throughput"]["entries_per_s"].as_f64().unwrap_or(0.0),
        report["throughput"]["payload_mb_per_s"].as_f64().unwrap_or(0.0),
        report["throughput"]["wire_mb_per_s"].as_f64().unwrap_or(0.0),
        names.len()
    );
    println!(
        "compression:       {:?}, entry bytes / frame bytes {:.2}, payload before / after the codec {:.2}, {:.1} entries per batch",
        args.compression,
        report["compression"]["ratio"].as_f64().unwrap_or(0.0),
        report["compression"]["payload_ratio"].as_f64().unwrap_or(0.0),
        report["compression"]["entries_per_batch"].as_f64().unwrap_or(0.0)
    );
    println!(
        "append latency:    p50 {:.2} us, p99 {:.2} us, p999 {:.2} us",
        q(&append_hist, 0.5, 1e3),
        q(&append_hist, 0.99, 1e3),
        q(&append_hist, 0.999, 1e3)
    );
    for r in &replicas_json {
        println!(
            "{}:         lag p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms; reconnects {}; lost packets {}, congestion events {}, rtt {:.2} ms",
            r["name"].as_str().unwrap_or(""),
            r["lag_ms"]["p50"].as_f64().unwrap_or(0.0),
            r["lag_ms"]["p99"].as_f64().unwrap_or(0.0),
            r["lag_ms"]["p999"].as_f64().unwrap_or(0.0),
            r["lag_ms"]["max"].as_f64().unwrap_or(0.0),
            r["reconnects"],
            r["path"]["lost_packets"],
            r["path"]["congestion_events"],
            r["path"]["rtt_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "converged after:   {}",
        converged
            .map_or("did not converge".into(), |d| format!("{:.0} ms after writes stopped", d.as_secs_f64() * 1e3))
    );
    println!("link:              {} [{}]: {link_stats}", args.link, imp);
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    for r in replicas {
        r.shutdown().await;
    }
    primary.shutdown().await;
    Ok(verified)
}

/// `--processes`: the same load test against the example binaries running as separate processes.
mod processes {
    /// How often the nodes rewrite their status files, and this tool reads them.
    const STATUS_EVERY: Duration = Duration::from_millis(100);
    use std::process::{Child, Command, Stdio};

    use serde_json::Value;

    use super::*;

    struct Node {
        name: String,
        child: Child,
        status: PathBuf,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            // SIGTERM for a clean shutdown; the binaries also survive SIGKILL, which follows if needed.
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            let _ = Command::new("kill").arg(self.child.id().to_string()).status();
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Node {
        /// An error if the process has exited: nothing will change any more.
        fn check_running(&mut self) -> Result<(), String> {
            match self.child.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => Err(format!("{} exited early ({status})", self.name)),
                Err(e) => Err(format!("{}: {e}", self.name)),
            }
        }
    }

    /// Sleeps `d`, or fails on SIGINT/SIGTERM (the caller's `Node`s are then dropped, which stops
    /// the child processes, instead of leaving them running).
    async fn nap(d: Duration, signal: &mut Pin<Box<impl Future<Output = ()>>>) -> Result<(), String> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = signal.as_mut() => Err("interrupted; stopping the nodes".into()),
        }
    }

    fn read(path: &PathBuf) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// (space, last_seq, digest) of every space in a status file.
    fn logs(v: &Value) -> Vec<(String, u64, String)> {
        let mut out: Vec<_> = v["spaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["space"].as_str().unwrap_or_default().to_string(),
                            s["last_seq"].as_u64().unwrap_or(0),
                            s["digest"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn free_port() -> std::io::Result<u16> {
        Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    pub async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
        let imp = args.impair.impairment(args.link_rate, None);
        imp.validate()?;
        let bin_dir = match &args.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?.parent().ok_or("no folder for the binaries")?.to_path_buf(),
        };
        for bin in ["primary", "replica"] {
            if !bin_dir.join(bin).exists() {
                return Err(format!(
                    "{} not found: build the binaries with `cargo build --release --examples` or pass --bin-dir",
                    bin_dir.join(bin).display()
                )
                .into());
            }
        }
        check_args(&args)?;
        if args.rate == 0 {
            return Err("--processes needs a finite --rate (the primary binary's writer is paced)".into());
        }
        let dir = tempfile::tempdir()?;
        let names: Vec<String> = (1..=args.replicas).map(|i| format!("replica-{i}")).collect();
        let mut all: Vec<&str> = vec!["primary"];
        all.extend(names.iter().map(String::as_str));
        ClusterCa::generate("loadtest CA")?.write_dir(&dir.path().join("certs"), &all)?;
        let certs = dir.path().join("certs");
        let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
        let paddr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let congestion = format!("{:?}", args.congestion).to_lowercase();
        let sync = common::sync_flag(args.sync);
        let compression = args.compression.to_string();
        let spawn = |name: &str, bin: &str, extra: Vec<String>| -> std::io::Result<Node> {
            let status = dir.path().join(format!("{name}.json"));
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let mut cmd = Command::new(bin_dir.join(bin));
            cmd.args(["--data", &dir.path().join(name).to_string_lossy(), "--certs", &certs.to_string_lossy()])
                .args(["--name", name, "--status-file", &status.to_string_lossy(), "--sync", &sync])
                .args(["--status-every", &format!("{}ms", STATUS_EVERY.as_millis())])
                .args(["--congestion", &congestion])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            Ok(Node { name: name.to_string(), child: cmd.spawn()?, status })
        };
        let mut pextra = vec![
            "--listen".to_string(),
            paddr.to_string(),
            "--spaces".into(),
            args.spaces.to_string(),
            "--rate".into(),
            args.rate.to_string(),
            "--entry-bytes".into(),
            args.entry_bytes.to_string(),
            "--total".into(),
            total.to_string(),
            "--compression".into(),
            compression,
            "--seed".into(),
            args.seed.to_string(),
        ];
        if args.single_stream {
            pextra.push("--single-stream".into());
        }
        if let Some(w) = args.initial_window {
            pextra.extend(["--initial-window".into(), w.to_string()]);
        }
        let mut signal = Box::pin(common::shutdown_signal());
        let mut primary = spawn("primary", "primary", pextra)?;
        let mut controls = Vec::new();
        let mut replicas = Vec::new();
        for name in &names {
            let addr = start_forwarder(paddr, imp, args.seed, name, &mut controls)?;
            replicas.push(spawn(name, "replica", vec!["--primary".into(), addr.to_string()])?);
        }
        let link = Link::Udp(controls);
        println!(
            "loadtest --processes: primary pid {} on {paddr}, {} replica processes behind lossy_link forwarders [{imp}], {total} entries at {} entries/s",
            primary.child.id(),
            replicas.len(),
            args.rate
        );

        // Sample the lag the primary reports for each replica (in its status file, rewritten every
        // STATUS_EVERY) while the primary's writer runs.
        let mut lag: Vec<Histogram<u64>> =
            names.iter().map(|_| Histogram::new_with_bounds(1, 3_600_000, 3)).collect::<Result<_, _>>()?;
        let started = Instant::now();
        let mut partitioned = false;
        let written = |v: &Value| logs(v).iter().map(|l| l.1).sum::<u64>();
        loop {
            nap(STATUS_EVERY, &mut signal).await?;
            primary.check_running()?;
            for r in replicas.iter_mut() {
                r.check_running()?;
            }
            let el = started.elapsed();
            if let Some(line) = link.follow_partition(&args, el, &mut partitioned) {
                println!("{line}");
            }
            let Some(p) = read(&primary.status) else { continue };
            for (i, name) in names.iter().enumerate() {
                let r = p["replicas"].as_array().and_then(|a| a.iter().find(|r| r["name"] == name.as_str()));
                if let Some(ms) = r.and_then(|r| r["max_lag"]["ms"].as_u64()).filter(|_| el >= args.warmup) {
                    lag[i].saturating_record(ms.max(1));
                }
            }
            if written(&p) >= total || el > args.duration * 3 + Duration::from_secs(30) {
                break;
            }
        }
        if partitioned {
            link.partition(false);
        }
        let write_time = started.elapsed();
        println!("writes done after {:.1}s; waiting for convergence ...", write_time.as_secs_f64());
        let stop_at = Instant::now();
        let converged = loop {
            let p = read(&primary.status).map(|v| logs(&v)).unwrap_or_default();
            let same = replicas.iter().all(|r| read(&r.status).map(|v| logs(&v)) == Some(p.clone()));
            if same && p.iter().map(|l| l.1).sum::<u64>() >= total {
                break Some(stop_at.elapsed());
            }
            if stop_at.elapsed() > args.converge_timeout {
                break None;
            }
            nap(STATUS_EVERY, &mut signal).await?;
        };
        let secs = started.elapsed().as_secs_f64();
        let p = read(&primary.status).unwrap_or(Value::Null);
        let plogs = logs(&p);
        let mut differences = Vec::new();
        let mut replicas_json = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let rlogs = read(&r.status).map(|v| logs(&v)).unwrap_or_default();
            for pl in &plogs {
                if !rlogs.contains(pl) {
                    differences.push(format!("{} {}: differs from the primary's {} {}", r.name, pl.0, pl.1, pl.2));
                }
            }
            let view = p["replicas"].as_array().and_then(|a| a.iter().find(|x| x["name"] == r.name.as_str())).cloned();
            let h = &lag[i];
            replicas_json.push(json!({
                "name": r.name,
                "lag_ms": { "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999), "max": h.max() },
                "lag_source": format!("primary status, sampled every {} ms", STATUS_EVERY.as_millis()),
                "delivered_entries": rlogs.iter().map(|l| l.1).sum::<u64>(),
                "totals": view.as_ref().map(|v| v["totals"].clone()),
                "reconnects": view.as_ref().map(|v| v["reconnects"].clone()),
                "path": view.as_ref().map(|v| v["path"].clone()),
            }));
        }
        let verified = differences.is_empty() && converged.is_some();
        // What the slowest replica holds, and what the primary sent over every connection.
        let entries = replicas_json.iter().filter_map(|r| r["delivered_entries"].as_u64()).min().unwrap_or(0) as f64;
        let totals = |key: &str| -> f64 {
            p["replicas"].as_array().map(|a| a.iter().filter_map(|r| r["totals"][key].as_f64()).sum()).unwrap_or(0.0)
        };
        let udp_tx = totals("udp_tx_bytes");
        let frame_bytes = totals("bytes_sent");
        let batches = totals("batches_sent");
        let raw_frame_bytes = totals("entries_sent") * (args.entry_bytes as f64 + 17.0);
        let sent_payload = frame_bytes - batches * walship::codec::batch::BATCH_HEADER_LEN as f64;
        let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let report = json!({
            "verified": verified,
            "differences": differences,
            "entries_written": plogs.iter().map(|l| l.1).sum::<u64>(),
            "throughput": {
                "entries_per_s": entries / secs,
                "payload_mb_per_s": entries * args.entry_bytes as f64 / secs / 1e6,
                "wire_mb_per_s": udp_tx / secs / 1e6,
                "wire_mb_per_s_per_replica": udp_tx / secs / 1e6 / names.len().max(1) as f64,
                "bases": "entries_per_s and payload_mb_per_s: delivered to each replica (the slowest one); wire_mb_per_s: UDP bytes the primary sent to all replicas together",
            },
            "delivered": { "entries": entries, "payload_bytes": entries * args.entry_bytes as f64 },
            "compression": {
                "codec": args.compression,
                "ratio": ratio(raw_frame_bytes, frame_bytes),
                "payload_ratio": ratio(raw_frame_bytes, sent_payload),
                "entries_per_batch": ratio(totals("entries_sent"), batches),
            },
            "append_latency_us": { "p50": null, "p99": null, "p999": null, "note": "measured inside the primary process only in in-process mode" },
            "converge_ms": converged.map(|d| d.as_secs_f64() * 1e3),
            "replicas": replicas_json,
            "link": { "mode": "processes", "impairment": imp.to_string() },
            "config": {
                "replicas": args.replicas, "spaces": args.spaces, "rate": args.rate, "entry_bytes": args.entry_bytes,
                "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
                "single_stream": args.single_stream, "seed": args.seed, "congestion": args.congestion,
                "initial_window": args.initial_window, "processes": true,
            },
            "elapsed_s": secs,
            "system": system_json(),
        });
        println!("\n== walship load test report (separate processes) ==");
        println!("system:          {}", system_line());
        println!("verified:        {verified}");
        for d in differences.iter().take(10) {
            println!("  {d}");
        }
        println!(
            "entries:         {} written over {} spaces; {:.0} delivered per replica",
            total, args.spaces, entries
        );
        println!(
            "throughput:      {:.0} entries/s, {:.2} MB/s payload per replica; {:.2} MB/s on the wire to {} replica(s)",
            entries / secs,
            entries * args.entry_bytes as f64 / secs / 1e6,
            udp_tx / secs / 1e6,
            names.len()
        );
        println!(
            "compression:     {}, entry bytes / frame bytes {:.2}, payload before / after the codec {:.2}, {:.1} entries per batch",
            args.compression,
            ratio(raw_frame_bytes, frame_bytes),
            ratio(raw_frame_bytes, sent_payload),
            ratio(totals("entries_sent"), batches)
        );
        for r in &replicas_json {
            println!(
                "{}:       sampled lag p50 {} ms, p99 {} ms, max {} ms; reconnects {}",
                r["name"].as_str().unwrap_or(""),
                r["lag_ms"]["p50"],
                r["lag_ms"]["p99"],
                r["lag_ms"]["max"],
                r["reconnects"]
            );
        }
        println!(
            "converged after: {}",
            converged.map_or("did not converge".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        );
        println!("link:            {}", link.stats());
        if let Some(path) = &args.report_json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
            println!("report written to {}", path.display());
        }
        if !verified {
            println!("node logs kept in {}", dir.keep().display());
        }
        Ok(verified)
    }
}
