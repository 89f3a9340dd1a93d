//! A hand-driven replica that breaks the control protocol in ways the codec cannot see: the
//! primary must close the connection (or keep shipping correctly), never sit in a half-open state.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use walship::codec::batch::BATCH_HEADER_LEN;
use walship::codec::control::{Ack, SpaceAck};
use walship::codec::stream::STREAM_HEADER_LEN;
use walship::codec::{BatchDecoder, BatchHeader, ControlMessage, FrameLimits, StreamHeader};
use walship::{Primary, Seq, SpaceId};

async fn primary(c: &Cluster) -> Primary {
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    // The hand-driven replica sends no heartbeats: keep liveness out of the picture.
    cfg.heartbeat.timeout = Duration::from_secs(120);
    Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap()
}

/// Connects as replica-1, says hello (holding nothing) and reads the welcome.
async fn handshake(
    c: &Cluster,
    p: &Primary,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let mut r = hand_driven_replica(c, p.local_addr(), vec![], vec![]).await;
    assert!(matches!(next_control(&mut r.recv, &mut r.buf).await, ControlMessage::Welcome(_)));
    (r.endpoint, r.conn, r.send, r.recv)
}

/// The replica finishes its control stream right after the handshake: no ack can ever arrive, so
/// every space would stall once `max_unacked_bytes` are in flight. The primary closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_finishing_its_control_stream_gets_the_connection_closed() {
    let c = Cluster::new();
    let p = primary(&c).await;
    let (_ep, conn, mut send, _recv) = handshake(&c, &p).await;
    send.finish().unwrap();
    let closed = tokio::time::timeout(DEADLINE, conn.closed()).await;
    assert!(closed.is_ok(), "the primary kept a connection whose control stream is finished");
    p.shutdown().await;
}

/// Reads every data stream: headers and frames must decode; records the highest sequence received.
fn receive_data(conn: quinn::Connection, highest: Arc<AtomicU64>, bad: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while let Ok(mut recv) = conn.accept_uni().await {
            let (highest, bad) = (highest.clone(), bad.clone());
            tokio::spawn(async move {
                let mut h = [0u8; STREAM_HEADER_LEN];
                if recv.read_exact(&mut h).await.is_err() {
                    return;
                }
                if StreamHeader::decode(&h).is_err() {
                    bad.fetch_add(1, Ordering::Relaxed);
                    let _ = recv.stop(walship::net::stream_code::BAD_FRAME);
                    return;
                }
                let mut dec = BatchDecoder::new(FrameLimits::default());
                loop {
                    let mut fh = [0u8; BATCH_HEADER_LEN];
                    if recv.read_exact(&mut fh).await.is_err() {
                        return;
                    }
                    let Ok(header) = BatchHeader::decode(&fh, dec.limits()) else { return };
                    let mut payload = vec![0u8; header.payload_len as usize];
                    if recv.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let Ok(b) = dec.decode_payload(header, Bytes::from(payload)) else { return };
                    highest.fetch_max(b.header.last_seq().0, Ordering::Relaxed);
                }
            });
        }
    });
}

