//! End-to-end replication over real QUIC on 127.0.0.1: convergence, restarts, disconnects,
//! head-of-line isolation, authentication and recovery from a corrupted frame.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use common::*;
use tokio::sync::watch;
use walship::entry::Entry;
use walship::net::status::ConnectionState;
use walship::{ApplyHook, Primary, Replica, SpaceId};
// (Entry, Future, Pin, Arc are imported above for the hooks.)

/// A writer that wants copies before it answers waits for them; nobody else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_can_wait_until_its_entry_is_durable_on_replicas() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let s = SpaceId::new("tenant-1").unwrap();
    // No replica yet: the wait ends at its timeout, with nobody holding the entry.
    let first = primary.append(&s, 1, payload(&s, 1)).unwrap();
    let holding = primary.wait_durable(&s, first, 1, std::time::Duration::from_millis(300)).await;
    assert!(holding.is_empty(), "{holding:?}");
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    let mut last = first;
    for i in 2..=50 {
        last = primary.append(&s, 1, payload(&s, i)).unwrap();
    }
    let mut holding = primary.wait_durable(&s, last, 2, DEADLINE).await;
    holding.sort();
    assert_eq!(holding, ["replica-1", "replica-2"]);
    for r in [&r1, &r2] {
        assert!(r.space(&s).unwrap().durable_seq() >= last);
    }
    r1.shutdown().await;
    r2.shutdown().await;
    primary.shutdown().await;
}

/// A replica that comes back already holding the entry (here after a primary restart) says so in
/// its hello and has nothing new to ack: the wait must still end when it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_durable_ends_when_a_reconnecting_replica_already_holds_the_entry() {
    let c = Cluster::new();
    let p = c.primary().await;
    let addr = p.local_addr();
    let s = SpaceId::new("tenant-1").unwrap();
    let mut last = walship::Seq(0);
    for i in 1..=20 {
        last = p.append(&s, 1, payload(&s, i)).unwrap();
    }
    let r = c.replica("replica-1", addr).await;
    converge(&p, &[&r]).await;
    p.shutdown().await;
    let p = c.primary_at(addr).await;
    // A wait that only an ack could end would outlast the test's deadline.
    let wait = p.wait_durable(&s, last, 1, DEADLINE * 4);
    let holding = tokio::time::timeout(DEADLINE, wait).await.expect("the replica's return ends the wait");
    assert_eq!(holding, ["replica-1"]);
    r.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_32_spaces_converge_to_identical_logs() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    let spaces = spaces(32);
    write(&primary, &spaces, 2_000).await;
    converge(&primary, &[&r1, &r2]).await;
    let status = primary.status();
    assert_eq!(status.spaces.len(), 32);
    assert!(status.spaces.iter().all(|s| s.last_seq.0 == 2_000));
    wait_for("healthy replicas with zero lag", || {
        let s = primary.status();
        s.replicas.len() == 2 && s.replicas.iter().all(|r| r.max_lag.entries == 0 && r.max_lag.ms == 0)
    })
    .await;
    // The primary's heartbeats summarize the same positions: 32 spaces, 64,000 entries, no lag.
    wait_for("a caught-up heartbeat from the primary", || {
        r1.status()
            .primary_heartbeat
            .is_some_and(|h| (h.summary.spaces, h.summary.total_last_seq, h.summary.max_lag_entries) == (32, 64_000, 0))
    })
    .await;
    r1.shutdown().await;
    r2.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_and_restarted_resumes_without_loss_or_duplicates() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let spaces = spaces(8);
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &spaces, 500).await;
    wait_for("some entries on the replica", || {
        r1.status().spaces.iter().map(|s| s.log.last_seq.0).sum::<u64>() > 1_000
    })
    .await;
    // A crash: tasks aborted, no shutdown, no sync.
    drop(r1);
    write(&primary, &spaces, 500).await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &spaces, 500).await;
    converge(&primary, &[&r1]).await;
    r1.shutdown().await;

    // And a clean stop and restart.
    write(&primary, &spaces, 100).await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    converge(&primary, &[&r1]).await;
    r1.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_restart_and_disconnects_from_either_side_resume() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let addr = primary.local_addr();
    let spaces = spaces(6);
    let r1 = c.replica("replica-1", addr).await;
    write(&primary, &spaces, 300).await;
    converge(&primary, &[&r1]).await;

    // Torn down by the primary, then by the replica, while writes go on.
    assert!(primary.disconnect_replica("replica-1"));
    write(&primary, &spaces, 300).await;
    converge(&primary, &[&r1]).await;
    wait_for("reconnected", || r1.status().connection == ConnectionState::Connected).await;
    assert!(r1.disconnect());
    write(&primary, &spaces, 300).await;
    converge(&primary, &[&r1]).await;
    assert!(r1.status().reconnects >= 2);

    // The primary restarts on the same address over its data.
    primary.shutdown().await;
    let primary = c.primary_at(addr).await;
    write(&primary, &spaces, 300).await;
    converge(&primary, &[&r1]).await;
    assert!(primary.status().spaces.iter().all(|s| s.last_seq.0 == 1_200));
    r1.shutdown().await;
    primary.shutdown().await;
}

/// Holds the apply of one space until released.
struct HoldSpace {
    held: SpaceId,
    release: watch::Receiver<bool>,
}

