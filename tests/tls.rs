//! Mutual TLS over real QUIC connections on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;
use walship::net::endpoint::{client_endpoint, server_endpoint, TransportSettings, DEFAULT_MAX_CONCURRENT_UNI_STREAMS};
use walship::net::tls::{peer_name, ClusterCa, NodeIdentity, TlsError, ALPN, CA_CERT_FILE, CA_KEY_FILE};

const LIMIT: Duration = Duration::from_secs(10);

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What the test server saw for one connection attempt: the client's name, or the handshake error.
type Event = Result<Option<String>, String>;

/// A server endpoint that reports every connection attempt, echoes bi streams ("echo:" + data),
/// echoes datagrams, and counts accepted uni streams (reported as `Ok(Some("uni:N"))` when the
/// peer closes the connection).
struct TestServer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
}

impl TestServer {
    fn start(id: &NodeIdentity) -> TestServer {
        let endpoint = server_endpoint(local(), id, &TransportSettings::default()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => {
                            let _ = tx.send(Ok(peer_name(&conn)));
                            serve(conn).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                });
            }
        });
        TestServer { endpoint, addr, events }
    }

    async fn next_event(&mut self) -> Event {
        timeout(LIMIT, self.events.recv()).await.expect("server reported nothing").expect("server loop ended")
    }
}

async fn serve(conn: quinn::Connection) {
    let bi = {
        let conn = conn.clone();
        async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if let Ok(data) = recv.read_to_end(1 << 20).await {
                        let mut reply = b"echo:".to_vec();
                        reply.extend_from_slice(&data);
                        let _ = send.write_all(&reply).await;
                        let _ = send.finish();
                    }
                });
            }
        }
    };
    let dgrams = {
        let conn = conn.clone();
        async move {
            while let Ok(d) = conn.read_datagram().await {
                let _ = conn.send_datagram(d);
            }
        }
    };
    let uni = {
        let conn = conn.clone();
        async move {
            // Keep the streams (unfinished) so they all count against the limit at once.
            let mut held = Vec::new();
            while let Ok(mut s) = conn.accept_uni().await {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    held.push(s);
                    if held.len() % 100 == 0 {
                        // Tell the client how many are open.
                        let _ = conn.send_datagram(format!("uni:{}", held.len()).into());
                    }
                }
            }
        }
    };
    tokio::join!(bi, dgrams, uni);
}

/// Connects as `client`, checks the server's name, exchanges bytes on a bi stream.
async fn exchange(
    client: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, String> {
    let attempt = async {
        let conn = client
            .connect(server, server_name)
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        send.write_all(b"hello").await.map_err(|e| format!("write: {e}"))?;
        send.finish().map_err(|e| format!("finish: {e}"))?;
        let reply = recv.read_to_end(1024).await.map_err(|e| format!("read: {e}"))?;
        if reply != b"echo:hello" {
            return Err(format!("unexpected reply {reply:?}"));
        }
        Ok(conn)
    };
    timeout(LIMIT, attempt).await.map_err(|_| "timed out".to_string())?
}

async fn good_client_connects(ca: &ClusterCa, server: &mut TestServer, name: &str) {
    let id = ca.issue(name).unwrap();
    let ep = client_endpoint(local(), &id, &TransportSettings::default()).unwrap();
    let conn = exchange(&ep, server.addr, "primary").await.expect("good client refused");
    assert_eq!(peer_name(&conn).as_deref(), Some("primary"));
    assert_eq!(server.next_event().await, Ok(Some(name.to_string())));
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
}

#[tokio::test]
async fn mutual_tls_names_both_peers_and_refuses_strangers() {
    let ca = ClusterCa::generate("walship test ca").unwrap();
    let mut server = TestServer::start(&ca.issue("primary").unwrap());

    // Both sides learn the other's name from its verified certificate.
    good_client_connects(&ca, &mut server, "replica-1").await;

    // A certificate from another CA (trusting the right CA, claiming a legitimate name).
    let rogue_ca = ClusterCa::generate("rogue ca").unwrap();
    let mut rogue = rogue_ca.issue("replica-1").unwrap();
    rogue.ca_certs = vec![ca.cert_der()];
    let ep = client_endpoint(local(), &rogue, &TransportSettings::default()).unwrap();
    let res = exchange(&ep, server.addr, "primary").await;
    assert!(res.is_err(), "client with a foreign certificate was served");
    let ev = server.next_event().await;
    assert!(ev.is_err(), "server accepted a foreign certificate: {ev:?}");
    good_client_connects(&ca, &mut server, "replica-2").await;

    // No client certificate at all.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let mut anon = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anon.alpn_protocols = vec![ALPN.to_vec()];
    let anon = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(anon).unwrap()));
    let ep = quinn::Endpoint::client(local()).unwrap();
    let res = timeout(LIMIT, async {
        let conn = ep
            .connect_with(anon, server.addr, "primary")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    })
    .await
    .expect("anonymous attempt hung");
    assert!(res.is_err(), "client without certificate was served");
    let ev = server.next_event().await;
    assert!(ev.is_err(), "server accepted a client without certificate: {ev:?}");
    good_client_connects(&ca, &mut server, "replica-3").await;

    // Dialing the right server under the wrong name fails on the client.
    let id = ca.issue("replica-4").unwrap();
    let ep = client_endpoint(local(), &id, &TransportSettings::default()).unwrap();
    let res = exchange(&ep, server.addr, "replica-9").await;
    let err = res.expect_err("wrong server name accepted");
    assert!(err.starts_with("handshake"), "{err}");
    let ev = server.next_event().await;
    assert!(ev.is_err(), "{ev:?}");
    good_client_connects(&ca, &mut server, "replica-4").await;

    server.endpoint.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn datagrams_and_many_uni_streams() {
    let ca = ClusterCa::generate("walship test ca").unwrap();
    let mut server = TestServer::start(&ca.issue("primary").unwrap());
    let settings = TransportSettings::default();
    let id = ca.issue("replica-1").unwrap();
    let ep = client_endpoint(local(), &id, &settings).unwrap();
    let conn = exchange(&ep, server.addr, "primary").await.unwrap();
    assert_eq!(server.next_event().await, Ok(Some("replica-1".into())));

    // Datagrams are enabled both ways. They are unreliable, so resend until the echo comes.
    assert!(conn.max_datagram_size().is_some(), "datagrams disabled");
    let echo = timeout(LIMIT, async {
        loop {
            conn.send_datagram(bytes::Bytes::from_static(b"heartbeat")).unwrap();
            if let Ok(Ok(d)) = timeout(Duration::from_millis(200), conn.read_datagram()).await {
                break d;
            }
        }
    })
    .await
    .expect("no datagram echo");
    assert_eq!(&echo[..], b"heartbeat");

    // Far more concurrently open uni streams than quinn's default limit of 100.
    let n = 500;
    assert!(n <= DEFAULT_MAX_CONCURRENT_UNI_STREAMS as usize);
    let mut streams = Vec::with_capacity(n);
    timeout(LIMIT, async {
        for _ in 0..n {
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(b"x").await.unwrap();
            streams.push(s);
        }
    })
    .await
    .expect("open_uni blocked below the configured stream limit");
    let reported = timeout(LIMIT, async {
        loop {
            let d = conn.read_datagram().await.unwrap();
            if d.as_ref() == format!("uni:{n}").as_bytes() {
                break;
            }
        }
    })
    .await;
    assert!(reported.is_ok(), "server did not see {n} open uni streams");

    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    server.endpoint.close(0u32.into(), b"bye");
}

