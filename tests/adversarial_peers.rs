//! Peers that break the rules, and a replica that keeps crashing: a hand-driven primary whose
//! batches go back in epochs, repeat held entries with other contents, belong to another space,
//! stop mid-frame or use two streams for one space; a hand-driven replica that floods catch-up
//! requests without reading its control stream, or opens streams of its own; a replica dropped
//! again and again under a writer. The replica must never apply a wrong entry, the primary's
//! memory must stay bounded, and the status must never call a replica healthy while it lacks
//! entries.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use walship::codec::control::{CatchUp, SpacePosition, SpaceRange, Welcome};
use walship::codec::{BatchEncoder, Compression, ControlMessage, ErrorCode, PROTOCOL_VERSION};
use walship::net::endpoint::TransportSettings;
use walship::protocol::health::Health;
use walship::{ApplyHook, Entry, Epoch, NodeId, Primary, Replica, Seq, SpaceId};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn sid(s: &str) -> SpaceId {
    SpaceId::new(s).unwrap()
}

/// Entries `from..from+n` in `epoch`, payloads tagged with `tag`.
fn mk_entries(from: u64, n: u64, epoch: u64, tag: &str) -> Vec<Entry> {
    (from..from + n)
        .map(|s| Entry::new(Seq(s), Epoch(epoch), 1_000 + s, 1, Bytes::from(format!("{tag}-{s}"))))
        .collect()
}

/// A frame of `entries` tagged for `space` (the space tag), from the primary named "primary".
fn mk_frame(space: &SpaceId, entries: &[Entry]) -> Bytes {
    BatchEncoder::new(NodeId::from_name("primary"), Compression::None).encode(space, entries).unwrap()
}

async fn send_welcome(send: &mut quinn::SendStream, epoch: u64, spaces: &[SpaceId]) {
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: Epoch(epoch),
        spaces: spaces.iter().map(|s| SpaceRange { space: s.clone(), first_seq: Seq(1), last_seq: Seq(1) }).collect(),
        max_inflight_bytes: 64 << 20,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();
}

/// Collects every control message the replica sends (acks, catch-ups, errors).
fn collect_control(mut recv: quinn::RecvStream) -> Arc<Mutex<Vec<ControlMessage>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        loop {
            use walship::codec::control::DEFAULT_MAX_CONTROL_BYTES;
            match ControlMessage::decode_from(&mut buf, DEFAULT_MAX_CONTROL_BYTES) {
                Ok(Some(m)) => {
                    o.lock().unwrap().push(m);
                    continue;
                }
                Ok(None) => {}
                Err(_) => return,
            }
            match recv.read_chunk(65536, true).await {
                Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                _ => return,
            }
        }
    });
    out
}

/// A replica that a hand-driven primary has welcomed with `spaces` at `epoch`. What the replica
/// sends on its control stream is collected in `ctl`; `keep` holds the primary's endpoint and
/// control stream open (bind it to a named variable, not `_`).
struct Welcomed {
    replica: Replica,
    conn: quinn::Connection,
    ctl: Arc<Mutex<Vec<ControlMessage>>>,
    keep: (quinn::Endpoint, quinn::SendStream),
}

async fn welcomed(c: &Cluster, epoch: u64, spaces: &[SpaceId]) -> Welcomed {
    let HandDrivenPrimary { replica, endpoint, conn, mut send, recv } = hand_driven_primary(c, |_| {}).await;
    send_welcome(&mut send, epoch, spaces).await;
    Welcomed { replica, conn, ctl: collect_control(recv), keep: (endpoint, send) }
}

fn log_of(r: &Replica, s: &SpaceId) -> Vec<Entry> {
    r.space(s)
        .map(|w| if w.last_seq() == Seq(0) { vec![] } else { w.read_from(Seq(1), usize::MAX, usize::MAX).unwrap() })
        .unwrap_or_default()
}