impl ApplyHook for HoldSpace {
    fn apply<'a>(&'a self, space: &'a SpaceId, _entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if *space == self.held {
                let mut rx = self.release.clone();
                let _ = rx.wait_for(|r| *r).await;
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_space_does_not_block_the_others() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let spaces = spaces(4);
    let (release_tx, release_rx) = watch::channel(false);
    let hook = Arc::new(HoldSpace { held: spaces[0].clone(), release: release_rx });
    let r1 = c.replica_with_hook("replica-1", primary.local_addr(), hook).await;
    // Enough data that the held space's stream fills its windows.
    write(&primary, &spaces, 20_000).await;
    wait_for("the other spaces to catch up while one is held", || {
        let s = r1.status();
        spaces[1..].iter().all(|id| s.spaces.iter().any(|x| &x.log.space == id && x.applied_seq.0 == 20_000))
    })
    .await;
    let held = r1.status().spaces.into_iter().find(|x| x.log.space == spaces[0]).map(|x| x.applied_seq.0).unwrap_or(0);
    assert!(held < 20_000, "the held space must not have been applied completely");
    // The primary saw the held space lagging and the others caught up.
    // Durable is acked separately from applied: the held space reports what it wrote.
    wait_for("the held space's durable position acked", || {
        let v = primary.status().replicas.remove(0);
        v.spaces.iter().any(|s| s.space == spaces[0] && s.durable.0 > s.applied.0)
    })
    .await;
    // The replica's last acks for the other spaces may still be on their way.
    wait_for("the primary to see the other spaces caught up", || {
        let view = primary.status().replicas.remove(0);
        view.spaces.iter().filter(|s| s.space != spaces[0]).all(|s| s.lag.entries == 0)
    })
    .await;
    let view = primary.status().replicas.remove(0);
    let held = view.spaces.iter().find(|s| s.space == spaces[0]).expect("the held space in the primary's view");
    assert!(held.applied.0 < 20_000, "the held space must not count as applied");
    release_tx.send_replace(true);
    converge(&primary, &[&r1]).await;
    wait_for("all applied", || r1.status().spaces.iter().all(|s| s.applied_seq.0 == 20_000)).await;
    r1.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_from_another_ca_are_refused_and_the_primary_keeps_serving() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let good = c.replica("replica-1", primary.local_addr()).await;
    let other_ca = walship::net::tls::ClusterCa::generate("intruder CA").unwrap();
    let intruder =
        Replica::start(c.replica_config("replica-2", primary.local_addr()), other_ca.issue("replica-2").unwrap())
            .await
            .unwrap();
    let spaces = spaces(3);
    write(&primary, &spaces, 200).await;
    converge(&primary, &[&good]).await;
    wait_for("the intruder to report its failure", || intruder.status().last_error.is_some()).await;
    let s = intruder.status();
    assert_ne!(s.connection, ConnectionState::Connected);
    assert!(s.spaces.is_empty(), "nothing may reach a refused replica");
    assert!(primary.status().replicas.iter().all(|r| r.name == "replica-1"));
    write(&primary, &spaces, 200).await;
    converge(&primary, &[&good]).await;
    intruder.shutdown().await;
    good.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_elsewhere_takes_over_once_its_old_process_is_gone() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let spaces = spaces(2);
    let a = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &spaces, 100).await;
    converge(&primary, &[&a]).await;
    // The same identity in another process (another data folder), started while the first still
    // runs: refused until the first is gone (tests/embedding.rs), here a crash (dropped, its
    // connection never closed), then let in as the same replica.
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    cfg.data_dir = c.path("replica-1-bis");
    let b = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    drop(a);
    converge(&primary, &[&b]).await;
    assert_eq!(primary.status().replicas.len(), 1);
    assert!(primary.status().replicas[0].reconnects >= 1);
    b.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_can_dial_a_replica_that_waits_for_it() {
    let c = Cluster::new();
    let mut cfg = c.replica_config("replica-1", "127.0.0.1:1".parse().unwrap());
    cfg.primary = None;
    cfg.listen = Some("127.0.0.1:0".parse().unwrap());
    let replica = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.dial_replicas =
        vec![walship::config::ReplicaAddr { name: "replica-1".into(), addr: replica.local_addr().unwrap() }];
    let primary = walship::Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let spaces = spaces(4);
    write(&primary, &spaces, 500).await;
    converge(&primary, &[&replica]).await;
    assert_eq!(replica.status().connection, ConnectionState::Connected);
    replica.shutdown().await;
    primary.shutdown().await;
}

