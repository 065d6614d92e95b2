//! Repair from peers, one rule at a time, on a single node driven by hand: a node whose log
//! damage cut below its repair floor neither campaigns nor votes for a log behind the floor,
//! takes a peer's repair answer only where it continues its log, and never commits entries
//! that only a repair answer gave it (a leader's heartbeat commits up to what it believes the
//! node holds, which may predate the damage).

use bytes::Bytes;
use raftwal_consensus::{
    Config, Entry, EntryKind, GroupId, LogIndex, LogStart, MemLog, Membership, Message,
    MessageBody, NodeId, RawNode, Restored, Role, Term, bootstrap,
};

fn entry(index: u64, term: u64, data: &'static str) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: Bytes::from_static(data.as_bytes()),
    }
}

/// Node 2 of (1, 2, 3): the founding entries 1-3, then `more`; term 2; floor `floor`.
fn repairing(more: &[Entry], floor: Option<(u64, u64)>) -> RawNode<MemLog> {
    node_2(more, |r| r.repair_floor = floor.map(|(i, t)| (LogIndex(i), Term(t))))
}

/// Node 2 of (1, 2, 3) in term 2 with the founding entries 1-3 and `more`, restored as `tweak`
/// says, its first Readies settled.
fn node_2(more: &[Entry], tweak: impl FnOnce(&mut Restored)) -> RawNode<MemLog> {
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let (entries, mut hard_state) = bootstrap(&voters);
    let mut log = MemLog::new(LogStart {
        first_index: LogIndex(1),
        prev_term: Term(0),
        membership: Membership::default(),
    });
    log.append(&entries);
    log.append(more);
    hard_state.term = Term(2);
    let mut config = Config::new(NodeId(2), 11);
    config.pre_vote = false;
    config.check_quorum = false;
    let mut restored = Restored { hard_state, ..Restored::default() };
    tweak(&mut restored);
    let mut raw = RawNode::new(config, restored, log).expect("valid node");
    settle(&mut raw);
    raw
}

/// Persists and applies every Ready; returns the messages sent.
fn settle(raw: &mut RawNode<MemLog>) -> Vec<Message> {
    let mut sent = Vec::new();
    while raw.has_ready() {
        let ready = raw.ready().expect("ready");
        if let Some(start) = ready.log_start.clone() {
            raw.store_mut().restart(start);
        }
        raw.store_mut().append(&ready.entries);
        sent.extend(ready.messages);
        sent.extend(ready.persisted_messages);
        raw.advance(ready.number).expect("advance");
    }
    sent
}

/// Steps `m` into the node and settles it; returns the messages sent.
fn deliver(raw: &mut RawNode<MemLog>, m: Message) -> Vec<Message> {
    raw.step(m).expect("step");
    settle(raw)
}

fn repair_req(last_index: u64, last_term: u64) -> MessageBody {
    MessageBody::RepairReq {
        last_index: LogIndex(last_index),
        last_term: Term(last_term),
        floor_index: LogIndex(0),
        floor_term: Term(0),
    }
}

fn msg(from: u64, term: u64, body: MessageBody) -> Message {
    Message { group: GroupId(1), from: NodeId(from), to: NodeId(2), term: Term(term), body }
}

fn tick_until_timeout(raw: &mut RawNode<MemLog>) -> Vec<Message> {
    let mut sent = Vec::new();
    for _ in 0..100 {
        raw.tick().expect("tick");
        sent.extend(settle(raw));
    }
    sent
}

#[test]
fn a_node_below_its_floor_never_campaigns_and_asks_its_peers_instead() {
    let mut raw = repairing(&[], Some((10, 2)));
    let sent = tick_until_timeout(&mut raw);
    assert_eq!(raw.status().role, Role::Follower, "no campaign below the floor");
    assert!(sent.iter().all(|m| !matches!(m.body, MessageBody::Vote { .. })));
    assert!(
        sent.iter().any(|m| matches!(m.body, MessageBody::RepairReq { last_index, .. } if last_index == LogIndex(3))),
        "asks every member for what follows its log: {sent:?}"
    );
}

