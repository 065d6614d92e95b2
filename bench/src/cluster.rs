//! The cluster a load runs against: a running one (`--endpoints`) or one started here on
//! loopback (`--local N`, real nodes in this process: QUIC with mutual TLS, WAL files in a temp
//! dir), and the nodes' own figures read from their `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use raftwal_consensus::NodeId;
use raftwal_server::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Nodes started by the benchmark.
pub struct LocalCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `n` nodes on 127.0.0.1 with data under a temp dir in `parent`
    /// (`raftwal_server::local::configs`).
    pub async fn start(n: u64, durability: &str, parent: &Path) -> anyhow::Result<LocalCluster> {
        raftwal_server::http::prometheus();
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::tempdir_in(parent).context("temp dir for the local cluster")?;
        let mut nodes = Vec::new();
        for (_, mut c) in raftwal_server::local::configs(dir.path(), n, 0)? {
            c.durability = durability.to_string();
            nodes.push(Node::start(c).await?);
        }
        let addrs: Vec<(NodeId, String)> =
            nodes.iter().map(|n| (n.shared.id, n.api_addr.to_string())).collect();
        raftwal_server::local::share_api_addrs(&nodes, &addrs);
        Ok(LocalCluster { nodes, _dir: dir })
    }

    /// The client endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("http://{}", n.api_addr)).collect()
    }

    /// The HTTP admin addresses.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.http_addr).collect()
    }

    /// Stops every node.
    pub async fn stop(self) {
        for node in self.nodes {
            let _ = node.shutdown().await;
        }
    }
}

/// GET `path` over plain HTTP/1.1.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: raftwal\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// One Prometheus histogram summed over nodes: cumulative buckets (by upper bound, in
/// billionths, so they sort), sum and count.
#[derive(Debug, Default, Clone)]
pub struct Hist {
    pub buckets: BTreeMap<u64, f64>,
    pub sum: f64,
    pub count: f64,
}

impl Hist {
    /// Parses `name` from Prometheus text (every label set summed).
    pub fn parse(text: &str, name: &str) -> Hist {
        let mut h = Hist::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) {
                let Some((labels, value)) = rest.split_once("} ") else { continue };
                let Some(le) = labels.split("le=\"").nth(1).and_then(|s| s.split('"').next())
                else {
                    continue;
                };
                let bound =
                    if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                *h.buckets.entry(bound_key(bound)).or_default() +=
                    value.trim().parse::<f64>().unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix(&format!("{name}_sum")) {
                h.sum += v.split_whitespace().last().and_then(|x| x.parse().ok()).unwrap_or(0.0);
            } else if let Some(v) = line.strip_prefix(&format!("{name}_count")) {
                h.count += v.split_whitespace().last().and_then(|x| x.parse().ok()).unwrap_or(0.0);
            }
        }
        h
    }

    /// Adds `sign` times `other` (1 to sum nodes, -1 to subtract an earlier reading).
    fn add(&mut self, other: &Hist, sign: f64) {
        for (k, v) in &other.buckets {
            *self.buckets.entry(*k).or_default() += sign * v;
        }
        self.sum += sign * other.sum;
        self.count += sign * other.count;
    }

    /// This minus an earlier reading of the same nodes.
    pub fn since(&self, before: &Hist) -> Hist {
        let mut h = self.clone();
        h.add(before, -1.0);
        h
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The upper bound of the bucket holding quantile `q`.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let target = q * self.count;
        let (&key, _) = self.buckets.iter().find(|(_, c)| **c >= target)?;
        Some(if key == u64::MAX { f64::INFINITY } else { key as f64 / 1e9 })
    }
}

/// A bucket's upper bound as a key that sorts like it (`+Inf` last).
fn bound_key(bound: f64) -> u64 {
    if bound.is_infinite() { u64::MAX } else { (bound * 1e9).round() as u64 }
}

/// The nodes' own figures over a run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NodeFigures {
    pub fsync_mean_us: Option<f64>,
    pub fsync_p99_le_us: Option<f64>,
    pub fsyncs: f64,
    pub group_entries_mean: Option<f64>,
}

/// Reads the WAL histograms of every node.
pub async fn read_node_metrics(addrs: &[SocketAddr]) -> (Hist, Hist) {
    let mut fsync = Hist::default();
    let mut group = Hist::default();
    for &a in addrs {
        let Ok(text) = http_get(a, "/metrics").await else { continue };
        let f = Hist::parse(&text, "raftwal_wal_fsync_duration_seconds");
        let g = Hist::parse(&text, "raftwal_wal_group_entries");
        fsync.add(&f, 1.0);
        group.add(&g, 1.0);
    }
    (fsync, group)
}

/// Figures from metrics read before and after a run.
pub fn figures(before: &(Hist, Hist), after: &(Hist, Hist)) -> NodeFigures {
    let fsync = after.0.since(&before.0);
    let group = after.1.since(&before.1);
    NodeFigures {
        fsync_mean_us: fsync.mean().map(|s| s * 1e6),
        fsync_p99_le_us: fsync.quantile_bound(0.99).map(|s| s * 1e6),
        fsyncs: fsync.count,
        group_entries_mean: group.mean(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_sum_label_sets_subtract_readings_and_find_quantile_buckets() {
        let text = "\
raftwal_wal_fsync_duration_seconds_bucket{node=\"1\",le=\"0.0001\"} 10
raftwal_wal_fsync_duration_seconds_bucket{node=\"1\",le=\"0.001\"} 19
raftwal_wal_fsync_duration_seconds_bucket{node=\"1\",le=\"+Inf\"} 20
raftwal_wal_fsync_duration_seconds_sum{node=\"1\"} 0.01
raftwal_wal_fsync_duration_seconds_count{node=\"1\"} 20
raftwal_wal_fsync_duration_seconds_bucket{node=\"2\",le=\"0.0001\"} 0
raftwal_wal_fsync_duration_seconds_bucket{node=\"2\",le=\"0.001\"} 0
raftwal_wal_fsync_duration_seconds_bucket{node=\"2\",le=\"+Inf\"} 20
raftwal_wal_fsync_duration_seconds_sum{node=\"2\"} 0.03
raftwal_wal_fsync_duration_seconds_count{node=\"2\"} 20
";
        let h = Hist::parse(text, "raftwal_wal_fsync_duration_seconds");
        assert_eq!((h.count, h.sum), (40.0, 0.04));
        assert_eq!(h.quantile_bound(0.25), Some(0.0001));
        assert_eq!(h.quantile_bound(0.45), Some(0.001));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        let d = h.since(&Hist::parse(
            text.lines().take(5).collect::<Vec<_>>().join("\n").as_str(),
            "raftwal_wal_fsync_duration_seconds",
        ));
        assert_eq!(d.count, 20.0);
        let mean = d.mean().expect("samples");
        assert!((mean - 0.0015).abs() < 1e-12, "{mean}");
        assert_eq!(d.quantile_bound(0.5), Some(f64::INFINITY));
    }
}
