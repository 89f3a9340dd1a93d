//! Settings of a [`crate::net::Primary`] and a [`crate::net::Replica`], with documented defaults
//! and `validate()`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::codec::batch::FrameLimits;
use crate::codec::compression::DEFAULT_MIN_COMPRESS_BYTES;
use crate::codec::Compression;
use crate::net::endpoint::TransportSettings;
use crate::types::Epoch;
use crate::wal::WalConfig;

/// Heartbeats go out this often: frequent enough to measure RTT and spot a dead peer within a second.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A peer silent for this long is declared dead and its connection closed.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// A replica whose oldest missing entry is older than this is "degraded".
pub const DEFAULT_LAG_THRESHOLD: Duration = Duration::from_secs(1);
/// Upper bound on entries per batch: large enough to amortize framing, small enough to keep latency.
pub const DEFAULT_MAX_BATCH_ENTRIES: usize = 8_192;
/// Upper bound on a batch's entry bytes: 1 MiB frames keep per-frame costs negligible.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Frame bytes a primary keeps sent-but-not-durable per (space, replica) before it stops reading
/// ahead: about one stream window, so a stalled space costs bounded memory.
pub const DEFAULT_MAX_UNACKED_BYTES: usize = 8 * 1024 * 1024;

/// Frame bytes a primary keeps sent-but-not-durable per replica over all spaces together (frames
/// of [`SMALL_FRAME_BYTES`] or less excepted): what bounds the frames a replica assembles at once
/// when thousands of spaces catch up together. 64 MiB: the connection's receive window.
pub const DEFAULT_MAX_REPLICA_INFLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// Frames up to this size ship without [`PrimaryConfig::max_replica_inflight_bytes`] credit, so
/// live spaces' small frames never queue behind catch-up.
pub const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// The largest in-flight credit a replica accepts from a primary (see
/// [`ReplicaConfig::max_assembly_bytes`]).
pub const DEFAULT_MAX_ASSEMBLY_BYTES: usize = 256 * 1024 * 1024;

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Heartbeat timing, shared by both roles.
#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    /// How often a heartbeat datagram is sent.
    pub interval: Duration,
    /// Silence after which the peer is declared dead.
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig { interval: DEFAULT_HEARTBEAT_INTERVAL, timeout: DEFAULT_PEER_TIMEOUT }
    }
}

/// A replica a primary dials itself (when the primary knows its replicas, e.g. from a space assignment).
#[derive(Clone, Debug)]
pub struct ReplicaAddr {
    /// The replica's node name, as in its certificate.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Settings of a primary.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Node name; must match the primary's certificate.
    pub name: String,
    /// The primary's epoch: its term of authority over the logs.
    pub epoch: Epoch,
    /// Address to listen on for replicas.
    pub listen: SocketAddr,
    /// Folder of the WAL (one sub-folder per space).
    pub data_dir: PathBuf,
    /// WAL settings.
    pub wal: WalConfig,
    /// Batch compression.
    pub compression: Compression,
    /// Batches with fewer entry bytes than this go uncompressed.
    pub min_compress_bytes: usize,
    /// Most entries in one batch.
    pub max_batch_entries: usize,
    /// Most entry bytes in one batch.
    pub max_batch_bytes: usize,
    /// Optional wait for more entries before a batch closes (no artificial delay by default).
    pub linger: Option<Duration>,
    /// Frame bytes sent and not yet durable per (space, replica) before shipping pauses.
    pub max_unacked_bytes: usize,
    /// Frame bytes larger than [`SMALL_FRAME_BYTES`] sent and not yet durable per replica, all
    /// spaces together: larger frames wait for credit above it. Bounds what a replica assembles
    /// at once (each stream's frame is copied out of QUIC's buffers into its own) to this, plus
    /// `SMALL_FRAME_BYTES` per space at most. Must hold the largest frame.
    pub max_replica_inflight_bytes: usize,
    /// Lag above which a replica is "degraded".
    pub lag_threshold: Duration,
    /// Heartbeat timing.
    pub heartbeat: HeartbeatConfig,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// Bounds on frames this primary sends; a replica announcing a smaller `max_batch_bytes` in
    /// its hello gets batches within its own.
    pub limits: FrameLimits,
    /// Replicas this primary dials (besides accepting the ones that dial it).
    pub dial_replicas: Vec<ReplicaAddr>,
    /// Multiplex every space onto one stream instead of one stream per space. A measurement mode, to
    /// show what per-space streams save (head-of-line blocking); a bad frame closes the connection.
    pub single_stream: bool,
}

