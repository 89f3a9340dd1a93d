//! What a node binary reports and where: its status file, its status over HTTP
//! ([`super::status_http`]) and its Prometheus metrics.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{parse_addr, parse_period, status_http};

/// What a node binary reports, and where: its status file, its status over HTTP and its
/// Prometheus metrics.
#[derive(clap::Args, Debug)]
pub struct ReportFlags {
    /// Rewrite this file with the status as JSON every `--status-every` and at shutdown (that
    /// last one with `"stopped": true`).
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
        // The last snapshot, written at shutdown, says so: its connections were live when it was taken.
        extra.entry("stopped").or_insert(serde_json::Value::Bool(false));
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
