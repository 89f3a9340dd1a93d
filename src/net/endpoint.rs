//! quinn endpoints tuned for WAL replication.
//!
//! One QUIC connection carries a primary/replica pair: one unidirectional stream per memory space
//! (thousands of them), a bidirectional control stream, and datagrams for heartbeats. quinn's
//! defaults (100 uni streams, small windows, no keep-alive, ~200 KiB UDP buffers) are sized for
//! web-style traffic, so [`TransportSettings`] holds the values this workload needs.
//!
//! [`server_endpoint`] and [`client_endpoint`] bind a UDP socket and build an endpoint; for a
//! custom socket (e.g. a lossy-link simulator implementing [`quinn::AsyncUdpSocket`]) build the
//! configurations with [`server_config`] / [`client_config`] and pass them to
//! [`quinn::Endpoint::new_with_abstract_socket`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use super::tls::{self, NodeIdentity, TlsError};

/// Uni streams the peer may have open towards us at once. A primary opens one per memory space,
/// and 10,000 spaces must fit with headroom. What counts is the limit of the *receiver* (the
/// replica) because QUIC stream credit is granted by the side that accepts streams; once the
/// limit is reached `open_uni` on the sender waits (forever, if no stream ever finishes).
/// quinn's default is 100.
pub const DEFAULT_MAX_CONCURRENT_UNI_STREAMS: u32 = 16_384;

/// Bidi streams the peer may open at once: the control stream plus a few spare (e.g. a
/// catch-up or diagnostics exchange). Kept small, nothing else uses bidi streams.
pub const DEFAULT_MAX_CONCURRENT_BIDI_STREAMS: u32 = 8;

/// Bytes one stream may have in flight unacknowledged by the receiving application: lets a busy
/// space ship a large batch burst without waiting a round trip per window. The connection window
/// below bounds the total, so thousands of streams do not multiply memory.
pub const DEFAULT_STREAM_RECEIVE_WINDOW: u64 = 8 * 1024 * 1024;

/// Bytes all streams of a connection together may have in flight towards the receiver: the cap
/// on what a replica buffers for one primary; about 50 ms at 10 Gbit/s.
pub const DEFAULT_RECEIVE_WINDOW: u64 = 64 * 1024 * 1024;

/// Bytes the sender buffers unacknowledged across all streams; matched to the peer's receive
/// window so the sender is not the bottleneck.
pub const DEFAULT_SEND_WINDOW: u64 = 64 * 1024 * 1024;

/// Received datagrams (heartbeats) buffered before the application reads them. `Some` enables
/// datagrams; heartbeats are tiny, so 1 MiB covers long application stalls.
pub const DEFAULT_DATAGRAM_RECEIVE_BUFFER: usize = 1024 * 1024;

/// Outgoing datagrams buffered before the oldest are dropped; a stale heartbeat is worthless, so
/// this stays modest.
pub const DEFAULT_DATAGRAM_SEND_BUFFER: usize = 1024 * 1024;

/// Keep-alive (PING) interval: keeps NAT/firewall state warm and detects a dead path well before
/// the idle timeout even when no WAL traffic flows. Must be below the idle timeout.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// A connection silent this long is dead; the replica then reconnects and catches up. Long
/// enough to ride out a few lost keep-alives, short enough for timely failover decisions.
pub const DEFAULT_MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// RTT assumed before the first sample. Replication runs inside a data center, so quinn's
/// default (333 ms, meant for the internet) would only slow the first loss recovery.
pub const DEFAULT_INITIAL_RTT: Duration = Duration::from_millis(10);

/// UDP socket send/receive buffer size asked of the kernel. The usual default (~208 KiB) drops
/// packets when a window's worth arrives in a burst; Linux caps the request at
/// `net.core.rmem_max` / `net.core.wmem_max` (raise those with sysctl to get it all).
pub const DEFAULT_SOCKET_BUFFER_SIZE: usize = 4 * 1024 * 1024;

/// The smallest [`TransportSettings::initial_window`]: two full-size (1,500-byte) packets.
pub const MIN_INITIAL_WINDOW: u64 = 3_000;

