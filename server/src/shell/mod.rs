//! The shell around the node core: the driver thread that feeds the core its inputs (peer
//! messages, client requests, the syncer's completions, ticks from the clock) and carries out
//! its actions (the transport, the WAL, replies to callers, what readers and the HTTP port
//! see). It holds no state of the node's own beyond the callers waiting for replies.
//!
//! Threads and what crosses between them:
//! - the driver thread owns the core; it takes events from one bounded queue (peer messages and
//!   client requests, at most half of it clients) and completions from the syncer on a channel
//!   of their own, checked first on every round, so a durability report never waits behind
//!   client events;
//! - the syncer thread waits for queued WAL writes in order (the WAL's group commit) and reports
//!   each one durable; the driver meanwhile goes on stepping and proposing;
//! - async tasks (gRPC, HTTP, the transport) submit events and read what the driver publishes
//!   in [`Shared`] (the settled index, the readers' view, the status, addresses), never
//!   waiting on the driver.
//!
//! The driver carries out storage actions on its own thread, in order: a truncation, a hard
//! state save or a log-start move blocks it (and so holds back later actions, as the core
//! requires), but never an async task.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use raftwal_consensus::{LogIndex, Message, MessageBody, NodeId, Status};
use raftwal_transport::Transport;
use raftwal_wal::Wal;
use tokio::sync::{oneshot, watch};

use crate::core::{
    Action, Fatal, Input, NodeCore, Outcome, ReadView, Request, RequestError, RequestId,
};

mod syncer;

pub use syncer::{NodeStorage, StorageError};

/// Events the driver takes, in arrival order.
#[derive(Debug)]
pub enum Event {
    /// A message from a peer.
    Peer(Message),
    /// A client's or operator's request, and where its outcome goes.
    Request(Request, oneshot::Sender<Outcome>),
    /// Stop the driver.
    Shutdown,
    /// The syncer made write `number` (and every earlier one) durable, or failed.
    Persisted { number: u64, result: Result<(), String> },
    /// The syncer left a completion on the completions channel.
    Wake,
}