/// Both sides dial each other (either may be the one that can reach the other): one connection
/// stays, the two dials do not keep displacing each other, and the replica reports itself
/// connected, not the error of whichever dial failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_both_sides_dial_one_connection_stays() {
    let c = Cluster::new();
    let primary_addr: std::net::SocketAddr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cfg = c.replica_config("replica-1", primary_addr);
    cfg.listen = Some("127.0.0.1:0".parse().unwrap());
    let replica = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let mut pcfg = c.primary_config(primary_addr);
    pcfg.dial_replicas =
        vec![walship::config::ReplicaAddr { name: "replica-1".into(), addr: replica.local_addr().unwrap() }];
    let primary = walship::Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let spaces = spaces(4);
    write(&primary, &spaces, 200).await;
    converge(&primary, &[&replica]).await;
    // Long enough for several rounds of both dial loops (their delays reach 0.5 s and 5 s).
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    write(&primary, &spaces, 200).await;
    converge(&primary, &[&replica]).await;
    let view = primary.status().replicas.into_iter().find(|r| r.name == "replica-1").unwrap();
    assert!(view.reconnects <= 1, "{} reconnects: the two dials displaced each other", view.reconnects);
    // On a loaded machine a connection may be handed over at this moment (a late heartbeat): the
    // state must settle on connected, not stay on the error of whichever dial lost.
    let settled = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while replica.status().connection != ConnectionState::Connected {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let status = replica.status();
    assert!(settled.is_ok(), "replica {:?}, last error {:?}", status.connection, status.last_error);
    replica.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_stream_mode_multiplexes_every_space_and_resumes() {
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.single_stream = true;
    let primary = walship::Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let spaces = spaces(8);
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &spaces, 1_000).await;
    converge(&primary, &[&r1]).await;
    assert!(r1.disconnect());
    write(&primary, &spaces, 1_000).await;
    converge(&primary, &[&r1]).await;
    r1.shutdown().await;
    primary.shutdown().await;
}

/// Far more spaces than quinn's default of 100 concurrent streams: every space gets its own stream
/// at once, so the stream limits must be raised on the receiving side (at the limit `open_uni` waits
/// forever). 2,000 rather than 10,000 spaces because primary and replica share this process's file
/// descriptors here (one open segment per space per side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_spaces_each_on_its_own_stream() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    let spaces: Vec<SpaceId> = (0..2_000).map(|i| SpaceId::new(&format!("tenant-{i:05}")).unwrap()).collect();
    write(&primary, &spaces, 3).await;
    converge(&primary, &[&r1]).await;
    assert_eq!(r1.status().spaces.len(), 2_000);
    r1.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_retention_gets_a_typed_error_for_that_space_only() {
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.wal.segment_bytes = 4096;
    cfg.wal.tail_max_entries = 16;
    let primary = walship::Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let (kept, gone) = (SpaceId::new("kept").unwrap(), SpaceId::new("gone").unwrap());
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &[kept.clone(), gone.clone()], 20).await;
    converge(&primary, &[&r1]).await;
    r1.shutdown().await;

    // While the replica is away, retention removes what it would need next.
    write(&primary, &[kept.clone(), gone.clone()], 2_000).await;
    let first = primary.space(&gone).unwrap().truncate_prefix(walship::Seq(1_500)).unwrap();
    assert!(first.0 > 21);

    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("the kept space to converge", || {
        r1.space(&kept).map(|w| w.digest()) == Some(primary.space(&kept).unwrap().digest())
    })
    .await;
    wait_for("a Truncated error for the removed space", || {
        r1.status()
            .spaces
            .iter()
            .any(|s| s.log.space == gone && s.error.as_deref().is_some_and(|e| e.contains("Truncated")))
    })
    .await;
    assert_eq!(r1.space(&gone).unwrap().last_seq().0, 20, "nothing may be applied across the hole");
    let view = primary.status().replicas.remove(0);
    assert!(view.spaces.iter().any(|s| s.space == gone && s.error.is_some()));
    // Only a snapshot helps that copy: it does not hold the space's retention back.
    assert_eq!(primary.durable_everywhere(&gone), None);
    wait_for("the kept space's acks", || primary.durable_everywhere(&kept) == Some(walship::Seq(2_020))).await;
    r1.shutdown().await;
    primary.shutdown().await;
}

/// Retention driven by `durable_everywhere` keeps what a replica that is away still needs: it
/// comes back and catches up with no `Truncated` error, while the log did shrink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_up_to_durable_everywhere_keeps_what_an_absent_replica_needs() {
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.wal.segment_bytes = 4096;
    cfg.wal.tail_max_entries = 16;
    let primary = walship::Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let s = SpaceId::new("trimmed").unwrap();
    assert_eq!(primary.durable_everywhere(&s), None, "no replica served yet");
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r1, &r2]).await;
    wait_for("both replicas' acks of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;

    // replica-2 goes away; replica-1 keeps up with 1,000 more entries.
    r2.shutdown().await;
    write(&primary, std::slice::from_ref(&s), 1_000).await;
    let holding = primary.wait_durable(&s, walship::Seq(1_300), 1, DEADLINE).await;
    assert_eq!(holding, ["replica-1"]);
    let floor = primary.durable_everywhere(&s).expect("replicas were served");
    assert_eq!(floor, walship::Seq(300), "the absent replica counts with its last ack");
    let wal = primary.space(&s).unwrap();
    let first = wal.truncate_prefix(floor).unwrap();
    assert!(first.0 > 1 && first <= floor.next(), "segments wholly below the floor are gone: first {first}");

    // replica-2 resumes from 301, which the primary kept.
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    wait_for("replica-2 to catch up", || identical(&primary, &r2)).await;
    let entries = r2.space(&s).unwrap().read_from(walship::Seq(1), usize::MAX, usize::MAX).unwrap();
    assert_eq!(entries.len(), 1_300);
    assert!(entries.iter().enumerate().all(|(i, e)| e.seq.0 == i as u64 + 1 && e.payload == payload(&s, e.seq.0)));
    assert!(r2.status().spaces.iter().all(|sp| sp.error.is_none()), "{:?}", r2.status().spaces);

    // A decommissioned replica stops holding retention back once forgotten (not while connected).
    assert!(!primary.forget_replica("replica-2"), "a connected replica is not forgotten");
    r2.shutdown().await;
    write(&primary, std::slice::from_ref(&s), 100).await;
    assert_eq!(primary.wait_durable(&s, walship::Seq(1_400), 1, DEADLINE).await, ["replica-1"]);
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(1_300)), "replica-2 counts with its last ack");
    wait_for("replica-2's connection to end", || primary.forget_replica("replica-2")).await;
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(1_400)));
    r1.shutdown().await;
    primary.shutdown().await;
}

