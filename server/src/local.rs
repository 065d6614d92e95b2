//! Clusters on one machine: a cluster's certificates (`raftwal certs init`, `raftwal dev`),
//! and configs for nodes run in one process on 127.0.0.1 (the integration tests and
//! `raftwal-bench --local`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use raftwal_consensus::NodeId;
use raftwal_transport::certs::ClusterCa;

use crate::{Node, NodeConfig};

/// Writes a CA, one certificate per node (naming `node-{id}.raftwal` plus `names`) and a
/// client certificate into `dir`. Refuses to overwrite existing files.
pub fn certs_init(dir: &Path, nodes: u64, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if dir.join("ca.pem").exists() {
        bail!("{} already holds a CA; remove it first to make a new one", dir.display());
    }
    let ca = ClusterCa::generate("raftwal cluster CA")?;
    write_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
    for id in 1..=nodes {
        let bundle = ca.issue_node(NodeId(id), names)?;
        write_file(&dir.join(format!("node-{id}.pem")), bundle.cert_pem.as_bytes())?;
        write_file(&dir.join(format!("node-{id}.key")), bundle.key_pem.as_bytes())?;
    }
    let client = ca.issue_client("raftwal client")?;
    write_file(&dir.join("client.pem"), client.cert_pem.as_bytes())?;
    write_file(&dir.join("client.key"), client.key_pem.as_bytes())?;
    Ok(())
}

/// A random cluster id in 1..2^63 (TOML integers are signed 64-bit), from the standard
/// library's per-process random keys.
pub fn random_cluster_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 1).max(1)
}

/// Writes a file; keys (`*.key`) readable by the owner only.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))?;
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "key") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Configs for `founders` nodes that bootstrap a cluster and `spare` nodes (ids after them)
/// that may join it later, with certificates and data under `dir`: peers on 127.0.0.1 ports
/// that were free a moment ago (peers must know each other's addresses before they start),
/// client and HTTP ports chosen at bind (see [`share_api_addrs`]), plaintext clients.
pub fn configs(dir: &Path, founders: u64, spare: u64) -> anyhow::Result<BTreeMap<u64, NodeConfig>> {
    let certs = dir.join("certs");
    certs_init(&certs, founders + spare, &["127.0.0.1".into(), "localhost".into()])?;
    let mut peer_addrs = BTreeMap::new();
    for id in 1..=founders + spare {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("find a free UDP port")?;
        peer_addrs.insert(id, socket.local_addr()?);
    }
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let cluster_id = random_cluster_id();
    let mut out = BTreeMap::new();
    for id in 1..=founders + spare {
        let mut c = NodeConfig::defaults();
        c.id = id;
        c.cluster_id = cluster_id;
        c.data_dir = dir.join(format!("node-{id}"));
        c.peer_listen = peer_addrs[&id];
        c.api_listen = any;
        c.http_listen = any;
        c.streams_listen = any.to_string();
        c.peers = (1..=founders)
            .filter(|&p| p != id)
            .map(|p| format!("{p}@{}@{any}", peer_addrs[&p]))
            .collect();
        c.join = id > founders;
        c.tls_ca = certs.join("ca.pem");
        c.tls_cert = certs.join(format!("node-{id}.pem"));
        c.tls_key = certs.join(format!("node-{id}.key"));
        c.client_plaintext = true;
        out.insert(id, c);
    }
    Ok(out)
}

/// Tells every node in `nodes` the client addresses in `addrs` (ids to "host:port"), for its
/// not-leader answers: nodes from [`configs`] bind their client port only when they start.
pub fn share_api_addrs<'a>(nodes: impl IntoIterator<Item = &'a Node>, addrs: &[(NodeId, String)]) {
    for node in nodes {
        node.shared.api_addrs.write().extend(addrs.iter().cloned());
    }
}
