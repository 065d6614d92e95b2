//! The WAL: submission queue, group commit, segment rollover, truncation, compaction, restart,
//! reads.
//!
//! Group commit is a write barrier in the style of tikv/raft-engine: `submit` encodes a batch
//! into the open group at the back of a bounded queue; the first caller of `wait` that finds the
//! writer free becomes the leader, takes the group at the front, writes it with one positioned
//! write and makes it durable with one `fdatasync`, then wakes everyone whose ticket it covered.
//! ARCHITECTURE.md records why this beats a dedicated writer thread on this machine.

use std::any::Any;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::{
    MetaSlot, RestartMark, SEGMENT_HEADER_BYTES, SegmentHeader, chain_frame,
    encode_frame_unchained, frame_bytes,
};
use crate::metrics::WalMetrics;
use crate::prepare::{Prepared, Preparer};
use crate::recovery::{RecoveryReport, Salvage, SalvageHook, recover};
use crate::segment::{LogView, Record, SegmentIndex, segment_name};
use crate::storage::{FsStorage, Storage, StorageFile};
use crate::types::{Entry, HardState, LogIndex, Term};

mod reshape;

/// When an append counts as done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every write group is followed by `fdatasync`; `wait` returns after it. The default.
    #[default]
    Sync,
    /// No `fdatasync` for groups or hard state: a power loss loses acknowledged appends, and
    /// may leave damage that recovery must report as corruption (its rule that a later group
    /// implies a synced earlier one no longer holds). Segment seals and creations and the
    /// commit of [`Wal::restart_at`] still sync. For benchmarks that say so in their output;
    /// never for a real cluster.
    UnsafeNoSync,
}

/// Limits and layout. Every limit has a typed error beyond it.
#[derive(Clone, Debug)]
pub struct Options {
    /// Size of every segment file, preallocated at creation.
    pub segment_bytes: u64,
    /// Largest record payload.
    pub record_bytes_max: u64,
    /// Largest write group, in encoded bytes; also the largest single `submit`.
    pub group_bytes_max: u64,
    /// Largest write group, in entries; also the largest single `submit`.
    pub group_entries_max: u64,
    /// Encoded bytes that may wait for the writer before `submit` returns `QueueFull`.
    pub queue_bytes_max: u64,
    /// When an append counts as done.
    pub durability: Durability,
    /// Prepare the next segment (preallocated, zero-filled, synced) on a background thread,
    /// so group syncs never pay for converting fresh extents. Off by default: it costs one
    /// spare segment file and a second write of every segment's bytes, and at high load its
    /// writeback lengthens tail latency more than it raises throughput (ARCHITECTURE.md).
    pub prepare_segments: bool,
    /// How long a new segment may wait for a resource that runs out for a while: file
    /// descriptors (EMFILE, ENFILE), disk space or quota (ENOSPC, EDQUOT), memory (ENOMEM).
    /// Nothing is written before the segment exists, so such a failure is retried with backoff
    /// instead of poisoning the WAL; only past this wait does it poison.
    pub resource_wait_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
            record_bytes_max: 4 << 20,
            group_bytes_max: 16 << 20,
            group_entries_max: 64 << 10,
            queue_bytes_max: 256 << 20,
            durability: Durability::Sync,
            prepare_segments: false,
            resource_wait_max: Duration::from_secs(60),
        }
    }
}

impl Options {
    fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::InvalidOptions(m));
        // Segment offsets, payload lengths and group offsets are u32 on disk and in memory.
        let u32_max = u64::from(u32::MAX);
        for (name, v) in [
            ("segment_bytes", self.segment_bytes),
            ("record_bytes_max", self.record_bytes_max),
            ("group_bytes_max", self.group_bytes_max),
        ] {
            if v > u32_max {
                return fail(format!("{name} {v} is above 4 GiB"));
            }
        }
        let record_frame = frame_bytes(self.record_bytes_max);
        if record_frame + SEGMENT_HEADER_BYTES > self.segment_bytes {
            return fail(format!(
                "a record of record_bytes_max {} does not fit a segment of {} bytes",
                self.record_bytes_max, self.segment_bytes
            ));
        }
        if record_frame > self.group_bytes_max || self.group_entries_max == 0 {
            return fail("a write group must hold at least one largest record".into());
        }
        if self.queue_bytes_max < self.group_bytes_max {
            return fail("queue_bytes_max must be at least group_bytes_max".into());
        }
        Ok(())
    }
}

