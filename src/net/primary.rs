//! The primary: serves its spaces' WALs to every replica over one QUIC connection per replica.
//!
//! Per connection: the replica opens the control stream and says hello; the primary answers with a
//! welcome and starts one shipper task per space, each writing batch frames to its own uni stream,
//! so a space blocked by flow control or loss never holds up another. Shippers read the WAL (its
//! memory tail for live data, its segments for catch-up) and never touch the write path: writers
//! append to the WAL and return, whatever the replicas do.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, SendStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::codec::batch::{FrameLimits, BATCH_HEADER_LEN, ENTRY_HEADER_LEN};
use crate::codec::control::{ErrorCode, ErrorMessage, SpacePosition, SpaceRange, Welcome};
use crate::codec::stream::{mux_preamble, StreamHeader};
use crate::codec::{BatchEncoder, ControlMessage, PROTOCOL_VERSION};
use crate::config::{HeartbeatConfig, PrimaryConfig, SMALL_FRAME_BYTES};
use crate::entry::{now_us, Entry};
use crate::net::error::NetError;
use crate::net::framed::{control_writer, write_control, ControlReader};
use crate::net::heartbeat::{self, store_summary};
use crate::net::status::{PathStats, PrimaryStatus, ReplicaView, SpaceLog, SpaceReplication, TrafficTotals};
use crate::net::tls::{self, NodeIdentity};
use crate::net::{close, endpoint, lock, open_store, read_entries, stream_code, HANDSHAKE_TIMEOUT};
use crate::protocol::backoff::Backoff;
use crate::protocol::handshake::{resume_point, LocalLog, Refusal};
use crate::protocol::health::Health;
use crate::protocol::liveness::Liveness;
use crate::protocol::progress::{Lag, ReplicaProgress};
use crate::types::{EntryKind, NodeId, Seq, SpaceId};
use crate::wal::{SpaceWal, WalError, WalStore};

/// A running primary. Dropping it without [`Primary::shutdown`] aborts its tasks.
pub struct Primary {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    /// The address of the UDP socket `start` bound, to be free again when `shutdown` returns
    /// (`None` on an endpoint the caller built, which may not even be a real socket).
    bound: Option<SocketAddr>,
}

struct Shared {
    config: PrimaryConfig,
    node_id: NodeId,
    store: WalStore,
    endpoint: quinn::Endpoint,
    replicas: Mutex<BTreeMap<String, Arc<ReplicaLink>>>,
    sessions: AtomicU64,
    /// Woken after every ack a replica sends ([`Primary::wait_durable`]).
    acked: Notify,
}

/// Everything known of one replica, across its connections.
struct ReplicaLink {
    current: Mutex<Option<Arc<Session>>>,
    connections: AtomicU64,
    /// Traffic of the connections before `current`. Lock order: `earlier`, then `current`.
    earlier: Mutex<TrafficTotals>,
}

impl Session {
    /// What this connection has carried so far.
    fn traffic(&self) -> TrafficTotals {
        let (mut batches_sent, mut bytes_sent, mut entries_sent) = (0, 0, 0);
        for ship in lock(&self.spaces).values() {
            let (batches, entries, bytes) = lock(&ship.progress).totals();
            batches_sent += batches;
            bytes_sent += bytes;
            entries_sent += entries;
        }
        let s = self.conn.stats();
        TrafficTotals {
            batches_sent,
            bytes_sent,
            entries_sent,
            udp_tx_bytes: s.udp_tx.bytes,
            udp_rx_bytes: s.udp_rx.bytes,
            lost_packets: s.path.lost_packets,
            congestion_events: s.path.congestion_events,
        }
    }
}

/// One connection to a replica.
struct Session {
    id: u64,
    conn: Connection,
    spaces: Mutex<HashMap<SpaceId, Arc<SpaceShip>>>,
    liveness: Arc<Mutex<Liveness>>,
    control: mpsc::UnboundedSender<ControlMessage>,
    /// In single-stream mode: the queue of the one multiplexed stream; each item is a stream header
    /// followed by the pieces of one frame.
    mux: Option<mpsc::Sender<Vec<Bytes>>>,
    /// Credit for frames larger than `SMALL_FRAME_BYTES` in flight to this replica, all spaces
    /// together (`PrimaryConfig::max_replica_inflight_bytes`).
    credit: Arc<Semaphore>,
    /// The smaller of this primary's and the replica's frame limits (the replica's is in its hello).
    frame_limits: FrameLimits,
    /// The replica process's [`Hello::instance`](crate::codec::control::Hello::instance).
    instance: u64,
}

/// Shared state of one (space, replica) shipper.
struct SpaceShip {
    /// The space's log, held here so that acks need no store lookup.
    wal: SpaceWal,
    progress: Mutex<ReplicaProgress>,
    acked: Notify,
    /// Catch-up requests: each send restarts the stream from the sequence given.
    restart: watch::Sender<Seq>,
    error: Mutex<Option<String>>,
    /// The replica reported this space diverged: retrying cannot help, only a catch-up request
    /// (after the operator repaired the replica) resumes it.
    halted: std::sync::atomic::AtomicBool,
    /// Suffix truncations of the space's log when the handshake compared it with the replica's.
    truncations: u64,
    /// The session credit held by this space's large frames in flight, by last sequence: given
    /// back as the replica acks them durable, or all at once when the stream restarts.
    credits: Mutex<VecDeque<(Seq, OwnedSemaphorePermit)>>,
}

impl SpaceShip {
    /// Gives back the credit of frames the replica acked durable up to `durable`.
    fn release_credit(&self, durable: Seq) {
        let mut credits = lock(&self.credits);
        while credits.front().is_some_and(|(last, _)| *last <= durable) {
            credits.pop_front();
        }
    }
}

