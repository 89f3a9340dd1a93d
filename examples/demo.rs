//! The main job: a primary and two replicas in one process on generated certificates. Writes to
//! several spaces while printing progress and lag, then proves every replica's logs identical to the
//! primary's (same last sequence and digest for every space).
//!
//! `cargo run --release --example demo` (flags: `--spaces 8 --rate 50000 --seconds 4 --entry-bytes 128`)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::net::tls::ClusterCa;
use walship::{Epoch, Primary, Replica};

#[derive(Parser, Debug)]
#[command(about = "walship demo: one primary, two replicas, verified logs")]
struct Args {
    /// Number of memory spaces.
    #[arg(long, default_value_t = 8)]
    spaces: usize,
    /// Entries per second written (0 = as fast as possible).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128)]
    entry_bytes: usize,
}

#[tokio::main]
async fn main() {
    common::init_tracing_with("warn");
    common::raise_fd_limit();
    common::exit_with_verdict("demo", run(Args::parse())).await;
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::generate("walship demo CA")?;
    let primary_cfg = PrimaryConfig::new("primary", "127.0.0.1:0".parse()?, dir.path().join("primary"));
    let primary = Primary::start(primary_cfg, ca.issue("primary")?).await?;
    println!("primary listening on {}; data under {}", primary.local_addr(), dir.path().display());
    let mut replicas = Vec::new();
    for name in ["replica-1", "replica-2"] {
        let cfg = ReplicaConfig::new(name, primary.local_addr(), "primary", dir.path().join(name));
        replicas.push(Replica::start(cfg, ca.issue(name)?).await?);
    }

    let spaces = common::space_names(args.spaces).iter().map(|s| primary.space(s)).collect::<Result<Vec<_>, _>>()?;
    let total = (args.rate as f64 * args.seconds) as u64;
    let total = if args.rate == 0 { 1_000_000 } else { total };
    println!("writing {total} entries of {} bytes over {} spaces ...", args.entry_bytes, args.spaces);
    let stop = Arc::new(AtomicBool::new(false));
    let plan = common::writer::WriterPlan {
        spaces,
        epoch: Epoch(1),
        rate: args.rate,
        entry_bytes: args.entry_bytes,
        total: Some(total),
        seed: 7,
        time_appends_after: None,
    };
    let common::writer::Writer { stats, thread: writer } = common::writer::spawn_writer(plan, stop);

    let started = Instant::now();
    let mut converged_at = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = primary.status();
        let written = stats.written.load(Ordering::Relaxed);
        let lags: Vec<String> = status
            .replicas
            .iter()
            .map(|r| format!("{} {} lag {} entries / {} ms", r.name, r.state, r.max_lag.entries, r.max_lag.ms))
            .collect();
        println!("[{:>4.1}s] written {written:>8} | {}", started.elapsed().as_secs_f64(), lags.join(" | "));
        let done = stats.done.load(Ordering::Relaxed);
        let caught_up = status.replicas.len() == 2 && status.replicas.iter().all(|r| r.max_lag.entries == 0);
        if done && caught_up {
            converged_at = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs_f64(args.seconds + 60.0) {
            break;
        }
    }
    writer.join().map_err(|_| "writer panicked")??;

    // Prove the logs identical.
    let p = primary.status();
    let mut identical = true;
    println!("\n{:<12} {:>10} {:>18}   replicas", "space", "last_seq", "digest");
    for space in &p.spaces {
        let mut marks = Vec::new();
        for r in &replicas {
            let s = r.status();
            let same = s.log(&space.space).is_some_and(|x| x.same_log(space));
            identical &= same;
            marks.push(format!("{} {}", s.name, if same { "identical" } else { "DIFFERENT" }));
        }
        println!("{:<12} {:>10} {:>18}   {}", space.space, space.last_seq, space.digest, marks.join(", "));
    }
    match (identical, converged_at) {
        (true, Some(t)) => println!(
            "\nOK: {} entries in {} spaces replicated to 2 replicas; every log identical ({:.2}s from the first write until the replicas held everything)",
            stats.written.load(Ordering::Relaxed),
            p.spaces.len(),
            t.as_secs_f64()
        ),
        _ => println!("\nFAILED: the replicas' logs differ from the primary's"),
    }
    for r in replicas {
        r.shutdown().await;
    }
    primary.shutdown().await;
    Ok(identical && converged_at.is_some())
}
