//! Named streams over the Durable Streams HTTP API on a 3-node cluster: writes on any node
//! (a follower hands them to the leader), reads of one's own writes on any node, optimistic
//! concurrency on one stream, a fenced producer epoch, bad input answered 4xx with nothing
//! changed, and streams that survive a restart. (The protocol in full is checked by
//! `conformance/run.sh`, the public suite.)

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use support::Cluster;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A response: status, headers (lowercase names), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One HTTP/1.1 request on its own connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(&request_bytes(addr, method, path, headers, body)).await.expect("write");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.expect("read");
    parse_response(&raw)
}

/// An HTTP/1.1 request that closes its connection after the answer.
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A whole response, as read to the end of its connection.
fn parse_response(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok());
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") {
        body = dechunk(&body);
    }
    Resp { status: status.expect("a status"), headers, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { return out };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

fn streams_addr(c: &Cluster, id: u64) -> SocketAddr {
    c.nodes[&id].streams_addr.expect("the streams API is served")
}

async fn leader_and_follower(c: &Cluster) -> (SocketAddr, SocketAddr) {
    let leader = c.leader().await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    (streams_addr(c, leader), streams_addr(c, follower))
}

const TEXT: (&str, &str) = ("content-type", "text/plain");

/// A request (method, path, headers, body) and the status it must get.
type Case = (&'static str, String, Vec<(&'static str, &'static str)>, Vec<u8>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_any_node_and_reads_of_ones_own_writes_on_any_node() {
    let c = Cluster::start(3, 0).await;
    let (leader, follower) = leader_and_follower(&c).await;
    let r = http(follower, "PUT", "/orders/1", &[TEXT], b"created;").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("stream-next-offset"), Some("0000000000000000_0000000000000008"));
    let r = http(leader, "POST", "/orders/1", &[TEXT], b"paid;").await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = http(follower, "POST", "/orders/1", &[TEXT], b"shipped;").await;
    assert_eq!(r.status, 204, "{r:?}");
    for node in [leader, follower] {
        let r = http(node, "GET", "/orders/1?offset=-1", &[], b"").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, b"created;paid;shipped;");
        assert_eq!(r.header("stream-up-to-date"), Some("true"));
        // From the end of the first message: the rest.
        let r =
            http(node, "GET", "/orders/1?offset=0000000000000000_0000000000000008", &[], b"").await;
        assert_eq!(r.body, b"paid;shipped;");
    }
    let r = http(follower, "HEAD", "/orders/1", &[], b"").await;
    assert_eq!(r.header("raftwal-stream-version"), Some("3"));
    let r = http(follower, "DELETE", "/orders/1", &[], b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(http(leader, "GET", "/orders/1", &[], b"").await.status, 404);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expected_version_lets_one_of_two_racing_writers_win_on_its_stream_only() {
    let c = Cluster::start(3, 0).await;
    let (leader, follower) = leader_and_follower(&c).await;
    for name in ["/cart/a", "/cart/b"] {
        assert_eq!(http(leader, "PUT", name, &[TEXT], b"").await.status, 201);
    }
    let headers = [TEXT, ("raftwal-expected-version", "0")];
    let (one, two, other) = tokio::join!(
        http(leader, "POST", "/cart/a", &headers, b"add apples;"),
        http(follower, "POST", "/cart/a", &headers, b"add pears;"),
        http(follower, "POST", "/cart/b", &headers, b"add plums;"),
    );
    let mut statuses = [one.status, two.status];
    statuses.sort();
    assert_eq!(statuses, [204, 409], "one wins: {one:?} {two:?}");
    let loser = if one.status == 409 { &one } else { &two };
    assert_eq!(loser.header("raftwal-stream-version"), Some("1"), "{loser:?}");
    assert_eq!(other.status, 204, "another stream is not affected: {other:?}");
    let r = http(leader, "GET", "/cart/a", &[], b"").await;
    assert!(r.body == b"add apples;" || r.body == b"add pears;", "{r:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newer_producer_epoch_fences_the_old_one() {
    let c = Cluster::start(3, 0).await;
    let (leader, follower) = leader_and_follower(&c).await;
    assert_eq!(http(leader, "PUT", "/wal/db1", &[TEXT], b"").await.status, 201);
    let producer = |epoch: &'static str, seq: &'static str| {
        [TEXT, ("producer-id", "primary"), ("producer-epoch", epoch), ("producer-seq", seq)]
    };
    assert_eq!(http(leader, "POST", "/wal/db1", &producer("0", "0"), b"old-0;").await.status, 200);
    // A new primary takes over with epoch 1 (through another node).
    let r = http(follower, "POST", "/wal/db1", &producer("1", "0"), b"new-0;").await;
    assert_eq!(r.status, 200, "{r:?}");
    // The old primary, unaware, goes on: refused, naming the epoch that fenced it.
    let r = http(leader, "POST", "/wal/db1", &producer("0", "1"), b"old-1;").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("producer-epoch"), Some("1"));
    // A retry of the new primary's write is a duplicate, not a second copy.
    let r = http(leader, "POST", "/wal/db1", &producer("1", "0"), b"new-0;").await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = http(follower, "GET", "/wal/db1", &[], b"").await;
    assert_eq!(r.body, b"old-0;new-0;");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_answered_4xx_and_changes_nothing() {
    let c = Cluster::start(3, 0).await;
    let (leader, follower) = leader_and_follower(&c).await;
    let json = ("content-type", "application/json");
    assert_eq!(http(leader, "PUT", "/j", &[json], b"[1,2]").await.status, 201);
    let long_name = format!("/{}", "n".repeat(2000));
    let huge = vec![b'x'; 2 << 20];
    let cases: Vec<Case> = vec![
        ("POST", "/j".into(), vec![json], b"{not json".to_vec(), 400),
        ("POST", "/j".into(), vec![json], b"[]".to_vec(), 400),
        ("POST", "/j".into(), vec![], b"1".to_vec(), 400),
        ("POST", "/j".into(), vec![json], Vec::new(), 400),
        ("POST", "/j".into(), vec![("content-type", "text/plain")], b"x".to_vec(), 409),
        ("POST", "/j".into(), vec![json, ("producer-id", "p")], b"1".to_vec(), 400),
        (
            "POST",
            "/j".into(),
            vec![json, ("producer-id", "p"), ("producer-epoch", "x"), ("producer-seq", "0")],
            b"1".to_vec(),
            400,
        ),
        ("POST", "/j".into(), vec![json, ("raftwal-expected-version", "-1")], b"1".to_vec(), 400),
        ("POST", "/j".into(), vec![json], huge.clone(), 413),
        ("POST", "/missing".into(), vec![json], b"1".to_vec(), 404),
        ("GET", "/j?offset=abc".into(), vec![], Vec::new(), 400),
        ("GET", "/j?offset=1&offset=2".into(), vec![], Vec::new(), 400),
        ("GET", "/j?live=sse".into(), vec![], Vec::new(), 400),
        ("GET", "/missing".into(), vec![], Vec::new(), 404),
        ("PUT", "/t".into(), vec![("stream-ttl", "-1")], Vec::new(), 400),
        ("PUT", "/t".into(), vec![("stream-ttl", "18446744073709552")], Vec::new(), 400),
        ("PUT", "/t".into(), vec![("stream-expires-at", "tomorrow")], Vec::new(), 400),
        (
            "PUT",
            "/t".into(),
            vec![("stream-ttl", "5"), ("stream-expires-at", "2030-01-01T00:00:00Z")],
            Vec::new(),
            400,
        ),
        ("PUT", "/t".into(), vec![("stream-fork-sub-offset", "1")], Vec::new(), 400),
        (
            "PUT",
            "/t".into(),
            vec![
                ("stream-forked-from", "/j"),
                ("stream-fork-offset", "9999999999999999_9999999999999999"),
            ],
            Vec::new(),
            400,
        ),
        (
            "PUT",
            "/t".into(),
            vec![
                ("stream-forked-from", "/j"),
                ("stream-fork-offset", "0000000000000000_0000000000000001"),
            ],
            Vec::new(),
            400,
        ),
        ("PUT", "/j".into(), vec![("content-type", "text/plain")], Vec::new(), 409),
        ("PUT", long_name, vec![], Vec::new(), 400),
        ("PATCH", "/j".into(), vec![], Vec::new(), 405),
    ];
    for node in [leader, follower] {
        for (method, path, headers, body, want) in &cases {
            let r = http(node, method, path, headers, body).await;
            assert_eq!(
                r.status,
                *want,
                "{method} {} {headers:?}: {r:?}",
                &path[..path.len().min(40)]
            );
        }
    }
    let r = http(follower, "GET", "/j", &[], b"").await;
    assert_eq!(r.body, b"[1,2]", "nothing changed the stream");
    assert_eq!(http(leader, "HEAD", "/t", &[], b"").await.status, 404, "nothing was created");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_restart_of_every_node() {
    let mut c = Cluster::start(3, 0).await;
    let (leader, _) = leader_and_follower(&c).await;
    assert_eq!(http(leader, "PUT", "/s", &[TEXT], b"a").await.status, 201);
    assert_eq!(http(leader, "POST", "/s", &[TEXT], b"b").await.status, 204);
    let fork = [("stream-forked-from", "/s")];
    assert_eq!(http(leader, "PUT", "/f", &fork, b"c").await.status, 201);
    for id in 1..=3 {
        c.stop_node(id).await;
    }
    for id in 1..=3 {
        c.start_node(id).await;
    }
    let (leader, follower) = leader_and_follower(&c).await;
    for node in [leader, follower] {
        assert_eq!(http(node, "GET", "/s", &[], b"").await.body, b"ab");
        assert_eq!(http(node, "GET", "/f", &[], b"").await.body, b"abc");
    }
    c.shutdown().await;
}

/// The node-to-node forwarding service is reachable by anyone who reaches the client API: a
/// command no node's API would build (an entry too large for the log, a name too long, bytes
/// that are no command) is refused there, and the node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_commands_are_checked_like_the_nodes_own() {
    use raftwal_client::proto::StreamCommandRequest;
    use raftwal_client::proto::forward_client::ForwardClient;
    use raftwal_server::core::streams::{Command, CreateSpec};

    let c = Cluster::start(3, 0).await;
    let leader = c.leader().await;
    let api = c.configs[&leader].api_listen;
    let mut client = ForwardClient::connect(format!("http://{api}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let create = |name: String, body: usize| Command::Create {
        name,
        now_ms: 1,
        spec: CreateSpec {
            content_type: "text/plain".into(),
            ttl_secs: None,
            expires_at: None,
            closed: false,
            fork: None,
        },
        messages: vec![bytes::Bytes::from(vec![b'x'; body])],
    };
    let bad = [
        raftwal_server::envelope::encode_stream(&create("/big".into(), 9 << 20)).to_vec(),
        raftwal_server::envelope::encode_stream(&create("n".repeat(5000), 1)).to_vec(),
        vec![4, 9, 9, 9],
        vec![0, 1, 2],
    ];
    for command in bad {
        let len = command.len();
        let err =
            client.stream_command(StreamCommandRequest { command }).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{len} bytes: {err:?}");
    }
    // The node is alive and serves a good command.
    let good = raftwal_server::envelope::encode_stream(&create("/ok".into(), 3)).to_vec();
    let reply = client.stream_command(StreamCommandRequest { command: good }).await;
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(http(streams_addr(&c, leader), "GET", "/ok", &[], b"").await.body, b"xxx");
    // The time a command carries is the leader's, whatever the sender wrote: an expiry dated
    // at the end of time does not expire a stream with an hour to live.
    let r =
        http(streams_addr(&c, leader), "PUT", "/hour", &[TEXT, ("stream-ttl", "3600")], b"").await;
    assert_eq!(r.status, 201);
    let forged = Command::Expire { name: "/hour".into(), now_ms: u64::MAX };
    let command = raftwal_server::envelope::encode_stream(&forged).to_vec();
    client.stream_command(StreamCommandRequest { command }).await.expect("taken");
    assert_eq!(http(streams_addr(&c, leader), "HEAD", "/hour", &[], b"").await.status, 200);
    c.shutdown().await;
}

/// One request over TLS, trusting the cluster CA in `ca`.
async fn https(
    addr: SocketAddr,
    ca: &std::path::Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, std::io::Error> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots.add(cert.expect("a CA certificate")).expect("add the CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("a name");
    let mut conn = connector.connect(name, tcp).await?;
    conn.write_all(&request_bytes(addr, method, path, headers, body)).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after `connection: close`: keep what came.
    let _ = conn.read_to_end(&mut raw).await;
    Ok(parse_response(&raw))
}

/// Without `client_plaintext` the streams port is TLS, like the client API, and a follower's
/// writes reach the leader over TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_streams_port_is_tls_unless_the_client_api_is_plaintext() {
    let c = Cluster::start_with(3, 0, |_, cfg| cfg.client_plaintext = false).await;
    let ca = c.certs_dir().join("ca.pem");
    let (leader, follower) = leader_and_follower(&c).await;
    let r = https(follower, &ca, "PUT", "/secure", &[TEXT], b"sealed").await.expect("https");
    assert_eq!(r.status, 201, "{r:?}");
    let r = https(leader, &ca, "GET", "/secure", &[], b"").await.expect("https");
    assert_eq!(r.body, b"sealed");
    // Plain HTTP on the TLS port gets no answer.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(leader),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut plain = plain;
    plain.write_all(b"GET /secure HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("sealed"), "no plaintext answer");
    c.shutdown().await;
}

/// An expired stream nobody touches again is swept by the leader: every node forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_stream_is_swept_from_every_node() {
    let c = Cluster::start(3, 0).await;
    let (leader, _) = leader_and_follower(&c).await;
    let r = http(leader, "PUT", "/ephemeral", &[TEXT, ("stream-ttl", "2")], b"x").await;
    assert_eq!(r.status, 201);
    let known = |c: &Cluster| {
        (1..=3).filter(|id| c.nodes[id].shared.streams.read().contains_key("/ephemeral")).count()
    };
    for _ in 0..100 {
        if known(&c) == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(known(&c), 3, "every node applied the create");
    for _ in 0..100 {
        if known(&c) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(known(&c), 0, "swept within 10 s of a 2 s time to live");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_beyond_streams_max_are_refused_and_deletes_make_room() {
    let c = Cluster::start_with(3, 0, |_, cfg| cfg.streams_max = 2).await;
    let (leader, follower) = leader_and_follower(&c).await;
    assert_eq!(http(leader, "PUT", "/a", &[TEXT], b"").await.status, 201);
    assert_eq!(http(follower, "PUT", "/b", &[TEXT], b"").await.status, 201);
    let full = http(follower, "PUT", "/c", &[TEXT], b"").await;
    assert_eq!(full.status, 507, "{full:?}");
    assert!(String::from_utf8_lossy(&full.body).contains("streams_max"));
    // An existing stream's create is still confirmed, and a delete makes room.
    assert_eq!(http(leader, "PUT", "/a", &[TEXT], b"").await.status, 200);
    assert_eq!(http(leader, "DELETE", "/b", &[], b"").await.status, 204);
    assert_eq!(http(follower, "PUT", "/c", &[TEXT], b"").await.status, 201);
    c.shutdown().await;
}