/// Transport parameters of replication connections. [`Default`] uses the `DEFAULT_*` constants
/// of this module, whose comments say why.
///
/// The congestion controller is BBR by default. A loss-based controller (Cubic, NewReno) caps
/// throughput near `MSS / RTT * 1.22 / sqrt(loss)` on links with random loss: measured here at 1%
/// loss and 40 ms RTT, Cubic carried 0.21 MB/s and ended 76 s behind a 10,000 entries/s writer,
/// where BBR kept up with a lag p99 of 62 ms (docs/PERFORMANCE.md section 8). quinn's BBR is experimental
/// and, under sustained overload, fills the bottleneck queue (unfair to other traffic on a shared
/// link): choose [`CongestionControl::Cubic`] for links shared with other traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// Congestion controller.
    pub congestion: CongestionControl,
    /// The congestion window a new connection starts with, in bytes; `None` keeps quinn's
    /// default (BBR: 240 KB, 200 packets of 1,200 bytes; Cubic and NewReno: 12 KB). A new
    /// connection sends at most this much per round trip until its controller has measured the
    /// link, so on a long link a high write rate falls behind at first: at 40 ms RTT and 10 MB/s
    /// on the wire, about 300 ms of lag right after (re)connecting with BBR's default
    /// (docs/PERFORMANCE.md section 5). A start near the link's bandwidth-delay product removes
    /// that spike; keep the default on links shared with traffic you do not control.
    pub initial_window: Option<u64>,
    /// See [`DEFAULT_MAX_CONCURRENT_UNI_STREAMS`].
    pub max_concurrent_uni_streams: u32,
    /// See [`DEFAULT_MAX_CONCURRENT_BIDI_STREAMS`].
    pub max_concurrent_bidi_streams: u32,
    /// See [`DEFAULT_STREAM_RECEIVE_WINDOW`].
    pub stream_receive_window: u64,
    /// See [`DEFAULT_RECEIVE_WINDOW`].
    pub receive_window: u64,
    /// See [`DEFAULT_SEND_WINDOW`].
    pub send_window: u64,
    /// See [`DEFAULT_DATAGRAM_RECEIVE_BUFFER`]; `None` disables receiving datagrams.
    pub datagram_receive_buffer_size: Option<usize>,
    /// See [`DEFAULT_DATAGRAM_SEND_BUFFER`].
    pub datagram_send_buffer_size: usize,
    /// See [`DEFAULT_KEEP_ALIVE_INTERVAL`]; `None` disables keep-alives.
    pub keep_alive_interval: Option<Duration>,
    /// See [`DEFAULT_MAX_IDLE_TIMEOUT`]. The effective timeout is the smaller of both sides'.
    pub max_idle_timeout: Duration,
    /// See [`DEFAULT_INITIAL_RTT`].
    pub initial_rtt: Duration,
    /// See [`DEFAULT_DIAL_TIMEOUT`].
    pub dial_timeout: Duration,
    /// See [`DEFAULT_SOCKET_BUFFER_SIZE`].
    pub socket_send_buffer_size: usize,
    /// See [`DEFAULT_SOCKET_BUFFER_SIZE`].
    pub socket_recv_buffer_size: usize,
}

/// Longest wait for one dial's handshake, after which the dial counts as failed and the next one
/// starts over (after the reconnect backoff). Without it a dial would wait for quinn's idle
/// timeout, resending its first packet 1, 3 and 7 s in: a node dialing a peer that is not up yet
/// would connect seconds after the peer came up and show no error meanwhile. Raise it for paths
/// whose round trip approaches it.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            congestion: CongestionControl::Bbr,
            initial_window: None,
            max_concurrent_uni_streams: DEFAULT_MAX_CONCURRENT_UNI_STREAMS,
            max_concurrent_bidi_streams: DEFAULT_MAX_CONCURRENT_BIDI_STREAMS,
            stream_receive_window: DEFAULT_STREAM_RECEIVE_WINDOW,
            receive_window: DEFAULT_RECEIVE_WINDOW,
            send_window: DEFAULT_SEND_WINDOW,
            datagram_receive_buffer_size: Some(DEFAULT_DATAGRAM_RECEIVE_BUFFER),
            datagram_send_buffer_size: DEFAULT_DATAGRAM_SEND_BUFFER,
            keep_alive_interval: Some(DEFAULT_KEEP_ALIVE_INTERVAL),
            max_idle_timeout: DEFAULT_MAX_IDLE_TIMEOUT,
            initial_rtt: DEFAULT_INITIAL_RTT,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            socket_send_buffer_size: DEFAULT_SOCKET_BUFFER_SIZE,
            socket_recv_buffer_size: DEFAULT_SOCKET_BUFFER_SIZE,
        }
    }
}

