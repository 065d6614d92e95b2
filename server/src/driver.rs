//! The driver: one thread that owns the RawNode and turns its Readies into IO, exactly in the
//! order the Ready contract gives (ARCHITECTURE.md, "The ordering contract of a Ready").
//!
//! Loop: wait for an event or the next tick; take every queued event (so the proposals of many
//! clients go into one Ready, one WAL write and one fsync); then drain the Readies:
//! 1. the leader's messages go out at once (it sends new entries while it writes them);
//! 2. entries are written to the WAL (replacing a conflicting suffix), then the hard state;
//!    both are durable when the WAL call returns;
//! 3. `advance`, then the messages that promise durable state (votes, acknowledgements);
//! 4. committed entries are applied in order to the log state, completing appends and waking
//!    readers.
//!
//! The WAL calls block this thread; that is the group commit: while one fsync runs, proposals
//! queue up and all go into the next write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::RwLock;
use raftwal_consensus::{
    ConfChange, EntryKind, Error as RaftError, LogIndex, Membership, Message, MessageBody, NodeId,
    RawNode, Ready, Role, Status,
};
use raftwal_transport::{SendError, Transport};
use raftwal_wal::{Entry as WalEntry, Ticket, Wal};
use tokio::sync::{oneshot, watch};

use crate::envelope::{self, Addresses, ProducerSeq};
use crate::state::{Applied, LogState};
use crate::store::{self, WalStore};

mod apply;
mod persist;

use persist::run_syncer;

/// Events the driver handles, in arrival order.
#[derive(Debug)]
pub enum Event {
    /// A message from a peer.
    Peer(Message),
    /// A client append.
    Append(AppendReq),
    /// A membership change, with the new node's addresses to replicate first.
    ConfChange {
        change: ConfChange,
        addresses: Option<Addresses>,
        reply: oneshot::Sender<Result<LogIndex, DriverError>>,
    },
    /// Hand leadership to a voter.
    Transfer { to: NodeId, reply: oneshot::Sender<Result<(), DriverError>> },
    /// Discard the log below an index on every node.
    Trim { before: LogIndex, reply: oneshot::Sender<Result<LogIndex, DriverError>> },
    /// A read barrier: answered with the commit index a quorum confirmed.
    ReadIndex { reply: oneshot::Sender<Result<LogIndex, DriverError>> },
    /// Stop the driver.
    Shutdown,
    /// The syncer made Ready `number` (and every earlier one) durable, or failed.
    Persisted { number: u64, result: Result<(), String> },
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
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<AppendOk, DriverError>>,
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

/// Why the driver could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
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

/// What the driver publishes for the API, readers and the HTTP port.
#[derive(Debug)]
pub struct Shared {
    /// This node.
    pub id: NodeId,
    /// The WAL, for reads.
    pub wal: Arc<Wal>,
    /// The replicated log state: which entries are records.
    pub state: RwLock<LogState>,
    /// Every entry up to this index is settled and may be read.
    pub readable: watch::Sender<LogIndex>,
    /// The last status snapshot (refreshed every tick and on role changes).
    pub status: RwLock<Status>,
    /// Known client API addresses by node id.
    pub api_addrs: RwLock<BTreeMap<NodeId, String>>,
    /// Appends submitted and not yet answered.
    pub appends_inflight: AtomicU64,
    /// Their record bytes.
    pub appends_inflight_bytes: AtomicU64,
    /// Set with a message when the driver stopped on an error.
    pub failure: watch::Sender<Option<String>>,
}

impl Shared {
    /// The leader's client address, if known.
    pub fn leader_addr(&self, leader: Option<NodeId>) -> Option<String> {
        self.api_addrs.read().get(&leader?).cloned()
    }
}

/// A handle to submit events.
#[derive(Debug, Clone)]
pub struct DriverHandle {
    tx: SyncSender<Event>,
    /// Client events queued and not yet taken: at most half the queue, so that client load can
    /// never leave peer messages (votes, heartbeat answers) without room.
    client_queued: Arc<AtomicUsize>,
    client_queued_max: usize,
}

impl DriverHandle {
    /// Submits a client's event without waiting; a full queue is overload.
    pub fn submit(&self, event: Event) -> Result<(), DriverError> {
        if self.client_queued.fetch_add(1, Ordering::AcqRel) >= self.client_queued_max {
            self.client_queued.fetch_sub(1, Ordering::AcqRel);
            return Err(DriverError::Overloaded("the node's event queue is full"));
        }
        self.tx.try_send(event).map_err(|e| {
            self.client_queued.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => DriverError::Overloaded("the node's event queue is full"),
                TrySendError::Disconnected(_) => {
                    DriverError::Stopped("the driver has stopped".into())
                }
            }
        })
    }

