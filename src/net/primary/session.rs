//! One replica connection: accepting or dialing it, the hello/welcome handshake, the control
//! stream (acks, catch-up requests, errors), and a shipper per space at its resume point.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::Connection;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::known::{Floor, Floors};
use super::shipper::{mux_writer, ship_space, SpaceShip, MUX_QUEUE_FRAMES};
use super::{ReplicaLink, Shared};
use crate::codec::batch::FrameLimits;
use crate::codec::control::{ErrorCode, ErrorMessage, SpacePosition, SpaceRange, Welcome};
use crate::codec::{CodecCounts, ControlMessage, PROTOCOL_VERSION};
use crate::config::HeartbeatConfig;
use crate::net::error::NetError;
use crate::net::framed::{control_writer, write_control, ControlReader, ControlSender};
use crate::net::heartbeat::{self, store_summary};
use crate::net::status::TrafficTotals;
use crate::net::tls;
use crate::net::{close, lock, HANDSHAKE_TIMEOUT};
use crate::protocol::backoff::Backoff;
use crate::protocol::handshake::{resume_point, LocalLog, Refusal};
use crate::protocol::liveness::Liveness;
use crate::protocol::progress::ReplicaProgress;
use crate::types::{NodeId, Seq, SpaceId};
use crate::wal::{SpaceWal, WalError, WalStore};

/// One connection to a replica.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) conn: Connection,
    pub(super) spaces: Mutex<HashMap<SpaceId, Arc<SpaceShip>>>,
    pub(super) liveness: Arc<Mutex<Liveness>>,
    pub(super) control: ControlSender,
    /// In single-stream mode: the queue of the one multiplexed stream; each item is a stream header
    /// followed by the pieces of one frame.
    pub(super) mux: Option<mpsc::Sender<Vec<Bytes>>>,
    /// Credit for frames larger than `SMALL_FRAME_BYTES` in flight to this replica, all spaces
    /// together (`PrimaryConfig::max_replica_inflight_bytes`).
    pub(super) credit: Arc<Semaphore>,
    /// The smaller of this primary's and the replica's frame limits (the replica's is in its hello).
    pub(super) frame_limits: FrameLimits,
    /// The replica process's [`Hello::instance`](crate::codec::control::Hello::instance).
    pub(super) instance: u64,
    /// Acks of spaces whose shipper is not registered yet (the handshake compares the spaces in
    /// chunks after the welcome, while the replica already acks): the newest (durable, applied)
    /// per space, taken in when the shipper is. Only spaces this primary has. Lock order:
    /// `spaces`, then this.
    pub(super) early_acks: Mutex<HashMap<SpaceId, (Seq, Seq)>>,
}

impl Session {
    /// The spaces this connection set up, with their shippers: a snapshot, so that what is read
    /// of them next takes their locks with the map's released.
    fn ships(&self) -> Vec<(SpaceId, Arc<SpaceShip>)> {
        lock(&self.spaces).iter().map(|(s, ship)| (s.clone(), ship.clone())).collect()
    }

    /// Where the replica stands in each space this connection set up.
    pub(super) fn floors(&self) -> Vec<(SpaceId, Floor)> {
        self.ships().into_iter().map(|(s, ship)| (s, ship.floor())).collect()
    }

    /// What this connection has carried so far.
    pub(super) fn traffic(&self) -> TrafficTotals {
        let (mut batches_sent, mut bytes_sent, mut entries_sent) = (0, 0, 0);
        let mut codec = CodecCounts::default();
        for ship in lock(&self.spaces).values() {
            let progress = lock(&ship.progress);
            let (batches, entries, bytes) = progress.totals();
            batches_sent += batches;
            bytes_sent += bytes;
            entries_sent += entries;
            codec += progress.codec_counts();
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
            codec,
        }
    }
}

