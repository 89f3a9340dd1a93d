//! The replica: keeps one connection to its primary (dialing with backoff, or accepting the
//! primary's dial), receives every space on its own stream, and for each batch validates, appends to
//! its WAL, makes it durable per its policy, hands it to the apply hook, and acks.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, RecvStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::codec::batch::space_tag;
use crate::codec::control::{
    Ack, CatchUp, ErrorCode, ErrorMessage, Hello, SpaceAck, SpacePosition, DEFAULT_MAX_CONTROL_BYTES,
};
use crate::codec::stream::StreamKind;
use crate::codec::{BatchDecoder, ControlMessage, DecodedBatch, PROTOCOL_VERSION};
use crate::config::ReplicaConfig;
use crate::entry::Entry;
use crate::net::error::NetError;
use crate::net::framed::{
    control_writer, read_batch, read_mux_header, read_mux_preamble_rest, read_stream_header_rest, read_stream_kind,
    write_control, AssemblyBudget, ControlReader,
};
use crate::net::heartbeat::{self, store_summary};
use crate::net::status::{ConnectionState, PrimaryHeartbeat, ReplicaSpace, ReplicaStatus, SpaceLog};
use crate::net::tls::{self, NodeIdentity};
use crate::net::{close, endpoint, lock, open_store, read_entries, stream_code, HANDSHAKE_TIMEOUT};
use crate::protocol::backoff::Backoff;
use crate::protocol::liveness::Liveness;
use crate::types::{Epoch, NodeId, Seq, SpaceId};
use crate::wal::{SpaceWal, SyncPolicy, WalError, WalStore};

/// Called with every run of entries a replica has made durable, in order, per space. The entries
/// count as applied once the returned future completes; a slow hook holds back only its own space.
///
/// Each space has one applier task, owned by the [`Replica`] (not by a connection), that reads
/// durable entries from the replica's WAL from `applied + 1` on: reconnects, catch-ups and resent
/// batches never skip or repeat an entry while the replica runs. At start, `applied` is the WAL's
/// last sequence: the embedding server rebuilds its state from its own copy of the log (replaying
/// `Replica::space(id)` from its checkpoint) before the hook takes over.
///
/// A hook that panics does not stop its space for good: the space's status shows the panic
/// ([`ReplicaSpace::error`]) and, a second later, the same entries (from `applied + 1`) come
/// again. A hook that can panic partway through a call must tolerate that repeat, and should
/// leave no partial effect behind: if the log is cut back meanwhile, the entries that come again
/// may differ from the ones it saw.
pub trait ApplyHook: Send + Sync + 'static {
    /// Applies `entries` (contiguous, in order) of `space`.
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// The replica's log of `space` was cut back to `after` (`SpaceWal::truncate_suffix`, the
    /// repair of a diverged space) while entries past it had been applied: roll the state back to
    /// `after` (rebuild it from a checkpoint, replaying the log up to `after`). The entries that
    /// the log holds past `after` from then on come to [`ApplyHook::apply`] again, the new ones
    /// at the old sequences included. The default does nothing, which is right only for a server
    /// that never truncates a running replica's spaces.
    fn truncated<'a>(&'a self, space: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let _ = (space, after);
        Box::pin(async {})
    }
}

/// A running replica. Dropping it without [`Replica::shutdown`] aborts its tasks.
pub struct Replica {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    /// The address of the UDP socket `start` bound, to be free again when `shutdown` returns
    /// (`None` on an endpoint the caller built, which may not even be a real socket).
    bound: Option<SocketAddr>,
}

struct Shared {
    config: ReplicaConfig,
    node_id: NodeId,
    /// Random per `Replica`, sent in every hello ([`Hello::instance`]).
    instance: u64,
    store: WalStore,
    endpoint: quinn::Endpoint,
    hook: Option<Arc<dyn ApplyHook>>,
    spaces: Mutex<HashMap<SpaceId, Arc<SpaceState>>>,
    link: Mutex<LinkState>,
    ack_needed: Notify,
    /// Spaces whose durable or applied position may have moved since their last ack: the ack loop
    /// looks at these only, so an idle replica with 10,000 spaces does no work.
    unacked: Mutex<HashMap<SpaceId, Arc<SpaceState>>>,
    /// New spaces whose applier must start (only with a hook).
    new_appliers: mpsc::UnboundedSender<Arc<SpaceState>>,
}

struct SpaceState {
    wal: SpaceWal,
    applied: AtomicU64,
    /// Bumped by every new stream for the space: an older stream's task sees it and stops.
    generation: AtomicU64,
    catch_ups: AtomicU64,
    error: Mutex<Option<String>>,
    /// The log's suffix truncations counted when `applied` was set from it: the applier rolls
    /// back for every one after these.
    truncations_seen: AtomicU64,
}

