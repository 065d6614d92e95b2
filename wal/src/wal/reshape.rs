//! Changing the log's shape: truncating a conflicting suffix, compacting a prefix, restarting
//! the whole log at an index, and the exclusive writer access they need.

use super::*;

impl Wal {
    /// Waits for the writer with nothing queued and returns the queue lock, so the caller owns
    /// the write path (new submissions block until it is released).
    pub(super) fn exclusive(&self) -> Result<MutexGuard<'_, Queue>> {
        let mut q = self.queue();
        loop {
            self.check_poisoned()?;
            match (q.writer.is_some(), q.groups.is_empty()) {
                (true, true) => return Ok(q),
                (true, false) => {
                    let (guard, result) = self.lead(q, 0);
                    q = guard;
                    result?;
                }
                (false, _) => self.writer_idle.wait(&mut q),
            }
        }
    }

    /// Removes every entry from `from` on (a Raft log conflict). Queued appends are written
    /// first. Durable on return: a new segment starting at `from` supersedes the old frames,
    /// which are never overwritten, so readers holding [`Record`]s of them are unaffected.
    pub fn truncate_suffix(&self, from: LogIndex) -> Result<()> {
        let mut q = self.exclusive()?;
        let (prev_term, prev_crc) = {
            let view = self.view_read();
            if from > view.last_index {
                return Ok(());
            }
            if from < view.first_index {
                return Err(Error::OutOfRange {
                    index: from,
                    first: view.first_index,
                    last: view.last_index,
                });
            }
            let commit = self.hard_state().commit;
            if from <= commit {
                return Err(Error::TruncateCommitted { from, commit });
            }
            let prev_crc = view.link(from.prev())?.map_or(0, |(crc, _)| crc);
            (view.term(from.prev())?, prev_crc)
        };
        let writer = q.writer.as_mut().expect("exclusive() holds a free writer");
        let created = self.seal(writer).and_then(|()| self.create_segment(writer, from, None));
        let created = match created {
            Ok(seg) => seg,
            Err(e) => {
                self.poison();
                return Err(e);
            }
        };
        writer.prev_crc = prev_crc;
        q.next_index = from;
        q.last_term = prev_term;
        let obsolete: Vec<String> = {
            let mut view = self.view_write();
            for s in view.segments.iter_mut() {
                if s.end_index() > from {
                    let keep = from.get().saturating_sub(s.first_index.get());
                    s.offsets.truncate(usize::try_from(keep).expect("below offsets.len()"));
                }
            }
            let (gone, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut view.segments).into_iter().partition(|s| s.first_index >= from);
            view.segments = kept;
            view.segments.push(created);
            view.last_index = from.prev();
            view.last_term = prev_term;
            self.metrics.segments.set(view.segments.len() as f64);
            gone.into_iter().map(|s| s.name).collect()
        };
        drop(q);
        self.remove_files(&obsolete)
    }

    /// Discards the whole log and restarts it, empty, at `first_index`, with `prev_term` as the
    /// term of the entry at `first_index - 1`: what a Raft follower does when the leader says
    /// its log now starts there (consensus's `LogStart`). Afterwards [`Wal::first_index`] is
    /// `first_index`, [`Wal::last_index`] is `first_index - 1`, [`Wal::term`] of
    /// `first_index - 1` is `prev_term`, and the next append must start at `first_index` with a
    /// term of at least `prev_term`. `first_index` may lie beyond the last index, inside the
    /// log or below its first index: every entry is discarded either way. The hard state is
    /// untouched (its commit index may now lie outside the log; that is the caller's business).
    ///
    /// Appends queued when this is called are written first and their waiters get `Ok`, as
    /// with [`Wal::truncate_suffix`]; they are then discarded with the rest of the log.
    /// Submissions made while this runs wait for it and must start at `first_index`.
    ///
    /// Durable on return. A crash at any point recovers either the whole old log or the new
    /// empty one, never a mix: the commit point is the durable write of the hard-state slot
    /// that holds the new log start (docs/wal-format.md). Old segments are deleted, never
    /// overwritten, so readers holding [`Record`]s of them are unaffected. Any IO failure
    /// poisons the WAL. `first_index` 0 is refused with [`Error::OutOfRange`].
    pub fn restart_at(&self, first_index: LogIndex, prev_term: Term) -> Result<()> {
        if first_index == LogIndex(0) {
            let view = self.view_read();
            return Err(Error::OutOfRange {
                index: first_index,
                first: view.first_index,
                last: view.last_index,
            });
        }
        // The writer, exclusively, until the old segments are durably gone: a truncation or
        // compaction must not delete the restart segment while segments it makes obsolete may
        // still come back after a crash (recovery would then read them as the log).
        let mut q = self.exclusive()?;
        // The meta lock from before the restart segment names its commit sequence number until
        // that slot is written, so no other hard-state save can take the number.
        let mut meta = self.meta.lock();
        self.check_poisoned()?;
        let writer = q.writer.as_mut().expect("exclusive() holds a free writer");
        let mark = RestartMark { prev_term, commit_seq: meta.slot.seq + 1 };
        let created =
            self.seal(writer).and_then(|()| self.create_segment(writer, first_index, Some(mark)));
        let created = match created {
            Ok(seg) => seg,
            Err(e) => {
                self.poison();
                return Err(e);
            }
        };
        let mut slot = meta.slot;
        slot.first_index = first_index;
        slot.first_prev_term = prev_term;
        // The commit point: once this slot is durable, recovery takes the restart segment as
        // the whole log. Synced in every durability mode: the old segments are deleted next.
        // `write_meta` poisons on failure.
        self.write_meta(&mut meta, slot, true)?;
        assert_eq!(meta.slot.seq, mark.commit_seq, "the restart's slot has its commit seq");
        drop(meta);
        // The entry before the new first index is not held, so the first frame starts a new
        // chain, as after a compaction past the last segment.
        writer.prev_crc = 0;
        q.next_index = first_index;
        q.last_term = prev_term;
        let obsolete: Vec<String> = {
            let mut view = self.view_write();
            let old = std::mem::replace(&mut view.segments, vec![created]);
            view.first_index = first_index;
            view.first_prev_term = prev_term;
            view.last_index = first_index.prev();
            view.last_term = prev_term;
            self.metrics.segments.set(view.segments.len() as f64);
            old.into_iter().map(|s| s.name).collect()
        };
        let removed = self.remove_files(&obsolete);
        if removed.is_err() {
            self.poison();
        }
        drop(q);
        removed
    }

    pub(super) fn remove_files(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        for name in names {
            self.storage.remove(name).map_err(Error::io("remove segment"))?;
        }
        // If this sync fails the files may reappear after a crash; recovery removes them again.
        self.storage.sync_dir().map_err(Error::io("sync dir after segment delete"))
    }

    /// Moves the first readable index to `before` (durably) and deletes every segment that holds
    /// only entries below it. `before` may be at most `last_index + 1`.
    pub fn compact_prefix(&self, before: LogIndex) -> Result<()> {
        self.check_poisoned()?;
        // The meta lock is held throughout, so two compactions never interleave (a later one
        // with a lower target would otherwise move the durable first index backwards).
        let mut meta = self.meta.lock();
        let prev_term = {
            let view = self.view_read();
            if before <= view.first_index {
                return Ok(());
            }
            if before > view.last_index.next() {
                return Err(Error::OutOfRange {
                    index: before,
                    first: view.first_index,
                    last: view.last_index,
                });
            }
            view.term(before.prev())?
        };
        let mut slot = meta.slot;
        slot.first_index = before;
        slot.first_prev_term = prev_term;
        self.write_meta(&mut meta, slot, false)?;
        let obsolete: Vec<String> = {
            let mut view = self.view_write();
            view.first_index = before;
            view.first_prev_term = prev_term;
            // Never the last segment: the writer may be appending to it.
            let n = view.segments.windows(2).take_while(|w| w[1].first_index <= before).count();
            let gone: Vec<String> = view.segments.drain(..n).map(|s| s.name).collect();
            self.metrics.segments.set(view.segments.len() as f64);
            gone
        };
        drop(meta);
        self.remove_files(&obsolete)
    }
}
