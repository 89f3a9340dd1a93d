//! Crash consistency end to end, over real QUIC on 127.0.0.1: what a primary reports as durable
//! on a replica, what a primary ships before its own fsync, and a primary that lost power.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use walship::config::ReplicaConfig;
use walship::entry::Entry;
use walship::net::status::ConnectionState;
use walship::net::NetError;
use walship::wal::{SyncPolicy, WalStore};
use walship::{ApplyHook, Primary, Replica, Seq, SpaceId};

/// An interval policy whose background fsync never comes during a test.
fn fsync_never_due() -> SyncPolicy {
    SyncPolicy::Interval(Duration::from_secs(3600))
}

/// After a reconnect, the primary's view of a replica starts from what the replica has fsynced
/// and applied, not from what it holds in its page cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_never_reports_more_durable_than_the_replica_has() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    cfg.wal.sync = fsync_never_due();
    let r = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let sp = spaces(1);
    write(&primary, &sp, 50).await;
    wait_for("the replica to hold 50 entries", || r.space(&sp[0]).is_some_and(|w| w.last_seq() == Seq(50))).await;
    assert_eq!(r.space(&sp[0]).unwrap().durable_seq(), Seq(0), "nothing fsynced on the replica yet");
    let view = |p: &Primary| p.status().replicas.remove(0).spaces.remove(0);
    wait_for("the primary to count 50 sent", || view(&primary).sent == Seq(50)).await;
    assert_eq!(view(&primary).durable, Seq(0));

    // A network blip: same process, same page cache, still nothing fsynced.
    assert!(r.disconnect());
    wait_for("a reconnect", || r.status().reconnects >= 1 && r.status().connection == ConnectionState::Connected).await;
    wait_for("the primary to know the new session", || primary.status().replicas[0].reconnects >= 1).await;
    // The new session's shipper is registered once it counts what the replica holds as sent.
    wait_for("the new session's view", || view(&primary).sent == Seq(50)).await;
    let v = view(&primary);
    assert_eq!((v.durable, v.applied), (Seq(0), Seq(0)), "the primary must not claim what the replica lacks");
    assert_eq!(v.lag.entries, 50);

    // Once the replica fsyncs, its ack moves the primary's view.
    r.space(&sp[0]).unwrap().sync().unwrap();
    wait_for("durable 50 on the primary's view", || view(&primary).durable == Seq(50)).await;
    write(&primary, &sp, 1).await;
    wait_for("the replica to hold 51 entries", || r.space(&sp[0]).is_some_and(|w| w.last_seq() == Seq(51))).await;
    r.space(&sp[0]).unwrap().sync().unwrap();
    wait_for("durable 51 on the primary's view", || view(&primary).durable == Seq(51)).await;
    r.shutdown().await;
    primary.shutdown().await;
}

/// A primary ships only what it has fsynced: when it loses power, no replica holds entries the
/// primary lost, so after its restart the replicas converge on what it writes next instead of
/// refusing the space as diverged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_power_loss_does_not_wedge_its_replicas() {
    let c = Cluster::new();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.wal.sync = fsync_never_due();
    let primary = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let addr = primary.local_addr();
    let r = c.replica("replica-1", addr).await;
    let sp = spaces(2);
    write(&primary, &sp[..1], 20).await;
    // Entries fsynced on the primary ship; the others wait for the fsync.
    primary.space(&sp[1]).unwrap().append(walship::Epoch(1), 1, Bytes::from_static(b"synced")).unwrap();
    primary.space(&sp[1]).unwrap().sync().unwrap();
    wait_for("the fsynced entry to arrive", || r.space(&sp[1]).is_some_and(|w| w.last_seq() == Seq(1))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let primary_durable = primary.space(&sp[0]).unwrap().durable_seq();
    assert_eq!(primary_durable, Seq(0));
    assert!(
        r.space(&sp[0]).map_or(true, |w| w.last_seq() == Seq(0)),
        "an entry the primary had not fsynced was shipped"
    );

    // Power loss: only what was durable survives (dropping would fsync, so cut the log back).
    drop(primary);
    {
        let store = WalStore::open(&c.path("primary"), c.primary_config(addr).wal).unwrap();
        store.space(&sp[0]).unwrap().truncate_suffix(primary_durable).unwrap();
    }
    let primary = c.primary_at(addr).await;
    for i in 0..5u64 {
        primary.append(&sp[0], 1, Bytes::from(format!("after-restart-{i}"))).unwrap();
    }
    converge(&primary, &[&r]).await;
    assert!(r.status().spaces.iter().all(|s| s.error.is_none()), "{:?}", r.status().spaces);
    r.shutdown().await;
    primary.shutdown().await;
}

