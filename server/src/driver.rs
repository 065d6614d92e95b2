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

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::RwLock;
use raftwal_consensus::{
    ConfChange, EntryKind, Error as RaftError, LogIndex, Membership, Message, MessageBody, NodeId,
    RawNode, Ready, Role, Status,
};
use raftwal_transport::{SendError, Transport};
use raftwal_wal::{Entry as WalEntry, Wal};
use tokio::sync::{oneshot, watch};

use crate::envelope::{self, Addresses, ProducerSeq};
use crate::state::{Applied, LogState};
use crate::store::{self, WalStore};

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
    /// Stop the driver.
    Shutdown,
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
    /// The producer sequence is older than its latest; its offsets are forgotten.
    #[error("producer sequence {sequence} is older than the latest applied one")]
    StaleSequence { sequence: u64 },
    /// The request cannot be done.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The node is stopping or failed.
    #[error("node stopped: {0}")]
    Stopped(String),
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
    /// Set with a message when the driver stopped on an error.
    pub failure: RwLock<Option<String>>,
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
}

impl DriverHandle {
    /// Submits an event without waiting; a full queue is overload.
    pub fn submit(&self, event: Event) -> Result<(), DriverError> {
        self.tx.try_send(event).map_err(|e| match e {
            TrySendError::Full(_) => DriverError::Overloaded("the node's event queue is full"),
            TrySendError::Disconnected(_) => DriverError::Stopped("the driver has stopped".into()),
        })
    }
}

/// Where an index-valued outcome goes.
type IndexReply = oneshot::Sender<Result<LogIndex, DriverError>>;

struct Waiter {
    term: raftwal_consensus::Term,
    reply: oneshot::Sender<Result<AppendOk, DriverError>>,
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
    pub rx: Receiver<Event>,
    pub tick: Duration,
    pub data_dir: PathBuf,
    /// (log start index, membership there) and each later applied membership.
    pub memberships: Vec<(LogIndex, Membership)>,
    pub runtime: tokio::runtime::Handle,
}

/// Creates the event channel.
pub fn channel(capacity: usize) -> (DriverHandle, Receiver<Event>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    (DriverHandle { tx }, rx)
}

struct Driver {
    raw: RawNode<WalStore>,
    shared: Arc<Shared>,
    transport: Transport,
    waiters: HashMap<LogIndex, Waiter>,
    conf_waiters: HashMap<LogIndex, ConfWaiter>,
    trim_waiters: HashMap<LogIndex, ConfWaiter>,
    /// A conf change waiting for its addresses entry to apply first: (address index, change).
    queued_conf: Option<(LogIndex, ConfChange, IndexReply)>,
    data_dir: PathBuf,
    memberships: Vec<(LogIndex, Membership)>,
    role: Role,
    leader: Option<NodeId>,
}

/// Events taken per loop iteration before the Readies are drained.
const EVENTS_PER_ROUND_MAX: usize = 4096;

/// Runs the driver until shutdown or a fatal error (a WAL failure, a consensus error that means
/// the node's own state is broken). Returns the error, if any.
pub fn run(parts: DriverParts) -> (Result<(), String>, Transport) {
    let DriverParts { raw, shared, transport, rx, tick, data_dir, memberships, runtime } = parts;
    let _guard = runtime.enter();
    let mut d = Driver {
        raw,
        shared,
        transport,
        waiters: HashMap::new(),
        conf_waiters: HashMap::new(),
        trim_waiters: HashMap::new(),
        queued_conf: None,
        data_dir,
        memberships,
        role: Role::Follower,
        leader: None,
    };
    let result = d.run_loop(&rx, tick);
    if let Err(e) = &result {
        tracing::error!(error = %e, "the node's driver stopped");
        *d.shared.failure.write() = Some(e.clone());
    }
    d.fail_all(&DriverError::Stopped(
        result.as_ref().err().cloned().unwrap_or_else(|| "shutdown".into()),
    ));
    // The transport goes back to the caller, which closes it from async context.
    (result, d.transport)
}

impl Driver {
    fn run_loop(&mut self, rx: &Receiver<Event>, tick: Duration) -> Result<(), String> {
        let mut next_tick = Instant::now() + tick;
        self.drain_readies()?;
        self.publish_status();
        loop {
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick().map_err(|e| format!("tick: {e}"))?;
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
                                Ok(event) => {
                                    if !self.handle(event)? {
                                        return Ok(());
                                    }
                                }
                                Err(_) => break,
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
                self.conf_change(change, addresses, reply)
            }
            Event::Transfer { to, reply } => {
                let r = self.raw.transfer_leader(to).map_err(|e| self.map_err(e));
                let _ = reply.send(r);
            }
            Event::Trim { before, reply } => self.trim(before, reply),
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
        if let Some(p) = producer
            && let Some((first, last)) = self.shared.state.read().producer_offsets(p)
        {
            let _ = reply.send(Ok(AppendOk { first, last, duplicate: true }));
            return Ok(());
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
                let term = self.raw.term();
                // An older waiter at this index belongs to an entry this leader's log replaced.
                if let Some(old) = self.waiters.insert(*range.start(), Waiter { term, reply }) {
                    let _ = old.reply.send(Err(DriverError::Lost));
                }
            }
            Err(RaftError::Store(e)) => return Err(format!("log store: {e}")),
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
        Ok(())
    }

