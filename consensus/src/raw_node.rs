//! The caller's handle on one node: inputs go in through methods, output comes out as a
//! [`Ready`], and [`RawNode::advance`] reports what the caller made durable.

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;

use bytes::Bytes;
use raftwal_types::{HardState, LogIndex, NodeId, Term};

use crate::config::Config;
use crate::error::Error;
use crate::log::RaftLog;
use crate::membership::{ConfChange, ConfStep, Membership};
use crate::message::{Entry, EntryKind, LogStart, Message, ReadState};
use crate::progress::Progress;
use crate::raft::{Campaign, Raft, Role};
use crate::storage::LogStore;

/// What a node restarts from: what the caller persisted.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// The last hard state the caller made durable.
    pub hard_state: HardState,
    /// The membership as of `applied` (the last [`Ready::membership`] the caller persisted, or
    /// empty for a node that has applied nothing).
    pub membership: Membership,
    /// The last index whose committed entry the caller applied; entries after it up to the
    /// commit index are handed out again.
    pub applied: LogIndex,
    /// Set when damage cut this node's log below what it once held: the (index, term) of the
    /// last entry it held before (or an upper bound of it). Until the log is again at least as
    /// up to date as that, the node neither campaigns nor grants a vote to a candidate whose log
    /// is less up to date than it: entries it acknowledged may be committed with its help, and
    /// a vote judged by the shorter log could elect a leader without them. The caller must keep
    /// the floor durable until the log reaches it.
    pub repair_floor: Option<(LogIndex, Term)>,
    /// Set when recovery cut a tail of the log it could not read: a write torn by a crash (never
    /// acknowledged), or damage after it was synced that looks the same (perhaps acknowledged).
    /// The node then holds elections for one election timeout (it neither campaigns nor votes,
    /// except for a leader's transfer) and tells the first leader it hears from where its log
    /// ends. A leader that counted it as holding more answers with what it acknowledged, which
    /// becomes the repair floor ([`Ready::repair_floor`]). With no such leader alive, the
    /// entries were acknowledged to no one who can tell, and the node goes on as after a torn
    /// write (a cluster-wide power loss must not block elections).
    pub tail_cut: bool,
}

/// The leader and this node's role, reported when they change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// This node's role.
    pub role: Role,
}

/// Everything the caller must do, and the order it may do it in.
///
/// For each Ready, in this order:
/// 1. `messages` may be sent at once, before anything is persisted (they are the leader's
///    appends, heartbeats, log restarts and transfers; thesis 10.2.1 lets a leader send entries
///    while it writes them).
/// 2. Persist, in order: `log_start` (discard the whole log, restart it there), then `entries`
///    (replacing any stored entries from `entries[0].index` on), then `hard_state`.
/// 3. Once all of that, and everything earlier Readies asked for, is durable: send
///    `persisted_messages` (votes and acknowledgements, which promise durable state), and call
///    [`RawNode::advance`] with `number`.
/// 4. Apply `committed_entries` in order (they are durable here already, and may be applied
///    before step 3), persisting `membership` with the index of the last applied entry, then
///    serve `read_states` once applied through their index.
///
/// The caller may take further Readies before advancing this one (pipelined writes); it must
/// write them in order.
#[derive(Debug, Default)]
pub struct Ready {
    /// This Ready's number, for [`RawNode::advance`].
    pub number: u64,
    /// The leader or role changed. Act on it at any time.
    pub soft_state: Option<SoftState>,
    /// The hard state changed; persist it before sending `persisted_messages`.
    pub hard_state: Option<HardState>,
    /// The leader restarted this node's log: discard every stored entry and start the log at
    /// `first_index` with `prev_term` before it, remembering the membership (it is what
    /// [`LogStore::start`] answers from then on).
    pub log_start: Option<LogStart>,
    /// Entries to append durably. When `entries[0].index` is at or below the stored last index,
    /// the stored entries from there on are replaced.
    pub entries: Vec<Entry>,
    /// Committed entries to apply, in index order, contiguous with the previous Ready's.
    pub committed_entries: Vec<Entry>,
    /// The membership after this Ready's committed entries (or log restart), when it changed.
    pub membership: Option<Membership>,
    /// Messages that may be sent at once.
    pub messages: Vec<Message>,
    /// Messages to send only once this Ready's persistence is complete.
    pub persisted_messages: Vec<Message>,
    /// Read barriers that completed.
    pub read_states: Vec<ReadState>,
    /// A leader proved that this node acknowledged entries its log no longer holds: the new
    /// repair floor ([`Restored::repair_floor`]). Persist it (replacing a lower one) before
    /// sending `persisted_messages`.
    pub repair_floor: Option<(LogIndex, Term)>,
}

