//! A cluster of real nodes in one process: real QUIC with real certificates, real WAL files in
//! a temp dir, clients over gRPC on 127.0.0.1. Client ports are bound as port 0 and recorded
//! once bound (a restarted node reuses its port); peer ports are found by binding port 0 and
//! releasing it, since peers must know each other's addresses before they start.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftwal_client::{Client, ClientConfig};
use raftwal_consensus::{LogIndex, NodeId, Role};
use raftwal_server::{Node, NodeConfig};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub configs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Node>,
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
        let mut configs = raftwal_server::local::configs(dir.path(), n, spare).expect("configs");
        for c in configs.values_mut() {
            c.tick_ms = 20;
            c.segment_bytes = 16 << 20;
            tweak(&certs_dir, c);
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
        let known: Vec<(NodeId, String)> = self
            .configs
            .iter()
            .filter(|(_, c)| c.api_listen.port() != 0)
            .map(|(&i, c)| (NodeId(i), c.api_listen.to_string()))
            .collect();
        raftwal_server::local::share_api_addrs(self.nodes.values(), &known);
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
