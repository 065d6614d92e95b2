//! Named streams over gRPC (`raftwal.v1.Streams`) and the Rust client on a 3-node cluster:
//! every call on a follower as on the leader, optimistic concurrency on one stream, a fenced
//! producer epoch, follows of one stream and of all (every stream and the single log in log
//! order, refused appends not served), and bad input refused with nothing changed.

mod support;

use std::time::Duration;

use raftwal_client::proto::{CreateStreamRequest, StreamProducer, StreamRecord};
use raftwal_client::{Client, ClientError, StreamAppendOptions, StreamEvent, StreamFollow};
use support::Cluster;

fn text_stream(name: &str) -> CreateStreamRequest {
    CreateStreamRequest {
        name: name.into(),
        content_type: "text/plain".into(),
        ..Default::default()
    }
}

fn expect(version: u64) -> StreamAppendOptions {
    StreamAppendOptions { expected_version: Some(version), ..Default::default() }
}

fn producer(epoch: u64, sequence: u64) -> StreamAppendOptions {
    StreamAppendOptions {
        producer: Some(StreamProducer { id: "primary".into(), epoch, sequence }),
        ..Default::default()
    }
}

async fn a_follower(c: &Cluster) -> u64 {
    let leader = c.leader().await;
    (1..=3).find(|&id| id != leader).expect("a follower")
}

/// The next event of a follow, within 10 s.
async fn next_event(f: &mut StreamFollow) -> StreamEvent {
    tokio::time::timeout(Duration::from_secs(10), f.next())
        .await
        .expect("an event within 10 s")
        .expect("the follow goes on")
        .expect("no error")
}

/// Records of a follow until it has `n` of them.
async fn records(f: &mut StreamFollow, n: usize) -> Vec<StreamRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        if let StreamEvent::Records(r) = next_event(f).await {
            out.extend(r);
        }
    }
    out
}

fn invalid<T>(r: Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::InvalidArgument { .. }))
}