impl Primary {
    /// Opens the WAL under `config.data_dir`, binds `config.listen` and starts serving replicas.
    pub async fn start(config: PrimaryConfig, identity: NodeIdentity) -> Result<Primary, NetError> {
        config.validate()?;
        identity.check_configured_name("PrimaryConfig::name", &config.name)?;
        let endpoint = endpoint::server_endpoint(config.listen, &identity, &config.transport)?;
        let bound = endpoint.local_addr().ok();
        match Self::with_endpoint(config, endpoint).await {
            Ok(primary) => Ok(Primary { bound, ..primary }),
            Err(e) => {
                // The endpoint was dropped: free the port for a corrected start, as shutdown() does.
                super::wait_released(bound).await;
                Err(e)
            }
        }
    }

    /// Starts on an endpoint built by the caller (a simulated link, a shared socket). The endpoint must
    /// have a server config requiring client certificates and a default client config, as
    /// [`endpoint::server_endpoint`] makes them.
    pub async fn with_endpoint(config: PrimaryConfig, endpoint: quinn::Endpoint) -> Result<Primary, NetError> {
        config.validate()?;
        let store = open_store(&config.data_dir, &config.wal).await?;
        // Appending below the newest epoch of the logs would make epochs go backwards, and every
        // replica would refuse (or loop on) what it is sent.
        if let Some(newest) = store.spaces().iter().map(|w| w.last_epoch()).max().filter(|e| *e > config.epoch) {
            return Err(crate::config::ConfigError(format!(
                "epoch {} is below epoch {newest} of entries already in {}: start the primary with an epoch of at least {newest} (persist the epoch across restarts)",
                config.epoch,
                config.data_dir.display()
            ))
            .into());
        }
        let shared = Arc::new(Shared {
            node_id: NodeId::from_name(&config.name),
            config,
            store,
            endpoint,
            replicas: Mutex::new(BTreeMap::new()),
            sessions: AtomicU64::new(0),
            acked: Notify::new(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone()));
        for replica in shared.config.dial_replicas.clone() {
            tasks.spawn(dial_loop(shared.clone(), replica.name, replica.addr));
        }
        tracing::info!(name = %shared.config.name, addr = ?shared.endpoint.local_addr().ok(), "primary started");
        Ok(Primary { shared, tasks, bound: None })
    }

    /// The address the primary listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.endpoint.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// The WAL of a space, created if new. Appending to it is the write path: it never waits for replicas.
    pub fn space(&self, id: &SpaceId) -> Result<SpaceWal, WalError> {
        self.shared.store.space(id)
    }

    /// Appends one entry to a space in the current epoch and returns its sequence.
    pub fn append(&self, space: &SpaceId, kind: EntryKind, payload: Bytes) -> Result<Seq, WalError> {
        self.shared.store.space(space)?.append(self.shared.config.epoch, kind, payload)
    }

    /// The WAL store holding every space.
    pub fn store(&self) -> &WalStore {
        &self.shared.store
    }

    /// Logs, replicas, lag and health.
    ///
    /// The lag in time of a (space, replica) pair is dated by its oldest frame in flight; only a
    /// pair with nothing in flight yet behind (a stream about to restart) reads the oldest entry
    /// the replica lacks, from the log's memory tail or, past it, from disk.
    pub fn status(&self) -> PrimaryStatus {
        let spaces: Vec<SpaceLog> = self.shared.store.spaces().iter().map(SpaceLog::of).collect();
        let links: Vec<(String, Arc<ReplicaLink>)> =
            lock(&self.shared.replicas).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let replicas = links.into_iter().map(|(name, link)| self.replica_view(name, &link)).collect();
        PrimaryStatus {
            role: "primary",
            name: self.shared.config.name.clone(),
            epoch: self.shared.config.epoch,
            listen: self.local_addr().to_string(),
            spaces,
            replicas,
        }
    }

    fn replica_view(&self, name: String, link: &ReplicaLink) -> ReplicaView {
        // Read together, in the order a new connection updates them (`earlier`, then `current`):
        // no connection is counted in both, or in neither.
        let (earlier, session) = {
            let earlier = lock(&link.earlier);
            (*earlier, lock(&link.current).clone())
        };
        let connected = session.as_ref().is_some_and(|s| s.conn.close_reason().is_none());
        let mut view = ReplicaView {
            name,
            state: Health::Disconnected,
            addr: session.as_ref().map(|s| s.conn.remote_address().to_string()),
            rtt_ms: session.as_ref().and_then(|s| lock(&s.liveness).rtt()).map(|d| d.as_secs_f64() * 1e3),
            reconnects: link.connections.load(Ordering::Relaxed).saturating_sub(1),
            max_lag: Lag::default(),
            bytes_sent: 0,
            entries_sent: 0,
            path: session.as_ref().filter(|_| connected).map(|s| PathStats::of(&s.conn)),
            totals: earlier,
            spaces: Vec::new(),
        };
        if let Some(s) = &session {
            let now = s.traffic();
            (view.bytes_sent, view.entries_sent) = (now.bytes_sent, now.entries_sent);
            view.totals += now;
        }
        let now = now_us();
        for wal in self.shared.store.spaces() {
            let head = wal.last_seq();
            let ship = session.as_ref().and_then(|s| lock(&s.spaces).get(wal.space()).cloned());
            let (sent, durable, applied, lag, inflight, error) = match &ship {
                Some(ship) => {
                    let (sent, durable, applied, inflight, pending_since) = {
                        let p = lock(&ship.progress);
                        let pending_since = p.oldest_pending_appended_us();
                        (p.sent(), p.durable(), p.applied(), p.inflight_bytes() as u64, pending_since)
                    };
                    // The oldest frame in flight dates the lag; with none in flight, the entry
                    // after `durable` is read (from the tail, or the segments: not while the
                    // shipper's progress is locked).
                    let age = match pending_since {
                        Some(appended) => now.saturating_sub(appended) / 1_000,
                        None => oldest_age_ms(&wal, durable, now),
                    };
                    let mean = mean_entry_bytes(&wal);
                    let lag = lock(&ship.progress).lag(head, age, mean);
                    (sent, durable, applied, lag, inflight, lock(&ship.error).clone())
                }
                None => (Seq::ZERO, Seq::ZERO, Seq::ZERO, Lag::default(), 0, None),
            };
            view.max_lag.entries = view.max_lag.entries.max(lag.entries);
            view.max_lag.bytes = view.max_lag.bytes.max(lag.bytes);
            view.max_lag.ms = view.max_lag.ms.max(lag.ms);
            view.spaces.push(SpaceReplication {
                space: wal.space().clone(),
                head,
                sent,
                durable,
                applied,
                lag,
                inflight_bytes: inflight,
                error,
            });
        }
        view.state = Health::classify(
            connected,
            view.max_lag.entries,
            view.max_lag.ms,
            self.shared.config.lag_threshold.as_millis() as u64,
        );
        view
    }

    /// Waits until entry `seq` of `space` is durable on at least `replicas` replicas, or until
    /// `timeout` passes, and returns the names of the replicas that hold it durable: at least
    /// `replicas` of them, or fewer if the time ran out. Replication stays asynchronous (appends
    /// never wait for it); this is for the writers that choose to, such as a planned failover
    /// that stops writes and waits for a replica to hold everything, or a commit that wants a
    /// second copy before it answers.
    pub async fn wait_durable(&self, space: &SpaceId, seq: Seq, replicas: usize, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register before looking, so an ack between the look and the wait is not missed.
            let acked = self.shared.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let holding = self.replicas_holding(space, seq);
            if holding.len() >= replicas {
                return holding;
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                return self.replicas_holding(space, seq);
            }
        }
    }

