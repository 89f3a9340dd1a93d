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
//! `--processes` runs the `primary` and `replica` example binaries instead, and `--attach-primary`
//! with `--attach-replica` watches such binaries already running elsewhere (reading their
//! `--status-addr` or `--status-file`); every mode builds its report from one [`Outcome`], so the
//! JSON has the same keys wherever the data exists.
//!
//! Ctrl-C (or SIGTERM) stops the writer (with `--processes`, the primary's, through its
//! `--stop-writing-file`), then converges, verifies and reports as usual, marked interrupted; a
//! second one quits at once, stopping the nodes and removing the temporary folder.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use walship::codec::batch::ENTRY_HEADER_LEN;
use walship::codec::Compression;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::entry::{now_us, Entry};
use walship::net::endpoint::{client_config, server_config, TransportSettings};
use walship::net::tls::ClusterCa;
use walship::netsim::{self, Impairment, SimNetwork};
use walship::wal::{SpaceWal, SyncPolicy};
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
    /// Entries per second written, or `max` for as fast as possible (a bandwidth cap of the link
    /// is --link-rate).
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
    sync: SyncPolicy,
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
    /// Where the link is simulated: `sim` (in process, the default) or `udp` (forwarders on real
    /// sockets; always so with --processes).
    #[arg(long)]
    link: Option<String>,
    /// Congestion controller: cubic, newreno or bbr.
    #[arg(long, default_value = "bbr")]
    congestion: walship::net::endpoint::CongestionControl,
    /// Congestion window of a new connection (e.g. 1MB); default: quinn's (240 KB with BBR). With a
    /// high --rate and a long --delay, the default shows up as a lag spike while the window grows.
    #[arg(long, value_parser = common::parse_bytes)]
    initial_window: Option<u64>,
    /// Wait this long for more entries before a batch closes (default: none). Batches under 4 KiB
    /// of payload go uncompressed, so at low rates per space this is what lets compression work.
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
    /// Where the `primary` and `replica` binaries are (default: next to this one). With --processes.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Start no node: attach to a running `primary` binary, given as `http://HOST:PORT` (its
    /// `--status-addr`) or the path of its `--status-file`. Its built-in writer (`--spaces`,
    /// `--rate`, `--total`; `--wait-for-replicas N` to start it once the replicas are connected)
    /// makes the load; this tool follows it, waits for the replicas to converge, verifies and
    /// reports (lag, append latency and convergence time as the primary recorded them). The link
    /// is whatever lies between the nodes: your own network, or a `lossy_link` you started.
    #[arg(long, requires = "attach_replica", conflicts_with_all = ATTACH_CONFLICTS)]
    attach_primary: Option<String>,
    /// A running `replica` binary of that primary, the same way (repeat for each replica).
    #[arg(long, requires = "attach_primary")]
    attach_replica: Vec<String>,
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

/// What the nodes' own settings decide when attached to running nodes: refused rather than ignored.
const ATTACH_CONFLICTS: [&str; 25] = [
    "replicas",
    "warmup",
    "spaces",
    "rate",
    "entry_bytes",
    "duration",
    "compression",
    "sync",
    "loss",
    "burst",
    "delay",
    "jitter",
    "reorder",
    "duplicate",
    "link_rate",
    "partition_at",
    "partition_for",
    "link",
    "congestion",
    "initial_window",
    "linger",
    "single_stream",
    "processes",
    "bin_dir",
    "seed",
];

impl Args {
    /// The link mode as the report names it: `sim`, `udp`, or `external` (attached to running
    /// nodes: not simulated here).
    fn link_mode(&self) -> &str {
        match (self.attach_primary.is_some(), self.processes, self.link.as_deref()) {
            (true, _, _) => "external",
            (false, true, _) => "udp",
            (false, false, link) => link.unwrap_or("sim"),
        }
    }
}

/// Longest wait, once the logs are identical, for the primary's view to show every replica
/// caught up: the replicas' last acknowledgements are still on their way when the logs match, and
/// a report of a verified run should not call its replicas "lagging".
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

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
/// to replicate, a partition after the end, or a warm-up as long as the run (nothing would be
/// timed, and every percentile would read 0).
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
    if args.warmup >= args.duration {
        return Err(format!(
            "--warmup {:?} must be shorter than --duration {:?}: nothing would be timed",
            args.warmup, args.duration
        ));
    }
    check_mode_flags(args)
}

/// Flags that only one mode reads are refused in the other, rather than silently ignored: the
/// `primary` binary's writer is paced, and the nodes of `--processes` always talk through UDP
/// forwarders.
fn check_mode_flags(args: &Args) -> Result<(), String> {
    if !args.processes {
        return match (args.link.as_deref(), &args.bin_dir) {
            (_, Some(_)) => Err("--bin-dir only applies with --processes".into()),
            (None | Some("sim" | "udp"), None) => Ok(()),
            (Some(other), None) => Err(format!("unknown --link {other:?}: use sim or udp")),
        };
    }
    if let Some(link) = args.link.as_deref().filter(|l| *l != "udp") {
        return Err(format!(
            "--link {link} does not apply with --processes: its nodes always talk through lossy_link forwarders on UDP (--link udp)"
        ));
    }
    if args.rate == 0 {
        return Err("--processes needs a finite --rate (the primary binary's writer is paced)".into());
    }
    Ok(())
}

/// Makes sure the report can be written, now rather than after the whole run. Returns the path if
/// this run created the (empty) file, so that a run that ends without a report can remove it.
fn claim_report_file(args: &Args) -> Result<Option<PathBuf>, String> {
    let Some(path) = &args.report_json else { return Ok(None) };
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot write --report-json {}: {e}", path.display()))?;
    Ok((!existed).then(|| path.clone()))
}

/// What a run that ends without a report leaves behind, and removes: its temporary folder and the
/// report file it created (if still empty).
#[derive(Clone, Default)]
struct Leftovers {
    dir: Option<PathBuf>,
    report: Option<PathBuf>,
}

