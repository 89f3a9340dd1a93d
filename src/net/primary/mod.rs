//! The primary: serves its spaces' WALs to every replica over one QUIC connection per replica.
//!
//! Per connection: the replica opens the control stream and says hello; the primary answers with a
//! welcome and starts one shipper task per space, each writing batch frames to its own uni stream,
//! so a space blocked by flow control or loss never holds up another. Shippers read the WAL (its
//! memory tail for live data, its segments for catch-up) and never touch the write path: writers
//! append to the WAL and return, whatever the replicas do.
//!
//! - this module: the [`Primary`] handle (start, append, status, `wait_durable`,
//!   `durable_everywhere`, `forget_replica`, `disconnect_replica`, shutdown);
//! - [`session`]: one replica connection: handshake, control stream, starting the shippers;
//! - [`shipper`]: one (space, replica) stream: batching, flow control, credit, catch-up restarts;
//! - [`known`]: the known replicas and their positions, kept on disk across restarts.

pub(crate) mod known;
mod session;
mod shipper;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::codec::batch::ENTRY_HEADER_LEN;
use crate::config::PrimaryConfig;
use crate::entry::now_us;
use crate::net::error::NetError;
use crate::net::status::{PathStats, PrimaryStatus, ReplicaView, SpaceLog, SpaceReplication, TrafficTotals};
use crate::net::tls::NodeIdentity;
use crate::net::{close, endpoint, lock, open_store};
use crate::protocol::health::Health;
use crate::protocol::progress::Lag;
use crate::types::{EntryKind, NodeId, Seq, SpaceId};
use crate::wal::{SpaceWal, WalError, WalStore};
use known::{Floor, Floors, Known};
use session::{accept_loop, dial_loop, Session};
use shipper::SpaceShip;

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
    /// Every replica known (served, or kept in [`known`] from before a restart, and not
    /// forgotten). Lock order: this, then a link's `earlier`, then its `current`, then its `floor`.
    replicas: Mutex<BTreeMap<String, Arc<ReplicaLink>>>,
    /// Held while the known replicas are written to disk, so the last write is of the newest state.
    keeping_known: Mutex<()>,
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
    /// Where the replica stood in each space before `current` (kept from before a restart,
    /// earlier connections' acks, lowered to what `current`'s hello said): what retention counts
    /// for a space `current` has not set up.
    floor: Mutex<Floors>,
    /// The most the replica holds per space, from the hellos of processes refused under its name
    /// while `current` was alive (the replica restarted on an empty disk, or an impostor): a
    /// bound on everything above until a connection registers. Lock order: after `floor`.
    cap: Mutex<BTreeMap<SpaceId, Seq>>,
}

