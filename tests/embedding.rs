//! What a node server that embeds walship runs into: restarts over the same folder and port,
//! misconfiguration it must be told about at start, and an apply hook that fails.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use walship::net::status::ConnectionState;
use walship::net::tls::ClusterCa;
use walship::{ApplyHook, Entry, Epoch, Primary, Replica, Seq, SpaceId};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A 127.0.0.1 UDP address nothing listens on (bound, read, released).
fn free_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A node server restarting its replication subsystem binds the same port right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_the_same_port_and_folder_start_again_at_once() {
    let c = Cluster::new();
    let p = c.primary().await;
    let addr = p.local_addr();
    let r = c.replica("replica-1", addr).await;
    write(&p, &spaces(2), 50).await;
    converge(&p, &[&r]).await;
    p.shutdown().await;
    let again = Primary::start(c.primary_config(addr), c.ca.issue("primary").unwrap()).await;
    let again = again.unwrap_or_else(|e| panic!("restart on {addr} right after shutdown().await: {e}"));
    write(&again, &spaces(2), 10).await;
    converge(&again, &[&r]).await;
    again.shutdown().await;
    r.shutdown().await;
}

/// Two writers of one WAL folder would write over each other's records: a folder still open (here
/// through a log handle the node server kept) is refused, and free again once the handle is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_folder_still_open_is_refused_until_it_is_closed() {
    let c = Cluster::new();
    let p = c.primary().await;
    let s = SpaceId::new("tenant-1").unwrap();
    let kept = p.space(&s).unwrap();
    for i in 1..=10 {
        p.append(&s, 1, payload(&s, i)).unwrap();
    }
    p.shutdown().await;
    let second = Primary::start(c.primary_config(any_port()), c.ca.issue("primary").unwrap()).await;
    let err = second.err().expect("a second primary over a folder that is still open must be refused").to_string();
    assert!(err.contains("is already open"), "{err}");
    // The first handle is untouched and still the only writer.
    assert_eq!(kept.append(Epoch(1), 1, payload(&s, 11)).unwrap(), Seq(11));
    drop(kept);
    let p = Primary::start(c.primary_config(any_port()), c.ca.issue("primary").unwrap()).await.unwrap();
    assert_eq!(p.space(&s).unwrap().last_seq(), Seq(11));
    p.shutdown().await;
}

/// The lock covers the whole data folder, not only the spaces already in it: two nodes over one
/// fresh folder would otherwise both start and split the spaces between them as each made one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_over_a_fresh_data_folder_is_refused() {
    let c = Cluster::new();
    let first = Primary::start(c.primary_config(any_port()), c.ca.issue("primary").unwrap()).await.unwrap();
    let second = Primary::start(c.primary_config(any_port()), c.ca.issue("primary").unwrap()).await;
    let err = second.err().expect("a second primary over the same data folder must be refused").to_string();
    assert!(err.contains("WAL folder") && err.contains("is already open"), "{err}");
    first.shutdown().await;
}

/// A refused start frees its port at once, so the corrected start that follows can bind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_leaves_the_port_free_for_the_corrected_start() {
    let c = Cluster::new();
    let mut cfg = c.primary_config(any_port());
    cfg.epoch = Epoch(2);
    let p = Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    write(&p, &spaces(1), 5).await;
    let addr = p.local_addr();
    p.shutdown().await;
    for i in 0..5 {
        let refused = Primary::start(c.primary_config(addr), c.ca.issue("primary").unwrap()).await;
        let err = refused.err().expect("epoch 1 must be refused").to_string();
        assert!(err.contains("below epoch 2"), "attempt {i}: {err}");
        let mut cfg = c.primary_config(addr);
        cfg.epoch = Epoch(2);
        let p = Primary::start(cfg, c.ca.issue("primary").unwrap()).await;
        let p = p.unwrap_or_else(|e| panic!("attempt {i}: the corrected start failed: {e}"));
        p.shutdown().await;
    }
}