impl Ready {
    /// Whether the Ready asks for nothing at all.
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.log_start.is_none()
            && self.entries.is_empty()
            && self.committed_entries.is_empty()
            && self.membership.is_none()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.read_states.is_empty()
            && self.repair_floor.is_none()
    }
}

/// A snapshot of a node's state, for status pages and tests.
#[derive(Clone, Debug)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Its current term.
    pub term: Term,
    /// Its vote in that term.
    pub vote: Option<NodeId>,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its role.
    pub role: Role,
    /// The commit index.
    pub commit: LogIndex,
    /// The last index handed out to apply.
    pub applied: LogIndex,
    /// The first index of its log.
    pub first_index: LogIndex,
    /// The last index of its log (durable or not).
    pub last_index: LogIndex,
    /// The last index known durable.
    pub persisted_index: LogIndex,
    /// Its membership.
    pub membership: Membership,
    /// The leader's view of each member (empty unless leader).
    pub progress: BTreeMap<NodeId, Progress>,
    /// The target of a leadership transfer in progress.
    pub transferee: Option<NodeId>,
    /// The repair floor ([`Restored::repair_floor`]) while the log is still below it, as of
    /// the last tick, vote or campaign.
    pub repair_floor: Option<(LogIndex, Term)>,
}

/// The entries every founding member of a new group writes to its empty log before it starts:
/// one membership change per voter at term 1, all committed. A node that joins later starts
/// with an empty log and empty membership and learns both from the leader, these entries
/// included.
pub fn bootstrap(voters: &[NodeId]) -> (Vec<Entry>, HardState) {
    let entries: Vec<Entry> = voters
        .iter()
        .enumerate()
        .map(|(i, &id)| Entry {
            term: Term(1),
            index: LogIndex(i as u64 + 1),
            kind: EntryKind::ConfChange,
            data: Bytes::from(ConfChange::Simple(ConfStep::AddVoter(id)).encode()),
        })
        .collect();
    let commit = LogIndex(entries.len() as u64);
    (entries, HardState { term: Term(1), vote: None, commit })
}

struct Unpersisted {
    number: u64,
    log_start: Option<LogIndex>,
    last: Option<(LogIndex, Term)>,
}

/// A Raft node as a pure state machine: no clock, no IO, no threads, no global randomness.
/// See the crate docs for the loop that drives it.
pub struct RawNode<S: LogStore> {
    raft: Raft<S>,
    prev_soft: SoftState,
    prev_hard: HardState,
    next_number: u64,
    unpersisted: VecDeque<Unpersisted>,
}

impl<S: LogStore> std::fmt::Debug for RawNode<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawNode")
            .field("id", &self.raft.id)
            .field("term", &self.raft.term)
            .field("role", &self.raft.role)
            .finish_non_exhaustive()
    }
}