    /// Names of the replicas whose latest connection's acks say `seq` of `space` is durable there.
    fn replicas_holding(&self, space: &SpaceId, seq: Seq) -> Vec<String> {
        let links: Vec<(String, Arc<ReplicaLink>)> =
            lock(&self.shared.replicas).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        links
            .into_iter()
            .filter(|(_, link)| {
                let session = lock(&link.current).clone();
                let ship = session.and_then(|s| lock(&s.spaces).get(space).cloned());
                ship.is_some_and(|ship| lock(&ship.progress).durable() >= seq)
            })
            .map(|(name, _)| name)
            .collect()
    }

    /// Closes the connection of replica `name`, if connected; the replica will reconnect and resume.
    pub fn disconnect_replica(&self, name: &str) -> bool {
        let link = lock(&self.shared.replicas).get(name).cloned();
        let session = link.and_then(|l| lock(&l.current).clone());
        match session {
            Some(s) if s.conn.close_reason().is_none() => {
                s.conn.close(close::SHUTDOWN, b"disconnected by the primary");
                true
            }
            _ => false,
        }
    }

    /// Closes every connection, stops the tasks and syncs the WAL.
    pub async fn shutdown(self) {
        let Primary { shared, mut tasks, bound } = self;
        super::close_and_sync(&shared.endpoint, &mut tasks, &shared.store, b"primary shutting down").await;
        drop((shared, tasks));
        super::wait_released(bound).await;
    }
}

/// Age in ms of the first entry after `durable`, 0 if there is none.
fn oldest_age_ms(wal: &SpaceWal, durable: Seq, now_us: u64) -> u64 {
    if wal.last_seq() <= durable {
        return 0;
    }
    match wal.read_from(durable.next(), 1, 0) {
        Ok(v) => v.first().map(|e| now_us.saturating_sub(e.timestamp_us) / 1_000).unwrap_or(0),
        Err(_) => 0,
    }
}

fn mean_entry_bytes(wal: &SpaceWal) -> u64 {
    match wal.read_from(wal.last_seq(), 1, 0) {
        Ok(v) => v.first().map(|e| (e.payload.len() + ENTRY_HEADER_LEN) as u64).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = serve(shared, conn, None).await {
                        tracing::info!(%remote, error = %e, "replica connection ended");
                    }
                }
                Err(e) => tracing::info!(%remote, error = %e, "refused a connection during the handshake"),
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Dials a replica that waits for its primary, and redials with backoff whenever the connection ends.
async fn dial_loop(shared: Arc<Shared>, name: String, addr: SocketAddr) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), NodeId::from_name(&name).0);
    let session = |conn| serve(shared.clone(), conn, Some(&name));
    let ended = |reason: String, retry_in: Duration, attempt: u32| {
        tracing::info!(replica = %name, %addr, error = %reason, ?retry_in, attempt, "replica connection ended; redialing");
    };
    let dial_timeout = shared.config.transport.dial_timeout;
    super::redial(&shared.endpoint, addr, &name, dial_timeout, backoff, session, ended).await
}