#[test]
fn a_node_below_its_floor_votes_only_for_a_log_at_or_above_it() {
    let mut raw = repairing(&[], Some((10, 2)));
    let vote = |index: u64, term: u64| MessageBody::Vote {
        last_index: LogIndex(index),
        last_term: Term(term),
        transfer: false,
    };
    // Up to date against its cut log (2/9 > 1/3), behind its floor (2/10): refused.
    let sent = deliver(&mut raw, msg(3, 3, vote(9, 2)));
    assert!(sent.iter().any(|m| matches!(m.body, MessageBody::VoteResp { reject: true })));
    // At the floor: granted.
    let sent = deliver(&mut raw, msg(1, 4, vote(10, 2)));
    assert!(sent.iter().any(|m| matches!(m.body, MessageBody::VoteResp { reject: false })));
}

#[test]
fn entries_from_a_repair_answer_are_never_committed_by_a_heartbeat_alone() {
    let mut raw = repairing(&[], Some((10, 2)));
    // A stale peer's entries that continue our log (never committed anywhere).
    let stale = vec![entry(4, 2, "s4"), entry(5, 2, "s5"), entry(6, 2, "s6")];
    let body =
        MessageBody::RepairResp { prev_index: LogIndex(3), prev_term: Term(1), entries: stale };
    deliver(&mut raw, msg(3, 2, body));
    assert_eq!(raw.status().last_index, LogIndex(6), "taken: they continue our log");
    // The leader, whose record of our log predates the damage, says commit 6.
    let heartbeat = MessageBody::Heartbeat { commit: LogIndex(6), read: None };
    deliver(&mut raw, msg(1, 2, heartbeat.clone()));
    assert_eq!(raw.status().commit, LogIndex(3), "unconfirmed entries are not committed");
    // The leader's append confirms through 5 (and replaces nothing: the same entries).
    let app = MessageBody::App {
        prev_index: LogIndex(3),
        prev_term: Term(1),
        entries: vec![entry(4, 2, "s4"), entry(5, 2, "s5")],
        commit: LogIndex(5),
    };
    deliver(&mut raw, msg(1, 2, app));
    deliver(&mut raw, msg(1, 2, heartbeat.clone()));
    assert_eq!(raw.status().commit, LogIndex(5), "confirmed through 5, not 6");
    let app = MessageBody::App {
        prev_index: LogIndex(5),
        prev_term: Term(2),
        entries: vec![entry(6, 2, "s6")],
        commit: LogIndex(5),
    };
    deliver(&mut raw, msg(1, 2, app));
    deliver(&mut raw, msg(1, 2, heartbeat));
    assert_eq!(raw.status().commit, LogIndex(6), "all confirmed");
}

#[test]
fn a_repair_answer_that_does_not_continue_the_log_or_comes_with_a_leader_is_ignored() {
    let mut raw = repairing(&[entry(4, 2, "a")], Some((10, 2)));
    // Does not start at our last entry (4): ignored, even though it overlaps consistently.
    let body = MessageBody::RepairResp {
        prev_index: LogIndex(3),
        prev_term: Term(1),
        entries: vec![entry(4, 2, "b"), entry(5, 2, "c")],
    };
    deliver(&mut raw, msg(3, 2, body));
    assert_eq!(raw.status().last_index, LogIndex(4));
    // With a leader known, its appends repair us: a peer's answer is ignored.
    deliver(&mut raw, msg(1, 2, MessageBody::Heartbeat { commit: LogIndex(3), read: None }));
    let body = MessageBody::RepairResp {
        prev_index: LogIndex(4),
        prev_term: Term(2),
        entries: vec![entry(5, 2, "c")],
    };
    deliver(&mut raw, msg(3, 2, body));
    assert_eq!(raw.status().last_index, LogIndex(4));
}

