//! Making Readies durable: WAL submits in group-sized chunks, the syncer thread that waits
//! for them, the lazily saved commit index.

use super::*;

impl Driver {
    /// Queues `entries` in the WAL in as many submits as its group limits need; returns the
    /// last ticket. A full WAL queue waits for the oldest write here.
    pub(super) fn submit_entries(
        &mut self,
        wal: &Wal,
        entries: &[raftwal_consensus::Entry],
    ) -> Result<Ticket, String> {
        let batch = store::WalBatch::new(entries);
        let all = batch.entries();
        let mut last = None;
        for chunk in group_chunks(wal, &all) {
            loop {
                match wal.submit(chunk) {
                    Ok(t) => {
                        last = Some(t);
                        break;
                    }
                    Err(raftwal_wal::Error::QueueFull { .. }) => {
                        wal.flush().map_err(|e| format!("wal flush: {e}"))?;
                    }
                    Err(e) => return Err(format!("wal submit: {e}")),
                }
            }
        }
        Ok(last.expect("entries are not empty"))
    }

    /// The syncer made Ready `number` (and every earlier one) durable. A report for Readies
    /// already advanced (the driver flushed the WAL itself) changes nothing.
    pub(super) fn persisted(
        &mut self,
        number: u64,
        result: Result<(), String>,
    ) -> Result<(), String> {
        result?;
        let mut advance_to = None;
        let mut messages = Vec::new();
        while self.pending.front().is_some_and(|p| p.synced <= number) {
            let done = self.pending.pop_front().expect("checked");
            advance_to = Some(done.advance_to);
            messages.extend(done.messages);
        }
        if let Some(n) = advance_to {
            self.raw.advance(n).map_err(|e| format!("advance: {e}"))?;
            self.send_all(messages);
        }
        Ok(())
    }

    /// Saves a commit index held back from the Readies (see `handle_ready`).
    pub(super) fn save_commit(&mut self) -> Result<(), String> {
        if self.commit_unsaved {
            let wal = self.raw.store().wal().clone();
            let saved = wal.hard_state();
            let hs = self.latest_hard_state;
            // Never ahead of the durable log: a restart must find its commit index in the log.
            let commit = hs.commit.min(wal.last_index());
            if hs.term == saved.term && hs.vote == saved.vote && commit > saved.commit {
                let save = raftwal_consensus::HardState { commit, ..hs };
                wal.save_hard_state(save).map_err(|e| format!("wal hard state: {e}"))?;
            }
            self.commit_unsaved = commit < hs.commit;
        }
        Ok(())
    }
}

/// Splits `entries` into runs that each fit one WAL group (a Ready may carry more entries or
/// bytes than one group takes: many clients' batches, or a follower's catch-up).
pub(super) fn group_chunks<'a, 'e>(wal: &Wal, all: &'a [WalEntry<'e>]) -> Vec<&'a [WalEntry<'e>]> {
    let opts = wal.options();
    let mut out = Vec::new();
    let mut start = 0;
    while start < all.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < all.len() && ((end - start) as u64) < opts.group_entries_max {
            let b = raftwal_wal::frame_bytes(all[end].payload.len() as u64);
            if end > start && bytes + b > opts.group_bytes_max {
                break;
            }
            bytes += b;
            end += 1;
        }
        out.push(&all[start..end]);
        start = end;
    }
    out
}

/// Waits for queued WAL writes in Ready order and tells the driver, which meanwhile goes on.
/// The WAL's group commit lets this thread write and sync everything queued at once.
pub(super) fn run_syncer(wal: Arc<Wal>, rx: Receiver<(u64, Ticket)>, driver: SyncSender<Event>) {
    while let Ok((number, ticket)) = rx.recv() {
        let result = wal.wait(ticket).map_err(|e| format!("wal write: {e}"));
        let failed = result.is_err();
        // A blocking send: a durability report must never be dropped. The driver never waits
        // for this thread, so this cannot deadlock.
        if driver.send(Event::Persisted { number, result }).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftwal_consensus::{Entry, Term};

    #[test]
    fn a_ready_larger_than_one_wal_group_is_written_in_several() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = raftwal_wal::Options {
            group_entries_max: 4,
            group_bytes_max: 4096,
            record_bytes_max: 3072,
            ..Default::default()
        };
        let wal = Wal::open(dir.path(), opts).expect("open");
        let entries: Vec<Entry> = (1..=25u64)
            .map(|i| Entry {
                term: Term(1),
                index: LogIndex(i),
                kind: EntryKind::Normal,
                data: Bytes::from(vec![i as u8; if i == 7 { 3000 } else { 100 }]),
            })
            .collect();
        let batch = store::WalBatch::new(&entries);
        let all = batch.entries();
        let chunks = group_chunks(&wal, &all);
        assert!(chunks.len() >= 7, "{} chunks", chunks.len());
        for chunk in chunks {
            wal.append(chunk).expect("each chunk fits one group");
        }
        assert_eq!(wal.last_index(), LogIndex(25));
        assert!(wal.stats().groups >= 7, "{} groups", wal.stats().groups);
        let back = wal.entry(LogIndex(7)).expect("entry");
        assert_eq!(back.payload().len(), 3001, "the kind byte and the data");
    }
}
