//! The replicated state of the log, built by applying committed entries in order: which
//! entries are records a reader may see, the producers' last sequences (deduplication), the
//! nodes' addresses and the trims. Every node applies the same entries and so reaches the same
//! state; after a restart the node rebuilds it by applying its log again from its start.
//!
//! Batches: the records of one append take consecutive indexes and are applied as one. A batch
//! whose records do not all reach the log (a leader change cut it short: another entry took the
//! place of a later record) is broken: its records are never served. A batch whose producer
//! sequence was already applied is a duplicate: it is never served either, and the append that
//! proposed it is answered with the original offsets. Until a batch is complete, readers see the
//! log only up to the entry before it (`readable`).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use raftwal_consensus::{EntryKind, LogIndex, NodeId};

use crate::envelope::{self, Addresses, Payload, ProducerSeq};

/// What applying one entry settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing a caller waits for (an internal entry, or a record inside an open batch).
    Nothing,
    /// The batch `first..=last` is in the log.
    Batch { first: LogIndex, last: LogIndex },
    /// The batch starting at `first` repeats an applied producer sequence; it is not served.
    /// `original` holds the first application's offsets when the sequence is among the
    /// producer's last [`PRODUCER_SEQUENCES_MAX`] (older ones are forgotten).
    Duplicate { first: LogIndex, original: Option<(LogIndex, LogIndex)> },
    /// The batch starting at `first` was cut short by a leader change; it is not served.
    Broken { first: LogIndex },
    /// A node's addresses.
    Address(Addresses),
    /// Discard the log below `before`.
    Trim { before: LogIndex },
}

#[derive(Clone, Copy, Debug)]
struct OpenBatch {
    first: LogIndex,
    last: LogIndex,
    producer: Option<ProducerSeq>,
}

/// Applied sequences remembered per producer, so that a pipelined producer that resends its
/// whole window after a failure gets the original offsets of every append that had committed.
pub const PRODUCER_SEQUENCES_MAX: usize = 256;

#[derive(Clone, Debug)]
struct ProducerState {
    /// The latest applied sequences and their offsets, oldest first; never empty.
    recent: VecDeque<(u64, LogIndex, LogIndex)>,
}

impl ProducerState {
    fn latest(&self) -> (u64, LogIndex, LogIndex) {
        *self.recent.back().expect("a producer has at least one sequence")
    }

    fn offsets(&self, sequence: u64) -> Option<(LogIndex, LogIndex)> {
        self.recent.iter().find(|(s, _, _)| *s == sequence).map(|&(_, f, l)| (f, l))
    }
}

/// The state machine of the log. See the module docs.
#[derive(Debug)]
pub struct LogState {
    applied: LogIndex,
    open: Option<OpenBatch>,
    /// Ranges (first -> last, inclusive) of record entries never served: broken batches,
    /// duplicates and malformed entries. Rare; trimmed with the log.
    hidden: BTreeMap<LogIndex, LogIndex>,
    producers: BTreeMap<u64, ProducerState>,
    /// The producers by the last index they appended, to forget the least recent first.
    producers_by_last: BTreeMap<LogIndex, u64>,
    producers_max: usize,
    addresses: BTreeMap<NodeId, Addresses>,
}

impl LogState {
    /// An empty state for a log whose entries before `start` are gone (or never existed).
    pub fn new(applied: LogIndex, producers_max: usize) -> LogState {
        LogState {
            applied,
            open: None,
            hidden: BTreeMap::new(),
            producers: BTreeMap::new(),
            producers_by_last: BTreeMap::new(),
            producers_max: producers_max.max(1),
            addresses: BTreeMap::new(),
        }
    }

    /// Starts over after the log restarted at `applied + 1`: what the trimmed entries said is
    /// gone, except the node addresses, which the log-start record keeps.
    pub fn restart(&mut self, applied: LogIndex) {
        let addresses = std::mem::take(&mut self.addresses);
        *self = LogState::new(applied, self.producers_max);
        self.addresses = addresses;
    }

