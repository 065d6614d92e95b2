//! Applying committed entries' effects beyond the log state: trims and log restarts (the
//! log-start file), the membership history, node addresses.

use super::*;

impl Driver {
    pub(super) fn settle(
        &mut self,
        applied: Applied,
        state: &mut LogState,
        wal: &Arc<Wal>,
    ) -> Result<(), String> {
        match applied {
            Applied::Nothing => {}
            Applied::Batch { first, last } => {
                self.finish(first, &Ok(AppendOk { first, last, duplicate: false }));
            }
            Applied::Broken { first } => self.finish(first, &Err(DriverError::Lost)),
            Applied::Address(a) => {
                self.shared.api_addrs.write().insert(a.id, a.api.clone());
                if a.id != self.shared.id {
                    self.transport.add_peer(a.id, a.peer);
                }
            }
            Applied::Trim { before } => {
                // Never past what is settled: a reader must not lose entries it may still read.
                let before = before.min(state.readable().next()).min(wal.last_index().next());
                // Never inside a batch: a node that restarts from the new start must decide
                // about every batch exactly as the others did (same on every node: the log).
                let before = batch_head(wal, before)?;
                if self.role == Role::Leader {
                    self.replicate_addresses(state)?;
                }
                if before > wal.first_index() {
                    let membership = self.membership_at(before.prev());
                    let new = self.start_record(before, membership.clone(), state);
                    self.change_start(new, |wal| wal.compact_prefix(before))?;
                    self.raw.store_mut().set_start_membership(membership);
                    state.trimmed(before);
                    tracing::info!(%before, "log trimmed");
                }
            }
        }
        Ok(())
    }

    pub(super) fn start_record(
        &self,
        first_index: LogIndex,
        membership: Membership,
        state: &LogState,
    ) -> store::StartRecord {
        store::StartRecord {
            first_index,
            membership,
            addresses: state.addresses().values().cloned().collect(),
        }
    }

    /// Moves the log start durably: the log-start file first names both starts, then the WAL
    /// changes, then the file names only the new one (a crash anywhere leaves a record that
    /// matches the WAL's first index). Keeps the membership history from the new start on.
    pub(super) fn change_start(
        &mut self,
        new: store::StartRecord,
        change: impl FnOnce(&Wal) -> raftwal_wal::Result<()>,
    ) -> Result<(), String> {
        let wal = self.raw.store().wal().clone();
        let old_first = wal.first_index();
        let old = store::StartRecord {
            first_index: old_first,
            membership: self.membership_at(old_first.prev()),
            addresses: new.addresses.clone(),
        };
        if old.first_index != new.first_index {
            store::write_log_start(&self.data_dir, &[old, new.clone()])
                .map_err(|e| format!("write log start: {e}"))?;
        }
        change(&wal).map_err(|e| format!("wal: {e}"))?;
        store::write_log_start(&self.data_dir, std::slice::from_ref(&new))
            .map_err(|e| format!("write log start: {e}"))?;
        let at = new.first_index.prev();
        self.memberships.retain(|(i, _)| *i > at);
        self.memberships.insert(0, (at, new.membership));
        Ok(())
    }

    pub(super) fn membership_at(&self, index: LogIndex) -> Membership {
        self.memberships
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| self.memberships.first().map(|(_, m)| m.clone()).unwrap_or_default())
    }

    /// Consensus applied a membership: reach its members, show it in the status. (The history
    /// by index is kept entry by entry while applying.)
    pub(super) fn apply_membership(&mut self, m: Membership) {
        let members = m.members();
        debug_assert_eq!(
            self.memberships.last().map(|(_, h)| h),
            Some(&m),
            "history follows consensus"
        );
        // Keep the history bounded: only the membership in effect at the log start and later.
        let first = self.raw.store().wal().first_index().prev();
        if let Some(keep_from) = self.memberships.iter().rposition(|(i, _)| *i <= first)
            && keep_from > 0
        {
            self.memberships.drain(..keep_from);
        }
        let addrs = self.shared.state.read().addresses().clone();
        for id in members {
            if id != self.shared.id
                && let Some(a) = addrs.get(&id)
            {
                self.transport.add_peer(id, a.peer);
            }
        }
        self.publish_status();
    }

    /// After a trim, the leader replicates every member's addresses again, so that they stay in
    /// the retained log for nodes that restart from it or from a log restart.
    pub(super) fn replicate_addresses(&mut self, state: &LogState) -> Result<(), String> {
        let members = self.memberships.last().map(|(_, m)| m.members()).unwrap_or_default();
        let entries: Vec<Bytes> = state
            .addresses()
            .values()
            .filter(|a| members.contains(&a.id))
            .map(envelope::encode_address)
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        match self.raw.propose(entries) {
            Ok(_) => Ok(()),
            Err(RaftError::Store(e)) => Err(format!("log store: {e}")),
            // Not leader any more, or over a limit: the next trim tries again.
            Err(e) => {
                tracing::warn!(error = %e, "could not replicate addresses after a trim");
                Ok(())
            }
        }
    }
}

/// The first index of the batch that holds `index`, or `index` itself when it starts a batch,
/// is a lone record or an internal entry. Batches have at most
/// [`envelope::BATCH_RECORDS_MAX`] records, which bounds the look back.
pub(super) fn batch_head(wal: &Wal, index: LogIndex) -> Result<LogIndex, String> {
    let from =
        LogIndex(index.0.saturating_sub(envelope::BATCH_RECORDS_MAX).max(wal.first_index().0));
    if from >= index || index > wal.last_index() {
        return Ok(index);
    }
    let mut head = index;
    let mut next = from;
    while next < index {
        let page = wal.read(next..index, 64 << 20).map_err(|e| format!("wal read: {e}"))?;
        for rec in page {
            next = rec.index().next();
            let entry = store::entry_of(rec).map_err(|e| format!("wal read: {e}"))?;
            if entry.kind != EntryKind::Normal {
                head = index;
                continue;
            }
            if let Ok(envelope::Payload::BatchHead { count, .. }) = envelope::decode(&entry.data)
                && entry.index.0 + u64::from(count) > index.0
            {
                head = entry.index;
            } else if !matches!(envelope::decode(&entry.data), Ok(envelope::Payload::Record(_))) {
                head = index;
            }
        }
    }
    Ok(head)
}
