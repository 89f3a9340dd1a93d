//! Helpers shared by the example binaries: flag parsing, signals and exit codes, and (in their own
//! modules) the built-in writer, the status reporting and the status endpoint.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use walship::netsim::{self, GilbertElliott, Impairment};
use walship::wal::SyncPolicy;
use walship::SpaceId;

pub mod lag;
pub mod report;
pub mod status_http;
pub mod writer;

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

    #[test]
    fn a_period_must_be_more_than_zero() {
        assert!(parse_period("0s").is_err());
        assert!(parse_period("0ms").is_err());
        assert_eq!(parse_period("100ms"), Ok(Duration::from_millis(100)));
    }
}