/// Serves one replica connection until it ends.
async fn serve(shared: Arc<Shared>, conn: Connection, expected: Option<&str>) -> Result<(), NetError> {
    let Some(name) = tls::peer_name(&conn) else {
        conn.close(close::UNAUTHORIZED, b"no node name in the client certificate");
        return Err(NetError::Protocol("peer certificate carries no node name".into()));
    };
    if expected.is_some_and(|e| e != name) {
        conn.close(close::UNAUTHORIZED, b"unexpected node name");
        return Err(NetError::Protocol(format!("dialed {expected:?} but the peer is {name}")));
    }
    let (mut send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| NetError::Timeout("the replica's control stream"))??;
    let mut control = ControlReader::new(recv, crate::codec::control::DEFAULT_MAX_CONTROL_BYTES);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, control.read()).await {
        Err(_) => return Err(NetError::Timeout("hello")),
        Ok(Ok(Some(ControlMessage::Hello(h)))) => h,
        Ok(Ok(other)) => {
            conn.close(close::PROTOCOL, b"expected hello");
            return Err(NetError::Protocol(format!("expected hello, got {other:?}")));
        }
        Ok(Err(e)) => {
            conn.close(close::PROTOCOL, b"bad hello");
            return Err(e);
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!("replica speaks protocol {}, this primary {}", hello.protocol_version, PROTOCOL_VERSION);
        let _ = write_control(&mut send, &error_msg(ErrorCode::UnsupportedVersion, None, &reason)).await;
        conn.close(close::PROTOCOL, reason.as_bytes());
        return Err(NetError::Protocol(reason));
    }
    if hello.epoch > shared.config.epoch {
        let reason = format!(
            "replica has seen epoch {}, this primary is at epoch {}: a newer primary exists; this one must not serve",
            hello.epoch, shared.config.epoch
        );
        let _ = write_control(&mut send, &error_msg(ErrorCode::StaleEpoch, None, &reason)).await;
        // The close can overtake the message: its reason says it too.
        conn.close(close::PROTOCOL, reason.as_bytes());
        return Err(NetError::Protocol(reason));
    }
    if hello.node_name != name {
        conn.close(close::UNAUTHORIZED, b"hello name does not match the certificate");
        return Err(NetError::Protocol(format!("hello says {:?} but the certificate says {name:?}", hello.node_name)));
    }

    // Register the session; a newer connection from the same replica replaces the older one.
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (mux, mux_rx) = match shared.config.single_stream {
        true => {
            let (tx, rx) = mpsc::channel(MUX_QUEUE_FRAMES);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let session = Arc::new(Session {
        id: shared.sessions.fetch_add(1, Ordering::Relaxed),
        conn: conn.clone(),
        spaces: Mutex::new(HashMap::new()),
        liveness: Arc::new(Mutex::new(Liveness::new(
            tokio::time::Instant::now().into_std(),
            shared.config.heartbeat.timeout,
        ))),
        control: control_tx,
        mux,
        credit: Arc::new(Semaphore::new(shared.config.max_replica_inflight_bytes)),
        // A replica configured with smaller frames gets smaller batches (not frames it must refuse).
        frame_limits: FrameLimits {
            max_batch_bytes: shared
                .config
                .limits
                .max_batch_bytes
                .min(usize::try_from(hello.max_batch_bytes).unwrap_or(usize::MAX)),
        },
        instance: hello.instance,
    });
    let link = lock(&shared.replicas)
        .entry(name.clone())
        .or_insert_with(|| {
            Arc::new(ReplicaLink {
                current: Mutex::new(None),
                connections: AtomicU64::new(0),
                earlier: Mutex::new(TrafficTotals::default()),
            })
        })
        .clone();
    if let Some(reason) = taken_by_another_process(&link, &session, &shared.config.heartbeat) {
        let _ = write_control(&mut send, &error_msg(ErrorCode::DuplicateName, None, &reason)).await;
        // The close can overtake the message: its reason says it too.
        conn.close(close::DUPLICATE_NAME, reason.as_bytes());
        return Err(NetError::Protocol(reason));
    }
    if expected.is_some() && connected_to_the_same_process(&link, &session) {
        // The replica dialed this primary too, and that connection is alive: keep it. Replacing it
        // with the one dialed here would make the two dials displace each other for ever.
        conn.close(close::REPLACED, b"already connected over the replica's own dial");
        return Ok(());
    }
    link.connections.fetch_add(1, Ordering::Relaxed);
    let replaced = {
        let mut earlier = lock(&link.earlier);
        let old = lock(&link.current).replace(session.clone());
        // What the old connection carried until now; a batch it still sends while closing is
        // not counted.
        if let Some(old) = &old {
            *earlier += old.traffic();
        }
        old
    };
    if let Some(old) = replaced {
        if old.conn.close_reason().is_none() {
            tracing::info!(replica = %name, "a newer connection replaces the current one");
            old.conn.close(close::REPLACED, b"replaced by a newer connection from the same replica");
        }
    }

    // Decide where each space resumes and answer with a welcome.
    let positions: HashMap<SpaceId, SpacePosition> = hello.spaces.into_iter().map(|p| (p.space.clone(), p)).collect();
    // Spaces the replica holds and this primary does not are checked (and refused as diverged) if
    // they are ever created here; a hello never creates spaces on the primary.
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: shared.node_id,
        primary_name: shared.config.name.clone(),
        epoch: shared.config.epoch,
        spaces: shared
            .store
            .spaces()
            .iter()
            .map(|w| SpaceRange { space: w.space().clone(), first_seq: w.first_seq(), last_seq: w.last_seq() })
            .collect(),
        max_inflight_bytes: shared.config.max_replica_inflight_bytes as u64,
    };
    write_control(&mut send, &ControlMessage::Welcome(welcome)).await?;
    tracing::info!(replica = %name, addr = %conn.remote_address(), spaces = positions.len(), "replica connected");

    let mut tasks = JoinSet::new();
    tasks.spawn(control_writer(send, control_rx));
    tasks.spawn(control_reader(shared.clone(), session.clone(), control));
    if let Some(rx) = mux_rx {
        tasks.spawn(mux_writer(conn.clone(), rx));
    }
    {
        let shared2 = shared.clone();
        tasks.spawn(heartbeat::run(
            conn.clone(),
            shared.config.heartbeat.clone(),
            session.liveness.clone(),
            shared.config.epoch,
            {
                let session = session.clone();
                move || store_summary(&shared2.store, max_lag_entries(&shared2.store, &session))
            },
        ));
    }
    tasks.spawn(space_manager(shared.clone(), session.clone(), positions));
    let reason = conn.closed().await;
    tasks.shutdown().await;
    tracing::info!(replica = %name, session = session.id, %reason, "replica disconnected");
    Ok(())
}

/// The replica's largest lag in entries over all spaces shipped to it, for its heartbeats.
fn max_lag_entries(store: &WalStore, session: &Session) -> u64 {
    let ships: Vec<(SpaceId, Arc<SpaceShip>)> =
        lock(&session.spaces).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    ships
        .iter()
        .filter_map(|(space, ship)| {
            let head = store.get(space)?.last_seq();
            Some(head.0.saturating_sub(lock(&ship.progress).durable().0))
        })
        .max()
        .unwrap_or(0)
}

/// Why `new` may not replace the replica's current connection, if it may not: that connection is
/// alive (heard from within the heartbeat timeout) and comes from another replica process under
/// the same name. Letting each take over from the other would make the two flap for ever; a
/// restarted replica gets in once its old connection has gone silent.
fn taken_by_another_process(link: &ReplicaLink, new: &Session, heartbeat: &HeartbeatConfig) -> Option<String> {
    let current = lock(&link.current).clone()?;
    if !is_alive(&current) || current.instance == new.instance {
        return None;
    }
    Some(format!(
        "another replica process named {:?} is connected from {}: replica names must be unique (a restarted replica \
         is let in once its old connection has been silent for {:?})",
        tls::peer_name(&new.conn).unwrap_or_default(),
        current.conn.remote_address(),
        heartbeat.timeout
    ))
}

/// Whether the replica's current connection is alive and comes from the same process as `new`.
fn connected_to_the_same_process(link: &ReplicaLink, new: &Session) -> bool {
    lock(&link.current).clone().is_some_and(|current| is_alive(&current) && current.instance == new.instance)
}

/// Open, and heard from within the heartbeat timeout.
fn is_alive(session: &Session) -> bool {
    session.conn.close_reason().is_none() && !lock(&session.liveness).is_dead(tokio::time::Instant::now().into_std())
}

fn error_msg(code: ErrorCode, space: Option<SpaceId>, reason: &str) -> ControlMessage {
    ControlMessage::Error(ErrorMessage { code, space, reason: reason.to_string() })
}

/// Frames queued for the multiplexed stream in single-stream mode: enough to keep it busy.
const MUX_QUEUE_FRAMES: usize = 64;

/// Writes every space's frames to one stream (single-stream mode): what per-space streams avoid.
async fn mux_writer(conn: Connection, mut rx: mpsc::Receiver<Vec<Bytes>>) {
    let result = async {
        let mut send = conn.open_uni().await?;
        send.write_all(&mux_preamble()).await?;
        while let Some(mut parts) = rx.recv().await {
            send.write_all_chunks(&mut parts).await?;
        }
        Ok::<(), NetError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "multiplexed stream ended");
    }
}

