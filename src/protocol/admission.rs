//! Whether a replica takes a batch that arrived for one of its spaces: the checks that need only
//! the batch's header, the session and where the space's log ends. The log then checks each entry
//! it appends: no gap, epochs never going backwards, and that an entry it already holds is the
//! same one.

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

/// Where the replica's log of the space ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEnd {
    /// Its last entry.
    pub last_seq: Seq,
    /// The epoch of that entry: a new entry's epoch is never older.
    pub last_epoch: Epoch,
}

/// Whether a batch with `header` may go to a log that ends at `end`. A refusal is the reason to
/// ask the primary for catch-up from the entry after `end`: the batch belongs to another primary,
/// space or epoch, entries between the log's end and the batch went missing, or its new entries
/// would take the log back to an older epoch. An admitted batch may overlap the log's end, or lie
/// wholly within it (resent after a catch-up race): the log compares what it holds already, and
/// a different entry there means the logs diverged.
pub fn admit(header: &BatchHeader, expected: &Expected, end: LogEnd) -> Result<(), String> {
    if header.primary != expected.primary || header.space_tag != expected.space_tag || header.epoch > expected.epoch {
        return Err(format!(
            "batch from primary {:?} for space tag {:#x} in epoch {} does not belong here (expected {:?}, {:#x}, epoch at most {})",
            header.primary, header.space_tag, header.epoch, expected.primary, expected.space_tag, expected.epoch
        ));
    }
    if header.start_seq > end.last_seq.next() {
        return Err(format!("gap: batch starts at {} but the log ends at {}", header.start_seq, end.last_seq));
    }
    if header.last_seq() > end.last_seq && header.epoch < end.last_epoch {
        return Err(format!(
            "batch of epoch {} would follow entry {} of epoch {}: epochs never go backwards along a log",
            header.epoch, end.last_seq, end.last_epoch
        ));
    }
    Ok(())
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

    fn end(last: u64, epoch: u64) -> LogEnd {
        LogEnd { last_seq: Seq(last), last_epoch: Epoch(epoch) }
    }

    #[test]
    fn a_batch_that_continues_overlaps_or_lies_within_the_log_is_admitted() {
        assert_eq!(admit(&header(11, 5), &EXPECTED, end(10, 3)), Ok(()));
        assert_eq!(admit(&header(1, 1), &EXPECTED, end(0, 0)), Ok(()));
        // Overlapping the log's end, or wholly held: the append compares the entries both hold.
        assert_eq!(admit(&header(8, 5), &EXPECTED, end(10, 3)), Ok(()));
        assert_eq!(admit(&header(6, 5), &EXPECTED, end(10, 3)), Ok(()));
    }

    #[test]
    fn a_gap_asks_for_catch_up() {
        let reason = admit(&header(12, 1), &EXPECTED, end(10, 3)).unwrap_err();
        assert!(reason.contains("gap") && reason.contains("12") && reason.contains("10"), "{reason}");
    }

    #[test]
    fn new_entries_of_an_older_epoch_than_the_log_are_refused() {
        let older = BatchHeader { epoch: Epoch(2), ..header(11, 3) };
        let reason = admit(&older, &EXPECTED, end(10, 3)).unwrap_err();
        assert!(reason.contains("epochs never go backwards"), "{reason}");
        // Resent history of that older epoch, wholly held, is for the log to compare.
        let resent = BatchHeader { epoch: Epoch(2), ..header(5, 3) };
        assert_eq!(admit(&resent, &EXPECTED, end(10, 3)), Ok(()));
    }

    #[test]
    fn a_batch_of_another_primary_space_or_newer_epoch_is_refused() {
        let other_primary = BatchHeader { primary: NodeId(8), ..header(11, 1) };
        let other_space = BatchHeader { space_tag: 0x1234, ..header(11, 1) };
        let newer_epoch = BatchHeader { epoch: Epoch(4), ..header(11, 1) };
        for h in [other_primary, other_space, newer_epoch] {
            assert!(admit(&h, &EXPECTED, end(10, 1)).unwrap_err().contains("does not belong here"));
        }
        // Entries of an older epoch than the primary's are its history: shipped as written.
        let older_epoch = BatchHeader { epoch: Epoch(1), ..header(11, 1) };
        assert_eq!(admit(&older_epoch, &EXPECTED, end(10, 1)), Ok(()));
    }

    #[test]
    fn a_stream_may_start_anywhere_up_to_the_entry_after_the_log() {
        assert_eq!(admit_stream(Seq(11), Seq(10)), Ok(()));
        assert_eq!(admit_stream(Seq(1), Seq(10)), Ok(()));
        assert!(admit_stream(Seq(12), Seq(10)).unwrap_err().contains("starts at 12"));
    }
}