/// Which congestion controller quinn runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    /// Cubic (RFC 9438): loss-based, fair on shared networks, slow under random loss.
    Cubic,
    /// NewReno (RFC 9002): loss-based, simplest.
    NewReno,
    /// BBR (quinn's experimental implementation): model-based, keeps throughput under random loss.
    /// The default.
    #[default]
    Bbr,
}

impl CongestionControl {
    /// quinn's controller factory, starting at `initial_window` bytes if given.
    fn factory(self, initial_window: Option<u64>) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            CongestionControl::Cubic => {
                let mut c = CubicConfig::default();
                if let Some(w) = initial_window {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
            CongestionControl::NewReno => {
                let mut c = NewRenoConfig::default();
                if let Some(w) = initial_window {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
            CongestionControl::Bbr => {
                let mut c = BbrConfig::default();
                if let Some(w) = initial_window {
                    c.initial_window(w);
                }
                Arc::new(c)
            }
        }
    }
}

impl std::str::FromStr for CongestionControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(CongestionControl::Cubic),
            "newreno" => Ok(CongestionControl::NewReno),
            "bbr" => Ok(CongestionControl::Bbr),
            _ => Err(format!("unknown congestion controller {s:?}: use cubic, newreno or bbr")),
        }
    }
}

/// Errors building endpoints.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS material or configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The rustls configuration cannot be used for QUIC.
    #[error("the rustls {side} configuration cannot be used for QUIC: {source}")]
    QuicCrypto {
        side: &'static str,
        #[source]
        source: NoInitialCipherSuite,
    },
    /// Settings that cannot work together.
    #[error("invalid transport settings: {0}")]
    InvalidSettings(String),
    /// Creating, configuring or binding the UDP socket failed.
    #[error("cannot {action} UDP socket for {addr}: {source}")]
    Socket {
        action: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// quinn could not start the endpoint on the socket.
    #[error("cannot start the QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Endpoints must be created inside a Tokio runtime (quinn spawns its driver task).
    #[error("QUIC endpoints must be created from within a Tokio runtime")]
    NoRuntime,
}

impl TransportSettings {
    /// Checks values that would make connections fail or hang.
    pub fn validate(&self) -> Result<(), EndpointError> {
        let bad = |msg: String| Err(EndpointError::InvalidSettings(msg));
        if self.max_concurrent_uni_streams == 0 {
            return bad("max_concurrent_uni_streams must be > 0 (one per memory space)".into());
        }
        if self.max_concurrent_bidi_streams == 0 {
            return bad("max_concurrent_bidi_streams must be > 0 (control stream)".into());
        }
        for (what, v) in
            [("stream_receive_window", self.stream_receive_window), ("receive_window", self.receive_window)]
        {
            if v == 0 || VarInt::from_u64(v).is_err() {
                return bad(format!("{what} must be in 1..2^62, got {v}"));
            }
        }
        if self.send_window == 0 {
            return bad("send_window must be > 0".into());
        }
        if let Some(w) = self.initial_window {
            // Below two full-size packets a connection could not get going; above the send
            // window the extra could never be used.
            if !(MIN_INITIAL_WINDOW..=self.send_window).contains(&w) {
                return bad(format!(
                    "initial_window {w} must be in {MIN_INITIAL_WINDOW}..={} (send_window)",
                    self.send_window
                ));
            }
        }
        if self.max_idle_timeout.is_zero() {
            return bad("max_idle_timeout must be > 0 (0 would mean never time out)".into());
        }
        if IdleTimeout::try_from(self.max_idle_timeout).is_err() {
            return bad(format!("max_idle_timeout {:?} is too large", self.max_idle_timeout));
        }
        if let Some(k) = self.keep_alive_interval {
            if k.is_zero() || k >= self.max_idle_timeout {
                return bad(format!(
                    "keep_alive_interval {k:?} must be > 0 and below max_idle_timeout {:?}",
                    self.max_idle_timeout
                ));
            }
        }
        if self.initial_rtt.is_zero() {
            return bad("initial_rtt must be > 0".into());
        }
        // Room for the first packet and one resend (quinn resends after 3 x initial_rtt).
        if self.dial_timeout < self.initial_rtt * 6 {
            return bad(format!(
                "dial_timeout {:?} must be at least 6 x initial_rtt ({:?}): a dial needs room for one resend",
                self.dial_timeout, self.initial_rtt
            ));
        }
        Ok(())
    }

