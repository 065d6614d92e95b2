//! The entry the WAL appends; the domain integers come from raftwal-types.

pub use raftwal_types::{HardState, LogIndex, NodeId, Term};

/// One entry to append: its position, term and payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Raft term of the entry.
    pub term: Term,
    /// Raft index of the entry; a batch must be contiguous and continue the log.
    pub index: LogIndex,
    /// The record bytes.
    pub payload: &'a [u8],
}
