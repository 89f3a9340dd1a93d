//! One connection to the primary: dialing or accepting it, the hello and its answer, the control
//! stream (acks out, error reports in), and the data streams it accepts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Connection;
use tokio::task::JoinSet;

use super::receive::receive_stream;
use super::{Shared, SpaceState};
use crate::codec::control::{Ack, Hello, SpaceAck, SpacePosition, DEFAULT_MAX_CONTROL_BYTES};
use crate::codec::{ControlMessage, PROTOCOL_VERSION};
use crate::net::error::NetError;
use crate::net::framed::{control_writer, write_control, AssemblyBudget, ControlReader, ControlSender};
use crate::net::heartbeat::{self, store_summary};
use crate::net::status::ConnectionState;
use crate::net::tls;
use crate::net::{close, lock, HANDSHAKE_TIMEOUT};
use crate::protocol::backoff::Backoff;
use crate::protocol::liveness::Liveness;
use crate::types::{Epoch, NodeId, Seq, SpaceId};
use crate::wal::SpaceWal;

/// What one connection knows of its primary.
#[derive(Clone)]
pub(super) struct Session {
    /// Tells this session's streams from other sessions' (from 1).
    pub(super) ordinal: u64,
    pub(super) conn: Connection,
    /// Data arriving counts as a sign of life too: a deep queue may delay heartbeats.
    pub(super) liveness: Arc<Mutex<Liveness>>,
    pub(super) primary_id: NodeId,
    pub(super) epoch: Epoch,
    pub(super) control: ControlSender,
    /// Large frames being received or applied, held to twice the primary's announced credit.
    pub(super) assembly: Arc<AssemblyBudget>,
}

/// Dials the primary, runs the session, and redials with backoff when it ends.
pub(super) async fn dial_loop(shared: Arc<Shared>, addr: SocketAddr) {
    let backoff = Backoff::new(shared.config.reconnect_initial, shared.config.reconnect_max, shared.node_id.0);
    let name = shared.config.primary_name.clone();
    let session = |conn| run_session(&shared, conn);
    let ended = |reason: String, retry_in: Duration, attempt: u32| {
        if crate::net::is_certificate_error(&reason) {
            tracing::warn!(primary = %addr, error = %reason, ?retry_in, attempt, "certificate check failed; retrying");
        } else {
            tracing::info!(primary = %addr, error = %reason, ?retry_in, attempt, "not connected to the primary; retrying");
        }
        shared.set_state(ConnectionState::Disconnected, Some(reason));
    };
    let dial_timeout = shared.config.transport.dial_timeout;
    crate::net::redial(&shared.endpoint, addr, &name, dial_timeout, backoff, session, ended).await
}

/// Waits for the primary to dial (when the primary knows its replicas).
pub(super) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
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
            Err(e) => crate::net::log_refused_handshake(remote, &e),
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
    // Read before the positions: a log cut back after this (an operator's repair) is caught once
    // the connection is registered, where `Replica::disconnect` would not yet have reached it.
    let cuts_at_hello: Vec<(SpaceWal, u64)> = shared
        .store
        .spaces()
        .into_iter()
        .map(|w| {
            let cuts = w.truncations();
            (w, cuts)
        })
        .collect();
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
                let (last_seq, last_epoch, digest) = w.end();
                let durable = w.durable_seq().min(last_seq);
                SpacePosition {
                    space: w.space().clone(),
                    last_seq,
                    last_epoch,
                    digest,
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
            "primary's epoch {} is older than {known_epoch} seen before: refusing a deposed primary (a primary restored on purpose must start at epoch {known_epoch} or above; this replica keeps the newest epoch it accepted in {})",
            welcome.epoch,
            shared.config.data_dir.join("epoch+fence").display()
        )));
    }
    if welcome.epoch > known_epoch {
        // Kept before anything of the new epoch is taken in, so that no restart forgets it; a
        // replica that cannot keep it takes nothing in (and retries as after any failed session).
        let (dir, epoch) = (shared.config.data_dir.clone(), welcome.epoch);
        let kept = tokio::task::spawn_blocking(move || super::fence::raise(&dir, epoch)).await;
        match kept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                conn.close(close::LOCAL_FAILURE, b"cannot keep the epoch");
                return Err(e);
            }
            Err(e) => return Err(NetError::Task(format!("keeping the epoch fence: {e}"))),
        }
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
    // The hello compared positions the log no longer has: the primary may have refused the space
    // as diverged, or resume after entries cut away. Compare again.
    if let Some((wal, _)) = cuts_at_hello.iter().find(|(w, t)| w.truncations() != *t) {
        conn.close(close::LOG_CUT, b"a log was cut back during the handshake");
        return Err(NetError::CutDuringHandshake(wal.space().clone()));
    }
    shared.set_state(ConnectionState::Connected, None);
    tracing::info!(primary = %welcome.primary_name, epoch = %welcome.epoch, "connected to the primary");

    let outbox = ControlSender::default();
    let session = Session {
        ordinal: shared.sessions.fetch_add(1, Ordering::Relaxed) + 1,
        conn: conn.clone(),
        liveness: liveness.clone(),
        primary_id: welcome.primary_id,
        epoch: welcome.epoch,
        assembly,
        control: outbox.clone(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::net::refuse_unexpected_streams(conn.clone(), false, true));
    tasks.spawn(control_writer(send, outbox));
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
                // Never create a space on the peer's word: only record errors for spaces held here;
                // the error of a space this replica does not hold (yet) is the link's, naming it.
                let state = e.space.as_ref().and_then(|s| lock(&shared.spaces).get(s).cloned());
                match (state, &e.space) {
                    (Some(state), _) => *lock(&state.error) = Some(format!("{:?}: {}", e.code, e.reason)),
                    (None, Some(space)) => {
                        lock(&shared.link).last_error = Some(format!("{:?} for space {space}: {}", e.code, e.reason))
                    }
                    (None, None) => lock(&shared.link).last_error = Some(format!("{:?}: {}", e.code, e.reason)),
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
            let last_seq = s.wal.last_seq();
            if durable >= last_seq && applied == durable {
                // Settled: nothing more to report until the next batch puts it back. A batch
                // appends before it inserts the space, so seeing the log's end (and what was acked)
                // unchanged under the lock means any newer batch will insert it again after this
                // removal. `applied` alone would not tell: with an apply hook it moves only once
                // the hook took the entries, and the durable ack must not wait for that.
                let mut unacked = lock(&shared.unacked);
                let now = (s.wal.durable_seq(), Seq(s.applied.load(Ordering::Acquire)), s.wal.last_seq());
                if now == (durable, applied, last_seq) {
                    unacked.remove(s.wal.space());
                }
            }
        }
        if !spaces.is_empty() && session.control.send(ControlMessage::Ack(Ack { spaces })).is_err() {
            return;
        }
    }
}
