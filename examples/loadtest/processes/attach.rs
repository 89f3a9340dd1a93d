//! `--attach-primary`/`--attach-replica`: the load test of nodes that already run, on
//! machines and links of their own; it reads their status (over HTTP or from files) and
//! changes nothing. The primary binary records what only it can see whole, however late this
//! tool attaches: its writer's progress and append latency, each replica's lag, and when each
//! replica caught up after the writes ended (its `writer` status).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use walship::netsim::{self, Impairment};

use super::{entries, logs, nap};
use crate::console::{watch_signals, Console, Leftovers};
use crate::report::{codec_name, report, sync_name, Convergence, Outcome, Percentiles, ReplicaOutcome};
use crate::view::View;
use crate::{claim_report_file, common, Args};

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
        false => {
            Err(format!("the primary restarted (run {} became {}): start the run again", run_id, p["config"]["run_id"]))
        }
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
            !host.is_empty() && !host.contains('/') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
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
        let mtime = f.metadata().and_then(|m| m.modified()).map_err(|e| retry(format!("{}: {e}", path.display())))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).map_err(|e| retry(format!("{}: {e}", path.display())))?;
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
    let total = w["total"]
        .as_u64()
        .ok_or("the primary's writer has no --total: its writes never end, so there is nothing to converge on")?;
    let c = &p["config"];
    let text = |v: &Value, key: &str| v[key].as_str().map(str::to_string).ok_or(format!("no {key} in the status"));
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
    args.congestion = serde_json::from_value(c["congestion"].clone()).map_err(|e| format!("congestion: {e}"))?;
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
        watch(args, watched(primary), replicas.into_iter().map(watched).collect(), &console, &interrupted).await;
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
            return Err(format!("{}: not the status of a `replica` binary (role {})", r.source, v["role"]).into());
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
        convergence: Convergence { after, resolution, how: "by the primary, from its status every --status-every" },
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
        crash: None,
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
                    fatal.push(format!("{name} {} (the primary says): {e}", space["space"].as_str().unwrap_or("?")));
                }
            }
        }
        let plogs = logs(&p);
        let caught_up = &p["writer"]["caught_up_ms"];
        let done =
            names.iter().zip(&last).all(|(n, r)| caught_up[n].is_u64() && r.as_ref().is_some_and(|v| logs(v) == plogs));
        let timed_out = start.elapsed() > args.converge_timeout;
        if done || timed_out || !fatal.is_empty() {
            let mut differences = fatal;
            if !done {
                for (name, status) in names.iter().zip(&last) {
                    let rlogs = status.as_ref().map(logs).unwrap_or_default();
                    for pl in plogs.iter().filter(|pl| !rlogs.contains(pl)) {
                        differences.push(format!("{name} {}: differs from the primary's {} {}", pl.0, pl.1, pl.2));
                    }
                    if View::of(&p, name).is_some() && !caught_up[name].is_u64() {
                        differences.push(format!("{name} never caught up in the primary's view"));
                    }
                }
                if timed_out {
                    differences.push(format!("not converged after --converge-timeout {:?}", args.converge_timeout));
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
