//! The workload: proposals, read barriers, transfers, membership changes, compaction.

use super::*;

impl Sim {
    pub(super) fn workload(&mut self) -> Check {
        if self.rng.chance(self.params.propose_ppm) {
            let leaders = self.leaders_up();
            let target = if self.rng.chance(900_000) { self.rng.pick(&leaders) } else { None };
            if let Some(i) = target.or_else(|| self.rng.pick(&self.up())) {
                let count = self.rng.between(1, 3);
                self.propose(i, count, "p")?;
            }
        }
        if let Some(i) = self.pick_if(self.params.read_ppm, self.up()) {
            self.read(i)?;
        }
        if let Some(i) = self.pick_if(self.params.transfer_ppm, self.leaders_up()) {
            self.transfer(i)?;
        }
        if let Some(i) = self.pick_if(self.params.conf_ppm, self.leaders_up()) {
            self.conf_change(i)?;
        }
        if let Some(i) = self.pick_if(self.params.compact_ppm, self.up()) {
            self.compact(i);
        }
        if let Some(i) = self.pick_if(self.params.campaign_ppm, self.up()) {
            self.trace(format_args!("node {} campaigns", i + 1));
            if let Err(err) = self.raw(i).campaign() {
                return Err(self.fail(format!("node {} campaign: {err}", i + 1)));
            }
            self.drain(i)?;
        }
        if let Some(i) = self.pick_if(self.params.unreachable_ppm, self.leaders_up()) {
            let members: Vec<NodeId> =
                self.raw(i).status().membership.members().into_iter().collect();
            if let Some(peer) = self.rng.pick(&members) {
                self.trace(format_args!("node {} reports {peer} unreachable", i + 1));
                self.raw(i).report_unreachable(peer);
                self.drain(i)?;
            }
        }
        Ok(())
    }

    /// With probability `ppm`, a node from `pool`.
    pub(super) fn pick_if(&mut self, ppm: u64, pool: Vec<usize>) -> Option<usize> {
        if self.rng.chance(ppm) { self.rng.pick(&pool) } else { None }
    }

    pub(super) fn propose(&mut self, i: usize, count: u64, tag: &str) -> Check {
        let id = self.nodes[i].id;
        let data: Vec<Bytes> = (0..count)
            .map(|_| {
                self.next_proposal += 1;
                Bytes::from(format!("{tag}-s{}-{}", self.opts.seed, self.next_proposal))
            })
            .collect();
        let result = self.raw(i).propose(data.clone());
        match result {
            Ok(range) => {
                self.stats.proposals += count;
                let term = self.raw(i).status().term;
                let indexes: Vec<LogIndex> =
                    (range.start().0..=range.end().0).map(LogIndex).collect();
                if indexes.len() != data.len() {
                    return Err(
                        self.fail(format!("node {id} took {} records at {range:?}", data.len()))
                    );
                }
                self.trace(format_args!("node {id} proposes {count} at {range:?} term {term}"));
                if tag == "live" {
                    self.live_attempt = Some((i, self.nodes[i].incarnation, indexes[0]));
                }
                for (index, d) in indexes.into_iter().zip(data) {
                    self.nodes[i].proposals.insert(index, (term, d));
                }
            }
            Err(
                Error::NotLeader { .. }
                | Error::TransferInProgress { .. }
                | Error::UncommittedBytesExceeded { .. },
            ) => {}
            Err(err) => return Err(self.fail(format!("node {id} propose: {err}"))),
        }
        self.drain(i)
    }

    pub(super) fn read(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        self.next_context += 1;
        let context = self.next_context;
        let least = self.max_known_commit;
        match self.raw(i).read_index(context) {
            Ok(()) => {
                self.stats.reads += 1;
                self.reads.insert(context, (id, least));
                self.trace(format_args!("node {id} read_index {context} (at least {least})"));
            }
            Err(Error::NotLeader { .. }) => {}
            Err(err) => return Err(self.fail(format!("node {id} read_index: {err}"))),
        }
        self.drain(i)
    }

    pub(super) fn transfer(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        let voters: Vec<NodeId> =
            self.raw(i).status().membership.all_voters().into_iter().collect();
        let Some(to) = self.rng.pick(&voters) else { return Ok(()) };
        match self.raw(i).transfer_leader(to) {
            Ok(()) => {
                self.stats.transfers += 1;
                self.trace(format_args!("node {id} transfers leadership to {to}"));
            }
            Err(Error::NotLeader { .. } | Error::InvalidTransfer { .. }) => {}
            Err(err) => return Err(self.fail(format!("node {id} transfer_leader: {err}"))),
        }
        self.drain(i)
    }

