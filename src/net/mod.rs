//! The only code that touches quinn, rustls and tokio networking: TLS, endpoints, framing over
//! streams, heartbeats, and the [`Primary`] and [`Replica`] drivers around the sans-I/O
//! [`crate::protocol`] types.

pub mod endpoint;
mod error;
mod framed;
mod heartbeat;
pub mod metrics;
mod primary;
mod replica;
pub mod status;
pub mod tls;

pub use error::NetError;
pub use primary::Primary;
pub use replica::{ApplyHook, Replica};

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::protocol::backoff::Backoff;

pub(crate) use crate::lock;

/// A session that lasted this long was a success: the next dial starts from the first delay
/// again. One that ended sooner counts as a failed attempt, so a peer that refuses at the
/// handshake is retried with growing delays rather than at the first delay for ever.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// Dials `name` at `addr` and runs `session` on the connection, for ever: whenever dialing fails
/// or a session ends, `ended` hears why (with the delay and how many attempts failed in a row)
/// and the next dial waits out `backoff`'s delay. The one reconnect loop of both node kinds.
async fn redial<S, F>(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    name: &str,
    dial_timeout: Duration,
    mut backoff: Backoff,
    mut session: S,
    mut ended: impl FnMut(String, Duration, u32),
) where
    S: FnMut(quinn::Connection) -> F,
    F: Future<Output = Result<(), NetError>>,
{
    let connect_error =
        |reason: String| NetError::Connect { addr, name: name.to_string(), reason: with_certificate_hint(reason) };
    loop {
        let result = async {
            let connecting = endpoint.connect(addr, name).map_err(|e| connect_error(e.to_string()))?;
            let conn = match tokio::time::timeout(dial_timeout, connecting).await {
                Ok(connected) => connected.map_err(|e| connect_error(e.to_string()))?,
                Err(_) => {
                    return Err(connect_error(format!(
                        "no handshake within {dial_timeout:?}: is the peer up at this address? (on a path whose \
                         round trip approaches that, raise TransportSettings::dial_timeout)"
                    )))
                }
            };
            let began = tokio::time::Instant::now();
            let ended = session(conn).await;
            if began.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            ended
        }
        .await;
        let delay = backoff.next_delay();
        let reason = result.err().map_or_else(|| "connection closed".to_string(), |e| e.to_string());
        ended(reason, delay, backoff.attempts());
        tokio::time::sleep(delay).await;
    }
}

/// Closes `conn` (protocol violation) as soon as the peer opens a stream the protocol never has
/// it open: `uni` for data streams (only a primary opens them), `bi` for control streams (a
/// replica opens one, which the caller has accepted already). Unread, their data would sit in the
/// connection's buffers, up to its receive window.
async fn refuse_unexpected_streams(conn: quinn::Connection, uni: bool, bi: bool) {
    let accepted = async {
        tokio::select! {
            r = conn.accept_uni(), if uni => r.map(|_| "a data stream"),
            r = conn.accept_bi(), if bi => r.map(|_| "a second control stream"),
            else => std::future::pending().await,
        }
    };
    if let Ok(what) = accepted.await {
        tracing::warn!(remote = %conn.remote_address(), "the peer opened {what}; closing the connection");
        conn.close(close::PROTOCOL, format!("unexpected stream: {what}").as_bytes());
    }
}

/// Whether a connection failed on a certificate: a configuration error that retrying does not
/// fix, worth a warning rather than the info line of an ordinary reconnect.
pub(crate) fn is_certificate_error(reason: &str) -> bool {
    reason.contains("certificate")
}

/// Logs an incoming connection that failed its handshake: a warning with the hint if it was
/// on a certificate (a node of another cluster, or misnamed), else an info line.
pub(crate) fn log_refused_handshake(remote: SocketAddr, e: &quinn::ConnectionError) {
    let reason = e.to_string();
    if is_certificate_error(&reason) {
        tracing::warn!(%remote, error = %with_certificate_hint(reason), "refused a connection: certificate check failed");
    } else {
        tracing::info!(%remote, error = %reason, "refused a connection during the handshake");
    }
}

/// `reason` with what a rejected certificate usually means here, if it was one.
fn with_certificate_hint(reason: String) -> String {
    if !is_certificate_error(&reason) {
        return reason;
    }
    format!(
        "{reason} (the two nodes must trust the same cluster CA, e.g. certificates from one gen_certs run, and \
         the peer's certificate must name the node this one expects: primary_name, or the replica's name)"
    )
}