/// The replica acks `durable = u64::MAX` for a space, far past anything the primary holds or sent.
/// The primary ignores such an ack and keeps shipping (before, the shipper's next sequence
/// overflowed: a panic in debug builds, a wrap to 0 and a stalled space in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_past_the_primarys_head_is_ignored_and_shipping_goes_on() {
    let c = Cluster::new();
    let p = primary(&c).await;
    let space = SpaceId::new("a").unwrap();
    write(&p, std::slice::from_ref(&space), 10).await;
    let (_ep, conn, mut send, _recv) = handshake(&c, &p).await;
    let (highest, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    receive_data(conn.clone(), highest.clone(), bad.clone());
    wait_for("the first 10 entries", || highest.load(Ordering::Relaxed) >= 10).await;

    let ack = ControlMessage::Ack(Ack {
        spaces: vec![SpaceAck { space: space.clone(), durable: Seq(u64::MAX), applied: Seq(u64::MAX) }],
    });
    send.write_all(&ack.encode().unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    write(&p, std::slice::from_ref(&space), 10).await;

    // Ignored: shipping goes on over the same connection.
    wait_for("entries 11..=20 shipped", || highest.load(Ordering::Relaxed) >= 20).await;
    assert!(conn.close_reason().is_none(), "the connection closed: {:?}", conn.close_reason());
    assert_eq!(bad.load(Ordering::Relaxed), 0, "stream headers refused");
    p.shutdown().await;
}

/// Retention trims past what a connected replica holds, and its catch-up request then finds the
/// entries gone (`Truncated` found while shipping, not at the handshake). As after a refusal at
/// the handshake, only a snapshot can help it: it no longer holds retention back (it used to,
/// at its last ack, for as long as it stayed connected, and in the list kept across restarts),
/// and its state is degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_found_to_need_a_snapshot_while_shipping_no_longer_holds_retention_back() {
    use walship::codec::control::CatchUp;
    use walship::codec::ErrorCode;
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.heartbeat.timeout = Duration::from_secs(120);
    cfg.wal.segment_bytes = 4096;
    let p = Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let s = spaces(1);
    write(&p, &s, 300).await;
    let (_endpoint, conn, mut send, mut recv) = handshake(&c, &p).await;
    // Streams are taken and never read: nothing becomes durable on the replica.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok(r) = conn.accept_uni().await {
            held.push(r);
        }
    });
    wait_for("the replica counted from 0", || p.durable_everywhere(&s[0]) == Some(Seq(0))).await;
    assert!(p.space(&s[0]).unwrap().truncate_prefix(Seq(150)).unwrap() > Seq(1), "nothing trimmed");
    let ask = ControlMessage::CatchUp(CatchUp { space: s[0].clone(), from_seq: Seq(1), reason: String::new() });
    send.write_all(&ask.encode().unwrap()).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let ControlMessage::Error(e) = next_control(&mut recv, &mut buf).await {
                if e.code == ErrorCode::Truncated {
                    return;
                }
            }
        }
    })
    .await
    .expect("no Truncated error");
    wait_for("retention no longer held back", || p.durable_everywhere(&s[0]).is_none()).await;
    let view = p.status().replicas.into_iter().next().unwrap();
    assert_eq!(view.state, walship::protocol::health::Health::Degraded, "{view:?}");
    p.shutdown().await;
    let known = std::fs::read_to_string(c.path("primary").join("replicas+known")).unwrap();
    let json: serde_json::Value = serde_json::from_str(known.lines().next().unwrap()).unwrap();
    assert_eq!(json["replicas"]["replica-1"][s[0].as_str()], "needs_snapshot", "{json}");
}

/// A replica that stops a caught-up space's stream (here with `LOCAL_FAILURE`) leaves the space
/// "retrying" until the next write opens a stream again: a transient state, which the lag (none)
/// describes, not a degraded replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stream_of_a_caught_up_space_does_not_degrade_the_replica() {
    use walship::protocol::health::Health;
    let c = Cluster::new();
    let p = primary(&c).await;
    let space = SpaceId::new("a").unwrap();
    write(&p, std::slice::from_ref(&space), 10).await;
    let (_ep, conn, mut send, _recv) = handshake(&c, &p).await;
    let mut recv = conn.accept_uni().await.unwrap();
    let mut h = [0u8; STREAM_HEADER_LEN];
    recv.read_exact(&mut h).await.unwrap();
    let mut dec = BatchDecoder::new(FrameLimits::default());
    let mut highest = 0;
    while highest < 10 {
        let mut fh = [0u8; BATCH_HEADER_LEN];
        recv.read_exact(&mut fh).await.unwrap();
        let header = BatchHeader::decode(&fh, dec.limits()).unwrap();
        let mut payload = vec![0u8; header.payload_len as usize];
        recv.read_exact(&mut payload).await.unwrap();
        highest = dec.decode_payload(header, Bytes::from(payload)).unwrap().header.last_seq().0;
    }
    let ack = ControlMessage::Ack(Ack {
        spaces: vec![SpaceAck { space: space.clone(), durable: Seq(10), applied: Seq(10) }],
    });
    send.write_all(&ack.encode().unwrap()).await.unwrap();
    let state = || p.status().replicas[0].state;
    wait_for("healthy", || state() == Health::Healthy).await;
    recv.stop(walship::net::stream_code::LOCAL_FAILURE).unwrap();
    wait_for("the stop seen", || p.status().replicas[0].spaces[0].error.is_some()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(), Health::Healthy, "{:?}", p.status().replicas[0]);
    p.shutdown().await;
}
