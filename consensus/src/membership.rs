//! Who votes, who learns, and how that changes: majority and joint quorums, and the rules for
//! entering and leaving a joint configuration.

use std::collections::BTreeSet;
use std::fmt;

use raftwal_types::{LogIndex, NodeId};

/// A group's membership. In a joint configuration (`voters_outgoing` non-empty) every decision
/// needs a majority of both `voters` and `voters_outgoing`.
///
/// Invariants: `voters ∪ voters_outgoing` and `learners` are disjoint; `learners_next` holds
/// only outgoing voters that become learners when the joint configuration is left; the
/// incoming `voters` are never empty once the group exists.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// The (incoming) voters.
    pub voters: BTreeSet<NodeId>,
    /// The outgoing voters while joint; empty otherwise.
    pub voters_outgoing: BTreeSet<NodeId>,
    /// Nodes that receive the log but never vote and never campaign.
    pub learners: BTreeSet<NodeId>,
    /// Outgoing voters that become learners when the joint configuration is left.
    pub learners_next: BTreeSet<NodeId>,
    /// Whether the leader leaves the joint configuration on its own once it is applied.
    pub auto_leave: bool,
}

impl Membership {
    /// A plain configuration of `voters`.
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership { voters: voters.into_iter().collect(), ..Membership::default() }
    }

    /// Whether every decision currently needs two majorities.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Whether `id` votes in either half of the configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// Whether `id` is a learner now or becomes one when the joint configuration is left.
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id) || self.learners_next.contains(&id)
    }

    /// Every node that receives the log, in id order.
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        all.extend(&self.voters_outgoing);
        all.extend(&self.learners);
        all.extend(&self.learners_next);
        all
    }

    /// Every voter of either half, in id order.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.voters_outgoing).copied().collect()
    }

    /// The highest index a quorum has, given each voter's acknowledged index. Voters missing
    /// from `acked` count as having nothing.
    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<LogIndex>) -> LogIndex {
        LogIndex(self.quorum_value(|id| acked(id).map_or(0, |index| index.0)))
    }

    /// The largest value a quorum has reached, given each voter's value.
    pub(crate) fn quorum_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        let incoming = majority_value(&self.voters, &value);
        if self.is_joint() {
            incoming.min(majority_value(&self.voters_outgoing, &value))
        } else {
            incoming
        }
    }

    /// The outcome of an election given the votes received so far.
    pub fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        let incoming = majority_vote(&self.voters, &vote);
        if !self.is_joint() {
            return incoming;
        }
        let outgoing = majority_vote(&self.voters_outgoing, &vote);
        match (incoming, outgoing) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }

    /// Applies `change` and returns the resulting membership, or why it is not allowed.
    pub fn apply(&self, change: &ConfChange) -> Result<Membership, &'static str> {
        let mut next = self.clone();
        match change {
            ConfChange::Simple(step) => {
                if self.is_joint() {
                    return Err("a simple change needs a non-joint configuration");
                }
                next.apply_step(*step);
                let changed = self.voters.symmetric_difference(&next.voters).count();
                if changed > 1 {
                    return Err("a simple change may change at most one voter");
                }
            }
            ConfChange::EnterJoint { steps, auto_leave } => {
                if self.is_joint() {
                    return Err("the configuration is already joint");
                }
                if steps.is_empty() {
                    return Err("entering a joint configuration needs at least one change");
                }
                next.voters_outgoing = self.voters.clone();
                next.auto_leave = *auto_leave;
                for step in steps {
                    next.apply_step(*step);
                }
            }
            ConfChange::LeaveJoint => {
                if !self.is_joint() {
                    return Err("the configuration is not joint");
                }
                let demoted = std::mem::take(&mut next.learners_next);
                next.learners.extend(demoted);
                next.voters_outgoing.clear();
                next.auto_leave = false;
            }
        }
        if next.voters.is_empty() {
            return Err("a configuration needs at least one voter");
        }
        Ok(next)
    }

    fn apply_step(&mut self, step: ConfStep) {
        match step {
            ConfStep::AddVoter(id) => {
                self.learners.remove(&id);
                self.learners_next.remove(&id);
                self.voters.insert(id);
            }
            ConfStep::AddLearner(id) => {
                self.voters.remove(&id);
                self.learners.remove(&id);
                self.learners_next.remove(&id);
                // An outgoing voter keeps voting in the old half until the joint configuration
                // is left; only then does it become a learner.
                if self.voters_outgoing.contains(&id) {
                    self.learners_next.insert(id);
                } else {
                    self.learners.insert(id);
                }
            }
            ConfStep::Remove(id) => {
                self.voters.remove(&id);
                self.learners.remove(&id);
                self.learners_next.remove(&id);
            }
        }
    }

    /// The fixed-width little-endian encoding, used inside [`crate::LogStart`] by callers that
    /// persist it: a count then ids for each of the four sets, then the auto-leave flag.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for set in [&self.voters, &self.voters_outgoing, &self.learners, &self.learners_next] {
            out.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for id in set {
                out.extend_from_slice(&id.0.to_le_bytes());
            }
        }
        out.push(u8::from(self.auto_leave));
        out
    }

    /// Decodes [`Membership::encode`]'s output; `None` for anything malformed.
    pub fn decode(bytes: &[u8]) -> Option<Membership> {
        let mut reader = Reader(bytes);
        let mut sets: [BTreeSet<NodeId>; 4] = Default::default();
        for set in &mut sets {
            let count = reader.u32()?;
            for _ in 0..count {
                set.insert(NodeId(reader.u64()?));
            }
        }
        let auto_leave = match reader.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        if !reader.0.is_empty() {
            return None;
        }
        let [voters, voters_outgoing, learners, learners_next] = sets;
        Some(Membership { voters, voters_outgoing, learners, learners_next, auto_leave })
    }
}

