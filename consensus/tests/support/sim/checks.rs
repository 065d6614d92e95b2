//! The safety checks: at every Ready, after every step, and at the end of a run.

use super::*;

impl Sim {
    pub(super) fn check_hard_state(
        &self,
        id: NodeId,
        before: HardState,
        after: HardState,
        what: &str,
    ) -> Check {
        if after.term < before.term {
            return Err(self.fail(format!(
                "node {id}: {what} term went back from {} to {}",
                before.term, after.term
            )));
        }
        if after.term == before.term && before.vote.is_some() && after.vote != before.vote {
            return Err(self.fail(format!(
                "node {id}: {what} vote in term {} changed from {:?} to {:?}",
                after.term, before.vote, after.vote
            )));
        }
        if after.commit < before.commit {
            return Err(self.fail(format!(
                "node {id}: {what} commit went back from {} to {}",
                before.commit, after.commit
            )));
        }
        Ok(())
    }

    /// Log matching, checked on every entry handed out: an (index, term) pair names one entry
    /// with one predecessor term, everywhere. By induction two logs that share an (index, term)
    /// then agree on every earlier entry both hold. Also: no committed entry is overwritten.
    pub(super) fn check_entries(&mut self, i: usize, entries: &[Entry]) -> Check {
        let id = self.nodes[i].id;
        let view = &self.nodes[i].view;
        let first = entries[0].index;
        let (lo, hi) = (view.first_index(), view.last_index());
        if first < lo || first > hi.next() {
            return Err(self
                .fail(format!("node {id} handed out entries from {first} for a log {lo}..={hi}")));
        }
        let new_last = entries[entries.len() - 1].index;
        for index in first.0..=hi.0 {
            let Some(Some(c)) = self.committed.get(index as usize) else { continue };
            if view.term(LogIndex(index)).ok() != Some(c.term) {
                // The node does not hold the committed entry; replacing what it holds is fine.
                continue;
            }
            let replaced = match entries.get((index - first.0) as usize) {
                Some(e) => e.term != c.term,
                None => index > new_last.0,
            };
            if replaced {
                return Err(self.fail(format!(
                    "node {id} overwrites committed entry {}/{index} with {entries:?}",
                    c.term
                )));
            }
        }
        let mut prev_term = match view.term(first.prev()) {
            Ok(term) => term,
            Err(err) => return Err(self.fail(format!("node {id} view: {err}"))),
        };
        for e in entries {
            match self.entry_ids.entry((e.index, e.term)) {
                MapEntry::Vacant(slot) => {
                    slot.insert((prev_term, e.kind, e.data.clone()));
                }
                MapEntry::Occupied(seen) => {
                    let (seen_prev, seen_kind, seen_data) = seen.get().clone();
                    if seen_prev != prev_term || seen_kind != e.kind || seen_data != e.data {
                        return Err(self.fail(format!(
                            "log matching: node {id} holds {e:?} after term {prev_term}, but \
                             {}/{} elsewhere is {seen_kind:?} {seen_data:?} after term {seen_prev}",
                            e.term, e.index
                        )));
                    }
                }
            }
            prev_term = e.term;
        }
        Ok(())
    }

    /// At most one leader per term, and a new leader holds every entry known committed.
    pub(super) fn check_leader(&mut self, i: usize, term: Term) -> Check {
        let id = self.nodes[i].id;
        match self.leaders.entry(term) {
            MapEntry::Occupied(seen) if *seen.get() == id => return Ok(()),
            MapEntry::Occupied(seen) => {
                let other = *seen.get();
                return Err(self.fail(format!("two leaders in term {term}: {other} and {id}")));
            }
            MapEntry::Vacant(slot) => {
                slot.insert(id);
            }
        }
        self.stats.leaders += 1;
        self.trace(format_args!("node {id} leads term {term}"));
        let view = &self.nodes[i].view;
        let from = view.first_index().prev().0 as usize;
        for index in from..self.committed.len() {
            let Some(c) = &self.committed[index] else { continue };
            let have = view.term(LogIndex(index as u64)).ok();
            if have != Some(c.term) {
                return Err(self.fail(format!(
                    "leader completeness: node {id} leads term {term} without committed entry \
                     {}/{index} (it has {have:?}; log {}..={})",
                    c.term,
                    view.first_index(),
                    view.last_index()
                )));
            }
        }
        Ok(())
    }

    pub(super) fn check_step(&mut self) -> Check {
        for i in self.up() {
            let status = self.raw(i).status();
            let node = &mut self.nodes[i];
            if status.commit < node.last_commit {
                let (id, before) = (node.id, node.last_commit);
                return Err(self.fail(format!(
                    "node {id}: commit index went back from {before} to {}",
                    status.commit
                )));
            }
            node.last_commit = status.commit;
            if status.last_index != node.view.last_index() {
                let (id, handed) = (node.id, node.view.last_index());
                return Err(self.fail(format!(
                    "node {id}: log ends at {} but the Readies handed out end at {handed}",
                    status.last_index
                )));
            }
            if node.pending.is_empty() && status.persisted_index != status.last_index {
                let id = node.id;
                return Err(self.fail(format!(
                    "node {id}: everything handed out is persisted, but it reports {} of {}",
                    status.persisted_index, status.last_index
                )));
            }
            if status.role != node.role {
                let (id, role) = (node.id, node.role);
                return Err(self.fail(format!(
                    "node {id} is {:?} but its last soft state said {role:?}",
                    status.role
                )));
            }
            if status.role == Role::Leader {
                self.check_leader(i, status.term)?;
            }
        }
        Ok(())
    }

    // ----- network -----

    pub(super) fn liveness_done(&mut self) -> Result<bool, String> {
        let Some(index) = self.live_acked else { return Ok(false) };
        let term = self.committed[index.0 as usize].as_ref().map(|c| c.term);
        for id in self.known_membership.1.all_voters() {
            let node = &self.nodes[(id.0 - 1) as usize];
            if node.raw.is_none() || node.applied < index {
                return Ok(false);
            }
            if node
                .history
                .get(index.0 as usize)
                .copied()
                .flatten()
                .is_some_and(|t| Some(t) != term)
            {
                return Err(self.fail(format!("node {id} applied a different entry at {index}")));
            }
        }
        Ok(true)
    }

    /// Every acknowledged proposal is in the applied history of every live voter.
    pub(super) fn final_checks(&mut self) -> Check {
        self.trace(format_args!("liveness reached; {:?}", self.stats));
        for id in self.known_membership.1.all_voters() {
            let node = &self.nodes[(id.0 - 1) as usize];
            for acked in &self.acked {
                if node.applied < acked.index {
                    return Err(self.fail(format!(
                        "acknowledged {}/{} {:?} not applied on voter {id} (applied {})",
                        acked.term, acked.index, acked.data, node.applied
                    )));
                }
                match node.history.get(acked.index.0 as usize).copied().flatten() {
                    Some(term) if term != acked.term => {
                        return Err(self.fail(format!(
                            "acknowledged {}/{} {:?} lost: voter {id} applied term {term} there",
                            acked.term, acked.index, acked.data
                        )));
                    }
                    _ => {}
                }
                let global = self.committed.get(acked.index.0 as usize).cloned().flatten();
                if global.is_none_or(|c| c.term != acked.term || c.data != acked.data) {
                    return Err(self.fail(format!(
                        "acknowledged {}/{} {:?} lost from the committed log",
                        acked.term, acked.index, acked.data
                    )));
                }
            }
        }
        Ok(())
    }
}
