//! An in-memory UDP switch for tests: quinn endpoints talk over [`SimSocket`]s of a
//! [`SimNetwork`] whose links apply [`Impairment`]s.
//!
//! All code that depends on quinn's socket abstraction ([`quinn::AsyncUdpSocket`],
//! [`quinn::UdpPoller`], [`quinn::udp::Transmit`], [`quinn::udp::RecvMeta`], which change between
//! quinn versions) is in this module.
//!
//! Delivery is scheduled on tokio time by one driver task per network (a timer heap), so tests can
//! run under `#[tokio::test(start_paused = true)]`: while every task waits, tokio jumps the clock
//! to the next timer (a packet delivery or a quinn timer), and seconds of simulated delay take
//! milliseconds of wall time. quinn's [`quinn::TokioRuntime`] reads the time from tokio, so it
//! sees the simulated clock too.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::delay_queue::DelayQueue;
use super::model::{derive_seed, Impairment, LinkModel, LinkStats};
use crate::lock;

/// Datagrams a [`SimSocket`] buffers before dropping new arrivals (see
/// [`SimNetwork::set_recv_queue`]).
pub const DEFAULT_RECV_QUEUE: usize = 4096;

/// First port handed out for binds to port 0.
const FIRST_EPHEMERAL_PORT: u16 = 49152;

/// An in-memory UDP switch. Cloning gives another handle to the same network.
///
/// Each ordered pair of addresses `(from, to)` is a link direction with its own [`LinkModel`],
/// created on first use with the default impairment ([`SimNetwork::set_default`]) unless
/// configured with [`SimNetwork::set_link`]. Each link's PRNG is seeded from the network seed and
/// the pair, so a run is reproducible given the seed and the order in which each link sees its
/// packets (use a current-thread runtime, as `#[tokio::test]` does).
#[derive(Clone)]
pub struct SimNetwork {
    inner: Arc<Inner>,
}

struct Inner {
    seed: u64,
    state: Mutex<State>,
    /// Wakes the delivery driver (new earliest packet, or the network is gone).
    wake: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

struct Link {
    model: LinkModel,
    /// Configured with `set_link` (not replaced by `set_default`).
    explicit: bool,
}

struct State {
    sockets: HashMap<SocketAddr, Weak<SimSocket>>,
    links: BTreeMap<(SocketAddr, SocketAddr), Link>,
    default: Impairment,
    partition_all: bool,
    recv_queue: usize,
    next_port: u16,
    in_flight: DelayQueue<Pending>,
    driver_started: bool,
}

/// A datagram on its way.
struct Pending {
    from: SocketAddr,
    to: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: Bytes,
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.inner.state);
        f.debug_struct("SimNetwork")
            .field("seed", &self.inner.seed)
            .field("sockets", &st.sockets.len())
            .field("links", &st.links.len())
            .field("in_flight", &st.in_flight.len())
            .finish()
    }
}

fn link_seed(seed: u64, from: SocketAddr, to: SocketAddr) -> u64 {
    derive_seed(seed, format!("{from}->{to}").as_bytes())
}

impl State {
    fn link(&mut self, seed: u64, from: SocketAddr, to: SocketAddr) -> &mut Link {
        let (default, partitioned) = (self.default, self.partition_all);
        self.links.entry((from, to)).or_insert_with(|| {
            let mut model = LinkModel::new(default, link_seed(seed, from, to));
            model.set_partitioned(partitioned);
            Link { model, explicit: false }
        })
    }

    fn socket(&self, addr: SocketAddr) -> Option<Arc<SimSocket>> {
        if let Some(s) = self.sockets.get(&addr).and_then(Weak::upgrade) {
            return Some(s);
        }
        // A socket bound to the unspecified address receives for every address of its family.
        let any = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        self.sockets.get(&SocketAddr::new(any, addr.port())).and_then(Weak::upgrade)
    }

    fn in_use(&self, addr: SocketAddr) -> bool {
        self.sockets.get(&addr).is_some_and(|w| w.strong_count() > 0)
    }
}

impl SimNetwork {
    /// An empty network whose links draw their randomness from `seed`. Every link is perfect
    /// until configured.
    pub fn new(seed: u64) -> SimNetwork {
        SimNetwork {
            inner: Arc::new(Inner {
                seed,
                state: Mutex::new(State {
                    sockets: HashMap::new(),
                    links: BTreeMap::new(),
                    default: Impairment::default(),
                    partition_all: false,
                    recv_queue: DEFAULT_RECV_QUEUE,
                    next_port: FIRST_EPHEMERAL_PORT,
                    in_flight: DelayQueue::default(),
                    driver_started: false,
                }),
                wake: Arc::new(Notify::new()),
            }),
        }
    }

