//! The log as consensus sees it: the persisted entries in the store, followed by the entries
//! not yet reported durable (the unstable tail), with the commit and apply points.

use std::ops::Range;

use raftwal_types::{LogIndex, Term};

use crate::message::{Entry, LogStart};
use crate::storage::{LogStore, StoreError};

/// Invariants: `unstable` is contiguous from `offset`; `offset - 1` is either in the store, the
/// store's `first_index - 1`, or `pending_start.first_index - 1`; `applied <= committed`;
/// committed entries are never removed or replaced.
pub(crate) struct RaftLog<S> {
    pub(crate) store: S,
    /// Entries not yet reported durable. They supersede the store from `offset` on.
    unstable: Vec<Entry>,
    offset: LogIndex,
    /// Unstable entries below this index have been handed out in a Ready.
    in_progress: LogIndex,
    /// A log restart not yet reported durable; while set, the store is about to be discarded.
    pending_start: Option<LogStart>,
    start_handed_out: bool,
    pub(crate) committed: LogIndex,
    /// The last index handed to the caller to apply.
    pub(crate) applied: LogIndex,
}

impl<S: LogStore> RaftLog<S> {
    pub(crate) fn new(store: S, committed: LogIndex, applied: LogIndex) -> RaftLog<S> {
        let offset = store.last_index().next();
        RaftLog {
            store,
            unstable: Vec::new(),
            offset,
            in_progress: offset,
            pending_start: None,
            start_handed_out: false,
            committed,
            applied,
        }
    }

    pub(crate) fn first_index(&self) -> LogIndex {
        match &self.pending_start {
            Some(start) => start.first_index,
            None => self.store.first_index(),
        }
    }

    /// Where the log starts: a restart not yet durable, else the store's start.
    pub(crate) fn start(&self) -> LogStart {
        match &self.pending_start {
            Some(start) => start.clone(),
            None => self.store.start(),
        }
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        match self.unstable.last() {
            Some(entry) => entry.index,
            None => self.offset.prev(),
        }
    }

    pub(crate) fn last_term(&self) -> Result<Term, StoreError> {
        self.term(self.last_index())
    }

    /// The term of the entry at `index`, for `first_index - 1 <= index <= last_index`.
    pub(crate) fn term(&self, index: LogIndex) -> Result<Term, StoreError> {
        if index >= self.offset {
            let pos = (index.0 - self.offset.0) as usize;
            return self.unstable.get(pos).map(|e| e.term).ok_or(StoreError::Unavailable { index });
        }
        if let Some(start) = &self.pending_start {
            return match index.cmp(&start.first_index.prev()) {
                std::cmp::Ordering::Equal => Ok(start.prev_term),
                std::cmp::Ordering::Less => Err(StoreError::Compacted { index }),
                std::cmp::Ordering::Greater => Err(StoreError::Unavailable { index }),
            };
        }
        self.store.term(index)
    }

