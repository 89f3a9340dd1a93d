//! Test harness: certificates in memory, temporary data folders, convergence checks.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use walship::config::{PrimaryConfig, ReplicaConfig};
use walship::net::tls::ClusterCa;
use walship::wal::SyncPolicy;
use walship::{Primary, Replica, SpaceId};

/// Generous: CI machines are small and noisy. Tests assert what arrived, never how fast.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub ca: ClusterCa,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster { ca: ClusterCa::generate("test CA").unwrap(), dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn primary_config(&self, listen: SocketAddr) -> PrimaryConfig {
        let mut c = PrimaryConfig::new("primary", listen, self.path("primary"));
        c.wal.sync = SyncPolicy::Never;
        c
    }

    pub async fn primary(&self) -> Primary {
        self.primary_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// A primary on `listen`; a restarted primary may find its port still held for a moment by the
    /// previous endpoint's driver, so binding is retried.
    pub async fn primary_at(&self, listen: SocketAddr) -> Primary {
        let start = tokio::time::Instant::now();
        loop {
            match Primary::start(self.primary_config(listen), self.ca.issue("primary").unwrap()).await {
                Ok(p) => return p,
                Err(e) if start.elapsed() < DEADLINE => {
                    eprintln!("retrying bind of {listen}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot start the primary: {e}"),
            }
        }
    }

    pub fn replica_config(&self, name: &str, primary: SocketAddr) -> ReplicaConfig {
        let mut c = ReplicaConfig::new(name, primary, "primary", self.path(name));
        c.wal.sync = SyncPolicy::Never;
        c.reconnect_initial = Duration::from_millis(50);
        c.reconnect_max = Duration::from_millis(500);
        c
    }

    pub async fn replica(&self, name: &str, primary: SocketAddr) -> Replica {
        Replica::start(self.replica_config(name, primary), self.ca.issue(name).unwrap()).await.unwrap()
    }

    /// A replica of `primary` handing its entries to `hook`.
    pub async fn replica_with_hook(
        &self,
        name: &str,
        primary: SocketAddr,
        hook: Arc<dyn walship::ApplyHook>,
    ) -> Replica {
        Replica::start_with_hook(self.replica_config(name, primary), self.ca.issue(name).unwrap(), Some(hook))
            .await
            .unwrap()
    }
}

pub fn spaces(n: usize) -> Vec<SpaceId> {
    (0..n).map(|i| SpaceId::new(&format!("space-{i:02}")).unwrap()).collect()
}

/// A deterministic payload for entry `i` of a space.
pub fn payload(space: &SpaceId, i: u64) -> Bytes {
    Bytes::from(format!("{space}:{i}:{}", "x".repeat((i % 97) as usize)))
}

/// Writes `per_space` entries to each space, interleaved, from a blocking thread.
pub async fn write(primary: &Primary, spaces: &[SpaceId], per_space: u64) {
    let wals: Vec<_> = spaces.iter().map(|s| primary.space(s).unwrap()).collect();
    let epoch = primary.status().epoch;
    tokio::task::spawn_blocking(move || {
        for _ in 0..per_space {
            for w in &wals {
                let i = w.last_seq().0 + 1;
                w.append(epoch, (i % 4) as u8, payload(w.space(), i)).unwrap();
            }
        }
    })
    .await
    .unwrap();
}

/// True if the replica holds every space of the primary with the same last sequence and digest.
pub fn identical(primary: &Primary, replica: &Replica) -> bool {
    let p = primary.status();
    let r = replica.status();
    p.spaces.iter().all(|ps| {
        r.spaces
            .iter()
            .any(|rs| rs.log.space == ps.space && rs.log.last_seq == ps.last_seq && rs.log.digest == ps.digest)
    })
}

/// Waits until `cond` holds, panicking with `what` after the deadline.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every replica is identical to the primary, then checks every entry one by one.
pub async fn converge(primary: &Primary, replicas: &[&Replica]) {
    wait_for("replicas identical to the primary", || replicas.iter().all(|r| identical(primary, r))).await;
    for r in replicas {
        for pw in primary.store().spaces() {
            let rw = r.space(pw.space()).expect("replica has the space");
            assert_eq!(rw.first_seq(), pw.first_seq());
            let (p, q) = (
                pw.read_from(pw.first_seq(), usize::MAX, usize::MAX).unwrap(),
                rw.read_from(rw.first_seq(), usize::MAX, usize::MAX).unwrap(),
            );
            assert_eq!(p, q, "entries of {} differ", pw.space());
        }
    }
}

/// A seeded xorshift generator for the adversarial tests: the same seed, the same inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The next control message on a hand-driven peer's control stream (`buf` keeps what is left over).
pub async fn next_control(recv: &mut quinn::RecvStream, buf: &mut bytes::BytesMut) -> walship::codec::ControlMessage {
    use walship::codec::control::DEFAULT_MAX_CONTROL_BYTES;
    loop {
        if let Some(m) = walship::codec::ControlMessage::decode_from(buf, DEFAULT_MAX_CONTROL_BYTES).unwrap() {
            return m;
        }
        let chunk = recv.read_chunk(65536, true).await.unwrap().expect("control stream open");
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// A hand-driven primary: an endpoint a replica (configured by `tweak`) dials, the connection, and
/// its control stream once the replica's hello has been read. It sends no heartbeats, so the
/// replica's dead-peer timeout is set long.
pub struct HandDrivenPrimary {
    pub replica: Replica,
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

pub async fn hand_driven_primary(c: &Cluster, tweak: impl FnOnce(&mut ReplicaConfig)) -> HandDrivenPrimary {
    use walship::net::endpoint::{server_endpoint, TransportSettings};
    let endpoint =
        server_endpoint("127.0.0.1:0".parse().unwrap(), &c.ca.issue("primary").unwrap(), &TransportSettings::default())
            .unwrap();
    let mut cfg = c.replica_config("replica-1", endpoint.local_addr().unwrap());
    cfg.heartbeat.timeout = Duration::from_secs(120);
    tweak(&mut cfg);
    let replica = Replica::start(cfg, c.ca.issue("replica-1").unwrap()).await.unwrap();
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let hello = next_control(&mut recv, &mut buf).await;
    assert!(matches!(hello, walship::codec::ControlMessage::Hello(_)), "{hello:?}");
    HandDrivenPrimary { replica, endpoint, conn, send, recv }
}

/// A hand-driven replica named replica-1 connected to the primary at `primary`: its endpoint, the
/// connection, and its control stream, once it has sent a hello holding `spaces`, followed in the
/// same write by `after_hello`. It reads nothing yet (`buf` is for [`next_control`]).
pub struct HandDrivenReplica {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub buf: bytes::BytesMut,
}

pub async fn hand_driven_replica(
    c: &Cluster,
    primary: SocketAddr,
    spaces: Vec<walship::codec::control::SpacePosition>,
    after_hello: Vec<walship::codec::ControlMessage>,
) -> HandDrivenReplica {
    use walship::codec::control::Hello;
    use walship::codec::{ControlMessage, FrameLimits, PROTOCOL_VERSION};
    use walship::net::endpoint::{client_endpoint, TransportSettings};
    let endpoint = client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &c.ca.issue("replica-1").unwrap(),
        &TransportSettings::default(),
    )
    .unwrap();
    let conn = endpoint.connect(primary, "primary").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = ControlMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: walship::NodeId::from_name("replica-1"),
        node_name: "replica-1".into(),
        epoch: walship::Epoch(0),
        instance: 7,
        max_batch_bytes: FrameLimits::default().max_batch_bytes as u64,
        spaces,
    });
    let mut bytes = hello.encode().unwrap().to_vec();
    for m in after_hello {
        bytes.extend_from_slice(&m.encode().unwrap());
    }
    send.write_all(&bytes).await.unwrap();
    HandDrivenReplica { endpoint, conn, send, recv, buf: bytes::BytesMut::new() }
}

/// A data stream for `space` from `start` on, opened by a hand-driven primary (its header written).
pub async fn open_space_stream(conn: &quinn::Connection, space: &SpaceId, start: u64) -> quinn::SendStream {
    let mut st = conn.open_uni().await.unwrap();
    let header = walship::codec::StreamHeader { space: space.clone(), start_seq: walship::Seq(start) };
    st.write_all(&header.encode()).await.unwrap();
    st
}