/// Both nodes under an interval policy (the default): shipping follows the primary's fsyncs and
/// every space converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_under_interval_fsyncs_converges() {
    let c = Cluster::new();
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.wal.sync = SyncPolicy::Interval(Duration::from_millis(2));
    let primary = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let mut rcfg = c.replica_config("replica-1", primary.local_addr());
    rcfg.wal.sync = SyncPolicy::Interval(Duration::from_millis(2));
    let r = Replica::start(rcfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let sp = spaces(8);
    write(&primary, &sp, 500).await;
    converge(&primary, &[&r]).await;
    wait_for("durable everywhere and acked", || {
        let s = primary.status();
        s.replicas.len() == 1 && s.replicas[0].spaces.iter().all(|x| x.durable == Seq(500))
    })
    .await;
    r.shutdown().await;
    primary.shutdown().await;
}

/// Restarts a stopped primary as one that lost entries 6..=10 of `space` (power loss) and wrote
/// other entries at 6..=12 since.
async fn restart_with_a_new_tail(c: &Cluster, addr: std::net::SocketAddr, space: &SpaceId) -> Primary {
    {
        let store = WalStore::open(&c.path("primary"), c.primary_config(addr).wal).unwrap();
        store.space(space).unwrap().truncate_suffix(Seq(5)).unwrap();
    }
    let primary = c.primary_at(addr).await;
    for i in 6..=12u64 {
        primary.append(space, 1, Bytes::from(format!("new-{i}"))).unwrap();
    }
    primary
}

/// What a hook must be told of the new entries 6..=12.
fn new_tail_applied() -> Vec<Told> {
    (6..=12).map(|i| Told::Applied(i, Bytes::from(format!("new-{i}")))).collect()
}

/// What an apply hook was told, in order.
#[derive(Debug, Clone, PartialEq)]
enum Told {
    Applied(u64, Bytes),
    Truncated(u64),
}

struct Recorder(Arc<Mutex<Vec<Told>>>);

impl ApplyHook for Recorder {
    fn apply<'a>(&'a self, _: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.lock().unwrap().extend(entries.iter().map(|e| Told::Applied(e.seq.0, e.payload.clone())));
        Box::pin(async {})
    }

    fn truncated<'a>(&'a self, _: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.lock().unwrap().push(Told::Truncated(after.0));
        Box::pin(async {})
    }
}

/// The repair of a diverged space on a running replica (cut its log back, reconnect): the hook is
/// told to roll back to the cut, then gets the primary's entries at the old sequences, none skipped
/// and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suffix_truncation_rolls_the_hook_back_and_it_sees_the_new_entries() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let addr = primary.local_addr();
    let told = Arc::new(Mutex::new(Vec::new()));
    let hook = Arc::new(Recorder(told.clone()));
    let r = c.replica_with_hook("replica-1", addr, hook).await;
    let sp = spaces(1);
    write(&primary, &sp, 10).await;
    wait_for("10 applied", || told.lock().unwrap().len() == 10).await;
    primary.shutdown().await;
    // The primary lost 6..=10 and, restarted, writes other entries there.
    let primary = restart_with_a_new_tail(&c, addr, &sp[0]).await;
    wait_for("Diverged", || {
        r.status().spaces.iter().any(|s| s.error.as_deref().is_some_and(|e| e.contains("Diverged")))
    })
    .await;
    // The operator's repair: cut the replica back, reconnect.
    r.space(&sp[0]).unwrap().truncate_suffix(Seq(5)).unwrap();
    r.disconnect();
    wait_for("the new entries applied", || told.lock().unwrap().len() == 10 + 1 + 7).await;
    let told = told.lock().unwrap().clone();
    assert_eq!(told[10], Told::Truncated(5));
    let after = new_tail_applied();
    assert_eq!(told[11..], after[..]);
    assert!(identical(&primary, &r));
    r.shutdown().await;
    primary.shutdown().await;
}