/// A node promoted to epoch 2 and restarted with the default epoch 1 would write epochs backwards,
/// which every replica refuses: told at start instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_below_the_epoch_of_its_own_logs_is_refused() {
    let c = Cluster::new();
    let s = spaces(1);
    let mut cfg = c.primary_config(any_port());
    cfg.epoch = Epoch(2);
    let p = Primary::start(cfg, c.ca.issue("primary").unwrap()).await.unwrap();
    write(&p, &s, 20).await;
    p.shutdown().await;
    let refused = Primary::start(c.primary_config(any_port()), c.ca.issue("primary").unwrap()).await;
    let err = refused.err().expect("epoch 1 over a log of epoch 2 must be refused").to_string();
    assert!(err.contains("epoch 1 is below epoch 2"), "{err}");
}

/// A configured name that is not the certificate's can never connect: told at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_is_not_its_certificates_fails_at_start() {
    let c = Cluster::new();
    let replica = Replica::start(c.replica_config("replica-1", free_addr()), c.ca.issue("replica-2").unwrap()).await;
    let err = replica.err().expect("a replica named apart from its certificate must be refused").to_string();
    assert!(err.contains("ReplicaConfig::name") && err.contains("replica-2"), "{err}");
    let primary = Primary::start(c.primary_config(any_port()), c.ca.issue("primary-b").unwrap()).await;
    let err = primary.err().expect("a primary named apart from its certificate must be refused").to_string();
    assert!(err.contains("PrimaryConfig::name") && err.contains("primary-b"), "{err}");
}

/// Peers know a node by its certificate's first DNS name: a configured name that is only its
/// second one would be refused on every connection, so it is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_only_the_certificates_second_is_refused_at_start() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use walship::net::tls::NodeIdentity;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["db1.cluster.local".into(), "replica-1".into()]).unwrap();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let identity = NodeIdentity {
        name: "replica-1".into(),
        cert_chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ca_certs: vec![CertificateDer::from(ca_cert.der().to_vec())],
    };
    let c = Cluster::new();
    let started = Replica::start(c.replica_config("replica-1", free_addr()), identity).await;
    let err = started.err().expect("a name peers would not see must be refused").to_string();
    assert!(err.contains("ReplicaConfig::name") && err.contains("db1.cluster.local"), "{err}");
}

