//! A primary node: serves its spaces' WALs to replicas, with an optional built-in writer.
//!
//! ```text
//! cargo run --release --example primary -- --listen 127.0.0.1:7400 --data /tmp/p --certs certs/dev \
//!     --name primary [--spaces 16 --rate 10000 --entry-bytes 128 --total 100000] [--status-file p.json]
//! ```

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use walship::codec::Compression;
use walship::config::{PrimaryConfig, ReplicaAddr};
use walship::net::status::PrimaryStatus;
use walship::net::tls::NodeIdentity;
use walship::protocol::health::Health;
use walship::{Epoch, Primary};

#[derive(Parser, Debug)]
#[command(about = "walship primary: ships every space's WAL to its replicas over QUIC")]
struct Args {
    /// Address to listen on for replicas (IP:PORT or HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7400", value_parser = common::parse_addr)]
    listen: SocketAddr,
    /// Data folder (one sub-folder per space).
    #[arg(long)]
    data: PathBuf,
    /// Certificates folder written by `gen_certs` (ca.pem, NAME.pem, NAME.key).
    #[arg(long)]
    certs: PathBuf,
    /// This node's name (its certificate's name).
    #[arg(long, default_value = "primary")]
    name: String,
    /// Spaces for the built-in writer (0: no writer).
    #[arg(long, default_value_t = 0)]
    spaces: usize,
    /// Entries per second of the built-in writer, or `max` (also 0) for as fast as possible.
    #[arg(long, default_value = "1000", value_parser = parse_write_rate)]
    rate: u64,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128)]
    entry_bytes: usize,
    /// Stop writing after this many entries (and go on serving replicas until stopped).
    #[arg(long)]
    total: Option<u64>,
    /// Stop writing (and go on serving replicas) once this file exists: how a load test ends the
    /// writes of a run it was told to cut short. Checked every --status-every.
    #[arg(long)]
    stop_writing_file: Option<std::path::PathBuf>,
    /// Epoch of this primary.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Batch compression: none, lz4, zstd, zstd:LEVEL.
    #[arg(long, default_value = "lz4")]
    compression: Compression,
    /// WAL durability: never, always, interval:10ms.
    #[arg(long, default_value = "interval:10ms", value_parser = common::parse_sync)]
    sync: walship::wal::SyncPolicy,
    /// A replica to dial, as NAME=ADDR (repeatable), for replicas that wait for their primary.
    #[arg(long, value_parser = parse_dial)]
    dial: Vec<ReplicaAddr>,
    #[command(flatten)]
    report: common::report::ReportFlags,
    /// Congestion controller: bbr, cubic or newreno.
    #[arg(long, default_value = "bbr")]
    congestion: walship::net::endpoint::CongestionControl,
    /// Congestion window of a new connection (e.g. 1MB, about the link's bandwidth-delay product);
    /// default: quinn's (240 KB with BBR). See `TransportSettings::initial_window`.
    #[arg(long, value_parser = common::parse_bytes)]
    initial_window: Option<u64>,
    /// Wait this long after new entries before shipping them, so batches grow (and compress):
    /// adds as much lag. See `PrimaryConfig::linger`.
    #[arg(long, value_parser = walship::netsim::parse_duration)]
    linger: Option<std::time::Duration>,
    /// Multiplex every space onto one stream (head-of-line comparisons only).
    #[arg(long)]
    single_stream: bool,
    /// Seed of the built-in writer's payloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start the built-in writer only once this many replicas are connected (a load test attached
    /// to this node then times the whole run).
    #[arg(long, default_value_t = 0)]
    wait_for_replicas: usize,
    /// Leave the built-in writer's appends of this first part of its run out of the append
    /// latency it reports (the status file's `writer.append_latency_us`).
    #[arg(long, default_value = "0s", value_parser = walship::netsim::parse_duration)]
    warmup: Duration,
}

/// Entries per second, or `max` (0 too) for as fast as possible, as `loadtest --rate` takes it.
fn parse_write_rate(s: &str) -> Result<u64, String> {
    match s {
        "max" => Ok(0),
        _ => s.parse().map_err(|_| format!("bad rate {s:?}: entries per second, or `max` for as fast as possible")),
    }
}

fn parse_dial(s: &str) -> Result<ReplicaAddr, String> {
    let (name, addr) = s.split_once('=').ok_or("use NAME=ADDR")?;
    Ok(ReplicaAddr { name: name.to_string(), addr: addr.parse().map_err(|e| format!("{addr}: {e}"))? })
}