struct LinkState {
    state: ConnectionState,
    conn: Option<Connection>,
    primary: Option<String>,
    epoch: Epoch,
    last_error: Option<String>,
    connections: u64,
    liveness: Option<Arc<Mutex<Liveness>>>,
    /// The current session's large frames in assembly.
    assembly: Option<Arc<AssemblyBudget>>,
}

/// What one connection knows of its primary.
#[derive(Clone)]
struct Session {
    conn: Connection,
    /// Data arriving counts as a sign of life too: a deep queue may delay heartbeats.
    liveness: Arc<Mutex<Liveness>>,
    primary_id: NodeId,
    epoch: Epoch,
    control: mpsc::UnboundedSender<ControlMessage>,
    /// Large frames being received or applied, held to twice the primary's announced credit.
    assembly: Arc<AssemblyBudget>,
}

impl Replica {
    /// Opens the WAL under `config.data_dir` and starts replicating from the primary.
    pub async fn start(config: ReplicaConfig, identity: NodeIdentity) -> Result<Replica, NetError> {
        Self::start_with_hook(config, identity, None).await
    }

    /// Like [`Replica::start`], handing every durable batch to `hook` before it counts as applied.
    pub async fn start_with_hook(
        config: ReplicaConfig,
        identity: NodeIdentity,
        hook: Option<Arc<dyn ApplyHook>>,
    ) -> Result<Replica, NetError> {
        config.validate()?;
        identity.check_configured_name("ReplicaConfig::name", &config.name)?;
        let endpoint = match config.listen {
            Some(addr) => endpoint::server_endpoint(addr, &identity, &config.transport)?,
            None => {
                let any: SocketAddr = match config.primary {
                    Some(p) if p.is_ipv6() => SocketAddr::from(([0u16; 8], 0)),
                    _ => SocketAddr::from(([0, 0, 0, 0], 0)),
                };
                endpoint::client_endpoint(any, &identity, &config.transport)?
            }
        };
        // Only a replica that listens (the primary dials it) has an address worth freeing.
        let bound = config.listen.and_then(|_| endpoint.local_addr().ok());
        match Self::with_endpoint(config, endpoint, hook).await {
            Ok(replica) => Ok(Replica { bound, ..replica }),
            Err(e) => {
                super::wait_released(bound).await;
                Err(e)
            }
        }
    }

    /// Starts on an endpoint built by the caller (a simulated link, a shared socket). It needs a
    /// default client config to dial, and a server config requiring client certificates to be dialed.
    pub async fn with_endpoint(
        config: ReplicaConfig,
        endpoint: quinn::Endpoint,
        hook: Option<Arc<dyn ApplyHook>>,
    ) -> Result<Replica, NetError> {
        config.validate()?;
        let store = open_store(&config.data_dir, &config.wal).await?;
        let mut spaces = HashMap::new();
        for wal in store.spaces() {
            spaces.insert(wal.space().clone(), Arc::new(SpaceState::new(wal)));
        }
        let (new_appliers, appliers_rx) = mpsc::unbounded_channel();
        if hook.is_some() {
            for s in spaces.values() {
                let _ = new_appliers.send(s.clone());
            }
        }
        // A replica never accepts a primary older than the newest epoch in its logs (a deposed one).
        let seen_epoch = store.spaces().iter().map(|w| w.last_epoch()).max().unwrap_or(Epoch(0));
        let shared = Arc::new(Shared {
            node_id: NodeId::from_name(&config.name),
            // Seeded by the OS's randomness, different for every `Replica`.
            instance: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8),
            config,
            store,
            endpoint,
            hook,
            spaces: Mutex::new(spaces),
            link: Mutex::new(LinkState {
                state: ConnectionState::Connecting,
                primary: None,
                epoch: seen_epoch,
                conn: None,
                last_error: None,
                connections: 0,
                liveness: None,
                assembly: None,
            }),
            ack_needed: Notify::new(),
            unacked: Mutex::new(HashMap::new()),
            new_appliers,
        });
        let mut tasks = JoinSet::new();
        if let Some(hook) = shared.hook.clone() {
            tasks.spawn(run_appliers(shared.clone(), hook, appliers_rx));
        }
        if let Some(addr) = shared.config.primary {
            tasks.spawn(dial_loop(shared.clone(), addr));
        }
        if shared.config.listen.is_some() {
            tasks.spawn(accept_loop(shared.clone()));
        }
        Ok(Replica { shared, tasks, bound: None })
    }

    /// The local address of the replica's endpoint.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }

    /// The replica's copy of a space, if it has one.
    pub fn space(&self, id: &SpaceId) -> Option<SpaceWal> {
        self.shared.store.get(id)
    }

    /// The WAL store holding every space.
    pub fn store(&self) -> &WalStore {
        &self.shared.store
    }

    /// Connection, positions and digests.
    pub fn status(&self) -> ReplicaStatus {
        let link = lock(&self.shared.link);
        let states: Vec<Arc<SpaceState>> = {
            let mut v: Vec<_> = lock(&self.shared.spaces).values().cloned().collect();
            v.sort_by(|a, b| a.wal.space().cmp(b.wal.space()));
            v
        };
        ReplicaStatus {
            role: "replica",
            name: self.shared.config.name.clone(),
            connection: link.state,
            primary: link.primary.clone(),
            epoch: link.epoch,
            rtt_ms: link.liveness.as_ref().and_then(|l| lock(l).rtt()).map(|d| d.as_secs_f64() * 1e3),
            primary_heartbeat: link.liveness.as_ref().and_then(|l| {
                let l = lock(l);
                let (epoch, summary) = l.peer();
                epoch.map(|epoch| PrimaryHeartbeat { epoch, summary, received: l.received() })
            }),
            reconnects: link.connections.saturating_sub(1),
            last_error: link.last_error.clone(),
            assembling_bytes: link.assembly.as_ref().map_or(0, |a| a.used() as u64),
            spaces: states
                .iter()
                .map(|s| {
                    let log = SpaceLog::of(&s.wal);
                    // Never past the log: a suffix truncation may have cut under it a moment ago.
                    let applied_seq = Seq(s.applied.load(Ordering::Acquire)).min(log.last_seq);
                    ReplicaSpace {
                        log,
                        applied_seq,
                        catch_ups: s.catch_ups.load(Ordering::Relaxed),
                        error: lock(&s.error).clone(),
                    }
                })
                .collect(),
        }
    }

    /// Closes the current connection to the primary, if any; the replica reconnects and resumes.
    pub fn disconnect(&self) -> bool {
        match lock(&self.shared.link).conn.take() {
            Some(conn) if conn.close_reason().is_none() => {
                conn.close(close::SHUTDOWN, b"disconnected by the replica");
                true
            }
            _ => false,
        }
    }

    /// Closes the connection, stops the tasks and syncs the WAL.
    pub async fn shutdown(self) {
        let Replica { shared, mut tasks, bound } = self;
        super::close_and_sync(&shared.endpoint, &mut tasks, &shared.store, b"replica shutting down").await;
        lock(&shared.link).state = ConnectionState::Stopped;
        drop((shared, tasks));
        super::wait_released(bound).await;
    }
}

