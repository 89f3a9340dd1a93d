//! Adversarial inputs for every wire decoder: random bytes, truncations, bit flips, and length or
//! count fields rewritten *with the checksums fixed up*, so the mutation reaches the length checks,
//! the decompressors and the entry parser instead of stopping at the first CRC. Deterministic
//! (seeded xorshift), a few seconds in `cargo test --release`.
//!
//! Invariants: no decoder panics; whatever a decoder accepts is internally consistent (entry count,
//! contiguous sequences, every entry checksum valid); announced sizes above the limits are refused.

mod common;
#[path = "../src/codec/control_samples.rs"]
mod control_samples;

use bytes::{Bytes, BytesMut};
use common::Rng;
use walship::codec::batch::{space_tag, BATCH_HEADER_LEN};
use walship::codec::control::{Ack, CatchUp, ErrorMessage, Hello, SpaceAck, SpacePosition, SpaceRange, Welcome};
use walship::codec::heartbeat::{Echo, SeqSummary};
use walship::codec::stream::{check_mux_preamble, mux_preamble, STREAM_HEADER_LEN};
use walship::codec::{
    BatchDecoder, BatchEncoder, BatchHeader, Compression, ControlMessage, DecodeError, ErrorCode, FrameLimits,
    Heartbeat, StreamHeader,
};
use walship::{Entry, Epoch, LogDigest, NodeId, Seq, SpaceId};

/// Values that break length arithmetic: 0, 1, around the truth, around the limits, the top.
fn nasty_u32(rng: &mut Rng, real: u32, limit: u32) -> u32 {
    let c = [
        0,
        1,
        real.wrapping_sub(1),
        real.wrapping_add(1),
        real.wrapping_mul(2),
        real / 2,
        limit,
        limit.wrapping_add(1),
        u32::MAX,
        u32::MAX - 16,
        0x8000_0000,
        rng.next() as u32,
    ];
    c[rng.below(c.len())]
}

fn space() -> SpaceId {
    SpaceId::new("fuzz-space").unwrap()
}

fn codecs() -> [Compression; 3] {
    [Compression::None, Compression::Lz4, Compression::zstd()]
}

fn entries(rng: &mut Rng, start: u64) -> Vec<Entry> {
    let n = 1 + rng.below(12);
    (0..n)
        .map(|i| {
            let len = match rng.below(4) {
                0 => 0,
                1 => rng.below(16),
                2 => rng.below(600),
                _ => 2000 + rng.below(3000),
            };
            // Half compressible, half noise.
            let payload: Vec<u8> = if rng.below(2) == 0 {
                b"key=value;".iter().cycle().take(len).copied().collect()
            } else {
                rng.bytes(len)
            };
            Entry::new(Seq(start + i as u64), Epoch(3), 1_000 + i as u64, rng.below(256) as u8, Bytes::from(payload))
        })
        .collect()
}

fn fix_header_crc(f: &mut [u8]) {
    let crc = crc32c::crc32c(&f[..60]);
    f[60..64].copy_from_slice(&crc.to_le_bytes());
}

fn fix_payload_crc(f: &mut [u8]) {
    let crc = crc32c::crc32c(&f[BATCH_HEADER_LEN..]);
    f[48..52].copy_from_slice(&crc.to_le_bytes());
    fix_header_crc(f);
}

fn set_u32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(f: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(f[at..at + 4].try_into().unwrap())
}