/// Tests that measure this process's memory (RSS) hold it alone; the others share it. Tests of
/// one binary run in parallel, and RSS counts them all.
static MEMORY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Records every (space, seq, payload) the hook is given.
#[derive(Default)]
struct Recording {
    applied: Mutex<Vec<(SpaceId, u64, Bytes)>>,
}
struct RecHook(Arc<Recording>);
impl ApplyHook for RecHook {
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.0.applied.lock().unwrap().extend(entries.iter().map(|e| (space.clone(), e.seq.0, e.payload.clone())));
        })
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Hostile primary: an epoch that goes backwards mid-session.
// ---------------------------------------------------------------------------------------------

/// The primary (welcome epoch 2) sends entries 1..=3 in epoch 2, then 4..=6 in epoch 1 on the
/// same stream. A log's epochs never go down: entries of epoch 1 after entries of epoch 2 are not
/// any primary's history. The replica must not append them (and must say so, a catch-up or an
/// error), else its log ends in epoch 1 and a restarted replica would accept a deposed epoch-1
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_epoch_going_backwards_mid_session_is_refused() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let s = sid("s");
    let Welcomed { replica, conn, ctl, keep: _keep } = welcomed(&c, 2, std::slice::from_ref(&s)).await;
    let mut st = open_space_stream(&conn, &s, 1).await;
    st.write_all(&mk_frame(&s, &mk_entries(1, 3, 2, "e2"))).await.unwrap();
    st.write_all(&mk_frame(&s, &mk_entries(4, 3, 1, "e1"))).await.unwrap();
    wait_for("the first frame", || replica.space(&s).is_some_and(|w| w.last_seq() >= Seq(3))).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let log = log_of(&replica, &s);
    let epochs: Vec<(u64, u64)> = log.iter().map(|e| (e.seq.0, e.epoch.0)).collect();
    let reported =
        ctl.lock().unwrap().iter().any(|m| matches!(m, ControlMessage::CatchUp(_) | ControlMessage::Error(_)));
    assert!(
        log.len() == 3 && reported,
        "the replica's log (seq, epoch) = {epochs:?}; last_epoch {:?}; reported to the primary: {reported}; status error {:?}",
        replica.space(&s).unwrap().last_epoch(),
        replica.status().spaces[0].error
    );
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Hostile primary: a frame the replica already holds, with other contents, same epoch.
// ---------------------------------------------------------------------------------------------

/// Entries 1..=5 arrive with contents A; then a new stream from 1 carries 1..=5 with contents B
/// in the same epoch. The replica keeps A and, as for any conflicting entry, stops the space with
/// `Error { Diverged }`. A batch it held whole used to be skipped unread, reported nowhere, and
/// acked as if the replica held the primary's 1..=5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_wholly_held_batch_with_other_contents_is_reported() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let s = sid("s");
    let Welcomed { replica, conn, ctl, keep: _keep } = welcomed(&c, 1, std::slice::from_ref(&s)).await;
    let mut st = open_space_stream(&conn, &s, 1).await;
    st.write_all(&mk_frame(&s, &mk_entries(1, 5, 1, "A"))).await.unwrap();
    st.finish().unwrap();
    wait_for("A 1..=5", || replica.space(&s).is_some_and(|w| w.last_seq() == Seq(5))).await;
    let before = log_of(&replica, &s);
    let mut st2 = open_space_stream(&conn, &s, 1).await;
    st2.write_all(&mk_frame(&s, &mk_entries(1, 5, 1, "B"))).await.unwrap();
    st2.finish().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(log_of(&replica, &s), before, "the replica's entries changed");
    let diverged =
        ctl.lock().unwrap().iter().any(|m| matches!(m, ControlMessage::Error(e) if e.code == ErrorCode::Diverged));
    let status_err = replica.status().spaces[0].error.clone();
    assert!(
        diverged || status_err.is_some(),
        "a batch 1..=5 with other contents than the replica's 1..=5 (same epoch) was silently skipped: \
         no Diverged sent, status error {status_err:?}; messages sent: {:?}",
        ctl.lock().unwrap().iter().map(|m| format!("{m:?}")).collect::<Vec<_>>()
    );
    replica.shutdown().await;
}