/// Where a shipper's frames go: its space's own stream, or the shared multiplexed stream.
enum FrameSink {
    Stream(SendStream),
    Mux(mpsc::Sender<Vec<Bytes>>),
}

impl FrameSink {
    async fn open(session: &Session, space: &SpaceId, from: Seq) -> Result<FrameSink, NetError> {
        if let Some(tx) = &session.mux {
            return Ok(FrameSink::Mux(tx.clone()));
        }
        let mut send = session.conn.open_uni().await?;
        send.write_chunk(StreamHeader { space: space.clone(), start_seq: from }.encode()).await?;
        Ok(FrameSink::Stream(send))
    }

    /// Sends one frame, given as the pieces [`BatchEncoder::encode_parts`] made of it.
    async fn send(&mut self, space: &SpaceId, first: Seq, mut frame: Vec<Bytes>) -> Result<(), quinn::WriteError> {
        match self {
            FrameSink::Stream(send) => send.write_all_chunks(&mut frame).await,
            FrameSink::Mux(tx) => {
                frame.insert(0, StreamHeader { space: space.clone(), start_seq: first }.encode());
                tx.send(frame).await.map_err(|_| quinn::WriteError::ClosedStream)
            }
        }
    }

    /// Resolves when the replica stops this space's stream, with the code it gave (`None` if the
    /// connection went away). Never for the multiplexed stream: trouble there closes the connection.
    fn stopped(&self) -> impl std::future::Future<Output = Option<quinn::VarInt>> + 'static {
        let stopped = match self {
            FrameSink::Stream(send) => Some(send.stopped()),
            FrameSink::Mux(_) => None,
        };
        async move {
            match stopped {
                Some(f) => f.await.ok().flatten(),
                None => std::future::pending().await,
            }
        }
    }

    /// Abandons what was sent on a space's own stream (a catch-up restarts it elsewhere).
    fn reset(&mut self) {
        if let FrameSink::Stream(send) = self {
            let _ = send.reset(stream_code::CATCH_UP);
        }
    }
}

/// Reads acks and catch-up requests from the replica.
async fn control_reader(shared: Arc<Shared>, session: Arc<Session>, mut control: ControlReader) {
    loop {
        let msg = match control.read().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // Without a control stream no ack can come: every space would stall once its window
                // is in flight. End the session; the replica reconnects.
                session.conn.close(close::PROTOCOL, b"control stream finished");
                return;
            }
            Err(NetError::Connection(_)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad control message from replica; closing the connection");
                session.conn.close(close::PROTOCOL, b"bad control message");
                return;
            }
        };
        lock(&session.liveness).on_activity(tokio::time::Instant::now().into_std());
        match msg {
            ControlMessage::Ack(ack) => {
                let spaces = lock(&session.spaces);
                for a in ack.spaces {
                    let Some(ship) = spaces.get(&a.space) else { continue };
                    // Past this primary's log: a space refused as diverged (the replica holds
                    // entries this primary lost) or a broken peer. Such an ack must not move the
                    // shipper past entries that exist here.
                    let head = ship.wal.last_seq();
                    if a.durable > head || a.applied > head {
                        tracing::debug!(space = %a.space, durable = %a.durable, %head, "ignoring an ack past this primary's log");
                        continue;
                    }
                    lock(&ship.progress).on_ack(a.durable, a.applied);
                    ship.release_credit(a.durable);
                    ship.acked.notify_one();
                }
                drop(spaces);
                shared.acked.notify_waiters();
            }
            ControlMessage::CatchUp(c) => {
                tracing::info!(space = %c.space, from = %c.from_seq, reason = %c.reason, "replica asks for catch-up");
                if let Some(ship) = lock(&session.spaces).get(&c.space) {
                    ship.halted.store(false, Ordering::Release);
                    ship.restart.send_replace(c.from_seq);
                }
            }
            ControlMessage::Error(e) => {
                tracing::warn!(code = ?e.code, space = ?e.space, reason = %e.reason, "replica reports an error");
                let ship = e.space.as_ref().and_then(|s| lock(&session.spaces).get(s).cloned());
                if let Some(ship) = ship {
                    if e.code == ErrorCode::Diverged {
                        ship.halted.store(true, Ordering::Release);
                    }
                    *lock(&ship.error) = Some(format!("replica reports {:?}: {}", e.code, e.reason));
                }
            }
            other => {
                tracing::warn!(?other, "unexpected control message from replica; closing the connection");
                session.conn.close(close::PROTOCOL, b"unexpected control message");
                return;
            }
        }
    }
}

