//! The whole-cluster simulation: 3 or 5 node cores, each over the real raftwal-wal on an
//! in-memory FaultStorage, a simulated network and clock, and simulated clients, all driven
//! from one seed (so a run replays exactly). Faults run for the first part of a run, then heal;
//! the checker reads the history of what clients were told and what every node serves.
//!
//! Shared by `examples/cluster-sim` (the command) and `tests/cluster_sim.rs` (the normal test
//! run).

#![allow(dead_code)]

mod check;
mod clients;
mod members;
mod named;
mod streamers;

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
/// A leader whose disk finishes no write for this long hands leadership over.
const DISK_STALL_MS: u64 = 300;

/// What one run is.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The seed every choice comes from.
    pub seed: u64,
    /// 3 or 5.
    pub nodes: u64,
    /// A bug to plant in every node.
    pub bug: Option<PlantedBug>,
    /// Random faults in the first part of the run (off: a scenario alone).
    pub faults: bool,
    /// Stall the leader's disk at this time for this long (ms): its writes do not complete.
    pub stall_leader: Option<(u64, u64)>,
    /// Writers of named streams too (trims then stop at the first record a stream reads).
    pub named: bool,
}

impl Options {
    /// A run of `seed` on `nodes` nodes with random faults, no planted bug, no scenario; half
    /// the seeds (2 and 3 modulo 4) with writers of named streams.
    pub fn new(seed: u64, nodes: u64) -> Options {
        Options { seed, nodes, bug: None, faults: true, stall_leader: None, named: seed % 4 >= 2 }
    }
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
    /// When each acknowledged append was acknowledged (simulated ms), in order.
    pub ack_ms: Vec<u64>,
}

/// A node's disk: its WAL's directory and its data directory (the log-start file), each a
/// FaultStorage; a crash takes an image of both.
struct Disk {
    fs: FaultStorage,
    dir: FaultStorage,
}

struct Live {
    core: NodeCore,
    storage: NodeStorage,
    /// Writes waiting for their (simulated) fsync: (write number, ticket, due time).
    syncs: VecDeque<(u64, Ticket, u64)>,
    readable: LogIndex,
    view: ReadView,
    next_tick_ms: u64,
    /// The last role, leader and term seen, to log changes.
    role: (Role, Option<NodeId>, raftwal_consensus::Term),
    /// The named streams as this node published them.
    streams: HashMap<String, Arc<raftwal_server::core::streams::StreamView>>,
    /// The stream state is missing until a peer's applied to at least this is installed.
    streams_missing: Option<LogIndex>,
}

struct SimNode {
    id: NodeId,
    disk: Disk,
    live: Option<Live>,
    down_until_ms: u64,
    incarnation: u64,
    /// The disk finishes no write before this time (a stalled disk).
    stalled_until_ms: u64,
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
    /// Draws the disk stalls, apart from `rng`.
    stall_rng: SplitMix64,
    now: u64,
    nodes: Vec<SimNode>,
    net: Net,
    clients: Vec<Client>,
    streamers: Vec<Streamer>,
    /// Request id -> (streamer, op).
    stream_requests: HashMap<u64, (usize, usize)>,
    /// Writers of named streams, their requests (id -> writer) and their own random draws.
    named: Vec<named::NamedWriter>,
    named_requests: HashMap<u64, usize>,
    named_rng: SplitMix64,
    /// The operator changing the membership, and its request in flight.
    members: members::MemberPlan,
    member_requests: HashMap<u64, raftwal_consensus::ConfChange>,
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
    let mut ack_ms: Vec<u64> = sim
        .ops
        .iter()
        .filter(|o| matches!(o.result, Some(OpResult::Appended { .. })))
        .filter_map(|o| o.done_ms)
        .collect();
    ack_ms.sort_unstable();
    let acked = ack_ms.len() as u64;
    RunReport { steps: sim.steps, violations: sim.violations, history: sim.history, acked, ack_ms }
}