/// A restarted primary still knows the replicas it served (`<data_dir>/replicas+known`): one not
/// back yet counts with where it stood, so retention keeps what it needs; after a crash it counts
/// with no more than it held; a forgotten replica stays forgotten; a node that serves as a replica
/// drops the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_still_counts_the_replicas_it_knew() {
    let c = Cluster::new();
    let start = |listen: std::net::SocketAddr| {
        let mut cfg = c.primary_config(listen);
        cfg.wal.segment_bytes = 4096;
        cfg.wal.tail_max_entries = 16;
        let identity = c.ca.issue("primary").unwrap();
        async move {
            // The port of a primary just stopped may still be held a moment.
            let started = tokio::time::Instant::now();
            loop {
                match Primary::start(cfg.clone(), identity.clone()).await {
                    Ok(p) => return p,
                    Err(e) if started.elapsed() < DEADLINE => eprintln!("retrying: {e}"),
                    Err(e) => panic!("cannot start the primary: {e}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    let known = |p: &Primary| {
        let mut names: Vec<String> = p.status().replicas.into_iter().map(|v| v.name).collect();
        names.sort();
        names
    };
    let s = SpaceId::new("kept").unwrap();
    let primary = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = primary.local_addr();
    let r1 = c.replica("replica-1", addr).await;
    let r2 = c.replica("replica-2", addr).await;
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r1, &r2]).await;
    wait_for("both replicas' acks of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;
    r2.shutdown().await;
    write(&primary, std::slice::from_ref(&s), 1_000).await;
    assert_eq!(primary.wait_durable(&s, walship::Seq(1_300), 1, DEADLINE).await, ["replica-1"]);

    // A clean restart: replica-2, away, counts with its last ack before anyone reconnects.
    primary.shutdown().await;
    let primary = start(addr).await;
    assert_eq!(known(&primary), ["replica-1", "replica-2"]);
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(300)), "replica-2 counts with its last ack");
    let first = primary.space(&s).unwrap().truncate_prefix(walship::Seq(300)).unwrap();
    assert!(first.0 > 1, "segments wholly below the floor are gone: first {first}");
    let r2 = c.replica("replica-2", addr).await;
    wait_for("both replicas to catch up", || identical(&primary, &r1) && identical(&primary, &r2)).await;
    for r in [&r1, &r2] {
        assert!(r.status().spaces.iter().all(|sp| sp.error.is_none()), "{:?}", r.status().spaces);
        assert_eq!(r.space(&s).unwrap().read_from(walship::Seq(1), usize::MAX, usize::MAX).unwrap().len(), 1_300);
    }

    // replica-2 is forgotten; replica-3 is new, and needs a snapshot of the trimmed space. The
    // primary crashes (no shutdown): replica-3 is known, kept as holding nothing when it was
    // welcomed, or, if a later write saw its space refused, as not counting (it needs a snapshot
    // anyway); replica-2 stays forgotten.
    r2.shutdown().await;
    wait_for("replica-2's connection to end", || primary.forget_replica("replica-2")).await;
    let r3 = c.replica("replica-3", addr).await;
    wait_for("replica-3 to be welcomed", || r3.status().connection == ConnectionState::Connected).await;
    r1.shutdown().await;
    drop(primary);
    let primary = start("127.0.0.1:0".parse().unwrap()).await;
    assert_eq!(known(&primary), ["replica-1", "replica-3"]);
    let floor = primary.durable_everywhere(&s).expect("replicas are known");
    assert!([walship::Seq(0), walship::Seq(1_300)].contains(&floor), "{floor}");
    r3.shutdown().await;
    primary.shutdown().await;

    // The same data, now a replica's: it keeps no list of replicas.
    let list = c.path("primary").join("replicas+known");
    assert!(list.exists());
    let mut cfg = c.replica_config("primary", addr);
    cfg.data_dir = c.path("primary");
    let former = Replica::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    assert!(!list.exists(), "a replica keeps no list of replicas");
    former.shutdown().await;
}

/// What the kept file says of `replica` in `space` (`None`: not listed there).
fn kept_seq(c: &Cluster, replica: &str, space: &SpaceId) -> Option<u64> {
    let text = std::fs::read_to_string(c.path("primary").join("replicas+known")).ok()?;
    let json: serde_json::Value = serde_json::from_str(text.lines().next()?).unwrap();
    json["replicas"][replica][space.as_str()]["durable"].as_u64()
}

