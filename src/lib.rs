//! # walship
//!
//! A QUIC-based, multiplexed WAL replication transport. A database node server embeds a [`Primary`] or a
//! [`Replica`]; the write-ahead log of every memory space flows from one to the other over one mutually
//! authenticated QUIC connection per primary/replica pair.
//!
//! ```text
//!  node server (primary)                                   node server (replica)
//!  append(space, entry) ─▶ WAL ─┐                      ┌─▶ WAL ─▶ subscribers (apply)
//!                               │   one QUIC connection │
//!                  per-space ───┼── uni stream "a" ────▶├── validate, append, fsync, ack
//!                  shippers  ───┼── uni stream "b" ────▶│
//!                               │◀─ control (bi): hello/welcome, acks, catch-up
//!                               │◀▶ datagrams: heartbeats (RTT, liveness, lag)
//! ```
//!
//! ## Layout
//! - [`types`]: `SpaceId`, `Seq`, `Epoch`, `NodeId` newtypes.
//! - [`entry`]: the log entry, its end-to-end checksum and the chained log digest.
//! - [`codec`]: bytes <-> types without I/O: batch frames, compression, control messages, heartbeats.
//! - [`wal`]: the segmented per-space log with crash recovery, retention and a memory tail.
//! - [`payload`]: seeded realistic payloads for demos, load tests and benchmarks.
//! - [`config`]: primary and replica settings with documented defaults.
//! - [`protocol`]: sans-I/O replication bookkeeping: per-(space, replica) progress, lag, health.
//! - [`net`]: the only code that touches quinn, rustls and tokio: TLS, endpoints, the primary and replica drivers.

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
pub use net::{ApplyHook, Primary, Replica};
pub use types::{EntryKind, Epoch, NodeId, Seq, SpaceId};
