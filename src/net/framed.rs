//! Framing over quinn streams: whole control messages and whole batch frames, checked before they
//! are parsed (nothing is buffered for a length above the limits).

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};

use crate::codec::batch::{BatchHeader, FrameLimits, BATCH_HEADER_LEN};
use crate::codec::stream::{check_mux_preamble, StreamHeader, StreamKind, MUX_PREAMBLE_LEN, STREAM_HEADER_LEN};
use crate::codec::{BatchDecoder, ControlMessage, DecodedBatch};
use crate::net::error::NetError;

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

/// Sends the messages queued on `rx` on a control stream, in order, until the queue or the stream
/// closes.
pub(crate) async fn control_writer(mut send: SendStream, mut rx: tokio::sync::mpsc::UnboundedReceiver<ControlMessage>) {
    while let Some(msg) = rx.recv().await {
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
pub(crate) async fn read_batch(
    recv: &mut RecvStream,
    decoder: &mut BatchDecoder,
) -> Result<Option<DecodedBatch>, NetError> {
    let Some(h) = read_array_or_end::<BATCH_HEADER_LEN>(recv).await? else { return Ok(None) };
    let limits: FrameLimits = *decoder.limits();
    let header = BatchHeader::decode(&h, &limits)?;
    let payload = read_exactly(recv, header.payload_len as usize).await?;
    Ok(Some(decoder.decode_payload(header, payload)?))
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
