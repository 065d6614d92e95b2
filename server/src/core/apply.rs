//! Applying committed entries: the log state first (records, producers), then what an entry
//! settles: an append's callers, a membership change and its history, a node's addresses, a
//! trim (the log start moves), and the waiters of each.

use bytes::Bytes;
use raftwal_consensus::{ConfChange, Entry, EntryKind, LogIndex, LogStore, Membership, StoreError};

use super::{Action, AppendOk, Applied, Fatal, NodeCore, Reply, RequestError, StartChange, fatal};
use crate::envelope;
use crate::store::StartRecord;

impl NodeCore {
    pub(super) fn apply_entries(&mut self, entries: &[Entry]) -> Result<(), Fatal> {
        for e in entries {
            let replaced = self.waiters.replaced_append(e.index, e.term);
            // Another term's entry took the index this append was proposed at.
            self.answer_all(replaced, &Err(RequestError::Lost));
            if let Some((id, owns)) = self.waiters.take_conf(e.index, e.term) {
                self.reply(
                    id,
                    if owns { Ok(Reply::Index(e.index)) } else { Err(RequestError::Lost) },
                );
            }
            if let Some((q, owns)) = self.waiters.take_queued_conf(e.index, e.term) {
                if owns {
                    self.propose_conf(q.id, q.change)?;
                } else {
                    self.reply(q.id, Err(RequestError::Lost));
                }
            }
            if e.kind == EntryKind::ConfChange
                && let Some(change) = ConfChange::decode(&e.data)
            {
                let before = self.members.current().members();
                self.members.apply_change(e.index, &change);
                let after = self.members.current().members();
                for id in before.difference(&after).filter(|id| **id != self.config.id) {
                    self.actions.push_back(Action::Unreach(*id));
                }
                // A node that leaves, or joins anew, is a new peer from now on: its data
                // directory's incarnation is forgotten. Entry by entry, so a removal and a
                // re-add applied in one Ready are both seen; not for entries this node had
                // committed before it restarted (it forgot then, and may since have admitted
                // the new incarnation).
                if e.index > self.committed_at_start {
                    for id in before.symmetric_difference(&after) {
                        if *id != self.config.id {
                            self.actions.push_back(Action::Forget(*id));
                        }
                    }
                }
            }
            let stream_waiter = self.waiters.take_stream(e.index, e.term);
            let applied = self.log.apply(e.index, e.kind, &e.data);
            let mut stream_outcome = None;
            if let Applied::Stream(cmd) = applied {
                // Not while the state is missing (a peer's comes with this command in it, or
                // the node replays it after installing), nor when a checkpoint holds it.
                if self.streams_missing.is_none() && e.index > self.streams_floor {
                    stream_outcome = Some(self.streams.apply(e.index, cmd));
                    self.streams_unsaved += 1;
                    self.save_streams_if_due(e.index);
                }
            } else {
                self.settle(applied, e.index)?;
            }
            if let Some((id, owns)) = stream_waiter {
                let outcome = match stream_outcome {
                    Some(outcome) if owns => Ok(Reply::Stream(outcome)),
                    _ => Err(RequestError::Lost),
                };
                // Answered once the readers' views of the streams are published (the end of
                // the Ready): a client that hears of its write reads it on this node.
                self.stream_replies.push((id, outcome));
            }
            // A trim is answered once applied here, with the log's new first index.
            if let Some((id, owns)) = self.waiters.take_trim(e.index, e.term) {
                let outcome =
                    if owns { Ok(Reply::Index(self.first_index)) } else { Err(RequestError::Lost) };
                self.reply(id, outcome);
            }
        }
        Ok(())
    }

    fn settle(&mut self, applied: Applied, index: LogIndex) -> Result<(), Fatal> {
        match applied {
            Applied::Nothing => {}
            Applied::Batch { first, last } => {
                let ids = self.waiters.finish_append(first);
                let ok = AppendOk { first, last, duplicate: false };
                self.answer_all(ids, &Ok(Reply::Appended(ok)));
            }
            Applied::Broken { first } => {
                let ids = self.waiters.finish_append(first);
                self.answer_all(ids, &Err(RequestError::Lost));
            }
            Applied::Address(a) => {
                self.members.set_addresses(a.clone());
                self.actions.push_back(Action::Reach(a));
            }
            Applied::Trim { before } => self.apply_trim(before, index)?,
            Applied::Stream(_) => unreachable!("stream commands are applied by the caller"),
        }
        Ok(())
    }

