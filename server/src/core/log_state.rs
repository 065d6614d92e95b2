//! The replicated state of the log, built by applying committed entries in order: which
//! entries are records a reader may see and the producers' last sequences (deduplication).
//! Every node applies the same entries and so reaches the same state; after a restart the node
//! rebuilds it by applying its log again from its start. (Addresses and membership have their
//! one home in `members.rs`; this state only reports an applied address.)
//!
//! Batches: the records of one append take consecutive indexes and are applied as one. A batch
//! whose records do not all reach the log (a leader change cut it short: another entry took the
//! place of a later record) is broken: its records are never served. Until a batch is complete,
//! readers see the log only up to the entry before it (`readable`).
//!
//! Whether an entry is served depends only on the entries around it in the log, never on
//! history a trim removed, so a node that restarts from a trimmed log (or restarts its log at
//! a leader's start) serves exactly what the others serve. Trims never cut a batch
//! (`batch_head`). Deduplication is the leader's: it answers a repeated producer sequence from
//! this table (built from the log) and only then proposes; the rule is written once, on
//! [`LogState::producer_check`].

use std::sync::Arc;

use std::collections::BTreeMap;

use bytes::Bytes;
use raftwal_consensus::{EntryKind, LogIndex};

#[cfg(test)]
use raftwal_client::dedup::PRODUCER_SEQUENCES_MAX;
use raftwal_client::dedup::{self, ProducerWindow, SequenceCheck};

use crate::envelope::{self, Addresses, Payload, ProducerSeq};

/// What readers need of the state to serve records: the first index they may ask for and the
/// record entries never served. Published by the shell whenever it changes (rarely: a broken
/// batch, a trim, a log restart), so readers never wait on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadView {
    /// The first index readers may ask for.
    pub start: LogIndex,
    /// Ranges (first -> last, inclusive) of record entries never served.
    pub hidden: Arc<BTreeMap<LogIndex, LogIndex>>,
}

impl ReadView {
    /// Whether the record entry at `index` must not be served.
    pub fn is_hidden(&self, index: LogIndex) -> bool {
        self.hidden.range(..=index).next_back().is_some_and(|(_, &last)| last >= index)
    }
}

/// What applying one entry settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing a caller waits for (an internal entry, or a record inside an open batch).
    Nothing,
    /// The batch `first..=last` is in the log.
    Batch { first: LogIndex, last: LogIndex },
    /// The batch starting at `first` was cut short by a leader change; it is not served.
    Broken { first: LogIndex },
    /// A node's addresses.
    Address(Addresses),
    /// Discard the log below `before`.
    Trim { before: LogIndex },
    /// A command on named streams.
    Stream(super::streams::Command),
}

#[derive(Clone, Copy, Debug)]
struct OpenBatch {
    first: LogIndex,
    last: LogIndex,
    producer: Option<ProducerSeq>,
}

/// The state machine of the log. See the module docs.
#[derive(Debug)]
pub struct LogState {
    /// The first index this state covers: entries below it were trimmed (or never held).
    start: LogIndex,
    applied: LogIndex,
    open: Option<OpenBatch>,
    /// Ranges (first -> last, inclusive) of record entries never served: broken batches,
    /// duplicates and malformed entries. Rare; trimmed with the log.
    hidden: BTreeMap<LogIndex, LogIndex>,
    producers: BTreeMap<u64, ProducerWindow>,
    /// The producers by the last index they appended, to forget the least recent first.
    producers_by_last: BTreeMap<LogIndex, u64>,
    producers_max: usize,
    /// Whether `start` or `hidden` changed since the last [`LogState::take_view`].
    view_changed: bool,
}

impl LogState {
    /// An empty state for a log whose entries before `start` are gone (or never existed).
    pub fn new(applied: LogIndex, producers_max: usize) -> LogState {
        LogState {
            start: applied.next(),
            applied,
            open: None,
            hidden: BTreeMap::new(),
            producers: BTreeMap::new(),
            producers_by_last: BTreeMap::new(),
            producers_max: producers_max.max(1),
            view_changed: true,
        }
    }

    /// Starts over after the log restarted at `applied + 1`: what the trimmed entries said is
    /// gone.
    pub fn restart(&mut self, applied: LogIndex) {
        *self = LogState::new(applied, self.producers_max);
    }

    /// The readers' view, if it changed since it was last taken.
    pub fn take_view(&mut self) -> Option<ReadView> {
        if !std::mem::take(&mut self.view_changed) {
            return None;
        }
        Some(ReadView { start: self.start, hidden: Arc::new(self.hidden.clone()) })
    }

    /// The last applied index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Every entry up to here is settled: served as a record, or known never to be one.
    pub fn readable(&self) -> LogIndex {
        match self.open {
            Some(open) => open.first.prev(),
            None => self.applied,
        }
    }

