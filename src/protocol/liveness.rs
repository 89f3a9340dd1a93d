//! Heartbeat bookkeeping: builds outgoing heartbeats, reads incoming ones, measures RTT and says when
//! the peer is dead. Time is passed in.

use std::time::{Duration, Instant};

use crate::codec::heartbeat::{Echo, Heartbeat, SeqSummary};
use crate::types::Epoch;

/// Liveness of one peer.
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    timeout: Duration,
    last_seen: Instant,
    last_peer: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    peer_epoch: Option<Epoch>,
    peer_summary: SeqSummary,
    received: u64,
}

impl Liveness {
    /// A peer just connected at `now`; it is declared dead after `timeout` without a heartbeat.
    pub fn new(now: Instant, timeout: Duration) -> Liveness {
        Liveness {
            origin: now,
            timeout,
            last_seen: now,
            last_peer: None,
            rtt: None,
            peer_epoch: None,
            peer_summary: SeqSummary::default(),
            received: 0,
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// The heartbeat to send at `now`.
    pub fn heartbeat(&self, now: Instant, epoch: Epoch, summary: SeqSummary) -> Heartbeat {
        Heartbeat {
            sent_at_us: self.micros(now),
            echo: self.last_peer.map(|(sent_at_us, at)| Echo {
                sent_at_us,
                held_us: now.saturating_duration_since(at).as_micros() as u64,
            }),
            epoch,
            summary,
        }
    }

    /// Records a heartbeat received at `now`.
    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now: Instant) {
        self.last_seen = now;
        self.last_peer = Some((hb.sent_at_us, now));
        self.peer_epoch = Some(hb.epoch);
        self.peer_summary = hb.summary;
        self.received += 1;
        if let Some(echo) = hb.echo {
            let elapsed = self.micros(now).saturating_sub(echo.sent_at_us);
            // An echo of a stamp we never sent (from the future) is ignored.
            if echo.sent_at_us <= self.micros(now) {
                self.rtt = Some(Duration::from_micros(elapsed.saturating_sub(echo.held_us)));
            }
        }
    }

    /// Any sign of life (data, acks) also counts.
    pub fn on_activity(&mut self, now: Instant) {
        self.last_seen = self.last_seen.max(now);
    }

    /// True if nothing was heard from the peer for longer than the timeout.
    pub fn is_dead(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) > self.timeout
    }

    /// Latest RTT measured from heartbeat echoes.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The peer's epoch and position summary from its last heartbeat.
    pub fn peer(&self) -> (Option<Epoch>, SeqSummary) {
        (self.peer_epoch, self.peer_summary)
    }

    /// Heartbeats received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_rtt_across_two_clocks() {
        let t0 = Instant::now();
        let mut a = Liveness::new(t0, Duration::from_secs(1));
        // b's clock started 5 s earlier: only differences on each side's own clock matter.
        let mut b = Liveness::new(t0 - Duration::from_secs(5), Duration::from_secs(1));
        let ping = a.heartbeat(t0, Epoch(1), SeqSummary::default());
        b.on_heartbeat(&ping, t0 + Duration::from_millis(10));
        // b holds it 30 ms before its own heartbeat goes out.
        let pong = b.heartbeat(t0 + Duration::from_millis(40), Epoch(1), SeqSummary::default());
        a.on_heartbeat(&pong, t0 + Duration::from_millis(50));
        assert_eq!(a.rtt(), Some(Duration::from_millis(20)));
        assert_eq!(b.rtt(), None);
    }

    #[test]
    fn declares_dead_after_timeout() {
        let t0 = Instant::now();
        let mut a = Liveness::new(t0, Duration::from_secs(1));
        assert!(!a.is_dead(t0 + Duration::from_millis(900)));
        assert!(a.is_dead(t0 + Duration::from_millis(1100)));
        a.on_activity(t0 + Duration::from_millis(1000));
        assert!(!a.is_dead(t0 + Duration::from_millis(1100)));
    }
}
