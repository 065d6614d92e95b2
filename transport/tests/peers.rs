//! Three real endpoints on 127.0.0.1 with real certificates: every message kind, order on the
//! replication stream, heartbeats beside a 64 MiB batch, reconnection, and bounded queues.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use raftwal_consensus::{
    Entry, EntryKind, LogIndex, LogStart, Membership, MessageBody, NodeId, RejectHint, Term,
};
use raftwal_transport::{Lane, SendError, Transport, TransportConfig};
use support::*;

fn every_kind() -> Vec<MessageBody> {
    let entry = |i: u64, data: &'static [u8]| Entry {
        term: Term(3),
        index: LogIndex(i),
        kind: EntryKind::Normal,
        data: Bytes::from_static(data),
    };
    vec![
        MessageBody::PreVote { last_index: LogIndex(5), last_term: Term(2) },
        MessageBody::PreVoteResp { reject: true },
        MessageBody::Vote { last_index: LogIndex(5), last_term: Term(2), transfer: true },
        MessageBody::VoteResp { reject: false },
        MessageBody::App {
            prev_index: LogIndex(4),
            prev_term: Term(2),
            entries: vec![entry(5, b"five"), entry(6, b""), entry(7, b"seven")],
            commit: LogIndex(4),
        },
        MessageBody::AppResp {
            index: LogIndex(9),
            reject: Some(RejectHint { index: LogIndex(3), term: Term(1) }),
        },
        MessageBody::AppResp { index: LogIndex(9), reject: None },
        MessageBody::Heartbeat { commit: LogIndex(4), read: Some(8) },
        MessageBody::HeartbeatResp { read: None },
        MessageBody::InstallLog {
            start: LogStart {
                first_index: LogIndex(100),
                prev_term: Term(2),
                membership: Membership::new([NodeId(1), NodeId(2), NodeId(3)]),
            },
            commit: LogIndex(120),
        },
        MessageBody::TimeoutNow,
        MessageBody::ReadIndex { context: 77 },
        MessageBody::ReadIndexResp { context: 77, index: LogIndex(12) },
        MessageBody::RepairReq {
            last_index: LogIndex(40),
            last_term: Term(3),
            floor_index: LogIndex(44),
            floor_term: Term(3),
        },
        MessageBody::AckedThrough { index: LogIndex(40), term: Term(3) },
        MessageBody::RepairResp {
            prev_index: LogIndex(40),
            prev_term: Term(3),
            entries: vec![Entry {
                term: Term(3),
                index: LogIndex(41),
                kind: EntryKind::Normal,
                data: Bytes::from_static(b"repair"),
            }],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_every_message_kind() {
    let pki = Pki::new();
    let mut nodes = start_all((1..=3).map(|id| (id, pki.identity(id))).collect(), |_| {});
    for (from, to) in [(1, 2), (2, 3), (3, 1), (2, 1)] {
        for body in every_kind() {
            send(&nodes[&from].transport, &msg(from, to, body));
        }
        // Lanes are independent streams, so order is kept per lane only.
        let inbox = &mut nodes.get_mut(&to).expect("node").inbox;
        let mut got = Vec::new();
        for _ in 0..every_kind().len() {
            got.push(recv(inbox, 10).await);
        }
        for body in every_kind() {
            let want = msg(from, to, body);
            assert!(got.contains(&want), "{from}->{to}: missing {want}");
        }
        let lane_order = |lane: Lane| -> Vec<String> {
            got.iter().filter(|m| Lane::of(&m.body) == lane).map(|m| m.to_string()).collect()
        };
        let want_order: Vec<String> = every_kind()
            .into_iter()
            .map(|b| msg(from, to, b))
            .filter(|m| Lane::of(&m.body) == Lane::Control)
            .map(|m| m.to_string())
            .collect();
        assert_eq!(lane_order(Lane::Control), want_order);
    }
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

fn app(from: u64, to: u64, index: u64, payload: Bytes) -> raftwal_consensus::Message {
    msg(
        from,
        to,
        MessageBody::App {
            prev_index: LogIndex(index - 1),
            prev_term: Term(3),
            entries: vec![Entry {
                term: Term(3),
                index: LogIndex(index),
                kind: EntryKind::Normal,
                data: payload,
            }],
            commit: LogIndex(0),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_stream_keeps_order() {
    let pki = Pki::new();
    let mut nodes = start_all((1..=2).map(|id| (id, pki.identity(id))).collect(), |_| {});
    let count = 3000u64;
    let mut sent = 0;
    let mut index = 1;
    let inbox_at = |nodes: &mut std::collections::BTreeMap<u64, Node>| {
        std::mem::replace(
            &mut nodes.get_mut(&2).expect("node").inbox,
            tokio::sync::mpsc::channel(1).1,
        )
    };
    let mut inbox = inbox_at(&mut nodes);
    let reader = tokio::spawn(async move {
        let mut expect = 1;
        while expect <= count {
            let m = recv(&mut inbox, 20).await;
            if let MessageBody::App { entries, .. } = &m.body {
                assert_eq!(entries[0].index, LogIndex(expect), "replication order");
                expect += 1;
            }
        }
    });
    while sent < count {
        match nodes[&1].transport.send(&app(1, 2, index, Bytes::from(vec![7u8; 1024]))) {
            Ok(()) => {
                sent += 1;
                index += 1;
            }
            Err(SendError::QueueFull { .. }) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => panic!("{e}"),
        }
    }
    reader.await.expect("reader");
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_overtakes_a_64_mib_batch_to_the_same_peer() {
    let pki = Pki::new();
    let mut nodes = start_all((1..=2).map(|id| (id, pki.identity(id))).collect(), |_| {});
    // Warm the connection up so that the timing below is about streams, not the handshake.
    send(&nodes[&1].transport, &heartbeat(1, 2, 0));
    recv(&mut nodes.get_mut(&2).expect("node").inbox, 10).await;

    let entries: Vec<Entry> = (1..=64u64)
        .map(|i| Entry {
            term: Term(3),
            index: LogIndex(i),
            kind: EntryKind::Normal,
            data: Bytes::from(vec![i as u8; 1 << 20]),
        })
        .collect();
    let batch = msg(
        1,
        2,
        MessageBody::App {
            prev_index: LogIndex(0),
            prev_term: Term(0),
            entries,
            commit: LogIndex(0),
        },
    );
    let started = Instant::now();
    send(&nodes[&1].transport, &batch);
    // Let the batch start flowing, then send the heartbeat behind it.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let heartbeat_sent = Instant::now();
    send(&nodes[&1].transport, &heartbeat(1, 2, 1));
    let inbox = &mut nodes.get_mut(&2).expect("node").inbox;
    let first = recv(inbox, 30).await;
    let heartbeat_latency = heartbeat_sent.elapsed();
    let second = recv(inbox, 60).await;
    let batch_time = started.elapsed();
    println!(
        "heartbeat latency {:?} while a 64 MiB batch took {:?}",
        heartbeat_latency, batch_time
    );
    assert!(matches!(first.body, MessageBody::Heartbeat { .. }), "the heartbeat arrives first");
    assert_eq!(second, batch, "the batch arrives whole");
    // Generous: a few milliseconds is typical; the bound only catches head-of-line blocking.
    assert!(heartbeat_latency < Duration::from_millis(500), "{heartbeat_latency:?}");
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_peer_restarts() {
    let pki = Pki::new();
    let mut nodes = start_all((1..=2).map(|id| (id, pki.identity(id))).collect(), |_| {});
    send(&nodes[&1].transport, &heartbeat(1, 2, 1));
    recv(&mut nodes.get_mut(&2).expect("node").inbox, 10).await;

    // Node 2 goes away and comes back on the same address.
    let old = nodes.remove(&2).expect("node");
    let addr = old.transport.local_addr();
    old.transport.shutdown().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut config = TransportConfig::new(NodeId(2), addr, pki.identity(2));
    config.peers.insert(NodeId(1), nodes[&1].transport.local_addr());
    let (transport, mut inbox) = Transport::start(config).expect("restart");

    // Node 1 (the dialer) reconnects; messages sent meanwhile may be lost, later ones arrive.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut delivered = false;
    while Instant::now() < deadline && !delivered {
        let _ = nodes[&1].transport.send(&heartbeat(1, 2, 2));
        delivered = tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await.is_ok();
    }
    assert!(delivered, "node 1 reconnected to the restarted node 2");
    // And the other direction works on the new connection.
    transport.send(&heartbeat(2, 1, 3)).expect("queued");
    let back = recv(&mut nodes.get_mut(&1).expect("node").inbox, 10).await;
    assert_eq!(back, heartbeat(2, 1, 3));
    transport.shutdown().await;
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_cannot_grow_the_senders_memory() {
    let pki = Pki::new();
    let nodes = start_all((1..=2).map(|id| (id, pki.identity(id))).collect(), |config| {
        config.queue_bytes_max = 8 << 20;
        config.inbox_msgs_max = 4;
        config.stream_window_bytes = 1 << 20;
        config.connection_window_bytes = 2 << 20;
    });
    // Node 2 never reads its inbox: it fills, node 2 stops reading the stream, QUIC flow
    // control stops node 1's writer, and node 1's queue fills.
    let mut full = 0;
    for index in 1..=200u64 {
        match nodes[&1].transport.send(&app(1, 2, index, Bytes::from(vec![1u8; 256 << 10]))) {
            Ok(()) => {}
            Err(SendError::QueueFull { peer, lane }) => {
                assert_eq!((peer, lane), (NodeId(2), Lane::Replication));
                full += 1;
            }
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let queued = nodes[&1].transport.queued_bytes(NodeId(2), Lane::Replication).expect("peer");
    println!("refused {full} of 200 sends; {queued} bytes queued");
    assert!(full > 100, "sends are refused once the queue is full");
    assert!(queued <= 8 << 20, "queued {queued} bytes");
    // The control lane is separate: a heartbeat is still accepted.
    nodes[&1].transport.send(&heartbeat(1, 2, 1)).expect("control lane has room");
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}
