//! Read barriers waiting for a quorum to confirm that the leader still leads (ReadIndex).

use std::collections::{BTreeMap, VecDeque};

use raftwal_types::{LogIndex, NodeId};

use crate::membership::Membership;

/// A read barrier the leader has registered: it may be answered with `index` once a quorum has
/// acknowledged a heartbeat round numbered `seq` or later.
#[derive(Clone, Debug)]
pub(crate) struct PendingRead {
    pub(crate) seq: u64,
    pub(crate) index: LogIndex,
    /// The follower that forwarded it, or `None` for the leader's own caller.
    pub(crate) requester: Option<NodeId>,
    pub(crate) context: u64,
}

/// Pending read barriers of the current leadership, oldest first.
///
/// Heartbeats carry the newest round number; a follower's answer to round `s` proves it still
/// followed this leader after every request numbered `s` or lower was registered, so a quorum of
/// answers at or above `s` releases them all.
#[derive(Debug, Default)]
pub(crate) struct ReadOnly {
    queue: VecDeque<PendingRead>,
    next_seq: u64,
    acked: BTreeMap<NodeId, u64>,
}

/// Pending reads one leader keeps; beyond this the oldest are answered by the next round only.
pub(crate) const PENDING_READS_MAX: usize = 64 * 1024;

impl ReadOnly {
    /// Registers a read at `index`; returns its round number to put in the heartbeat.
    pub(crate) fn add(&mut self, index: LogIndex, requester: Option<NodeId>, context: u64) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.queue.push_back(PendingRead { seq, index, requester, context });
        seq
    }

    pub(crate) fn is_full(&self) -> bool {
        self.queue.len() >= PENDING_READS_MAX
    }

    /// The newest round with a pending read, to repeat in heartbeats until it is confirmed.
    pub(crate) fn latest_pending(&self) -> Option<u64> {
        self.queue.back().map(|read| read.seq)
    }

    pub(crate) fn ack(&mut self, from: NodeId, seq: u64) {
        let acked = self.acked.entry(from).or_default();
        *acked = (*acked).max(seq);
    }

    /// Removes and returns every read a quorum has confirmed.
    pub(crate) fn release(&mut self, membership: &Membership, me: NodeId) -> Vec<PendingRead> {
        let confirmed = membership.quorum_value(|id| {
            if id == me { u64::MAX } else { self.acked.get(&id).copied().unwrap_or(0) }
        });
        let mut done = Vec::new();
        while self.queue.front().is_some_and(|read| read.seq <= confirmed) {
            done.extend(self.queue.pop_front());
        }
        done
    }
}