impl SpaceState {
    fn new(wal: SpaceWal) -> SpaceState {
        let (last, truncations) = wal.last_seq_and_truncations();
        SpaceState {
            wal,
            applied: AtomicU64::new(last.0),
            generation: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            error: Mutex::new(None),
            truncations_seen: AtomicU64::new(truncations),
        }
    }
}

impl Shared {
    /// The state of space `id`, opening its WAL on first use. Creating (or recovering) a space's
    /// folder does file I/O, so that runs on a blocking thread.
    async fn space_state(&self, id: &SpaceId) -> Result<Arc<SpaceState>, NetError> {
        if let Some(s) = lock(&self.spaces).get(id) {
            return Ok(s.clone());
        }
        let (store, space) = (self.store.clone(), id.clone());
        let opened = tokio::task::spawn_blocking(move || store.space(&space)).await;
        let wal = opened.map_err(|e| NetError::Task(format!("opening space {id}: {e}")))??;
        let mut spaces = lock(&self.spaces);
        let state = spaces.entry(id.clone()).or_insert_with(|| {
            let state = Arc::new(SpaceState::new(wal));
            if self.hook.is_some() {
                let _ = self.new_appliers.send(state.clone());
            }
            state
        });
        Ok(state.clone())
    }

    /// Marks a space's positions as moved and wakes the ack loop.
    fn ack_later(&self, state: &Arc<SpaceState>) {
        lock(&self.unacked).insert(state.wal.space().clone(), state.clone());
        self.ack_needed.notify_one();
    }

    fn set_state(&self, state: ConnectionState, error: Option<String>) {
        let mut link = lock(&self.link);
        // A replica that both dials and listens runs two loops: one whose attempt failed must not
        // mark the session the other holds, still open, as disconnected.
        if state == ConnectionState::Disconnected && link.conn.as_ref().is_some_and(|c| c.close_reason().is_none()) {
            return;
        }
        link.state = state;
        if error.is_some() || state == ConnectionState::Connected {
            link.last_error = error;
        }
    }
}

/// Dials the primary, runs the session, and redials with backoff when it ends.
async fn dial_loop(shared: Arc<Shared>, addr: SocketAddr) {
    let backoff = Backoff::new(shared.config.reconnect_initial, shared.config.reconnect_max, shared.node_id.0);
    let name = shared.config.primary_name.clone();
    let session = |conn| run_session(&shared, conn);
    let ended = |reason: String, retry_in: Duration, attempt: u32| {
        tracing::info!(primary = %addr, error = %reason, ?retry_in, attempt, "not connected to the primary; retrying");
        shared.set_state(ConnectionState::Disconnected, Some(reason));
    };
    let dial_timeout = shared.config.transport.dial_timeout;
    super::redial(&shared.endpoint, addr, &name, dial_timeout, backoff, session, ended).await
}

