//! Sequences chosen to break the guarantees: nothing lost or applied twice through a storm of
//! reconnects and restarts, and a primary whose `wait_durable` and status never count a replica
//! as holding entries it does not hold (a log cut back under it, a space refused as diverged, an
//! ack that arrives while the handshake is still comparing spaces).

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use walship::codec::control::{Ack, SpaceAck, SpacePosition};
use walship::codec::{ControlMessage, ErrorCode};
use walship::net::status::ConnectionState;
use walship::{ApplyHook, Entry, Epoch, LogDigest, Primary, Replica, Seq, SpaceId};

/// The replica's entry `seq` of `space` equals the primary's.
fn same_entry_at(p: &Primary, r: &Replica, space: &SpaceId, seq: Seq) -> bool {
    let pe = p.space(space).unwrap().read_from(seq, 1, usize::MAX).unwrap();
    let re = r.space(space).and_then(|w| w.read_from(seq, 1, usize::MAX).ok()).unwrap_or_default();
    !pe.is_empty() && pe.first() == re.first()
}

fn space_view(p: &Primary, replica: &str, space: &SpaceId) -> Option<walship::net::status::SpaceReplication> {
    p.status().replicas.into_iter().find(|v| v.name == replica)?.spaces.into_iter().find(|s| &s.space == space)
}

// ---------------------------------------------------------------------------------------------
// 1. A primary cut back during a session and rewritten to no more than the replica holds.
// ---------------------------------------------------------------------------------------------

