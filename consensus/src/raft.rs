//! The Raft state machine: roles, terms, votes, replication, commit, read barriers, transfer and
//! membership. Everything here is a pure function of the inputs; output is collected in message
//! queues that [`crate::RawNode`] hands out in a Ready.

use std::collections::BTreeMap;

use bytes::Bytes;
use raftwal_types::{LogIndex, NodeId, Term};

use crate::config::Config;
use crate::error::Error;
use crate::log::{AppendError, RaftLog};
use crate::membership::{ConfChange, Membership, VoteResult};
use crate::message::{Entry, EntryKind, LogStart, Message, MessageBody, ReadState, RejectHint};
use crate::progress::{Inflights, Progress, ProgressState};
use crate::read_only::ReadOnly;
use crate::rng::SplitMix64;
use crate::storage::{LogStore, StoreError};

/// A node's role in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows the leader of its term (if it knows one).
    Follower,
    /// Asking whether it could win an election, without raising its term.
    PreCandidate,
    /// Campaigning in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// The largest term or index a peer may name (see `validate`).
const VALUE_MAX: u64 = 1 << 62;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Campaign {
    PreElection,
    Election,
    Transfer,
}

pub(crate) struct Raft<S> {
    pub(crate) cfg: Config,
    pub(crate) id: NodeId,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) leader: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) log: RaftLog<S>,
    pub(crate) membership: Membership,
    /// Set when the membership changed since the last Ready.
    pub(crate) membership_changed: bool,
    /// The leader's view of every member (empty unless leader).
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_ticks: u32,
    pub(crate) transferee: Option<NodeId>,
    /// The index of the newest membership change in the log; another may be proposed only once
    /// it is applied.
    pending_conf_index: LogIndex,
    uncommitted_bytes: u64,
    reads: ReadOnly,
    /// Read barriers received before the leader committed an entry of its term.
    reads_waiting_for_commit: Vec<(Option<NodeId>, u64)>,
    /// (term, index) that this node's log reached before damage cut it, while its log is less
    /// up to date than that ([`crate::Restored::repair_floor`]).
    pub(crate) repair_floor: Option<(Term, LogIndex)>,
    /// The first index of entries taken from a repair answer that no leader's append has
    /// confirmed yet. A leader's heartbeat commits up to what it believes we match, which may
    /// predate the damage: it must not commit these.
    repair_unconfirmed: Option<LogIndex>,
    /// Ticks while a repair is pending, to remind a leader once per election timeout.
    repair_ticks: u32,
    /// Ticks left of the hold after a restart whose recovery cut an unreadable tail
    /// ([`crate::Restored::tail_cut`]): while above zero the node neither campaigns nor votes.
    tail_hold: u32,
    /// Whether the node still has to tell the first leader it hears from where its cut log ends.
    tail_report: bool,
    /// Set when a leader raised the repair floor; the next Ready hands it out to persist.
    pub(crate) floor_raised: bool,
    /// Messages that may be sent at once.
    pub(crate) msgs: Vec<Message>,
    /// Messages to send only once the Ready's hard state and entries are durable.
    pub(crate) msgs_after_persist: Vec<Message>,
    pub(crate) read_states: Vec<ReadState>,
    rng: SplitMix64,
}

impl<S: LogStore> Raft<S> {
    pub(crate) fn new(
        cfg: Config,
        term: Term,
        vote: Option<NodeId>,
        log: RaftLog<S>,
        membership: Membership,
    ) -> Raft<S> {
        let rng = SplitMix64::new(cfg.seed ^ cfg.id.0.rotate_left(32));
        let mut raft = Raft {
            id: cfg.id,
            term,
            vote,
            leader: None,
            role: Role::Follower,
            log,
            membership,
            membership_changed: false,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: 0,
            transferee: None,
            pending_conf_index: LogIndex(0),
            uncommitted_bytes: 0,
            reads: ReadOnly::default(),
            reads_waiting_for_commit: Vec::new(),
            repair_floor: None,
            repair_unconfirmed: None,
            repair_ticks: 0,
            tail_hold: 0,
            tail_report: false,
            floor_raised: false,
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            read_states: Vec::new(),
            rng,
            cfg,
        };
        raft.reset_timers();
        raft
    }

    /// Whether this node may campaign: it is a voter (learners and removed nodes never are).
    pub(crate) fn promotable(&self) -> bool {
        self.membership.is_voter(self.id)
    }

    /// Recovery cut an unreadable tail from this node's log ([`crate::Restored::tail_cut`]): hold
    /// elections for one election timeout, and tell the first leader heard from where the log
    /// ends.
    pub(crate) fn hold_after_tail_cut(&mut self) {
        self.tail_hold = self.cfg.election_ticks;
        self.tail_report = true;
    }

    /// Whether the log is still less up to date than the repair floor; clears the floor once it
    /// is not (from then on the log itself is what votes are judged by, as for any node).
    pub(crate) fn repair_pending(&mut self) -> Result<bool, Error> {
        let Some(floor) = self.repair_floor else { return Ok(false) };
        if (self.log.last_term()?, self.log.last_index()) >= floor {
            self.repair_floor = None;
            return Ok(false);
        }
        Ok(true)
    }

    fn reset_timers(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let jitter = self.rng.below(u64::from(self.cfg.election_ticks)) as u32;
        self.randomized_election_ticks = self.cfg.election_ticks + jitter;
    }

