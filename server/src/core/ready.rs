//! One Ready into actions, in the order the Ready contract gives (consensus/src/raw_node.rs):
//! the leader's messages at once; the log restart, the conflicting suffix, the entries and the
//! term/vote; `advance` and the messages that promise durable state once the writes are
//! durable; then the committed entries, applied (`apply.rs`).
//!
//! The hard-state policy: term and vote are saved (fsynced) before anything that depends on
//! them goes out, in the Ready's order. A commit-only change is not saved per Ready: Raft needs
//! no durable commit index (a restarted node learns it again from the leader), so it rides on
//! the next tick instead of a second fsync per append on every node, and it is saved off the
//! driver ([`Action::SaveCommit`]), so a slow disk never stalls the core's ticks. A saved commit
//! index never runs ahead of the durable log, so a restart finds its commit index in the log.

use std::collections::VecDeque;

use raftwal_consensus::{HardState, LogIndex, Message, Ready, Role};

use super::{Action, Fatal, NodeCore, PlantedBug, RequestError, fatal};

/// A Ready whose writes become durable with write number `synced`; Readies without writes that
/// came after it ride along (`advance_to`, their messages appended).
#[derive(Debug)]
struct PendingWrite {
    synced: u64,
    /// The last index this write (and every earlier one) makes durable.
    last: LogIndex,
    advance_to: u64,
    messages: Vec<Message>,
    /// The shell's clock when the write was asked for.
    issued_ms: u64,
}

/// Writes in flight and the hard state, as the core has asked for them.
#[derive(Debug)]
pub(super) struct Writes {
    /// Readies with writes not yet durable, in order; at most `in_flight_max`.
    pending: VecDeque<PendingWrite>,
    in_flight_max: usize,
    /// The last index handed to the WAL (durable or still queued).
    submitted_last: LogIndex,
    /// The last index known durable.
    durable_last: LogIndex,
    /// The hard state as last saved.
    saved: HardState,
    /// The last hard state a Ready reported, and whether its commit index is not saved yet.
    latest: HardState,
    commit_unsaved: bool,
}

impl Writes {
    pub fn new(saved: HardState, last: LogIndex, in_flight_max: usize) -> Writes {
        Writes {
            pending: VecDeque::new(),
            in_flight_max: in_flight_max.max(1),
            submitted_last: last,
            durable_last: last,
            saved,
            latest: saved,
            commit_unsaved: false,
        }
    }

    /// When the oldest write not yet durable was asked for.
    pub fn oldest_pending_ms(&self) -> Option<u64> {
        self.pending.front().map(|p| p.issued_ms)
    }
}

impl NodeCore {
    pub(super) fn handle_ready(&mut self, rd: Ready) -> Result<(), Fatal> {
        if let Some(soft) = rd.soft_state {
            self.soft_state(soft.role, soft.leader);
        }
        self.actions.extend(rd.messages.into_iter().map(Action::Send));
        if let Some(start) = &rd.log_start {
            self.restart_log(start.first_index, start.prev_term, start.membership.clone());
        }
        if let Some(floor) = rd.repair_floor {
            // Before any message that promises durable state (they all follow this action).
            self.raised_repair_floor(floor);
        }
        self.persist(rd.number, rd.entries, rd.hard_state, rd.persisted_messages)?;
        if !rd.committed_entries.is_empty() {
            self.apply_entries(&rd.committed_entries)?;
            metrics::counter!("raftwal_server_proposals_committed_total")
                .increment(rd.committed_entries.len() as u64);
        }
        if let Some(m) = rd.membership {
            self.membership_applied(m);
        }
        for rs in rd.read_states {
            if let Some(id) = self.waiters.take_read(rs.context) {
                self.reply(id, Ok(super::Reply::Index(rs.index)));
            }
        }
        // Published last, so that whoever wakes on it also sees the membership it implies.
        if !rd.committed_entries.is_empty() {
            self.publish_view();
            // The streams before the readable index: a reader that waited for the index
            // (a ReadIndex round) then finds the streams it implies.
            let changed = self.streams.take_changed();
            if !changed.is_empty() {
                self.actions.push_back(Action::PublishStreams(changed));
            }
            self.actions.push_back(Action::PublishReadable(self.log.readable()));
            for (id, outcome) in std::mem::take(&mut self.stream_replies) {
                self.reply(id, outcome);
            }
        }
        if self.config.planted == Some(PlantedBug::ServeUncommitted) {
            let written = self.writes.durable_last.max(self.log.readable());
            self.actions.push_back(Action::PublishReadable(written));
        }
        Ok(())
    }

