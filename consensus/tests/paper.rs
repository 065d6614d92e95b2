//! The safety properties of Figure 3 of the Raft paper, each tested on its own, and the rule
//! that nothing a peer sends may crash a node (random and malformed messages into every role).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use raftwal_consensus::{
    Config, Entry, EntryKind, Error, GroupId, LogIndex, LogStart, LogStore, MemLog, Membership,
    Message, MessageBody, NodeId, RawNode, Ready, RejectHint, Restored, Role, SplitMix64, Term,
    bootstrap,
};

/// A cluster whose nodes persist every Ready at once and whose network delivers in order.
struct Net {
    nodes: BTreeMap<NodeId, RawNode<MemLog>>,
    queue: VecDeque<Message>,
    /// Messages to these nodes are dropped.
    isolated: Vec<NodeId>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
}

fn start() -> LogStart {
    LogStart { first_index: LogIndex(1), prev_term: Term(0), membership: Membership::default() }
}

fn node(id: u64, voters: &[NodeId], tweak: impl Fn(&mut Config)) -> RawNode<MemLog> {
    let (entries, hard_state) = bootstrap(voters);
    let mut log = MemLog::new(start());
    log.append(&entries);
    let mut config = Config::new(NodeId(id), 7);
    config.pre_vote = false;
    config.check_quorum = false;
    tweak(&mut config);
    let restored = Restored { hard_state, ..Restored::default() };
    RawNode::new(config, restored, log).expect("valid node")
}

impl Net {
    fn new(count: u64, tweak: impl Fn(&mut Config) + Copy) -> Net {
        let voters: Vec<NodeId> = (1..=count).map(NodeId).collect();
        let nodes = voters.iter().map(|&id| (id, node(id.0, &voters, tweak))).collect();
        let mut net =
            Net { nodes, queue: VecDeque::new(), isolated: Vec::new(), applied: BTreeMap::new() };
        net.settle();
        net
    }

    fn raw(&mut self, id: u64) -> &mut RawNode<MemLog> {
        self.nodes.get_mut(&NodeId(id)).expect("node")
    }

    fn persist(&mut self, id: NodeId, ready: Ready) {
        let raw = self.nodes.get_mut(&id).expect("node");
        if let Some(start) = ready.log_start {
            raw.store_mut().restart(start);
        }
        raw.store_mut().append(&ready.entries);
        raw.advance(ready.number).expect("advance");
        self.queue.extend(ready.messages);
        self.queue.extend(ready.persisted_messages);
        self.applied.entry(id).or_default().extend(ready.committed_entries);
    }

    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let raw = self.nodes.get_mut(&id).expect("node");
                if raw.has_ready() {
                    let ready = raw.ready().expect("ready");
                    self.persist(id, ready);
                    moved = true;
                }
            }
            while let Some(m) = self.queue.pop_front() {
                moved = true;
                if self.isolated.contains(&m.to) || self.isolated.contains(&m.from) {
                    continue;
                }
                let to = m.to;
                self.raw(to.0).step(m).expect("a correct peer's message is accepted");
            }
            if !moved {
                return;
            }
        }
        panic!("the cluster did not settle");
    }

    fn leaders(&self) -> Vec<(NodeId, Term)> {
        self.nodes
            .iter()
            .map(|(&id, n)| (id, n.status()))
            .filter(|(_, s)| s.role == Role::Leader)
            .map(|(id, s)| (id, s.term))
            .collect()
    }
}

fn msg(from: u64, to: u64, term: u64, body: MessageBody) -> Message {
    Message { group: GroupId(1), from: NodeId(from), to: NodeId(to), term: Term(term), body }
}

/// An append from `from` in `term` after `prev` = (index, term).
fn app(
    from: u64,
    to: u64,
    term: u64,
    prev: (u64, u64),
    entries: Vec<Entry>,
    commit: u64,
) -> Message {
    let (prev_index, prev_term) = (LogIndex(prev.0), Term(prev.1));
    msg(
        from,
        to,
        term,
        MessageBody::App { prev_index, prev_term, entries, commit: LogIndex(commit) },
    )
}

fn entry(term: u64, index: u64, data: &str) -> Entry {
    Entry {
        term: Term(term),
        index: LogIndex(index),
        kind: EntryKind::Normal,
        data: Bytes::from(data.to_string()),
    }
}

/// The messages a Ready sends after persisting, with the Ready persisted first.
fn answers(raw: &mut RawNode<MemLog>) -> Vec<Message> {
    let ready = raw.ready().expect("ready");
    if let Some(start) = ready.log_start.clone() {
        raw.store_mut().restart(start);
    }
    raw.store_mut().append(&ready.entries);
    raw.advance(ready.number).expect("advance");
    ready.messages.into_iter().chain(ready.persisted_messages).collect()
}