/// Running totals since open, for status pages and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Write groups written.
    pub groups: u64,
    /// `fdatasync` calls on segments (groups and seals).
    pub segment_syncs: u64,
    /// Entries written.
    pub entries: u64,
    /// Frame bytes written.
    pub bytes: u64,
    /// Total time spent in segment `fdatasync` calls, in microseconds.
    pub segment_sync_us: u64,
    /// Segments that came ready-made from the background preparer.
    pub segments_prepared: u64,
    /// Times a new segment waited for a resource that had run out (EMFILE, ENOSPC, ...).
    pub resource_waits: u64,
}

#[derive(Default)]
struct Counters {
    groups: AtomicU64,
    segment_syncs: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    segment_sync_us: AtomicU64,
    segments_prepared: AtomicU64,
    resource_waits: AtomicU64,
}

/// Proof of a submission; pass it to [`Wal::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

struct PendingGroup {
    first_index: LogIndex,
    /// Encoded frames, chained by the leader just before the write.
    bytes: Vec<u8>,
    /// Start of each frame in `bytes`.
    frame_starts: Vec<u32>,
    last_term: Term,
    last_ticket: u64,
}

struct Active {
    id: u64,
    file: Arc<dyn StorageFile>,
    /// Where the next frame goes. Invariant: every byte from here to the end is still zero.
    tail: u64,
    dirty: bool,
}

/// The writer's state. Whoever holds it (the group leader, or a truncation) is the only one
/// who writes segments.
struct Writer {
    /// `None` when the next frame must go to a new segment (after a truncation or a torn tail).
    active: Option<Active>,
    next_segment_id: u64,
    /// `header_crc` of the last frame written: the next frame's `prev_crc`.
    prev_crc: u32,
}

struct Queue {
    groups: VecDeque<PendingGroup>,
    queued_bytes: u64,
    /// The index the next submit must start at.
    next_index: LogIndex,
    /// Term of the entry at `next_index - 1`.
    last_term: Term,
    next_ticket: u64,
    /// Every ticket up to this one is durable. Invariant: monotonic.
    durable_ticket: u64,
    /// Every ticket up to this one has been woken. Invariant: `woken_upto <= durable_ticket`.
    woken_upto: u64,
    /// Tickets whose callers are asleep in `wait`, so a wake always reaches a real sleeper.
    sleeping: BTreeSet<u64>,
    /// Taken by the leader for the duration of its write.
    writer: Option<Box<Writer>>,
    spare_buffers: Vec<Vec<u8>>,
}

struct MetaState {
    file: Arc<dyn StorageFile>,
    slot: MetaSlot,
}

/// A segmented, crash-safe write-ahead log. Share it between threads with an `Arc`.
pub struct Wal {
    storage: Arc<dyn Storage>,
    opts: Options,
    poisoned: AtomicBool,
    queue: Mutex<Queue>,
    /// Waiters sleep on the condvar of their ticket's slot (`ticket % WAKE_SLOTS`), so a leader
    /// wakes only the callers its group completed instead of every waiter (64 threads woken per
    /// group on two cores cost more CPU than the writes).
    wake_slots: Vec<Condvar>,
    /// Signalled whenever the writer is handed back, for callers that need it exclusively.
    writer_idle: Condvar,
    view: RwLock<LogView>,
    meta: Mutex<MetaState>,
    report: RecoveryReport,
    salvage: Option<Salvage>,
    metrics: WalMetrics,
    counters: Counters,
    /// Frame-checksum salt of this WAL (from the hard-state file).
    salt: u32,
    /// Declared before `_lock` so its thread stops before the directory is unlocked.
    preparer: Option<Preparer>,
    _lock: Box<dyn Any + Send + Sync>,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

const SPARE_BUFFERS_MAX: usize = 4;
const WAKE_SLOTS: u64 = 64;
/// Groups a leader writes after its own is durable before handing the writer on.
const LEAD_EXTRA_GROUPS_MAX: u32 = 4;

impl Wal {
    /// Opens (creating if needed) the WAL in `dir` and recovers it.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Wal> {
        let storage = FsStorage::new(dir.as_ref()).map_err(Error::io("create dir"))?;
        Wal::open_with(Arc::new(storage), opts).map_err(|e| match e {
            Error::Locked { .. } => Error::Locked { dir: dir.as_ref().to_path_buf() },
            e => e,
        })
    }

