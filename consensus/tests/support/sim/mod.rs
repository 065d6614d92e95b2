//! A seeded simulator of a whole raftwal-consensus cluster, shared by `tests/sim.rs` and
//! `examples/sim.rs`.
//!
//! What it is: 3 or 5 founding nodes (plus spare ids that may join later) driven exactly per the
//! `Ready` contract, over an in-memory network that delays, drops, duplicates and reorders
//! messages, with partitions (one-way too), crashes that lose everything not yet persisted (in
//! half of the runs also the commit index and applied state saved since an earlier point, as a
//! caller that saves them lazily may), and a workload of proposals, read barriers, leadership transfers, membership changes, log
//! compaction and unreachable reports. Safety invariants are checked at every Ready and after
//! every step; after the fault phase the network heals and the cluster must make progress within
//! a bounded number of ticks. What it is not: a model of the WAL or the transport; durability is
//! a `MemLog` written when a Ready's persistence completes.
//!
//! One run is a pure function of its [`Options`]: one seeded generator drives every choice, all
//! maps are ordered, and there is no clock and no thread. A violation names its seed, and
//! rerunning that seed reproduces it exactly.
//!
//! The loop, per step: faults (crash, restart, partition, heal), workload, delivery of the
//! messages due (shuffled), one tick per live node, completion of the persistence that is due,
//! then the per-step checks. After every input to a node its Readies are drained.

#![allow(dead_code)]

mod checks;
mod net;
mod ready;
mod workload;

use std::cell::{Cell, RefCell};
use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use bytes::Bytes;
use raftwal_consensus::{
    ConfChange, ConfStep, Config, Entry, EntryKind, Error, HardState, LogIndex, LogStart, LogStore,
    MemLog, Membership, Message, MessageBody, NodeId, RawNode, Ready, Restored, Role, SplitMix64,
    Term, bootstrap,
};

/// Every node's election timeout in ticks (the jitter draws up to twice that).
pub const ELECTION_TICKS: u32 = 10;
/// The fault phase's default length in steps.
pub const FAULT_STEPS_DEFAULT: u64 = 2000;
/// After healing, a leader must commit a new proposal within this many election timeouts (one
/// tick per step in the liveness phase).
pub const LIVENESS_ELECTION_TIMEOUTS: u64 = 20;
/// The same bound without pre-vote. Candidates that cannot win (a stale log) then still raise the
/// term, and every node that refuses them restarts its election timer (as in etcd raft; Figure 2
/// of the paper restarts it only on a granted vote), so the one electable node can lose the race
/// to time out first many rounds in a row (3 of 16,000 seeds needed more than 20 timeouts).
pub const LIVENESS_ELECTION_TIMEOUTS_NO_PRE_VOTE: u64 = 100;
/// Node ids beyond the founding ones that may join as learners later.
const SPARE_NODES: u64 = 3;
/// Readies and persistence completions one node may produce for one input before the run is
/// declared stuck.
const DRAIN_ITERATIONS_MAX: usize = 10_000;
/// Messages in flight; beyond this, sends are dropped (a full transport queue).
const IN_FLIGHT_MAX: usize = 20_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seeds every choice of the run.
    pub seed: u64,
    /// Founding voters: 3 or 5.
    pub nodes: u64,
    /// Steps of the fault phase, before the liveness phase.
    pub fault_steps: u64,
    /// Print every event and delivered message.
    pub verbose: bool,
    /// A planted bug, to show the checks catch it: restart damaged nodes without their repair
    /// floor, as a node that trusted its cut log would.
    pub ignore_repair_floor: bool,
}

impl Options {
    /// A run with the default fault phase.
    pub fn new(seed: u64, nodes: u64) -> Options {
        Options {
            seed,
            nodes,
            fault_steps: FAULT_STEPS_DEFAULT,
            verbose: false,
            ignore_repair_floor: false,
        }
    }

    /// The command that replays this run, printing every event.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p raftwal-consensus --example sim -- --seeds 1 --start {} \
             --nodes {} --steps {} --verbose",
            self.seed, self.nodes, self.fault_steps
        )
    }
}

