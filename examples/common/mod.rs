//! Helpers shared by the example binaries: flag parsing, the built-in writer, status files, signals.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use walship::netsim::{self, GilbertElliott, Impairment};
use walship::payload::PayloadGen;
use walship::wal::{SpaceWal, SyncPolicy};
use walship::{Epoch, SpaceId};

/// Parses `never`, `always` or `interval:10ms` (also `10ms`).
pub fn parse_sync(s: &str) -> Result<SyncPolicy, String> {
    match s {
        "never" => Ok(SyncPolicy::Never),
        "always" => Ok(SyncPolicy::Always),
        other => {
            let d = other.strip_prefix("interval:").unwrap_or(other);
            walship::netsim::parse_duration(d).map(SyncPolicy::Interval).map_err(|_| {
                format!("bad sync policy {s:?}: use never, always, or interval:DURATION (e.g. interval:10ms)")
            })
        }
    }
}

/// Parses a size in bytes: `1000000`, `500KB`, `1MB` (powers of 1000) or `64KiB`, `1MiB`
/// (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let v: u64 = num.parse().map_err(|_| format!("bad size {s:?}: use e.g. 1000000, 500KB, 1MB, 64KiB, 1MiB"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("bad size {s:?}: unknown unit {unit:?} (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    v.checked_mul(scale).ok_or_else(|| format!("size {s:?} is too large"))
}

/// The `--sync` flag value that [`parse_sync`] reads back as `policy`.
pub fn sync_flag(policy: SyncPolicy) -> String {
    match policy {
        SyncPolicy::Never => "never".to_string(),
        SyncPolicy::Always => "always".to_string(),
        SyncPolicy::Interval(d) => format!("interval:{}us", d.as_micros()),
    }
}

/// The names of `n` demo spaces: `space-000`, `space-001`, ...
pub fn space_names(n: usize) -> Vec<SpaceId> {
    (0..n).map(|i| SpaceId::new(&format!("space-{i:03}")).expect("valid space id")).collect()
}

/// Progress counters of the built-in writer, read while it runs.
#[derive(Default)]
pub struct WriterStats {
    pub written: AtomicU64,
    /// Microseconds from the writer's start to its last append so far.
    pub elapsed_us: AtomicU64,
    /// Set (Release) once the writer stops, whether it finished or failed, after every other
    /// field has its final value: a reader that sees it (Acquire) sees those.
    pub done: AtomicBool,
    /// When the writer stopped.
    pub finished_at: std::sync::OnceLock<Instant>,
    /// Why it stopped early, if an append failed.
    pub error: Mutex<Option<String>>,
    /// Append latencies in nanoseconds, when the plan asked for them (`time_appends_after`):
    /// the writer records into its own histogram and merges it in every [`MERGE_EVERY`], so a
    /// reader never waits behind appends.
    pub append_ns: Option<Mutex<Histogram<u64>>>,
}

