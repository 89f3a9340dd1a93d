//! The replica: keeps one connection to its primary (dialing with backoff, or accepting the
//! primary's dial), receives every space on its own stream, and for each batch validates, appends to
//! its WAL, makes it durable per its policy, hands it to the apply hook, and acks.
//!
//! - this module: the [`Replica`] handle (start, status, shutdown) and the state its tasks share;
//! - [`session`]: one connection to the primary: dialing or accepting it, the hello, acks;
//! - [`receive`]: the data streams: reading, validating and appending each batch;
//! - [`apply`]: the [`ApplyHook`] and the per-space appliers that call it, each entry once.

mod apply;
mod fence;
mod receive;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quinn::Connection;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::config::ReplicaConfig;
use crate::net::error::NetError;
use crate::net::framed::AssemblyBudget;
use crate::net::status::{ConnectionState, PrimaryHeartbeat, ReplicaSpace, ReplicaStatus, SpaceLog};
use crate::net::tls::NodeIdentity;
use crate::net::{close, endpoint, lock, open_store};
use crate::protocol::liveness::Liveness;
use crate::protocol::stream_order::StreamOrder;
use crate::types::{Epoch, NodeId, Seq, SpaceId};
use crate::wal::{SpaceWal, WalStore};
use apply::run_appliers;
pub use apply::ApplyHook;
use session::{accept_loop, dial_loop};

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
    /// Random per `Replica`, sent in every hello ([`Hello::instance`](crate::codec::control::Hello::instance)).
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
    /// Sessions started so far: tells their streams apart ([`SpaceState::streams`]).
    sessions: AtomicU64,
}

struct SpaceState {
    wal: SpaceWal,
    applied: AtomicU64,
    /// The last entry handed to the hook, applied or not: above `applied` only after a call that
    /// panicked, whose entries the hook may have partly applied (a cut under them must be told).
    handed: AtomicU64,
    /// The space's current stream: each new stream takes over, and the task of the one it
    /// replaced sees that and stops; one the primary had given up is dropped ([`StreamOrder`]).
    streams: Mutex<StreamOrder>,
    catch_ups: AtomicU64,
    error: Mutex<Option<String>>,
    /// The log's suffix truncations counted when `applied` was set from it: the applier rolls
    /// back for every one after these.
    truncations_seen: AtomicU64,
    /// The space's log was set aside as damaged and the hook not yet told: it hears
    /// `truncated(Seq(0))` just before the first entries fetched again are applied.
    reset_pending: AtomicBool,
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
        // The data folder's start-time housekeeping, off the runtime's threads (file I/O).
        let (dir, opened, has_hook) = (config.data_dir.clone(), store.clone(), hook.is_some());
        let prepared = tokio::task::spawn_blocking(move || prepare(&dir, &opened, has_hook)).await;
        let (spaces, seen_epoch) =
            prepared.map_err(|e| NetError::Task(format!("preparing the data folder: {e}")))??;
        let (new_appliers, appliers_rx) = mpsc::unbounded_channel();
        if hook.is_some() {
            for s in spaces.values() {
                let _ = new_appliers.send(s.clone());
            }
        }
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
            sessions: AtomicU64::new(0),
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
            set_aside: self.shared.store.set_aside().to_vec(),
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
                        reset_pending: s.reset_pending.load(Ordering::Acquire),
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

/// The replica's spaces as the data folder `dir` holds them (a set-aside space's reset pending if
/// a hook is there to be told), and the newest epoch it saw; removes what a former primary kept
/// there. Blocking: file I/O.
fn prepare(
    dir: &Path,
    store: &WalStore,
    has_hook: bool,
) -> Result<(HashMap<SpaceId, Arc<SpaceState>>, Epoch), NetError> {
    let mut spaces = HashMap::new();
    for wal in store.spaces() {
        let set_aside = store.set_aside().iter().any(|s| &s.space == wal.space());
        let state = match set_aside {
            true if has_hook && wal.first_seq() == Seq(1) => SpaceState::set_aside(wal),
            // No hook, no state built from the old log: nothing to reset. Or a log that no
            // longer starts at 1, trimmed since it was fetched again: the reset was made (only
            // its marker stayed, `reset_done` having failed), and cannot be made again anyway.
            true => {
                if has_hook {
                    tracing::warn!(space = %wal.space(), first = %wal.first_seq(), "a set-aside space's reset marker outlived its log's start; taking the reset as made");
                }
                store.reset_done(wal.space())?;
                SpaceState::new(wal)
            }
            false => SpaceState::new(wal),
        };
        spaces.insert(state.wal.space().clone(), Arc::new(state));
    }
    // A replica never accepts a primary older than the newest epoch it saw (a deposed one): in
    // its logs, or accepted before (kept apart, since a set-aside space takes its entries away).
    let logs_epoch = store.spaces().iter().map(|w| w.last_epoch()).max().unwrap_or(Epoch(0));
    let kept_epoch = fence::read(dir)?;
    // Logs written before the fence was kept (an older release) carry it alone: keep it now,
    // before a set-aside space can take it away.
    if logs_epoch > kept_epoch {
        fence::raise(dir, logs_epoch)?;
    }
    // What this node kept of its replicas as a primary is wrong by the time it is one again
    // (a failover cuts logs back): a replica keeps none.
    crate::net::primary::known::forget_all(dir)?;
    Ok((spaces, logs_epoch.max(kept_epoch)))
}

impl SpaceState {
    fn new(wal: SpaceWal) -> SpaceState {
        let (last, truncations) = wal.last_seq_and_truncations();
        SpaceState {
            wal,
            applied: AtomicU64::new(last.0),
            handed: AtomicU64::new(last.0),
            streams: Mutex::new(StreamOrder::default()),
            catch_ups: AtomicU64::new(0),
            error: Mutex::new(None),
            truncations_seen: AtomicU64::new(truncations),
            reset_pending: AtomicBool::new(false),
        }
    }

    /// A space whose log was set aside as damaged: the hook's state starts again from nothing,
    /// so every entry of the new log goes to the hook from 1, after `truncated(Seq(0))`, even
    /// those fetched before a restart.
    fn set_aside(wal: SpaceWal) -> SpaceState {
        let state = SpaceState::new(wal);
        state.applied.store(0, Ordering::Release);
        state.handed.store(0, Ordering::Release);
        state.reset_pending.store(true, Ordering::Release);
        state
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
