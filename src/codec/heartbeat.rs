//! Heartbeat datagrams: liveness, round-trip time and a lag summary, sent as QUIC datagrams so they
//! never queue behind data.
//!
//! RTT needs no clock agreement: each side stamps its own clock in `sent_at_us` and echoes the last
//! stamp it received together with how long it held it, so the originator computes
//! `rtt = now - echo.sent_at_us - echo.held_us` on its own clock.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{DecodeError, EncodeError};
use crate::types::Epoch;

/// A heartbeat always fits in one QUIC datagram (the minimum QUIC MTU is 1,200 bytes, minus packet
/// overhead); its fields are fixed-size whatever the number of spaces, so it stays far below this.
pub const MAX_HEARTBEAT_BYTES: usize = 1_100;

/// The echo of the peer's last heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The peer's `sent_at_us` being echoed.
    pub sent_at_us: u64,
    /// How long the echoing side held it before sending this heartbeat, in microseconds.
    pub held_us: u64,
}

/// A summary of the sender's positions over all its spaces: constant size, for dashboards and
/// sanity checks, never for correctness (the control stream carries exact positions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSummary {
    /// Number of spaces the sender holds.
    pub spaces: u32,
    /// Sum of the last sequence of every space.
    pub total_last_seq: u64,
    /// Largest lag in entries of any space (primary: versus its replicas; replica: 0).
    pub max_lag_entries: u64,
}

/// One heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's clock when it sent this, in microseconds (any origin, only the sender compares it).
    pub sent_at_us: u64,
    /// Echo of the last heartbeat received from the peer.
    pub echo: Option<Echo>,
    /// Sender's epoch.
    pub epoch: Epoch,
    /// Sender's positions.
    pub summary: SeqSummary,
}

impl Heartbeat {
    /// Encodes a heartbeat for one datagram.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        let v = postcard::to_allocvec(self).map_err(|e| EncodeError::Serialize(e.to_string()))?;
        debug_assert!(v.len() <= MAX_HEARTBEAT_BYTES);
        Ok(Bytes::from(v))
    }

    /// Decodes a datagram.
    pub fn decode(b: &[u8]) -> Result<Heartbeat, DecodeError> {
        if b.len() > MAX_HEARTBEAT_BYTES {
            return Err(DecodeError::TooLarge { what: "heartbeat", len: b.len(), max: MAX_HEARTBEAT_BYTES });
        }
        super::decode_postcard("heartbeat", b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn prop_round_trip_and_size(sent: u64, echo: Option<(u64, u64)>, epoch: u64, spaces: u32, total: u64, lag: u64) {
            let hb = Heartbeat {
                sent_at_us: sent,
                echo: echo.map(|(s, h)| Echo { sent_at_us: s, held_us: h }),
                epoch: Epoch(epoch),
                summary: SeqSummary { spaces, total_last_seq: total, max_lag_entries: lag },
            };
            let bytes = hb.encode().unwrap();
            prop_assert!(bytes.len() <= MAX_HEARTBEAT_BYTES);
            prop_assert_eq!(Heartbeat::decode(&bytes).unwrap(), hb);
        }

        #[test]
        fn prop_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Heartbeat::decode(&bytes);
        }
    }

    #[test]
    fn size_bound_holds_for_10k_spaces() {
        let hb = Heartbeat {
            sent_at_us: u64::MAX,
            echo: Some(Echo { sent_at_us: u64::MAX, held_us: u64::MAX }),
            epoch: Epoch(u64::MAX),
            summary: SeqSummary { spaces: 10_000, total_last_seq: u64::MAX, max_lag_entries: u64::MAX },
        };
        let len = hb.encode().unwrap().len();
        // Every field at its largest: what docs/PROTOCOL.md quotes as the real size bound.
        assert!(len <= 64, "{len} bytes (MAX_HEARTBEAT_BYTES is {MAX_HEARTBEAT_BYTES})");
    }
}
