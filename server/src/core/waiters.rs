//! The waiters of every request the core accepted: appends by their first index (with the
//! retries of the same producer sequence that joined them), membership changes, trims, a
//! membership change queued behind its addresses entry, and read barriers. Each waiter keeps
//! the term it was proposed in: an entry of another term at its index means it was replaced.
//! Bounded by the requests the shell lets in (its in-flight limits) and by `READ_WAITERS_MAX`.

use std::collections::{BTreeMap, HashMap};

use raftwal_consensus::{ConfChange, LogIndex, Term};

use super::RequestId;
use crate::envelope::ProducerSeq;

struct AppendWaiter {
    last: LogIndex,
    term: Term,
    producer: Option<ProducerSeq>,
    ids: Vec<RequestId>,
}

struct IndexWaiter {
    term: Term,
    id: RequestId,
}

/// A membership change proposed once the new node's addresses (at `index`, `term`) apply.
pub(super) struct QueuedConf {
    pub index: LogIndex,
    pub term: Term,
    pub change: ConfChange,
    pub id: RequestId,
}

#[derive(Default)]
pub(super) struct Waiters {
    appends: HashMap<LogIndex, AppendWaiter>,
    /// Producer sequences proposed and not yet applied, with their first index (ordered, to
    /// find a producer's latest in flight).
    pending_producers: BTreeMap<(u64, u64), LogIndex>,
    confs: HashMap<LogIndex, IndexWaiter>,
    trims: HashMap<LogIndex, IndexWaiter>,
    streams: HashMap<LogIndex, IndexWaiter>,
    queued_conf: Option<QueuedConf>,
    /// Read barriers by context, with the tick they were asked at.
    reads: BTreeMap<u64, (u64, RequestId)>,
}

/// Whether a waiter proposed in `asked` owns the entry committed at its index in `committed`.
fn owned(asked: Term, committed: Term) -> bool {
    asked == committed
}

impl Waiters {
    pub fn add_append(
        &mut self,
        first: LogIndex,
        last: LogIndex,
        term: Term,
        producer: Option<ProducerSeq>,
        id: RequestId,
    ) {
        self.appends.insert(first, AppendWaiter { last, term, producer, ids: vec![id] });
        if let Some(p) = producer {
            self.pending_producers.insert((p.id, p.sequence), first);
        }
    }

    /// Adds `id` to the waiter of `p`'s proposal in flight, if there is one.
    pub fn join_pending(&mut self, p: ProducerSeq, id: RequestId) -> bool {
        let Some(first) = self.pending_producers.get(&(p.id, p.sequence)) else { return false };
        match self.appends.get_mut(first) {
            Some(w) => {
                w.ids.push(id);
                true
            }
            None => false,
        }
    }

    /// The highest sequence of `producer` proposed and not yet applied.
    pub fn latest_pending(&self, producer: u64) -> Option<u64> {
        self.pending_producers
            .range((producer, 0)..=(producer, u64::MAX))
            .next_back()
            .map(|(k, _)| k.1)
    }

    /// Removes the append waiter at `first`; returns who waited on it.
    pub fn finish_append(&mut self, first: LogIndex) -> Vec<RequestId> {
        let Some(w) = self.appends.remove(&first) else { return Vec::new() };
        if let Some(p) = w.producer
            && self.pending_producers.get(&(p.id, p.sequence)) == Some(&first)
        {
            self.pending_producers.remove(&(p.id, p.sequence));
        }
        w.ids
    }

    /// The append waiter at `index` was proposed in another term than the entry committed
    /// there: its entry was replaced. Returns who waited on it.
    pub fn replaced_append(&mut self, index: LogIndex, term: Term) -> Vec<RequestId> {
        if self.appends.get(&index).is_some_and(|w| !owned(w.term, term)) {
            return self.finish_append(index);
        }
        Vec::new()
    }

