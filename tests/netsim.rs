//! quinn over the network simulator: data crosses lossy, delayed, reordering, duplicating and
//! partitioned links intact. The in-process tests run on tokio's paused clock (simulated time);
//! the forwarder test uses real UDP sockets on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use walship::net::endpoint::{client_config, client_endpoint, server_config, server_endpoint, TransportSettings};
use walship::net::tls::{ClusterCa, NodeIdentity};
use walship::netsim::model::SplitMix64;
use walship::netsim::{forwarder, sim_endpoint, Impairment, SimNetwork};

const SERVER: &str = "replica";
const CLIENT: &str = "primary";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn identities() -> (NodeIdentity, NodeIdentity) {
    let ca = ClusterCa::generate("netsim test CA").unwrap();
    (ca.issue(SERVER).unwrap(), ca.issue(CLIENT).unwrap())
}

/// `len` seeded bytes whose first byte is `tag` (identifies the stream at the receiver).
fn payload(tag: u8, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(tag as u64);
    let mut v: Vec<u8> = (0..len.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).take(len).collect();
    v[0] = tag;
    v
}

/// Accepts one connection and forwards the content of every uni stream it opens; echoes every
/// bidi stream.
fn spawn_receiver(endpoint: quinn::Endpoint) -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let incoming = endpoint.accept().await.expect("an incoming connection");
        let conn = incoming.await.expect("handshake");
        let c2 = conn.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = c2.accept_bi().await {
                tokio::spawn(async move {
                    let data = recv.read_to_end(16 << 20).await.expect("read bidi");
                    send.write_all(&data).await.expect("echo");
                    send.finish().expect("finish echo");
                    let _ = send.stopped().await;
                });
            }
        });
        while let Ok(mut recv) = conn.accept_uni().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let data = recv.read_to_end(16 << 20).await.expect("read uni");
                let _ = tx.send(data);
            });
        }
        // Keep the endpoint alive until the connection ends.
        drop(endpoint);
    });
    rx
}

/// Sends every payload on its own uni stream, concurrently, and checks the receiver got each
/// one intact.
async fn send_and_check(conn: &quinn::Connection, rx: &mut mpsc::UnboundedReceiver<Vec<u8>>, payloads: Vec<Vec<u8>>) {
    let mut tasks = Vec::new();
    for p in payloads.clone() {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = conn.open_uni().await.expect("open uni");
            send.write_all(&p).await.expect("write");
            send.finish().expect("finish");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..payloads.len() {
        got.push(rx.recv().await.expect("a stream"));
    }
    got.sort_by_key(|d| d[0]);
    assert_eq!(got.len(), payloads.len());
    for (g, p) in got.iter().zip(&payloads) {
        assert_eq!(g.len(), p.len(), "stream {} length", p[0]);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(g), xxhash_rust::xxh3::xxh3_64(p), "stream {} content differs", p[0]);
        assert!(g == p);
    }
}

#[tokio::test(start_paused = true)]
async fn quinn_over_a_lossy_simulated_link() {
    let wall = std::time::Instant::now();
    let t0 = tokio::time::Instant::now();
    let (server_id, client_id) = identities();
    let settings = TransportSettings::default();
    let net = SimNetwork::new(0x5eed);
    net.set_default(Impairment {
        loss: 0.05,
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(10),
        duplicate: 0.01,
        reorder: 0.02,
        ..Default::default()
    });
    let server =
        sim_endpoint(&net, addr("10.0.0.1:4433"), Some(server_config(&server_id, &settings).unwrap()), None).unwrap();
    let client =
        sim_endpoint(&net, addr("10.0.0.2:0"), None, Some(client_config(&client_id, &settings).unwrap())).unwrap();
    let mut rx = spawn_receiver(server);

    let work = async {
        let conn = client.connect(addr("10.0.0.1:4433"), SERVER).unwrap().await.expect("connect");
        // 2 MB on one stream and 512 kB on each of four more, all at once.
        let mut payloads = vec![payload(1, 2 << 20)];
        payloads.extend((2..=5).map(|tag| payload(tag, 512 << 10)));
        send_and_check(&conn, &mut rx, payloads).await;
        // A bidi round trip.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let msg = payload(9, 100_000);
        send.write_all(&msg).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(1 << 20).await.unwrap() == msg);
        conn.close(0u32.into(), b"done");
    };
    tokio::time::timeout(Duration::from_secs(3600), work).await.expect("transfer within an hour of simulated time");

    let simulated = t0.elapsed();
    let stats = net.stats();
    println!("simulated {simulated:?}, wall {:?}\n{stats}", wall.elapsed());
    for (from, to, s) in net.all_link_stats() {
        println!("  {from} -> {to}: {s}");
    }
    assert!(simulated > Duration::from_millis(100), "delay applied: {simulated:?}");
    assert!(stats.dropped_loss > 0 && stats.duplicated > 0 && stats.reordered > 0, "{stats}");
    let loss = stats.dropped_loss as f64 / stats.packets as f64;
    assert!((0.03..0.07).contains(&loss), "loss rate {loss}");
}

