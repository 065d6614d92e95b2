//! Trims of a log that holds named streams: the log goes no lower than the oldest record a live
//! stream still reads (a deleted stream's records go), every node keeps its stream state in a
//! checkpoint (a restart needs none of the dropped commands), and a node that joins after the
//! trim fetches a peer's state and serves the streams like the others.

mod support;

use raftwal_client::proto::CreateStreamRequest;
use raftwal_client::{Client, NodeId, Offset};
use support::Cluster;

fn text_stream(name: &str) -> CreateStreamRequest {
    CreateStreamRequest {
        name: name.into(),
        content_type: "text/plain".into(),
        ..Default::default()
    }
}

/// The messages of `name` as node `client` serves them.
async fn messages(client: &Client, name: &str) -> Vec<String> {
    let r = client.read_stream(name, 0, 0).await.expect("read");
    r.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trim_keeps_live_streams_records_and_a_later_node_fetches_the_state() {
    let mut c = Cluster::start(3, 1).await;
    let client = c.client().await;
    // "live" is created first and written to later: its create command goes with the trim.
    client.create_stream(text_stream("live")).await.expect("create");
    client.create_stream(text_stream("old")).await.expect("create");
    for i in 0..50 {
        client
            .stream_append("old", [format!("old-{i}")], Default::default())
            .await
            .expect("append");
    }
    client.append(["single-log"]).await.expect("append");
    client.delete_stream("old").await.expect("delete");
    let first_live =
        client.stream_append("live", ["live-0"], Default::default()).await.expect("append");
    let position = client.read_stream("live", 0, 0).await.expect("read").records[0].position;
    for i in 1..20 {
        client
            .stream_append("live", [format!("live-{i}")], Default::default())
            .await
            .expect("append");
    }
    assert_eq!(first_live.version, 1);
    let want: Vec<String> = (0..20).map(|i| format!("live-{i}")).collect();

    // Asked to trim everything: the log goes only as far as "live"'s first record.
    let last = client.status().await.expect("status").commit_offset;
    let first = client.trim(Offset(last)).await.expect("trim");
    assert_eq!(first, Offset(position), "the trim stops at the first record a stream reads");
    for id in 1..=3 {
        c.wait_applied(id, last + 1).await;
        assert_eq!(messages(&c.client_of(id).await, "live").await, want, "node {id}");
    }

    // Every node restarts from its checkpoint: "live"'s create command is gone from the log.
    for id in 1..=3 {
        c.stop_node(id).await;
    }
    for id in 1..=3 {
        c.start_node(id).await;
    }
    c.leader().await;
    let client = c.client().await;
    for id in 1..=3 {
        let on = c.client_of(id).await;
        assert_eq!(messages(&on, "live").await, want, "node {id} after a restart");
        let list = on.list_streams("", "", 0).await.expect("list");
        let names: Vec<&str> = list.streams.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["live"], "node {id}: the deleted stream stays deleted");
    }

    // A node that joins now restarts its log at the leader's start and fetches the state.
    c.start_node(4).await;
    let cfg = c.configs[&4].clone();
    client
        .add_learner(NodeId(4), &cfg.peer_listen.to_string(), &cfg.api_listen.to_string())
        .await
        .expect("add learner");
    let done = client.stream_append("live", ["live-20"], Default::default()).await.expect("append");
    let mut want = want;
    want.push("live-20".into());
    let on4 = c.client_of(4).await;
    let mut got = Vec::new();
    for _ in 0..100 {
        match on4.read_stream("live", 0, 0).await {
            Ok(r) if r.next_offset >= done.next_offset => {
                got = r
                    .records
                    .iter()
                    .map(|r| String::from_utf8_lossy(&r.data).into_owned())
                    .collect();
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(got, want, "the new node serves the stream");
    // And it goes on applying commands on that state.
    let r = on4.stream_append("live", ["live-21"], Default::default()).await.expect("append");
    assert_eq!(r.version, 22);
    c.shutdown().await;
}