/// Starts a shipper for every space, and for every space created later (each taken once, in the
/// order the store opened them).
async fn space_manager(shared: Arc<Shared>, session: Arc<Session>, positions: HashMap<SpaceId, SpacePosition>) {
    let mut shippers = JoinSet::new();
    let mut spaces_rx = shared.store.subscribe_spaces();
    let positions = Arc::new(positions);
    let mut seen = 0;
    loop {
        spaces_rx.borrow_and_update();
        let new = shared.store.spaces_since(seen);
        seen += new.len();
        // Comparing with the replica's position reads an entry and a digest, maybe from disk, for
        // each space (thousands on a reconnect): off the runtime's threads, a chunk at a time so
        // the first spaces start shipping while the others are compared.
        for chunk in new.chunks(RESUME_CHUNK) {
            let (chunk, positions) = (chunk.to_vec(), positions.clone());
            let starts = tokio::task::spawn_blocking(move || {
                let start = |wal: &SpaceWal| {
                    let pos = positions.get(wal.space());
                    let truncations = wal.truncations();
                    let resume = resume_from(wal, pos);
                    // A refused space counts nothing as held there: its lag shows the whole log.
                    let progress = match (pos, &resume) {
                        (Some(p), Ok(_)) => ReplicaProgress::resumed(p.last_seq, p.durable_seq, p.applied_seq),
                        _ => ReplicaProgress::new(Seq::ZERO),
                    };
                    (resume, progress, truncations)
                };
                chunk.into_iter().map(|wal| (start(&wal), wal)).collect::<Vec<_>>()
            });
            match starts.await {
                Ok(starts) => start_shippers(&shared, &session, &mut shippers, starts),
                Err(e) => {
                    // Without shippers the replica would stay connected and get nothing: make it
                    // reconnect (and so start over) instead.
                    tracing::error!(error = %e, "cannot compute where the replica's spaces resume; closing");
                    session.conn.close(close::LOCAL_FAILURE, b"primary failed to start its shippers");
                    return;
                }
            }
        }
        if spaces_rx.changed().await.is_err() {
            return;
        }
    }
}

/// Where a space's shipper starts (or why it cannot), the replica's progress it starts with, and
/// the log's truncation count the handshake saw.
type ShipperStart = (Result<Seq, Refusal>, ReplicaProgress, u64);

/// Spaces whose resume points one blocking task computes (see `space_manager`).
const RESUME_CHUNK: usize = 64;

/// Starts a shipper for each space at its resume point, or tells the replica why a space cannot be
/// replicated to it.
fn start_shippers(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    shippers: &mut JoinSet<()>,
    starts: Vec<(ShipperStart, SpaceWal)>,
) {
    for ((start, progress, truncations), wal) in starts {
        let (restart, _) = watch::channel(Seq::ZERO);
        let ship = Arc::new(SpaceShip {
            wal: wal.clone(),
            progress: Mutex::new(progress),
            acked: Notify::new(),
            restart,
            error: Mutex::new(None),
            halted: std::sync::atomic::AtomicBool::new(false),
            truncations,
            credits: Mutex::new(VecDeque::new()),
        });
        lock(&session.spaces).insert(wal.space().clone(), ship.clone());
        match start {
            Ok(from) => {
                shippers.spawn(ship_space(shared.clone(), session.clone(), ship, from));
            }
            Err(refusal) => {
                tracing::warn!(space = %wal.space(), reason = %refusal.reason, "space cannot be replicated to this replica");
                *lock(&ship.error) = Some(refusal.reason.clone());
                let _ = session.control.send(error_msg(refusal.code, Some(wal.space().clone()), &refusal.reason));
            }
        }
    }
    // The replica's hello may already hold what a `wait_durable` caller waits for: no ack will say so.
    shared.acked.notify_waiters();
}

/// Where shipping `wal` to a replica starts, given what the replica said it holds of the space
/// (`None`: nothing), or why it cannot (blocking: may read the WAL's segments).
fn resume_from(wal: &SpaceWal, replica: Option<&SpacePosition>) -> Result<Seq, Refusal> {
    let local = LocalLog {
        first_seq: wal.first_seq(),
        last_seq: wal.last_seq(),
        epoch_at_replica_last: None,
        digest_at_replica_last: None,
    };
    let Some(pos) = replica else {
        return resume_point(local, &empty_position(wal.space()));
    };
    let epoch_at = match wal.read_from(pos.last_seq, 1, 0) {
        Ok(v) => v.first().filter(|e| e.seq == pos.last_seq).map(|e| e.epoch),
        Err(_) => None,
    };
    let digest_at = wal.digest_at(pos.last_seq).unwrap_or_else(|e| {
        tracing::warn!(space = %wal.space(), error = %e, "cannot compute the digest to compare");
        None
    });
    resume_point(LocalLog { epoch_at_replica_last: epoch_at, digest_at_replica_last: digest_at, ..local }, pos)
}

fn empty_position(space: &SpaceId) -> SpacePosition {
    SpacePosition {
        space: space.clone(),
        last_seq: Seq::ZERO,
        last_epoch: Default::default(),
        digest: Default::default(),
        durable_seq: Seq::ZERO,
        applied_seq: Seq::ZERO,
    }
}

