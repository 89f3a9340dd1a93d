//! The batch frame: the unit a primary ships on a space's data stream and a replica validates before
//! it persists.
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0  magic u32 "WSB1"     4 version u8      5 codec u8         6 flags u16
//!   8  primary node id u64 16 epoch u64      24 start seq u64
//!  32  entry count u32     36 space tag u32  40 uncompressed len u32
//!  44  payload len u32     48 payload crc32c u32
//!  52  reserved (zero) 8 bytes               60 header crc32c u32 (over bytes 0..60)
//! payload (payload len bytes, compressed with `codec`), which uncompresses to `count` entries:
//!   timestamp_us u64 | kind u8 | len u32 | entry crc32c u32 | bytes[len]
//! ```
//! An entry's sequence is `start seq + its index`; its epoch is the batch's. The entry crc is the one
//! the primary's WAL computed ([`crate::entry::entry_crc`]), so a replica verifies every entry on its own.

use bytes::{BufMut, Bytes, BytesMut};

use super::compression::{Codec, Compression, Compressor, Decompressor, DEFAULT_MIN_COMPRESS_BYTES};
use super::error::{DecodeError, EncodeError};
use super::PROTOCOL_VERSION;
use crate::entry::Entry;
use crate::types::{Epoch, NodeId, Seq, SpaceId};

/// `"WSB1"` read as a little-endian u32.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"WSB1");
/// Size of the fixed batch header.
pub const BATCH_HEADER_LEN: usize = 64;
/// Size of an entry's header inside the payload.
pub const ENTRY_HEADER_LEN: usize = 17;
/// Flag: a codec was configured but the batch went uncompressed (too small, or not smaller compressed).
pub const FLAG_COMPRESSION_SKIPPED: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_COMPRESSION_SKIPPED;

/// Default bound on a batch's uncompressed payload: room for the largest entry the WAL accepts by
/// default (16 MiB) with its header, small enough that a hostile header cannot make a replica
/// allocate much.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Bounds a decoder enforces before it allocates anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest uncompressed payload accepted (and, since compression never grows a sent payload, the
    /// largest payload on the wire).
    pub max_batch_bytes: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { max_batch_bytes: DEFAULT_MAX_BATCH_BYTES }
    }
}

/// A space id's 32-bit tag in batch headers, so a batch delivered to the wrong space is refused.
pub fn space_tag(space: &SpaceId) -> u32 {
    crc32c::crc32c(space.as_str().as_bytes())
}

/// The decoded fixed header of a batch frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Protocol version of the frame.
    pub version: u8,
    /// How the payload is compressed.
    pub codec: Codec,
    /// Flag bits (see `FLAG_*`).
    pub flags: u16,
    /// The primary that built the batch.
    pub primary: NodeId,
    /// Epoch the batch's entries were written in.
    pub epoch: Epoch,
    /// Sequence of the first entry.
    pub start_seq: Seq,
    /// Number of entries.
    pub count: u32,
    /// [`space_tag`] of the space the batch belongs to.
    pub space_tag: u32,
    /// Length of the payload once uncompressed.
    pub uncompressed_len: u32,
    /// Length of the payload as sent.
    pub payload_len: u32,
    /// CRC32C of the payload as sent.
    pub payload_crc: u32,
}

impl BatchHeader {
    /// Sequence of the last entry.
    pub fn last_seq(&self) -> Seq {
        Seq(self.start_seq.0 + u64::from(self.count) - 1)
    }

    /// Sets the payload checksum from `frame` (this header's room, then the payload) and writes the
    /// header into its first bytes.
    fn seal(&mut self, frame: &mut [u8]) {
        self.payload_crc = crc32c::crc32c(&frame[BATCH_HEADER_LEN..]);
        self.write(frame);
    }

