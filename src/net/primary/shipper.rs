//! One (space, replica) shipper: reads the space's log, writes batch frames to the space's own
//! stream (or the shared one in single-stream mode), bounds what is unacknowledged, and restarts
//! from a sequence when the replica asks for catch-up.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, SendStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit};

use super::known::Floor;
use super::session::{error_msg, Session};
use super::Shared;
use crate::codec::batch::{BATCH_HEADER_LEN, ENTRY_HEADER_LEN};
use crate::codec::control::ErrorCode;
use crate::codec::stream::{mux_preamble, StreamHeader};
use crate::codec::BatchEncoder;
use crate::config::{PrimaryConfig, SMALL_FRAME_BYTES};
use crate::entry::Entry;
use crate::net::error::NetError;
use crate::net::{close, lock, read_entries, stream_code};
use crate::protocol::progress::ReplicaProgress;
use crate::types::{Seq, SpaceId};
use crate::wal::{SpaceWal, WalError};

/// Shared state of one (space, replica) shipper.
pub(super) struct SpaceShip {
    /// The space's log, held here so that acks need no store lookup.
    pub(super) wal: SpaceWal,
    pub(super) progress: Mutex<ReplicaProgress>,
    pub(super) acked: Notify,
    /// Catch-up requests: each send restarts the stream from the sequence given.
    pub(super) restart: watch::Sender<Seq>,
    pub(super) error: Mutex<Option<String>>,
    /// The replica reported this space diverged: retrying cannot help, only a catch-up request
    /// (after the operator repaired the replica) resumes it.
    pub(super) halted: std::sync::atomic::AtomicBool,
    /// Why the handshake refused the space (the replica's copy is another log, or needs entries
    /// retention removed), if it did: nothing is shipped, and the replica's acks are about its
    /// own entries.
    pub(super) refused: Option<ErrorCode>,
    /// Retention removed entries the replica still needs, found while shipping (a catch-up from
    /// before the log's start, or a trim past what was shipped): as for a refusal as `Truncated`,
    /// only a snapshot helps it, and it holds no entry back from retention. Cleared if a
    /// catch-up request restarts the shipping from a sequence the log holds.
    pub(super) needs_snapshot: std::sync::atomic::AtomicBool,
    /// Suffix truncations of the space's log when the handshake compared it with the replica's.
    pub(super) truncations: u64,
    /// The session credit held by this space's large frames in flight, by last sequence: given
    /// back as the replica acks them durable, or all at once when the stream restarts.
    pub(super) credits: Mutex<VecDeque<(Seq, OwnedSemaphorePermit)>>,
}

impl SpaceShip {
    /// Takes the replica's ack of this space, unless it cannot be about this log: for a space
    /// refused at the handshake or reported diverged, after the log was cut back since the
    /// handshake (the replica's entries past the cut are not this log's; the session is being
    /// closed), or past the log's end.
    pub(super) fn on_ack(&self, durable: Seq, applied: Seq) {
        if self.refused.is_some() || self.halted.load(Ordering::Acquire) || self.cut_since_handshake() {
            return;
        }
        let head = self.wal.last_seq();
        if durable > head || applied > head {
            tracing::debug!(space = %self.wal.space(), %durable, %head, "ignoring an ack past this primary's log");
            return;
        }
        lock(&self.progress).on_ack(durable, applied);
        self.release_credit(durable);
        self.acked.notify_one();
    }

    /// The last entry of this log as it is now that the replica holds durable, for `wait_durable`
    /// and retention: none of a space refused at the handshake, and none past a cut made since.
    pub(super) fn durable_in_log(&self) -> Seq {
        if self.refused.is_some() {
            return Seq::ZERO;
        }
        let durable = lock(&self.progress).durable();
        if !self.cut_since_handshake() {
            return durable;
        }
        self.wal.cut_since(self.truncations).map_or(durable, |cut| durable.min(cut))
    }

