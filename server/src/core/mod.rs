//! The node core: one Raft group's node as a deterministic state machine, with no IO.
//!
//! What it is: the owner of the [`RawNode`] and of everything replicated or derived from the
//! log: which entries are records ([`LogState`]), the producer table, membership and addresses
//! ([`Members`]), the log start and trims, and the waiters of every request (`waiters.rs`).
//! What it is not: a thread, a clock, a lock, a socket or a file. Like quinn-proto under quinn,
//! inputs go in through [`NodeCore::handle`] and actions come out of
//! [`NodeCore::poll_action`]; the shell (`crate::shell`) does the IO, and the simulation
//! (`examples/cluster-sim`) runs the same core over a simulated network, disk and clock.
//!
//! The core reads the log through consensus's [`raftwal_consensus::LogStore`] (the WAL, as
//! [`WalStore`]); it never writes. Every write is an [`Action`], and the shell must carry out
//! the actions in the order they come, each one before the next (a failed write is fatal: the
//! shell stops the node). That order is what makes the core's bookkeeping true without
//! waiting for results: a reply that follows a write in the action order reaches the client
//! only after the write.
//!
//! The core is one group's; a process may host many (every message names its group).

mod apply;
mod log_state;
mod members;
mod ready;
mod stream_state;
pub use stream_state::StreamsCheckpoint;
pub mod streams;
mod waiters;

use std::collections::VecDeque;

use bytes::Bytes;
use raftwal_consensus::{
    ConfChange, Error as RaftError, HardState, LogIndex, LogStore, Message, NodeId, RawNode, Role,
    Status, Term,
};

pub use log_state::{Applied, LogState, ReadView};
pub use members::Members;
pub use raftwal_client::dedup::SequenceCheck;

use crate::envelope::{self, Addresses, ProducerSeq};
use crate::store::{StartRecord, WalStore};
use ready::Writes;
use waiters::Waiters;

/// Identifies a request while the core works on it; the shell maps it to its caller.
pub type RequestId = u64;

/// What a client or an operator asks of the node.
#[derive(Debug)]
pub enum Request {
    /// Append records.
    Append(AppendReq),
    /// A membership change, with the new node's addresses to replicate first.
    ConfChange { change: ConfChange, addresses: Option<Addresses> },
    /// Hand leadership to a voter.
    Transfer { to: NodeId },
    /// Discard the log below an index on every node.
    Trim { before: LogIndex },
    /// A read barrier: answered with the commit index a quorum confirmed.
    ReadIndex,
    /// A command on named streams, answered with what applying it did.
    Stream(streams::Command),
    /// This node's stream state and the log index it was applied to, if at least `at_least`
    /// (a peer whose log restarted asks for it).
    StreamsState { at_least: LogIndex },
    /// Install a peer's stream state, applied to `at` (this node's log restarted past the
    /// commands it came from).
    InstallStreams { at: LogIndex, state: Bytes },
}

/// One client append.
#[derive(Debug)]
pub struct AppendReq {
    /// The records.
    pub records: Vec<Bytes>,
    /// The offset the first record must get.
    pub expected_next: Option<LogIndex>,
    /// The producer and sequence, for deduplication.
    pub producer: Option<ProducerSeq>,
}

/// A committed append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOk {
    /// The first record's offset.
    pub first: LogIndex,
    /// The last record's offset.
    pub last: LogIndex,
    /// The producer's sequence had committed before; these are the original offsets.
    pub duplicate: bool,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An append committed.
    Appended(AppendOk),
    /// A membership change committed at this index, a trim left the log starting here, or a
    /// read barrier confirmed this commit index.
    Index(LogIndex),
    /// A leadership transfer started.
    Done,
    /// A stream command applied.
    Stream(streams::StreamOutcome),
    /// The stream state, applied to this index.
    StreamsState { at: LogIndex, state: Bytes },
}