/// Entries of `wal` from `from` on ([`crate::wal::SpaceWal::read_from`]): from the memory tail
/// when it holds them, else read from disk on a blocking thread, so a catch-up from old segments
/// never stalls the runtime's threads (which must keep draining the UDP socket).
pub(crate) async fn read_entries(
    wal: &crate::wal::SpaceWal,
    from: crate::types::Seq,
    max_entries: usize,
    max_bytes: usize,
) -> Result<Vec<crate::entry::Entry>, NetError> {
    if let Some(entries) = wal.read_from_memory(from, max_entries, max_bytes)? {
        return Ok(entries);
    }
    let wal = wal.clone();
    let read = tokio::task::spawn_blocking(move || wal.read_from(from, max_entries, max_bytes));
    Ok(read.await.map_err(|e| NetError::Task(format!("WAL read: {e}")))??)
}

/// Opens (and recovers) a node's WAL store on a blocking thread: recovering thousands of spaces
/// reads their segments, which must not stall the runtime the node is embedded in.
async fn open_store(dir: &std::path::Path, config: &crate::wal::WalConfig) -> Result<crate::wal::WalStore, NetError> {
    let (dir, config) = (dir.to_path_buf(), config.clone());
    let opened = tokio::task::spawn_blocking(move || crate::wal::WalStore::open(&dir, config)).await;
    Ok(opened.map_err(|e| NetError::Task(format!("opening the WAL store: {e}")))??)
}

/// The end of a node's shutdown: close the endpoint, stop the node's tasks, sync every space's WAL,
/// and let the connections drain so the address is free again.
async fn close_and_sync(
    endpoint: &quinn::Endpoint,
    tasks: &mut tokio::task::JoinSet<()>,
    store: &crate::wal::WalStore,
    reason: &[u8],
) {
    endpoint.close(close::SHUTDOWN, reason);
    tasks.shutdown().await;
    let store = store.clone();
    let synced = tokio::task::spawn_blocking(move || {
        for wal in store.spaces() {
            if let Err(e) = wal.sync() {
                tracing::warn!(space = %wal.space(), error = %e, "sync at shutdown failed");
            }
        }
    });
    if let Err(e) = synced.await {
        tracing::warn!(error = %e, "sync at shutdown did not complete");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// The last step of a node's shutdown, once its endpoint handles are dropped: quinn's endpoint
/// driver closes the UDP socket when it next runs, so wait (up to a second) until `addr` can be
/// bound again. A node server that restarts replication on the same port then never sees
/// "address in use".
async fn wait_released(addr: Option<SocketAddr>) {
    let Some(addr) = addr else { return };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while std::net::UdpSocket::bind(addr).is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// How long a peer may take to open the control stream and say hello or welcome.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Application close codes of a connection.
pub mod close {
    use quinn::VarInt;
    /// The node is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// A newer connection from the same replica took over.
    pub const REPLACED: VarInt = VarInt::from_u32(1);
    /// No heartbeat within the timeout.
    pub const DEAD_PEER: VarInt = VarInt::from_u32(2);
    /// The peer broke the protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(3);
    /// The peer is not who it must be.
    pub const UNAUTHORIZED: VarInt = VarInt::from_u32(4);
    /// This node failed internally; the peer should reconnect.
    pub const LOCAL_FAILURE: VarInt = VarInt::from_u32(5);
    /// A space's log was cut back on the primary during the session (or on the replica during the
    /// handshake): what the replica holds past the cut may differ from what the primary writes
    /// there next, so the handshake must compare the logs again (the replica reconnects).
    pub const LOG_CUT: VarInt = VarInt::from_u32(6);
    /// Another live replica process is connected under this replica's name.
    pub const DUPLICATE_NAME: VarInt = VarInt::from_u32(7);
}

/// Application error codes of a data stream (`stop` / `reset`).
pub mod stream_code {
    use quinn::VarInt;
    /// The stream is abandoned for a catch-up from another sequence.
    pub const CATCH_UP: VarInt = VarInt::from_u32(1);
    /// The stream's header was not valid.
    pub const BAD_FRAME: VarInt = VarInt::from_u32(2);
    /// The receiver cannot store the space.
    pub const LOCAL_FAILURE: VarInt = VarInt::from_u32(3);
}