impl<S: LogStore> RawNode<S> {
    /// A node restarting from what the caller persisted, over its persisted log.
    pub fn new(config: Config, restored: Restored, store: S) -> Result<RawNode<S>, Error> {
        config.validate()?;
        let Restored { hard_state, mut membership, mut applied, repair_floor, tail_cut } = restored;
        let first = store.first_index();
        let last = store.last_index();
        let start = store.start();
        // The commit index is volatile state in Raft: a caller may persist it late or not at
        // all, and may apply committed entries before the hard state that committed them is
        // durable (Ready step 4 before step 3). What it applied is committed all the same.
        let mut commit = hard_state.commit.max(applied);
        if commit > last {
            return Err(Error::InvalidRestore { reason: "the commit index is beyond the log" });
        }
        if applied < first.prev() {
            // What was applied is compacted away; the log start carries the membership there.
            applied = first.prev();
            membership = start.membership;
        }
        commit = commit.max(first.prev());
        let mut log = RaftLog::new(store, commit, applied);
        if let Some(floor) = log.committed_conf_change_floor(config.apply_bytes_max)? {
            log.commit_to(floor);
        }
        let mut raft = Raft::new(config, hard_state.term, hard_state.vote, log, membership);
        raft.repair_floor = repair_floor.map(|(index, term)| (term, index));
        raft.repair_pending()?;
        if tail_cut {
            raft.hold_after_tail_cut();
        }
        let prev_soft = SoftState { leader: None, role: Role::Follower };
        let prev_hard = HardState { term: hard_state.term, vote: hard_state.vote, commit };
        Ok(RawNode { raft, prev_soft, prev_hard, next_number: 1, unpersisted: VecDeque::new() })
    }

    /// One unit of time passed.
    pub fn tick(&mut self) -> Result<(), Error> {
        self.raft.tick()
    }

    /// A message from a peer. A message no correct peer sends is refused with an error and
    /// changes nothing.
    pub fn step(&mut self, msg: Message) -> Result<(), Error> {
        self.raft.step(msg)
    }

    /// Proposes records; returns the indexes they will have if they commit.
    pub fn propose(&mut self, records: Vec<Bytes>) -> Result<RangeInclusive<LogIndex>, Error> {
        self.raft.propose(records)
    }

    /// Proposes a membership change; returns its index.
    pub fn propose_conf_change(&mut self, change: &ConfChange) -> Result<LogIndex, Error> {
        self.raft.propose_conf_change(change)
    }

    /// Asks for a read barrier; it completes as a [`ReadState`] with `context`. On a follower
    /// the request is forwarded to the leader; if the leader or a message is lost it never
    /// completes, and the caller retries after its own timeout.
    pub fn read_index(&mut self, context: u64) -> Result<(), Error> {
        self.raft.read_index(context)
    }

