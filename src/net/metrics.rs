//! Publishes status snapshots through the [`metrics`] facade, for a node server that exports
//! Prometheus (or any other) metrics: call [`record_primary`] or [`record_replica`] from a
//! periodic task, with the recorder of the embedder's choice installed. Without a recorder every
//! call is a no-op. Snapshots, not events, so the replication hot path pays nothing.
//!
//! Counters (`*_total`) are set to the node's running totals; gauges to the snapshot's values.
//! Per-space series (`space` label) are optional: with thousands of spaces, per-replica maxima may
//! be all a dashboard needs.

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

use super::status::{ConnectionState, PrimaryStatus, ReplicaStatus};
use crate::protocol::health::Health;

/// Registers the help text and unit of every metric with the installed recorder (once, after
/// installing it): what a Prometheus scrape shows as `# HELP`.
pub fn describe() {
    describe_gauge!("walship_replica_connected", "1 if the replica is connected to this primary");
    describe_gauge!("walship_replica_healthy", "1 if the replica is connected and holds everything");
    describe_gauge!("walship_replica_rtt_seconds", Unit::Seconds, "round trip to the replica, from heartbeats");
    describe_counter!("walship_replica_reconnects_total", "connections from the replica, minus one");
    describe_counter!("walship_replication_batches_total", "batch frames sent to the replica");
    describe_counter!(
        "walship_replication_codec_batches_total",
        "batches sent to the replica, by what the codec did (compressed, too_small, incompressible)"
    );
    describe_counter!(
        "walship_replication_codec_bytes_total",
        Unit::Bytes,
        "batch payload bytes sent to the replica, before (stage=in) and after (stage=out) the codec"
    );
    describe_counter!("walship_replication_entries_total", "entries sent to the replica");
    describe_counter!("walship_replication_bytes_total", Unit::Bytes, "batch frame bytes sent to the replica");
    describe_counter!("walship_replication_udp_bytes_total", Unit::Bytes, "UDP bytes on the replica's connections");
    describe_counter!("walship_replication_lost_packets_total", "QUIC packets declared lost to the replica");
    describe_counter!("walship_replication_congestion_events_total", "congestion events on the replica's connections");
    describe_gauge!("walship_replication_max_lag_seconds", Unit::Seconds, "the replica's largest lag over all spaces");
    describe_gauge!("walship_replication_max_lag_entries", "the replica's largest lag in entries over all spaces");
    describe_gauge!("walship_replication_spaces_failing", "spaces not replicated to the replica (diverged, truncated)");
    describe_gauge!(
        "walship_replication_lag_seconds",
        Unit::Seconds,
        "age of the oldest entry of the space not yet durable on the replica"
    );
    describe_gauge!("walship_replication_lag_entries", "entries of the space not yet durable on the replica");
    describe_gauge!("walship_replication_lag_bytes", Unit::Bytes, "bytes of the space not yet durable on the replica");
    describe_gauge!("walship_spaces", "spaces on this node");
    describe_gauge!("walship_connected_to_primary", "1 if this replica is connected to its primary");
    describe_gauge!("walship_primary_rtt_seconds", Unit::Seconds, "round trip to the primary, from heartbeats");
    describe_counter!("walship_reconnects_total", "connections to the primary, minus one");
    describe_gauge!("walship_assembling_bytes", Unit::Bytes, "bytes of large frames being received");
    describe_gauge!("walship_spaces_failing", "spaces the primary refused or reported an error for");
    describe_gauge!("walship_space_last_seq", "last sequence of the space's log");
    describe_gauge!("walship_space_durable_seq", "last sequence of the space on stable storage");
    describe_gauge!("walship_space_applied_seq", "last sequence of the space handed to the apply hook");
    describe_counter!("walship_space_catch_ups_total", "catch-up requests for the space");
}

