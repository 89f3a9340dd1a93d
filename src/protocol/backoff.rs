//! Reconnect delays: exponential with full jitter and a cap, seeded so tests are reproducible.

use std::time::Duration;

/// Exponential backoff state.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays start near `initial`, double each attempt and never exceed `max`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff { initial, max, attempt: 0, rng: seed | 1 }
    }

    /// The delay before the next attempt: uniformly in [ceiling/2, ceiling], where the ceiling doubles
    /// from `initial` up to `max` (half of it fixed so reconnects never spin, half jitter so a fleet of
    /// replicas does not reconnect in lockstep).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 1_000) as f64 / 1_000.0;
        ceiling.mul_f64(0.5 + 0.5 * frac)
    }

    /// Consecutive failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A connection succeeded: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