    fn conf_change(
        &mut self,
        change: ConfChange,
        addresses: Option<Addresses>,
        reply: oneshot::Sender<Result<LogIndex, DriverError>>,
    ) {
        if self.role != Role::Leader {
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
            return;
        }
        if self.queued_conf.is_some() {
            let _ =
                reply.send(Err(DriverError::Overloaded("another membership change is pending")));
            return;
        }
        match addresses {
            Some(a) => match self.raw.propose(vec![envelope::encode_address(&a)]) {
                Ok(range) => self.queued_conf = Some((*range.start(), change, reply)),
                Err(e) => {
                    let _ = reply.send(Err(self.map_err(e)));
                }
            },
            None => self.propose_conf(change, reply),
        }
    }

    fn propose_conf(
        &mut self,
        change: ConfChange,
        reply: oneshot::Sender<Result<LogIndex, DriverError>>,
    ) {
        match self.raw.propose_conf_change(&change) {
            Ok(index) => {
                let term = self.raw.term();
                self.conf_waiters.insert(index, ConfWaiter { term, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
    }

    fn trim(&mut self, before: LogIndex, reply: oneshot::Sender<Result<LogIndex, DriverError>>) {
        if self.role != Role::Leader {
            let _ = reply.send(Err(DriverError::NotLeader { leader: self.raw.leader() }));
            return;
        }
        let readable = *self.shared.readable.borrow();
        if before > readable.next() {
            let _ = reply.send(Err(DriverError::Invalid(format!(
                "cannot trim below {before}: only offsets up to {readable} are committed"
            ))));
            return;
        }
        match self.raw.propose(vec![envelope::encode_trim(before)]) {
            Ok(range) => {
                let term = self.raw.term();
                self.trim_waiters.insert(*range.start(), ConfWaiter { term, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(self.map_err(e)));
            }
        }
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
            // Whatever this node's old log said after the new start is gone with it.
            self.memberships = vec![(start.first_index.prev(), start.membership.clone())];
            self.raw.store_mut().set_start_membership(start.membership.clone());
            state.restart(start.first_index.prev());
            let readable = state.readable();
            drop(state);
            for (_, w) in self.waiters.drain() {
                let _ = w.reply.send(Err(DriverError::Lost));
            }
            self.shared.readable.send_replace(readable);
            tracing::info!(first = %start.first_index, "log restarted at the leader's log start");
        }
        if let Some(first) = rd.entries.first() {
            if first.index <= wal.last_index() {
                wal.truncate_suffix(first.index).map_err(|e| format!("wal truncate: {e}"))?;
            }
            let payloads: Vec<Vec<u8>> = rd.entries.iter().map(store::wal_payload).collect();
            let entries: Vec<WalEntry<'_>> = rd
                .entries
                .iter()
                .zip(&payloads)
                .map(|(e, p)| WalEntry { term: e.term, index: e.index, payload: p })
                .collect();
            wal.append(&entries).map_err(|e| format!("wal append: {e}"))?;
        }
        if let Some(hs) = rd.hard_state {
            wal.save_hard_state(hs).map_err(|e| format!("wal hard state: {e}"))?;
        }
        self.raw.advance(rd.number).map_err(|e| format!("advance: {e}"))?;
        self.send_all(rd.persisted_messages);
        if !rd.committed_entries.is_empty() {
            let shared = self.shared.clone();
            let mut state = shared.state.write();
            for e in &rd.committed_entries {
                if let Some(w) = self.waiters.remove(&e.index) {
                    if w.term != e.term {
                        let _ = w.reply.send(Err(DriverError::Lost));
                    } else {
                        self.waiters.insert(e.index, w);
                    }
                }
                if let Some(w) = self.conf_waiters.remove(&e.index) {
                    let _ = w.reply.send(if w.term == e.term {
                        Ok(e.index)
                    } else {
                        Err(DriverError::Lost)
                    });
                }
                if let Some((at, _, _)) = &self.queued_conf
                    && *at == e.index
                {
                    let (_, change, reply) = self.queued_conf.take().expect("checked");
                    if e.kind == EntryKind::Normal {
                        drop(state);
                        self.propose_conf(change, reply);
                        state = shared.state.write();
                    } else {
                        let _ = reply.send(Err(DriverError::Lost));
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
            let applied = self.shared.state.read().applied();
            self.apply_membership(applied, m);
        }
        // Published last, so that whoever wakes on it also sees the membership it implies.
        if !rd.committed_entries.is_empty() {
            let readable = self.shared.state.read().readable();
            self.shared.readable.send_replace(readable);
        }
        Ok(())
    }

    fn settle(
        &mut self,
        applied: Applied,
        state: &mut LogState,
        wal: &Arc<Wal>,
    ) -> Result<(), String> {
        match applied {
            Applied::Nothing => {}
            Applied::Batch { first, last } => {
                if let Some(w) = self.waiters.remove(&first) {
                    let _ = w.reply.send(Ok(AppendOk { first, last, duplicate: false }));
                }
            }
            Applied::Duplicate { first, original } => {
                if let Some(w) = self.waiters.remove(&first) {
                    let r = match original {
                        Some((first, last)) => Ok(AppendOk { first, last, duplicate: true }),
                        None => Err(DriverError::StaleSequence { sequence: 0 }),
                    };
                    let _ = w.reply.send(r);
                }
            }
            Applied::Broken { first } => {
                if let Some(w) = self.waiters.remove(&first) {
                    let _ = w.reply.send(Err(DriverError::Lost));
                }
            }
            Applied::Address(a) => {
                self.shared.api_addrs.write().insert(a.id, a.api.clone());
                if a.id != self.shared.id {
                    self.transport.add_peer(a.id, a.peer);
                }
            }
            Applied::Trim { before } => {
                // Never past what is settled: a reader must not lose entries it may still read.
                let before = before.min(state.readable().next()).min(wal.last_index().next());
                if before > wal.first_index() {
                    let membership = self.membership_at(before.prev());
                    let new = self.start_record(before, membership.clone(), state);
                    self.change_start(new, |wal| wal.compact_prefix(before))?;
                    self.raw.store_mut().set_start_membership(membership);
                    state.trimmed(before);
                    tracing::info!(%before, "log trimmed");
                }
            }
        }
        Ok(())
    }

    fn start_record(
        &self,
        first_index: LogIndex,
        membership: Membership,
        state: &LogState,
    ) -> store::StartRecord {
        store::StartRecord {
            first_index,
            membership,
            addresses: state.addresses().values().cloned().collect(),
        }
    }

    /// Moves the log start durably: the log-start file first names both starts, then the WAL
    /// changes, then the file names only the new one (a crash anywhere leaves a record that
    /// matches the WAL's first index). Keeps the membership history from the new start on.
    fn change_start(
        &mut self,
        new: store::StartRecord,
        change: impl FnOnce(&Wal) -> raftwal_wal::Result<()>,
    ) -> Result<(), String> {
        let wal = self.raw.store().wal().clone();
        let old_first = wal.first_index();
        let old = store::StartRecord {
            first_index: old_first,
            membership: self.membership_at(old_first.prev()),
            addresses: new.addresses.clone(),
        };
        if old.first_index != new.first_index {
            store::write_log_start(&self.data_dir, &[old, new.clone()])
                .map_err(|e| format!("write log start: {e}"))?;
        }
        change(&wal).map_err(|e| format!("wal: {e}"))?;
        store::write_log_start(&self.data_dir, std::slice::from_ref(&new))
            .map_err(|e| format!("write log start: {e}"))?;
        let at = new.first_index.prev();
        self.memberships.retain(|(i, _)| *i > at);
        self.memberships.insert(0, (at, new.membership));
        Ok(())
    }

    fn membership_at(&self, index: LogIndex) -> Membership {
        self.memberships
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| self.memberships.first().map(|(_, m)| m.clone()).unwrap_or_default())
    }

    fn apply_membership(&mut self, applied: LogIndex, m: Membership) {
        let members = m.members();
        self.memberships.push((applied, m));
        // Keep the history bounded: only entries at or after the log start matter.
        let first = self.raw.store().wal().first_index().prev();
        if self.memberships.len() > 64 {
            let keep_from = self.memberships.iter().rposition(|(i, _)| *i <= first).unwrap_or(0);
            self.memberships.drain(..keep_from);
        }
        let addrs = self.shared.state.read().addresses().clone();
        for id in members {
            if id != self.shared.id
                && let Some(a) = addrs.get(&id)
            {
                self.transport.add_peer(id, a.peer);
            }
        }
        self.publish_status();
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
        for (_, w) in self.waiters.drain() {
            let _ = w.reply.send(Err(e.clone()));
        }
        for (_, w) in self.conf_waiters.drain().chain(self.trim_waiters.drain()) {
            let _ = w.reply.send(Err(e.clone()));
        }
        if let Some((_, _, reply)) = self.queued_conf.take() {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

/// Counts an append in flight for as long as it lives.
#[derive(Debug)]
pub struct InflightGuard(pub Arc<Shared>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.appends_inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