    fn write(&self, out: &mut [u8]) {
        let out = &mut out[..BATCH_HEADER_LEN];
        out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        out[4] = self.version;
        out[5] = self.codec as u8;
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.primary.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.start_seq.0.to_le_bytes());
        out[32..36].copy_from_slice(&self.count.to_le_bytes());
        out[36..40].copy_from_slice(&self.space_tag.to_le_bytes());
        out[40..44].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        out[44..48].copy_from_slice(&self.payload_len.to_le_bytes());
        out[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        out[52..60].fill(0);
        let crc = crc32c::crc32c(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses and validates a header: magic, checksum, version, codec, flags, and every length against
    /// `limits`, so the caller can then read exactly `payload_len` bytes without further checks.
    pub fn decode(bytes: &[u8], limits: &FrameLimits) -> Result<BatchHeader, DecodeError> {
        let b: &[u8; BATCH_HEADER_LEN] = bytes
            .get(..BATCH_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(DecodeError::Truncated { what: "batch header", need: BATCH_HEADER_LEN, have: bytes.len() })?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at =
            |i: usize| u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let magic = u32_at(0);
        if magic != BATCH_MAGIC {
            return Err(DecodeError::BadMagic { what: "batch header", found: magic });
        }
        let (stored, computed) = (u32_at(60), crc32c::crc32c(&b[..60]));
        if stored != computed {
            return Err(DecodeError::Checksum { what: "batch header", stored, computed });
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: b[4], supported: PROTOCOL_VERSION });
        }
        let codec = Codec::from_u8(b[5])?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags(flags & !KNOWN_FLAGS));
        }
        // Reserved for a later version: a sender that sets them means something this one cannot do.
        if b[52..60].iter().any(|&x| x != 0) {
            return Err(DecodeError::Malformed {
                what: "batch header",
                reason: "reserved bytes 52..60 are not zero".into(),
            });
        }
        let header = BatchHeader {
            version: b[4],
            codec,
            flags,
            primary: NodeId(u64_at(8)),
            epoch: Epoch(u64_at(16)),
            start_seq: Seq(u64_at(24)),
            count: u32_at(32),
            space_tag: u32_at(36),
            uncompressed_len: u32_at(40),
            payload_len: u32_at(44),
            payload_crc: u32_at(48),
        };
        let max = limits.max_batch_bytes;
        for (what, len) in [("uncompressed payload", header.uncompressed_len), ("payload", header.payload_len)] {
            if len as usize > max {
                return Err(DecodeError::TooLarge { what, len: len as usize, max });
            }
        }
        let min_len = u64::from(header.count) * ENTRY_HEADER_LEN as u64;
        if header.count == 0 || min_len > u64::from(header.uncompressed_len) {
            return Err(DecodeError::Inconsistent {
                what: "entry count",
                declared: header.count.into(),
                actual: u64::from(header.uncompressed_len) / ENTRY_HEADER_LEN as u64,
            });
        }
        if header.codec == Codec::None && header.payload_len != header.uncompressed_len {
            return Err(DecodeError::Inconsistent {
                what: "uncompressed payload length",
                declared: header.uncompressed_len.into(),
                actual: header.payload_len.into(),
            });
        }
        if header.start_seq.0 == 0 || header.start_seq.0.checked_add(u64::from(header.count)).is_none() {
            return Err(DecodeError::Inconsistent { what: "start sequence", declared: header.start_seq.0, actual: 0 });
        }
        Ok(header)
    }
}

/// Batches by what the codec did with them: what a user comparing codecs needs to know, since a
/// batch under the compression threshold goes out uncompressed whatever the codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CodecCounts {
    /// Compressed (the payload shrank).
    pub compressed: u64,
    /// Sent uncompressed: its payload was under the encoder's `min_compress_bytes`.
    pub too_small: u64,
    /// Sent uncompressed: compressing did not shrink it.
    pub incompressible: u64,
    /// Payload bytes of all batches before the codec (entry headers included).
    pub bytes_in: u64,
    /// Payload bytes of all batches as sent.
    pub bytes_out: u64,
}

impl CodecCounts {
    /// What was counted since `earlier` (a snapshot of the same counter).
    pub fn since(&self, earlier: &CodecCounts) -> CodecCounts {
        CodecCounts {
            compressed: self.compressed.saturating_sub(earlier.compressed),
            too_small: self.too_small.saturating_sub(earlier.too_small),
            incompressible: self.incompressible.saturating_sub(earlier.incompressible),
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
        }
    }
}

