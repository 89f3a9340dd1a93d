//! Datagrams in flight on a simulated link, ordered by delivery time.
//!
//! Shared by the in-process switch ([`super::socket`]) and the UDP forwarder ([`super::forwarder`]):
//! both schedule each copy of a packet at `now + delay` and hand out whatever is due. Ties keep
//! the order of submission, so equal delays never reorder packets; only the model's delays do.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Items waiting for their delivery time.
pub(crate) struct DelayQueue<T> {
    heap: BinaryHeap<Slot<T>>,
    next_seq: u64,
}

struct Slot<T> {
    at: Instant,
    /// Tie-breaker: same delivery time, submitted first, delivered first.
    seq: u64,
    item: T,
}

impl<T> PartialEq for Slot<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest item must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        DelayQueue { heap: BinaryHeap::new(), next_seq: 0 }
    }
}

impl<T> DelayQueue<T> {
    /// Schedules `item` for `at`. True if it is now the earliest: the delivery task, which may be
    /// sleeping until a later time, must be woken.
    pub(crate) fn push(&mut self, at: Instant, item: T) -> bool {
        let earliest = self.next_at().map_or(true, |head| at < head);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Slot { at, seq, item });
        earliest
    }

    /// The earliest item if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_at()? > now {
            return None;
        }
        self.heap.pop().map(|slot| slot.item)
    }

    /// When the earliest item is due.
    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|slot| slot.at)
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn items_come_out_by_time_then_by_submission() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = DelayQueue::default();
        assert!(q.push(ms(20), "late"));
        assert!(q.push(ms(10), "first"));
        assert!(!q.push(ms(10), "second, same time"));
        assert!(!q.push(ms(30), "last"));
        assert_eq!(q.len(), 4);
        assert_eq!(q.pop_due(ms(5)), None);
        assert_eq!(q.next_at(), Some(ms(10)));
        assert_eq!(q.pop_due(ms(20)), Some("first"));
        assert_eq!(q.pop_due(ms(20)), Some("second, same time"));
        assert_eq!(q.pop_due(ms(20)), Some("late"));
        assert_eq!(q.pop_due(ms(20)), None);
        q.clear();
        assert_eq!((q.len(), q.next_at()), (0, None));
    }
}