/// What the driver publishes for the API, readers and the HTTP port.
#[derive(Debug)]
pub struct Shared {
    /// This node.
    pub id: NodeId,
    /// The WAL, for reads.
    pub wal: Arc<Wal>,
    /// What readers need to serve records (the first readable index, hidden entries).
    pub view: RwLock<ReadView>,
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
    /// Free bytes on the data disk, as last measured (`u64::MAX` until then).
    pub disk_free_bytes: AtomicU64,
    /// The data disk is under `disk_free_min_bytes`: appends are refused here.
    pub disk_low: std::sync::atomic::AtomicBool,
    /// Every named stream as applied here (its settings, tail and index).
    pub streams: RwLock<HashMap<String, Arc<crate::core::streams::StreamView>>>,
    /// Bumped whenever a stream changes: live readers wake and look at theirs.
    pub streams_changed: watch::Sender<u64>,
    /// The stream state is missing (this node's log restarted at a leader's start) until a
    /// peer's, applied to at least this index, is installed.
    pub streams_missing: watch::Sender<Option<LogIndex>>,
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
    /// Submits a request without waiting; its outcome arrives on the receiver. A full queue is
    /// overload.
    pub fn request(&self, request: Request) -> Result<oneshot::Receiver<Outcome>, RequestError> {
        let (reply, rx) = oneshot::channel();
        let full = || RequestError::Overloaded("the node's event queue is full");
        if self.client_queued.fetch_add(1, Ordering::AcqRel) >= self.client_queued_max {
            self.client_queued.fetch_sub(1, Ordering::AcqRel);
            return Err(full());
        }
        self.tx.try_send(Event::Request(request, reply)).map_err(|e| {
            self.client_queued.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => full(),
                TrySendError::Disconnected(_) => {
                    RequestError::Stopped("the driver has stopped".into())
                }
            }
        })?;
        Ok(rx)
    }

    /// Submits a peer message; when the queue is full it is dropped (Raft resends what
    /// matters), counted and logged.
    pub fn submit_peer(&self, msg: Message) {
        if let Err(TrySendError::Full(Event::Peer(msg))) = self.tx.try_send(Event::Peer(msg)) {
            let dropped = metrics::counter!("raftwal_server_peer_messages_dropped_total");
            dropped.increment(1);
            tracing::warn!(from = %msg.from, "the node's event queue is full; a peer message was dropped");
        }
    }

    /// Asks the driver to stop (never refused for a full queue: it waits for room).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
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
        if matches!(event, Event::Request(..)) {
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

/// What the driver needs to run.
#[allow(missing_debug_implementations)]
pub struct DriverParts {
    pub core: NodeCore,
    pub storage: NodeStorage,
    /// The peers' data directories this node knows; a node that leaves is forgotten.
    pub book: Arc<crate::identity::KnownPeers>,
    pub shared: Arc<Shared>,
    pub transport: Transport,
    pub rx: EventQueue,
    /// The sending side, for the syncer's wake-ups.
    pub handle: DriverHandle,
    pub tick: Duration,
    pub runtime: tokio::runtime::Handle,
}

/// Readies with writes the core lets the syncer wait for at once.
pub const WRITES_IN_FLIGHT_MAX: usize = 4096;

/// Events taken per loop iteration before the core's actions are carried out.
const EVENTS_PER_ROUND_MAX: usize = 4096;

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverFailure {
    /// The core stopped on a broken invariant or a failed log read.
    #[error(transparent)]
    Core(#[from] Fatal),
    /// A storage action failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The syncer reported a failed write.
    #[error("wal write: {0}")]
    Write(String),
    /// The syncer thread is gone.
    #[error("the syncer thread stopped")]
    SyncerGone,
}

struct Driver {
    core: NodeCore,
    storage: NodeStorage,
    book: Arc<crate::identity::KnownPeers>,
    shared: Arc<Shared>,
    transport: Transport,
    /// Callers waiting for the outcome of their requests.
    callers: HashMap<RequestId, oneshot::Sender<Outcome>>,
    next_request: RequestId,
    /// Hands writes to wait for, and commit indexes to save, to the syncer thread.
    syncer: std::sync::mpsc::Sender<syncer::SyncJob>,
    completions: Receiver<Event>,
    /// The clock the core's ticks carry, from the driver's start.
    started: Instant,
    /// The disk state the core last heard of.
    disk_low: bool,
    /// The last time stamped into a stream command (ms since the epoch).
    stream_clock_ms: u64,
}

/// Runs the driver until shutdown or a fatal error (a WAL failure, a consensus error that means
/// the node's own state is broken). Returns the error, if any.
pub fn run(parts: DriverParts) -> (Result<(), DriverFailure>, Transport) {
    let DriverParts { core, storage, book, shared, transport, rx, handle, tick, runtime } = parts;
    let _guard = runtime.enter();
    let (syncer, syncer_rx) = std::sync::mpsc::channel();
    // Bounded by the writes in flight (one completion each) and a little more.
    let (completions_tx, completions) = std::sync::mpsc::sync_channel(WRITES_IN_FLIGHT_MAX + 16);
    let syncer_storage = storage.clone();
    let wake = handle.tx.clone();
    let syncer_thread = std::thread::Builder::new()
        .name(format!("raftwal-syncer-{}", shared.id.0))
        .spawn(move || syncer::run_syncer(syncer_storage, syncer_rx, completions_tx, wake))
        .expect("spawn the syncer thread");
    let mut d = Driver {
        core,
        storage,
        book,
        shared,
        transport,
        callers: HashMap::new(),
        next_request: 1,
        syncer,
        completions,
        started: Instant::now(),
        disk_low: false,
        stream_clock_ms: 0,
    };
    let mut result = d.run_loop(&rx, tick);
    if result.is_ok() {
        // Whatever is queued becomes durable before the node stops.
        result = d.storage.flush().map_err(DriverFailure::from);
    }
    let why = match &result {
        Ok(()) => "shutdown".to_string(),
        Err(e) => e.to_string(),
    };
    d.core.stop(&why);
    if result.is_ok() {
        result = d.carry_out();
    } else {
        // Only the replies go out: nothing more is written after a failure.
        d.reply_only();
    }
    drop(rx);
    let (closed, _) = std::sync::mpsc::channel();
    d.syncer = closed;
    let _ = syncer_thread.join();
    if let Err(e) = &result {
        tracing::error!(error = %e, "the node's driver stopped");
        d.shared.failure.send_replace(Some(e.to_string()));
    }
    // Whoever still waits hears the outcome is unknown (their senders drop here).
    d.callers.clear();
    // The transport goes back to the caller, which closes it from async context.
    (result, d.transport)
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn run_loop(&mut self, rx: &EventQueue, tick: Duration) -> Result<(), DriverFailure> {
        let mut next_tick = Instant::now() + tick;
        self.carry_out()?;
        loop {
            self.take_completions()?;
            let now = Instant::now();
            if now >= next_tick {
                let low = self.shared.disk_low.load(std::sync::atomic::Ordering::Relaxed);
                if low != self.disk_low {
                    self.disk_low = low;
                    self.core.handle(Input::DiskLow(low))?;
                }
                self.core.handle(Input::Tick { now_ms: self.now_ms() })?;
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            } else {
                match rx.recv_timeout(next_tick - now) {
                    Ok(event) => {
                        if !self.handle(event)? {
                            return Ok(());
                        }
                        for _ in 0..EVENTS_PER_ROUND_MAX {
                            let Some(event) = rx.try_recv() else { break };
                            if !self.handle(event)? {
                                return Ok(());
                            }
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            self.carry_out()?;
        }
    }

    /// Feeds the syncer's reports to the core.
    fn take_completions(&mut self) -> Result<(), DriverFailure> {
        while let Ok(event) = self.completions.try_recv() {
            self.handle(event)?;
        }
        Ok(())
    }

    /// Handles one event; false on shutdown.
    fn handle(&mut self, event: Event) -> Result<bool, DriverFailure> {
        match event {
            Event::Peer(msg) => self.core.handle(Input::Peer(msg))?,
            Event::Request(mut request, reply) => {
                if let Request::Stream(cmd) = &mut request {
                    // The time a stream command carries is this node's (it proposes only as
                    // leader), whoever built the command; monotonic while it runs.
                    let wall = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    self.stream_clock_ms = self.stream_clock_ms.max(wall);
                    cmd.set_now_ms(self.stream_clock_ms);
                }
                let id = self.next_request;
                self.next_request += 1;
                self.callers.insert(id, reply);
                self.core.handle(Input::Request { id, request })?;
            }
            Event::Persisted { number, result } => {
                result.map_err(DriverFailure::Write)?;
                self.core.handle(Input::Persisted { number })?;
            }
            Event::Wake => self.take_completions()?,
            Event::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    /// Carries out the core's actions, in order, until it has none.
    fn carry_out(&mut self) -> Result<(), DriverFailure> {
        while let Some(action) = self.core.poll_action()? {
            self.act(action)?;
        }
        Ok(())
    }

    /// After a failure: answer the callers the core answered, write nothing.
    fn reply_only(&mut self) {
        while let Ok(Some(action)) = self.core.poll_action() {
            if let Action::Reply { id, outcome } = action {
                self.answer(id, outcome);
            }
        }
    }

    fn answer(&mut self, id: RequestId, outcome: Outcome) {
        if let Some(reply) = self.callers.remove(&id) {
            let _ = reply.send(outcome);
        }
    }

    fn act(&mut self, action: Action) -> Result<(), DriverFailure> {
        match action {
            Action::Send(msg) => self.send(msg)?,
            Action::Truncate { from } => self.storage.truncate(from)?,
            Action::Write { number, entries } => {
                let ticket = self.storage.submit(&entries)?;
                let job = syncer::SyncJob::Wait { number, ticket };
                self.syncer.send(job).map_err(|_| DriverFailure::SyncerGone)?;
            }
            Action::Flush { through } => {
                self.storage.flush()?;
                self.core.handle(Input::Persisted { number: through })?;
            }
            Action::SaveHardState(hs) => self.storage.save_hard_state(hs)?,
            Action::RaiseRepairFloor(floor) => self.storage.raise_repair_floor(floor)?,
            Action::SaveCommit(commit) => {
                let job = syncer::SyncJob::SaveCommit(commit);
                self.syncer.send(job).map_err(|_| DriverFailure::SyncerGone)?;
            }
            Action::MoveStart { old, new, change } => {
                self.storage.move_start(&old, &new, change)?
            }
            Action::Reply { id, outcome } => self.answer(id, outcome),
            Action::PublishReadable(index) => {
                self.shared.readable.send_replace(index);
            }
            Action::PublishView(view) => *self.shared.view.write() = view,
            Action::PublishStreams(changed) => {
                {
                    let mut streams = self.shared.streams.write();
                    for (name, view) in changed {
                        match view {
                            Some(view) => streams.insert(name, view),
                            None => streams.remove(&name),
                        };
                    }
                }
                self.shared.streams_changed.send_modify(|v| *v += 1);
            }
            Action::SaveStreams { at, state } => self.storage.save_streams(at, Some(&state))?,
            Action::StreamsMissing { at_least } => {
                self.storage.save_streams(at_least, None)?;
                // The streams API fetches a peer's state (streams_api::fetch_streams).
                self.shared.streams_missing.send_replace(Some(at_least));
            }
            Action::StreamsInstalled => {
                self.shared.streams_missing.send_replace(None);
            }
            Action::PublishStatus(status) => *self.shared.status.write() = *status,
            Action::Reach(a) => {
                self.shared.api_addrs.write().insert(a.id, a.api.clone());
                if a.id != self.shared.id {
                    self.transport.add_peer(a.id, a.peer);
                }
            }
            Action::Unreach(id) => {
                tracing::info!(node = %id, "no longer a member: stop reaching it");
                self.transport.remove_peer(id);
            }
            Action::Forget(id) => {
                if let Err(e) = self.book.forget(id) {
                    tracing::warn!(node = %id, error = %e, "could not forget a peer's data directory");
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, msg: Message) -> Result<(), DriverFailure> {
        let to = msg.to;
        let log_start = matches!(msg.body, MessageBody::InstallLog { .. });
        if self.transport.send(&msg).is_err() {
            self.core.handle(Input::Unreachable { to, log_start })?;
        }
        Ok(())
    }
}

/// Runs the driver so that a panic in it is a failure like any other: `failure` gets the
/// reason (so /livez fails and `raftwal node` exits non-zero with it) before the panic goes on,
/// instead of a process that answers /livez while its index is frozen.
pub fn run_guarded<T>(failure: &watch::Sender<Option<String>>, run: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            tracing::error!(%why, "the node's driver panicked");
            failure.send_replace(Some(format!("the driver panicked: {why}")));
            std::panic::resume_unwind(payload)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_the_driver_is_reported_as_the_node_failure() {
        let failure = watch::Sender::new(None);
        let reported = failure.clone();
        let joined = std::thread::spawn(move || {
            run_guarded(&reported, || -> () { panic!("an invariant broke") })
        })
        .join();
        assert!(joined.is_err(), "the panic goes on");
        let why = failure.borrow().clone().expect("a failure is published");
        assert!(why.contains("an invariant broke"), "{why}");
    }
}