    /// Adds addresses kept with the log start (at startup, before applying anything).
    pub fn restore_addresses(&mut self, addresses: impl IntoIterator<Item = Addresses>) {
        for a in addresses {
            self.addresses.insert(a.id, a);
        }
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
    pub fn is_hidden(&self, index: LogIndex) -> bool {
        self.hidden.range(..=index).next_back().is_some_and(|(_, &last)| last >= index)
    }

    /// The addresses replicated so far.
    pub fn addresses(&self) -> &BTreeMap<NodeId, Addresses> {
        &self.addresses
    }

    /// The offsets of an applied producer sequence, if it is still remembered.
    pub fn producer_offsets(&self, p: ProducerSeq) -> Option<(LogIndex, LogIndex)> {
        self.producers.get(&p.id)?.offsets(p.sequence)
    }

    /// Forgets hidden ranges below `before` (the log below it is gone).
    pub fn trimmed(&mut self, before: LogIndex) {
        self.hidden = self.hidden.split_off(&before);
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
                self.addresses.insert(a.id, a.clone());
                Applied::Address(a)
            }
            Ok(Payload::Trim { before }) => {
                let _ = self.break_open(index);
                Applied::Trim { before }
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

    fn settle(&mut self, batch: OpenBatch) -> Applied {
        let Some(p) = batch.producer else {
            return Applied::Batch { first: batch.first, last: batch.last };
        };
        match self.producers.get_mut(&p.id) {
            Some(s) => {
                let (latest, _, latest_last) = s.latest();
                if p.sequence <= latest {
                    let original = s.offsets(p.sequence);
                    self.hide(batch.first, batch.last);
                    return Applied::Duplicate { first: batch.first, original };
                }
                s.recent.push_back((p.sequence, batch.first, batch.last));
                if s.recent.len() > PRODUCER_SEQUENCES_MAX {
                    s.recent.pop_front();
                }
                self.producers_by_last.remove(&latest_last);
            }
            None => {
                let recent = VecDeque::from([(p.sequence, batch.first, batch.last)]);
                self.producers.insert(p.id, ProducerState { recent });
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
    fn a_repeated_producer_sequence_is_a_hidden_duplicate_with_the_original_offsets() {
        let mut s = LogState::new(LogIndex(0), 16);
        let p = Some(ProducerSeq { id: 9, sequence: 1 });
        apply_all(&mut s, &encode_batch(&recs(2), p));
        let again = apply_all(&mut s, &encode_batch(&recs(2), p));
        assert_eq!(
            again[1],
            Applied::Duplicate { first: LogIndex(3), original: Some((LogIndex(1), LogIndex(2))) }
        );
        assert!(s.is_hidden(LogIndex(3)) && s.is_hidden(LogIndex(4)));
        let next =
            apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id: 9, sequence: 2 })));
        assert_eq!(next[0], Applied::Batch { first: LogIndex(5), last: LogIndex(5) });
        let old = apply_all(&mut s, &encode_batch(&recs(1), p));
        assert_eq!(
            old[0],
            Applied::Duplicate { first: LogIndex(6), original: Some((LogIndex(1), LogIndex(2))) }
        );
        for sequence in 3..3 + PRODUCER_SEQUENCES_MAX as u64 {
            apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id: 9, sequence })));
        }
        let next = s.applied().next();
        let forgotten = apply_all(&mut s, &encode_batch(&recs(1), p));
        assert_eq!(forgotten[0], Applied::Duplicate { first: next, original: None });
    }

    #[test]
    fn the_least_recent_producer_is_forgotten_beyond_the_limit() {
        let mut s = LogState::new(LogIndex(0), 2);
        for id in 1..=3 {
            apply_all(&mut s, &encode_batch(&recs(1), Some(ProducerSeq { id, sequence: 1 })));
        }
        assert_eq!(s.producer_offsets(ProducerSeq { id: 1, sequence: 1 }), None);
        assert_eq!(
            s.producer_offsets(ProducerSeq { id: 3, sequence: 1 }),
            Some((LogIndex(3), LogIndex(3)))
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
