//! Retention driven by `Primary::durable_everywhere` under load, loss, partitions and restarts (no
//! replica it serves may ever need what was trimmed); `forget_replica` racing a reconnect; the
//! replica's control outbox behind a primary that does not read its control stream.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use walship::netsim::{Forwarder, ForwarderControl, Impairment};
use walship::wal::SpaceWal;
use walship::{Epoch, Primary, Replica, Seq, SpaceId};

fn retention_primary_config(c: &Cluster, listen: SocketAddr, epoch: u64) -> walship::config::PrimaryConfig {
    let mut cfg = c.primary_config(listen);
    cfg.wal.segment_bytes = 4096;
    cfg.wal.tail_max_entries = 16;
    cfg.epoch = Epoch(epoch);
    cfg
}

async fn start_primary(c: &Cluster, listen: SocketAddr, epoch: u64) -> Primary {
    let start = tokio::time::Instant::now();
    loop {
        match Primary::start(retention_primary_config(c, listen, epoch), c.ca.issue("primary").unwrap()).await {
            Ok(p) => return p,
            Err(e) if start.elapsed() < DEADLINE => {
                eprintln!("retrying bind of {listen}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot start the primary: {e}"),
        }
    }
}

/// A writer appending one entry to each space every `every`, from a blocking thread, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

fn start_writer(primary: &Primary, spaces: &[SpaceId], every: Duration) -> Writer {
    let wals: Vec<SpaceWal> = spaces.iter().map(|s| primary.space(s).unwrap()).collect();
    let epoch = primary.status().epoch;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        while !s2.load(Ordering::Relaxed) {
            for w in &wals {
                let i = w.last_seq().0 + 1;
                w.append(epoch, (i % 4) as u8, payload(w.space(), i)).unwrap();
                n += 1;
            }
            std::thread::sleep(every);
        }
        n
    });
    Writer { stop, task }
}

impl Writer {
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Trims every space to durable_everywhere; returns the largest first_seq seen.
fn trim(primary: &Primary, spaces: &[SpaceId]) -> u64 {
    let mut max_first = 0;
    for s in spaces {
        if let Some(floor) = primary.durable_everywhere(s) {
            let first = primary.space(s).unwrap().truncate_prefix(floor).unwrap();
            max_first = max_first.max(first.0);
        }
    }
    max_first
}

/// Errors naming Truncated on any space of `r`.
fn truncated_errors(r: &Replica) -> Vec<String> {
    r.status()
        .spaces
        .iter()
        .filter_map(|s| s.error.as_ref().filter(|e| e.contains("Truncated")).map(|e| format!("{}: {e}", s.log.space)))
        .collect()
}

/// The replica's log equals the primary's from the primary's first entry, and holds every entry
/// from 1 with the writer's payloads.
fn check_logs(primary: &Primary, r: &Replica, spaces: &[SpaceId]) {
    for s in spaces {
        let pw = primary.space(s).unwrap();
        let rw = r.space(s).unwrap_or_else(|| panic!("{} lacks {s}", r.status().name));
        let from = pw.first_seq();
        let p = pw.read_from(from, usize::MAX, usize::MAX).unwrap();
        let q = rw.read_from(from, usize::MAX, usize::MAX).unwrap();
        assert_eq!(p, q, "{}: entries of {s} from {from} differ", r.status().name);
        let all = rw.read_from(rw.first_seq(), usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.first().map(|e| e.seq), Some(Seq(1)));
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.seq.0, i as u64 + 1);
            assert_eq!(e.payload, payload(s, e.seq.0), "{s}:{}", e.seq);
        }
    }
}

async fn lossy_forwarder(
    upstream: SocketAddr,
    seed: u64,
) -> (SocketAddr, ForwarderControl, tokio::sync::oneshot::Sender<()>) {
    let imp = Impairment {
        loss: 0.03,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
        reorder: 0.01,
        duplicate: 0.01,
        ..Default::default()
    };
    let fwd = Forwarder::bind("127.0.0.1:0".parse().unwrap(), upstream, imp, imp, seed).unwrap();
    let addr = fwd.local_addr();
    let control = fwd.control();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(fwd.run(async {
        let _ = rx.await;
    }));
    (addr, control, tx)
}

