//! raftwal-consensus: Raft as a pure, deterministic state machine, in the shape of etcd raft's
//! `RawNode`/`Ready`.
//!
//! What it is: the whole Raft protocol for one group (leader election with pre-vote and
//! check-quorum, replication with Probe/Replicate/Snapshot progress and an inflight window by
//! count and bytes, fast backtracking, ReadIndex, leadership transfer, learners, joint consensus
//! and log restarts for followers behind the leader's first index). What it is not: it has no
//! clock, no IO, no threads and no global randomness. Time is [`RawNode::tick`]; election jitter
//! comes from [`Config::seed`]; the log is read through the [`LogStore`] trait and written by the
//! caller. So a whole cluster can run inside one test, replayable from one seed.
//!
//! The loop a caller runs:
//! ```text
//! loop {
//!     on a timer:           node.tick()
//!     on a peer message:    node.step(msg)
//!     on client requests:   node.propose(records) / read_index / conf change / transfer
//!     if node.has_ready() {
//!         let rd = node.ready()?;
//!         send rd.messages now;
//!         persist rd.log_start, rd.entries, rd.hard_state (in that order);
//!         once durable: send rd.persisted_messages, node.advance(rd.number);
//!         apply rd.committed_entries (persisting rd.membership), serve rd.read_states;
//!     }
//! }
//! ```
//! The ordering contract of each [`Ready`] field is on the struct. The leader's own entries
//! count toward commit only once `advance` reports them durable; followers acknowledge only
//! durable entries, because acknowledgements travel in `persisted_messages`.

#![forbid(unsafe_code)]

mod config;
mod error;
mod log;
mod membership;
mod message;
mod progress;
mod raft;
mod raw_node;
mod read_only;
mod rng;
mod storage;

pub use config::Config;
pub use error::Error;
pub use membership::{ConfChange, ConfStep, Membership, VoteResult};
pub use message::{
    Entry, EntryKind, GroupId, LogStart, Message, MessageBody, ReadState, RejectHint,
};
pub use progress::{Inflights, Progress, ProgressState};
pub use raft::Role;
pub use raftwal_types::{HardState, LogIndex, NodeId, Term};
pub use raw_node::{RawNode, Ready, Restored, SoftState, Status, bootstrap};
pub use rng::SplitMix64;
pub use storage::{LogStore, MemLog, StoreError};
