//! A cluster of real nodes in one process: real QUIC with real certificates, real WAL files in
//! a temp dir, clients over gRPC on 127.0.0.1. Client ports are bound as port 0 and recorded
//! once bound (a restarted node reuses its port); peer ports are found by binding port 0 and
//! releasing it, since peers must know each other's addresses before they start.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftwal_client::{Client, ClientConfig};
use raftwal_consensus::{LogIndex, NodeId, Role};
use raftwal_server::{Node, NodeConfig};
use raftwal_transport::certs::ClusterCa;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub configs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Node>,
}

pub fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("addr")
}

/// Writes a CA and node certificates 1..=n (plus client) into `dir`.
pub fn certs(dir: &Path, n: u64) -> ClusterCa {
    std::fs::create_dir_all(dir).expect("certs dir");
    let ca = ClusterCa::generate("test CA").expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write");
    for id in 1..=n {
        let b =
            ca.issue_node(NodeId(id), &["127.0.0.1".into(), "localhost".into()]).expect("issue");
        std::fs::write(dir.join(format!("node-{id}.pem")), b.cert_pem).expect("write");
        std::fs::write(dir.join(format!("node-{id}.key")), b.key_pem).expect("write");
    }
    ca
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAFTWAL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Cluster {
    /// `n` founding nodes, plus configs (not started) for `spare` nodes that may join later.
    pub async fn start(n: u64, spare: u64) -> Cluster {
        Cluster::start_with(n, spare, |_, _| {}).await
    }

    /// Like `start`, with each node's config adjusted by `tweak(certs dir, config)` first.
    pub async fn start_with(n: u64, spare: u64, tweak: impl Fn(&Path, &mut NodeConfig)) -> Cluster {
        init_logging();
        raftwal_server::http::prometheus();
        let dir = tempfile::tempdir().expect("tempdir");
        let certs_dir = dir.path().join("certs");
        certs(&certs_dir, n + spare);
        let addrs: BTreeMap<u64, SocketAddr> = (1..=n + spare).map(|id| (id, free_udp())).collect();
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut configs = BTreeMap::new();
        for id in 1..=n + spare {
            let mut c = NodeConfig::defaults();
            c.id = id;
            c.data_dir = dir.path().join(format!("node-{id}"));
            c.peer_listen = addrs[&id];
            c.api_listen = any;
            c.http_listen = "127.0.0.1:0".parse().expect("addr");
            c.peers = (1..=n)
                .filter(|&p| p != id)
                // Client addresses are not known yet; `start_node` tells every node once bound.
                .map(|p| format!("{p}@{}@{any}", addrs[&p]))
                .collect();
            c.join = id > n;
            c.tls_ca = certs_dir.join("ca.pem");
            c.tls_cert = certs_dir.join(format!("node-{id}.pem"));
            c.tls_key = certs_dir.join(format!("node-{id}.key"));
            c.client_plaintext = true;
            c.tick_ms = 20;
            c.segment_bytes = 4 << 20;
            tweak(&certs_dir, &mut c);
            configs.insert(id, c);
        }
        let mut cluster = Cluster { dir, configs, nodes: BTreeMap::new() };
        for id in 1..=n {
            cluster.start_node(id).await;
        }
        cluster
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub async fn start_node(&mut self, id: u64) {
        let node = Node::start(self.configs[&id].clone()).await.expect("start node");
        let cfg = self.configs.get_mut(&id).expect("config");
        cfg.api_listen = node.api_addr;
        self.nodes.insert(id, node);
        // Every running node learns every bound client address (for not-leader hints).
        let known: Vec<(u64, SocketAddr)> = self
            .configs
            .iter()
            .filter(|(_, c)| c.api_listen.port() != 0)
            .map(|(&i, c)| (i, c.api_listen))
            .collect();
        for node in self.nodes.values() {
            let mut addrs = node.shared.api_addrs.write();
            for (i, a) in &known {
                addrs.insert(NodeId(*i), a.to_string());
            }
        }
    }

    /// Stops a node (its files stay).
    pub async fn stop_node(&mut self, id: u64) {
        let node = self.nodes.remove(&id).expect("running node");
        node.shutdown().await.expect("clean shutdown");
    }

    pub fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.configs[&id].api_listen)
    }

    /// A client that knows every node that has run.
    pub async fn client(&self) -> Client {
        let endpoints: Vec<String> = self
            .configs
            .keys()
            .filter(|id| self.nodes.contains_key(id))
            .map(|&id| self.endpoint(id))
            .collect();
        let mut config = ClientConfig::new(endpoints);
        config.request_timeout = Duration::from_secs(10);
        Client::connect(config).await.expect("connect")
    }

    /// A client of one node only.
    pub async fn client_of(&self, id: u64) -> Client {
        Client::connect(ClientConfig::new([self.endpoint(id)])).await.expect("connect")
    }

    /// Waits for a leader that every running node agrees on.
    pub async fn leader(&self) -> u64 {
        for _ in 0..1000 {
            let leaders: Vec<Option<NodeId>> =
                self.nodes.values().map(|n| n.shared.status.read().leader).collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && self.nodes.get(&l.0).is_some_and(|n| n.shared.status.read().role == Role::Leader)
            {
                return l.0;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no leader within 20 s");
    }

    /// Waits until node `id` has settled (applied) at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let mut rx = self.nodes[&id].shared.readable.subscribe();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r >= LogIndex(index)))
            .await
            .unwrap_or_else(|_| panic!("node {id} did not apply {index} within 30 s"))
            .expect("driver alive");
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}

/// Every record readable from node `id`, as (offset, data).
pub async fn read_all(client: &Client) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = raftwal_client::Offset(1);
    loop {
        let batch = client.read(next, 1000, 0).await.expect("read");
        if batch.records.is_empty() {
            return out;
        }
        for r in batch.records {
            out.push((r.offset.0, r.data.to_vec()));
        }
        next = batch.next_offset;
    }
}
