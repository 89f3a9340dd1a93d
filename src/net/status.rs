//! What `Primary::status()` and `Replica::status()` return: plain serializable structs, written as
//! JSON by the example binaries' `--status-file`.

use serde::Serialize;

use crate::codec::heartbeat::SeqSummary;
use crate::protocol::health::Health;
use crate::protocol::progress::Lag;
use crate::types::{Epoch, Seq, SpaceId};

/// One space's log on this node.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SpaceLog {
    /// The space.
    pub space: SpaceId,
    /// First sequence held.
    pub first_seq: Seq,
    /// Last sequence written.
    pub last_seq: Seq,
    /// Last sequence on stable storage.
    pub durable_seq: Seq,
    /// Log digest up to `last_seq`, as 16 hex digits.
    pub digest: String,
}

impl SpaceLog {
    /// Whether `other` is the same log: same space, last sequence and digest. Where each node's
    /// log starts (retention) and how much of it is durable may differ.
    pub fn same_log(&self, other: &SpaceLog) -> bool {
        (&self.space, self.last_seq, &self.digest) == (&other.space, other.last_seq, &other.digest)
    }

    pub(crate) fn of(wal: &crate::wal::SpaceWal) -> SpaceLog {
        let (last_seq, _, digest) = wal.end();
        SpaceLog {
            space: wal.space().clone(),
            first_seq: wal.first_seq(),
            last_seq,
            durable_seq: wal.durable_seq(),
            digest: digest.to_string(),
        }
    }
}

/// A primary's view of one replica's copy of one space.
#[derive(Clone, Debug, Serialize)]
pub struct SpaceReplication {
    /// The space.
    pub space: SpaceId,
    /// Primary's last sequence.
    pub head: Seq,
    /// Last sequence sent to the replica.
    pub sent: Seq,
    /// Last sequence durable on the replica.
    pub durable: Seq,
    /// Last sequence applied on the replica.
    pub applied: Seq,
    /// Lag in entries, bytes and time.
    pub lag: Lag,
    /// Frame bytes sent and not yet acknowledged durable: what the primary holds for this pair,
    /// bounded by `max_unacked_bytes` plus one batch.
    pub inflight_bytes: u64,
    /// Why this space is not replicated to this replica, if it is not.
    pub error: Option<String>,
}

/// A primary's view of one replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    /// The replica's node name (from its certificate).
    pub name: String,
    /// Healthy, lagging, degraded or disconnected.
    pub state: Health,
    /// Remote address of the current or last connection.
    pub addr: Option<String>,
    /// Round-trip time from heartbeats, in ms.
    pub rtt_ms: Option<f64>,
    /// Connections from this replica so far, minus one.
    pub reconnects: u64,
    /// Largest lag over all spaces.
    pub max_lag: Lag,
    /// Frame bytes sent on the current connection.
    pub bytes_sent: u64,
    /// Entries sent on the current connection.
    pub entries_sent: u64,
    /// QUIC path statistics of the current connection.
    pub path: Option<PathStats>,
    /// Traffic to this replica over every connection since the primary started: what a report
    /// of a run with reconnects (a partition) needs, where the per-connection figures restart.
    pub totals: TrafficTotals,
    /// Per space.
    pub spaces: Vec<SpaceReplication>,
}

/// QUIC path statistics.
#[derive(Clone, Debug, Serialize, Default)]
pub struct PathStats {
    /// Smoothed RTT estimate of the congestion controller, in ms.
    pub rtt_ms: f64,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// UDP bytes sent.
    pub udp_tx_bytes: u64,
    /// UDP bytes received.
    pub udp_rx_bytes: u64,
}

impl PathStats {
    pub(crate) fn of(conn: &quinn::Connection) -> PathStats {
        let s = conn.stats();
        PathStats {
            rtt_ms: s.path.rtt.as_secs_f64() * 1e3,
            cwnd: s.path.cwnd,
            congestion_events: s.path.congestion_events,
            lost_packets: s.path.lost_packets,
            udp_tx_bytes: s.udp_tx.bytes,
            udp_rx_bytes: s.udp_rx.bytes,
        }
    }
}

/// Traffic to one replica, summed over connections.
#[derive(Clone, Copy, Debug, Serialize, Default, PartialEq, Eq)]
pub struct TrafficTotals {
    /// Batch frames sent.
    pub batches_sent: u64,
    /// Frame bytes sent (headers included).
    pub bytes_sent: u64,
    /// Entries sent.
    pub entries_sent: u64,
    /// UDP bytes sent.
    pub udp_tx_bytes: u64,
    /// UDP bytes received.
    pub udp_rx_bytes: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// What the codec did with the batches sent (compressed, or too small or incompressible to).
    pub codec: crate::codec::CodecCounts,
}

impl std::ops::AddAssign for TrafficTotals {
    fn add_assign(&mut self, o: TrafficTotals) {
        self.codec += o.codec;
        self.batches_sent += o.batches_sent;
        self.bytes_sent += o.bytes_sent;
        self.entries_sent += o.entries_sent;
        self.udp_tx_bytes += o.udp_tx_bytes;
        self.udp_rx_bytes += o.udp_rx_bytes;
        self.lost_packets += o.lost_packets;
        self.congestion_events += o.congestion_events;
    }
}