/// Waits for the primary to dial (when the primary knows its replicas).
async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        match incoming.await {
            Ok(conn) => {
                let shared = shared.clone();
                // One session at a time: a newer dial from the primary waits in the endpoint's
                // queue until this one ends (the primary redials only once it lost this
                // connection, which this side notices within the heartbeat timeout).
                let result = run_session(&shared, conn).await;
                let reason = result.err().map(|e| e.to_string()).unwrap_or_else(|| "connection closed".into());
                shared.set_state(ConnectionState::Disconnected, Some(reason));
            }
            Err(e) => tracing::info!(error = %e, "refused a connection during the handshake"),
        }
    }
}

/// Runs one connection to the primary until it ends.
async fn run_session(shared: &Arc<Shared>, conn: Connection) -> Result<(), NetError> {
    let peer = tls::peer_name(&conn);
    if peer.as_deref() != Some(shared.config.primary_name.as_str()) {
        conn.close(close::UNAUTHORIZED, b"not the configured primary");
        return Err(NetError::Protocol(format!("peer is {peer:?}, expected primary {:?}", shared.config.primary_name)));
    }
    let (mut send, recv) = conn.open_bi().await?;
    let applied: HashMap<SpaceId, Seq> =
        lock(&shared.spaces).iter().map(|(id, s)| (id.clone(), Seq(s.applied.load(Ordering::Acquire)))).collect();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: shared.node_id,
        node_name: shared.config.name.clone(),
        epoch: lock(&shared.link).epoch,
        instance: shared.instance,
        max_batch_bytes: shared.config.limits.max_batch_bytes as u64,
        spaces: shared
            .store
            .spaces()
            .iter()
            .map(|w| {
                let durable = w.durable_seq().min(w.last_seq());
                SpacePosition {
                    space: w.space().clone(),
                    last_seq: w.last_seq(),
                    last_epoch: w.last_epoch(),
                    digest: w.digest(),
                    durable_seq: durable,
                    // A space without state yet counts as applied up to its log (see `ApplyHook`).
                    applied_seq: applied.get(w.space()).map_or(durable, |a| (*a).min(durable)),
                }
            })
            .collect(),
    };
    write_control(&mut send, &ControlMessage::Hello(hello)).await?;
    let mut control = ControlReader::new(recv, DEFAULT_MAX_CONTROL_BYTES);
    let welcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, control.read()).await {
        Err(_) => return Err(NetError::Timeout("welcome")),
        Ok(Ok(Some(ControlMessage::Welcome(w)))) => w,
        Ok(Ok(Some(ControlMessage::Error(e)))) => {
            return Err(NetError::Protocol(format!("primary refused: {:?}: {}", e.code, e.reason)))
        }
        Ok(Ok(other)) => return Err(NetError::Protocol(format!("expected welcome, got {other:?}"))),
        Ok(Err(e)) => return Err(e),
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        conn.close(close::PROTOCOL, b"unsupported protocol version");
        return Err(NetError::Protocol(format!("primary speaks protocol {}", welcome.protocol_version)));
    }
    let credit = usize::try_from(welcome.max_inflight_bytes).unwrap_or(usize::MAX);
    if credit > shared.config.max_assembly_bytes {
        conn.close(close::PROTOCOL, b"in-flight credit above this replica's max_assembly_bytes");
        return Err(NetError::Protocol(format!(
            "the primary keeps up to {credit} bytes of large frames in flight, above this replica's max_assembly_bytes {}: lower the primary's max_replica_inflight_bytes or raise it here",
            shared.config.max_assembly_bytes
        )));
    }
    let known_epoch = lock(&shared.link).epoch;
    if welcome.epoch < known_epoch {
        conn.close(close::PROTOCOL, b"stale epoch");
        return Err(NetError::Protocol(format!(
            "primary's epoch {} is older than {} seen before: refusing a deposed primary",
            welcome.epoch, known_epoch
        )));
    }
    let liveness =
        Arc::new(Mutex::new(Liveness::new(tokio::time::Instant::now().into_std(), shared.config.heartbeat.timeout)));
    // Twice the credit: a stream reset for a catch-up may still hold its partial frame here for a
    // moment after the primary took its credit back and sent new frames.
    let assembly = Arc::new(AssemblyBudget::new(credit.saturating_mul(2)));
    {
        let mut link = lock(&shared.link);
        link.primary = Some(welcome.primary_name.clone());
        link.epoch = welcome.epoch;
        link.connections += 1;
        link.liveness = Some(liveness.clone());
        link.conn = Some(conn.clone());
        link.assembly = Some(assembly.clone());
    }
    shared.set_state(ConnectionState::Connected, None);
    tracing::info!(primary = %welcome.primary_name, epoch = %welcome.epoch, "connected to the primary");

    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let session = Session {
        conn: conn.clone(),
        liveness: liveness.clone(),
        primary_id: welcome.primary_id,
        epoch: welcome.epoch,
        assembly,
        control: control_tx,
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(control_writer(send, control_rx));
    tasks.spawn(control_reader(shared.clone(), control, conn.clone()));
    tasks.spawn(ack_loop(shared.clone(), session.clone()));
    {
        let shared2 = shared.clone();
        tasks.spawn(heartbeat::run(
            conn.clone(),
            shared.config.heartbeat.clone(),
            liveness,
            welcome.epoch,
            move || store_summary(&shared2.store, 0),
        ));
    }
    let streams = {
        let shared = shared.clone();
        let session = session.clone();
        async move {
            let mut streams = JoinSet::new();
            loop {
                match session.conn.accept_uni().await {
                    Ok(recv) => {
                        streams.spawn(receive_stream(shared.clone(), session.clone(), recv));
                    }
                    Err(_) => return,
                }
                while streams.try_join_next().is_some() {}
            }
        }
    };
    tasks.spawn(streams);
    let reason = conn.closed().await;
    tasks.shutdown().await;
    Err(NetError::Connection(reason))
}