/// Pause before a shipper resumes a stream the replica stopped without asking for catch-up, or after
/// a local error: long enough not to spin, short enough to recover quickly.
const STOPPED_RETRY: Duration = Duration::from_secs(1);

enum Interrupt {
    Restart(Seq),
    Closed,
}

/// Ships one space to one replica: opens its stream when there is something to send, writes batch
/// frames as fast as the stream takes them (a batch is whatever accumulated meanwhile, up to the
/// configured bounds), pauses when too much is unacknowledged, and restarts from a sequence when the
/// replica asks for catch-up.
async fn ship_space(shared: Arc<Shared>, session: Arc<Session>, ship: Arc<SpaceShip>, start: Seq) {
    let cfg = &shared.config;
    let wal = ship.wal.clone();
    let space = wal.space().clone();
    let mut encoder = BatchEncoder::new(shared.node_id, cfg.compression)
        .with_min_compress_bytes(cfg.min_compress_bytes)
        .with_limits(session.frame_limits);
    let mut restart = ship.restart.subscribe();
    let mut from = start;
    loop {
        lock(&ship.progress).restart_from(from);
        // What was in flight went down a stream that is gone.
        lock(&ship.credits).clear();
        match ship_stream(&session, &wal, &ship, &mut encoder, &mut restart, from, cfg).await {
            Ok(Interrupt::Restart(seq)) => from = seq,
            Ok(Interrupt::Closed) => return,
            Err(e) => {
                if session.conn.close_reason().is_some() {
                    return;
                }
                let (code, retry) = match &e {
                    // Retrying cannot help: the replica needs a snapshot (or the operator a fix).
                    NetError::Wal(WalError::Truncated { .. }) => (ErrorCode::Truncated, false),
                    NetError::Encode(_) => (ErrorCode::Internal, false),
                    // A local I/O error may clear (disk space freed): try again after a pause.
                    _ => (ErrorCode::Internal, true),
                };
                let reason = match code {
                    ErrorCode::Truncated => format!("{e}; rebuild the replica's copy of this space from a snapshot"),
                    _ => format!("{e}"),
                };
                tracing::warn!(%space, error = %reason, retry, "shipping stopped");
                *lock(&ship.error) = Some(reason.clone());
                let _ = session.control.send(error_msg(code, Some(space.clone()), &reason));
                match pause(&ship, &mut restart, || retry).await {
                    Interrupt::Restart(seq) => from = seq,
                    Interrupt::Closed => return,
                }
                *lock(&ship.error) = None;
            }
        }
    }
}

async fn ship_stream(
    session: &Session,
    wal: &SpaceWal,
    ship: &SpaceShip,
    encoder: &mut BatchEncoder,
    restart: &mut watch::Receiver<Seq>,
    from: Seq,
    cfg: &PrimaryConfig,
) -> Result<Interrupt, NetError> {
    let mut shippable = Shippable::new(wal, cfg.wal.fsyncs());
    // Open the stream only once there is something to ship.
    while shippable.upto() < from {
        tokio::select! {
            _ = shippable.wait_for(from) => {}
            r = restart.changed() => return Ok(restart_or_closed(r, restart)),
        }
    }
    // Opening waits while the connection is at its stream limit: a catch-up must still get through.
    let mut sink = tokio::select! {
        sink = FrameSink::open(session, wal.space(), from) => sink?,
        r = restart.changed() => return Ok(restart_or_closed(r, restart)),
    };
    *lock(&ship.error) = None;
    loop {
        // Flow control of our own: bounded unacknowledged bytes per (space, replica).
        loop {
            let acked = ship.acked.notified();
            if lock(&ship.progress).may_send(cfg.max_unacked_bytes) {
                break;
            }
            tokio::select! {
                _ = acked => {}
                r = restart.changed() => { sink.reset(); return Ok(restart_or_closed(r, restart)) }
                // Stopped while waiting: no ack will come for what is in flight.
                code = sink.stopped() => return Ok(stopped_by_replica(ship, restart, code).await),
            }
        }
        let next = lock(&ship.progress).next_to_send();
        let upto = shippable.upto();
        if upto < next {
            tokio::select! {
                _ = shippable.wait_for(next) => {}
                r = restart.changed() => { sink.reset(); return Ok(restart_or_closed(r, restart)) }
                code = sink.stopped() => return Ok(stopped_by_replica(ship, restart, code).await),
            }
            if let Some(linger) = cfg.linger {
                tokio::time::sleep(linger).await;
            }
            continue;
        }
        let count = usize::try_from(upto.0 - next.0 + 1).unwrap_or(usize::MAX).min(cfg.max_batch_entries);
        // Payload bytes per batch: this primary's setting, within the session's frame limit
        // (which also holds each entry's header).
        let frame_room = session.frame_limits.max_batch_bytes.saturating_sub(count.saturating_mul(ENTRY_HEADER_LEN));
        let batch_bytes = cfg.max_batch_bytes.min(frame_room);
        let mut entries = read_entries(wal, next, count, batch_bytes).await?;
        // Cut back since the handshake (an operator's `truncate_suffix`): what the replica holds
        // past the cut may not be what this log holds there now. Shipping on would splice two logs;
        // a new handshake compares them instead.
        if wal.truncations() != ship.truncations {
            tracing::warn!(space = %wal.space(), "log cut back on the primary during the session; closing so the replica re-handshakes");
            session.conn.close(close::LOG_CUT, b"a space's log was cut back on the primary");
            return Ok(Interrupt::Closed);
        }
        if let Some(cut) = entries.iter().position(|e| e.epoch != entries[0].epoch) {
            entries.truncate(cut);
        }
        // A large frame takes the replica's session credit: at once if there is enough; if not, a
        // small frame goes without it (so a live space never queues behind catch-up), and only an
        // entry too large for a small frame alone waits for credit.
        let charge = frame_charge(&entries);
        let mut credit = None;
        if charge > SMALL_FRAME_BYTES {
            let units = credit_units(charge);
            match session.credit.clone().try_acquire_many_owned(units) {
                Ok(permit) => credit = Some(permit),
                Err(_) => match small_frame_prefix(&entries) {
                    0 => tokio::select! {
                        permit = session.credit.clone().acquire_many_owned(units) => match permit {
                            Ok(p) => credit = Some(p),
                            Err(_) => return Ok(Interrupt::Closed),
                        },
                        r = restart.changed() => { sink.reset(); return Ok(restart_or_closed(r, restart)) }
                        code = sink.stopped() => return Ok(stopped_by_replica(ship, restart, code).await),
                    },
                    fits => entries.truncate(fits),
                },
            }
        }
        let (Some(first), Some(last)) = (entries.first().map(|e| e.seq), entries.last().map(|e| e.seq)) else {
            continue;
        };
        let first_appended_us = entries[0].timestamp_us;
        let mut frame = Vec::with_capacity(4);
        let len = encoder.encode_parts(wal.space(), &entries, &mut frame)?;
        drop(entries);
        tokio::select! {
            r = sink.send(wal.space(), first, frame) => match r {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) => return Ok(stopped_by_replica(ship, restart, Some(code)).await),
                Err(e) => return Err(e.into()),
            },
            r = restart.changed() => { sink.reset(); return Ok(restart_or_closed(r, restart)) }
        }
        lock(&ship.progress).on_sent(first, last, len, first_appended_us);
        if let Some(permit) = credit {
            // An ack may have covered this frame already (the replica held its entries): then
            // nothing is in flight for it, and no later ack would give the credit back.
            let mut credits = lock(&ship.credits);
            if last > lock(&ship.progress).durable() {
                credits.push_back((last, permit));
            }
        }
    }
}

