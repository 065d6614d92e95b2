//! The core's storage actions carried out on the WAL and the log-start file, and the syncer
//! thread that waits for queued writes in order.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use raftwal_consensus::{Entry, HardState, LogIndex, Term};
use raftwal_wal::storage::Storage;
use raftwal_wal::{Entry as WalEntry, Ticket, Wal};

use super::Event;
use crate::core::StartChange;
use crate::store::{self, StartRecord};

/// Why a storage action failed. Every one is fatal: the node stops (a failed write poisons the
/// WAL, and nothing may be acknowledged after it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The WAL refused or failed.
    #[error("wal {op}: {source}")]
    Wal {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: raftwal_wal::Error,
    },
    /// The log-start file could not be written.
    #[error("write the log-start file: {0}")]
    LogStart(std::io::Error),
    /// The repair-floor file could not be written.
    #[error("write the repair-floor file: {0}")]
    RepairFloor(std::io::Error),
    /// The stream checkpoint could not be written.
    #[error("write the stream checkpoint: {0}")]
    Streams(std::io::Error),
}

fn wal_err(op: &'static str) -> impl FnOnce(raftwal_wal::Error) -> StorageError {
    move |source| StorageError::Wal { op, source }
}

/// The node's storage: its WAL and its data directory (for the log-start file), both through
/// the WAL's `Storage` trait.
#[derive(Debug, Clone)]
pub struct NodeStorage {
    wal: Arc<Wal>,
    dir: Arc<dyn Storage>,
}

impl NodeStorage {
    /// The storage of a node whose WAL is `wal` and whose data directory is `dir`.
    pub fn new(wal: Arc<Wal>, dir: Arc<dyn Storage>) -> NodeStorage {
        NodeStorage { wal, dir }
    }

    /// The WAL.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Discards the stored and queued entries from `from` on.
    pub fn truncate(&self, from: LogIndex) -> Result<(), StorageError> {
        self.wal.truncate_suffix(from).map_err(wal_err("truncate"))
    }

    /// Queues `entries` in as many submits as the WAL's group limits need; returns the last
    /// ticket. A full WAL queue waits for the oldest write here.
    pub fn submit(&self, entries: &[Entry]) -> Result<Ticket, StorageError> {
        let batch = store::WalBatch::new(entries);
        let all = batch.entries();
        let mut last = None;
        for chunk in group_chunks(&self.wal, &all) {
            loop {
                match self.wal.submit(chunk) {
                    Ok(t) => {
                        last = Some(t);
                        break;
                    }
                    Err(raftwal_wal::Error::QueueFull { .. }) => self.flush()?,
                    Err(e) => return Err(wal_err("submit")(e)),
                }
            }
        }
        Ok(last.expect("a write has entries"))
    }

    /// Waits until the write of `ticket` (and every earlier one) is durable.
    pub fn wait(&self, ticket: Ticket) -> Result<(), StorageError> {
        self.wal.wait(ticket).map_err(wal_err("write"))
    }

    /// Makes everything queued durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.wal.flush().map_err(wal_err("flush"))
    }

    /// Saves the hard state durably.
    pub fn save_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        self.wal.save_hard_state(hs).map_err(wal_err("hard state"))
    }

    /// Raises the repair floor durably (a leader proved this node acknowledged more than its log
    /// holds).
    pub fn raise_repair_floor(&self, floor: (LogIndex, Term)) -> Result<(), StorageError> {
        store::raise_repair_floor(self.dir.as_ref(), floor).map_err(StorageError::RepairFloor)
    }

    /// Saves the stream state applied to `at` durably (`None`: marks it missing).
    pub fn save_streams(&self, at: LogIndex, state: Option<&[u8]>) -> Result<(), StorageError> {
        store::write_streams(self.dir.as_ref(), at, state).map_err(StorageError::Streams)
    }

    /// Saves a higher commit index durably, keeping the saved term and vote.
    pub fn raise_commit(&self, commit: LogIndex) -> Result<(), StorageError> {
        self.wal.raise_commit(commit).map_err(wal_err("commit index"))
    }

    /// Moves the log start durably: the log-start file first names both starts, then the WAL
    /// changes, then the file names only the new one, so a crash anywhere leaves a record that
    /// matches the WAL's first index.
    pub fn move_start(
        &self,
        old: &StartRecord,
        new: &StartRecord,
        change: StartChange,
    ) -> Result<(), StorageError> {
        if old.first_index != new.first_index {
            store::write_log_start(self.dir.as_ref(), &[old.clone(), new.clone()])
                .map_err(StorageError::LogStart)?;
        }
        match change {
            StartChange::Compact => {
                self.wal.compact_prefix(new.first_index).map_err(wal_err("compact"))?
            }
            StartChange::Restart { prev_term } => {
                self.wal.restart_at(new.first_index, prev_term).map_err(wal_err("restart"))?
            }
        }
        store::write_log_start(self.dir.as_ref(), std::slice::from_ref(new))
            .map_err(StorageError::LogStart)
    }
}

/// Splits `entries` into runs that each fit one WAL group (a Ready may carry more entries or
/// bytes than one group takes: many clients' batches, or a follower's catch-up).
pub(crate) fn group_chunks<'a, 'e>(wal: &Wal, all: &'a [WalEntry<'e>]) -> Vec<&'a [WalEntry<'e>]> {
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

/// What the syncer thread does for the driver, in the order asked.
#[derive(Debug)]
pub(super) enum SyncJob {
    /// Wait until the write of `ticket` is durable, then report write `number` persisted.
    Wait { number: u64, ticket: Ticket },
    /// Save this commit index (after the writes asked for before it), reporting only failure.
    SaveCommit(LogIndex),
}

/// Waits for queued WAL writes in order and tells the driver, which meanwhile goes on; saves
/// the commit indexes the driver hands it. The WAL's group commit lets this thread write and
/// sync everything queued at once.
pub(super) fn run_syncer(
    storage: NodeStorage,
    rx: Receiver<SyncJob>,
    completions: SyncSender<Event>,
    wake: SyncSender<Event>,
) {
    while let Ok(job) = rx.recv() {
        let (number, ticket) = match job {
            SyncJob::Wait { number, ticket } => (number, ticket),
            SyncJob::SaveCommit(commit) => {
                if let Err(e) = storage.raise_commit(commit) {
                    let _ = completions
                        .send(Event::Persisted { number: 0, result: Err(e.to_string()) });
                    let _ = wake.try_send(Event::Wake);
                    return;
                }
                continue;
            }
        };
        let result = storage.wait(ticket).map_err(|e| e.to_string());
        let failed = result.is_err();
        // A blocking send on a channel of completions only, which the driver drains on every
        // round: a durability report is never dropped and never waits behind client events.
        // The driver never waits for this thread, so this cannot deadlock.
        if completions.send(Event::Persisted { number, result }).is_err() || failed {
            let _ = wake.try_send(Event::Wake);
            return;
        }
        // Wakes a driver asleep on its event queue; a full queue means it is not asleep.
        let _ = wake.try_send(Event::Wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use raftwal_consensus::{EntryKind, Term};

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