/// 1. A writer at a steady rate; replica-1 direct, replica-2 behind a lossy link partitioned for
/// a while, replica-3 stopped and restarted at seeded times; every 200 ms every space is trimmed
/// to durable_everywhere. No replica ever gets Truncated; in the end every log equals the primary's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_under_load_never_truncates_a_served_replica() {
    for seed in [0xADC3_0001u64, 0xADC3_0002] {
        eprintln!("=== seed {seed:#x}");
        let mut rng = Rng(seed);
        let c = Cluster::new();
        let primary = start_primary(&c, "127.0.0.1:0".parse().unwrap(), 1).await;
        let spaces = spaces(3);
        let (fwd_addr, fwd, _fwd_stop) = lossy_forwarder(primary.local_addr(), seed).await;
        let r1 = c.replica("replica-1", primary.local_addr()).await;
        let r2 = c.replica("replica-2", fwd_addr).await;
        let mut r3 = Some(c.replica("replica-3", primary.local_addr()).await);
        let writer = start_writer(&primary, &spaces, Duration::from_millis(4));

        // Seeded schedule (in 100 ms ticks over 8 s).
        let r3_down = 10 + rng.below(20) as u64;
        let r3_up = r3_down + 5 + rng.below(15) as u64;
        let r3_down2 = r3_up + 10 + rng.below(10) as u64;
        let r3_up2 = r3_down2 + 3 + rng.below(10) as u64;
        let part_on = 5 + rng.below(30) as u64;
        let part_off = part_on + 10 + rng.below(20) as u64;
        eprintln!("r3 down {r3_down}..{r3_up}, {r3_down2}..{r3_up2}; partition {part_on}..{part_off}");
        let mut max_first = 0;
        for tick in 0..80u64 {
            if tick == part_on {
                fwd.set_partitioned(true);
            }
            if tick == part_off {
                fwd.set_partitioned(false);
            }
            if tick == r3_down || tick == r3_down2 {
                r3.take().unwrap().shutdown().await;
            }
            if tick == r3_up || tick == r3_up2 {
                r3 = Some(c.replica("replica-3", primary.local_addr()).await);
            }
            if tick % 2 == 0 {
                max_first = max_first.max(trim(&primary, &spaces));
            }
            for r in [Some(&r1), Some(&r2), r3.as_ref()].into_iter().flatten() {
                let errs = truncated_errors(r);
                assert!(errs.is_empty(), "seed {seed:#x} tick {tick}: {} got {errs:?}", r.status().name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fwd.set_partitioned(false);
        let r3 = match r3 {
            Some(r) => r,
            None => c.replica("replica-3", primary.local_addr()).await,
        };
        let written = writer.stop().await;
        eprintln!("written {written}, largest first_seq {max_first}");
        assert!(max_first > 1, "retention never trimmed anything");
        for r in [&r1, &r2, &r3] {
            wait_for("replica identical", || identical(&primary, r)).await;
            assert!(truncated_errors(r).is_empty(), "{:?}", truncated_errors(r));
            check_logs(&primary, r, &spaces);
        }
        for r in [r1, r2, r3] {
            r.shutdown().await;
        }
        primary.shutdown().await;
    }
}

/// 1b. A replica restarted from an empty folder after retention trimmed: it needs everything from 1.
/// It must get a clear Truncated error per trimmed space (not apply across the hole), and it must not
/// hold retention back for ever (durable_everywhere leaves it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_restarted_empty_after_trim_is_told_truncated_and_does_not_pin_retention() {
    let c = Cluster::new();
    let primary = start_primary(&c, "127.0.0.1:0".parse().unwrap(), 1).await;
    let spaces = spaces(2);
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    let writer = start_writer(&primary, &spaces, Duration::from_millis(2));
    let mut max_first = 0;
    while max_first < 50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        max_first = trim(&primary, &spaces);
    }
    // Both spaces trimmed.
    wait_for("both spaces trimmed", || {
        trim(&primary, &spaces);
        spaces.iter().all(|s| primary.space(s).unwrap().first_seq().0 > 1)
    })
    .await;
    r2.shutdown().await;
    std::fs::remove_dir_all(c.path("replica-2")).unwrap();
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    // It holds neither space, so the refusals are the link's error, naming the space; the
    // primary's view lists each refused space.
    wait_for("Truncated for every space in the primary's view", || {
        primary.status().replicas.iter().find(|v| v.name == "replica-2").is_some_and(|v| {
            v.spaces.len() == spaces.len()
                && v.spaces.iter().all(|s| s.error.as_deref().is_some_and(|e| e.contains("snapshot")))
        })
    })
    .await;
    wait_for("the replica's own status names a refused space", || {
        r2.status().last_error.is_some_and(|e| {
            e.contains("Truncated for space") && e.contains("snapshot") && spaces.iter().any(|s| e.contains(s.as_str()))
        })
    })
    .await;
    for s in &spaces {
        assert_eq!(r2.space(s).map(|w| w.last_seq()).unwrap_or(Seq(0)), Seq(0), "nothing applied across the hole");
    }
    // Retention keeps going, and replica-1 is fine.
    let before: Vec<Seq> = spaces.iter().map(|s| primary.space(s).unwrap().first_seq()).collect();
    wait_for("retention moves on past the emptied replica", || {
        trim(&primary, &spaces);
        spaces.iter().zip(&before).all(|(s, b)| primary.space(s).unwrap().first_seq() > *b)
    })
    .await;
    writer.stop().await;
    wait_for("replica-1 identical", || identical(&primary, &r1)).await;
    check_logs(&primary, &r1, &spaces);
    assert!(truncated_errors(&r1).is_empty());
    // The primary's view of replica-2 says why.
    let view = primary.status().replicas.into_iter().find(|v| v.name == "replica-2").unwrap();
    assert!(
        view.spaces
            .iter()
            .all(|s| s.error.as_deref().is_some_and(|e| e.contains("snapshot") || e.contains("retention"))),
        "{:?}",
        view.spaces
    );
    // It will not catch up on its own: degraded, not "lagging", and its lag dated by the first
    // entry left (retention took the older ones), not 0.
    assert_eq!(view.state, walship::protocol::health::Health::Degraded, "{view:?}");
    assert!(view.spaces.iter().all(|s| s.lag.entries > 0 && s.lag.ms > 0), "{:?}", view.spaces);
    r1.shutdown().await;
    r2.shutdown().await;
    primary.shutdown().await;
}

