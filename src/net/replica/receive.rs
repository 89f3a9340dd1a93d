//! The data streams from the primary: a space's own stream or the multiplexed one, read frame by
//! frame, each batch validated against the session and the local log and appended to the WAL.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quinn::RecvStream;

use super::session::Session;
use super::{Shared, SpaceState};
use crate::codec::batch::space_tag;
use crate::codec::control::{CatchUp, ErrorCode, ErrorMessage};
use crate::codec::stream::StreamKind;
use crate::codec::{BatchDecoder, ControlMessage, DecodedBatch};
use crate::net::error::NetError;
use crate::net::framed::{
    read_batch, read_mux_header, read_mux_preamble_rest, read_stream_header_rest, read_stream_kind,
};
use crate::net::{close, lock, stream_code};
use crate::protocol::admission::{admit, admit_stream, Expected, LogEnd};
use crate::protocol::stream_order::StreamKey;
use crate::types::Seq;
use crate::wal::{SyncPolicy, WalError};

/// Why a stream's reception stopped.
enum StreamEnd {
    /// The primary finished or reset the stream, or a newer stream took over.
    Done,
    /// The space needs a catch-up from the entry after the last it holds.
    CatchUp(String),
    /// This node cannot store the space right now (disk full, I/O error): the primary retries
    /// after a pause instead of resending at once.
    LocalFailure(String),
}

/// Receives one data stream: a space's own, or (single-stream mode) the multiplexed one.
pub(super) async fn receive_stream(shared: Arc<Shared>, session: Session, mut recv: RecvStream) {
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
    let stream = (session.ordinal, recv.id().index());
    if !lock(&state.streams).take_over(stream) {
        // Its header came in after a later-opened stream's of the same connection (lost and
        // resent): the primary had already given it up. The later one goes on.
        tracing::debug!(space = %header.space, "a stream older than the current one; dropping it");
        return;
    }
    *lock(&state.error) = None;
    let end = receive_batches(&shared, &session, &state, stream, header.start_seq, &mut recv).await;
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
    stream: StreamKey,
    start: Seq,
    recv: &mut RecvStream,
) -> StreamEnd {
    let wal = &state.wal;
    if let Err(reason) = admit_stream(start, wal.last_seq()) {
        return StreamEnd::CatchUp(reason);
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
        if !lock(&state.streams).is_current(stream) {
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
    let expected = Expected { primary: session.primary_id, space_tag: space_tag(wal.space()), epoch: session.epoch };
    let (last_seq, last_epoch) = wal.last_seq_and_epoch();
    admit(h, &expected, LogEnd { last_seq, last_epoch }).map_err(Reject::CatchUp)?;
    // An fsync, the write of a large batch or a new segment file blocks: keep it off the runtime's
    // threads, which must keep draining the UDP socket (a stalled endpoint drops packets at the socket).
    // So may comparing a resent batch with what the log holds, if that has left the memory tail.
    let blocking = matches!(shared.config.wal.sync, SyncPolicy::Always)
        || h.uncompressed_len >= BLOCKING_APPEND_BYTES
        || h.start_seq <= last_seq
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
        Err(e @ (WalError::BadChecksum { .. } | WalError::Gap { .. } | WalError::EpochBackwards { .. })) => {
            return Err(Reject::CatchUp(e.to_string()))
        }
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
