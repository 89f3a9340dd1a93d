//! Errors of the codecs: one enum for what cannot be decoded, one for what cannot be encoded.

/// Bytes from the network (or disk) that are not a valid frame or message.
///
/// Any of these means the sender is broken, corrupted in transit or hostile: close the stream it came
/// on and ask for the data again (catch-up); never act on the partial result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    /// The magic number is not ours: the peer is not speaking this protocol.
    #[error("bad magic in {what}: {found:#010x}")]
    BadMagic { what: &'static str, found: u32 },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {found} (this build speaks {supported}); upgrade the older node")]
    UnsupportedVersion { found: u8, supported: u8 },
    /// A compression codec id this build does not know.
    #[error("unknown compression codec id {0}")]
    UnknownCodec(u8),
    /// Flag bits this build does not know.
    #[error("unknown flag bits {0:#06x} in batch header")]
    UnknownFlags(u16),
    /// A checksum did not match its data.
    #[error("{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { what: &'static str, stored: u32, computed: u32 },
    /// A declared length is above the configured bound.
    #[error("{what} of {len} bytes exceeds the limit of {max}; raise the limit on both sides if this is legitimate")]
    TooLarge { what: &'static str, len: usize, max: usize },
    /// Two declared lengths or counts disagree.
    #[error("inconsistent {what}: declared {declared}, found {actual}")]
    Inconsistent { what: &'static str, declared: u64, actual: u64 },
    /// Decompression failed or produced a different length than declared.
    #[error("{codec} decompression failed: {reason}")]
    Decompress { codec: &'static str, reason: String },
    /// An entry's own checksum does not match: the entry was corrupted somewhere between the primary's
    /// WAL and here.
    #[error("entry {seq} checksum mismatch")]
    EntryChecksum { seq: u64 },
    /// A postcard message that does not parse or is not one we know.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// A batch that cannot be built from the entries given: a bug or a misconfiguration of the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// No entries were given.
    #[error("a batch needs at least one entry")]
    Empty,
    /// Entries are not consecutive sequence numbers.
    #[error("entries are not contiguous: expected seq {expected}, found {found}")]
    NotContiguous { expected: u64, found: u64 },
    /// Entries from different epochs: a batch carries one epoch, split it there.
    #[error("entries of epochs {first} and {other} in one batch; split the batch at the epoch change")]
    MixedEpochs { first: u64, other: u64 },
    /// The batch would exceed the frame limits.
    #[error("batch of {len} bytes exceeds the limit of {max}; send fewer entries per batch")]
    TooLarge { len: usize, max: usize },
    /// Compression failed (should not happen with a valid level).
    #[error("{codec} compression failed: {reason}")]
    Compress { codec: &'static str, reason: String },
    /// A control message could not be serialized.
    #[error("control message could not be serialized: {0}")]
    Serialize(String),
}
