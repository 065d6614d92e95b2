//! Scripted interaction tests: each file under tests/testdata is a script of commands, each
//! followed by `----` and the output it must produce (every Ready, message and error). Run with
//! `REWRITE=1` to regenerate the expected output after a deliberate change, then read the diff.
//!
//! Commands (ids are node ids; `k=v` options in any order):
//! - `add-nodes N [voters=(1,2,3)] [learners=(4)] [pre-vote=true] [check-quorum=true]
//!   [election=10] [heartbeat=1] [inflight=256] [inflight-bytes=N] [max-msg-bytes=N]
//!   [max-msg-entries=N]
//!   [uncommitted-bytes=N]`: nodes 1..=N (or the next ids), founding members of the group with
//!   the given membership (default: all N voters). `add-node ID`: a node joining later, empty.
//! - `campaign ID`, `tick ID [COUNT]`, `propose ID DATA...`, `read-index ID CTX`,
//!   `transfer-leader ID TO`, `conf-change ID v4 l5 r2 [joint] [auto]`, `leave-joint ID`.
//! - `process-ready [IDS]`: take a Ready, persist it at once, send everything, advance.
//! - `ready [IDS]`: take a Ready and send its `messages`, but hold the writes;
//!   `persist [IDS]`: complete held writes, then send `persisted_messages` and advance.
//! - `deliver-msgs [to=ID] [from=ID] [type=T] [reverse]`: step queued messages into their
//!   recipients; `drop-msgs` with the same filters discards them.
//! - `stabilize [IDS]`: process Readies and deliver messages until nothing moves.
//! - `crash ID` (volatile state and unsent writes lost), `restart ID [commit=N]` (with
//!   `commit`, the durable commit index and applied state go back to N), `partition (1) (2,3)`,
//!   `heal`, `compact ID INDEX`, `report-unreachable ID PEER`, `report-log-start ID PEER ok|fail`,
//!   `status ID`, `log ID`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use raftwal_consensus::{
    ConfChange, ConfStep, Config, HardState, LogIndex, LogStore, MemLog, Membership, Message,
    NodeId, ProgressState, RawNode, Ready, Restored, Role, bootstrap,
};

/// What survives a crash: the store, the hard state, and the applied membership.
struct Durable {
    log: MemLog,
    hard_state: HardState,
    membership: Membership,
    applied: LogIndex,
}

struct Node {
    raw: Option<RawNode<MemLog>>,
    durable: Durable,
    config: Config,
    /// Readies taken by `ready` whose writes are not done yet.
    held: Vec<Ready>,
    /// The membership as of the last applied entry (for `compact`).
    applied_membership: Membership,
}

#[derive(Default)]
struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    queue: Vec<Message>,
    /// Partition groups: messages between different groups are dropped on delivery.
    partition: Option<Vec<BTreeSet<NodeId>>>,
}

/// A caller that saved its commit index and applied state only through `commit` (Raft lets the
/// commit index be volatile): the durable commit and applied index go back there, and the
/// applied membership is what the log's conf changes make of the start's membership up to it.
fn lose_commit_after(durable: &mut Durable, commit: LogIndex) {
    durable.hard_state.commit = durable.hard_state.commit.min(commit);
    durable.applied = durable.applied.min(commit);
    let start = durable.log.start();
    let mut membership = start.membership;
    for entry in durable.log.all() {
        if entry.index > durable.applied {
            break;
        }
        if entry.kind == raftwal_consensus::EntryKind::ConfChange {
            let change = ConfChange::decode(&entry.data).expect("a conf change entry decodes");
            membership = membership.apply(&change).unwrap_or(membership);
        }
    }
    durable.membership = membership;
}

fn opt<'a>(args: &'a [&'a str], key: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

fn parse_ids(list: &str) -> Vec<NodeId> {
    list.trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| NodeId(s.trim().parse().expect("node id")))
        .collect()
}

fn num<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("number")
}