pub(super) async fn accept_loop(shared: Arc<Shared>) {
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
                Err(e) => crate::net::log_refused_handshake(remote, &e),
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Dials a replica that waits for its primary, and redials with backoff whenever the connection ends.
pub(super) async fn dial_loop(shared: Arc<Shared>, name: String, addr: SocketAddr) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), NodeId::from_name(&name).0);
    let session = |conn| serve(shared.clone(), conn, Some(&name));
    let ended = |reason: String, retry_in: Duration, attempt: u32| {
        if crate::net::is_certificate_error(&reason) {
            tracing::warn!(replica = %name, %addr, error = %reason, ?retry_in, attempt, "certificate check failed; redialing");
        } else {
            tracing::info!(replica = %name, %addr, error = %reason, ?retry_in, attempt, "replica connection ended; redialing");
        }
    };
    let dial_timeout = shared.config.transport.dial_timeout;
    crate::net::redial(&shared.endpoint, addr, &name, dial_timeout, backoff, session, ended).await
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
    let outbox = ControlSender::default();
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
        control: outbox.clone(),
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
        early_acks: Mutex::new(HashMap::new()),
    });
    let positions: HashMap<SpaceId, SpacePosition> = hello.spaces.into_iter().map(|p| (p.space.clone(), p)).collect();
    let replaced = match register(&shared, &name, &session, expected.is_some(), &positions) {
        Registration::Registered(replaced) => replaced,
        Registration::TakenByAnotherProcess { reason, capped } => {
            if capped {
                // Best effort: the connection is refused either way.
                if let Err(e) = super::keep_known_off_thread(shared.clone()).await {
                    tracing::warn!(replica = %name, error = %e, "cannot keep the known replicas");
                }
            }
            let _ = write_control(&mut send, &error_msg(ErrorCode::DuplicateName, None, &reason)).await;
            // The close can overtake the message: its reason says it too.
            conn.close(close::DUPLICATE_NAME, reason.as_bytes());
            return Err(NetError::Protocol(reason));
        }
        Registration::AlreadyConnected => {
            // The replica dialed this primary too, and that connection is alive: keep it.
            // Replacing it with the one dialed here would make the two dials displace each other
            // for ever.
            conn.close(close::REPLACED, b"already connected over the replica's own dial");
            return Ok(());
        }
    };
    if let Some(old) = replaced {
        if old.conn.close_reason().is_none() {
            tracing::info!(replica = %name, "a newer connection replaces the current one");
            old.conn.close(close::REPLACED, b"replaced by a newer connection from the same replica");
        }
    }
    // On disk before the replica is sent anything, so that a restart never forgets it or counts
    // it with more than its hello says it holds (a space set aside, a new disk). Without that, no
    // session: the replica retries.
    if let Err(e) = super::keep_known_off_thread(shared.clone()).await {
        let e = match e {
            NetError::Wal(e) => NetError::KeepKnown(e),
            other => other,
        };
        conn.close(close::LOCAL_FAILURE, e.to_string().as_bytes());
        return Err(e);
    }

    // Decide where each space resumes and answer with a welcome.
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
    tasks.spawn(crate::net::refuse_unexpected_streams(conn.clone(), true, true));
    tasks.spawn(control_writer(send, outbox));
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
    // Where it stood, for retention after a restart.
    if let Err(e) = super::keep_known_off_thread(shared).await {
        tracing::warn!(replica = %name, error = %e, "cannot keep the known replicas");
    }
    Ok(())
}

/// What [`register`] made of a new connection.
enum Registration {
    /// It is the replica's current connection now, in place of this one.
    Registered(Option<Arc<Session>>),
    /// Another live process uses the replica's name: refused, for this reason; `capped` if its
    /// hello lowered the replica's cap.
    TakenByAnotherProcess { reason: String, capped: bool },
    /// The same process is connected already over its own dial (this one was dialed here).
    AlreadyConnected,
}

/// Makes `session` the current connection of replica `name`, unless another live process holds
/// the name or (for a connection this primary dialed) the replica's own dial is connected. All
/// under the replica map's lock: `Primary::forget_replica` must not remove the replica between
/// the look-up and the registration, which would leave a live connection unknown to status and
/// retention. The replica's floor takes the old connection's acks, lowered to what `positions`
/// (its hello) says it holds durable.
fn register(
    shared: &Shared,
    name: &str,
    session: &Arc<Session>,
    dialed: bool,
    positions: &HashMap<SpaceId, SpacePosition>,
) -> Registration {
    let mut replicas = lock(&shared.replicas);
    let link = replicas.entry(name.to_string()).or_insert_with(|| Arc::new(ReplicaLink::new(Floors::new()))).clone();
    if let Some(reason) = taken_by_another_process(&link, session, &shared.config.heartbeat) {
        drop(replicas);
        // It may be the replica itself, restarted on an empty or older disk before its old
        // connection went silent: until one of them registers, it counts with no more than this
        // hello says (retention keeps more if it is an impostor).
        let capped = lower_cap(&mut lock(&link.cap), positions, &shared.store.spaces());
        return Registration::TakenByAnotherProcess { reason, capped };
    }
    if dialed && connected_to_the_same_process(&link, session) {
        return Registration::AlreadyConnected;
    }
    link.connections.fetch_add(1, Ordering::Relaxed);
    let mut earlier = lock(&link.earlier);
    let old = lock(&link.current).replace(session.clone());
    // What the old connection carried until now; a batch it still sends while closing is not
    // counted.
    if let Some(old) = &old {
        *earlier += old.traffic();
    }
    drop(earlier);
    drop(replicas);
    update_floor(shared, &link, session, old.as_deref(), positions);
    Registration::Registered(old)
}