    /// Opens the WAL on any storage (tests use [`crate::fault::FaultStorage`]).
    pub fn open_with(storage: Arc<dyn Storage>, opts: Options) -> Result<Wal> {
        Wal::open_inner(storage, opts, None)
    }

    /// Opens the WAL, cutting the log just before damage in a segment instead of refusing to
    /// open: for a replica that can fetch the dropped entries again from its peers. `keep` sees
    /// what is dropped (file, offset, the last index kept, how far the log reached) before
    /// anything is deleted; an error from it fails the open with nothing changed. The saved
    /// commit index is lowered to the last index kept. Damage to the hard state still fails the
    /// open: it holds the term and vote, which no peer can give back. [`Wal::salvage`] tells
    /// what was cut.
    pub fn open_salvaging(
        storage: Arc<dyn Storage>,
        opts: Options,
        keep: SalvageHook<'_>,
    ) -> Result<Wal> {
        Wal::open_inner(storage, opts, Some(keep))
    }

    /// The damage this WAL's open cut the log at ([`Wal::open_salvaging`]).
    pub fn salvage(&self) -> Option<&Salvage> {
        self.salvage.as_ref()
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        opts: Options,
        keep: Option<SalvageHook<'_>>,
    ) -> Result<Wal> {
        opts.validate()?;
        let lock = storage
            .lock()
            .map_err(Error::io("lock dir"))?
            .ok_or_else(|| Error::Locked { dir: "<storage>".into() })?;
        let rec = recover(storage.as_ref(), keep)?;
        let last = rec.view.segments.last();
        // The last segment takes more frames only if it ended cleanly and has the full
        // preallocated size (a crash may have lost the size change of a fresh segment).
        let active = match (last, rec.append_at) {
            (Some(s), Some(tail)) if s.map.bytes().len() as u64 == opts.segment_bytes => {
                Some(Active { id: s.id, file: s.file.clone(), tail, dirty: false })
            }
            _ => None,
        };
        let writer =
            Writer { active, next_segment_id: rec.next_segment_id, prev_crc: rec.last_crc };
        let preparer = if opts.prepare_segments {
            Some(
                Preparer::start(storage.clone(), opts.segment_bytes)
                    .map_err(Error::io("start segment preparer"))?,
            )
        } else {
            None
        };
        let metrics = WalMetrics::new();
        metrics.segments.set(rec.view.segments.len() as f64);
        Ok(Wal {
            storage,
            poisoned: AtomicBool::new(false),
            queue: Mutex::new(Queue {
                groups: VecDeque::new(),
                queued_bytes: 0,
                next_index: rec.view.last_index.next(),
                last_term: rec.view.last_term,
                next_ticket: 1,
                durable_ticket: 0,
                woken_upto: 0,
                sleeping: BTreeSet::new(),
                writer: Some(Box::new(writer)),
                spare_buffers: Vec::new(),
            }),
            wake_slots: (0..WAKE_SLOTS).map(|_| Condvar::new()).collect(),
            writer_idle: Condvar::new(),
            view: RwLock::new(rec.view),
            meta: Mutex::new(MetaState { file: rec.meta_file, slot: rec.meta }),
            report: rec.report,
            salvage: rec.salvage,
            metrics,
            counters: Counters::default(),
            salt: rec.meta.salt,
            preparer,
            opts,
            _lock: lock,
        })
    }