    /// Proposes a random membership change that keeps the voters within 3..=5.
    pub(super) fn conf_change(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        let m = self.raw(i).status().membership;
        let usable = |n: &Node| !n.retired;
        let voters: Vec<NodeId> = m.voters.iter().copied().collect();
        let learners: Vec<NodeId> = m
            .learners
            .iter()
            .copied()
            .filter(|l| usable(&self.nodes[(l.0 - 1) as usize]))
            .collect();
        let spares: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| usable(n) && !n.ever_member && !m.members().contains(&n.id))
            .map(|n| n.id)
            .collect();
        let change = if m.is_joint() {
            if m.auto_leave && !self.rng.chance(100_000) {
                return Ok(());
            }
            ConfChange::LeaveJoint
        } else {
            let auto_leave = self.rng.chance(500_000);
            let (can_grow, can_shrink) = (voters.len() < 5, voters.len() > 3);
            let l = self.rng.pick(&learners);
            let v = self.rng.pick(&voters);
            let s = self.rng.pick(&spares);
            let simple = ConfChange::Simple;
            let mut options = Vec::new();
            if let Some(s) = s {
                options.push(simple(ConfStep::AddLearner(s)));
            }
            if let Some(l) = l {
                options.push(simple(ConfStep::Remove(l)));
                if can_grow {
                    options.push(simple(ConfStep::AddVoter(l)));
                    let steps = vec![ConfStep::AddVoter(l)];
                    options.push(ConfChange::EnterJoint { steps, auto_leave });
                }
                if let Some(v) = v {
                    let out = if self.rng.chance(500_000) {
                        ConfStep::Remove(v)
                    } else {
                        ConfStep::AddLearner(v)
                    };
                    let steps = vec![ConfStep::AddVoter(l), out];
                    options.push(ConfChange::EnterJoint { steps, auto_leave });
                }
            }
            if let (Some(v), true) = (v, can_shrink) {
                options.push(simple(ConfStep::Remove(v)));
                options.push(simple(ConfStep::AddLearner(v)));
                let steps = vec![ConfStep::AddLearner(v)];
                options.push(ConfChange::EnterJoint { steps, auto_leave });
            }
            match self.rng.pick(&options) {
                Some(change) => change,
                None => return Ok(()),
            }
        };
        match self.raw(i).propose_conf_change(&change) {
            Ok(index) => {
                self.stats.conf_changes += 1;
                self.trace(format_args!("node {id} proposes {change} at {index} (from {m})"));
            }
            Err(
                Error::NotLeader { .. }
                | Error::TransferInProgress { .. }
                | Error::ConfChangePending { .. }
                | Error::InvalidConfChange { .. },
            ) => {}
            Err(err) => return Err(self.fail(format!("node {id} conf change {change}: {err}"))),
        }
        self.drain(i)
    }

    /// Compacts node `i`'s log to somewhere at or below its applied index, where the simulator
    /// knows the membership.
    pub(super) fn compact(&mut self, i: usize) {
        let node = &self.nodes[i];
        let store_first = node.raw.as_ref().expect("picked an up node").store().first_index();
        let hi = node.applied.next();
        if hi <= store_first {
            return;
        }
        // Mostly keep a short tail, so that lagging followers sometimes need a log restart.
        let keep = self.rng.below(hi.0 - store_first.0).min(self.rng.below(30));
        let first = LogIndex(hi.0 - keep);
        let node = &mut self.nodes[i];
        let as_of = first.prev();
        let membership = node
            .memberships
            .iter()
            .rev()
            .find(|(index, _)| *index <= as_of)
            .map(|(_, m)| m.clone())
            .expect("the membership history starts at or before the log");
        if first > node.view.first_index() && first <= node.view.last_index().next() {
            node.view.compact(first, membership.clone());
        }
        let id = node.id;
        self.raw(i).store_mut().compact(first, membership);
        self.stats.compactions += 1;
        self.trace(format_args!("node {id} compacts its log to {first}"));
    }

    // ----- liveness -----

    pub(super) fn liveness_workload(&mut self) -> Check {
        if self.live_acked.is_some() {
            return Ok(());
        }
        let attempt_alive = self.live_attempt.is_some_and(|(i, incarnation, _)| {
            let node = &self.nodes[i];
            node.raw.is_some() && node.incarnation == incarnation && node.role == Role::Leader
        });
        if attempt_alive {
            return Ok(());
        }
        let mut leaders = self.leaders_up();
        leaders.sort_by_key(|&i| std::cmp::Reverse(self.nodes[i].handed_hs.term));
        if let Some(&i) = leaders.first() {
            self.propose(i, 1, "live")?;
        }
        Ok(())
    }
}