    /// Whether the record entry at `index` (at or below `readable`) must not be served.
    #[cfg(test)]
    fn is_hidden(&self, index: LogIndex) -> bool {
        self.hidden.range(..=index).next_back().is_some_and(|(_, &last)| last >= index)
    }

    /// What a producer's sequence is, by the producer rule (`raftwal_client::dedup`, its one
    /// home), against what this log applied.
    pub fn producer_check(&self, p: ProducerSeq) -> SequenceCheck {
        dedup::check(self.producers.get(&p.id), p.sequence)
    }

    /// Forgets hidden ranges below `before` (the log below it is gone). Trims never cut a
    /// batch, so no hidden range straddles `before`.
    pub fn trimmed(&mut self, before: LogIndex) {
        self.hidden = self.hidden.split_off(&before);
        self.start = self.start.max(before);
        self.view_changed = true;
    }

    /// The first index readers may ask for (they are told it when they ask below it).
    pub fn start(&self) -> LogIndex {
        self.start
    }

    /// Applies the entry at `index`, the one after `applied`.
    pub fn apply(&mut self, index: LogIndex, kind: EntryKind, data: &Bytes) -> Applied {
        assert_eq!(index, self.applied.next(), "entries are applied in order");
        self.applied = index;
        let payload = match kind {
            EntryKind::Normal => envelope::decode(data),
            EntryKind::Noop | EntryKind::ConfChange => {
                return self.break_open(index).unwrap_or(Applied::Nothing);
            }
        };
        match payload {
            Ok(Payload::Record(_)) => match self.open {
                Some(open) if index <= open.last => {
                    if index == open.last {
                        self.open = None;
                        self.settle(open)
                    } else {
                        Applied::Nothing
                    }
                }
                _ => {
                    // A record outside any batch: a lone record, complete in itself.
                    let broken = self.break_open(index);
                    debug_assert!(broken.is_none(), "an open batch covers every later record");
                    Applied::Batch { first: index, last: index }
                }
            },
            Ok(Payload::BatchHead { producer, count, .. }) => {
                // A head inside an open batch means that batch was cut short; its own waiter
                // learns of it when this entry's index does not match its term (the driver).
                let _ = self.break_open(index);
                let open = OpenBatch {
                    first: index,
                    last: LogIndex(index.0 + u64::from(count) - 1),
                    producer,
                };
                if count == 1 {
                    self.settle(open)
                } else {
                    self.open = Some(open);
                    Applied::Nothing
                }
            }
            Ok(Payload::Address(a)) => {
                let _ = self.break_open(index);
                Applied::Address(a)
            }
            Ok(Payload::Trim { before }) => {
                let _ = self.break_open(index);
                Applied::Trim { before }
            }
            Ok(Payload::Stream(cmd)) => {
                let _ = self.break_open(index);
                Applied::Stream(cmd)
            }
            Err(e) => {
                // Checksums make this a bug in a node, not disk damage; never serve it.
                tracing::error!(%index, error = %e, "malformed entry in the committed log; hidden");
                let _ = self.break_open(index);
                self.hide(index, index);
                Applied::Nothing
            }
        }
    }

    /// Closes an open batch that `index` (not one of its records) cut short.
    fn break_open(&mut self, index: LogIndex) -> Option<Applied> {
        let open = self.open.take()?;
        self.hide(open.first, index.prev());
        Some(Applied::Broken { first: open.first })
    }

    /// A complete batch: served, and its producer sequence remembered when the producer rule
    /// says it is new. Whether a batch is served never depends on the producer table (which
    /// depends on history a trim or a log restart removed, and so differs between nodes); a
    /// repeat that reaches the log is the log's word. The leader keeps repeats out: it checks
    /// the rule before proposing (`NodeCore::append`).
    fn settle(&mut self, batch: OpenBatch) -> Applied {
        let Some(p) = batch.producer else {
            return Applied::Batch { first: batch.first, last: batch.last };
        };
        if self.producer_check(p) != SequenceCheck::New {
            return Applied::Batch { first: batch.first, last: batch.last };
        }
        let (first, last) = (batch.first.0, batch.last.0);
        match self.producers.get_mut(&p.id) {
            Some(w) => {
                let (_, _, latest_last) = w.latest();
                self.producers_by_last.remove(&LogIndex(latest_last));
                w.record(p.sequence, first, last);
            }
            None => {
                self.producers.insert(p.id, ProducerWindow::new(p.sequence, first, last));
            }
        }
        self.producers_by_last.insert(batch.last, p.id);
        while self.producers.len() > self.producers_max {
            let (_, oldest) = self.producers_by_last.pop_first().expect("one index per producer");
            self.producers.remove(&oldest);
        }
        Applied::Batch { first: batch.first, last: batch.last }
    }

