//! Unary appends: at-most-once retries, typed errors, reads.

mod common;

use std::time::Duration;

use common::{FakeLog, FakeNode, Fault, config, serve};
use raftwal_client::{AppendOptions, Client, ClientError, Offset};
use tonic::Code;

#[tokio::test]
async fn a_lost_answer_is_retried_with_the_same_producer_and_sequence() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    // The first attempt commits and never answers; the client's deadline ends it.
    leader.node.push_faults([Fault::CommitThenHang]);
    let mut config = config(&[&leader.url]);
    config.request_timeout = Duration::from_millis(300);
    let client = Client::connect(config).await.expect("connect");

    let appended = client.append(["a", "b"]).await.expect("append");
    assert!(appended.duplicate, "the retry must be answered as a duplicate");
    assert_eq!((appended.first_offset, appended.last_offset), (Offset(1), Offset(2)));

    let next = client.append(["c"]).await.expect("next append");
    assert_eq!(next.first_offset, Offset(3));

    let log = common::lock(&log);
    let seen: Vec<_> =
        log.seen.iter().map(|s| s.producer.expect("every append has a producer")).collect();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], seen[1], "a retry reuses the producer id and sequence");
    assert_eq!(seen[2].0, seen[0].0, "one producer id per client");
    assert_eq!(seen[2].1, seen[0].1 + 1, "a new append takes the next sequence");
    assert_eq!(log.find(b"a"), (Some(1), 1), "appended once");
}

#[tokio::test]
async fn a_deadline_on_every_attempt_is_an_unknown_outcome() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    leader.node.push_faults((0..3).map(|_| Fault::CommitThenFail(Code::DeadlineExceeded)));
    let mut config = config(&[&leader.url]);
    config.retries_max = 2;
    let client = Client::connect(config).await.expect("connect");

    match client.append(["x"]).await {
        Err(ClientError::UnknownOutcome { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected UnknownOutcome, got {other:?}"),
    }
    let log = common::lock(&log);
    assert_eq!(log.find(b"x"), (Some(1), 1));
    assert!(log.seen.windows(2).all(|w| w[0].producer == w[1].producer));
}

#[tokio::test]
async fn offset_mismatch_carries_the_next_offset() {
    let log = FakeLog::with_history(5, 2);
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");
    let next = common::lock(&log).next_offset;

    let wrong = AppendOptions { expected_next_offset: Some(Offset(next + 7)) };
    match client.append_with(["x"], wrong).await {
        Err(ClientError::OffsetMismatch { next_offset }) => assert_eq!(next_offset, Offset(next)),
        other => panic!("expected OffsetMismatch, got {other:?}"),
    }
    let right = AppendOptions { expected_next_offset: Some(Offset(next)) };
    let appended = client.append_with(["x"], right).await.expect("append at the expected offset");
    assert_eq!(appended.first_offset, Offset(next));
    assert_eq!(leader.node.calls("append"), 2, "a mismatch is not retried");
}

#[tokio::test]
async fn overloaded_is_retried_then_surfaced() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");

    // Twice overloaded, then accepted: the caller sees only the success.
    leader.node.push_faults((0..2).map(|_| Fault::Refuse(Code::ResourceExhausted, "busy")));
    client.append(["x"]).await.expect("append after two overloaded answers");
    assert_eq!(leader.node.calls("append"), 3);

    // Always overloaded: surfaced after overloaded_retries_max (3) retries.
    leader.node.push_faults((0..10).map(|_| Fault::Refuse(Code::ResourceExhausted, "busy")));
    match client.append(["y"]).await {
        Err(ClientError::Overloaded { attempts, .. }) => assert_eq!(attempts, 4),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(leader.node.calls("append"), 7);
    assert_eq!(common::lock(&log).find(b"y"), (None, 0));
}

#[tokio::test]
async fn invalid_arguments_are_final_and_empty_appends_never_leave() {
    let log = FakeLog::new();
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");

    leader.node.push_faults([Fault::Refuse(Code::InvalidArgument, "record over 1 MiB")]);
    match client.append(["x"]).await {
        Err(ClientError::InvalidArgument { message }) => assert_eq!(message, "record over 1 MiB"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(leader.node.calls("append"), 1);

    match client.append(Vec::<Vec<u8>>::new()).await {
        Err(ClientError::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(leader.node.calls("append"), 1, "an empty append is refused before sending");
}

#[tokio::test]
async fn reads_are_served_by_a_follower_and_report_trimming() {
    let log = FakeLog::with_history(30, 4);
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let follower = serve(FakeNode::follower("follower", &log, &leader.addr.to_string())).await;
    let client = Client::connect(config(&[&follower.url])).await.expect("connect");

    let mut from = Offset(1);
    let mut offsets = Vec::new();
    loop {
        let batch = client.read(from, 7, 0).await.expect("read");
        if batch.records.is_empty() {
            break;
        }
        offsets.extend(batch.records.iter().map(|r| r.offset.get()));
        from = batch.next_offset;
    }
    let expected: Vec<u64> = common::lock(&log).records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, expected);
    assert_eq!(leader.node.calls("read"), 0, "the follower served every read");

    client.trim(Offset(10)).await.expect("trim");
    match client.read(Offset(3), 0, 0).await {
        Err(ClientError::Trimmed { first_offset }) => assert_eq!(first_offset, Offset(10)),
        other => panic!("expected Trimmed, got {other:?}"),
    }
}
