//! Pipelined appends: the window, matching answers, retries after a stream failure.

mod common;

use std::sync::atomic::Ordering;

use common::{FakeLog, FakeNode, StreamScript, config, serve};
use raftwal_client::{AppenderConfig, Client};

#[tokio::test]
async fn appender_keeps_many_appends_in_flight_and_matches_answers() {
    const APPENDS: usize = 100;
    let log = FakeLog::new();
    let node = FakeNode::leader("leader", &log);
    // Answers wait until 8 appends are in flight (or all have arrived), and come in reverse
    // order: a client that did not pipeline would stall, one that matched by position would
    // mix them up.
    node.stream_gate.store(8, Ordering::SeqCst);
    node.release_total.store(APPENDS, Ordering::SeqCst);
    *node.answer_reversed.lock().expect("reversed") = true;
    let leader = serve(node).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");
    let appender = client.appender(AppenderConfig { window: 16 }).expect("appender");

    let mut tickets = Vec::new();
    for i in 0..APPENDS {
        tickets.push(appender.send([format!("m{i}")]).await.expect("send"));
    }
    let mut previous = 0;
    for (i, ticket) in tickets.into_iter().enumerate() {
        let appended = ticket.await.expect("appended");
        let (offset, count) = common::lock(&log).find(format!("m{i}").as_bytes());
        assert_eq!(count, 1);
        assert_eq!(
            Some(appended.first_offset.get()),
            offset,
            "answer {i} matched to its own append"
        );
        assert!(appended.first_offset.get() > previous, "send order is log order");
        previous = appended.first_offset.get();
    }
    appender.close().await.expect("close");

    let max = leader.node.max_in_flight.load(Ordering::SeqCst);
    assert!((8..=16).contains(&max), "max in flight {max}, window 16, gate 8");
    assert_eq!(leader.node.calls("append_stream"), 1);
}

#[tokio::test]
async fn appender_retries_in_flight_appends_in_order_after_a_stream_failure() {
    const APPENDS: usize = 40;
    let log = FakeLog::new();
    let node = FakeNode::leader("leader", &log);
    // The first stream appends 5 requests without answering and breaks; the first 5 are then
    // answered as duplicates on the next stream.
    node.stream_scripts
        .lock()
        .expect("scripts")
        .push_back(StreamScript::CommitThenFail { after: 5 });
    let leader = serve(node).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");
    let appender = client.appender(AppenderConfig { window: 8 }).expect("appender");

    let mut tickets = Vec::new();
    for i in 0..APPENDS {
        tickets.push(appender.send([format!("m{i}")]).await.expect("send"));
    }
    let mut previous = 0;
    let mut duplicates = 0;
    for (i, ticket) in tickets.into_iter().enumerate() {
        let appended = ticket.await.expect("appended");
        duplicates += usize::from(appended.duplicate);
        let (offset, count) = common::lock(&log).find(format!("m{i}").as_bytes());
        assert_eq!(count, 1, "m{i} appended exactly once");
        assert_eq!(Some(appended.first_offset.get()), offset);
        assert!(appended.first_offset.get() > previous, "send order is log order");
        previous = appended.first_offset.get();
    }
    assert_eq!(duplicates, 5);
    assert!(leader.node.calls("append_stream") >= 2);

    // Every attempt of one payload carried the same producer and sequence, and sequences
    // follow send order.
    let log = common::lock(&log);
    for i in 0..APPENDS {
        let data = format!("m{i}").into_bytes();
        let attempts: Vec<_> = log.seen.iter().filter(|s| s.records == [data.clone()]).collect();
        assert!(!attempts.is_empty());
        assert!(
            attempts.iter().all(|s| s.producer == attempts[0].producer),
            "m{i} retried as itself"
        );
        let (_, sequence) = attempts[0].producer.expect("a producer");
        assert_eq!(sequence, i as u64 + 1);
    }
}

#[tokio::test]
async fn appender_follows_the_leader() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let follower = serve(FakeNode::follower("follower", &log, &leader.addr.to_string())).await;
    let client = Client::connect(config(&[&follower.url])).await.expect("connect");
    let appender = client.appender(AppenderConfig::default()).expect("appender");

    let first = appender.send(["a"]).await.expect("send");
    let second = appender.send(["b"]).await.expect("send");
    assert!(first.await.expect("a").first_offset < second.await.expect("b").first_offset);
    assert_eq!(follower.node.calls("append_stream"), 1);
    assert_eq!(leader.node.calls("append_stream"), 1);
    appender.close().await.expect("close");
}

#[tokio::test]
async fn appender_reports_unavailable_when_no_node_answers_and_goes_on() {
    let mut config = config(&[common::refused_url()]);
    config.retries_max = 2;
    let client = Client::connect(config).await.expect("connect");
    let appender = client.appender(AppenderConfig { window: 4 }).expect("appender");

    for round in 0..2 {
        let ticket = appender.send(["x"]).await.expect("send");
        match ticket.await {
            Err(raftwal_client::ClientError::Unavailable { attempts, .. }) => {
                assert_eq!(attempts, 3)
            }
            other => panic!("round {round}: expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(appender.in_flight(), 0);
}

/// The leader under a pipelined stream stops (a paused process): the appender asks the other
/// nodes who leads, abandons the silent stream and resends its window there, instead of
/// waiting out the request timeout.
#[tokio::test]
async fn appender_leaves_a_paused_leader_for_the_new_one() {
    use std::time::Duration;
    let (old, new, cfg) = common::leader_and_successor().await;
    let client = Client::connect(cfg).await.expect("connect");
    let appender = client.appender(AppenderConfig::default()).expect("appender");
    appender.send(["before"]).await.expect("send").await.expect("appended");

    common::pause_and_hand_over(&old, &new);
    let after = appender.send(["after"]).await.expect("send");
    let appended = tokio::time::timeout(Duration::from_secs(30), after)
        .await
        .expect("not left waiting for the 60 s request timeout")
        .expect("appended");
    assert_eq!(appended.first_offset.0, 2);
    assert_eq!(new.node.calls("append_stream"), 1, "the window went to the new leader");
    appender.close().await.expect("close");
}