/// Everything a primary reports.
#[derive(Clone, Debug, Serialize)]
pub struct PrimaryStatus {
    /// Role, always "primary".
    pub role: &'static str,
    /// Node name.
    pub name: String,
    /// Current epoch.
    pub epoch: Epoch,
    /// Listen address.
    pub listen: String,
    /// Every space's log.
    pub spaces: Vec<SpaceLog>,
    /// Every replica seen since start, except those forgotten (`Primary::forget_replica`).
    pub replicas: Vec<ReplicaView>,
}

/// A replica's connection state.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Dialing or waiting to be dialed.
    Connecting,
    /// Connected and replicating.
    Connected,
    /// Lost its primary; retrying with backoff.
    Disconnected,
    /// Shut down.
    Stopped,
}

impl std::fmt::Display for ConnectionState {
    /// As in the status JSON: `connecting`, `connected`, `disconnected`, `stopped`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Stopped => "stopped",
        })
    }
}

/// One space on a replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaSpace {
    /// The log.
    #[serde(flatten)]
    pub log: SpaceLog,
    /// Last sequence handed to the apply hook and returned.
    pub applied_seq: Seq,
    /// Catch-up requests sent for this space.
    pub catch_ups: u64,
    /// The primary's last error about this space, if any (diverged, truncated).
    pub error: Option<String>,
    /// The space was set aside as damaged ([`ReplicaStatus::set_aside`]) and the apply hook has
    /// not yet been told to start its state again (`truncated(space, 0)`, just before the first
    /// entry fetched again).
    pub reset_pending: bool,
}

/// The primary's view, from its heartbeats: a cheap cross-check of the exact positions.
#[derive(Clone, Debug, Serialize)]
pub struct PrimaryHeartbeat {
    /// The primary's epoch.
    pub epoch: Epoch,
    /// Its spaces, the sum of their last sequences, and this replica's largest lag in entries.
    pub summary: SeqSummary,
    /// Heartbeats received on the current connection.
    pub received: u64,
}

/// Everything a replica reports.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    /// Role, always "replica".
    pub role: &'static str,
    /// Node name.
    pub name: String,
    /// Connection state.
    pub connection: ConnectionState,
    /// The primary's name once connected.
    pub primary: Option<String>,
    /// Primary's epoch from the last welcome.
    pub epoch: Epoch,
    /// Round-trip time from heartbeats, in ms.
    pub rtt_ms: Option<f64>,
    /// What the primary's last heartbeat said, once one arrived on the current connection.
    pub primary_heartbeat: Option<PrimaryHeartbeat>,
    /// Successful connections so far, minus one.
    pub reconnects: u64,
    /// The last error: of the connection (why it is not connected), or the last one the primary
    /// reported for a space this replica does not hold (naming the space). The primary's status
    /// lists every refused space.
    pub last_error: Option<String>,
    /// Bytes of large frames (over 64 KiB decompressed) being received or applied on the current
    /// connection, held to twice the primary's announced in-flight credit.
    pub assembling_bytes: u64,
    /// Every space.
    pub spaces: Vec<ReplicaSpace>,
    /// Spaces whose log was found damaged and set aside (moved, kept for an operator), at this
    /// start or an earlier one, whose apply hook was not yet told to reset when this replica
    /// started: each started again empty and is fetched again from the primary
    /// ([`DamagedSpace::SetAside`](crate::wal::DamagedSpace::SetAside)). The list is of this
    /// start; `spaces[].reset_pending` says whether the hook is still to be told.
    pub set_aside: Vec<crate::wal::SetAsideSpace>,
}

impl ReplicaStatus {
    /// This replica's log of `space`, if it holds one.
    pub fn log(&self, space: &SpaceId) -> Option<&SpaceLog> {
        self.spaces.iter().map(|s| &s.log).find(|log| &log.space == space)
    }
}

/// Writes `value` as pretty JSON to `path` atomically (see [`write_atomic`]), so a reader never
/// sees a half-written status.
pub fn write_json_atomic(path: &std::path::Path, value: &impl Serialize) -> std::io::Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)
}

/// Replaces `path` with `bytes` at once: a temporary file in the same folder, then a rename, so a
/// reader sees the old version or the new one, never a mix.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_log_ignores_retention_and_durability_only() {
        let log = |space: &str, first: u64, last: u64, durable: u64, digest: &str| SpaceLog {
            space: SpaceId::new(space).unwrap(),
            first_seq: Seq(first),
            last_seq: Seq(last),
            durable_seq: Seq(durable),
            digest: digest.to_string(),
        };
        let a = log("a", 1, 10, 10, "00ff");
        assert!(a.same_log(&log("a", 5, 10, 7, "00ff")));
        assert!(!a.same_log(&log("b", 1, 10, 10, "00ff")));
        assert!(!a.same_log(&log("a", 1, 11, 10, "00ff")));
        assert!(!a.same_log(&log("a", 1, 10, 10, "00fe")));
    }
}
