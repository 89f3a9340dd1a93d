//! The run's report: one [`Outcome`] per run, whatever the mode, turned into the JSON of
//! `--report-json` (whose keys scripts read) and the human summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use walship::codec::batch::ENTRY_HEADER_LEN;
use walship::codec::Compression;
use walship::netsim::{self, Impairment};
use walship::wal::SyncPolicy;

use crate::view::{View, SETTLE_TIMEOUT};
use crate::Args;

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

/// The codec as people write it: `none`, `lz4`, `zstd level 1`.
pub fn codec_name(c: Compression) -> String {
    match c {
        Compression::Zstd { level } => format!("zstd level {level}"),
        other => other.codec().name().to_string(),
    }
}

/// The `--sync` value that gives `policy`: `never`, `always`, `interval:10ms`.
pub fn sync_name(policy: SyncPolicy) -> String {
    match policy {
        SyncPolicy::Never => "never".into(),
        SyncPolicy::Always => "always".into(),
        SyncPolicy::Interval(d) if d.subsec_nanos() % 1_000_000 == 0 => format!("interval:{}ms", d.as_millis()),
        SyncPolicy::Interval(d) => format!("interval:{}us", d.as_micros()),
    }
}

/// p50, p99, p999 and max of a histogram, divided by `unit` (e.g. µs recorded, ms reported: 1e3).
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>, unit: f64) -> Percentiles {
        let q = |q: f64| h.value_at_quantile(q) as f64 / unit;
        Percentiles { p50: q(0.5), p99: q(0.99), p999: q(0.999), max: h.max() as f64 / unit }
    }

    pub fn json(&self) -> Value {
        json!({ "p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max })
    }

    /// Read back from [`Percentiles::json`]'s keys (as the `primary` binary's status file gives
    /// its writer's append latency); `None` if any is missing.
    pub fn from_json(v: &Value) -> Option<Percentiles> {
        let f = |k: &str| v[k].as_f64();
        Some(Percentiles { p50: f("p50")?, p99: f("p99")?, p999: f("p999")?, max: f("max")? })
    }
}

/// How one replica did.
pub struct ReplicaOutcome {
    pub name: String,
    /// Entries it holds (in process: applied through its hook).
    pub entries: u64,
    pub payload_bytes: u64,
    /// From append to durable on the replica, in ms.
    pub lag_ms: Option<Percentiles>,
    /// How `lag_ms` was measured.
    pub lag_source: String,
    /// The primary's view of it at the end.
    pub view: Option<View>,
}

/// When the logs became identical after the writes stopped, and how finely that was measured.
#[derive(Clone, Copy)]
pub struct Convergence {
    pub after: Option<Duration>,
    pub resolution: Duration,
    /// How `after` was measured, for the human summary.
    pub how: &'static str,
}

/// Everything a run measured, in either mode: the JSON report and the human summary are built
/// from this alone, so both modes report the same keys wherever the data exists.
pub struct Outcome {
    /// `in-process`, `processes` or `attached`.
    pub mode: &'static str,
    /// Stopped early by SIGINT/SIGTERM (then converged, verified and reported as usual).
    pub interrupted: bool,
    pub differences: Vec<String>,
    pub convergence: Convergence,
    pub entries_written: u64,
    pub write_time: Duration,
    pub elapsed: Duration,
    /// Append latency on the primary, in µs: timed by this process's writer, or read from the
    /// `primary` binary's status (its built-in writer's).
    pub append_us: Option<Percentiles>,
    /// CPU seconds of this process (in process only: it runs every node).
    pub cpu_seconds: Option<f64>,
    pub replicas: Vec<ReplicaOutcome>,
    /// How long the primary's view took to show every replica caught up once the logs matched.
    pub view_waited: Duration,
    /// Replicas the primary still showed behind after [`SETTLE_TIMEOUT`], if any.
    pub view_behind: Vec<String>,
    pub link_stats: netsim::LinkStats,
    pub imp: Impairment,
    /// Batches with less payload than this go uncompressed.
    pub min_compress_bytes: usize,
    /// What `--crash-replica-at` did (`--processes` only).
    pub crash: Option<CrashReport>,
}

/// When a node was killed and started again, in time since the start of the writes; `None` for
/// what did not happen (the writes ended first).
pub struct CrashReport {
    pub node: String,
    pub killed_at: Option<Duration>,
    pub restarted_at: Option<Duration>,
}

impl Outcome {
    pub fn verified(&self) -> bool {
        self.differences.is_empty() && self.convergence.after.is_some()
    }

    pub fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    /// The slowest replica's entries and payload bytes.
    pub fn delivered(&self) -> (u64, u64) {
        let entries = self.replicas.iter().map(|r| r.entries).min().unwrap_or(0);
        let bytes = self.replicas.iter().map(|r| r.payload_bytes).min().unwrap_or(0);
        (entries, bytes)
    }

    /// A traffic counter over every connection of the run, all replicas together.
    pub fn total(&self, key: &str) -> u64 {
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
    pub fn of(outcome: &Outcome, entry_bytes: usize) -> Option<CompressionUse> {
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

pub fn report_json(args: &Args, o: &Outcome) -> Value {
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
            "crash_replica_at_s": args.crash_replica_at.map(|d| d.as_secs_f64()),
            "crash_for_s": args.crash_replica_at.map(|_| args.crash_for.as_secs_f64()),
        },
        "crash": o.crash.as_ref().map(|c| json!({
            "node": c.node,
            "killed_at_s": c.killed_at.map(|d| d.as_secs_f64()),
            "restarted_at_s": c.restarted_at.map(|d| d.as_secs_f64()),
        })),
        "elapsed_s": secs,
        "system": system_json(),
    })
}

/// The first line of a run: what it does, in the flags' own words.
pub fn banner(args: &Args, imp: &Impairment) -> String {
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
    ) + &args.crash_replica_at.map_or(String::new(), |at| format!(", replica-1 killed at {at:?} for {:?}", args.crash_for))
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
    // Said once if every replica's lag comes from the same place, else for each.
    let sources: std::collections::BTreeSet<&str> = o.replicas.iter().map(|r| r.lag_source.as_str()).collect();
    if o.mode != "in-process" {
        match sources.len() {
            1 => sources.iter().for_each(|s| println!("                   (lag {s})")),
            _ => o.replicas.iter().for_each(|r| println!("                   ({} lag: {})", r.name, r.lag_source)),
        }
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
    if let Some(c) = &o.crash {
        let secs = |d: Duration| d.as_secs_f64();
        match (c.killed_at, c.restarted_at) {
            (Some(k), Some(r)) => println!(
                "crash:             {} killed (SIGKILL) at {:.1}s, started again over its data at {:.1}s ({:.1}s down)",
                c.node,
                secs(k),
                secs(r),
                secs(r.saturating_sub(k))
            ),
            _ => println!("crash:             not made: the writes ended before --crash-replica-at"),
        }
    }
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
pub fn report(args: &Args, outcome: &Outcome) -> Result<bool, Box<dyn std::error::Error>> {
    let report = report_json(args, outcome);
    print_summary(args, outcome, &report);
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    Ok(outcome.verified())
}