impl Cluster {
    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn raw(&mut self, id: NodeId) -> &mut RawNode<MemLog> {
        self.node(id).raw.as_mut().unwrap_or_else(|| panic!("node {id} is crashed"))
    }

    fn ids_or_all(&self, args: &[&str]) -> Vec<NodeId> {
        let ids: Vec<NodeId> =
            args.iter().filter(|a| !a.contains('=')).map(|a| NodeId(num(a))).collect();
        if ids.is_empty() {
            self.nodes.iter().filter(|(_, n)| n.raw.is_some()).map(|(&id, _)| id).collect()
        } else {
            ids
        }
    }

    fn add_nodes(&mut self, args: &[&str], out: &mut String) {
        let count: u64 = num(args[0]);
        let first = self.nodes.keys().next_back().map_or(1, |id| id.0 + 1);
        let ids: Vec<NodeId> = (first..first + count).map(NodeId).collect();
        let voters = opt(args, "voters").map_or_else(|| ids.clone(), parse_ids);
        let learners = opt(args, "learners").map(parse_ids).unwrap_or_default();
        let (entries, hard_state) = bootstrap(&voters);
        let mut entries = entries;
        // Learners at bootstrap ride along as further membership changes at term 1.
        for (i, &learner) in learners.iter().enumerate() {
            entries.push(raftwal_consensus::Entry {
                term: raftwal_consensus::Term(1),
                index: LogIndex(voters.len() as u64 + i as u64 + 1),
                kind: raftwal_consensus::EntryKind::ConfChange,
                data: Bytes::from(ConfChange::Simple(ConfStep::AddLearner(learner)).encode()),
            });
        }
        let hard_state = HardState { commit: LogIndex(entries.len() as u64), ..hard_state };
        for &id in &ids {
            let mut config = Config::new(id, 0);
            config.pre_vote = opt(args, "pre-vote").is_some_and(|v| v == "true");
            config.check_quorum = opt(args, "check-quorum").is_some_and(|v| v == "true");
            config.election_ticks = opt(args, "election").map_or(10, num);
            config.heartbeat_ticks = opt(args, "heartbeat").map_or(1, num);
            config.inflight_msgs_max = opt(args, "inflight").map_or(256, num);
            config.inflight_bytes_max = opt(args, "inflight-bytes").map_or(32 << 20, num);
            config.msg_bytes_max = opt(args, "max-msg-bytes").map_or(1 << 20, num);
            config.msg_entries_max = opt(args, "max-msg-entries").map_or(8192, num);
            config.uncommitted_bytes_max = opt(args, "uncommitted-bytes").map_or(64 << 20, num);
            let mut log = MemLog::new(empty_start());
            log.append(&entries);
            let durable = Durable {
                log,
                hard_state,
                membership: Membership::default(),
                applied: LogIndex(0),
            };
            self.start_node(id, config, durable, out);
        }
    }

    fn add_node(&mut self, id: NodeId, out: &mut String) {
        let template = self.nodes.values().next().map(|n| n.config.clone());
        let mut config = template.unwrap_or_else(|| Config::new(id, 0));
        config.id = id;
        let durable = Durable {
            log: MemLog::new(empty_start()),
            hard_state: HardState::default(),
            membership: Membership::default(),
            applied: LogIndex(0),
        };
        self.start_node(id, config, durable, out);
    }

    fn start_node(&mut self, id: NodeId, config: Config, durable: Durable, out: &mut String) {
        let restored = Restored {
            hard_state: durable.hard_state,
            membership: durable.membership.clone(),
            applied: durable.applied,
            repair_floor: None,
            tail_cut: false,
        };
        let raw = match RawNode::new(config.clone(), restored, durable.log.clone()) {
            Ok(raw) => Some(raw),
            Err(err) => {
                writeln!(out, "{id}: error: {err}").ok();
                None
            }
        };
        let applied_membership = durable.membership.clone();
        self.nodes.insert(id, Node { raw, durable, config, held: Vec::new(), applied_membership });
    }