impl WriterStats {
    /// A copy of the append latencies so far, if appends are timed.
    pub fn append_latencies(&self) -> Option<Histogram<u64>> {
        self.append_ns.as_ref().map(|h| h.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// What the built-in writer writes.
pub struct WriterPlan {
    /// Written round-robin, one entry each in turn.
    pub spaces: Vec<SpaceWal>,
    pub epoch: Epoch,
    /// Entries per second; 0 writes as fast as possible.
    pub rate: u64,
    pub entry_bytes: usize,
    /// Stop after this many entries (else only when told to stop).
    pub total: Option<u64>,
    /// Seed of the payloads.
    pub seed: u64,
    /// Time every append made this long after the start or later, into
    /// [`WriterStats::append_ns`]; `None` times nothing.
    pub time_appends_after: Option<Duration>,
}

/// Lags in milliseconds (1 ms to an hour, 3 significant digits).
pub fn lag_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds")
}

/// `p50`, `p99`, `p999`, `max` of `h` divided by `unit` (ns recorded, µs reported: 1e3), and
/// `count`: the shape the status and the load-test report share.
pub fn percentiles_json(h: &Histogram<u64>, unit: f64) -> serde_json::Value {
    let q = |q: f64| h.value_at_quantile(q) as f64 / unit;
    serde_json::json!({ "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": h.max() as f64 / unit, "count": h.len() })
}

/// Append latencies in nanoseconds (1 ns to 60 s, 3 significant digits).
pub fn append_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// A running built-in writer.
pub struct Writer {
    /// Its counters, read while it runs.
    pub stats: Arc<WriterStats>,
    /// Its thread, which ends at the plan's total, at the stop flag, or with the first append error.
    pub thread: std::thread::JoinHandle<Result<(), String>>,
}

/// Writes `plan` on its own thread (the write path never waits for replication) until its total
/// or until `stop` is set.
pub fn spawn_writer(plan: WriterPlan, stop: Arc<AtomicBool>) -> Writer {
    let stats = Arc::new(WriterStats {
        append_ns: plan.time_appends_after.map(|_| Mutex::new(append_histogram())),
        ..WriterStats::default()
    });
    let s2 = stats.clone();
    let handle = std::thread::spawn(move || {
        let result = write(plan, &stop, &s2);
        if let Err(e) = &result {
            *s2.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        }
        let _ = s2.finished_at.set(Instant::now());
        s2.done.store(true, Ordering::Release);
        result
    });
    Writer { stats, thread: handle }
}

/// The body of [`spawn_writer`]'s thread: writes until the plan's total, `stop`, or an append error.
fn write(plan: WriterPlan, stop: &AtomicBool, stats: &WriterStats) -> Result<(), String> {
    let WriterPlan { spaces, epoch, rate, entry_bytes, total, seed, time_appends_after } = plan;
    let timed_from = time_appends_after.unwrap_or(Duration::MAX);
    // Between due checks: about one entry's interval, but never a busy loop nor a long nap.
    let nap = match rate {
        0 => Duration::ZERO,
        r => Duration::from_secs_f64(1.0 / r as f64).clamp(Duration::from_micros(200), Duration::from_millis(10)),
    };
    let mut gen = PayloadGen::new(seed, entry_bytes);
    let mut local = stats.append_ns.as_ref().map(|_| append_histogram());
    let mut last_merge = Instant::now();
    let start = Instant::now();
    let mut written = 0u64;
    let limit = total.unwrap_or(u64::MAX);
    while written < limit && !stop.load(Ordering::Relaxed) && !spaces.is_empty() {
        let due = if rate == 0 { limit } else { ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(limit) };
        if written >= due {
            std::thread::sleep(nap);
            continue;
        }
        // Write what is due in bursts of at most BURST entries or BURST_TIME (a slow disk),
        // publishing progress and checking the stop flag in between.
        let burst_start = Instant::now();
        let mut hist = local.as_mut().filter(|_| burst_start.duration_since(start) >= timed_from);
        let mut result = Ok(());
        for _ in 0..(due - written).min(BURST) {
            let wal = &spaces[(written % spaces.len() as u64) as usize];
            let payload = gen.next_payload();
            let t = hist.is_some().then(Instant::now);
            if let Err(e) = wal.append(epoch, 1, payload) {
                result = Err(e.to_string());
                break;
            }
            if let (Some(h), Some(t)) = (hist.as_mut(), t) {
                h.saturating_record(t.elapsed().as_nanos() as u64);
            }
            written += 1;
            // The clock, every few appends only: the demo's appends are not timed at all.
            if written % 64 == 0 && burst_start.elapsed() >= BURST_TIME {
                break;
            }
        }
        if last_merge.elapsed() >= MERGE_EVERY || result.is_err() || written >= limit {
            merge(&mut local, stats);
            last_merge = Instant::now();
        }
        stats.elapsed_us.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.written.store(written, Ordering::Relaxed);
        result?;
    }
    merge(&mut local, stats);
    Ok(())
}

/// Most appends the built-in writer makes between looks at its stop flag and its rate.
const BURST: u64 = 4096;
/// Longest the built-in writer appends between looks at its stop flag (appends can be slow
/// under `--sync always`).
const BURST_TIME: Duration = Duration::from_millis(10);
/// How often the built-in writer merges its append latencies into the shared histogram.
pub const MERGE_EVERY: Duration = Duration::from_millis(50);

/// Adds the writer's own latency histogram into the shared one and empties it.
fn merge(local: &mut Option<Histogram<u64>>, stats: &WriterStats) {
    if let (Some(l), Some(shared)) = (local.as_mut(), stats.append_ns.as_ref()) {
        if !l.is_empty() {
            let _ = shared.lock().unwrap_or_else(|p| p.into_inner()).add(&*l);
            l.reset();
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            // No SIGTERM handler: Ctrl-C still stops the program.
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Calls `tick` every `period` until SIGINT or SIGTERM, with the time since start and whether this
/// tick is the first of a new second (the binaries print their console line once a second while
/// their status file may be rewritten more often).
pub async fn every_until_signal(period: Duration, mut tick: impl FnMut(Duration, bool)) {
    let started = Instant::now();
    let mut interval = tokio::time::interval(period);
    // After a stall, one late tick rather than a burst of them (each records lag samples).
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut second = None;
    loop {
        tokio::select! {
            _ = &mut signal => return,
            _ = interval.tick() => {
                let elapsed = started.elapsed();
                let now = elapsed.as_secs();
                let new_second = second != Some(now);
                second = Some(now);
                tick(elapsed, new_second);
            }
        }
    }
}

/// Runs a binary's `run`, and on error prints it after the binary's name and exits with 1.
pub async fn exit_on_error<F>(name: &str, run: F)
where
    F: std::future::Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    if let Err(e) = run.await {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// Runs a checking tool's `run` and exits the way scripts expect: 0 when it verified, 2 when it
/// ran but the check failed, 1 when it could not run (the error is printed).
pub async fn exit_with_verdict<F>(name: &str, run: F)
where
    F: std::future::Future<Output = Result<bool, Box<dyn std::error::Error>>>,
{
    match run.await {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("{name} failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Sets up logging from RUST_LOG (default: warnings and walship info).
pub fn init_tracing() {
    init_tracing_with("warn,walship=info")
}

/// Sets up logging from RUST_LOG, or `default` when it is not set.
pub fn init_tracing_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log redirected to a file is pasted into bug reports.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// What a node binary reports, and where: its status file, its status over HTTP and its
/// Prometheus metrics.
#[derive(clap::Args, Debug)]
pub struct ReportFlags {
    /// Rewrite this file with the status as JSON every `--status-every` and at shutdown.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Serve the same JSON at http://ADDR/status (plain HTTP, no authentication: bind it to an
    /// address only trusted hosts reach). `loadtest --attach-primary/--attach-replica` read it.
    #[arg(long, value_parser = parse_addr)]
    pub status_addr: Option<std::net::SocketAddr>,
    /// How often the status file is rewritten (the console line stays once a second).
    #[arg(long, default_value = "1s", value_parser = parse_period)]
    pub status_every: std::time::Duration,
    /// Serve Prometheus metrics on this address (http://ADDR/metrics), refreshed with the status.
    #[arg(long, value_parser = parse_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Per-space series (lag, positions) only while the node has at most this many spaces.
    #[arg(long, default_value_t = 1000)]
    pub metrics_max_spaces: usize,
}

impl ReportFlags {
    /// Refuses a `--status-file` that cannot be written, before the node starts (it would only
    /// be warned about once a second while the node ran).
    pub fn check_status_file(&self) -> Result<(), String> {
        let Some(path) = &self.status_file else { return Ok(()) };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("cannot write --status-file {}: {e}", path.display()))
    }

    /// Starts the metrics and status endpoints the flags ask for.
    pub async fn start(&self) -> Result<Reporter<'_>, Box<dyn std::error::Error>> {
        if let Some(addr) = self.metrics_addr {
            serve_metrics(addr)?;
        }
        let latest = Arc::new(Mutex::new(None));
        if let Some(addr) = self.status_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot serve the status on {addr}: {e}"))?;
            println!("status on http://{}/status", listener.local_addr()?);
            tokio::spawn(status_http::serve(listener, latest.clone()));
        }
        Ok(Reporter { flags: self, latest })
    }
}

/// Publishes a node's status where its [`ReportFlags`] say.
pub struct Reporter<'a> {
    flags: &'a ReportFlags,
    /// The last status published, as served at `/status` (`None` before the first).
    latest: status_http::Latest,
}

impl Reporter<'_> {
    /// Writes one status snapshot, with `extra` keys added at the top level, to the status file
    /// and the status endpoint, and, with a metrics endpoint, records it with `record`
    /// (per-space series only up to `--metrics-max-spaces`).
    pub fn publish<S: serde::Serialize>(
        &self,
        status: &S,
        extra: Vec<(&str, serde_json::Value)>,
        spaces: usize,
        record: fn(&S, bool),
    ) {
        /// The status's own fields first, in their order, then the extra keys.
        #[derive(serde::Serialize)]
        struct WithExtra<'a, S> {
            #[serde(flatten)]
            status: &'a S,
            #[serde(flatten)]
            extra: std::collections::BTreeMap<&'a str, serde_json::Value>,
        }
        let mut extra: std::collections::BTreeMap<_, _> = extra.into_iter().collect();
        // How stale a reader's copy can be.
        extra.insert("status_every_ms", serde_json::json!(self.flags.status_every.as_millis() as u64));
        // Serialized once for both the file and the endpoint (a node with many spaces writes megabytes).
        let bytes = match serde_json::to_vec_pretty(&WithExtra { status, extra }) {
            Ok(b) => Arc::new(b),
            Err(e) => return eprintln!("cannot serialize the status: {e}"),
        };
        if let Some(path) = &self.flags.status_file {
            if let Err(e) = walship::net::status::write_atomic(path, &bytes) {
                eprintln!("cannot write status file {}: {e}", path.display());
            }
        }
        if self.flags.status_addr.is_some() {
            *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        }
        if self.flags.metrics_addr.is_some() {
            record(status, spaces <= self.flags.metrics_max_spaces);
        }
    }
}

/// The status endpoint: `GET /status` answers the last published status as JSON. A few lines of
/// HTTP/1.1 (one request per connection, then close) rather than a web framework: the binaries
/// only ever serve this one document, and the load test only ever reads it.
pub mod status_http {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// The document served, shared with the publisher.
    pub type Latest = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

    /// Longest request head read; anything longer is not a status request.
    const MAX_REQUEST: usize = 8 * 1024;
    /// Longest a client may take to send its request and read the answer.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Longest a client may take to send its request.
    const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
    /// Clients served at once.
    const MAX_CLIENTS: usize = 32;
    /// Largest status document the reader accepts (a node with 100,000 spaces writes about 30 MB).
    const MAX_DOCUMENT: u64 = 512 * 1024 * 1024;

    pub async fn serve(listener: TcpListener, latest: Latest) {
        // Clients served at once: idle connections must not take the file descriptors the WAL needs.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((mut sock, _)) => {
                    let latest = latest.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(&mut sock, &latest)).await;
                        drop(slot);
                    });
                }
                // Out of file descriptors, most likely: wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn answer(sock: &mut TcpStream, latest: &Latest) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        let read_head = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
                let n = sock.read(&mut buf).await?;
                if n == 0 || head.len() + n > MAX_REQUEST {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(HEAD_TIMEOUT, read_head).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
        let mut words = line.split_whitespace();
        let path = match (words.next(), words.next()) {
            (Some("GET"), Some(p)) => Some(p),
            _ => None,
        };
        let document = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (status, kind, body): (&str, &str, Arc<Vec<u8>>) = match (path, document) {
            (Some("/status"), Some(doc)) => ("200 OK", "application/json", doc),
            (Some("/status"), None) => ("503 Service Unavailable", "text/plain", Arc::new(b"no status yet\n".to_vec())),
            _ => ("404 Not Found", "text/plain", Arc::new(b"GET /status\n".to_vec())),
        };
        let header = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(header.as_bytes()).await?;
        sock.write_all(&body).await?;
        sock.shutdown().await
    }