    /// The Ready's writes in order: a conflicting suffix, term and vote, the entries; then
    /// `advance` and the messages that promise durable state, at once or once the syncer reports
    /// the writes durable.
    fn persist(
        &mut self,
        number: u64,
        entries: Vec<raftwal_consensus::Entry>,
        hard_state: Option<HardState>,
        persisted: Vec<Message>,
    ) -> Result<(), Fatal> {
        let mut write = None;
        if let Some(first) = entries.first() {
            if first.index <= self.writes.submitted_last {
                // A conflicting suffix (written or still queued) is replaced.
                self.actions.push_back(Action::Truncate { from: first.index });
                let kept = first.index.prev();
                self.writes.durable_last = self.writes.durable_last.min(kept);
                for p in &mut self.writes.pending {
                    p.last = p.last.min(kept);
                }
            }
            let last = entries.last().expect("not empty").index;
            self.writes.submitted_last = last;
            write = Some(last);
        }
        if let Some(hs) = hard_state {
            let saved = self.writes.saved;
            if hs.term != saved.term || hs.vote != saved.vote {
                // Term and vote are durable before anything that depends on them is sent.
                let commit = hs.commit.min(self.writes.durable_last).max(saved.commit);
                self.save_hard_state(HardState { commit, ..hs });
            }
            self.writes.commit_unsaved = true;
            self.writes.latest = hs;
        }
        // The entries become durable on the shell's syncer while the core goes on stepping
        // messages and proposing (thesis 10.2.1). `advance` and the messages that promise
        // durable state wait for it, in Ready order.
        match (write, self.writes.pending.back_mut()) {
            (None, None) => {
                self.raw.advance(number).map_err(fatal("advance"))?;
                self.actions.extend(persisted.into_iter().map(Action::Send));
            }
            (None, Some(last)) => {
                // Nothing to write: durable as soon as the writes before it are.
                last.advance_to = number;
                last.messages.extend(persisted);
            }
            (Some(last), _) => {
                if self.writes.pending.len() >= self.writes.in_flight_max
                    && let Some(through) = self.writes.pending.back().map(|p| p.synced)
                {
                    // The syncer is far behind: the shell makes everything queued so far
                    // durable now and reports it (`Input::Persisted { number: through }`);
                    // only then does consensus hear of it. Nothing is advanced here.
                    self.actions.push_back(Action::Flush { through });
                }
                self.actions.push_back(Action::Write { number, entries });
                self.writes.pending.push_back(PendingWrite {
                    synced: number,
                    last,
                    advance_to: number,
                    messages: persisted,
                    issued_ms: self.now_ms,
                });
            }
        }
        Ok(())
    }