fn majority_value(voters: &BTreeSet<NodeId>, value: impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        // An empty half of a joint configuration agrees with anything.
        return u64::MAX;
    }
    let mut values: Vec<u64> = voters.iter().map(|&id| value(id)).collect();
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[voters.len() / 2]
}

fn majority_vote(voters: &BTreeSet<NodeId>, vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let (mut granted, mut missing) = (0, 0);
    for &id in voters {
        match vote(id) {
            Some(true) => granted += 1,
            Some(false) => {}
            None => missing += 1,
        }
    }
    let quorum = voters.len() / 2 + 1;
    if granted >= quorum {
        VoteResult::Won
    } else if granted + missing >= quorum {
        VoteResult::Pending
    } else {
        VoteResult::Lost
    }
}

/// Where an election stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// A quorum granted.
    Won,
    /// A quorum can no longer be reached.
    Lost,
    /// Not decided yet.
    Pending,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = |set: &BTreeSet<NodeId>| {
            set.iter().map(|id| id.0.to_string()).collect::<Vec<_>>().join(",")
        };
        write!(f, "voters=({})", ids(&self.voters))?;
        if self.is_joint() {
            write!(f, "&&({})", ids(&self.voters_outgoing))?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners=({})", ids(&self.learners))?;
        }
        if !self.learners_next.is_empty() {
            write!(f, " learners_next=({})", ids(&self.learners_next))?;
        }
        if self.auto_leave {
            write!(f, " autoleave")?;
        }
        Ok(())
    }
}

/// One change to one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfStep {
    /// Make the node a voter (adding it, or promoting a learner).
    AddVoter(NodeId),
    /// Make the node a learner (adding it, or demoting a voter).
    AddLearner(NodeId),
    /// Remove the node.
    Remove(NodeId),
}

/// A membership change, as proposed and as stored in a [`crate::EntryKind::ConfChange`] entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// One step applied directly; it may change at most one voter.
    Simple(ConfStep),
    /// Enter a joint configuration made of the current voters and the voters after `steps`.
    /// With `auto_leave`, the leader proposes [`ConfChange::LeaveJoint`] as soon as this entry is
    /// applied.
    EnterJoint { steps: Vec<ConfStep>, auto_leave: bool },
    /// Leave the joint configuration for its incoming half.
    LeaveJoint,
}

const CONF_SIMPLE: u8 = 1;
const CONF_ENTER: u8 = 2;
const CONF_LEAVE: u8 = 3;
const STEP_VOTER: u8 = 1;
const STEP_LEARNER: u8 = 2;
const STEP_REMOVE: u8 = 3;
/// No configuration needs more steps than this; a larger count is malformed input.
const CONF_STEPS_MAX: u32 = 1024;

impl ConfChange {
    /// The entry payload: a kind byte, then for steps a count and `(kind, id)` pairs, all fixed
    /// width and little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let push_step = |out: &mut Vec<u8>, step: &ConfStep| {
            let (kind, id) = match *step {
                ConfStep::AddVoter(id) => (STEP_VOTER, id),
                ConfStep::AddLearner(id) => (STEP_LEARNER, id),
                ConfStep::Remove(id) => (STEP_REMOVE, id),
            };
            out.push(kind);
            out.extend_from_slice(&id.0.to_le_bytes());
        };
        match self {
            ConfChange::Simple(step) => {
                out.push(CONF_SIMPLE);
                push_step(&mut out, step);
            }
            ConfChange::EnterJoint { steps, auto_leave } => {
                out.push(CONF_ENTER);
                out.push(u8::from(*auto_leave));
                out.extend_from_slice(&(steps.len() as u32).to_le_bytes());
                for step in steps {
                    push_step(&mut out, step);
                }
            }
            ConfChange::LeaveJoint => out.push(CONF_LEAVE),
        }
        out
    }

    /// Decodes [`ConfChange::encode`]'s output; `None` for anything malformed.
    pub fn decode(bytes: &[u8]) -> Option<ConfChange> {
        let mut reader = Reader(bytes);
        let read_step = |reader: &mut Reader<'_>| {
            let kind = reader.u8()?;
            let id = NodeId(reader.u64()?);
            match kind {
                STEP_VOTER => Some(ConfStep::AddVoter(id)),
                STEP_LEARNER => Some(ConfStep::AddLearner(id)),
                STEP_REMOVE => Some(ConfStep::Remove(id)),
                _ => None,
            }
        };
        let change = match reader.u8()? {
            CONF_SIMPLE => ConfChange::Simple(read_step(&mut reader)?),
            CONF_ENTER => {
                let auto_leave = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let count = reader.u32()?;
                if count > CONF_STEPS_MAX {
                    return None;
                }
                let steps =
                    (0..count).map(|_| read_step(&mut reader)).collect::<Option<Vec<_>>>()?;
                ConfChange::EnterJoint { steps, auto_leave }
            }
            CONF_LEAVE => ConfChange::LeaveJoint,
            _ => return None,
        };
        reader.0.is_empty().then_some(change)
    }
}