/// Decodes with both entry points (whole frame, and header then payload as the stream reader does)
/// and checks what is accepted.
fn decode_checked(frame: Vec<u8>, limits: FrameLimits) -> Result<(), DecodeError> {
    let frame = Bytes::from(frame);
    let whole = BatchDecoder::new(limits).decode(frame.clone());
    let split = BatchHeader::decode(&frame, &limits).and_then(|h| {
        let end = (BATCH_HEADER_LEN + h.payload_len as usize).min(frame.len());
        BatchDecoder::new(limits).decode_payload(h, frame.slice(BATCH_HEADER_LEN..end))
    });
    if frame.len() == BATCH_HEADER_LEN + split_len(&frame) {
        assert_eq!(whole.is_ok(), split.is_ok(), "the two decode paths disagree");
    } else {
        assert!(whole.is_err(), "a frame whose length is not header + payload_len was accepted");
    }
    let b = whole?;
    let h = b.header;
    assert!(h.payload_len as usize <= limits.max_batch_bytes);
    assert!(h.uncompressed_len as usize <= limits.max_batch_bytes);
    assert_eq!(b.entries.len() as u64, u64::from(h.count));
    for (i, e) in b.entries.iter().enumerate() {
        assert!(e.verify(), "accepted an entry whose checksum does not match");
        assert_eq!(e.seq, Seq(h.start_seq.0 + i as u64));
        assert_eq!(e.epoch, h.epoch);
    }
    Ok(())
}

fn split_len(frame: &[u8]) -> usize {
    frame.get(44..48).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
}

#[test]
fn batch_header_fields_rewritten_with_valid_checksums() {
    let mut rng = Rng(0x5eed_0001);
    let limits = FrameLimits::default();
    let max = limits.max_batch_bytes as u32;
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..3_000 {
        let start = 1 + rng.below(1000) as u64;
        let es = entries(&mut rng, start);
        let c = codecs()[round % 3];
        let mut f = BatchEncoder::new(NodeId(7), c).with_min_compress_bytes(0).encode(&space(), &es).unwrap().to_vec();
        // count 32, uncompressed 40, payload 44; start seq 24 (u64); codec 5; flags 6; version 4.
        match rng.below(7) {
            0 => {
                let real = get_u32(&f, 32);
                let v = nasty_u32(&mut rng, real, max / 17);
                set_u32(&mut f, 32, v)
            }
            1 => {
                let real = get_u32(&f, 40);
                let v = nasty_u32(&mut rng, real, max);
                set_u32(&mut f, 40, v)
            }
            2 => {
                let real = get_u32(&f, 44);
                let v = nasty_u32(&mut rng, real, max);
                set_u32(&mut f, 44, v)
            }
            3 => {
                let c = [0u64, 1, u64::MAX, u64::MAX - 1, u64::MAX - es.len() as u64 + 1, rng.next()];
                let v = c[rng.below(c.len())];
                f[24..32].copy_from_slice(&v.to_le_bytes())
            }
            4 => f[5] = rng.below(4) as u8,
            5 => f[6..8].copy_from_slice(&(rng.next() as u16).to_le_bytes()),
            _ => {
                let real = get_u32(&f, 40);
                let v = nasty_u32(&mut rng, real, max);
                set_u32(&mut f, 40, v);
                set_u32(&mut f, 44, v)
            }
        }
        fix_header_crc(&mut f);
        match decode_checked(f, limits) {
            Ok(()) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    // Both outcomes occur (e.g. a flags value of 1 or an unchanged field is accepted).
    assert!(accepted > 0 && refused > 0, "accepted {accepted}, refused {refused}");
}

#[test]
fn batch_payload_garbage_with_valid_checksums_reaches_decompressors() {
    let mut rng = Rng(0x5eed_0002);
    let limits = FrameLimits::default();
    for round in 0..4_000 {
        let es = entries(&mut rng, 1);
        let c = codecs()[round % 3];
        let mut f = BatchEncoder::new(NodeId(7), c).with_min_compress_bytes(0).encode(&space(), &es).unwrap().to_vec();
        let plen = f.len() - BATCH_HEADER_LEN;
        match rng.below(5) {
            // Flip a few payload bits.
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let bit = rng.below(plen * 8);
                    if plen > 0 {
                        f[BATCH_HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
                    }
                }
            }
            // Cut the payload and say so in the header.
            1 => {
                let keep = rng.below(plen + 1);
                f.truncate(BATCH_HEADER_LEN + keep);
                set_u32(&mut f, 44, keep as u32);
                if f[5] == 0 {
                    set_u32(&mut f, 40, keep as u32);
                }
            }
            // Replace the payload with noise of any length.
            2 => {
                let n = rng.below(4096);
                f.truncate(BATCH_HEADER_LEN);
                f.extend(rng.bytes(n));
                set_u32(&mut f, 44, n as u32);
                if f[5] == 0 {
                    set_u32(&mut f, 40, n as u32);
                }
            }
            // Rewrite an entry's length field (uncompressed frames: its offset is known).
            3 if f[5] == 0 => {
                let at = BATCH_HEADER_LEN + 9;
                let real = get_u32(&f, at);
                let v = nasty_u32(&mut rng, real, plen as u32);
                set_u32(&mut f, at, v);
            }
            // Append junk after the payload and count it.
            _ => {
                let n = 1 + rng.below(64);
                f.extend(rng.bytes(n));
                set_u32(&mut f, 44, (plen + n) as u32);
                if f[5] == 0 {
                    set_u32(&mut f, 40, (plen + n) as u32);
                }
            }
        }
        fix_payload_crc(&mut f);
        let _ = decode_checked(f, limits);
    }
}

#[test]
fn decompression_bombs_are_refused_without_allocating_their_size() {
    // 15 MiB of zeros compresses to a few KiB; declared smaller than the truth it must fail in the
    // bounded output buffer, declared above the limit it must be refused before any allocation.
    let big = vec![Entry::new(Seq(1), Epoch(1), 0, 0, Bytes::from(vec![0u8; 15 << 20]))];
    for c in [Compression::Lz4, Compression::zstd()] {
        let frame = BatchEncoder::new(NodeId(1), c).with_min_compress_bytes(0).encode(&space(), &big).unwrap();
        assert!(frame.len() < 1 << 20, "{c}: {} bytes", frame.len());
        for declared in [17u32, 4096, 1 << 20] {
            let mut f = frame.to_vec();
            set_u32(&mut f, 40, declared);
            fix_header_crc(&mut f);
            assert!(BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(f)).is_err(), "{c} {declared}");
        }
        let tight = FrameLimits { max_batch_bytes: 1 << 20 };
        let err = BatchDecoder::new(tight).decode(frame.clone()).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }
}

