//! Shared test setup: a cluster CA, node identities, and transports on 127.0.0.1.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use raftwal_consensus::{GroupId, LogIndex, Message, MessageBody, NodeId, Term};
use raftwal_transport::certs::{CertBundle, ClusterCa};
use raftwal_transport::{Identity, Transport, TransportConfig};
use tokio::sync::mpsc;

pub struct Pki {
    pub ca: ClusterCa,
}

impl Pki {
    pub fn new() -> Pki {
        Pki { ca: ClusterCa::generate("raftwal test CA").expect("CA") }
    }

    pub fn bundle(&self, id: u64) -> CertBundle {
        self.ca.issue_node(NodeId(id), &[]).expect("node cert")
    }

    pub fn identity(&self, id: u64) -> Identity {
        identity_from(&self.ca.cert_pem(), &self.bundle(id))
    }
}

pub fn identity_from(ca_pem: &str, bundle: &CertBundle) -> Identity {
    Identity::from_pem(ca_pem, &bundle.cert_pem, &bundle.key_pem).expect("identity")
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

pub struct Node {
    pub transport: Transport,
    pub inbox: mpsc::Receiver<Message>,
}

/// Starts one transport per identity, each knowing all the others.
pub fn start_all(
    identities: Vec<(u64, Identity)>,
    tweak: impl Fn(&mut TransportConfig),
) -> BTreeMap<u64, Node> {
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    for (id, identity) in identities {
        let mut config = TransportConfig::new(NodeId(id), loopback(), identity);
        config.reconnect_backoff_min = Duration::from_millis(10);
        config.reconnect_backoff_max = Duration::from_millis(200);
        tweak(&mut config);
        let (transport, inbox) = Transport::start(config).expect("start");
        nodes.insert(id, Node { transport, inbox });
    }
    let addrs: Vec<(u64, SocketAddr)> =
        nodes.iter().map(|(&id, n)| (id, n.transport.local_addr())).collect();
    for (&id, node) in &nodes {
        for &(peer, addr) in &addrs {
            if peer != id {
                node.transport.add_peer(NodeId(peer), addr);
            }
        }
    }
    nodes
}

pub fn msg(from: u64, to: u64, body: MessageBody) -> Message {
    Message { group: GroupId(1), from: NodeId(from), to: NodeId(to), term: Term(3), body }
}

pub fn heartbeat(from: u64, to: u64, commit: u64) -> Message {
    msg(from, to, MessageBody::Heartbeat { commit: LogIndex(commit), read: None })
}

/// The next message, or a panic after `secs`.
pub async fn recv(inbox: &mut mpsc::Receiver<Message>, secs: u64) -> Message {
    tokio::time::timeout(Duration::from_secs(secs), inbox.recv())
        .await
        .expect("a message in time")
        .expect("inbox open")
}

/// Sends until the peer takes it (the connection may still be coming up: queued sends go out
/// once it is).
pub fn send(transport: &Transport, m: &Message) {
    transport.send(m).expect("queued");
}
