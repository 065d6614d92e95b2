//! `catch-up`: how fast a node far behind catches up. Three nodes on loopback (fsync on); one
//! follower is stopped while `--records` records of `--record-size` bytes are appended, then
//! restarted; then a fourth node is added as a learner to the same log. Each is timed from its
//! start to the moment it has applied the last record, as entries/s and MB/s of record bytes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use raftwal_client::{Client, ClientConfig};
use raftwal_consensus::{LogIndex, NodeId, Role};
use raftwal_server::{Node, NodeConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Records appended while the follower is down.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes per record.
    #[arg(long, default_value_t = 8)]
    record_size: usize,
    /// Where the nodes' data goes (a temp dir is made inside).
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    /// How long a node may take to catch up before the run fails.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// Records per append: the server's most.
const PER_APPEND: u64 = 10_000;

pub async fn run(args: &Args) -> anyhow::Result<()> {
    raftwal_server::http::prometheus();
    std::fs::create_dir_all(&args.dir)?;
    let dir = tempfile::tempdir_in(&args.dir).context("temp dir for the cluster")?;
    let configs = raftwal_server::local::configs(dir.path(), 3, 1)?;
    let mut nodes = std::collections::BTreeMap::new();
    for id in 1..=3 {
        start(&mut nodes, &configs, id).await?;
    }
    let leader = wait_leader(&nodes).await?;
    let behind = (1..=3).find(|&id| id != leader).expect("three nodes");
    let node = nodes.remove(&behind).expect("running");
    node.shutdown().await?;

    let endpoints: Vec<String> = nodes.values().map(|n| format!("http://{}", n.api_addr)).collect();
    let client = Client::connect(ClientConfig::new(endpoints)).await?;
    let started = Instant::now();
    let mut last = 0;
    let mut appended = 0;
    while appended < args.records {
        let count = PER_APPEND.min(args.records - appended);
        let records: Vec<Vec<u8>> = (appended..appended + count)
            .map(|i| {
                let mut r = vec![0u8; args.record_size];
                let tag = i.to_le_bytes();
                let n = tag.len().min(r.len());
                r[..n].copy_from_slice(&tag[..n]);
                r
            })
            .collect();
        last = client.append(records).await?.last_offset.0;
        appended += count;
    }
    let load = started.elapsed();
    println!(
        "appended {} records of {} B while node {behind} was down: {:.1} s ({:.0} records/s)",
        args.records,
        args.record_size,
        load.as_secs_f64(),
        args.records as f64 / load.as_secs_f64()
    );

    let timeout = Duration::from_secs(args.timeout_s);
    let t = Instant::now();
    start(&mut nodes, &configs, behind).await?;
    wait_applied(&nodes[&behind], last, timeout).await?;
    report(&format!("follower {behind} restarted"), args, t.elapsed());

    let t = Instant::now();
    start(&mut nodes, &configs, 4).await?;
    let cfg = &configs[&4];
    client
        .add_learner(NodeId(4), &cfg.peer_listen.to_string(), &nodes[&4].api_addr.to_string())
        .await?;
    wait_applied(&nodes[&4], last, timeout).await?;
    report("learner 4 added", args, t.elapsed());

    for (_, node) in nodes {
        let _ = node.shutdown().await;
    }
    Ok(())
}

fn report(what: &str, args: &Args, took: Duration) {
    let s = took.as_secs_f64();
    println!(
        "{what}: caught up {} entries in {s:.2} s: {:.0} entries/s, {:.2} MB/s of record bytes",
        args.records,
        args.records as f64 / s,
        (args.records as f64 * args.record_size as f64) / s / 1e6
    );
}

async fn start(
    nodes: &mut std::collections::BTreeMap<u64, Node>,
    configs: &std::collections::BTreeMap<u64, NodeConfig>,
    id: u64,
) -> anyhow::Result<()> {
    let node = Node::start(configs[&id].clone()).await?;
    nodes.insert(id, node);
    let addrs: Vec<(NodeId, String)> =
        nodes.values().map(|n| (n.shared.id, n.api_addr.to_string())).collect();
    raftwal_server::local::share_api_addrs(nodes.values(), &addrs);
    Ok(())
}

async fn wait_leader(nodes: &std::collections::BTreeMap<u64, Node>) -> anyhow::Result<u64> {
    for _ in 0..1000 {
        if let Some((&id, _)) =
            nodes.iter().find(|(_, n)| n.shared.status.read().role == Role::Leader)
        {
            return Ok(id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no leader within 20 s")
}

async fn wait_applied(node: &Node, last: u64, timeout: Duration) -> anyhow::Result<()> {
    let mut rx = node.shared.readable.subscribe();
    match tokio::time::timeout(timeout, rx.wait_for(|r| *r >= LogIndex(last))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("node {} stopped", node.shared.id),
        Err(_) => bail!("node {} did not catch up to {last} within {timeout:?}", node.shared.id),
    }
}