    /// Why a status could not be read.
    #[derive(Debug)]
    pub struct FetchError {
        pub message: String,
        /// Worth trying again: the node may not be up yet (no connection, no status yet, a
        /// timeout); otherwise the address is not a status endpoint.
        pub retry: bool,
    }

    /// Reads the status document at `url` (`http://HOST:PORT`, or with a path; `/status` by default).
    pub async fn fetch(url: &str) -> Result<serde_json::Value, FetchError> {
        let fatal = |message: String| FetchError { message, retry: false };
        let retry = |message: String| FetchError { message, retry: true };
        let rest = url.strip_prefix("http://").ok_or_else(|| fatal(format!("{url}: not an http:// address")))?;
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{p}")),
            Some((h, _)) => (h, "/status".to_string()),
            None => (rest, "/status".to_string()),
        };
        if !host.rsplit_once(':').is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) {
            return Err(fatal(format!("{url}: give the host and port, as http://HOST:PORT")));
        }
        let exchange = async {
            let mut sock = TcpStream::connect(host).await?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            sock.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            sock.take(MAX_DOCUMENT).read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .map_err(|_| retry(format!("{url}: no answer within {CLIENT_TIMEOUT:?}")))?
            .map_err(|e| retry(format!("{url}: {e}")))?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| fatal(format!("{url}: not an HTTP response")))?;
        let status_line = String::from_utf8_lossy(response[..split].split(|b| *b == b'\n').next().unwrap_or_default())
            .trim()
            .to_string();
        let body = &response[split + 4..];
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        let length =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
        if length.is_some_and(|n| body.len() < n) {
            // Cut short: the node stopped mid-answer, or the link is slow.
            return Err(retry(format!("{url}: answer cut short ({} of {} bytes)", body.len(), length.unwrap_or(0))));
        }
        match status_line.split_whitespace().nth(1) {
            Some("200") => {}
            // The node is up but has not published a status yet.
            Some("503") => return Err(retry(format!("{url}: {status_line}"))),
            _ => return Err(fatal(format!("{url}: {status_line}: {}", String::from_utf8_lossy(body).trim()))),
        }
        serde_json::from_slice(body).map_err(|e| fatal(format!("{url}: not a status document: {e}")))
    }
}

