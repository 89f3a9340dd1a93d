//! A replica's health, as a primary reports it.

use serde::Serialize;

/// State of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Connected and holding everything the primary wrote.
    Healthy,
    /// Connected, behind, but its oldest missing entry is younger than the lag threshold.
    Lagging,
    /// Connected and behind by more than the lag threshold.
    Degraded,
    /// Not connected.
    Disconnected,
}

impl Health {
    /// Classifies a replica from its largest lag over all spaces.
    pub fn classify(connected: bool, max_lag_entries: u64, max_lag_ms: u64, threshold_ms: u64) -> Health {
        match (connected, max_lag_entries, max_lag_ms) {
            (false, _, _) => Health::Disconnected,
            (true, 0, _) => Health::Healthy,
            (true, _, ms) if ms <= threshold_ms => Health::Lagging,
            _ => Health::Degraded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(Health::classify(false, 0, 0, 1000), Health::Disconnected);
        assert_eq!(Health::classify(true, 0, 0, 1000), Health::Healthy);
        assert_eq!(Health::classify(true, 5, 999, 1000), Health::Lagging);
        assert_eq!(Health::classify(true, 5, 1001, 1000), Health::Degraded);
    }
}