    /// The appends whose entries end at or before `durable`, removed: (first, last, who waits).
    /// Only the planted bug `AckBeforeQuorum` answers appends from this.
    pub fn take_appends_through(
        &mut self,
        durable: LogIndex,
    ) -> Vec<(LogIndex, LogIndex, Vec<RequestId>)> {
        let firsts: Vec<LogIndex> =
            self.appends.iter().filter(|(_, w)| w.last <= durable).map(|(&f, _)| f).collect();
        firsts
            .into_iter()
            .map(|first| {
                let last = self.appends[&first].last;
                (first, last, self.finish_append(first))
            })
            .collect()
    }

    pub fn add_conf(&mut self, index: LogIndex, term: Term, id: RequestId) {
        self.confs.insert(index, IndexWaiter { term, id });
    }

    /// The conf waiter at `index`, and whether it owns the entry of `term` there.
    pub fn take_conf(&mut self, index: LogIndex, term: Term) -> Option<(RequestId, bool)> {
        self.confs.remove(&index).map(|w| (w.id, owned(w.term, term)))
    }

    pub fn add_stream(&mut self, index: LogIndex, term: Term, id: RequestId) {
        self.streams.insert(index, IndexWaiter { term, id });
    }

    /// The stream command's waiter at `index`, and whether it owns the entry of `term` there.
    pub fn take_stream(&mut self, index: LogIndex, term: Term) -> Option<(RequestId, bool)> {
        self.streams.remove(&index).map(|w| (w.id, owned(w.term, term)))
    }

    pub fn add_trim(&mut self, index: LogIndex, term: Term, id: RequestId) {
        self.trims.insert(index, IndexWaiter { term, id });
    }

    /// The trim waiter at `index`, and whether it owns the entry of `term` there.
    pub fn take_trim(&mut self, index: LogIndex, term: Term) -> Option<(RequestId, bool)> {
        self.trims.remove(&index).map(|w| (w.id, owned(w.term, term)))
    }

    pub fn has_queued_conf(&self) -> bool {
        self.queued_conf.is_some()
    }

    pub fn queue_conf(&mut self, index: LogIndex, term: Term, change: ConfChange, id: RequestId) {
        self.queued_conf = Some(QueuedConf { index, term, change, id });
    }

    /// The queued change whose addresses entry is at `index`, and whether it owns the entry of
    /// `term` there.
    pub fn take_queued_conf(&mut self, index: LogIndex, term: Term) -> Option<(QueuedConf, bool)> {
        if self.queued_conf.as_ref().is_some_and(|q| q.index == index) {
            let q = self.queued_conf.take().expect("checked");
            let owns = owned(q.term, term);
            return Some((q, owns));
        }
        None
    }

    pub fn reads_len(&self) -> usize {
        self.reads.len()
    }

    pub fn add_read(&mut self, context: u64, tick: u64, id: RequestId) {
        self.reads.insert(context, (tick, id));
    }

    pub fn take_read(&mut self, context: u64) -> Option<RequestId> {
        self.reads.remove(&context).map(|(_, id)| id)
    }

    /// Read barriers asked `ttl` ticks or more before `now`.
    pub fn expire_reads(&mut self, now: u64, ttl: u64) -> Vec<RequestId> {
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, (asked, _))| now >= asked + ttl)
            .map(|(&context, _)| context)
            .collect();
        expired.into_iter().filter_map(|c| self.take_read(c)).collect()
    }

    /// Every waiter, removed.
    pub fn drain_all(&mut self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self.appends.drain().flat_map(|(_, w)| w.ids).collect();
        self.pending_producers.clear();
        let indexed = self.confs.drain().chain(self.trims.drain()).chain(self.streams.drain());
        ids.extend(indexed.map(|(_, w)| w.id));
        ids.extend(self.queued_conf.take().map(|q| q.id));
        ids.extend(std::mem::take(&mut self.reads).into_values().map(|(_, id)| id));
        ids
    }
}