/// A kept position never outlives a cut of the primary's log: in memory (a cut after the restart)
/// or on disk (a cut the file never saw, before a crash: its digest no longer matches the log).
/// A replica back on a new disk is kept as holding nothing before it is welcomed; the status
/// reports kept positions as retention counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_position_follows_cuts_of_the_log_and_a_replica_that_lost_its_disk() {
    let c = Cluster::new();
    let s = SpaceId::new("cut").unwrap();
    let primary = c.primary().await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r1]).await;
    wait_for("the ack of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;
    r1.shutdown().await;
    primary.shutdown().await;
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(300));

    // Restarted: the status reports the kept position. replica-1 comes back on a new disk.
    let primary = c.primary().await;
    let view = primary.status().replicas.into_iter().find(|v| v.name == "replica-1").unwrap();
    assert_eq!((view.spaces[0].durable, view.spaces[0].lag.entries), (walship::Seq(300), 0));
    std::fs::remove_dir_all(c.path("replica-1")).unwrap();
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("welcomed", || r1.status().connection == ConnectionState::Connected).await;
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(0), "kept as holding nothing before it was welcomed");
    wait_for("replica-1 to fetch everything again", || identical(&primary, &r1)).await;
    wait_for("its ack of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;
    r1.shutdown().await;
    primary.shutdown().await;
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(300));

    // Restarted, the log cut back and written again with other entries.
    let primary = c.primary().await;
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(300)));
    let wal = primary.space(&s).unwrap();
    wal.truncate_suffix(walship::Seq(100)).unwrap();
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(100)), "the cut lowers it");
    for i in 101..=400u64 {
        wal.append(walship::Epoch(1), 0, bytes::Bytes::from(format!("another log {i}"))).unwrap();
    }
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(100)), "new entries are not held there");
    drop((wal, primary)); // A crash: the file still says 300, of the log before the cut.
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(300));
    let primary = c.primary().await;
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(0)), "300 of another log holds nothing of this one");
    let view = primary.status().replicas.into_iter().find(|v| v.name == "replica-1").unwrap();
    assert_eq!((view.spaces[0].durable, view.spaces[0].lag.entries), (walship::Seq(0), 400), "status says the same");
    primary.shutdown().await;
}

/// A replica kept as needing a snapshot of a space, rebuilt from one, counts again as soon as it
/// says hello: kept from 0 before its welcome, not left out (a crash would then let retention trim
/// what it needs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_rebuilt_from_a_snapshot_counts_again() {
    let c = Cluster::new();
    let s = SpaceId::new("kept").unwrap();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.wal.segment_bytes = 4096;
    let primary = Primary::start(cfg.clone(), c.ca.issue("primary").unwrap()).await.unwrap();
    let r2 = c.replica("replica-2", primary.local_addr()).await;
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r2]).await;
    assert!(primary.space(&s).unwrap().truncate_prefix(walship::Seq(200)).unwrap().0 > 1);
    // replica-1 is new: it needs entries retention removed.
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("replica-1 refused", || r1.status().last_error.is_some_and(|e| e.contains("Truncated for space kept")))
        .await;
    r1.shutdown().await;
    wait_for("replica-1 kept as needing a snapshot", || {
        std::fs::read_to_string(c.path("primary").join("replicas+known"))
            .is_ok_and(|t| t.contains(r#""replica-1":{"kept":"needs_snapshot"}"#))
    })
    .await;
    // Rebuilt from a snapshot: a copy of the primary's log.
    let _ = std::fs::remove_dir_all(c.path("replica-1").join("kept"));
    std::fs::create_dir_all(c.path("replica-1").join("kept")).unwrap();
    for file in std::fs::read_dir(c.path("primary").join("kept")).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, c.path("replica-1").join("kept").join(file.file_name().unwrap())).unwrap();
    }
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("welcomed", || r1.status().connection == ConnectionState::Connected).await;
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(0), "counts again, from 0 until its acks are checked");
    write(&primary, std::slice::from_ref(&s), 100).await;
    wait_for("both to hold 400", || identical(&primary, &r1) && identical(&primary, &r2)).await;
    // A crash while both are connected: replica-1 counts with what was kept at its welcome.
    drop(primary);
    let primary = Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(0)));
    r1.shutdown().await;
    r2.shutdown().await;
    primary.shutdown().await;
}

/// A replica process restarted on an empty disk before its old connection went silent is refused
/// (`DuplicateName`) for a while: meanwhile the replica counts with what that hello says, not with
/// the old connection's acks, so retention cannot trim what it will need once it gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_refused_under_a_replicas_name_caps_what_it_counts_with() {
    let c = Cluster::new();
    let s = SpaceId::new("kept").unwrap();
    let primary = c.primary().await;
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r1]).await;
    wait_for("the ack of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    cfg.data_dir = c.path("replica-1-new-disk");
    let again = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    wait_for("the second process refused", || {
        again.status().last_error.is_some_and(|e| e.contains("another replica process"))
    })
    .await;
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(0)), "the old connection's acks no longer count");
    assert_eq!(kept_seq(&c, "replica-1", &s), Some(0), "kept so, before it was told");
    // The first process goes away: the second gets in, fetches everything and counts again.
    r1.shutdown().await;
    wait_for("the second process to hold everything", || identical(&primary, &again)).await;
    wait_for("its ack of entry 300", || primary.durable_everywhere(&s) == Some(walship::Seq(300))).await;
    again.shutdown().await;
    primary.shutdown().await;
}