    fn hide(&mut self, first: LogIndex, last: LogIndex) {
        if first <= last {
            self.hidden.insert(first, last);
            self.view_changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{encode_batch, encode_trim};

    fn recs(n: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(format!("r{i}"))).collect()
    }

    fn apply_all(s: &mut LogState, entries: &[Bytes]) -> Vec<Applied> {
        entries.iter().map(|e| s.apply(s.applied().next(), EntryKind::Normal, e)).collect()
    }

    #[test]
    fn a_batch_is_readable_only_once_complete() {
        let mut s = LogState::new(LogIndex(0), 16);
        let batch = encode_batch(&recs(3), None);
        assert_eq!(s.apply(LogIndex(1), EntryKind::Normal, &batch[0]), Applied::Nothing);
        assert_eq!(s.readable(), LogIndex(0));
        assert_eq!(s.apply(LogIndex(2), EntryKind::Normal, &batch[1]), Applied::Nothing);
        assert_eq!(
            s.apply(LogIndex(3), EntryKind::Normal, &batch[2]),
            Applied::Batch { first: LogIndex(1), last: LogIndex(3) }
        );
        assert_eq!(s.readable(), LogIndex(3));
        assert!(!(1..=3).any(|i| s.is_hidden(LogIndex(i))));
    }

    #[test]
    fn a_batch_cut_short_by_a_new_leader_is_hidden() {
        let mut s = LogState::new(LogIndex(0), 16);
        let batch = encode_batch(&recs(3), None);
        s.apply(LogIndex(1), EntryKind::Normal, &batch[0]);
        s.apply(LogIndex(2), EntryKind::Normal, &batch[1]);
        assert_eq!(
            s.apply(LogIndex(3), EntryKind::Noop, &Bytes::new()),
            Applied::Broken { first: LogIndex(1) }
        );
        assert!(s.is_hidden(LogIndex(1)) && s.is_hidden(LogIndex(2)) && !s.is_hidden(LogIndex(3)));
        assert_eq!(s.readable(), LogIndex(3));
        let lone = encode_batch(&recs(1), None);
        assert_eq!(
            apply_all(&mut s, &lone),
            vec![Applied::Batch { first: LogIndex(4), last: LogIndex(4) }]
        );
    }

    #[test]
    fn producer_sequences_map_to_their_offsets_and_repeats_change_nothing() {
        let mut s = LogState::new(LogIndex(0), 16);
        let p = ProducerSeq { id: 9, sequence: 1 };
        apply_all(&mut s, &encode_batch(&recs(2), Some(p)));
        assert_eq!(s.producer_check(p), SequenceCheck::Duplicate { first: 1, last: 2 });
        // A repeat that reached the log anyway is served (the log's word, the same on every
        // node); the original offsets stay.
        let again = apply_all(&mut s, &encode_batch(&recs(2), Some(p)));
        assert_eq!(again[1], Applied::Batch { first: LogIndex(3), last: LogIndex(4) });
        assert!(!s.is_hidden(LogIndex(3)));
        assert_eq!(s.producer_check(p), SequenceCheck::Duplicate { first: 1, last: 2 });
        // A sequence below the latest that was never applied is out of order.
        apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id: 9, sequence: 5 })));
        assert_eq!(
            s.producer_check(ProducerSeq { id: 9, sequence: 3 }),
            SequenceCheck::OutOfOrder { latest: 5 }
        );
        for sequence in 6..6 + PRODUCER_SEQUENCES_MAX as u64 {
            apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id: 9, sequence })));
        }
        assert_eq!(
            s.producer_check(p),
            SequenceCheck::Stale { oldest: 6 },
            "only the last sequences are remembered"
        );
    }

    #[test]
    fn the_least_recent_producer_is_forgotten_beyond_the_limit() {
        let mut s = LogState::new(LogIndex(0), 2);
        for id in 1..=3 {
            apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id, sequence: 1 })));
        }
        assert_eq!(s.producer_check(ProducerSeq { id: 1, sequence: 1 }), SequenceCheck::New);
        assert_eq!(
            s.producer_check(ProducerSeq { id: 3, sequence: 1 }),
            SequenceCheck::Duplicate { first: 3, last: 3 }
        );
    }

    #[test]
    fn trims_and_malformed_entries_are_not_records() {
        let mut s = LogState::new(LogIndex(10), 16);
        assert_eq!(
            s.apply(LogIndex(11), EntryKind::Normal, &encode_trim(LogIndex(5))),
            Applied::Trim { before: LogIndex(5) }
        );
        assert_eq!(
            s.apply(LogIndex(12), EntryKind::Normal, &Bytes::from_static(&[77])),
            Applied::Nothing
        );
        assert!(s.is_hidden(LogIndex(12)));
        s.trimmed(LogIndex(13));
        assert!(!s.is_hidden(LogIndex(12)));
    }
}
