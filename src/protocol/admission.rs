//! Whether a replica takes a batch that arrived for one of its spaces: the checks that need only
//! the batch's header, the session and where the space's log ends. The log then checks each entry
//! it is asked to append (its checksum, and that an entry it already holds is the same one).

use crate::codec::batch::BatchHeader;
use crate::types::{Epoch, NodeId, Seq};

/// What the replica's current session accepts on one space's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The primary this session is connected to.
    pub primary: NodeId,
    /// [`space_tag`](crate::codec::batch::space_tag) of the space the stream is for.
    pub space_tag: u32,
    /// The primary's epoch from its welcome: no entry it ships can be newer.
    pub epoch: Epoch,
}

/// What to do with an admitted batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Append it: it continues the log (and may overlap its end, which the append checks).
    Append,
    /// Every entry is already held (a batch resent after a catch-up race): nothing to write.
    AlreadyHeld,
}

/// Whether a batch with `header` continues a log that ends at `last_held`. A refusal is the
/// reason to ask the primary for catch-up from the entry after `last_held`: the batch belongs to
/// another primary, space or epoch, or entries between the log's end and the batch went missing.
pub fn admit(header: &BatchHeader, expected: &Expected, last_held: Seq) -> Result<Admission, String> {
    if header.primary != expected.primary || header.space_tag != expected.space_tag || header.epoch > expected.epoch {
        return Err(format!(
            "batch from primary {:?} for space tag {:#x} in epoch {} does not belong here (expected {:?}, {:#x}, epoch at most {})",
            header.primary, header.space_tag, header.epoch, expected.primary, expected.space_tag, expected.epoch
        ));
    }
    if header.start_seq > last_held.next() {
        return Err(format!("gap: batch starts at {} but the log ends at {last_held}", header.start_seq));
    }
    if header.last_seq() <= last_held {
        return Ok(Admission::AlreadyHeld);
    }
    Ok(Admission::Append)
}

/// Whether a space's stream that starts at `start` can continue a log that ends at `last_held`
/// (the primary restarts a stream where the replica said its log ends, or before).
pub fn admit_stream(start: Seq, last_held: Seq) -> Result<(), String> {
    if start > last_held.next() {
        return Err(format!("stream starts at {start} but the log ends at {last_held}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::compression::Codec;

    const EXPECTED: Expected = Expected { primary: NodeId(7), space_tag: 0xabcd, epoch: Epoch(3) };

    fn header(start: u64, count: u32) -> BatchHeader {
        BatchHeader {
            version: crate::codec::PROTOCOL_VERSION,
            codec: Codec::None,
            flags: 0,
            primary: EXPECTED.primary,
            epoch: EXPECTED.epoch,
            start_seq: Seq(start),
            count,
            space_tag: EXPECTED.space_tag,
            uncompressed_len: 0,
            payload_len: 0,
            payload_crc: 0,
        }
    }

    #[test]
    fn a_batch_that_continues_or_overlaps_the_log_is_appended() {
        assert_eq!(admit(&header(11, 5), &EXPECTED, Seq(10)), Ok(Admission::Append));
        assert_eq!(admit(&header(1, 1), &EXPECTED, Seq::ZERO), Ok(Admission::Append));
        // Overlapping the log's end: the append compares the entries both hold.
        assert_eq!(admit(&header(8, 5), &EXPECTED, Seq(10)), Ok(Admission::Append));
    }

    #[test]
    fn a_batch_wholly_held_is_not_written_again() {
        assert_eq!(admit(&header(6, 5), &EXPECTED, Seq(10)), Ok(Admission::AlreadyHeld));
        assert_eq!(admit(&header(1, 1), &EXPECTED, Seq(10)), Ok(Admission::AlreadyHeld));
    }

    #[test]
    fn a_gap_asks_for_catch_up() {
        let reason = admit(&header(12, 1), &EXPECTED, Seq(10)).unwrap_err();
        assert!(reason.contains("gap") && reason.contains("12") && reason.contains("10"), "{reason}");
    }

    #[test]
    fn a_batch_of_another_primary_space_or_newer_epoch_is_refused() {
        let other_primary = BatchHeader { primary: NodeId(8), ..header(11, 1) };
        let other_space = BatchHeader { space_tag: 0x1234, ..header(11, 1) };
        let newer_epoch = BatchHeader { epoch: Epoch(4), ..header(11, 1) };
        for h in [other_primary, other_space, newer_epoch] {
            assert!(admit(&h, &EXPECTED, Seq(10)).unwrap_err().contains("does not belong here"));
        }
        // Entries of an older epoch are the primary's history: shipped as they were written.
        let older_epoch = BatchHeader { epoch: Epoch(1), ..header(11, 1) };
        assert_eq!(admit(&older_epoch, &EXPECTED, Seq(10)), Ok(Admission::Append));
    }

    #[test]
    fn a_stream_may_start_anywhere_up_to_the_entry_after_the_log() {
        assert_eq!(admit_stream(Seq(11), Seq(10)), Ok(()));
        assert_eq!(admit_stream(Seq(1), Seq(10)), Ok(()));
        assert!(admit_stream(Seq(12), Seq(10)).unwrap_err().contains("starts at 12"));
    }
}