    fn take_ready(&mut self, id: NodeId, out: &mut String) -> Option<Ready> {
        let raw = self.node(id).raw.as_mut()?;
        if !raw.has_ready() {
            return None;
        }
        let ready = raw.ready().expect("ready");
        print_ready(id, &ready, out);
        self.queue.extend(ready.messages.iter().cloned());
        Some(ready)
    }

    fn persist(&mut self, id: NodeId, ready: Ready) {
        let node = self.node(id);
        if let Some(start) = &ready.log_start {
            node.durable.log.restart(start.clone());
        }
        node.durable.log.append(&ready.entries);
        if let Some(hs) = ready.hard_state {
            node.durable.hard_state = hs;
        }
        if let Some(membership) = &ready.membership {
            node.applied_membership = membership.clone();
        }
        // The harness applies at once: membership and applied index persist together.
        if let Some(last) = ready.committed_entries.last() {
            node.durable.applied = last.index;
        }
        if let Some(start) = &ready.log_start {
            node.durable.applied = node.durable.applied.max(start.first_index.prev());
        }
        node.durable.membership = node.applied_membership.clone();
        let raw = node.raw.as_mut().expect("live node");
        // The RawNode reads the store the caller wrote: keep its copy in step with ours.
        *raw.store_mut() = node.durable.log.clone();
        raw.advance(ready.number).expect("advance");
        self.queue.extend(ready.persisted_messages);
    }

    fn process_ready(&mut self, ids: &[NodeId], out: &mut String) -> bool {
        let mut any = false;
        for &id in ids {
            // Readies must be written in order: a newer one cannot be persisted past held ones.
            assert!(
                self.node(id).held.is_empty(),
                "node {id} has held Readies: persist them first"
            );
            if let Some(ready) = self.take_ready(id, out) {
                self.persist(id, ready);
                any = true;
            }
        }
        any
    }

    fn deliverable(&self, m: &Message) -> bool {
        let alive = self.nodes.get(&m.to).is_some_and(|n| n.raw.is_some());
        let connected = self
            .partition
            .as_ref()
            .is_none_or(|groups| groups.iter().any(|g| g.contains(&m.from) && g.contains(&m.to)));
        alive && connected
    }

    fn deliver(&mut self, args: &[&str], drop: bool, out: &mut String) -> bool {
        let to = opt(args, "to").map(|v| NodeId(num(v)));
        let from = opt(args, "from").map(|v| NodeId(num(v)));
        let kind = opt(args, "type");
        let selected = |m: &Message| {
            to.is_none_or(|t| m.to == t)
                && from.is_none_or(|f| m.from == f)
                && kind.is_none_or(|k| m.body.name() == k)
        };
        let (mut chosen, rest): (Vec<Message>, Vec<Message>) =
            std::mem::take(&mut self.queue).into_iter().partition(|m| selected(m));
        self.queue = rest;
        if args.contains(&"reverse") {
            chosen.reverse();
        }
        let any = !chosen.is_empty();
        for m in chosen {
            if drop {
                writeln!(out, "dropped: {m}").ok();
                continue;
            }
            if !self.deliverable(&m) {
                writeln!(out, "lost: {m}").ok();
                continue;
            }
            writeln!(out, "{}: receive {m}", m.to).ok();
            let to = m.to;
            if let Err(err) = self.raw(to).step(m) {
                writeln!(out, "{to}: error: {err}").ok();
            }
        }
        any
    }

    fn stabilize(&mut self, ids: &[NodeId], out: &mut String) {
        for _ in 0..1000 {
            let readied = self.process_ready(ids, out);
            let delivered = self.deliver(&[], false, out);
            if !readied && !delivered {
                return;
            }
        }
        panic!("stabilize did not settle in 1000 rounds");
    }

