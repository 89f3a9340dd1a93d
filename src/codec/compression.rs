//! Per-batch compression: none, lz4 (lz4_flex block format) or zstd.
//!
//! Decompression is bounded by the declared uncompressed length, which the caller has already
//! checked against its configured maximum: a lying header or a decompression bomb is an error,
//! never an allocation of what the peer asked for.

use serde::{Deserialize, Serialize};

use super::error::{DecodeError, EncodeError};

/// Below this many payload bytes a batch is sent uncompressed: compressing costs more than it saves
/// (lz4 on 1 KiB batches gains far less than on 64 KiB ones; see docs/PERFORMANCE.md).
pub const DEFAULT_MIN_COMPRESS_BYTES: usize = 4 * 1024;

/// Default zstd level: fast, and already well ahead of lz4 on ratio for log payloads.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// What a primary tries when it builds a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Send payloads as they are.
    None,
    /// lz4 block format: fast, moderate ratio. The default.
    #[default]
    Lz4,
    /// zstd at the given level (1..=22; 1 is fast).
    Zstd { level: i32 },
}

impl Compression {
    /// zstd at [`DEFAULT_ZSTD_LEVEL`].
    pub const fn zstd() -> Compression {
        Compression::Zstd { level: DEFAULT_ZSTD_LEVEL }
    }

    /// The codec id this compression writes into a batch header.
    pub fn codec(self) -> Codec {
        match self {
            Compression::None => Codec::None,
            Compression::Lz4 => Codec::Lz4,
            Compression::Zstd { .. } => Codec::Zstd,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    /// Parses `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::zstd()),
            _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=22).contains(&level) => Ok(Compression::Zstd { level }),
                _ => Err(format!("unknown compression {s:?}: use none, lz4, zstd or zstd:1..22")),
            },
        }
    }
}

impl std::fmt::Display for Compression {
    /// The form [`Compression::from_str`](std::str::FromStr) parses: `none`, `lz4` or `zstd:LEVEL`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// Codec id as written in a batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Payload stored as is.
    None = 0,
    /// lz4 block format, no size prefix (the header carries the uncompressed length).
    Lz4 = 1,
    /// A zstd frame.
    Zstd = 2,
}

impl Codec {
    /// Parses a header's codec byte.
    pub fn from_u8(b: u8) -> Result<Codec, DecodeError> {
        match b {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Lz4),
            2 => Ok(Codec::Zstd),
            other => Err(DecodeError::UnknownCodec(other)),
        }
    }

    /// Lowercase name, for errors and reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// Reusable compression state (a zstd context is expensive to create; keep one per encoder).
pub(crate) struct Compressor {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Compressor {
    pub(crate) fn new() -> Compressor {
        Compressor { zstd: None }
    }

    /// Appends the compressed form of `input` to `out`. Returns the number of bytes appended.
    pub(crate) fn compress(
        &mut self,
        compression: Compression,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        let start = out.len();
        match compression {
            Compression::None => out.extend_from_slice(input),
            Compression::Lz4 => {
                out.resize(start + lz4_flex::block::get_maximum_output_size(input.len()), 0);
                let n = lz4_flex::block::compress_into(input, &mut out[start..])
                    .map_err(|e| EncodeError::Compress { codec: "lz4", reason: e.to_string() })?;
                out.truncate(start + n);
            }
            Compression::Zstd { level } => {
                let ctx = match &mut self.zstd {
                    Some((l, ctx)) if *l == level => ctx,
                    slot => {
                        let ctx = zstd::bulk::Compressor::new(level)
                            .map_err(|e| EncodeError::Compress { codec: "zstd", reason: e.to_string() })?;
                        &mut slot.insert((level, ctx)).1
                    }
                };
                out.resize(start + zstd::zstd_safe::compress_bound(input.len()), 0);
                let n = ctx
                    .compress_to_buffer(input, &mut out[start..])
                    .map_err(|e| EncodeError::Compress { codec: "zstd", reason: e.to_string() })?;
                out.truncate(start + n);
            }
        }
        Ok(out.len() - start)
    }
}

/// Reusable decompression state.
pub(crate) struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    pub(crate) fn new() -> Decompressor {
        Decompressor { zstd: None }
    }

    /// Decompresses `input` into `out`, which has exactly the declared uncompressed length; anything
    /// that does not fill it exactly is an error.
    pub(crate) fn decompress(&mut self, codec: Codec, input: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
        let err = |reason: String| DecodeError::Decompress { codec: codec.name(), reason };
        let n = match codec {
            Codec::None => {
                if input.len() != out.len() {
                    return Err(err(format!("stored payload is {} bytes, declared {}", input.len(), out.len())));
                }
                out.copy_from_slice(input);
                input.len()
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(input, out).map_err(|e| err(e.to_string()))?,
            Codec::Zstd => {
                let ctx = match &mut self.zstd {
                    Some(ctx) => ctx,
                    slot => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| err(e.to_string()))?),
                };
                // The output slice bounds what zstd may write: a bomb fails here instead of allocating.
                ctx.decompress_to_buffer(input, out).map_err(|e| err(e.to_string()))?
            }
        };
        if n != out.len() {
            return Err(err(format!("produced {n} bytes, header declared {}", out.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("lz4".parse::<Compression>().unwrap(), Compression::Lz4);
        assert_eq!("zstd:3".parse::<Compression>().unwrap(), Compression::Zstd { level: 3 });
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
        for c in [Compression::None, Compression::Lz4, Compression::Zstd { level: 7 }] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c, "Display is what FromStr reads");
        }
    }

    #[test]
    fn round_trips_and_bounds_output() {
        let input = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(50);
        for c in [Compression::None, Compression::Lz4, Compression::zstd()] {
            let mut out = Vec::new();
            Compressor::new().compress(c, &input, &mut out).unwrap();
            let mut back = vec![0; input.len()];
            Decompressor::new().decompress(c.codec(), &out, &mut back).unwrap();
            assert_eq!(back, input);
            // A smaller declared size must fail, not overflow or allocate.
            let mut short = vec![0; input.len() - 1];
            assert!(Decompressor::new().decompress(c.codec(), &out, &mut short).is_err());
            let mut long = vec![0; input.len() + 1];
            assert!(Decompressor::new().decompress(c.codec(), &out, &mut long).is_err());
        }
    }
}