/// A replica started before its primary (a cluster booting) says why it is not connected, and
/// connects soon after the primary comes up rather than when quinn's backed-off resend fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_first_reports_it_and_connects_soon_after_the_primary() {
    let c = Cluster::new();
    let addr = free_addr();
    let r = c.replica("replica-1", addr).await;
    wait_for("the replica to report that nobody answers", || {
        r.status().last_error.is_some_and(|e| e.contains("no handshake within"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = c.primary_at(addr).await;
    let up = tokio::time::Instant::now();
    wait_for("connected", || r.status().connection == ConnectionState::Connected).await;
    let took = up.elapsed();
    // One dial lasts at most 2 s and the replica's reconnect_max is 500 ms: 2.5 s at worst, plus
    // the handshake. Generous for a noisy machine, and well under quinn's own 7 s resend.
    assert!(took < Duration::from_secs(5), "connected {took:?} after the primary came up");
    write(&p, &spaces(1), 10).await;
    converge(&p, &[&r]).await;
    r.shutdown().await;
    p.shutdown().await;
}

/// A path whose round trip is longer than the default dial timeout connects once the timeout
/// is raised (`TransportSettings::dial_timeout`); the error meanwhile names the setting.
#[tokio::test(start_paused = true)]
async fn a_replica_behind_a_long_round_trip_connects_with_a_longer_dial_timeout() {
    use walship::config::{HeartbeatConfig, PrimaryConfig, ReplicaConfig};
    use walship::net::endpoint::{client_config, server_config, TransportSettings};
    use walship::netsim::{sim_endpoint, Impairment, SimNetwork};
    use walship::wal::SyncPolicy;

    let net = SimNetwork::new(1);
    net.set_default(Impairment { delay: Duration::from_millis(1200), ..Default::default() });
    let c = Cluster::new();
    let settings = TransportSettings {
        max_idle_timeout: Duration::from_secs(60),
        dial_timeout: Duration::from_secs(10),
        ..TransportSettings::default()
    };
    let heartbeat = HeartbeatConfig { interval: Duration::from_secs(1), timeout: Duration::from_secs(20) };
    let (paddr, raddr): (SocketAddr, SocketAddr) =
        ("127.0.0.1:7400".parse().unwrap(), "127.0.0.1:7401".parse().unwrap());
    let endpoint = |name: &str, at: SocketAddr, server: bool| {
        let id = c.ca.issue(name).unwrap();
        let server_cfg = server.then(|| server_config(&id, &settings).unwrap());
        sim_endpoint(&net, at, server_cfg, Some(client_config(&id, &settings).unwrap())).unwrap()
    };
    let mut pc = PrimaryConfig::new("primary", paddr, c.path("primary"));
    (pc.wal.sync, pc.transport, pc.heartbeat) = (SyncPolicy::Never, settings.clone(), heartbeat.clone());
    let p = Primary::with_endpoint(pc, endpoint("primary", paddr, true)).await.unwrap();
    write(&p, &spaces(1), 10).await;
    let mut rc = ReplicaConfig::new("replica-1", paddr, "primary", c.path("replica-1"));
    (rc.wal.sync, rc.transport, rc.heartbeat) = (SyncPolicy::Never, settings.clone(), heartbeat);
    let r = Replica::with_endpoint(rc, endpoint("replica-1", raddr, false), None).await.unwrap();
    wait_for("connected over a 2.4 s round trip", || r.status().connection == ConnectionState::Connected).await;
    converge(&p, &[&r]).await;
    r.shutdown().await;
    p.shutdown().await;
}

/// Certificates from another CA, or a primary under another name, are reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_primary_name_is_reported_as_a_certificate_error() {
    let c = Cluster::new();
    let p = c.primary().await;
    let other = ClusterCa::generate("other CA").unwrap();
    let r =
        Replica::start(c.replica_config("replica-1", p.local_addr()), other.issue("replica-1").unwrap()).await.unwrap();
    let mut cfg = c.replica_config("replica-2", p.local_addr());
    cfg.primary_name = "primary-b".into();
    let r2 = Replica::start(cfg, c.ca.issue("replica-2").unwrap()).await.unwrap();
    wait_for("both errors", || r.status().last_error.is_some() && r2.status().last_error.is_some()).await;
    let (e1, e2) = (r.status().last_error.unwrap(), r2.status().last_error.unwrap());
    assert!(e1.contains("certificate") && e2.contains("certificate"), "{e1} / {e2}");
    assert!(p.status().replicas.is_empty());
    r.shutdown().await;
    r2.shutdown().await;
    p.shutdown().await;
}

/// A replica configured with a frame limit below the primary's: its hello says so, and the
/// primary sends it smaller batches instead of frames it would have to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_smaller_frame_limits_gets_smaller_batches() {
    let c = Cluster::new();
    let p = c.primary().await;
    let s = SpaceId::new("tenant-1").unwrap();
    let wal = p.space(&s).unwrap();
    for i in 0..2_000u64 {
        wal.append(Epoch(1), 1, Bytes::from(format!("{i:08}{}", "y".repeat(1016)))).unwrap();
    }
    let mut cfg = c.replica_config("replica-1", p.local_addr());
    cfg.wal.max_entry_bytes = 64 * 1024;
    cfg.limits.max_batch_bytes = 256 * 1024;
    let r = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    converge(&p, &[&r]).await;
    let st = r.status();
    let space = st.spaces.iter().find(|x| x.log.space == s).unwrap();
    assert_eq!((space.catch_ups, space.error.as_deref()), (0, None), "no frame was refused");
    r.shutdown().await;
    p.shutdown().await;
}

/// Two replica processes configured with one name (a copied config): the second is refused and
/// told why, the first keeps its connection (they used to displace each other for ever), and
/// the second gets in once the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_under_the_same_name_is_refused_while_the_first_is_alive() {
    let c = Cluster::new();
    let p = c.primary().await;
    let addr = p.local_addr();
    let s = spaces(2);
    write(&p, &s, 50).await;
    let first = c.replica("replica-1", addr).await;
    converge(&p, &[&first]).await;
    let mut cfg = c.replica_config("replica-1", addr);
    cfg.data_dir = c.path("replica-1-copy");
    let second = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    wait_for("the second replica to be refused", || {
        second.status().last_error.is_some_and(|e| e.contains("replica names must be unique"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let view = p.status().replicas.into_iter().find(|r| r.name == "replica-1").unwrap();
    assert_eq!(view.reconnects, 0, "the first replica's connection was never taken over");
    assert_eq!(first.status().connection, ConnectionState::Connected);
    assert_ne!(second.status().connection, ConnectionState::Connected);
    first.shutdown().await;
    write(&p, &s, 10).await;
    converge(&p, &[&second]).await;
    second.shutdown().await;
    p.shutdown().await;
}

/// Panics on its first call (a node server's state update failing), records every entry after.
struct PanicsOnce {
    panicked: AtomicBool,
    seen: Mutex<Vec<u64>>,
}

impl ApplyHook for PanicsOnce {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("the node server failed to apply");
            }
            self.seen.lock().unwrap().extend(entries.iter().map(|e| e.seq.0));
        })
    }
}