/// A replica is welcomed only once it is kept on disk: a failed write refuses the connection, and
/// the next one writes again; a crash after the welcome still knows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_welcomed_only_once_it_is_kept() {
    let c = Cluster::new();
    let s = SpaceId::new("kept").unwrap();
    let primary = c.primary().await;
    let blocker = c.path("primary").join("replicas+known.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("a refused connection", || {
        r1.status().last_error.is_some_and(|e| e.contains("cannot keep the list of known replicas"))
    })
    .await;
    assert_ne!(r1.status().connection, ConnectionState::Connected);
    std::fs::remove_dir(&blocker).unwrap();
    write(&primary, std::slice::from_ref(&s), 300).await;
    converge(&primary, &[&r1]).await;
    drop(primary); // A crash: no connection ended, nothing shut down.
    let primary = c.primary().await;
    assert_eq!(primary.status().replicas.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["replica-1"]);
    assert_eq!(primary.durable_everywhere(&s), Some(walship::Seq(0)), "kept when welcomed, holding nothing then");
    r1.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_diverged_is_refused_for_that_space() {
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.epoch = walship::Epoch(2);
    let primary = walship::Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let (good, forked) = (SpaceId::new("good").unwrap(), SpaceId::new("forked").unwrap());
    write(&primary, &[good.clone(), forked.clone()], 50).await;
    // The replica's copy of `forked` came from an older primary (epoch 1) whose entries the current
    // primary (epoch 2) does not have.
    {
        let store = walship::wal::WalStore::open(&c.path("replica-1"), Default::default()).unwrap();
        let w = store.space(&forked).unwrap();
        for i in 1..=10u64 {
            w.append(walship::Epoch(1), 0, payload(&forked, i)).unwrap();
        }
    }
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("the good space to converge", || {
        r1.space(&good).map(|w| w.digest()) == Some(primary.space(&good).unwrap().digest())
    })
    .await;
    wait_for("a Diverged error for the forked space", || {
        r1.status()
            .spaces
            .iter()
            .any(|s| s.log.space == forked && s.error.as_deref().is_some_and(|e| e.contains("Diverged")))
    })
    .await;
    assert_eq!(r1.space(&forked).unwrap().last_epoch(), walship::Epoch(1), "the forked copy is left untouched");
    r1.shutdown().await;

    // A replica that has seen a newer epoch than the primary's refuses it as deposed.
    {
        let store = walship::wal::WalStore::open(&c.path("replica-1"), Default::default()).unwrap();
        let w = store.space(&SpaceId::new("newer").unwrap()).unwrap();
        w.append(walship::Epoch(3), 0, payload(&forked, 1)).unwrap();
    }
    let r1 = c.replica("replica-1", primary.local_addr()).await;
    wait_for("the deposed primary to be refused", || {
        r1.status().last_error.as_deref().is_some_and(|e| e.contains("epoch"))
    })
    .await;
    assert_ne!(r1.status().connection, ConnectionState::Connected);
    r1.shutdown().await;
    primary.shutdown().await;
}

/// Records what the hook applied, slowly, and says when it starts.
struct SlowHook {
    applied: Arc<std::sync::Mutex<Vec<u64>>>,
    started: tokio::sync::mpsc::UnboundedSender<()>,
}

impl ApplyHook for SlowHook {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let _ = self.started.send(());
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            self.applied.lock().unwrap().extend(entries.iter().map(|e| e.seq.0));
        })
    }
}

/// Regression (review B1): a disconnect while the hook runs must not make it skip or repeat entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apply_hook_sees_every_entry_once_across_disconnects() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let r = c
        .replica_with_hook(
            "replica-1",
            primary.local_addr(),
            Arc::new(SlowHook { applied: applied.clone(), started: tx }),
        )
        .await;
    let sp = spaces(1);
    write(&primary, &sp, 10).await;
    started.recv().await.unwrap();
    assert!(r.disconnect());
    write(&primary, &sp, 10).await;
    wait_for("the hook to apply 20 entries", || applied.lock().unwrap().len() >= 20).await;
    assert_eq!(*applied.lock().unwrap(), (1..=20).collect::<Vec<_>>());
    wait_for("applied reported", || r.status().spaces[0].applied_seq.0 == 20).await;
    r.shutdown().await;
    primary.shutdown().await;
}

/// Regression (review B4): the largest entry the WAL accepts must also ship.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_entry_the_wal_accepts_is_shipped() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let r = c.replica("replica-1", primary.local_addr()).await;
    let sp = spaces(1);
    let big = bytes::Bytes::from(vec![7u8; 16 * 1024 * 1024]);
    primary.append(&sp[0], 1, big.clone()).unwrap();
    primary.append(&sp[0], 1, bytes::Bytes::from_static(b"small")).unwrap();
    converge(&primary, &[&r]).await;
    assert_eq!(r.space(&sp[0]).unwrap().read_from(walship::Seq(1), 1, usize::MAX).unwrap()[0].payload, big);
    r.shutdown().await;
    primary.shutdown().await;
}

