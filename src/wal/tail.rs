//! The memory tail: the most recent entries of a log, so shipping live entries never reads disk.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::entry::Entry;
use crate::types::Seq;

use super::segment::RECORD_HEADER_LEN;

/// The bytes all the memory tails of a store hold, against one budget
/// ([`super::WalConfig::store_tail_max_bytes`]).
///
/// A tail that settles while the store is over budget drops its own oldest entries, down to its
/// fair share (budget / tails), so that a busy space keeps a tail even when idle spaces hold the
/// budget; past twice the budget it drops them all. The store so holds at most twice the budget
/// (plus what settling leaves uncounted, [`SETTLE_EVERY_BYTES`] per tail).
#[derive(Debug)]
pub(crate) struct TailBudget {
    used: AtomicUsize,
    tails: AtomicUsize,
    max: usize,
}

impl TailBudget {
    pub fn new(max: usize) -> Arc<TailBudget> {
        Arc::new(TailBudget { used: AtomicUsize::new(0), tails: AtomicUsize::new(0), max })
    }

    /// Bytes above the budget, and what a tail settling now may keep of its own.
    fn excess_and_floor(&self) -> (usize, usize) {
        let used = self.used.load(Ordering::Relaxed);
        let floor =
            if used > self.max.saturating_mul(2) { 0 } else { self.max / self.tails.load(Ordering::Relaxed).max(1) };
        (used.saturating_sub(self.max), floor)
    }

    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A bounded run of the log's last entries, contiguous in seq and ending at the log's `last_seq`.
///
/// Bounded by its own limits on every push, and by the store's [`TailBudget`] every few KiB of
/// writes ([`MemTail::settle_if_due`]): one atomic update per batch of entries, not one per entry.
#[derive(Debug)]
pub(crate) struct MemTail {
    entries: VecDeque<Entry>,
    /// The entries by the write that pushed them, oldest first (see [`Run`]).
    runs: VecDeque<Run>,
    /// The last run is still being pushed to ([`MemTail::end_run`] closes it).
    run_open: bool,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
    budget: Arc<TailBudget>,
    /// Change of `bytes` not yet applied to the budget.
    unsettled: isize,
}

/// Entries pushed by one write. Their payloads may be slices of one buffer (a replica's entries
/// are slices of the frame they arrived in), which stays alive as long as any of them is held: a
/// tail cut down to a few entries of a 1 MiB frame would still hold the whole frame, memory its
/// budget does not count. Once a run's entries hold less than a quarter of what the run pinned,
/// they get a buffer of their own ([`MemTail::compact`]): the copy is at most a third of what
/// that frees.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: Seq,
    last: Seq,
    /// Whether the entries' payloads may share buffers (compaction is pointless otherwise).
    payloads: Payloads,
    /// Payload bytes the run's buffers may hold: all of its entries' when pushed.
    pinned: usize,
    /// Payload bytes of its entries still in the tail.
    held: usize,
}

/// Whether the payloads of one write's entries may be slices of shared buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payloads {
    /// Each its own (a writer's appends): the tail never copies them.
    Own,
    /// Possibly slices of one buffer (a replica's entries of one frame, recovery's read buffers).
    MayShare,
}

/// How far a tail's bytes may drift from what the store's budget counts for it.
pub(crate) const SETTLE_EVERY_BYTES: usize = 4096;

/// What one entry costs against the byte budget: its payload plus a record header's worth of overhead.
fn cost(e: &Entry) -> usize {
    e.payload.len() + RECORD_HEADER_LEN
}

impl MemTail {
    /// An empty tail bounded by `max_bytes` and `max_entries`, counting against a budget of its own
    /// until [`MemTail::share`] moves it to a store's.
    pub fn new(max_bytes: usize, max_entries: usize) -> MemTail {
        MemTail {
            // Grows with use: thousands of spaces with small tails must not each hold a ring
            // sized for `max_entries` (4,096 slots are 256 KiB, whatever the byte budget says).
            entries: VecDeque::new(),
            runs: VecDeque::new(),
            run_open: false,
            bytes: 0,
            max_bytes,
            max_entries,
            budget: Arc::new(TailBudget { used: AtomicUsize::new(0), tails: AtomicUsize::new(1), max: usize::MAX }),
            unsettled: 0,
        }
    }

