//! The primary's view of its replicas (state, lag, QUIC path, traffic totals), read from its
//! status JSON the same way in every mode.

use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest wait, once the logs are identical, for the primary's view to show every replica
/// caught up: the replicas' last acknowledgements are still on their way when the logs match, and
/// a report of a verified run should not call its replicas "lagging".
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The primary's view of one replica, read from its status as JSON: in process from
/// `Primary::status()`, with `--processes` from the primary's status file. One reader for both
/// modes keeps their reports alike.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub name: String,
    /// healthy, lagging, degraded or disconnected.
    pub state: String,
    pub lag_entries: u64,
    pub lag_ms: u64,
    pub reconnects: u64,
    /// QUIC path statistics of the current connection (`null` before the first).
    pub path: Value,
    /// Traffic over every connection of the run.
    pub totals: Value,
}

impl View {
    pub fn all(status: &Value) -> Vec<View> {
        let Some(replicas) = status["replicas"].as_array() else { return Vec::new() };
        replicas
            .iter()
            .map(|r| View {
                name: r["name"].as_str().unwrap_or_default().to_string(),
                state: r["state"].as_str().unwrap_or("unknown").to_string(),
                lag_entries: r["max_lag"]["entries"].as_u64().unwrap_or(0),
                lag_ms: r["max_lag"]["ms"].as_u64().unwrap_or(0),
                reconnects: r["reconnects"].as_u64().unwrap_or(0),
                path: r["path"].clone(),
                totals: r["totals"].clone(),
            })
            .collect()
    }

    pub fn of(status: &Value, name: &str) -> Option<View> {
        View::all(status).into_iter().find(|v| v.name == name)
    }

    /// Connected and holding everything the primary wrote.
    pub fn caught_up(&self) -> bool {
        self.state == "healthy" && self.lag_entries == 0
    }

    /// A counter of the totals, by key or path (`codec/too_small`).
    pub fn total(&self, key: &str) -> u64 {
        self.totals.pointer(&format!("/{key}")).and_then(Value::as_u64).unwrap_or(0)
    }

    /// The current connection's path statistics (RTT, window), with the counters (lost packets,
    /// congestion events, UDP bytes) summed over every connection of the run, since a partition
    /// or a reconnect restarts the per-connection ones. Without a connection at the end, RTT and
    /// window are null and the counters are still the run's.
    pub fn path_json(&self) -> Value {
        let mut path = match &self.path {
            Value::Object(_) => self.path.clone(),
            _ => serde_json::json!({ "rtt_ms": null, "cwnd": null }),
        };
        if let Some(p) = path.as_object_mut() {
            for key in ["lost_packets", "congestion_events", "udp_tx_bytes", "udp_rx_bytes"] {
                p.insert(key.into(), self.totals[key].clone());
            }
        }
        path
    }
}

/// Waits up to [`SETTLE_TIMEOUT`], polling `status` every `every`, until the primary's view shows
/// every replica in `names` caught up; returns the last status read, how long that took, and, if
/// it never did, what it showed. `give_up` ends the wait early (an aborted run).
pub async fn settle_view(
    names: &[String],
    every: Duration,
    mut status: impl FnMut() -> Value,
    give_up: impl Fn() -> bool,
) -> Settled {
    let start = Instant::now();
    loop {
        let p = status();
        let behind: Vec<String> = names
            .iter()
            .map(|n| (n, View::of(&p, n)))
            .filter(|(_, v)| !v.as_ref().is_some_and(View::caught_up))
            .map(|(n, v)| match v {
                Some(v) => format!("{n} {} ({} entries, {} ms behind)", v.state, v.lag_entries, v.lag_ms),
                None => format!("{n} unknown to the primary"),
            })
            .collect();
        if behind.is_empty() || start.elapsed() >= SETTLE_TIMEOUT || give_up() {
            return Settled { status: p, waited: start.elapsed(), behind };
        }
        tokio::time::sleep(every).await;
    }
}

/// The primary's view once settled (or not, after [`SETTLE_TIMEOUT`]).
pub struct Settled {
    pub status: Value,
    pub waited: Duration,
    /// Replicas it still showed behind, as lines for the report.
    pub behind: Vec<String>,
}

impl Settled {
    /// The view of a run that did not converge: read at once, no wait, since the logs differ.
    pub fn now(status: Value) -> Settled {
        Settled { status, waited: Duration::ZERO, behind: Vec::new() }
    }
}
