//! Control messages waiting for their stream, coalesced so that a peer that reads slowly (or not
//! at all) never makes them pile up: while a message waits, a newer one of the same kind for the
//! same space replaces it (a catch-up request, an error of the same code), and acks merge into
//! one. What waits is so bounded by the number of spaces, whatever the rate of events.
//!
//! A replacing message goes to the back of the queue, so the newest messages keep their order: an
//! error that halts a space followed by the catch-up request that resumes it arrive in that order.

use std::collections::{BTreeMap, HashMap};

use crate::codec::control::Ack;
use crate::codec::{ControlMessage, ErrorCode};
use crate::types::SpaceId;

/// What a message may replace: the message of the same key still waiting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Ack,
    CatchUp(SpaceId),
    Error(ErrorCode, Option<SpaceId>),
    /// Never replaced (the hello and the welcome).
    Unique(u64),
}

/// Control messages waiting to be written, in order, at most one per key.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Position of the next message; positions order the queue.
    next: u64,
    order: BTreeMap<u64, Key>,
    waiting: HashMap<Key, (u64, ControlMessage)>,
}

impl Outbox {
    /// Queues `msg`, replacing (or, for an ack, merging with) a waiting message of the same kind
    /// for the same space; the result goes to the back of the queue.
    pub fn push(&mut self, msg: ControlMessage) {
        let key = match &msg {
            ControlMessage::Ack(_) => Key::Ack,
            ControlMessage::CatchUp(c) => Key::CatchUp(c.space.clone()),
            ControlMessage::Error(e) => Key::Error(e.code, e.space.clone()),
            ControlMessage::Hello(_) | ControlMessage::Welcome(_) => Key::Unique(self.next),
        };
        let msg = match (self.waiting.remove(&key), msg) {
            (Some((at, ControlMessage::Ack(older))), ControlMessage::Ack(newer)) => {
                self.order.remove(&at);
                ControlMessage::Ack(merge_acks(older, newer))
            }
            (Some((at, _)), msg) => {
                self.order.remove(&at);
                msg
            }
            (None, msg) => msg,
        };
        let at = self.next;
        self.next += 1;
        self.order.insert(at, key.clone());
        self.waiting.insert(key, (at, msg));
    }

    /// The oldest waiting message.
    pub fn pop(&mut self) -> Option<ControlMessage> {
        let (_, key) = self.order.pop_first()?;
        self.waiting.remove(&key).map(|(_, msg)| msg)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// One ack with every space of both, the newer positions winning (positions only grow).
fn merge_acks(older: Ack, newer: Ack) -> Ack {
    let mut spaces = older.spaces;
    let mut at: HashMap<SpaceId, usize> = spaces.iter().enumerate().map(|(i, a)| (a.space.clone(), i)).collect();
    for a in newer.spaces {
        match at.get(&a.space) {
            Some(&i) => {
                let held = &mut spaces[i];
                held.durable = held.durable.max(a.durable);
                held.applied = held.applied.max(a.applied);
            }
            None => {
                at.insert(a.space.clone(), spaces.len());
                spaces.push(a);
            }
        }
    }
    Ack { spaces }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::control::{CatchUp, ErrorMessage, SpaceAck};
    use crate::types::Seq;

    fn space(i: u32) -> SpaceId {
        SpaceId::new(&format!("s{i}")).unwrap()
    }

    fn catch_up(i: u32, from: u64) -> ControlMessage {
        ControlMessage::CatchUp(CatchUp { space: space(i), from_seq: Seq(from), reason: String::new() })
    }

    fn error(i: u32, reason: &str) -> ControlMessage {
        ControlMessage::Error(ErrorMessage { code: ErrorCode::Truncated, space: Some(space(i)), reason: reason.into() })
    }

    fn ack(list: &[(u32, u64, u64)]) -> ControlMessage {
        ControlMessage::Ack(Ack {
            spaces: list
                .iter()
                .map(|&(i, d, a)| SpaceAck { space: space(i), durable: Seq(d), applied: Seq(a) })
                .collect(),
        })
    }

    fn drain(o: &mut Outbox) -> Vec<ControlMessage> {
        std::iter::from_fn(|| o.pop()).collect()
    }

    #[test]
    fn messages_come_out_in_order_when_nothing_repeats() {
        let mut o = Outbox::default();
        let msgs = [catch_up(1, 5), error(2, "x"), ack(&[(1, 3, 2)]), catch_up(2, 9)];
        msgs.iter().cloned().for_each(|m| o.push(m));
        assert_eq!(drain(&mut o), msgs);
        assert!(o.is_empty());
    }

    #[test]
    fn a_flood_for_a_few_spaces_stays_a_few_messages() {
        let mut o = Outbox::default();
        for n in 0..100_000u64 {
            let i = (n % 16) as u32;
            o.push(error(i, &format!("failure {n}")));
            o.push(catch_up(i, n));
            o.push(ack(&[(i, n, n)]));
        }
        // 16 errors, 16 catch-up requests, one ack for the 16 spaces.
        assert_eq!(o.len(), 33);
        let out = drain(&mut o);
        assert!(out.contains(&error(15, "failure 99999")) && out.contains(&catch_up(15, 99_999)));
        let ControlMessage::Ack(a) = out.last().unwrap() else { panic!("the ack came last: {out:?}") };
        assert_eq!(a.spaces.len(), 16);
        assert!(a.spaces.iter().all(|s| s.durable.0 >= 99_984 && s.applied == s.durable));
    }

    #[test]
    fn a_replacing_message_goes_to_the_back() {
        // A catch-up request waits, the space is then reported diverged, and after the operator's
        // repair a new catch-up request comes: the primary must see the error, then the request.
        let mut o = Outbox::default();
        o.push(catch_up(1, 5));
        o.push(error(1, "diverged"));
        o.push(catch_up(1, 3));
        assert_eq!(drain(&mut o), [error(1, "diverged"), catch_up(1, 3)]);
    }

    #[test]
    fn errors_of_different_codes_for_a_space_both_wait() {
        let mut o = Outbox::default();
        let diverged = ControlMessage::Error(ErrorMessage {
            code: ErrorCode::Diverged,
            space: Some(space(1)),
            reason: "diverged".into(),
        });
        o.push(diverged.clone());
        o.push(error(1, "truncated"));
        o.push(error(1, "truncated again"));
        assert_eq!(drain(&mut o), [diverged, error(1, "truncated again")]);
    }

    #[test]
    fn acks_merge_keeping_the_newest_position_of_each_space() {
        let mut o = Outbox::default();
        o.push(ack(&[(1, 10, 5), (2, 7, 7)]));
        o.push(ack(&[(1, 12, 12), (3, 1, 0)]));
        assert_eq!(drain(&mut o), [ack(&[(1, 12, 12), (2, 7, 7), (3, 1, 0)])]);
    }

    #[test]
    fn hello_and_welcome_are_never_replaced() {
        use crate::codec::control::Welcome;
        let welcome = || {
            ControlMessage::Welcome(Welcome {
                protocol_version: 3,
                primary_id: crate::types::NodeId(1),
                primary_name: "p".into(),
                epoch: crate::types::Epoch(1),
                spaces: vec![],
                max_inflight_bytes: 0,
            })
        };
        let mut o = Outbox::default();
        o.push(welcome());
        o.push(welcome());
        assert_eq!(o.len(), 2);
    }
}