impl ReplicaLink {
    fn new(floor: Floors) -> ReplicaLink {
        ReplicaLink {
            current: Mutex::new(None),
            connections: AtomicU64::new(0),
            earlier: Mutex::new(TrafficTotals::default()),
            floor: Mutex::new(floor),
            cap: Mutex::new(BTreeMap::new()),
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
        let (dir, logs) = (config.data_dir.clone(), store.clone());
        let known = tokio::task::spawn_blocking(move || known::read(&dir).map(|known| known.floors(&logs)));
        let known = known.await.map_err(|e| NetError::Task(format!("reading the known replicas: {e}")))??;
        let replicas = known.into_iter().map(|(name, floors)| (name, Arc::new(ReplicaLink::new(floors)))).collect();
        let shared = Arc::new(Shared {
            node_id: NodeId::from_name(&config.name),
            config,
            store,
            endpoint,
            replicas: Mutex::new(replicas),
            keeping_known: Mutex::new(()),
            sessions: AtomicU64::new(0),
            acked: Notify::new(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone()));
        for replica in shared.config.dial_replicas.clone() {
            tasks.spawn(dial_loop(shared.clone(), replica.name, replica.addr));
        }
        let addr = shared.endpoint.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
        tracing::info!(name = %shared.config.name, %addr, "primary started");
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
        let replicas = self.shared.links().into_iter().map(|(name, link)| self.replica_view(name, &link)).collect();
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
        // A space that will not be shipped until something else happens (refused, reported
        // diverged, in need of a snapshot); a retrying one shows in its lag.
        let mut stopped = false;
        for wal in self.shared.store.spaces() {
            let head = wal.last_seq();
            let ship = session.as_ref().and_then(|s| lock(&s.spaces).get(wal.space()).cloned());
            stopped |= ship
                .as_ref()
                .is_some_and(|s| s.refused.is_some() || s.halted.load(Ordering::Acquire) || s.needs_snapshot());
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
                    let per_entry = newest_entry_bytes(&wal);
                    let lag = lock(&ship.progress).lag(head, age, per_entry);
                    (sent, durable, applied, lag, inflight, lock(&ship.error).clone())
                }
                // Not compared with the replica's copy on this connection yet (a new connection
                // compares its spaces in chunks; a restarted primary has none until the replica
                // is back): where it stood before, as retention counts it, so the replica is not
                // reported healthy.
                None => {
                    let floor = lock(&link.floor).get(wal.space()).copied();
                    let durable = floor.and_then(|f| f.held(Some(&wal))).unwrap_or(Seq::ZERO).min(head);
                    // Its age from the memory tail only: a status must not read the disk for every
                    // space of every replica away (dated by the tail's first entry when the one
                    // missing is older: a lower bound).
                    let ms = match head > durable {
                        true => wal.appended_after_in_memory(durable).map_or(0, |t| now.saturating_sub(t) / 1_000),
                        false => 0,
                    };
                    let lag = Lag {
                        entries: head.0 - durable.0,
                        bytes: (head.0 - durable.0).saturating_mul(newest_entry_bytes(&wal)),
                        ms,
                    };
                    (Seq::ZERO, durable, Seq::ZERO, lag, 0, None)
                }
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
            stopped,
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
        self.ships_of(space)
            .into_iter()
            .filter(|(_, _, ship)| ship.as_ref().is_some_and(|ship| ship.durable_in_log() >= seq))
            .map(|(name, _, _)| name)
            .collect()
    }

    /// Each known replica with the shipper of `space` of its latest connection (`None` if that
    /// connection has not set the space up, or there is none since a restart).
    fn ships_of(&self, space: &SpaceId) -> Vec<(String, Arc<ReplicaLink>, Option<Arc<SpaceShip>>)> {
        self.shared
            .links()
            .into_iter()
            .map(|(name, link)| {
                let session = lock(&link.current).clone();
                let ship = session.and_then(|s| lock(&s.spaces).get(space).cloned());
                (name, link, ship)
            })
            .collect()
    }

    /// The last entry of `space` durable on every known replica, for retention: trimming the log
    /// up to it (`primary.space(id)?.truncate_prefix(seq)`) never removes an entry one of them
    /// still needs, which would leave that replica to be rebuilt from a snapshot (`Truncated`).
    /// A disconnected replica counts with what it acked last, until [`Primary::forget_replica`];
    /// a replica whose copy of the space must be rebuilt from a snapshot anyway does not count.
    /// `None` if no replica counts (none ever connected, all forgotten, or all need a snapshot).
    /// Replicas are known across restarts
    /// (`<data_dir>/replicas+known`): one not back yet counts with where it stood when last seen,
    /// or lower after a crash.
    pub fn durable_everywhere(&self, space: &SpaceId) -> Option<Seq> {
        let wal = self.shared.store.get(space);
        self.ships_of(space)
            .into_iter()
            .filter_map(|(_, link, ship)| {
                let held = match ship {
                    // Not (yet) shipped to it on this connection: where it stood before, if
                    // known; it may need the whole log.
                    None => lock(&link.floor).get(space).map_or(Some(Seq::ZERO), |f| f.held(wal.as_ref())),
                    // It lacks entries retention already removed: only a snapshot helps it.
                    Some(ship) if ship.needs_snapshot() => None,
                    Some(ship) => Some(ship.durable_in_log()),
                };
                held.map(|seq| lock(&link.cap).get(space).map_or(seq, |cap| seq.min(*cap)))
            })
            .min()
    }

    /// Forgets replica `name` (a decommissioned one): [`Primary::durable_everywhere`] no longer
    /// waits for it and its status is no longer reported. Refused (false) while it is connected;
    /// if it connects again later, it is known again from then on.
    pub fn forget_replica(&self, name: &str) -> bool {
        let forgotten = {
            let mut replicas = lock(&self.shared.replicas);
            let connected = replicas
                .get(name)
                .and_then(|link| lock(&link.current).clone())
                .is_some_and(|s| s.conn.close_reason().is_none());
            !connected && replicas.remove(name).is_some()
        };
        if forgotten {
            // Off the caller's thread when there is a runtime: this is a file write and an fsync.
            // If it is lost to a crash, the replica is known again after the restart: retention
            // waits for it until it is forgotten again.
            let shared = self.shared.clone();
            let keep = move || {
                if let Err(e) = shared.keep_known() {
                    tracing::warn!(error = %e, "cannot keep the known replicas after forgetting one");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(keep)),
                Err(_) => keep(),
            }
        }
        forgotten
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

    /// Closes every connection, stops the tasks, syncs the WAL and keeps the replicas' last
    /// positions for the next start.
    pub async fn shutdown(self) {
        let Primary { shared, mut tasks, bound } = self;
        super::close_and_sync(&shared.endpoint, &mut tasks, &shared.store, b"primary shutting down").await;
        if let Err(e) = keep_known_off_thread(shared.clone()).await {
            tracing::warn!(error = %e, "cannot keep the known replicas at shutdown");
        }
        drop((shared, tasks));
        super::wait_released(bound).await;
    }
}

impl Shared {
    /// Every known replica, by name.
    fn links(&self) -> Vec<(String, Arc<ReplicaLink>)> {
        lock(&self.replicas).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every known replica with where it stands in each space: its latest connection's acks, and
    /// for a space that connection has not set up, where it stood before.
    fn floors(&self) -> Vec<(String, Floors)> {
        let mut all = Vec::new();
        for (name, link) in self.links() {
            let mut floors = lock(&link.floor).clone();
            let session = lock(&link.current).clone();
            if let Some(session) = session {
                floors.extend(session.floors());
            }
            // A space missing counts as 0 already.
            for (space, cap) in lock(&link.cap).iter() {
                if let Some(Floor::At { seq, .. }) = floors.get_mut(space) {
                    *seq = (*seq).min(*cap);
                }
            }
            all.push((name, floors));
        }
        all
    }

    /// Writes the known replicas to disk. Blocking: call it from a blocking thread.
    fn keep_known(&self) -> Result<(), WalError> {
        let _one = lock(&self.keeping_known);
        known::write(&self.config.data_dir, &Known::of(&self.store, self.floors()))
    }
}

/// [`Shared::keep_known`] on a blocking thread.
async fn keep_known_off_thread(shared: Arc<Shared>) -> Result<(), NetError> {
    let kept = tokio::task::spawn_blocking(move || shared.keep_known()).await;
    Ok(kept.map_err(|e| NetError::Task(format!("keeping the known replicas: {e}")))??)
}

/// Age in ms of the first entry after `durable`, 0 if there is none. If retention removed it,
/// the first entry left dates it (a lower bound: the entry missing is older).
fn oldest_age_ms(wal: &SpaceWal, durable: Seq, now_us: u64) -> u64 {
    if wal.last_seq() <= durable {
        return 0;
    }
    match wal.read_from(durable.next().max(wal.first_seq()), 1, 0) {
        Ok(v) => v.first().map(|e| now_us.saturating_sub(e.timestamp_us) / 1_000).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Size of the space's newest entry on the wire (its header included): the estimate a lag in bytes
/// uses for each entry not sent yet.
fn newest_entry_bytes(wal: &SpaceWal) -> u64 {
    match wal.read_from(wal.last_seq(), 1, 0) {
        Ok(v) => v.first().map(|e| (e.payload.len() + ENTRY_HEADER_LEN) as u64).unwrap_or(0),
        Err(_) => 0,
    }
}