impl Leftovers {
    fn remove(&self) {
        if let Some(dir) = &self.dir {
            // The nodes may still be creating files in it: retry a few times.
            for _ in 0..5 {
                if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(report) = &self.report {
            if std::fs::metadata(report).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(report);
            }
        }
    }
}

/// Resolves at the next SIGINT or SIGTERM. Holds its handlers for the whole run, so a second
/// signal is seen even if it arrives while the first is being handled.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Sets the returned flag at the first SIGINT/SIGTERM (printing `first`). With `quit`, a second
/// signal exits at once with status 130; `process::exit` runs no destructors, so the leftovers are
/// removed by hand first.
fn watch_signals(console: &Console, first: &'static str, quit: Option<Leftovers>) -> std::io::Result<Arc<AtomicBool>> {
    let mut signals = Signals::new()?;
    let flag = Arc::new(AtomicBool::new(false));
    let (set, console) = (flag.clone(), console.clone());
    tokio::spawn(async move {
        signals.next().await;
        set.store(true, Ordering::SeqCst);
        console.line(first);
        let Some(leftovers) = quit else { return };
        signals.next().await;
        leftovers.remove();
        console.bar.finish_and_clear();
        eprintln!("loadtest: interrupted again: quit without a report (temporary folder removed)");
        std::process::exit(130);
    });
    Ok(flag)
}

/// For runs of separate processes: the first SIGINT/SIGTERM sets `stop_writing` (printing
/// `first`), the second sets `abort`, which ends the run without a report (the nodes are
/// stopped as their handles drop, which `process::exit` would skip).
fn watch_signals_twice(console: &Console, first: &'static str) -> std::io::Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let mut signals = Signals::new()?;
    let (stop_writing, abort) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (s, a, console) = (stop_writing.clone(), abort.clone(), console.clone());
    tokio::spawn(async move {
        signals.next().await;
        s.store(true, Ordering::SeqCst);
        console.line(first);
        signals.next().await;
        a.store(true, Ordering::SeqCst);
    });
    Ok((stop_writing, abort))
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

fn system_json() -> Value {
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
        // A bandwidth (100mbit, 12.5MB/s) is a cap of the link, which has its own flag.
        _ if s.parse::<u64>().is_err() && s.contains(|c: char| c.is_ascii_alphabetic()) && netsim::parse_rate(s).is_ok() => {
            Err(format!("bad rate {s:?}: --rate is entries per second, or `max`; to cap the link's bandwidth use --link-rate {s}"))
        }
        _ => s.parse().map_err(|_| format!("bad rate {s:?}: entries per second, or `max` (a bandwidth cap of the link is --link-rate, e.g. 100mbit)")),
    }
}

/// The codec as people write it: `none`, `lz4`, `zstd level 1`.
fn codec_name(c: Compression) -> String {
    match c {
        Compression::Zstd { level } => format!("zstd level {level}"),
        other => other.codec().name().to_string(),
    }
}

/// The `--sync` value that gives `policy`: `never`, `always`, `interval:10ms`.
fn sync_name(policy: SyncPolicy) -> String {
    match policy {
        SyncPolicy::Never => "never".into(),
        SyncPolicy::Always => "always".into(),
        SyncPolicy::Interval(d) if d.subsec_nanos() % 1_000_000 == 0 => format!("interval:{}ms", d.as_millis()),
        SyncPolicy::Interval(d) => format!("interval:{}us", d.as_micros()),
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

/// The live output of a run: a progress bar with throughput and lag (hidden with `--quiet`), and
/// event lines printed above it, or straight to stdout when the bar is hidden (a hidden bar would
/// swallow them, and the events belong in the log).
#[derive(Clone)]
struct Console {
    bar: ProgressBar,
    /// Written entries and when, at the last update: the rate shown is since then.
    last: Arc<Mutex<(Instant, u64)>>,
}

impl Console {
    fn new(quiet: bool, duration: Duration) -> Result<Console, indicatif::style::TemplateError> {
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(duration.as_millis() as u64) };
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")?);
        Ok(Console { bar, last: Arc::new(Mutex::new((Instant::now(), 0))) })
    }

    fn line(&self, s: impl AsRef<str>) {
        // Hidden by --quiet, or because stderr is not a terminal.
        match self.bar.is_hidden() {
            true => println!("{}", s.as_ref()),
            false => self.bar.println(s.as_ref()),
        }
    }

    /// Shows `written` entries at `elapsed`, the write rate since the last update, and each
    /// replica's state and lag as the primary sees it.
    fn progress(&self, elapsed: Duration, written: u64, views: &[View]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let rate = written.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        *last = (Instant::now(), written);
        let lag: Vec<String> =
            views.iter().map(|r| format!("{} {}, lag {}e/{}ms", r.name, r.state, r.lag_entries, r.lag_ms)).collect();
        self.bar.set_position(elapsed.as_millis() as u64);
        self.bar.set_message(format!("written {written} ({rate:.0}/s) | {}", lag.join(" | ")));
    }
}

/// The primary's view of one replica, read from its status as JSON: in process from
/// `Primary::status()`, with `--processes` from the primary's status file. One reader for both
/// modes keeps their reports alike.
#[derive(Clone, Debug, Default)]
struct View {
    name: String,
    /// healthy, lagging, degraded or disconnected.
    state: String,
    lag_entries: u64,
    lag_ms: u64,
    reconnects: u64,
    /// QUIC path statistics of the current connection (`null` before the first).
    path: Value,
    /// Traffic over every connection of the run.
    totals: Value,
}

impl View {
    fn all(status: &Value) -> Vec<View> {
        let Some(replicas) = status["replicas"].as_array() else { return Vec::new() };
        replicas
            .iter()
            .map(|r| View {
                name: r["name"].as_str().unwrap_or_default().to_string(),
                state: r["state"].as_str().unwrap_or("unknown").to_string(),
                lag_entries: r["max_lag"]["entries"].as_u64().unwrap_or(0),
                lag_ms: r["max_lag"]["ms"].as_u64().unwrap_or(0),
                reconnects: r["reconnects"].as_u64().unwrap_or(0),
                path: r["path"].clone(),
                totals: r["totals"].clone(),
            })
            .collect()
    }

    fn of(status: &Value, name: &str) -> Option<View> {
        View::all(status).into_iter().find(|v| v.name == name)
    }

    /// Connected and holding everything the primary wrote.
    fn caught_up(&self) -> bool {
        self.state == "healthy" && self.lag_entries == 0
    }

    /// A counter of the totals, by key or path (`codec/too_small`).
    fn total(&self, key: &str) -> u64 {
        self.totals.pointer(&format!("/{key}")).and_then(Value::as_u64).unwrap_or(0)
    }

    /// The current connection's path statistics (RTT, window), with the counters (lost packets,
    /// congestion events, UDP bytes) summed over every connection of the run, since a partition
    /// or a reconnect restarts the per-connection ones.
    fn path_json(&self) -> Value {
        let mut path = self.path.clone();
        if let Some(p) = path.as_object_mut() {
            for key in ["lost_packets", "congestion_events", "udp_tx_bytes", "udp_rx_bytes"] {
                p.insert(key.into(), self.totals[key].clone());
            }
        }
        path
    }
}

/// Waits up to [`SETTLE_TIMEOUT`], polling `status` every `every`, until the primary's view shows
/// every replica in `names` caught up; returns the last status read, how long that took, and, if
/// it never did, what it showed. `give_up` ends the wait early (an aborted run).
async fn settle_view(
    names: &[String],
    every: Duration,
    mut status: impl FnMut() -> Value,
    give_up: impl Fn() -> bool,
) -> Settled {
    let start = Instant::now();
    loop {
        let p = status();
        let behind: Vec<String> = names
            .iter()
            .map(|n| (n, View::of(&p, n)))
            .filter(|(_, v)| !v.as_ref().is_some_and(View::caught_up))
            .map(|(n, v)| match v {
                Some(v) => format!("{n} {} ({} entries, {} ms behind)", v.state, v.lag_entries, v.lag_ms),
                None => format!("{n} unknown to the primary"),
            })
            .collect();
        if behind.is_empty() || start.elapsed() >= SETTLE_TIMEOUT || give_up() {
            return Settled { status: p, waited: start.elapsed(), behind };
        }
        tokio::time::sleep(every).await;
    }
}

/// The primary's view once settled (or not, after [`SETTLE_TIMEOUT`]).
struct Settled {
    status: Value,
    waited: Duration,
    /// Replicas it still showed behind, as lines for the report.
    behind: Vec<String>,
}

impl Settled {
    /// The view of a run that did not converge: read at once, no wait, since the logs differ.
    fn now(status: Value) -> Settled {
        Settled { status, waited: Duration::ZERO, behind: Vec::new() }
    }
}

/// p50, p99, p999 and max of a histogram, divided by `unit` (e.g. µs recorded, ms reported: 1e3).
#[derive(Clone, Copy, Debug, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>, unit: f64) -> Percentiles {
        let q = |q: f64| h.value_at_quantile(q) as f64 / unit;
        Percentiles { p50: q(0.5), p99: q(0.99), p999: q(0.999), max: h.max() as f64 / unit }
    }

