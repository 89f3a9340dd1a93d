//! One control message of every kind, for the codec's unit tests and `tests/codec_fuzz.rs` (which
//! includes this file by path). Names come from the including module, which imports the control
//! message types, `LogDigest`, `Epoch`, `NodeId`, `Seq` and `SpaceId`.

use super::{
    Ack, CatchUp, ControlMessage, Epoch, ErrorCode, ErrorMessage, Hello, LogDigest, NodeId, Seq, SpaceAck, SpaceId,
    SpacePosition, SpaceRange, Welcome,
};

/// A space id from a literal known to be valid.
pub fn sid(s: &str) -> SpaceId {
    SpaceId::new(s).unwrap()
}

/// Every kind of control message, with repeated and optional parts filled in.
pub fn samples() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Hello(Hello {
            protocol_version: 1,
            node_id: NodeId(5),
            node_name: "replica-1".into(),
            epoch: Epoch(2),
            instance: 77,
            max_batch_bytes: 1 << 20,
            spaces: (0..5)
                .map(|i| SpacePosition {
                    space: sid(&format!("s{i}")),
                    last_seq: Seq(10 + i),
                    last_epoch: Epoch(2),
                    digest: LogDigest(99 + i),
                    durable_seq: Seq(8 + i / 2),
                    applied_seq: Seq(7 + i / 3),
                })
                .collect(),
        }),
        ControlMessage::Welcome(Welcome {
            protocol_version: 1,
            primary_id: NodeId(1),
            primary_name: "primary".into(),
            epoch: Epoch(2),
            spaces: vec![SpaceRange { space: sid("a"), first_seq: Seq(1), last_seq: Seq(20) }],
            max_inflight_bytes: 64 << 20,
        }),
        ControlMessage::Ack(Ack { spaces: vec![SpaceAck { space: sid("b"), durable: Seq(4), applied: Seq(3) }; 3] }),
        ControlMessage::CatchUp(CatchUp { space: sid("c"), from_seq: Seq(8), reason: "gap".into() }),
        ControlMessage::Error(ErrorMessage {
            code: ErrorCode::Truncated,
            space: Some(sid("c")),
            reason: "x".repeat(40),
        }),
    ]
}
