//! Deciding, from a replica's hello, whether and where it resumes a space.

use crate::codec::control::{ErrorCode, SpacePosition};
use crate::entry::LogDigest;
use crate::types::{Epoch, Seq};

/// What a primary knows of its own log of a space, for checking a replica's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLog {
    /// First sequence held (older ones were removed by retention).
    pub first_seq: Seq,
    /// Last sequence written.
    pub last_seq: Seq,
    /// Epoch of the primary's entry at the replica's `last_seq`, if the primary still holds it.
    pub epoch_at_replica_last: Option<Epoch>,
    /// The primary's log digest up to the replica's `last_seq`, if known.
    pub digest_at_replica_last: Option<LogDigest>,
}

/// Why a replica cannot resume a space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Code sent to the replica.
    pub code: ErrorCode,
    /// Human-readable reason, including what to do.
    pub reason: String,
}

/// Where shipping of a space starts for a replica at `pos`, or why it cannot.
///
/// The replica resumes after its last entry if its log up to there is the primary's: same epoch at
/// that sequence, and the same digest of the whole prefix (which also catches a primary that lost an
/// unsynced tail and wrote other entries at the same sequences in the same epoch), and if the primary
/// still holds the entries after it.
pub fn resume_point(local: LocalLog, pos: &SpacePosition) -> Result<Seq, Refusal> {
    if pos.last_seq > local.last_seq {
        return Err(Refusal {
            code: ErrorCode::Diverged,
            reason: format!(
                "replica holds up to {} but the primary's log ends at {}; the replica's log of this space must be cut back (truncate_suffix) or rebuilt",
                pos.last_seq, local.last_seq
            ),
        });
    }
    if pos.last_seq.0 > 0 {
        match local.epoch_at_replica_last {
            Some(e) if e == pos.last_epoch => {}
            Some(e) => {
                return Err(Refusal {
                    code: ErrorCode::Diverged,
                    reason: format!(
                        "entry {} is from epoch {} on the replica but epoch {} on the primary; the replica copied another log and must be rebuilt",
                        pos.last_seq, pos.last_epoch, e
                    ),
                })
            }
            // The primary no longer has the entry to compare (retention); it can still resume if the
            // next one is held.
            None => {}
        }
    }
    // Below the primary's own last sequence (checked above), so this cannot overflow.
    let from = pos.last_seq.next();
    if let Some(d) = local.digest_at_replica_last {
        if d != pos.digest {
            return Err(Refusal {
                code: ErrorCode::Diverged,
                reason: format!(
                    "the replica's log up to {} has digest {} but the primary's has {}: same positions, other entries (the primary may have lost an unsynced tail); the replica's log of this space must be cut back or rebuilt",
                    pos.last_seq, pos.digest, d
                ),
            });
        }
    }
    if from < local.first_seq {
        return Err(Refusal {
            code: ErrorCode::Truncated,
            reason: format!(
                "replica needs entries from {from} but the primary holds only {}..={} (older ones were removed by retention); rebuild the replica from a snapshot",
                local.first_seq, local.last_seq
            ),
        });
    }
    Ok(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::LogDigest;
    use crate::types::SpaceId;

    fn pos(last: u64, epoch: u64) -> SpacePosition {
        SpacePosition {
            space: SpaceId::new("s").unwrap(),
            last_seq: Seq(last),
            last_epoch: Epoch(epoch),
            digest: LogDigest::EMPTY,
            durable_seq: Seq(last),
            applied_seq: Seq(last),
        }
    }

    fn log(first: u64, last: u64, epoch_at: Option<u64>) -> LocalLog {
        LocalLog {
            first_seq: Seq(first),
            last_seq: Seq(last),
            epoch_at_replica_last: epoch_at.map(Epoch),
            digest_at_replica_last: None,
        }
    }

    #[test]
    fn a_position_at_the_top_of_the_sequence_space_is_refused_without_overflow() {
        let r = resume_point(log(1, 100, None), &pos(u64::MAX, 1));
        assert_eq!(r.unwrap_err().code, ErrorCode::Diverged);
    }

    #[test]
    fn resumes_after_last_durable() {
        assert_eq!(resume_point(log(1, 100, Some(2)), &pos(40, 2)), Ok(Seq(41)));
        assert_eq!(resume_point(log(1, 100, None), &pos(0, 0)), Ok(Seq(1)));
        assert_eq!(resume_point(log(1, 40, Some(2)), &pos(40, 2)), Ok(Seq(41)));
    }

    #[test]
    fn refuses_divergence_and_truncation() {
        assert_eq!(resume_point(log(1, 10, None), &pos(40, 2)).unwrap_err().code, ErrorCode::Diverged);
        assert_eq!(resume_point(log(1, 100, Some(3)), &pos(40, 2)).unwrap_err().code, ErrorCode::Diverged);
        assert_eq!(resume_point(log(50, 100, None), &pos(40, 2)).unwrap_err().code, ErrorCode::Truncated);
        // The entry itself was removed but the next one is held: resume.
        assert_eq!(resume_point(log(41, 100, None), &pos(40, 2)), Ok(Seq(41)));
    }

    #[test]
    fn refuses_same_epoch_other_entries() {
        let same = LocalLog { digest_at_replica_last: Some(LogDigest::EMPTY), ..log(1, 100, Some(2)) };
        assert_eq!(resume_point(same, &pos(40, 2)), Ok(Seq(41)));
        let other = LocalLog { digest_at_replica_last: Some(LogDigest(7)), ..log(1, 100, Some(2)) };
        assert_eq!(resume_point(other, &pos(40, 2)).unwrap_err().code, ErrorCode::Diverged);
    }
}