/// Control for the above: a batch that overlaps the end of the log with other contents (1..=5
/// held, 3..=8 sent with 3..=5 different) is reported Diverged and nothing is appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_overlapping_batch_with_other_contents_is_reported_diverged() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let s = sid("s");
    let Welcomed { replica, conn, ctl, keep: _keep } = welcomed(&c, 1, std::slice::from_ref(&s)).await;
    let mut st = open_space_stream(&conn, &s, 1).await;
    st.write_all(&mk_frame(&s, &mk_entries(1, 5, 1, "A"))).await.unwrap();
    st.write_all(&mk_frame(&s, &mk_entries(3, 6, 1, "B"))).await.unwrap();
    wait_for("Diverged reported", || {
        ctl.lock().unwrap().iter().any(|m| matches!(m, ControlMessage::Error(e) if e.code == ErrorCode::Diverged))
    })
    .await;
    let log = log_of(&replica, &s);
    assert_eq!(log, mk_entries(1, 5, 1, "A"));
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Hostile primary: a stream header for one space with frames of another.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_frames_of_another_space_are_refused() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let (a, b) = (sid("a"), sid("b"));
    let Welcomed { replica, conn, ctl, keep: _keep } = welcomed(&c, 1, &[a.clone(), b.clone()]).await;
    // Stream header says a, frames are tagged b.
    let mut st = open_space_stream(&conn, &a, 1).await;
    st.write_all(&mk_frame(&b, &mk_entries(1, 4, 1, "b"))).await.unwrap();
    wait_for("a catch-up for a", || {
        ctl.lock().unwrap().iter().any(|m| matches!(m, ControlMessage::CatchUp(c) if c.space == a))
    })
    .await;
    assert!(log_of(&replica, &a).is_empty(), "frames tagged b were appended to a");
    assert!(log_of(&replica, &b).is_empty());
    // The same space's good frames on a new stream go in.
    let mut st = open_space_stream(&conn, &a, 1).await;
    st.write_all(&mk_frame(&a, &mk_entries(1, 4, 1, "a"))).await.unwrap();
    wait_for("a 1..=4", || log_of(&replica, &a).len() == 4).await;
    assert_eq!(log_of(&replica, &a), mk_entries(1, 4, 1, "a"));
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile primary: a stream reset in the middle of a large frame.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_reset_mid_frame_leaves_no_partial_entry_and_frees_assembly() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let s = sid("s");
    let Welcomed { replica, conn, ctl: _ctl, keep: _keep } = welcomed(&c, 1, std::slice::from_ref(&s)).await;
    let big: Vec<Entry> =
        (1..=4u64).map(|q| Entry::new(Seq(q), Epoch(1), q, 1, Bytes::from(vec![q as u8; 300_000]))).collect();
    let frame = mk_frame(&s, &big);
    let mut st = open_space_stream(&conn, &s, 1).await;
    st.write_all(&frame[..frame.len() / 2]).await.unwrap();
    wait_for("the replica assembling the large frame", || replica.status().assembling_bytes > 0).await;
    st.reset(quinn::VarInt::from_u32(1)).unwrap();
    wait_for("assembly released after the reset", || replica.status().assembling_bytes == 0).await;
    assert!(log_of(&replica, &s).is_empty());
    let mut st = open_space_stream(&conn, &s, 1).await;
    st.write_all(&frame).await.unwrap();
    wait_for("the whole frame", || log_of(&replica, &s).len() == 4).await;
    assert_eq!(log_of(&replica, &s), big);
    assert_eq!(replica.status().assembling_bytes, 0);
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Hostile primary: the same space on two streams at once.
// ---------------------------------------------------------------------------------------------