    /// Asks the leader to hand leadership to `to`. Proposals are refused until the transfer
    /// ends or is abandoned after an election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), Error> {
        self.raft.transfer_leader(to)
    }

    /// Starts an election now (with pre-vote first, if configured).
    pub fn campaign(&mut self) -> Result<(), Error> {
        let kind = if self.raft.cfg.pre_vote { Campaign::PreElection } else { Campaign::Election };
        self.raft.campaign(kind)
    }

    /// The transport could not deliver to `id` (a full queue, a lost connection): the leader
    /// stops streaming to it and probes again.
    pub fn report_unreachable(&mut self, id: NodeId) {
        self.raft.report_unreachable(id);
    }

    /// Whether a log restart sent to `id` was delivered.
    pub fn report_log_start(&mut self, id: NodeId, delivered: bool) {
        self.raft.report_log_start(id, delivered);
    }

    /// Whether [`RawNode::ready`] has anything to hand out.
    pub fn has_ready(&self) -> bool {
        let raft = &self.raft;
        self.soft_state() != self.prev_soft
            || self.hard_state() != self.prev_hard
            || raft.log.has_unpersisted()
            || raft.log.next_committed_range().is_some()
            || raft.membership_changed
            || !raft.msgs.is_empty()
            || !raft.msgs_after_persist.is_empty()
            || !raft.read_states.is_empty()
            || raft.floor_raised
    }

    fn soft_state(&self) -> SoftState {
        SoftState { leader: self.raft.leader, role: self.raft.role }
    }

    fn hard_state(&self) -> HardState {
        HardState { term: self.raft.term, vote: self.raft.vote, commit: self.raft.log.committed }
    }

    /// Takes everything there is to do. See [`Ready`] for the order to do it in.
    pub fn ready(&mut self) -> Result<Ready, Error> {
        let (log_start, entries) = self.raft.log.take_unpersisted();
        let committed_entries = match self.raft.log.next_committed_range() {
            Some(range) => self.raft.log.entries(range, self.raft.cfg.apply_bytes_max)?,
            None => Vec::new(),
        };
        if let Some(last) = committed_entries.last() {
            let mut normal_bytes = 0;
            for entry in &committed_entries {
                match entry.kind {
                    EntryKind::ConfChange => {
                        if let Some(change) = entry.conf_change() {
                            self.raft.apply_conf_change(&change)?;
                        }
                    }
                    EntryKind::Normal => normal_bytes += entry.size_bytes(),
                    EntryKind::Noop => {}
                }
            }
            self.raft.log.applied = last.index;
            self.raft.after_apply(normal_bytes)?;
        }

        let number = self.next_number;
        self.next_number += 1;
        let soft = self.soft_state();
        let hard = self.hard_state();
        let ready = Ready {
            number,
            soft_state: (soft != self.prev_soft).then_some(soft),
            hard_state: (hard != self.prev_hard).then_some(hard),
            log_start,
            entries,
            committed_entries,
            membership: std::mem::take(&mut self.raft.membership_changed)
                .then(|| self.raft.membership.clone()),
            messages: std::mem::take(&mut self.raft.msgs),
            persisted_messages: std::mem::take(&mut self.raft.msgs_after_persist),
            read_states: std::mem::take(&mut self.raft.read_states),
            repair_floor: std::mem::take(&mut self.raft.floor_raised)
                .then(|| self.repair_floor())
                .flatten(),
        };
        self.prev_soft = soft;
        self.prev_hard = hard;
        self.unpersisted.push_back(Unpersisted {
            number,
            log_start: ready.log_start.as_ref().map(|s| s.first_index),
            last: ready.entries.last().map(|e| (e.index, e.term)),
        });
        Ok(ready)
    }

    /// Everything Ready `number` (and every earlier Ready) asked to persist is durable.
    pub fn advance(&mut self, number: u64) -> Result<(), Error> {
        while self.unpersisted.front().is_some_and(|u| u.number <= number) {
            let done = self.unpersisted.pop_front().expect("checked non-empty");
            if let Some(first_index) = done.log_start {
                self.raft.log.start_persisted(first_index);
            }
            if let Some((index, term)) = done.last {
                self.raft.log.stable_to(index, term);
            }
        }
        let persisted = self.raft.log.persisted_index();
        self.raft.persisted_to(persisted)
    }

    /// The index of the last entry in the log, written or not; the next proposal goes after it
    /// (cheaper than [`RawNode::status`] on every proposal).
    pub fn last_index(&self) -> LogIndex {
        self.raft.log.last_index()
    }

    /// The current term.
    pub fn term(&self) -> Term {
        self.raft.term
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.leader
    }

    /// The node's state.
    pub fn status(&self) -> Status {
        let raft = &self.raft;
        Status {
            id: raft.id,
            term: raft.term,
            vote: raft.vote,
            leader: raft.leader,
            role: raft.role,
            commit: raft.log.committed,
            applied: raft.log.applied,
            first_index: raft.log.first_index(),
            last_index: raft.log.last_index(),
            persisted_index: raft.log.persisted_index(),
            membership: raft.membership.clone(),
            progress: raft.progress.clone(),
            transferee: raft.transferee,
            repair_floor: raft.repair_floor.map(|(term, index)| (index, term)),
        }
    }

    /// The repair floor while the log is still below it ([`Restored::repair_floor`]), as of the
    /// last tick, vote or campaign.
    pub fn repair_floor(&self) -> Option<(LogIndex, Term)> {
        self.raft.repair_floor.map(|(term, index)| (index, term))
    }

    /// The store, for reading.
    pub fn store(&self) -> &S {
        &self.raft.log.store
    }

    /// The store, for the caller's writes (as a Ready asks).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.raft.log.store
    }
}