/// Serves the metrics the binaries record (`walship::net::metrics`) for Prometheus to scrape at
/// `http://ADDR/metrics`.
pub fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    walship::net::metrics::describe();
    println!("metrics on http://{addr}/metrics");
    Ok(())
}

/// A duration that must not be zero (a period to repeat something at).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    match netsim::parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be more than zero")),
        d => Ok(d),
    }
}

/// A socket address given as `IP:PORT` or `HOST:PORT` (resolved once, first address), for flags
/// that name another node.
pub fn parse_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs = s.to_socket_addrs().map_err(|e| format!("bad address {s:?} (IP:PORT or HOST:PORT): {e}"))?;
    addrs.next().ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Ends the process quietly, as Unix tools do, when stdout is a pipe whose reader is gone
/// (`lossy_link ... | head -3`): Rust ignores SIGPIPE, so the next `println!` would panic instead.
/// Only for tools with nothing to clean up.
pub fn exit_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal; no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises the soft open-file limit to the hard limit: every space keeps its active segment open,
/// so a node with thousands of spaces needs more than the usual soft default of 1,024.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    tracing::debug!("cannot raise the open-file limit");
                }
            }
        }
    }
}

/// The impairment flags the load test and `lossy_link` share; each applies to both directions.
#[derive(clap::Args, Debug, Clone)]
pub struct ImpairmentFlags {
    /// Independent packet loss, each direction: 2%, 0.5% or 0.02.
    #[arg(long, default_value = "0%", value_parser = netsim::parse_percent)]
    pub loss: f64,
    /// Burst loss (Gilbert-Elliott) P_GOOD_TO_BAD,P_BAD_TO_GOOD,LOSS_IN_GOOD,LOSS_IN_BAD, e.g. 1%,30%,0%,50%.
    #[arg(long, value_parser = netsim::parse_burst)]
    pub burst: Option<GilbertElliott>,
    /// Fixed one-way delay, each direction: 20ms, 1.5s.
    #[arg(long, default_value = "0ms", value_parser = netsim::parse_duration)]
    pub delay: Duration,
    /// Extra one-way delay, uniform in 0..=jitter (may reorder packets, like netem).
    #[arg(long, default_value = "0ms", value_parser = netsim::parse_duration)]
    pub jitter: Duration,
    /// Probability that a packet is held back (delay/2 + jitter + 5 ms) so later ones overtake it.
    #[arg(long, default_value = "0%", value_parser = netsim::parse_percent)]
    pub reorder: f64,
    /// Probability that a packet is delivered twice.
    #[arg(long, default_value = "0%", value_parser = netsim::parse_percent)]
    pub duplicate: f64,
}

