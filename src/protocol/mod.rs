//! Sans-I/O replication logic: plain types that take events and the current time and answer with
//! decisions, so all of it is unit-tested without sockets, disk or a runtime.
//!
//! - [`progress`]: what a primary knows of one replica's copy of one space (sent, durable, applied,
//!   bytes in flight) and the lag it derives.
//! - [`health`]: a replica's state from its lag: healthy, lagging, degraded, disconnected.
//! - [`handshake`]: whether a replica's position can resume against the primary's log, and where.
//! - [`admission`]: whether a replica takes a batch that arrived for a space, or asks for catch-up.
//! - [`outbox`]: control messages waiting for their stream, coalesced per space so a slow peer
//!   never makes them pile up.
//! - [`liveness`]: heartbeat bookkeeping: RTT and dead-peer detection.
//! - [`backoff`]: reconnect delays, exponential with jitter and a cap.
//! - [`stream_order`]: which of a space's data streams a replica takes as the current one.

pub mod admission;
pub mod backoff;
pub mod handshake;
pub mod health;
pub mod liveness;
pub mod outbox;
pub mod progress;
pub mod stream_order;