impl std::ops::AddAssign for CodecCounts {
    fn add_assign(&mut self, o: CodecCounts) {
        self.compressed += o.compressed;
        self.too_small += o.too_small;
        self.incompressible += o.incompressible;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }
}

/// Builds batch frames. Keeps compression contexts between batches (no buffers: each shipper has
/// an encoder, and a buffer kept per space would add up with thousands of spaces).
pub struct BatchEncoder {
    primary: NodeId,
    compression: Compression,
    min_compress_bytes: usize,
    limits: FrameLimits,
    compressor: Compressor,
    counts: CodecCounts,
}

impl BatchEncoder {
    /// An encoder for batches sent by `primary`, compressing with `compression` above
    /// [`DEFAULT_MIN_COMPRESS_BYTES`].
    pub fn new(primary: NodeId, compression: Compression) -> BatchEncoder {
        BatchEncoder {
            primary,
            compression,
            min_compress_bytes: DEFAULT_MIN_COMPRESS_BYTES,
            limits: FrameLimits::default(),
            compressor: Compressor::new(),
            counts: CodecCounts::default(),
        }
    }

    /// What the codec did with the batches encoded so far.
    pub fn counts(&self) -> CodecCounts {
        self.counts
    }

    /// Payloads smaller than this go uncompressed.
    pub fn with_min_compress_bytes(mut self, min: usize) -> Self {
        self.min_compress_bytes = min;
        self
    }

