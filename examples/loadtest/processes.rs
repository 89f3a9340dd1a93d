//! `--processes`: the same load test against the example binaries running as separate processes.

use std::ffi::OsString;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use walship::net::tls::ClusterCa;
use walship::netsim::Impairment;

use crate::console::{watch_signals_twice, Console, Leftovers};
use crate::link::{nap_before_partition_switch, start_forwarder, Link};
use crate::report::{banner, report, Convergence, CrashReport, Outcome, Percentiles, ReplicaOutcome};
use crate::view::{settle_view, Settled, View};
use crate::{check_args, claim_report_file, common, Args};

/// How often the nodes rewrite their status files, and this tool reads them.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// Lines of a failed node's log printed with the error.
const LOG_TAIL_LINES: usize = 20;

struct Node {
    name: String,
    child: Child,
    status: PathBuf,
    log: PathBuf,
    /// How it was started (the binary, then its flags), to start it again after a crash
    /// (`--crash-replica-at`).
    command: Vec<OsString>,
    /// Killed on purpose and not started again yet.
    down: bool,
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
    /// Starts `command` (the binary, then its flags) as node `name`, its output appended to `log`.
    fn spawn(name: &str, command: Vec<OsString>, status: PathBuf, log: PathBuf) -> std::io::Result<Node> {
        let child = Node::start(&command, &log)?;
        Ok(Node { name: name.to_string(), child, status, log, command, down: false })
    }

    fn start(command: &[OsString], log: &Path) -> std::io::Result<Child> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..]).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // A process group of its own: a terminal's Ctrl-C goes to this tool alone, which stops
        // the writer and still converges, verifies and reports; the nodes are stopped by pid.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn()
    }

    /// Kills the process with SIGKILL: no shutdown runs, nothing is flushed or said to its peer.
    /// A process that already exited on its own is a failure, not the crash.
    fn crash(&mut self) -> Result<(), Failure> {
        self.check_running()?;
        self.down = true;
        self.child.kill()?;
        self.child.wait()?;
        // What the killed process last wrote must not pass for the restarted one's.
        match std::fs::remove_file(&self.status) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Starts it again as before, over the same data folder.
    fn restart(&mut self) -> std::io::Result<()> {
        self.child = Node::start(&self.command, &self.log)?;
        self.down = false;
        Ok(())
    }

    /// An error naming this node if its process has exited: nothing will change any more.
    fn check_running(&mut self) -> Result<(), Failure> {
        if self.down {
            return Ok(());
        }
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
        let log = dir.join(format!("{name}.log"));
        let mut command = vec![bin_dir.join(bin).into_os_string()];
        for (flag, value) in [
            ("--data", dir.join(name).into_os_string()),
            ("--certs", certs.clone().into_os_string()),
            ("--name", name.into()),
            ("--status-file", status.clone().into_os_string()),
            ("--sync", sync.clone().into()),
            ("--status-every", format!("{}ms", STATUS_EVERY.as_millis()).into()),
            ("--congestion", congestion.clone().into()),
        ] {
            command.extend([flag.into(), value]);
        }
        command.extend(extra.into_iter().map(OsString::from));
        Node::spawn(name, command, status, log)
    };
    let stop_writing_file = dir.join("stop-writing");
    // The replicas time the entries appended after the warm-up (the primary's writer starts with it).
    let lag_from_unix_us = walship::entry::now_us() + args.warmup.as_micros() as u64;
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
        let lag_from = lag_from_unix_us.to_string();
        replicas.push(spawn(
            name,
            "replica",
            vec!["--primary".into(), addr.to_string(), "--lag-from-unix-us".into(), lag_from],
        )?);
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
    crash: Option<CrashReport>,
}