/// What the status file holds besides the primary's own status: the settings a load test reports
/// (`config`), and the built-in writer's plan and progress with its append latency (`writer`,
/// `null` without a writer). `loadtest --processes` and `--attach-primary` read both.
fn extra(args: &Args, writer: Option<&common::writer::WriterStats>, run: &RunRecord) -> Vec<(&'static str, Value)> {
    let config = json!({
        "run_id": run.run_id,
        "compression": args.compression.to_string(),
        "sync": common::sync_flag(args.sync),
        "congestion": args.congestion,
        "initial_window": args.initial_window,
        "linger_ms": args.linger.map(|d| d.as_secs_f64() * 1e3),
        "single_stream": args.single_stream,
    });
    // The plan from the start (so an attached load test knows it before the writer starts),
    // progress once it runs.
    let writer = (args.spaces > 0).then(|| {
        let latency = writer
            .and_then(|w| w.append_latencies())
            .filter(|h| !h.is_empty())
            .map(|h| common::percentiles_json(&h, 1e3));
        // `done` first (Acquire): once true, the counts read after it are final.
        let done = writer.is_some_and(|w| w.done.load(Ordering::Acquire));
        let progress = |f: fn(&common::writer::WriterStats) -> u64| writer.map_or(0, f);
        let lag: serde_json::Map<String, Value> =
            run.lag_ms.iter().map(|(name, h)| (name.clone(), common::percentiles_json(h, 1.0))).collect();
        json!({
            "spaces": args.spaces,
            "rate": args.rate,
            "entry_bytes": args.entry_bytes,
            "total": args.total,
            "seed": args.seed,
            "wait_for_replicas": args.wait_for_replicas,
            "started": writer.is_some(),
            "written": progress(|w| w.written.load(Ordering::Relaxed)),
            "elapsed_s": progress(|w| w.elapsed_us.load(Ordering::Relaxed)) as f64 / 1e6,
            "done": done,
            "error": writer.and_then(|w| w.error.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            "warmup_s": args.warmup.as_secs_f64(),
            "append_latency_us": latency,
            // Sampled from this node's status every --status-every, from the writer's start (after
            // --warmup) until the replica caught up after the writes ended.
            "lag_ms": lag,
            // Per replica: ms from the end of the writes to the first status showing it caught up.
            "caught_up_ms": run.caught_up_ms,
        })
    });
    vec![("config", config), ("writer", writer.unwrap_or(Value::Null))]
}

/// What this node records of its writer's run, for a load test attached to it (which may attach
/// late): each replica's lag as every status shows it, and how long after the writes ended each
/// replica was first seen caught up.
struct RunRecord {
    /// Tells this process's run from another's on the same address (a restarted node).
    run_id: String,
    /// Lag in ms per replica, from the writer's start (after `--warmup`) until it caught up.
    lag_ms: BTreeMap<String, Histogram<u64>>,
    /// Per replica: from the end of the writes to the first status showing it caught up.
    caught_up_ms: BTreeMap<String, u64>,
    /// Whether a writer failure was printed.
    told_failure: bool,
}

impl RunRecord {
    fn new() -> RunRecord {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        RunRecord {
            run_id: format!("{}-{}", std::process::id(), since_epoch.as_millis()),
            lag_ms: BTreeMap::new(),
            caught_up_ms: BTreeMap::new(),
            told_failure: false,
        }
    }

    /// Records what `status`, taken at `taken_at`, shows; `done` is the writer's state loaded
    /// before it was taken (so a status counted as after the writes is after all of them).
    fn observe(
        &mut self,
        status: &PrimaryStatus,
        taken_at: Instant,
        writer: &common::writer::WriterStats,
        done: bool,
        warmup: Duration,
    ) {
        if done {
            if let (false, Some(e)) =
                (self.told_failure, writer.error.lock().unwrap_or_else(|p| p.into_inner()).as_ref())
            {
                eprintln!("writer failed after {} entries: {e}", writer.written.load(Ordering::Relaxed));
                self.told_failure = true;
            }
        }
        let timed = writer.elapsed_us.load(Ordering::Relaxed) >= warmup.as_micros() as u64;
        for r in &status.replicas {
            if self.caught_up_ms.contains_key(&r.name) {
                continue;
            }
            let finished = writer.finished_at.get().filter(|_| done);
            if let Some(finished) = finished.filter(|_| r.state == Health::Healthy && r.max_lag.entries == 0) {
                self.caught_up_ms
                    .insert(r.name.clone(), taken_at.saturating_duration_since(*finished).as_millis() as u64);
            } else if timed {
                let h = self.lag_ms.entry(r.name.clone()).or_insert_with(common::lag_histogram);
                h.saturating_record(r.max_lag.ms.max(1));
            }
        }
    }
}

#[tokio::main]
async fn main() {
    common::init_tracing();
    common::raise_fd_limit();
    common::exit_on_error("primary", run(Args::parse())).await;
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.report.check_status_file()?;
    if let Some(f) = args.stop_writing_file.as_ref().filter(|f| f.exists()) {
        return Err(format!(
            "--stop-writing-file {} exists already (left by an earlier run?): the writer would never start; remove it",
            f.display()
        )
        .into());
    }
    let identity = NodeIdentity::load(&args.certs, &args.name)?;
    let mut config = PrimaryConfig::new(&args.name, args.listen, &args.data);
    config.epoch = Epoch(args.epoch);
    config.compression = args.compression;
    config.wal.sync = args.sync;
    config.dial_replicas = args.dial.clone();
    config.transport.congestion = args.congestion;
    config.transport.initial_window = args.initial_window;
    config.single_stream = args.single_stream;
    config.linger = args.linger;
    let primary = Primary::start(config, identity).await?;
    let reporter = args.report.start().await?;
    println!("primary {} listening on {} (data {})", args.name, primary.local_addr(), args.data.display());
    // Replicas kept from before a restart: retention counts them until they are back or forgotten.
    let known: Vec<String> = primary.status().replicas.into_iter().map(|r| r.name).collect();
    if !known.is_empty() {
        println!("known replicas from before: {} (counted for retention until they are back)", known.join(", "));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut plan = match args.spaces {
        0 => None,
        n => Some(common::writer::WriterPlan {
            spaces: common::space_names(n).iter().map(|s| primary.space(s)).collect::<Result<Vec<_>, _>>()?,
            epoch: Epoch(args.epoch),
            rate: args.rate,
            entry_bytes: args.entry_bytes,
            total: args.total,
            seed: args.seed,
            // Reading the clock around each append costs tens of nanoseconds, against a
            // microsecond or more for the append itself.
            time_appends_after: Some(args.warmup),
        }),
    };
    if plan.is_some() && args.wait_for_replicas > 0 {
        println!("the writer starts once {} replica(s) are connected", args.wait_for_replicas);
    }
    let mut writer: Option<common::writer::Writer> = None;
    let mut run = RunRecord::new();

    let mut last_written = 0;
    common::every_until_signal(args.report.status_every, |elapsed, new_second| {
        if args.stop_writing_file.as_ref().is_some_and(|f| f.exists()) && !stop.swap(true, Ordering::Relaxed) {
            println!(
                "writes stopped: {} exists",
                args.stop_writing_file.as_ref().map_or(String::new(), |f| f.display().to_string())
            );
        }
        // The writer's state before the status, so that "done" covers every append it shows.
        let done = writer.as_ref().is_some_and(|w| w.stats.done.load(Ordering::Acquire));
        let status = primary.status();
        let taken_at = Instant::now();
        let connected = status.replicas.iter().filter(|r| r.state != Health::Disconnected).count();
        if connected >= args.wait_for_replicas && !stop.load(Ordering::Relaxed) {
            if let Some(plan) = plan.take() {
                writer = Some(common::writer::spawn_writer(plan, stop.clone()));
            }
        }
        if let Some(w) = &writer {
            run.observe(&status, taken_at, &w.stats, done, args.warmup);
        }
        reporter.publish(
            &status,
            extra(&args, writer.as_ref().map(|w| &*w.stats), &run),
            status.spaces.len(),
            walship::net::metrics::record_primary,
        );
        if !new_second {
            return;
        }
        let written = writer.as_ref().map_or(0, |w| w.stats.written.load(Ordering::Relaxed));
        let replicas: Vec<String> = status
            .replicas
            .iter()
            .map(|r| format!("{}={} lag {} entries/{} ms", r.name, r.state, r.max_lag.entries, r.max_lag.ms))
            .collect();
        println!(
            "[{:>5.0}s] spaces {} written {} (+{}/s) | {}",
            elapsed.as_secs_f64(),
            status.spaces.len(),
            written,
            written - last_written,
            if replicas.is_empty() { "no replicas".to_string() } else { replicas.join(", ") }
        );
        last_written = written;
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let writer = writer.map(|common::writer::Writer { stats, thread }| {
        match thread.join() {
            Ok(Ok(_)) => {}
            // Told by `RunRecord::observe` already, unless it failed at the very end.
            Ok(Err(e)) if !run.told_failure => eprintln!("writer failed: {e}"),
            Ok(Err(_)) => {}
            Err(_) => eprintln!("writer thread panicked"),
        }
        stats
    });
    let status = primary.status();
    primary.shutdown().await;
    let mut last = extra(&args, writer.as_deref(), &run);
    last.push(("stopped", Value::Bool(true)));
    reporter.publish(&status, last, status.spaces.len(), walship::net::metrics::record_primary);
    println!("primary stopped");
    Ok(())
}