/// Why the node could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// This node does not lead; the leader, if known.
    #[error("not leader")]
    NotLeader { leader: Option<NodeId> },
    /// `expected_next_offset` did not match.
    #[error("offset mismatch: the next offset is {next}")]
    OffsetMismatch { next: LogIndex },
    /// A limit was hit; retry later.
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The append was not committed: a leader change replaced it.
    #[error("the append was lost in a leader change; it did not commit")]
    Lost,
    /// The producer sequence is older than the ones remembered; its outcome is unknown.
    #[error("producer sequence {sequence} is older than the sequences remembered for it")]
    StaleSequence { sequence: u64 },
    /// The producer sequence is below the producer's latest applied one and was never
    /// applied: the append is not in the log, and will not be.
    #[error(
        "producer sequence {sequence} is below the producer's latest applied sequence {latest}: \
         not appended (appends of a producer apply in sequence order)"
    )]
    OutOfOrder { sequence: u64, latest: u64 },
    /// The request cannot be done.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The node is stopping or failed; nothing was proposed.
    #[error("node stopped: {0}")]
    Stopped(String),
    /// The request may or may not have taken effect.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl RequestError {
    /// The refusal of a producer sequence that the producer rule does not let apply.
    pub fn producer(sequence: u64, check: SequenceCheck) -> RequestError {
        match check {
            SequenceCheck::OutOfOrder { latest } => RequestError::OutOfOrder { sequence, latest },
            _ => RequestError::StaleSequence { sequence },
        }
    }
}

/// A request's outcome.
pub type Outcome = Result<Reply, RequestError>;

/// Everything that happens to a node.
#[derive(Debug)]
pub enum Input {
    /// A message from a peer.
    Peer(Message),
    /// A request to answer with [`Action::Reply`].
    Request { id: RequestId, request: Request },
    /// Every [`Action::Write`] up to and including `number` is durable.
    Persisted { number: u64 },
    /// A message to `to` could not be queued (`log_start`: it was a log restart).
    Unreachable { to: NodeId, log_start: bool },
    /// Time passed: one tick. `now_ms` is the shell's clock (simulated in the simulation).
    Tick { now_ms: u64 },
    /// The data disk went under (or back over) its free-space watermark: appends are refused
    /// here meanwhile, so a leader hands leadership to a voter that may have room.
    DiskLow(bool),
}

/// How a log start moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartChange {
    /// Discard the entries below the new start (a trim).
    Compact,
    /// Discard the whole log; it restarts empty at the new start (a follower behind the
    /// leader's trimmed start).
    Restart { prev_term: Term },
}

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Queue a message to a peer; if it cannot be queued, feed back [`Input::Unreachable`].
    Send(Message),
    /// Discard the stored and queued entries from `from` on (a conflicting suffix).
    Truncate { from: LogIndex },
    /// Queue the entries for writing; feed back [`Input::Persisted`] with `number` once they
    /// (and every earlier write) are durable.
    Write { number: u64, entries: Vec<raftwal_consensus::Entry> },
    /// Make every queued write durable now, before the next action (the queue of writes in
    /// flight is at its bound), then feed back [`Input::Persisted`] with `through`.
    Flush { through: u64 },
    /// Save the hard state durably before the next action (its term or vote changed).
    SaveHardState(HardState),
    /// Raise the repair floor durably before the next action: a leader proved that this node
    /// acknowledged entries its log no longer holds (consensus's `Ready::repair_floor`).
    RaiseRepairFloor((LogIndex, Term)),
    /// Save this commit index (with the saved term and vote) once the writes queued before it
    /// are durable, without holding up the actions after it: Raft needs no durable commit
    /// index, so a slow disk must not stall the core's other work on it.
    SaveCommit(LogIndex),
    /// Move the log start durably, with the log-start file: first name both records, then
    /// change the WAL, then name only the new one (a crash anywhere leaves a record that
    /// matches the WAL's first index).
    MoveStart { old: StartRecord, new: StartRecord, change: StartChange },
    /// Answer a request.
    Reply { id: RequestId, outcome: Outcome },
    /// Every entry up to this index is settled and may be read.
    PublishReadable(LogIndex),
    /// The readers' view of the state changed.
    PublishView(ReadView),
    /// Streams changed (`None`: removed); readers of each wake.
    PublishStreams(Vec<(String, Option<std::sync::Arc<streams::StreamView>>)>),
    /// Save this stream state (applied to `at`) durably before the next action: a restart
    /// then applies stream commands only above `at`, and a trim may drop the log below it.
    SaveStreams { at: LogIndex, state: Bytes },
    /// This node's stream state is gone (its log restarted at a leader's start): record that
    /// durably before the next action, and fetch a peer's state applied to at least
    /// `at_least` (then [`Request::InstallStreams`]). Stream reads and writes wait meanwhile.
    StreamsMissing { at_least: LogIndex },
    /// The stream state is back: reads and writes go on.
    StreamsInstalled,
    /// The node's status changed (role, leader, membership) or a tick passed.
    PublishStatus(Box<Status>),
    /// A node listens at these addresses: reach it there (and tell clients).
    Reach(Addresses),
    /// A node left the membership: stop reaching it.
    Unreach(NodeId),
    /// A node left the membership, or joined it anew: forget its data directory's incarnation,
    /// so that it comes back as a new peer.
    Forget(NodeId),
}