/// Node 2 elected leader of (1, 2, 3) in term 3, with entries to 6.
fn leading() -> RawNode<MemLog> {
    let mut raw = repairing(&[entry(4, 2, "x"), entry(5, 2, "y")], None);
    raw.campaign().expect("campaign");
    settle(&mut raw);
    deliver(&mut raw, msg(1, 3, MessageBody::VoteResp { reject: false }));
    assert_eq!(raw.status().role, Role::Leader);
    raw
}

#[test]
fn a_leader_told_of_a_lost_log_probes_again_from_it() {
    // Node 2 leads (1, 2, 3) with entries to 6; node 3 acknowledged 6, then says its log ends
    // at 3 (damage cut it): the leader's next append starts after 3.
    let mut raw = leading();
    let last = raw.status().last_index;
    deliver(&mut raw, msg(3, 3, MessageBody::AppResp { index: last, reject: None }));
    assert_eq!(raw.status().progress[&NodeId(3)].matched, last);
    let req = repair_req(3, 1);
    let sent = deliver(&mut raw, msg(3, 3, req));
    assert_eq!(raw.status().progress[&NodeId(3)].matched, LogIndex(3));
    assert!(
        sent.iter().any(|m| m.to == NodeId(3)
            && matches!(m.body, MessageBody::App { prev_index, .. } if prev_index == LogIndex(3))),
        "appends again from 4: {sent:?}"
    );
}

// ----- a tail cut by recovery (a torn write, or damage that looks like one) -----

/// Node 2 restarted after recovery cut its log's tail: the founding entries 1-3 and `more`.
fn tail_cut(more: &[Entry]) -> RawNode<MemLog> {
    node_2(more, |r| r.tail_cut = true)
}

/// Persists every Ready, keeping the last repair floor one handed out; returns the messages.
fn settle_keeping_floor(
    raw: &mut RawNode<MemLog>,
    floor: &mut Option<(LogIndex, Term)>,
) -> Vec<Message> {
    let mut sent = Vec::new();
    while raw.has_ready() {
        let ready = raw.ready().expect("ready");
        raw.store_mut().append(&ready.entries);
        if ready.repair_floor.is_some() {
            *floor = ready.repair_floor;
        }
        sent.extend(ready.messages);
        sent.extend(ready.persisted_messages);
        raw.advance(ready.number).expect("advance");
    }
    sent
}

fn vote(index: u64, term: u64) -> MessageBody {
    MessageBody::Vote { last_index: LogIndex(index), last_term: Term(term), transfer: false }
}

#[test]
fn after_a_tail_cut_a_node_holds_elections_until_a_leader_can_tell_it_what_it_acknowledged() {
    let mut raw = tail_cut(&[entry(4, 2, "a")]);
    // A candidate as up to date as the cut log, in a newer term: ignored (not even the term
    // moves, which would cut us off from a leader that is still alive).
    let sent = deliver(&mut raw, msg(3, 3, vote(4, 2)));
    assert!(sent.is_empty(), "held: {sent:?}");
    assert_eq!(raw.status().term, Term(2));
    // No campaign of its own within the hold either.
    for _ in 0..5 {
        raw.tick().expect("tick");
        let sent = settle(&mut raw);
        assert!(sent.iter().all(|m| !matches!(m.body, MessageBody::Vote { .. })), "{sent:?}");
    }
    // The first leader it hears from learns where its log ends...
    let sent =
        deliver(&mut raw, msg(1, 2, MessageBody::Heartbeat { commit: LogIndex(3), read: None }));
    assert!(
        sent.iter().any(|m| m.to == NodeId(1)
            && matches!(m.body, MessageBody::RepairReq { last_index, .. } if last_index == LogIndex(4))),
        "tells the leader where its log ends: {sent:?}"
    );
    // ... and answers with what it acknowledged, which becomes a durable floor. Only the
    // leader's word counts.
    let mut floor = None;
    raw.step(msg(3, 2, MessageBody::AckedThrough { index: LogIndex(9), term: Term(2) }))
        .expect("step");
    settle_keeping_floor(&mut raw, &mut floor);
    assert_eq!(floor, None, "a follower cannot raise the floor");
    raw.step(msg(1, 2, MessageBody::AckedThrough { index: LogIndex(7), term: Term(2) }))
        .expect("step");
    settle_keeping_floor(&mut raw, &mut floor);
    assert_eq!(floor, Some((LogIndex(7), Term(2))), "persisted before anything it sends next");
    assert_eq!(raw.status().repair_floor, Some((LogIndex(7), Term(2))));
    // Past the hold, a candidate behind the floor is refused, one at it granted.
    tick_until_timeout(&mut raw);
    let sent = deliver(&mut raw, msg(3, 4, vote(6, 2)));
    assert!(sent.iter().any(|m| matches!(m.body, MessageBody::VoteResp { reject: true })));
    let sent = deliver(&mut raw, msg(3, 5, vote(7, 2)));
    assert!(sent.iter().any(|m| matches!(m.body, MessageBody::VoteResp { reject: false })));
}

