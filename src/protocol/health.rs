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
    /// Connected and behind by more than the lag threshold, or with a space that will not be
    /// shipped until something else happens (refused at the handshake, reported diverged, in
    /// need of a snapshot: its `error` says why).
    Degraded,
    /// Not connected.
    Disconnected,
}

impl std::fmt::Display for Health {
    /// As in the status JSON: `healthy`, `lagging`, `degraded`, `disconnected`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Lagging => "lagging",
            Health::Degraded => "degraded",
            Health::Disconnected => "disconnected",
        })
    }
}

impl Health {
    /// Classifies a replica from its largest lag over all spaces, and whether any space will not
    /// be shipped to it until something else happens (`stopped`): that one catches up on no lag
    /// threshold (a replica refused as `Truncated` needs a snapshot; its lag in ms may read low,
    /// dated from what is left).
    pub fn classify(
        connected: bool,
        max_lag_entries: u64,
        max_lag_ms: u64,
        threshold_ms: u64,
        stopped: bool,
    ) -> Health {
        match (connected, max_lag_entries, max_lag_ms) {
            (false, _, _) => Health::Disconnected,
            _ if stopped => Health::Degraded,
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
        assert_eq!(Health::classify(false, 0, 0, 1000, false), Health::Disconnected);
        assert_eq!(Health::classify(true, 0, 0, 1000, false), Health::Healthy);
        assert_eq!(Health::classify(true, 5, 999, 1000, false), Health::Lagging);
        assert_eq!(Health::classify(true, 5, 1001, 1000, false), Health::Degraded);
        // A space not being shipped: degraded whatever the lag says, unless disconnected.
        assert_eq!(Health::classify(true, 5, 0, 1000, true), Health::Degraded);
        assert_eq!(Health::classify(true, 0, 0, 1000, true), Health::Degraded);
        assert_eq!(Health::classify(false, 5, 0, 1000, true), Health::Disconnected);
    }

    #[test]
    fn displays_as_in_the_status_json() {
        for h in [Health::Healthy, Health::Lagging, Health::Degraded, Health::Disconnected] {
            assert_eq!(serde_json::to_value(h).unwrap(), serde_json::Value::String(h.to_string()));
        }
    }
}