/// A failure that stops the node: the log store failed, or consensus refused the node's own
/// state.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Fatal {
    what: &'static str,
    source: RaftError,
}

fn fatal(what: &'static str) -> impl FnOnce(RaftError) -> Fatal {
    move |source| Fatal { what, source }
}

/// The core's settings.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node.
    pub id: NodeId,
    /// Ticks a read barrier may wait for its quorum before it is answered "not leader".
    pub read_barrier_ticks: u64,
    /// The first ReadIndex context of this incarnation. Contexts must never repeat across
    /// restarts, or a peer's late answer to a barrier of the previous process could complete a
    /// new one with a stale index; the shell derives it from a random seed.
    pub read_context_start: u64,
    /// The most producers the log state remembers.
    pub producers_max: usize,
    /// The most Readies with writes in flight before the core asks for a [`Action::Flush`].
    pub writes_in_flight_max: usize,
    /// A leader whose oldest write has not become durable for this many milliseconds hands
    /// leadership to a healthy voter (0: never). Its own disk holds up every acknowledgement.
    pub disk_stall_ms: u64,
    /// A known bug to plant, so the simulation can show its checker catches it. `None` in every
    /// real node; nothing outside the simulation sets it.
    #[doc(hidden)]
    pub planted: Option<PlantedBug>,
}

/// Bugs the simulation plants to prove its checker can fail.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Acknowledge an append once the leader's own write is durable, before a quorum has it.
    AckBeforeQuorum,
    /// Propose every producer append, even a sequence already applied or in flight.
    SkipDedup,
    /// Let readers see entries the leader wrote before they commit.
    ServeUncommitted,
    /// Apply a stream producer's retry of an applied (epoch, sequence) again.
    SkipStreamDedup,
    /// Install a peer's stream state without the commands this node applied after it.
    SkipStreamReplay,
}

impl std::str::FromStr for PlantedBug {
    type Err = String;

    fn from_str(s: &str) -> Result<PlantedBug, String> {
        match s {
            "ack-before-quorum" => Ok(PlantedBug::AckBeforeQuorum),
            "skip-dedup" => Ok(PlantedBug::SkipDedup),
            "serve-uncommitted" => Ok(PlantedBug::ServeUncommitted),
            "skip-stream-dedup" => Ok(PlantedBug::SkipStreamDedup),
            "skip-stream-replay" => Ok(PlantedBug::SkipStreamReplay),
            _ => Err(format!(
                "unknown bug {s:?}: ack-before-quorum, skip-dedup, serve-uncommitted, \
                 skip-stream-dedup or skip-stream-replay"
            )),
        }
    }
}

/// A leader whose disk is low hands leadership over at most this often.
const LOW_DISK_HANDOVER_EVERY_MS: u64 = 10_000;

/// Read barriers that may wait for a quorum at once; beyond, overload.
const READ_WAITERS_MAX: usize = 16_384;

/// The node core. See the module docs.
pub struct NodeCore {
    config: CoreConfig,
    raw: RawNode<WalStore>,
    log: LogState,
    /// Named streams, as applied from the log.
    streams: streams::Streams,
    /// Stream commands applied in this Ready, answered after the streams are published.
    stream_replies: Vec<(RequestId, Outcome)>,
    /// Stream commands at or below this index are in the state already (a checkpoint's).
    streams_floor: LogIndex,
    /// The state is missing until a peer's, applied to at least this index, is installed.
    streams_missing: Option<LogIndex>,
    /// Stream commands applied since the state was last saved.
    streams_unsaved: u64,
    /// The size of the last saved state.
    streams_saved_bytes: u64,
    members: Members,
    waiters: Waiters,
    writes: Writes,
    role: Role,
    leader: Option<NodeId>,
    /// The leader's first entry of its term: until it is applied, the producer table may miss
    /// sequences an earlier leader committed, so producer appends wait.
    term_start: LogIndex,
    /// The first index of the log, as the core has moved it (the WAL follows once the shell
    /// carried out the actions).
    first_index: LogIndex,
    ticks: u64,
    /// The shell's clock at the last tick.
    now_ms: u64,
    /// The data disk is under its free-space watermark.
    disk_low: bool,
    /// When this node last handed leadership over for a low disk.
    low_disk_handover_ms: Option<u64>,
    next_read_context: u64,
    /// The commit index saved when this core was made: entries up to it were applied before.
    committed_at_start: LogIndex,
    /// A repair from peers is under way (consensus has a repair floor).
    repairing: bool,
    actions: VecDeque<Action>,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore").field("id", &self.config.id).finish_non_exhaustive()
    }
}

