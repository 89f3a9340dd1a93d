//! The default mode: the primary and the replicas in this process, on the in-memory link
//! simulator (or `--link udp` forwarders), with a writer thread and an apply hook timing every entry.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::entry::now_us;
use walship::net::endpoint::{client_config, server_config, TransportSettings};
use walship::net::tls::ClusterCa;
use walship::netsim::{self, Impairment, SimNetwork};
use walship::wal::SpaceWal;
use walship::{Epoch, Primary, Replica};

use crate::common::lag::LagRecorder;
use crate::console::{watch_signals, Console, Leftovers};
use crate::link::{nap_before_partition_switch, start_forwarder, Link};
use crate::report::{banner, report, Convergence, Outcome, Percentiles, ReplicaOutcome};
use crate::view::{settle_view, Settled, View};
use crate::{check_args, claim_report_file, common, Args};

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
    let plan = common::writer::WriterPlan {
        spaces,
        epoch: Epoch(1),
        rate: args.rate,
        entry_bytes: args.entry_bytes,
        total: None,
        seed: args.seed,
        time_appends_after: Some(args.warmup),
    };
    let common::writer::Writer { stats: writer_stats, thread: writer } =
        common::writer::spawn_writer(plan, stop.clone());
    let started = Instant::now();
    let mut partitioned = false;
    while started.elapsed() < args.duration && !interrupted.load(Ordering::SeqCst) && !writer.is_finished() {
        let step = Duration::from_millis(250);
        tokio::time::sleep(nap_before_partition_switch(args, started.elapsed(), step)).await;
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
    let append_ns = writer_stats.append_latencies().unwrap_or_else(common::writer::append_histogram);
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

pub async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    check_args(&args)?;
    let imp = args.impair.impairment(args.link_rate, None);
    imp.validate()?;
    let report_file = claim_report_file(&args)?;
    let result = run_claimed(args, imp, report_file.clone()).await;
    if result.is_err() {
        // A failed run writes no report: the file claimed for it goes too, if this run created it.
        Leftovers { dir: None, report: report_file }.remove();
    }
    result
}

async fn run_claimed(
    args: Args,
    imp: Impairment,
    report_file: Option<std::path::PathBuf>,
) -> Result<bool, Box<dyn std::error::Error>> {
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
    // A Ctrl-C after the writes ended cut nothing short: convergence and the report go on.
    let writes_interrupted = interrupted.load(Ordering::SeqCst);
    println!("writes stopped after {:.1}s: {} entries; waiting for convergence ...", w.time.as_secs_f64(), w.entries);
    let convergence = converge(&args, &c, w.entries).await;
    let elapsed = w.started.elapsed();
    let cpu = cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a);
    let mut differences = differences(&c, w.entries);
    if convergence.after.is_none() {
        differences.push(format!("not converged after --converge-timeout {:?}", args.converge_timeout));
    }
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
        interrupted: writes_interrupted,
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
        crash: None,
    };
    let verified = report(&args, &outcome)?;
    for r in c.replicas {
        r.shutdown().await;
    }
    c.primary.shutdown().await;
    Ok(verified)
}
