//! What nodes say to each other, and the entries they replicate.

use bytes::Bytes;
use raftwal_types::{LogIndex, NodeId, Term};

use crate::membership::{ConfChange, Membership};

/// Identifies one replicated log. A node may one day host many groups over one connection; every
/// message names its group so that the transport can route it without decoding the body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

/// What an entry means to consensus. The caller stores the kind with the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// A client record; consensus never looks inside it.
    Normal = 0,
    /// The empty entry a new leader appends so that it can commit entries of its term.
    Noop = 1,
    /// A membership change; `data` is a [`ConfChange`] in its [`ConfChange::encode`] form.
    ConfChange = 2,
}

impl EntryKind {
    /// The kind stored as `byte`, or `None` for a byte no version of raftwal writes.
    pub fn from_u8(byte: u8) -> Option<EntryKind> {
        match byte {
            0 => Some(EntryKind::Normal),
            1 => Some(EntryKind::Noop),
            2 => Some(EntryKind::ConfChange),
            _ => None,
        }
    }
}

/// One log entry.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The term of the leader that created it.
    pub term: Term,
    /// Its position; contiguous from the log's first index.
    pub index: LogIndex,
    /// What it means to consensus.
    pub kind: EntryKind,
    /// Its payload.
    pub data: Bytes,
}

impl Entry {
    /// The bytes this entry counts for in message-size, inflight and uncommitted-size limits.
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// The membership change this entry carries, if it is a well-formed one.
    pub fn conf_change(&self) -> Option<ConfChange> {
        match self.kind {
            EntryKind::ConfChange => ConfChange::decode(&self.data),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.term, self.index)?;
        match self.kind {
            EntryKind::Normal => write!(f, " {:?}", String::from_utf8_lossy(&self.data)),
            EntryKind::Noop => write!(f, " noop"),
            EntryKind::ConfChange => match self.conf_change() {
                Some(cc) => write!(f, " {cc}"),
                None => write!(f, " conf-change(invalid)"),
            },
        }
    }
}

/// A read barrier's answer: once the caller has applied through `index`, a read issued with
/// `context` may be served from local state and is linearizable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The commit index the leader held, confirmed by a quorum, when the request reached it.
    pub index: LogIndex,
    /// The caller's context from [`crate::RawNode::read_index`].
    pub context: u64,
}

/// Where a follower's log must restart: what a leader sends a follower that needs entries the
/// leader has already compacted. For a log service the "snapshot" is just this: the new first
/// index, the term before it, and the membership as of that point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogStart {
    /// The first index the log holds after the restart.
    pub first_index: LogIndex,
    /// The term of the entry at `first_index - 1`.
    pub prev_term: Term,
    /// The membership as of `first_index - 1`.
    pub membership: Membership,
}

/// A message between two nodes of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The group the message belongs to.
    pub group: GroupId,
    /// The sender.
    pub from: NodeId,
    /// The recipient.
    pub to: NodeId,
    /// The sender's term (for a pre-vote request, the term it would campaign in).
    pub term: Term,
    /// What it says.
    pub body: MessageBody,
}

/// The kinds of message and what each carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Would you vote for me in `term` (without anyone changing term yet)?
    PreVote { last_index: LogIndex, last_term: Term },
    /// The answer to a pre-vote.
    PreVoteResp { reject: bool },
    /// Vote for me in `term`. `transfer` is set when the current leader asked for this election,
    /// so that voters do not ignore it under check-quorum's leader lease.
    Vote { last_index: LogIndex, last_term: Term, transfer: bool },
    /// The answer to a vote request.
    VoteResp { reject: bool },
    /// Append `entries` after `(prev_index, prev_term)`; the leader's commit index is `commit`.
    App { prev_index: LogIndex, prev_term: Term, entries: Vec<Entry>, commit: LogIndex },
    /// The answer to an append. Accepted: the follower durably holds the leader's log through
    /// `index`. Rejected: `index` is the rejected `prev_index`, and the hint says where the
    /// follower's log could match: its last index at or below `index` whose term is at most the
    /// leader's `prev_term`.
    AppResp { index: LogIndex, reject: Option<RejectHint> },
    /// The leader is alive; the follower may commit through `commit` (at most what it matches).
    /// `read` names the read barrier this round confirms, if any.
    Heartbeat { commit: LogIndex, read: Option<u64> },
    /// The answer to a heartbeat, echoing its `read`.
    HeartbeatResp { read: Option<u64> },
    /// Discard your log and restart it at `start` (the follower needs entries the leader has
    /// compacted). `commit` is the leader's commit index.
    InstallLog { start: LogStart, commit: LogIndex },
    /// Campaign now, skipping pre-vote: the leader is handing leadership to you.
    TimeoutNow,
    /// A follower asks the leader for a read barrier on behalf of its caller's `context`.
    ReadIndex { context: u64 },
    /// The leader's answer to a forwarded read barrier.
    ReadIndexResp { context: u64, index: LogIndex },
    /// A node whose log damage cut below its repair floor, knowing no leader, asks any member
    /// for the entries after its last one, `(last_index, last_term)`; only a member whose log
    /// is at least as up to date as the floor `(floor_index, floor_term)` answers (zero: none).
    /// Sent to a leader, it says where the node's log ends. Changes no one's term.
    RepairReq { last_index: LogIndex, last_term: Term, floor_index: LogIndex, floor_term: Term },
    /// The answer: entries of the sender's log after `(prev_index, prev_term)`, committed or
    /// not. Changes no one's term.
    RepairResp { prev_index: LogIndex, prev_term: Term, entries: Vec<Entry> },
    /// The leader to a follower whose log no longer holds what it acknowledged in this term:
    /// you acknowledged through `(index, term)` (so it is a floor for the follower's votes
    /// until its log is back there; [`crate::Restored::tail_cut`]).
    AckedThrough { index: LogIndex, term: Term },
    /// The answer to a repair request whose last entry the sender has compacted: restart your
    /// log at my log start (a committed point), then ask again. Changes no one's term.
    RepairStart { start: LogStart },
}