impl NodeCore {
    /// A core over `raw`, whose log starts with `members` (the membership at the log start and
    /// the addresses kept with it) and whose saved hard state is `saved`.
    pub fn new(config: CoreConfig, raw: RawNode<WalStore>, members: Members) -> NodeCore {
        let planted_stream_bug = config.planted == Some(PlantedBug::SkipStreamDedup);
        let store = raw.store();
        let first_index = store.first_index();
        let saved = store.wal().hard_state();
        let submitted_last = store.last_index();
        let log = LogState::new(first_index.prev(), config.producers_max);
        let mut core = NodeCore {
            next_read_context: config.read_context_start.max(1),
            writes: Writes::new(saved, submitted_last, config.writes_in_flight_max),
            config,
            raw,
            log,
            streams: streams::Streams::new(planted_stream_bug),
            stream_replies: Vec::new(),
            streams_floor: LogIndex(0),
            streams_missing: None,
            streams_unsaved: 0,
            streams_saved_bytes: 0,
            members,
            waiters: Waiters::default(),
            role: Role::Follower,
            leader: None,
            term_start: LogIndex(0),
            first_index,
            ticks: 0,
            now_ms: 0,
            disk_low: false,
            low_disk_handover_ms: None,
            committed_at_start: saved.commit,
            repairing: false,
            actions: VecDeque::new(),
        };
        core.repairing = core.raw.repair_floor().is_some();
        for a in core.members.addresses().values() {
            core.actions.push_back(Action::Reach(a.clone()));
        }
        core.publish_view();
        core.publish_status();
        core
    }

    /// This node.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// Consensus's status now.
    pub fn status(&self) -> Status {
        self.raw.status()
    }

    /// Handles one input; its effects come out of [`NodeCore::poll_action`].
    pub fn handle(&mut self, input: Input) -> Result<(), Fatal> {
        match input {
            Input::Peer(msg) => {
                if let Err(e) = self.raw.step(msg) {
                    if matches!(e, RaftError::Store(_)) {
                        return Err(fatal("log store")(e));
                    }
                    tracing::debug!(error = %e, "peer message refused");
                }
            }
            Input::Request { id, request } => self.request(id, request)?,
            Input::Persisted { number } => self.persisted(number)?,
            Input::Unreachable { to, log_start } => {
                if log_start {
                    self.raw.report_log_start(to, false);
                }
                self.raw.report_unreachable(to);
            }
            Input::Tick { now_ms } => {
                self.now_ms = now_ms;
                self.raw.tick().map_err(fatal("tick"))?;
                self.ticks += 1;
                self.note_repair();
                self.expire_reads();
                self.save_commit();
                self.hand_over_if_unfit()?;
                self.publish_status();
            }
            Input::DiskLow(low) => self.disk_low = low,
        }
        Ok(())
    }

    /// The next action, or `None` when there is nothing to do until the next input. Takes the
    /// next Ready from consensus when the actions of the last one are all out, so that the
    /// shell has carried out one Ready's writes before the core reads the log for the next.
    pub fn poll_action(&mut self) -> Result<Option<Action>, Fatal> {
        while self.actions.is_empty() && self.raw.has_ready() {
            let rd = self.raw.ready().map_err(fatal("ready"))?;
            self.handle_ready(rd)?;
        }
        Ok(self.actions.pop_front())
    }

    /// The node is stopping (or failed): every request still waiting hears that its outcome is
    /// unknown, and the commit index held back from the Readies is saved.
    pub fn stop(&mut self, why: &str) {
        self.save_commit();
        self.fail_all(&RequestError::Unknown(format!(
            "the node stopped ({why}) before the outcome was known"
        )));
    }

    fn reply(&mut self, id: RequestId, outcome: Outcome) {
        self.actions.push_back(Action::Reply { id, outcome });
    }