/// Samples the primary's status until its writer has written everything, or stopped after
/// `stop_writing` was set (which then sets `nodes.total` to what it wrote), showing progress and
/// following `--partition-at` and `--crash-replica-at`.
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
    let mut crash = Crash::Before;
    // Since when the primary was told to stop writing, and what it had written at the last look.
    let mut stopping: Option<(Instant, u64)> = None;
    let writes_done = loop {
        nap(nap_before_partition_switch(args, started.elapsed(), STATUS_EVERY), interrupted).await?;
        nodes.check_running()?;
        if stopping.is_none() && stop_writing.load(Ordering::SeqCst) {
            std::fs::write(&nodes.stop_writing_file, b"")?;
            stopping = Some((Instant::now(), u64::MAX));
        }
        let el = started.elapsed();
        if let Some(line) = nodes.link.follow_partition(args, el, &mut partitioned) {
            console.line(line);
        }
        if let Some(line) = follow_crash(args, el, &mut nodes.replicas[0], &mut crash)? {
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
    let write_time = started.elapsed();
    // A crash that outlasts the writes: the replica stays down for its --crash-for all the same.
    while matches!(crash, Crash::Down { .. }) {
        nap(STATUS_EVERY, interrupted).await?;
        nodes.check_running()?;
        if let Some(line) = follow_crash(args, started.elapsed(), &mut nodes.replicas[0], &mut crash)? {
            console.line(line);
        }
    }
    Ok(Sampled { lag_ms, started, write_time, writes_done, crash: crash.report(args) })
}

/// Where `--crash-replica-at` stands, with the times (since the start) it happened at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    Before,
    Down { killed_at: Duration },
    Done { killed_at: Duration, restarted_at: Duration },
}

impl Crash {
    /// What happened, for the report: `None` if no crash was asked for.
    fn report(self, args: &Args) -> Option<CrashReport> {
        args.crash_replica_at?;
        let (killed_at, restarted_at) = match self {
            Crash::Before => (None, None),
            Crash::Down { killed_at } => (Some(killed_at), None),
            Crash::Done { killed_at, restarted_at } => (Some(killed_at), Some(restarted_at)),
        };
        Some(CrashReport { node: "replica-1".into(), killed_at, restarted_at })
    }
}

/// Kills `replica` (SIGKILL) at `--crash-replica-at` and starts it again `--crash-for` later;
/// returns the line to print when it did either.
fn follow_crash(
    args: &Args,
    elapsed: Duration,
    replica: &mut Node,
    crash: &mut Crash,
) -> Result<Option<String>, Failure> {
    let Some(at) = args.crash_replica_at else { return Ok(None) };
    let when = format!("[{:>6.1}s]", elapsed.as_secs_f64());
    match *crash {
        Crash::Before if elapsed >= at => {
            replica.crash()?;
            *crash = Crash::Down { killed_at: elapsed };
            Ok(Some(format!("{when} {} killed (SIGKILL); restarting it in {:?}", replica.name, args.crash_for)))
        }
        Crash::Down { killed_at } if elapsed >= killed_at + args.crash_for => {
            replica.restart()?;
            *crash = Crash::Done { killed_at, restarted_at: elapsed };
            Ok(Some(format!("{when} {} restarted over its data", replica.name)))
        }
        _ => Ok(None),
    }
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
    Ok(Convergence { after, resolution: STATUS_EVERY * 2, how: "from the nodes' status files, rewritten every 100 ms" })
}

/// Longest wait, once converged, for a replica's status to show every entry applied (its record
/// of the lag then holds them all).
const APPLIED_WAIT: Duration = Duration::from_secs(5);