/// Where a rejecting follower's log might match the leader's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectHint {
    /// The follower's last index at or below the rejected index whose term is at most the
    /// leader's `prev_term`.
    pub index: LogIndex,
    /// The term of that entry in the follower's log.
    pub term: Term,
}

impl MessageBody {
    /// A short name, for logs, metrics and the interaction tests.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::PreVote { .. } => "PreVote",
            MessageBody::PreVoteResp { .. } => "PreVoteResp",
            MessageBody::Vote { .. } => "Vote",
            MessageBody::VoteResp { .. } => "VoteResp",
            MessageBody::App { .. } => "App",
            MessageBody::AppResp { .. } => "AppResp",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResp { .. } => "HeartbeatResp",
            MessageBody::InstallLog { .. } => "InstallLog",
            MessageBody::TimeoutNow => "TimeoutNow",
            MessageBody::ReadIndex { .. } => "ReadIndex",
            MessageBody::ReadIndexResp { .. } => "ReadIndexResp",
            MessageBody::RepairReq { .. } => "RepairReq",
            MessageBody::RepairResp { .. } => "RepairResp",
            MessageBody::AckedThrough { .. } => "AckedThrough",
            MessageBody::RepairStart { .. } => "RepairStart",
        }
    }

    /// Whether the message belongs on the control stream (small, latency-sensitive) rather than
    /// the replication stream (large, ordered) or the catch-up stream.
    pub fn is_control(&self) -> bool {
        !matches!(
            self,
            MessageBody::App { .. }
                | MessageBody::AppResp { .. }
                | MessageBody::InstallLog { .. }
                | MessageBody::RepairResp { .. }
                | MessageBody::RepairStart { .. }
        )
    }
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{} {} term={}", self.from, self.to, self.body.name(), self.term)?;
        match &self.body {
            MessageBody::PreVote { last_index, last_term }
            | MessageBody::Vote { last_index, last_term, transfer: false } => {
                write!(f, " last={last_term}/{last_index}")
            }
            MessageBody::Vote { last_index, last_term, transfer: true } => {
                write!(f, " last={last_term}/{last_index} transfer")
            }
            MessageBody::PreVoteResp { reject } | MessageBody::VoteResp { reject } => {
                f.write_str(if *reject { " rejected" } else { " granted" })
            }
            MessageBody::App { prev_index, prev_term, entries, commit } => {
                write!(f, " prev={prev_term}/{prev_index} commit={commit}")?;
                if !entries.is_empty() {
                    write!(f, " entries={entries:?}")?;
                }
                Ok(())
            }
            MessageBody::AppResp { index, reject: None } => write!(f, " index={index}"),
            MessageBody::AppResp { index, reject: Some(hint) } => {
                write!(f, " rejected index={index} hint={}/{}", hint.term, hint.index)
            }
            MessageBody::Heartbeat { commit, read } => {
                write!(f, " commit={commit}")?;
                if let Some(read) = read {
                    write!(f, " read={read}")?;
                }
                Ok(())
            }
            MessageBody::HeartbeatResp { read: Some(read) } => write!(f, " read={read}"),
            MessageBody::HeartbeatResp { read: None } | MessageBody::TimeoutNow => Ok(()),
            MessageBody::InstallLog { start, commit } => write!(
                f,
                " first={} prev_term={} commit={commit} {}",
                start.first_index, start.prev_term, start.membership
            ),
            MessageBody::ReadIndex { context } => write!(f, " context={context}"),
            MessageBody::ReadIndexResp { context, index } => {
                write!(f, " context={context} index={index}")
            }
            MessageBody::RepairReq { last_index, last_term, floor_index, floor_term } => {
                write!(f, " last={last_term}/{last_index} floor={floor_term}/{floor_index}")
            }
            MessageBody::RepairStart { start } => write!(
                f,
                " first={} prev_term={} {}",
                start.first_index, start.prev_term, start.membership
            ),
            MessageBody::RepairResp { prev_index, prev_term, entries } => {
                write!(f, " prev={prev_term}/{prev_index} entries={entries:?}")
            }
            MessageBody::AckedThrough { index, term } => write!(f, " through={term}/{index}"),
        }
    }
}