#[test]
fn after_a_tail_cut_with_no_leader_alive_the_hold_ends_and_the_node_campaigns() {
    // A cluster-wide power loss tears every node's last write: none may wait for a leader.
    let mut raw = tail_cut(&[]);
    let sent = tick_until_timeout(&mut raw);
    assert!(
        sent.iter().any(|m| matches!(m.body, MessageBody::Vote { .. })),
        "campaigns once the hold is over: {sent:?}"
    );
}

#[test]
fn a_leader_tells_a_follower_that_lost_entries_what_it_acknowledged() {
    let mut raw = leading();
    let last = raw.status().last_index;
    let last_term = raw.status().term;
    deliver(&mut raw, msg(3, 3, MessageBody::AppResp { index: last, reject: None }));
    deliver(&mut raw, msg(1, 3, MessageBody::AppResp { index: last, reject: None }));
    // Node 3 says where its cut log ends.
    let req = repair_req(4, 2);
    let sent = deliver(&mut raw, msg(3, 3, req));
    assert!(
        sent.iter().any(|m| m.to == NodeId(3)
            && matches!(m.body, MessageBody::AckedThrough { index, term } if index == last && term == last_term)),
        "{sent:?}"
    );
    // Node 1 rejects an append below what it acknowledged (its cut log ends at 3).
    raw.propose(vec![Bytes::from_static(b"z")]).expect("propose");
    let sent = settle(&mut raw);
    let to_1 = sent.iter().find(|m| m.to == NodeId(1)).expect("appends to node 1");
    let MessageBody::App { prev_index, .. } = to_1.body else { panic!("{to_1}") };
    let reject = raftwal_consensus::RejectHint { index: LogIndex(3), term: Term(1) };
    let resp = MessageBody::AppResp { index: prev_index, reject: Some(reject) };
    let sent = deliver(&mut raw, msg(1, 3, resp));
    assert!(
        sent.iter().any(|m| m.to == NodeId(1)
            && matches!(m.body, MessageBody::AckedThrough { index, .. } if index == last)),
        "{sent:?}"
    );
}

/// Three nodes on a hand-driven network with instant disks (no pre-vote, no check-quorum: the
/// weakest settings, where nothing but the hold stands between a cut log and a bad vote).
struct Trio {
    nodes: std::collections::BTreeMap<u64, RawNode<MemLog>>,
    hard: std::collections::BTreeMap<u64, raftwal_consensus::HardState>,
    blocked: std::collections::BTreeSet<(u64, u64)>,
}

impl Trio {
    fn new() -> Trio {
        let voters = [NodeId(1), NodeId(2), NodeId(3)];
        let mut trio = Trio {
            nodes: Default::default(),
            hard: Default::default(),
            blocked: Default::default(),
        };
        for id in 1..=3 {
            let (entries, hard_state) = bootstrap(&voters);
            let mut log = MemLog::new(LogStart {
                first_index: LogIndex(1),
                prev_term: Term(0),
                membership: Membership::default(),
            });
            log.append(&entries);
            trio.start(id, log, Restored { hard_state, ..Restored::default() });
        }
        trio
    }

