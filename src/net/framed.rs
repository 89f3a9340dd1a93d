//! Framing over quinn streams: whole control messages and whole batch frames, checked before they
//! are parsed (nothing is buffered for a length above the limits).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::Notify;

use crate::codec::batch::{BatchHeader, FrameLimits, BATCH_HEADER_LEN};
use crate::codec::stream::{check_mux_preamble, StreamHeader, StreamKind, MUX_PREAMBLE_LEN, STREAM_HEADER_LEN};
use crate::codec::{BatchDecoder, ControlMessage, DecodedBatch};
use crate::config::SMALL_FRAME_BYTES;
use crate::net::error::NetError;
use crate::protocol::outbox::Outbox;

/// Reads control messages off a stream.
pub(crate) struct ControlReader {
    recv: RecvStream,
    buf: BytesMut,
    max: usize,
}

impl ControlReader {
    pub(crate) fn new(recv: RecvStream, max: usize) -> ControlReader {
        ControlReader { recv, buf: BytesMut::with_capacity(8 * 1024), max }
    }

    /// The next message, or `None` when the peer finished the stream between messages.
    pub(crate) async fn read(&mut self) -> Result<Option<ControlMessage>, NetError> {
        loop {
            if let Some(msg) = ControlMessage::decode_from(&mut self.buf, self.max)? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(NetError::UnexpectedEnd("control message")),
            }
        }
    }
}

/// Writes a control message.
pub(crate) async fn write_control(send: &mut SendStream, msg: &ControlMessage) -> Result<(), NetError> {
    send.write_chunk(msg.encode()?).await?;
    Ok(())
}

/// The sending side of a control stream: messages wait in an [`Outbox`], coalesced per space while
/// the peer reads slowly, and [`control_writer`] writes them in order.
#[derive(Clone, Default)]
pub(crate) struct ControlSender {
    shared: Arc<ControlShared>,
}

#[derive(Default)]
struct ControlShared {
    outbox: Mutex<Outbox>,
    ready: Notify,
    /// The writer stopped (its stream failed): nothing queued will be sent.
    closed: AtomicBool,
}

/// The control stream's writer is gone: the session is ending.
#[derive(Debug)]
pub(crate) struct ControlClosed;

impl ControlSender {
    /// Queues `msg` for the stream; fails once the writer has stopped.
    pub(crate) fn send(&self, msg: ControlMessage) -> Result<(), ControlClosed> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ControlClosed);
        }
        crate::lock(&self.shared.outbox).push(msg);
        self.shared.ready.notify_one();
        Ok(())
    }
}

/// Writes the messages `queue` receives on a control stream, in order, until the stream fails
/// or the task is dropped (the session ended); then further sends fail.
pub(crate) async fn control_writer(mut send: SendStream, queue: ControlSender) {
    /// Marks the queue closed however the writer ends, an abort included.
    struct Closing(Arc<ControlShared>);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.closed.store(true, Ordering::Release);
        }
    }
    let shared = queue.shared;
    let _closing = Closing(shared.clone());
    loop {
        let next = crate::lock(&shared.outbox).pop();
        let Some(msg) = next else {
            shared.ready.notified().await;
            continue;
        };
        if let Err(e) = write_control(&mut send, &msg).await {
            tracing::debug!(error = %e, "control stream closed");
            return;
        }
    }
}

/// Reads the first four bytes of a data stream and says what kind of stream it is.
pub(crate) async fn read_stream_kind(recv: &mut RecvStream) -> Result<([u8; 4], StreamKind), NetError> {
    let mut magic = [0u8; 4];
    recv.read_exact(&mut magic).await?;
    Ok((magic, StreamKind::from_magic(magic)?))
}

/// Reads the rest of a stream header whose magic was already read.
pub(crate) async fn read_stream_header_rest(recv: &mut RecvStream, magic: [u8; 4]) -> Result<StreamHeader, NetError> {
    let mut b = [0u8; STREAM_HEADER_LEN];
    b[..4].copy_from_slice(&magic);
    recv.read_exact(&mut b[4..]).await?;
    Ok(StreamHeader::decode(&b)?)
}