/// Records a primary's status: per replica, connection, health, RTT, traffic totals over every
/// connection and the largest lag; with `per_space`, each (space, replica) pair's lag too.
pub fn record_primary(status: &PrimaryStatus, per_space: bool) {
    for r in &status.replicas {
        let replica = r.name.clone();
        let connected = r.state != Health::Disconnected;
        gauge!("walship_replica_connected", "replica" => replica.clone()).set(f64::from(u8::from(connected)));
        gauge!("walship_replica_healthy", "replica" => replica.clone())
            .set(f64::from(u8::from(r.state == Health::Healthy)));
        if let Some(rtt) = r.rtt_ms {
            gauge!("walship_replica_rtt_seconds", "replica" => replica.clone()).set(rtt / 1e3);
        }
        counter!("walship_replica_reconnects_total", "replica" => replica.clone()).absolute(r.reconnects);
        let t = &r.totals;
        counter!("walship_replication_batches_total", "replica" => replica.clone()).absolute(t.batches_sent);
        counter!("walship_replication_entries_total", "replica" => replica.clone()).absolute(t.entries_sent);
        for (outcome, n) in [
            ("compressed", t.codec.compressed),
            ("too_small", t.codec.too_small),
            ("incompressible", t.codec.incompressible),
        ] {
            counter!("walship_replication_codec_batches_total", "replica" => replica.clone(), "outcome" => outcome)
                .absolute(n);
        }
        for (stage, n) in [("in", t.codec.bytes_in), ("out", t.codec.bytes_out)] {
            counter!("walship_replication_codec_bytes_total", "replica" => replica.clone(), "stage" => stage)
                .absolute(n);
        }
        counter!("walship_replication_bytes_total", "replica" => replica.clone(), "direction" => "sent")
            .absolute(t.bytes_sent);
        counter!("walship_replication_udp_bytes_total", "replica" => replica.clone(), "direction" => "sent")
            .absolute(t.udp_tx_bytes);
        counter!("walship_replication_udp_bytes_total", "replica" => replica.clone(), "direction" => "received")
            .absolute(t.udp_rx_bytes);
        counter!("walship_replication_lost_packets_total", "replica" => replica.clone()).absolute(t.lost_packets);
        counter!("walship_replication_congestion_events_total", "replica" => replica.clone())
            .absolute(t.congestion_events);
        gauge!("walship_replication_max_lag_seconds", "replica" => replica.clone()).set(r.max_lag.ms as f64 / 1e3);
        gauge!("walship_replication_max_lag_entries", "replica" => replica.clone()).set(r.max_lag.entries as f64);
        let failing = r.spaces.iter().filter(|s| s.error.is_some()).count();
        gauge!("walship_replication_spaces_failing", "replica" => replica.clone()).set(failing as f64);
        if per_space {
            for s in &r.spaces {
                let labels = [("replica", replica.clone()), ("space", s.space.to_string())];
                gauge!("walship_replication_lag_seconds", &labels).set(s.lag.ms as f64 / 1e3);
                gauge!("walship_replication_lag_entries", &labels).set(s.lag.entries as f64);
                gauge!("walship_replication_lag_bytes", &labels).set(s.lag.bytes as f64);
            }
        }
    }
    gauge!("walship_spaces").set(status.spaces.len() as f64);
}

/// Records a replica's status: connection, reconnects, bytes of large frames in assembly; with
/// `per_space`, each space's last, durable and applied sequence and its catch-up requests.
pub fn record_replica(status: &ReplicaStatus, per_space: bool) {
    let connected = status.connection == ConnectionState::Connected;
    gauge!("walship_connected_to_primary").set(f64::from(u8::from(connected)));
    if let Some(rtt) = status.rtt_ms {
        gauge!("walship_primary_rtt_seconds").set(rtt / 1e3);
    }
    counter!("walship_reconnects_total").absolute(status.reconnects);
    gauge!("walship_assembling_bytes").set(status.assembling_bytes as f64);
    gauge!("walship_spaces").set(status.spaces.len() as f64);
    let failing = status.spaces.iter().filter(|s| s.error.is_some()).count();
    gauge!("walship_spaces_failing").set(failing as f64);
    if per_space {
        for s in &status.spaces {
            let space = s.log.space.to_string();
            gauge!("walship_space_last_seq", "space" => space.clone()).set(s.log.last_seq.0 as f64);
            gauge!("walship_space_durable_seq", "space" => space.clone()).set(s.log.durable_seq.0 as f64);
            gauge!("walship_space_applied_seq", "space" => space.clone()).set(s.applied_seq.0 as f64);
            counter!("walship_space_catch_ups_total", "space" => space).absolute(s.catch_ups);
        }
    }
}
