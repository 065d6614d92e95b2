//! Follow: resumption after failures, no repeats, no skips, trimming.

mod common;

use common::{FakeLog, FakeNode, FollowScript, config, serve};
use raftwal_client::{Client, ClientError, Follow, FollowEvent, Offset};
use tokio_stream::StreamExt;

/// Reads events until the log's records up to `until` have all arrived, checking order on
/// the way. Returns the offsets and how many CaughtUp markers came.
async fn collect_until(follow: &mut Follow, until: u64) -> (Vec<u64>, usize) {
    let mut offsets: Vec<u64> = Vec::new();
    let mut caught_up = 0;
    while offsets.last().is_none_or(|&last| last < until) {
        match follow.next().await.expect("the follow does not end").expect("no error") {
            FollowEvent::Records(records) => {
                assert!(!records.is_empty(), "a Records event is never empty");
                for record in records {
                    let offset = record.offset.get();
                    assert!(
                        offsets.last().is_none_or(|&last| offset > last),
                        "offset {offset} repeats or goes back"
                    );
                    assert_eq!(
                        record.data,
                        format!("r{}", offsets.len()).into_bytes(),
                        "a record was skipped"
                    );
                    offsets.push(offset);
                }
            }
            FollowEvent::CaughtUp { next_offset } => {
                assert!(offsets.last().is_none_or(|&last| next_offset.get() > last));
                caught_up += 1;
            }
        }
    }
    (offsets, caught_up)
}

#[tokio::test]
async fn follow_resumes_after_dropped_streams_without_repeats_or_skips() {
    // 1,000 records whose offsets skip by two after every 7th.
    let log = FakeLog::with_history(1000, 7);
    let node = FakeNode::leader("leader", &log);
    // Three connections break mid-history (the later ones also start a few records early, as
    // a confused server might), one ends cleanly, then a normal one.
    node.follow_scripts.lock().expect("scripts").extend([
        FollowScript { rewind: 0, break_after_batches: Some(3), end_cleanly: false },
        FollowScript { rewind: 5, break_after_batches: Some(2), end_cleanly: false },
        FollowScript { rewind: 60, break_after_batches: Some(4), end_cleanly: true },
        FollowScript { rewind: 1, break_after_batches: Some(1), end_cleanly: false },
    ]);
    let leader = serve(node).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");

    let expected: Vec<u64> = common::lock(&log).records.iter().map(|r| r.offset).collect();
    let last = *expected.last().expect("a history");
    let mut follow = client.follow(Offset(1));
    let (offsets, _) = collect_until(&mut follow, last).await;
    assert_eq!(offsets, expected);
    assert_eq!(leader.node.calls("follow"), 5);

    // The marker after the history, then live records.
    match follow.next().await.expect("an event").expect("no error") {
        FollowEvent::CaughtUp { next_offset } => assert_eq!(next_offset, follow.next_offset()),
        other => panic!("expected CaughtUp, got {other:?}"),
    }
    let appended = client.append(["r1000"]).await.expect("append");
    match follow.next().await.expect("an event").expect("no error") {
        FollowEvent::Records(records) => {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].offset, appended.first_offset);
        }
        other => panic!("expected the live record, got {other:?}"),
    }
}

#[tokio::test]
async fn follow_moves_to_another_node_when_one_goes_away() {
    let log = FakeLog::with_history(500, 3);
    let dying = FakeNode::leader("dying", &log);
    dying.follow_scripts.lock().expect("scripts").push_back(FollowScript {
        rewind: 0,
        break_after_batches: Some(4),
        end_cleanly: false,
    });
    *dying.refuse_follows_after_script.lock().expect("refuse") = true;
    let dying = serve(dying).await;
    let other = serve(FakeNode::follower("other", &log, "")).await;
    let client =
        Client::connect(config(&[dying.url.clone(), other.url.clone()])).await.expect("connect");

    let expected: Vec<u64> = common::lock(&log).records.iter().map(|r| r.offset).collect();
    let mut follow = client.follow(Offset(1));
    let (offsets, caught_up) =
        collect_until(&mut follow, *expected.last().expect("a history")).await;
    assert_eq!(offsets, expected);
    assert_eq!(caught_up, 0, "the history ends before the marker");
    assert_eq!(dying.node.calls("follow"), 1);
    assert_eq!(other.node.calls("follow"), 1);
}

#[tokio::test]
async fn follow_from_a_trimmed_offset_ends_with_trimmed() {
    let log = FakeLog::with_history(20, 0);
    common::lock(&log).first_offset = 8;
    let leader = serve(FakeNode::leader("leader", &log)).await;
    let client = Client::connect(config(&[&leader.url])).await.expect("connect");

    let mut follow = client.follow(Offset(2));
    match follow.next().await {
        Some(Err(ClientError::Trimmed { first_offset })) => assert_eq!(first_offset, Offset(8)),
        other => panic!("expected Trimmed, got {other:?}"),
    }
    assert!(follow.next().await.is_none(), "the stream ends after its error");
}

#[tokio::test]
async fn follow_gives_up_with_unavailable_when_no_node_answers() {
    let mut config = config(&[common::refused_url(), common::refused_url()]);
    config.retries_max = 3;
    let client = Client::connect(config).await.expect("connect");

    let mut follow = client.follow(Offset(1));
    match follow.next().await {
        Some(Err(ClientError::Unavailable { attempts, .. })) => assert_eq!(attempts, 4),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(follow.next().await.is_none());
}
