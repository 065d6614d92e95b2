//! The whole-cluster simulation: 3 or 5 node cores, each over the real raftwal-wal on an
//! in-memory FaultStorage, a simulated network and clock, and simulated clients, all driven
//! from one seed (so a run replays exactly). Faults run for the first part of a run, then heal;
//! the checker reads the history of what clients were told and what every node serves.
//!
//! Shared by `examples/cluster-sim` (the command) and `tests/cluster_sim.rs` (the normal test
//! run).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use raftwal_consensus::{Config, LogIndex, Message, NodeId, Role, SplitMix64};
use raftwal_server::core::{
    Action, AppendReq, CoreConfig, Input, NodeCore, Outcome, PlantedBug, ReadView, Reply, Request,
    RequestError,
};
use raftwal_server::envelope::ProducerSeq;
use raftwal_server::node::{bootstrap_if_new, recover_core};
use raftwal_server::read::read_page;
use raftwal_server::shell::NodeStorage;
use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Ticket, Wal};

/// Simulated milliseconds per tick.
const TICK_MS: u64 = 10;
/// Faults happen before this time; then everything heals.
const FAULTS_UNTIL_MS: u64 = 3_000;
/// The run ends here.
const END_MS: u64 = 6_000;
/// A request with no answer for this long has an unknown outcome.
const REQUEST_TIMEOUT_MS: u64 = 400;
const CLIENTS: u64 = 4;

/// What one run is.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The seed every choice comes from.
    pub seed: u64,
    /// 3 or 5.
    pub nodes: u64,
    /// A bug to plant in every node.
    pub bug: Option<PlantedBug>,
}

/// What one run found.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Simulated steps (one per node per millisecond alive).
    pub steps: u64,
    /// What the checker found wrong.
    pub violations: Vec<String>,
    /// The history, one line an event, for a failing seed.
    pub history: Vec<String>,
    /// Appends acknowledged.
    pub acked: u64,
}

struct Disk {
    fs: FaultStorage,
    dir: tempfile::TempDir,
}

struct Live {
    core: NodeCore,
    storage: NodeStorage,
    /// Writes waiting for their (simulated) fsync: (write number, ticket, due time).
    syncs: VecDeque<(u64, Ticket, u64)>,
    readable: LogIndex,
    view: ReadView,
    next_tick_ms: u64,
    callers: HashMap<u64, (u64, u64)>,
    /// The last role, leader and term seen, to log changes.
    role: (Role, Option<NodeId>, raftwal_consensus::Term),
}

struct SimNode {
    id: NodeId,
    disk: Disk,
    live: Option<Live>,
    down_until_ms: u64,
    incarnation: u64,
}

#[derive(Debug, Clone)]
enum OpKind {
    Append { records: Vec<Bytes>, producer: Option<ProducerSeq>, expected: Option<LogIndex> },
    LinRead,
    Read { from: LogIndex },
    Trim { before: LogIndex },
    Transfer { to: NodeId },
}

#[derive(Debug, Clone)]
enum OpResult {
    Appended {
        first: LogIndex,
        last: LogIndex,
    },
    /// A linearizable read: the node's settled index once it had applied the barrier.
    ReadAt(LogIndex),
    Records(Vec<(LogIndex, Bytes)>),
    /// A trim, a membership change or a transfer was done (at this index, for the first two).
    Done(Option<LogIndex>),
    Failed(String),
    Unknown,
}

#[derive(Debug)]
struct Op {
    client: u64,
    kind: OpKind,
    sent_ms: u64,
    done_ms: Option<u64>,
    result: Option<OpResult>,
}

struct Client {
    id: u64,
    leader_guess: NodeId,
    /// The op in flight, its attempt's node and request id, and when the attempt times out.
    current: Option<(usize, NodeId, u64, u64)>,
    /// A linearizable read waiting for its node to apply this index: (op, node, index, by).
    waiting_read: Option<(usize, NodeId, LogIndex, u64)>,
    /// An op to send (again) at `next_ms`.
    queued: Option<usize>,
    next_ms: u64,
    next_sequence: u64,
    /// A follower of the log: the next offset, and what it saw.
    follow_next: LogIndex,
    follow_node: NodeId,
    followed: Vec<(LogIndex, Bytes)>,
}

/// A pipelined producer, like the client's Appender: up to `window` appends in flight on one
/// stream, sequences in send order; after any failure it sends every unanswered append again,
/// in order, with the same sequences.
struct Streamer {
    producer: u64,
    window: usize,
    next_sequence: u64,
    node: NodeId,
    /// Unanswered appends in sequence order: (op, sequence, request id of the live attempt).
    pending: VecDeque<(usize, u64, Option<u64>)>,
    /// The stream broke: resend everything pending at `next_ms`.
    broken: bool,
    next_ms: u64,
    /// When the oldest attempt in flight times out.
    deadline_ms: u64,
}