/// The replica's own per-entry lag record (`lag_ms` in its status), once its status shows every
/// space applied to the end of its log; `None` if it does not within [`APPLIED_WAIT`] (or the
/// binary keeps none).
async fn replica_lag(r: &Node, interrupted: &AtomicBool) -> Option<Value> {
    let deadline = Instant::now() + APPLIED_WAIT;
    loop {
        if let Some((status, _)) = r.status() {
            let spaces = status["spaces"].as_array()?;
            let applied = spaces.iter().all(|s| s["applied_seq"] == s["last_seq"]);
            if applied && status["lag_ms"].is_object() {
                return Some(status["lag_ms"].clone());
            }
        }
        if Instant::now() >= deadline || interrupted.load(Ordering::SeqCst) {
            return None;
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
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
    // A Ctrl-C after the writes ended cut nothing short: convergence and the report go on.
    let writes_interrupted = stop_writing.load(Ordering::SeqCst);
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
    if convergence.after.is_none() {
        differences.push(format!("not converged after --converge-timeout {:?}", args.converge_timeout));
    }
    let mut replicas = Vec::new();
    for (r, lag) in nodes.replicas.iter().zip(&sampled.lag_ms) {
        let rlogs = r.status().map(|(v, _)| logs(&v)).unwrap_or_default();
        for pl in plogs.iter().filter(|pl| !rlogs.contains(pl)) {
            differences.push(format!("{} {}: differs from the primary's {} {}", r.name, pl.0, pl.1, pl.2));
        }
        let held: u64 = rlogs.iter().map(|l| l.1).sum();
        // The replica's own record of every entry, unless a crash cut it short (its process
        // kept the entries applied before the kill): then the primary's.
        let crashed = sampled.crash.as_ref().is_some_and(|c| c.node == r.name);
        let own = match (crashed, convergence.after.is_some()) {
            (false, true) => replica_lag(r, interrupted).await.as_ref().and_then(Percentiles::from_json),
            _ => None,
        };
        let (lag_ms, lag_source) = match own {
            Some(own) => (
                Some(own),
                "every entry, from its append on the primary to its apply on the replica (the replica's own record)"
                    .to_string(),
            ),
            // The primary's own record runs on until the replica caught up after the writes;
            // this tool's samples stop with the writes.
            None => (
                Percentiles::from_json(&p["writer"]["lag_ms"][&r.name]).or(Some(Percentiles::of(lag, 1.0))),
                format!(
                    "sampled from the primary's status every {} ms, {} (its oldest unacknowledged entry{})",
                    STATUS_EVERY.as_millis(),
                    match p["writer"]["lag_ms"][&r.name].is_object() {
                        true => "until the replica caught up after the writes",
                        false => "while the writer ran",
                    },
                    if crashed { "; the replica's own record restarted with its process" } else { "" }
                ),
            ),
        };
        replicas.push(ReplicaOutcome {
            name: r.name.clone(),
            entries: held,
            payload_bytes: held * args.entry_bytes as u64,
            lag_ms,
            lag_source,
            view: View::of(p, &r.name),
        });
    }
    Ok(Outcome {
        mode: "processes",
        interrupted: writes_interrupted,
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
        crash: sampled.crash,
    })
}

pub mod attach;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The crash follows the flags' times: killed (SIGKILL, reaped) at T, started again D later,
    /// and reported as it happened.
    #[test]
    fn a_crash_kills_at_its_time_and_restarts_after_its_downtime() {
        let args =
            Args::try_parse_from(["loadtest", "--processes", "--crash-replica-at", "1s", "--crash-for", "2s"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sleep = vec![OsString::from("sleep"), OsString::from("30")];
        let mut node = Node::spawn("replica-1", sleep, dir.path().join("s.json"), dir.path().join("log")).unwrap();
        let first_pid = node.child.id();
        let mut crash = Crash::Before;
        let at = |s: f64| Duration::from_secs_f64(s);
        assert!(follow_crash(&args, at(0.5), &mut node, &mut crash).ok().unwrap().is_none());
        assert!(follow_crash(&args, at(1.1), &mut node, &mut crash).ok().unwrap().unwrap().contains("killed"));
        assert_eq!(crash, Crash::Down { killed_at: at(1.1) });
        assert!(node.down && node.check_running().is_ok(), "down on purpose is not a failure");
        assert!(follow_crash(&args, at(3.0), &mut node, &mut crash).ok().unwrap().is_none());
        assert!(follow_crash(&args, at(3.1), &mut node, &mut crash).ok().unwrap().unwrap().contains("restarted"));
        assert_ne!(node.child.id(), first_pid);
        assert!(!node.down && node.check_running().is_ok());
        let report = crash.report(&args).unwrap();
        assert_eq!((report.killed_at, report.restarted_at), (Some(at(1.1)), Some(at(3.1))));
        assert!(Crash::Before.report(&args).unwrap().killed_at.is_none(), "not reached: said so");
    }
}
