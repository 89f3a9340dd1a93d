//! A lossy-link UDP forwarder for load tests across real sockets: put it between a QUIC client
//! and server and it applies loss, burst loss, delay, jitter, reordering, duplication, a rate cap
//! and scheduled partitions, in both directions, from one seed. See docs/NETSIM.md.
//!
//! ```text
//! cargo run --release --example lossy_link -- --listen 127.0.0.1:7001 --upstream 127.0.0.1:7000 \
//!     --loss 2% --delay 20ms --jitter 5ms --reorder 1% --duplicate 0.5% --rate 100mbit --seed 1
//! ```
//!
//! Clients send to `--listen`; datagrams go on to `--upstream` and replies come back. Every
//! impairment flag applies to each direction separately (so `--delay 20ms` adds 40 ms of round
//! trip). Counters are printed every `--report-every` and at exit (SIGINT, SIGTERM or
//! `--duration`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

mod common;
use walship::netsim::forwarder::{Forwarder, ForwarderControl};
use walship::netsim::{parse_duration, parse_rate};

#[derive(Parser, Debug)]
#[command(about = "UDP forwarder that impairs traffic like a bad network link (both directions)")]
struct Args {
    /// Address clients send to (IP:PORT or HOST:PORT).
    #[arg(long, value_parser = common::parse_addr)]
    listen: SocketAddr,
    /// Address datagrams are forwarded to, the server (IP:PORT or HOST:PORT).
    #[arg(long, value_parser = common::parse_addr)]
    upstream: SocketAddr,
    #[command(flatten)]
    impair: common::ImpairmentFlags,
    /// Bandwidth cap per direction: 100mbit, 1gbit, 500kbit, 12.5MB/s; a bare number is bytes/s
    /// (default unlimited).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Rate queue size in bytes (drop-tail; default one second at --rate).
    #[arg(long)]
    queue_bytes: Option<u64>,
    /// Seed of the impairment decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start a partition (everything dropped, both directions) this often.
    #[arg(long, value_parser = parse_duration)]
    partition_every: Option<Duration>,
    /// How long each partition lasts (default 2s; needs --partition-every).
    #[arg(long, value_parser = parse_duration)]
    partition_for: Option<Duration>,
    /// Print counters this often (0 disables).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    report_every: Duration,
    /// Stop after this long (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

/// Length of each scheduled partition unless --partition-for says otherwise.
const DEFAULT_PARTITION: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing_with("warn");
    common::exit_quietly_on_closed_stdout();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lossy_link: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.queue_bytes.is_some() && args.rate.is_none() {
        return Err("--queue-bytes sizes the queue of the --rate cap: give a --rate too".into());
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        return Err("--duration 0 would stop at once: leave it out to run until SIGINT/SIGTERM".into());
    }
    let imp = args.impair.impairment(args.rate, args.queue_bytes);
    imp.validate().map_err(|e| format!("bad impairment: {e}"))?;
    let loops_back = args.listen.port() == args.upstream.port()
        && (args.listen.ip() == args.upstream.ip() || args.listen.ip().is_unspecified());
    if loops_back {
        return Err(format!(
            "--upstream {} is this forwarder's own --listen {}: every datagram would come back to it",
            args.upstream, args.listen
        ));
    }
    if args.partition_for.is_some() && args.partition_every.is_none() {
        return Err("--partition-for sets the length of the partitions --partition-every schedules: give both".into());
    }
    let partition_for = args.partition_for.unwrap_or(DEFAULT_PARTITION);
    if let Some(every) = args.partition_every {
        if every.is_zero() || partition_for >= every {
            return Err(format!(
                "--partition-for ({partition_for:?}) must be shorter than --partition-every ({every:?})"
            ));
        }
    }
    let fwd = Forwarder::bind(args.listen, args.upstream, imp, imp, args.seed)
        .map_err(|e| format!("cannot start on {}: {e}", args.listen))?;
    println!("lossy_link: {} -> {} (seed {}), each direction: {imp}", fwd.local_addr(), fwd.upstream(), args.seed);
    if let Some(every) = args.partition_every {
        println!("  partition for {partition_for:?} every {every:?}");
    }
    let control = fwd.control();
    let mut helpers = Vec::new();
    if !args.report_every.is_zero() {
        helpers.push(tokio::spawn(report(control.clone(), args.report_every)));
    }
    if let Some(every) = args.partition_every {
        helpers.push(tokio::spawn(partitions(control.clone(), every, partition_for)));
    }
    let duration = args.duration;
    let shutdown = async move {
        match duration {
            Some(d) => tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = common::shutdown_signal() => {}
            },
            None => common::shutdown_signal().await,
        }
    };
    let result = fwd.run(shutdown).await;
    for h in helpers {
        h.abort();
    }
    let stats = result.map_err(|e| format!("listen socket failed: {e}"))?;
    println!("final {stats}");
    Ok(())
}

async fn report(control: ForwarderControl, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let partitioned = if control.is_partitioned() { " [partitioned]" } else { "" };
        println!("{}{partitioned}", control.stats());
    }
}

async fn partitions(control: ForwarderControl, every: Duration, length: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        control.set_partitioned(true);
        println!("partition on for {length:?}");
        tokio::time::sleep(length).await;
        control.set_partitioned(false);
        println!("partition healed");
    }
}