    fn json(&self) -> Value {
        json!({ "p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max })
    }

    /// Read back from [`Percentiles::json`]'s keys (as the `primary` binary's status file gives
    /// its writer's append latency); `None` if any is missing.
    fn from_json(v: &Value) -> Option<Percentiles> {
        let f = |k: &str| v[k].as_f64();
        Some(Percentiles { p50: f("p50")?, p99: f("p99")?, p999: f("p999")?, max: f("max")? })
    }
}

/// How one replica did.
struct ReplicaOutcome {
    name: String,
    /// Entries it holds (in process: applied through its hook).
    entries: u64,
    payload_bytes: u64,
    /// From append to durable on the replica, in ms.
    lag_ms: Option<Percentiles>,
    /// How `lag_ms` was measured.
    lag_source: String,
    /// The primary's view of it at the end.
    view: Option<View>,
}

/// When the logs became identical after the writes stopped, and how finely that was measured.
#[derive(Clone, Copy)]
struct Convergence {
    after: Option<Duration>,
    resolution: Duration,
    /// How `after` was measured, for the human summary.
    how: &'static str,
}

/// Everything a run measured, in either mode: the JSON report and the human summary are built
/// from this alone, so both modes report the same keys wherever the data exists.
struct Outcome {
    /// `in-process`, `processes` or `attached`.
    mode: &'static str,
    /// Stopped early by SIGINT/SIGTERM (then converged, verified and reported as usual).
    interrupted: bool,
    differences: Vec<String>,
    convergence: Convergence,
    entries_written: u64,
    write_time: Duration,
    elapsed: Duration,
    /// Append latency on the primary, in µs: timed by this process's writer, or read from the
    /// `primary` binary's status (its built-in writer's).
    append_us: Option<Percentiles>,
    /// CPU seconds of this process (in process only: it runs every node).
    cpu_seconds: Option<f64>,
    replicas: Vec<ReplicaOutcome>,
    /// How long the primary's view took to show every replica caught up once the logs matched.
    view_waited: Duration,
    /// Replicas the primary still showed behind after [`SETTLE_TIMEOUT`], if any.
    view_behind: Vec<String>,
    link_stats: netsim::LinkStats,
    imp: Impairment,
    /// Batches with less payload than this go uncompressed.
    min_compress_bytes: usize,
}

impl Outcome {
    fn verified(&self) -> bool {
        self.differences.is_empty() && self.convergence.after.is_some()
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    /// The slowest replica's entries and payload bytes.
    fn delivered(&self) -> (u64, u64) {
        let entries = self.replicas.iter().map(|r| r.entries).min().unwrap_or(0);
        let bytes = self.replicas.iter().map(|r| r.payload_bytes).min().unwrap_or(0);
        (entries, bytes)
    }

    /// A traffic counter over every connection of the run, all replicas together.
    fn total(&self, key: &str) -> u64 {
        self.replicas.iter().filter_map(|r| r.view.as_ref()).map(|v| v.total(key)).sum()
    }
}

/// What the codec did, from the primary's counts (`TrafficTotals::codec`). A batch is compressed
/// only if its payload (entries with their 17-byte headers) reaches `min_compress_bytes`: at a low
/// rate per space, batches stay small and most go out uncompressed whatever the codec.
struct CompressionUse {
    /// Mean payload bytes per batch, before the codec.
    mean_batch_bytes: f64,
    /// Entries a batch needs to reach `min_compress_bytes`.
    entries_needed: u64,
    /// Share of the batches sent uncompressed as too small (0..=1).
    small_batches: f64,
}

impl CompressionUse {
    fn of(outcome: &Outcome, entry_bytes: usize) -> Option<CompressionUse> {
        let batches = outcome.total("batches_sent");
        if batches == 0 {
            return None;
        }
        let entry = (entry_bytes + ENTRY_HEADER_LEN) as u64;
        Some(CompressionUse {
            mean_batch_bytes: outcome.total("codec/bytes_in") as f64 / batches as f64,
            entries_needed: (outcome.min_compress_bytes as u64).div_ceil(entry).max(1),
            small_batches: outcome.total("codec/too_small") as f64 / batches as f64,
        })
    }

    /// What would make batches big enough to compress, for the human summary.
    fn hint(&self, args: &Args) -> String {
        let per_space = args.rate as f64 / args.spaces as f64;
        let linger = match args.rate {
            0 => String::new(),
            _ => format!(
                "--linger {:.0}ms (about {} entries per space at {:.0} entries/s each; adds as much lag), ",
                (self.entries_needed as f64 / per_space * 1e3).ceil(),
                self.entries_needed,
                per_space
            ),
        };
        let whose = if args.attach_primary.is_some() { "restart the primary with " } else { "try " };
        format!("for bigger batches {whose}{linger}larger --entry-bytes, or a higher --rate per space (fewer --spaces)")
    }
}

fn compression_json(args: &Args, outcome: &Outcome) -> Value {
    let ratio = |num: u64, den: u64| if den > 0 { num as f64 / den as f64 } else { 0.0 };
    let (entries_sent, batches) = (outcome.total("entries_sent"), outcome.total("batches_sent"));
    let frame_bytes = outcome.total("bytes_sent");
    // Batch payloads before compression (each entry with its header) and as sent.
    let (raw_frame_bytes, sent_payload) = (outcome.total("codec/bytes_in"), outcome.total("codec/bytes_out"));
    let usage = CompressionUse::of(outcome, args.entry_bytes).filter(|_| args.compression != Compression::None);
    json!({
        "codec": args.compression.codec().name(),
        "level": match args.compression { Compression::Zstd { level } => Some(level), _ => None },
        // Entries' bytes (with their headers) over frame bytes: batch headers count, so small
        // batches read below 1 even when compressed.
        "ratio": ratio(raw_frame_bytes, frame_bytes),
        // Batch payloads before and after compression: what the codec itself achieved.
        "payload_ratio": ratio(raw_frame_bytes, sent_payload),
        "entries_per_batch": ratio(entries_sent, batches),
        "min_compress_bytes": outcome.min_compress_bytes,
        "mean_batch_payload_bytes": usage.as_ref().map(|u| u.mean_batch_bytes),
        // What the codec did with each batch: under min_compress_bytes a batch goes uncompressed.
        "batches": {
            "compressed": outcome.total("codec/compressed"),
            "too_small": outcome.total("codec/too_small"),
            "incompressible": outcome.total("codec/incompressible"),
        },
        "too_small_share": usage.as_ref().map(|u| u.small_batches),
    })
}

fn report_json(args: &Args, o: &Outcome) -> Value {
    let secs = o.secs();
    let (entries, bytes) = o.delivered();
    let udp_tx = o.total("udp_tx_bytes") as f64;
    let replicas: Vec<Value> = o
        .replicas
        .iter()
        .map(|r| {
            let mut v = json!({
                "name": r.name,
                "entries": r.entries,
                "lag_ms": r.lag_ms.map_or(json!({ "p50": null, "p99": null, "p999": null, "max": null }), |l| l.json()),
                "lag_source": r.lag_source,
                "state": r.view.as_ref().map(|v| v.state.clone()),
                "reconnects": r.view.as_ref().map(|v| v.reconnects),
                "path": r.view.as_ref().map(View::path_json),
                "totals": r.view.as_ref().map(|v| v.totals.clone()),
            });
            if o.mode == "processes" {
                // The key this mode used before `entries`, kept for scripts that read it.
                v["delivered_entries"] = json!(r.entries);
            }
            v
        })
        .collect();
    let s = &o.link_stats;
    json!({
        "verified": o.verified(),
        "mode": o.mode,
        "interrupted": o.interrupted,
        "differences": o.differences,
        "entries_written": o.entries_written,
        "delivered": { "entries": entries, "payload_bytes": bytes },
        "throughput": {
            "entries_per_s": entries as f64 / secs,
            "payload_mb_per_s": bytes as f64 / secs / 1e6,
            "wire_mb_per_s": udp_tx / secs / 1e6,
            "wire_mb_per_s_per_replica": udp_tx / secs / 1e6 / o.replicas.len().max(1) as f64,
            "bases": "entries_per_s and payload_mb_per_s: delivered to each replica (the slowest one); wire_mb_per_s: UDP bytes the primary sent to all replicas together",
        },
        "compression": compression_json(args, o),
        "append_latency_us": match &o.append_us {
            Some(a) => a.json(),
            None => json!({ "p50": null, "p99": null, "p999": null, "max": null, "note": "not reported by the primary (no built-in writer, or no append timed yet)" }),
        },
        "converge_ms": o.convergence.after.map(|d| d.as_secs_f64() * 1e3),
        "converge_resolution_ms": o.convergence.resolution.as_secs_f64() * 1e3,
        "lag_includes_startup": args.warmup.is_zero(),
        "primary_view": {
            "settled": o.view_behind.is_empty(),
            "behind": o.view_behind,
            "waited_ms": o.view_waited.as_secs_f64() * 1e3,
            "note": format!("the primary's view of the replicas (state, totals) is read once it shows every replica caught up, waiting up to {} s", SETTLE_TIMEOUT.as_secs()),
        },
        "cpu": o.cpu_seconds.map(|c| json!({
            "seconds": c,
            "cores": c / secs,
            "us_per_entry": c * 1e6 / o.entries_written.max(1) as f64,
            "note": "whole process: primary, replicas and link simulator together",
        })),
        "replicas": replicas,
        "link": match o.mode {
            "attached" => json!({ "mode": args.link_mode(), "note": "as deployed between the nodes; not simulated by this tool" }),
            _ => json!({
                "mode": args.link_mode(), "impairment": o.imp.to_string(), "packets": s.packets, "dropped": s.dropped(),
                "duplicated": s.duplicated, "reordered": s.reordered, "overtaking": s.overtaking,
            }),
        },
        "config": {
            "replicas": args.replicas, "spaces": args.spaces, "rate": args.rate, "entry_bytes": args.entry_bytes,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(), "single_stream": args.single_stream,
            "seed": args.seed, "congestion": args.congestion, "initial_window": args.initial_window,
            "sync": sync_name(args.sync), "compression": args.compression.to_string(),
            "linger_ms": args.linger.map(|d| d.as_secs_f64() * 1e3), "processes": args.processes,
        },
        "elapsed_s": secs,
        "system": system_json(),
    })
}

/// The first line of a run: what it does, in the flags' own words.
fn banner(args: &Args, imp: &Impairment) -> String {
    format!(
        "loadtest: {} replicas, {} spaces, {} entries/s of {} bytes for {:?}, compression {}, sync {}, {}, link {} [{}], seed {}",
        args.replicas,
        args.spaces,
        if args.rate == 0 { "max".to_string() } else { args.rate.to_string() },
        args.entry_bytes,
        args.duration,
        codec_name(args.compression),
        sync_name(args.sync),
        if args.single_stream { "all spaces on one multiplexed stream" } else { "one stream per space" },
        args.link_mode(),
        imp,
        args.seed
    )
}

fn print_summary(args: &Args, o: &Outcome, report: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let (entries, bytes) = o.delivered();
    let title = match o.mode {
        "processes" => "walship load test report (separate processes)",
        "attached" => "walship load test report (attached to running nodes)",
        _ => "walship load test report",
    };
    println!("\n== {title}{} ==", if o.interrupted { ", INTERRUPTED" } else { "" });
    println!("system:            {}", system_line());
    if o.interrupted {
        println!(
            "interrupted:       writes stopped early after {:.1}s of {:?}; what was written is verified below",
            o.write_time.as_secs_f64(),
            args.duration
        );
    }
    println!(
        "verified:          {}",
        match (o.verified(), o.mode) {
            (true, "processes" | "attached") =>
                "true (every replica's logs identical to the primary's: last sequence and digest)".to_string(),
            (true, _) => "true (every replica's logs identical to the primary's, each entry applied once)".to_string(),
            (false, _) => format!("FALSE: {} differences", o.differences.len()),
        }
    );
    for d in o.differences.iter().take(10) {
        println!("  {d}");
    }
    println!(
        "entries written:   {} in {:.1}s; delivered per replica: {entries} ({:.1} MB payload)",
        o.entries_written,
        o.write_time.as_secs_f64(),
        bytes as f64 / 1e6
    );
    println!(
        "throughput:        {:.0} entries/s, {:.2} MB/s payload per replica; {:.2} MB/s on the wire to {} replica(s)",
        f(&report["throughput"]["entries_per_s"]),
        f(&report["throughput"]["payload_mb_per_s"]),
        f(&report["throughput"]["wire_mb_per_s"]),
        o.replicas.len()
    );
    print_compression(args, o, &report["compression"]);
    match &o.append_us {
        Some(a) => println!("append latency:    p50 {:.2} us, p99 {:.2} us, p999 {:.2} us", a.p50, a.p99, a.p999),
        None => println!("append latency:    not reported by the primary"),
    }
    for r in &o.replicas {
        print_replica(r);
    }
    if let Some(source) = o.replicas.first().map(|r| &r.lag_source).filter(|_| o.mode != "in-process") {
        println!("                   (lag {source})");
    }
    if args.warmup.is_zero() {
        let how = if o.mode == "attached" { "start the primary with --warmup 2s" } else { "add --warmup 2s" };
        println!("                   note: the lag includes connection start-up (slow start over the link's delay); {how} to leave it out");
    }
    if !o.view_behind.is_empty() {
        println!(
            "primary's view:    still shows replicas behind {} s after their logs matched: {}",
            SETTLE_TIMEOUT.as_secs(),
            o.view_behind.join("; ")
        );
    }
    let c = &o.convergence;
    println!(
        "converged after:   {}",
        match c.after {
            None => "did not converge".to_string(),
            Some(d) if d < c.resolution =>
                format!("within {} ms of writes stopping ({})", c.resolution.as_millis(), c.how),
            Some(d) => format!("{:.0} ms after writes stopped ({})", d.as_secs_f64() * 1e3, c.how),
        }
    );
    match o.mode {
        "attached" => println!("link:              as deployed between the nodes (not simulated by this tool)"),
        _ => println!("link:              {} [{}]: {}", args.link_mode(), o.imp, o.link_stats),
    }
}

fn print_compression(args: &Args, o: &Outcome, c: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "compression:       {}, entry bytes / frame bytes {:.2}, payload before / after the codec {:.2}, {:.1} entries per batch",
        codec_name(args.compression),
        f(&c["ratio"]),
        f(&c["payload_ratio"]),
        f(&c["entries_per_batch"])
    );
    let Some(usage) = CompressionUse::of(o, args.entry_bytes).filter(|_| args.compression != Compression::None) else {
        return;
    };
    if usage.small_batches < 0.01 {
        return;
    }
    println!(
        "                   {:.0}% of batches went uncompressed as too small: a batch is compressed from {} B of payload ({} entries of {} B), and these averaged {:.0} B",
        usage.small_batches * 100.0,
        o.min_compress_bytes,
        usage.entries_needed,
        args.entry_bytes,
        usage.mean_batch_bytes
    );
    if usage.small_batches >= 0.5 {
        println!("                   {}", usage.hint(args));
    }
}

fn print_replica(r: &ReplicaOutcome) {
    let v = r.view.clone().unwrap_or_default();
    let path = v.path_json();
    println!(
        "{:<18} {}; {}; reconnects {}; lost packets {}, congestion events {}, rtt {:.2} ms",
        format!("{}:", r.name),
        match &r.lag_ms {
            Some(l) =>
                format!("lag p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms", l.p50, l.p99, l.p999, l.max),
            None => "lag not measured".to_string(),
        },
        if v.state.is_empty() { "unknown" } else { &v.state },
        v.reconnects,
        path["lost_packets"].as_u64().unwrap_or(0),
        path["congestion_events"].as_u64().unwrap_or(0),
        path["rtt_ms"].as_f64().unwrap_or(0.0),
    );
}

/// Writes the JSON report if asked, and prints the human summary.
fn report(args: &Args, outcome: &Outcome) -> Result<bool, Box<dyn std::error::Error>> {
    let report = report_json(args, outcome);
    print_summary(args, outcome, &report);
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    Ok(outcome.verified())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::init_tracing_with("error");
    common::raise_fd_limit();
    // Usage errors exit with 1 ("could not run"): 2 means "ran, and the check failed".
    let args = Args::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() { 1 } else { 0 };
        let _ = e.print();
        std::process::exit(code)
    });
    if args.attach_primary.is_some() {
        common::exit_with_verdict("loadtest", processes::attach::run(args)).await
    } else if args.processes {
        common::exit_with_verdict("loadtest", processes::run(args)).await
    } else {
        common::exit_with_verdict("loadtest", run(args)).await
    }
}