/// The replica's floor once `session` replaced `old`: `old`'s acks, lowered to what `session`'s
/// hello (`positions`) says it holds. Until it runs, the replica counts as before this connection.
fn update_floor(
    shared: &Shared,
    link: &ReplicaLink,
    session: &Arc<Session>,
    old: Option<&Session>,
    positions: &HashMap<SpaceId, SpacePosition>,
) {
    // Read with no lock of the link held: they take the logs' locks, which a cut holds during I/O.
    let acked = old.map(|old| old.floors()).unwrap_or_default();
    let logs: HashMap<SpaceId, (Seq, u64)> =
        shared.store.spaces().into_iter().map(|w| (w.space().clone(), (w.first_seq(), w.truncations()))).collect();
    // Only while `session` is current: a newer connection registered meanwhile has lowered the
    // floor to its own hello, which these acks must not undo. Lock order: `current`, then `floor`.
    let current = lock(&link.current);
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
        let mut floors = lock(&link.floor);
        floors.extend(acked);
        lower_to_hello(&mut floors, positions, |space| logs.get(space).copied());
        // This connection's own hello speaks for the replica now.
        lock(&link.cap).clear();
    }
}

/// Lowers `cap` (the most a refused process under the replica's name says is held) to what its
/// hello (`positions`) says of each of `spaces` (a space it does not hold to 0); whether any was
/// lowered.
fn lower_cap(
    cap: &mut BTreeMap<SpaceId, Seq>,
    positions: &HashMap<SpaceId, SpacePosition>,
    spaces: &[SpaceWal],
) -> bool {
    let mut lowered = false;
    for wal in spaces {
        let held = positions.get(wal.space()).map_or(Seq::ZERO, |p| p.durable_seq);
        let kept = cap.entry(wal.space().clone()).or_insert(Seq(u64::MAX));
        if held < *kept {
            *kept = held;
            lowered = true;
        }
    }
    lowered
}

/// Lowers each space's floor to what the replica's hello says it holds durable (a space it does
/// not hold to 0). A replica that needed a snapshot of a space and now holds what the log can
/// follow (rebuilt from one) counts again, from 0 until its acks are checked against the log.
/// `log(space)` is the space's `first_seq` and suffix truncations.
fn lower_to_hello(
    floors: &mut Floors,
    positions: &HashMap<SpaceId, SpacePosition>,
    log: impl Fn(&SpaceId) -> Option<(Seq, u64)>,
) {
    for (space, floor) in floors.iter_mut() {
        let held = positions.get(space).map_or(Seq::ZERO, |p| p.durable_seq);
        match floor {
            Floor::At { seq, .. } => *seq = held.min(*seq),
            Floor::NeedsSnapshot => match log(space) {
                Some((first, truncations)) if held.next() >= first => {
                    *floor = Floor::At { seq: Seq::ZERO, truncations }
                }
                _ => {}
            },
        }
    }
}