/// What a frame of `entries` costs against the replica's in-flight credit: its size once
/// decompressed (header and entries), which is what the replica holds while it applies it.
fn frame_charge(entries: &[Entry]) -> usize {
    BATCH_HEADER_LEN + BatchEncoder::payload_len(entries)
}

/// Semaphore units for `bytes` (a frame is far below `u32::MAX`; saturate rather than wrap).
fn credit_units(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// How many of `entries` fit in a frame that needs no credit (0 if the first alone does not).
fn small_frame_prefix(entries: &[Entry]) -> usize {
    let mut size = BATCH_HEADER_LEN;
    entries
        .iter()
        .take_while(|e| {
            size += ENTRY_HEADER_LEN + e.payload.len();
            size <= SMALL_FRAME_BYTES
        })
        .count()
}

/// How far a shipper may go: only entries durable on this node, so that a primary that loses power
/// never leaves a replica holding entries it lost itself (which would refuse the space as diverged
/// once the primary writes again). PostgreSQL's walsender ships only flushed WAL for the same
/// reason. Under `SyncPolicy::Never` nothing is ever fsynced: the bound is the last entry written.
struct Shippable<'a> {
    wal: &'a SpaceWal,
    /// The durable position, watched only under an fsyncing policy (a watch costs every sync a wake).
    durable: Option<watch::Receiver<Seq>>,
}

impl<'a> Shippable<'a> {
    fn new(wal: &'a SpaceWal, fsyncs: bool) -> Shippable<'a> {
        Shippable { wal, durable: fsyncs.then(|| wal.subscribe_durable()) }
    }

    /// The last entry that may be shipped now.
    fn upto(&self) -> Seq {
        match &self.durable {
            Some(rx) => (*rx.borrow()).min(self.wal.last_seq()),
            None => self.wal.last_seq(),
        }
    }

    /// Returns once `seq` may be shipped.
    async fn wait_for(&mut self, seq: Seq) {
        match &mut self.durable {
            Some(rx) => {
                if rx.wait_for(|d| *d >= seq).await.is_err() {
                    // The log is gone (its last handle dropped): nothing more will become durable.
                    std::future::pending::<()>().await;
                }
            }
            None => self.wal.wait_for(seq).await,
        }
    }
}

/// The replica stopped the space's stream (`code`; `None` if the connection went): for a catch-up,
/// the request is on its way; for anything else (it could not store the space, say) nothing will
/// come, so shipping resumes from its durable position after a pause.
async fn stopped_by_replica(
    ship: &SpaceShip,
    restart: &mut watch::Receiver<Seq>,
    code: Option<quinn::VarInt>,
) -> Interrupt {
    if let Some(code) = code.filter(|c| *c != stream_code::CATCH_UP) {
        if !ship.halted.load(Ordering::Acquire) {
            *lock(&ship.error) = Some(format!("replica stopped the stream (code {code}); retrying"));
        }
    }
    pause(ship, restart, || !ship.halted.load(Ordering::Acquire)).await
}

/// Waits for a catch-up request (a restart from the sequence it names), or for [`STOPPED_RETRY`]
/// after which, if `may_retry` still says so, shipping resumes from the replica's durable position;
/// `Closed` when the session ends.
async fn pause(ship: &SpaceShip, restart: &mut watch::Receiver<Seq>, may_retry: impl Fn() -> bool) -> Interrupt {
    // The space's stream is stopped or abandoned: no frame of it is being received any more, and
    // a halted space may wait here for long. Its credit must not stall the other spaces meanwhile.
    lock(&ship.credits).clear();
    let retry = async {
        tokio::time::sleep(STOPPED_RETRY).await;
        if !may_retry() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = restart.changed() => restart_or_closed(r, restart),
        _ = retry => Interrupt::Restart(lock(&ship.progress).durable().next()),
    }
}

fn restart_or_closed(r: Result<(), watch::error::RecvError>, restart: &mut watch::Receiver<Seq>) -> Interrupt {
    match r {
        Ok(()) => Interrupt::Restart(*restart.borrow_and_update()),
        Err(_) => Interrupt::Closed,
    }
}
