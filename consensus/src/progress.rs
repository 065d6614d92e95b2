//! What the leader knows about each follower's log, and how much it may send it.

use std::collections::VecDeque;

use raftwal_types::LogIndex;

/// How the leader is replicating to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The leader does not know where the follower's log matches: it sends one append at a time
    /// and waits for the answer (or a heartbeat response) before sending the next.
    Probe,
    /// The follower is known to match: the leader streams appends, optimistically advancing
    /// `next`, up to the inflight window.
    Replicate,
    /// The follower needs entries the leader has compacted; it was told to restart its log at
    /// `pending + 1` and nothing else is sent until it answers or the send is reported failed.
    Snapshot {
        /// The index before the first index the follower was told to restart from.
        pending: LogIndex,
    },
}

/// The leader's view of one follower.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The highest index known durable on the follower and matching the leader's log.
    pub matched: LogIndex,
    /// The next index to send. Invariant: `matched < next`.
    pub next: LogIndex,
    /// The replication state.
    pub state: ProgressState,
    /// In Probe: an append was sent and no answer has come back yet.
    pub probe_sent: bool,
    /// Whether the follower has been heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Appends sent in Replicate state and not yet acknowledged.
    pub inflights: Inflights,
}

impl Progress {
    pub(crate) fn new(next: LogIndex, inflights: Inflights) -> Progress {
        Progress {
            matched: LogIndex(0),
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            recent_active: false,
            inflights,
        }
    }

    /// Whether the leader must hold back appends to this follower.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.is_full(),
            ProgressState::Snapshot { .. } => true,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        // Coming back from a log restart, the follower holds at least up to the restart point.
        let next = match self.state {
            ProgressState::Snapshot { pending } => pending.max(self.matched).next(),
            _ => self.matched.next(),
        };
        self.state = ProgressState::Probe;
        self.next = next;
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next = self.matched.next();
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub(crate) fn become_snapshot(&mut self, pending: LogIndex) {
        self.state = ProgressState::Snapshot { pending };
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Records an append of entries up to `last` (none when `last` is `None`) of `bytes` sent.
    pub(crate) fn sent_append(&mut self, last: Option<LogIndex>, bytes: u64) {
        match self.state {
            ProgressState::Replicate => {
                if let Some(last) = last {
                    self.next = last.next();
                    self.inflights.add(last, bytes);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot { .. } => {}
        }
    }

    /// The follower acknowledged `index`; returns whether that was news.
    pub(crate) fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = self.matched < index;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index.next());
        updated
    }

    /// The follower rejected an append after `rejected`; its log might match at `hint`. Returns
    /// false when the rejection is stale (answers an append already superseded).
    pub(crate) fn maybe_decrease_to(&mut self, rejected: LogIndex, hint: LogIndex) -> bool {
        if self.state == ProgressState::Replicate {
            // Replicate sends optimistically; a rejection at or below the match is old news.
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched.next();
            return true;
        }
        // In Probe only the most recent probe, at next - 1, matters.
        if self.next.prev() != rejected {
            return false;
        }
        if rejected <= self.matched {
            // The follower no longer holds what it acknowledged: damage cut its log when it
            // restarted (`Restored::repair_floor`), or this answers an older probe. Either way a
            // lower match is only less optimistic (the commit index never goes back), and the
            // next answer raises it again. (Until this rejection the leader may have counted
            // the follower for entries it lost; its repair floor keeps elections safe then.)
            self.matched = self.matched.min(hint);
        }
        self.next = rejected.min(hint.next()).max(self.matched.next());
        self.probe_sent = false;
        true
    }
}

/// The window of appends sent and not yet acknowledged, limited both by count and by bytes.
#[derive(Clone, Debug)]
pub struct Inflights {
    sent: VecDeque<(LogIndex, u64)>,
    bytes: u64,
    count_max: usize,
    bytes_max: u64,
}

impl Inflights {
    pub(crate) fn new(count_max: usize, bytes_max: u64) -> Inflights {
        Inflights { sent: VecDeque::new(), bytes: 0, count_max, bytes_max }
    }

    /// Whether no further append may be sent until some are acknowledged.
    pub fn is_full(&self) -> bool {
        self.sent.len() >= self.count_max || self.bytes >= self.bytes_max
    }

    /// Appends in flight.
    pub fn count(&self) -> usize {
        self.sent.len()
    }

    /// Entry bytes in flight.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn add(&mut self, last: LogIndex, bytes: u64) {
        debug_assert!(self.sent.back().is_none_or(|&(prev, _)| prev < last));
        self.sent.push_back((last, bytes));
        self.bytes += bytes;
    }

    /// Frees every append whose last index is at or below `index`.
    pub(crate) fn free_up_to(&mut self, index: LogIndex) {
        while let Some(&(last, bytes)) = self.sent.front() {
            if last > index {
                break;
            }
            self.bytes -= bytes;
            self.sent.pop_front();
        }
    }

    /// Frees the oldest append: a heartbeat answer proves the follower is alive even if an
    /// acknowledgement was lost, and this keeps a full window from stalling for good.
    pub(crate) fn free_first(&mut self) {
        if let Some((_, bytes)) = self.sent.pop_front() {
            self.bytes -= bytes;
        }
    }

    fn reset(&mut self) {
        self.sent.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limits_by_count_and_by_bytes() {
        let mut by_count = Inflights::new(2, 1 << 20);
        by_count.add(LogIndex(1), 10);
        assert!(!by_count.is_full());
        by_count.add(LogIndex(2), 10);
        assert!(by_count.is_full());
        by_count.free_up_to(LogIndex(1));
        assert!(!by_count.is_full());

        let mut by_bytes = Inflights::new(100, 100);
        by_bytes.add(LogIndex(5), 60);
        assert!(!by_bytes.is_full());
        by_bytes.add(LogIndex(9), 60);
        assert!(by_bytes.is_full());
        by_bytes.free_first();
        assert_eq!(by_bytes.bytes(), 60);
        assert!(!by_bytes.is_full());
    }

    #[test]
    fn probe_ignores_stale_rejections_and_uses_the_hint() {
        let mut pr = Progress::new(LogIndex(11), Inflights::new(4, 1024));
        pr.sent_append(Some(LogIndex(12)), 0);
        assert!(pr.is_paused());
        // A rejection of something other than the latest probe is stale.
        assert!(!pr.maybe_decrease_to(LogIndex(5), LogIndex(0)));
        assert!(pr.maybe_decrease_to(LogIndex(10), LogIndex(3)));
        assert_eq!(pr.next, LogIndex(4));
        assert!(!pr.is_paused());
    }

    #[test]
    fn replicate_ignores_rejections_below_match() {
        let mut pr = Progress::new(LogIndex(1), Inflights::new(4, 1024));
        pr.maybe_update(LogIndex(5));
        pr.become_replicate();
        pr.sent_append(Some(LogIndex(9)), 0);
        assert!(!pr.maybe_decrease_to(LogIndex(4), LogIndex(0)));
        assert_eq!(pr.next, LogIndex(10));
        assert!(pr.maybe_decrease_to(LogIndex(7), LogIndex(0)));
        assert_eq!(pr.next, LogIndex(6));
    }
}
