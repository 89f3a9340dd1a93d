//! A UDP forwarder applying the impairment model between real sockets: the core of the
//! `lossy_link` example, usable from tests.
//!
//! Clients send to the listen address. For each client address the forwarder opens its own
//! socket towards the upstream (bound to the loopback address if the upstream is on loopback,
//! else to the unspecified address; port chosen by the OS; connected to the upstream), so replies
//! map back to the right client. Each direction has one [`LinkModel`] shared by all clients
//! (one bottleneck per direction): `up` is client -> upstream, `down` is upstream -> client.
//! Deliveries are scheduled on tokio time by one task.
//!
//! Clients silent for [`CLIENT_IDLE_TIMEOUT`] are forgotten (their upstream socket closed).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::delay_queue::DelayQueue;
use super::model::{derive_seed, Impairment, LinkModel, LinkStats};
use crate::lock;

/// A client (source address) silent this long is forgotten and its upstream socket closed.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Send and receive buffer size asked of the kernel for every forwarder socket (Linux caps it
/// at `net.core.rmem_max` / `wmem_max`).
pub const SOCKET_BUFFER_SIZE: usize = 4 * 1024 * 1024;

const MAX_DATAGRAM: usize = 65_535;
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A direction through the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client -> upstream.
    Up,
    /// Upstream -> client.
    Down,
}

/// What the forwarder did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwarderStats {
    /// Client -> upstream.
    pub up: LinkStats,
    /// Upstream -> client.
    pub down: LinkStats,
    /// Clients currently known.
    pub clients: usize,
    /// Clients seen since the start.
    pub clients_total: u64,
    /// Datagrams accepted by the models and waiting for their delivery time.
    pub in_flight: usize,
    /// Time since the forwarder was created.
    pub elapsed: Duration,
}

impl fmt::Display for ForwarderStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "after {:.1}s: {} clients ({} total), {} datagrams in flight",
            self.elapsed.as_secs_f64(),
            self.clients,
            self.clients_total,
            self.in_flight
        )?;
        writeln!(f, "  up   (client -> upstream): {}", self.up)?;
        write!(f, "  down (upstream -> client): {}", self.down)
    }
}

/// A bound forwarder; [`Forwarder::run`] starts it.
pub struct Forwarder {
    listen: Arc<UdpSocket>,
    local: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
}

/// A handle to a forwarder (running or not): counters and the partition switch.
#[derive(Clone)]
pub struct ForwarderControl {
    shared: Arc<Shared>,
}

struct Shared {
    up: Mutex<LinkModel>,
    down: Mutex<LinkModel>,
    queue: Mutex<DelayQueue<Item>>,
    wake: Notify,
    clients: Mutex<HashMap<SocketAddr, Client>>,
    clients_total: AtomicU64,
    partitioned: AtomicBool,
    started: Instant,
}

struct Client {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
    /// Milliseconds since `Shared::started` of the last datagram either way.
    last_seen: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Dest {
    Upstream(Arc<UdpSocket>),
    Client(SocketAddr),
}

/// A datagram on its way.
struct Item {
    dir: Direction,
    dest: Dest,
    data: Bytes,
}

fn invalid(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// A non-blocking UDP socket bound to `addr` with [`SOCKET_BUFFER_SIZE`] buffers (best effort).
fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel may cap or refuse the size; the forwarder works either way.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_SIZE);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_SIZE);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Errors of a UDP receive that say nothing about the socket itself (ICMP feedback, signals).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

impl Forwarder {
    /// Binds the listen socket. `up` applies to client -> upstream, `down` to upstream ->
    /// client; each direction's PRNG is derived from `seed`. Must be called within a Tokio
    /// runtime. Fails on an invalid impairment or if the address cannot be bound.
    pub fn bind(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: Impairment,
        down: Impairment,
        seed: u64,
    ) -> io::Result<Forwarder> {
        up.validate().map_err(|e| invalid(format!("upstream direction: {e}")))?;
        down.validate().map_err(|e| invalid(format!("downstream direction: {e}")))?;
        let socket = udp_socket(listen)?;
        let local = socket.local_addr()?;
        Ok(Forwarder {
            listen: Arc::new(socket),
            local,
            upstream,
            shared: Arc::new(Shared {
                up: Mutex::new(LinkModel::new(up, derive_seed(seed, b"up"))),
                down: Mutex::new(LinkModel::new(down, derive_seed(seed, b"down"))),
                queue: Mutex::new(DelayQueue::default()),
                wake: Notify::new(),
                clients: Mutex::new(HashMap::new()),
                clients_total: AtomicU64::new(0),
                partitioned: AtomicBool::new(false),
                started: Instant::now(),
            }),
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A handle for counters and the partition switch.
    pub fn control(&self) -> ForwarderControl {
        ForwarderControl { shared: self.shared.clone() }
    }

    /// Forwards until `shutdown` resolves, then closes every socket (datagrams still in flight
    /// are discarded) and returns the final counters. Fails only if the listen socket fails.
    pub async fn run<F: Future<Output = ()>>(self, shutdown: F) -> io::Result<ForwarderStats> {
        let Forwarder { listen, upstream, shared, .. } = self;
        let delivery = tokio::spawn(deliver(shared.clone(), listen.clone()));
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = listen.recv_from(&mut buf) => match r {
                    Ok((n, client)) => match Shared::client_socket(&shared, client, upstream) {
                        Ok(socket) => shared.submit(Direction::Up, &buf[..n], Dest::Upstream(socket)),
                        Err(e) => tracing::warn!(%client, %upstream, error = %e, "cannot open an upstream socket"),
                    },
                    Err(e) if is_transient(&e) => {}
                    Err(e) => break Err(e),
                },
                _ = sweep.tick() => shared.expire_idle_clients(),
            }
        };
        delivery.abort();
        let stats = shared.stats();
        for (_, client) in lock(&shared.clients).drain() {
            client.task.abort();
        }
        lock(&shared.queue).clear();
        result.map(|()| stats)
    }
}

/// Binds a forwarder on `listen` towards `upstream` and runs it until `shutdown` resolves (see
/// [`Forwarder`]).
pub async fn run<F: Future<Output = ()>>(
    listen: SocketAddr,
    upstream: SocketAddr,
    up: Impairment,
    down: Impairment,
    seed: u64,
    shutdown: F,
) -> io::Result<ForwarderStats> {
    Forwarder::bind(listen, upstream, up, down, seed)?.run(shutdown).await
}

impl ForwarderControl {
    /// The counters so far.
    pub fn stats(&self) -> ForwarderStats {
        self.shared.stats()
    }