#[tokio::test]
async fn identities_load_from_a_written_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("walship dev ca").unwrap();
    let written = ca.write_dir(dir.path(), &["primary", "replica-1"]).unwrap();
    assert_eq!(written.len(), 5);
    assert!(dir.path().join(CA_CERT_FILE).exists());
    assert!(!dir.path().join(CA_KEY_FILE).exists(), "CA key written without being asked");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("replica-1.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let primary = NodeIdentity::load(dir.path(), "primary").unwrap();
    let replica = NodeIdentity::load(dir.path(), "replica-1").unwrap();
    assert_eq!(primary.name, "primary");
    assert_eq!(replica.ca_certs, vec![ca.cert_der()]);

    // The loaded identities talk to each other.
    let mut server = TestServer::start(&primary);
    let ep = client_endpoint(local(), &replica, &TransportSettings::default()).unwrap();
    let conn = exchange(&ep, server.addr, "primary").await.unwrap();
    assert_eq!(peer_name(&conn).as_deref(), Some("primary"));
    assert_eq!(server.next_event().await, Ok(Some("replica-1".into())));
    conn.close(0u32.into(), b"done");
    server.endpoint.close(0u32.into(), b"bye");

    // A name without files is reported with the missing path and how to make it.
    let err = NodeIdentity::load(dir.path(), "replica-7").unwrap_err();
    match &err {
        TlsError::MissingFile { path, .. } => {
            assert_eq!(path, &dir.path().join("replica-7.pem"))
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    // The folder has a CA its nodes trust: the hint is not a gen_certs run that would refuse to
    // overwrite it.
    assert!(msg.contains("replica-7.pem") && msg.contains("holds a cluster CA already"), "{msg}");

    // A folder without ca.pem.
    let empty = tempfile::tempdir().unwrap();
    let err = NodeIdentity::load(empty.path(), "primary").unwrap_err();
    match &err {
        TlsError::MissingFile { path, .. } => assert_eq!(path, &empty.path().join("ca.pem")),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(
        err.to_string().contains("gen_certs -- --out")
            && err.to_string().contains("--names primary,<every other node>`"),
        "{err}"
    );

    // A certificate that does not name the node is refused at load time.
    std::fs::copy(dir.path().join("primary.pem"), dir.path().join("impostor.pem")).unwrap();
    std::fs::copy(dir.path().join("primary.key"), dir.path().join("impostor.key")).unwrap();
    let err = NodeIdentity::load(dir.path(), "impostor").unwrap_err();
    assert!(matches!(err, TlsError::InvalidIdentity { .. }), "{err}");

    // Explicitly requested CA key.
    let key = ca.write_ca_key(dir.path()).unwrap();
    assert!(std::fs::read_to_string(key).unwrap().contains("PRIVATE KEY"));
}
