//! A primary's view of one replica's copy of one space, shaped like raft's `Progress`: it says what
//! was sent, what the replica made durable and applied, and how much may still be sent.

use std::collections::VecDeque;

use crate::codec::CodecCounts;
use crate::types::Seq;

/// One batch sent and not yet durable on the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InFlight {
    last_seq: Seq,
    bytes: usize,
    /// Append time of the frame's first entry, µs since the Unix epoch.
    first_appended_us: u64,
}

/// Progress of one (space, replica) pair.
///
/// Invariants: `durable <= sent`, `applied <= durable` as reported, `inflight_bytes` is the sum of
/// the frames sent after `durable`. A catch-up ([`ReplicaProgress::restart_from`]) forgets what was
/// in flight: those frames went down a stream that was reset.
#[derive(Clone, Debug, Default)]
pub struct ReplicaProgress {
    sent: Seq,
    durable: Seq,
    applied: Seq,
    inflight: VecDeque<InFlight>,
    inflight_bytes: usize,
    batches_sent: u64,
    bytes_sent: u64,
    entries_sent: u64,
    /// What the codec did with the frames sent.
    codec: CodecCounts,
}

/// Lag of one (space, replica) pair at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Lag {
    /// Entries written on the primary and not yet durable on the replica.
    pub entries: u64,
    /// Frame bytes sent and not yet durable, plus an estimate for entries not yet sent.
    pub bytes: u64,
    /// How long the oldest entry not yet durable on the replica has waited since its append, in ms.
    /// Zero when caught up, not the time since the last write.
    pub ms: u64,
}

impl ReplicaProgress {
    /// Progress of a replica that holds everything up to `durable`.
    pub fn new(durable: Seq) -> ReplicaProgress {
        ReplicaProgress::resumed(durable, durable, durable)
    }

    /// Progress of a replica that said (in its hello) it holds up to `held`, of which `durable` is
    /// on its disk and `applied` applied: shipping continues after `held`, and nothing counts as
    /// durable or applied beyond what the replica said. Out-of-order values are clamped to the
    /// invariants.
    pub fn resumed(held: Seq, durable: Seq, applied: Seq) -> ReplicaProgress {
        let durable = durable.min(held);
        ReplicaProgress { sent: held, durable, applied: applied.min(durable), ..Default::default() }
    }