    /// Applies a trim (the entry at `at`).
    fn apply_trim(&mut self, before: LogIndex, at: LogIndex) -> Result<(), Fatal> {
        let last = self.raw.store().last_index();
        // Never past what is settled: a reader must not lose entries it may still read.
        let before = before.min(self.log.readable().next()).min(last.next());
        // Never past a record a stream still reads. (A node whose state came from a checkpoint
        // later than this trim pins by that later state, so it may compact further than its
        // peers; the records its streams read stay either way.) A node whose state is missing
        // cannot tell, and keeps its log.
        if self.streams_missing.is_some() {
            return Ok(());
        }
        let before = self.streams.pin().map_or(before, |pin| before.min(pin));
        // Never inside a batch: a node that restarts from the new start must decide about
        // every batch exactly as the others did (the same on every node: the log).
        let before = self.batch_head(before).map_err(fatal("read the log for a trim"))?;
        if self.role == raftwal_consensus::Role::Leader {
            self.replicate_addresses()?;
        }
        if before > self.first_index {
            // The stream state, applied to here, is durable before the log below goes: a
            // restart then needs none of the dropped commands.
            self.save_streams(at);
            let membership = self.members.at(before.prev());
            self.move_start(before, membership, StartChange::Compact);
            self.log.trimmed(before);
            tracing::info!(%before, "log trimmed");
        }
        Ok(())
    }

    /// Moves the log start to `first` (the shell does the two-file commit), and keeps the
    /// membership history and consensus's view of the start in step.
    pub(super) fn move_start(
        &mut self,
        first: LogIndex,
        membership: Membership,
        change: StartChange,
    ) {
        let addresses: Vec<_> = self.members.addresses().values().cloned().collect();
        let old_first = self.first_index;
        let old = StartRecord {
            first_index: old_first,
            membership: self.members.at(old_first.prev()),
            addresses: addresses.clone(),
        };
        let new = StartRecord { first_index: first, membership: membership.clone(), addresses };
        self.actions.push_back(Action::MoveStart { old, new, change });
        self.members.start_at(first.prev(), membership.clone());
        self.raw.store_mut().set_start_membership(membership);
        self.first_index = first;
    }

    /// Consensus applied a membership: reach its members, stop reaching those it dropped, show
    /// it in the status. (The history by index is kept entry by entry while applying.)
    pub(super) fn membership_applied(&mut self, m: Membership) {
        debug_assert_eq!(self.members.current(), &m, "history follows consensus");
        self.members.forget_before(self.first_index.prev());
        let members = m.members();
        for a in self.members.addresses().values() {
            if members.contains(&a.id) {
                self.actions.push_back(Action::Reach(a.clone()));
            }
        }
        self.publish_status();
    }

    /// After a trim, the leader replicates every member's addresses again, so that they stay in
    /// the retained log for nodes that restart from it or from a log restart.
    fn replicate_addresses(&mut self) -> Result<(), Fatal> {
        let entries: Vec<Bytes> =
            self.members.member_addresses().iter().map(envelope::encode_address).collect();
        if entries.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.raw.propose(entries) {
            // Not leader any more, or over a limit: the next trim tries again.
            let e = self.refusal(e)?;
            tracing::warn!(error = %e, "could not replicate addresses after a trim");
        }
        Ok(())
    }

    /// The first index of the batch that holds `index`, or `index` itself when it starts a
    /// batch, is a lone record or an internal entry. Batches have at most
    /// [`envelope::BATCH_RECORDS_MAX`] records, which bounds the look back.
    fn batch_head(&self, index: LogIndex) -> Result<LogIndex, raftwal_consensus::Error> {
        let store = self.raw.store();
        let first = store.first_index().max(self.first_index);
        let from = LogIndex(index.0.saturating_sub(envelope::BATCH_RECORDS_MAX).max(first.0));
        if from >= index || index > store.last_index() {
            return Ok(index);
        }
        let mut head = index;
        let mut next = from;
        while next < index {
            let page = store.entries(next..index, 64 << 20).map_err(store_error)?;
            for entry in page {
                next = entry.index.next();
                if entry.kind != EntryKind::Normal {
                    head = index;
                    continue;
                }
                match envelope::decode(&entry.data) {
                    Ok(envelope::Payload::BatchHead { count, .. })
                        if entry.index.0 + u64::from(count) > index.0 =>
                    {
                        head = entry.index;
                    }
                    Ok(envelope::Payload::Record(_)) => {}
                    _ => head = index,
                }
            }
        }
        Ok(head)
    }
}

fn store_error(e: StoreError) -> raftwal_consensus::Error {
    raftwal_consensus::Error::Store(e)
}