/// The same repair right after the replica (re)starts, before its applier has looked at the log:
/// the cut is still rolled back, not missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suffix_truncation_right_after_a_restart_still_rolls_the_hook_back() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let addr = primary.local_addr();
    let sp = spaces(1);
    let r = c.replica("replica-1", addr).await;
    write(&primary, &sp, 10).await;
    converge(&primary, &[&r]).await;
    r.shutdown().await;
    primary.shutdown().await;
    let primary = restart_with_a_new_tail(&c, addr, &sp[0]).await;
    let told = Arc::new(Mutex::new(Vec::new()));
    let hook = Arc::new(Recorder(told.clone()));
    let r = c.replica_with_hook("replica-1", addr, hook).await;
    // At start the hook's state is the log's (the server rebuilt it): cut at once.
    r.space(&sp[0]).unwrap().truncate_suffix(Seq(5)).unwrap();
    r.disconnect();
    wait_for("the new entries applied", || told.lock().unwrap().len() == 1 + 7).await;
    let told = told.lock().unwrap().clone();
    assert_eq!(told[0], Told::Truncated(5));
    let after = new_tail_applied();
    assert_eq!(told[1..], after[..]);
    assert!(identical(&primary, &r));
    r.shutdown().await;
    primary.shutdown().await;
}

/// A replica's log cut back after its hello was sent and before the welcome (an operator's repair
/// racing a reconnect, where `Replica::disconnect` does not reach the connection yet): the replica
/// closes that connection once welcomed (`LOG_CUT`) and says hello again from the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_log_cut_during_the_handshake_makes_it_handshake_again() {
    use walship::codec::control::{SpaceRange, Welcome};
    use walship::codec::{ControlMessage, PROTOCOL_VERSION};
    let c = Cluster::new();
    let s = SpaceId::new("cut").unwrap();
    {
        let store =
            WalStore::open(&c.path("replica-1"), c.replica_config("replica-1", "127.0.0.1:1".parse().unwrap()).wal)
                .unwrap();
        let wal = store.space(&s).unwrap();
        for i in 1..=10u64 {
            wal.append(walship::Epoch(1), 1, Bytes::from(format!("old-{i}"))).unwrap();
        }
    }
    let HandDrivenPrimary { replica, endpoint, conn, mut send, .. } = hand_driven_primary(&c, |_| {}).await;
    // The hello said 10; the log is cut to 5 before the welcome.
    replica.space(&s).unwrap().truncate_suffix(Seq(5)).unwrap();
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: walship::NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: walship::Epoch(1),
        spaces: vec![SpaceRange { space: s.clone(), first_seq: Seq(1), last_seq: Seq(12) }],
        max_inflight_bytes: 64 << 20,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();
    match tokio::time::timeout(DEADLINE, conn.closed()).await.expect("the replica closes the connection") {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, walship::net::close::LOG_CUT, "{close:?}")
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    // It dials again and says where its log ends now.
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (_send, mut recv) = conn.accept_bi().await.unwrap();
    let ControlMessage::Hello(hello) = next_control(&mut recv, &mut bytes::BytesMut::new()).await else {
        panic!("expected a hello")
    };
    assert_eq!(hello.spaces.iter().map(|p| (p.space.clone(), p.last_seq)).collect::<Vec<_>>(), [(s, Seq(5))]);
    replica.shutdown().await;
}

/// A primary whose log is cut back during a session (an operator's `truncate_suffix`) does not
/// splice its new entries onto what the replica holds past the cut: it closes the session, and the
/// new handshake refuses the space as diverged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_back_during_a_session_makes_the_replica_re_handshake() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let r = c.replica("replica-1", primary.local_addr()).await;
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
    // Nothing of the new log was appended after the old entries 6..=10.
    let held = r.space(&sp[0]).unwrap().read_from(Seq(1), 100, usize::MAX).unwrap();
    assert_eq!(held.len(), 10);
    assert!(held.iter().all(|e| !e.payload.starts_with(b"new-")));
    r.shutdown().await;
    primary.shutdown().await;
}

/// A segment file holding only its header, as a crash right after a roll leaves it.
fn header_only_segment(dir: &std::path::Path, first_seq: Seq, base_digest: u64) {
    use walship::wal::{segment_file_name, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_VERSION};
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    b[0..8].copy_from_slice(&SEGMENT_MAGIC);
    b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&first_seq.0.to_le_bytes());
    b[24..32].copy_from_slice(&base_digest.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.join(segment_file_name(first_seq)), b).unwrap();
}