    /// Bounds the batches this encoder will build (within the receiver's limits).
    pub fn with_limits(mut self, limits: FrameLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Uncompressed payload size of `entries` in a batch.
    pub fn payload_len(entries: &[Entry]) -> usize {
        entries.iter().map(|e| ENTRY_HEADER_LEN + e.payload.len()).sum()
    }

    /// Encodes contiguous entries of one epoch into one frame (header + payload) as a single `Bytes`.
    pub fn encode(&mut self, space: &SpaceId, entries: &[Entry]) -> Result<Bytes, EncodeError> {
        let mut parts = Vec::new();
        let len = self.encode_parts(space, entries, &mut parts)?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let mut frame = BytesMut::with_capacity(len);
        parts.iter().for_each(|p| frame.put_slice(p));
        Ok(frame.freeze())
    }

    /// Encodes like [`BatchEncoder::encode`], but appends the frame to `parts` as pieces whose
    /// concatenation is the frame, and returns its length. An uncompressed frame refers to payloads
    /// of [`ZERO_COPY_MIN_ENTRY`] bytes or more instead of copying them (they are slices of the WAL's
    /// buffers, which the sender then keeps until the transport has sent them); what is written for
    /// smaller payloads, entry headers and the batch header is copied into one buffer.
    pub fn encode_parts(
        &mut self,
        space: &SpaceId,
        entries: &[Entry],
        parts: &mut Vec<Bytes>,
    ) -> Result<usize, EncodeError> {
        let first = entries.first().ok_or(EncodeError::Empty)?;
        let raw_len = Self::payload_len(entries);
        if raw_len > self.limits.max_batch_bytes || entries.len() > u32::MAX as usize {
            return Err(EncodeError::TooLarge { len: raw_len, max: self.limits.max_batch_bytes });
        }
        for (i, e) in entries.iter().enumerate() {
            let expected = first.seq.0 + i as u64;
            if e.seq.0 != expected {
                return Err(EncodeError::NotContiguous { expected, found: e.seq.0 });
            }
            if e.epoch != first.epoch {
                return Err(EncodeError::MixedEpochs { first: first.epoch.0, other: e.epoch.0 });
            }
        }
        let mut header = BatchHeader {
            version: PROTOCOL_VERSION,
            codec: Codec::None,
            flags: 0,
            primary: self.primary,
            epoch: first.epoch,
            start_seq: first.seq,
            count: entries.len() as u32,
            space_tag: space_tag(space),
            uncompressed_len: raw_len as u32,
            payload_len: raw_len as u32,
            payload_crc: 0,
        };
        self.counts.bytes_in += raw_len as u64;
        if self.compression != Compression::None {
            if raw_len >= self.min_compress_bytes {
                return self.encode_compressed(header, entries, raw_len, parts);
            }
            header.flags |= FLAG_COMPRESSION_SKIPPED;
            self.counts.too_small += 1;
        }
        self.counts.bytes_out += raw_len as u64;
        Ok(encode_referencing(header, entries, raw_len, parts))
    }

    /// Copies the payload into one buffer and compresses it; sends it uncompressed (flagged) if it
    /// does not shrink.
    fn encode_compressed(
        &mut self,
        mut header: BatchHeader,
        entries: &[Entry],
        raw_len: usize,
        parts: &mut Vec<Bytes>,
    ) -> Result<usize, EncodeError> {
        let mut raw = BytesMut::with_capacity(BATCH_HEADER_LEN + raw_len);
        raw.put_bytes(0, BATCH_HEADER_LEN);
        for e in entries {
            put_entry_header(&mut raw, e);
            raw.put_slice(&e.payload);
        }
        let mut out = vec![0u8; BATCH_HEADER_LEN];
        let n = self.compressor.compress(self.compression, &raw[BATCH_HEADER_LEN..], &mut out)?;
        let frame = if n < raw_len {
            header.codec = self.compression.codec();
            header.payload_len = n as u32;
            header.seal(&mut out);
            self.counts.compressed += 1;
            self.counts.bytes_out += n as u64;
            Bytes::from(out)
        } else {
            header.flags |= FLAG_COMPRESSION_SKIPPED;
            header.seal(&mut raw);
            self.counts.incompressible += 1;
            self.counts.bytes_out += raw_len as u64;
            raw.freeze()
        };
        let len = frame.len();
        parts.push(frame);
        Ok(len)
    }
}

/// Payloads at least this long go out as references to the entry's own buffer rather than copies.
/// The transport then holds that buffer until the frame is acknowledged: for entries from the
/// memory tail that is the payload the writer appended; for entries read from disk, the read's
/// buffer (sized to the read, at most 4 MiB).
/// Below it, copying is cheaper: quinn 0.11 finds the piece holding a stream offset by walking its
/// send buffer's pieces in order, so many small pieces cost more than the copy they save (with a
/// 1 KiB threshold, 4 KiB entries replicated 7-13% slower in `cargo bench --bench ceiling`).
pub const ZERO_COPY_MIN_ENTRY: usize = 64 * 1024;

fn put_entry_header(out: &mut BytesMut, e: &Entry) {
    out.put_u64_le(e.timestamp_us);
    out.put_u8(e.kind);
    out.put_u32_le(e.payload.len() as u32);
    out.put_u32_le(e.crc);
}

/// An uncompressed frame as pieces: one buffer with the batch header, every entry header and the
/// small payloads, cut around references to the large payloads. The checksum runs over the
/// payload in frame order as it is laid out.
fn encode_referencing(mut header: BatchHeader, entries: &[Entry], raw_len: usize, parts: &mut Vec<Bytes>) -> usize {
    let copied: usize = entries.iter().map(|e| e.payload.len()).filter(|&n| n < ZERO_COPY_MIN_ENTRY).sum::<usize>();
    let mut own = BytesMut::with_capacity(BATCH_HEADER_LEN + entries.len() * ENTRY_HEADER_LEN + copied);
    own.put_bytes(0, BATCH_HEADER_LEN);
    // Where, in `own`, each referenced payload goes.
    let mut cuts: Vec<(usize, &Bytes)> = Vec::new();
    let mut crc = 0u32;
    for e in entries {
        let at = own.len();
        put_entry_header(&mut own, e);
        if e.payload.len() >= ZERO_COPY_MIN_ENTRY {
            crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, &own[at..]), &e.payload);
            cuts.push((own.len(), &e.payload));
        } else {
            own.put_slice(&e.payload);
            crc = crc32c::crc32c_append(crc, &own[at..]);
        }
    }
    header.payload_crc = crc;
    header.write(&mut own[..BATCH_HEADER_LEN]);
    let own = own.freeze();
    let mut from = 0;
    for (at, payload) in cuts {
        parts.push(own.slice(from..at));
        parts.push(payload.clone());
        from = at;
    }
    if from < own.len() {
        parts.push(own.slice(from..));
    }
    BATCH_HEADER_LEN + raw_len
}