/// Reads the primary's error reports (a space diverged or truncated).
async fn control_reader(shared: Arc<Shared>, mut control: ControlReader, conn: Connection) {
    loop {
        match control.read().await {
            Ok(Some(ControlMessage::Error(e))) => {
                tracing::warn!(code = ?e.code, space = ?e.space, reason = %e.reason, "primary reports an error");
                // Never create a space on the peer's word: only record errors for spaces held here.
                let state = e.space.and_then(|s| lock(&shared.spaces).get(&s).cloned());
                match state {
                    Some(state) => *lock(&state.error) = Some(format!("{:?}: {}", e.code, e.reason)),
                    None => lock(&shared.link).last_error = Some(format!("{:?}: {}", e.code, e.reason)),
                }
            }
            Ok(Some(other)) => {
                tracing::warn!(?other, "unexpected control message from the primary; closing");
                conn.close(close::PROTOCOL, b"unexpected control message");
                return;
            }
            Ok(None) => {
                // Without a control stream no error can come: the session cannot go on.
                conn.close(close::PROTOCOL, b"control stream finished");
                return;
            }
            Err(NetError::Connection(_)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad control message from the primary; closing");
                conn.close(close::PROTOCOL, b"bad control message");
                return;
            }
        }
    }
}

/// Sends acks for every space whose durable or applied position moved: right after a batch lands,
/// and at least every `ack_interval` while a space waits for durability (under an interval policy it
/// advances in the background).
async fn ack_loop(shared: Arc<Shared>, session: Session) {
    let mut last: HashMap<SpaceId, (Seq, Seq)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shared.ack_needed.notified() => {}
            _ = tokio::time::sleep(shared.config.ack_interval) => {}
        }
        let candidates: Vec<Arc<SpaceState>> = lock(&shared.unacked).values().cloned().collect();
        let mut spaces = Vec::new();
        for s in candidates {
            let durable = s.wal.durable_seq();
            let applied = Seq(s.applied.load(Ordering::Acquire)).min(durable);
            if last.get(s.wal.space()) != Some(&(durable, applied)) {
                last.insert(s.wal.space().clone(), (durable, applied));
                spaces.push(SpaceAck { space: s.wal.space().clone(), durable, applied });
            }
            if durable >= s.wal.last_seq() && applied == durable {
                // Settled: nothing more to report until the next batch puts it back. A batch stores
                // `applied` before it inserts the space, so seeing the acked values unchanged under
                // the lock means any newer batch will insert it again after this removal.
                let mut unacked = lock(&shared.unacked);
                let now = (s.wal.durable_seq(), Seq(s.applied.load(Ordering::Acquire)));
                if now == (durable, applied) {
                    unacked.remove(s.wal.space());
                }
            }
        }
        if !spaces.is_empty() && session.control.send(ControlMessage::Ack(Ack { spaces })).is_err() {
            return;
        }
    }
}

/// Why a stream's reception stopped.
enum StreamEnd {
    /// The primary finished or reset the stream, or a newer stream took over.
    Done,
    /// The space needs a catch-up from its last durable sequence.
    CatchUp(String),
    /// This node cannot store the space right now (disk full, I/O error): the primary retries
    /// after a pause instead of resending at once.
    LocalFailure(String),
}

/// Receives one data stream: a space's own, or (single-stream mode) the multiplexed one.
async fn receive_stream(shared: Arc<Shared>, session: Session, mut recv: RecvStream) {
    match read_stream_kind(&mut recv).await {
        Ok((magic, StreamKind::Space)) => receive_space_stream(shared, session, recv, magic).await,
        Ok((magic, StreamKind::Mux)) => {
            if let Err(e) = receive_mux_stream(&shared, &session, &mut recv, magic).await {
                tracing::warn!(error = %e, "bad multiplexed stream; closing the connection to resume cleanly");
                session.conn.close(close::PROTOCOL, b"bad frame on the multiplexed stream");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "unknown data stream; stopping it");
            let _ = recv.stop(stream_code::BAD_FRAME);
        }
    }
}