#[test]
fn election_safety_a_voter_grants_one_vote_per_term() {
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let mut raw = node(3, &voters, |_| {});
    answers(&mut raw);
    let vote = |from| {
        msg(
            from,
            3,
            5,
            MessageBody::Vote { last_index: LogIndex(3), last_term: Term(1), transfer: false },
        )
    };
    raw.step(vote(1)).expect("step");
    raw.step(vote(2)).expect("step");
    // Asking again is answered the same way (a lost response is retried).
    raw.step(vote(1)).expect("step");
    let replies: Vec<(NodeId, MessageBody)> =
        answers(&mut raw).into_iter().map(|m| (m.to, m.body)).collect();
    assert_eq!(
        replies,
        vec![
            (NodeId(1), MessageBody::VoteResp { reject: false }),
            (NodeId(2), MessageBody::VoteResp { reject: true }),
            (NodeId(1), MessageBody::VoteResp { reject: false }),
        ]
    );
    assert_eq!(raw.status().vote, Some(NodeId(1)));
}

#[test]
fn election_safety_simultaneous_candidates_elect_at_most_one_leader() {
    for first in 1..=5 {
        let mut net = Net::new(5, |_| {});
        // Every node campaigns before any vote request is delivered.
        for id in (first..=5).chain(1..first) {
            net.raw(id).campaign().expect("campaign");
            let ready = net.raw(id).ready().expect("ready");
            net.persist(NodeId(id), ready);
        }
        net.settle();
        let leaders = net.leaders();
        let mut terms: Vec<Term> = leaders.iter().map(|(_, t)| *t).collect();
        terms.dedup();
        assert_eq!(terms.len(), leaders.len(), "two leaders in one term: {leaders:?}");
    }
}

#[test]
fn leader_append_only_a_leader_never_rewrites_its_log() {
    let mut net = Net::new(3, |_| {});
    net.raw(1).campaign().expect("campaign");
    net.settle();
    net.raw(1).propose(vec![Bytes::from("a"), Bytes::from("b")]).expect("propose");
    net.settle();
    let before = net.raw(1).store().all().to_vec();
    let term = net.raw(1).status().term;
    // A forged append in the leader's own term, claiming another leader: no correct node sends
    // it, and the leader must not take it.
    let forged = app(2, 1, term.0, (4, term.0), vec![entry(term.0, 5, "x")], 5);
    net.raw(1).step(forged).expect("ignored");
    net.settle();
    assert_eq!(net.raw(1).store().all(), &before[..]);
    assert_eq!(net.raw(1).status().role, Role::Leader);
}

#[test]
fn log_matching_a_follower_accepts_only_after_a_matching_entry() {
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let mut raw = node(2, &voters, |_| {});
    answers(&mut raw);
    // Index 3 holds term 1, not term 2: refused, with a hint at our entry of term <= 2.
    raw.step(app(1, 2, 2, (3, 2), vec![entry(2, 4, "a")], 3)).expect("step");
    // Index 5 is beyond our log: refused.
    raw.step(app(1, 2, 2, (5, 2), vec![entry(2, 6, "b")], 3)).expect("step");
    // Index 3 with term 1 matches: accepted.
    raw.step(app(1, 2, 2, (3, 1), vec![entry(2, 4, "a"), entry(2, 5, "b")], 3)).expect("step");
    let replies: Vec<MessageBody> = answers(&mut raw).into_iter().map(|m| m.body).collect();
    let hint = |index, term| Some(RejectHint { index: LogIndex(index), term: Term(term) });
    assert_eq!(
        replies,
        vec![
            MessageBody::AppResp { index: LogIndex(3), reject: hint(3, 1) },
            MessageBody::AppResp { index: LogIndex(5), reject: hint(3, 1) },
            MessageBody::AppResp { index: LogIndex(5), reject: None },
        ]
    );
    // A new leader's conflicting entry replaces ours from the conflict on, keeping the match.
    let replace = app(3, 2, 3, (4, 2), vec![entry(3, 5, "c")], 3);
    raw.step(replace).expect("step");
    answers(&mut raw);
    let log: Vec<(u64, u64)> = raw.store().all().iter().map(|e| (e.term.0, e.index.0)).collect();
    assert_eq!(log, vec![(1, 1), (1, 2), (1, 3), (2, 4), (3, 5)]);
}

