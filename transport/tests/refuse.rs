//! What the transport refuses, without a panic and without unbounded memory: peers without a
//! client certificate, from another CA, with an expired certificate or one naming another node;
//! garbage datagrams; and, from an authenticated peer, bad stream headers, oversized length
//! prefixes, truncated frames, archives that fail validation and messages naming another
//! sender. After each, the node still serves its real peers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use raftwal_consensus::NodeId;
use raftwal_transport::certs::{CertBundle, ClusterCa, Validity};
use raftwal_transport::{ALPN, Transport, TransportConfig, node_name};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::*;

/// A bare QUIC client, to do what a real transport never would.
fn raw_client(ca_pem: &str, client_cert: Option<&CertBundle>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut tls = match client_cert {
        Some(bundle) => {
            let chain = CertificateDer::pem_slice_iter(bundle.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Whether a connection from `endpoint` to node `id` at `addr` survives the handshake and a
/// moment after it (a server refusing a client certificate may only say so after the client
/// thinks it is connected).
async fn connection_survives(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    id: u64,
) -> bool {
    let Ok(connecting) = endpoint.connect(addr, &node_name(NodeId(id))) else { return false };
    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), connecting).await else {
        return false;
    };
    // Prove liveness with a stream the server must acknowledge.
    let probe = async {
        let mut send = conn.open_uni().await.ok()?;
        send.write_all(b"RWP1").await.ok()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.close_reason().is_none().then_some(())
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), probe).await, Ok(Some(())))
}