    fn reset(&mut self, term: Term) {
        if self.term != term {
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.reset_timers();
        self.transferee = None;
        self.votes.clear();
        self.progress.clear();
        self.reads = ReadOnly::default();
        self.reads_waiting_for_commit.clear();
        self.uncommitted_bytes = 0;
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        // A pre-candidate changes neither its term nor its vote; it only stops following.
        self.votes.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader cannot become a candidate");
        self.reset(Term(self.term.0 + 1));
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) -> Result<(), Error> {
        assert_ne!(self.role, Role::Follower, "a follower cannot become leader directly");
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let last = self.log.last_index();
        for id in self.membership.members() {
            self.progress.insert(id, self.new_progress(last.next()));
        }
        if let Some(me) = self.progress.get_mut(&self.id) {
            // The leader counts only what it has durably written (thesis 10.2.1).
            me.matched = self.log.persisted_index();
            me.become_replicate();
            me.recent_active = true;
        }
        // Conf changes in the uncommitted tail might not be applied yet: hold new ones back
        // until everything up to here is applied.
        self.pending_conf_index = last;
        self.append_entries(vec![(EntryKind::Noop, Bytes::new())]);
        self.bcast_append()
    }

    fn new_progress(&self, next: LogIndex) -> Progress {
        Progress::new(next, Inflights::new(self.cfg.inflight_msgs_max, self.cfg.inflight_bytes_max))
    }

    fn send(&mut self, to: NodeId, term: Term, body: MessageBody) {
        let after_persist = matches!(
            body,
            MessageBody::PreVote { .. }
                | MessageBody::Vote { .. }
                | MessageBody::PreVoteResp { .. }
                | MessageBody::VoteResp { .. }
                | MessageBody::AppResp { .. }
                | MessageBody::HeartbeatResp { .. }
        );
        let msg = Message { group: self.cfg.group, from: self.id, to, term, body };
        if after_persist { self.msgs_after_persist.push(msg) } else { self.msgs.push(msg) }
    }

    // ----- time -----

    pub(crate) fn tick(&mut self) -> Result<(), Error> {
        if self.role == Role::Leader {
            return self.tick_leader();
        }
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        self.tail_hold = self.tail_hold.saturating_sub(1);
        if self.repair_floor.is_some() && self.repair_pending()? {
            // Remind a leader that we lost entries, once per election timeout: an idle leader
            // whose record of our log predates the damage would otherwise send us nothing.
            self.repair_ticks = self.repair_ticks.wrapping_add(1);
            if let Some(leader) = self.leader
                && self.repair_ticks.is_multiple_of(self.cfg.election_ticks.max(1))
            {
                self.request_repair(Some(leader))?;
            }
        }
        if self.promotable() && self.election_elapsed >= self.randomized_election_ticks {
            self.election_elapsed = 0;
            let kind = if self.cfg.pre_vote { Campaign::PreElection } else { Campaign::Election };
            self.campaign(kind)?;
        }
        Ok(())
    }

    fn tick_leader(&mut self) -> Result<(), Error> {
        self.heartbeat_elapsed = self.heartbeat_elapsed.saturating_add(1);
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return Ok(());
            }
            // A transfer that has not finished in an election timeout is abandoned; a leader
            // that is no longer a voter tries again (perhaps with another voter).
            self.transferee = None;
            if !self.membership.is_voter(self.id) {
                self.hand_over()?;
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.bcast_heartbeat(self.reads.latest_pending());
        }
        Ok(())
    }

    /// Whether a quorum has been heard from since the last check; resets the record.
    fn quorum_recently_active(&mut self) -> bool {
        let me = self.id;
        let active = self.membership.vote_result(|id| {
            Some(id == me || self.progress.get(&id).is_some_and(|pr| pr.recent_active))
        });
        for (&id, pr) in &mut self.progress {
            pr.recent_active = id == me;
        }
        active == VoteResult::Won
    }

    // ----- elections -----

    pub(crate) fn campaign(&mut self, kind: Campaign) -> Result<(), Error> {
        if !self.promotable() || self.role == Role::Leader {
            return Ok(());
        }
        if self.tail_hold > 0 {
            // Our log may have lost entries we acknowledged: a leader still alive proves it
            // within this hold (even one that handed leadership to us, believing us caught up).
            return Ok(());
        }
        if self.repair_pending()? {
            // Damage cut entries this node may have helped commit; as a candidate it could win
            // without them. A leader sends them again; with none in sight, ask every member
            // for what follows our log (PAR's repair: any copy will do, it is only taken where it
            // continues our log, and votes stay judged by the floor until the log reaches it).
            self.request_repair(None)?;
            return Ok(());
        }
        if self.has_unapplied_conf_changes()? {
            // Votes are counted by the applied membership. Behind a committed change it may be
            // two changes behind the group, whose majorities need not overlap ours: two leaders
            // could win one term. Wait until it is applied (etcd's hasUnappliedConfChanges).
            return Ok(());
        }
        let vote_term = if kind == Campaign::PreElection {
            self.become_pre_candidate();
            Term(self.term.0 + 1)
        } else {
            self.become_candidate();
            self.term
        };
        self.votes.insert(self.id, true);
        if self.tally() == VoteResult::Won {
            // A single voter wins at once.
            return if kind == Campaign::PreElection {
                self.campaign(Campaign::Election)
            } else {
                self.become_leader()
            };
        }
        let last_index = self.log.last_index();
        let last_term = self.log.last_term()?;
        for id in self.membership.all_voters() {
            if id == self.id {
                continue;
            }
            let body = if kind == Campaign::PreElection {
                MessageBody::PreVote { last_index, last_term }
            } else {
                MessageBody::Vote { last_index, last_term, transfer: kind == Campaign::Transfer }
            };
            self.send(id, vote_term, body);
        }
        Ok(())
    }

