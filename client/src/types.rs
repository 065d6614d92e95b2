//! The values the client hands back: offsets, node ids, appended ranges, records and batches.

use bytes::Bytes;

use crate::error::ClientError;
use crate::proto;

raftwal_types::newtype_u64!(
    /// The position of a record in the log: the Raft index of the entry that holds it.
    ///
    /// Offsets increase strictly along the log but may skip (internal entries take an offset
    /// and are never returned as records), so never compute one by counting records.
    Offset
);

/// A cluster member's id (the id every raftwal crate uses).
pub use raftwal_types::NodeId;

impl Offset {
    /// The offset after this one (saturating: `u64::MAX` is never a real offset).
    pub const fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The offset of the first record; the records of one append have consecutive offsets.
    pub first_offset: Offset,
    /// The offset of the last record.
    pub last_offset: Offset,
    /// The append had already committed (an earlier attempt whose answer was lost); the offsets
    /// are the original ones. (When the server no longer knows them, the client reports
    /// [`ClientError::UnknownOutcome`] instead.)
    pub duplicate: bool,
}

impl Appended {
    /// The outcome an append answer reports. A duplicate without offsets (0: no record has
    /// offset 0) means the server saw a later sequence of this producer applied and no longer
    /// knows this one's offsets: it was applied earlier or never will be, so its outcome is
    /// unknown to the caller.
    pub(crate) fn from_answer(
        answer: &proto::AppendResponse,
        attempts: u32,
    ) -> Result<Appended, ClientError> {
        if answer.duplicate && answer.first_offset == 0 {
            return Err(ClientError::UnknownOutcome {
                attempts,
                last: "the server reports a duplicate whose offsets it no longer knows".into(),
            });
        }
        Ok(Appended::from_proto(answer))
    }

    pub(crate) fn from_proto(response: &proto::AppendResponse) -> Appended {
        Appended {
            first_offset: Offset(response.first_offset),
            last_offset: Offset(response.last_offset),
            duplicate: response.duplicate,
        }
    }
}

/// Options of one append.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendOptions {
    /// If set, the append happens only if its first record gets exactly this offset; otherwise
    /// it fails with [`ClientError::OffsetMismatch`](crate::ClientError::OffsetMismatch).
    pub expected_next_offset: Option<Offset>,
}

/// One committed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its offset in the log.
    pub offset: Offset,
    /// Its bytes, as appended.
    pub data: Bytes,
}

impl Record {
    pub(crate) fn from_proto(record: proto::Record) -> Record {
        Record { offset: Offset(record.offset), data: Bytes::from(record.data) }
    }
}

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadBatch {
    /// Committed records, offsets strictly increasing, none below the offset asked for.
    pub records: Vec<Record>,
    /// Where the next read should start: past the last record and past any internal entries
    /// the server skipped.
    pub next_offset: Offset,
    /// The commit offset of the node that served the read. A follower may lag the leader, so a
    /// read from it may not yet see an append the leader has acknowledged.
    pub commit_offset: Offset,
}

/// One event of a [`Follow`](crate::Follow) stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowEvent {
    /// Committed records, never empty, in offset order, each offset above every offset the
    /// stream yielded before.
    Records(Vec<Record>),
    /// The node serving the stream had sent everything it had committed when the stream
    /// (re)connected; what follows are live records. Yielded each time a server sends one, so
    /// once per (re)connection.
    CaughtUp {
        /// Where the stream stands: every record below this offset has been yielded.
        next_offset: Offset,
    },
}

/// A member of the cluster, as a membership change reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// "voter", "learner" or "voter (outgoing)", as the server names it.
    pub kind: String,
    /// Its client API address ("host:port"), empty when unknown.
    pub addr: String,
}

/// The outcome of a membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The offset of the membership entry, committed and applied.
    pub offset: Offset,
    /// The members after the change.
    pub members: Vec<Member>,
}

impl Membership {
    pub(crate) fn from_proto(response: proto::MembershipResponse) -> Membership {
        Membership {
            offset: Offset(response.offset),
            members: response
                .members
                .into_iter()
                .map(|m| Member { id: NodeId(m.id), kind: m.kind, addr: m.addr })
                .collect(),
        }
    }
}
