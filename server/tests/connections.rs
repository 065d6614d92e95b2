//! Open connections are bounded on the client port and the HTTP admin port: over the bound a
//! new connection is closed at once (and counted), and once connections close, new ones are
//! served again. Without a bound, enough clients run a node out of file descriptors.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::Cluster;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Connects `n` times and keeps the connections open.
async fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Let the node accept them all before the next one comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held
}

/// Whether the node closes a fresh connection to `addr` without a word.
async fn refused(addr: SocketAddr) -> bool {
    let mut extra = TcpStream::connect(addr).await.expect("the kernel accepts the connection");
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_bound_are_closed_and_served_again_once_others_close() {
    let c = Cluster::start_with(1, 0, |_, cfg| {
        cfg.max_client_connections = 3;
        cfg.max_http_connections = 2;
        cfg.max_stream_connections = 2;
    })
    .await;
    c.leader().await;
    let api = c.configs[&1].api_listen;
    let http = c.nodes[&1].http_addr;

    let held = hold(api, 3).await;
    assert!(refused(api).await, "a fourth client connection must be closed");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = c.client().await;
    client.status().await.expect("a client is served once the others left");

    let held = hold(http, 2).await;
    assert!(refused(http).await, "a third HTTP connection must be closed");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(http).await.expect("connect");
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    let streams = c.nodes[&1].streams_addr.expect("the streams port is served");
    let held = hold(streams, 2).await;
    assert!(refused(streams).await, "a third streams connection must be closed");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(streams).await.expect("connect");
    s.write_all(b"HEAD /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    assert!(body.starts_with("HTTP/1.1 404"), "{body}");

    let metrics = raftwal_server::http::prometheus().render();
    assert!(metrics.contains("raftwal_server_connections_refused_total"), "counted");
    drop(client);
    c.shutdown().await;
}