/// The operator cuts the primary's log back to 5 (`truncate_suffix`) and the writer appends new
/// entries 6..=8, while a caught-up replica holds the old 1..=10. Nothing past 10 is ever
/// written, yet the replica must be told (Diverged) or get the new log, and `wait_durable` must
/// not report it as holding the *new* entry 8 when it holds the old one. (The shipper checked for
/// a cut only when it read entries to send, so this went unnoticed for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_back_and_rewritten_shorter_than_the_replica_is_noticed() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let r = c.replica("replica-1", primary.local_addr()).await;
    let sp = spaces(1);
    write(&primary, &sp, 10).await;
    converge(&primary, &[&r]).await;
    wait_for("durable 10 acked", || space_view(&primary, "replica-1", &sp[0]).is_some_and(|v| v.durable == Seq(10)))
        .await;

    primary.space(&sp[0]).unwrap().truncate_suffix(Seq(5)).unwrap();
    let mut last = Seq(5);
    for i in 6..=8u64 {
        last = primary.append(&sp[0], 1, Bytes::from(format!("new-{i}"))).unwrap();
    }
    assert_eq!(last, Seq(8));

    let mut failures = Vec::new();
    // A writer waiting for its new entry 8 to be on one replica.
    let holding = primary.wait_durable(&sp[0], last, 1, Duration::from_secs(3)).await;
    if !holding.is_empty() && !same_entry_at(&primary, &r, &sp[0], Seq(8)) {
        failures.push(format!(
            "wait_durable says {holding:?} hold the new entry 8, but the replica holds the old entry 8: {:?}",
            r.space(&sp[0]).unwrap().read_from(Seq(8), 1, usize::MAX).unwrap()[0]
        ));
    }

    // Either the replica is told its space diverged, or it ends up with the primary's log.
    let start = tokio::time::Instant::now();
    loop {
        let diverged = r.status().spaces.iter().any(|s| s.error.as_deref().is_some_and(|e| e.contains("Diverged")));
        if diverged || identical(&primary, &r) {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let pv = space_view(&primary, "replica-1", &sp[0]).unwrap();
            failures.push(format!(
                "after 15 s the replica silently holds another log (replica last {} digest {:?}, primary last {} digest {:?}, \
                 no error on either side); the primary reports lag {:?}, durable {}, sent {} > head {}, health {:?}, error {:?}",
                r.space(&sp[0]).unwrap().last_seq(),
                r.space(&sp[0]).unwrap().digest(),
                primary.space(&sp[0]).unwrap().last_seq(),
                primary.space(&sp[0]).unwrap().digest(),
                pv.lag,
                pv.durable,
                pv.sent,
                pv.head,
                primary.status().replicas[0].state,
                pv.error
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    r.shutdown().await;
    primary.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Hand-driven replica helpers.
// ---------------------------------------------------------------------------------------------

async fn hand_primary(c: &Cluster) -> Primary {
    hand_primary_with(c, |_| {}).await
}

async fn hand_primary_with(c: &Cluster, tweak: impl FnOnce(&mut walship::config::PrimaryConfig)) -> Primary {
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.heartbeat.timeout = Duration::from_secs(120);
    tweak(&mut cfg);
    Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap()
}

/// Connects as replica-1 and sends a hello with `spaces`, then the messages in `after_hello`
/// right away (before reading anything). Returns the connection, send and recv halves and the
/// read buffer.
async fn hand_replica(
    c: &Cluster,
    p: &Primary,
    spaces: Vec<SpacePosition>,
    after_hello: Vec<ControlMessage>,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream, BytesMut) {
    let r = hand_driven_replica(c, p.local_addr(), spaces, after_hello).await;
    (r.endpoint, r.conn, r.send, r.recv, r.buf)
}

// ---------------------------------------------------------------------------------------------
// 2. An ack for a space the handshake refused as diverged.
// ---------------------------------------------------------------------------------------------

/// The replica's copy of a space is another log (refused as Diverged at the handshake; the
/// primary's progress for it starts at 0). The replica then acks it durable up to 10 (a real
/// replica does: its ack loop reports any space whose position moved, e.g. a slow hook still
/// applying it). The primary must ignore that ack: it used to take it, being below its head, and
/// report the replica as holding the primary's entries 1..=10, which it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_a_space_refused_as_diverged_does_not_count_as_holding_the_primarys_entries() {
    let c = Cluster::new();
    let p = hand_primary(&c).await;
    let space = SpaceId::new("forked").unwrap();
    write(&p, std::slice::from_ref(&space), 20).await;
    // The replica holds 10 entries of the same epoch with other contents: digest differs.
    let pos = SpacePosition {
        space: space.clone(),
        last_seq: Seq(10),
        last_epoch: Epoch(1),
        digest: LogDigest(0xdead_beef),
        durable_seq: Seq(10),
        applied_seq: Seq(5),
    };
    let (_ep, conn, mut send, mut recv, mut buf) = hand_replica(&c, &p, vec![pos], vec![]).await;
    assert!(matches!(next_control(&mut recv, &mut buf).await, ControlMessage::Welcome(_)));
    match next_control(&mut recv, &mut buf).await {
        ControlMessage::Error(e) => assert_eq!(e.code, ErrorCode::Diverged, "{e:?}"),
        other => panic!("expected Diverged, got {other:?}"),
    }
    assert_eq!(space_view(&p, "replica-1", &space).unwrap().durable, Seq(0));
    // The (diverged) replica's applier finishes applying its own 6..=10 and acks.
    let ack = ControlMessage::Ack(Ack {
        spaces: vec![SpaceAck { space: space.clone(), durable: Seq(10), applied: Seq(10) }],
    });
    send.write_all(&ack.encode().unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = space_view(&p, "replica-1", &space).unwrap();
    let holding = p.wait_durable(&space, Seq(10), 1, Duration::from_millis(200)).await;
    assert!(
        holding.is_empty() && v.durable == Seq(0),
        "a replica whose copy of {space} was refused as diverged is reported holding the primary's entries: \
         wait_durable(10) -> {holding:?}, view durable {} applied {} lag {:?} error {:?}",
        v.durable,
        v.applied,
        v.lag,
        v.error
    );
    drop(conn);
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. An ack that arrives before the primary has registered the space's shipper.
// ---------------------------------------------------------------------------------------------

/// A replica's ack loop starts right after the welcome, and reports each moved position once. An
/// ack for a space whose shipper the primary has not registered yet (the resume points are
/// computed on blocking threads, 64 spaces at a time) must be kept until it is: it used to be
/// dropped, and as the replica never repeats it, the primary's view of that space stayed at the
/// hello's durable position for ever (lag never cleared, wait_durable never ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_sent_right_after_the_hello_is_not_lost() {
    let c = Cluster::new();
    let p = hand_primary(&c).await;
    let sp = spaces(1500);
    write(&p, &sp, 3).await;
    // The replica holds all 3 entries of every space; none fsynced yet at the hello.
    let positions: Vec<SpacePosition> = sp
        .iter()
        .map(|s| {
            let w = p.space(s).unwrap();
            SpacePosition {
                space: s.clone(),
                last_seq: Seq(3),
                last_epoch: Epoch(1),
                digest: w.digest(),
                durable_seq: Seq(0),
                applied_seq: Seq(0),
            }
        })
        .collect();
    // Its fsync completes right after the hello; the ack goes out at once.
    let ack = ControlMessage::Ack(Ack {
        spaces: sp.iter().map(|s| SpaceAck { space: s.clone(), durable: Seq(3), applied: Seq(3) }).collect(),
    });
    let (_ep, conn, _send, mut recv, mut buf) = hand_replica(&c, &p, positions, vec![ack]).await;
    assert!(matches!(next_control(&mut recv, &mut buf).await, ControlMessage::Welcome(_)));
    let start = tokio::time::Instant::now();
    loop {
        let v = p.status().replicas.remove(0);
        let stuck: Vec<_> = v.spaces.iter().filter(|s| s.durable != Seq(3)).map(|s| s.space.clone()).collect();
        if stuck.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!(
                "{} of {} spaces still show durable < 3 (lag {:?}, state {:?}) although the replica acked 3: first {:?}",
                stuck.len(),
                sp.len(),
                v.max_lag,
                v.state,
                &stuck[..stuck.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn);
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Hooks.
// ---------------------------------------------------------------------------------------------

/// Records every (space, seq, payload) the hook is given, and every truncation.
#[derive(Default)]
struct Recording {
    applied: Mutex<Vec<(SpaceId, u64, Bytes)>>,
    truncated: Mutex<Vec<(SpaceId, u64)>>,
    delay: Option<Duration>,
}

struct RecHook(Arc<Recording>);

impl ApplyHook for RecHook {
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let Some(d) = self.0.delay {
                tokio::time::sleep(d).await;
            }
            let mut a = self.0.applied.lock().unwrap();
            a.extend(entries.iter().map(|e| (space.clone(), e.seq.0, e.payload.clone())));
        })
    }
    fn truncated<'a>(&'a self, space: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.truncated.lock().unwrap().push((space.clone(), after.0));
        // Model a state rebuild: forget what was applied past `after`.
        self.0.applied.lock().unwrap().retain(|(s, q, _)| s != space || *q <= after.0);
        Box::pin(async {})
    }
}

/// Per space: the sequence numbers applied, in order.
fn applied_by_space(rec: &Recording) -> std::collections::BTreeMap<SpaceId, Vec<u64>> {
    let mut m: std::collections::BTreeMap<SpaceId, Vec<u64>> = Default::default();
    for (s, q, _) in rec.applied.lock().unwrap().iter() {
        m.entry(s.clone()).or_default().push(*q);
    }
    m
}

async fn primary_at_epoch(c: &Cluster, addr: std::net::SocketAddr, epoch: u64) -> Primary {
    let start = tokio::time::Instant::now();
    loop {
        let mut cfg = c.primary_config(addr);
        cfg.epoch = Epoch(epoch);
        match Primary::start(cfg, c.ca.issue("primary").unwrap()).await {
            Ok(p) => return p,
            Err(e) if start.elapsed() < DEADLINE => {
                eprintln!("retrying primary start: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot start the primary: {e}"),
        }
    }
}

/// Appends `n` entries to `space` in the primary's epoch, payloads tagged with seq and epoch.
fn append_n(p: &Primary, space: &SpaceId, n: u64) {
    let w = p.space(space).unwrap();
    let epoch = p.status().epoch;
    for _ in 0..n {
        let seq = w.last_seq().next();
        w.append(
            epoch,
            (seq.0 % 3) as u8,
            Bytes::from(format!("{space}:{}:e{}:{}", seq.0, epoch.0, "z".repeat((seq.0 % 50) as usize))),
        )
        .unwrap();
    }
}

/// Checks that the hook saw every entry of every space of the primary exactly once, in order, with
/// the primary's payloads, and no truncation.
fn assert_applied_exactly_once(p: &Primary, rec: &Recording) {
    let by_space = applied_by_space(rec);
    let applied = rec.applied.lock().unwrap().clone();
    for pw in p.store().spaces() {
        let want: Vec<u64> = (1..=pw.last_seq().0).collect();
        let got = by_space.get(pw.space()).cloned().unwrap_or_default();
        if got != want {
            let mut dups = got.clone();
            dups.sort();
            let d: Vec<u64> = dups.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
            let missing: Vec<u64> = want.iter().filter(|q| !got.contains(q)).copied().collect();
            panic!(
                "{}: hook saw {} entries for a log of {}; duplicates {:?}, missing {:?}",
                pw.space(),
                got.len(),
                want.len(),
                &d[..d.len().min(20)],
                &missing[..missing.len().min(20)]
            );
        }
        let entries = pw.read_from(Seq(1), usize::MAX, usize::MAX).unwrap();
        for e in entries {
            let seen = applied.iter().find(|(s, q, _)| s == pw.space() && *q == e.seq.0).unwrap();
            assert_eq!(seen.2, e.payload, "{} {}: the hook saw other bytes", pw.space(), e.seq);
        }
    }
    assert!(rec.truncated.lock().unwrap().is_empty(), "unexpected truncations {:?}", rec.truncated.lock().unwrap());
}

// ---------------------------------------------------------------------------------------------
// 4. Hook exactly once through a seeded storm of disconnects, primary restarts (same and higher
//    epoch, longer log), spaces created while the replica is away, under interval fsyncs.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_sees_every_entry_once_through_disconnects_epoch_bumps_and_new_spaces() {
    for seed in [0xAD5E_0001u64, 0xAD5E_0002, 0xAD5E_0003] {
        println!("=== seed {seed:#x}");
        let c = Cluster::new();
        let mut rng = Rng(seed);
        let mut epoch = 1;
        let mut p = primary_at_epoch(&c, "127.0.0.1:0".parse().unwrap(), epoch).await;
        let addr = p.local_addr();
        let rec = Arc::new(Recording { delay: Some(Duration::from_millis(3)), ..Default::default() });
        let mut rcfg = c.replica_config("replica-1", addr);
        rcfg.wal.sync = walship::wal::SyncPolicy::Interval(Duration::from_millis(5));
        let r = Replica::start_with_hook(rcfg, c.ca.issue("replica-1").unwrap(), Some(Arc::new(RecHook(rec.clone()))))
            .await
            .unwrap();
        let mut sp = spaces(4);
        for round in 0..12 {
            for s in &sp {
                append_n(&p, s, 20 + rng.below(60) as u64);
            }
            match rng.below(5) {
                0 => {
                    r.disconnect();
                }
                1 => {
                    p.disconnect_replica("replica-1");
                }
                2 | 3 => {
                    // Primary restart; half of the time at a higher epoch; a new space and more
                    // entries are written before the replica can reconnect.
                    p.shutdown().await;
                    if rng.below(2) == 0 {
                        epoch += 1;
                    }
                    p = primary_at_epoch(&c, addr, epoch).await;
                    let s = SpaceId::new(&format!("new-{round}")).unwrap();
                    sp.push(s);
                    for s in &sp {
                        append_n(&p, s, 30);
                    }
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(rng.below(300) as u64)).await;
        }
        converge(&p, &[&r]).await;
        wait_for("everything applied", || r.status().spaces.iter().all(|s| s.applied_seq == s.log.last_seq)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_applied_exactly_once(&p, &rec);
        wait_for("the primary sees every space durable and applied, lag 0", || {
            let v = p.status().replicas.remove(0);
            v.state == walship::protocol::health::Health::Healthy
                && v.spaces.iter().all(|s| s.durable == s.head && s.applied == s.head && s.lag.entries == 0)
        })
        .await;
        println!("epoch reached {epoch}, {} spaces", sp.len());
        r.shutdown().await;
        p.shutdown().await;
    }
}

/// A hook that applies one call at a time (a node server with one apply thread), each call taking
/// `per_call`, and that waits for `gate` before its first call.
struct SerialHook {
    lock: tokio::sync::Mutex<()>,
    gate: Arc<tokio::sync::Semaphore>,
    per_call: Duration,
    rec: Arc<Recording>,
}

impl ApplyHook for SerialHook {
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let _p = self.gate.acquire().await.unwrap();
            let _g = self.lock.lock().await;
            tokio::time::sleep(self.per_call).await;
            self.rec
                .applied
                .lock()
                .unwrap()
                .extend(entries.iter().map(|e| (space.clone(), e.seq.0, e.payload.clone())));
        })
    }
}

// ---------------------------------------------------------------------------------------------
// 3b. The same lost ack with a real replica: its appliers keep applying across a reconnect.
// ---------------------------------------------------------------------------------------------

/// 1,500 spaces of 3 entries; the replica's hook applies one space at a time (2 ms each) and
/// starts only when the replica reconnects. Acks of the spaces applied after the hello and before
/// the primary registered their shippers must reach the primary's view (they used to be dropped,
/// their `applied` staying below the head there for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_positions_acked_during_the_handshake_reach_the_primary() {
    let c = Cluster::new();
    // Every read from disk (no memory tail): comparing 1,500 resume points takes a little while.
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.wal.tail_max_entries = 0;
    let p = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let sp = spaces(1500);
    write(&p, &sp, 3).await;
    let rec = Arc::new(Recording::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let hook = SerialHook {
        lock: Default::default(),
        gate: gate.clone(),
        per_call: Duration::from_millis(2),
        rec: rec.clone(),
    };
    let r = c.replica_with_hook("replica-1", p.local_addr(), Arc::new(hook)).await;
    converge(&p, &[&r]).await;
    wait_for("durable 3 everywhere on the primary's view", || {
        p.status()
            .replicas
            .first()
            .is_some_and(|v| v.spaces.len() == 1500 && v.spaces.iter().all(|s| s.durable == Seq(3)))
    })
    .await;
    assert!(r.disconnect());
    gate.add_permits(1 << 20);
    wait_for("every entry applied on the replica", || r.status().spaces.iter().all(|s| s.applied_seq == Seq(3))).await;
    assert!(r.status().reconnects >= 1);
    let start = tokio::time::Instant::now();
    loop {
        let v = p.status().replicas.remove(0);
        let stuck: Vec<_> =
            v.spaces.iter().filter(|s| s.applied != Seq(3)).map(|s| (s.space.clone(), s.applied)).collect();
        if stuck.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!(
                "the replica applied every space 10 s ago, but the primary shows {} spaces with applied < 3: {:?}",
                stuck.len(),
                &stuck[..stuck.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.shutdown().await;
    p.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2b. The refused-but-acked space with a real replica.
// ---------------------------------------------------------------------------------------------

/// The replica holds old entries 1..=10 (applied slowly by its hook); the primary is cut back to 5
/// and writes new entries 6..=12, closes the session, and the new handshake refuses the space as
/// diverged. The replica's hook then finishes applying its *old* entries and acks durable 10 for
/// the space: the primary must not count the replica as holding its (new) entry 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_replica_never_counts_toward_wait_durable() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let rec = Arc::new(Recording::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let hook = SerialHook { lock: Default::default(), gate: gate.clone(), per_call: Duration::ZERO, rec: rec.clone() };
    let r = c.replica_with_hook("replica-1", primary.local_addr(), Arc::new(hook)).await;
    let sp = spaces(1);
    write(&primary, &sp, 10).await;
    converge(&primary, &[&r]).await;
    primary.space(&sp[0]).unwrap().truncate_suffix(Seq(5)).unwrap();
    for i in 6..=12u64 {
        primary.append(&sp[0], 1, Bytes::from(format!("new-{i}"))).unwrap();
    }
    wait_for("the space refused as diverged", || {
        r.status().spaces.iter().any(|s| s.error.as_deref().is_some_and(|e| e.contains("Diverged")))
    })
    .await;
    assert!(r.status().connection == ConnectionState::Connected);
    gate.add_permits(1 << 20);
    wait_for("the replica's hook applied its own 10 entries", || rec.applied.lock().unwrap().len() == 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holding = primary.wait_durable(&sp[0], Seq(8), 1, Duration::from_millis(300)).await;
    let v = space_view(&primary, "replica-1", &sp[0]).unwrap();
    assert!(
        holding.is_empty(),
        "wait_durable(8) -> {holding:?}, but the replica holds the old entry 8 ({:?}) and the primary wrote {:?}; view durable {} applied {} error {:?}",
        r.space(&sp[0]).unwrap().read_from(Seq(8), 1, usize::MAX).unwrap()[0].payload,
        primary.space(&sp[0]).unwrap().read_from(Seq(8), 1, usize::MAX).unwrap()[0].payload,
        v.durable,
        v.applied,
        v.error
    );
    r.shutdown().await;
    primary.shutdown().await;
}

/// The log is cut back while the space's shipper waits for acks (its window of unacknowledged
/// bytes is full). Acks after a cut are ignored, so they cannot wake it: the wait must end on the
/// cut itself and close the session. It used to wait for ever, the replica keeping the old
/// entries past the cut and never getting the new ones, with no error anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_while_the_shippers_window_is_full_closes_the_session() {
    let c = Cluster::new();
    let p = hand_primary_with(&c, |cfg| cfg.max_unacked_bytes = 4096).await;
    let space = SpaceId::new("window").unwrap();
    let mut rng = Rng(42);
    for _ in 1..=50u64 {
        p.append(&space, 1, Bytes::from(rng.bytes(1000))).unwrap();
    }
    let (_ep, conn, mut send, mut recv, mut buf) = hand_replica(&c, &p, vec![], vec![]).await;
    assert!(matches!(next_control(&mut recv, &mut buf).await, ControlMessage::Welcome(_)));
    let view = || space_view(&p, "replica-1", &space);
    wait_for("a window's worth sent", || view().is_some_and(|v| v.sent >= Seq(5))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = view().unwrap().sent;
    assert!(sent < Seq(50) || view().unwrap().inflight_bytes > 4096, "window not full: sent {sent}");

    p.space(&space).unwrap().truncate_suffix(Seq(3)).unwrap();
    for i in 4..=8u64 {
        p.append(&space, 1, Bytes::from(format!("new-{i}"))).unwrap();
    }
    // A real replica keeps acking what it holds (of the old log); the write fails once closed.
    let ack =
        ControlMessage::Ack(Ack { spaces: vec![SpaceAck { space: space.clone(), durable: Seq(3), applied: Seq(3) }] });
    let _ = send.write_all(&ack.encode().unwrap()).await;
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert!(String::from_utf8_lossy(&close.reason).contains("cut back"), "{close:?}")
        }
        other => panic!("5 s after the cut the session is still open ({other:?}): sent {sent}, status {:?}", view()),
    }
    p.shutdown().await;
}