fn datas(records: &[StreamRecord]) -> Vec<(String, u64, String)> {
    records
        .iter()
        .map(|r| (r.stream.clone(), r.offset, String::from_utf8_lossy(&r.data).into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_works_on_a_follower_as_on_the_leader() {
    let c = Cluster::start(3, 0).await;
    let leader = c.leader().await;
    let follower = a_follower(&c).await;
    let (on_follower, on_leader) = (c.client_of(follower).await, c.client_of(leader).await);

    let mut create = text_stream("orders/1");
    create.records = vec![b"created;".to_vec()];
    let info = on_follower.create_stream(create.clone()).await.expect("create");
    assert!(info.created);
    assert_eq!((info.next_offset, info.version), (8, 1));
    // The same create again confirms it; other settings are refused.
    assert!(!on_leader.create_stream(create.clone()).await.expect("again").created);
    let mut other = create.clone();
    other.ttl_secs = Some(60);
    assert!(matches!(
        on_follower.create_stream(other).await,
        Err(ClientError::AlreadyExists { .. })
    ));

    // A follow from the start, opened on the leader before the appends.
    let mut follow = on_leader.follow_stream("orders/1", 0);
    assert_eq!(datas(&records(&mut follow, 1).await), [("orders/1".into(), 0, "created;".into())]);
    assert!(matches!(next_event(&mut follow).await, StreamEvent::CaughtUp { closed: false, .. }));

    let a =
        on_follower.stream_append("orders/1", ["paid;", "sent;"], expect(1)).await.expect("append");
    assert_eq!((a.first_offset, a.next_offset, a.version, a.duplicate), (8, 18, 3, false));
    // Read on the other follower: its own writes, on any node.
    let third = (1..=3).find(|&id| id != leader && id != follower).expect("a third node");
    let read = c.client_of(third).await.read_stream("orders/1", 8, 0).await.expect("read");
    assert_eq!(
        datas(&read.records),
        [("orders/1".into(), 8, "paid;".into()), ("orders/1".into(), 13, "sent;".into())]
    );
    assert_eq!((read.next_offset, read.up_to_date, read.closed), (18, true, false));
    // The follow sees the live records.
    assert_eq!(
        datas(&records(&mut follow, 2).await),
        [("orders/1".into(), 8, "paid;".into()), ("orders/1".into(), 13, "sent;".into())]
    );

    on_follower.create_stream(text_stream("orders/2")).await.expect("create");
    on_follower.create_stream(text_stream("users/1")).await.expect("create");
    let list = on_follower.list_streams("orders/", "", 0).await.expect("list");
    let names: Vec<&str> = list.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["orders/1", "orders/2"]);
    let page = on_follower.list_streams("", "", 1).await.expect("list");
    assert_eq!((page.streams.len(), page.more), (1, true));
    let rest = on_follower.list_streams("", "orders/1", 0).await.expect("list");
    let names: Vec<&str> = rest.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["orders/2", "users/1"]);

    // Close: the follow ends, appends are refused, the description says so.
    let closed = on_follower.close_stream("orders/1", None).await.expect("close");
    assert!(closed.closed);
    assert!(matches!(
        next_event(&mut follow).await,
        StreamEvent::CaughtUp { next_offset: 18, closed: true }
    ));
    assert!(follow.next().await.is_none(), "a closed stream's follow ends");
    assert!(matches!(
        on_leader.stream_append("orders/1", ["late"], Default::default()).await,
        Err(ClientError::StreamClosed { next_offset: 18 })
    ));
    let d = on_follower.describe_stream("orders/1").await.expect("describe");
    assert_eq!((d.closed, d.version, d.next_offset), (true, 3, 18));

    on_follower.delete_stream("orders/1").await.expect("delete");
    assert!(matches!(
        on_leader.describe_stream("orders/1").await,
        Err(ClientError::NotFound { .. })
    ));
    assert!(matches!(
        on_follower.read_stream("orders/1", 0, 0).await,
        Err(ClientError::NotFound { .. })
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_racing_writers_wins_and_an_old_producer_epoch_is_fenced() {
    let c = Cluster::start(3, 0).await;
    let client = c.client().await;
    for name in ["cart/a", "cart/b", "wal/db1"] {
        client.create_stream(text_stream(name)).await.expect("create");
    }
    let (w1, w2) = (client.clone(), c.client_of(a_follower(&c).await).await);
    let (r1, r2) = tokio::join!(
        w1.stream_append("cart/a", ["apples"], expect(0)),
        w2.stream_append("cart/a", ["pears"], expect(0)),
    );
    let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one writer wins: {r1:?} {r2:?}");
    let lost = if r1.is_ok() { r2 } else { r1 };
    assert!(matches!(lost, Err(ClientError::StreamVersionMismatch { version: 1 })), "{lost:?}");
    // Another stream does not conflict.
    client.stream_append("cart/b", ["plums"], expect(0)).await.expect("another stream");

    client.stream_append("wal/db1", ["old-0"], producer(0, 0)).await.expect("first primary");
    let again = client.stream_append("wal/db1", ["old-0"], producer(0, 0)).await.expect("retry");
    assert!(again.duplicate, "a retry of an applied sequence is a duplicate");
    client.stream_append("wal/db1", ["new-0"], producer(1, 0)).await.expect("new primary");
    assert!(matches!(
        client.stream_append("wal/db1", ["old-1"], producer(0, 1)).await,
        Err(ClientError::Fenced { epoch: 1 })
    ));
    assert!(matches!(
        client.stream_append("wal/db1", ["new-2"], producer(1, 2)).await,
        Err(ClientError::SequenceGap { expected: 1 })
    ));
    let read = client.read_stream("wal/db1", 0, 0).await.expect("read");
    let texts: Vec<String> = datas(&read.records).into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(texts, ["old-0", "new-0"]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_is_every_stream_and_the_single_log_in_log_order() {
    let c = Cluster::start(3, 0).await;
    let client = c.client().await;
    let on_follower = c.client_of(a_follower(&c).await).await;
    let mut all = on_follower.follow_stream("", 0);
    client.create_stream(text_stream("s1")).await.expect("create");
    client.create_stream(text_stream("s2")).await.expect("create");
    client.append(["log-a"]).await.expect("single log");
    client.stream_append("s1", ["x1", "x2"], Default::default()).await.expect("append");
    // Refused by the stream's state: in the log, in no stream, never served.
    assert!(client.stream_append("s2", ["refused"], expect(5)).await.is_err());
    client.stream_append("s2", ["y1"], Default::default()).await.expect("append");
    client.append(["log-b"]).await.expect("single log");
    client.stream_append("s1", ["x3"], Default::default()).await.expect("append");
    // A deleted stream's records are served by neither view.
    client.create_stream(text_stream("gone")).await.expect("create");
    client.stream_append("gone", ["g1"], Default::default()).await.expect("append");
    client.delete_stream("gone").await.expect("delete");

    // (stream, offset in it, data); a record of the single log is known by its log offset,
    // compared as 0 here.
    let want_offsets: Vec<(String, u64, String)> = [
        ("", 0, "log-a"),
        ("s1", 0, "x1"),
        ("s1", 2, "x2"),
        ("s2", 0, "y1"),
        ("", 0, "log-b"),
        ("s1", 4, "x3"),
    ]
    .iter()
    .map(|(s, o, d)| (s.to_string(), *o, d.to_string()))
    .collect();
    let strip = |r: Vec<(String, u64, String)>| -> Vec<(String, u64, String)> {
        r.into_iter().map(|(s, o, d)| (s.clone(), if s.is_empty() { 0 } else { o }, d)).collect()
    };
    let got = records(&mut all, want_offsets.len()).await;
    assert_eq!(strip(datas(&got)), want_offsets, "the follow of all");
    let positions: Vec<u64> = got.iter().map(|r| r.position).collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "log order: {positions:?}");

    let read = client.read_stream("", 0, 0).await.expect("read all");
    assert_eq!(strip(datas(&read.records)), want_offsets, "a read of all");
    assert!(read.up_to_date);
    // From the middle: a log offset, whole commands only.
    let from = got[2].position;
    let tail = client.read_stream("", from, 0).await.expect("read all");
    assert_eq!(strip(datas(&tail.records)), want_offsets[1..].to_vec());

    // Live records reach the follow.
    client.stream_append("s2", ["y2"], Default::default()).await.expect("append");
    let live = records(&mut all, 1).await;
    assert_eq!(datas(&live), [("s2".into(), 2, "y2".into())]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_changes_nothing() {
    let c = Cluster::start(3, 0).await;
    let client: Client = c.client().await;
    let mut json = text_stream("j");
    json.content_type = "application/json".into();
    client.create_stream(json).await.expect("create");
    client.create_stream(text_stream("t")).await.expect("create");

    assert!(invalid(client.create_stream(text_stream("")).await), "an empty name");
    assert!(invalid(client.create_stream(text_stream(&"n".repeat(1025))).await), "a long name");
    let mut bad_ct = text_stream("x");
    bad_ct.content_type = "not a type".into();
    assert!(invalid(client.create_stream(bad_ct).await), "a bad content type");
    let mut both = text_stream("x");
    both.ttl_secs = Some(60);
    both.expires_at = "2030-01-01T00:00:00Z".into();
    assert!(invalid(client.create_stream(both).await), "a TTL and an expiry");
    let mut bad_at = text_stream("x");
    bad_at.expires_at = "tomorrow".into();
    assert!(invalid(client.create_stream(bad_at).await), "a bad expiry");
    let mut empty_record = text_stream("x");
    empty_record.records = vec![Vec::new()];
    assert!(invalid(client.create_stream(empty_record).await), "an empty record");
    assert!(invalid(client.stream_append("t", [""], Default::default()).await), "empty record");
    let none: [&str; 0] = [];
    assert!(invalid(client.stream_append("t", none, Default::default()).await), "no records");
    assert!(invalid(client.stream_append("j", ["{oops"], Default::default()).await), "bad JSON");
    assert!(invalid(client.stream_append("j", ["1 2"], Default::default()).await), "two values");
    let over = vec![0u8; 2 << 20];
    assert!(
        matches!(
            client.stream_append("t", [over], Default::default()).await,
            Err(ClientError::InvalidArgument { .. } | ClientError::TooLarge { .. })
        ),
        "an append over record_bytes_max"
    );
    let nameless =
        StreamAppendOptions { producer: Some(StreamProducer::default()), ..Default::default() };
    assert!(invalid(client.stream_append("t", ["a"], nameless).await), "a producer without id");
    assert!(matches!(
        client.stream_append("missing", ["a"], Default::default()).await,
        Err(ClientError::NotFound { .. })
    ));
    assert!(matches!(client.delete_stream("missing").await, Err(ClientError::NotFound { .. })));
    let beyond = client.follow_stream("t", 99).next().await.expect("an answer");
    assert!(invalid(beyond), "a follow from beyond the tail");

    // Nothing changed: the two streams, empty.
    let list = client.list_streams("", "", 0).await.expect("list");
    let names: Vec<(&str, u64)> =
        list.streams.iter().map(|s| (s.name.as_str(), s.version)).collect();
    assert_eq!(names, [("j", 0), ("t", 0)]);
    client.stream_append("j", ["{\"ok\":1}", "[1,2]"], Default::default()).await.expect("JSON");
    c.shutdown().await;
}