/// A hook that panics stops its space only for a moment: the status says so, the same entries
/// come again, and once they are applied the error clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_apply_hook_is_reported_and_its_entries_come_again() {
    let c = Cluster::new();
    let p = c.primary().await;
    let s = spaces(1);
    write(&p, &s, 100).await;
    let hook = Arc::new(PanicsOnce { panicked: AtomicBool::new(false), seen: Mutex::new(Vec::new()) });
    let r = c.replica_with_hook("replica-1", p.local_addr(), hook.clone()).await;
    wait_for("the panic in the space's status", || {
        r.status().spaces.iter().any(|x| x.error.as_deref().is_some_and(|e| e.contains("apply hook panicked")))
    })
    .await;
    converge(&p, &[&r]).await;
    write(&p, &s, 100).await;
    converge(&p, &[&r]).await;
    wait_for("every entry applied and the error cleared", || {
        let st = r.status();
        st.spaces.iter().all(|x| x.applied_seq == Seq(200) && x.error.is_none())
    })
    .await;
    assert_eq!(*hook.seen.lock().unwrap(), (1..=200).collect::<Vec<u64>>());
    r.shutdown().await;
    p.shutdown().await;
}

/// A state machine over the log: `apply` takes entries in (the call that panics has taken some in
/// first: a partial effect), `truncated` rebuilds the state from the log up to the cut.
struct PartialThenPanics {
    /// The replica's log of the space, to rebuild from (set once the replica has opened it).
    log: std::sync::OnceLock<walship::wal::SpaceWal>,
    state: Mutex<Vec<u64>>,
    /// Calls from this sequence on take in half their entries and panic (once).
    panic_from: u64,
    panicked: AtomicBool,
    truncations: Mutex<Vec<u64>>,
    /// Calls after the panic wait here, so the test decides what happens before them.
    gate: tokio::sync::Semaphore,
}

impl ApplyHook for PartialThenPanics {
    fn apply<'a>(&'a self, _space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let seqs = entries.iter().map(|e| e.seq.0);
            if self.panicked.load(Ordering::SeqCst) {
                let _pass = self.gate.acquire().await.unwrap();
            } else if entries[0].seq.0 >= self.panic_from {
                self.panicked.store(true, Ordering::SeqCst);
                self.state.lock().unwrap().extend(seqs.take(entries.len().div_ceil(2)));
                panic!("the node server failed halfway through a batch");
            }
            self.state.lock().unwrap().extend(entries.iter().map(|e| e.seq.0));
        })
    }

    fn truncated<'a>(&'a self, _space: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.truncations.lock().unwrap().push(after.0);
        let rebuilt = self.log.get().expect("set before any cut").read_from(Seq(1), usize::MAX, usize::MAX).unwrap();
        *self.state.lock().unwrap() = rebuilt.iter().map(|e| e.seq.0).filter(|s| *s <= after.0).collect();
        Box::pin(async {})
    }
}