/// Receives one space's stream: validate, append, sync, apply, ack; on a bad frame or a gap, stop
/// the stream and ask for catch-up from the last sequence held.
async fn receive_space_stream(shared: Arc<Shared>, session: Session, mut recv: RecvStream, magic: [u8; 4]) {
    let header = match read_stream_header_rest(&mut recv, magic).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "bad stream header; stopping the stream");
            let _ = recv.stop(stream_code::BAD_FRAME);
            return;
        }
    };
    let state = match shared.space_state(&header.space).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(space = %header.space, error = %e, "cannot open the space's WAL; stopping its stream");
            lock(&shared.link).last_error = Some(e.to_string());
            let _ = recv.stop(stream_code::LOCAL_FAILURE);
            return;
        }
    };
    let generation = state.generation.fetch_add(1, Ordering::AcqRel) + 1;
    *lock(&state.error) = None;
    let end = receive_batches(&shared, &session, &state, generation, header.start_seq, &mut recv).await;
    match end {
        StreamEnd::Done => {}
        StreamEnd::CatchUp(reason) => {
            let from = state.wal.last_seq().next();
            tracing::info!(space = %header.space, %from, %reason, "asking the primary for catch-up");
            state.catch_ups.fetch_add(1, Ordering::Relaxed);
            let _ = recv.stop(stream_code::CATCH_UP);
            let _ = session.control.send(ControlMessage::CatchUp(CatchUp {
                space: header.space.clone(),
                from_seq: from,
                reason,
            }));
        }
        StreamEnd::LocalFailure(reason) => {
            tracing::error!(space = %header.space, %reason, "cannot store the space; the primary will retry");
            *lock(&state.error) = Some(reason);
            let _ = recv.stop(stream_code::LOCAL_FAILURE);
        }
    }
}

async fn receive_batches(
    shared: &Shared,
    session: &Session,
    state: &Arc<SpaceState>,
    generation: u64,
    start: Seq,
    recv: &mut RecvStream,
) -> StreamEnd {
    let wal = &state.wal;
    if start > wal.last_seq().next() {
        return StreamEnd::CatchUp(format!("stream starts at {start} but the log ends at {}", wal.last_seq()));
    }
    let mut decoder = BatchDecoder::new(shared.config.limits);
    loop {
        let (batch, _assembling) = match read_batch(recv, &mut decoder, &session.assembly).await {
            Ok(Some(b)) => b,
            Ok(None) => return StreamEnd::Done,
            // Behind a valid header CRC: the primary really sends frames this large, although the
            // hello announced this replica's limit. Asking again at once would get the same frame,
            // for ever: pause the stream (a local failure) and say why.
            Err(NetError::Decode(e @ crate::codec::DecodeError::TooLarge { .. })) => {
                return StreamEnd::LocalFailure(format!(
                    "frame refused ({e}): the primary ignores the limits.max_batch_bytes this replica announced"
                ))
            }
            Err(NetError::Decode(e)) => return StreamEnd::CatchUp(format!("bad frame: {e}")),
            Err(NetError::Protocol(reason)) => {
                tracing::warn!(space = %wal.space(), %reason, "closing the connection");
                session.conn.close(close::PROTOCOL, b"frames beyond the in-flight credit");
                return StreamEnd::Done;
            }
            Err(e) => {
                tracing::debug!(space = %wal.space(), error = %e, "stream ended");
                return StreamEnd::Done;
            }
        };
        lock(&session.liveness).on_activity(tokio::time::Instant::now().into_std());
        if state.generation.load(Ordering::Acquire) != generation {
            return StreamEnd::Done;
        }
        match apply_batch(shared, session, state, batch).await {
            Ok(()) => {}
            Err(Reject::CatchUp(reason)) => return StreamEnd::CatchUp(reason),
            Err(Reject::Local(reason)) => return StreamEnd::LocalFailure(reason),
            Err(Reject::Diverged(reason)) => {
                tracing::error!(space = %wal.space(), %reason, "the primary's log diverges from ours; stopping this space");
                *lock(&state.error) = Some(reason.clone());
                let _ = session.control.send(ControlMessage::Error(ErrorMessage {
                    code: ErrorCode::Diverged,
                    space: Some(wal.space().clone()),
                    reason,
                }));
                return StreamEnd::Done;
            }
        }
    }
}

