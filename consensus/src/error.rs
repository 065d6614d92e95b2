//! Why a call into consensus was refused.

use raftwal_types::{LogIndex, NodeId};

use crate::message::GroupId;
use crate::storage::StoreError;

/// Everything consensus refuses, with what the caller needs to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Only the leader accepts this; `leader` is the leader this node knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader.
        leader: Option<NodeId>,
    },
    /// Leadership is being handed to `to`; proposals wait until that settles.
    #[error("leadership is being transferred to {to}")]
    TransferInProgress {
        /// The transfer's target.
        to: NodeId,
    },
    /// Accepting the proposal would take the leader's uncommitted bytes past its limit.
    #[error(
        "{uncommitted_bytes} bytes are uncommitted; {proposed_bytes} more would exceed {max_bytes}"
    )]
    UncommittedBytesExceeded {
        /// Bytes proposed and not yet committed.
        uncommitted_bytes: u64,
        /// The bytes of the refused proposal.
        proposed_bytes: u64,
        /// The limit, `Config::uncommitted_bytes_max`.
        max_bytes: u64,
    },
    /// A membership change is already in the log at `index` and not yet applied.
    #[error("a membership change at {index} is not applied yet")]
    ConfChangePending {
        /// The pending change's index.
        index: LogIndex,
    },
    /// The membership change is not allowed from the current membership.
    #[error("invalid membership change: {reason}")]
    InvalidConfChange {
        /// Why.
        reason: &'static str,
    },
    /// The leadership transfer cannot be done.
    #[error("invalid leadership transfer: {reason}")]
    InvalidTransfer {
        /// Why.
        reason: &'static str,
    },
    /// A message for another group reached this node.
    #[error("message for group {got:?} reached group {expected:?}")]
    WrongGroup {
        /// This node's group.
        expected: GroupId,
        /// The message's group.
        got: GroupId,
    },
    /// A peer sent something no correct node sends. It is dropped; nothing changed.
    #[error("invalid message from {from}: {reason}")]
    InvalidMessage {
        /// The sender.
        from: NodeId,
        /// What was wrong.
        reason: &'static str,
    },
    /// The configuration cannot work.
    #[error("invalid config: {reason}")]
    InvalidConfig {
        /// Why.
        reason: &'static str,
    },
    /// The restored state contradicts the log.
    #[error("invalid restored state: {reason}")]
    InvalidRestore {
        /// Why.
        reason: &'static str,
    },
    /// The log store failed. The node must stop: drop the RawNode and do not restart it on the
    /// same store until the cause is known.
    #[error(transparent)]
    Store(#[from] StoreError),
}