/// The nodes of an in-process run and what observes them.
struct Cluster {
    primary: Primary,
    replicas: Vec<Replica>,
    link: Link,
    names: Vec<String>,
    /// One per replica, in the order of `names`.
    lags: Vec<Arc<LagRecorder>>,
    min_compress_bytes: usize,
}

/// Starts the primary and the replicas in this process, on the link `--link` names.
async fn start_cluster(args: &Args, imp: Impairment, dir: &Path) -> Result<Cluster, Box<dyn std::error::Error>> {
    let ca = ClusterCa::generate("loadtest CA")?;
    let settings = TransportSettings {
        congestion: args.congestion,
        initial_window: args.initial_window,
        ..TransportSettings::default()
    };
    let mut pcfg = PrimaryConfig::new("primary", "127.0.0.1:0".parse()?, dir.join("primary"));
    pcfg.compression = args.compression;
    pcfg.wal.sync = args.sync;
    pcfg.single_stream = args.single_stream;
    pcfg.transport = settings.clone();
    pcfg.linger = args.linger;
    let min_compress_bytes = pcfg.min_compress_bytes;
    let primary_id = ca.issue("primary")?;

    let names: Vec<String> = (1..=args.replicas).map(|i| format!("replica-{i}")).collect();
    let lags: Vec<Arc<LagRecorder>> = names.iter().map(|_| LagRecorder::new()).collect();
    let mut replicas = Vec::new();
    let (primary, link) = match args.link_mode() {
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
                let mut rcfg = ReplicaConfig::new(name, paddr, "primary", dir.join(name));
                rcfg.wal.sync = args.sync;
                replicas.push(Replica::with_endpoint(rcfg, ep, Some(lags[i].clone())).await?);
            }
            (primary, Link::Sim(net))
        }
        _ => {
            let primary = Primary::start(pcfg, primary_id).await?;
            let mut ctls = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let addr = start_forwarder(primary.local_addr(), imp, args.seed, name, &mut ctls)?;
                let mut rcfg = ReplicaConfig::new(name, addr, "primary", dir.join(name));
                rcfg.wal.sync = args.sync;
                rcfg.transport = settings.clone();
                replicas.push(Replica::start_with_hook(rcfg, ca.issue(name)?, Some(lags[i].clone())).await?);
            }
            (primary, Link::Udp(ctls))
        }
    };
    Ok(Cluster { primary, replicas, link, names, lags, min_compress_bytes })
}

/// The primary's status as JSON, the form [`View`] reads in both modes.
fn primary_status(primary: &Primary) -> Value {
    serde_json::to_value(primary.status()).unwrap_or(Value::Null)
}

/// What the write phase did.
struct Written {
    entries: u64,
    /// From the start of the writes to their stop.
    time: Duration,
    started: Instant,
    append_ns: Histogram<u64>,
}

/// Writes at `--rate` across the spaces for `--duration`, or until a signal sets `interrupted`,
/// showing progress and following `--partition-at`.
async fn write_phase(
    args: &Args,
    c: &Cluster,
    console: &Console,
    interrupted: &AtomicBool,
) -> Result<Written, Box<dyn std::error::Error>> {
    let spaces: Vec<SpaceWal> =
        common::space_names(args.spaces).iter().map(|s| c.primary.space(s)).collect::<Result<_, _>>()?;
    // Writer thread: paced appends, each timed once the warm-up is over.
    let stop = Arc::new(AtomicBool::new(false));
    let timed_from_us = now_us() + args.warmup.as_micros() as u64;
    for lag in &c.lags {
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
    let common::Writer { stats: writer_stats, thread: writer } = common::spawn_writer(plan, stop.clone());
    let started = Instant::now();
    let mut partitioned = false;
    while started.elapsed() < args.duration && !interrupted.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(line) = c.link.follow_partition(args, started.elapsed(), &mut partitioned) {
            console.line(line);
        }
        let views = View::all(&primary_status(&c.primary));
        console.progress(started.elapsed(), writer_stats.written.load(Ordering::Relaxed), &views);
    }
    if partitioned {
        c.link.partition(false);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| "writer panicked")??;
    let append_ns = writer_stats.append_latencies().unwrap_or_else(common::append_histogram);
    let time = started.elapsed();
    console.bar.finish_and_clear();
    Ok(Written { entries: writer_stats.written.load(Ordering::Relaxed), time, started, append_ns })
}

/// Waits until every replica holds every space with the primary's last sequence and digest, and
/// has applied every entry written (identical logs can still trail in what is durable and applied:
/// under a sync interval, by up to one interval), or `--converge-timeout`.
async fn converge(args: &Args, c: &Cluster, written: u64) -> Convergence {
    let stop_at = Instant::now();
    let every = Duration::from_millis(10);
    let after = loop {
        let p = c.primary.status();
        let all = c.replicas.iter().all(|r| {
            let rs = r.status();
            p.spaces.iter().all(|ps| rs.log(&ps.space).is_some_and(|x| x.same_log(ps)))
        });
        if all {
            break Some(stop_at.elapsed());
        }
        if stop_at.elapsed() > args.converge_timeout {
            break None;
        }
        tokio::time::sleep(every).await;
    };
    while after.is_some()
        && c.lags.iter().any(|l| l.entries.load(Ordering::Relaxed) < written)
        && stop_at.elapsed() <= args.converge_timeout
    {
        tokio::time::sleep(every).await;
    }
    Convergence { after, resolution: every, how: "logs compared every 10 ms" }
}