    /// Counts this tail against `budget` from now on (dropping its oldest entries if that is over).
    pub fn share(&mut self, budget: Arc<TailBudget>) {
        self.settle();
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        self.budget.tails.fetch_sub(1, Ordering::Relaxed);
        budget.used.fetch_add(self.bytes, Ordering::Relaxed);
        budget.tails.fetch_add(1, Ordering::Relaxed);
        self.budget = budget;
        self.settle();
    }

    /// Adds the entry after the current last one, evicting the oldest entries beyond this tail's
    /// limits. Call [`MemTail::settle`] after a run of pushes.
    #[inline]
    pub fn push(&mut self, e: Entry) {
        if self.max_entries == 0 {
            return;
        }
        let c = cost(&e);
        self.bytes += c;
        self.unsettled += c as isize;
        let len = e.payload.len();
        match self.runs.back_mut().filter(|_| self.run_open) {
            Some(run) => {
                run.last = e.seq;
                run.pinned += len;
                run.held += len;
            }
            None => {
                let payloads = Payloads::MayShare; // Until `end_run` says otherwise.
                self.runs.push_back(Run { first: e.seq, last: e.seq, payloads, pinned: len, held: len });
                self.run_open = true;
            }
        }
        self.entries.push_back(e);
        let mut evicted = false;
        while self.entries.len() > self.max_entries || (self.bytes > self.max_bytes && !self.entries.is_empty()) {
            if let Some(old) = self.pop_front() {
                self.bytes -= cost(&old);
                self.unsettled -= cost(&old) as isize;
                evicted = true;
            }
        }
        // Not the run being pushed: its later entries are slices of the same buffer, which
        // compacting now would not free (and its accounts would forget).
        if evicted && !self.front_run_open() {
            self.compact_front();
        }
    }

    /// The oldest run is the one still being pushed to.
    fn front_run_open(&self) -> bool {
        self.run_open && self.runs.len() == 1
    }

    /// Ends the run of pushes of one write, whose payloads are as `payloads` says: the next push
    /// starts a new [`Run`].
    pub fn end_run(&mut self, payloads: Payloads) {
        if let Some(run) = self.runs.back_mut().filter(|_| self.run_open) {
            run.payloads = payloads;
        }
        if self.front_run_open() {
            // Its oldest entries may have been evicted by its own later ones.
            self.compact_front();
        }
        self.run_open = false;
    }