    /// Asks `to` (or every other member) for the entries after our last one. A leader that
    /// gets the request learns that we lost entries it counted us as holding.
    fn request_repair(&mut self, to: Option<NodeId>) -> Result<(), Error> {
        let last_index = self.log.last_index();
        let last_term = self.log.last_term()?;
        let (floor_term, floor_index) = self.repair_floor.unwrap_or((Term(0), LogIndex(0)));
        let targets: Vec<NodeId> = match to {
            Some(id) => vec![id],
            None => self.membership.members().into_iter().filter(|&id| id != self.id).collect(),
        };
        for id in targets {
            let body = MessageBody::RepairReq { last_index, last_term, floor_index, floor_term };
            self.send(id, self.term, body);
        }
        Ok(())
    }

    /// Tells `to`, whose log no longer holds what it acknowledged, that it acknowledged through
    /// `acked` in this term: in this term the leader's record only rises with the follower's
    /// acknowledgements, so the follower held our entry there and the floor is sound. (Below
    /// our log start its term is unknown; the follower then gets our log start anyway.)
    fn send_acked_through(&mut self, to: NodeId, acked: LogIndex) -> Result<(), Error> {
        if let Some(term) = self.log.term_if_known(acked)? {
            self.send(to, self.term, MessageBody::AckedThrough { index: acked, term });
        }
        Ok(())
    }

    /// A leader proved this node acknowledged through `(index, term)`: its log must be back
    /// there before it votes for a log less up to date than that. The floor only rises.
    fn handle_acked_through(&mut self, index: LogIndex, term: Term) -> Result<(), Error> {
        if (self.log.last_term()?, self.log.last_index()) >= (term, index) {
            return Ok(());
        }
        if self.repair_floor.is_some_and(|floor| floor >= (term, index)) {
            return Ok(());
        }
        self.repair_floor = Some((term, index));
        self.repair_ticks = 0;
        self.floor_raised = true;
        Ok(())
    }