/// Every way a replica's logs differ from the primary's, or its hook missed or repeated entries.
fn differences(c: &Cluster, written: u64) -> Vec<String> {
    let p = c.primary.status();
    let mut out = Vec::new();
    for r in &c.replicas {
        let rs = r.status();
        for ps in &p.spaces {
            match rs.log(&ps.space) {
                Some(x) if x.same_log(ps) => {}
                Some(x) => out.push(format!(
                    "{} {}: last_seq {} digest {} (primary {} {})",
                    rs.name, ps.space, x.last_seq, x.digest, ps.last_seq, ps.digest
                )),
                None => out.push(format!("{} {}: missing", rs.name, ps.space)),
            }
        }
    }
    for (name, lag) in c.names.iter().zip(&c.lags) {
        let applied = lag.entries.load(Ordering::Relaxed);
        if applied != written {
            out.push(format!("{name}: {applied} entries applied of {written} written"));
        }
    }
    out
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    check_args(&args)?;
    let imp = args.impair.impairment(args.link_rate, None);
    imp.validate()?;
    let report_file = claim_report_file(&args)?;
    let dir = tempfile::tempdir()?;
    let console = Console::new(args.quiet, args.duration)?;
    let leftovers = Leftovers { dir: Some(dir.path().to_path_buf()), report: report_file };
    let interrupted = watch_signals(
        &console,
        "interrupted: stopping the writer, then converging, verifying and reporting (Ctrl-C again to quit at once)",
        Some(leftovers),
    )?;
    let c = start_cluster(&args, imp, dir.path()).await?;
    println!("{}", banner(&args, &imp));
    if !args.warmup.is_zero() {
        println!("warm-up: entries appended in the first {:?} are verified but not timed", args.warmup);
    }

    let cpu_start = cpu_seconds();
    let w = write_phase(&args, &c, &console, &interrupted).await?;
    println!("writes stopped after {:.1}s: {} entries; waiting for convergence ...", w.time.as_secs_f64(), w.entries);
    let convergence = converge(&args, &c, w.entries).await;
    let elapsed = w.started.elapsed();
    let cpu = cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a);
    let differences = differences(&c, w.entries);
    // The logs match; the primary may not have heard every replica's last ack yet.
    let settled = match convergence.after {
        Some(_) => settle_view(&c.names, Duration::from_millis(10), || primary_status(&c.primary), || false).await,
        None => Settled::now(primary_status(&c.primary)),
    };
    let replicas = c
        .names
        .iter()
        .zip(&c.lags)
        .map(|(name, lag)| ReplicaOutcome {
            name: name.clone(),
            entries: lag.entries.load(Ordering::Relaxed),
            payload_bytes: lag.bytes.load(Ordering::Relaxed),
            lag_ms: Some(Percentiles::of(&lag.hist.lock().unwrap_or_else(|e| e.into_inner()), 1e3)),
            lag_source: "every entry, from its append to its apply on the replica".into(),
            view: View::of(&settled.status, name),
        })
        .collect();
    let outcome = Outcome {
        mode: "in-process",
        interrupted: interrupted.load(Ordering::SeqCst),
        differences,
        convergence,
        entries_written: w.entries,
        write_time: w.time,
        elapsed,
        append_us: Some(Percentiles::of(&w.append_ns, 1e3)),
        cpu_seconds: cpu,
        replicas,
        view_waited: settled.waited,
        view_behind: settled.behind,
        link_stats: c.link.stats(),
        imp,
        min_compress_bytes: c.min_compress_bytes,
    };
    let verified = report(&args, &outcome)?;
    for r in c.replicas {
        r.shutdown().await;
    }
    c.primary.shutdown().await;
    Ok(verified)
}

/// `--processes`: the same load test against the example binaries running as separate processes.
mod processes {
    use std::fmt::Display;
    use std::process::{Child, Command, Stdio};
    use std::time::SystemTime;

    use super::*;

    /// How often the nodes rewrite their status files, and this tool reads them.
    const STATUS_EVERY: Duration = Duration::from_millis(100);
    /// Lines of a failed node's log printed with the error.
    const LOG_TAIL_LINES: usize = 20;