/// A lone node `id` that knows peer `peer` at an address where nothing runs, so no real peer
/// competes with the test's raw connections.
fn lone(
    pki: &Pki,
    id: u64,
    peer: u64,
) -> (Transport, tokio::sync::mpsc::Receiver<raftwal_consensus::Message>) {
    let mut config = TransportConfig::new(NodeId(id), loopback(), pki.identity(id));
    config.peers.insert(NodeId(peer), "127.0.0.1:9".parse().expect("addr"));
    Transport::start(config).expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_peers_without_a_valid_certificate_for_their_id() {
    let pki = Pki::new();
    let (node2, mut inbox) = lone(&pki, 2, 1);
    let addr = node2.local_addr();
    let ca_pem = pki.ca.cert_pem();

    // The probe itself works: a valid node 1 certificate gets through.
    let good = pki.bundle(1);
    assert!(connection_survives(&raw_client(&ca_pem, Some(&good)), addr, 2).await);
    // No client certificate.
    assert!(!connection_survives(&raw_client(&ca_pem, None), addr, 2).await);
    // A certificate from another CA.
    let other = ClusterCa::generate("another CA").expect("CA");
    let foreign = other.issue_node(NodeId(1), &[]).expect("cert");
    assert!(!connection_survives(&raw_client(&ca_pem, Some(&foreign)), addr, 2).await);
    // An expired certificate from the right CA.
    let expired = pki
        .ca
        .issue_node_valid(NodeId(1), Validity { not_before: (2020, 1, 1), not_after: (2021, 1, 1) })
        .expect("cert");
    assert!(!connection_survives(&raw_client(&ca_pem, Some(&expired)), addr, 2).await);
    // A valid certificate for node 3, which node 2 does not know as a dialer.
    let node3 = pki.bundle(3);
    assert!(!connection_survives(&raw_client(&ca_pem, Some(&node3)), addr, 2).await);
    // Dialing "node 3" but reaching node 2, whose certificate names node 2: the name check
    // on the dialer's side fails.
    assert!(!connection_survives(&raw_client(&ca_pem, Some(&good)), addr, 3).await);
    assert!(inbox.try_recv().is_err());

    // The real node 1 still gets through.
    let mut config = TransportConfig::new(NodeId(1), loopback(), pki.identity(1));
    config.peers.insert(NodeId(2), addr);
    let (node1, _inbox1) = Transport::start(config).expect("start");
    node1.send(&heartbeat(1, 2, 7)).expect("queued");
    assert_eq!(recv(&mut inbox, 10).await, heartbeat(1, 2, 7));
    node1.shutdown().await;
    node2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_presenting_another_nodes_certificate_is_refused() {
    let pki = Pki::new();
    // "Node 1" holds node 3's certificate.
    let impostor = identity_from(&pki.ca.cert_pem(), &pki.bundle(3));
    let mut nodes = start_all(vec![(1, impostor), (2, pki.identity(2))], |_| {});
    let _ = nodes[&1].transport.send(&heartbeat(1, 2, 1));
    // The impostor's TLS handshake completes on its side before node 2 reads its certificate;
    // it must still never count itself connected, at any moment of its redials, and nothing it
    // sends may arrive.
    for _ in 0..400 {
        assert!(
            !nodes[&1].transport.is_connected(NodeId(2)),
            "the impostor counted itself connected"
        );
        let got = nodes.get_mut(&2).expect("node").inbox.try_recv();
        assert!(got.is_err(), "nothing from the impostor arrives: {got:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_ignored() {
    let pki = Pki::new();
    let mut nodes = start_all((1..=2).map(|id| (id, pki.identity(id))).collect(), |_| {});
    let target = nodes[&2].transport.local_addr();
    let socket = tokio::net::UdpSocket::bind(loopback()).await.expect("socket");
    let mut rng = raftwal_consensus::SplitMix64::new(42);
    for i in 0..2000usize {
        let len = 1 + (rng.below(1400) as usize);
        let mut datagram: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if i % 3 == 0 {
            // Something that looks like a QUIC long header.
            datagram[0] = 0xc0 | (datagram[0] & 0x0f);
            if len > 5 {
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
        }
        let _ = socket.send_to(&datagram, target).await;
    }
    // Plain text, as if someone pointed an HTTP client at the port.
    let _ = socket.send_to(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", target).await;
    send(&nodes[&1].transport, &heartbeat(1, 2, 9));
    let got = recv(&mut nodes.get_mut(&2).expect("node").inbox, 10).await;
    assert_eq!(got, heartbeat(1, 2, 9));
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

/// Connects to node 2 as node 1 and writes `bytes` on a new stream; returns the application
/// close code the node answered with, if it closed the connection.
async fn attack(
    pki: &Pki,
    addr: std::net::SocketAddr,
    bytes: Vec<u8>,
    finish: bool,
) -> Option<u64> {
    let endpoint = raw_client(&pki.ca.cert_pem(), Some(&pki.bundle(1)));
    let conn =
        endpoint.connect(addr, &node_name(NodeId(2))).expect("connect").await.expect("handshake");
    // The hello a real node 1 opens with (cluster 0, incarnation 0: what `lone` nodes expect).
    let mut hello = conn.open_uni().await.expect("hello stream");
    let mut greeting = stream_header(1, 0xfe);
    greeting.extend_from_slice(&[0u8; 16]);
    hello.write_all(&greeting).await.expect("hello");
    hello.finish().expect("finish hello");
    let mut send = conn.open_uni().await.expect("stream");
    send.write_all(&bytes).await.expect("write");
    if finish {
        send.finish().expect("finish");
    }
    let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    let code = match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => Some(close.error_code.into_inner()),
        _ => None,
    };
    endpoint.close(quinn::VarInt::from_u32(0), b"done");
    code
}

fn stream_header(from: u64, lane: u8) -> Vec<u8> {
    let mut header = b"RWP1".to_vec();
    header.extend_from_slice(&[1, lane, 0, 0]);
    header.extend_from_slice(&from.to_le_bytes());
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_from_an_authenticated_peer_close_its_connection() {
    const PROTOCOL: Option<u64> = Some(2);
    let pki = Pki::new();
    // Only node 2 runs while the attacks come from node 1's identity (a real node 1 would keep
    // replacing the attacker's connection with its own, as a restarted peer does).
    let (node2, mut inbox) = lone(&pki, 2, 1);
    let addr = node2.local_addr();
    let valid = raftwal_transport::encode(&heartbeat(1, 2, 5)).to_vec();

    // The attack harness itself works: a valid frame is delivered and nothing is closed.
    let mut fine = stream_header(1, 0);
    fine.extend_from_slice(&valid);
    assert_eq!(attack(&pki, addr, fine, false).await, None);
    assert_eq!(recv(&mut inbox, 5).await, heartbeat(1, 2, 5));
    // A stream header with the wrong magic, or naming another sender.
    let mut bad_magic = stream_header(1, 0);
    bad_magic[0] = b'X';
    assert_eq!(attack(&pki, addr, bad_magic, false).await, PROTOCOL);
    assert_eq!(attack(&pki, addr, stream_header(3, 0), false).await, PROTOCOL);
    // An oversized length prefix: refused before anything is allocated.
    let mut oversized = stream_header(1, 0);
    oversized.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(attack(&pki, addr, oversized, false).await, PROTOCOL);
    // An archive that fails validation.
    let mut corrupt = stream_header(1, 0);
    let mut frame = valid.clone();
    for byte in &mut frame[24..] {
        *byte = 0xff;
    }
    corrupt.extend_from_slice(&frame);
    assert_eq!(attack(&pki, addr, corrupt, false).await, PROTOCOL);
    // A message claiming another sender, inside a valid frame.
    let mut forged = stream_header(1, 0);
    forged.extend_from_slice(&raftwal_transport::encode(&heartbeat(3, 2, 5)).to_vec());
    assert_eq!(attack(&pki, addr, forged, false).await, PROTOCOL);
    // A message on the wrong stream (a heartbeat on the replication stream).
    let mut wrong_lane = stream_header(1, 1);
    wrong_lane.extend_from_slice(&valid);
    assert_eq!(attack(&pki, addr, wrong_lane, false).await, PROTOCOL);
    // A truncated frame at the end of a stream: nothing is delivered.
    let mut truncated = stream_header(1, 0);
    truncated.extend_from_slice(&valid[..valid.len() - 3]);
    attack(&pki, addr, truncated, true).await;

    assert!(inbox.try_recv().is_err(), "no refused message was delivered");
    // The real node 1 connects and is heard.
    let mut config = TransportConfig::new(NodeId(1), loopback(), pki.identity(1));
    config.peers.insert(NodeId(2), addr);
    let (node1, _inbox1) = Transport::start(config).expect("start");
    node1.send(&heartbeat(1, 2, 11)).expect("queued");
    assert_eq!(recv(&mut inbox, 10).await, heartbeat(1, 2, 11));
    node1.shutdown().await;
    node2.shutdown().await;
}

/// Waits up to 5 s for `transport` to report that a peer refused it.
async fn refused(transport: &Transport) -> String {
    let mut refusal = transport.refusal();
    let got = tokio::time::timeout(Duration::from_secs(5), refusal.wait_for(Option::is_some)).await;
    got.expect("refused in time").expect("transport alive").clone().expect("a reason")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_under_the_same_ca_is_refused_and_told_so() {
    let pki = Pki::new();
    // Nodes 1 and 2 have valid certificates of the same CA, but different cluster ids.
    let mut nodes = start_all(vec![(1, pki.identity(1)), (2, pki.identity(2))], |c| {
        c.me = raftwal_transport::PeerIdentity { cluster: 100 + c.id.0, incarnation: 1 };
    });
    let _ = nodes[&1].transport.send(&heartbeat(1, 2, 1));
    // Node 2 refuses node 1's hello; node 1, the dialer, is told why.
    let why = refused(&nodes[&1].transport).await;
    assert!(why.contains("cluster"), "{why}");
    assert!(!nodes[&1].transport.is_connected(NodeId(2)));
    let got = nodes.get_mut(&2).expect("node").inbox.try_recv();
    assert!(got.is_err(), "nothing from the other cluster arrives: {got:?}");
    for node in nodes.into_values() {
        node.transport.shutdown().await;
    }
}

/// A book that knows one incarnation per peer, as a node's does.
#[derive(Debug)]
struct Knows(u64);

impl raftwal_transport::PeerBook for Knows {
    fn admit(&self, peer: NodeId, incarnation: u64) -> Result<(), raftwal_transport::Refusal> {
        if incarnation == self.0 {
            Ok(())
        } else {
            Err(raftwal_transport::Refusal::Stale(format!(
                "node {peer} comes with data directory {incarnation}, not {}: it lost its data",
                self.0
            )))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_data_directory_is_not_the_one_known_is_refused_either_way() {
    let pki = Pki::new();
    // The lower id dials: first the acceptor (node 2) comes with an unknown data directory,
    // then the dialer (node 1) does.
    for stale in [2u64, 1] {
        let mut nodes = start_all(vec![(1, pki.identity(1)), (2, pki.identity(2))], |c| {
            let incarnation = if c.id.0 == stale { 9 } else { 7 };
            c.me = raftwal_transport::PeerIdentity { cluster: 5, incarnation };
            c.book = std::sync::Arc::new(Knows(7));
        });
        let _ = nodes[&1].transport.send(&heartbeat(1, 2, 1));
        let why = refused(&nodes[&stale].transport).await;
        assert!(why.contains("lost its data"), "node {stale}: {why}");
        assert!(!nodes[&1].transport.is_connected(NodeId(2)));
        let got = nodes.get_mut(&2).expect("node").inbox.try_recv();
        assert!(got.is_err(), "nothing from a refused peer arrives: {got:?}");
        for node in nodes.into_values() {
            node.transport.shutdown().await;
        }
    }
}