    /// Whether only a snapshot can bring the replica's copy back: refused as `Truncated` at the
    /// handshake, or found so while shipping.
    pub(super) fn needs_snapshot(&self) -> bool {
        self.refused == Some(ErrorCode::Truncated) || self.needs_snapshot.load(Ordering::Acquire)
    }

    /// Where the replica stands, kept for when this connection is gone (and across restarts).
    pub(super) fn floor(&self) -> Floor {
        if self.needs_snapshot() {
            return Floor::NeedsSnapshot;
        }
        // Read first: a cut after it, even one `durable_in_log` already saw, lowers the floor.
        let truncations = self.wal.truncations();
        Floor::At { seq: self.durable_in_log(), truncations }
    }

    /// Whether the log was cut back (`truncate_suffix`) since the handshake compared it with the
    /// replica's: what the replica holds past the cut may not be what the log holds there now.
    pub(super) fn cut_since_handshake(&self) -> bool {
        self.wal.truncations() != self.truncations
    }

    /// Gives back the credit of frames the replica acked durable up to `durable`.
    pub(super) fn release_credit(&self, durable: Seq) {
        let mut credits = lock(&self.credits);
        while credits.front().is_some_and(|(last, _)| *last <= durable) {
            credits.pop_front();
        }
    }
}

/// Frames queued for the multiplexed stream in single-stream mode: enough to keep it busy.
pub(super) const MUX_QUEUE_FRAMES: usize = 64;

