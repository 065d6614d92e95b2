//! The producer rule: how a raftwal node decides whether a producer's append is new, a repeat,
//! out of order or too old to tell. This is the one place it is written; the server's leader
//! applies it before proposing (counting the producer's appends still in flight as applied),
//! every node records applied sequences by it, and the client's test server uses the same code.
//!
//! For each producer the node remembers the last [`PRODUCER_SEQUENCES_MAX`] sequences it applied
//! and their offsets. Sequences apply only in increasing order (gaps allowed). A sequence:
//! - above the latest applied one is **new**;
//! - among the remembered ones is a **duplicate**: answered with its original offsets, never
//!   applied again;
//! - below the latest applied one, not remembered, but not older than the oldest remembered one
//!   is **out of order**: it was never applied, and applying it now would put it after a later
//!   sequence of its producer, so it is refused (its append is not in the log);
//! - older than the oldest remembered one is **stale**: whether it was applied is forgotten, so
//!   its outcome stays unknown.
//!
//! So an append of a producer is in the log at most once, and the appends of a producer that
//! are in the log are in sequence order.

use std::collections::VecDeque;

/// Applied sequences remembered per producer.
pub const PRODUCER_SEQUENCES_MAX: usize = 64;

/// What a producer's sequence is, by the rule above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Above the latest applied sequence: apply it.
    New,
    /// Applied before at these offsets (first, last).
    Duplicate {
        /// The original first offset.
        first: u64,
        /// The original last offset.
        last: u64,
    },
    /// Below the latest applied sequence and never applied: refused.
    OutOfOrder {
        /// The producer's latest applied sequence.
        latest: u64,
    },
    /// Older than every remembered sequence: its outcome is unknown.
    Stale {
        /// The oldest sequence remembered.
        oldest: u64,
    },
}

/// One producer's remembered sequences. Invariant: never empty; sequences strictly increase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerWindow {
    recent: VecDeque<(u64, u64, u64)>,
}

impl ProducerWindow {
    /// A producer whose first applied sequence is `sequence`, at offsets `first..=last`.
    pub fn new(sequence: u64, first: u64, last: u64) -> ProducerWindow {
        ProducerWindow { recent: VecDeque::from([(sequence, first, last)]) }
    }

    /// The latest applied sequence and its offsets.
    pub fn latest(&self) -> (u64, u64, u64) {
        *self.recent.back().expect("a window is never empty")
    }

    /// What `sequence` is.
    pub fn check(&self, sequence: u64) -> SequenceCheck {
        let (latest, _, _) = self.latest();
        if sequence > latest {
            return SequenceCheck::New;
        }
        if let Some(&(_, first, last)) = self.recent.iter().find(|(s, _, _)| *s == sequence) {
            return SequenceCheck::Duplicate { first, last };
        }
        let oldest = self.recent.front().expect("a window is never empty").0;
        if sequence < oldest {
            SequenceCheck::Stale { oldest }
        } else {
            SequenceCheck::OutOfOrder { latest }
        }
    }

    /// Records an applied sequence; `check` said it is new.
    pub fn record(&mut self, sequence: u64, first: u64, last: u64) {
        assert!(sequence > self.latest().0, "sequences apply in increasing order");
        self.recent.push_back((sequence, first, last));
        if self.recent.len() > PRODUCER_SEQUENCES_MAX {
            self.recent.pop_front();
        }
    }
}

/// What a producer's sequence is when the producer may have no window yet.
pub fn check(window: Option<&ProducerWindow>, sequence: u64) -> SequenceCheck {
    window.map_or(SequenceCheck::New, |w| w.check(sequence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_apply_once_and_in_order() {
        let mut w = ProducerWindow::new(5, 10, 11);
        assert_eq!(w.check(5), SequenceCheck::Duplicate { first: 10, last: 11 });
        assert_eq!(w.check(6), SequenceCheck::New);
        w.record(8, 12, 12);
        assert_eq!(w.check(6), SequenceCheck::OutOfOrder { latest: 8 }, "a gap below the latest");
        assert_eq!(w.check(4), SequenceCheck::Stale { oldest: 5 });
        for s in 9..9 + PRODUCER_SEQUENCES_MAX as u64 {
            w.record(s, 100 + s, 100 + s);
        }
        assert_eq!(w.check(8), SequenceCheck::Stale { oldest: 9 }, "only the last 64 are kept");
    }
}