impl Sim {
    fn new(opts: Options) -> Sim {
        let mut rng = SplitMix64::new(opts.seed);
        let voters: Vec<NodeId> = (1..=opts.nodes).map(NodeId).collect();
        // One spare node beyond the voters, empty (it joins when a membership change adds it).
        let nodes = (1..=opts.nodes + 1)
            .map(|id| {
                let disk = Disk { fs: FaultStorage::new(), dir: FaultStorage::new() };
                if id <= opts.nodes {
                    let wal =
                        Wal::open_with(Arc::new(disk.fs.clone()), wal_options()).expect("wal");
                    bootstrap_if_new(&wal, &voters).expect("bootstrap");
                }
                SimNode {
                    id: NodeId(id),
                    disk,
                    live: None,
                    down_until_ms: 0,
                    incarnation: 0,
                    stalled_until_ms: 0,
                }
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
            stall_rng: SplitMix64::new(opts.seed ^ 0x57a1_1ed0_d15c),
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
            named: if opts.named {
                (0..2).map(|k| named::NamedWriter::new(k, NodeId(1 + k as u64))).collect()
            } else {
                Vec::new()
            },
            named_requests: HashMap::new(),
            named_rng: SplitMix64::new(opts.seed ^ 0x5e7a_11ed_0057),
            members: members::MemberPlan::new(NodeId(opts.nodes + 1)),
            member_requests: HashMap::new(),
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
            disk_stall_ms: DISK_STALL_MS,
            planted: self.opts.bug,
        };
        match recover_core(wal.clone(), &node.disk.dir, raft, core_config, None) {
            Ok((core, _)) => {
                let storage = NodeStorage::new(wal.clone(), Arc::new(node.disk.dir.clone()));
                let readable = wal.first_index().prev();
                node.live = Some(Live {
                    core,
                    storage,
                    syncs: VecDeque::new(),
                    readable,
                    view: ReadView::default(),
                    next_tick_ms: self.now + TICK_MS,
                    role: (Role::Follower, None, raftwal_consensus::Term(0)),
                    streams: HashMap::new(),
                    streams_missing: None,
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
        node.disk.dir = node.disk.dir.crash_image(CrashSpec { seed: spec.seed ^ 1, ..spec });
        node.down_until_ms = self.now + down;
        let line = format!("node {} crashes ({why}), down for {down} ms", node.id);
        self.log(line);
    }

    fn run(&mut self) {
        while self.now < END_MS {
            self.now += 1;
            if let Some((at, for_ms)) = self.opts.stall_leader
                && self.now == at
                && let Some(i) = self.leader_index()
            {
                self.stall_disk(i, for_ms);
            }
            if self.now < FAULTS_UNTIL_MS {
                if self.opts.faults {
                    self.faults();
                }
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
            for k in 0..self.named.len() {
                self.step_named(k);
            }
            if self.now.is_multiple_of(20) {
                self.fetch_streams();
            }
            self.step_members();
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
            self.fail_disk("fsyncs", 3, FaultStorage::fail_sync_after);
        } else if r < 12 {
            // A failed write (what a full disk or a bad block does to a running node): the WAL
            // is poisoned, the node stops and restarts from its disk.
            self.fail_disk("writes", 5, FaultStorage::fail_write_after);
        }
        // The leader's disk stalls now and then (a gray failure: the node lives, its writes do
        // not finish). Its own generator, so the other faults of a seed stay what they were.
        if self.stall_rng.below(2000) == 0
            && let Some(i) = self.leader_index()
        {
            let for_ms = 100 + self.stall_rng.below(1400);
            self.stall_disk(i, for_ms);
        }
        for i in 0..n {
            if self.nodes[i].live.is_none() && self.now >= self.nodes[i].down_until_ms {
                self.boot(i);
            }
        }
    }

    /// Makes one of the next `within` operations of kind `what` fail on a random running node.
    fn fail_disk(&mut self, what: &str, within: u64, fail: fn(&FaultStorage, u64)) {
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        if self.nodes[i].live.is_some() {
            fail(&self.nodes[i].disk.fs, self.rng.below(within));
            let line = format!("node {}'s next {what} fail", self.nodes[i].id);
            self.log(line);
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
            self.nodes[i].disk.fs.fail_write_after(u64::MAX);
            if self.opts.stall_leader.is_none() {
                self.nodes[i].stalled_until_ms = 0;
            }
            if self.nodes[i].live.is_none() {
                self.boot(i);
            }
        }
        self.log("heal: every node up, the network whole, no more faults".into());
    }

    /// Node `i`'s disk finishes no write for `for_ms` (queued writes wait too).
    fn stall_disk(&mut self, i: usize, for_ms: u64) {
        self.nodes[i].stalled_until_ms = self.now + for_ms;
        let line = format!("node {}'s disk stalls for {for_ms} ms", self.nodes[i].id);
        self.log(line);
    }

    fn leader_index(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.live.as_ref().is_some_and(|l| l.core.status().role == Role::Leader))
    }

    /// Any node, members and the spare alike.
    fn any_node(&mut self) -> NodeId {
        NodeId(1 + self.rng.below(self.nodes.len() as u64))
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
            let stalled = self.now < self.nodes[i].stalled_until_ms;
            let Some(live) = self.nodes[i].live.as_mut() else { return };
            let Some(&(number, ticket, due)) = live.syncs.front() else { break };
            if due > self.now || stalled {
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
                Action::Flush { through } => match live.storage.flush() {
                    Ok(()) => {
                        // Everything queued is durable: its completions are due now (or
                        // when a stalled disk resumes; the real shell would wait here).
                        for s in live.syncs.iter_mut() {
                            if s.0 <= through {
                                s.2 = self.now;
                            }
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Action::SaveHardState(hs) => live.storage.save_hard_state(hs),
                Action::RaiseRepairFloor(floor) => live.storage.raise_repair_floor(floor),
                Action::SaveCommit(commit) => live.storage.raise_commit(commit),
                Action::MoveStart { old, new, change } => {
                    live.storage.move_start(&old, &new, change)
                }
                Action::Reply { id, outcome } => {
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
                Action::PublishStreams(changed) => {
                    for (name, view) in changed {
                        match view {
                            Some(v) => live.streams.insert(name, v),
                            None => live.streams.remove(&name),
                        };
                    }
                    Ok(())
                }
                Action::SaveStreams { at, state } => live.storage.save_streams(at, Some(&state)),
                Action::StreamsMissing { at_least } => {
                    live.streams_missing = Some(at_least);
                    live.storage.save_streams(at_least, None)
                }
                Action::StreamsInstalled => {
                    live.streams_missing = None;
                    Ok(())
                }
                Action::Reach(_) | Action::Unreach(_) | Action::Forget(_) => Ok(()),
            };
            if let Err(e) = stored {
                let line = format!("{e}");
                self.crash(i, &line);
                return;
            }
        }
    }
}
