//! The WAL's one error type.

use std::io;
use std::path::PathBuf;

use crate::types::LogIndex;

/// Everything that can go wrong in the WAL. Operating errors only: broken invariants panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An IO call failed. If it was a write or a sync, the WAL is now poisoned.
    #[error("wal io error during {op}: {source}")]
    Io {
        /// What the WAL was doing.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed; nothing is acknowledged after that. Reopen to recover.
    #[error("wal is poisoned by an earlier write or sync failure; reopen it to recover")]
    Poisoned,
    /// Damage that is not a torn tail: valid data follows it, or it sits in a sealed segment.
    /// The data after it is kept, untouched, for repair.
    #[error("wal corrupt in segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file name.
        segment: String,
        /// Byte offset of the damage inside that file.
        offset: u64,
        /// What was found.
        reason: String,
    },
    /// Another process (or another `Wal` in this one) holds the directory.
    #[error("wal directory {dir} is locked by another process")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// One record is above the configured maximum.
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// Size of the record.
        bytes: u64,
        /// The configured `record_bytes_max`.
        limit: u64,
    },
    /// One append call is larger than a write group may be.
    #[error(
        "append of {entries} entries / {bytes} bytes exceeds the group limit of {entries_limit} entries / {bytes_limit} bytes"
    )]
    AppendTooLarge {
        /// Entries in the call.
        entries: u64,
        /// Encoded bytes of the call.
        bytes: u64,
        /// The configured `group_entries_max`.
        entries_limit: u64,
        /// The configured `group_bytes_max`.
        bytes_limit: u64,
    },
    /// More bytes are queued for the writer than `queue_bytes_max`; retry after a wait.
    #[error("wal write queue is full ({queued} bytes queued, limit {limit})")]
    QueueFull {
        /// Bytes queued now.
        queued: u64,
        /// The configured `queue_bytes_max`.
        limit: u64,
    },
    /// An append that does not continue the log (indexes must be contiguous from `expected`).
    #[error("append at index {got} does not continue the log (expected {expected})")]
    NonContiguous {
        /// The index the log needs next.
        expected: LogIndex,
        /// The index given.
        got: LogIndex,
    },
    /// An append whose term is below the term of the entry before it.
    #[error("append at index {index} has term {term}, below the previous entry's term {prev_term}")]
    TermRegression {
        /// Index of the offending entry.
        index: LogIndex,
        /// Its term.
        term: u64,
        /// Term of the entry before it.
        prev_term: u64,
    },
    /// A read or truncation outside `[first_index, last_index]`.
    #[error("index {index} is outside the log [{first}, {last}]")]
    OutOfRange {
        /// The index asked for.
        index: LogIndex,
        /// The first index held.
        first: LogIndex,
        /// The last durable index.
        last: LogIndex,
    },
    /// A truncation that would remove committed entries (a caller bug under Raft).
    #[error("truncating from index {from} would remove committed entries (commit is {commit})")]
    TruncateCommitted {
        /// The truncation point asked for.
        from: LogIndex,
        /// The committed index.
        commit: LogIndex,
    },
    /// Options that cannot work together.
    #[error("invalid wal options: {0}")]
    InvalidOptions(String),
}

impl Error {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }
}

/// The WAL's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