impl PrimaryConfig {
    /// Defaults for a primary named `name` listening on `listen` with its WAL in `data_dir`.
    pub fn new(name: impl Into<String>, listen: SocketAddr, data_dir: impl Into<PathBuf>) -> PrimaryConfig {
        PrimaryConfig {
            name: name.into(),
            epoch: Epoch(1),
            listen,
            data_dir: data_dir.into(),
            wal: WalConfig::default(),
            compression: Compression::Lz4,
            min_compress_bytes: DEFAULT_MIN_COMPRESS_BYTES,
            max_batch_entries: DEFAULT_MAX_BATCH_ENTRIES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            linger: None,
            max_unacked_bytes: DEFAULT_MAX_UNACKED_BYTES,
            max_replica_inflight_bytes: DEFAULT_MAX_REPLICA_INFLIGHT_BYTES,
            lag_threshold: DEFAULT_LAG_THRESHOLD,
            heartbeat: HeartbeatConfig::default(),
            transport: TransportSettings::default(),
            limits: FrameLimits::default(),
            dial_replicas: Vec::new(),
            single_stream: false,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_entries == 0 || self.max_batch_bytes == 0 {
            return Err(ConfigError("max_batch_entries and max_batch_bytes must be at least 1".into()));
        }
        if self.max_batch_bytes.saturating_add(self.max_batch_entries.saturating_mul(32)) > self.limits.max_batch_bytes
        {
            return Err(ConfigError(format!(
                "max_batch_bytes {} (plus entry headers) exceeds the frame limit {}; lower it or raise limits.max_batch_bytes",
                self.max_batch_bytes, self.limits.max_batch_bytes
            )));
        }
        let largest_frame = self.limits.max_batch_bytes.saturating_add(crate::codec::batch::BATCH_HEADER_LEN);
        if self.max_replica_inflight_bytes < largest_frame {
            return Err(ConfigError(format!(
                "max_replica_inflight_bytes {} is below the largest frame ({largest_frame} bytes): such a frame could never ship",
                self.max_replica_inflight_bytes
            )));
        }
        check_heartbeat(&self.heartbeat)?;
        check_entry_fits(&self.wal, &self.limits)?;
        if self.wal.damaged_space == crate::wal::DamagedSpace::SetAside {
            return Err(ConfigError(
                "wal.damaged_space SetAside is for replicas: a primary's log is the only copy, so a damaged space must stop it (DamagedSpace::Refuse) for an operator to restore"
                    .into(),
            ));
        }
        if self.epoch.0 == 0 {
            return Err(ConfigError("epoch must be at least 1".into()));
        }
        Ok(())
    }
}

/// Settings of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Node name; must match the replica's certificate.
    pub name: String,
    /// The primary to dial, or `None` if this replica waits for its primary to dial it on `listen`.
    pub primary: Option<SocketAddr>,
    /// The primary's node name, checked against its certificate.
    pub primary_name: String,
    /// Address to listen on when the primary dials (the default `None` dials out only).
    pub listen: Option<SocketAddr>,
    /// Folder of the WAL copy (one sub-folder per space).
    pub data_dir: PathBuf,
    /// WAL settings.
    pub wal: WalConfig,
    /// Heartbeat timing.
    pub heartbeat: HeartbeatConfig,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Longest wait before acks go out; acks also go out as soon as the previous one was written.
    pub ack_interval: Duration,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// Bounds on frames this replica accepts. Its hello announces `max_batch_bytes`, and the
    /// primary sends no larger batch on that connection.
    pub limits: FrameLimits,
    /// The largest in-flight credit (`PrimaryConfig::max_replica_inflight_bytes`) this replica
    /// accepts from a primary; a primary announcing more is refused at the handshake. The replica
    /// closes the connection of a primary that has more than twice its credit of large frames
    /// being received at once, so this bounds the memory of frames in assembly (twice this,
    /// plus `SMALL_FRAME_BYTES` per stream). Default 256 MiB.
    pub max_assembly_bytes: usize,
}