/// A validated batch: its header and its entries, whose payloads are slices of one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedBatch {
    /// The frame's header.
    pub header: BatchHeader,
    /// The entries, in sequence order, each with its checksum verified.
    pub entries: Vec<Entry>,
}

/// Validates and decodes batch frames. Keeps a decompression context between batches.
pub struct BatchDecoder {
    limits: FrameLimits,
    decompressor: Decompressor,
}

impl BatchDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: FrameLimits) -> BatchDecoder {
        BatchDecoder { limits, decompressor: Decompressor::new() }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// Decodes a whole frame (header followed by exactly its payload).
    pub fn decode(&mut self, frame: Bytes) -> Result<DecodedBatch, DecodeError> {
        let header = BatchHeader::decode(&frame, &self.limits)?;
        let payload = frame.slice(BATCH_HEADER_LEN..);
        self.decode_payload(header, payload)
    }

    /// Decodes the payload that follows an already validated header (as read from a stream: header
    /// first, then exactly `header.payload_len` bytes).
    pub fn decode_payload(&mut self, header: BatchHeader, payload: Bytes) -> Result<DecodedBatch, DecodeError> {
        if payload.len() != header.payload_len as usize {
            return Err(DecodeError::Inconsistent {
                what: "payload length",
                declared: header.payload_len.into(),
                actual: payload.len() as u64,
            });
        }
        let computed = crc32c::crc32c(&payload);
        if computed != header.payload_crc {
            return Err(DecodeError::Checksum { what: "batch payload", stored: header.payload_crc, computed });
        }
        let raw = match header.codec {
            Codec::None => payload,
            codec => {
                // Bounded: uncompressed_len was checked against the limits by BatchHeader::decode.
                let mut out = BytesMut::zeroed(header.uncompressed_len as usize);
                self.decompressor.decompress(codec, &payload, &mut out)?;
                out.freeze()
            }
        };
        let entries = parse_entries(&header, &raw)?;
        Ok(DecodedBatch { header, entries })
    }
}