    /// A leader proved that this node acknowledged through `floor`, and recovery had cut its
    /// log below that (a tail it took for a torn write): a repair from peers, like one found at
    /// the start. The floor is made durable before anything this node sends next.
    fn raised_repair_floor(&mut self, floor: (LogIndex, Term)) {
        self.actions.push_back(Action::RaiseRepairFloor(floor));
        let (index, term) = floor;
        let last = self.raw.last_index();
        tracing::error!(
            floor = %format!("{term}/{index}"),
            %last,
            "the leader says this node acknowledged entries that recovery cut from its log \
             (damage after the sync, not a torn write): repairing from peers; this node votes \
             for no log behind the floor until its own log reaches it"
        );
        if !self.repairing {
            self.repairing = true;
            metrics::counter!("raftwal_server_repairs_started_total", "what" => "acknowledged_tail")
                .increment(1);
            metrics::gauge!("raftwal_server_repair_pending").set(1.0);
        }
        self.publish_status();
    }

    /// Says so once consensus's repair floor is reached: the log holds again everything this
    /// node may have acknowledged before damage cut it. (The floor file is cleared at the next
    /// start; until then it only repeats this check.)
    fn note_repair(&mut self) {
        if self.repairing && self.raw.repair_floor().is_none() {
            self.repairing = false;
            let last = self.raw.last_index();
            tracing::info!(%last, "repair from peers complete: the log is back where it was");
            metrics::gauge!("raftwal_server_repair_pending").set(0.0);
            metrics::counter!("raftwal_server_repairs_completed_total").increment(1);
            self.publish_status();
        }
    }

    fn publish_status(&mut self) {
        self.actions.push_back(Action::PublishStatus(Box::new(self.raw.status())));
    }

    fn publish_view(&mut self) {
        if let Some(view) = self.log.take_view() {
            self.actions.push_back(Action::PublishView(view));
        }
    }

    fn not_leader(&self) -> RequestError {
        RequestError::NotLeader { leader: self.raw.leader() }
    }

    /// Maps a consensus refusal to the caller's error; a store failure is fatal.
    fn refusal(&self, e: RaftError) -> Result<RequestError, Fatal> {
        Ok(match e {
            RaftError::Store(_) => return Err(fatal("log store")(e)),
            RaftError::NotLeader { .. } => self.not_leader(),
            RaftError::TransferInProgress { .. } => {
                RequestError::Overloaded("leadership transfer in progress")
            }
            RaftError::UncommittedBytesExceeded { .. } => {
                RequestError::Overloaded("too many uncommitted bytes at the leader")
            }
            RaftError::ConfChangePending { .. } => {
                RequestError::Overloaded("another membership change is pending")
            }
            e => RequestError::Invalid(e.to_string()),
        })
    }

    fn request(&mut self, id: RequestId, request: Request) -> Result<(), Fatal> {
        match request {
            Request::Append(req) => self.append(id, req),
            Request::ConfChange { change, addresses } => self.conf_change(id, change, addresses),
            Request::Transfer { to } => {
                let outcome = match self.raw.transfer_leader(to) {
                    Ok(()) => Ok(Reply::Done),
                    Err(e) => Err(self.refusal(e)?),
                };
                self.reply(id, outcome);
                Ok(())
            }
            Request::Trim { before } => self.trim(id, before),
            Request::ReadIndex => self.read_index(id),
            Request::Stream(cmd) => self.stream(id, cmd),
            Request::StreamsState { at_least } => {
                let outcome = self.streams_state(at_least);
                self.reply(id, outcome);
                Ok(())
            }
            Request::InstallStreams { at, state } => {
                let outcome = self.install_streams(at, &state)?;
                self.reply(id, outcome);
                Ok(())
            }
        }
    }

    fn stream(&mut self, id: RequestId, cmd: streams::Command) -> Result<(), Fatal> {
        if self.role != Role::Leader {
            self.reply(id, Err(self.not_leader()));
            return Ok(());
        }
        if self.streams_missing.is_some() {
            let e = RequestError::Overloaded("this node is fetching the stream state from a peer");
            self.reply(id, Err(e));
            return Ok(());
        }
        match self.raw.propose(vec![envelope::encode_stream(&cmd)]) {
            Ok(range) => self.waiters.add_stream(*range.start(), self.raw.term(), id),
            Err(e) => {
                let e = self.refusal(e)?;
                self.reply(id, Err(e));
            }
        }
        Ok(())
    }

