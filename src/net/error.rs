//! Errors of the network drivers.

use std::net::SocketAddr;

use crate::codec::{DecodeError, EncodeError};
use crate::config::ConfigError;
use crate::net::endpoint::EndpointError;
use crate::net::tls::TlsError;
use crate::wal::WalError;

/// What stopped a primary, a replica or one of their connections.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates could not be loaded or used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The local WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Dialing a peer failed before a connection existed.
    #[error("cannot dial {addr} ({name}): {reason}")]
    Connect { addr: SocketAddr, name: String, reason: String },
    /// The connection was lost or closed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read failed: {0}")]
    Read(quinn::ReadError),
    /// A stream ended in the middle of a frame or message.
    #[error("stream ended in the middle of a {0}")]
    UnexpectedEnd(&'static str),
    /// The peer sent bytes that are not valid.
    #[error("bad input from peer: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The peer broke the protocol (wrong message, wrong identity, wrong version).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Work moved to a blocking thread (disk reads, opening WALs) did not complete.
    #[error("a blocking task failed ({0}); the node is shutting down or hit a bug: restart it")]
    Task(String),
    /// The peer did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The primary's list of known replicas is damaged: starting without it could let
    /// retention trim what a replica not back yet needs.
    #[error("the list of known replicas {} is damaged ({reason}): remove it to start; retention then counts each replica from when it reconnects (keep a floor of your own until then)", path.display())]
    KnownReplicas { path: std::path::PathBuf, reason: String },
    /// The replica's epoch fence holds something else than an epoch: starting without it could
    /// accept a deposed primary.
    #[error("the epoch fence {} is damaged ({reason}): it holds the newest primary epoch this replica accepted; write that epoch into it (a decimal number), or remove it to start with the newest epoch of this replica's logs alone (a deposed primary between the two would then be accepted)", path.display())]
    EpochFence { path: std::path::PathBuf, reason: String },
    /// The primary could not write its list of known replicas: a replica is not welcomed (it
    /// retries) until it can, so that a restart never forgets it.
    #[error("cannot keep the list of known replicas ({0}); replicas are not welcomed until it can be written: check the disk and permissions of the data folder")]
    KeepKnown(#[source] WalError),
    /// The replica's log of a space was cut back between its hello and the welcome: the hello
    /// is stale, so it says hello again.
    #[error("the log of space {0} was cut back during the handshake; saying hello again")]
    CutDuringHandshake(crate::types::SpaceId),
}

impl From<quinn::ReadError> for NetError {
    /// A read that failed because the connection is gone reports why it went (the peer's close
    /// reason), not just "connection lost".
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => NetError::Connection(c),
            other => NetError::Read(other),
        }
    }
}

impl From<quinn::ReadExactError> for NetError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => NetError::UnexpectedEnd("frame"),
            quinn::ReadExactError::ReadError(e) => e.into(),
        }
    }
}
