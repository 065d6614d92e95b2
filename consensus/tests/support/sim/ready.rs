//! Handling a node's Readies exactly per their contract: persistence that completes later,
//! messages sent when allowed, committed entries applied in order.

use super::*;

impl Sim {
    /// Hands out every Ready and completes every persistence that is due, until neither is left.
    pub(super) fn drain(&mut self, i: usize) -> Check {
        for _ in 0..DRAIN_ITERATIONS_MAX {
            let node = &mut self.nodes[i];
            let id = node.id;
            let Some(raw) = node.raw.as_mut() else { return Ok(()) };
            if raw.has_ready() {
                let ready = match raw.ready() {
                    Ok(ready) => ready,
                    Err(err) => return Err(self.fail(format!("node {id} ready: {err}"))),
                };
                self.handle_ready(i, ready)?;
            } else if node.pending.front().is_some_and(|p| p.persist_at <= self.now) {
                self.persist(i)?;
            } else {
                return Ok(());
            }
        }
        Err(self.fail(format!("node {} never ran out of Readies", self.nodes[i].id)))
    }

    pub(super) fn handle_ready(&mut self, i: usize, rd: Ready) -> Check {
        let id = self.nodes[i].id;
        if self.opts.verbose {
            let span = |e: &[Entry]| match (e.first(), e.last()) {
                (Some(a), Some(b)) => format!("{}..={}", a.index, b.index),
                _ => "-".to_string(),
            };
            self.trace(format_args!(
                "node {id} ready {}: soft {:?} hard {:?} start {:?} entries {} committed {} \
                 membership {:?} messages {}+{} reads {}",
                rd.number,
                rd.soft_state,
                rd.hard_state,
                rd.log_start.as_ref().map(|s| s.first_index),
                span(&rd.entries),
                span(&rd.committed_entries),
                rd.membership,
                rd.messages.len(),
                rd.persisted_messages.len(),
                rd.read_states.len()
            ));
        }
        if let Some(hs) = rd.hard_state {
            let before = self.nodes[i].handed_hs;
            self.check_hard_state(id, before, hs, "handed out")?;
            self.nodes[i].handed_hs = hs;
        }
        if let Some(start) = &rd.log_start {
            self.trace(format_args!("node {id} restarts its log at {}", start.first_index));
            self.nodes[i].view.restart(start.clone());
        }
        if !rd.entries.is_empty() {
            self.check_entries(i, &rd.entries)?;
            self.nodes[i].view.append(&rd.entries);
        }
        if let Some(soft) = rd.soft_state {
            self.nodes[i].role = soft.role;
            if soft.role == Role::Leader {
                let term = self.nodes[i].handed_hs.term;
                self.check_leader(i, term)?;
            }
        }
        for msg in rd.messages {
            self.send(i, msg);
        }
        let mut committed_entries = rd.committed_entries;
        if rd.log_start.is_some() && !committed_entries.is_empty() {
            return Err(
                self.fail(format!("node {id} handed out a log start with committed entries"))
            );
        }
        let mut check_membership = true;
        if self.params.apply_early && rd.log_start.is_none() {
            self.apply(i, &committed_entries, rd.membership.as_ref())?;
            committed_entries.clear();
            check_membership = false;
        }
        for rs in rd.read_states {
            self.stats.reads_answered += 1;
            let Some(&(asker, least)) = self.reads.get(&rs.context) else {
                return Err(self.fail(format!("node {id} got read state {rs:?} nobody asked for")));
            };
            if asker != id {
                return Err(self.fail(format!(
                    "read state {rs:?} asked by node {asker} was answered on node {id}"
                )));
            }
            if rs.index < least {
                return Err(self.fail(format!(
                    "stale read: node {id} got index {} for context {}, but {least} was \
                     committed before it asked",
                    rs.index, rs.context
                )));
            }
        }
        let delay = self.rng.between(0, self.params.persist_delay_max);
        let node = &mut self.nodes[i];
        let persist_at = node.persist_at_last.max(self.now + delay);
        node.persist_at_last = persist_at;
        node.pending.push_back(Pending {
            number: rd.number,
            persist_at,
            log_start: rd.log_start,
            entries: rd.entries,
            hard_state: rd.hard_state,
            persisted_messages: rd.persisted_messages,
            repair_floor: rd.repair_floor,
            committed_entries,
            membership: rd.membership,
            check_membership,
        });
        Ok(())
    }