/// Writes every space's frames to one stream (single-stream mode): what per-space streams avoid.
pub(super) async fn mux_writer(conn: Connection, mut rx: mpsc::Receiver<Vec<Bytes>>) {
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
        // Every space goes down this stream: without it nothing is shipped, while heartbeats
        // would keep the connection up. A new connection opens a new one.
        if conn.close_reason().is_none() {
            conn.close(close::PROTOCOL, b"the multiplexed stream failed");
        }
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
pub(super) async fn ship_space(shared: Arc<Shared>, session: Arc<Session>, ship: Arc<SpaceShip>, start: Seq) {
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
                if code == ErrorCode::Truncated {
                    ship.needs_snapshot.store(true, Ordering::Release);
                }
                let _ = session.control.send(error_msg(code, Some(space.clone()), &reason));
                match pause(&ship, &mut restart, || retry).await {
                    Interrupt::Restart(seq) => from = seq,
                    Interrupt::Closed => return,
                }
                *lock(&ship.error) = None;
                // Shipping again from what the replica asked for: if the log still lacks it, the
                // next read says so again.
                ship.needs_snapshot.store(false, Ordering::Release);
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
    let mut shippable = Shippable::new(wal, cfg.wal.fsyncs(), ship.truncations);
    // Open the stream only once there is something to ship.
    while shippable.upto() < from {
        if close_if_cut(session, ship) {
            return Ok(Interrupt::Closed);
        }
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
        // A caught-up shipper wakes here on a cut too: the replica may hold entries past it that
        // are no longer this log's, even if the log never grows past them again.
        if close_if_cut(session, ship) {
            return Ok(Interrupt::Closed);
        }
        // Flow control of our own: bounded unacknowledged bytes per (space, replica).
        loop {
            let acked = ship.acked.notified();
            if lock(&ship.progress).may_send(cfg.max_unacked_bytes) {
                break;
            }
            tokio::select! {
                _ = acked => {}
                // Acks are ignored once the log was cut: a cut must end this wait itself.
                _ = cut_since_handshake(ship) => return Ok(Interrupt::Closed.closing_on_cut(session, ship)),
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
        let frame_limit = session.frame_limits.max_batch_bytes;
        // Entry headers may take at most half the frame: counted at the most entries a batch may
        // hold, they would otherwise leave no room for payloads in a replica's smaller frames,
        // and every frame would carry a single entry.
        let count = usize::try_from(upto.0 - next.0 + 1)
            .unwrap_or(usize::MAX)
            .min(cfg.max_batch_entries)
            .min(frame_limit / (2 * ENTRY_HEADER_LEN))
            .max(1);
        // Payload bytes per batch: this primary's setting, within the session's frame limit
        // (which also holds each entry's header).
        let frame_room = frame_limit.saturating_sub(count.saturating_mul(ENTRY_HEADER_LEN));
        let batch_bytes = cfg.max_batch_bytes.min(frame_room);
        let mut entries = read_entries(wal, next, count, batch_bytes).await?;
        // A cut during the read may have mixed the old log's entries with the new one's.
        if close_if_cut(session, ship) {
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
                        _ = cut_since_handshake(ship) => return Ok(Interrupt::Closed.closing_on_cut(session, ship)),
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
        let counted_before = encoder.counts();
        let len = encoder.encode_parts(wal.space(), &entries, &mut frame)?;
        drop(entries);
        tokio::select! {
            r = sink.send(wal.space(), first, frame) => match r {
                Ok(()) => {}
                Err(quinn::WriteError::Stopped(code)) => return Ok(stopped_by_replica(ship, restart, Some(code)).await),
                Err(e) => return Err(e.into()),
            },
            r = restart.changed() => { sink.reset(); return Ok(restart_or_closed(r, restart)) }
            // A replica that stops reading holds the send here: a cut must end it too.
            _ = cut_since_handshake(ship) => return Ok(Interrupt::Closed.closing_on_cut(session, ship)),
        }
        {
            let mut progress = lock(&ship.progress);
            progress.on_sent(first, last, len, first_appended_us);
            // Only frames sent count (one abandoned by a restart does not).
            progress.on_encoded(encoder.counts().since(&counted_before));
        }
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

/// Closes the session if the space's log was cut back since the handshake (an operator's
/// `truncate_suffix`): what the replica holds past the cut may not be what this log holds there
/// now. Shipping on would splice two logs; a new handshake compares them instead.
fn close_if_cut(session: &Session, ship: &SpaceShip) -> bool {
    if !ship.cut_since_handshake() {
        return false;
    }
    tracing::warn!(space = %ship.wal.space(), "log cut back on the primary during the session; closing so the replica re-handshakes");
    session.conn.close(close::LOG_CUT, b"a space's log was cut back on the primary");
    true
}

/// Resolves once the space's log was cut back since the handshake (appends do not wake it).
async fn cut_since_handshake(ship: &SpaceShip) {
    ship.wal.wait_for_cut(ship.truncations).await
}

impl Interrupt {
    /// `self`, after closing the session for a cut ([`close_if_cut`]).
    fn closing_on_cut(self, session: &Session, ship: &SpaceShip) -> Interrupt {
        close_if_cut(session, ship);
        self
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
    /// The log's truncation count at the handshake: a wait also ends on a later cut.
    truncations: u64,
}

impl<'a> Shippable<'a> {
    fn new(wal: &'a SpaceWal, fsyncs: bool, truncations: u64) -> Shippable<'a> {
        Shippable { wal, durable: fsyncs.then(|| wal.subscribe_durable()), truncations }
    }

    /// The last entry that may be shipped now.
    fn upto(&self) -> Seq {
        match &self.durable {
            Some(rx) => (*rx.borrow()).min(self.wal.last_seq()),
            None => self.wal.last_seq(),
        }
    }

    /// Returns once `seq` may be shipped, or once the log was cut back since the handshake. A cut
    /// sets the durable position to the cut, which wakes the watch, unless it was there already:
    /// then nothing past the cut was shipped.
    async fn wait_for(&mut self, seq: Seq) {
        let (wal, truncations) = (self.wal, self.truncations);
        match &mut self.durable {
            Some(rx) => {
                if rx.wait_for(|d| *d >= seq || wal.truncations() != truncations).await.is_err() {
                    // The log is gone (its last handle dropped): nothing more will become durable.
                    std::future::pending::<()>().await;
                }
            }
            None => wal.wait_for_or_cut(seq, Some(truncations)).await,
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
