//! Finding the leader: redirects, refused connections, an unknown leader, admin calls.

mod common;

use common::{FakeLog, FakeNode, config, refused_url, serve};
use raftwal_client::{Client, ClientError, NodeId, Offset};

#[tokio::test]
async fn follows_not_leader_to_the_named_leader_and_appends_there() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let follower = serve(FakeNode::follower("follower", &log, &leader.addr.to_string())).await;
    // Only the follower is configured: the leader is learned from its answer.
    let client = Client::connect(config(&[&follower.url])).await.expect("connect");

    let appended = client.append([b"one".to_vec()]).await.expect("append");
    assert_eq!(appended.first_offset, Offset(1));
    assert!(!appended.duplicate);
    assert_eq!(client.leader_endpoint(), leader.url);

    // The next append goes straight to the leader.
    client.append([b"two".to_vec()]).await.expect("second append");
    assert_eq!(follower.node.calls("append"), 1);
    assert_eq!(leader.node.calls("append"), 2);
    let log = common::lock(&log);
    assert_eq!(log.find(b"one"), (Some(1), 1));
    assert_eq!(log.find(b"two"), (Some(2), 1));
}

#[tokio::test]
async fn skips_an_endpoint_that_refuses_connections() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let client =
        Client::connect(config(&[refused_url(), leader.url.clone()])).await.expect("connect");

    let appended = client.append(["x"]).await.expect("append");
    assert_eq!(appended.first_offset, Offset(1));
    assert_eq!(client.leader_endpoint(), leader.url);
    // The refused attempt never reached a server, so the append ran once.
    assert_eq!(common::lock(&log).seen.len(), 1);
}

#[tokio::test]
async fn moves_to_the_next_endpoint_when_no_leader_is_known() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let lost = serve(FakeNode::follower("lost", &log, "")).await;
    let client =
        Client::connect(config(&[lost.url.clone(), leader.url.clone()])).await.expect("connect");

    client.append(["x"]).await.expect("append");
    assert_eq!(lost.node.calls("append"), 1);
    assert_eq!(leader.node.calls("append"), 1);
}

#[tokio::test]
async fn every_endpoint_refusing_is_unavailable_not_unknown() {
    let mut config = config(&[refused_url(), refused_url()]);
    config.retries_max = 3;
    let client = Client::connect(config).await.expect("connect");

    match client.append(["x"]).await {
        Err(ClientError::Unavailable { attempts, last }) => {
            assert_eq!(attempts, 4);
            assert!(!last.is_empty());
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn admin_calls_and_status_follow_the_leader() {
    let log = FakeLog::with_history(10, 0);
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let follower = serve(FakeNode::follower("follower", &log, &leader.addr.to_string())).await;
    let client = Client::connect(config(&[&follower.url])).await.expect("connect");

    assert_eq!(client.trim(Offset(5)).await.expect("trim"), Offset(5));
    assert_eq!(follower.node.calls("trim"), 1);
    assert_eq!(leader.node.calls("trim"), 1);

    let membership =
        client.add_learner(NodeId(4), "127.0.0.1:9004", "127.0.0.1:7004").await.expect("add");
    assert_eq!(membership.members.len(), 1);
    assert_eq!(membership.members[0].id, NodeId(4));
    assert_eq!(leader.node.calls("add_learner"), 1);

    let status = client.status().await.expect("status");
    assert_eq!(status.role, "leader");
    assert_eq!(status.first_offset, 5);

    // A server error other than the ones with a meaning is returned as is, not retried.
    match client.promote(NodeId(4)).await {
        Err(ClientError::Other(status)) => assert_eq!(status.code(), tonic::Code::Unimplemented),
        other => panic!("expected Other, got {other:?}"),
    }
}

/// A leader that stops answering anything (a paused process): the call does not wait out its
/// request timeout. A leader check finds the node that leads now, the attempt is abandoned
/// (its outcome unknown, as after a timeout) and the append, retried with its producer
/// sequence, lands on the new leader.
#[tokio::test]
async fn a_paused_leader_is_left_for_the_new_one_long_before_the_request_timeout() {
    use std::time::{Duration, Instant};
    let (old, new, cfg) = common::leader_and_successor().await;
    let client = Client::connect(cfg).await.expect("connect");
    client.append(["before"]).await.expect("append to the old leader");

    common::pause_and_hand_over(&old, &new);
    let started = Instant::now();
    let appended = tokio::time::timeout(Duration::from_secs(30), client.append(["after"]))
        .await
        .expect("not left waiting for the 60 s request timeout")
        .expect("append");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(client.leader_endpoint(), new.url, "the client follows the new leader");
    assert_eq!(appended.first_offset, Offset(2));
    assert!(new.node.calls("status") > 0, "the new leader was asked who leads");
}

#[tokio::test]
async fn a_slow_leader_that_still_answers_as_leader_is_not_abandoned() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    // A deposed node that still believes it leads, in an older term.
    let stale = serve(FakeNode::leader("stale", &log)).await;
    stale.node.term.store(0, Ordering::SeqCst);
    let mut cfg = config(&[leader.url.clone(), stale.url.clone()]);
    cfg.leader_check_after = Duration::from_millis(50);
    let client = Client::connect(cfg).await.expect("connect");
    client.append(["first"]).await.expect("append");
    // The leader commits, then is slow to answer (the answer never comes; a timeout later
    // would retry with the same producer sequence).
    leader.node.push_faults([common::Fault::CommitThenHang]);
    let call = tokio::time::timeout(Duration::from_millis(600), client.append(["second"])).await;
    assert!(call.is_err(), "still waiting on the leader, not redirected to the stale node");
    assert_eq!(stale.node.calls("append"), 0, "nothing sent to a node of an older term");
    assert!(leader.node.calls("status") > 0, "the leader was asked");
}
