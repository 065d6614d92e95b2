//! The transport reports what ARCHITECTURE.md lists, per peer and stream, with real values:
//! bytes and messages sent and received, queue depth, queue-full refusals, RTT and refused
//! handshakes. (Its own process: the recorder is global, since the endpoint's tasks run on
//! runtime threads.)

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use raftwal_consensus::{Entry, EntryKind, LogIndex, MessageBody, Term};
use support::*;

type Seen = HashMap<(String, Vec<(String, String)>), DebugValue>;

fn snapshot(s: &Snapshotter) -> Seen {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<(String, String)> =
                key.key().labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
            labels.sort();
            ((key.key().name().to_string(), labels), value)
        })
        .collect()
}

fn labels(peer: u64, stream: &str) -> Vec<(String, String)> {
    vec![("peer".into(), peer.to_string()), ("stream".into(), stream.into())]
}

fn counter(seen: &Seen, name: &str, labels: Vec<(String, String)>) -> u64 {
    match seen.get(&(name.to_string(), labels.clone())) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: expected a counter, got {other:?}"),
    }
}

fn gauge(seen: &Seen, name: &str, labels: Vec<(String, String)>) -> f64 {
    match seen.get(&(name.to_string(), labels.clone())) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name} {labels:?}: expected a gauge, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_queues_rtt_and_refusals_are_counted_per_peer_and_stream() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder in this process");

    let pki = Pki::new();
    let mut nodes = start_all(vec![(1, pki.identity(1)), (2, pki.identity(2))], |_| {});
    let entries: Vec<Entry> = (1..=4)
        .map(|i| Entry {
            term: Term(3),
            index: LogIndex(i),
            kind: EntryKind::Normal,
            data: Bytes::from(vec![7u8; 1000]),
        })
        .collect();
    let app = msg(
        1,
        2,
        MessageBody::App {
            prev_index: LogIndex(0),
            prev_term: Term(0),
            entries,
            commit: LogIndex(0),
        },
    );
    for _ in 0..10 {
        send(&nodes[&1].transport, &app);
        send(&nodes[&1].transport, &heartbeat(1, 2, 0));
    }
    let inbox = &mut nodes.get_mut(&2).expect("node 2").inbox;
    for _ in 0..20 {
        recv(inbox, 10).await;
    }
    // RTT is sampled once a second on each connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seen = snapshot(&snapshotter);

    assert_eq!(
        counter(&seen, "raftwal_transport_sent_messages_total", labels(2, "replication")),
        10
    );
    assert_eq!(counter(&seen, "raftwal_transport_sent_messages_total", labels(2, "control")), 10);
    assert_eq!(
        counter(&seen, "raftwal_transport_received_messages_total", labels(1, "replication")),
        10
    );
    assert_eq!(
        counter(&seen, "raftwal_transport_received_messages_total", labels(1, "control")),
        10
    );
    let sent = counter(&seen, "raftwal_transport_sent_bytes_total", labels(2, "replication"));
    let received =
        counter(&seen, "raftwal_transport_received_bytes_total", labels(1, "replication"));
    assert!(sent >= 10 * 4000, "at least the payloads: {sent}");
    assert_eq!(sent, received, "what one side sent, the other received");
    assert_eq!(
        gauge(&seen, "raftwal_transport_queue_messages", labels(2, "replication")),
        0.0,
        "drained"
    );
    assert_eq!(gauge(&seen, "raftwal_transport_queue_bytes", labels(2, "replication")), 0.0);
    let rtt = seen
        .iter()
        .find_map(|((name, _), v)| match (name.as_str(), v) {
            ("raftwal_transport_rtt_seconds", DebugValue::Gauge(g)) if g.into_inner() > 0.0 => {
                Some(g.into_inner())
            }
            _ => None,
        })
        .expect("an RTT was sampled");
    assert!(rtt < 1.0, "loopback RTT {rtt}");

    // A full queue is refused and counted: a peer that is not listening never drains.
    let mut config = raftwal_transport::TransportConfig::new(
        raftwal_consensus::NodeId(5),
        loopback(),
        pki.identity(5),
    );
    config.queue_msgs_max = 2;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    config.peers.insert(raftwal_consensus::NodeId(6), silent.local_addr().expect("addr"));
    let (lonely, _inbox) = raftwal_transport::Transport::start(config).expect("start");
    let mut refused = 0;
    for _ in 0..10 {
        if lonely.send(&heartbeat(5, 6, 0)).is_err() {
            refused += 1;
        }
    }
    // Exactly the queue's bound is held while the peer is away (the writer takes nothing out of
    // the queue until a connection is up).
    assert_eq!(refused, 8);
    let seen = snapshot(&snapshotter);
    assert_eq!(counter(&seen, "raftwal_transport_queue_full_total", labels(6, "control")), refused);
    assert!(
        gauge(&seen, "raftwal_transport_queue_messages", labels(6, "control")) >= 1.0,
        "queued"
    );

    // A dialer whose certificate comes from another CA is refused and counted.
    let stranger_pki = Pki::new();
    let mut honest = raftwal_transport::TransportConfig::new(
        raftwal_consensus::NodeId(8),
        loopback(),
        pki.identity(8),
    );
    honest.peers.insert(raftwal_consensus::NodeId(7), loopback());
    let (honest, _inbox8) = raftwal_transport::Transport::start(honest).expect("start");
    let mut stranger = raftwal_transport::TransportConfig::new(
        raftwal_consensus::NodeId(7),
        loopback(),
        stranger_pki.identity(7),
    );
    stranger.peers.insert(raftwal_consensus::NodeId(8), honest.local_addr());
    let (stranger, _inbox7) = raftwal_transport::Transport::start(stranger).expect("start");
    let _ = stranger.send(&heartbeat(7, 8, 0));
    let mut handshakes = 0;
    for _ in 0..100 {
        let seen = snapshot(&snapshotter);
        handshakes = counter(
            &seen,
            "raftwal_transport_rejected_total",
            vec![("reason".into(), "handshake".into())],
        );
        if handshakes > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(handshakes > 0, "the foreign certificate was refused and counted");
}