/// Counts of what a run did, to show that the faults and the workload happened at all.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub messages: u64,
    pub dropped: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub proposals: u64,
    pub acked: u64,
    pub reads: u64,
    pub reads_answered: u64,
    pub conf_changes: u64,
    pub transfers: u64,
    pub compactions: u64,
    /// Restarts with a log cut by damage.
    pub damaged: u64,
    /// Runs that ended without a leader because a damaged node's lost entries exist on no
    /// other node: it may have acknowledged them, so it can vote for no one without them
    /// (docs/reliability.md, "the only copy"). Not a violation; counted so it stays visible.
    pub only_copy_stalls: u64,
    pub log_restarts: u64,
    pub leaders: u64,
    pub retired: u64,
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub options: Options,
    /// Simulated steps, both phases.
    pub steps: u64,
    /// The first violation, naming the seed and step.
    pub violation: Option<String>,
    pub stats: Stats,
}

/// Runs one seed. A panic inside consensus (or the simulator) is reported as a violation.
pub fn run(options: &Options) -> Report {
    install_panic_hook();
    let mut sim = Sim::new(options.clone());
    IN_SIM.with(|flag| flag.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| sim.run()));
    IN_SIM.with(|flag| flag.set(false));
    let violation = match result {
        Ok(Ok(())) => None,
        Ok(Err(violation)) => Some(violation),
        Err(_) => {
            let what = PANIC_MESSAGE
                .with(|message| message.borrow_mut().take())
                .unwrap_or_else(|| "panic without a message".to_string());
            Some(sim.fail(format!("panic: {}", what.replace('\n', " "))))
        }
    };
    if let Some(violation) = &violation {
        sim.trace(format_args!("VIOLATION {violation}"));
    }
    Report { options: options.clone(), steps: sim.now + 1, violation, stats: sim.stats }
}

