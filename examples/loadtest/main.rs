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
//! `--status-addr` or `--status-file`); every mode builds its report from one [`report::Outcome`], so the
//! JSON has the same keys wherever the data exists.
//!
//! Ctrl-C (or SIGTERM) stops the writer (with `--processes`, the primary's, through its
//! `--stop-writing-file`), then converges, verifies and reports as usual, marked interrupted; a
//! second one quits at once, stopping the nodes and removing the temporary folder.

#[path = "../common/mod.rs"]
mod common;
mod console;
mod in_process;
mod link;
mod processes;
mod report;
mod view;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use walship::codec::Compression;
use walship::netsim;
use walship::wal::SyncPolicy;

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
    /// With --processes: kill `replica-1` with SIGKILL this long after the start (a crash: no
    /// shutdown, nothing flushed or said to the primary), then start it again over its data after
    /// --crash-for. It must resume where its log ends, with nothing lost or repeated; the run
    /// verifies as usual. (In process, `tests/chaos.rs` restarts nodes the same way.)
    #[arg(long, value_parser = netsim::parse_duration, requires = "processes")]
    crash_replica_at: Option<Duration>,
    /// ... and keep it down for this long.
    #[arg(long, default_value = "1s", value_parser = netsim::parse_duration)]
    crash_for: Duration,
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
const ATTACH_CONFLICTS: [&str; 27] = [
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
    "crash_replica_at",
    "crash_for",
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
    if let Some(at) = args.crash_replica_at {
        if at >= args.duration {
            return Err(format!(
                "--crash-replica-at {at:?} must be before the end of --duration {:?}: the crash is part of the write phase",
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
    // The writer writes `rate` entries a second, whole entries only.
    let timed = args.duration - args.warmup;
    if args.rate > 0 && (args.rate as f64) * timed.as_secs_f64() < 1.0 {
        return Err(format!(
            "--rate {} for {:?} (after the warm-up) writes no entry: raise --rate or --duration",
            args.rate, timed
        ));
    }
    // Beyond this, adding durations could overflow; no run lasts that long anyway.
    let longest = Duration::from_secs(366 * 24 * 3600);
    let durations = [
        ("--duration", Some(args.duration)),
        ("--warmup", Some(args.warmup)),
        ("--partition-at", args.partition_at),
        ("--partition-for", Some(args.partition_for)),
        ("--crash-replica-at", args.crash_replica_at),
        ("--crash-for", Some(args.crash_for)),
        ("--converge-timeout", Some(args.converge_timeout)),
    ];
    if let Some((flag, d)) = durations.iter().find(|(_, d)| d.is_some_and(|d| d > longest)) {
        return Err(format!("{flag} {:?} is longer than a year", d.unwrap_or_default()));
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
        common::exit_with_verdict("loadtest", in_process::run(args)).await
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

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["loadtest"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn runs_that_would_write_nothing_or_overflow_a_duration_are_refused() {
        assert!(check_args(&args(&[])).is_ok());
        let err = check_args(&args(&["--rate", "1", "--duration", "500ms"])).unwrap_err();
        assert!(err.contains("writes no entry"), "{err}");
        assert!(check_args(&args(&["--rate", "2", "--duration", "3s", "--warmup", "2600ms"])).is_err());
        assert!(check_args(&args(&["--rate", "1", "--duration", "1s"])).is_ok());
        assert!(check_args(&args(&["--rate", "max", "--duration", "1ms"])).is_ok());
        let err = check_args(&args(&["--partition-at", "1s", "--partition-for", "1e19s"])).unwrap_err();
        assert!(err.contains("--partition-for"), "{err}");
        assert!(check_args(&args(&["--converge-timeout", "1e12s"])).is_err());
    }

    /// A poll loop wakes at each partition switch, however short the partition.
    #[test]
    fn polls_wake_at_partition_switches() {
        let ms = Duration::from_millis;
        let step = ms(250);
        let nap = |a: &Args, at: u64| link::nap_before_partition_switch(a, ms(at), step);
        assert_eq!(nap(&args(&[]), 4900), step);
        let a = args(&["--partition-at", "5s", "--partition-for", "100ms"]);
        assert_eq!(nap(&a, 4000), step);
        assert_eq!(nap(&a, 4900), ms(100));
        assert_eq!(nap(&a, 5000), ms(100));
        assert_eq!(nap(&a, 5030), ms(70));
        assert_eq!(nap(&a, 5100), step);
        // Walking the loop: the link is cut at 5.0 s and healed at 5.1 s.
        let (mut t, mut switches) = (Duration::ZERO, Vec::new());
        while t < ms(6000) {
            t += link::nap_before_partition_switch(&a, t, step);
            let want = t >= ms(5000) && t < ms(5100);
            if switches.last().map(|(_, on)| *on) != Some(want) && (want || !switches.is_empty()) {
                switches.push((t, want));
            }
        }
        assert_eq!(switches, [(ms(5000), true), (ms(5100), false)]);
    }

    /// A replica not connected at the end still reports the run's lost packets and congestion
    /// events (counted over every connection), with no RTT or window.
    #[test]
    fn path_counters_survive_a_replica_disconnected_at_the_end() {
        let status = serde_json::json!({ "replicas": [{
            "name": "replica-1", "state": "disconnected", "path": null,
            "totals": { "lost_packets": 17, "congestion_events": 3, "udp_tx_bytes": 10, "udp_rx_bytes": 20 },
        }]});
        let view = view::View::of(&status, "replica-1").expect("the replica's view");
        let path = view.path_json();
        assert_eq!((path["lost_packets"].as_u64(), path["congestion_events"].as_u64()), (Some(17), Some(3)));
        assert!(path["rtt_ms"].is_null());
    }
}