    /// The seed the network was created with.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Binds a socket to `addr`; port 0 allocates a free port (from 49152 up). Any IP works (no
    /// interfaces exist); a socket bound to `0.0.0.0` / `::` receives datagrams sent to any
    /// address of its family with its port, but sends with the unspecified address as source, so
    /// prefer explicit addresses. Fails with `AddrInUse` if taken, or if called outside a Tokio
    /// runtime (the first bind starts the network's delivery task).
    pub fn bind(&self, addr: SocketAddr) -> io::Result<Arc<SimSocket>> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("SimNetwork::bind must be called within a Tokio runtime"))?;
        let mut st = lock(&self.inner.state);
        let addr = if addr.port() == 0 {
            let mut found = None;
            for _ in 0..=(u16::MAX - FIRST_EPHEMERAL_PORT) {
                let port = st.next_port;
                st.next_port = if port == u16::MAX { FIRST_EPHEMERAL_PORT } else { port + 1 };
                let candidate = SocketAddr::new(addr.ip(), port);
                if !st.in_use(candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            found.ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free simulated port"))?
        } else {
            addr
        };
        if st.in_use(addr) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{addr} is already bound")));
        }
        let socket = Arc::new(SimSocket {
            addr,
            net: self.clone(),
            rx: Mutex::new(RxQueue { queue: VecDeque::new(), capacity: st.recv_queue.max(1), waker: None, dropped: 0 }),
        });
        st.sockets.insert(addr, Arc::downgrade(&socket));
        if !st.driver_started {
            st.driver_started = true;
            handle.spawn(drive(Arc::downgrade(&self.inner), self.inner.wake.clone()));
        }
        Ok(socket)
    }

    /// Sets the impairment of the direction `from -> to` (keeping its counters and PRNG if the
    /// link exists). Such a link is no longer affected by [`SimNetwork::set_default`].
    pub fn set_link(&self, from: SocketAddr, to: SocketAddr, imp: Impairment) {
        let mut st = lock(&self.inner.state);
        let link = st.link(self.inner.seed, from, to);
        link.model.set_impairment(imp);
        link.explicit = true;
    }

    /// Sets the impairment of both directions between `a` and `b`.
    pub fn set_link_both(&self, a: SocketAddr, b: SocketAddr, imp: Impairment) {
        self.set_link(a, b, imp);
        self.set_link(b, a, imp);
    }

    /// Sets the impairment of every link not configured with [`SimNetwork::set_link`], existing or
    /// created later (both directions).
    pub fn set_default(&self, imp: Impairment) {
        let mut st = lock(&self.inner.state);
        st.default = imp;
        for link in st.links.values_mut().filter(|l| !l.explicit) {
            link.model.set_impairment(imp);
        }
    }

    /// Turns the partition between `a` and `b` (both directions) on or off.
    pub fn partition(&self, a: SocketAddr, b: SocketAddr, on: bool) {
        let mut st = lock(&self.inner.state);
        let seed = self.inner.seed;
        st.link(seed, a, b).model.set_partitioned(on);
        st.link(seed, b, a).model.set_partitioned(on);
    }

    /// Turns the partition switch of every link, existing or created later, on or off;
    /// `partition_all(false)` also heals partitions made with [`SimNetwork::partition`].
    pub fn partition_all(&self, on: bool) {
        let mut st = lock(&self.inner.state);
        st.partition_all = on;
        for link in st.links.values_mut() {
            link.model.set_partitioned(on);
        }
    }

    /// Receive-queue capacity (datagrams) of sockets bound from now on; default
    /// [`DEFAULT_RECV_QUEUE`].
    pub fn set_recv_queue(&self, datagrams: usize) {
        lock(&self.inner.state).recv_queue = datagrams.max(1);
    }

    /// Counters of all links added up.
    pub fn stats(&self) -> LinkStats {
        let st = lock(&self.inner.state);
        let mut total = LinkStats::default();
        for link in st.links.values() {
            total.merge(&link.model.stats());
        }
        total
    }

    /// Counters of the direction `from -> to`, if it carried or was configured for traffic.
    pub fn link_stats(&self, from: SocketAddr, to: SocketAddr) -> Option<LinkStats> {
        lock(&self.inner.state).links.get(&(from, to)).map(|l| l.model.stats())
    }

    /// Counters of every link direction, ordered by `(from, to)`.
    pub fn all_link_stats(&self) -> Vec<(SocketAddr, SocketAddr, LinkStats)> {
        lock(&self.inner.state).links.iter().map(|(&(from, to), l)| (from, to, l.model.stats())).collect()
    }

    /// Datagrams accepted by the links and not yet delivered.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.state).in_flight.len()
    }

    /// Offers one datagram to the link `from -> to`.
    fn send(&self, from: SocketAddr, to: SocketAddr, ecn: Option<EcnCodepoint>, data: &[u8]) {
        let now = Instant::now();
        let mut st = lock(&self.inner.state);
        let verdict = st.link(self.inner.seed, from, to).model.on_packet(now.into_std(), data.len());
        let mut deliveries = verdict.deliveries().peekable();
        if deliveries.peek().is_none() {
            return;
        }
        let data = Bytes::copy_from_slice(data);
        let mut wake = false;
        for delay in deliveries {
            let Some(at) = now.checked_add(delay) else {
                st.link(self.inner.seed, from, to).model.record_undeliverable();
                continue;
            };
            wake |= st.in_flight.push(at, Pending { from, to, ecn, data: data.clone() });
        }
        drop(st);
        if wake {
            self.inner.wake.notify_one();
        }
    }
}