    /// Last sequence sent.
    pub fn sent(&self) -> Seq {
        self.sent
    }
    /// Last sequence the replica reported durable.
    pub fn durable(&self) -> Seq {
        self.durable
    }
    /// Last sequence the replica reported applied.
    pub fn applied(&self) -> Seq {
        self.applied
    }
    /// Frame bytes sent and not yet durable.
    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes
    }
    /// Totals since this progress was created: (batches, entries, frame bytes).
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.batches_sent, self.entries_sent, self.bytes_sent)
    }

    /// What the codec did with the frames sent since this progress was created.
    pub fn codec_counts(&self) -> CodecCounts {
        self.codec
    }

    /// Counts what the codec did with a frame just sent ([`ReplicaProgress::on_sent`]).
    pub fn on_encoded(&mut self, counts: CodecCounts) {
        self.codec += counts;
    }

    /// When the oldest frame still in flight began: the append time of its first entry, at or
    /// before that of entry `durable + 1` (the same unless the replica acked part of the frame).
    /// `None` when nothing is in flight. Gives the lag in time without reading the log.
    pub fn oldest_pending_appended_us(&self) -> Option<u64> {
        self.inflight.front().map(|f| f.first_appended_us)
    }

    /// The next sequence to send.
    pub fn next_to_send(&self) -> Seq {
        self.sent.next()
    }

    /// True if another batch may be sent without exceeding `max_unacked_bytes` in flight. One batch is
    /// always allowed when nothing is in flight, so an entry larger than the window still goes.
    pub fn may_send(&self, max_unacked_bytes: usize) -> bool {
        self.inflight.is_empty() || self.inflight_bytes < max_unacked_bytes
    }

    /// Records a frame of `bytes` carrying entries `first_seq..=last_seq`, the first of them
    /// appended at `first_appended_us` (µs since the Unix epoch). The replica's ack of the frame
    /// may come first (it is recorded once the send completed, and the ack is taken on another
    /// thread): then nothing of it is in flight.
    pub fn on_sent(&mut self, first_seq: Seq, last_seq: Seq, bytes: usize, first_appended_us: u64) {
        debug_assert!(first_seq <= self.sent.next(), "frames are recorded in order: {first_seq} after {}", self.sent);
        self.sent = self.sent.max(last_seq);
        if last_seq > self.durable {
            self.inflight.push_back(InFlight { last_seq, bytes, first_appended_us });
            self.inflight_bytes += bytes;
        }
        self.batches_sent += 1;
        self.entries_sent += last_seq.0 + 1 - first_seq.0;
        self.bytes_sent += bytes as u64;
    }

    /// Records an ack. Positions only move forward: an older ack arriving late changes nothing.
    pub fn on_ack(&mut self, durable: Seq, applied: Seq) {
        if durable > self.durable {
            self.durable = durable;
        }
        if applied > self.applied {
            self.applied = applied.min(self.durable);
        }
        if self.durable > self.sent {
            // The replica holds more than this session sent (it copied it earlier): skip ahead.
            self.sent = self.durable;
        }
        while let Some(f) = self.inflight.front() {
            if f.last_seq > self.durable {
                break;
            }
            self.inflight_bytes -= f.bytes;
            self.inflight.pop_front();
        }
    }

    /// Restarts shipping from `from` (a catch-up request): what was in flight is forgotten.
    pub fn restart_from(&mut self, from: Seq) {
        self.sent = Seq(from.0.saturating_sub(1));
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Lag against a primary whose log ends at `head`.
    ///
    /// `oldest_pending_age_ms` is the age of entry `durable + 1` (the caller reads its append time);
    /// `entry_bytes_estimate` stands for the size of each entry not sent yet.
    pub fn lag(&self, head: Seq, oldest_pending_age_ms: u64, entry_bytes_estimate: u64) -> Lag {
        let entries = head.0.saturating_sub(self.durable.0);
        if entries == 0 {
            return Lag::default();
        }
        let unsent = head.0.saturating_sub(self.sent.0);
        Lag { entries, bytes: self.inflight_bytes as u64 + unsent * entry_bytes_estimate, ms: oldest_pending_age_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_progress_counts_only_what_the_replica_said_is_durable() {
        let p = ReplicaProgress::resumed(Seq(50), Seq(20), Seq(10));
        assert_eq!((p.sent(), p.durable(), p.applied(), p.next_to_send()), (Seq(50), Seq(20), Seq(10), Seq(51)));
        // A peer's inconsistent numbers are clamped to the invariants.
        let p = ReplicaProgress::resumed(Seq(5), Seq(9), Seq(12));
        assert_eq!((p.sent(), p.durable(), p.applied()), (Seq(5), Seq(5), Seq(5)));
    }

    #[test]
    fn an_ack_at_the_top_of_the_sequence_space_does_not_wrap() {
        let mut p = ReplicaProgress::new(Seq(0));
        p.on_sent(Seq(1), Seq(10), 100, 1_000);
        p.on_ack(Seq(u64::MAX), Seq(u64::MAX));
        assert_eq!(p.next_to_send(), Seq(u64::MAX), "saturates instead of wrapping to 0");
    }

    #[test]
    fn window_opens_as_acks_arrive() {
        let mut p = ReplicaProgress::new(Seq(0));
        assert!(p.may_send(100));
        p.on_sent(Seq(1), Seq(10), 60, 1_000);
        assert!(p.may_send(100));
        p.on_sent(Seq(11), Seq(20), 60, 11_000);
        assert!(!p.may_send(100));
        assert_eq!(p.inflight_bytes(), 120);
        p.on_ack(Seq(10), Seq(5));
        assert_eq!((p.durable(), p.applied(), p.inflight_bytes()), (Seq(10), Seq(5), 60));
        assert!(p.may_send(100));
        // A stale ack changes nothing.
        p.on_ack(Seq(3), Seq(1));
        assert_eq!((p.durable(), p.applied()), (Seq(10), Seq(5)));
        p.on_ack(Seq(20), Seq(20));
        assert_eq!(p.inflight_bytes(), 0);
        assert_eq!(p.totals(), (2, 20, 120));
    }

    #[test]
    fn oversized_batch_is_allowed_when_idle() {
        let mut p = ReplicaProgress::new(Seq(0));
        assert!(p.may_send(10));
        p.on_sent(Seq(1), Seq(1), 1_000, 1_000);
        assert!(!p.may_send(10));
    }

    #[test]
    fn restart_forgets_inflight() {
        let mut p = ReplicaProgress::new(Seq(5));
        p.on_sent(Seq(6), Seq(9), 40, 6_000);
        p.restart_from(Seq(7));
        assert_eq!((p.next_to_send(), p.inflight_bytes()), (Seq(7), 0));
    }

    #[test]
    fn the_oldest_frame_in_flight_dates_the_lag() {
        let mut p = ReplicaProgress::new(Seq(0));
        assert_eq!(p.oldest_pending_appended_us(), None);
        p.on_sent(Seq(1), Seq(4), 400, 1_000);
        p.on_sent(Seq(5), Seq(9), 500, 5_000);
        assert_eq!(p.oldest_pending_appended_us(), Some(1_000));
        p.on_ack(Seq(4), Seq(4));
        assert_eq!(p.oldest_pending_appended_us(), Some(5_000));
        p.on_ack(Seq(9), Seq(9));
        assert_eq!(p.oldest_pending_appended_us(), None);
        p.on_sent(Seq(10), Seq(12), 300, 10_000);
        p.restart_from(Seq(10));
        assert_eq!(p.oldest_pending_appended_us(), None, "a restart forgets what was in flight");
    }

    #[test]
    fn a_frame_acked_before_it_is_recorded_is_not_in_flight() {
        let mut p = ReplicaProgress::new(Seq(0));
        p.on_sent(Seq(1), Seq(4), 400, 1_000);
        // The replica acks 5..=9 before the sender records having sent them.
        p.on_ack(Seq(9), Seq(9));
        p.on_sent(Seq(5), Seq(9), 500, 5_000);
        assert_eq!((p.sent(), p.durable(), p.inflight_bytes()), (Seq(9), Seq(9), 0));
        assert_eq!(p.oldest_pending_appended_us(), None);
        assert_eq!(p.totals(), (2, 9, 900));
        p.on_sent(Seq(10), Seq(12), 300, 10_000);
        assert_eq!((p.sent(), p.inflight_bytes()), (Seq(12), 300));
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_counts_unsent() {
        let mut p = ReplicaProgress::new(Seq(0));
        assert_eq!(p.lag(Seq(0), 999, 100), Lag::default());
        p.on_sent(Seq(1), Seq(4), 400, 1_000);
        let lag = p.lag(Seq(10), 7, 100);
        assert_eq!(lag, Lag { entries: 10, bytes: 400 + 6 * 100, ms: 7 });
        p.on_ack(Seq(10), Seq(10));
        assert_eq!(p.lag(Seq(10), 50, 100), Lag::default());
    }
}