fn parse_entries(header: &BatchHeader, raw: &Bytes) -> Result<Vec<Entry>, DecodeError> {
    // The count is the peer's word, but no more entries fit in `raw` (received and decompressed
    // already) than it has entry headers: reserving exactly that many holds the entries in one
    // allocation, never twice their size after a doubling.
    let mut entries = Vec::with_capacity((header.count as usize).min(raw.len() / ENTRY_HEADER_LEN));
    let mut pos = 0usize;
    for i in 0..u64::from(header.count) {
        let rest = &raw[pos..];
        if rest.len() < ENTRY_HEADER_LEN {
            return Err(DecodeError::Truncated { what: "entry header", need: ENTRY_HEADER_LEN, have: rest.len() });
        }
        let timestamp_us = u64::from_le_bytes(rest[0..8].try_into().unwrap_or_default());
        let kind = rest[8];
        let len = u32::from_le_bytes(rest[9..13].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[13..17].try_into().unwrap_or_default());
        if len > rest.len() - ENTRY_HEADER_LEN {
            return Err(DecodeError::Truncated {
                what: "entry payload",
                need: len,
                have: rest.len() - ENTRY_HEADER_LEN,
            });
        }
        let start = pos + ENTRY_HEADER_LEN;
        let entry = Entry {
            seq: Seq(header.start_seq.0 + i),
            epoch: header.epoch,
            timestamp_us,
            kind,
            payload: raw.slice(start..start + len),
            crc,
        };
        if !entry.verify() {
            return Err(DecodeError::EntryChecksum { seq: entry.seq.0 });
        }
        entries.push(entry);
        pos = start + len;
    }
    if pos != raw.len() {
        return Err(DecodeError::Inconsistent {
            what: "payload length after the last entry",
            declared: pos as u64,
            actual: raw.len() as u64,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn space() -> SpaceId {
        SpaceId::new("space-1").unwrap()
    }

    fn entries(start: u64, payloads: &[Vec<u8>], kind: u8) -> Vec<Entry> {
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry::new(Seq(start + i as u64), Epoch(3), 1_000 + i as u64, kind, Bytes::from(p.clone())))
            .collect()
    }

    /// `len` seeded pseudo-random bytes (xorshift): a payload no codec shrinks.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn codecs() -> [Compression; 4] {
        [Compression::None, Compression::Lz4, Compression::zstd(), Compression::Zstd { level: 5 }]
    }

    #[test]
    fn round_trip_each_codec_and_compresses_repetitive_payloads() {
        let payloads: Vec<Vec<u8>> =
            (0..200).map(|i| format!("user={i} action=update field=name value=alice").into_bytes()).collect();
        let es = entries(10, &payloads, 2);
        for c in codecs() {
            let frame = BatchEncoder::new(NodeId(7), c).encode(&space(), &es).unwrap();
            let header = BatchHeader::decode(&frame, &FrameLimits::default()).unwrap();
            assert_eq!(header.codec, c.codec());
            if c != Compression::None {
                assert!((header.payload_len as usize) < BatchEncoder::payload_len(&es) / 2);
            }
            let batch = BatchDecoder::new(FrameLimits::default()).decode(frame).unwrap();
            assert_eq!(batch.entries, es);
            assert_eq!(batch.header.space_tag, space_tag(&space()));
            assert_eq!(batch.header.last_seq(), Seq(209));
        }
    }

    #[test]
    fn small_or_incompressible_batches_go_uncompressed() {
        let es = entries(1, &[b"tiny".to_vec()], 0);
        let frame = BatchEncoder::new(NodeId(1), Compression::Lz4).encode(&space(), &es).unwrap();
        let h = BatchHeader::decode(&frame, &FrameLimits::default()).unwrap();
        assert_eq!((h.codec, h.flags), (Codec::None, FLAG_COMPRESSION_SKIPPED));

        let es = entries(1, &[noise(8192, 0x1234_5678)], 0);
        let frame = BatchEncoder::new(NodeId(1), Compression::Lz4).encode(&space(), &es).unwrap();
        let h = BatchHeader::decode(&frame, &FrameLimits::default()).unwrap();
        assert_eq!((h.codec, h.flags), (Codec::None, FLAG_COMPRESSION_SKIPPED));
        assert_eq!(BatchDecoder::new(FrameLimits::default()).decode(frame).unwrap().entries, es);
    }

    #[test]
    fn counts_say_what_the_codec_did_with_each_batch() {
        let repetitive: Vec<Vec<u8>> = (0..200).map(|i| format!("user={i} action=update").into_bytes()).collect();
        let (big, tiny, random) =
            (entries(1, &repetitive, 0), entries(1, &[b"tiny".to_vec()], 0), entries(1, &[noise(8192, 7)], 0));
        let mut enc = BatchEncoder::new(NodeId(1), Compression::Lz4);
        let mut sent = 0;
        for es in [&big, &tiny, &random, &tiny] {
            sent += BatchHeader::decode(&enc.encode(&space(), es).unwrap(), &FrameLimits::default())
                .unwrap()
                .payload_len as u64;
        }
        let c = enc.counts();
        assert_eq!((c.compressed, c.too_small, c.incompressible), (1, 2, 1));
        let before = [&big, &tiny, &random, &tiny].iter().map(|es| BatchEncoder::payload_len(es) as u64).sum::<u64>();
        assert_eq!((c.bytes_in, c.bytes_out), (before, sent));
        assert!(c.bytes_out < c.bytes_in);

        // Without a codec, nothing is counted as skipped.
        let mut plain = BatchEncoder::new(NodeId(1), Compression::None);
        plain.encode(&space(), &tiny).unwrap();
        let (c, len) = (plain.counts(), BatchEncoder::payload_len(&tiny) as u64);
        assert_eq!((c.compressed, c.too_small, c.incompressible, c.bytes_in, c.bytes_out), (0, 0, 0, len, len));
    }

    #[test]
    fn encoder_rejects_bad_entry_sets() {
        let mut enc = BatchEncoder::new(NodeId(1), Compression::None);
        assert_eq!(enc.encode(&space(), &[]), Err(EncodeError::Empty));
        let mut es = entries(1, &[b"a".to_vec(), b"b".to_vec()], 0);
        es[1] = Entry::new(Seq(3), Epoch(3), 0, 0, Bytes::new());
        assert!(matches!(enc.encode(&space(), &es), Err(EncodeError::NotContiguous { .. })));
        es[1] = Entry::new(Seq(2), Epoch(4), 0, 0, Bytes::new());
        assert!(matches!(enc.encode(&space(), &es), Err(EncodeError::MixedEpochs { .. })));
    }

    #[test]
    fn lying_lengths_are_refused_before_allocation() {
        let es = entries(1, &[vec![b'a'; 10_000]], 0);
        let frame = BatchEncoder::new(NodeId(1), Compression::Lz4).encode(&space(), &es).unwrap();
        // Rewrite the uncompressed length to 4 GiB - 1 and fix up the header checksum: a decompression
        // bomb announcement. It must be refused by the limit, not allocated.
        let mut bomb = frame.to_vec();
        bomb[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&bomb[..60]);
        bomb[60..64].copy_from_slice(&crc.to_le_bytes());
        let err = BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(bomb)).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");

        // Declared slightly larger than the truth, within limits: decompression must fail cleanly.
        let mut liar = frame.to_vec();
        let real = u32::from_le_bytes(liar[40..44].try_into().unwrap());
        liar[40..44].copy_from_slice(&(real + 100).to_le_bytes());
        let crc = crc32c::crc32c(&liar[..60]);
        liar[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(liar)).is_err());
    }

    /// The frame layout of the module docs, written out independently of the encoder (no compression).
    fn reference_frame(primary: NodeId, es: &[Entry], flags: u16) -> Vec<u8> {
        let mut payload = Vec::new();
        for e in es {
            payload.extend(e.timestamp_us.to_le_bytes());
            payload.push(e.kind);
            payload.extend((e.payload.len() as u32).to_le_bytes());
            payload.extend(e.crc.to_le_bytes());
            payload.extend(&e.payload[..]);
        }
        let mut f = Vec::new();
        f.extend(b"WSB1");
        f.extend([PROTOCOL_VERSION, Codec::None as u8]);
        f.extend(flags.to_le_bytes());
        f.extend(primary.0.to_le_bytes());
        f.extend(es[0].epoch.0.to_le_bytes());
        f.extend(es[0].seq.0.to_le_bytes());
        f.extend((es.len() as u32).to_le_bytes());
        f.extend(space_tag(&space()).to_le_bytes());
        f.extend((payload.len() as u32).to_le_bytes());
        f.extend((payload.len() as u32).to_le_bytes());
        f.extend(crc32c::crc32c(&payload).to_le_bytes());
        f.extend([0u8; 8]);
        let crc = crc32c::crc32c(&f);
        f.extend(crc.to_le_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn large_payloads_are_referenced_not_copied() {
        let payloads =
            [vec![b'a'; 10], vec![b'b'; ZERO_COPY_MIN_ENTRY], vec![b'c'; 2 * ZERO_COPY_MIN_ENTRY + 5], vec![b'd'; 3]];
        let es = entries(5, &payloads, 1);
        for c in [Compression::None, Compression::Lz4] {
            // lz4 skips compression below its threshold, and so refers to payloads too.
            let mut enc = BatchEncoder::new(NodeId(2), c).with_min_compress_bytes(1 << 20);
            let mut parts = Vec::new();
            let len = enc.encode_parts(&space(), &es, &mut parts).unwrap();
            // header + a's header and bytes + b's header | b | c's header | c | d's header and bytes
            assert_eq!(parts.len(), 5);
            assert_eq!(parts[1].as_ptr(), es[1].payload.as_ptr());
            assert_eq!(parts[3].as_ptr(), es[2].payload.as_ptr());
            let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(joined.len(), len);
            let flags = if c == Compression::None { 0 } else { FLAG_COMPRESSION_SKIPPED };
            assert_eq!(joined, reference_frame(NodeId(2), &es, flags));
            assert_eq!(joined, enc.encode(&space(), &es).unwrap().to_vec());
            assert_eq!(BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(joined)).unwrap().entries, es);
        }
    }

    /// A frame of many empty entries (17 bytes each on the wire, 64 in memory) holds them in one
    /// allocation of exactly their number: growing by doubling could take up to twice that.
    #[test]
    fn entries_of_a_frame_take_one_allocation_of_their_number() {
        let es = entries(1, &vec![Vec::new(); 10_000], 0);
        let frame = BatchEncoder::new(NodeId(1), Compression::None).encode(&space(), &es).unwrap();
        let decoded = BatchDecoder::new(FrameLimits::default()).decode(frame).unwrap();
        assert_eq!(decoded.entries, es);
        assert_eq!(decoded.entries.capacity(), es.len());
    }

    #[test]
    fn unknown_version_and_codec_are_refused() {
        let es = entries(1, &[b"x".to_vec()], 0);
        let frame = BatchEncoder::new(NodeId(1), Compression::None).encode(&space(), &es).unwrap();
        for (at, value) in [(4usize, 9u8), (5, 7)] {
            let mut f = frame.to_vec();
            f[at] = value;
            let crc = crc32c::crc32c(&f[..60]);
            f[60..64].copy_from_slice(&crc.to_le_bytes());
            let err = BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(f)).unwrap_err();
            assert!(matches!(err, DecodeError::UnsupportedVersion { .. } | DecodeError::UnknownCodec(_)), "{err}");
        }
    }

    fn arb_payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                (0usize..400).prop_map(|n| b"key=value;".iter().cycle().take(n).copied().collect()),
                // Around the size from which the encoder refers to payloads instead of copying them.
                (ZERO_COPY_MIN_ENTRY - 2..ZERO_COPY_MIN_ENTRY + 2).prop_map(|n| vec![b'z'; n]),
            ],
            1..40,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn prop_round_trip(payloads in arb_payloads(), start in 1u64..1_000_000, kind: u8, c in 0usize..4, min in prop_oneof![Just(0usize), Just(4096)]) {
            let es = entries(start, &payloads, kind);
            let frame = BatchEncoder::new(NodeId(9), codecs()[c]).with_min_compress_bytes(min).encode(&space(), &es).unwrap();
            let batch = BatchDecoder::new(FrameLimits::default()).decode(frame).unwrap();
            prop_assert_eq!(batch.entries, es);
        }

        #[test]
        fn prop_uncompressed_frames_match_the_documented_layout(payloads in arb_payloads(), start in 1u64..1_000_000, skip in any::<bool>()) {
            let es = entries(start, &payloads, 4);
            let (c, flags) = if skip { (Compression::Lz4, FLAG_COMPRESSION_SKIPPED) } else { (Compression::None, 0) };
            let mut enc = BatchEncoder::new(NodeId(9), c).with_min_compress_bytes(usize::MAX);
            let mut parts = Vec::new();
            let len = enc.encode_parts(&space(), &es, &mut parts).unwrap();
            let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            prop_assert_eq!(joined.len(), len);
            prop_assert_eq!(joined, reference_frame(NodeId(9), &es, flags));
        }

        #[test]
        fn prop_any_bit_flip_is_detected(payloads in arb_payloads(), c in 0usize..4, bit in any::<prop::sample::Index>()) {
            let es = entries(1, &payloads, 1);
            let frame = BatchEncoder::new(NodeId(9), codecs()[c]).with_min_compress_bytes(0).encode(&space(), &es).unwrap();
            let mut f = frame.to_vec();
            let bit = bit.index(f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(f)).is_err());
        }

        #[test]
        fn prop_any_cut_is_detected(payloads in arb_payloads(), c in 0usize..4, cut in any::<prop::sample::Index>()) {
            let es = entries(1, &payloads, 1);
            let frame = BatchEncoder::new(NodeId(9), codecs()[c]).with_min_compress_bytes(0).encode(&space(), &es).unwrap();
            let cut = cut.index(frame.len());
            prop_assert!(BatchDecoder::new(FrameLimits::default()).decode(frame.slice(..cut)).is_err());
        }

        #[test]
        fn prop_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(bytes));
        }
    }
}