impl Inner {
    /// Delivers every packet due at `now`; returns when the next one is due.
    fn deliver_due(&self, now: Instant) -> Option<Instant> {
        let mut wakers = Vec::new();
        // Sockets upgraded here are dropped only after the state lock is released: dropping the
        // last reference runs `SimSocket::drop`, which takes the state lock.
        let mut sockets = Vec::new();
        let mut st = lock(&self.state);
        while let Some(p) = st.in_flight.pop_due(now) {
            let delivered = match st.socket(p.to) {
                Some(socket) => {
                    let pushed = socket.push(p.from, p.ecn, p.data, &mut wakers);
                    sockets.push(socket);
                    pushed
                }
                None => false,
            };
            if !delivered {
                if let Some(link) = st.links.get_mut(&(p.from, p.to)) {
                    link.model.record_undeliverable();
                }
            }
        }
        let next = st.in_flight.next_at();
        drop(st);
        drop(sockets);
        for w in wakers {
            w.wake();
        }
        next
    }
}

/// The delivery task of a network: sleeps until the earliest packet is due, hands it to its
/// socket. Ends when the network (every handle and socket) is gone.
async fn drive(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) => inner.deliver_due(Instant::now()),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

struct RxQueue {
    queue: VecDeque<Received>,
    capacity: usize,
    waker: Option<Waker>,
    dropped: u64,
}

struct Received {
    from: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: Bytes,
}

/// A simulated UDP socket of a [`SimNetwork`]; implements [`quinn::AsyncUdpSocket`] (see
/// [`sim_endpoint`]) and has plain [`SimSocket::send_to`] / [`SimSocket::recv_from`] for tests
/// that drive it by hand. Sending never blocks (the link's rate queue models congestion);
/// arrivals beyond the receive-queue capacity are dropped and counted.
pub struct SimSocket {
    addr: SocketAddr,
    net: SimNetwork,
    rx: Mutex<RxQueue>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        let mut st = lock(&self.net.inner.state);
        if st.sockets.get(&self.addr).is_some_and(|w| w.strong_count() == 0) {
            st.sockets.remove(&self.addr);
        }
    }
}

impl SimSocket {
    /// The address the socket is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The network of this socket.
    pub fn network(&self) -> &SimNetwork {
        &self.net
    }

    /// Arrivals dropped because the receive queue was full.
    pub fn recv_queue_drops(&self) -> u64 {
        lock(&self.rx).dropped
    }