    fn start(&mut self, id: u64, log: MemLog, restored: Restored) {
        let mut config = Config::new(NodeId(id), 100 + id);
        config.pre_vote = false;
        config.check_quorum = false;
        self.hard.insert(id, restored.hard_state);
        self.nodes.insert(id, RawNode::new(config, restored, log).expect("valid node"));
    }

    /// Persists every Ready at once and delivers every message that is not blocked, until
    /// nothing moves.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let mut queue = Vec::new();
            for (&id, raw) in &mut self.nodes {
                while raw.has_ready() {
                    let ready = raw.ready().expect("ready");
                    if let Some(start) = ready.log_start.clone() {
                        raw.store_mut().restart(start);
                    }
                    raw.store_mut().append(&ready.entries);
                    if let Some(hs) = ready.hard_state {
                        self.hard.insert(id, hs);
                    }
                    queue.extend(ready.messages);
                    queue.extend(ready.persisted_messages);
                    raw.advance(ready.number).expect("advance");
                }
            }
            if queue.is_empty() {
                return;
            }
            for m in queue {
                if !self.blocked.contains(&(m.from.0, m.to.0))
                    && let Some(raw) = self.nodes.get_mut(&m.to.0)
                {
                    // A message no correct peer sends is refused, as a node does (once
                    // committed records are lost, the logs disagree in ways Raft never shows).
                    let _ = raw.step(m);
                }
            }
        }
        panic!("the network never settled");
    }

    fn tick(&mut self, n: usize) {
        for _ in 0..n {
            for raw in self.nodes.values_mut() {
                raw.tick().expect("tick");
            }
            self.settle();
        }
    }

    /// Committed entries that differ between two nodes at the same index.
    fn divergence(&self) -> Option<String> {
        let committed = |raw: &RawNode<MemLog>| {
            let commit = raw.status().commit;
            raw.store().all().iter().filter(|e| e.index <= commit).cloned().collect::<Vec<_>>()
        };
        for (a, ra) in &self.nodes {
            for (b, rb) in &self.nodes {
                for (ea, eb) in committed(ra).iter().zip(committed(rb).iter()) {
                    if ea != eb {
                        return Some(format!("node {a} committed {ea:?}, node {b} {eb:?}"));
                    }
                }
            }
        }
        None
    }
}

/// Node 1 leads and commits three records with node 2 while node 3 is cut off from it; node 2
/// then restarts with its log's tail cut (damage after the sync that recovery takes for a
/// torn write) and node 3 asks it for a vote at once. Returns the divergence, if any.
fn cut_tail_after_acknowledging(tail_cut: bool) -> Option<String> {
    let mut trio = Trio::new();
    trio.settle();
    trio.nodes.get_mut(&1).expect("node 1").campaign().expect("campaign");
    trio.settle();
    assert_eq!(trio.nodes[&1].status().role, Role::Leader);
    trio.blocked.extend([(1, 3), (3, 1)]);
    let range = trio.nodes.get_mut(&1).expect("node 1").propose(vec![
        Bytes::from_static(b"a"),
        Bytes::from_static(b"b"),
        Bytes::from_static(b"c"),
    ]);
    let range = range.expect("propose");
    trio.settle();
    assert!(trio.nodes[&1].status().commit >= *range.end(), "committed with node 2");
    // Node 2's log loses the three; its saved commit index had not reached them (Raft needs
    // no durable commit index), so only a peer can prove they were acknowledged.
    let mut log = trio.nodes.remove(&2).expect("node 2").store().clone();
    log.truncate(*range.start());
    let mut hard_state = trio.hard[&2];
    hard_state.commit = hard_state.commit.min(range.start().prev());
    trio.start(2, log, Restored { hard_state, tail_cut, ..Restored::default() });
    trio.nodes.get_mut(&3).expect("node 3").campaign().expect("campaign");
    trio.settle();
    trio.tick(300);
    trio.divergence()
}