    /// The term at `index`, or `None` when the index is outside the log (compacted or beyond).
    pub(crate) fn term_if_known(&self, index: LogIndex) -> Result<Option<Term>, StoreError> {
        match self.term(index) {
            Ok(term) => Ok(Some(term)),
            Err(StoreError::Compacted { .. } | StoreError::Unavailable { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub(crate) fn match_term(&self, index: LogIndex, term: Term) -> Result<bool, StoreError> {
        Ok(self.term_if_known(index)? == Some(term))
    }

    /// Whether a candidate whose log ends at `(index, term)` is at least as up to date as ours.
    pub(crate) fn is_up_to_date(&self, index: LogIndex, term: Term) -> Result<bool, StoreError> {
        let last_term = self.last_term()?;
        Ok(term > last_term || (term == last_term && index >= self.last_index()))
    }

    /// Entries in `range`, at most `bytes_max` of them but at least one.
    pub(crate) fn entries(
        &self,
        range: Range<LogIndex>,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        if range.start < self.first_index() {
            return Err(StoreError::Compacted { index: range.start });
        }
        if range.end > self.last_index().next() {
            return Err(StoreError::Unavailable { index: range.end.prev() });
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        if range.start < self.offset {
            let stored_end = range.end.min(self.offset);
            out = self.store.entries(range.start..stored_end, bytes_max)?;
            bytes = out.iter().map(Entry::size_bytes).sum();
            let complete = out.last().is_some_and(|e| e.index.next() == stored_end);
            if !complete || stored_end == range.end {
                return Ok(out);
            }
        }
        let lo = (range.start.max(self.offset).0 - self.offset.0) as usize;
        let hi = (range.end.0 - self.offset.0) as usize;
        for entry in &self.unstable[lo..hi] {
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    /// The last index at or below `index` whose term is at most `term`, with that term: where a
    /// log with `term` at `index` could first match ours. Used on both sides of fast
    /// backtracking.
    pub(crate) fn find_conflict_by_term(
        &self,
        index: LogIndex,
        term: Term,
    ) -> Result<(LogIndex, Term), StoreError> {
        let mut index = index.min(self.last_index());
        loop {
            match self.term_if_known(index)? {
                Some(t) if t <= term => return Ok((index, t)),
                Some(_) => index = index.prev(),
                // Below our first index we cannot tell; the leader will restart our log if so.
                None => return Ok((index, Term(0))),
            }
        }
    }

    /// Appends entries that follow the last index (the leader's own proposals).
    pub(crate) fn append(&mut self, entries: Vec<Entry>) {
        if let Some(first) = entries.first() {
            assert_eq!(
                first.index,
                self.last_index().next(),
                "appended entries must follow the log"
            );
            assert!(first.index > self.committed, "appending over committed entries");
            self.truncate_and_append(entries);
        }
    }

    /// Handles a leader's append after `(prev_index, prev_term)`. Returns the last index the
    /// leader's message covers, or `None` when our log does not hold `(prev_index, prev_term)`.
    /// An append that would replace a committed entry is a broken peer: it is refused.
    pub(crate) fn maybe_append(
        &mut self,
        prev_index: LogIndex,
        prev_term: Term,
        entries: &[Entry],
    ) -> Result<Option<LogIndex>, AppendError> {
        if !self.match_term(prev_index, prev_term)? {
            return Ok(None);
        }
        let last_new = LogIndex(prev_index.0 + entries.len() as u64);
        for (pos, entry) in entries.iter().enumerate() {
            if self.match_term(entry.index, entry.term)? {
                continue;
            }
            if entry.index <= self.committed {
                return Err(AppendError::ConflictsWithCommitted);
            }
            self.truncate_and_append(entries[pos..].to_vec());
            break;
        }
        Ok(Some(last_new))
    }

    fn truncate_and_append(&mut self, entries: Vec<Entry>) {
        let Some(first) = entries.first() else { return };
        let after = first.index;
        if after.0 == self.offset.0 + self.unstable.len() as u64 {
            // Continues the unstable tail (or the store, when the tail is empty).
        } else if after <= self.offset {
            // Replaces stored entries: the caller truncates them when it writes these.
            self.offset = after;
            self.unstable.clear();
        } else {
            self.unstable.truncate((after.0 - self.offset.0) as usize);
        }
        self.in_progress = self.in_progress.min(after);
        self.unstable.extend(entries);
    }

    /// The newest membership change after the commit index that another change follows in the
    /// log: it is committed, whether or not this node was told.
    ///
    /// A leader appends a membership change only once every earlier one in its log is applied
    /// (so committed), and our log up to that change is the leader's. A node that restarts with
    /// a commit index older than what it had learned (Raft lets the commit index be volatile)
    /// would otherwise count votes with a membership two or more changes behind its own log,
    /// and two majorities of such memberships need not overlap: it could win an election
    /// against a leader that committed entries it lacks. With this floor it applies all but
    /// the last change in its log before it may campaign (see `Raft::campaign`), so it is at
    /// most one change behind, as the leader's rule intends.
    pub(crate) fn committed_conf_change_floor(
        &self,
        page_bytes: u64,
    ) -> Result<Option<LogIndex>, StoreError> {
        let end = self.last_index().next();
        let mut next = self.committed.next();
        let (mut newest, mut before_newest) = (None, None);
        while next < end {
            let page = self.entries(next..end, page_bytes)?;
            for entry in &page {
                if entry.kind == crate::message::EntryKind::ConfChange {
                    before_newest = newest;
                    newest = Some(entry.index);
                }
            }
            next = page.last().expect("a non-empty range reads at least one entry").index.next();
        }
        Ok(before_newest)
    }

    pub(crate) fn commit_to(&mut self, index: LogIndex) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit {index} beyond last {}", self.last_index());
            self.committed = index;
        }
    }

    /// Restarts the log at `start` (a leader told us to). Everything we hold is discarded.
    pub(crate) fn restart(&mut self, start: LogStart) {
        let before = start.first_index.prev();
        self.unstable.clear();
        self.offset = start.first_index;
        self.in_progress = start.first_index;
        self.committed = self.committed.max(before);
        self.applied = self.applied.max(before);
        self.pending_start = Some(start);
        self.start_handed_out = false;
    }

    /// The log restart and the entries to hand out in the next Ready, marked handed out.
    pub(crate) fn take_unpersisted(&mut self) -> (Option<LogStart>, Vec<Entry>) {
        let start = match &self.pending_start {
            Some(start) if !self.start_handed_out => {
                self.start_handed_out = true;
                Some(start.clone())
            }
            _ => None,
        };
        let from = (self.in_progress.0 - self.offset.0) as usize;
        let entries = self.unstable[from..].to_vec();
        self.in_progress = self.last_index().next();
        (start, entries)
    }

    pub(crate) fn has_unpersisted(&self) -> bool {
        (self.pending_start.is_some() && !self.start_handed_out)
            || self.in_progress <= self.last_index()
    }

    /// The caller reports the restart to `first_index` durable.
    pub(crate) fn start_persisted(&mut self, first_index: LogIndex) {
        if self.pending_start.as_ref().is_some_and(|s| s.first_index == first_index) {
            self.pending_start = None;
        }
    }

    /// The caller reports entries through `(index, term)` durable. Ignored if the entry has
    /// since been replaced: a later report will cover its replacement.
    pub(crate) fn stable_to(&mut self, index: LogIndex, term: Term) {
        if self.pending_start.is_some() || index < self.offset {
            return;
        }
        let pos = (index.0 - self.offset.0) as usize;
        if self.unstable.get(pos).is_some_and(|e| e.term == term) {
            self.unstable.drain(..=pos);
            self.offset = index.next();
            self.in_progress = self.in_progress.max(self.offset);
        }
    }

    /// The last index known durable in our log (and consistent with it).
    pub(crate) fn persisted_index(&self) -> LogIndex {
        match &self.pending_start {
            Some(start) => start.first_index.prev(),
            None => self.offset.prev().min(self.store.last_index()),
        }
    }

    /// Committed entries ready to apply: committed, durable here, and not yet handed out.
    pub(crate) fn next_committed_range(&self) -> Option<Range<LogIndex>> {
        let hi = self.committed.min(self.persisted_index());
        (hi > self.applied).then(|| self.applied.next()..hi.next())
    }
}

/// Why a leader's append was refused.
#[derive(Debug)]
pub(crate) enum AppendError {
    ConflictsWithCommitted,
    Store(StoreError),
}

impl From<StoreError> for AppendError {
    fn from(err: StoreError) -> AppendError {
        AppendError::Store(err)
    }
}