    /// Sends one datagram (never blocks; the network decides its fate).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) {
        self.net.send(self.addr, to, None, data);
    }

    /// Waits for the next datagram; copies it into `buf` (truncating, like UDP) and returns
    /// its full length and source.
    pub async fn recv_from(&self, buf: &mut [u8]) -> (usize, SocketAddr) {
        std::future::poll_fn(|cx| {
            let mut rx = lock(&self.rx);
            match rx.queue.pop_front() {
                Some(d) => {
                    let n = d.data.len().min(buf.len());
                    buf[..n].copy_from_slice(&d.data[..n]);
                    Poll::Ready((d.data.len(), d.from))
                }
                None => {
                    register(&mut rx.waker, cx);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues an arrival; false if the queue is full.
    fn push(&self, from: SocketAddr, ecn: Option<EcnCodepoint>, data: Bytes, wakers: &mut Vec<Waker>) -> bool {
        let mut rx = lock(&self.rx);
        if rx.queue.len() >= rx.capacity {
            rx.dropped += 1;
            return false;
        }
        rx.queue.push_back(Received { from, ecn, data });
        if let Some(w) = rx.waker.take() {
            wakers.push(w);
        }
        true
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The socket is always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // We report max_transmit_segments() == 1 so quinn should not use GSO, but split a
        // multi-datagram transmit anyway.
        let segment = match transmit.segment_size {
            Some(s) if s > 0 => s,
            _ => transmit.contents.len().max(1),
        };
        for datagram in transmit.contents.chunks(segment) {
            self.net.send(self.addr, transmit.destination, transmit.ecn, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.rx);
        if rx.queue.is_empty() {
            register(&mut rx.waker, cx);
            return Poll::Pending;
        }
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some(d) = rx.queue.pop_front() else { break };
            let len = d.data.len().min(buf.len());
            buf[..len].copy_from_slice(&d.data[..len]);
            *meta = RecvMeta { addr: d.from, len, stride: len, ecn: d.ecn, dst_ip: Some(self.addr.ip()) };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A quinn endpoint on a new [`SimSocket`] bound to `addr` in `net`: a server if `server` is
/// given, with `client` as its default client configuration if given. Must be called within a
/// Tokio runtime.
pub fn sim_endpoint(
    net: &SimNetwork,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    client: Option<quinn::ClientConfig>,
) -> io::Result<quinn::Endpoint> {
    let socket = net.bind(addr)?;
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    if let Some(client) = client {
        endpoint.set_default_client_config(client);
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_after_delay_and_allocates_ports() {
        let net = SimNetwork::new(1);
        let a = net.bind(addr("10.0.0.1:0")).unwrap();
        let b = net.bind(addr("10.0.0.2:9000")).unwrap();
        assert_eq!(a.addr(), addr("10.0.0.1:49152"));
        assert!(net.bind(addr("10.0.0.2:9000")).is_err());
        net.set_link(a.addr(), b.addr(), Impairment { delay: Duration::from_millis(30), ..Default::default() });
        let t0 = Instant::now();
        a.send_to(b"hello", b.addr());
        a.send_to(b"nobody", addr("10.0.0.3:1"));
        let mut buf = [0u8; 64];
        let (n, from) = b.recv_from(&mut buf).await;
        assert_eq!((&buf[..n], from), (&b"hello"[..], a.addr()));
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
        // Replies use the default (perfect) link.
        b.send_to(b"hi", a.addr());
        let (n, from) = a.recv_from(&mut buf).await;
        assert_eq!((&buf[..n], from), (&b"hi"[..], b.addr()));
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(net.link_stats(a.addr(), addr("10.0.0.3:1")).unwrap().undeliverable, 1);
        drop(b);
        assert!(net.bind(addr("10.0.0.2:9000")).is_ok(), "port freed when the socket is dropped");
    }

    async fn scripted(seed: u64) -> (Vec<u32>, LinkStats) {
        let net = SimNetwork::new(seed);
        net.set_default(Impairment {
            loss: 0.1,
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(3),
            reorder: 0.05,
            duplicate: 0.05,
            ..Default::default()
        });
        let a = net.bind(addr("10.0.0.1:1")).unwrap();
        let b = net.bind(addr("10.0.0.2:2")).unwrap();
        for i in 0..1000u32 {
            a.send_to(&i.to_le_bytes(), b.addr());
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        while net.in_flight() > 0 || !lock(&b.rx).queue.is_empty() {
            let (_, _) = b.recv_from(&mut buf).await;
            got.push(u32::from_le_bytes(buf));
        }
        (got, net.stats())
    }

    #[tokio::test(start_paused = true)]
    async fn reproducible_given_the_seed() {
        let (a, sa) = scripted(5).await;
        let (b, sb) = scripted(5).await;
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert_eq!(a.len() as u64, sa.forwarded + sa.duplicated);
        assert!(a.windows(2).any(|w| w[1] < w[0]), "expected some reordering");
        assert!(sa.dropped_loss > 50 && sa.duplicated > 20 && sa.reordered > 20, "{sa}");
        let (c, _) = scripted(6).await;
        assert_ne!(a, c);
    }

    #[tokio::test(start_paused = true)]
    async fn full_receive_queue_drops() {
        let net = SimNetwork::new(1);
        net.set_recv_queue(10);
        let a = net.bind(addr("10.0.0.1:1")).unwrap();
        let b = net.bind(addr("10.0.0.2:2")).unwrap();
        for _ in 0..25 {
            a.send_to(b"x", b.addr());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(b.recv_queue_drops(), 15);
        assert_eq!(net.stats().undeliverable, 15);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions() {
        let net = SimNetwork::new(1);
        let a = net.bind(addr("10.0.0.1:1")).unwrap();
        let b = net.bind(addr("10.0.0.2:2")).unwrap();
        net.partition(a.addr(), b.addr(), true);
        a.send_to(b"x", b.addr());
        b.send_to(b"x", a.addr());
        net.partition_all(false);
        a.send_to(b"y", b.addr());
        let mut buf = [0u8; 1];
        b.recv_from(&mut buf).await;
        assert_eq!(&buf, b"y");
        let s = net.stats();
        assert_eq!((s.dropped_partition, s.forwarded), (2, 1));
    }
}