#[test]
fn a_tail_cut_after_acknowledging_loses_nothing_while_the_leader_lives() {
    assert_eq!(cut_tail_after_acknowledging(true), None);
}

/// The check above is real: the same run without the hold (a node that takes the cut tail for
/// a torn write, as before) elects node 3 and loses committed records.
#[test]
fn a_tail_cut_taken_for_a_torn_write_loses_committed_records() {
    let divergence = cut_tail_after_acknowledging(false);
    assert!(divergence.is_some(), "the scenario must catch the lost records");
}

#[test]
fn only_a_log_at_or_above_the_askers_floor_answers_a_repair_request() {
    // Node 2 holds 2/4..2/5 (uncompacted), and answers an asker after 3.
    let mut raw = repairing(&[entry(4, 2, "x"), entry(5, 2, "y")], None);
    let ask = |floor_index: u64, floor_term: u64| MessageBody::RepairReq {
        last_index: LogIndex(3),
        last_term: Term(1),
        floor_index: LogIndex(floor_index),
        floor_term: Term(floor_term),
    };
    // Behind the asker's floor (it had 3/4): our entries would tie it to a stale branch.
    let sent = deliver(&mut raw, msg(1, 2, ask(4, 3)));
    assert!(sent.is_empty(), "{sent:?}");
    // At or above it: answered.
    let sent = deliver(&mut raw, msg(1, 2, ask(5, 2)));
    assert!(
        sent.iter().any(
            |m| matches!(&m.body, MessageBody::RepairResp { entries, .. } if entries.len() == 2)
        ),
        "{sent:?}"
    );
}

#[test]
fn an_asker_whose_last_entry_a_member_compacted_restarts_at_its_log_start() {
    // The member's side: its log starts at 6, the asker's ends at 3.
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let membership = Membership::new(voters);
    let start = LogStart { first_index: LogIndex(6), prev_term: Term(2), membership };
    let mut log = MemLog::new(start.clone());
    log.append(&[entry(6, 2, "f"), entry(7, 2, "g")]);
    let hard_state =
        raftwal_consensus::HardState { term: Term(2), vote: None, commit: LogIndex(5) };
    let restored = Restored {
        hard_state,
        membership: start.membership.clone(),
        applied: LogIndex(5),
        ..Restored::default()
    };
    let mut member = RawNode::new(Config::new(NodeId(2), 5), restored, log).expect("valid node");
    settle(&mut member);
    let sent = deliver(&mut member, msg(1, 2, repair_req(3, 1)));
    let restart = sent
        .iter()
        .find_map(|m| match &m.body {
            MessageBody::RepairStart { start } => Some(start.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a log start: {sent:?}"));
    assert_eq!(restart.first_index, LogIndex(6));

    // The asker's side: node 2 below its floor restarts its log there and asks for more.
    let mut asker = repairing(&[], Some((7, 2)));
    let sent = deliver(&mut asker, msg(3, 2, MessageBody::RepairStart { start: restart.clone() }));
    let s = asker.status();
    assert_eq!((s.first_index, s.last_index, s.commit), (LogIndex(6), LogIndex(5), LogIndex(5)));
    assert!(
        sent.iter().any(|m| m.to == NodeId(3)
            && matches!(m.body, MessageBody::RepairReq { last_index, .. } if last_index == LogIndex(5))),
        "asks the same member for what follows: {sent:?}"
    );
    // A restart at or below what it holds changes nothing.
    let before = asker.status().first_index;
    let mut lower = restart;
    lower.first_index = LogIndex(4);
    deliver(&mut asker, msg(3, 2, MessageBody::RepairStart { start: lower }));
    assert_eq!(asker.status().first_index, before);
}
