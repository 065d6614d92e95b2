//! The read-only view of the persisted log that consensus reads through, and an in-memory one.

use std::ops::Range;

use raftwal_types::{LogIndex, Term};

use crate::message::{Entry, LogStart};

/// Why a log read could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The entry is below the log's first index (the term before it is still answered).
    #[error("index {index} is compacted")]
    Compacted {
        /// The index asked for.
        index: LogIndex,
    },
    /// The entry is above the log's last index.
    #[error("index {index} is not in the log yet")]
    Unavailable {
        /// The index asked for.
        index: LogIndex,
    },
    /// The store failed (an IO error, a checksum mismatch); consensus cannot go on.
    #[error("log store failed: {0}")]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The persisted log, as consensus sees it: only entries whose write the caller has completed.
/// The caller writes; consensus only reads. The WAL backs it in the server, [`MemLog`] in tests.
///
/// Contract: entries between `first_index` and `last_index` are all present, contiguous, and
/// never change except by the caller acting on a [`crate::Ready`]; `term(first_index - 1)` is
/// always answered.
pub trait LogStore {
    /// The log's start: its first index, the term before it, and the membership as of then.
    fn start(&self) -> LogStart;
    /// The first index the log holds (one past the last when empty).
    fn first_index(&self) -> LogIndex;
    /// The last index the log holds (`first_index - 1` when empty).
    fn last_index(&self) -> LogIndex;
    /// The term of the entry at `index`, for `first_index - 1 <= index <= last_index`.
    fn term(&self, index: LogIndex) -> Result<Term, StoreError>;
    /// Entries in `range`, stopping once `bytes_max` is reached but always returning at least
    /// one entry when the range is non-empty.
    fn entries(&self, range: Range<LogIndex>, bytes_max: u64) -> Result<Vec<Entry>, StoreError>;
}

/// A log kept in memory: the store of the tests and the simulator. Its contents are exactly what
/// a crash would leave, so a simulated crash keeps the `MemLog` and drops everything else.
#[derive(Clone, Debug)]
pub struct MemLog {
    start: LogStart,
    entries: Vec<Entry>,
}

impl MemLog {
    /// An empty log starting after `start`.
    pub fn new(start: LogStart) -> MemLog {
        MemLog { start, entries: Vec::new() }
    }

    /// Writes `entries` as a [`crate::Ready`] hands them out: stored entries from the first new
    /// index on are replaced.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index >= self.start.first_index && first.index <= self.last_index().next(),
            "append at {} leaves a gap after {}",
            first.index,
            self.last_index()
        );
        let keep = (first.index.0 - self.start.first_index.0) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Drops every entry from `from` on, as damage found at restart may (a test's stand-in for
    /// a salvaged WAL).
    pub fn truncate(&mut self, from: LogIndex) {
        let keep = from.0.saturating_sub(self.start.first_index.0) as usize;
        self.entries.truncate(keep);
    }

    /// Discards the whole log and restarts it at `start` (a [`crate::Ready::log_start`]).
    pub fn restart(&mut self, start: LogStart) {
        self.entries.clear();
        self.start = start;
    }

    /// Drops entries below `first_index`; `membership` is the membership as of
    /// `first_index - 1`, which the caller knows because it has applied that far.
    pub fn compact(&mut self, first_index: LogIndex, membership: crate::Membership) {
        assert!(first_index > self.start.first_index && first_index <= self.last_index().next());
        let prev_term = self.term(first_index.prev()).expect("checked in range");
        let drop = (first_index.0 - self.start.first_index.0) as usize;
        self.entries.drain(..drop);
        self.start = LogStart { first_index, prev_term, membership };
    }

    /// Every entry held, in order.
    pub fn all(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemLog {
    fn start(&self) -> LogStart {
        self.start.clone()
    }

    fn first_index(&self) -> LogIndex {
        self.start.first_index
    }

    fn last_index(&self) -> LogIndex {
        LogIndex(self.start.first_index.0 + self.entries.len() as u64).prev()
    }

    fn term(&self, index: LogIndex) -> Result<Term, StoreError> {
        if index == self.start.first_index.prev() {
            return Ok(self.start.prev_term);
        }
        if index < self.start.first_index {
            return Err(StoreError::Compacted { index });
        }
        let offset = (index.0 - self.start.first_index.0) as usize;
        self.entries.get(offset).map(|e| e.term).ok_or(StoreError::Unavailable { index })
    }

    fn entries(&self, range: Range<LogIndex>, bytes_max: u64) -> Result<Vec<Entry>, StoreError> {
        if range.start < self.start.first_index {
            return Err(StoreError::Compacted { index: range.start });
        }
        if range.end > self.last_index().next() {
            return Err(StoreError::Unavailable { index: range.end.prev() });
        }
        let lo = (range.start.0 - self.start.first_index.0) as usize;
        let hi = (range.end.0 - self.start.first_index.0) as usize;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for entry in self.entries.get(lo..hi).unwrap_or_default() {
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }
}