    fn soft_state(&mut self, role: Role, leader: Option<raftwal_consensus::NodeId>) {
        if role != self.role || leader != self.leader {
            tracing::info!(?role, ?leader, "role changed");
            if leader != self.leader {
                metrics::counter!("raftwal_server_leader_changes_seen_total").increment(1);
            }
            metrics::gauge!("raftwal_server_has_leader").set(f64::from(u8::from(leader.is_some())));
            metrics::gauge!("raftwal_server_is_leader")
                .set(f64::from(u8::from(role == Role::Leader)));
        }
        if self.role == Role::Leader && role != Role::Leader {
            // A deposed leader may not hear for a long time (cut off) whether its entries
            // committed: its callers learn now that the outcome is unknown, and retry elsewhere
            // (a producer's retry with the same sequence is safe), instead of waiting out their
            // own timeouts.
            self.fail_all(&RequestError::Unknown(
                "this node lost leadership before the outcome was known; a retry with the same \
                 producer sequence is safe"
                    .into(),
            ));
        }
        if role == Role::Leader && self.role != Role::Leader {
            // Its empty entry of the new term is the last one in the log now.
            self.term_start = self.raw.last_index();
        }
        self.role = role;
        self.leader = leader;
        self.publish_status();
    }

    fn save_hard_state(&mut self, hs: HardState) {
        self.writes.saved = hs;
        self.actions.push_back(Action::SaveHardState(hs));
    }

    /// Every write up to `number` is durable. A report for writes already advanced (after a
    /// flush) changes nothing.
    pub(super) fn persisted(&mut self, number: u64) -> Result<(), Fatal> {
        let mut advance_to = None;
        let mut messages = Vec::new();
        while self.writes.pending.front().is_some_and(|p| p.synced <= number) {
            let done = self.writes.pending.pop_front().expect("checked");
            advance_to = Some(done.advance_to);
            self.writes.durable_last = self.writes.durable_last.max(done.last);
            messages.extend(done.messages);
        }
        if let Some(n) = advance_to {
            self.raw.advance(n).map_err(fatal("advance"))?;
            self.actions.extend(messages.into_iter().map(Action::Send));
        }
        if self.config.planted == Some(PlantedBug::AckBeforeQuorum) && self.role == Role::Leader {
            for (first, last, ids) in self.waiters.take_appends_through(self.writes.durable_last) {
                let ok = super::AppendOk { first, last, duplicate: false };
                self.answer_all(ids, &Ok(super::Reply::Appended(ok)));
            }
        }
        Ok(())
    }

    /// Saves a commit index held back from the Readies (see the module docs).
    pub(super) fn save_commit(&mut self) {
        if !self.writes.commit_unsaved {
            return;
        }
        let saved = self.writes.saved;
        let hs = self.writes.latest;
        let commit = hs.commit.min(self.writes.durable_last);
        if hs.term == saved.term && hs.vote == saved.vote && commit > saved.commit {
            self.writes.saved = HardState { commit, ..hs };
            self.actions.push_back(Action::SaveCommit(commit));
        }
        self.writes.commit_unsaved = commit < hs.commit;
    }

    /// This node is behind the leader's trimmed log start: its whole log restarts there.
    fn restart_log(
        &mut self,
        first: LogIndex,
        prev_term: raftwal_consensus::Term,
        membership: raftwal_consensus::Membership,
    ) {
        // The commands that built the stream state go with the log: that is recorded
        // durably before the log moves, and a peer's state is fetched.
        self.lose_streams(first.prev());
        let change = super::StartChange::Restart { prev_term };
        self.move_start(first, membership.clone(), change);
        // Whatever this node's old log said after the new start is gone with it.
        self.members.start_at(first.prev(), membership);
        self.writes.submitted_last = first.prev();
        self.writes.durable_last = first.prev();
        // Writes still in flight are of the discarded log: their completions make nothing of
        // the new one durable.
        for p in &mut self.writes.pending {
            p.last = p.last.min(first.prev());
        }
        self.log.restart(first.prev());
        // Entries below the new start committed on the leader; any of them may be ours.
        self.fail_all(&RequestError::Unknown(
            "this node's log restarted at the leader's start; the request may have committed"
                .into(),
        ));
        self.publish_view();
        self.actions.push_back(Action::PublishReadable(self.log.readable()));
        tracing::info!(%first, "log restarted at the leader's log start");
    }
}
