//! Which of a space's data streams a replica takes as the current one.
//!
//! A primary opens a space's streams one at a time on a connection (a catch-up resets the current
//! one before it opens the next), and QUIC numbers them in the order they were opened; but their
//! first bytes can arrive in another order when packets are lost and resent. A stream whose
//! header comes in after a later-opened one's of the same connection was given up by the
//! primary: taking it over would stop the live one. Across connections (a reconnect, or a primary
//! and a replica that both dial), the last stream to arrive takes over: which connection the
//! primary keeps is not told by the order of arrival.

/// A stream: (the replica's session that received it, its QUIC stream index).
pub type StreamKey = (u64, u64);

/// Sessions whose highest stream is remembered: older ones' connections are long gone.
const SESSIONS_KEPT: usize = 4;

/// The current stream of one space, and the latest-opened stream seen on each recent session.
#[derive(Debug, Default)]
pub struct StreamOrder {
    current: Option<StreamKey>,
    highest: Vec<(u64, u64)>,
}

impl StreamOrder {
    /// Makes `stream` the current one, unless a later-opened stream of its session was seen
    /// already (the primary gave this one up): then false, and nothing changes.
    pub fn take_over(&mut self, stream: StreamKey) -> bool {
        let (session, index) = stream;
        match self.highest.iter_mut().find(|(s, _)| *s == session) {
            Some((_, highest)) if *highest > index => return false,
            Some((_, highest)) => *highest = index,
            None => {
                if self.highest.len() == SESSIONS_KEPT {
                    if let Some(oldest) = (0..self.highest.len()).min_by_key(|&i| self.highest[i].0) {
                        self.highest.swap_remove(oldest);
                    }
                }
                self.highest.push((session, index));
            }
        }
        self.current = Some(stream);
        true
    }

    /// Whether `stream` is still the current one (a task reading an older one stops).
    pub fn is_current(&self, stream: StreamKey) -> bool {
        self.current == Some(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_header_of_an_earlier_stream_of_the_same_session_is_refused() {
        let mut o = StreamOrder::default();
        assert!(o.take_over((1, 2)));
        assert!(!o.take_over((1, 0)), "opened before the current one");
        assert!(o.is_current((1, 2)));
        assert!(o.take_over((1, 6)));
        assert!(!o.is_current((1, 2)), "the task of the replaced stream stops");
    }

    #[test]
    fn across_sessions_the_last_to_arrive_takes_over_yet_each_session_keeps_its_order() {
        let mut o = StreamOrder::default();
        assert!(o.take_over((2, 5)));
        // Another connection's stream (an overlap of two connections, or a reconnect).
        assert!(o.take_over((1, 3)));
        assert!(o.is_current((1, 3)));
        // A late header of a stream session 2 had already replaced: still given up.
        assert!(!o.take_over((2, 2)));
        assert!(o.is_current((1, 3)));
        // Session 2's next stream takes over again.
        assert!(o.take_over((2, 9)));
        assert!(o.is_current((2, 9)));
    }

    #[test]
    fn only_recent_sessions_are_remembered() {
        let mut o = StreamOrder::default();
        for session in 1..=10 {
            assert!(o.take_over((session, 7)));
        }
        assert!(o.highest.len() <= SESSIONS_KEPT);
        assert!(!o.take_over((10, 1)), "a recent session is remembered");
        assert!(o.take_over((1, 1)), "an old session's connection is gone: nothing to compare with");
    }
}