impl ImpairmentFlags {
    /// The impairment of one direction, with a bandwidth cap (bytes/s) and its queue if given.
    pub fn impairment(&self, rate_bytes_per_s: Option<u64>, queue_limit_bytes: Option<u64>) -> Impairment {
        Impairment {
            loss: self.loss,
            burst: self.burst,
            delay: self.delay,
            jitter: self.jitter,
            reorder: self.reorder,
            duplicate: self.duplicate,
            rate_bytes_per_s,
            queue_limit_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_period_must_be_more_than_zero() {
        assert!(parse_period("0s").is_err());
        assert!(parse_period("0ms").is_err());
        assert_eq!(parse_period("100ms"), Ok(Duration::from_millis(100)));
    }

    #[test]
    fn the_writer_counts_and_times_every_append_of_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        let space = SpaceId::new("space-000").unwrap();
        let wal = SpaceWal::open(dir.path(), space, walship::wal::WalConfig::default()).unwrap();
        let plan = WriterPlan {
            spaces: vec![wal.clone()],
            epoch: Epoch(1),
            rate: 0,
            entry_bytes: 64,
            total: Some(10_000),
            seed: 7,
            time_appends_after: Some(Duration::ZERO),
        };
        let Writer { stats, thread } = spawn_writer(plan, Arc::new(AtomicBool::new(false)));
        thread.join().unwrap().unwrap();
        assert!(stats.done.load(Ordering::Acquire));
        assert!(stats.finished_at.get().is_some());
        assert_eq!(stats.written.load(Ordering::Relaxed), 10_000);
        assert_eq!(stats.append_latencies().unwrap().len(), 10_000);
        assert!(stats.error.lock().unwrap().is_none());
        assert_eq!(wal.last_seq().0, 10_000);
    }

    #[test]
    fn a_failed_append_is_kept_as_the_writer_error() {
        let dir = tempfile::tempdir().unwrap();
        let space = SpaceId::new("space-000").unwrap();
        let config = walship::wal::WalConfig { max_entry_bytes: 32, ..walship::wal::WalConfig::default() };
        let wal = SpaceWal::open(dir.path(), space, config).unwrap();
        let plan = WriterPlan {
            spaces: vec![wal],
            epoch: Epoch(1),
            rate: 0,
            entry_bytes: 64,
            total: Some(10),
            seed: 7,
            time_appends_after: None,
        };
        let Writer { stats, thread } = spawn_writer(plan, Arc::new(AtomicBool::new(false)));
        assert!(thread.join().unwrap().is_err());
        assert!(stats.done.load(Ordering::Acquire));
        assert_eq!(stats.written.load(Ordering::Relaxed), 0);
        assert!(stats.error.lock().unwrap().is_some());
    }

    async fn server() -> (String, status_http::Latest) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let latest: status_http::Latest = Arc::new(Mutex::new(None));
        tokio::spawn(status_http::serve(listener, latest.clone()));
        (url, latest)
    }