/// 2. forget_replica hammered while the same replica reconnects: once it is connected again the
/// primary must know it (status lists it, forget_replica refuses, durable_everywhere counts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_replica_racing_a_reconnect_never_orphans_the_new_session() {
    let c = Cluster::new();
    let primary = Arc::new(start_primary(&c, "127.0.0.1:0".parse().unwrap(), 1).await);
    let s = SpaceId::new("s").unwrap();
    primary.append(&s, 0, payload(&s, 1)).unwrap();
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("identical", || identical(&primary, &r1)).await;
    let forgotten = Arc::new(AtomicU64::new(0));
    for round in 0..40u32 {
        let before = r1.status().reconnects;
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (p, stop, forgotten) = (primary.clone(), stop.clone(), forgotten.clone());
            tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    if p.forget_replica("replica-1") {
                        forgotten.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        assert!(primary.disconnect_replica("replica-1") || round > 0);
        wait_for("replica-1 reconnected", || {
            let st = r1.status();
            st.reconnects > before && st.connection == walship::net::status::ConnectionState::Connected
        })
        .await;
        // Let the primary finish registering the session.
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, Ordering::Relaxed);
        hammer.await.unwrap();
        let start = tokio::time::Instant::now();
        loop {
            let listed = primary.status().replicas.iter().any(|v| v.name == "replica-1");
            if listed && !primary.forget_replica("replica-1") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "round {round}: replica-1 is connected (reconnects {}) but the primary does not know it: listed {listed}, durable_everywhere {:?}, forgotten {} times",
                r1.status().reconnects,
                primary.durable_everywhere(&s),
                forgotten.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(primary.durable_everywhere(&s), Some(Seq(1)), "round {round}");
    }
    eprintln!("forgotten {} times", forgotten.load(Ordering::Relaxed));
    r1.shutdown().await;
    Arc::try_unwrap(primary).ok().unwrap().shutdown().await;
}