/// Uncompressed frames refer to large payloads instead of copying them (`encode_parts`): entries
/// on both sides of that threshold, on per-space streams and on the multiplexed one, arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_frames_with_large_and_small_entries_arrive_intact() {
    for single_stream in [false, true] {
        let c = Cluster::new();
        let mut config = c.primary_config("127.0.0.1:0".parse().unwrap());
        config.compression = walship::codec::Compression::None;
        config.single_stream = single_stream;
        let primary = Primary::start(config, c.ca.issue("primary").unwrap()).await.unwrap();
        let r = c.replica("replica-1", primary.local_addr()).await;
        let sp = spaces(3);
        let sizes = [0usize, 5, 1000, 64 * 1024 - 1, 64 * 1024, 200_000, 17, 1 << 20, 3];
        for (i, space) in sp.iter().enumerate() {
            for (j, n) in sizes.iter().enumerate() {
                let fill = (i * sizes.len() + j) as u8;
                primary.append(space, 1, bytes::Bytes::from(vec![fill; *n])).unwrap();
            }
        }
        converge(&primary, &[&r]).await;
        for space in &sp {
            let got = r.space(space).unwrap().read_from(walship::Seq(1), 100, usize::MAX).unwrap();
            let want = primary.space(space).unwrap().read_from(walship::Seq(1), 100, usize::MAX).unwrap();
            assert_eq!(got, want);
        }
        r.shutdown().await;
        primary.shutdown().await;
    }
}

/// A store-wide memory tail budget far below what is written: shippers read most entries back
/// from the segments (on blocking threads), and every log still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_store_tail_budget_ships_from_disk_and_converges() {
    let c = Cluster::new();
    let mut config = c.primary_config("127.0.0.1:0".parse().unwrap());
    config.wal.store_tail_max_bytes = 64 * 1024;
    config.wal.segment_bytes = 256 * 1024;
    let primary = Primary::start(config, c.ca.issue("primary").unwrap()).await.unwrap();
    let sp = spaces(16);
    // Written before the replica exists: everything it gets is a catch-up.
    write(&primary, &sp, 400).await;
    let r = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &sp, 200).await;
    converge(&primary, &[&r]).await;
    r.shutdown().await;
    primary.shutdown().await;
}

/// Regression (review B3): a space the replica could not store (its folder was blocked) resumes on
/// its own once it can, without a reconnect, while the other spaces go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_the_replica_could_not_store_resumes_when_it_can() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let sp = spaces(2);
    std::fs::create_dir_all(c.path("replica-1")).unwrap();
    let blocker = c.path("replica-1").join(sp[0].as_str());
    std::fs::write(&blocker, b"not a folder").unwrap();
    let r = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &sp, 10).await;
    wait_for("the other space", || r.space(&sp[1]).is_some_and(|w| w.last_seq().0 == 10)).await;
    assert!(r.space(&sp[0]).is_none());
    std::fs::remove_file(&blocker).unwrap();
    write(&primary, &sp, 10).await;
    converge(&primary, &[&r]).await;
    assert_eq!(r.status().reconnects, 0, "recovered without a reconnect");
    r.shutdown().await;
    primary.shutdown().await;
}

/// Regression (review B2): a primary that lost its unsynced tail and wrote other entries at the same
/// sequences in the same epoch must not be followed silently: the digest check refuses the space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_rewrote_its_tail_in_the_same_epoch_is_refused() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let addr = primary.local_addr();
    let sp = spaces(2);
    let r = c.replica("replica-1", addr).await;
    write(&primary, &sp, 100).await;
    converge(&primary, &[&r]).await;
    r.shutdown().await;
    primary.shutdown().await;
    // Power loss on the primary: the last 10 entries of space 0 never reached its disk.
    {
        let store = walship::wal::WalStore::open(&c.path("primary"), c.primary_config(addr).wal).unwrap();
        store.space(&sp[0]).unwrap().truncate_suffix(walship::Seq(90)).unwrap();
    }
    let primary = c.primary_at(addr).await;
    for i in 0..30u64 {
        primary.append(&sp[0], 9, bytes::Bytes::from(format!("new-{i}"))).unwrap();
    }
    write(&primary, &sp[1..], 10).await;
    let r = c.replica("replica-1", addr).await;
    wait_for("space 1 to converge", || {
        r.space(&sp[1]).map(|w| w.digest()) == Some(primary.space(&sp[1]).unwrap().digest())
    })
    .await;
    wait_for("a Diverged error for space 0", || {
        r.status()
            .spaces
            .iter()
            .any(|s| s.log.space == sp[0] && s.error.as_deref().is_some_and(|e| e.contains("Diverged")))
    })
    .await;
    assert_eq!(r.space(&sp[0]).unwrap().last_seq().0, 100, "the replica's copy is left as it was");
    r.shutdown().await;
    primary.shutdown().await;
}

/// Many spaces catching up at once: large frames in flight to the replica, all spaces together,
/// stay within `max_replica_inflight_bytes` (what bounds the frames the replica assembles at once),
/// every space still converges, and the replica, which holds the primary to its credit, never has
/// reason to close the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_of_many_spaces_stays_within_the_replica_inflight_credit() {
    use walship::codec::Compression;
    catch_up_within_credit(Compression::None, |i| bytes::Bytes::from(vec![(i % 251) as u8; 4096])).await;
    // Compressed frames are charged at their decompressed size, on both sides.
    catch_up_within_credit(Compression::Lz4, |i| bytes::Bytes::from(format!("entry {i} ").repeat(400))).await;
}