    /// Turns the partition (both directions: everything is dropped) on or off.
    pub fn set_partitioned(&self, on: bool) {
        self.shared.partitioned.store(on, Ordering::Relaxed);
        lock(&self.shared.up).set_partitioned(on);
        lock(&self.shared.down).set_partitioned(on);
    }

    /// Whether the partition is on.
    pub fn is_partitioned(&self) -> bool {
        self.shared.partitioned.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn model(&self, dir: Direction) -> MutexGuard<'_, LinkModel> {
        match dir {
            Direction::Up => lock(&self.up),
            Direction::Down => lock(&self.down),
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stats(&self) -> ForwarderStats {
        ForwarderStats {
            up: lock(&self.up).stats(),
            down: lock(&self.down).stats(),
            clients: lock(&self.clients).len(),
            clients_total: self.clients_total.load(Ordering::Relaxed),
            in_flight: lock(&self.queue).len(),
            elapsed: self.started.elapsed(),
        }
    }

    /// The upstream socket of `client`, opened (with its receive task) on first use.
    fn client_socket(this: &Arc<Shared>, client: SocketAddr, upstream: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let now = this.millis();
        let mut clients = lock(&this.clients);
        if let Some(c) = clients.get(&client) {
            c.last_seen.store(now, Ordering::Relaxed);
            return Ok(c.socket.clone());
        }
        let local_ip = match (upstream.ip(), upstream.ip().is_loopback()) {
            (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let socket = udp_socket(SocketAddr::new(local_ip, 0))?;
        // Connected: only the upstream's replies are accepted, and `send` needs no address.
        let std_socket = socket.into_std()?;
        std_socket.connect(upstream)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        let last_seen = Arc::new(AtomicU64::new(now));
        let task = tokio::spawn(upstream_receive(this.clone(), socket.clone(), client, last_seen.clone()));
        clients.insert(client, Client { socket: socket.clone(), task, last_seen });
        this.clients_total.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%client, local = ?socket.local_addr().ok(), "new client");
        Ok(socket)
    }

    fn expire_idle_clients(&self) {
        let now = self.millis();
        let limit = u64::try_from(CLIENT_IDLE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        lock(&self.clients).retain(|addr, c| {
            let keep = now.saturating_sub(c.last_seen.load(Ordering::Relaxed)) < limit;
            if !keep {
                tracing::debug!(client = %addr, "client idle, forgotten");
                c.task.abort();
            }
            keep
        });
    }

    /// Runs `data` through the model of `dir` and schedules its deliveries.
    fn submit(&self, dir: Direction, data: &[u8], dest: Dest) {
        let now = Instant::now();
        let verdict = self.model(dir).on_packet(now.into_std(), data.len());
        let mut deliveries = verdict.deliveries().peekable();
        if deliveries.peek().is_none() {
            return;
        }
        let data = Bytes::copy_from_slice(data);
        let mut wake = false;
        let mut queue = lock(&self.queue);
        for delay in deliveries {
            let Some(at) = now.checked_add(delay) else {
                self.model(dir).record_undeliverable();
                continue;
            };
            wake |= queue.push(at, Item { dir, dest: dest.clone(), data: data.clone() });
        }
        drop(queue);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Reads the upstream's replies to one client and feeds them to the `down` model.
async fn upstream_receive(shared: Arc<Shared>, socket: Arc<UdpSocket>, client: SocketAddr, last_seen: Arc<AtomicU64>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut warned = false;
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                last_seen.store(shared.millis(), Ordering::Relaxed);
                shared.submit(Direction::Down, &buf[..n], Dest::Client(client));
            }
            // The ICMP answer to a datagram sent upstream (on whichever call comes next, the
            // send or this receive): nothing listens there. Counted like a failed send.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                shared.model(Direction::Up).record_undeliverable();
                if !std::mem::replace(&mut warned, true) {
                    let upstream = socket.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
                    tracing::warn!(%client, %upstream, "the upstream refuses datagrams: is anything listening there?");
                }
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => {
                tracing::warn!(%client, error = %e, "upstream socket failed; the client's replies stop");
                return;
            }
        }
    }
}

/// Sends every datagram when it is due.
async fn deliver(shared: Arc<Shared>, listen: Arc<UdpSocket>) {
    loop {
        let now = Instant::now();
        let (due, next) = {
            let mut queue = lock(&shared.queue);
            let due: Vec<Item> = std::iter::from_fn(|| queue.pop_due(now)).collect();
            (due, queue.next_at())
        };
        if !due.is_empty() {
            for item in due {
                let sent = match &item.dest {
                    Dest::Upstream(socket) => socket.send(&item.data).await,
                    Dest::Client(addr) => listen.send_to(&item.data, *addr).await,
                };
                if sent.is_err() {
                    shared.model(item.dir).record_undeliverable();
                }
            }
            continue;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}
