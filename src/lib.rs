//! # walship
//!
//! A QUIC-based, multiplexed WAL replication transport. A database node server embeds a [`Primary`] or a
//! [`Replica`]; the write-ahead log of every memory space flows from one to the other over one mutually
//! authenticated QUIC connection per primary/replica pair.
//!
//! ```text
//!  node server (primary)                                   node server (replica)
//!  append(space, entry) ─▶ WAL ─┐                      ┌─▶ WAL ─▶ ApplyHook (apply)
//!                               │   one QUIC connection │
//!                  per-space ───┼── uni stream "a" ────▶├── validate, append, fsync, ack
//!                  shippers  ───┼── uni stream "b" ────▶│
//!                               │◀─ control (bi): hello/welcome, acks, catch-up
//!                               │◀▶ datagrams: heartbeats (RTT, liveness, lag)
//! ```
//!
//! ## Tutorial
//!
//! A primary and a replica in one process, on certificates made in memory:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use walship::config::{PrimaryConfig, ReplicaConfig};
//! use walship::net::tls::ClusterCa;
//! use walship::{Primary, Replica, SpaceId};
//!
//! let dir = tempfile::tempdir()?;
//! let ca = ClusterCa::generate("example CA")?; // production: NodeIdentity::load(certs_dir, name)
//! let primary = Primary::start(
//!     PrimaryConfig::new("primary", "127.0.0.1:0".parse()?, dir.path().join("primary")),
//!     ca.issue("primary")?,
//! )
//! .await?;
//! let replica = Replica::start(
//!     ReplicaConfig::new("replica-1", primary.local_addr(), "primary", dir.path().join("replica")),
//!     ca.issue("replica-1")?,
//! )
//! .await?;
//!
//! // The write path: append to the local WAL and return; replication happens behind it.
//! let space = SpaceId::new("tenant-42")?;
//! for i in 0..100u32 {
//!     primary.append(&space, 1, Bytes::from(format!("{{\"op\":\"update\",\"n\":{i}}}")))?;
//! }
//!
//! // The replica's copy converges to the same log: same last sequence, same digest.
//! let wal = primary.space(&space)?;
//! while replica.space(&space).map(|r| (r.last_seq(), r.digest())) != Some((wal.last_seq(), wal.digest())) {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! assert_eq!(replica.status().spaces[0].log.last_seq.get(), 100);
//! replica.shutdown().await;
//! primary.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout
//! - [`types`]: `SpaceId`, `Seq`, `Epoch`, `NodeId` newtypes.
//! - [`entry`]: the log entry, its end-to-end checksum and the chained log digest.
//! - [`codec`]: bytes <-> types without I/O: batch frames, compression, control messages, heartbeats.
//! - [`wal`]: the segmented per-space log with crash recovery, retention and a memory tail.
//! - [`payload`]: seeded realistic payloads for demos, load tests and benchmarks.
//! - [`config`]: primary and replica settings with documented defaults.
//! - [`protocol`]: sans-I/O replication logic: progress and lag, health, handshake, batch
//!   admission, the control outbox, liveness, backoff.
//! - [`net`]: the only code that touches quinn, rustls and tokio: TLS, endpoints, the primary and replica drivers.
//! - [`netsim`]: the seeded lossy-link simulator (in-process sockets for tests, a UDP forwarder for load tests).

pub mod codec;
pub mod config;
pub mod entry;
pub mod net;
pub mod netsim;
pub mod payload;
pub mod protocol;
pub mod types;
pub mod wal;

pub use entry::{Entry, LogDigest};

/// Locks a mutex, recovering the data if a panicking thread poisoned it (every update under these
/// locks leaves the data consistent, so a poisoned lock still holds valid data).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use net::{ApplyHook, Primary, Replica};
pub use types::{EntryKind, Epoch, NodeId, Seq, SpaceId};