    /// Submits a peer message; dropped when the queue is full (Raft resends what matters).
    pub fn submit_peer(&self, msg: Message) {
        let _ = self.tx.try_send(Event::Peer(msg));
    }

    /// Asks the driver to stop (never refused for a full queue: it waits for room).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
}

/// Where an index-valued outcome goes.
type IndexReply = oneshot::Sender<Result<LogIndex, DriverError>>;

/// A membership change proposed once the new node's addresses (at `index`, `term`) apply.
struct QueuedConf {
    index: LogIndex,
    term: raftwal_consensus::Term,
    change: ConfChange,
    reply: IndexReply,
}

/// An append waiting for its batch to apply; retries of the same producer sequence that
/// arrive meanwhile wait on it too.
struct Waiter {
    term: raftwal_consensus::Term,
    producer: Option<ProducerSeq>,
    replies: Vec<oneshot::Sender<Result<AppendOk, DriverError>>>,
}

struct ConfWaiter {
    term: raftwal_consensus::Term,
    reply: oneshot::Sender<Result<LogIndex, DriverError>>,
}

/// What the driver needs to run.
#[allow(missing_debug_implementations)]
pub struct DriverParts {
    pub raw: RawNode<WalStore>,
    pub shared: Arc<Shared>,
    pub transport: Transport,
    pub rx: EventQueue,
    /// The sending side, for the syncer thread's reports.
    pub handle: DriverHandle,
    pub tick: Duration,
    /// The election timeout in ticks (read barriers expire after two).
    pub election_ticks: u32,
    pub data_dir: PathBuf,
    /// (log start index, membership there) and each later applied membership.
    pub memberships: Vec<(LogIndex, Membership)>,
    pub runtime: tokio::runtime::Handle,
}

/// Creates the event channel: `capacity` events, at most half of them from clients.
pub fn channel(capacity: usize) -> (DriverHandle, EventQueue) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    let client_queued = Arc::new(AtomicUsize::new(0));
    let handle =
        DriverHandle { tx, client_queued: client_queued.clone(), client_queued_max: capacity / 2 };
    (handle, EventQueue { rx, client_queued })
}

/// The driver's end of the event channel.
#[derive(Debug)]
pub struct EventQueue {
    rx: Receiver<Event>,
    client_queued: Arc<AtomicUsize>,
}

