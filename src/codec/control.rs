//! Control-stream messages: serde + postcard, each prefixed by its length (u32 little-endian).
//!
//! New message kinds are added as new enum variants at the end, so older peers fail with a clear
//! "malformed control message" instead of misreading them.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::error::{DecodeError, EncodeError};
use crate::entry::LogDigest;
use crate::types::{Epoch, NodeId, Seq, SpaceId};

/// Size of the length prefix.
pub const CONTROL_LEN_PREFIX: usize = 4;
/// Default bound on one control message: a hello for 10,000 spaces is about 1 MiB.
pub const DEFAULT_MAX_CONTROL_BYTES: usize = 16 * 1024 * 1024;

/// A message on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Replica -> primary, first message: who it is and where each of its spaces stands.
    Hello(Hello),
    /// Primary -> replica, answer to hello: who the primary is and what it holds.
    Welcome(Welcome),
    /// Replica -> primary: positions made durable and applied, many spaces per message.
    Ack(Ack),
    /// Replica -> primary: resend a space from a sequence (after a gap or a bad frame).
    CatchUp(CatchUp),
    /// Either way: something went wrong, for one space or the whole connection.
    Error(ErrorMessage),
}

/// Where a replica's log of one space stands, with the log identity (epoch of its last entry and the
/// digest up to it) so it never resumes against a log that is not the one it copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpacePosition {
    /// The space.
    pub space: SpaceId,
    /// Last sequence held (written; perhaps not yet durable): shipping resumes after it.
    pub last_seq: Seq,
    /// Epoch of the entry at `last_seq`.
    pub last_epoch: Epoch,
    /// Log digest up to `last_seq`.
    pub digest: LogDigest,
    /// Last sequence durable on the replica (`<= last_seq`): where the primary's view of this
    /// replica starts, so a reconnect never reports more as durable than the replica has.
    pub durable_seq: Seq,
    /// Last sequence the replica has applied (`<= durable_seq`).
    pub applied_seq: Seq,
}

/// First message of a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the replica speaks.
    pub protocol_version: u8,
    /// The replica's node id.
    pub node_id: NodeId,
    /// The replica's node name (also checked against its certificate).
    pub node_name: String,
    /// Highest primary epoch the replica has seen.
    pub epoch: Epoch,
    /// Random per replica process: the primary tells a reconnect of the connected replica (same
    /// instance) from a second process under the same name (another instance).
    pub instance: u64,
    /// The largest uncompressed batch payload the replica accepts (its
    /// `FrameLimits::max_batch_bytes`): the primary sends no larger batch on this connection.
    pub max_batch_bytes: u64,
    /// Durable position of every space the replica holds.
    pub spaces: Vec<SpacePosition>,
}

/// What a primary holds of one space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceRange {
    /// The space.
    pub space: SpaceId,
    /// First sequence still available (older entries were removed by retention).
    pub first_seq: Seq,
    /// Last sequence written.
    pub last_seq: Seq,
}

/// The primary's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the primary speaks.
    pub protocol_version: u8,
    /// The primary's node id.
    pub primary_id: NodeId,
    /// The primary's node name.
    pub primary_name: String,
    /// The primary's current epoch.
    pub epoch: Epoch,
    /// Range held for every space.
    pub spaces: Vec<SpaceRange>,
    /// Frame bytes over `SMALL_FRAME_BYTES` the primary keeps in flight to this replica, all spaces
    /// together (`PrimaryConfig::max_replica_inflight_bytes`): the replica holds it to that.
    pub max_inflight_bytes: u64,
}

/// A replica's positions for one space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceAck {
    /// The space.
    pub space: SpaceId,
    /// Last sequence on the replica's stable storage.
    pub durable: Seq,
    /// Last sequence handed to the replica's subscribers.
    pub applied: Seq,
}

/// Acks for many spaces at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// One line per space whose position changed.
    pub spaces: Vec<SpaceAck>,
}

/// Ask for a space to be resent from a sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUp {
    /// The space.
    pub space: SpaceId,
    /// First sequence wanted (the replica's last held + 1).
    pub from_seq: Seq,
    /// Why, for logs.
    pub reason: String,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The peer's identity is not what this node expects.
    Unauthorized,
    /// The replica's log of a space is not a prefix of the primary's (other epoch or digest).
    Diverged,
    /// The primary no longer holds the entries the replica needs (removed by retention).
    Truncated,
    /// A frame or message could not be decoded.
    BadFrame,
    /// A newer connection from the same replica replaced this one.
    Replaced,
    /// The sender is shutting down.
    Shutdown,
    /// Anything else.
    Internal,
    /// The replica has seen a newer primary epoch: this primary was deposed.
    StaleEpoch,
    /// Another live replica process connected under the same name.
    DuplicateName,
}

/// An error report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// The space it concerns, or `None` for the whole connection.
    pub space: Option<SpaceId>,
    /// Human-readable reason.
    pub reason: String,
}

impl ControlMessage {
    /// Encodes the message with its length prefix.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        let mut out = postcard::to_extend(self, vec![0u8; CONTROL_LEN_PREFIX])
            .map_err(|e| EncodeError::Serialize(e.to_string()))?;
        let len = (out.len() - CONTROL_LEN_PREFIX) as u32;
        out[..CONTROL_LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        Ok(Bytes::from(out))
    }