    #[tokio::test]
    async fn the_status_endpoint_serves_what_was_published_and_nothing_else() {
        let (url, latest) = server().await;
        let e = status_http::fetch(&url).await.unwrap_err();
        assert!(e.retry, "before the first status: try again ({})", e.message);
        *latest.lock().unwrap() = Some(Arc::new(br#"{"role":"primary","n":1}"#.to_vec()));
        let v = status_http::fetch(&url).await.unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(status_http::fetch(&format!("{url}/status")).await.unwrap()["n"], 1);
        let e = status_http::fetch(&format!("{url}/metrics")).await.unwrap_err();
        assert!(!e.retry && e.message.contains("404"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_request_split_across_writes_is_answered() {
        let (url, latest) = server().await;
        *latest.lock().unwrap() = Some(Arc::new(b"{}".to_vec()));
        let mut sock = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
        sock.write_all(b"GET /sta").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        sock.write_all(b"tus HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n{}"), "{answer}");
    }

    #[tokio::test]
    async fn addresses_without_a_port_and_cut_short_answers_are_told_apart() {
        let e = status_http::fetch("http://127.0.0.1").await.unwrap_err();
        assert!(!e.retry, "no port: fatal ({})", e.message);
        let e = status_http::fetch("https://127.0.0.1:1").await.unwrap_err();
        assert!(!e.retry, "not http: fatal ({})", e.message);
        // A server that stops mid-answer: worth another try.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"role\":").await;
        });
        let e = status_http::fetch(&url).await.unwrap_err();
        assert!(e.retry && e.message.contains("cut short"), "{}", e.message);
    }
}