#[test]
fn leader_completeness_voters_refuse_candidates_with_older_logs() {
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let mut raw = node(3, &voters, |_| {});
    answers(&mut raw);
    raw.step(app(1, 3, 2, (3, 1), vec![entry(2, 4, "a")], 3)).expect("step");
    answers(&mut raw);
    // Our log ends at 2/4. Each request comes in a fresh term so the vote is free.
    let cases = [
        (3, 1, 10, true), // last term lower, even with a longer log
        (3, 2, 3, true),  // same last term, shorter log
        (4, 2, 4, false), // same last term, same length: up to date
        (5, 3, 1, false), // higher last term, shorter log: up to date
    ];
    for (term, last_term, last_index, reject) in cases {
        raw.step(msg(
            2,
            3,
            term,
            MessageBody::Vote {
                last_index: LogIndex(last_index),
                last_term: Term(last_term),
                transfer: false,
            },
        ))
        .expect("step");
        let replies: Vec<MessageBody> = answers(&mut raw).into_iter().map(|m| m.body).collect();
        assert_eq!(replies, vec![MessageBody::VoteResp { reject }], "term {term}");
    }
}

#[test]
fn leader_commits_an_earlier_term_entry_only_through_one_of_its_own() {
    // Node 1 led term 2 and appended "old" at 4 without replicating it.
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let (mut entries, _) = bootstrap(&voters);
    entries.push(entry(2, 4, "old"));
    let mut log = MemLog::new(start());
    log.append(&entries);
    let hard_state =
        raftwal_consensus::HardState { term: Term(2), vote: Some(NodeId(1)), commit: LogIndex(3) };
    let mut config = Config::new(NodeId(1), 1);
    config.pre_vote = false;
    let restored = Restored { hard_state, ..Restored::default() };
    let mut raw = RawNode::new(config, restored, log).expect("node");
    answers(&mut raw);
    raw.campaign().expect("campaign");
    answers(&mut raw);
    raw.step(msg(2, 1, 3, MessageBody::VoteResp { reject: false })).expect("step");
    let sent = answers(&mut raw);
    assert_eq!(raw.status().role, Role::Leader);
    assert!(sent.iter().any(|m| matches!(&m.body, MessageBody::App { entries, .. }
        if entries.iter().map(|e| e.index.0).collect::<Vec<_>>() == [5])));
    // A quorum (1 and 2) now holds "old" at 4, but it is of term 2: counting must not commit it.
    raw.step(msg(2, 1, 3, MessageBody::AppResp { index: LogIndex(4), reject: None }))
        .expect("step");
    answers(&mut raw);
    assert_eq!(raw.status().commit, LogIndex(3));
    // Once the quorum holds the term-3 entry, both commit together.
    raw.step(msg(2, 1, 3, MessageBody::AppResp { index: LogIndex(5), reject: None }))
        .expect("step");
    let ready = raw.ready().expect("ready");
    let committed: Vec<u64> = ready.committed_entries.iter().map(|e| e.index.0).collect();
    assert_eq!(committed, [4, 5]);
}

#[test]
fn state_machine_safety_every_node_applies_the_same_entries_in_order() {
    let mut net = Net::new(5, |_| {});
    net.raw(1).campaign().expect("campaign");
    net.settle();
    for round in 0..20u64 {
        let leader = net.leaders().last().expect("a leader").0;
        net.raw(leader.0).propose(vec![Bytes::from(format!("r{round}"))]).expect("propose");
        if round % 5 == 4 {
            // Hand leadership around to exercise several terms.
            let to = NodeId(leader.0 % 5 + 1);
            net.raw(leader.0).transfer_leader(to).expect("transfer");
        }
        net.settle();
    }
    let histories: Vec<&Vec<Entry>> = net.applied.values().collect();
    for h in &histories {
        for (i, e) in h.iter().enumerate() {
            assert_eq!(e.index, LogIndex(i as u64 + 1), "applied in order without gaps");
        }
    }
    let shortest = histories.iter().map(|h| h.len()).min().expect("nodes");
    for h in &histories {
        assert_eq!(&h[..shortest], &histories[0][..shortest]);
    }
    assert!(histories[0].iter().filter(|e| e.kind == EntryKind::Normal).count() >= 20);
}

#[test]
fn messages_from_stale_terms_change_nothing_and_newer_terms_are_adopted() {
    let mut net = Net::new(3, |_| {});
    net.raw(1).campaign().expect("campaign");
    net.settle();
    let term = net.raw(2).status().term;
    net.raw(2)
        .step(msg(3, 2, term.0 - 1, MessageBody::Heartbeat { commit: LogIndex(9), read: None }))
        .expect("stale heartbeat ignored");
    assert_eq!(net.raw(2).status().leader, Some(NodeId(1)));
    assert_eq!(net.raw(2).status().commit, LogIndex(4));
    net.raw(2)
        .step(msg(3, 2, term.0 + 1, MessageBody::Heartbeat { commit: LogIndex(0), read: None }))
        .expect("newer heartbeat adopted");
    let status = net.raw(2).status();
    assert_eq!(
        (status.term, status.leader, status.vote),
        (Term(term.0 + 1), Some(NodeId(3)), None)
    );
}