thread_local! {
    static IN_SIM: Cell<bool> = const { Cell::new(false) };
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside a run are recorded (message and location) instead of printed; any other panic
/// goes to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_SIM.with(Cell::get) {
                PANIC_MESSAGE.with(|message| *message.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// The simulator's only source of randomness: the core's own [`SplitMix64`], with the draws a
/// workload needs on top.
#[derive(Clone, Debug)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below(0)");
        self.0.below(bound)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `ppm` in a million.
    pub fn chance(&mut self, ppm: u64) -> bool {
        self.below(1_000_000) < ppm
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        Some(items[self.below(items.len() as u64) as usize].clone())
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The fault rates, delays and consensus limits of one run, drawn from its seed.
#[derive(Clone, Debug)]
struct Params {
    delay_max: u64,
    long_delay_ppm: u64,
    drop_ppm: u64,
    dup_ppm: u64,
    persist_delay_max: u64,
    /// Apply committed entries when the Ready is taken (allowed: they are durable already)
    /// rather than once its persistence completes.
    apply_early: bool,
    tick_skip_ppm: u64,
    crash_ppm: u64,
    partition_ppm: u64,
    heal_ppm: u64,
    propose_ppm: u64,
    read_ppm: u64,
    transfer_ppm: u64,
    conf_ppm: u64,
    compact_ppm: u64,
    unreachable_ppm: u64,
    campaign_ppm: u64,
    heartbeat_ticks: u32,
    inflight_msgs_max: usize,
    msg_bytes_max: u64,
    uncommitted_bytes_max: u64,
    apply_bytes_max: u64,
    pre_vote: bool,
    check_quorum: bool,
}

impl Params {
    fn draw(rng: &mut Rng) -> Params {
        Params {
            delay_max: if rng.chance(200_000) { rng.between(5, 12) } else { rng.between(1, 4) },
            long_delay_ppm: rng.between(0, 20_000),
            drop_ppm: if rng.chance(200_000) {
                rng.between(150_000, 400_000)
            } else {
                rng.between(0, 150_000)
            },
            dup_ppm: rng.between(0, 80_000),
            persist_delay_max: if rng.chance(200_000) {
                rng.between(4, 10)
            } else {
                rng.between(0, 3)
            },
            apply_early: rng.chance(500_000),
            tick_skip_ppm: rng.between(0, 150_000),
            crash_ppm: rng.between(500, 10_000),
            partition_ppm: rng.between(1_000, 6_000),
            heal_ppm: rng.between(5_000, 20_000),
            propose_ppm: rng.between(100_000, 400_000),
            read_ppm: rng.between(10_000, 80_000),
            transfer_ppm: rng.between(0, 20_000),
            conf_ppm: rng.between(2_000, 20_000),
            compact_ppm: rng.between(2_000, 30_000),
            unreachable_ppm: rng.between(0, 10_000),
            campaign_ppm: rng.between(0, 5_000),
            heartbeat_ticks: rng.between(1, 3) as u32,
            inflight_msgs_max: rng.between(2, 8) as usize,
            // Small enough to split appends, large enough that a healed cluster can catch up on the
            // backlog within the liveness bound (one entry per message cannot).
            msg_bytes_max: rng.between(48, 400),
            uncommitted_bytes_max: rng.between(100, 4_000),
            apply_bytes_max: rng.between(10, 500),
            pre_vote: rng.chance(750_000),
            check_quorum: rng.chance(750_000),
        }
    }
}

/// One Ready whose persistence has not completed yet.
struct Pending {
    number: u64,
    persist_at: u64,
    log_start: Option<LogStart>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
    persisted_messages: Vec<Message>,
    /// A repair floor a leader raised, persisted with the hard state.
    repair_floor: Option<(LogIndex, Term)>,
    /// Committed entries still to apply (when applying after persistence).
    committed_entries: Vec<Entry>,
    /// The Ready's membership, checked when its entries or log start are applied.
    membership: Option<Membership>,
    /// Whether `membership` is still to be checked here.
    check_membership: bool,
}

/// A node: its durable state (which survives a crash) and its volatile state (which does not).
struct Node {
    id: NodeId,
    /// `None` while down or retired.
    raw: Option<RawNode<MemLog>>,
    /// The durable log while the node is down (while up, it is `raw`'s store).
    down_log: Option<MemLog>,
    incarnation: u64,
    retired: bool,
    /// When a node found removed is stopped for good.
    retire_at: Option<u64>,
    ever_member: bool,
    restart_at: Option<u64>,
    // Durable.
    durable_hs: HardState,
    /// The (index, term) its log reached before damage cut it, until the log is back there.
    repair_floor: Option<(LogIndex, Term)>,
    /// The apply record: the last applied index and the membership as of it.
    applied: LogIndex,
    membership: Membership,
    /// `(index, membership as of index)` each time it changed, oldest first.
    memberships: Vec<(LogIndex, Membership)>,
    /// The term of each entry this node applied, by index; `None` for what it skipped (a log
    /// restart) or has not applied.
    history: Vec<Option<Term>>,
    // Volatile.
    /// The log as handed out: the store plus every Ready taken (persisted or not).
    view: MemLog,
    pending: VecDeque<Pending>,
    persist_at_last: u64,
    /// The last hard state handed out (not necessarily durable).
    handed_hs: HardState,
    role: Role,
    last_commit: LogIndex,
    /// This incarnation's proposals not yet applied: index -> (term, payload).
    proposals: BTreeMap<LogIndex, (Term, Bytes)>,
}

struct Flight {
    msg: Message,
    from_incarnation: u64,
    /// Lost by the network; still delivered "as lost" so the sender learns of a lost log start.
    lost: bool,
}

#[derive(Clone)]
struct Committed {
    term: Term,
    kind: EntryKind,
    data: Bytes,
}

/// An acknowledged proposal: the leader that proposed it handed it out as committed.
#[derive(Clone, Debug)]
struct Acked {
    index: LogIndex,
    term: Term,
    data: Bytes,
}

type Check = Result<(), String>;

struct Sim {
    opts: Options,
    rng: Rng,
    params: Params,
    /// Raft lets the commit index be volatile: in some runs a crash loses the commit index and
    /// applied state saved since an earlier point, as a caller that saves them lazily would. Its
    /// own generator, so the draws of the main one stay what they were for every seed.
    commit_rng: Rng,
    lose_commit_ppm: u64,
    /// In some runs a crash also damages the node's log: a suffix is cut, as a salvaged WAL
    /// cuts it, and the node restarts with a repair floor. Its own generator, like
    /// `commit_rng`.
    damage_rng: Rng,
    damage_ppm: u64,
    now: u64,
    liveness: bool,
    nodes: Vec<Node>,
    net: BTreeMap<(u64, u64), Flight>,
    net_seq: u64,
    /// The last delivery step per link in the liveness phase.
    link_last: BTreeMap<(NodeId, NodeId), u64>,
    /// Cut directed links (from, to).
    cuts: BTreeSet<(NodeId, NodeId)>,
    /// Every (term, leader) ever seen.
    leaders: BTreeMap<Term, NodeId>,
    /// Every entry ever handed out, by (index, term): the term before it and its content.
    entry_ids: BTreeMap<(LogIndex, Term), (Term, EntryKind, Bytes)>,
    /// Every entry any node applied, by index.
    committed: Vec<Option<Committed>>,
    /// The membership as of the highest index any node applied.
    known_membership: (LogIndex, Membership),
    max_known_commit: LogIndex,
    acked: Vec<Acked>,
    /// Read barriers asked: context -> (node, the least index the answer may carry).
    reads: BTreeMap<u64, (NodeId, LogIndex)>,
    next_context: u64,
    next_proposal: u64,
    live_attempt: Option<(usize, u64, LogIndex)>,
    live_acked: Option<LogIndex>,
    /// Steps after the commit deadline for every live voter to apply the new proposal.
    catch_up_steps: u64,
    stats: Stats,
}

fn start0() -> LogStart {
    LogStart { first_index: LogIndex(1), prev_term: Term(0), membership: Membership::default() }
}

impl Sim {
    fn new(opts: Options) -> Sim {
        assert!(opts.nodes == 3 || opts.nodes == 5, "3 or 5 nodes");
        let mut rng = Rng::new(opts.seed ^ 0x005e_ed0f_5171_u64.rotate_left(opts.nodes as u32));
        let params = Params::draw(&mut rng);
        let mut commit_rng = Rng::new(opts.seed ^ 0xc0aa_17ed_u64.rotate_left(opts.nodes as u32));
        let lose_commit_ppm = if commit_rng.chance(500_000) { 500_000 } else { 0 };
        let mut damage_rng = Rng::new(opts.seed ^ 0x0da3_a9e5_u64.rotate_left(opts.nodes as u32));
        let damage_ppm = if damage_rng.chance(500_000) { 300_000 } else { 0 };
        let mut sim = Sim {
            opts,
            rng,
            params,
            commit_rng,
            lose_commit_ppm,
            damage_rng,
            damage_ppm,
            now: 0,
            liveness: false,
            nodes: Vec::new(),
            net: BTreeMap::new(),
            net_seq: 0,
            link_last: BTreeMap::new(),
            cuts: BTreeSet::new(),
            leaders: BTreeMap::new(),
            entry_ids: BTreeMap::new(),
            committed: Vec::new(),
            known_membership: (LogIndex(0), Membership::default()),
            max_known_commit: LogIndex(0),
            acked: Vec::new(),
            reads: BTreeMap::new(),
            next_context: 0,
            next_proposal: 0,
            live_attempt: None,
            live_acked: None,
            catch_up_steps: 0,
            stats: Stats::default(),
        };
        let voters: Vec<NodeId> = (1..=sim.opts.nodes).map(NodeId).collect();
        for id in 1..=sim.opts.nodes + SPARE_NODES {
            let mut log = MemLog::new(start0());
            let mut hard_state = HardState::default();
            if id <= sim.opts.nodes {
                let (entries, hs) = bootstrap(&voters);
                log.append(&entries);
                hard_state = hs;
            }
            sim.nodes.push(Node {
                id: NodeId(id),
                raw: None,
                down_log: Some(log),
                incarnation: 0,
                retired: false,
                retire_at: None,
                ever_member: false,
                restart_at: None,
                durable_hs: hard_state,
                repair_floor: None,
                applied: LogIndex(0),
                membership: Membership::default(),
                memberships: vec![(LogIndex(0), Membership::default())],
                history: Vec::new(),
                view: MemLog::new(start0()),
                pending: VecDeque::new(),
                persist_at_last: 0,
                handed_hs: hard_state,
                role: Role::Follower,
                last_commit: LogIndex(0),
                proposals: BTreeMap::new(),
            });
        }
        sim
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!(
            "seed {} ({} nodes, {} fault steps) step {}: {what}",
            self.opts.seed, self.opts.nodes, self.opts.fault_steps, self.now
        )
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.opts.verbose {
            println!("[{:>5}] {what}", self.now);
        }
    }

    fn run(&mut self) -> Check {
        self.trace(format_args!("params {:?}", self.params));
        for i in 0..self.nodes.len() {
            self.start_node(i)?;
        }
        let timeouts = if self.params.pre_vote {
            LIVENESS_ELECTION_TIMEOUTS
        } else {
            LIVENESS_ELECTION_TIMEOUTS_NO_PRE_VOTE
        };
        let bound = timeouts * u64::from(ELECTION_TICKS);
        let mut commit_deadline = self.opts.fault_steps + bound;
        let mut step = 0;
        loop {
            self.now = step;
            step += 1;
            if self.now == self.opts.fault_steps {
                self.enter_liveness()?;
            }
            if self.liveness
                && self.live_acked.is_none()
                && self.now < commit_deadline
                && self.only_copy_stall().is_some()
            {
                // While a repairing voter's floor is above every other log, the others must
                // elect a leader without it, nearly unanimously (split votes are likely): the
                // bound runs from when the floor stops binding (up to three bounds more; a
                // floor that binds for good ends the run as a stall on the only copy).
                let latest = self.opts.fault_steps + 4 * bound;
                commit_deadline = commit_deadline.max(self.now + bound).min(latest);
            }
            let stalled = (self.now == commit_deadline && self.live_acked.is_none())
                || self.now >= commit_deadline + self.catch_up_steps;
            if stalled && let Some(why) = self.only_copy_stall() {
                self.stats.only_copy_stalls += 1;
                self.trace(format_args!("stalled on the only copy: {why}"));
                return Ok(());
            }
            if self.now == commit_deadline && self.live_acked.is_none() {
                return Err(self.fail(format!(
                    "no leader committed a new proposal within {timeouts} election \
                     timeouts after healing\n{}",
                    self.describe()
                )));
            }
            if self.now >= commit_deadline + self.catch_up_steps {
                return Err(self.fail(format!(
                    "the new proposal committed at {:?} was not applied on every live voter \
                     within {timeouts} election timeouts and {} catch-up \
                     steps after healing\n{}",
                    self.live_acked,
                    self.catch_up_steps,
                    self.describe()
                )));
            }
            if !self.liveness {
                self.faults()?;
                self.workload()?;
            } else {
                self.liveness_workload()?;
            }
            self.restarts()?;
            self.deliver()?;
            self.ticks()?;
            self.persist_due()?;
            self.check_step()?;
            self.retire_removed();
            if self.liveness && self.liveness_done()? {
                return self.final_checks();
            }
        }
    }

    // ----- node lifecycle -----

    fn node_config(&mut self, i: usize) -> Config {
        let node = &self.nodes[i];
        let mut cfg = Config::new(node.id, self.rng.next_u64());
        cfg.election_ticks = ELECTION_TICKS;
        cfg.heartbeat_ticks = self.params.heartbeat_ticks;
        cfg.pre_vote = self.params.pre_vote;
        cfg.check_quorum = self.params.check_quorum;
        cfg.inflight_msgs_max = self.params.inflight_msgs_max;
        cfg.msg_bytes_max = self.params.msg_bytes_max;
        cfg.uncommitted_bytes_max = self.params.uncommitted_bytes_max;
        cfg.apply_bytes_max = self.params.apply_bytes_max;
        cfg
    }

    fn start_node(&mut self, i: usize) -> Check {
        let cfg = self.node_config(i);
        let node = &mut self.nodes[i];
        let log = node.down_log.take().expect("a down node keeps its durable log");
        node.restart_at = None;
        node.view = log.clone();
        node.handed_hs = node.durable_hs;
        node.role = Role::Follower;
        node.pending.clear();
        node.persist_at_last = 0;
        node.proposals.clear();
        let restored = Restored {
            hard_state: node.durable_hs,
            membership: node.membership.clone(),
            applied: node.applied,
            repair_floor: if self.opts.ignore_repair_floor { None } else { node.repair_floor },
            tail_cut: false,
        };
        let raw = match RawNode::new(cfg, restored.clone(), log) {
            Ok(raw) => raw,
            Err(err) => {
                return Err(self.fail(format!(
                    "node {} refused its own persisted state {restored:?}: {err}",
                    self.nodes[i].id
                )));
            }
        };
        let node = &mut self.nodes[i];
        node.last_commit = raw.status().commit;
        node.raw = Some(raw);
        let (id, incarnation) = (node.id, node.incarnation);
        self.trace(format_args!("start node {id} incarnation {incarnation}"));
        self.drain(i)
    }

    fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(raw) = node.raw.take() else { return };
        node.down_log = Some(raw.store().clone());
        node.pending.clear();
        node.proposals.clear();
        node.incarnation += 1;
        node.role = Role::Follower;
        self.stats.crashes += 1;
        if self.commit_rng.chance(self.lose_commit_ppm) {
            self.lose_commit(i);
        }
        self.settle_repair_floor(i);
        if self.damage_rng.chance(self.damage_ppm) {
            self.damage(i);
        }
        let delay = self.rng.between(1, 80);
        let node = &mut self.nodes[i];
        node.restart_at = Some(self.now + delay);
        let id = node.id;
        self.trace(format_args!("crash node {id} (restart in {delay})"));
    }

    /// Takes node `i`'s durable commit index (and its applied state, if later) back to a point
    /// at or after its log's start, with the membership it had applied there.
    fn lose_commit(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = node.down_log.as_ref().expect("a crashed node keeps its durable log");
        let floor = log.first_index().prev();
        let commit = node.durable_hs.commit.max(node.applied);
        if commit <= floor {
            return;
        }
        let to = LogIndex(self.commit_rng.between(floor.0, commit.0));
        if self.commit_back_to(i, to) {
            let id = self.nodes[i].id;
            self.trace(format_args!("node {id} lost its commit index after {to}"));
        }
    }

    /// Lowers node `i`'s durable commit index and applied state to at most `to`; false (and
    /// nothing changed) when it has no applied membership to go back to.
    fn commit_back_to(&mut self, i: usize, to: LogIndex) -> bool {
        let node = &mut self.nodes[i];
        if to < node.applied {
            let Some(at) = node.memberships.iter().rposition(|(index, _)| *index <= to) else {
                return false;
            };
            node.memberships.truncate(at + 1);
            node.membership = node.memberships[at].1.clone();
            node.applied = to;
        }
        node.durable_hs.commit = node.durable_hs.commit.min(to);
        true
    }

    /// Forgets node `i`'s repair floor once its durable log is back at it, as the node does
    /// when it starts.
    fn settle_repair_floor(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let (Some((index, term)), Some(log)) = (node.repair_floor, node.down_log.as_ref()) else {
            return;
        };
        let last = log.last_index();
        if log.term(last).is_ok_and(|t| (t, last) >= (term, index)) {
            node.repair_floor = None;
        }
    }

    /// Damage found at restart: node `i`'s durable log loses every entry from a random index
    /// on (as a salvaged WAL cuts it), its commit index and applied state go back below the
    /// cut, and it keeps the (index, term) its log reached as its repair floor.
    fn damage(&mut self, i: usize) {
        // One node at a time: damage on a majority before it is repaired may take the only
        // copies of committed entries, which no protocol can give back.
        let repairing = |n: &Node| match &n.raw {
            Some(raw) => raw.status().repair_floor.is_some(),
            None => n.repair_floor.is_some(),
        };
        if self.nodes.iter().enumerate().any(|(j, n)| j != i && repairing(n)) {
            return;
        }
        let node = &self.nodes[i];
        let log = node.down_log.as_ref().expect("a crashed node keeps its durable log");
        let (first, last) = (log.first_index(), log.last_index());
        if last < first {
            return;
        }
        let Ok(last_term) = log.term(last) else { return };
        let from = LogIndex(self.damage_rng.between(first.0, last.0));
        if !self.commit_back_to(i, from.prev()) {
            return;
        }
        let node = &mut self.nodes[i];
        node.down_log.as_mut().expect("checked above").truncate(from);
        let floor = match node.repair_floor {
            Some((index, term)) if (term, index) > (last_term, last) => (index, term),
            _ => (last, last_term),
        };
        node.repair_floor = Some(floor);
        self.stats.damaged += 1;
        let id = node.id;
        self.trace(format_args!(
            "node {id} restarts damaged: log cut from {from}, repair floor {floor:?}"
        ));
    }

    /// A live node whose repair floor is above every other live node's log: the entries it
    /// lost are nowhere else, and it must not vote for a log without them.
    fn only_copy_stall(&self) -> Option<String> {
        let last = |raw: &RawNode<MemLog>| {
            let s = raw.status();
            (raw.store().term(s.last_index).unwrap_or(Term(0)), s.last_index)
        };
        self.nodes.iter().filter(|n| !n.retired).find_map(|n| {
            let raw = n.raw.as_ref()?;
            let (index, term) = raw.status().repair_floor?;
            let others_below = self
                .nodes
                .iter()
                .filter(|o| o.id != n.id && !o.retired)
                .filter_map(|o| o.raw.as_ref())
                .all(|o| last(o) < (term, index));
            others_below.then(|| format!("node {} floor {term}/{index}", n.id))
        })
    }

    fn restarts(&mut self) -> Check {
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if !node.retired && node.raw.is_none() && node.restart_at.is_some_and(|t| t <= self.now)
            {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    /// Stops, for good, nodes the committed membership no longer has (ids are never reused).
    fn retire_removed(&mut self) {
        let members = self.known_membership.1.members();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if members.contains(&node.id) {
                node.ever_member = true;
            } else if node.ever_member && !node.retired {
                // A removed node may not know it: let it run a while (it must not disrupt the
                // group), then stop it for good. None run into the liveness phase, where a
                // removed node without pre-vote or check-quorum could keep raising terms.
                let retire_at = match node.retire_at {
                    Some(at) => at,
                    None => *node.retire_at.insert(self.now + self.rng.below(300)),
                };
                if retire_at > self.now && !self.liveness {
                    continue;
                }
                node.retired = true;
                node.raw = None;
                node.pending.clear();
                node.restart_at = None;
                self.stats.retired += 1;
                let id = node.id;
                self.trace(format_args!("retire node {id}: removed from the group"));
            }
        }
    }

    fn up(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].raw.is_some()).collect()
    }

    fn leaders_up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].raw.is_some() && self.nodes[i].role == Role::Leader)
            .collect()
    }

    fn raw(&mut self, i: usize) -> &mut RawNode<MemLog> {
        self.nodes[i].raw.as_mut().expect("the caller checked the node is up")
    }

    // ----- the Ready loop -----

    fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "known membership {:?}", self.known_membership);
        for node in &self.nodes {
            let _ = write!(out, "node {}: ", node.id);
            match &node.raw {
                None if node.retired => {
                    let _ = writeln!(out, "retired");
                }
                None => {
                    let _ = writeln!(out, "down");
                }
                Some(raw) => {
                    let s = raw.status();
                    let _ = writeln!(
                        out,
                        "{:?} term {} leader {:?} commit {} applied {} log {}..={} persisted {} \
                         {} progress {:?}",
                        s.role,
                        s.term,
                        s.leader,
                        s.commit,
                        s.applied,
                        s.first_index,
                        s.last_index,
                        s.persisted_index,
                        s.membership,
                        s.progress
                            .iter()
                            .map(|(id, p)| (id.0, p.matched.0, p.next.0, p.state))
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
        out
    }
}