    fn append(&mut self, id: RequestId, req: AppendReq) -> Result<(), Fatal> {
        let AppendReq { records, expected_next, producer } = req;
        if self.role != Role::Leader {
            self.reply(id, Err(self.not_leader()));
            return Ok(());
        }
        if let Some(p) = producer
            && self.config.planted != Some(PlantedBug::SkipDedup)
        {
            // Deduplication happens here, before anything is proposed, so a repeat never
            // reaches the log (the log, not this table, decides what readers see).
            if self.log.applied() < self.term_start {
                let e = RequestError::Overloaded("a new leader is applying its log; retry shortly");
                self.reply(id, Err(e));
                return Ok(());
            }
            match self.log.producer_check(p) {
                SequenceCheck::New => {}
                SequenceCheck::Duplicate { first, last } => {
                    let ok =
                        AppendOk { first: LogIndex(first), last: LogIndex(last), duplicate: true };
                    self.reply(id, Ok(Reply::Appended(ok)));
                    return Ok(());
                }
                check => {
                    self.reply(id, Err(RequestError::producer(p.sequence, check)));
                    return Ok(());
                }
            }
            if self.waiters.join_pending(p, id) {
                // A retry while the original is in flight: one proposal, both answered.
                return Ok(());
            }
            if let Some(latest) = self.waiters.latest_pending(p.id)
                && p.sequence < latest
            {
                // A later sequence is already proposed: this one would land after it.
                let e = RequestError::OutOfOrder { sequence: p.sequence, latest };
                self.reply(id, Err(e));
                return Ok(());
            }
        }
        let next = self.raw.last_index().next();
        if let Some(expected) = expected_next
            && expected != next
        {
            self.reply(id, Err(RequestError::OffsetMismatch { next }));
            return Ok(());
        }
        match self.raw.propose(envelope::encode_batch(&records, producer)) {
            Ok(range) => {
                let first = *range.start();
                // An older waiter at this index belongs to an entry this leader's log replaced.
                let replaced = self.waiters.finish_append(first);
                self.answer_all(replaced, &Err(RequestError::Lost));
                let last = *range.end();
                self.waiters.add_append(first, last, self.raw.term(), producer, id);
            }
            Err(e) => {
                let e = self.refusal(e)?;
                self.reply(id, Err(e));
            }
        }
        Ok(())
    }

    fn answer_all(&mut self, ids: Vec<RequestId>, outcome: &Outcome) {
        for id in ids {
            self.reply(id, outcome.clone());
        }
    }

    fn conf_change(
        &mut self,
        id: RequestId,
        change: ConfChange,
        addresses: Option<Addresses>,
    ) -> Result<(), Fatal> {
        if self.role != Role::Leader {
            self.reply(id, Err(self.not_leader()));
            return Ok(());
        }
        if self.waiters.has_queued_conf() {
            let e = RequestError::Overloaded("another membership change is pending");
            self.reply(id, Err(e));
            return Ok(());
        }
        if let Err(why) = self.members.check_change(&change) {
            let e = RequestError::Invalid(format!("membership change refused: {why}"));
            self.reply(id, Err(e));
            return Ok(());
        }
        match addresses {
            // The addresses go first, so every member can reach the node once it is one.
            Some(a) => match self.raw.propose(vec![envelope::encode_address(&a)]) {
                Ok(range) => self.waiters.queue_conf(*range.start(), self.raw.term(), change, id),
                Err(e) => {
                    let e = self.refusal(e)?;
                    self.reply(id, Err(e));
                }
            },
            None => self.propose_conf(id, change)?,
        }
        Ok(())
    }

    fn propose_conf(&mut self, id: RequestId, change: ConfChange) -> Result<(), Fatal> {
        match self.raw.propose_conf_change(&change) {
            Ok(index) => self.waiters.add_conf(index, self.raw.term(), id),
            Err(e) => {
                let e = self.refusal(e)?;
                self.reply(id, Err(e));
            }
        }
        Ok(())
    }

