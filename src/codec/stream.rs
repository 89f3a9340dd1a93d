//! The header that opens every data stream: which space the stream carries and where it starts.
//!
//! ```text
//!  0 magic u32 "WSS1"   4 version u8   5 space id length u8   6 reserved u16 (zero)
//!  8 space id, 64 bytes, zero-padded  72 start seq u64        80 crc32c u32 (over bytes 0..80)
//! ```
//! Fixed size, so a reader needs one `read_exact` before it knows the stream is ours.
//!
//! A **multiplexed** stream (the single-stream measurement mode, all spaces on one stream) starts
//! instead with an 8-byte preamble, magic `"WSM1"`, version u8, 3 zero bytes; then every batch frame
//! on it is preceded by a stream header naming its space and its start sequence. Both kinds are told
//! apart by their first four bytes ([`StreamKind::from_magic`]).

use bytes::Bytes;

use super::error::DecodeError;
use super::PROTOCOL_VERSION;
use crate::types::{Seq, SpaceId, MAX_SPACE_ID_LEN};

/// `"WSS1"` read as a little-endian u32.
pub const STREAM_MAGIC: u32 = u32::from_le_bytes(*b"WSS1");
/// Size of the stream header.
pub const STREAM_HEADER_LEN: usize = 84;
/// `"WSM1"` read as a little-endian u32: a stream multiplexing every space.
pub const MUX_MAGIC: u32 = u32::from_le_bytes(*b"WSM1");
/// Size of the multiplexed stream's preamble.
pub const MUX_PREAMBLE_LEN: usize = 8;

/// What a data stream carries, from its first four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// One space; the rest of a [`StreamHeader`] follows.
    Space,
    /// Every space; the rest of the mux preamble follows, then (stream header, batch frame) pairs.
    Mux,
}

impl StreamKind {
    /// Classifies a stream by its magic number.
    pub fn from_magic(b: [u8; 4]) -> Result<StreamKind, DecodeError> {
        match u32::from_le_bytes(b) {
            STREAM_MAGIC => Ok(StreamKind::Space),
            MUX_MAGIC => Ok(StreamKind::Mux),
            found => Err(DecodeError::BadMagic { what: "stream header", found }),
        }
    }
}

/// The preamble of a multiplexed stream.
pub fn mux_preamble() -> [u8; MUX_PREAMBLE_LEN] {
    let mut b = [0u8; MUX_PREAMBLE_LEN];
    b[0..4].copy_from_slice(&MUX_MAGIC.to_le_bytes());
    b[4] = PROTOCOL_VERSION;
    b
}

/// Checks a multiplexed stream's preamble.
pub fn check_mux_preamble(b: &[u8; MUX_PREAMBLE_LEN]) -> Result<(), DecodeError> {
    let found = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if found != MUX_MAGIC {
        return Err(DecodeError::BadMagic { what: "mux preamble", found });
    }
    if b[4] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: b[4], supported: PROTOCOL_VERSION });
    }
    if b[5..].iter().any(|&x| x != 0) {
        return Err(DecodeError::Malformed { what: "mux preamble", reason: "reserved bytes are not zero".into() });
    }
    Ok(())
}

/// Opens a space's data stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The space whose batches follow.
    pub space: SpaceId,
    /// Sequence of the first entry the stream will carry.
    pub start_seq: Seq,
}

impl StreamHeader {
    /// Encodes the header.
    pub fn encode(&self) -> Bytes {
        let mut b = [0u8; STREAM_HEADER_LEN];
        let id = self.space.as_str().as_bytes();
        b[0..4].copy_from_slice(&STREAM_MAGIC.to_le_bytes());
        b[4] = PROTOCOL_VERSION;
        b[5] = id.len() as u8;
        b[8..8 + id.len()].copy_from_slice(id);
        b[72..80].copy_from_slice(&self.start_seq.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[..80]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
        Bytes::copy_from_slice(&b)
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8]) -> Result<StreamHeader, DecodeError> {
        if b.len() < STREAM_HEADER_LEN {
            return Err(DecodeError::Truncated { what: "stream header", need: STREAM_HEADER_LEN, have: b.len() });
        }
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != STREAM_MAGIC {
            return Err(DecodeError::BadMagic { what: "stream header", found: magic });
        }
        let stored = u32::from_le_bytes([b[80], b[81], b[82], b[83]]);
        let computed = crc32c::crc32c(&b[..80]);
        if stored != computed {
            return Err(DecodeError::Checksum { what: "stream header", stored, computed });
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: b[4], supported: PROTOCOL_VERSION });
        }
        let len = b[5] as usize;
        if len > MAX_SPACE_ID_LEN {
            return Err(DecodeError::TooLarge { what: "space id", len, max: MAX_SPACE_ID_LEN });
        }
        let malformed = |reason: String| DecodeError::Malformed { what: "stream header", reason };
        if b[6..8].iter().chain(&b[8 + len..72]).any(|&x| x != 0) {
            return Err(malformed("reserved bytes or space id padding are not zero".into()));
        }
        let id = std::str::from_utf8(&b[8..8 + len]).map_err(|e| malformed(e.to_string()))?;
        let space = SpaceId::new(id).map_err(|e| malformed(e.to_string()))?;
        let start_seq = Seq(u64::from_le_bytes(b[72..80].try_into().unwrap_or_default()));
        if start_seq.0 == 0 {
            return Err(malformed("start sequence 0".into()));
        }
        Ok(StreamHeader { space, start_seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let h = StreamHeader { space: SpaceId::new(&"z".repeat(64)).unwrap(), start_seq: Seq(42) };
        assert_eq!(StreamHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn stream_kinds_are_told_apart() {
        let h = StreamHeader { space: SpaceId::new("a").unwrap(), start_seq: Seq(1) }.encode();
        assert_eq!(StreamKind::from_magic([h[0], h[1], h[2], h[3]]), Ok(StreamKind::Space));
        let m = mux_preamble();
        assert_eq!(StreamKind::from_magic([m[0], m[1], m[2], m[3]]), Ok(StreamKind::Mux));
        check_mux_preamble(&m).unwrap();
        let mut bad = m;
        bad[6] = 1;
        assert!(check_mux_preamble(&bad).is_err());
        assert!(StreamKind::from_magic(*b"XXXX").is_err());
    }

    proptest! {
        #[test]
        fn prop_bit_flips_and_cuts_are_detected(bit in 0usize..STREAM_HEADER_LEN * 8, cut in 0usize..STREAM_HEADER_LEN) {
            let h = StreamHeader { space: SpaceId::new("tenant-7").unwrap(), start_seq: Seq(9) }.encode();
            let mut f = h.to_vec();
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(StreamHeader::decode(&f).is_err());
            prop_assert!(StreamHeader::decode(&h[..cut]).is_err());
        }
    }
}
