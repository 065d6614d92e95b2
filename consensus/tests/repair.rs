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
    let restored = Restored {
        hard_state,
        repair_floor: floor.map(|(i, t)| (LogIndex(i), Term(t))),
        ..Restored::default()
    };
    let mut raw = RawNode::new(config, restored, log).expect("valid node");
    settle(&mut raw);
    raw
}

/// Persists and applies every Ready; returns the messages sent.
fn settle(raw: &mut RawNode<MemLog>) -> Vec<Message> {
    let mut sent = Vec::new();
    while raw.has_ready() {
        let ready = raw.ready().expect("ready");
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

#[test]
fn a_leader_told_of_a_lost_log_probes_again_from_it() {
    // Node 2 leads (1, 2, 3) with entries to 6; node 3 acknowledged 6, then says its log ends
    // at 3 (damage cut it): the leader's next append starts after 3.
    let mut raw = repairing(&[entry(4, 2, "x"), entry(5, 2, "y")], None);
    raw.campaign().expect("campaign");
    settle(&mut raw);
    deliver(&mut raw, msg(1, 3, MessageBody::VoteResp { reject: false }));
    assert_eq!(raw.status().role, Role::Leader);
    let last = raw.status().last_index;
    deliver(&mut raw, msg(3, 3, MessageBody::AppResp { index: last, reject: None }));
    assert_eq!(raw.status().progress[&NodeId(3)].matched, last);
    let req = MessageBody::RepairReq { last_index: LogIndex(3), last_term: Term(1) };
    let sent = deliver(&mut raw, msg(3, 3, req));
    assert_eq!(raw.status().progress[&NodeId(3)].matched, LogIndex(3));
    assert!(
        sent.iter().any(|m| m.to == NodeId(3)
            && matches!(m.body, MessageBody::App { prev_index, .. } if prev_index == LogIndex(3))),
        "appends again from 4: {sent:?}"
    );
}