struct Net {
    /// (deliver at, sequence) -> message
    queue: BTreeMap<(u64, u64), Message>,
    seq: u64,
    /// Links cut: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    loss_per_mille: u64,
    dup_per_mille: u64,
    delay_ms_max: u64,
}

struct Sim {
    opts: Options,
    rng: SplitMix64,
    now: u64,
    nodes: Vec<SimNode>,
    net: Net,
    clients: Vec<Client>,
    streamers: Vec<Streamer>,
    /// Request id -> (streamer, op).
    stream_requests: HashMap<u64, (usize, usize)>,
    ops: Vec<Op>,
    next_request: u64,
    history: Vec<String>,
    violations: Vec<String>,
    steps: u64,
    /// Index of each op's client attempt: request id -> op.
    requests: HashMap<u64, usize>,
    /// When the last append was acknowledged.
    last_ack_ms: u64,
    /// Log every delivered message (`SIM_TRACE=1`), to debug one seed.
    trace: bool,
}

fn wal_options() -> raftwal_wal::Options {
    raftwal_wal::Options {
        segment_bytes: 64 << 10,
        record_bytes_max: 4 << 10,
        ..Default::default()
    }
}

/// Runs one seed.
pub fn run(opts: Options) -> RunReport {
    let mut sim = Sim::new(opts);
    sim.run();
    sim.check();
    let acked =
        sim.ops.iter().filter(|o| matches!(o.result, Some(OpResult::Appended { .. }))).count()
            as u64;
    RunReport { steps: sim.steps, violations: sim.violations, history: sim.history, acked }
}

