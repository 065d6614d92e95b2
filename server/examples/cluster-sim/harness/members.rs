//! An operator changing the membership while everything else runs: add the spare node as a
//! learner (with its addresses), promote it, remove a voter, which becomes the next spare.

use raftwal_consensus::{ConfChange, ConfStep};
use raftwal_server::envelope::Addresses;

use super::*;

/// Where the operator is in its cycle.
#[derive(Debug)]
pub(super) struct MemberPlan {
    /// The node to add next (not a member).
    pub spare: NodeId,
    /// 0: add the spare as a learner; 1: promote it; 2: remove a voter.
    pub step: u8,
    /// The request in flight: (request id, its deadline).
    pub in_flight: Option<(u64, u64)>,
    pub next_ms: u64,
}

impl MemberPlan {
    pub fn new(spare: NodeId) -> MemberPlan {
        MemberPlan { spare, step: 0, in_flight: None, next_ms: 500 }
    }
}

impl Sim {
    pub(super) fn step_members(&mut self) {
        if let Some((id, deadline)) = self.members.in_flight {
            if self.now >= deadline {
                self.member_requests.remove(&id);
                self.members.in_flight = None;
                self.resync_members();
            }
            return;
        }
        // No changes in the last 1.5 s: the run ends by checking the cluster is live.
        if self.now < self.members.next_ms || self.now + 1500 > END_MS {
            return;
        }
        let Some(l) = self.leader_index() else {
            self.members.next_ms = self.now + 20;
            return;
        };
        let change = match self.members.step {
            0 => ConfChange::Simple(ConfStep::AddLearner(self.members.spare)),
            1 => ConfChange::Simple(ConfStep::AddVoter(self.members.spare)),
            _ => {
                let voters = self.nodes[l].live.as_ref().expect("leader").core.status().membership;
                let candidates: Vec<NodeId> =
                    voters.voters.iter().copied().filter(|v| *v != self.members.spare).collect();
                if candidates.is_empty() {
                    self.log(format!("operator: nothing to remove from {voters:?}"));
                    self.members.next_ms = self.now + 100;
                    self.resync_members();
                    return;
                }
                let victim = candidates[self.rng.below(candidates.len() as u64) as usize];
                ConfChange::Simple(ConfStep::Remove(victim))
            }
        };
        let addresses = (self.members.step == 0).then(|| Addresses {
            id: self.members.spare,
            peer: "127.0.0.1:9".parse().expect("literal address"),
            api: format!("sim-node-{}", self.members.spare),
        });
        let id = self.next_request;
        self.next_request += 1;
        self.member_requests.insert(id, change.clone());
        self.members.in_flight = Some((id, self.now + REQUEST_TIMEOUT_MS));
        self.log(format!("operator: {change:?}"));
        self.input(l, Input::Request { id, request: Request::ConfChange { change, addresses } });
    }

    pub(super) fn member_reply(&mut self, change: ConfChange, outcome: Outcome) {
        self.members.in_flight = None;
        self.log(format!("operator: {change:?} -> {outcome:?}"));
        match outcome {
            Ok(_) => {
                if let ConfChange::Simple(ConfStep::Remove(victim)) = change {
                    self.members.spare = victim;
                }
                self.members.step = (self.members.step + 1) % 3;
                self.members.next_ms = self.now + 200 + self.rng.below(600);
            }
            Err(_) => {
                self.members.next_ms = self.now + 20 + self.rng.below(100);
                self.resync_members();
            }
        }
    }

    /// After a refusal or an unknown outcome, take the step the leader's membership calls for.
    fn resync_members(&mut self) {
        let Some(l) = self.leader_index() else { return };
        let m = self.nodes[l].live.as_ref().expect("leader").core.status().membership;
        let spare = self.members.spare;
        self.members.step = if m.is_learner(spare) {
            1
        } else if m.is_voter(spare) {
            2
        } else {
            0
        };
    }
}