/// Small values mostly, extreme ones sometimes.
fn int(rng: &mut SplitMix64) -> u64 {
    match rng.below(10) {
        0 => u64::MAX - rng.below(3),
        1 => rng.next_u64(),
        _ => rng.below(12),
    }
}

fn random_message(rng: &mut SplitMix64, to: u64) -> Message {
    let index = |rng: &mut SplitMix64| LogIndex(int(rng));
    let term = |rng: &mut SplitMix64| Term(int(rng));
    let body = match rng.below(12) {
        0 => MessageBody::PreVote { last_index: index(rng), last_term: term(rng) },
        1 => MessageBody::PreVoteResp { reject: rng.below(2) == 0 },
        2 => MessageBody::Vote {
            last_index: index(rng),
            last_term: term(rng),
            transfer: rng.below(2) == 0,
        },
        3 => MessageBody::VoteResp { reject: rng.below(2) == 0 },
        4 => {
            let prev_index = index(rng);
            let first = if rng.below(2) == 0 { prev_index.0.wrapping_add(1) } else { int(rng) };
            let count = rng.below(4);
            let entries =
                (0..count).map(|i| entry(int(rng), first.wrapping_add(i), "fuzz")).collect();
            MessageBody::App { prev_index, prev_term: term(rng), entries, commit: index(rng) }
        }
        5 => MessageBody::AppResp {
            index: index(rng),
            reject: (rng.below(2) == 0).then(|| RejectHint { index: index(rng), term: term(rng) }),
        },
        6 => MessageBody::Heartbeat { commit: index(rng), read: Some(int(rng)) },
        7 => MessageBody::HeartbeatResp { read: Some(int(rng)) },
        8 => MessageBody::InstallLog {
            start: LogStart {
                first_index: index(rng),
                prev_term: term(rng),
                membership: Membership::new([NodeId(1 + rng.below(4))]),
            },
            commit: index(rng),
        },
        9 => MessageBody::TimeoutNow,
        10 => MessageBody::ReadIndex { context: rng.next_u64() },
        _ => MessageBody::ReadIndexResp { context: rng.next_u64(), index: index(rng) },
    };
    let from = if rng.below(20) == 0 { int(rng) } else { 1 + rng.below(4) };
    let to = if rng.below(20) == 0 { int(rng) } else { to };
    let group = GroupId(if rng.below(20) == 0 { 2 } else { 1 });
    Message { group, from: NodeId(from), to: NodeId(to), term: term(rng), body }
}

#[test]
fn random_messages_never_panic_a_node_in_any_role() {
    let mut rng = SplitMix64::new(0x5eed);
    let mut refused = 0u64;
    for round in 0..300 {
        let mut net = Net::new(3, |_| {});
        net.raw(1).campaign().expect("campaign");
        net.settle();
        net.raw(1).propose(vec![Bytes::from("x"); 3]).expect("propose");
        net.settle();
        // Node 1 leads, 2 follows, 3 is made a candidate.
        net.raw(3).campaign().expect("campaign");
        for _ in 0..200 {
            let to = 1 + rng.below(3);
            let m = random_message(&mut rng, to);
            match net.raw(to).step(m) {
                Ok(()) => {}
                Err(Error::InvalidMessage { .. } | Error::WrongGroup { .. }) => refused += 1,
                Err(err) => panic!("round {round}: unexpected error {err}"),
            }
            if rng.below(4) == 0 {
                let raw = net.raw(to);
                if raw.has_ready() {
                    let _ = answers(raw);
                }
                raw.tick().expect("tick");
            }
        }
    }
    assert!(refused > 0, "the fuzz must reach the validation paths");
}

#[test]
fn an_append_below_the_commit_index_cannot_replace_committed_entries() {
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let mut raw = node(2, &voters, |_| {});
    answers(&mut raw);
    raw.step(app(1, 2, 2, (3, 1), vec![entry(2, 4, "a")], 4)).expect("step");
    answers(&mut raw);
    assert_eq!(raw.status().commit, LogIndex(4));
    // A (broken) leader of a later term sends a different entry at the committed index 4.
    let conflicting = app(3, 2, 3, (3, 1), vec![entry(3, 4, "z"), entry(3, 5, "y")], 5);
    raw.step(conflicting).expect("answered");
    let replies: Vec<MessageBody> = answers(&mut raw).into_iter().map(|m| m.body).collect();
    // The follower answers with its commit index so the leader resends from there; nothing
    // committed moves.
    assert_eq!(replies, vec![MessageBody::AppResp { index: LogIndex(4), reject: None }]);
    assert_eq!(raw.store().term(LogIndex(4)).expect("kept"), Term(2));
    assert_eq!(raw.status().commit, LogIndex(4));
}