impl Sim {
    fn new(opts: Options) -> Sim {
        let mut rng = SplitMix64::new(opts.seed);
        let voters: Vec<NodeId> = (1..=opts.nodes).map(NodeId).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let disk = Disk { fs: FaultStorage::new(), dir: tempfile::tempdir().expect("dir") };
                let wal = Wal::open_with(Arc::new(disk.fs.clone()), wal_options()).expect("wal");
                bootstrap_if_new(&wal, &voters).expect("bootstrap");
                drop(wal);
                SimNode { id, disk, live: None, down_until_ms: 0, incarnation: 0 }
            })
            .collect();
        let clients = (0..CLIENTS)
            .map(|id| Client {
                id,
                leader_guess: NodeId(1 + id % opts.nodes),
                current: None,
                waiting_read: None,
                queued: None,
                next_ms: 0,
                next_sequence: 1,
                follow_next: LogIndex(1),
                follow_node: NodeId(1 + id % opts.nodes),
                followed: Vec::new(),
            })
            .collect();
        let net = Net {
            queue: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            loss_per_mille: rng.below(30),
            dup_per_mille: rng.below(30),
            delay_ms_max: 1 + rng.below(8),
        };
        let mut sim = Sim {
            opts,
            rng,
            now: 0,
            nodes,
            net,
            clients,
            streamers: (0..2)
                .map(|k| Streamer {
                    producer: 200 + k,
                    window: 2 + (k as usize) * 6,
                    next_sequence: 1,
                    node: NodeId(1),
                    pending: VecDeque::new(),
                    broken: false,
                    next_ms: 0,
                    deadline_ms: 0,
                })
                .collect(),
            stream_requests: HashMap::new(),
            ops: Vec::new(),
            next_request: 1,
            history: Vec::new(),
            violations: Vec::new(),
            steps: 0,
            requests: HashMap::new(),
            last_ack_ms: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for i in 0..sim.nodes.len() {
            sim.boot(i);
        }
        sim
    }

    fn log(&mut self, line: String) {
        self.history.push(format!("{:>5} ms {line}", self.now));
    }

    fn boot(&mut self, i: usize) {
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        let wal = match Wal::open_with(Arc::new(node.disk.fs.clone()), wal_options()) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                let line = format!("node {} refuses to start: {e}", node.id);
                self.violations.push(line.clone());
                self.log(line);
                return;
            }
        };
        let mut raft = Config::new(node.id, seed);
        raft.election_ticks = 10;
        raft.heartbeat_ticks = 2;
        let core_config = CoreConfig {
            id: node.id,
            read_barrier_ticks: 20,
            read_context_start: seed >> 1,
            producers_max: 1000,
            writes_in_flight_max: 64,
            planted: self.opts.bug,
        };
        match recover_core(wal.clone(), node.disk.dir.path(), raft, core_config) {
            Ok((core, _)) => {
                let storage = NodeStorage::new(wal.clone(), node.disk.dir.path().to_path_buf());
                let readable = wal.first_index().prev();
                node.live = Some(Live {
                    core,
                    storage,
                    syncs: VecDeque::new(),
                    readable,
                    view: ReadView::default(),
                    next_tick_ms: self.now + TICK_MS,
                    callers: HashMap::new(),
                    role: (Role::Follower, None, raftwal_consensus::Term(0)),
                });
                let line = format!("node {} starts (incarnation {})", node.id, node.incarnation);
                self.log(line);
                self.carry_out(i);
            }
            Err(e) => {
                let line = format!("node {} refuses to start: {e:#}", node.id);
                self.violations.push(line.clone());
                self.log(line);
            }
        }
    }

    /// A process crash: what was not synced may be lost, kept or torn.
    fn crash(&mut self, i: usize, why: &str) {
        let spec = CrashSpec {
            loss: match self.rng.below(3) {
                0 => Loss::All,
                1 => Loss::None,
                _ => Loss::Some,
            },
            tear_last_write: self.rng.below(2) == 0,
            seed: self.rng.next_u64(),
        };
        let down = 50 + self.rng.below(500);
        let node = &mut self.nodes[i];
        node.live = None;
        node.disk.fs = node.disk.fs.crash_image(spec);
        node.down_until_ms = self.now + down;
        let line = format!("node {} crashes ({why}), down for {down} ms", node.id);
        self.log(line);
    }

    fn run(&mut self) {
        while self.now < END_MS {
            self.now += 1;
            if self.now < FAULTS_UNTIL_MS {
                self.faults();
            } else if self.now == FAULTS_UNTIL_MS {
                self.heal();
            }
            self.deliver();
            for i in 0..self.nodes.len() {
                self.step_node(i);
            }
            for c in 0..self.clients.len() {
                self.step_client(c);
            }
            for k in 0..self.streamers.len() {
                self.step_streamer(k);
            }
        }
    }

    fn faults(&mut self) {
        let r = self.rng.below(1000);
        let n = self.nodes.len();
        if r < 2 {
            let i = self.rng.below(n as u64) as usize;
            if self.nodes[i].live.is_some() {
                self.crash(i, "kill -9");
            }
        } else if r < 4 {
            // Crash the leader, if there is one.
            if let Some(i) = self.leader_index() {
                self.crash(i, "kill -9 of the leader");
            }
        } else if r < 8 {
            self.partition();
        } else if r < 10 {
            self.net.cut.clear();
            self.log("the network heals".into());
        } else if r < 11 {
            // A failed fsync poisons the WAL: the node stops and restarts from its disk.
            let i = self.rng.below(n as u64) as usize;
            if self.nodes[i].live.is_some() {
                self.nodes[i].disk.fs.fail_sync_after(self.rng.below(3));
                let line = format!("node {}'s next fsyncs fail", self.nodes[i].id);
                self.log(line);
            }
        }
        for i in 0..n {
            if self.nodes[i].live.is_none() && self.now >= self.nodes[i].down_until_ms {
                self.boot(i);
            }
        }
    }

    fn partition(&mut self) {
        let n = self.nodes.len() as u64;
        self.net.cut.clear();
        let ids: Vec<NodeId> = self.nodes.iter().map(|x| x.id).collect();
        match self.rng.below(3) {
            0 => {
                // Isolate one node (often the leader), both ways.
                let victim = match self.leader_index() {
                    Some(l) if self.rng.below(2) == 0 => ids[l],
                    _ => ids[self.rng.below(n) as usize],
                };
                for &o in &ids {
                    if o != victim {
                        self.net.cut.insert((victim, o));
                        self.net.cut.insert((o, victim));
                    }
                }
                self.log(format!("partition: node {victim} alone"));
            }
            1 => {
                // One way: a node hears nobody but is heard.
                let victim = ids[self.rng.below(n) as usize];
                for &o in &ids {
                    if o != victim {
                        self.net.cut.insert((o, victim));
                    }
                }
                self.log(format!("partition: node {victim} hears nobody"));
            }
            _ => {
                // A bridge: two halves that only one node connects.
                let bridge = ids[self.rng.below(n) as usize];
                let others: Vec<NodeId> = ids.iter().copied().filter(|&x| x != bridge).collect();
                let (a, b) = others.split_at(others.len() / 2);
                for &x in a {
                    for &y in b {
                        self.net.cut.insert((x, y));
                        self.net.cut.insert((y, x));
                    }
                }
                self.log(format!("partition: {a:?} | {b:?}, bridged by node {bridge}"));
            }
        }
    }

    fn heal(&mut self) {
        self.net.cut.clear();
        self.net.loss_per_mille = 0;
        self.net.dup_per_mille = 0;
        for i in 0..self.nodes.len() {
            self.nodes[i].disk.fs.fail_sync_after(u64::MAX);
            if self.nodes[i].live.is_none() {
                self.boot(i);
            }
        }
        self.log("heal: every node up, the network whole, no more faults".into());
    }

    fn leader_index(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.live.as_ref().is_some_and(|l| l.core.status().role == Role::Leader))
    }

    fn index_of(&self, id: NodeId) -> usize {
        (id.0 - 1) as usize
    }

    fn deliver(&mut self) {
        while let Some((&(at, seq), _)) = self.net.queue.first_key_value() {
            if at > self.now {
                break;
            }
            let msg = self.net.queue.remove(&(at, seq)).expect("present");
            if self.trace {
                let line = format!("deliver {} -> {}: {:?}", msg.from, msg.to, msg.body);
                self.log(line.chars().take(200).collect());
            }
            let i = self.index_of(msg.to);
            if self.nodes[i].live.is_some() {
                self.input(i, Input::Peer(msg));
            }
        }
    }

    fn send(&mut self, msg: Message) {
        if self.net.cut.contains(&(msg.from, msg.to))
            || self.rng.below(1000) < self.net.loss_per_mille
        {
            return;
        }
        let copies = if self.rng.below(1000) < self.net.dup_per_mille { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now + 1 + self.rng.below(self.net.delay_ms_max);
            self.net.seq += 1;
            self.net.queue.insert((at, self.net.seq), msg.clone());
        }
    }

    fn input(&mut self, i: usize, input: Input) {
        let Some(live) = self.nodes[i].live.as_mut() else { return };
        if let Err(e) = live.core.handle(input) {
            let line = format!("node {} fails: {e}", self.nodes[i].id);
            self.violations.push(line);
            self.crash(i, "fatal core error");
            return;
        }
        self.carry_out(i);
    }

    fn step_node(&mut self, i: usize) {
        if self.nodes[i].live.is_none() {
            return;
        }
        self.steps += 1;
        // The syncer: the oldest write completes once its fsync time has passed.
        loop {
            let Some(live) = self.nodes[i].live.as_mut() else { return };
            let Some(&(number, ticket, due)) = live.syncs.front() else { break };
            if due > self.now {
                break;
            }
            live.syncs.pop_front();
            if let Err(e) = live.storage.wait(ticket) {
                let line = format!("{e}");
                self.crash(i, &line);
                return;
            }
            self.input(i, Input::Persisted { number });
        }
        let Some(live) = self.nodes[i].live.as_mut() else { return };
        if self.now >= live.next_tick_ms {
            live.next_tick_ms += TICK_MS;
            self.input(i, Input::Tick { now_ms: self.now });
        }
    }

    fn carry_out(&mut self, i: usize) {
        loop {
            let Some(live) = self.nodes[i].live.as_mut() else { return };
            let action = match live.core.poll_action() {
                Ok(Some(a)) => a,
                Ok(None) => return,
                Err(e) => {
                    let line = format!("node {} fails: {e}", self.nodes[i].id);
                    self.violations.push(line);
                    self.crash(i, "fatal core error");
                    return;
                }
            };
            let stored = match action {
                Action::Send(msg) => {
                    self.send(msg);
                    Ok(())
                }
                Action::Truncate { from } => live.storage.truncate(from),
                Action::Write { number, entries } => match live.storage.submit(&entries) {
                    Ok(ticket) => {
                        // Slow fsyncs now and then (a stalled disk), while faults run. (A
                        // follower answers heartbeats only once its pending writes are durable,
                        // so stalls on a quorum of followers depose a healthy leader: known,
                        // ARCHITECTURE.md, the node's known gaps.)
                        let slow = self.now < FAULTS_UNTIL_MS && self.rng.below(100) == 0;
                        let delay = if slow { 20 + self.rng.below(200) } else { self.rng.below(3) };
                        let after = live.syncs.back().map_or(0, |s| s.2);
                        live.syncs.push_back((number, ticket, (self.now + delay).max(after)));
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Action::Flush => live.storage.flush(),
                Action::SaveHardState(hs) => live.storage.save_hard_state(hs),
                Action::MoveStart { old, new, change } => {
                    live.storage.move_start(&old, &new, change)
                }
                Action::Reply { id, outcome } => {
                    live.callers.remove(&id);
                    self.reply(id, outcome);
                    Ok(())
                }
                Action::PublishReadable(index) => {
                    live.readable = index;
                    Ok(())
                }
                Action::PublishView(view) => {
                    live.view = view;
                    Ok(())
                }
                Action::PublishStatus(status) => {
                    let now = (status.role, status.leader, status.term);
                    if live.role != now {
                        live.role = now;
                        let line = format!(
                            "node {} is {:?} in term {}, leader {:?}",
                            status.id, now.0, now.2, now.1
                        );
                        self.log(line);
                    }
                    Ok(())
                }
                Action::Reach(_) | Action::Forget(_) => Ok(()),
            };
            if let Err(e) = stored {
                let line = format!("{e}");
                self.crash(i, &line);
                return;
            }
        }
    }

    // ---- clients ----

    fn new_op(&mut self, client: u64, kind: OpKind) -> usize {
        self.ops.push(Op { client, kind, sent_ms: self.now, done_ms: None, result: None });
        self.ops.len() - 1
    }

    fn step_client(&mut self, c: usize) {
        self.follow(c);
        if let Some((op, node, index, by)) = self.clients[c].waiting_read {
            let i = self.index_of(node);
            let readable = self.nodes[i].live.as_ref().map(|l| l.readable);
            if let Some(r) = readable
                && r >= index
            {
                self.finish(op, OpResult::ReadAt(r));
                self.clients[c].waiting_read = None;
            } else if self.now >= by || readable.is_none() {
                self.finish(op, OpResult::Unknown);
                self.clients[c].waiting_read = None;
            }
            return;
        }
        if let Some((op, _, id, deadline)) = self.clients[c].current {
            if self.now >= deadline {
                self.requests.remove(&id);
                self.clients[c].current = None;
                self.retry_or_give_up(op, "timed out");
            }
            return;
        }
        if self.now < self.clients[c].next_ms {
            return;
        }
        if let Some(op) = self.clients[c].queued.take() {
            self.attempt(c, op);
            return;
        }
        let client = self.clients[c].id;
        let kind = match self.rng.below(100) {
            0..=69 => {
                let seq = self.clients[c].next_sequence;
                self.clients[c].next_sequence += 1;
                let n = 1 + self.rng.below(3);
                let records =
                    (0..n).map(|r| Bytes::from(format!("c{client}-s{seq}-r{r}"))).collect();
                OpKind::Append {
                    records,
                    producer: Some(ProducerSeq { id: 100 + client, sequence: seq }),
                    expected: None,
                }
            }
            70..=77 => {
                let tag = self.rng.next_u64();
                let i = self.index_of(self.clients[c].leader_guess);
                let guess = self.nodes[i].live.as_ref().map_or(LogIndex(1), |l| l.readable.next());
                OpKind::Append {
                    records: vec![Bytes::from(format!("c{client}-x{tag}"))],
                    producer: None,
                    expected: Some(guess),
                }
            }
            78..=87 => OpKind::LinRead,
            88..=95 => OpKind::Read { from: LogIndex(1 + self.rng.below(60)) },
            96..=97 => OpKind::Trim { before: LogIndex(self.rng.below(40)) },
            // No leader moves in the last second: the run ends by checking there is one.
            _ if self.now + 1000 > END_MS => OpKind::LinRead,
            _ => OpKind::Transfer { to: NodeId(1 + self.rng.below(self.opts.nodes)) },
        };
        let op = self.new_op(client, kind);
        self.attempt(c, op);
    }

    fn attempt(&mut self, c: usize, op: usize) {
        let node = self.clients[c].leader_guess;
        let i = self.index_of(node);
        let kind = self.ops[op].kind.clone();
        if let OpKind::Read { from } = kind {
            // A plain read: served by whichever node the client reaches.
            let result = match self.nodes[i].live.as_ref() {
                Some(l) => match read_page(
                    l.storage.wal(),
                    || l.view.clone(),
                    l.readable,
                    from,
                    20,
                    1 << 20,
                ) {
                    Ok(page) => OpResult::Records(page.records),
                    Err(e) => OpResult::Failed(e.to_string()),
                },
                None => OpResult::Failed("node down".into()),
            };
            self.finish(op, result);
            self.clients[c].next_ms = self.now + 1 + self.rng.below(5);
            return;
        }
        let request = match kind {
            OpKind::Append { records, producer, expected } => {
                Request::Append(AppendReq { records, expected_next: expected, producer })
            }
            OpKind::LinRead => Request::ReadIndex,
            OpKind::Trim { before } => Request::Trim { before },
            OpKind::Transfer { to } => Request::Transfer { to },
            OpKind::Read { .. } => unreachable!("served above"),
        };
        if self.nodes[i].live.is_none() {
            self.clients[c].leader_guess = NodeId(1 + self.rng.below(self.opts.nodes));
            self.clients[c].next_ms = self.now + 5;
            self.retry_or_give_up(op, "node down");
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, op);
        self.clients[c].current = Some((op, node, id, self.now + REQUEST_TIMEOUT_MS));
        self.nodes[i].live.as_mut().expect("alive").callers.insert(id, (c as u64, op as u64));
        self.input(i, Input::Request { id, request });
    }

    fn reply(&mut self, id: u64, outcome: Outcome) {
        if let Some((k, op)) = self.stream_requests.remove(&id) {
            self.stream_reply(k, op, outcome);
            return;
        }
        let Some(op) = self.requests.remove(&id) else { return };
        let c = self.ops[op].client as usize;
        if self.clients[c].current.is_some_and(|(o, ..)| o == op) {
            self.clients[c].current = None;
        }
        match outcome {
            Ok(Reply::Appended(ok)) => {
                self.finish(op, OpResult::Appended { first: ok.first, last: ok.last });
                self.last_ack_ms = self.now;
            }
            Ok(Reply::Index(index)) => match self.ops[op].kind {
                OpKind::LinRead => {
                    let node = self.clients[c].leader_guess;
                    self.clients[c].waiting_read =
                        Some((op, node, index, self.now + REQUEST_TIMEOUT_MS));
                }
                _ => self.finish(op, OpResult::Done(Some(index))),
            },
            Ok(Reply::Done) => self.finish(op, OpResult::Done(None)),
            Err(RequestError::NotLeader { leader }) => {
                let guess = leader.unwrap_or(NodeId(1 + self.rng.below(self.opts.nodes)));
                self.clients[c].leader_guess = guess;
                self.clients[c].next_ms = self.now + 2;
                self.retry_or_give_up(op, "not leader");
            }
            Err(RequestError::Overloaded(_)) => {
                self.clients[c].next_ms = self.now + 5;
                self.retry_or_give_up(op, "overloaded");
            }
            Err(RequestError::Lost) => self.retry_or_give_up(op, "lost"),
            Err(RequestError::Unknown(_)) => self.retry_or_give_up(op, "unknown"),
            Err(e) => self.finish(op, OpResult::Failed(e.to_string())),
        }
    }

    /// A producer append is retried with the same sequence until it is answered (that is what
    /// dedup is for); anything else ends with an unknown outcome.
    fn retry_or_give_up(&mut self, op: usize, why: &str) {
        let c = self.ops[op].client as usize;
        let retry = matches!(self.ops[op].kind, OpKind::Append { producer: Some(_), .. })
            && self.now < END_MS - 500;
        if retry {
            let line = format!("client {c} will retry op {op} ({why})");
            self.log(line);
            self.clients[c].queued = Some(op);
            self.clients[c].next_ms = self.clients[c].next_ms.max(self.now + 1);
        } else {
            self.finish(op, OpResult::Unknown);
        }
    }

    fn finish(&mut self, op: usize, result: OpResult) {
        let c = self.ops[op].client as usize;
        let line = format!("client {c} op {op} {:?} -> {result:?}", self.ops[op].kind);
        self.log(line);
        self.ops[op].done_ms = Some(self.now);
        self.ops[op].result = Some(result);
        // Clients pause before their next op; pipelined producers (ids from 200) do not.
        if let Some(client) = self.clients.get_mut(c) {
            client.next_ms = client.next_ms.max(self.now + 1 + self.rng.below(4));
        }
    }

    /// The client's follower of the log reads on from where it stopped, on its node.
    fn follow(&mut self, c: usize) {
        let i = self.index_of(self.clients[c].follow_node);
        let next = self.clients[c].follow_next;
        let page = match self.nodes[i].live.as_ref() {
            Some(l) => read_page(l.storage.wal(), || l.view.clone(), l.readable, next, 50, 1 << 20),
            None => {
                self.clients[c].follow_node = NodeId(1 + self.rng.below(self.opts.nodes));
                return;
            }
        };
        match page {
            Ok(page) => {
                self.clients[c].follow_next = page.next.max(next);
                self.clients[c].followed.extend(page.records);
            }
            Err(raftwal_server::read::ReadError::Trimmed { first, .. }) => {
                // Behind a trim: a real follower is told where the log starts and resumes there.
                self.clients[c].followed.push((first, Bytes::from_static(b"<trimmed>")));
                self.clients[c].follow_next = first;
            }
            Err(e) => self.violations.push(format!("follow read failed: {e}")),
        }
        if self.rng.below(200) == 0 {
            self.clients[c].follow_node = NodeId(1 + self.rng.below(self.opts.nodes));
        }
    }

    // ---- pipelined producers ----

    fn step_streamer(&mut self, k: usize) {
        let now = self.now;
        let st = &mut self.streamers[k];
        let in_flight = st.pending.iter().any(|p| p.2.is_some());
        if in_flight && now >= st.deadline_ms {
            st.broken = true;
            st.next_ms = now + 5;
        }
        if st.broken {
            if now < st.next_ms {
                return;
            }
            // A new stream: every unanswered append again, in order.
            st.broken = false;
            let ops: Vec<usize> = st.pending.iter().map(|p| p.0).collect();
            for p in st.pending.iter_mut() {
                p.2 = None;
            }
            for op in ops {
                self.stream_send(k, op);
            }
            return;
        }
        if st.pending.len() < st.window && now >= st.next_ms && now + 500 < END_MS {
            let seq = st.next_sequence;
            st.next_sequence += 1;
            let producer = st.producer;
            let records = vec![Bytes::from(format!("p{producer}-s{seq}-r0"))];
            let kind = OpKind::Append {
                records,
                producer: Some(ProducerSeq { id: producer, sequence: seq }),
                expected: None,
            };
            let op = self.new_op(producer, kind);
            self.streamers[k].pending.push_back((op, seq, None));
            self.streamers[k].next_ms = now + self.rng.below(3);
            self.stream_send(k, op);
        }
    }

    fn stream_send(&mut self, k: usize, op: usize) {
        let i = self.index_of(self.streamers[k].node);
        let OpKind::Append { records, producer, .. } = self.ops[op].kind.clone() else {
            unreachable!("streamers append")
        };
        if self.nodes[i].live.is_none() {
            let st = &mut self.streamers[k];
            st.node = NodeId(1 + self.rng.below(self.opts.nodes));
            st.broken = true;
            st.next_ms = self.now + 5;
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.stream_requests.insert(id, (k, op));
        let st = &mut self.streamers[k];
        if let Some(p) = st.pending.iter_mut().find(|p| p.0 == op) {
            p.2 = Some(id);
        }
        if !st.pending.iter().any(|p| p.2.is_some() && p.0 != op) {
            st.deadline_ms = self.now + REQUEST_TIMEOUT_MS;
        }
        let request = Request::Append(AppendReq { records, expected_next: None, producer });
        self.input(i, Input::Request { id, request });
    }

    fn stream_reply(&mut self, k: usize, op: usize, outcome: Outcome) {
        let st = &mut self.streamers[k];
        // An answer on a stream that was replaced since is dropped, as a real client's is.
        let live = st.pending.iter().any(|p| p.0 == op && p.2.is_some());
        if !live {
            return;
        }
        match outcome {
            Ok(Reply::Appended(ok)) => {
                st.pending.retain(|p| p.0 != op);
                self.last_ack_ms = self.now;
                self.finish(op, OpResult::Appended { first: ok.first, last: ok.last });
            }
            Err(RequestError::NotLeader { leader }) => {
                st.node = leader.unwrap_or(NodeId(1 + self.rng.below(self.opts.nodes)));
                st.broken = true;
                st.next_ms = self.now + 2;
            }
            Err(RequestError::Overloaded(_) | RequestError::Lost | RequestError::Unknown(_)) => {
                st.broken = true;
                st.next_ms = self.now + 5;
            }
            Err(e) => {
                // Final: this append is not in the log; the ones after it go on.
                st.pending.retain(|p| p.0 != op);
                self.finish(op, OpResult::Failed(e.to_string()));
            }
            Ok(other) => self.finish(op, OpResult::Failed(format!("unexpected {other:?}"))),
        }
    }

    // ---- the checker ----

    fn served_log(&self, i: usize) -> Option<(LogIndex, BTreeMap<LogIndex, Bytes>)> {
        let l = self.nodes[i].live.as_ref()?;
        let mut out = BTreeMap::new();
        let first = l.view.start.max(l.storage.wal().first_index());
        let mut next = first;
        loop {
            match read_page(l.storage.wal(), || l.view.clone(), l.readable, next, 1000, 64 << 20) {
                Ok(page) if page.records.is_empty() => break,
                Ok(page) => {
                    next = page.next;
                    out.extend(page.records);
                }
                Err(_) => return None,
            }
        }
        Some((first, out))
    }

    fn check(&mut self) {
        let mut v = Vec::new();
        // Liveness: after the heal, a leader and acknowledged appends.
        if self.leader_index().is_none() {
            v.push("no leader at the end, 3 s after every fault healed".to_string());
        }
        if self.last_ack_ms + 500 < END_MS {
            v.push(format!(
                "no append acknowledged in the last 500 ms of a healed cluster (last at {} ms)",
                self.last_ack_ms
            ));
        }
        // Every node's served log is the same on their common range.
        let logs: Vec<(NodeId, LogIndex, BTreeMap<LogIndex, Bytes>)> = (0..self.nodes.len())
            .filter_map(|i| self.served_log(i).map(|(f, l)| (self.nodes[i].id, f, l)))
            .collect();
        let mut all: BTreeMap<LogIndex, Bytes> = BTreeMap::new();
        let mut start = LogIndex(u64::MAX);
        let mut end = LogIndex(0);
        for (id, first, log) in &logs {
            start = start.min(*first);
            for (o, b) in log {
                match all.get(o) {
                    Some(other) if other != b => v.push(format!(
                        "node {id} serves {b:?} at {o}, another node serves {other:?}"
                    )),
                    _ => {
                        all.insert(*o, b.clone());
                    }
                }
            }
        }
        for (_, _, log) in &logs {
            end = end.max(log.keys().next_back().copied().unwrap_or(LogIndex(0)));
        }
        // No acknowledged append lost; every acknowledged offset holds exactly its record.
        let mut acked: Vec<(u64, u64, LogIndex, LogIndex)> = Vec::new();
        for (n, op) in self.ops.iter().enumerate() {
            if let (OpKind::Append { records, .. }, Some(OpResult::Appended { first, last })) =
                (&op.kind, &op.result)
            {
                acked.push((op.sent_ms, op.done_ms.expect("done"), *first, *last));
                if last.0 - first.0 + 1 != records.len() as u64 {
                    v.push(format!(
                        "op {n}: {} records acknowledged at {first}..={last}",
                        records.len()
                    ));
                    continue;
                }
                for (k, r) in records.iter().enumerate() {
                    let o = LogIndex(first.0 + k as u64);
                    if o < start {
                        continue; // trimmed everywhere
                    }
                    match all.get(&o) {
                        Some(b) if b == r => {}
                        got => v.push(format!(
                            "op {n}: acknowledged {r:?} at {o}, the log has {got:?}"
                        )),
                    }
                }
            }
        }
        // No record twice.
        let mut seen: HashMap<&Bytes, LogIndex> = HashMap::new();
        for (o, b) in &all {
            if let Some(before) = seen.insert(b, *o) {
                v.push(format!("{b:?} is in the log twice: at {before} and {o}"));
            }
        }
        // A producer's appends are in the log in sequence order.
        let mut last_seq: HashMap<&[u8], (u64, LogIndex)> = HashMap::new();
        for (o, b) in &all {
            let text = std::str::from_utf8(b).unwrap_or("");
            let mut parts = text.split('-');
            let (Some(who), Some(seq)) = (parts.next(), parts.next()) else { continue };
            let Some(seq) = seq.strip_prefix('s').and_then(|x| x.parse::<u64>().ok()) else {
                continue;
            };
            if let Some(&(prev, at)) = last_seq.get(who.as_bytes())
                && seq < prev
            {
                v.push(format!("{who}'s sequence {seq} is at {o}, after sequence {prev} at {at}"));
            }
            last_seq.insert(who.as_bytes(), (seq, *o));
        }
        // Real-time order: an append acknowledged before another was sent has lower offsets.
        let mut by_ack = acked.clone();
        by_ack.sort_by_key(|a| a.1);
        let mut by_sent = acked.clone();
        by_sent.sort_by_key(|a| a.0);
        let mut k = 0;
        let mut max_last = LogIndex(0);
        for b in &by_sent {
            while k < by_ack.len() && by_ack[k].1 < b.0 {
                max_last = max_last.max(by_ack[k].3);
                k += 1;
            }
            if max_last >= b.2 {
                v.push(format!(
                    "an append sent at {} ms got {}, below {max_last} acknowledged before it",
                    b.0, b.2
                ));
            }
        }
        // A linearizable read sees every append acknowledged before it was sent.
        for (n, op) in self.ops.iter().enumerate() {
            if let (OpKind::LinRead, Some(OpResult::ReadAt(at))) = (&op.kind, &op.result) {
                let before = by_ack
                    .iter()
                    .filter(|a| a.1 < op.sent_ms)
                    .map(|a| a.3)
                    .max()
                    .unwrap_or(LogIndex(0));
                if *at < before {
                    v.push(format!("op {n}: linearizable read at {at} misses {before}"));
                }
            }
        }
        // What any read served never changes.
        for (n, op) in self.ops.iter().enumerate() {
            if let Some(OpResult::Records(records)) = &op.result {
                for (o, b) in records {
                    if *o >= start && all.get(o) != Some(b) {
                        v.push(format!(
                            "op {n}: a read served {b:?} at {o}; the log has {:?}",
                            all.get(o)
                        ));
                    }
                }
            }
        }
        // A follow never skips, repeats or goes back.
        for c in &self.clients {
            let mut prev = LogIndex(0);
            for (o, b) in &c.followed {
                if *o <= prev && b.as_ref() != b"<trimmed>" {
                    v.push(format!("client {}'s follow went from {prev} to {o}", c.id));
                }
                if b.as_ref() == b"<trimmed>" {
                    prev = o.prev();
                    continue;
                }
                if *o >= start && all.get(o) != Some(b) {
                    v.push(format!(
                        "client {}'s follow saw {b:?} at {o}; the log has {:?}",
                        c.id,
                        all.get(o)
                    ));
                }
                if *o >= start {
                    // Nothing served between the previous record and this one was skipped.
                    if let Some((skipped, _)) = all.range(prev.next().max(start)..*o).next() {
                        v.push(format!("client {}'s follow skipped {skipped}", c.id));
                    }
                }
                prev = *o;
            }
        }
        let _ = end;
        v.truncate(20);
        self.violations.extend(v);
    }
}