/// A replica that crashed right after rolling a segment, then had its older segments removed by
/// retention, still knows its last epoch when it restarts: the primary takes it back instead of
/// refusing its space as diverged ("epoch 0 on the replica").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_retained_down_to_an_empty_segment_resumes_after_a_restart() {
    let c = Cluster::new();
    let primary = c.primary().await;
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    cfg.wal.segment_bytes = 512;
    let r = Replica::start(cfg.clone(), c.ca.issue("replica-1").unwrap()).await.unwrap();
    let sp = spaces(1);
    write(&primary, &sp, 30).await;
    wait_for("the replica to hold 30 entries", || identical(&primary, &r)).await;
    let digest = r.space(&sp[0]).unwrap().digest();
    r.shutdown().await;
    header_only_segment(&c.path("replica-1").join(sp[0].as_str()), Seq(31), digest.0);
    {
        let store = WalStore::open(&c.path("replica-1"), cfg.wal.clone()).unwrap();
        let wal = store.space(&sp[0]).unwrap();
        assert_eq!(wal.last_seq(), Seq(30));
        wal.truncate_prefix(Seq(30)).unwrap();
    }
    let r = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    write(&primary, &sp, 5).await;
    wait_for("the replica to take the 5 new entries, or an error", || {
        identical(&primary, &r) || r.status().spaces.iter().any(|s| s.error.is_some())
    })
    .await;
    let status = r.status();
    assert!(status.spaces.iter().all(|s| s.error.is_none()), "{:?}", status.spaces);
    assert!(identical(&primary, &r));
    r.shutdown().await;
    primary.shutdown().await;
}

/// [`Recorder`] that also notes the space.
struct SpaceRecorder(Arc<Mutex<Vec<(SpaceId, Told)>>>);

impl ApplyHook for SpaceRecorder {
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let mut told = self.0.lock().unwrap();
        told.extend(entries.iter().map(|e| (space.clone(), Told::Applied(e.seq.0, e.payload.clone()))));
        Box::pin(async {})
    }

    fn truncated<'a>(&'a self, space: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.lock().unwrap().push((space.clone(), Told::Truncated(after.0)));
        Box::pin(async {})
    }
}

/// Flips a byte in the first record of the first (sealed) segment of `space` on replica-1.
fn damage_first_segment(c: &Cluster, space: &SpaceId) -> std::path::PathBuf {
    let dir = c.path("replica-1").join(space.as_str());
    let mut segs: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[80] ^= 0x40;
    std::fs::write(&segs[0], &bytes).unwrap();
    segs.swap_remove(0)
}

/// Replica-1 started with a [`SpaceRecorder`] hook, and what the hook is told.
async fn recording_replica(c: &Cluster, cfg: ReplicaConfig) -> (Replica, Arc<Mutex<Vec<(SpaceId, Told)>>>) {
    let told = Arc::new(Mutex::new(Vec::new()));
    let hook = Arc::new(SpaceRecorder(told.clone()));
    let r = Replica::start_with_hook(cfg, c.ca.issue("replica-1").unwrap(), Some(hook)).await.unwrap();
    (r, told)
}

/// What a hook is told when entries `seqs` of `space` (as `write` made them) are applied.
fn applied(space: &SpaceId, seqs: std::ops::RangeInclusive<u64>) -> Vec<(SpaceId, Told)> {
    seqs.map(|i| (space.clone(), Told::Applied(i, payload(space, i)))).collect()
}

/// Opens replica-1's store with `cfg` (setting the damaged `space` aside) and fills `space` again
/// by hand with the primary's first `n` entries, as a fetch cut short by a crash leaves it.
fn refill_by_hand(c: &Cluster, cfg: &ReplicaConfig, primary: &Primary, space: &SpaceId, n: usize) -> WalStore {
    let store = WalStore::open(&c.path("replica-1"), cfg.wal.clone()).unwrap();
    let held = primary.space(space).unwrap().read_from(Seq(1), n, usize::MAX).unwrap();
    store.space(space).unwrap().append_replicated(&held).unwrap();
    store
}

/// A primary (with `primary_segment_bytes` segments, if given) and replica-1 (512-byte segments)
/// holding 40 entries of each of two spaces.
async fn two_spaces_replicated(
    c: &Cluster,
    primary_segment_bytes: Option<u64>,
) -> (Primary, ReplicaConfig, Vec<SpaceId>) {
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    if let Some(bytes) = primary_segment_bytes {
        pcfg.wal.segment_bytes = bytes;
    }
    let primary = Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap();
    let mut cfg = c.replica_config("replica-1", primary.local_addr());
    cfg.wal.segment_bytes = 512;
    let sp = spaces(2);
    let r = Replica::start(cfg.clone(), c.ca.issue("replica-1").unwrap()).await.unwrap();
    write(&primary, &sp, 40).await;
    wait_for("the replica to hold everything", || identical(&primary, &r)).await;
    r.shutdown().await;
    (primary, cfg, sp)
}

