//! Bytes <-> types, with no I/O: everything a primary and a replica say to each other.
//!
//! The byte layouts are specified in `docs/PROTOCOL.md`; this module is the one place in code that
//! defines them. Every decoder takes untrusted bytes: lengths are bounded, checksums are checked,
//! unknown versions and codecs are rejected, and nothing panics whatever the input.
//!
//! - [`batch`]: the batch frame shipped on a space's data stream.
//! - [`compression`]: per-batch none / lz4 / zstd, bounded decompression.
//! - [`stream`]: the header that opens each space's data stream.
//! - [`control`]: control-stream messages (postcard, length-prefixed).
//! - [`heartbeat`]: heartbeat datagrams.

pub mod batch;
pub mod compression;
pub mod control;
mod error;
pub mod heartbeat;
pub mod stream;

pub use batch::{BatchDecoder, BatchEncoder, BatchHeader, CodecCounts, DecodedBatch, FrameLimits, BATCH_HEADER_LEN};
pub use compression::Compression;
pub use control::{ControlMessage, ErrorCode};
pub use error::{DecodeError, EncodeError};
pub use heartbeat::Heartbeat;
pub use stream::StreamHeader;

/// Decodes exactly one postcard value from `b`: malformed input and trailing bytes are both
/// `Malformed { what }`.
fn decode_postcard<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, DecodeError> {
    let malformed = |reason: String| DecodeError::Malformed { what, reason };
    let (value, rest) = postcard::take_from_bytes::<T>(b).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Version of the wire protocol spoken by this build. Frames and hellos of another version are refused.
pub const PROTOCOL_VERSION: u8 = 3;