    fn status(&mut self, id: NodeId, out: &mut String) {
        let Some(raw) = self.node(id).raw.as_ref() else {
            writeln!(out, "{id}: crashed").ok();
            return;
        };
        let s = raw.status();
        let leader = s.leader.map_or("none".to_string(), |l| l.to_string());
        writeln!(
            out,
            "{id}: {:?} term={} vote={} leader={leader} commit={} applied={} log={}..{} persisted={} {}",
            s.role,
            s.term,
            s.vote.map_or("none".to_string(), |v| v.to_string()),
            s.commit,
            s.applied,
            s.first_index,
            s.last_index,
            s.persisted_index,
            s.membership
        )
        .ok();
        if let Some(to) = s.transferee {
            writeln!(out, "  transferring leadership to {to}").ok();
        }
        if s.role == Role::Leader {
            for (peer, pr) in &s.progress {
                let state = match pr.state {
                    ProgressState::Probe => "Probe".to_string(),
                    ProgressState::Replicate => "Replicate".to_string(),
                    ProgressState::Snapshot { pending } => format!("Snapshot({pending})"),
                };
                // A full window pauses a Replicate follower: nothing more is sent until an
                // acknowledgement (or a heartbeat answer) frees a slot.
                let full = pr.state == ProgressState::Replicate && pr.inflights.is_full();
                writeln!(
                    out,
                    "  {peer}: {state} match={} next={} inflight={}/{}B{}{}{}",
                    pr.matched,
                    pr.next,
                    pr.inflights.count(),
                    pr.inflights.bytes(),
                    if full { " full" } else { "" },
                    if pr.probe_sent { " probe-sent" } else { "" },
                    if pr.recent_active { " active" } else { "" },
                )
                .ok();
            }
        }
    }