impl EventQueue {
    fn taken(&self, event: &Event) {
        if !matches!(event, Event::Peer(_) | Event::Shutdown | Event::Persisted { .. }) {
            self.client_queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        let event = self.rx.recv_timeout(timeout)?;
        self.taken(&event);
        Ok(event)
    }

    fn try_recv(&self) -> Option<Event> {
        let event = self.rx.try_recv().ok()?;
        self.taken(&event);
        Some(event)
    }
}

struct Driver {
    raw: RawNode<WalStore>,
    shared: Arc<Shared>,
    transport: Transport,
    waiters: HashMap<LogIndex, Waiter>,
    /// Producer sequences proposed in this term and not yet applied, by their first index.
    pending_producers: HashMap<ProducerSeq, LogIndex>,
    /// The leader's first entry of its term: until it is applied, the producer table may miss
    /// sequences an earlier leader committed, so producer appends wait.
    term_start: LogIndex,
    conf_waiters: HashMap<LogIndex, ConfWaiter>,
    trim_waiters: HashMap<LogIndex, ConfWaiter>,
    /// A conf change waiting for its addresses entry to apply first.
    queued_conf: Option<QueuedConf>,
    data_dir: PathBuf,
    memberships: Vec<(LogIndex, Membership)>,
    role: Role,
    leader: Option<NodeId>,
    election_ticks: u32,
    /// Read barriers waiting for a quorum, by context, with the tick they were asked at.
    read_waiters: BTreeMap<u64, (u64, IndexReply)>,
    next_read_context: u64,
    ticks: u64,
    /// Readies whose writes are queued, in order, with the messages that wait for them; at
    /// most [`PENDING_WRITES_MAX`] (beyond, the driver waits for the WAL itself).
    pending: VecDeque<PendingWrite>,
    /// Hands (Ready number, last WAL ticket) to the syncer thread.
    syncer: std::sync::mpsc::Sender<(u64, Ticket)>,
    /// The last index handed to the WAL (durable or still queued).
    submitted_last: LogIndex,
    /// The last hard state a Ready reported, and whether its commit index is not saved yet.
    latest_hard_state: raftwal_consensus::HardState,
    commit_unsaved: bool,
}

/// Readies with writes the driver lets the syncer wait for at once.
const PENDING_WRITES_MAX: usize = 4096;

/// A Ready whose writes the syncer reports durable as `synced`; Readies without writes that
/// came after it ride along (`advance_to`, their messages appended).
#[derive(Debug)]
struct PendingWrite {
    synced: u64,
    advance_to: u64,
    messages: Vec<Message>,
}

/// Read barriers that may wait for a quorum at once; beyond, RESOURCE_EXHAUSTED.
const READ_WAITERS_MAX: usize = 16_384;

/// Events taken per loop iteration before the Readies are drained.
const EVENTS_PER_ROUND_MAX: usize = 4096;

/// Runs the driver until shutdown or a fatal error (a WAL failure, a consensus error that means
/// the node's own state is broken). Returns the error, if any.
pub fn run(parts: DriverParts) -> (Result<(), String>, Transport) {
    let DriverParts {
        raw,
        shared,
        transport,
        rx,
        handle,
        tick,
        election_ticks,
        data_dir,
        memberships,
        runtime,
    } = parts;
    let _guard = runtime.enter();
    let wal = raw.store().wal().clone();
    let submitted_last = wal.last_index();
    let (syncer, syncer_rx) = std::sync::mpsc::channel();
    let syncer_thread = std::thread::Builder::new()
        .name(format!("raftwal-syncer-{}", shared.id.0))
        .spawn(move || run_syncer(wal, syncer_rx, handle.tx))
        .expect("spawn the syncer thread");
    let mut d = Driver {
        raw,
        shared,
        transport,
        waiters: HashMap::new(),
        pending_producers: HashMap::new(),
        term_start: LogIndex(0),
        conf_waiters: HashMap::new(),
        trim_waiters: HashMap::new(),
        queued_conf: None,
        data_dir,
        memberships,
        role: Role::Follower,
        leader: None,
        read_waiters: BTreeMap::new(),
        election_ticks,
        next_read_context: 1,
        ticks: 0,
        pending: VecDeque::new(),
        syncer,
        submitted_last,
        latest_hard_state: raftwal_consensus::HardState::default(),
        commit_unsaved: false,
    };
    let mut result = d.run_loop(&rx, tick);
    if result.is_ok() {
        // Whatever is queued becomes durable before the node stops.
        result = d.raw.store().wal().flush().map_err(|e| format!("wal flush: {e}"));
    }
    if result.is_ok() {
        result = d.save_commit();
    }
    drop(rx);
    let (closed, _) = std::sync::mpsc::channel();
    d.syncer = closed;
    let _ = syncer_thread.join();
    if let Err(e) = &result {
        tracing::error!(error = %e, "the node's driver stopped");
        d.shared.failure.send_replace(Some(e.clone()));
    }
    let why = result.as_ref().err().cloned().unwrap_or_else(|| "shutdown".into());
    d.fail_all(&DriverError::Unknown(format!(
        "the node stopped ({why}) before the outcome was known"
    )));
    // The transport goes back to the caller, which closes it from async context.
    (result, d.transport)
}

impl Driver {
    fn run_loop(&mut self, rx: &EventQueue, tick: Duration) -> Result<(), String> {
        let mut next_tick = Instant::now() + tick;
        self.drain_readies()?;
        self.publish_status();
        loop {
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick().map_err(|e| format!("tick: {e}"))?;
                self.ticks += 1;
                self.expire_reads();
                self.save_commit()?;
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.publish_status();
            } else {
                match rx.recv_timeout(next_tick - now) {
                    Ok(event) => {
                        if !self.handle(event)? {
                            return Ok(());
                        }
                        for _ in 0..EVENTS_PER_ROUND_MAX {
                            match rx.try_recv() {
                                Some(event) => {
                                    if !self.handle(event)? {
                                        return Ok(());
                                    }
                                }
                                None => break,
                            }
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            self.drain_readies()?;
        }
    }

    /// Handles one event; false on shutdown.
    fn handle(&mut self, event: Event) -> Result<bool, String> {
        match event {
            Event::Peer(msg) => {
                if let Err(e) = self.raw.step(msg) {
                    match e {
                        RaftError::Store(_) => return Err(format!("log store: {e}")),
                        _ => tracing::debug!(error = %e, "peer message refused"),
                    }
                }
            }
            Event::Append(req) => self.append(req)?,
            Event::ConfChange { change, addresses, reply } => {
                self.conf_change(change, addresses, reply)?
            }
            Event::Transfer { to, reply } => {
                let r = match self.raw.transfer_leader(to) {
                    Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
                    r => r.map_err(|e| self.map_err(e)),
                };
                let _ = reply.send(r);
            }
            Event::Trim { before, reply } => self.trim(before, reply)?,
            Event::ReadIndex { reply } => self.read_index(reply),
            Event::Persisted { number, result } => self.persisted(number, result)?,
            Event::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn map_err(&self, e: RaftError) -> DriverError {
        match e {
            RaftError::NotLeader { .. } => DriverError::NotLeader { leader: self.raw.leader() },
            RaftError::TransferInProgress { .. } => {
                DriverError::Overloaded("leadership transfer in progress")
            }
            RaftError::UncommittedBytesExceeded { .. } => {
                DriverError::Overloaded("too many uncommitted bytes at the leader")
            }
            RaftError::ConfChangePending { .. } => {
                DriverError::Overloaded("another membership change is pending")
            }
            e => DriverError::Invalid(e.to_string()),
        }
    }

    fn append(&mut self, req: AppendReq) -> Result<(), String> {
        let AppendReq { records, expected_next, producer, reply } = req;
        if self.role != Role::Leader {
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
            return Ok(());
        }
        if let Some(p) = producer {
            // Deduplication happens here, before anything is proposed, so a repeat never
            // reaches the log (the log, not this table, decides what readers see).
            let state = self.shared.state.read();
            if state.applied() < self.term_start {
                let _ = reply.send(Err(DriverError::Overloaded(
                    "a new leader is applying its log; retry shortly",
                )));
                return Ok(());
            }
            if let Some((first, last)) = state.producer_offsets(p) {
                let _ = reply.send(Ok(AppendOk { first, last, duplicate: true }));
                return Ok(());
            }
            if state.producer_is_stale(p) {
                let _ = reply.send(Err(DriverError::StaleSequence { sequence: p.sequence }));
                return Ok(());
            }
            drop(state);
            if let Some(first) = self.pending_producers.get(&p)
                && let Some(w) = self.waiters.get_mut(first)
            {
                // A retry while the original is in flight: one proposal, both answered.
                w.replies.push(reply);
                return Ok(());
            }
        }
        let next = self.raw.last_index().next();
        if let Some(expected) = expected_next
            && expected != next
        {
            let _ = reply.send(Err(DriverError::OffsetMismatch { next }));
            return Ok(());
        }
        match self.raw.propose(envelope::encode_batch(&records, producer)) {
            Ok(range) => {
                let first = *range.start();
                // An older waiter at this index belongs to an entry this leader's log replaced.
                self.finish(first, &Err(DriverError::Lost));
                let term = self.raw.term();
                self.waiters.insert(first, Waiter { term, producer, replies: vec![reply] });
                if let Some(p) = producer {
                    self.pending_producers.insert(p, first);
                }
            }
            Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
        Ok(())
    }

    fn read_index(&mut self, reply: IndexReply) {
        if self.read_waiters.len() >= READ_WAITERS_MAX {
            let _ = reply.send(Err(DriverError::Overloaded("too many read barriers waiting")));
            return;
        }
        let context = self.next_read_context;
        self.next_read_context += 1;
        match self.raw.read_index(context) {
            Ok(()) => {
                self.read_waiters.insert(context, (self.ticks, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
    }

    /// A read barrier unanswered for this long lost its request or its leader: the caller
    /// hears so (and may retry) instead of waiting forever.
    fn expire_reads(&mut self) {
        let ttl = u64::from(self.election_ticks) * 2;
        while let Some((&context, (asked, _))) = self.read_waiters.first_key_value() {
            if self.ticks < asked + ttl {
                break;
            }
            let (_, reply) = self.read_waiters.remove(&context).expect("present");
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
        }
    }

    /// Answers every caller waiting on the batch at `first`.
    fn finish(&mut self, first: LogIndex, result: &Result<AppendOk, DriverError>) {
        if let Some(w) = self.waiters.remove(&first) {
            if let Some(p) = w.producer
                && self.pending_producers.get(&p) == Some(&first)
            {
                self.pending_producers.remove(&p);
            }
            for reply in w.replies {
                let _ = reply.send(result.clone());
            }
        }
    }

    fn conf_change(
        &mut self,
        change: ConfChange,
        addresses: Option<Addresses>,
        reply: IndexReply,
    ) -> Result<(), String> {
        if self.role != Role::Leader {
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
            return Ok(());
        }
        if self.queued_conf.is_some() {
            let _ =
                reply.send(Err(DriverError::Overloaded("another membership change is pending")));
            return Ok(());
        }
        let current = self.memberships.last().map(|(_, m)| m.clone()).unwrap_or_default();
        if let Err(why) = current.apply(&change) {
            let _ =
                reply.send(Err(DriverError::Invalid(format!("membership change refused: {why}"))));
            return Ok(());
        }
        match addresses {
            Some(a) => match self.raw.propose(vec![envelope::encode_address(&a)]) {
                Ok(range) => {
                    let term = self.raw.term();
                    self.queued_conf =
                        Some(QueuedConf { index: *range.start(), term, change, reply });
                }
                Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
                Err(e) => {
                    let _ = reply.send(Err(self.map_err(e)));
                }
            },
            None => self.propose_conf(change, reply)?,
        }
        Ok(())
    }

    fn propose_conf(&mut self, change: ConfChange, reply: IndexReply) -> Result<(), String> {
        match self.raw.propose_conf_change(&change) {
            Ok(index) => {
                let term = self.raw.term();
                self.conf_waiters.insert(index, ConfWaiter { term, reply });
            }
            Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
        Ok(())
    }

    fn trim(&mut self, before: LogIndex, reply: IndexReply) -> Result<(), String> {
        if self.role != Role::Leader {
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
            return Ok(());
        }
        let readable = *self.shared.readable.borrow();
        if before > readable.next() {
            let _ = reply.send(Err(DriverError::Invalid(format!(
                "cannot trim below {before}: only offsets up to {readable} are committed"
            ))));
            return Ok(());
        }
        match self.raw.propose(vec![envelope::encode_trim(before)]) {
            Ok(range) => {
                let term = self.raw.term();
                self.trim_waiters.insert(*range.start(), ConfWaiter { term, reply });
            }
            Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
        Ok(())
    }

    fn drain_readies(&mut self) -> Result<(), String> {
        while self.raw.has_ready() {
            let rd = self.raw.ready().map_err(|e| format!("ready: {e}"))?;
            self.handle_ready(rd)?;
        }
        Ok(())
    }

    fn handle_ready(&mut self, rd: Ready) -> Result<(), String> {
        if let Some(soft) = rd.soft_state {
            if soft.role != self.role || soft.leader != self.leader {
                tracing::info!(role = ?soft.role, leader = ?soft.leader, "role changed");
                if soft.leader != self.leader {
                    metrics::counter!("raftwal_server_leader_changes_seen_total").increment(1);
                }
                metrics::gauge!("raftwal_server_has_leader").set(if soft.leader.is_some() {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!("raftwal_server_is_leader").set(if soft.role == Role::Leader {
                    1.0
                } else {
                    0.0
                });
            }
            if soft.role == Role::Leader && self.role != Role::Leader {
                // Its empty entry of the new term is the last one in the log now.
                self.term_start = self.raw.last_index();
            }
            self.role = soft.role;
            self.leader = soft.leader;
            self.publish_status();
        }
        self.send_all(rd.messages);
        let wal = self.raw.store().wal().clone();
        if let Some(start) = &rd.log_start {
            // This node is behind the leader's trimmed log start: its whole log restarts there.
            let shared = self.shared.clone();
            let mut state = shared.state.write();
            let record = self.start_record(start.first_index, start.membership.clone(), &state);
            self.change_start(record, |wal| wal.restart_at(start.first_index, start.prev_term))?;
            self.submitted_last = start.first_index.prev();
            // Whatever this node's old log said after the new start is gone with it.
            self.memberships = vec![(start.first_index.prev(), start.membership.clone())];
            self.raw.store_mut().set_start_membership(start.membership.clone());
            state.restart(start.first_index.prev());
            let readable = state.readable();
            drop(state);
            // Entries below the new start committed on the leader; any of them may be ours.
            self.fail_all(&DriverError::Unknown(
                "this node's log restarted at the leader's start; the request may have committed"
                    .into(),
            ));
            self.shared.readable.send_replace(readable);
            tracing::info!(first = %start.first_index, "log restarted at the leader's log start");
        }
        let mut ticket = None;
        if let Some(first) = rd.entries.first() {
            if first.index <= self.submitted_last {
                // A conflicting suffix (written or still queued) is replaced.
                wal.truncate_suffix(first.index).map_err(|e| format!("wal truncate: {e}"))?;
            }
            ticket = Some(self.submit_entries(&wal, &rd.entries)?);
            self.submitted_last = rd.entries.last().expect("not empty").index;
        }
        if let Some(hs) = rd.hard_state {
            let saved = wal.hard_state();
            if hs.term != saved.term || hs.vote != saved.vote {
                // Term and vote must be durable before anything that depends on them is sent;
                // the commit index saved with them never runs ahead of the durable log.
                let commit = hs.commit.min(wal.last_index()).max(saved.commit);
                let save = raftwal_consensus::HardState { commit, ..hs };
                wal.save_hard_state(save).map_err(|e| format!("wal hard state: {e}"))?;
            }
            // Raft needs no durable commit index (a restarted node learns it again from the
            // leader): a commit-only change is saved on the next tick, not with a second
            // fsync per append on every node.
            self.commit_unsaved = true;
            self.latest_hard_state = hs;
        }
        // The entries become durable on the syncer thread (the WAL's group commit), while this
        // thread goes on stepping messages and proposing (thesis 10.2.1). `advance` and the
        // messages that promise durable state wait for it, in Ready order.
        match (ticket, self.pending.back_mut()) {
            (None, None) => {
                self.raw.advance(rd.number).map_err(|e| format!("advance: {e}"))?;
                self.send_all(rd.persisted_messages);
            }
            (None, Some(last)) => {
                // Nothing to write: durable as soon as the writes before it are.
                last.advance_to = rd.number;
                last.messages.extend(rd.persisted_messages);
            }
            (Some(ticket), _) => {
                if self.pending.len() >= PENDING_WRITES_MAX {
                    // The syncer is far behind: wait here until everything queued is durable.
                    wal.flush().map_err(|e| format!("wal flush: {e}"))?;
                    self.persisted(u64::MAX, Ok(()))?;
                }
                self.pending.push_back(PendingWrite {
                    synced: rd.number,
                    advance_to: rd.number,
                    messages: rd.persisted_messages,
                });
                self.syncer
                    .send((rd.number, ticket))
                    .map_err(|_| "the syncer thread stopped".to_string())?;
            }
        }
        if !rd.committed_entries.is_empty() {
            let shared = self.shared.clone();
            let mut state = shared.state.write();
            for e in &rd.committed_entries {
                if self.waiters.get(&e.index).is_some_and(|w| w.term != e.term) {
                    // Another term's entry took the index this append was proposed at.
                    self.finish(e.index, &Err(DriverError::Lost));
                }
                if let Some(w) = self.conf_waiters.remove(&e.index) {
                    let _ = w.reply.send(if w.term == e.term {
                        Ok(e.index)
                    } else {
                        Err(DriverError::Lost)
                    });
                }
                if self.queued_conf.as_ref().is_some_and(|q| q.index == e.index) {
                    let q = self.queued_conf.take().expect("checked");
                    if q.term == e.term {
                        drop(state);
                        self.propose_conf(q.change, q.reply)?;
                        state = shared.state.write();
                    } else {
                        let _ = q.reply.send(Err(DriverError::Lost));
                    }
                }
                if e.kind == EntryKind::ConfChange
                    && let Some(change) = ConfChange::decode(&e.data)
                {
                    // The same rule consensus applies: an invalid change is ignored by everyone.
                    let current =
                        self.memberships.last().map(|(_, m)| m.clone()).unwrap_or_default();
                    if let Ok(next) = current.apply(&change) {
                        self.memberships.push((e.index, next));
                    }
                }
                let applied = state.apply(e.index, e.kind, &e.data);
                self.settle(applied, &mut state, &wal)?;
                // A trim is answered once applied here, with the log's new first index.
                if let Some(w) = self.trim_waiters.remove(&e.index) {
                    let _ = w.reply.send(if w.term == e.term {
                        Ok(wal.first_index())
                    } else {
                        Err(DriverError::Lost)
                    });
                }
            }
            drop(state);
            metrics::counter!("raftwal_server_proposals_committed_total")
                .increment(rd.committed_entries.len() as u64);
        }
        if let Some(m) = rd.membership {
            self.apply_membership(m);
        }
        for rs in rd.read_states {
            if let Some((_, reply)) = self.read_waiters.remove(&rs.context) {
                let _ = reply.send(Ok(rs.index));
            }
        }
        // Published last, so that whoever wakes on it also sees the membership it implies.
        if !rd.committed_entries.is_empty() {
            let readable = self.shared.state.read().readable();
            self.shared.readable.send_replace(readable);
        }
        Ok(())
    }

    fn send_all(&mut self, messages: Vec<Message>) {
        for msg in messages {
            let to = msg.to;
            let install = matches!(msg.body, MessageBody::InstallLog { .. });
            match self.transport.send(&msg) {
                Ok(()) => {}
                Err(SendError::UnknownPeer(_))
                | Err(SendError::QueueFull { .. })
                | Err(SendError::Closed)
                | Err(_) => {
                    if install {
                        self.raw.report_log_start(to, false);
                    }
                    self.raw.report_unreachable(to);
                }
            }
        }
    }

    fn publish_status(&mut self) {
        *self.shared.status.write() = self.raw.status();
    }

    fn fail_all(&mut self, e: &DriverError) {
        let firsts: Vec<LogIndex> = self.waiters.keys().copied().collect();
        for first in firsts {
            self.finish(first, &Err(e.clone()));
        }
        for (_, w) in self.conf_waiters.drain().chain(self.trim_waiters.drain()) {
            let _ = w.reply.send(Err(e.clone()));
        }
        if let Some(q) = self.queued_conf.take() {
            let _ = q.reply.send(Err(e.clone()));
        }
        for (_, (_, reply)) in std::mem::take(&mut self.read_waiters) {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

/// Counts an append (and its bytes) in flight for as long as it lives.
#[derive(Debug)]
pub struct InflightGuard {
    shared: Arc<Shared>,
    bytes: u64,
}

impl InflightGuard {
    /// Counts one append of `bytes`; returns the counts before it (appends, bytes).
    pub fn new(shared: Arc<Shared>, bytes: u64) -> (InflightGuard, u64, u64) {
        let appends = shared.appends_inflight.fetch_add(1, Ordering::Relaxed);
        let before = shared.appends_inflight_bytes.fetch_add(bytes, Ordering::Relaxed);
        (InflightGuard { shared, bytes }, appends, before)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.shared.appends_inflight.fetch_sub(1, Ordering::Relaxed);
        self.shared.appends_inflight_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