/// The log is cut back under entries a call that panicked had partly applied (and above what was
/// applied): the hook hears of the cut before the entries come again, so its state ends as the
/// log, each entry once. It used to get the entries again with no `truncated` call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_under_a_call_that_panicked_partway_is_told_to_the_hook() {
    let c = Cluster::new();
    let p = c.primary().await;
    let s = spaces(1);
    write(&p, &s, 10).await;
    let hook = Arc::new(PartialThenPanics {
        log: std::sync::OnceLock::new(),
        state: Mutex::new(Vec::new()),
        panic_from: 1,
        panicked: AtomicBool::new(false),
        truncations: Mutex::new(Vec::new()),
        gate: tokio::sync::Semaphore::new(0),
    });
    let r = c.replica_with_hook("replica-1", p.local_addr(), hook.clone()).await;
    wait_for("the panic in the space's status", || {
        r.status().spaces.iter().any(|x| x.error.as_deref().is_some_and(|e| e.contains("apply hook panicked")))
    })
    .await;
    assert_eq!(r.status().spaces[0].applied_seq, Seq(0));
    let log = r.space(&s[0]).unwrap();
    let _ = hook.log.set(log.clone());
    // Within the second before the entries come again: cut under the partly applied call.
    log.truncate_suffix(Seq(3)).unwrap();
    r.disconnect(); // The primary ships 4.. again to the shortened log.
    hook.gate.add_permits(1 << 20);
    converge(&p, &[&r]).await;
    wait_for("every entry applied", || r.status().spaces.iter().all(|x| x.applied_seq == Seq(10))).await;
    assert_eq!(*hook.truncations.lock().unwrap(), vec![3], "the hook is told of the cut under its partial call");
    assert_eq!(*hook.state.lock().unwrap(), (1..=10).collect::<Vec<u64>>(), "the state is the log, each entry once");
    r.shutdown().await;
    p.shutdown().await;
}

/// The status a node server exports as metrics: the values behind the names match the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_snapshots_become_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let c = Cluster::new();
    let p = c.primary().await;
    let r = c.replica("replica-1", p.local_addr()).await;
    let s = spaces(3);
    write(&p, &s, 40).await;
    converge(&p, &[&r]).await;
    wait_for("every space acked", || p.status().replicas.iter().all(|v| v.max_lag.entries == 0)).await;
    let (ps, rs) = (p.status(), r.status());

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        walship::net::metrics::record_primary(&ps, true);
        walship::net::metrics::record_replica(&rs, true);
    });
    // (name, labels, value) of every metric recorded.
    type Recorded = (String, Vec<(String, String)>, DebugValue);
    let values: Vec<Recorded> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key.labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
            (key.name().to_string(), labels, value)
        })
        .collect();
    let find = |name: &str, labels: &[(&str, &str)]| {
        values
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v)))
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("no metric {name} {labels:?}"))
    };
    let view = &ps.replicas[0];
    assert_eq!(find("walship_replica_connected", &[("replica", "replica-1")]), &DebugValue::Gauge(1.0.into()));
    assert_eq!(
        find("walship_replication_bytes_total", &[("replica", "replica-1"), ("direction", "sent")]),
        &DebugValue::Counter(view.totals.bytes_sent)
    );
    assert_eq!(find("walship_replication_entries_total", &[("replica", "replica-1")]), &DebugValue::Counter(120));
    for space in &s {
        let labels = [("replica", "replica-1"), ("space", space.as_str())];
        assert_eq!(find("walship_replication_lag_entries", &labels), &DebugValue::Gauge(0.0.into()));
        assert_eq!(find("walship_space_applied_seq", &[("space", space.as_str())]), &DebugValue::Gauge(40.0.into()));
    }
    assert_eq!(find("walship_connected_to_primary", &[]), &DebugValue::Gauge(1.0.into()));
    r.shutdown().await;
    p.shutdown().await;
}
