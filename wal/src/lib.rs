//! raftwal-wal: the segmented, crash-safe write-ahead log under every raftwal node.
//!
//! What it is: a synchronous library that stores one log of `(term, index, payload)` entries in
//! preallocated segment files, plus the Raft hard state, and recovers them after a crash. What
//! it is not: it knows nothing of Raft's rules beyond "indexes are contiguous, terms never
//! decrease, committed entries are never truncated". It has no threads of its own, except the
//! optional segment preparer (`Options::prepare_segments`, off by default), which zero-fills
//! the next segment in the background.
//!
//! Data flow: [`Wal::submit`] encodes entries into the open write group; [`Wal::wait`] makes the
//! first free waiter the group's leader, which writes the group with one positioned write and
//! one `fdatasync`, then publishes the new entries to readers and wakes every waiter it covered
//! (group commit). [`Wal::read`] hands out zero-copy [`Record`]s from memory-mapped segments,
//! each checksum-verified first. [`Wal::truncate_suffix`] supersedes a suffix with a new
//! segment; [`Wal::compact_prefix`] deletes whole segments below a new first index;
//! [`Wal::restart_at`] discards the whole log for an empty one at a given index. A failed
//! write or sync poisons the WAL: every later call returns [`Error::Poisoned`].
//!
//! The byte layout, the recovery algorithm and the crash argument are in docs/wal-format.md.

mod error;
pub mod fault;
mod format;
mod metrics;
mod prepare;
mod recovery;
mod segment;
pub mod storage;
mod types;
mod wal;

pub use error::{Error, Result};
pub use format::{
    FORMAT_VERSION, FRAME_ALIGN, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES, frame_bytes,
};
pub use recovery::{RecoveryReport, Salvage, SalvageHook, TornTail};
pub use segment::Record;
pub use types::{Entry, HardState, LogIndex, NodeId, Term};
pub use wal::{Durability, Options, Ticket, Wal, WalStats};