#[tokio::test(start_paused = true)]
async fn quinn_survives_a_two_second_partition() {
    let wall = std::time::Instant::now();
    let t0 = tokio::time::Instant::now();
    let (server_id, client_id) = identities();
    let settings = TransportSettings { max_idle_timeout: Duration::from_secs(30), ..TransportSettings::default() };
    let net = SimNetwork::new(7);
    net.set_default(Impairment {
        delay: Duration::from_millis(20),
        rate_bytes_per_s: Some(2_000_000),
        queue_limit_bytes: Some(200_000),
        ..Default::default()
    });
    let server =
        sim_endpoint(&net, addr("10.0.0.1:4433"), Some(server_config(&server_id, &settings).unwrap()), None).unwrap();
    let client =
        sim_endpoint(&net, addr("10.0.0.2:5000"), None, Some(client_config(&client_id, &settings).unwrap())).unwrap();
    let mut rx = spawn_receiver(server);
    let conn = client.connect(addr("10.0.0.1:4433"), SERVER).unwrap().await.expect("connect");
    let connected = t0.elapsed();

    let (partitioned_tx, partitioned_rx) = oneshot::channel();
    let net2 = net.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        net2.partition_all(true);
        let during = net2.stats().dropped_partition;
        tokio::time::sleep(Duration::from_secs(2)).await;
        net2.partition_all(false);
        let _ = partitioned_tx.send((during, net2.stats().dropped_partition));
    });
    // 4 MB at 2 MB/s: still running when the partition starts.
    let work = send_and_check(&conn, &mut rx, vec![payload(1, 4 << 20)]);
    tokio::time::timeout(Duration::from_secs(600), work).await.expect("transfer completes after the partition heals");
    let (before, after) = partitioned_rx.await.unwrap();
    let simulated = t0.elapsed();
    println!("connected after {connected:?}, done after {simulated:?} (wall {:?})\n{}", wall.elapsed(), net.stats());
    assert!(after > before, "the partition dropped traffic of the transfer");
    assert!(simulated >= Duration::from_millis(2500), "{simulated:?}");
    assert_eq!(conn.close_reason(), None, "the connection survived");
    conn.close(0u32.into(), b"done");
}

#[tokio::test]
async fn quinn_through_the_lossy_link_forwarder() {
    let (server_id, client_id) = identities();
    let settings = TransportSettings::default();
    let server = server_endpoint(addr("127.0.0.1:0"), &server_id, &settings).unwrap();
    let server_addr = server.local_addr().unwrap();
    let imp = Impairment { loss: 0.02, delay: Duration::from_millis(2), ..Default::default() };
    let fwd = forwarder::Forwarder::bind(addr("127.0.0.1:0"), server_addr, imp, imp, 42).unwrap();
    let fwd_addr = fwd.local_addr();
    let control = fwd.control();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let fwd_task = tokio::spawn(fwd.run(async {
        let _ = stop_rx.await;
    }));
    let mut rx = spawn_receiver(server);
    let client = client_endpoint(addr("127.0.0.1:0"), &client_id, &settings).unwrap();

    let work = async {
        let conn = client.connect(fwd_addr, SERVER).unwrap().await.expect("connect through the forwarder");
        send_and_check(&conn, &mut rx, vec![payload(1, 1 << 20), payload(2, 300_000)]).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let msg = payload(9, 200_000);
        send.write_all(&msg).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(1 << 20).await.unwrap() == msg);
        conn.close(0u32.into(), b"done");
    };
    tokio::time::timeout(Duration::from_secs(60), work).await.expect("transfer within 60 s");
    let live = control.stats();
    stop_tx.send(()).unwrap();
    let stats = fwd_task.await.unwrap().expect("forwarder ran");
    println!("{stats}");
    assert_eq!(stats.clients_total, 1);
    assert!(live.clients == 1);
    assert!(stats.up.forwarded > 700 && stats.down.forwarded > 0, "{stats}");
    assert!(stats.up.dropped_loss + stats.down.dropped_loss > 0, "{stats}");
    assert_eq!(stats.up.undeliverable, 0, "{stats}");
}