/// Reads the rest of a multiplexed stream's preamble whose magic was already read.
pub(crate) async fn read_mux_preamble_rest(recv: &mut RecvStream, magic: [u8; 4]) -> Result<(), NetError> {
    let mut b = [0u8; MUX_PREAMBLE_LEN];
    b[..4].copy_from_slice(&magic);
    recv.read_exact(&mut b[4..]).await?;
    Ok(check_mux_preamble(&b)?)
}

/// Reads the next `N` bytes, or `None` if the stream ended cleanly right here (between frames).
async fn read_array_or_end<const N: usize>(recv: &mut RecvStream) -> Result<Option<[u8; N]>, NetError> {
    let mut b = [0u8; N];
    match recv.read_exact(&mut b).await {
        Ok(()) => Ok(Some(b)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the stream header before a frame on a multiplexed stream; `None` at a clean end.
pub(crate) async fn read_mux_header(recv: &mut RecvStream) -> Result<Option<StreamHeader>, NetError> {
    match read_array_or_end::<STREAM_HEADER_LEN>(recv).await? {
        Some(b) => Ok(Some(StreamHeader::decode(&b)?)),
        None => Ok(None),
    }
}

/// Reads one batch frame: the header is validated against the limits before the payload is read.
/// `Ok(None)` when the stream ended cleanly between frames.
pub(crate) async fn read_batch<'b>(
    recv: &mut RecvStream,
    decoder: &mut BatchDecoder,
    assembly: &'b AssemblyBudget,
) -> Result<Option<(DecodedBatch, Option<Assembling<'b>>)>, NetError> {
    let Some(h) = read_array_or_end::<BATCH_HEADER_LEN>(recv).await? else { return Ok(None) };
    let limits: FrameLimits = *decoder.limits();
    let header = BatchHeader::decode(&h, &limits)?;
    // What the frame costs while it is received and applied: its decompressed size (the same
    // charge the primary takes its credit for).
    let frame = BATCH_HEADER_LEN + header.payload_len.max(header.uncompressed_len) as usize;
    let held = match frame > SMALL_FRAME_BYTES {
        true => Some(assembly.reserve(frame)?),
        false => None,
    };
    let payload = read_exactly(recv, header.payload_len as usize).await?;
    Ok(Some((decoder.decode_payload(header, payload)?, held)))
}

/// The bytes of large frames (over `SMALL_FRAME_BYTES`) a replica is receiving or applying on one
/// connection. Each stream copies its frame out of QUIC's buffers, so the connection window does
/// not bound their sum; the primary's credit does (`PrimaryConfig::max_replica_inflight_bytes`,
/// announced in the welcome), and this holds it to that: past the limit, the peer is misbehaving.
pub(crate) struct AssemblyBudget {
    used: AtomicUsize,
    limit: usize,
}

/// A frame's share of an [`AssemblyBudget`], given back when dropped (applied, or abandoned).
pub(crate) struct Assembling<'b> {
    budget: &'b AssemblyBudget,
    bytes: usize,
}

impl AssemblyBudget {
    pub(crate) fn new(limit: usize) -> AssemblyBudget {
        AssemblyBudget { used: AtomicUsize::new(0), limit }
    }

    /// Bytes in assembly now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn reserve(&self, bytes: usize) -> Result<Assembling<'_>, NetError> {
        let used = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let held = Assembling { budget: self, bytes };
        if used > self.limit {
            return Err(NetError::Protocol(format!(
                "the primary sent more large frames at once than its credit allows ({used} bytes in assembly, limit {})",
                self.limit
            )));
        }
        Ok(held)
    }
}

impl Drop for Assembling<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads exactly `len` bytes, without copying when quinn hands them over in one chunk.
async fn read_exactly(recv: &mut RecvStream, len: usize) -> Result<Bytes, NetError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut have = 0;
    while have < len {
        let chunk = recv.read_chunk(len - have, true).await?.ok_or(NetError::UnexpectedEnd("batch payload"))?.bytes;
        have += chunk.len();
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            Some(f) => {
                buf.reserve(len);
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
            None => buf.extend_from_slice(&chunk),
        }
    }
    Ok(match first {
        Some(f) => f,
        None => buf.freeze(),
    })
}