    /// Removes the oldest entry, keeping the runs' accounts.
    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.entries.pop_front()?;
        if let Some(run) = self.runs.front_mut() {
            run.held -= e.payload.len();
            run.first = e.seq.next();
            if run.first > run.last {
                self.runs.pop_front();
                self.run_open &= !self.runs.is_empty();
            }
        }
        Some(e)
    }

    /// Removes the newest entry, keeping the runs' accounts.
    fn pop_back(&mut self) -> Option<Entry> {
        let e = self.entries.pop_back()?;
        if let Some(run) = self.runs.back_mut() {
            run.held -= e.payload.len();
            if run.last == run.first {
                self.runs.pop_back();
                self.run_open = false;
            } else {
                run.last = Seq(e.seq.0 - 1);
            }
        }
        Some(e)
    }

    /// Gives the entries of the oldest run a buffer of their own if they hold less than a quarter
    /// of what the run pinned (see [`Run`]).
    fn compact_front(&mut self) {
        if let Some(run) = self.runs.front().copied() {
            self.compact(run, 0);
        }
    }

    /// Same for the newest run (after a cut at the back).
    fn compact_back(&mut self) {
        if let Some(run) = self.runs.back().copied() {
            let at = self.runs.len() - 1;
            self.compact(run, at);
        }
    }

    fn compact(&mut self, run: Run, at: usize) {
        if run.payloads == Payloads::Own || run.held.saturating_mul(4) >= run.pinned {
            return;
        }
        let Some(first) = self.first_seq() else { return };
        let (Some(start), Some(end)) = (run.first.0.checked_sub(first.0), run.last.0.checked_sub(first.0)) else {
            return;
        };
        let (start, end) = (start as usize, (end as usize + 1).min(self.entries.len()));
        if start >= end {
            return;
        }
        let mut buf = bytes::BytesMut::with_capacity(run.held);
        for e in self.entries.range(start..end) {
            buf.extend_from_slice(&e.payload);
        }
        let mut buf = buf.freeze();
        for e in self.entries.range_mut(start..end) {
            e.payload = buf.split_to(e.payload.len());
        }
        if let Some(r) = self.runs.get_mut(at) {
            r.pinned = r.held;
        }
    }

    /// [`MemTail::settle`] once this tail's unsettled change reaches [`SETTLE_EVERY_BYTES`]: writers
    /// of many spaces then rarely touch the shared counter, and the store holds at most its budget
    /// plus that much per space.
    #[inline]
    pub fn settle_if_due(&mut self) {
        if self.unsettled.unsigned_abs() >= SETTLE_EVERY_BYTES {
            self.settle();
        }
    }

    /// Applies the pushes since the last call to the store's budget; if the store is over it, drops
    /// this tail's oldest entries until it is not, or down to the tail's floor (see [`TailBudget`]).
    pub fn settle(&mut self) {
        let delta = std::mem::take(&mut self.unsettled);
        if delta >= 0 {
            self.budget.used.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            self.budget.used.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        let (mut excess, floor) = self.budget.excess_and_floor();
        let mut freed = 0;
        while excess > 0 && self.bytes > floor {
            let Some(old) = self.pop_front() else { break };
            let c = cost(&old);
            self.bytes -= c;
            freed += c;
            excess = excess.saturating_sub(c);
        }
        self.budget.used.fetch_sub(freed, Ordering::Relaxed);
        if freed > 0 {
            self.compact_front();
            self.shrink_if_sparse();
        }
    }

    /// Gives back most of the ring's memory once the tail holds far fewer entries than it has
    /// room for (after the budget or retention dropped many): the slots are memory the budget
    /// does not count.
    fn shrink_if_sparse(&mut self) {
        const MIN_CAPACITY: usize = 64;
        let (len, capacity) = (self.entries.len(), self.entries.capacity());
        if capacity > MIN_CAPACITY && len < capacity / 4 {
            self.entries.shrink_to((len * 2).max(MIN_CAPACITY));
        }
    }

    /// Removes `c` bytes from this tail's count and from the budget (entries dropped outside a push).
    fn release(&mut self, c: usize) {
        self.bytes -= c;
        self.budget.used.fetch_sub(c, Ordering::Relaxed);
    }

    /// Sequence of the oldest entry held.
    pub fn first_seq(&self) -> Option<Seq> {
        self.entries.front().map(|e| e.seq)
    }

    /// The entry at `seq`, if held.
    pub fn get(&self, seq: Seq) -> Option<&Entry> {
        let first = self.first_seq()?;
        let i = seq.0.checked_sub(first.0)?;
        self.entries.get(usize::try_from(i).ok()?)
    }

    /// Entries from `from` on (at least one if any, then up to `max_entries` and `max_bytes` of payload),
    /// or `None` if `from` is older than the tail.
    pub fn read(&self, from: Seq, max_entries: usize, max_bytes: usize) -> Option<Vec<Entry>> {
        let first = self.first_seq()?;
        let skip = usize::try_from(from.0.checked_sub(first.0)?).ok()?;
        let mut out = Vec::with_capacity(max_entries.min(self.entries.len().saturating_sub(skip)));
        let mut bytes = 0usize;
        for e in self.entries.iter().skip(skip) {
            if out.len() >= max_entries || (!out.is_empty() && bytes + e.payload.len() > max_bytes) {
                break;
            }
            bytes += e.payload.len();
            out.push(e.clone());
        }
        Some(out)
    }

    /// Copies the held payloads into one buffer of their own. Recovery slices payloads out of its
    /// read buffers (up to 4 MiB each): kept as they are, a tail of a few small entries would keep
    /// a whole read buffer alive, far past its budget.
    pub fn own_payloads(&mut self) {
        let total = self.entries.iter().map(|e| e.payload.len()).sum();
        let mut buf = bytes::BytesMut::with_capacity(total);
        for e in &self.entries {
            buf.extend_from_slice(&e.payload);
        }
        let mut buf = buf.freeze();
        for e in self.entries.iter_mut() {
            e.payload = buf.split_to(e.payload.len());
        }
        for run in &mut self.runs {
            run.pinned = run.held;
        }
    }

    /// Drops entries after `seq` (a suffix truncation).
    pub fn truncate_after(&mut self, seq: Seq) {
        self.settle();
        while self.entries.back().is_some_and(|e| e.seq > seq) {
            if let Some(e) = self.pop_back() {
                self.release(cost(&e));
            }
        }
        self.compact_back();
        self.shrink_if_sparse();
    }

    /// Drops entries before `seq` (retention).
    pub fn drop_before(&mut self, seq: Seq) {
        self.settle();
        while self.entries.front().is_some_and(|e| e.seq < seq) {
            if let Some(e) = self.pop_front() {
                self.release(cost(&e));
            }
        }
        self.compact_front();
        self.shrink_if_sparse();
    }

    /// Number of entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

impl Drop for MemTail {
    fn drop(&mut self) {
        // What the budget counts for this tail: its bytes but for the changes not yet settled.
        let counted = self.bytes as isize - self.unsettled;
        self.budget.used.fetch_sub(counted.max(0) as usize, Ordering::Relaxed);
        self.budget.tails.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::Epoch;

    fn e(seq: u64, len: usize) -> Entry {
        Entry::new(Seq(seq), Epoch(1), 0, 0, Bytes::from(vec![7u8; len]))
    }

    #[test]
    fn owned_payloads_let_the_read_buffer_go() {
        // As recovery leaves them: small payloads sliced out of one large read buffer.
        let mut read_buffer = Bytes::from(vec![0u8; 1 << 20]);
        let mut t = MemTail::new(1 << 20, 100);
        for seq in 1..=3 {
            let payload = read_buffer.slice(seq as usize * 100..seq as usize * 100 + 10);
            t.push(Entry::new(Seq(seq), Epoch(1), 0, 0, payload));
        }
        let before: Vec<Bytes> = t.entries.iter().map(|e| Bytes::copy_from_slice(&e.payload)).collect();
        t.own_payloads();
        assert!(read_buffer.is_unique(), "the tail still holds slices of the read buffer");
        let after: Vec<Bytes> = t.entries.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(before, after);
        // All in one buffer of exactly their size: one allocation, not one per entry.
        assert!(after.windows(2).all(|w| w[0].as_ptr().wrapping_add(w[0].len()) == w[1].as_ptr()));
        read_buffer.truncate(0);
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let mut t = MemTail::new(1000, 3);
        for s in 1..=5 {
            t.push(e(s, 10));
        }
        assert_eq!((t.len(), t.first_seq()), (3, Some(Seq(3))));
        let mut t = MemTail::new(2 * (100 + RECORD_HEADER_LEN), 100);
        for s in 1..=5 {
            t.push(e(s, 100));
        }
        assert_eq!((t.len(), t.first_seq()), (2, Some(Seq(4))));
        // An entry larger than the whole budget is not kept at all.
        t.push(e(6, 10_000));
        assert_eq!(t.len(), 0);
        let mut off = MemTail::new(1000, 0);
        off.push(e(1, 1));
        assert_eq!(off.first_seq(), None);
    }

    #[test]
    fn tails_of_a_store_share_one_budget() {
        let per = 100 + RECORD_HEADER_LEN;
        let budget = TailBudget::new(5 * per);
        let (mut a, mut b) = (MemTail::new(usize::MAX, 100), MemTail::new(usize::MAX, 100));
        a.share(budget.clone());
        b.share(budget.clone());
        for s in 1..=4 {
            a.push(e(s, 100));
        }
        a.settle();
        assert_eq!((a.len(), budget.used()), (4, 4 * per));
        // b goes over the store's budget: it drops its own oldest entries, not a's.
        for s in 1..=3 {
            b.push(e(s, 100));
        }
        b.settle();
        // ... down to its fair share: half the budget, 2.5 entries.
        assert_eq!((a.len(), b.len(), b.first_seq()), (4, 2, Some(Seq(2))));
        assert_eq!(budget.used(), 6 * per);
        // Past twice the budget, the settling tail keeps nothing.
        b.push(e(4, 10 * per));
        b.settle();
        assert_eq!((b.len(), budget.used()), (0, 4 * per));
        // Truncation, retention and dropping a tail give its bytes back.
        a.truncate_after(Seq(3));
        a.drop_before(Seq(2));
        assert_eq!((a.len(), budget.used()), (2, 2 * per));
        a.push(e(4, 100));
        drop(a);
        assert_eq!(budget.used(), 0, "unsettled pushes are not counted twice");
        // Moving a filled tail to a smaller budget trims it at once.
        let mut c = MemTail::new(usize::MAX, 100);
        (1..=4).for_each(|s| c.push(e(s, 100)));
        c.share(TailBudget::new(2 * per));
        assert_eq!((c.len(), c.first_seq()), (2, Some(Seq(3))));
    }

    /// A frame of 100 entries of 1,000 bytes, as a replica receives it: one buffer.
    struct Frame(Bytes);

    impl Frame {
        fn new() -> Frame {
            Frame(Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>()))
        }

        /// Entry `i`'s payload (from 1): a slice of the frame.
        fn entry(&self, i: u64) -> Bytes {
            self.0.slice((i as usize - 1) * 1000..i as usize * 1000)
        }

        /// Whether `b` lies in the frame's buffer (so keeps it alive).
        fn holds(&self, b: &Bytes) -> bool {
            (self.0.as_ptr() as usize..self.0.as_ptr() as usize + self.0.len()).contains(&(b.as_ptr() as usize))
        }
    }

    /// A replica's entries are slices of the frame they came in: once the tail holds only a few
    /// of a frame's entries, they get a buffer of their own and the frame can go. (A replica with
    /// a 4 MiB tail budget held 53 MiB of frames after catching up 1,000 spaces.)
    #[test]
    fn entries_left_of_a_shared_buffer_get_their_own() {
        let frame = Frame::new();
        let (inside, slice) = (|b: &Bytes| frame.holds(b), |i: u64| frame.entry(i));
        let mut t = MemTail::new(usize::MAX, 1000);
        for s in 1..=100 {
            t.push(Entry::new(Seq(s), Epoch(1), 0, 0, slice(s)));
        }
        t.end_run(Payloads::MayShare);
        // Half the run left: still the frame's slices (copying would cost more than it frees).
        t.drop_before(Seq(51));
        assert!(t.entries.iter().all(|e| inside(&e.payload)));
        // A tenth left: copied out, same bytes.
        t.drop_before(Seq(91));
        assert_eq!(t.len(), 10);
        assert!(t.entries.iter().all(|e| !inside(&e.payload) && e.payload == slice(e.seq.0)));

        // A writer's own payloads are never copied: that would free nothing.
        let mut own = MemTail::new(usize::MAX, 1000);
        (1..=100).for_each(|s| own.push(Entry::new(Seq(s), Epoch(1), 0, 0, slice(s))));
        own.end_run(Payloads::Own);
        own.drop_before(Seq(91));
        assert!(own.entries.iter().all(|e| inside(&e.payload)));

        // The same at the back, after a cut; a later run is left alone.
        let mut t = MemTail::new(usize::MAX, 1000);
        (1..=100).for_each(|s| t.push(Entry::new(Seq(s), Epoch(1), 0, 0, slice(s))));
        t.end_run(Payloads::MayShare);
        t.push(Entry::new(Seq(101), Epoch(1), 0, 0, Bytes::from_static(b"own")));
        t.end_run(Payloads::MayShare);
        t.truncate_after(Seq(100));
        t.truncate_after(Seq(5));
        assert!(t.entries.iter().all(|e| !inside(&e.payload) && e.payload == slice(e.seq.0)));

        // And when the store's budget cuts the tail down.
        let budget = TailBudget::new(10 * (1000 + RECORD_HEADER_LEN));
        let mut t = MemTail::new(usize::MAX, 1000);
        t.share(budget);
        (1..=100).for_each(|s| t.push(Entry::new(Seq(s), Epoch(1), 0, 0, slice(s))));
        t.end_run(Payloads::MayShare);
        t.settle();
        assert_eq!(t.len(), 10);
        assert!(t.entries.iter().all(|e| !inside(&e.payload) && e.payload == slice(e.seq.0)));
    }

    /// A tail whose own limit is smaller than one write (one replica frame) evicts during the
    /// write: what is left of it is compacted when the write ends, not while its later entries,
    /// slices of the same frame, are still coming (that freed nothing, and the run's accounts
    /// then forgot the frame: every entry left pinned it).
    #[test]
    fn entries_left_of_a_frame_larger_than_the_tail_get_their_own() {
        let frame = Frame::new();
        let (inside, slice) = (|b: &Bytes| frame.holds(b), |i: u64| frame.entry(i));
        // Room for 10 of the frame's 100 entries.
        let mut t = MemTail::new(10 * (1000 + RECORD_HEADER_LEN), 1000);
        for s in 1..=100 {
            t.push(Entry::new(Seq(s), Epoch(1), 0, 0, slice(s)));
        }
        t.end_run(Payloads::MayShare);
        assert_eq!(t.len(), 10);
        let pinning = t.entries.iter().filter(|e| inside(&e.payload)).count();
        assert_eq!(pinning, 0, "{pinning} of the 10 entries left still pin the whole 100 KB frame");
    }

    /// Random pushes (in runs), evictions, budget cuts, truncations and retention keep
    /// the runs an exact partition of the entries, and `held` their payload bytes.
    #[test]
    fn runs_stay_consistent_with_entries() {
        fn check(t: &MemTail) {
            let mut i = 0usize;
            for r in &t.runs {
                let (mut held, mut seq) = (0usize, r.first);
                assert!(r.first <= r.last);
                while seq <= r.last {
                    let e = &t.entries[i];
                    assert_eq!(e.seq, seq);
                    held += e.payload.len();
                    i += 1;
                    seq = seq.next();
                }
                assert_eq!(held, r.held);
            }
            assert_eq!(i, t.entries.len());
            assert!(!t.run_open || !t.runs.is_empty());
        }
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..200 {
            let budget = TailBudget::new(200 + rnd(3000) as usize);
            let mut t = MemTail::new(100 + rnd(2000) as usize, 1 + rnd(40) as usize);
            t.share(budget);
            let mut last = 0u64;
            for _ in 0..300 {
                match rnd(10) {
                    0..=5 => {
                        for _ in 0..1 + rnd(8) {
                            last += 1;
                            t.push(e(last, rnd(300) as usize));
                            check(&t);
                        }
                        t.end_run(Payloads::MayShare);
                        t.settle_if_due();
                    }
                    6 => t.settle(),
                    7 => {
                        let to = last.saturating_sub(rnd(6));
                        t.truncate_after(Seq(to));
                        last = to;
                    }
                    8 => {
                        let first = t.first_seq().map_or(last + 1, |s| s.0);
                        t.drop_before(Seq(first + rnd(4)));
                    }
                    _ => t.own_payloads(),
                }
                check(&t);
                assert!(t.entries.back().is_none_or(|e| e.seq == Seq(last)), "round {round}");
            }
        }
    }

    /// The ring's slots are memory the byte budget does not see: a new tail holds none, and a
    /// tail the budget cut down gives most of them back. (Every tail of a store with 1,000 spaces
    /// used to hold a 4,096-slot ring, 256 KiB, whatever its budget.)
    #[test]
    fn the_ring_grows_with_use_and_shrinks_when_the_budget_cuts_it() {
        let t = MemTail::new(usize::MAX, 4096);
        assert_eq!(t.entries.capacity(), 0);
        let per = 10 + RECORD_HEADER_LEN;
        let budget = TailBudget::new(3000 * per);
        let mut busy = MemTail::new(usize::MAX, 4096);
        busy.share(budget.clone());
        for s in 1..=3000 {
            busy.push(e(s, 10));
        }
        busy.settle();
        assert!(busy.entries.capacity() >= 3000);
        // A thousand more tails take their share: the busy one is cut to about 3 entries.
        let mut others: Vec<MemTail> = (0..1000).map(|_| MemTail::new(usize::MAX, 4096)).collect();
        for (i, t) in others.iter_mut().enumerate() {
            t.share(budget.clone());
            for s in 1..=4 {
                t.push(e(s + i as u64, 10));
            }
            t.settle();
        }
        busy.push(e(3001, 10));
        busy.settle();
        assert!(busy.len() <= 4, "{}", busy.len());
        assert!(busy.entries.capacity() <= 64, "{} slots kept for {} entries", busy.entries.capacity(), busy.len());
        assert!(others.iter().all(|t| t.entries.capacity() <= 8), "small tails hold small rings");
    }

    #[test]
    fn a_busy_tail_keeps_its_fair_share_when_idle_ones_hold_the_budget() {
        let per = 100 + RECORD_HEADER_LEN;
        let budget = TailBudget::new(8 * per);
        let mut idle: Vec<MemTail> = (0..3).map(|_| MemTail::new(usize::MAX, 100)).collect();
        for t in &mut idle {
            t.share(budget.clone());
        }
        for s in 1..=8 {
            idle[0].push(e(s, 100));
        }
        idle[0].settle();
        let mut busy = MemTail::new(usize::MAX, 1000);
        busy.share(budget.clone());
        for s in 1..=500 {
            busy.push(e(s, 100));
            busy.settle_if_due();
        }
        busy.settle();
        // 4 tails share 8 entries' worth: the busy one keeps 2 (its newest), the idle one its 8.
        assert_eq!((busy.len(), busy.first_seq()), (2, Some(Seq(499))));
        assert_eq!(idle[0].len(), 8);
        assert!(budget.used() <= 2 * 8 * per);
        drop(idle);
        drop(busy);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.tails.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reads_and_truncates() {
        let mut t = MemTail::new(usize::MAX, 100);
        for s in 1..=10 {
            t.push(e(s, 10));
        }
        assert!(t.read(Seq(0), 10, 100).is_none());
        let r = t.read(Seq(3), 4, usize::MAX).unwrap();
        assert_eq!(r.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        assert_eq!(t.read(Seq(3), 100, 25).unwrap().len(), 2);
        assert_eq!(t.read(Seq(3), 100, 1).unwrap().len(), 1, "at least one entry whatever max_bytes");
        assert_eq!(t.read(Seq(11), 100, 100).unwrap().len(), 0);
        assert_eq!(t.get(Seq(4)).map(|e| e.seq), Some(Seq(4)));
        t.truncate_after(Seq(7));
        t.drop_before(Seq(3));
        assert_eq!((t.len(), t.first_seq()), (5, Some(Seq(3))));
        assert!(t.get(Seq(8)).is_none());
        t.truncate_after(Seq(0));
        assert_eq!(t.len(), 0);
    }
}