/// A replica whose log of one space is found damaged at start (a flipped byte in a sealed
/// segment) still starts: that space is set aside, fetched again from the primary, and its hook
/// state reset (`truncated(0)`) just before every entry is applied again once; the other space is
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_damaged_space_sets_it_aside_and_fetches_it_again() {
    let c = Cluster::new();
    let (primary, cfg, sp) = two_spaces_replicated(&c, None).await;
    let damaged = damage_first_segment(&c, &sp[1]);

    let (r, told) = recording_replica(&c, cfg).await;
    let status = r.status();
    assert_eq!(status.set_aside.len(), 1, "{:?}", status.set_aside);
    assert_eq!(status.set_aside[0].space, sp[1]);
    assert!(status.set_aside[0].moved_to.join(damaged.file_name().unwrap()).exists(), "kept for an operator");
    wait_for("the damaged space fetched again and applied", || {
        identical(&primary, &r) && told.lock().unwrap().len() == 41
    })
    .await;
    let told = told.lock().unwrap().clone();
    assert_eq!(told[0], (sp[1].clone(), Told::Truncated(0)), "the hook's state starts from nothing first");
    wait_for("the reset recorded", || r.status().spaces.iter().all(|s| !s.reset_pending)).await;
    assert_eq!(r.status().set_aside.len(), 1, "still listed for this start");
    let again = applied(&sp[1], 1..=40);
    assert_eq!(told[1..], again[..], "every entry of the damaged space once, in order; nothing of the other");
    r.shutdown().await;
    primary.shutdown().await;
}

/// A crash after the space was set aside but before the hook was told (here: the store opened
/// and closed without a replica), or after part of it was fetched again: the reset is still
/// pending at the next start, and the hook still gets it, then every entry from 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_reset_survives_a_restart() {
    let c = Cluster::new();
    let (primary, cfg, sp) = two_spaces_replicated(&c, None).await;
    damage_first_segment(&c, &sp[1]);
    // Set aside, then "crash": refilled partly by hand, as a fetch cut short would leave it.
    assert_eq!(refill_by_hand(&c, &cfg, &primary, &sp[1], 10).set_aside().len(), 1);
    let (r, told) = recording_replica(&c, cfg).await;
    assert_eq!(r.status().set_aside.len(), 1, "still pending");
    wait_for("the rest fetched and everything applied", || identical(&primary, &r) && told.lock().unwrap().len() == 41)
        .await;
    wait_for("the reset recorded", || r.status().spaces.iter().all(|s| !s.reset_pending)).await;
    let told = told.lock().unwrap().clone();
    assert_eq!(told[0], (sp[1].clone(), Told::Truncated(0)));
    let again = applied(&sp[1], 1..=40);
    assert_eq!(told[1..], again[..], "the ten fetched before the restart too");
    r.shutdown().await;
    // Told once: no longer pending.
    let store =
        WalStore::open(&c.path("replica-1"), ReplicaConfig::new("x", primary.local_addr(), "p", "/").wal).unwrap();
    assert!(store.set_aside().is_empty());
    drop(store);
    primary.shutdown().await;
}