    /// The quinn transport configuration for these settings (used for both directions of a
    /// connection). Out-of-range values are clamped; [`TransportSettings::validate`] reports them.
    pub fn transport_config(&self) -> TransportConfig {
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        let mut config = TransportConfig::default();
        config
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .stream_receive_window(varint(self.stream_receive_window))
            .receive_window(varint(self.receive_window))
            .send_window(self.send_window)
            .datagram_receive_buffer_size(self.datagram_receive_buffer_size)
            .datagram_send_buffer_size(self.datagram_send_buffer_size)
            .keep_alive_interval(self.keep_alive_interval)
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.max_idle_timeout).unwrap_or_else(|_| IdleTimeout::from(VarInt::MAX)),
            ))
            .initial_rtt(self.initial_rtt)
            .congestion_controller_factory(self.congestion.factory(self.initial_window));
        config
    }
}

/// The quinn server configuration of a node: mutual TLS ([`tls::server_crypto`]) and
/// `settings`' transport parameters.
pub fn server_config(id: &NodeIdentity, settings: &TransportSettings) -> Result<quinn::ServerConfig, EndpointError> {
    settings.validate()?;
    let crypto = QuicServerConfig::try_from(tls::server_crypto(id)?)
        .map_err(|source| EndpointError::QuicCrypto { side: "server", source })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(settings.transport_config()));
    Ok(config)
}

/// The quinn client configuration of a node: mutual TLS ([`tls::client_crypto`]) and
/// `settings`' transport parameters (which also govern streams the server opens towards us).
pub fn client_config(id: &NodeIdentity, settings: &TransportSettings) -> Result<quinn::ClientConfig, EndpointError> {
    settings.validate()?;
    let crypto = QuicClientConfig::try_from(tls::client_crypto(id)?)
        .map_err(|source| EndpointError::QuicCrypto { side: "client", source })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(settings.transport_config()));
    Ok(config)
}

/// An endpoint that accepts connections on `addr` (mutual TLS as `id`) and can also dial other
/// nodes with [`quinn::Endpoint::connect`] (its default client configuration is set). Must be
/// called within a Tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    id: &NodeIdentity,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, EndpointError> {
    let server = server_config(id, settings)?;
    let client = client_config(id, settings)?;
    let mut endpoint = make_endpoint(addr, Some(server), settings)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// A dial-only endpoint bound to `bind` (e.g. `0.0.0.0:0`) with its default client
/// configuration set. Must be called within a Tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    id: &NodeIdentity,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, EndpointError> {
    let client = client_config(id, settings)?;
    let mut endpoint = make_endpoint(bind, None, settings)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

fn make_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, EndpointError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(EndpointError::NoRuntime);
    }
    let socket = bind_udp(addr, settings)?;
    let local = socket.local_addr().unwrap_or(addr);
    quinn::Endpoint::new(EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|source| EndpointError::Endpoint { addr: local, source })
}

/// Binds a non-blocking UDP socket on `addr` with the buffer sizes of `settings`, warning if the
/// kernel granted less.
pub fn bind_udp(addr: SocketAddr, settings: &TransportSettings) -> Result<std::net::UdpSocket, EndpointError> {
    let err = |action| move |source| EndpointError::Socket { action, addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err("create"))?;
    set_buffer(
        addr,
        "send",
        settings.socket_send_buffer_size,
        |n| socket.set_send_buffer_size(n),
        |n| force_buffer(&socket, Buffer::Send, n),
        || socket.send_buffer_size(),
    );
    set_buffer(
        addr,
        "receive",
        settings.socket_recv_buffer_size,
        |n| socket.set_recv_buffer_size(n),
        |n| force_buffer(&socket, Buffer::Receive, n),
        || socket.recv_buffer_size(),
    );
    socket.set_nonblocking(true).map_err(err("configure"))?;
    socket.bind(&addr.into()).map_err(err("bind"))?;
    Ok(socket.into())
}

