//! What a node is told when it starts: who it is, how it times, and the limits it enforces.

use raftwal_types::NodeId;

use crate::error::Error;
use crate::message::GroupId;

/// A node's consensus settings. Every limit has a name ending in its unit.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node. Zero is reserved.
    pub id: NodeId,
    /// The group this node belongs to; messages for another group are refused.
    pub group: GroupId,
    /// Ticks without hearing from a leader before a follower campaigns. The real timeout is
    /// drawn from `[election_ticks, 2 * election_ticks)` so that candidates rarely collide.
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats. Must be below `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Run a pre-vote round before raising the term, so that a node that was cut off cannot
    /// disrupt a healthy leader when it rejoins (Raft thesis 9.6).
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum for an election timeout, and
    /// followers ignore vote requests while they hear from a leader (the leader lease).
    pub check_quorum: bool,
    /// The most entry bytes in one append message (a single larger entry still goes alone).
    pub msg_bytes_max: u64,
    /// The most entries in one append message. Each entry costs the transport a header whatever
    /// its size, so a byte bound alone lets a message of many tiny entries outgrow what a
    /// receiver accepts; the caller sets this from its transport's limit.
    pub msg_entries_max: usize,
    /// Appends in flight to one follower, by count.
    pub inflight_msgs_max: usize,
    /// Appends in flight to one follower, by entry bytes.
    pub inflight_bytes_max: u64,
    /// Proposed but uncommitted entry bytes the leader accepts; beyond it proposals fail with
    /// [`Error::UncommittedBytesExceeded`].
    pub uncommitted_bytes_max: u64,
    /// Committed entry bytes handed out in one Ready (at least one entry always is).
    pub apply_bytes_max: u64,
    /// Seeds the election jitter, so that a run replays exactly.
    pub seed: u64,
}

impl Config {
    /// Settings suited to a LAN with a 100 ms tick: elections after 1-2 s, heartbeats every
    /// 100 ms, pre-vote and check-quorum on, messages of 1 MiB or 8,192 entries, a 256-message or
    /// 32 MiB window,
    /// 64 MiB uncommitted.
    pub fn new(id: NodeId, seed: u64) -> Config {
        Config {
            id,
            group: GroupId(1),
            election_ticks: 10,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            msg_bytes_max: 1 << 20,
            msg_entries_max: 8192,
            inflight_msgs_max: 256,
            inflight_bytes_max: 32 << 20,
            uncommitted_bytes_max: 64 << 20,
            apply_bytes_max: 64 << 20,
            seed,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason| Err(Error::InvalidConfig { reason });
        if self.id.0 == 0 {
            return invalid("the node id must not be zero");
        }
        if self.heartbeat_ticks == 0 {
            return invalid("heartbeat_ticks must be at least 1");
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return invalid("election_ticks must be greater than heartbeat_ticks");
        }
        if self.election_ticks > 1 << 20 {
            return invalid("election_ticks is implausibly large");
        }
        if self.inflight_msgs_max == 0 || self.inflight_bytes_max == 0 {
            return invalid("the inflight window must allow at least one message and byte");
        }
        if self.msg_entries_max == 0 {
            return invalid("msg_entries_max must be at least 1");
        }
        if self.msg_bytes_max == 0 || self.uncommitted_bytes_max == 0 || self.apply_bytes_max == 0 {
            return invalid("byte limits must be positive");
        }
        Ok(())
    }
}