/// The replica's largest lag in entries over all spaces shipped to it, for its heartbeats.
fn max_lag_entries(store: &WalStore, session: &Session) -> u64 {
    session
        .ships()
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

pub(super) fn error_msg(code: ErrorCode, space: Option<SpaceId>, reason: &str) -> ControlMessage {
    ControlMessage::Error(ErrorMessage { code, space, reason: reason.to_string() })
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
                    match spaces.get(&a.space) {
                        Some(ship) => ship.on_ack(a.durable, a.applied),
                        // The replica does not repeat an ack: keep it for the shipper to come.
                        None if shared.store.get(&a.space).is_some() => {
                            let mut early = lock(&session.early_acks);
                            let newest = early.entry(a.space).or_insert((a.durable, a.applied));
                            *newest = (newest.0.max(a.durable), newest.1.max(a.applied));
                        }
                        None => {}
                    }
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
            needs_snapshot: std::sync::atomic::AtomicBool::new(false),
            refused: start.as_ref().err().map(|r| r.code),
            truncations,
            credits: Mutex::new(VecDeque::new()),
        });
        {
            let mut spaces = lock(&session.spaces);
            spaces.insert(wal.space().clone(), ship.clone());
            if let Some((durable, applied)) = lock(&session.early_acks).remove(wal.space()) {
                ship.on_ack(durable, applied);
            }
        }
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
    // A log that cannot be read is not compared: resuming unchecked could append this log's
    // entries after other ones the replica holds at the same positions.
    let cannot_compare = |e: WalError| Refusal {
        code: ErrorCode::Internal,
        reason: format!(
            "the primary cannot read its log to compare it with the replica's: {e}; this space is not shipped on this \
             connection, and is compared again when the replica reconnects (Replica::disconnect or a restart)"
        ),
    };
    let epoch_at = match pos.last_seq {
        Seq::ZERO => None,
        at => match wal.read_from(at, 1, 0) {
            Ok(v) => v.first().filter(|e| e.seq == at).map(|e| e.epoch),
            // Removed by retention: nothing to compare, and `resume_point` refuses it if the next
            // entry is gone too.
            Err(WalError::Truncated { .. }) => None,
            Err(e) => return Err(cannot_compare(e)),
        },
    };
    let digest_at = wal.digest_at(pos.last_seq).map_err(cannot_compare)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Epoch;
    use crate::wal::{SyncPolicy, WalConfig};

    /// Same positions, same epoch, other entries: only the digest tells the logs apart. A log
    /// that cannot be read to compute it refuses the space instead of resuming unchecked.
    #[test]
    fn a_log_that_cannot_be_read_to_compare_refuses_the_space() {
        let root = tempfile::tempdir().unwrap();
        let space = SpaceId::new("s").unwrap();
        let wal = SpaceWal::open(root.path(), space.clone(), WalConfig::default().sync(SyncPolicy::Never)).unwrap();
        for i in 1..=10u8 {
            wal.append(Epoch(1), 0, Bytes::from(vec![i; 10])).unwrap();
        }
        let replica = SpacePosition {
            last_seq: Seq(10),
            last_epoch: Epoch(1),
            digest: wal.digest(),
            durable_seq: Seq(10),
            applied_seq: Seq(10),
            ..empty_position(&space)
        };
        wal.truncate_suffix(Seq(5)).unwrap();
        for i in 6..=12u8 {
            wal.append(Epoch(1), 0, Bytes::from(vec![i + 100; 10])).unwrap();
        }
        let refused = resume_from(&wal, Some(&replica)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Diverged, "{}", refused.reason);

        // The entry at 10 still comes from memory; the digest up to it needs the segment file.
        for file in std::fs::read_dir(root.path().join("s")).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|x| x == "wal") {
                std::fs::remove_file(path).unwrap();
            }
        }
        assert!(wal.digest_at(Seq(10)).is_err());
        let refused = resume_from(&wal, Some(&replica)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Internal, "{}", refused.reason);
        assert!(refused.reason.contains("cannot read its log"), "{}", refused.reason);
        // Nothing to compare at 0, and the end of the log is known without reading.
        let empty = empty_position(&space);
        assert_eq!(resume_from(&wal, Some(&empty)).map_err(|r| r.reason), Ok(Seq(1)));
        let at_end = SpacePosition { last_seq: Seq(12), digest: wal.digest(), ..replica.clone() };
        assert_eq!(resume_from(&wal, Some(&at_end)).map_err(|r| r.reason), Ok(Seq(13)));
    }

    #[test]
    fn a_floor_is_lowered_to_what_the_hello_holds_and_never_raised() {
        let id = |s: &str| SpaceId::new(s).unwrap();
        let held =
            |s: &str, durable: u64| (id(s), SpacePosition { durable_seq: Seq(durable), ..empty_position(&id(s)) });
        let at = |seq: u64| Floor::At { seq: Seq(seq), truncations: 2 };
        let floors = |v: [(&str, Floor); 4]| Floors::from(v.map(|(s, f)| (id(s), f)));
        let mut floor = floors([("a", at(100)), ("b", at(50)), ("gone", at(10)), ("trimmed", Floor::NeedsSnapshot)]);
        let before = floor.clone();
        // More than kept everywhere, and a space new to the floor: nothing changes.
        // The logs: "trimmed" starts at 20 (retention), the others at 1.
        let log = |s: &SpaceId| Some((Seq(if s.as_str() == "trimmed" { 20 } else { 1 }), 2));
        let ahead =
            HashMap::from([held("a", 200), held("b", 50), held("gone", 10), held("new", 5), held("trimmed", 9)]);
        lower_to_hello(&mut floor, &ahead, log);
        assert_eq!(floor, before, "still needs entries before 20 for \"trimmed\"");
        // A space set aside (held from 0 again), one no longer held at all, and one rebuilt from
        // a snapshot up to 19: it counts again, from 0 until its acks are checked.
        let reset = HashMap::from([held("a", 0), held("b", 70), held("trimmed", 19)]);
        lower_to_hello(&mut floor, &reset, log);
        assert_eq!(floor, floors([("a", at(0)), ("b", at(50)), ("gone", at(0)), ("trimmed", at(0))]));
    }
}