impl fmt::Display for ConfChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = |s: &ConfStep| match s {
            ConfStep::AddVoter(id) => format!("v{id}"),
            ConfStep::AddLearner(id) => format!("l{id}"),
            ConfStep::Remove(id) => format!("r{id}"),
        };
        match self {
            ConfChange::Simple(s) => write!(f, "conf({})", step(s)),
            ConfChange::EnterJoint { steps, auto_leave } => {
                let steps: Vec<String> = steps.iter().map(step).collect();
                let mode = if *auto_leave { "auto" } else { "explicit" };
                write!(f, "conf-enter-joint-{mode}({})", steps.join(" "))
            }
            ConfChange::LeaveJoint => write!(f, "conf-leave-joint"),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> BTreeSet<NodeId> {
        v.iter().map(|&i| NodeId(i)).collect()
    }

    #[test]
    fn joint_commit_needs_both_majorities() {
        let m = Membership {
            voters: ids(&[1, 2, 3]),
            voters_outgoing: ids(&[1, 4, 5]),
            ..Default::default()
        };
        let acked = |id: NodeId| {
            Some(LogIndex(match id.0 {
                1 => 9,
                2 => 8,
                3 => 2,
                4 => 3,
                _ => 1,
            }))
        };
        // Incoming majority has 8, outgoing majority has 3.
        assert_eq!(m.committed_index(acked), LogIndex(3));
    }

    #[test]
    fn simple_change_refuses_two_voters() {
        let m = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
        assert!(m.apply(&ConfChange::Simple(ConfStep::AddVoter(NodeId(4)))).is_ok());
        assert!(m.apply(&ConfChange::Simple(ConfStep::AddLearner(NodeId(1)))).is_ok());
        assert!(m.apply(&ConfChange::LeaveJoint).is_err());
        let only = Membership::new([NodeId(1)]);
        assert!(only.apply(&ConfChange::Simple(ConfStep::Remove(NodeId(1)))).is_err());
    }

    #[test]
    fn demoted_outgoing_voter_becomes_learner_on_leave() {
        let m = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
        let change = ConfChange::EnterJoint {
            steps: vec![ConfStep::AddLearner(NodeId(3)), ConfStep::AddVoter(NodeId(4))],
            auto_leave: true,
        };
        let joint = m.apply(&change).expect("valid");
        assert_eq!(joint.voters, ids(&[1, 2, 4]));
        assert_eq!(joint.voters_outgoing, ids(&[1, 2, 3]));
        assert_eq!(joint.learners_next, ids(&[3]));
        assert!(joint.is_voter(NodeId(3)));
        let left = joint.apply(&ConfChange::LeaveJoint).expect("valid");
        assert_eq!(left.voters, ids(&[1, 2, 4]));
        assert_eq!(left.learners, ids(&[3]));
        assert!(!left.is_joint());
    }

    #[test]
    fn encodings_round_trip_and_reject_garbage() {
        let changes = [
            ConfChange::Simple(ConfStep::Remove(NodeId(7))),
            ConfChange::EnterJoint {
                steps: vec![ConfStep::AddVoter(NodeId(1)), ConfStep::AddLearner(NodeId(2))],
                auto_leave: false,
            },
            ConfChange::LeaveJoint,
        ];
        for change in changes {
            let bytes = change.encode();
            assert_eq!(ConfChange::decode(&bytes), Some(change.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(ConfChange::decode(&bytes[..cut]), None);
            }
        }
        assert_eq!(ConfChange::decode(&[2, 0, 255, 255, 255, 255]), None);
        let m = Membership {
            voters: ids(&[1, 2]),
            learners: ids(&[3]),
            auto_leave: true,
            ..Default::default()
        };
        assert_eq!(Membership::decode(&m.encode()), Some(m));
        assert_eq!(Membership::decode(&[9, 9, 9]), None);
    }

    #[test]
    fn vote_result_counts_rejections() {
        let m = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(m.vote_result(|id| (id.0 == 1).then_some(true)), VoteResult::Pending);
        assert_eq!(m.vote_result(|id| Some(id.0 != 3)), VoteResult::Won);
        assert_eq!(m.vote_result(|id| Some(id.0 == 1)), VoteResult::Lost);
    }
}