/// A primary whose retention removed entry 1 cannot fill a set-aside space again: the hook's
/// state is then left as it was (no reset), and the space says why it stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_aside_space_the_primary_cannot_refill_keeps_the_hook_state() {
    let c = Cluster::new();
    let (primary, cfg, sp) = two_spaces_replicated(&c, Some(512)).await;
    primary.space(&sp[1]).unwrap().truncate_prefix(Seq(30)).unwrap();
    assert!(primary.space(&sp[1]).unwrap().first_seq() > Seq(1));
    damage_first_segment(&c, &sp[1]);
    let (r, told) = recording_replica(&c, cfg).await;
    wait_for("the space to say it cannot be refilled", || {
        r.status()
            .spaces
            .iter()
            .any(|s| s.log.space == sp[1] && s.error.as_deref().is_some_and(|e| e.contains("Truncated")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(told.lock().unwrap().is_empty(), "{:?}", told.lock().unwrap());
    assert_eq!(r.status().set_aside.len(), 1);
    let pending: Vec<_> = r.status().spaces.into_iter().map(|s| (s.log.space, s.reset_pending)).collect();
    assert_eq!(pending, [(sp[0].clone(), false), (sp[1].clone(), true)], "nothing to reset the hook with yet");
    r.shutdown().await;
    primary.shutdown().await;
}

/// A primary of epoch 2 on a port of its own.
async fn primary_of_epoch_2(c: &Cluster) -> Primary {
    let mut pcfg = c.primary_config("127.0.0.1:0".parse().unwrap());
    pcfg.epoch = walship::Epoch(2);
    Primary::start(pcfg, c.ca.issue("primary").unwrap()).await.unwrap()
}

/// The epoch fence outlives the logs that carried it: a replica that accepted an epoch-2 primary
/// (before any entry of it arrived) refuses a deposed epoch-1 primary after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_epoch_fences_deposed_primaries_after_a_restart() {
    let c = Cluster::new();
    let primary = primary_of_epoch_2(&c).await;
    let addr = primary.local_addr();
    let r = c.replica("replica-1", addr).await;
    wait_for("connected at epoch 2", || r.status().connection == ConnectionState::Connected).await;
    assert_eq!(r.status().epoch, walship::Epoch(2));
    r.shutdown().await;
    primary.shutdown().await;
    // A deposed primary at epoch 1, with a log of its own, at the same address.
    let deposed = c.primary_at(addr).await;
    write(&deposed, &spaces(1), 5).await;
    let r = c.replica("replica-1", addr).await;
    wait_for("the deposed primary to be refused", || {
        r.status().last_error.as_deref().is_some_and(|e| e.contains("epoch"))
    })
    .await;
    assert_ne!(r.status().connection, ConnectionState::Connected);
    assert!(r.status().spaces.iter().all(|s| s.log.last_seq == Seq(0)), "nothing of it taken in");
    r.shutdown().await;
    deposed.shutdown().await;
}

/// A replica whose logs were written before the epoch fence was kept on disk (an older release)
/// keeps it at its next start, from its logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_is_kept_from_the_logs_of_an_older_release() {
    let c = Cluster::new();
    let primary = primary_of_epoch_2(&c).await;
    let r = c.replica("replica-1", primary.local_addr()).await;
    write(&primary, &spaces(1), 3).await;
    wait_for("replicated", || identical(&primary, &r)).await;
    r.shutdown().await;
    let fence = c.path("replica-1").join("epoch+fence");
    std::fs::remove_file(&fence).unwrap();
    primary.shutdown().await;
    let r = c.replica("replica-1", "127.0.0.1:9".parse().unwrap()).await;
    assert_eq!(std::fs::read_to_string(&fence).unwrap().trim(), "2");
    r.shutdown().await;

    // A damaged fence refuses the start (saying what to do) and is left as it is: read as 0, it
    // would have been written over with the logs' epoch, maybe below the one it held.
    std::fs::write(&fence, b"7\x00garbage").unwrap();
    let refused =
        Replica::start(c.replica_config("replica-1", "127.0.0.1:9".parse().unwrap()), c.ca.issue("replica-1").unwrap())
            .await
            .err()
            .expect("a damaged fence refuses the start");
    assert!(matches!(refused, NetError::EpochFence { .. }), "{refused}");
    assert!(refused.to_string().contains("remove it"), "{refused}");
    assert_eq!(std::fs::read(&fence).unwrap(), b"7\x00garbage");
}

/// A reset marker that outlived a log trimmed since it was fetched again (its `reset_done`
/// failed): the reset cannot be made again from entry 1, so it is taken as made, not retried for
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_reset_marker_over_a_trimmed_log_is_taken_as_done() {
    let c = Cluster::new();
    let (primary, cfg, sp) = two_spaces_replicated(&c, None).await;
    damage_first_segment(&c, &sp[1]);
    {
        let store = refill_by_hand(&c, &cfg, &primary, &sp[1], 40);
        assert!(store.space(&sp[1]).unwrap().truncate_prefix(Seq(30)).unwrap() > Seq(1));
    }
    let (r, told) = recording_replica(&c, cfg.clone()).await;
    write(&primary, &sp[1..], 2).await;
    wait_for("the new entries", || identical(&primary, &r) && told.lock().unwrap().len() == 2).await;
    let told = told.lock().unwrap().clone();
    let new = applied(&sp[1], 41..=42);
    assert_eq!(told, new, "no reset, nothing applied again");
    r.shutdown().await;
    assert!(WalStore::open(&c.path("replica-1"), cfg.wal).unwrap().set_aside().is_empty());
    primary.shutdown().await;
}