#[test]
fn random_and_truncated_batch_frames_never_panic() {
    let mut rng = Rng(0x5eed_0003);
    let limits = FrameLimits { max_batch_bytes: 1 << 16 };
    for round in 0..20_000 {
        let f = if round % 2 == 0 {
            let n = rng.below(256);
            rng.bytes(n)
        } else {
            let es = entries(&mut rng, 1);
            let c = codecs()[round % 3];
            let full = BatchEncoder::new(NodeId(7), c).with_min_compress_bytes(0).encode(&space(), &es).unwrap();
            let mut f = full[..rng.below(full.len() + 1)].to_vec();
            if !f.is_empty() && rng.below(2) == 0 {
                let at = rng.below(f.len());
                f[at] ^= 1 << rng.below(8);
            }
            f
        };
        let _ = decode_checked(f, limits);
    }
}

#[test]
fn stream_header_every_length_byte_with_valid_checksum() {
    let h = StreamHeader { space: space(), start_seq: Seq(9) }.encode().to_vec();
    for len in 0..=255u8 {
        let mut f = h.clone();
        f[5] = len;
        let crc = crc32c::crc32c(&f[..80]);
        f[80..84].copy_from_slice(&crc.to_le_bytes());
        let r = StreamHeader::decode(&f);
        assert_eq!(r.is_ok(), len as usize == space().as_str().len(), "len {len}: {r:?}");
    }
    let mut rng = Rng(0x5eed_0004);
    for _ in 0..20_000 {
        let mut f = h.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(80);
            f[at] = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            let crc = crc32c::crc32c(&f[..80]);
            f[80..84].copy_from_slice(&crc.to_le_bytes());
        }
        let cut = if rng.below(8) == 0 { rng.below(STREAM_HEADER_LEN) } else { STREAM_HEADER_LEN };
        if let Ok(d) = StreamHeader::decode(&f[..cut]) {
            assert!(d.start_seq.0 > 0);
            assert_eq!(SpaceId::new(d.space.as_str()).as_ref(), Ok(&d.space));
        }
        let mut m = mux_preamble();
        m[rng.below(8)] = rng.next() as u8;
        let _ = check_mux_preamble(&m);
    }
}

