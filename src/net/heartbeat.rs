//! Heartbeat datagrams on a connection, both ways: liveness, RTT and a lag summary, never queued
//! behind stream data.

use std::sync::{Arc, Mutex};

use quinn::Connection;

use crate::codec::heartbeat::SeqSummary;
use crate::codec::Heartbeat;
use crate::config::HeartbeatConfig;
use crate::net::{close, lock};
use crate::protocol::liveness::Liveness;
use crate::types::Epoch;
use crate::wal::WalStore;

/// Sends heartbeats every `cfg.interval`, reads the peer's, and closes the connection when the peer
/// has been silent longer than `cfg.timeout` or sends a malformed heartbeat. Returns when the
/// connection is closed.
pub(crate) async fn run(
    conn: Connection,
    cfg: HeartbeatConfig,
    liveness: Arc<Mutex<Liveness>>,
    epoch: Epoch,
    summary: impl Fn() -> SeqSummary,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = tokio::time::Instant::now().into_std();
                // The summary walks every space: not while the liveness the receive side updates is locked.
                let summary = summary();
                let (hb, dead) = {
                    let l = lock(&liveness);
                    (l.heartbeat(now, epoch, summary), l.is_dead(now))
                };
                if dead {
                    tracing::warn!(peer = %conn.remote_address(), timeout = ?cfg.timeout, "peer silent too long; closing the connection");
                    conn.close(close::DEAD_PEER, b"no heartbeat within the timeout");
                    return;
                }
                if let Ok(bytes) = hb.encode() {
                    // A lost or refused datagram is what heartbeats are for: nothing to do.
                    let _ = conn.send_datagram(bytes);
                }
            }
            d = conn.read_datagram() => {
                let Ok(bytes) = d else { return };
                match Heartbeat::decode(&bytes) {
                    Ok(hb) => lock(&liveness).on_heartbeat(&hb, tokio::time::Instant::now().into_std()),
                    Err(e) => {
                        tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed heartbeat; closing the connection");
                        conn.close(close::PROTOCOL, b"malformed heartbeat");
                        return;
                    }
                }
            }
        }
    }
}

/// The position summary a node's heartbeats carry: its spaces and their last sequences, and the
/// largest lag in entries it sees (a primary: of the peer replica over all spaces; a replica: 0).
pub(crate) fn store_summary(store: &WalStore, max_lag_entries: u64) -> SeqSummary {
    let spaces = store.spaces();
    SeqSummary {
        spaces: spaces.len() as u32,
        total_last_seq: spaces.iter().map(|w| w.last_seq().0).sum(),
        max_lag_entries,
    }
}