    /// Completes the oldest pending Ready's persistence: log start, entries, hard state, then
    /// the messages that promise them, then `advance`.
    pub(super) fn persist(&mut self, i: usize) -> Check {
        let id = self.nodes[i].id;
        let p = self.nodes[i].pending.pop_front().expect("the caller saw a pending Ready");
        {
            let store = self.raw(i).store_mut();
            if let Some(start) = &p.log_start {
                store.restart(start.clone());
            }
            if let Some(first) = p.entries.first() {
                if first.index < store.first_index() || first.index > store.last_index().next() {
                    let (lo, hi) = (store.first_index(), store.last_index());
                    return Err(self.fail(format!(
                        "node {id} was asked to write entries from {} onto a log {lo}..={hi}",
                        first.index
                    )));
                }
                store.append(&p.entries);
            }
        }
        if let Some(hs) = p.hard_state {
            let before = self.nodes[i].durable_hs;
            self.check_hard_state(id, before, hs, "persisted")?;
            self.nodes[i].durable_hs = hs;
        }
        if let Some(start) = &p.log_start {
            self.apply_log_start(i, start, p.membership.as_ref())?;
        }
        if let Some((index, term)) = p.repair_floor {
            let node = &mut self.nodes[i];
            let higher = node.repair_floor.is_none_or(|(i0, t0)| (term, index) > (t0, i0));
            if higher {
                node.repair_floor = Some((index, term));
            }
        }
        for msg in p.persisted_messages {
            self.send(i, msg);
        }
        if let Err(err) = self.raw(i).advance(p.number) {
            return Err(self.fail(format!("node {id} advance({}): {err}", p.number)));
        }
        if p.log_start.is_none() && p.check_membership {
            self.apply(i, &p.committed_entries, p.membership.as_ref())?;
        }
        Ok(())
    }

    pub(super) fn persist_due(&mut self) -> Check {
        for i in self.up() {
            self.drain(i)?;
        }
        Ok(())
    }

    // ----- applying -----

    /// Applies committed entries in order on node `i`, checking them against everything
    /// applied anywhere, and `reported` (the Ready's membership) against the changes applied.
    pub(super) fn apply(
        &mut self,
        i: usize,
        entries: &[Entry],
        reported: Option<&Membership>,
    ) -> Check {
        let id = self.nodes[i].id;
        let mut changed = false;
        for e in entries {
            let expected = self.nodes[i].applied.next();
            if e.index != expected {
                return Err(self.fail(format!(
                    "node {id} was handed committed entry {} but had applied through {}",
                    e.index,
                    expected.prev()
                )));
            }
            let slot = e.index.0 as usize;
            if self.committed.len() <= slot {
                self.committed.resize(slot + 1, None);
            }
            match &self.committed[slot] {
                Some(c) if c.term != e.term || c.kind != e.kind || c.data != e.data => {
                    return Err(self.fail(format!(
                        "committed entry changed: node {id} applied {e:?} where {}/{} {:?} \
                         was applied before",
                        c.term, e.index, c.data
                    )));
                }
                Some(_) => {}
                None => {
                    self.committed[slot] =
                        Some(Committed { term: e.term, kind: e.kind, data: e.data.clone() });
                }
            }
            let node = &mut self.nodes[i];
            if let Some(change) = e.conf_change()
                && let Ok(next) = node.membership.apply(&change)
            {
                node.membership = next;
                node.memberships.push((e.index, node.membership.clone()));
                changed = true;
            }
            node.applied = e.index;
            if node.history.len() <= slot {
                node.history.resize(slot + 1, None);
            }
            node.history[slot] = Some(e.term);
            if let Some((term, data)) = node.proposals.remove(&e.index)
                && term == e.term
                && data == e.data
            {
                self.acked.push(Acked { index: e.index, term, data });
                self.stats.acked += 1;
                if self.liveness && e.data.starts_with(b"live-") {
                    self.live_acked = self.live_acked.max(Some(e.index));
                    self.trace(format_args!("liveness proposal acknowledged at {}", e.index));
                }
            }
            self.max_known_commit = self.max_known_commit.max(e.index);
        }
        let node = &mut self.nodes[i];
        let applied = node.applied;
        node.proposals = node.proposals.split_off(&applied.next());
        match reported {
            Some(m) if *m != node.membership => {
                let mine = node.membership.clone();
                return Err(self.fail(format!(
                    "node {id} reported membership {m} after applying through {applied}; the \
                     applied changes give {mine}"
                )));
            }
            None if changed => {
                return Err(self.fail(format!(
                    "node {id} applied a membership change but its Ready reported none"
                )));
            }
            _ => {}
        }
        self.note_membership(i);
        Ok(())
    }

    /// A log restart became durable: the apply record jumps to its start.
    pub(super) fn apply_log_start(
        &mut self,
        i: usize,
        start: &LogStart,
        reported: Option<&Membership>,
    ) -> Check {
        let id = self.nodes[i].id;
        let before = start.first_index.prev();
        if self.nodes[i].applied > before {
            return Err(self.fail(format!(
                "node {id} restarted its log at {} after applying through {}",
                start.first_index, self.nodes[i].applied
            )));
        }
        if let Some(Some(c)) = self.committed.get(before.0 as usize)
            && c.term != start.prev_term
        {
            return Err(self.fail(format!(
                "node {id} restarted its log after {}/{before}, but {}/{before} is committed",
                start.prev_term, c.term
            )));
        }
        if reported.is_some_and(|m| *m != start.membership) {
            return Err(self.fail(format!(
                "node {id}: a log start with membership {} reported {reported:?}",
                start.membership
            )));
        }
        self.stats.log_restarts += 1;
        let node = &mut self.nodes[i];
        node.applied = before;
        node.membership = start.membership.clone();
        node.memberships.push((before, start.membership.clone()));
        node.proposals = node.proposals.split_off(&before.next());
        self.max_known_commit = self.max_known_commit.max(before);
        self.note_membership(i);
        Ok(())
    }

    pub(super) fn note_membership(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.applied > self.known_membership.0 {
            self.known_membership = (node.applied, node.membership.clone());
        }
    }

    // ----- checks -----
}
