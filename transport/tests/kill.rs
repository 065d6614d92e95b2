//! kill -9 of a peer's process, then a restart on the same address: the connection comes back
//! at once whichever side died, not after the survivor's idle timeout. The peer runs as a child
//! process (this test binary, running its ignored `child_echo` test), so it dies with no
//! CONNECTION_CLOSE sent, as a crashed node does.
//!
//! How the dialer learns: a restarted node answers a packet of its previous process's
//! connection with a QUIC stateless reset, which the survivor accepts because the reset key is
//! derived from the node's private key (the same across restarts). Before that, a surviving
//! dialer kept a dead connection until its idle timeout (10 s by default).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use raftwal_consensus::{LogIndex, MessageBody, NodeId};
use raftwal_transport::{Transport, TransportConfig};
use support::*;
use tokio::sync::mpsc;

const CHILD_ENV: &str = "RAFTWAL_KILL_TEST_CHILD";
/// The survivor's idle timeout: far above the reconnection bound the test asserts, so a dead
/// connection that lingers until it times out fails the test.
const IDLE: Duration = Duration::from_secs(30);
/// What "at once" means here: well under the idle timeout, with room for a loaded machine.
const RECONNECT_BOUND: Duration = Duration::from_secs(5);

/// The child: a transport that answers every heartbeat with a heartbeat response carrying the
/// same read context. It runs until it is killed. Does nothing unless started by the tests.
#[test]
#[ignore = "started as a child process by the tests in this file"]
fn child_echo() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let parts: Vec<&str> = spec.split(',').collect();
    let [id, listen, peer, peer_addr, dir] = parts[..] else { panic!("bad {CHILD_ENV}: {spec}") };
    let read = |name: &str| std::fs::read_to_string(Path::new(dir).join(name)).expect("pem");
    let identity = raftwal_transport::Identity::from_pem(
        &read("ca.pem"),
        &read(&format!("node-{id}.pem")),
        &read(&format!("node-{id}.key")),
    )
    .expect("identity");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut config = TransportConfig::new(
            NodeId(id.parse().expect("id")),
            listen.parse().expect("addr"),
            identity,
        );
        config.peers.insert(NodeId(peer.parse().expect("peer")), peer_addr.parse().expect("addr"));
        config.reconnect_backoff_min = Duration::from_millis(10);
        config.reconnect_backoff_max = Duration::from_millis(200);
        let (transport, mut inbox) = Transport::start(config).expect("start");
        while let Some(m) = inbox.recv().await {
            if let MessageBody::Heartbeat { read, .. } = m.body {
                let reply = msg(m.to.0, m.from.0, MessageBody::HeartbeatResp { read });
                let _ = transport.send(&reply);
            }
        }
    });
}

struct Peer {
    id: u64,
    listen: SocketAddr,
    dir: std::path::PathBuf,
}

impl Peer {
    fn spawn(&self, survivor: u64, survivor_addr: SocketAddr) -> Child {
        let spec = format!(
            "{},{},{survivor},{survivor_addr},{}",
            self.id,
            self.listen,
            self.dir.display()
        );
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["child_echo", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .spawn()
            .expect("spawn the child")
    }
}

fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

/// Sends heartbeats with fresh read contexts until an answer to one of them comes back; returns
/// how long that took.
async fn echo_within(
    transport: &Transport,
    inbox: &mut mpsc::Receiver<raftwal_consensus::Message>,
    from: u64,
    to: u64,
    next_read: &mut u64,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let first = *next_read;
    while start.elapsed() < limit {
        *next_read += 1;
        let ping = MessageBody::Heartbeat { commit: LogIndex(0), read: Some(*next_read) };
        let _ = transport.send(&msg(from, to, ping));
        let wait = tokio::time::timeout(Duration::from_millis(20), inbox.recv()).await;
        if let Ok(Some(m)) = wait
            && let MessageBody::HeartbeatResp { read: Some(r) } = m.body
            && r > first
        {
            return Some(start.elapsed());
        }
    }
    None
}

/// The survivor is `survivor`, the child `victim`: warm up, kill -9 the child, start it again
/// on the same address, and time the first answer after the kill.
async fn kill_and_restart(survivor: u64, victim: u64) -> Duration {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), pki.ca.cert_pem()).expect("write");
    let bundle = pki.bundle(victim);
    std::fs::write(dir.path().join(format!("node-{victim}.pem")), &bundle.cert_pem).expect("write");
    std::fs::write(dir.path().join(format!("node-{victim}.key")), &bundle.key_pem).expect("write");
    let peer = Peer { id: victim, listen: free_udp_addr(), dir: dir.path().to_path_buf() };

    let mut config = TransportConfig::new(NodeId(survivor), loopback(), pki.identity(survivor));
    config.peers.insert(NodeId(victim), peer.listen);
    config.reconnect_backoff_min = Duration::from_millis(10);
    config.reconnect_backoff_max = Duration::from_millis(200);
    config.idle_timeout = IDLE;
    let (transport, mut inbox) = Transport::start(config).expect("start");
    let mut reads = 0;

    let mut child = peer.spawn(survivor, transport.local_addr());
    let warm = echo_within(&transport, &mut inbox, survivor, victim, &mut reads, IDLE).await;
    assert!(warm.is_some(), "the child never answered");

    let killed = Instant::now();
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let mut child = peer.spawn(survivor, transport.local_addr());
    let back = echo_within(&transport, &mut inbox, survivor, victim, &mut reads, IDLE).await;
    let took = killed.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    transport.shutdown().await;
    assert!(back.is_some(), "node {survivor} never heard from the restarted node {victim}");
    println!("node {survivor} heard from node {victim} {took:?} after its kill -9");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_reconnects_at_once_after_the_acceptor_is_killed() {
    // Node 1 dials node 2 (the lower id dials); node 2 dies.
    let took = kill_and_restart(1, 2).await;
    assert!(took < RECONNECT_BOUND, "reconnected only after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acceptor_takes_the_new_connection_at_once_after_the_dialer_is_killed() {
    let took = kill_and_restart(2, 1).await;
    assert!(took < RECONNECT_BOUND, "reconnected only after {took:?}");
}