/// Two streams for the same space, both from 1, frames interleaved (same contents). The log must
/// be exactly 1..=N and the hook must see each entry once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_same_space_on_two_streams_applies_each_entry_once() {
    let _shared = MEMORY.read().await;
    const N: u64 = 400;
    let c = Cluster::new();
    let ep = walship::net::endpoint::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &c.ca.issue("primary").unwrap(),
        &TransportSettings::default(),
    )
    .unwrap();
    let mut cfg = c.replica_config("replica-1", ep.local_addr().unwrap());
    cfg.heartbeat.timeout = Duration::from_secs(120);
    let rec = Arc::new(Recording::default());
    let replica = Replica::start_with_hook(cfg, c.ca.issue("replica-1").unwrap(), Some(Arc::new(RecHook(rec.clone()))))
        .await
        .unwrap();
    let conn = ep.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(next_control(&mut recv, &mut buf).await, ControlMessage::Hello(_)));
    let s = sid("s");
    send_welcome(&mut send, 1, std::slice::from_ref(&s)).await;
    let _ctl = collect_control(recv);
    let all = mk_entries(1, N, 1, "x");
    let mut st1 = open_space_stream(&conn, &s, 1).await;
    let mut st2 = open_space_stream(&conn, &s, 1).await;
    let mut rng = Rng(0x5EED_0005);
    let mut at1 = 0usize;
    let mut at2 = 0usize;
    while at1 < all.len() || at2 < all.len() {
        let n = 1 + rng.below(7);
        if rng.below(2) == 0 && at1 < all.len() {
            let end = (at1 + n).min(all.len());
            let _ = st1.write_all(&mk_frame(&s, &all[at1..end])).await;
            at1 = end;
        } else if at2 < all.len() {
            let end = (at2 + n).min(all.len());
            let _ = st2.write_all(&mk_frame(&s, &all[at2..end])).await;
            at2 = end;
        } else {
            let end = (at1 + n).min(all.len());
            let _ = st1.write_all(&mk_frame(&s, &all[at1..end])).await;
            at1 = end;
        }
        if rng.below(4) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let _ = st1.finish();
    let _ = st2.finish();
    // The older stream is abandoned once the newer takes over: whatever it did not carry, a third
    // stream (a catch-up, as a primary would) completes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let have = replica.space(&s).map_or(0, |w| w.last_seq().0);
    if have < N {
        let mut st3 = open_space_stream(&conn, &s, have + 1).await;
        st3.write_all(&mk_frame(&s, &all[have as usize..])).await.unwrap();
        let _ = st3.finish();
    }
    wait_for("N entries", || replica.space(&s).is_some_and(|w| w.last_seq() == Seq(N))).await;
    assert_eq!(log_of(&replica, &s), all);
    wait_for("applied N", || replica.status().spaces[0].applied_seq == Seq(N)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen: Vec<u64> = rec.applied.lock().unwrap().iter().map(|(_, q, _)| *q).collect();
    assert_eq!(seen, (1..=N).collect::<Vec<_>>(), "the hook saw entries other than each once in order");
    replica.shutdown().await;
}

/// Under loss, the header of a stream the primary gave up (a catch-up reset it and opened
/// another) can arrive after the newer stream's. The older one is dropped and the newer one goes
/// on: it used to take over as the newest, stopping the live stream until the primary noticed
/// and opened another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_header_of_an_abandoned_stream_does_not_stop_the_live_one() {
    let c = Cluster::new();
    let s = sid("s");
    let Welcomed { replica, conn, ctl: _ctl, keep: _keep } = welcomed(&c, 1, std::slice::from_ref(&s)).await;
    let all = mk_entries(1, 9, 1, "x");
    // Opened first, written last: as if its packets were lost and resent after the newer one's.
    let mut abandoned = conn.open_uni().await.unwrap();
    let mut live = open_space_stream(&conn, &s, 1).await;
    live.write_all(&mk_frame(&s, &all[..3])).await.unwrap();
    wait_for("1..=3 over the live stream", || replica.space(&s).is_some_and(|w| w.last_seq() == Seq(3))).await;
    let header = walship::codec::StreamHeader { space: s.clone(), start_seq: Seq(1) };
    abandoned.write_all(&header.encode()).await.unwrap();
    abandoned.write_all(&mk_frame(&s, &all[..2])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    live.write_all(&mk_frame(&s, &all[3..])).await.unwrap();
    wait_for("4..=9 over the live stream", || replica.space(&s).is_some_and(|w| w.last_seq() == Seq(9))).await;
    assert_eq!(log_of(&replica, &s), all);
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile replica: catch-up requests whose answers it never reads.
// ---------------------------------------------------------------------------------------------

/// A replica (authenticated, after a valid handshake) asks for catch-up from 1 on spaces whose
/// start the primary trimmed, over and over, and never reads its control stream. Each request
/// makes the shipper open a stream, fail to read (`Truncated`) and report an `Error` for the
/// space, which cannot be sent because the replica reads nothing. The reports must coalesce (one
/// per space) instead of piling up: they used to queue without bound, ~200 bytes each.
/// Streams the primary opened (one per failed restart) count the requests taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replica_catch_up_spam_does_not_grow_primary_memory_without_bound() {
    let _alone = MEMORY.write().await;
    const SPACES: usize = 16;
    let c = Cluster::new();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.heartbeat.timeout = Duration::from_secs(600);
    pcfg.wal.segment_bytes = 4096;
    let p = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let sp: Vec<SpaceId> = (0..SPACES).map(|i| sid(&format!("t{i}"))).collect();
    write(&p, &sp, 200).await;
    let mut positions = Vec::new();
    for s in &sp {
        let w = p.space(s).unwrap();
        w.sync().unwrap();
        let first = w.truncate_prefix(Seq(100)).unwrap();
        assert!(first > Seq(1), "nothing trimmed");
        positions.push(SpacePosition {
            space: s.clone(),
            last_seq: w.last_seq(),
            last_epoch: Epoch(1),
            digest: w.digest(),
            durable_seq: w.last_seq(),
            applied_seq: w.last_seq(),
        });
    }
    let HandDrivenReplica { endpoint: _ep, conn, mut send, recv, .. } =
        hand_driven_replica(&c, p.local_addr(), positions, vec![]).await;
    // Never read `recv` (the control stream's primary -> replica half).
    let streams = Arc::new(AtomicU64::new(0));
    {
        let (conn, streams) = (conn.clone(), streams.clone());
        tokio::spawn(async move {
            while let Ok(r) = conn.accept_uni().await {
                streams.fetch_add(1, Ordering::Relaxed);
                drop(r);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = rss_bytes();
    let base_streams = streams.load(Ordering::Relaxed);
    let mut sent = 0u64;
    let start = tokio::time::Instant::now();
    let mut rng = Rng(0xCA7C_0006);
    // Once the first seconds have filled the buffers a connection may hold (stream windows, the
    // streams each restart opens), memory must stop growing: each request used to queue an Error
    // for the replica that never read it, 3.4 MiB a second here.
    let mut settled_rss = None;
    while start.elapsed() < Duration::from_secs(8) {
        if settled_rss.is_none() && start.elapsed() >= Duration::from_secs(3) {
            settled_rss = Some(rss_bytes());
        }
        let mut bytes = Vec::new();
        for _ in 0..64 {
            let s = &sp[rng.below(SPACES)];
            bytes.extend_from_slice(
                &ControlMessage::CatchUp(CatchUp { space: s.clone(), from_seq: Seq(1), reason: String::new() })
                    .encode()
                    .unwrap(),
            );
            sent += 1;
        }
        if send.write_all(&bytes).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let settled = settled_rss.expect("ran past 3 s");
    let later = rss_bytes().saturating_sub(settled);
    let restarts = streams.load(Ordering::Relaxed) - base_streams;
    println!(
        "catch-ups sent {sent}, failed restarts {restarts}, RSS grew {} MiB in all, {} MiB after the first 3 s",
        rss_bytes().saturating_sub(base_rss) >> 20,
        later >> 20
    );
    assert!(restarts > 1_000, "the requests were taken: {restarts} restarts");
    assert!(
        later < 8 << 20,
        "the primary's memory grew by {} MiB in the last 5 s while a replica that reads nothing sent catch-up requests",
        later >> 20
    );
    drop(recv);
    drop(conn);
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Hostile replica: streams the protocol never has a replica open; garbage datagrams.
// ---------------------------------------------------------------------------------------------

/// A replica never opens data streams, nor a second control stream: the primary closes the
/// connection at the first (it used to leave them unread, their data held in its buffers up to
/// the connection's 64 MiB receive window). A garbage datagram closes it too, without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replica_streams_of_its_own_close_the_connection() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.heartbeat.timeout = Duration::from_secs(600);
    let p = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let connect = || async {
        let mut r = hand_driven_replica(&c, p.local_addr(), vec![], vec![]).await;
        assert!(matches!(next_control(&mut r.recv, &mut r.buf).await, ControlMessage::Welcome(_)));
        (r.endpoint, r.conn, r.send, r.recv)
    };
    let closed_with = |conn: quinn::Connection| async move {
        match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => String::from_utf8_lossy(&c.reason).into_owned(),
            other => panic!("the primary did not close the connection: {other:?}"),
        }
    };

    let (_ep, conn, _send, _recv) = connect().await;
    let mut st = conn.open_uni().await.unwrap();
    let _ = st.write_all(&vec![0xAB; 256 * 1024]).await;
    assert!(closed_with(conn).await.contains("unexpected stream: a data stream"));

    let (_ep, conn, _send, _recv) = connect().await;
    let (mut st, _) = conn.open_bi().await.unwrap();
    let _ = st.write_all(b"more control").await;
    assert!(closed_with(conn).await.contains("unexpected stream: a second control stream"));

    let (_ep, conn, _send, _recv) = connect().await;
    let _ = conn.send_datagram(Bytes::from_static(b"\xff\xff\xff garbage"));
    closed_with(conn).await;
    p.shutdown().await;
}

/// Nor does a primary ever open a control stream: the replica closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_primary_control_stream_of_its_own_closes_the_connection() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let HandDrivenPrimary { replica, endpoint: _ep, conn, mut send, recv: _recv } =
        hand_driven_primary(&c, |_| {}).await;
    send_welcome(&mut send, 1, &[]).await;
    wait_for("connected", || replica.status().connection == walship::net::status::ConnectionState::Connected).await;
    let (mut st, _) = conn.open_bi().await.unwrap();
    let _ = st.write_all(b"a control stream from the primary").await;
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert!(String::from_utf8_lossy(&c.reason).contains("unexpected stream"), "{c:?}")
        }
        other => panic!("the replica did not close the connection: {other:?}"),
    }
    replica.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Status truthfulness while the handshake is still comparing spaces.
// ---------------------------------------------------------------------------------------------

/// 2,000 spaces of 3 entries each, read from disk (no memory tail); a fresh replica that holds
/// nothing connects. Until a space's shipper is registered (the handshake compares spaces in
/// chunks), the space must count as not held there: the replica is never shown `Healthy` while it
/// lacks entries. (It was shown so, with lag 0, for the few milliseconds of that window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_never_healthy_while_the_replica_lacks_entries() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.wal.tail_max_entries = 0;
    let p = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let sp: Vec<SpaceId> = (0..2000).map(|i| sid(&format!("h{i:04}"))).collect();
    write(&p, &sp, 3).await;
    let r = c.replica("replica-1", p.local_addr()).await;
    let mut lies = Vec::new();
    let start = tokio::time::Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(v) = p.status().replicas.into_iter().next() {
            if v.state == Health::Healthy {
                let lacking: Vec<_> = v.spaces.iter().filter(|s| s.durable < s.head).collect();
                if !lacking.is_empty() {
                    let rs = r.status();
                    let held: u64 = rs.spaces.iter().map(|s| s.log.last_seq.0).sum();
                    lies.push(format!(
                        "Healthy with max_lag {:?} while {} of {} spaces show durable < head (e.g. {} durable {} head {} lag {:?}); replica holds {held} of {} entries",
                        v.max_lag,
                        lacking.len(),
                        v.spaces.len(),
                        lacking[0].space,
                        lacking[0].durable,
                        lacking[0].head,
                        lacking[0].lag,
                        2000 * 3
                    ));
                    break;
                }
                if v.spaces.iter().all(|s| s.durable == s.head) {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(lies.is_empty(), "{}", lies.join("\n"));
    converge(&p, &[&r]).await;
    r.shutdown().await;
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Replica crashes (dropped without shutdown) at seeded points, restarts over the same folder.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_crash_restart_loop_log_equal_and_hook_once_per_incarnation() {
    let _shared = MEMORY.read().await;
    let c = Cluster::new();
    let p = c.primary().await;
    let sp = spaces(6);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let wals: Vec<_> = sp.iter().map(|s| p.space(s).unwrap()).collect();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for w in &wals {
                    let i = w.last_seq().0 + 1;
                    // Some large entries so frames take the credit path and span packets.
                    let body =
                        if k % 50 == 0 { Bytes::from(vec![(i % 251) as u8; 90_000]) } else { payload(w.space(), i) };
                    w.append(Epoch(1), 1, body).unwrap();
                }
                k += 1;
                if k % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let mut rng = Rng(0xC4A5_0010);
    let mut incarnations: Vec<(std::collections::HashMap<SpaceId, u64>, Arc<Recording>)> = Vec::new();
    let mut last: Option<Replica> = None;
    for round in 0..8 {
        let rec = Arc::new(Recording::default());
        let mut cfg = c.replica_config("replica-1", p.local_addr());
        cfg.wal.sync = walship::wal::SyncPolicy::Interval(Duration::from_millis(3));
        cfg.heartbeat.timeout = Duration::from_millis(400);
        let t0 = tokio::time::Instant::now();
        let r = loop {
            match Replica::start_with_hook(
                cfg.clone(),
                c.ca.issue("replica-1").unwrap(),
                Some(Arc::new(RecHook(rec.clone()))),
            )
            .await
            {
                Ok(r) => break r,
                Err(e) if t0.elapsed() < DEADLINE => {
                    eprintln!("round {round}: restart refused: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot restart the replica: {e}"),
            }
        };
        let at_start: std::collections::HashMap<SpaceId, u64> =
            sp.iter().map(|s| (s.clone(), r.space(s).map_or(0, |w| w.last_seq().0))).collect();
        incarnations.push((at_start, rec));
        if round == 7 {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(30 + rng.below(400) as u64)).await;
        drop(r); // crash: no shutdown, tasks aborted wherever they are
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let r = last.unwrap();
    converge(&p, &[&r]).await;
    wait_for("applied everywhere", || r.status().spaces.iter().all(|s| s.applied_seq == s.log.last_seq)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut problems = Vec::new();
    for (k, (at_start, rec)) in incarnations.iter().enumerate() {
        let applied = rec.applied.lock().unwrap();
        for s in &sp {
            let seen: Vec<&(SpaceId, u64, Bytes)> = applied.iter().filter(|(x, _, _)| x == s).collect();
            for (want, (_, q, body)) in (at_start[s] + 1..).zip(seen.iter()) {
                if *q != want {
                    problems
                        .push(format!("incarnation {k} {s}: hook saw {q}, expected {want} (start {})", at_start[s]));
                    break;
                }
                let pe = p.space(s).unwrap().read_from(Seq(*q), 1, usize::MAX).unwrap();
                if pe[0].payload != body {
                    problems.push(format!("incarnation {k} {s} {q}: other bytes than the primary's"));
                    break;
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    r.shutdown().await;
    p.shutdown().await;
}