    fn run(&mut self, line: &str) -> String {
        let mut out = String::new();
        let words: Vec<&str> = line.split_whitespace().collect();
        let (cmd, args) = words.split_first().expect("non-empty command");
        let id = || NodeId(num(args[0]));
        let report =
            |out: &mut String, id: NodeId, res: Result<String, raftwal_consensus::Error>| match res
            {
                Ok(s) if s.is_empty() => {}
                Ok(s) => writeln!(out, "{id}: {s}").map_or((), |_| ()),
                Err(err) => writeln!(out, "{id}: error: {err}").map_or((), |_| ()),
            };
        match *cmd {
            "add-nodes" => self.add_nodes(args, &mut out),
            "add-node" => self.add_node(id(), &mut out),
            "campaign" => {
                let res = self.raw(id()).campaign().map(|()| String::new());
                report(&mut out, id(), res);
            }
            "tick" => {
                let count: usize = args.get(1).map_or(1, |c| num(c));
                for _ in 0..count {
                    let res = self.raw(id()).tick().map(|()| String::new());
                    report(&mut out, id(), res);
                }
            }
            "propose" => {
                let data = args[1..].iter().map(|d| Bytes::from(d.to_string())).collect();
                let res = self
                    .raw(id())
                    .propose(data)
                    .map(|r| format!("proposed {}..={}", r.start(), r.end()));
                report(&mut out, id(), res);
            }
            "read-index" => {
                let res = self.raw(id()).read_index(num(args[1])).map(|()| String::new());
                report(&mut out, id(), res);
            }
            "transfer-leader" => {
                let to = NodeId(num(args[1]));
                let res = self.raw(id()).transfer_leader(to).map(|()| String::new());
                report(&mut out, id(), res);
            }
            "conf-change" | "leave-joint" => {
                let change = if *cmd == "leave-joint" {
                    ConfChange::LeaveJoint
                } else {
                    let steps: Vec<ConfStep> = args[1..]
                        .iter()
                        .filter(|a| !matches!(**a, "joint" | "auto"))
                        .map(|a| {
                            let node = NodeId(num(&a[1..]));
                            match &a[..1] {
                                "v" => ConfStep::AddVoter(node),
                                "l" => ConfStep::AddLearner(node),
                                "r" => ConfStep::Remove(node),
                                other => panic!("unknown step {other}"),
                            }
                        })
                        .collect();
                    if args.contains(&"joint") {
                        ConfChange::EnterJoint { steps, auto_leave: args.contains(&"auto") }
                    } else {
                        assert_eq!(steps.len(), 1, "a simple change has one step");
                        ConfChange::Simple(steps[0])
                    }
                };
                let res = self
                    .raw(id())
                    .propose_conf_change(&change)
                    .map(|index| format!("proposed {change} at {index}"));
                report(&mut out, id(), res);
            }
            "process-ready" => {
                let ids = self.ids_or_all(args);
                self.process_ready(&ids, &mut out);
            }
            "ready" => {
                for id in self.ids_or_all(args) {
                    if let Some(ready) = self.take_ready(id, &mut out) {
                        self.node(id).held.push(ready);
                    }
                }
            }
            "persist" => {
                for id in self.ids_or_all(args) {
                    for ready in std::mem::take(&mut self.node(id).held) {
                        writeln!(out, "{id}: persisted ready {}", ready.number).ok();
                        self.persist(id, ready);
                    }
                }
            }
            "deliver-msgs" => {
                self.deliver(args, false, &mut out);
            }
            "drop-msgs" => {
                self.deliver(args, true, &mut out);
            }
            "stabilize" => {
                let ids = self.ids_or_all(args);
                self.stabilize(&ids, &mut out);
            }
            "crash" => {
                let node = self.node(id());
                node.raw = None;
                node.held.clear();
                writeln!(out, "{}: crashed", id()).ok();
            }
            "restart" => {
                let mut node = self.nodes.remove(&id()).expect("node");
                assert!(node.raw.is_none(), "restart needs a crashed node");
                if let Some(commit) = opt(args, "commit") {
                    lose_commit_after(&mut node.durable, LogIndex(num(commit)));
                }
                self.start_node(id(), node.config, node.durable, &mut out);
                self.status(id(), &mut out);
            }
            "partition" => {
                let groups = args.iter().map(|g| parse_ids(g).into_iter().collect()).collect();
                self.partition = Some(groups);
            }
            "heal" => self.partition = None,
            "compact" => {
                let index = LogIndex(num(args[1]));
                let node = self.node(id());
                assert!(index.prev() <= node.durable.applied, "compact only what is applied");
                let membership = node.applied_membership.clone();
                node.durable.log.compact(index, membership);
                let log = node.durable.log.clone();
                if let Some(raw) = node.raw.as_mut() {
                    *raw.store_mut() = log;
                }
                writeln!(out, "{}: log starts at {index}", id()).ok();
            }
            "report-unreachable" => {
                self.raw(id()).report_unreachable(NodeId(num(args[1])));
            }
            "report-log-start" => {
                let ok = args[2] == "ok";
                self.raw(id()).report_log_start(NodeId(num(args[1])), ok);
            }
            "status" => {
                for id in self.ids_or_all(args) {
                    self.status(id, &mut out);
                }
            }
            "log" => {
                let log = &self.node(id()).durable.log;
                writeln!(
                    out,
                    "{}: start={}/{} entries={:?}",
                    id(),
                    log.start().prev_term,
                    log.first_index(),
                    log.all()
                )
                .ok();
            }
            other => panic!("unknown command {other:?}"),
        }
        if out.is_empty() {
            out.push_str("ok\n");
        }
        out
    }
}

fn empty_start() -> raftwal_consensus::LogStart {
    raftwal_consensus::LogStart {
        first_index: LogIndex(1),
        prev_term: raftwal_consensus::Term(0),
        membership: Membership::default(),
    }
}