/// Receives the multiplexed stream of single-stream mode: (stream header, frame) pairs of any space.
/// QUIC delivers it intact and in order, so any invalid frame is a protocol error for the connection.
async fn receive_mux_stream(
    shared: &Shared,
    session: &Session,
    recv: &mut RecvStream,
    magic: [u8; 4],
) -> Result<(), NetError> {
    read_mux_preamble_rest(recv, magic).await?;
    let mut decoder = BatchDecoder::new(shared.config.limits);
    while let Some(header) = read_mux_header(recv).await? {
        let (batch, _assembling) = read_batch(recv, &mut decoder, &session.assembly)
            .await?
            .ok_or(NetError::UnexpectedEnd("multiplexed frame"))?;
        if batch.header.start_seq != header.start_seq {
            return Err(NetError::Protocol(format!(
                "mux header says {} starts at {}, the frame at {}",
                header.space, header.start_seq, batch.header.start_seq
            )));
        }
        let state = shared.space_state(&header.space).await?;
        match apply_batch(shared, session, &state, batch).await {
            Ok(()) => {}
            Err(Reject::CatchUp(reason) | Reject::Diverged(reason) | Reject::Local(reason)) => {
                *lock(&state.error) = Some(reason.clone());
                return Err(NetError::Protocol(format!("space {}: {reason}", header.space)));
            }
        }
    }
    Ok(())
}

/// Batches at least this large are appended on a blocking thread: writing them takes long enough
/// (hundreds of microseconds) to starve the endpoint's socket reads; smaller ones are cheaper inline
/// than a thread hand-off.
const BLOCKING_APPEND_BYTES: u32 = 256 * 1024;

/// Why a batch was not applied.
enum Reject {
    /// Lost or bad data: ask again from the last sequence held.
    CatchUp(String),
    /// The primary's entries conflict with ours: stop the space.
    Diverged(String),
    /// This node failed to store the batch.
    Local(String),
}

/// Validates a decoded batch against the session and the local log, appends it, makes it durable per
/// the policy, hands the new entries to the apply hook, and schedules an ack.
async fn apply_batch(
    shared: &Shared,
    session: &Session,
    state: &Arc<SpaceState>,
    batch: DecodedBatch,
) -> Result<(), Reject> {
    let wal = &state.wal;
    let h = &batch.header;
    if h.primary != session.primary_id || h.space_tag != space_tag(wal.space()) || h.epoch > session.epoch {
        return Err(Reject::CatchUp(format!(
            "batch from primary {:?} for space tag {:#x} in epoch {} does not belong here",
            h.primary, h.space_tag, h.epoch
        )));
    }
    let last_before = wal.last_seq();
    if h.start_seq > last_before.next() {
        return Err(Reject::CatchUp(format!("gap: batch starts at {} but the log ends at {last_before}", h.start_seq)));
    }
    if h.last_seq() <= last_before {
        return Ok(()); // Already held (a resent batch after a catch-up race).
    }
    // An fsync, the write of a large batch or a new segment file blocks: keep it off the runtime's
    // threads, which must keep draining the UDP socket (a stalled endpoint drops packets at the socket).
    let blocking = matches!(shared.config.wal.sync, SyncPolicy::Always)
        || h.uncompressed_len >= BLOCKING_APPEND_BYTES
        || wal.append_would_roll(&batch.entries);
    let result = if blocking {
        let (wal2, entries) = (wal.clone(), batch.entries);
        match tokio::task::spawn_blocking(move || wal2.append_decoded(&entries)).await {
            Ok(r) => r,
            Err(e) => return Err(Reject::Local(format!("append task failed: {e}"))),
        }
    } else {
        wal.append_decoded(&batch.entries)
    };
    match result {
        Ok(_) => {}
        Err(e @ WalError::Conflict { .. }) => return Err(Reject::Diverged(e.to_string())),
        // Bad entries were caught by the decoder; what is left is this node's own failure.
        Err(e @ (WalError::BadChecksum { .. } | WalError::Gap { .. })) => return Err(Reject::CatchUp(e.to_string())),
        Err(e) => return Err(Reject::Local(format!("local append failed: {e}"))),
    }
    // With a hook, the space's applier picks the entries up from the WAL once durable; without
    // one, an entry counts as applied as soon as it is stored.
    if shared.hook.is_none() {
        state.applied.fetch_max(h.last_seq().0, Ordering::AcqRel);
    }
    shared.ack_later(state);
    Ok(())
}

/// After a suffix truncation of the space's log (the `truncations` count moved), rolls what was
/// applied back to the cut if it went past it, telling the hook ([`ApplyHook::truncated`]): the
/// log holds other entries there now. True if there was a truncation to take in.
async fn roll_back_if_cut(
    shared: &Shared,
    hook: &dyn ApplyHook,
    state: &Arc<SpaceState>,
    truncations: &mut u64,
) -> bool {
    let now = state.wal.truncations();
    if now == *truncations {
        return false;
    }
    if let Some(cut) = state.wal.cut_since(*truncations) {
        if Seq(state.applied.load(Ordering::Acquire)) > cut {
            tracing::warn!(space = %state.wal.space(), %cut, "log cut back under applied entries; the hook rolls back");
            hook.truncated(state.wal.space(), cut).await;
            state.applied.store(cut.0, Ordering::Release);
            shared.ack_later(state);
        }
    }
    *truncations = now;
    // A restarted applier (after a panicking hook) starts from here.
    state.truncations_seen.store(now, Ordering::Release);
    true
}