    fn trim(&mut self, id: RequestId, before: LogIndex) -> Result<(), Fatal> {
        if self.role != Role::Leader {
            self.reply(id, Err(self.not_leader()));
            return Ok(());
        }
        let readable = self.log.readable();
        if before > readable.next() {
            let e = RequestError::Invalid(format!(
                "cannot trim below {before}: only offsets up to {readable} are committed"
            ));
            self.reply(id, Err(e));
            return Ok(());
        }
        match self.raw.propose(vec![envelope::encode_trim(before)]) {
            Ok(range) => self.waiters.add_trim(*range.start(), self.raw.term(), id),
            Err(e) => {
                let e = self.refusal(e)?;
                self.reply(id, Err(e));
            }
        }
        Ok(())
    }

    fn read_index(&mut self, id: RequestId) -> Result<(), Fatal> {
        if self.waiters.reads_len() >= READ_WAITERS_MAX {
            self.reply(id, Err(RequestError::Overloaded("too many read barriers waiting")));
            return Ok(());
        }
        let context = self.next_read_context;
        self.next_read_context = self.next_read_context.wrapping_add(1).max(1);
        match self.raw.read_index(context) {
            Ok(()) => self.waiters.add_read(context, self.ticks, id),
            Err(e) => {
                let e = self.refusal(e)?;
                self.reply(id, Err(e));
            }
        }
        Ok(())
    }

    /// A leader that cannot take appends while a voter might hands leadership over.
    ///
    /// - Its own disk has not finished a write for `disk_stall_ms`: it acknowledges nothing
    ///   meanwhile (entries are applied only once durable here too), though its followers may
    ///   be healthy and keep it in office with their heartbeat answers: a gray failure.
    /// - Its disk is under the free-space watermark, so it refuses appends. Another node's disk
    ///   may have room (nodes do not tell each other); at most once per
    ///   `LOW_DISK_HANDOVER_EVERY_MS`, so that when every disk is low, leadership does not churn.
    ///
    /// It hands leadership to the voter that answered recently with the highest match.
    fn hand_over_if_unfit(&mut self) -> Result<(), Fatal> {
        if self.role != Role::Leader {
            return Ok(());
        }
        let bound = self.config.disk_stall_ms;
        let stalled_ms = self.writes.oldest_pending_ms().map(|t| self.now_ms.saturating_sub(t));
        let stalled = match stalled_ms {
            Some(ms) if bound > 0 && ms >= bound => Some(ms),
            _ if (self.disk_low || self.streams_missing.is_some())
                && self.low_disk_handover_ms.is_none_or(|t| {
                    self.now_ms.saturating_sub(t) >= LOW_DISK_HANDOVER_EVERY_MS
                }) =>
            {
                None
            }
            _ => return Ok(()),
        };
        let status = self.raw.status();
        if status.transferee.is_some() {
            return Ok(());
        }
        let me = self.config.id;
        let healthy = status
            .progress
            .iter()
            .filter(|(id, pr)| **id != me && pr.recent_active && status.membership.is_voter(**id));
        let best = healthy.max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)));
        let Some((&to, _)) = best else { return Ok(()) };
        let reason = if let Some(stalled_ms) = stalled {
            tracing::warn!(
                stalled_ms,
                to = %to,
                "this leader's disk has not finished a write for {stalled_ms} ms: handing \
                 leadership to node {to}"
            );
            "disk_stall"
        } else if self.disk_low {
            self.low_disk_handover_ms = Some(self.now_ms);
            tracing::warn!(
                to = %to,
                "this leader's disk is under its free-space watermark and refuses appends: \
                 handing leadership to node {to}"
            );
            "disk_low"
        } else {
            self.low_disk_handover_ms = Some(self.now_ms);
            tracing::warn!(
                to = %to,
                "this leader's stream state is missing (it refuses stream commands until a \
                 peer's is installed): handing leadership to node {to}"
            );
            "streams_missing"
        };
        metrics::counter!("raftwal_server_leader_handovers_total", "reason" => reason).increment(1);
        if let Err(e) = self.raw.transfer_leader(to) {
            self.refusal(e)?;
        }
        Ok(())
    }

    /// A read barrier unanswered for this long lost its request or its leader: the caller
    /// hears so (and may retry) instead of waiting forever.
    fn expire_reads(&mut self) {
        let expired = self.waiters.expire_reads(self.ticks, self.config.read_barrier_ticks);
        let e = Err(self.not_leader());
        self.answer_all(expired, &e);
    }

    /// Answers every waiting request with `e`.
    fn fail_all(&mut self, e: &RequestError) {
        let ids = self.waiters.drain_all();
        self.answer_all(ids, &Err(e.clone()));
    }
}
