//! A hand-driven primary that sends more large frames at once than the in-flight credit it
//! announced: each stream announces a valid 3 MiB frame and sends all of it but the last byte.
//! Every stream copies its frame out of QUIC's buffers, so only the credit check bounds what the
//! replica holds: it must close the connection instead of assembling streams x frame size.

mod common;

use bytes::Bytes;
use common::*;
use walship::codec::control::{SpaceRange, Welcome};
use walship::codec::{ControlMessage, StreamHeader, PROTOCOL_VERSION};
use walship::net::close;
use walship::{Epoch, NodeId, Seq, SpaceId};

/// A valid batch header (no compression, one entry) announcing `len` payload bytes from seq 1.
fn frame_header(space: &SpaceId, len: u32) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"WSB1");
    f[4] = PROTOCOL_VERSION;
    f[8..16].copy_from_slice(&NodeId::from_name("primary").0.to_le_bytes());
    f[16..24].copy_from_slice(&1u64.to_le_bytes());
    f[24..32].copy_from_slice(&1u64.to_le_bytes());
    f[32..36].copy_from_slice(&1u32.to_le_bytes());
    f[36..40].copy_from_slice(&walship::codec::batch::space_tag(space).to_le_bytes());
    f[40..44].copy_from_slice(&len.to_le_bytes());
    f[44..48].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&f[..60]);
    f[60..64].copy_from_slice(&crc.to_le_bytes());
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_beyond_the_announced_credit_close_the_connection() {
    const STREAMS: usize = 32;
    const LEN: u32 = 3 << 20;
    const CREDIT: u64 = 4 << 20;
    let c = Cluster::new();
    let HandDrivenPrimary { replica, endpoint: _endpoint, conn, mut send, .. } = hand_driven_primary(&c, |_| {}).await;
    let spaces: Vec<SpaceId> = (0..STREAMS).map(|i| SpaceId::new(&format!("s-{i}")).unwrap()).collect();
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: Epoch(1),
        spaces: spaces.iter().map(|s| SpaceRange { space: s.clone(), first_seq: Seq(1), last_seq: Seq(1) }).collect(),
        max_inflight_bytes: CREDIT,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();

    let body = Bytes::from(vec![0x5au8; LEN as usize - 1]);
    let mut writers = Vec::new();
    for s in &spaces {
        let Ok(mut st) = conn.open_uni().await else { break };
        let (s, body) = (s.clone(), body.clone());
        writers.push(tokio::spawn(async move {
            st.write_all(&StreamHeader { space: s.clone(), start_seq: Seq(1) }.encode()).await.ok()?;
            st.write_all(&frame_header(&s, LEN)).await.ok()?;
            st.write_chunk(body).await.ok()?;
            Some(st) // Kept open: the last byte never comes.
        }));
    }
    let reason = tokio::time::timeout(DEADLINE, conn.closed()).await.expect("the replica kept the connection");
    match reason {
        quinn::ConnectionError::ApplicationClosed(a) => assert_eq!(a.error_code, close::PROTOCOL, "{a:?}"),
        other => panic!("closed otherwise: {other}"),
    }
    drop(writers);
    replica.shutdown().await;
}

/// A primary announcing more credit than the replica accepts is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_above_max_assembly_bytes_is_refused() {
    let c = Cluster::new();
    let HandDrivenPrimary { replica, endpoint: _endpoint, conn, mut send, .. } =
        hand_driven_primary(&c, |cfg| cfg.max_assembly_bytes = 1 << 20).await;
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: Epoch(1),
        spaces: vec![],
        max_inflight_bytes: 2 << 20,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();
    tokio::time::timeout(DEADLINE, conn.closed()).await.expect("the replica kept the connection");
    wait_for("the reason in the replica's status", || {
        replica.status().last_error.is_some_and(|e| e.contains("max_assembly_bytes"))
    })
    .await;
    replica.shutdown().await;
}