/// A replica announcing frames smaller than the primary's still gets full frames: entry headers,
/// counted at the most entries a batch may hold (8,192 x 17 bytes, more than the frame), once left
/// no room for payloads, and every frame of a catch-up carried one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_small_frames_catches_up_in_full_frames() {
    use walship::codec::batch::ENTRY_HEADER_LEN;
    use walship::codec::FrameLimits;
    let c = Cluster::new();
    let primary = c.primary().await;
    let space = spaces(1);
    let wal = primary.space(&space[0]).unwrap();
    const ENTRIES: u32 = 20_000;
    tokio::task::spawn_blocking(move || {
        let items: Vec<(u8, bytes::Bytes)> =
            (0..ENTRIES).map(|i| (0, bytes::Bytes::from(format!("entry {i:>10}")))).collect();
        wal.append_batch(walship::Epoch(1), &items).unwrap();
    })
    .await
    .unwrap();
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    const FRAME: usize = 64 * 1024;
    cfg.limits = FrameLimits { max_batch_bytes: FRAME };
    cfg.wal.max_entry_bytes = 1024;
    let replica = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    wait_for("caught up", || identical(&primary, &replica)).await;
    let sent = primary.status().replicas[0].totals.batches_sent;
    // 16-byte payloads: 33 bytes an entry, at least half a frame of payloads each.
    let full = (ENTRIES as usize * (16 + ENTRY_HEADER_LEN)).div_ceil(FRAME / 2) as u64;
    assert!(sent <= 2 * full, "{sent} frames for {ENTRIES} entries of 16 bytes in {FRAME}-byte frames");
    replica.shutdown().await;
    primary.shutdown().await;
}

async fn catch_up_within_credit(compression: walship::codec::Compression, payload: fn(u32) -> bytes::Bytes) {
    use walship::codec::{Compression, FrameLimits};
    let c = Cluster::new();
    let mut cfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    cfg.compression = compression;
    cfg.limits = FrameLimits { max_batch_bytes: 512 * 1024 };
    cfg.wal.max_entry_bytes = 64 * 1024;
    cfg.max_batch_bytes = 200 * 1024;
    const CREDIT: u64 = 600 * 1024;
    cfg.max_replica_inflight_bytes = CREDIT as usize;
    let primary = Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    // 24 spaces of about 2 MiB each, written before the replica connects: all catch up together.
    let spaces = spaces(24);
    let wals: Vec<_> = spaces.iter().map(|s| primary.space(s).unwrap()).collect();
    tokio::task::spawn_blocking(move || {
        for w in &wals {
            let items: Vec<(u8, bytes::Bytes)> = (0..512u32).map(|i| (0, payload(i))).collect();
            w.append_batch(walship::Epoch(1), &items).unwrap();
        }
    })
    .await
    .unwrap();
    let replica = c.replica("replica-1", primary.local_addr()).await;
    let mut peak = 0;
    let start = tokio::time::Instant::now();
    while !identical(&primary, &replica) {
        // The replica gives a frame's share back once it is applied, the primary its credit only
        // once the replica acks it durable: without resets, what the replica holds is within it.
        let assembling = replica.status().assembling_bytes;
        peak = peak.max(assembling);
        assert!(assembling <= CREDIT, "{assembling} bytes of large frames in assembly, credit {CREDIT}");
        assert!(start.elapsed() < DEADLINE, "no convergence; {assembling} bytes in assembly");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Large frames assemble in well under a millisecond on loopback, so `peak` may read 0; without
    // the credit, 24 streams of 200 KiB frames hold about 5 MB for as long as the catch-up lasts.
    eprintln!("{compression}: peak {peak} bytes of large frames in assembly");
    assert_eq!(replica.status().reconnects, 0, "the replica closed the connection: {:?}", replica.status().last_error);
    // The status says what the codec did with every batch: with lz4 the repetitive payloads all
    // shrink, but for a batch cut short (a space's last entries, a frame sized to the credit left)
    // that may fall under the 4 KiB threshold.
    let totals = primary.status().replicas[0].totals;
    let codec = totals.codec;
    let written =
        24 * (0..512u32).map(|i| payload(i).len() as u64 + walship::codec::batch::ENTRY_HEADER_LEN as u64).sum::<u64>();
    // At least every entry once (a batch sent again after a catch-up counts again).
    assert!(codec.bytes_in >= written, "{codec:?}, {written} entry bytes written");
    match compression {
        Compression::None => assert_eq!(
            (codec.compressed, codec.too_small, codec.incompressible, codec.bytes_out),
            (0, 0, 0, codec.bytes_in)
        ),
        _ => {
            assert_eq!(codec.compressed + codec.too_small, totals.batches_sent, "{codec:?}");
            assert_eq!(codec.incompressible, 0, "{codec:?}");
            assert!(codec.compressed > codec.too_small && codec.bytes_out * 5 < written, "{codec:?}");
        }
    }
    replica.shutdown().await;
    primary.shutdown().await;
}
