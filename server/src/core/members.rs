//! The one home of membership and addresses: the membership history by index (from the log
//! start on) and the nodes' replicated addresses. Consensus keeps the membership it acts on;
//! this keeps what the node needs besides: the membership at any retained index (for the
//! log-start record of a trim), and where each node listens.

use std::collections::BTreeMap;

use raftwal_consensus::{ConfChange, LogIndex, Membership, NodeId};

use crate::envelope::Addresses;

/// Membership history and addresses. Invariant: `history` is never empty and its indexes
/// increase; its first element is the membership in effect at the log start.
#[derive(Debug)]
pub struct Members {
    history: Vec<(LogIndex, Membership)>,
    addresses: BTreeMap<NodeId, Addresses>,
}

impl Members {
    /// The membership in effect at `at` (the index before the log start), with the addresses
    /// kept with the log start.
    pub fn new(at: LogIndex, membership: Membership, addresses: Vec<Addresses>) -> Members {
        Members {
            history: vec![(at, membership)],
            addresses: addresses.into_iter().map(|a| (a.id, a)).collect(),
        }
    }

    /// The latest membership (applied, or about to be).
    pub fn current(&self) -> &Membership {
        &self.history.last().expect("history is never empty").1
    }

    /// The membership in effect at `index` (the oldest one known when `index` is older).
    pub fn at(&self, index: LogIndex) -> Membership {
        self.history.iter().rev().find(|(i, _)| *i <= index).unwrap_or(&self.history[0]).1.clone()
    }

    /// Records a committed membership change at `index`, by the rule consensus applies: an
    /// invalid change is ignored by every node.
    pub fn apply_change(&mut self, index: LogIndex, change: &ConfChange) {
        if let Ok(next) = self.current().apply(change) {
            self.history.push((index, next));
        }
    }

    /// Whether `change` would be accepted against the current membership.
    pub fn check_change(&self, change: &ConfChange) -> Result<(), String> {
        self.current().apply(change).map(|_| ()).map_err(|e| e.to_string())
    }

    /// The log starts after `at` now: keep only the history from the membership in effect
    /// there.
    pub fn start_at(&mut self, at: LogIndex, membership: Membership) {
        self.history.retain(|(i, _)| *i > at);
        self.history.insert(0, (at, membership));
    }

    /// Forgets history older than the membership in effect at `at` (the log start - 1).
    pub fn forget_before(&mut self, at: LogIndex) {
        if let Some(keep_from) = self.history.iter().rposition(|(i, _)| *i <= at)
            && keep_from > 0
        {
            self.history.drain(..keep_from);
        }
    }

    /// Records a node's replicated addresses.
    pub fn set_addresses(&mut self, a: Addresses) {
        self.addresses.insert(a.id, a);
    }

    /// Every node's replicated addresses.
    pub fn addresses(&self) -> &BTreeMap<NodeId, Addresses> {
        &self.addresses
    }

    /// The addresses of the current members.
    pub fn member_addresses(&self) -> Vec<Addresses> {
        let members = self.current().members();
        self.addresses.values().filter(|a| members.contains(&a.id)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftwal_consensus::ConfStep;

    #[test]
    fn history_answers_by_index_and_ignores_invalid_changes() {
        let mut m = Members::new(LogIndex(0), Membership::new([NodeId(1)]), vec![]);
        m.apply_change(LogIndex(5), &ConfChange::Simple(ConfStep::AddLearner(NodeId(2))));
        // Removing a node that is not a member is invalid: ignored, as consensus does.
        m.apply_change(LogIndex(6), &ConfChange::Simple(ConfStep::Remove(NodeId(9))));
        assert_eq!(m.at(LogIndex(4)), Membership::new([NodeId(1)]));
        assert!(m.at(LogIndex(5)).is_learner(NodeId(2)));
        assert!(m.current().is_learner(NodeId(2)));
        m.forget_before(LogIndex(5));
        assert!(m.at(LogIndex(0)).is_learner(NodeId(2)), "the oldest kept answers for older");
    }
}