fn print_ready(id: NodeId, rd: &Ready, out: &mut String) {
    writeln!(out, "{id}: ready {}", rd.number).ok();
    if let Some(soft) = rd.soft_state {
        let leader = soft.leader.map_or("none".to_string(), |l| l.to_string());
        writeln!(out, "  soft: {:?} leader={leader}", soft.role).ok();
    }
    if let Some(hs) = rd.hard_state {
        let vote = hs.vote.map_or("none".to_string(), |v| v.to_string());
        writeln!(out, "  hard: term={} vote={vote} commit={}", hs.term, hs.commit).ok();
    }
    if let Some(start) = &rd.log_start {
        writeln!(
            out,
            "  log-start: first={} prev_term={} {}",
            start.first_index, start.prev_term, start.membership
        )
        .ok();
    }
    if !rd.entries.is_empty() {
        writeln!(out, "  entries: {:?}", rd.entries).ok();
    }
    if !rd.committed_entries.is_empty() {
        writeln!(out, "  committed: {:?}", rd.committed_entries).ok();
    }
    if let Some(m) = &rd.membership {
        writeln!(out, "  membership: {m}").ok();
    }
    for m in &rd.messages {
        writeln!(out, "  send: {m}").ok();
    }
    for m in &rd.persisted_messages {
        writeln!(out, "  send after persist: {m}").ok();
    }
    for rs in &rd.read_states {
        writeln!(out, "  read-state: context={} index={}", rs.context, rs.index).ok();
    }
}

/// Runs one script; in rewrite mode writes the actual output back, else compares.
fn run_script(name: &str) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata").join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut cluster = Cluster::default();
    let mut rewritten = String::new();
    let mut failures = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((lineno, line)) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            rewritten.push_str(line);
            rewritten.push('\n');
            continue;
        }
        let command = line.trim();
        let separator = lines.next().map(|(_, l)| l);
        assert_eq!(separator, Some("----"), "{name}:{}: expected ---- after a command", lineno + 1);
        let mut expected = String::new();
        while let Some((_, l)) = lines.peek() {
            if l.is_empty() {
                break;
            }
            expected.push_str(l);
            expected.push('\n');
            lines.next();
        }
        let actual = cluster.run(command);
        if actual != expected {
            failures.push(format!(
                "{name}:{}: {command}\n--- expected\n{expected}--- actual\n{actual}",
                lineno + 1
            ));
        }
        write!(rewritten, "{command}\n----\n{actual}").ok();
    }
    if rewrite {
        std::fs::write(&path, rewritten.trim_end().to_string() + "\n").expect("rewrite");
        return;
    }
    assert!(
        failures.is_empty(),
        "{} mismatches (REWRITE=1 to regenerate):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run_script(stringify!($name)); })*

        /// A script file that no test names would never run.
        #[test]
        fn every_script_file_is_a_test() {
            let listed: BTreeSet<&str> = [$(stringify!($name)),*].into_iter().collect();
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
            for file in std::fs::read_dir(dir).expect("testdata") {
                let name = file.expect("entry").file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".txt").unwrap_or(&name).to_string();
                assert!(listed.contains(stem.as_str()), "{name} is not in scripts!(...)");
            }
        }
    };
}

scripts!(
    election_basic,
    pre_vote_election,
    vote_refused_stale_log,
    check_quorum_lease,
    check_quorum_step_down,
    pre_vote_rejoin,
    figure_8,
    figure_8_overwrite,
    conflicting_logs_truncated,
    out_of_order_app_resp,
    lost_ack_heartbeat,
    heartbeat_commit,
    fast_backtracking,
    inflight_window_count,
    inflight_window_bytes,
    max_msg_size,
    uncommitted_bytes_cap,
    async_leader_writes,
    crash_unpersisted_ready,
    read_index_leader,
    read_index_follower,
    read_index_new_leader,
    transfer_leader_catch_up,
    transfer_abandoned,
    learner_never_votes,
    learner_promotion,
    joint_auto_leave,
    joint_explicit_leave,
    joint_remove_leader,
    follower_behind_first_index,
    report_unreachable,
    add_node_catch_up,
    campaign_unapplied_conf_change,
    joint_auto_leave_new_leader,
    restart_lagging_commit_conf_change,
    max_msg_entries,
);