#[test]
fn control_messages_mutated_truncated_and_reframed() {
    let mut rng = Rng(0x5eed_0005);
    let max = 4096;
    let wires: Vec<Vec<u8>> = control_samples::samples().iter().map(|m| m.encode().unwrap().to_vec()).collect();
    for round in 0..30_000 {
        let mut w = wires[round % wires.len()].clone();
        match rng.below(5) {
            0 => {
                let at = 4 + rng.below(w.len() - 4);
                w[at] = rng.next() as u8;
            }
            1 => {
                let keep = rng.below(w.len() + 1);
                w.truncate(keep);
            }
            2 => {
                // Body cut or extended, with the prefix telling the new length.
                let body = rng.below(w.len() + 8).saturating_sub(4);
                w.resize(4 + body, rng.next() as u8);
                w[..4].copy_from_slice(&(body as u32).to_le_bytes());
            }
            3 => {
                let real = get_u32(&w, 0);
                let v = nasty_u32(&mut rng, real, max as u32);
                set_u32(&mut w, 0, v)
            }
            _ => {
                let n = rng.below(300);
                w = rng.bytes(n);
            }
        }
        let mut buf = BytesMut::from(&w[..]);
        let before = buf.len();
        match ControlMessage::decode_from(&mut buf, max) {
            Ok(Some(m)) => {
                // What is accepted round-trips and consumed exactly its frame.
                let again = m.encode().unwrap();
                assert_eq!(ControlMessage::decode_body(&again[4..]).unwrap(), m);
                assert!(buf.len() < before);
            }
            Ok(None) => assert_eq!(buf.len(), before, "nothing consumed while waiting for more"),
            Err(_) => {}
        }
    }
}

#[test]
fn heartbeats_mutated_and_random() {
    let mut rng = Rng(0x5eed_0006);
    let hb = Heartbeat {
        sent_at_us: 123_456,
        echo: Some(Echo { sent_at_us: 99, held_us: 7 }),
        epoch: Epoch(4),
        summary: SeqSummary { spaces: 3, total_last_seq: 1 << 40, max_lag_entries: 12 },
    }
    .encode()
    .unwrap()
    .to_vec();
    for _ in 0..30_000 {
        let mut b = hb.clone();
        match rng.below(3) {
            0 => {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            1 => b.truncate(rng.below(b.len() + 1)),
            _ => {
                let n = rng.below(2048);
                b = rng.bytes(n);
            }
        }
        if let Ok(h) = Heartbeat::decode(&b) {
            assert!(h.encode().unwrap().len() <= walship::codec::heartbeat::MAX_HEARTBEAT_BYTES);
        }
    }
}

#[test]
fn space_tag_of_a_batch_is_its_space() {
    let mut rng = Rng(0x5eed_0007);
    let es = entries(&mut rng, 1);
    let f = BatchEncoder::new(NodeId(7), Compression::None).encode(&space(), &es).unwrap();
    let h = BatchHeader::decode(&f, &FrameLimits::default()).unwrap();
    assert_eq!(h.space_tag, space_tag(&space()));
}

/// The header's reserved bytes 52..60 must be zero, even with a valid header checksum: a later
/// version may give them a meaning this build would otherwise silently ignore.
#[test]
fn reserved_header_bytes_must_be_zero() {
    let mut rng = Rng(0x5eed_0008);
    let es = entries(&mut rng, 1);
    let mut f = BatchEncoder::new(NodeId(7), Compression::None).encode(&space(), &es).unwrap().to_vec();
    f[55] = 0xAA;
    fix_header_crc(&mut f);
    assert!(BatchDecoder::new(FrameLimits::default()).decode(Bytes::from(f)).is_err());
}
