//! Catch-up at any record size: a follower and a new learner far behind on tiny records. Each
//! entry costs the transport a header whatever its size; before append messages were bounded
//! by entry count as well as bytes, a follower about 44,000 tiny entries behind got messages
//! its transport refused (closing the connection, heartbeats included), and the leader resent
//! the same probe forever.

mod support;

use raftwal_client::NodeId;
use support::{Cluster, read_all};

/// 60,000 eight-byte records: more entries than one append message's archive could hold.
const RECORDS: usize = 60_000;
const PER_APPEND: usize = 10_000;

fn record(i: usize) -> Vec<u8> {
    (i as u64).to_le_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_and_a_learner_far_behind_on_tiny_records_catch_up() {
    let mut c = Cluster::start(3, 1).await;
    let leader = c.leader().await;
    let behind = (1..=3).find(|&id| id != leader).expect("a follower");
    c.stop_node(behind).await;
    let client = c.client().await;
    let mut first = None;
    let mut last = 0;
    for chunk in 0..RECORDS / PER_APPEND {
        let records: Vec<Vec<u8>> =
            (chunk * PER_APPEND..(chunk + 1) * PER_APPEND).map(record).collect();
        let a = client.append(records).await.expect("append");
        first.get_or_insert(a.first_offset.0);
        last = a.last_offset.0;
    }
    let first = first.expect("appended");
    let expected: Vec<(u64, Vec<u8>)> =
        (0..RECORDS).map(|i| (first + i as u64, record(i))).collect();

    c.start_node(behind).await;
    c.wait_applied(behind, last).await;

    c.start_node(4).await;
    let cfg = c.configs[&4].clone();
    client
        .add_learner(NodeId(4), &cfg.peer_listen.to_string(), &cfg.api_listen.to_string())
        .await
        .expect("add learner");
    c.wait_applied(4, last).await;

    for id in [behind, 4] {
        let got: Vec<(u64, Vec<u8>)> = read_all(&c.client_of(id).await)
            .await
            .into_iter()
            .filter(|(offset, _)| *offset >= first)
            .collect();
        assert!(got == expected, "node {id} holds every record at its offset");
    }
    c.shutdown().await;
}