    /// What recovery found when this WAL was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// The options in force.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    fn view_read(&self) -> RwLockReadGuard<'_, LogView> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    fn view_write(&self) -> RwLockWriteGuard<'_, LogView> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) { Err(Error::Poisoned) } else { Ok(()) }
    }

    fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        for cv in &self.wake_slots {
            cv.notify_all();
        }
        self.writer_idle.notify_all();
    }

    fn wake_slot(&self, ticket: u64) -> &Condvar {
        &self.wake_slots[(ticket % WAKE_SLOTS) as usize]
    }

    /// Appends `entries` and returns once they are durable (group commit with every other
    /// concurrent caller). Equivalent to [`Wal::submit`] then [`Wal::wait`].
    pub fn append(&self, entries: &[Entry<'_>]) -> Result<()> {
        let ticket = self.submit(entries)?;
        self.wait(ticket)
    }

    /// Queues `entries` for the next write group without waiting. The batch must continue the
    /// log: its first index is the one after the last submitted entry, indexes are contiguous
    /// and terms never decrease. The whole batch is written in one group; after a crash before
    /// its sync, any prefix of it may survive (never a part with a gap).
    pub fn submit(&self, entries: &[Entry<'_>]) -> Result<Ticket> {
        self.check_poisoned()?;
        let Some(first) = entries.first() else {
            return Ok(Ticket(0));
        };
        let mut bytes = 0u64;
        // Checksums here, outside the queue lock that every submitter and the leader share.
        let mut payload_crcs = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let len = e.payload.len() as u64;
            if len > self.opts.record_bytes_max {
                return Err(Error::RecordTooLarge {
                    bytes: len,
                    limit: self.opts.record_bytes_max,
                });
            }
            if i > 0 && e.index != entries[i - 1].index.next() {
                return Err(Error::NonContiguous {
                    expected: entries[i - 1].index.next(),
                    got: e.index,
                });
            }
            if i > 0 && e.term < entries[i - 1].term {
                return Err(Error::TermRegression {
                    index: e.index,
                    term: e.term.get(),
                    prev_term: entries[i - 1].term.get(),
                });
            }
            bytes += frame_bytes(len);
            payload_crcs.push(crc32fast::hash(e.payload));
        }
        let count = entries.len() as u64;
        if bytes > self.opts.group_bytes_max || count > self.opts.group_entries_max {
            return Err(Error::AppendTooLarge {
                entries: count,
                bytes,
                entries_limit: self.opts.group_entries_max,
                bytes_limit: self.opts.group_bytes_max,
            });
        }

        let mut q = self.queue();
        self.check_poisoned()?;
        if first.index != q.next_index {
            return Err(Error::NonContiguous { expected: q.next_index, got: first.index });
        }
        if first.term < q.last_term {
            return Err(Error::TermRegression {
                index: first.index,
                term: first.term.get(),
                prev_term: q.last_term.get(),
            });
        }
        if q.queued_bytes > 0 && q.queued_bytes + bytes > self.opts.queue_bytes_max {
            return Err(Error::QueueFull {
                queued: q.queued_bytes,
                limit: self.opts.queue_bytes_max,
            });
        }
        let fits_back = q.groups.back().is_some_and(|g| {
            g.frame_starts.len() as u64 + count <= self.opts.group_entries_max
                && g.bytes.len() as u64 + bytes <= self.opts.group_bytes_max
        });
        if !fits_back {
            let buffer = q.spare_buffers.pop().unwrap_or_default();
            q.groups.push_back(PendingGroup {
                first_index: first.index,
                bytes: buffer,
                frame_starts: Vec::new(),
                last_term: first.term,
                last_ticket: 0,
            });
        }
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.queued_bytes += bytes;
        let last = entries.last().expect("non-empty");
        q.next_index = last.index.next();
        q.last_term = last.term;
        let group = q.groups.back_mut().expect("pushed above");
        group.bytes.reserve(bytes as usize);
        for (e, crc) in entries.iter().zip(payload_crcs) {
            group.frame_starts.push(u32::try_from(group.bytes.len()).expect("group below 4 GiB"));
            encode_frame_unchained(&mut group.bytes, e.term, e.index, e.payload, crc);
        }
        group.last_term = last.term;
        group.last_ticket = ticket;
        Ok(Ticket(ticket))
    }

    /// Blocks until the submission behind `ticket` is durable, leading write groups while the
    /// writer is free.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        let mut q = self.queue();
        assert!(ticket.0 < q.next_ticket, "ticket {} was never issued", ticket.0);
        loop {
            if ticket.0 <= q.durable_ticket {
                self.wake_completed(q);
                return Ok(());
            }
            self.check_poisoned()?;
            if q.writer.is_some() && !q.groups.is_empty() {
                let (guard, result) = self.lead(q, ticket.0);
                q = guard;
                result?;
                continue;
            }
            q.sleeping.insert(ticket.0);
            self.wake_slot(ticket.0).wait(&mut q);
            q.sleeping.remove(&ticket.0);
        }
    }

    /// Waits until everything submitted so far is durable.
    pub fn flush(&self) -> Result<()> {
        let last = Ticket(self.queue().next_ticket - 1);
        self.wait(last)
    }

    /// Wakes every waiter whose ticket became durable since the last wake, outside the lock.
    /// The leader wakes only one waiter per group; that waiter (on the other core, while the
    /// leader writes the next group) wakes the rest here. Every path that sees a ticket durable
    /// passes through here, so no completed waiter is left asleep.
    fn wake_completed(&self, mut q: MutexGuard<'_, Queue>) {
        if q.woken_upto >= q.durable_ticket {
            return;
        }
        let range = q.woken_upto + 1..=q.durable_ticket;
        q.woken_upto = q.durable_ticket;
        drop(q);
        let slots = (range.end() - range.start() + 1).min(WAKE_SLOTS);
        for t in *range.start()..range.start() + slots {
            self.wake_slot(t).notify_all();
        }
    }

    fn pop_group(q: &mut Queue) -> PendingGroup {
        let group = q.groups.pop_front().expect("caller checked a group is queued");
        q.queued_bytes -= group.bytes.len() as u64;
        group
    }

    /// Leads write groups: takes the writer, then writes and syncs one group at a time without
    /// the queue lock, publishing each and waking one sleeping caller it completed (who wakes
    /// the rest). It keeps the writer while groups are queued, so the disk never idles while a
    /// successor is scheduled, but only for `LEAD_EXTRA_GROUPS_MAX` groups past its own
    /// ticket; then it hands the writer to a sleeping caller whose ticket is still pending, so
    /// no caller leads forever and no queued group waits for a caller that never comes.
    fn lead<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        own_ticket: u64,
    ) -> (MutexGuard<'a, Queue>, Result<()>) {
        let mut writer = q.writer.take().expect("caller checked the writer is free");
        let mut group = Self::pop_group(&mut q);
        let mut groups_past_own = 0;
        let mut wake_one: Option<u64> = None;
        loop {
            drop(q);
            if let Some(t) = wake_one.take() {
                self.wake_slot(t).notify_all();
            }
            let result = self.write_group(&mut writer, &mut group);
            q = self.queue();
            // A failure elsewhere (a hard-state sync) poisons too: acknowledge nothing after it.
            let result = result.and_then(|()| self.check_poisoned());
            if let Err(e) = result {
                q.writer = Some(writer);
                self.poison();
                return (q, Err(e));
            }
            assert!(group.last_ticket > q.durable_ticket, "durable ticket is monotonic");
            q.durable_ticket = group.last_ticket;
            wake_one = q.sleeping.range(q.woken_upto + 1..=q.durable_ticket).next().copied();
            if own_ticket <= q.durable_ticket {
                groups_past_own += 1;
            }
            let mut done = std::mem::take(&mut group.bytes);
            if q.spare_buffers.len() < SPARE_BUFFERS_MAX {
                done.clear();
                q.spare_buffers.push(done);
            }
            if q.groups.is_empty() || groups_past_own > LEAD_EXTRA_GROUPS_MAX {
                let pending = q.durable_ticket + 1..;
                if let Some(&successor) = q.sleeping.range(pending).next() {
                    self.wake_slot(successor).notify_all();
                }
                q.writer = Some(writer);
                self.writer_idle.notify_all();
                if let Some(t) = wake_one {
                    self.wake_slot(t).notify_all();
                }
                return (q, Ok(()));
            }
            group = Self::pop_group(&mut q);
        }
    }

    /// `fdatasync` of a segment, timed. Seals sync even under `UnsafeNoSync`: they are rare,
    /// and recovery's corruption rule assumes a later segment implies a durable earlier one.
    fn sync_segment(&self, file: &dyn StorageFile) -> Result<()> {
        let start = Instant::now();
        file.sync_data().map_err(Error::io("fdatasync segment"))?;
        let elapsed = start.elapsed();
        self.metrics.fsync_seconds.record(elapsed.as_secs_f64());
        self.counters.segment_syncs.fetch_add(1, Ordering::Relaxed);
        self.counters.segment_sync_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Syncs the active segment if it has unsynced frames and retires it: the next frame goes
    /// to a new segment. The sync comes first so that a later segment on disk always implies
    /// every frame before it is durable (recovery's corruption rule depends on it).
    fn seal(&self, writer: &mut Writer) -> Result<()> {
        if let Some(active) = writer.active.take()
            && active.dirty
        {
            self.sync_segment(active.file.as_ref())?;
        }
        Ok(())
    }

    /// Creates, preallocates, stamps and makes durable a new segment starting at `first_index`
    /// (a restart segment when `restart` is set). A resource that ran out before anything was
    /// written (file descriptors, space, memory) is waited for, up to `resource_wait_max`.
    fn create_segment(
        &self,
        writer: &mut Writer,
        first_index: LogIndex,
        restart: Option<RestartMark>,
    ) -> Result<SegmentIndex> {
        if let Some(prepared) = self.preparer.as_ref().and_then(Preparer::take) {
            let fresh = NewSegmentFile::Prepared(prepared);
            return self.stamp_segment(writer, fresh, first_index, restart);
        }
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        loop {
            let name = segment_name(writer.next_segment_id);
            match self.open_new_segment(&name) {
                Ok(file) => {
                    let fresh = NewSegmentFile::Fresh(file);
                    return self.stamp_segment(writer, fresh, first_index, restart);
                }
                Err(e) if is_transient(&e) && started.elapsed() < self.opts.resource_wait_max => {
                    self.counters.resource_waits.fetch_add(1, Ordering::Relaxed);
                    self.metrics.resource_waits.increment(1);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(Error::Io { op: "create segment", source: e }),
            }
        }
    }

    /// The file of a new segment, preallocated, with nothing written to it yet. A file whose
    /// preallocation failed is removed again, so a retry starts clean.
    fn open_new_segment(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = self.storage.create(name)?;
        if let Err(e) = file.allocate(self.opts.segment_bytes) {
            drop(file);
            let _ = self.storage.remove(name);
            return Err(e);
        }
        Ok(file)
    }

    /// Stamps the header on a new segment's file (or takes a prepared one) and makes it durable
    /// under its segment name; it becomes the active segment.
    fn stamp_segment(
        &self,
        writer: &mut Writer,
        fresh: NewSegmentFile,
        first_index: LogIndex,
        restart: Option<RestartMark>,
    ) -> Result<SegmentIndex> {
        let id = writer.next_segment_id;
        writer.next_segment_id += 1;
        let name = segment_name(id);
        let header = SegmentHeader { segment_id: id, first_index, restart };
        // The header is durable before the file has its segment name, and the name is durable
        // before any frame is written to it.
        let file = match fresh {
            NewSegmentFile::Prepared(prepared) => {
                let file = prepared.file;
                file.write_at(&header.encode(), 0).map_err(Error::io("write segment header"))?;
                file.sync_data().map_err(Error::io("fdatasync segment header"))?;
                self.storage.rename(&prepared.name, &name).map_err(Error::io("rename segment"))?;
                self.counters.segments_prepared.fetch_add(1, Ordering::Relaxed);
                file
            }
            NewSegmentFile::Fresh(file) => {
                file.write_at(&header.encode(), 0).map_err(Error::io("write segment header"))?;
                file.sync_data().map_err(Error::io("fdatasync segment header"))?;
                file
            }
        };
        self.storage.sync_dir().map_err(Error::io("sync dir after segment create"))?;
        let map = file.map().map_err(Error::io("map segment"))?;
        writer.active =
            Some(Active { id, file: file.clone(), tail: SEGMENT_HEADER_BYTES, dirty: false });
        Ok(SegmentIndex { id, name, first_index, file, map, offsets: Vec::new() })
    }

    fn write_group(&self, writer: &mut Writer, group: &mut PendingGroup) -> Result<()> {
        let n = group.frame_starts.len();
        let total = group.bytes.len();
        let starts = &group.frame_starts;
        let start_of = |i: usize| -> usize { starts.get(i).map_or(total, |&s| s as usize) };
        let mut crc = writer.prev_crc;
        for i in 0..n {
            let (s, e) = (start_of(i), start_of(i + 1));
            crc = chain_frame(&mut group.bytes[s..e], group.first_index, crc, self.salt);
        }
        let mut created: Vec<SegmentIndex> = Vec::new();
        let mut placed: Vec<(u64, Vec<u32>)> = Vec::new();
        let mut i = 0;
        while i < n {
            let active = match writer.active.as_mut() {
                Some(a) => a,
                None => {
                    let first = LogIndex(group.first_index.get() + i as u64);
                    let seg = self.create_segment(writer, first, None)?;
                    created.push(seg);
                    writer.active.as_mut().expect("just created")
                }
            };
            let space = self.opts.segment_bytes - active.tail;
            let mut j = i;
            while j < n && (start_of(j + 1) - start_of(i)) as u64 <= space {
                j += 1;
            }
            if j == i {
                self.seal(writer)?;
                continue;
            }
            let (s, e) = (start_of(i), start_of(j));
            active
                .file
                .write_at(&group.bytes[s..e], active.tail)
                .map_err(Error::io("write frames"))?;
            let base = active.tail;
            let offsets = (i..j)
                .map(|k| {
                    u32::try_from(base + (start_of(k) - s) as u64).expect("segment below 4 GiB")
                })
                .collect();
            placed.push((active.id, offsets));
            active.tail += (e - s) as u64;
            active.dirty = true;
            self.metrics.bytes_written.increment((e - s) as u64);
            i = j;
        }
        if let Some(active) = writer.active.as_mut()
            && active.dirty
            && self.opts.durability == Durability::Sync
        {
            self.sync_segment(active.file.as_ref())?;
            active.dirty = false;
        }
        writer.prev_crc = crc;
        self.metrics.group_entries.record(n as f64);
        self.metrics.group_bytes.record(group.bytes.len() as f64);
        self.counters.groups.fetch_add(1, Ordering::Relaxed);
        self.counters.entries.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.bytes.fetch_add(group.bytes.len() as u64, Ordering::Relaxed);
        self.publish(
            created,
            placed,
            LogIndex(group.first_index.get() + n as u64 - 1),
            group.last_term,
        )
    }

    /// Makes written frames visible to readers.
    fn publish(
        &self,
        created: Vec<SegmentIndex>,
        placed: Vec<(u64, Vec<u32>)>,
        last_index: LogIndex,
        last_term: Term,
    ) -> Result<()> {
        let mut view = self.view_write();
        view.segments.extend(created);
        for (id, offsets) in placed {
            let seg = view
                .segments
                .iter_mut()
                .rev()
                .find(|s| s.id == id)
                .expect("a segment written to is in the view");
            seg.offsets.extend(offsets);
            if !seg.map.is_live() {
                seg.map = seg.file.map().map_err(Error::io("map segment"))?;
            }
        }
        assert!(last_index > view.last_index, "the durable index only moves forward");
        view.last_index = last_index;
        view.last_term = last_term;
        self.metrics.segments.set(view.segments.len() as f64);
        Ok(())
    }

    /// Writes the next hard-state slot and syncs it (under `UnsafeNoSync` only if `always_sync`).
    fn write_meta(
        &self,
        meta: &mut MetaState,
        mut slot: MetaSlot,
        always_sync: bool,
    ) -> Result<()> {
        self.check_poisoned()?;
        slot.seq = meta.slot.seq + 1;
        let at = slot.file_offset();
        let result = meta.file.write_at(&slot.encode(), at).map_err(Error::io("write hard state"));
        let result = result.and_then(|()| {
            if always_sync || self.opts.durability == Durability::Sync {
                let start = Instant::now();
                meta.file.sync_data().map_err(Error::io("fdatasync hard state"))?;
                self.metrics.fsync_seconds.record(start.elapsed().as_secs_f64());
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                meta.slot = slot;
                Ok(())
            }
            Err(e) => {
                self.poison();
                Err(e)
            }
        }
    }

    /// Saves the hard state atomically and durably (two checksummed slots, alternating). The
    /// commit index never goes back: a lower one than saved keeps the saved one (another thread
    /// may have raised it with [`Wal::raise_commit`]). Panics if the term would go backwards or
    /// a vote would change within a term: each is a caller bug that would break Raft's safety.
    pub fn save_hard_state(&self, hs: HardState) -> Result<()> {
        let mut meta = self.meta.lock();
        let old = meta.slot.hard_state;
        let hs = HardState { commit: hs.commit.max(old.commit), ..hs };
        if hs == old {
            return self.check_poisoned();
        }
        assert!(hs.term >= old.term, "term regresses from {} to {}", old.term, hs.term);
        assert!(
            hs.term > old.term || old.vote.is_none() || hs.vote == old.vote,
            "vote changes within term {}",
            hs.term
        );
        let mut slot = meta.slot;
        slot.hard_state = hs;
        self.write_meta(&mut meta, slot, false)
    }

    /// Saves a higher commit index with the saved term and vote, durably; a commit index at or
    /// below the saved one changes nothing. For a caller that saves the commit index off the
    /// thread that saves term and vote.
    pub fn raise_commit(&self, commit: LogIndex) -> Result<()> {
        let mut meta = self.meta.lock();
        if commit <= meta.slot.hard_state.commit {
            return self.check_poisoned();
        }
        let mut slot = meta.slot;
        slot.hard_state.commit = commit;
        self.write_meta(&mut meta, slot, false)
    }

    /// Lowers the saved commit index to `to`, durably, if it is above it: for a caller about
    /// to discard, or that discarded, entries it had counted committed (a repair from peers,
    /// which fetches them again). Every other save only raises the commit index.
    pub fn lower_commit(&self, to: LogIndex) -> Result<()> {
        let mut meta = self.meta.lock();
        if meta.slot.hard_state.commit <= to {
            return self.check_poisoned();
        }
        let mut slot = meta.slot;
        slot.hard_state.commit = to;
        self.write_meta(&mut meta, slot, true)
    }

    /// The last saved hard state.
    pub fn hard_state(&self) -> HardState {
        self.meta.lock().slot.hard_state
    }

    /// First readable index.
    pub fn first_index(&self) -> LogIndex {
        self.view_read().first_index
    }

    /// Last durable index; `first_index - 1` when the log is empty.
    pub fn last_index(&self) -> LogIndex {
        self.view_read().last_index
    }

    /// Term of `index`, for any index in `[first_index - 1, last_index]`.
    pub fn term(&self, index: LogIndex) -> Result<Term> {
        self.view_read().term(index)
    }

    /// One verified entry.
    pub fn entry(&self, index: LogIndex) -> Result<Record> {
        let view = self.view_read();
        if index < view.first_index || index > view.last_index {
            return Err(Error::OutOfRange {
                index,
                first: view.first_index,
                last: view.last_index,
            });
        }
        view.record(index)
    }

    /// Verified, zero-copy views of the durable entries in `range`, stopping once `bytes_max`
    /// payload bytes are collected (always at least one entry when the range is not empty).
    pub fn read(&self, range: Range<LogIndex>, bytes_max: u64) -> Result<Vec<Record>> {
        let view = self.view_read();
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        if range.start < view.first_index || range.end.prev() > view.last_index {
            let index = if range.start < view.first_index { range.start } else { range.end.prev() };
            return Err(Error::OutOfRange {
                index,
                first: view.first_index,
                last: view.last_index,
            });
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut index = range.start;
        while index < range.end {
            let record = view.record(index)?;
            bytes += record.payload().len() as u64;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(record);
            index = index.next();
        }
        Ok(out)
    }

    /// Running totals since open.
    pub fn stats(&self) -> WalStats {
        let c = &self.counters;
        WalStats {
            groups: c.groups.load(Ordering::Relaxed),
            segment_syncs: c.segment_syncs.load(Ordering::Relaxed),
            entries: c.entries.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            segment_sync_us: c.segment_sync_us.load(Ordering::Relaxed),
            segments_prepared: c.segments_prepared.load(Ordering::Relaxed),
            resource_waits: c.resource_waits.load(Ordering::Relaxed),
        }
    }

    /// Whether an earlier write or sync failure poisoned this WAL.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// The file a new segment goes into.
enum NewSegmentFile {
    /// Made ahead by the preparer (zero-filled, synced, under a temporary name).
    Prepared(Prepared),
    /// Created and preallocated just now, under the segment's name.
    Fresh(Arc<dyn StorageFile>),
}

/// Whether `e` is a resource that runs out for a while rather than a failed write: waiting for
/// it is safe, since nothing has been written yet.
fn is_transient(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOSPC | Errno::DQUOT | Errno::NOMEM)
    )
}
