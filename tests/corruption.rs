//! A replica facing a hand-driven primary that sends one corrupted frame: the replica asks for that
//! space again from its last durable sequence, the other space is not interrupted, and both logs end
//! exactly as sent.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use walship::codec::control::{SpaceRange, Welcome};
use walship::codec::{BatchEncoder, Compression, ControlMessage, StreamHeader, PROTOCOL_VERSION};
use walship::entry::{Entry, LogDigest};
use walship::{Epoch, NodeId, Seq, SpaceId};

fn entries(space: &SpaceId, from: u64, to: u64) -> Vec<Entry> {
    (from..=to).map(|i| Entry::new(Seq(i), Epoch(1), 1_000 + i, 0, payload(space, i))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_recovered_by_catch_up_without_disturbing_other_spaces() {
    let c = Cluster::new();
    let HandDrivenPrimary { replica, endpoint: _endpoint, conn, mut send, mut recv } =
        hand_driven_primary(&c, |_| {}).await;
    let mut buf = BytesMut::new();
    let (good, bad) = (SpaceId::new("good").unwrap(), SpaceId::new("bad").unwrap());
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        primary_id: NodeId::from_name("primary"),
        primary_name: "primary".into(),
        epoch: Epoch(1),
        spaces: vec![
            SpaceRange { space: good.clone(), first_seq: Seq(1), last_seq: Seq(100) },
            SpaceRange { space: bad.clone(), first_seq: Seq(1), last_seq: Seq(30) },
        ],
        max_inflight_bytes: walship::config::DEFAULT_MAX_REPLICA_INFLIGHT_BYTES as u64,
    });
    send.write_all(&welcome.encode().unwrap()).await.unwrap();
    let mut enc = BatchEncoder::new(NodeId::from_name("primary"), Compression::Lz4).with_min_compress_bytes(0);

    // The bad space: one good frame, then a frame with a flipped payload byte.
    let mut bad_stream = conn.open_uni().await.unwrap();
    bad_stream.write_all(&StreamHeader { space: bad.clone(), start_seq: Seq(1) }.encode()).await.unwrap();
    bad_stream.write_chunk(enc.encode(&bad, &entries(&bad, 1, 10)).unwrap()).await.unwrap();
    let mut corrupt = enc.encode(&bad, &entries(&bad, 11, 20)).unwrap().to_vec();
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0x40;
    bad_stream.write_chunk(Bytes::from(corrupt)).await.unwrap();

    // The good space streams on, undisturbed.
    let mut good_stream = conn.open_uni().await.unwrap();
    good_stream.write_all(&StreamHeader { space: good.clone(), start_seq: Seq(1) }.encode()).await.unwrap();
    for from in (1..=100).step_by(10) {
        good_stream.write_chunk(enc.encode(&good, &entries(&good, from, from + 9)).unwrap()).await.unwrap();
    }

    // The replica asks for the bad space again, from right after what it made durable.
    let catch_up = loop {
        match tokio::time::timeout(DEADLINE, next_control(&mut recv, &mut buf)).await.expect("a catch-up request") {
            ControlMessage::CatchUp(c) => break c,
            ControlMessage::Ack(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((catch_up.space.clone(), catch_up.from_seq), (bad.clone(), Seq(11)));
    assert!(catch_up.reason.contains("bad frame"), "{}", catch_up.reason);
    let _ = bad_stream.reset(walship::net::stream_code::CATCH_UP);
    let mut again = conn.open_uni().await.unwrap();
    again.write_all(&StreamHeader { space: bad.clone(), start_seq: Seq(11) }.encode()).await.unwrap();
    again.write_chunk(enc.encode(&bad, &entries(&bad, 11, 30)).unwrap()).await.unwrap();

    wait_for("both spaces complete", || {
        let s = replica.status();
        s.spaces.iter().any(|x| x.log.space == good && x.log.last_seq == Seq(100))
            && s.spaces.iter().any(|x| x.log.space == bad && x.log.last_seq == Seq(30))
    })
    .await;
    for (space, n) in [(&good, 100), (&bad, 30)] {
        let expected = entries(space, 1, n).iter().fold(LogDigest::EMPTY, |d, e| d.step(e.seq, e.kind, &e.payload));
        let wal = replica.space(space).unwrap();
        assert_eq!(wal.digest(), expected, "space {space}");
        assert_eq!(wal.read_from(Seq(1), usize::MAX, usize::MAX).unwrap(), entries(space, 1, n));
    }
    let bad_status = replica.status().spaces.into_iter().find(|x| x.log.space == bad).unwrap();
    assert_eq!(bad_status.catch_ups, 1);
    replica.shutdown().await;
}