/// 4. The primary restarts at a higher epoch over its data while retention (durable_everywhere,
/// which counts the replicas known before the restart from their kept positions until they are
/// back) runs; the writer goes on in the new epoch. No Truncated; logs equal in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_restart_at_higher_epoch_while_retention_runs() {
    let c = Cluster::new();
    let first = start_primary(&c, "127.0.0.1:0".parse().unwrap(), 1).await;
    let addr = first.local_addr();
    let spaces = spaces(3);
    let (fwd_addr, _fwd, _fwd_stop) = lossy_forwarder(addr, 0xADC3_0004).await;
    let r1 = c.replica("replica-1", addr).await;
    let r2 = c.replica("replica-2", fwd_addr).await;
    let names = ["replica-1", "replica-2"];
    let mut primary = first;
    let mut max_first = 0;
    for epoch in 1..=3u64 {
        if epoch > 1 {
            primary.shutdown().await;
            primary = start_primary(&c, addr, epoch).await;
        }
        let writer = start_writer(&primary, &spaces, Duration::from_millis(3));
        for tick in 0..25 {
            let known = primary.status().replicas.iter().filter(|v| names.contains(&v.name.as_str())).count();
            if known == names.len() && tick % 2 == 0 {
                max_first = max_first.max(trim(&primary, &spaces));
            }
            for r in [&r1, &r2] {
                let errs = truncated_errors(r);
                assert!(errs.is_empty(), "epoch {epoch} tick {tick}: {} got {errs:?}", r.status().name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        writer.stop().await;
    }
    assert!(max_first > 1, "retention never trimmed");
    for r in [&r1, &r2] {
        wait_for("identical", || identical(&primary, r)).await;
        assert!(truncated_errors(r).is_empty());
        check_logs(&primary, r, &spaces);
        assert_eq!(r.status().epoch, Epoch(3));
    }
    r1.shutdown().await;
    r2.shutdown().await;
    primary.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The replica's outbox behind a primary that does not read its control stream.
// ---------------------------------------------------------------------------------------------

fn entries(from: u64, n: u64, tag: &str) -> Vec<walship::Entry> {
    (from..from + n)
        .map(|s| walship::Entry::new(Seq(s), Epoch(1), 1_000 + s, 1, bytes::Bytes::from(format!("{tag}-{s}"))))
        .collect()
}

fn frame(space: &SpaceId, e: &[walship::Entry]) -> bytes::Bytes {
    walship::codec::BatchEncoder::new(walship::NodeId::from_name("primary"), walship::codec::Compression::None)
        .encode(space, e)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_outbox_behind_a_primary_that_does_not_read_keeps_order_and_newest_acks() {
    use walship::codec::control::{SpaceRange, Welcome};
    use walship::codec::{ControlMessage, ErrorCode, PROTOCOL_VERSION};
    use walship::net::endpoint::{server_endpoint, TransportSettings};
    let c = Cluster::new();
    // A small stream window on the primary's side: the replica's control writer blocks at once.
    let settings = TransportSettings { stream_receive_window: 1024, ..TransportSettings::default() };
    let endpoint = server_endpoint("127.0.0.1:0".parse().unwrap(), &c.ca.issue("primary").unwrap(), &settings).unwrap();
    let mut cfg = c.replica_config("replica-1", endpoint.local_addr().unwrap());
    cfg.heartbeat.timeout = Duration::from_secs(120);
    let replica = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    assert!(matches!(next_control(&mut recv, &mut buf).await, ControlMessage::Hello(_)));

    let many: Vec<SpaceId> = (0..40).map(|i| SpaceId::new(&format!("a{i:02}")).unwrap()).collect();
    let (x, y) = (SpaceId::new("cx").unwrap(), SpaceId::new("dy").unwrap());
    let all: Vec<SpaceId> = many.iter().cloned().chain([x.clone(), y.clone()]).collect();
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: walship::NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: Epoch(1),
        spaces: all.iter().map(|s| SpaceRange { space: s.clone(), first_seq: Seq(1), last_seq: Seq(1) }).collect(),
        max_inflight_bytes: 64 << 20,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();

    // Round 1 of acks for 40 spaces: entries 1..=5.
    let mut streams = Vec::new();
    for s in &many {
        let mut st = open_space_stream(&conn, s, 1).await;
        st.write_all(&frame(s, &entries(1, 5, "A"))).await.unwrap();
        streams.push(st);
    }
    wait_for("round 1 applied", || many.iter().all(|s| replica.space(s).is_some_and(|w| w.last_seq() == Seq(5)))).await;
    // X: a stream starting past the end (catch-up from 1), then 1..=3, then a gap (catch-up from 4).
    let _x1 = open_space_stream(&conn, &x, 10).await;
    wait_for("x catch-up 1", || replica.status().spaces.iter().any(|s| s.log.space == x && s.catch_ups >= 1)).await;
    let mut x2 = open_space_stream(&conn, &x, 1).await;
    x2.write_all(&frame(&x, &entries(1, 3, "X"))).await.unwrap();
    wait_for("x 1..=3", || replica.space(&x).is_some_and(|w| w.last_seq() == Seq(3))).await;
    let _x3 = open_space_stream(&conn, &x, 20).await;
    wait_for("x catch-up 2", || replica.status().spaces.iter().any(|s| s.log.space == x && s.catch_ups >= 2)).await;
    // Y: 1..=5, then 3..=8 with other contents: Diverged; then a stream past the end: catch-up from 6.
    let mut y1 = open_space_stream(&conn, &y, 1).await;
    y1.write_all(&frame(&y, &entries(1, 5, "Y"))).await.unwrap();
    y1.write_all(&frame(&y, &entries(3, 6, "Z"))).await.unwrap();
    wait_for("y diverged", || replica.status().spaces.iter().any(|s| s.log.space == y && s.error.is_some())).await;
    let _y2 = open_space_stream(&conn, &y, 30).await;
    wait_for("y catch-up", || replica.status().spaces.iter().any(|s| s.log.space == y && s.catch_ups >= 1)).await;
    // Round 2 of acks: entries 6..=9 for every one of the 40 spaces.
    for (s, st) in many.iter().zip(streams.iter_mut()) {
        st.write_all(&frame(s, &entries(6, 4, "A"))).await.unwrap();
    }
    wait_for("round 2 applied", || many.iter().all(|s| replica.space(s).is_some_and(|w| w.last_seq() == Seq(9)))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Now read everything that arrives.
    let mut got = Vec::new();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(2), next_control(&mut recv, &mut buf)).await {
        got.push(m);
    }
    let summary: Vec<String> = got
        .iter()
        .map(|m| match m {
            ControlMessage::Ack(a) => format!("Ack({} spaces)", a.spaces.len()),
            ControlMessage::CatchUp(c) => format!("CatchUp({}, {})", c.space, c.from_seq),
            ControlMessage::Error(e) => format!("Error({:?}, {:?})", e.code, e.space),
            other => format!("{other:?}"),
        })
        .collect();
    eprintln!("{} messages: {summary:?}", got.len());
    let pos = |f: &dyn Fn(&ControlMessage) -> bool| got.iter().rposition(f);
    let y_err = pos(
        &|m| matches!(m, ControlMessage::Error(e) if e.space.as_ref() == Some(&y) && e.code == ErrorCode::Diverged),
    );
    let y_cu = pos(&|m| matches!(m, ControlMessage::CatchUp(c) if c.space == y));
    assert!(y_err.is_some() && y_cu.is_some(), "{summary:?}");
    assert!(y_err < y_cu, "the Diverged error for dy came after the later catch-up request: {summary:?}");
    match got.iter().rev().find_map(|m| match m {
        ControlMessage::CatchUp(c) if c.space == x => Some(c.from_seq),
        _ => None,
    }) {
        Some(from) => assert_eq!(from, Seq(4), "{summary:?}"),
        None => panic!("no catch-up for cx: {summary:?}"),
    }
    // Every ack position only grows, and the newest of each space is the replica's position.
    let mut newest: std::collections::HashMap<SpaceId, (Seq, Seq)> = Default::default();
    for m in &got {
        if let ControlMessage::Ack(a) = m {
            for sa in &a.spaces {
                let e = newest.entry(sa.space.clone()).or_insert((Seq(0), Seq(0)));
                assert!(sa.durable >= e.0 && sa.applied >= e.1, "{} went back: {sa:?} after {e:?}", sa.space);
                *e = (sa.durable, sa.applied);
            }
        }
    }
    for s in &many {
        assert_eq!(newest.get(s), Some(&(Seq(9), Seq(9))), "newest ack of {s}");
    }
    assert_eq!(newest.get(&x).map(|p| p.0), Some(Seq(3)), "newest ack of cx");
    replica.shutdown().await;
}