    struct Node {
        name: String,
        child: Child,
        status: PathBuf,
        log: PathBuf,
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
        /// An error naming this node if its process has exited: nothing will change any more.
        fn check_running(&mut self) -> Result<(), Failure> {
            let message = match self.child.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(status)) => format!("{} exited early ({status})", self.name),
                Err(e) => format!("{}: {e}", self.name),
            };
            Err(Failure { message, log: Some(self.log.clone()), interrupted: false })
        }

        /// Its status file and when that version was written, or `None` before the first.
        fn status(&self) -> Option<(Value, SystemTime)> {
            read(&self.status)
        }
    }

    /// Why a run of the nodes ended without a report: the log of the node that explains it, if
    /// one does, or an interruption.
    struct Failure {
        message: String,
        log: Option<PathBuf>,
        interrupted: bool,
    }

    /// Any other error (spawning, I/O) names no node. (`Failure` is not `Display`, so this does
    /// not clash with `From<T> for T`.)
    impl<E: Display> From<E> for Failure {
        fn from(e: E) -> Failure {
            Failure { message: e.to_string(), log: None, interrupted: false }
        }
    }

    /// Sleeps `d`; fails if a signal arrived (the caller's `Node`s are then dropped, which stops
    /// the child processes, instead of leaving them running).
    async fn nap(d: Duration, interrupted: &AtomicBool) -> Result<(), Failure> {
        tokio::time::sleep(d).await;
        match interrupted.load(Ordering::SeqCst) {
            true => Err(Failure { message: "interrupted".into(), log: None, interrupted: true }),
            false => Ok(()),
        }
    }

    /// A status file and its modification time, both of the version read: the nodes replace the
    /// file by a rename, so an open handle holds one version.
    fn read(path: &Path) -> Option<(Value, SystemTime)> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).ok()?;
        let mtime = f.metadata().ok()?.modified().ok()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        Some((serde_json::from_slice(&bytes).ok()?, mtime))
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

    /// Entries in a status file's logs (every sequence starts at 1).
    fn entries(v: &Value) -> u64 {
        logs(v).iter().map(|l| l.1).sum()
    }

    fn free_port() -> std::io::Result<u16> {
        Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    /// The last `n` lines of a file.
    fn tail(path: &Path, n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
    }

    pub async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
        check_args(&args)?;
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
        let report_file = claim_report_file(&args)?;
        let dir = tempfile::tempdir()?;
        let console = Console::new(args.quiet, args.duration)?;
        let signals = watch_signals_twice(
            &console,
            "interrupted: stopping the primary's writer, then converging, verifying and reporting (Ctrl-C again to stop the nodes at once)",
        )?;
        let result = run_nodes(&args, imp, &bin_dir, dir.path(), &console, &signals).await;
        console.bar.finish_and_clear();
        let unclaimed = Leftovers { dir: None, report: report_file };
        match result {
            Ok(outcome) => {
                let verified = report(&args, &outcome)?;
                if !verified {
                    println!("node logs kept in {}", dir.keep().display());
                }
                Ok(verified)
            }
            Err(f) if f.interrupted => {
                unclaimed.remove();
                Err("interrupted twice; the nodes are stopped and their folder removed".into())
            }
            Err(f) => {
                unclaimed.remove();
                let kept = dir.keep();
                if let Some(log) = &f.log {
                    eprintln!("--- last {LOG_TAIL_LINES} lines of {} ---", log.display());
                    tail(log, LOG_TAIL_LINES).iter().for_each(|l| eprintln!("{l}"));
                    eprintln!("---");
                }
                Err(format!("{}; node logs and data kept in {}", f.message, kept.display()).into())
            }
        }
    }

    /// The running nodes and the forwarders between them.
    struct Nodes {
        primary: Node,
        replicas: Vec<Node>,
        link: Link,
        /// Entries the primary's writer writes.
        total: u64,
        /// The file whose existence tells the primary to stop writing (`--stop-writing-file`).
        stop_writing_file: PathBuf,
    }

    impl Nodes {
        fn check_running(&mut self) -> Result<(), Failure> {
            self.primary.check_running()?;
            self.replicas.iter_mut().try_for_each(Node::check_running)
        }
    }

    /// Starts the primary process, and each replica process behind its own forwarder.
    fn spawn_nodes(args: &Args, imp: Impairment, bin_dir: &Path, dir: &Path) -> Result<Nodes, Failure> {
        let names: Vec<String> = (1..=args.replicas).map(|i| format!("replica-{i}")).collect();
        let mut all: Vec<&str> = vec!["primary"];
        all.extend(names.iter().map(String::as_str));
        let certs = dir.join("certs");
        ClusterCa::generate("loadtest CA")?.write_dir(&certs, &all)?;
        let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
        let paddr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let congestion = serde_json::to_value(args.congestion)?.as_str().unwrap_or("bbr").to_string();
        let sync = common::sync_flag(args.sync);
        let spawn = |name: &str, bin: &str, extra: Vec<String>| -> std::io::Result<Node> {
            let status = dir.join(format!("{name}.json"));
            let log_path = dir.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            let mut cmd = Command::new(bin_dir.join(bin));
            cmd.args(["--data", &dir.join(name).to_string_lossy(), "--certs", &certs.to_string_lossy()])
                .args(["--name", name, "--status-file", &status.to_string_lossy(), "--sync", &sync])
                .args(["--status-every", &format!("{}ms", STATUS_EVERY.as_millis())])
                .args(["--congestion", &congestion])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            Ok(Node { name: name.to_string(), child: cmd.spawn()?, status, log: log_path })
        };
        let stop_writing_file = dir.join("stop-writing");
        let mut pextra: Vec<String> = [
            ("--listen", paddr.to_string()),
            ("--spaces", args.spaces.to_string()),
            ("--rate", args.rate.to_string()),
            ("--entry-bytes", args.entry_bytes.to_string()),
            ("--total", total.to_string()),
            ("--compression", args.compression.to_string()),
            ("--seed", args.seed.to_string()),
            ("--stop-writing-file", stop_writing_file.to_string_lossy().into_owned()),
            ("--warmup", format!("{}us", args.warmup.as_micros())),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        if args.single_stream {
            pextra.push("--single-stream".into());
        }
        if let Some(w) = args.initial_window {
            pextra.extend(["--initial-window".into(), w.to_string()]);
        }
        if let Some(l) = args.linger {
            pextra.extend(["--linger".into(), format!("{}us", l.as_micros())]);
        }
        let primary = spawn("primary", "primary", pextra)?;
        let mut controls = Vec::new();
        let mut replicas = Vec::new();
        for name in &names {
            let addr = start_forwarder(paddr, imp, args.seed, name, &mut controls)?;
            replicas.push(spawn(name, "replica", vec!["--primary".into(), addr.to_string()])?);
        }
        println!(
            "loadtest --processes: primary pid {} on {paddr}, {} replica processes behind lossy_link forwarders, {total} entries",
            primary.child.id(),
            replicas.len(),
        );
        Ok(Nodes { primary, replicas, link: Link::Udp(controls), total, stop_writing_file })
    }

    /// What the write phase saw: the lag the primary reported for each replica, sampled from its
    /// status file, and when (by that file's clock) the writer was seen done.
    struct Sampled {
        lag_ms: Vec<Histogram<u64>>,
        started: Instant,
        write_time: Duration,
        writes_done: SystemTime,
    }

    /// Samples the primary's status until its writer has written everything, showing progress and
    /// following `--partition-at`.
    /// Samples the primary's status until its writer has written everything, or stopped after
    /// `stop_writing` was set (which then sets `nodes.total` to what it wrote).
    async fn sample_writes(
        args: &Args,
        nodes: &mut Nodes,
        console: &Console,
        stop_writing: &AtomicBool,
        interrupted: &AtomicBool,
    ) -> Result<Sampled, Failure> {
        let names: Vec<String> = nodes.replicas.iter().map(|r| r.name.clone()).collect();
        let mut lag_ms: Vec<Histogram<u64>> = names.iter().map(|_| common::lag_histogram()).collect();
        let started = Instant::now();
        let mut partitioned = false;
        // Since when the primary was told to stop writing, and what it had written at the last look.
        let mut stopping: Option<(Instant, u64)> = None;
        let writes_done = loop {
            nap(STATUS_EVERY, interrupted).await?;
            nodes.check_running()?;
            if stopping.is_none() && stop_writing.load(Ordering::SeqCst) {
                std::fs::write(&nodes.stop_writing_file, b"")?;
                stopping = Some((Instant::now(), u64::MAX));
            }
            let el = started.elapsed();
            if let Some(line) = nodes.link.follow_partition(args, el, &mut partitioned) {
                console.line(line);
            }
            let Some((p, mtime)) = nodes.primary.status() else { continue };
            let views = View::all(&p);
            for (i, name) in names.iter().enumerate() {
                if let Some(v) = views.iter().find(|v| &v.name == name).filter(|_| el >= args.warmup) {
                    lag_ms[i].saturating_record(v.lag_ms.max(1));
                }
            }
            console.progress(el, entries(&p), &views);
            if let Some(e) = p["writer"]["error"].as_str() {
                return Err(Failure {
                    message: format!("the primary's writer failed: {e}"),
                    log: Some(nodes.primary.log.clone()),
                    interrupted: false,
                });
            }
            if entries(&p) >= nodes.total {
                break mtime;
            }
            if let Some((since, seen)) = stopping.as_mut() {
                // Stopped: no new entry over a look at least two status periods after the file
                // appeared (the primary checks for it every period).
                if *seen == entries(&p) && since.elapsed() >= STATUS_EVERY * 3 {
                    nodes.total = entries(&p);
                    break mtime;
                }
                *seen = entries(&p);
            }
            if el > args.duration * 3 + Duration::from_secs(30) {
                return Err(format!("the primary wrote {} of {} entries in {el:?}", entries(&p), nodes.total).into());
            }
        };
        if partitioned {
            nodes.link.partition(false);
        }
        Ok(Sampled { lag_ms, started, write_time: started.elapsed(), writes_done })
    }

    /// Waits until every replica's status file shows the primary's logs. The time is measured
    /// between the status files' own timestamps (the primary's first showing every entry written,
    /// the last replica's first showing them all), each up to a status period plus a poll late:
    /// hence its resolution of two periods.
    async fn converge(
        args: &Args,
        nodes: &mut Nodes,
        writes_done: SystemTime,
        interrupted: &AtomicBool,
    ) -> Result<Convergence, Failure> {
        let stop_at = Instant::now();
        let after = loop {
            nodes.check_running()?;
            let p = nodes.primary.status().map(|(v, _)| logs(&v)).unwrap_or_default();
            let rs: Vec<_> = nodes.replicas.iter().map(|r| r.status().map(|(v, t)| (logs(&v), t))).collect();
            let same = rs.iter().all(|r| r.as_ref().is_some_and(|(l, _)| *l == p));
            if same && p.iter().map(|l| l.1).sum::<u64>() >= nodes.total {
                let last = rs.iter().flatten().map(|(_, t)| *t).max().unwrap_or(writes_done);
                break Some(last.duration_since(writes_done).unwrap_or(Duration::ZERO));
            }
            if stop_at.elapsed() > args.converge_timeout {
                break None;
            }
            nap(STATUS_EVERY, interrupted).await?;
        };
        Ok(Convergence {
            after,
            resolution: STATUS_EVERY * 2,
            how: "from the nodes' status files, rewritten every 100 ms",
        })
    }

    async fn run_nodes(
        args: &Args,
        imp: Impairment,
        bin_dir: &Path,
        dir: &Path,
        console: &Console,
        (stop_writing, abort): &(Arc<AtomicBool>, Arc<AtomicBool>),
    ) -> Result<Outcome, Failure> {
        let interrupted = abort.as_ref();
        let mut nodes = spawn_nodes(args, imp, bin_dir, dir)?;
        println!("{}", banner(args, &imp));
        let sampled = sample_writes(args, &mut nodes, console, stop_writing, interrupted).await?;
        console.bar.finish_and_clear();
        println!("writes done after {:.1}s; waiting for convergence ...", sampled.write_time.as_secs_f64());
        let convergence = converge(args, &mut nodes, sampled.writes_done, interrupted).await?;
        let elapsed = sampled.started.elapsed();
        let names: Vec<String> = nodes.replicas.iter().map(|r| r.name.clone()).collect();
        let read_primary = || nodes.primary.status().map(|(v, _)| v).unwrap_or(Value::Null);
        let settled = match convergence.after {
            Some(_) => settle_view(&names, STATUS_EVERY, read_primary, || interrupted.load(Ordering::SeqCst)).await,
            None => Settled::now(read_primary()),
        };
        if interrupted.load(Ordering::SeqCst) {
            return Err(Failure { message: "interrupted".into(), log: None, interrupted: true });
        }
        let p = &settled.status;
        let plogs = logs(p);
        let mut differences = Vec::new();
        let mut replicas = Vec::new();
        for (r, lag) in nodes.replicas.iter().zip(&sampled.lag_ms) {
            let rlogs = r.status().map(|(v, _)| logs(&v)).unwrap_or_default();
            for pl in plogs.iter().filter(|pl| !rlogs.contains(pl)) {
                differences.push(format!("{} {}: differs from the primary's {} {}", r.name, pl.0, pl.1, pl.2));
            }
            let held: u64 = rlogs.iter().map(|l| l.1).sum();
            replicas.push(ReplicaOutcome {
                name: r.name.clone(),
                entries: held,
                payload_bytes: held * args.entry_bytes as u64,
                // The primary's own record runs on until the replica caught up after the writes;
                // this tool's samples stop with the writes.
                lag_ms: Percentiles::from_json(&p["writer"]["lag_ms"][&r.name]).or(Some(Percentiles::of(lag, 1.0))),
                lag_source: format!(
                    "sampled from the primary's status every {} ms, {} (its oldest unacknowledged entry)",
                    STATUS_EVERY.as_millis(),
                    match p["writer"]["lag_ms"][&r.name].is_object() {
                        true => "until the replica caught up after the writes",
                        false => "while the writer ran",
                    }
                ),
                view: View::of(p, &r.name),
            });
        }
        Ok(Outcome {
            mode: "processes",
            interrupted: stop_writing.load(Ordering::SeqCst),
            differences,
            convergence,
            entries_written: plogs.iter().map(|l| l.1).sum(),
            write_time: sampled.write_time,
            elapsed,
            append_us: Percentiles::from_json(&p["writer"]["append_latency_us"]),
            cpu_seconds: None,
            replicas,
            view_waited: settled.waited,
            view_behind: settled.behind,
            link_stats: nodes.link.stats(),
            imp,
            min_compress_bytes: walship::codec::compression::DEFAULT_MIN_COMPRESS_BYTES,
        })
    }

    /// `--attach-primary`/`--attach-replica`: the load test of nodes that already run, on
    /// machines and links of their own; it reads their status (over HTTP or from files) and
    /// changes nothing. The primary binary records what only it can see whole, however late this
    /// tool attaches: its writer's progress and append latency, each replica's lag, and when each
    /// replica caught up after the writes ended (its `writer` status).
    pub mod attach {
        use super::*;

        /// How often the nodes' status is read.
        const POLL: Duration = Duration::from_millis(100);
        /// How long a node's status may stay unreadable (not up yet, a restart, a network blip)
        /// before the run gives up on it.
        const UNREADABLE_FOR: Duration = Duration::from_secs(30);
        /// How long the primary's writer may take to start, or go without writing, before the run fails.
        const WRITER_STALL: Duration = Duration::from_secs(120);
        /// How long after the writes a replica may stay unknown to the primary (still connecting).
        const UNKNOWN_FOR: Duration = Duration::from_secs(10);
        /// A status file this much older than its node's `--status-every` (times 3) is stale: the
        /// node is not running.
        const STALE_GRACE: Duration = Duration::from_secs(2);

        /// A duration in seconds from a status document; zero if missing, negative or absurd.
        fn secs(v: &Value) -> Duration {
            v.as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok()).unwrap_or_default()
        }

        /// Fails if `p` comes from another run of the primary than `run_id` (it restarted).
        fn same_run(p: &Value, run_id: &Value) -> Result<(), String> {
            match &p["config"]["run_id"] == run_id {
                true => Ok(()),
                false => Err(format!(
                    "the primary restarted (run {} became {}): start the run again",
                    run_id, p["config"]["run_id"]
                )),
            }
        }

        /// Where a node's status is read.
        enum Source {
            Http(String),
            File(PathBuf),
        }

        impl Source {
            fn parse(s: &str) -> Result<Source, String> {
                if s.starts_with("http://") {
                    return Ok(Source::Http(s.to_string()));
                }
                if let Some((scheme, _)) = s.split_once("://") {
                    return Err(format!(
                        "{s}: {scheme}:// is not supported: give http://HOST:PORT (the node's --status-addr) or a status file path"
                    ));
                }
                let host_port = s.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains('/')
                        && !port.is_empty()
                        && port.bytes().all(|b| b.is_ascii_digit())
                });
                if host_port && !Path::new(s).exists() {
                    return Err(format!("{s}: looks like an address; write http://{s}"));
                }
                Ok(Source::File(PathBuf::from(s)))
            }
        }

        impl std::fmt::Display for Source {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self {
                    Source::Http(url) => write!(f, "{url}"),
                    Source::File(path) => write!(f, "{}", path.display()),
                }
            }
        }

        /// A node this run watches, and since when its status could not be read.
        struct Watched {
            source: Source,
            failing_since: Option<Instant>,
        }

        impl Watched {
            /// The status, or why not and whether trying again may help.
            async fn read(&self) -> Result<Value, common::status_http::FetchError> {
                use common::status_http::FetchError;
                let path = match &self.source {
                    Source::Http(url) => return common::status_http::fetch(url).await,
                    Source::File(path) => path,
                };
                let retry = |message: String| FetchError { message, retry: true };
                // Opened once, so the document and its time are of one version (nodes replace it by a rename).
                let mut f = std::fs::File::open(path).map_err(|e| retry(format!("{}: {e}", path.display())))?;
                let mtime =
                    f.metadata().and_then(|m| m.modified()).map_err(|e| retry(format!("{}: {e}", path.display())))?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut bytes)
                    .map_err(|e| retry(format!("{}: {e}", path.display())))?;
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| FetchError {
                    message: format!("{}: not a status document: {e}", path.display()),
                    retry: bytes.is_empty(),
                })?;
                let period = Duration::from_millis(v["status_every_ms"].as_u64().unwrap_or(1000));
                let age = std::time::SystemTime::now().duration_since(mtime).unwrap_or_default();
                if age > period * 3 + STALE_GRACE {
                    return Err(retry(format!(
                        "{}: not updated for {:.0} s: is the node running?",
                        path.display(),
                        age.as_secs_f64()
                    )));
                }
                Ok(v)
            }

            /// Its status; `None` while it has been unreadable for less than [`UNREADABLE_FOR`]
            /// (said once, when that starts); an error once longer, or at once if trying again
            /// cannot help.
            async fn look(&mut self, console: &Console) -> Result<Option<Value>, String> {
                match self.read().await {
                    Ok(v) => {
                        self.failing_since = None;
                        Ok(Some(v))
                    }
                    Err(e) if !e.retry => Err(e.message),
                    Err(e) => {
                        let since = *self.failing_since.get_or_insert_with(|| {
                            console.line(format!(
                                "waiting for {} ({}; up to {} s)",
                                self.source,
                                e.message,
                                UNREADABLE_FOR.as_secs()
                            ));
                            Instant::now()
                        });
                        match since.elapsed() > UNREADABLE_FOR {
                            true => Err(format!("{} (unreadable for {} s)", e.message, UNREADABLE_FOR.as_secs())),
                            false => Ok(None),
                        }
                    }
                }
            }

            /// Its first status, waiting up to [`UNREADABLE_FOR`] for it, so this tool may be started
            /// before the nodes.
            async fn first_look(&mut self, console: &Console, interrupted: &AtomicBool) -> Result<Value, String> {
                loop {
                    if let Some(v) = self.look(console).await? {
                        return Ok(v);
                    }
                    nap(POLL, interrupted).await.map_err(|f| f.message)?;
                }
            }
        }

        /// The run's settings, as the attached primary reports them, put where the report reads them.
        fn adopt_settings(args: &mut Args, p: &Value, replicas: usize) -> Result<u64, String> {
            let w = &p["writer"];
            if w.is_null() {
                return Err("the primary has no built-in writer: start it with --spaces N --rate R --total T \
                            (and --wait-for-replicas N to start writing once the replicas are connected)"
                    .into());
            }
            let total = w["total"].as_u64().ok_or(
                "the primary's writer has no --total: its writes never end, so there is nothing to converge on",
            )?;
            let c = &p["config"];
            let text =
                |v: &Value, key: &str| v[key].as_str().map(str::to_string).ok_or(format!("no {key} in the status"));
            args.replicas = replicas;
            args.spaces = w["spaces"].as_u64().unwrap_or(0) as usize;
            args.rate = w["rate"].as_u64().unwrap_or(0);
            args.entry_bytes = w["entry_bytes"].as_u64().unwrap_or(0) as usize;
            args.seed = w["seed"].as_u64().unwrap_or(0);
            args.warmup = secs(&w["warmup_s"]);
            // Until the run is over (the progress bar's length); then what it took.
            args.duration = match args.rate {
                0 => Duration::from_secs(30),
                r => Duration::from_secs_f64(total as f64 / r as f64),
            };
            args.compression = text(c, "compression")?.parse().map_err(|e| format!("compression: {e}"))?;
            args.sync = common::parse_sync(&text(c, "sync")?)?;
            args.congestion =
                serde_json::from_value(c["congestion"].clone()).map_err(|e| format!("congestion: {e}"))?;
            args.initial_window = c["initial_window"].as_u64();
            args.linger = c["linger_ms"].as_f64().map(|ms| secs(&json!(ms / 1e3)));
            args.single_stream = c["single_stream"].as_bool().unwrap_or(false);
            Ok(total)
        }

        pub async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
            let primary = Source::parse(args.attach_primary.as_deref().unwrap_or_default())?;
            let replicas = args.attach_replica.iter().map(|s| Source::parse(s)).collect::<Result<Vec<_>, _>>()?;
            let watched = |source| Watched { source, failing_since: None };
            let unclaimed = Leftovers { dir: None, report: claim_report_file(&args)? };
            let console = Console::new(args.quiet, args.duration)?;
            let interrupted = watch_signals(
                &console,
                "interrupted: no report; the attached nodes go on running (Ctrl-C again to quit at once)",
                Some(Leftovers { dir: None, report: unclaimed.report.clone() }),
            )?;
            let result =
                watch(args, watched(primary), replicas.into_iter().map(watched).collect(), &console, &interrupted)
                    .await;
            console.bar.finish_and_clear();
            if result.is_err() {
                unclaimed.remove();
            }
            if result.is_err() && interrupted.load(Ordering::SeqCst) {
                eprintln!("loadtest: interrupted: no report; the attached nodes go on running");
                std::process::exit(130);
            }
            result
        }

        /// The primary's writer, as its status shows it.
        struct WriterView {
            written: u64,
            elapsed: Duration,
            done: bool,
        }

        impl WriterView {
            fn of(p: &Value) -> WriterView {
                let w = &p["writer"];
                WriterView {
                    written: w["written"].as_u64().unwrap_or(0),
                    elapsed: secs(&w["elapsed_s"]),
                    done: w["done"].as_bool().unwrap_or(false),
                }
            }
        }

        /// Follows the attached nodes through the writes and the catch-up after them, then
        /// verifies and reports.
        async fn watch(
            mut args: Args,
            mut primary: Watched,
            mut replicas: Vec<Watched>,
            console: &Console,
            interrupted: &AtomicBool,
        ) -> Result<bool, Box<dyn std::error::Error>> {
            let p = primary.first_look(console, interrupted).await?;
            if p["role"] != "primary" || p["config"].is_null() {
                return Err(format!(
                    "{}: not the status of a `primary` binary of this version (role {}, config {})",
                    primary.source,
                    p["role"],
                    if p["config"].is_null() { "missing" } else { "present" }
                )
                .into());
            }
            let total = adopt_settings(&mut args, &p, replicas.len())?;
            let mut names = Vec::new();
            for r in replicas.iter_mut() {
                let v = r.first_look(console, interrupted).await?;
                let name = v["name"].as_str().unwrap_or_default().to_string();
                if v["role"] != "replica" || name.is_empty() {
                    return Err(
                        format!("{}: not the status of a `replica` binary (role {})", r.source, v["role"]).into()
                    );
                }
                if names.contains(&name) {
                    return Err(format!("{}: a second status of replica {name}", r.source).into());
                }
                names.push(name);
            }
            console.bar.set_length(args.duration.as_millis() as u64);
            println!(
                "loadtest --attach: primary {} at {}: {} entries of {} bytes over {} spaces at {} entries/s, compression {}, sync {}, {}; replicas {}; the link is as deployed",
                p["name"].as_str().unwrap_or("?"),
                primary.source,
                total,
                args.entry_bytes,
                args.spaces,
                if args.rate == 0 { "max".to_string() } else { args.rate.to_string() },
                codec_name(args.compression),
                sync_name(args.sync),
                if args.single_stream { "all spaces on one multiplexed stream" } else { "one stream per space" },
                names.iter().zip(&replicas).map(|(n, r)| format!("{n} at {}", r.source)).collect::<Vec<_>>().join(", "),
            );
            let run_id = p["config"]["run_id"].clone();
            follow_writer(&mut primary, &run_id, console, interrupted).await?;
            console.bar.finish_and_clear();
            println!("writes done (by the primary's writer); waiting for the replicas to catch up ...");
            let ended = converge(&args, &mut primary, &run_id, &mut replicas, &names, console, interrupted).await?;
            let p = &ended.primary;
            // The writer's final figures, from a status taken after it was done.
            let writer = WriterView::of(p);
            // The primary's clock: from the end of the writes to its first status showing the
            // replica caught up (the last replica's).
            let caught_up = &p["writer"]["caught_up_ms"];
            let after = names
                .iter()
                .map(|n| caught_up[n].as_u64().map(Duration::from_millis))
                .collect::<Option<Vec<_>>>()
                .map(|d| d.into_iter().max().unwrap_or_default())
                .filter(|_| ended.differences.is_empty());
            let plogs = logs(p);
            let in_logs: u64 = plogs.iter().map(|l| l.1).sum();
            let mut outcomes = Vec::new();
            for (name, status) in names.iter().zip(&ended.replicas) {
                let missing = in_logs.saturating_sub(status.as_ref().map_or(0, entries));
                let delivered = writer.written.saturating_sub(missing);
                outcomes.push(ReplicaOutcome {
                    name: name.clone(),
                    entries: delivered,
                    payload_bytes: delivered * args.entry_bytes as u64,
                    lag_ms: Percentiles::from_json(&p["writer"]["lag_ms"][name]),
                    lag_source: format!(
                        "sampled by the primary from its status every {} ms, from the start of the writes until the replica caught up (its oldest unacknowledged entry)",
                        p["status_every_ms"]
                    ),
                    view: View::of(p, name),
                });
            }
            // Only for a converged run: otherwise the differences say more.
            let behind: Vec<String> = names
                .iter()
                .filter(|_| ended.differences.is_empty())
                .filter(|n| !View::of(p, n).is_some_and(|v| v.caught_up()))
                .map(|n| match View::of(p, n) {
                    Some(v) => format!("{n} {} ({} entries, {} ms behind)", v.state, v.lag_entries, v.lag_ms),
                    None => format!("{n} unknown to the primary"),
                })
                .collect();
            let resolution = Duration::from_millis(p["status_every_ms"].as_u64().unwrap_or(1000));
            if args.rate == 0 {
                args.duration = writer.elapsed;
            }
            let outcome = Outcome {
                mode: "attached",
                interrupted: writer.written < total,
                differences: ended.differences,
                convergence: Convergence {
                    after,
                    resolution,
                    how: "by the primary, from its status every --status-every",
                },
                entries_written: writer.written,
                write_time: writer.elapsed,
                elapsed: writer.elapsed + after.unwrap_or(ended.waited),
                append_us: Percentiles::from_json(&p["writer"]["append_latency_us"]),
                cpu_seconds: None,
                replicas: outcomes,
                view_waited: Duration::ZERO,
                view_behind: behind,
                link_stats: netsim::LinkStats::default(),
                imp: Impairment::default(),
                min_compress_bytes: walship::codec::compression::DEFAULT_MIN_COMPRESS_BYTES,
            };
            report(&args, &outcome)
        }

        /// Follows the primary's writer until it is done; fails if it fails, restarts or stalls.
        async fn follow_writer(
            primary: &mut Watched,
            run_id: &Value,
            console: &Console,
            interrupted: &AtomicBool,
        ) -> Result<(), String> {
            let mut last = WriterView { written: 0, elapsed: Duration::ZERO, done: false };
            let mut progress_at = Instant::now();
            loop {
                let Some(p) = primary.look(console).await? else {
                    nap(POLL, interrupted).await.map_err(|f| f.message)?;
                    continue;
                };
                same_run(&p, run_id)?;
                let w = WriterView::of(&p);
                if w.written < last.written || w.elapsed < last.elapsed {
                    return Err(format!(
                        "the primary restarted (its writer went from {} entries to {}): start the run again",
                        last.written, w.written
                    ));
                }
                if let Some(e) = p["writer"]["error"].as_str() {
                    return Err(format!("the primary's writer failed after {} entries: {e}", w.written));
                }
                console.progress(w.elapsed, w.written, &View::all(&p));
                if w.done {
                    if w.written < p["writer"]["total"].as_u64().unwrap_or(0) {
                        console.line(format!("the primary's writer stopped early, after {} entries", w.written));
                    }
                    return Ok(());
                }
                if w.written != last.written {
                    progress_at = Instant::now();
                } else if progress_at.elapsed() > WRITER_STALL {
                    let waits = match p["writer"]["started"].as_bool() {
                        Some(false) => format!(
                            "; it has not started: it waits for {} connected replica(s)",
                            p["writer"]["wait_for_replicas"].as_u64().unwrap_or(0)
                        ),
                        _ => String::new(),
                    };
                    return Err(format!(
                        "the primary's writer has written nothing for {} s ({} entries so far{waits})",
                        WRITER_STALL.as_secs(),
                        w.written
                    ));
                }
                last = w;
                nap(POLL, interrupted).await.map_err(|f| f.message)?;
            }
        }

        /// How the wait for the replicas ended.
        struct Ended {
            /// The primary's last status.
            primary: Value,
            /// Each replica's last status, if one was read.
            replicas: Vec<Option<Value>>,
            /// Why the logs are not verified, if they are not.
            differences: Vec<String>,
            /// How long this tool waited.
            waited: Duration,
        }

        /// Waits until the primary has seen every replica caught up and every replica's logs equal
        /// its own, or a replica reports an error, becomes unreadable, or `--converge-timeout`.
        #[allow(clippy::too_many_arguments)]
        async fn converge(
            args: &Args,
            primary: &mut Watched,
            run_id: &Value,
            replicas: &mut [Watched],
            names: &[String],
            console: &Console,
            interrupted: &AtomicBool,
        ) -> Result<Ended, String> {
            let start = Instant::now();
            let mut last: Vec<Option<Value>> = vec![None; replicas.len()];
            let mut p = Value::Null;
            loop {
                nap(POLL, interrupted).await.map_err(|f| f.message)?;
                if let Some(v) = primary.look(console).await? {
                    same_run(&v, run_id)?;
                    p = v;
                }
                let mut fatal = Vec::new();
                // A replica the primary has not heard of by now belongs to another primary.
                if start.elapsed() > UNKNOWN_FOR {
                    for name in names.iter().filter(|n| View::of(&p, n).is_none()) {
                        fatal.push(format!("{name} is unknown to the primary: a replica of another primary?"));
                    }
                }
                for (i, r) in replicas.iter_mut().enumerate() {
                    match r.look(console).await {
                        Ok(Some(v)) => last[i] = Some(v),
                        Ok(None) => {}
                        Err(e) => fatal.push(format!("{}: {e}", names[i])),
                    }
                }
                // Errors that waiting will not cure: a space refused (diverged, truncated).
                for (name, status) in names.iter().zip(&last) {
                    let theirs = status.as_ref().map(|v| &v["spaces"]);
                    let ours = p["replicas"].as_array().and_then(|a| a.iter().find(|r| r["name"] == name.as_str()));
                    for space in theirs.and_then(Value::as_array).into_iter().flatten() {
                        if let Some(e) = space["error"].as_str() {
                            fatal.push(format!("{name} {}: {e}", space["space"].as_str().unwrap_or("?")));
                        }
                    }
                    for space in ours.and_then(|r| r["spaces"].as_array()).into_iter().flatten() {
                        if let Some(e) = space["error"].as_str() {
                            fatal.push(format!(
                                "{name} {} (the primary says): {e}",
                                space["space"].as_str().unwrap_or("?")
                            ));
                        }
                    }
                }
                let plogs = logs(&p);
                let caught_up = &p["writer"]["caught_up_ms"];
                let done = names
                    .iter()
                    .zip(&last)
                    .all(|(n, r)| caught_up[n].is_u64() && r.as_ref().is_some_and(|v| logs(v) == plogs));
                let timed_out = start.elapsed() > args.converge_timeout;
                if done || timed_out || !fatal.is_empty() {
                    let mut differences = fatal;
                    if !done {
                        for (name, status) in names.iter().zip(&last) {
                            let rlogs = status.as_ref().map(logs).unwrap_or_default();
                            for pl in plogs.iter().filter(|pl| !rlogs.contains(pl)) {
                                differences
                                    .push(format!("{name} {}: differs from the primary's {} {}", pl.0, pl.1, pl.2));
                            }
                            if View::of(&p, name).is_some() && !caught_up[name].is_u64() {
                                differences.push(format!("{name} never caught up in the primary's view"));
                            }
                        }
                        if timed_out {
                            differences
                                .push(format!("not converged after --converge-timeout {:?}", args.converge_timeout));
                        }
                    }
                    return Ok(Ended { primary: p, replicas: last, differences, waited: start.elapsed() });
                }
            }
        }

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn status_sources_are_http_addresses_or_files() {
                assert!(matches!(Source::parse("http://10.0.0.1:7401"), Ok(Source::Http(_))));
                assert!(matches!(Source::parse("/var/tmp/p.json"), Ok(Source::File(_))));
                assert!(matches!(Source::parse("p.json"), Ok(Source::File(_))));
                let e = Source::parse("10.0.0.1:7401").err().unwrap_or_default();
                assert!(e.contains("http://10.0.0.1:7401"), "{e}");
                assert!(Source::parse("https://10.0.0.1:7401").is_err());
            }

            #[test]
            fn odd_numbers_in_a_status_read_as_zero() {
                assert_eq!(secs(&json!(-1.0)), Duration::ZERO);
                assert_eq!(secs(&json!(1e300)), Duration::ZERO);
                assert_eq!(secs(&json!("x")), Duration::ZERO);
                assert_eq!(secs(&json!(1.5)), Duration::from_millis(1500));
            }

            #[test]
            fn a_new_run_id_is_a_restart() {
                let p = json!({ "config": { "run_id": "1-2" } });
                assert!(same_run(&p, &json!("1-2")).is_ok());
                assert!(same_run(&p, &json!("1-3")).is_err());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id in `ATTACH_CONFLICTS` names a flag (clap checks that only in debug builds).
    #[test]
    fn attach_conflicts_name_flags() {
        use clap::CommandFactory;
        let cmd = Args::command();
        let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        for id in ATTACH_CONFLICTS {
            assert!(ids.contains(&id), "{id} is not a flag of loadtest");
        }
    }

    #[test]
    fn attach_mode_refuses_what_the_primary_decides() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["loadtest", "--attach-primary", "http://h:1", "--attach-replica", "http://h:2"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv)
        };
        assert!(parse(&[]).is_ok());
        for flag in [["--rate", "5"], ["--warmup", "1s"], ["--loss", "1%"], ["--spaces", "3"]] {
            assert!(parse(&flag).is_err(), "{flag:?} accepted");
        }
        assert!(parse(&["--converge-timeout", "5s", "--quiet"]).is_ok());
    }
}