    /// Takes one whole message off the front of `buf` if one has fully arrived (`Ok(None)` if more
    /// bytes are needed). The length is checked against `max` before anything is buffered for it.
    pub fn decode_from(buf: &mut BytesMut, max: usize) -> Result<Option<ControlMessage>, DecodeError> {
        let Some(len) = Self::frame_len(buf, max)? else { return Ok(None) };
        if buf.len() < CONTROL_LEN_PREFIX + len {
            return Ok(None);
        }
        buf.advance(CONTROL_LEN_PREFIX);
        let body = buf.split_to(len);
        Self::decode_body(&body).map(Some)
    }

    /// The body length announced by a buffered prefix, checked against `max`.
    pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
        let Some(prefix) = buf.get(..CONTROL_LEN_PREFIX) else { return Ok(None) };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > max {
            return Err(DecodeError::TooLarge { what: "control message", len, max });
        }
        Ok(Some(len))
    }

    /// Decodes a message body (without its prefix); trailing bytes are an error. A reason (of a
    /// catch-up request or an error) longer than [`MAX_REASON_BYTES`] is cut there: it is only
    /// logged and shown in a status, where a peer's megabytes would flood both.
    pub fn decode_body(body: &[u8]) -> Result<ControlMessage, DecodeError> {
        let mut message: ControlMessage = super::decode_postcard("control message", body)?;
        if let ControlMessage::CatchUp(CatchUp { reason, .. }) | ControlMessage::Error(ErrorMessage { reason, .. }) =
            &mut message
        {
            if reason.len() > MAX_REASON_BYTES {
                let mut end = MAX_REASON_BYTES;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
                reason.push_str(" [cut]");
            }
        }
        Ok(message)
    }
}

/// Longest reason kept from a peer's catch-up request or error report, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

#[cfg(test)]
#[path = "control_samples.rs"]
mod control_samples;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    use super::control_samples::{samples, sid};

    /// A peer's long reason is cut (on a character boundary), the rest of the message kept.
    #[test]
    fn long_reasons_are_cut() {
        let long = "é".repeat(MAX_REASON_BYTES);
        for m in [
            ControlMessage::CatchUp(CatchUp { space: sid("a"), from_seq: Seq(3), reason: long.clone() }),
            ControlMessage::Error(ErrorMessage { code: ErrorCode::Internal, space: None, reason: long.clone() }),
        ] {
            let mut buf = BytesMut::from(&m.encode().unwrap()[..]);
            let back = ControlMessage::decode_from(&mut buf, DEFAULT_MAX_CONTROL_BYTES).unwrap().unwrap();
            let (ControlMessage::CatchUp(CatchUp { reason, .. }) | ControlMessage::Error(ErrorMessage { reason, .. })) =
                &back
            else {
                panic!("{back:?}")
            };
            assert!(reason.len() <= MAX_REASON_BYTES + 6 && reason.ends_with(" [cut]"), "{}", reason.len());
            assert!(long.starts_with(reason.trim_end_matches(" [cut]")));
        }
        let short = ControlMessage::Error(ErrorMessage { code: ErrorCode::Internal, space: None, reason: "x".into() });
        let mut buf = BytesMut::from(&short.encode().unwrap()[..]);
        assert_eq!(ControlMessage::decode_from(&mut buf, DEFAULT_MAX_CONTROL_BYTES).unwrap(), Some(short));
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut wire = BytesMut::new();
        for m in samples() {
            wire.extend_from_slice(&m.encode().unwrap());
        }
        // Feed the stream one byte at a time: messages come out whole and in order.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(m) = ControlMessage::decode_from(&mut buf, DEFAULT_MAX_CONTROL_BYTES).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, samples());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert!(matches!(ControlMessage::decode_from(&mut buf, 1024), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn invalid_space_id_in_message_is_refused() {
        let good = ControlMessage::CatchUp(CatchUp { space: sid("ok"), from_seq: Seq(1), reason: String::new() });
        let mut bytes = good.encode().unwrap().to_vec();
        let at = bytes.iter().position(|&b| b == b'o').unwrap();
        bytes[at] = b'/';
        assert!(ControlMessage::decode_body(&bytes[CONTROL_LEN_PREFIX..]).is_err());
    }

    proptest! {
        #[test]
        fn prop_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = ControlMessage::decode_from(&mut buf, 4096) {}
        }

        #[test]
        fn prop_ack_round_trip(items in prop::collection::vec(("[a-z0-9]{1,64}", any::<u64>(), any::<u64>()), 0..50)) {
            let msg = ControlMessage::Ack(Ack { spaces: items.iter().map(|(s, d, a)| SpaceAck { space: sid(s), durable: Seq(*d), applied: Seq(*a) }).collect() });
            let mut buf = BytesMut::from(&msg.encode().unwrap()[..]);
            prop_assert_eq!(ControlMessage::decode_from(&mut buf, DEFAULT_MAX_CONTROL_BYTES).unwrap(), Some(msg));
            prop_assert!(buf.is_empty());
        }
    }
}