impl ReplicaConfig {
    /// Defaults for a replica named `name` dialing `primary` (named `primary_name`) with its WAL in `data_dir`.
    pub fn new(
        name: impl Into<String>,
        primary: SocketAddr,
        primary_name: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> ReplicaConfig {
        ReplicaConfig {
            name: name.into(),
            primary: Some(primary),
            primary_name: primary_name.into(),
            listen: None,
            data_dir: data_dir.into(),
            // A damaged space is fetched again from the primary rather than keeping the node down.
            wal: WalConfig::default().damaged_space(crate::wal::DamagedSpace::SetAside),
            heartbeat: HeartbeatConfig::default(),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ack_interval: Duration::from_millis(10),
            transport: TransportSettings::default(),
            limits: FrameLimits::default(),
            max_assembly_bytes: DEFAULT_MAX_ASSEMBLY_BYTES,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.primary.is_none() && self.listen.is_none() {
            return Err(ConfigError("a replica needs a primary address to dial or a listen address".into()));
        }
        if self.reconnect_initial.is_zero() || self.reconnect_initial > self.reconnect_max {
            return Err(ConfigError("reconnect_initial must be > 0 and <= reconnect_max".into()));
        }
        check_heartbeat(&self.heartbeat)?;
        check_entry_fits(&self.wal, &self.limits)
    }
}

/// The largest entry the WAL accepts must fit in one frame, or it could never be shipped; and a
/// frame's length must fit the header's 32-bit fields.
fn check_entry_fits(wal: &WalConfig, limits: &FrameLimits) -> Result<(), ConfigError> {
    if limits.max_batch_bytes > u32::MAX as usize {
        return Err(ConfigError(format!(
            "limits.max_batch_bytes {} is over {}: a frame's lengths are 32-bit on the wire",
            limits.max_batch_bytes,
            u32::MAX
        )));
    }
    let needed = wal.max_entry_bytes as usize + crate::codec::batch::ENTRY_HEADER_LEN;
    if needed > limits.max_batch_bytes {
        return Err(ConfigError(format!(
            "wal.max_entry_bytes {} plus its {}-byte header exceeds the frame limit {}: such an entry could be written but never shipped; lower wal.max_entry_bytes or raise limits.max_batch_bytes on every node",
            wal.max_entry_bytes,
            crate::codec::batch::ENTRY_HEADER_LEN,
            limits.max_batch_bytes
        )));
    }
    Ok(())
}

fn check_heartbeat(hb: &HeartbeatConfig) -> Result<(), ConfigError> {
    if hb.interval.is_zero() || hb.timeout <= hb.interval {
        return Err(ConfigError(format!(
            "heartbeat timeout ({:?}) must exceed a non-zero interval ({:?})",
            hb.timeout, hb.interval
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_refused() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut p = PrimaryConfig::new("p", addr, "/tmp/x");
        p.validate().unwrap();
        p.heartbeat.timeout = p.heartbeat.interval;
        assert!(p.validate().is_err());
        let mut r = ReplicaConfig::new("r", addr, "p", "/tmp/y");
        r.validate().unwrap();
        // A replica's WAL settings (damaged spaces set aside) are refused for a primary.
        let mut promoted = PrimaryConfig::new("p", addr, "/tmp/x");
        promoted.wal = r.wal.clone();
        assert!(promoted.validate().unwrap_err().0.contains("SetAside is for replicas"));
        r.primary = None;
        assert!(r.validate().is_err());
    }

    #[test]
    fn the_largest_wal_entry_must_fit_in_a_frame() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut p = PrimaryConfig::new("p", addr, "/tmp/x");
        p.limits.max_batch_bytes = p.wal.max_entry_bytes as usize;
        assert!(p.validate().unwrap_err().0.contains("never shipped"));
        p.limits = FrameLimits::default();
        p.validate().unwrap();
        // Lengths are 32-bit in a frame's header.
        let mut r = ReplicaConfig::new("r", addr, "p", "/tmp/y");
        r.limits.max_batch_bytes = u32::MAX as usize + 1;
        assert!(r.validate().unwrap_err().0.contains("32-bit"));
    }
}
