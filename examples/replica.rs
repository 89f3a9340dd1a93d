//! A replica node: copies every space of its primary into its own WAL and resumes after restarts.
//!
//! ```text
//! cargo run --release --example replica -- --primary 127.0.0.1:7400 --data /tmp/r1 --certs certs/dev \
//!     --name replica-1 [--status-file r1.json]
//! ```

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use walship::config::ReplicaConfig;
use walship::net::status::ConnectionState;
use walship::net::tls::NodeIdentity;
use walship::Replica;

#[derive(Parser, Debug)]
#[command(about = "walship replica: copies its primary's spaces over QUIC")]
struct Args {
    /// The primary's address (IP:PORT or HOST:PORT).
    #[arg(long, value_parser = common::parse_addr)]
    primary: SocketAddr,
    /// The primary's node name (checked against its certificate).
    #[arg(long, default_value = "primary")]
    primary_name: String,
    /// Data folder (one sub-folder per space).
    #[arg(long)]
    data: PathBuf,
    /// Certificates folder written by `gen_certs` (ca.pem, NAME.pem, NAME.key).
    #[arg(long)]
    certs: PathBuf,
    /// This node's name (its certificate's name).
    #[arg(long, default_value = "replica-1")]
    name: String,
    /// WAL durability: never, always, interval:10ms.
    #[arg(long, default_value = "interval:10ms", value_parser = common::parse_sync)]
    sync: walship::wal::SyncPolicy,
    /// Also listen here, for a primary that dials its replicas.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Congestion controller: bbr, cubic or newreno.
    #[arg(long, default_value = "bbr")]
    congestion: walship::net::endpoint::CongestionControl,
    /// Time the lag (`lag_ms` in the status: each entry's append on the primary to its apply here)
    /// only of entries appended from this time on, in microseconds since the Unix epoch (a
    /// warm-up; default: every entry this process applies).
    #[arg(long, default_value_t = 0)]
    lag_from_unix_us: u64,
    #[command(flatten)]
    report: common::report::ReportFlags,
}

#[tokio::main]
async fn main() {
    common::init_tracing();
    common::raise_fd_limit();
    common::exit_on_error("replica", run(Args::parse())).await;
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.report.check_status_file()?;
    let identity = NodeIdentity::load(&args.certs, &args.name)?;
    let mut config = ReplicaConfig::new(&args.name, args.primary, &args.primary_name, &args.data);
    config.wal.sync = args.sync;
    config.listen = args.listen;
    config.transport.congestion = args.congestion;
    // Times every entry applied here: the lag as this replica sees it.
    let lag = common::lag::LagRecorder::new();
    lag.timed_from_us.store(args.lag_from_unix_us, std::sync::atomic::Ordering::Relaxed);
    let replica = Replica::start_with_hook(config, identity, Some(lag.clone())).await?;
    let lag_json = || {
        let applied = lag.entries.load(std::sync::atomic::Ordering::Relaxed);
        vec![("lag_ms", lag.lag_ms_json()), ("applied_by_this_process", serde_json::json!(applied))]
    };
    let reporter = args.report.start().await?;
    println!("replica {} replicating from {} (data {})", args.name, args.primary, args.data.display());
    for s in replica.store().set_aside() {
        println!(
            "space {} was damaged ({}); set aside in {}, fetching it again",
            s.space,
            s.reason,
            s.moved_to.display()
        );
    }

    // Entries recovered from disk at start are not a rate.
    let mut last_total: u64 = replica.status().spaces.iter().map(|s| s.log.last_seq.0).sum();
    common::every_until_signal(args.report.status_every, |elapsed, new_second| {
        let status = replica.status();
        reporter.publish(&status, lag_json(), status.spaces.len(), walship::net::metrics::record_replica);
        if !new_second {
            return;
        }
        let total: u64 = status.spaces.iter().map(|s| s.log.last_seq.0).sum();
        let state = match status.connection {
            ConnectionState::Connected => format!("connected to {}", status.primary.clone().unwrap_or_default()),
            other => match &status.last_error {
                Some(e) => format!("{other} ({e})"),
                None => other.to_string(),
            },
        };
        println!(
            "[{:>5.0}s] {state} | spaces {} entries {} (+{}/s) rtt {}",
            elapsed.as_secs_f64(),
            status.spaces.len(),
            total,
            total.saturating_sub(last_total),
            status.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
        );
        last_total = total;
    })
    .await;
    let status = replica.status();
    replica.shutdown().await;
    let mut last = lag_json();
    last.push(("stopped", serde_json::Value::Bool(true)));
    reporter.publish(&status, last, status.spaces.len(), walship::net::metrics::record_replica);
    println!("replica stopped");
    Ok(())
}