fn set_buffer(
    addr: SocketAddr,
    which: &str,
    wanted: usize,
    set: impl FnOnce(usize) -> io::Result<()>,
    force: impl FnOnce(usize) -> io::Result<()>,
    get: impl Fn() -> io::Result<usize>,
) {
    if let Err(e) = set(wanted) {
        tracing::warn!(%addr, wanted, error = %e, "cannot set the UDP socket {which} buffer size");
        return;
    }
    // Linux reports twice the granted size (it counts bookkeeping overhead), so a granted request
    // reads back >= wanted. A request above net.core.rmem_max / wmem_max is silently capped; a
    // privileged process may go past the cap.
    if matches!(get(), Ok(granted) if granted < wanted) {
        let _ = force(wanted);
    }
    match get() {
        Ok(granted) if granted < wanted => tracing::warn!(
            %addr,
            wanted,
            granted,
            "the kernel granted a smaller UDP socket {which} buffer than asked; packets may be \
             dropped under load (on Linux raise net.core.rmem_max / net.core.wmem_max)"
        ),
        Ok(granted) => {
            tracing::debug!(%addr, wanted, granted, "UDP socket {which} buffer size set")
        }
        Err(e) => tracing::warn!(%addr, error = %e, "cannot read the UDP socket {which} buffer size"),
    }
}

enum Buffer {
    Send,
    Receive,
}

/// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE`: past the sysctl cap, allowed with CAP_NET_ADMIN (Linux only).
#[cfg(target_os = "linux")]
fn force_buffer(socket: &Socket, which: Buffer, size: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let opt = match which {
        Buffer::Send => libc::SO_SNDBUFFORCE,
        Buffer::Receive => libc::SO_RCVBUFFORCE,
    };
    let value: libc::c_int = size.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: the fd is a live socket owned by `socket`; the option value is a c_int that outlives
    // the call, passed with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffer(_socket: &Socket, _which: Buffer, _size: usize) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root (CI and the development machines run as root) the buffers go past the sysctl cap;
    /// elsewhere they are at least what the cap allows.
    #[cfg(target_os = "linux")]
    #[test]
    fn socket_buffers_reach_the_requested_size_when_privileged() {
        let settings = TransportSettings::default();
        let sock = Socket::from(bind_udp("127.0.0.1:0".parse().unwrap(), &settings).unwrap());
        let (rcv, snd) = (sock.recv_buffer_size().unwrap(), sock.send_buffer_size().unwrap());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(rcv >= settings.socket_recv_buffer_size, "receive buffer {rcv}");
            assert!(snd >= settings.socket_send_buffer_size, "send buffer {snd}");
        } else {
            assert!(rcv > 0 && snd > 0);
        }
    }

    #[test]
    fn defaults_are_valid_and_fit_ten_thousand_spaces() {
        let s = TransportSettings::default();
        s.validate().unwrap();
        assert!(s.max_concurrent_uni_streams >= 10_000);
        assert!(s.datagram_receive_buffer_size.is_some());
        let _ = s.transport_config();
    }

    #[test]
    fn invalid_settings_are_reported() {
        let s =
            TransportSettings { keep_alive_interval: Some(Duration::from_secs(20)), ..TransportSettings::default() };
        assert!(matches!(s.validate(), Err(EndpointError::InvalidSettings(_))));
        let s = TransportSettings { max_concurrent_uni_streams: 0, ..TransportSettings::default() };
        assert!(s.validate().is_err());
        for w in [0, MIN_INITIAL_WINDOW - 1, DEFAULT_SEND_WINDOW + 1] {
            let s = TransportSettings { initial_window: Some(w), ..TransportSettings::default() };
            assert!(matches!(s.validate(), Err(EndpointError::InvalidSettings(_))), "initial_window {w}");
        }
        for w in [MIN_INITIAL_WINDOW, 1 << 20, DEFAULT_SEND_WINDOW] {
            let s = TransportSettings { initial_window: Some(w), ..TransportSettings::default() };
            s.validate().unwrap();
            let _ = s.transport_config();
        }
    }

    #[test]
    fn bind_reports_the_address() {
        let s = TransportSettings::default();
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), &s).unwrap();
        let taken = a.local_addr().unwrap();
        let err = bind_udp(taken, &s).unwrap_err();
        assert!(err.to_string().contains(&taken.to_string()), "{err}");
    }

    #[test]
    fn endpoint_outside_runtime_is_an_error() {
        let ca = tls::ClusterCa::generate("t").unwrap();
        let id = ca.issue("primary").unwrap();
        let err = client_endpoint("127.0.0.1:0".parse().unwrap(), &id, &TransportSettings::default()).unwrap_err();
        assert!(matches!(err, EndpointError::NoRuntime));
    }
}