/// Runs one applier per space (the hook's caller), for the replica's whole life.
async fn run_appliers(shared: Arc<Shared>, hook: Arc<dyn ApplyHook>, mut rx: mpsc::UnboundedReceiver<Arc<SpaceState>>) {
    let mut appliers = JoinSet::new();
    let mut by_task: HashMap<tokio::task::Id, Arc<SpaceState>> = HashMap::new();
    loop {
        tokio::select! {
            state = rx.recv() => {
                let Some(state) = state else { return };
                let task = appliers.spawn(apply_space(shared.clone(), hook.clone(), state.clone(), false));
                by_task.insert(task.id(), state);
            }
            Some(joined) = appliers.join_next_with_id(), if !appliers.is_empty() => {
                let (id, failure) = match joined {
                    Ok((id, ())) => (id, None),
                    Err(e) => (e.id(), e.is_panic().then_some(e)),
                };
                let Some(state) = by_task.remove(&id) else { continue };
                // An applier that ended otherwise (its log closed) has nothing left to apply.
                let Some(e) = failure else { continue };
                // Its hook panicked: say so, and apply the same entries again after a pause
                // rather than leave the space unapplied for ever.
                let from = Seq(state.applied.load(Ordering::Acquire)).next();
                let msg = format!("{APPLY_FAILED} ({e}); applying again from {from} in {APPLY_RETRY:?}");
                tracing::error!(space = %state.wal.space(), "{msg}");
                *lock(&state.error) = Some(msg);
                let (shared, hook, again) = (shared.clone(), hook.clone(), state.clone());
                let task = appliers.spawn(async move {
                    tokio::time::sleep(APPLY_RETRY).await;
                    apply_space(shared, hook, again, true).await
                });
                by_task.insert(task.id(), state);
            }
        }
    }
}

/// How a space's status error starts while its hook is failing (cleared by the next success).
const APPLY_FAILED: &str = "apply hook panicked";
/// Pause before a space whose hook panicked is applied again.
const APPLY_RETRY: Duration = Duration::from_secs(1);
/// Most entries handed to the hook in one call.
const APPLY_BATCH_ENTRIES: usize = 4096;
/// Most entry bytes handed to the hook in one call.
const APPLY_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Hands a space's durable entries to the hook, in order, each exactly once, from `applied + 1`.
/// `after_panic`: the previous applier's hook panicked, and the space's error says so until a
/// call succeeds.
async fn apply_space(shared: Arc<Shared>, hook: Arc<dyn ApplyHook>, state: Arc<SpaceState>, mut after_panic: bool) {
    let wal = state.wal.clone();
    // Only a policy that lags durability needs to watch it (a receiver costs every append a wake).
    let mut durable_rx = (!matches!(shared.config.wal.sync, SyncPolicy::Never)).then(|| wal.subscribe_durable());
    let mut truncations = state.truncations_seen.load(Ordering::Acquire);
    loop {
        if roll_back_if_cut(&shared, hook.as_ref(), &state, &mut truncations).await {
            continue;
        }
        let applied = Seq(state.applied.load(Ordering::Acquire));
        let next = applied.next();
        // Both waits also end on a suffix truncation: `wait_for_or_cut` on any since the last look,
        // and the durable one because the position then drops below what was applied (it never
        // does otherwise).
        wal.wait_for_or_cut(next, Some(truncations)).await;
        if let Some(rx) = durable_rx.as_mut() {
            if rx.wait_for(|d| *d >= next || *d < applied).await.is_err() {
                return;
            }
        }
        // Only durable entries are applied: read no further than them.
        let durable = wal.durable_seq();
        let want = APPLY_BATCH_ENTRIES.min(durable.0.saturating_sub(next.0).saturating_add(1) as usize);
        let read = read_entries(&wal, next, want, APPLY_BATCH_BYTES).await;
        // A truncation during the read may have mixed old and new entries: read again.
        if roll_back_if_cut(&shared, hook.as_ref(), &state, &mut truncations).await {
            continue;
        }
        let mut entries = match read {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(space = %wal.space(), error = %e, "cannot read entries to apply; retrying");
                *lock(&state.error) = Some(format!("apply: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // A read returns at least one entry, which may be past `durable` if that lags the wake-up.
        entries.retain(|e| e.seq <= durable);
        let Some(last) = entries.last().map(|e| e.seq) else { continue };
        hook.apply(wal.space(), &entries).await;
        state.applied.store(last.0, Ordering::Release);
        if after_panic {
            let mut error = lock(&state.error);
            if error.as_deref().is_some_and(|e| e.starts_with(APPLY_FAILED)) {
                *error = None;
            }
            after_panic = false;
        }
        shared.ack_later(&state);
    }
}