    /// Answers a repair request with the entries of our log after the asker's last one, when
    /// our log holds that entry too (else we cannot say what follows it).
    fn handle_repair_request(
        &mut self,
        from: NodeId,
        (last_index, last_term): (LogIndex, Term),
        floor: (Term, LogIndex),
    ) -> Result<(), Error> {
        if self.role == Role::Leader {
            // Our record of what it holds may predate its damage: start again from what it
            // says it has (only lower is safe; what it matches is confirmed by the probe). A
            // record not ahead of its log is current: replication goes on as it is.
            if let Some(pr) = self.progress.get_mut(&from)
                && pr.matched > last_index
            {
                let acked = pr.matched;
                pr.matched = last_index;
                pr.become_probe();
                self.send_acked_through(from, acked)?;
                self.send_append(from, true)?;
            }
            return Ok(());
        }
        let last = self.log.last_index();
        if last_index >= last || (self.log.last_term()?, last) < floor {
            // Only a log at least as up to date as the floor holds every entry the asker may
            // have acknowledged (those entries, or later ones that any committed entry among
            // them precedes): taking from a log behind it could tie the asker to a stale
            // branch that no member can repair further.
            return Ok(());
        }
        if last_index < self.log.first_index().prev() {
            // We compacted its last entry: it restarts at our log start (committed here).
            self.send(from, self.term, MessageBody::RepairStart { start: self.log.start() });
            return Ok(());
        }
        if !self.log.match_term(last_index, last_term)? {
            return Ok(());
        }
        let next = last_index.next();
        let end = last.next().min(LogIndex(next.0.saturating_add(self.cfg.msg_entries_max as u64)));
        let entries = match self.log.entries(next..end, self.cfg.msg_bytes_max) {
            Ok(entries) => entries,
            Err(StoreError::Compacted { .. }) => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        let body =
            MessageBody::RepairResp { prev_index: last_index, prev_term: last_term, entries };
        self.send(from, self.term, body);
        Ok(())
    }

    /// Restarts our log at a member's log start, when its log has moved past ours: the start is
    /// committed (it compacted there), and nothing we applied is undone.
    fn handle_repair_start(&mut self, from: NodeId, start: LogStart) -> Result<(), Error> {
        let before = start.first_index.prev();
        if self.leader.is_some()
            || !self.repair_pending()?
            || before <= self.log.committed
            || before <= self.log.last_index()
        {
            return Ok(());
        }
        self.log.restart(start.clone());
        self.membership = start.membership;
        self.membership_changed = true;
        self.log.commit_to(before);
        self.repair_unconfirmed = None;
        self.request_repair(Some(from))
    }

    /// Takes a repair answer's entries when they continue our log exactly (never replacing an
    /// entry we hold: one of ours may be committed), then asks the same member for more.
    fn handle_repair_response(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: &[Entry],
    ) -> Result<(), Error> {
        if entries.is_empty() || self.leader.is_some() || !self.repair_pending()? {
            // With a leader, its appends repair us (and confirm what they bring).
            return Ok(());
        }
        if prev_index != self.log.last_index() || self.log.last_term()? != prev_term {
            return Ok(());
        }
        let top = entries.last().expect("checked non-empty").term;
        if top > self.term {
            // A node's log never runs ahead of its term: that term exists, so we are in it.
            self.become_follower(top, None);
        }
        match self.log.maybe_append(prev_index, prev_term, entries) {
            Ok(_) => {}
            Err(AppendError::ConflictsWithCommitted) => return Ok(()),
            Err(AppendError::Store(err)) => return Err(err.into()),
        }
        let first = entries[0].index;
        self.repair_unconfirmed = Some(self.repair_unconfirmed.map_or(first, |f| f.min(first)));
        // Membership changes that another follows are committed (as at a restart): without
        // this we would count votes with a membership two changes behind our log. (Only new
        // changes can move that point.)
        if entries.iter().any(|e| e.kind == EntryKind::ConfChange)
            && let Some(floor) = self.log.committed_conf_change_floor(self.cfg.apply_bytes_max)?
        {
            self.log.commit_to(floor);
        }
        if self.repair_pending()? {
            self.request_repair(Some(from))?;
        }
        Ok(())
    }

    /// Whether a membership change between the applied and the commit index is not applied yet.
    fn has_unapplied_conf_changes(&self) -> Result<bool, Error> {
        let end = self.log.committed.next();
        let mut next = self.log.applied.next();
        while next < end {
            let page = self.log.entries(next..end, self.cfg.apply_bytes_max)?;
            if page.iter().any(|entry| entry.kind == EntryKind::ConfChange) {
                return Ok(true);
            }
            next = page.last().expect("a non-empty range reads at least one entry").index.next();
        }
        Ok(false)
    }

    fn tally(&self) -> VoteResult {
        self.membership.vote_result(|id| self.votes.get(&id).copied())
    }

    fn handle_vote_request(&mut self, m: &Message) -> Result<(), Error> {
        let (last_index, last_term, pre) = match m.body {
            MessageBody::PreVote { last_index, last_term } => (last_index, last_term, true),
            MessageBody::Vote { last_index, last_term, .. } => (last_index, last_term, false),
            _ => unreachable!("only vote requests come here"),
        };
        let can_vote = self.vote == Some(m.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre && m.term > self.term);
        // A repairing node judges the candidate by the log it had before the damage, too.
        let above_floor = !self.repair_pending()?
            || self.repair_floor.is_some_and(|floor| (last_term, last_index) >= floor);
        // A transfer's candidate is one the leader found holding its whole log: safe to elect.
        let transfer = matches!(m.body, MessageBody::Vote { transfer: true, .. });
        let held = self.tail_hold > 0 && !transfer;
        let granted =
            can_vote && self.log.is_up_to_date(last_index, last_term)? && above_floor && !held;
        if granted {
            if !pre {
                self.election_elapsed = 0;
                self.vote = Some(m.from);
            }
            let body = if pre {
                MessageBody::PreVoteResp { reject: false }
            } else {
                MessageBody::VoteResp { reject: false }
            };
            // A grant answers in the term asked about, so the candidate counts it.
            self.send(m.from, m.term, body);
        } else {
            let body = if pre {
                MessageBody::PreVoteResp { reject: true }
            } else {
                MessageBody::VoteResp { reject: true }
            };
            self.send(m.from, self.term, body);
        }
        Ok(())
    }

    // ----- messages -----

    pub(crate) fn step(&mut self, m: Message) -> Result<(), Error> {
        self.step_message(m)?;
        if self.tail_report && self.role == Role::Follower && self.leader.is_some() {
            // Where our cut log ends: a leader that counted us for more says so.
            self.tail_report = false;
            self.request_repair(self.leader)?;
        }
        Ok(())
    }

    fn step_message(&mut self, m: Message) -> Result<(), Error> {
        self.validate(&m)?;
        // Repair traffic changes no one's term or leader: any member answers, whatever its role.
        match m.body {
            MessageBody::RepairReq { last_index, last_term, floor_index, floor_term } => {
                let floor = (floor_term, floor_index);
                return self.handle_repair_request(m.from, (last_index, last_term), floor);
            }
            MessageBody::RepairStart { start } => return self.handle_repair_start(m.from, start),
            MessageBody::RepairResp { prev_index, prev_term, entries } => {
                return self.handle_repair_response(m.from, prev_index, prev_term, &entries);
            }
            _ => {}
        }
        if m.term > self.term {
            if let MessageBody::PreVote { .. } | MessageBody::Vote { .. } = m.body {
                let forced = matches!(m.body, MessageBody::Vote { transfer: true, .. });
                let in_lease = self.cfg.check_quorum
                    && self.leader.is_some()
                    && self.election_elapsed < self.cfg.election_ticks;
                if !forced && in_lease {
                    // We heard from a leader within the election timeout: a node that asks for
                    // votes now was cut off, not the leader gone. Ignore it (thesis 4.2.3).
                    return Ok(());
                }
                if !forced && self.tail_hold > 0 {
                    // Held after a tail cut: a newer term would cut us off from a leader that
                    // can still tell us what we acknowledged.
                    return Ok(());
                }
            }
            match m.body {
                // Pre-votes change no one's term; a granted pre-vote is counted in our own.
                MessageBody::PreVote { .. } | MessageBody::PreVoteResp { reject: false } => {}
                MessageBody::App { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallLog { .. } => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                MessageBody::App { .. } | MessageBody::Heartbeat { .. } => {
                    // A stale leader whose messages we would ignore might never learn that it
                    // was deposed, and a node whose term ran ahead could stay cut off for good
                    // (with pre-vote or check-quorum; and without them when its membership is
                    // stale, so that its campaigns never reach the leader: the simulator found
                    // a voter stuck so at term 153 under a leader of term 44). Answering in our
                    // term fixes both, as the Raft paper's rule does.
                    self.send(
                        m.from,
                        self.term,
                        MessageBody::AppResp { index: LogIndex(0), reject: None },
                    );
                }
                MessageBody::PreVote { .. } => {
                    self.send(m.from, self.term, MessageBody::PreVoteResp { reject: true });
                }
                _ => {}
            }
            return Ok(());
        }
        match m.body {
            MessageBody::PreVote { .. } | MessageBody::Vote { .. } => self.handle_vote_request(&m),
            _ => match self.role {
                Role::Leader => self.step_leader(m),
                Role::PreCandidate | Role::Candidate => self.step_candidate(m),
                Role::Follower => self.step_follower(m),
            },
        }
    }

    /// Refuses what no correct peer sends, before anything changes.
    fn validate(&self, m: &Message) -> Result<(), Error> {
        let invalid = |reason| Err(Error::InvalidMessage { from: m.from, reason });
        if m.group != self.cfg.group {
            return Err(Error::WrongGroup { expected: self.cfg.group, got: m.group });
        }
        if m.to != self.id {
            return invalid("addressed to another node");
        }
        if m.from == self.id || m.from.0 == 0 {
            return invalid("bad sender id");
        }
        // No real cluster reaches 2^62 terms or entries; refusing larger values up front means
        // no arithmetic on a peer's numbers can overflow.
        let implausible = |v: u64| v > VALUE_MAX;
        let too_large = implausible(m.term.0)
            || match &m.body {
                MessageBody::PreVote { last_index, last_term }
                | MessageBody::Vote { last_index, last_term, .. } => {
                    implausible(last_index.0) || implausible(last_term.0)
                }
                MessageBody::App { prev_index, commit, .. } => {
                    implausible(prev_index.0) || implausible(commit.0)
                }
                MessageBody::AppResp { index, reject } => {
                    implausible(index.0) || reject.is_some_and(|h| implausible(h.index.0))
                }
                MessageBody::Heartbeat { commit, .. } => implausible(commit.0),
                MessageBody::InstallLog { start, commit } => {
                    implausible(start.first_index.0) || implausible(commit.0)
                }
                MessageBody::ReadIndexResp { index, .. } => implausible(index.0),
                MessageBody::RepairReq { last_index, last_term, floor_index, floor_term } => {
                    implausible(last_index.0)
                        || implausible(last_term.0)
                        || implausible(floor_index.0)
                        || implausible(floor_term.0)
                }
                MessageBody::RepairStart { start } => implausible(start.first_index.0),
                MessageBody::RepairResp { prev_index, prev_term, .. } => {
                    implausible(prev_index.0) || implausible(prev_term.0)
                }
                MessageBody::AckedThrough { index, term } => {
                    implausible(index.0) || implausible(term.0)
                }
                _ => false,
            };
        if too_large {
            return invalid("a term or index is implausibly large");
        }
        match &m.body {
            MessageBody::App { prev_index, prev_term, entries, .. }
            | MessageBody::RepairResp { prev_index, prev_term, entries } => {
                if *prev_term > m.term {
                    return invalid("append's previous term is above the message term");
                }
                let mut expected = prev_index.next();
                let mut term = *prev_term;
                for entry in entries {
                    if entry.index != expected || expected.0 == u64::MAX {
                        return invalid("append entries are not contiguous after prev_index");
                    }
                    if entry.term < term || entry.term > m.term {
                        return invalid("append entry terms go backwards or ahead of the leader");
                    }
                    expected = expected.next();
                    term = entry.term;
                }
            }
            MessageBody::AckedThrough { term, .. } if *term > m.term => {
                return invalid("acknowledged entry's term is above the message term");
            }
            MessageBody::InstallLog { start, .. } | MessageBody::RepairStart { start } => {
                if start.first_index.0 == 0 || start.prev_term > m.term {
                    return invalid("log start is malformed");
                }
                if start.membership.voters.is_empty() {
                    return invalid("log start has no voters");
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn step_leader(&mut self, m: Message) -> Result<(), Error> {
        match m.body {
            MessageBody::AppResp { index, reject } => {
                self.handle_append_response(m.from, index, reject)
            }
            MessageBody::HeartbeatResp { read } => self.handle_heartbeat_response(m.from, read),
            MessageBody::ReadIndex { context } => self.read_index_as_leader(Some(m.from), context),
            // Only a leader sends these and there is one leader per term; a vote response
            // arriving after we won is simply late.
            _ => Ok(()),
        }
    }

    fn step_candidate(&mut self, m: Message) -> Result<(), Error> {
        match m.body {
            MessageBody::App { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallLog { .. } => {
                self.become_follower(self.term, Some(m.from));
                self.step_follower(m)
            }
            MessageBody::PreVoteResp { reject } if self.role == Role::PreCandidate => {
                self.votes.insert(m.from, !reject);
                match self.tally() {
                    VoteResult::Won => self.campaign(Campaign::Election),
                    VoteResult::Lost => {
                        self.become_follower(self.term, None);
                        Ok(())
                    }
                    VoteResult::Pending => Ok(()),
                }
            }
            MessageBody::VoteResp { reject } if self.role == Role::Candidate => {
                self.votes.insert(m.from, !reject);
                match self.tally() {
                    VoteResult::Won => self.become_leader(),
                    VoteResult::Lost => {
                        self.become_follower(self.term, None);
                        Ok(())
                    }
                    VoteResult::Pending => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn step_follower(&mut self, m: Message) -> Result<(), Error> {
        match m.body {
            MessageBody::App { prev_index, prev_term, entries, commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append(m.from, prev_index, prev_term, &entries, commit)
            }
            MessageBody::Heartbeat { commit, read } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                // The leader sends at most what it believes we match; never trust it past our
                // log, nor into entries only a repair answer gave us.
                let cap = self
                    .repair_unconfirmed
                    .map_or(self.log.last_index(), |from| from.prev().min(self.log.last_index()));
                self.log.commit_to(commit.min(cap));
                self.send(m.from, self.term, MessageBody::HeartbeatResp { read });
                Ok(())
            }
            MessageBody::InstallLog { start, commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_install_log(m.from, start, commit)
            }
            MessageBody::TimeoutNow => self.campaign(Campaign::Transfer),
            MessageBody::AckedThrough { index, term } if self.leader == Some(m.from) => {
                self.handle_acked_through(index, term)
            }
            MessageBody::ReadIndexResp { context, index } => {
                self.read_states.push(ReadState { index, context });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: &[Entry],
        commit: LogIndex,
    ) -> Result<(), Error> {
        if prev_index < self.log.committed {
            let committed = self.log.committed;
            self.send(from, self.term, MessageBody::AppResp { index: committed, reject: None });
            return Ok(());
        }
        match self.log.maybe_append(prev_index, prev_term, entries) {
            Ok(Some(last_new)) => {
                self.log.commit_to(commit.min(last_new));
                if let Some(from) = self.repair_unconfirmed {
                    // Our log matches the leader's through `last_new`.
                    self.repair_unconfirmed =
                        (last_new < self.log.last_index()).then(|| from.max(last_new.next()));
                }
                self.send(from, self.term, MessageBody::AppResp { index: last_new, reject: None });
            }
            Ok(None) => {
                let (index, term) = self.log.find_conflict_by_term(prev_index, prev_term)?;
                let reject = Some(RejectHint { index, term });
                self.send(from, self.term, MessageBody::AppResp { index: prev_index, reject });
            }
            Err(AppendError::ConflictsWithCommitted) => {
                return Err(Error::InvalidMessage {
                    from,
                    reason: "append would replace a committed entry",
                });
            }
            Err(AppendError::Store(err)) => return Err(err.into()),
        }
        Ok(())
    }

    fn handle_install_log(
        &mut self,
        from: NodeId,
        start: LogStart,
        commit: LogIndex,
    ) -> Result<(), Error> {
        let before = start.first_index.prev();
        if before <= self.log.committed {
            let committed = self.log.committed;
            self.send(from, self.term, MessageBody::AppResp { index: committed, reject: None });
            return Ok(());
        }
        if self.log.match_term(before, start.prev_term)? {
            // Our log already holds the leader's entry there: just learn that it is committed.
            self.log.commit_to(before);
        } else {
            self.log.restart(start.clone());
            self.membership = start.membership;
            self.membership_changed = true;
        }
        self.log.commit_to(commit.min(before));
        self.send(from, self.term, MessageBody::AppResp { index: before, reject: None });
        Ok(())
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        index: LogIndex,
        reject: Option<RejectHint>,
    ) -> Result<(), Error> {
        if index > self.log.last_index() {
            return Err(Error::InvalidMessage {
                from,
                reason: "acknowledged beyond the leader's log",
            });
        }
        let Some(pr) = self.progress.get_mut(&from) else { return Ok(()) };
        pr.recent_active = true;
        if let Some(hint) = reject {
            let acked = pr.matched;
            if hint.index < acked {
                // Its log no longer matches ours where it acknowledged: damage cut it.
                self.send_acked_through(from, acked)?;
            }
            let probe = if hint.term.0 > 0 {
                self.log.find_conflict_by_term(hint.index, hint.term)?.0
            } else {
                hint.index
            };
            let pr = self.progress.get_mut(&from).expect("looked up above");
            if pr.maybe_decrease_to(index, probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(from, true)?;
            }
            return Ok(());
        }
        let was_paused = pr.is_paused();
        if let ProgressState::Snapshot { pending } = pr.state
            && index >= pending
        {
            // The follower restarted its log where we told it to (or already had it).
            pr.become_probe();
        }
        // A probe answered at exactly the known match also proves where the logs match: the
        // follower can be streamed to even though nothing new was acknowledged.
        let probe_matched = pr.state == ProgressState::Probe && pr.matched == index;
        if !pr.maybe_update(index) && !probe_matched {
            if was_paused && !pr.is_paused() {
                self.send_append(from, true)?;
            }
            return Ok(());
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Replicate => pr.inflights.free_up_to(index),
            ProgressState::Snapshot { .. } => {}
        }
        if self.maybe_commit()? {
            self.bcast_append()?;
        } else if was_paused {
            self.send_append(from, true)?;
        }
        while self.send_append(from, false)? {}
        let caught_up =
            self.progress.get(&from).is_some_and(|pr| pr.matched == self.log.last_index());
        if self.transferee == Some(from) && caught_up {
            self.send(from, self.term, MessageBody::TimeoutNow);
        }
        Ok(())
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, read: Option<u64>) -> Result<(), Error> {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else { return Ok(()) };
        pr.recent_active = true;
        pr.probe_sent = false;
        // A heartbeat answer proves the follower is alive: free a slot so that a window full of
        // lost acknowledgements cannot stall replication for good.
        if pr.state == ProgressState::Replicate && pr.inflights.is_full() {
            pr.inflights.free_first();
        }
        if pr.matched < last {
            self.send_append(from, true)?;
        }
        if let Some(seq) = read {
            self.reads.ack(from, seq);
            self.release_reads();
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        for read in self.reads.release(&self.membership, self.id) {
            self.answer_read(read.requester, read.context, read.index);
        }
    }

    fn answer_read(&mut self, requester: Option<NodeId>, context: u64, index: LogIndex) {
        match requester {
            None => self.read_states.push(ReadState { index, context }),
            Some(to) => self.send(to, self.term, MessageBody::ReadIndexResp { context, index }),
        }
    }

    // ----- replication -----

    /// Sends `to` the entries it needs (or a log restart), unless its progress is paused.
    /// Without `send_if_empty`, sends only when there are entries. Returns whether it sent.
    fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> Result<bool, Error> {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get(&to) else { return Ok(false) };
        if pr.is_paused() || to == self.id {
            return Ok(false);
        }
        let next = pr.next;
        let prev_index = next.prev();
        let prev_term = self.log.term_if_known(prev_index)?;
        let entries = match prev_term {
            Some(_) if next <= last => {
                let end = last
                    .next()
                    .min(LogIndex(next.0.saturating_add(self.cfg.msg_entries_max as u64)));
                match self.log.entries(next..end, self.cfg.msg_bytes_max) {
                    Ok(entries) => Some(entries),
                    Err(StoreError::Compacted { .. }) => None,
                    Err(err) => return Err(err.into()),
                }
            }
            Some(_) => Some(Vec::new()),
            None => None,
        };
        let (Some(prev_term), Some(entries)) = (prev_term, entries) else {
            return self.send_log_start(to);
        };
        if entries.is_empty() && !send_if_empty {
            return Ok(false);
        }
        let bytes = entries.iter().map(Entry::size_bytes).sum();
        let sent_last = entries.last().map(|e| e.index);
        let commit = self.log.committed;
        let pr = self.progress.get_mut(&to).expect("looked up above");
        pr.sent_append(sent_last, bytes);
        self.send(to, self.term, MessageBody::App { prev_index, prev_term, entries, commit });
        Ok(true)
    }

    fn send_log_start(&mut self, to: NodeId) -> Result<bool, Error> {
        let start = self.log.start();
        let commit = self.log.committed;
        let pr = self.progress.get_mut(&to).expect("caller looked it up");
        pr.become_snapshot(start.first_index.prev());
        self.send(to, self.term, MessageBody::InstallLog { start, commit });
        Ok(true)
    }

    pub(crate) fn bcast_append(&mut self) -> Result<(), Error> {
        let ids: Vec<NodeId> = self.progress.keys().copied().collect();
        for id in ids {
            self.send_append(id, true)?;
        }
        Ok(())
    }

    fn bcast_heartbeat(&mut self, read: Option<u64>) {
        let committed = self.log.committed;
        let targets: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(&id, pr)| (id, pr.matched.min(committed)))
            .collect();
        for (id, commit) in targets {
            self.send(id, self.term, MessageBody::Heartbeat { commit, read });
        }
    }

    /// Advances the commit index to what a quorum durably holds, if that is an entry of this
    /// term (Raft's rule against Figure 8). Returns whether it moved.
    pub(crate) fn maybe_commit(&mut self) -> Result<bool, Error> {
        let quorum =
            self.membership.committed_index(|id| self.progress.get(&id).map(|p| p.matched));
        if quorum <= self.log.committed || self.log.term_if_known(quorum)? != Some(self.term) {
            return Ok(false);
        }
        let first_in_term = self.log.term_if_known(self.log.committed)? != Some(self.term);
        self.log.commit_to(quorum);
        if first_in_term {
            // Reads that arrived before the leader had committed in its term can go now: its
            // commit index is now at least every commit any earlier leader acknowledged.
            for (requester, context) in std::mem::take(&mut self.reads_waiting_for_commit) {
                self.read_index_as_leader(requester, context)?;
            }
        }
        Ok(true)
    }

    /// The caller reports our own log durable through `index` (the leader's self-ack).
    pub(crate) fn persisted_to(&mut self, index: LogIndex) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Ok(());
        }
        let updated = self.progress.get_mut(&self.id).is_some_and(|pr| pr.maybe_update(index));
        if updated && self.maybe_commit()? {
            self.bcast_append()?;
        }
        Ok(())
    }

    fn append_entries(&mut self, entries: Vec<(EntryKind, Bytes)>) -> LogIndex {
        let mut index = self.log.last_index();
        let term = self.term;
        let entries = entries
            .into_iter()
            .map(|(kind, data)| {
                index = index.next();
                Entry { term, index, kind, data }
            })
            .collect();
        self.log.append(entries);
        index
    }

    // ----- proposals -----

    fn check_can_propose(&self) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        if let Some(to) = self.transferee {
            return Err(Error::TransferInProgress { to });
        }
        Ok(())
    }

    pub(crate) fn propose(
        &mut self,
        data: Vec<Bytes>,
    ) -> Result<std::ops::RangeInclusive<LogIndex>, Error> {
        self.check_can_propose()?;
        let proposed_bytes: u64 = data.iter().map(|d| d.len() as u64).sum();
        // One proposal may exceed the limit alone, or a single huge record could never go in.
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes.saturating_add(proposed_bytes)
                > self.cfg.uncommitted_bytes_max
        {
            return Err(Error::UncommittedBytesExceeded {
                uncommitted_bytes: self.uncommitted_bytes,
                proposed_bytes,
                max_bytes: self.cfg.uncommitted_bytes_max,
            });
        }
        let first = self.log.last_index().next();
        if data.is_empty() {
            return Ok(first..=first.prev());
        }
        self.uncommitted_bytes += proposed_bytes;
        let last = self.append_entries(data.into_iter().map(|d| (EntryKind::Normal, d)).collect());
        self.bcast_append()?;
        Ok(first..=last)
    }

    pub(crate) fn propose_conf_change(&mut self, change: &ConfChange) -> Result<LogIndex, Error> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied {
            return Err(Error::ConfChangePending { index: self.pending_conf_index });
        }
        self.membership.apply(change).map_err(|reason| Error::InvalidConfChange { reason })?;
        let index =
            self.append_entries(vec![(EntryKind::ConfChange, Bytes::from(change.encode()))]);
        self.pending_conf_index = index;
        self.bcast_append()?;
        Ok(index)
    }

    /// Applies a committed membership change (the caller is being handed the entry). A change
    /// that is invalid here was invalid on every node: all ignore it alike.
    pub(crate) fn apply_conf_change(&mut self, change: &ConfChange) -> Result<(), Error> {
        let Ok(next) = self.membership.apply(change) else { return Ok(()) };
        self.membership = next;
        self.membership_changed = true;
        if self.role != Role::Leader {
            return Ok(());
        }
        let members = self.membership.members();
        let next_index = self.log.last_index().next();
        self.progress.retain(|id, _| members.contains(id));
        let mut added = Vec::new();
        for id in members {
            if !self.progress.contains_key(&id) {
                let pr = self.new_progress(next_index);
                self.progress.insert(id, pr);
                added.push(id);
            }
        }
        if self.transferee.is_some_and(|to| !self.membership.is_voter(to)) {
            self.transferee = None;
        }
        if !self.membership.is_voter(self.id) {
            // A leader removed from the voters hands leadership to the most caught-up voter
            // that remains, instead of stepping down at once: a voter that has not heard that
            // the removal committed still counts this node in its quorum, and this node (its
            // log ahead of it, no longer campaigning) would refuse it a vote, so the cluster
            // could be left without a leader for good. It proposes nothing meanwhile (the
            // transfer refuses proposals) and steps down when the new leader's term reaches
            // it (thesis 4.2.2 asks only that it step down; this makes the hand-over live).
            return self.hand_over();
        }
        if self.maybe_commit()? {
            self.bcast_append()?;
        }
        for id in added {
            // Start probing a new member now rather than at the next heartbeat answer.
            self.send_append(id, true)?;
        }
        Ok(())
    }

    /// Called after committed entries through `applied` were handed out.
    pub(crate) fn after_apply(&mut self, applied_bytes: u64) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Ok(());
        }
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(applied_bytes);
        if self.membership.is_joint()
            && self.membership.auto_leave
            && self.log.applied >= self.pending_conf_index
        {
            let change = ConfChange::LeaveJoint;
            let index =
                self.append_entries(vec![(EntryKind::ConfChange, Bytes::from(change.encode()))]);
            self.pending_conf_index = index;
            self.bcast_append()?;
        }
        Ok(())
    }

    /// A leader that is no longer a voter: transfer leadership to the remaining voter with the
    /// highest match (the lowest id among equals).
    fn hand_over(&mut self) -> Result<(), Error> {
        let best = self
            .membership
            .voters
            .iter()
            .filter(|id| **id != self.id)
            .max_by_key(|id| {
                let matched = self.progress.get(id).map_or(LogIndex(0), |pr| pr.matched);
                (matched, std::cmp::Reverse(**id))
            })
            .copied();
        match best {
            Some(to) => {
                self.transferee = None;
                self.transfer_leader(to)
            }
            None => {
                self.become_follower(self.term, None);
                Ok(())
            }
        }
    }

    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        if to == self.id {
            return Ok(());
        }
        if !self.membership.is_voter(to) {
            return Err(Error::InvalidTransfer { reason: "the target is not a voter" });
        }
        if self.transferee == Some(to) {
            return Ok(());
        }
        self.transferee = Some(to);
        self.election_elapsed = 0;
        let caught_up =
            self.progress.get(&to).is_some_and(|pr| pr.matched == self.log.last_index());
        if caught_up {
            self.send(to, self.term, MessageBody::TimeoutNow);
        } else {
            self.send_append(to, true)?;
        }
        Ok(())
    }

    pub(crate) fn read_index(&mut self, context: u64) -> Result<(), Error> {
        match (self.role, self.leader) {
            (Role::Leader, _) => self.read_index_as_leader(None, context),
            (Role::Follower, Some(leader)) => {
                self.send(leader, self.term, MessageBody::ReadIndex { context });
                Ok(())
            }
            _ => Err(Error::NotLeader { leader: self.leader }),
        }
    }

    fn read_index_as_leader(
        &mut self,
        requester: Option<NodeId>,
        context: u64,
    ) -> Result<(), Error> {
        let voters = self.membership.all_voters();
        if voters.len() == 1 && voters.contains(&self.id) {
            let committed = self.log.committed;
            self.answer_read(requester, context, committed);
            return Ok(());
        }
        if self.log.term_if_known(self.log.committed)? != Some(self.term) {
            if self.reads_waiting_for_commit.len() < crate::read_only::PENDING_READS_MAX {
                self.reads_waiting_for_commit.push((requester, context));
            }
            return Ok(());
        }
        if self.reads.is_full() {
            // Dropped: the caller times out and retries, as after a lost message.
            return Ok(());
        }
        let seq = self.reads.add(self.log.committed, requester, context);
        self.bcast_heartbeat(Some(seq));
        Ok(())
    }

    pub(crate) fn report_unreachable(&mut self, id: NodeId) {
        if let Some(pr) = self.progress.get_mut(&id)
            && pr.state == ProgressState::Replicate
        {
            pr.become_probe();
        }
    }

    pub(crate) fn report_log_start(&mut self, id: NodeId, delivered: bool) {
        let Some(pr) = self.progress.get_mut(&id) else { return };
        if let ProgressState::Snapshot { .. } = pr.state {
            if !delivered {
                pr.state = ProgressState::Snapshot { pending: LogIndex(0) };
            }
            pr.become_probe();
            // Wait for the follower's answer (or a heartbeat's) before probing again.
            pr.probe_sent = true;
        }
    }
}
