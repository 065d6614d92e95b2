//! The HTTP admin port, pipelined appends over AppendStream, and limits that answer
//! RESOURCE_EXHAUSTED at once.

mod support;

use std::time::Duration;

use raftwal_client::proto::FollowRequest;
use raftwal_client::proto::log_client::LogClient;
use raftwal_client::{AppenderConfig, Offset};
use support::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET: (status code, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out.split_whitespace().nth(1).expect("status").parse().expect("code");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_port_serves_metrics_health_and_status() {
    let c = Cluster::start(3, 0).await;
    let leader = c.leader().await;
    let client = c.client().await;
    let a = client.append(["m"]).await.expect("append");
    c.wait_applied(leader, a.last_offset.0).await;
    let http = c.nodes[&leader].http_addr;
    assert_eq!(get(http, "/livez").await.0, 200);
    let (code, body) = get(http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(http, "/v1/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["role"], "leader");
    assert_eq!(status["node_id"], leader);
    assert_eq!(status["members"].as_array().expect("members").len(), 3);
    let (code, metrics) = get(http, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "raftwal_server_has_leader",
        "raftwal_server_leader_changes_seen_total",
        "raftwal_server_proposals_committed_total",
        "raftwal_server_append_duration_seconds_bucket",
        "raftwal_wal_fsync_duration_seconds_bucket",
        "raftwal_wal_group_entries_bucket",
        "raftwal_transport_sent_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    assert_eq!(get(http, "/nope").await.0, 404);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_appends_commit_in_order() {
    let c = Cluster::start(3, 0).await;
    c.leader().await;
    let client = c.client().await;
    let appender = client.appender(AppenderConfig { window: 32 }).expect("appender");
    let mut tickets = Vec::new();
    for i in 0..500 {
        tickets.push(appender.send([format!("p{i}")]).await.expect("send"));
    }
    let mut offsets = Vec::new();
    for t in tickets {
        offsets.push(t.await.expect("committed").first_offset);
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets follow send order");
    let batch = client.read(offsets[0], 1000, 0).await.expect("read");
    let data: Vec<Vec<u8>> = batch.records.iter().take(500).map(|r| r.data.to_vec()).collect();
    let expected: Vec<Vec<u8>> = (0..500).map(|i| format!("p{i}").into_bytes()).collect();
    assert_eq!(data, expected);
    appender.close().await.expect("close");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_beyond_the_limit_are_refused_at_once() {
    let c = Cluster::start_with(3, 0, |_, cfg| cfg.followers_max = 1).await;
    c.leader().await;
    let mut raw = LogClient::connect(c.endpoint(1)).await.expect("connect");
    let _first = raw.follow(FollowRequest { from_offset: 1 }).await.expect("the first follower");
    let second =
        tokio::time::timeout(Duration::from_secs(5), raw.follow(FollowRequest { from_offset: 1 }))
            .await
            .expect("answered at once");
    let status = second.expect_err("the second follower is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // A read still works: only Follow streams are limited.
    let client = c.client_of(1).await;
    client.read(Offset(1), 10, 0).await.expect("read");
    c.shutdown().await;
}
